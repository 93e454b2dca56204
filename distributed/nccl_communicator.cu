// NcclCommunicator: NCCL collectives on a private stream, nonblocking communicator, polled with
// a deadline. Host code only; compiled by nvcc so that cuda_runtime.h and nccl.h are found.
#include "distributed/nccl_communicator.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "ops/cuda/cuda_status.h"
#include "ops/status_macros.h"

namespace qtrain {
namespace {

absl::Status NcclErrorToStatus(ncclResult_t r, ncclComm_t comm, const char* file, int line,
                               const char* expr) {
  const char* last = comm != nullptr ? ncclGetLastError(comm) : nullptr;
  return absl::InternalError(absl::StrCat(expr, " failed: ", ncclGetErrorString(r),
                                          last != nullptr && *last ? absl::StrCat(" (", last, ")")
                                                                   : "",
                                          "\n  at ", file, ":", line));
}

}  // namespace
}  // namespace qtrain

// ncclInProgress is not an error for a nonblocking communicator: Wait() finishes the call.
#define NCCL_RETURN_IF_ERROR(comm, expr)                                                     \
  do {                                                                                       \
    const ncclResult_t qt_nccl_rc_ = (expr);                                                 \
    if (qt_nccl_rc_ != ncclSuccess && qt_nccl_rc_ != ncclInProgress)                         \
      return ::qtrain::NcclErrorToStatus(qt_nccl_rc_, comm, __FILE__, __LINE__, #expr);      \
  } while (0)

namespace qtrain {

absl::StatusOr<std::unique_ptr<NcclCommunicator>> NcclCommunicator::Create(
    Communicator* bootstrap, int device, absl::Duration timeout) {
  QT_CHECK_ARG(bootstrap != nullptr, "NcclCommunicator::Create: null bootstrap communicator");
  QT_CHECK_ARG(timeout > absl::ZeroDuration(), "NcclCommunicator: timeout must be > 0");
  std::unique_ptr<NcclCommunicator> c(new NcclCommunicator());
  c->bootstrap_ = bootstrap;
  c->rank_ = bootstrap->rank();
  c->world_ = bootstrap->world_size();
  c->device_ = device;
  c->timeout_ = timeout;

  // Every rank sets up its device first and the ranks agree on the outcome, so that one rank
  // without a usable GPU does not leave the others waiting for the unique id.
  auto setup = [&]() -> absl::Status {
    int count = 0;
    CUDA_RETURN_IF_ERROR(cudaGetDeviceCount(&count));
    QT_CHECK_ARG(device >= 0 && device < count, "NCCL rank ", c->rank_, ": CUDA device ", device,
                 " outside [0, ", count, ") (the local rank picks the device)");
    CUDA_RETURN_IF_ERROR(cudaSetDevice(device));
    cudaStream_t stream = nullptr;
    CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    c->stream_ = stream;
    CUDA_RETURN_IF_ERROR(cudaMalloc(&c->scratch_, sizeof(float)));
    return absl::OkStatus();
  };
  absl::Status local = setup();
  ASSIGN_OR_RETURN(std::vector<uint64_t> failed, bootstrap->AllGatherU64(local.ok() ? 0 : 1));
  if (!local.ok()) return local;
  for (int r = 0; r < c->world_; ++r) {
    if (failed[r]) {
      return absl::FailedPreconditionError(
          absl::StrCat("NCCL set-up failed on rank ", r, " (its own error says why)"));
    }
  }

  struct {
    int32_t ok;
    ncclUniqueId id;
  } hello = {0, {}};
  absl::Status id_status;
  if (c->rank_ == 0) {
    const ncclResult_t r = ncclGetUniqueId(&hello.id);
    hello.ok = r == ncclSuccess;
    if (!hello.ok) id_status = NcclErrorToStatus(r, nullptr, __FILE__, __LINE__, "ncclGetUniqueId");
  }
  RETURN_IF_ERROR(bootstrap->Broadcast(&hello, sizeof(hello), 0));
  if (!hello.ok) {
    if (!id_status.ok()) return id_status;
    return absl::FailedPreconditionError("ncclGetUniqueId failed on rank 0");
  }

  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  NCCL_RETURN_IF_ERROR(nullptr,
                       ncclCommInitRankConfig(&comm, c->world_, hello.id, c->rank_, &config));
  c->comm_ = comm;
  // Initialisation finishes asynchronously; wait for it with the deadline.
  const auto deadline = std::chrono::steady_clock::now() + absl::ToChronoNanoseconds(timeout);
  for (;;) {
    ncclResult_t state = ncclSuccess;
    NCCL_RETURN_IF_ERROR(comm, ncclCommGetAsyncError(comm, &state));
    if (state == ncclSuccess) break;
    if (state != ncclInProgress) {
      return NcclErrorToStatus(state, comm, __FILE__, __LINE__, "ncclCommInitRankConfig");
    }
    if (std::chrono::steady_clock::now() > deadline) {
      ncclCommAbort(comm);
      c->comm_ = nullptr;
      return absl::DeadlineExceededError(absl::StrCat(
          "NCCL rank ", c->rank_, " of ", c->world_, ": the communicator was not set up within ",
          absl::FormatDuration(timeout), ": another rank has died or hangs"));
    }
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  return c;
}

NcclCommunicator::~NcclCommunicator() {
  if (comm_ != nullptr) {
    if (broken_) {
      ncclCommAbort(comm_);
    } else {
      ncclCommDestroy(comm_);
    }
  }
  if (scratch_ != nullptr) cudaFree(scratch_);
  if (stream_ != nullptr) cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
}

absl::Status NcclCommunicator::Wait(const std::string& what) {
  if (broken_) {
    return absl::FailedPreconditionError("NCCL communicator was aborted after an earlier error");
  }
  cudaStream_t stream = static_cast<cudaStream_t>(stream_);
  const auto deadline = std::chrono::steady_clock::now() + absl::ToChronoNanoseconds(timeout_);
  for (;;) {
    ncclResult_t state = ncclSuccess;
    NCCL_RETURN_IF_ERROR(comm_, ncclCommGetAsyncError(comm_, &state));
    if (state != ncclSuccess && state != ncclInProgress) {
      broken_ = true;
      return NcclErrorToStatus(state, comm_, __FILE__, __LINE__, what.c_str());
    }
    if (state == ncclSuccess) {
      const cudaError_t q = cudaStreamQuery(stream);
      if (q == cudaSuccess) return absl::OkStatus();
      if (q != cudaErrorNotReady) {
        broken_ = true;
        CUDA_RETURN_IF_ERROR(q);
      }
    }
    if (std::chrono::steady_clock::now() > deadline) {
      broken_ = true;
      return absl::DeadlineExceededError(absl::StrCat(
          "NCCL rank ", rank_, " of ", world_, ": ", what, " did not finish within ",
          absl::FormatDuration(timeout_), activity_.empty() ? "" : absl::StrCat(" (", activity_, ")"),
          ": another rank has died or hangs"));
    }
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

absl::Status NcclCommunicator::WaitEnqueued(const std::string& what) {
  const auto deadline = std::chrono::steady_clock::now() + absl::ToChronoNanoseconds(timeout_);
  for (;;) {
    ncclResult_t state = ncclSuccess;
    NCCL_RETURN_IF_ERROR(comm_, ncclCommGetAsyncError(comm_, &state));
    if (state == ncclSuccess) return absl::OkStatus();
    if (state != ncclInProgress) {
      broken_ = true;
      return NcclErrorToStatus(state, comm_, __FILE__, __LINE__, what.c_str());
    }
    if (std::chrono::steady_clock::now() > deadline) {
      broken_ = true;
      return absl::DeadlineExceededError(absl::StrCat(
          "NCCL rank ", rank_, " of ", world_, ": ", what, " was not enqueued within ",
          absl::FormatDuration(timeout_), activity_.empty() ? "" : absl::StrCat(" (", activity_, ")"),
          ": another rank has died or hangs"));
    }
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

absl::Status NcclCommunicator::AllReduceAsyncOf(void* data, int64_t n, int dtype, int op,
                                                const char* what) {
  QT_CHECK_ARG(n >= 0 && (n == 0 || data != nullptr), "AllReduce: bad buffer (n=", n, ")");
  if (broken_) return absl::FailedPreconditionError("NCCL communicator was aborted");
  const ncclResult_t r =
      ncclAllReduce(data, data, static_cast<size_t>(n), static_cast<ncclDataType_t>(dtype),
                    static_cast<ncclRedOp_t>(op), comm_, static_cast<cudaStream_t>(stream_));
  // A nonblocking communicator may still be setting the call up (connections on first use):
  // no other NCCL call, and no other work on stream(), may come before that is done.
  if (r == ncclInProgress) return WaitEnqueued(absl::StrCat("ncclAllReduce of ", n, " ", what));
  if (r != ncclSuccess) {
    return NcclErrorToStatus(r, comm_, __FILE__, __LINE__, "ncclAllReduce");
  }
  return absl::OkStatus();
}

absl::Status NcclCommunicator::AllReduceSumAsync(float* data, int64_t n) {
  return AllReduceAsyncOf(data, n, ncclFloat32, ncclSum, "floats");
}

absl::Status NcclCommunicator::AllReduceMaxAsync(float* data, int64_t n) {
  return AllReduceAsyncOf(data, n, ncclFloat32, ncclMax, "floats (max)");
}

absl::Status NcclCommunicator::AllReduceSumAsync(ops::bf16* data, int64_t n) {
  return AllReduceAsyncOf(data, n, ncclBfloat16, ncclSum, "bf16s");
}

absl::Status NcclCommunicator::Synchronize() { return Wait("NCCL collectives"); }

absl::Status NcclCommunicator::WaitEvent(void* event) {
  QT_CHECK_ARG(event != nullptr, "NcclCommunicator::WaitEvent: null event");
  if (broken_) return absl::FailedPreconditionError("NCCL communicator was aborted");
  CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream_),
                                           static_cast<cudaEvent_t>(event), 0));
  return absl::OkStatus();
}

absl::Status NcclCommunicator::AllReduceSum(float* data, int64_t n) {
  RETURN_IF_ERROR(AllReduceSumAsync(data, n));
  return Wait(absl::StrCat("ncclAllReduce of ", n, " floats"));
}

absl::Status NcclCommunicator::AllReduceSum(double* data, int64_t n) {
  QT_CHECK_ARG(n >= 0 && (n == 0 || data != nullptr), "AllReduceSum: bad buffer (n=", n, ")");
  NCCL_RETURN_IF_ERROR(comm_, ncclAllReduce(data, data, static_cast<size_t>(n), ncclFloat64,
                                            ncclSum, comm_, static_cast<cudaStream_t>(stream_)));
  return Wait(absl::StrCat("ncclAllReduce of ", n, " doubles"));
}

absl::Status NcclCommunicator::ReduceScatterSum(const float* send, float* recv, int64_t count) {
  QT_CHECK_ARG(count >= 0, "ReduceScatterSum: negative count ", count);
  NCCL_RETURN_IF_ERROR(comm_,
                       ncclReduceScatter(send, recv, static_cast<size_t>(count), ncclFloat32,
                                         ncclSum, comm_, static_cast<cudaStream_t>(stream_)));
  return Wait(absl::StrCat("ncclReduceScatter of ", count, " floats per rank"));
}

absl::Status NcclCommunicator::AllGather(const float* send, float* recv, int64_t count) {
  QT_CHECK_ARG(count >= 0, "AllGather: negative count ", count);
  NCCL_RETURN_IF_ERROR(comm_, ncclAllGather(send, recv, static_cast<size_t>(count), ncclFloat32,
                                            comm_, static_cast<cudaStream_t>(stream_)));
  return Wait(absl::StrCat("ncclAllGather of ", count, " floats per rank"));
}

absl::Status NcclCommunicator::AllGatherBytes(const void* send, void* recv, int64_t bytes) {
  QT_CHECK_ARG(bytes >= 0, "AllGatherBytes: negative size ", bytes);
  NCCL_RETURN_IF_ERROR(comm_, ncclAllGather(send, recv, static_cast<size_t>(bytes), ncclUint8,
                                            comm_, static_cast<cudaStream_t>(stream_)));
  return Wait(absl::StrCat("ncclAllGather of ", bytes, " bytes per rank"));
}

absl::Status NcclCommunicator::Broadcast(void* data, int64_t bytes, int root) {
  QT_CHECK_ARG(root >= 0 && root < world_, "Broadcast: root ", root, " outside [0, ", world_,
               ")");
  QT_CHECK_ARG(bytes >= 0, "Broadcast: negative size ", bytes);
  NCCL_RETURN_IF_ERROR(comm_, ncclBroadcast(data, data, static_cast<size_t>(bytes), ncclUint8,
                                            root, comm_, static_cast<cudaStream_t>(stream_)));
  return Wait(absl::StrCat("ncclBroadcast of ", bytes, " bytes from rank ", root));
}

absl::Status NcclCommunicator::Barrier() {
  NCCL_RETURN_IF_ERROR(comm_, ncclAllReduce(scratch_, scratch_, 1, ncclFloat32, ncclSum, comm_,
                                            static_cast<cudaStream_t>(stream_)));
  return Wait("NCCL barrier");
}

}  // namespace qtrain
