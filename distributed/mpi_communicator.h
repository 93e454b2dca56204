// MpiCommunicator: Communicator over an MPI communicator for CPU ranks, every collective under a
// watchdog that aborts the job (MPI_Abort, with a message naming this rank) after a timeout.
#ifndef QTRAIN_DISTRIBUTED_MPI_COMMUNICATOR_H_
#define QTRAIN_DISTRIBUTED_MPI_COMMUNICATOR_H_

#include <mpi.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "distributed/communicator.h"
#include "distributed/watchdog.h"

namespace qtrain {

// Exit code of a job stopped by the watchdog (MPI_Abort's error code).
constexpr int kWatchdogExitCode = 3;

class MpiCommunicator : public Communicator {
 public:
  // MPI must be initialised. Duplicates MPI_COMM_WORLD with errors returned rather than fatal,
  // and finds the ranks on this machine (MPI_COMM_TYPE_SHARED). `on_timeout` null means: print
  // the message to stderr and MPI_Abort the whole job.
  static absl::StatusOr<std::unique_ptr<MpiCommunicator>> Create(
      absl::Duration timeout, Watchdog::OnTimeout on_timeout = nullptr);
  ~MpiCommunicator() override;

  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  int local_rank() const override { return local_rank_; }
  int local_size() const override { return local_size_; }
  std::string backend() const override { return "MPI"; }

  absl::Status AllReduceSum(float* data, int64_t n) override;
  absl::Status AllReduceSum(double* data, int64_t n) override;
  absl::Status ReduceScatterSum(const float* send, float* recv, int64_t count) override;
  absl::Status AllGather(const float* send, float* recv, int64_t count) override;
  absl::Status AllGatherBytes(const void* send, void* recv, int64_t bytes) override;
  absl::Status Broadcast(void* data, int64_t bytes, int root) override;
  absl::Status Barrier() override;
  void SetActivity(const std::string& activity) override { watchdog_->SetActivity(activity); }

  MPI_Comm comm() const { return comm_; }
  // "rank 1 of 2 (host node7, pid 123)": how messages name this process.
  const std::string& who() const { return who_; }

 private:
  MpiCommunicator() = default;
  template <typename T>
  absl::Status AllReduceSumImpl(T* data, int64_t n, MPI_Datatype type, const char* type_name);

  MPI_Comm comm_ = MPI_COMM_NULL;
  MPI_Comm local_comm_ = MPI_COMM_NULL;
  int rank_ = 0, world_ = 1, local_rank_ = 0, local_size_ = 1;
  std::string who_;
  std::unique_ptr<Watchdog> watchdog_;
};

}  // namespace qtrain

#endif  // QTRAIN_DISTRIBUTED_MPI_COMMUNICATOR_H_
