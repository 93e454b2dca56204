// Communicator: the collectives data-parallel training needs, over MPI (CPU ranks), NCCL (GPU
// ranks) or nothing (one process). Every call is collective: all ranks make it, in the same order.
#ifndef QTRAIN_DISTRIBUTED_COMMUNICATOR_H_
#define QTRAIN_DISTRIBUTED_COMMUNICATOR_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qtrain {

// Buffers are host memory for MPI and the single process, device memory for NCCL. Counts are
// elements unless a name says bytes. A failing or timed-out collective returns a status that
// names the call; the job cannot continue after one (the other ranks are out of step).
class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int world_size() const = 0;
  // Rank among the processes on this machine (picks the GPU), and their number.
  virtual int local_rank() const = 0;
  virtual int local_size() const = 0;
  // "single", "MPI" or "NCCL".
  virtual std::string backend() const = 0;

  // data[i] <- sum over ranks of data[i], identical on every rank.
  virtual absl::Status AllReduceSum(float* data, int64_t n) = 0;
  virtual absl::Status AllReduceSum(double* data, int64_t n) = 0;
  // `send` holds world_size() blocks of `count`; `recv` (count) gets the sum over ranks of
  // block rank().
  virtual absl::Status ReduceScatterSum(const float* send, float* recv, int64_t count) = 0;
  // `recv` (world_size() * count) gets every rank's `send` (count), block r from rank r.
  virtual absl::Status AllGather(const float* send, float* recv, int64_t count) = 0;
  virtual absl::Status AllGatherBytes(const void* send, void* recv, int64_t bytes) = 0;
  // `data` (bytes) on every rank <- root's.
  virtual absl::Status Broadcast(void* data, int64_t bytes, int root) = 0;
  virtual absl::Status Barrier() = 0;

  // What the job is doing ("step 12"), named when a collective times out.
  virtual void SetActivity(const std::string& activity) { (void)activity; }

  // One value per rank, index = rank. Host memory only (not for NCCL).
  absl::StatusOr<std::vector<uint64_t>> AllGatherU64(uint64_t value);
};

// World size 1: reductions are identities, gathers copies. No threads, no MPI.
class SingleProcessCommunicator : public Communicator {
 public:
  int rank() const override { return 0; }
  int world_size() const override { return 1; }
  int local_rank() const override { return 0; }
  int local_size() const override { return 1; }
  std::string backend() const override { return "single"; }

  absl::Status AllReduceSum(float* data, int64_t n) override;
  absl::Status AllReduceSum(double* data, int64_t n) override;
  absl::Status ReduceScatterSum(const float* send, float* recv, int64_t count) override;
  absl::Status AllGather(const float* send, float* recv, int64_t count) override;
  absl::Status AllGatherBytes(const void* send, void* recv, int64_t bytes) override;
  absl::Status Broadcast(void* data, int64_t bytes, int root) override;
  absl::Status Barrier() override { return absl::OkStatus(); }
};

}  // namespace qtrain

#endif  // QTRAIN_DISTRIBUTED_COMMUNICATOR_H_
