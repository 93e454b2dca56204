// NcclCommunicator: Communicator over NCCL for GPU ranks (buffers are device memory), bootstrapped
// by another communicator (MPI): rank 0 makes the NCCL unique id, the bootstrap broadcasts it.
// This header needs no CUDA or NCCL include path; the implementation is nvcc-compiled.
#ifndef QTRAIN_DISTRIBUTED_NCCL_COMMUNICATOR_H_
#define QTRAIN_DISTRIBUTED_NCCL_COMMUNICATOR_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "distributed/communicator.h"
#include "ops/cuda/bf16.h"

struct ncclComm;  // nccl.h: typedef struct ncclComm* ncclComm_t

namespace qtrain {

class NcclCommunicator : public Communicator {
 public:
  // Collective over `bootstrap`'s ranks (which it keeps using for local rank and AllOk-style
  // agreement; it must outlive this). Binds CUDA device `device` on the calling thread, creates
  // its own stream, and joins the NCCL communicator without blocking so that a rank that never
  // joins turns into DeadlineExceeded after `timeout` instead of a hang. No GPU or no driver:
  // Unavailable naming the CUDA error.
  static absl::StatusOr<std::unique_ptr<NcclCommunicator>> Create(Communicator* bootstrap,
                                                                  int device,
                                                                  absl::Duration timeout);
  ~NcclCommunicator() override;

  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  int local_rank() const override { return bootstrap_->local_rank(); }
  int local_size() const override { return bootstrap_->local_size(); }
  std::string backend() const override { return "NCCL"; }

  // Synchronous: enqueue on stream(), then wait (polling, with the timeout; on timeout or an
  // asynchronous NCCL error the communicator is aborted and every later call fails).
  absl::Status AllReduceSum(float* data, int64_t n) override;
  absl::Status AllReduceSum(double* data, int64_t n) override;
  absl::Status ReduceScatterSum(const float* send, float* recv, int64_t count) override;
  absl::Status AllGather(const float* send, float* recv, int64_t count) override;
  absl::Status AllGatherBytes(const void* send, void* recv, int64_t bytes) override;
  absl::Status Broadcast(void* data, int64_t bytes, int root) override;
  absl::Status Barrier() override;
  void SetActivity(const std::string& activity) override { activity_ = activity; }

  // For overlapping gradient buckets with backward: enqueue without waiting for the device
  // (on first use NCCL may need a moment to set the call up; that waits, with the timeout);
  // Synchronize waits for everything enqueued (with the timeout). Ordering against compute
  // streams is the caller's (cudaEvent on the producing stream, WaitEvent below).
  absl::Status AllReduceSumAsync(float* data, int64_t n);
  // The same over BF16 values (e.g. BF16 gradients, training.grad_dtype): NCCL sums in its own
  // order and rounds to BF16.
  absl::Status AllReduceSumAsync(ops::bf16* data, int64_t n);
  // Elementwise maximum over the ranks (FP8 amaxes: exact, order-independent).
  absl::Status AllReduceMaxAsync(float* data, int64_t n);
  absl::Status Synchronize();
  // Collectives enqueued after this call wait for the device work recorded so far in `event`
  // (an opaque cudaEvent_t of this device, e.g. DeviceModel's gradient-ready event); the host
  // does not wait.
  absl::Status WaitEvent(void* event);

  // The cudaStream_t collectives run on.
  void* stream() const { return stream_; }
  int device() const { return device_; }

 private:
  NcclCommunicator() = default;
  absl::Status Wait(const std::string& what);
  // After a call that returned ncclInProgress: polls until NCCL has enqueued it.
  absl::Status WaitEnqueued(const std::string& what);
  // ncclAllReduce (in place, ncclRedOp_t `op`) of n values of ncclDataType_t `dtype` on
  // stream().
  absl::Status AllReduceAsyncOf(void* data, int64_t n, int dtype, int op, const char* what);

  Communicator* bootstrap_ = nullptr;
  ncclComm* comm_ = nullptr;
  void* stream_ = nullptr;
  float* scratch_ = nullptr;  // one float on the device, for Barrier
  int rank_ = 0, world_ = 1, device_ = 0;
  absl::Duration timeout_;
  std::string activity_;
  bool broken_ = false;  // aborted after a timeout or asynchronous error
};

}  // namespace qtrain

#endif  // QTRAIN_DISTRIBUTED_NCCL_COMMUNICATOR_H_
