// MpiCommunicator: chunked MPI collectives (MPI counts are int) under the watchdog.
#include "distributed/mpi_communicator.h"

#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "distributed/mpi_status.h"
#include "ops/status_macros.h"

namespace qtrain {
namespace {

// Elements per MPI call; MPI counts are int.
constexpr int64_t kMaxCount = int64_t{1} << 30;

[[noreturn]] void AbortJob(const std::string& message) {
  std::fprintf(stderr, "qtrain: %s\n", message.c_str());
  std::fflush(stderr);
  // If MPI_Abort itself hangs (a broken runtime), SIGALRM's default action still ends us.
  alarm(15);
  MPI_Abort(MPI_COMM_WORLD, kWatchdogExitCode);
  _exit(kWatchdogExitCode);
}

}  // namespace

absl::StatusOr<std::unique_ptr<MpiCommunicator>> MpiCommunicator::Create(
    absl::Duration timeout, Watchdog::OnTimeout on_timeout) {
  int initialized = 0;
  MPI_RETURN_IF_ERROR(MPI_Initialized(&initialized));
  if (!initialized) {
    return absl::FailedPreconditionError("MpiCommunicator::Create: MPI is not initialised");
  }
  QT_CHECK_ARG(timeout > absl::ZeroDuration(), "MpiCommunicator: timeout must be > 0, got ",
               absl::FormatDuration(timeout));
  std::unique_ptr<MpiCommunicator> c(new MpiCommunicator());
  MPI_RETURN_IF_ERROR(MPI_Comm_dup(MPI_COMM_WORLD, &c->comm_));
  MPI_RETURN_IF_ERROR(MPI_Comm_set_errhandler(c->comm_, MPI_ERRORS_RETURN));
  MPI_RETURN_IF_ERROR(MPI_Comm_rank(c->comm_, &c->rank_));
  MPI_RETURN_IF_ERROR(MPI_Comm_size(c->comm_, &c->world_));
  MPI_RETURN_IF_ERROR(MPI_Comm_split_type(c->comm_, MPI_COMM_TYPE_SHARED, c->rank_,
                                          MPI_INFO_NULL, &c->local_comm_));
  MPI_RETURN_IF_ERROR(MPI_Comm_set_errhandler(c->local_comm_, MPI_ERRORS_RETURN));
  MPI_RETURN_IF_ERROR(MPI_Comm_rank(c->local_comm_, &c->local_rank_));
  MPI_RETURN_IF_ERROR(MPI_Comm_size(c->local_comm_, &c->local_size_));
  char host[MPI_MAX_PROCESSOR_NAME];
  int len = 0;
  MPI_RETURN_IF_ERROR(MPI_Get_processor_name(host, &len));
  c->who_ = absl::StrCat("rank ", c->rank_, " of ", c->world_, " (host ", std::string(host, len),
                         ", pid ", getpid(), ")");
  if (on_timeout == nullptr) on_timeout = AbortJob;
  c->watchdog_ = std::make_unique<Watchdog>(timeout, c->who_, std::move(on_timeout));
  return c;
}

MpiCommunicator::~MpiCommunicator() {
  watchdog_.reset();
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  if (local_comm_ != MPI_COMM_NULL) MPI_Comm_free(&local_comm_);
  if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

template <typename T>
absl::Status MpiCommunicator::AllReduceSumImpl(T* data, int64_t n, MPI_Datatype type,
                                               const char* type_name) {
  QT_CHECK_ARG(n >= 0 && (n == 0 || data != nullptr), "AllReduceSum: bad buffer (n=", n, ")");
  Watchdog::Scope guard(watchdog_.get(), absl::StrCat("MPI_Allreduce of ", n, " ", type_name));
  for (int64_t off = 0; off < n; off += kMaxCount) {
    const int count = static_cast<int>(std::min(kMaxCount, n - off));
    MPI_RETURN_IF_ERROR(MPI_Allreduce(MPI_IN_PLACE, data + off, count, type, MPI_SUM, comm_));
  }
  return absl::OkStatus();
}

absl::Status MpiCommunicator::AllReduceSum(float* data, int64_t n) {
  return AllReduceSumImpl(data, n, MPI_FLOAT, "floats");
}

absl::Status MpiCommunicator::AllReduceSum(double* data, int64_t n) {
  return AllReduceSumImpl(data, n, MPI_DOUBLE, "doubles");
}

absl::Status MpiCommunicator::ReduceScatterSum(const float* send, float* recv, int64_t count) {
  QT_CHECK_ARG(count >= 0 && count <= kMaxCount, "ReduceScatterSum: count ", count,
               " outside [0, ", kMaxCount, "]");
  QT_CHECK_ARG(send != recv || count == 0, "ReduceScatterSum: send and recv must differ");
  Watchdog::Scope guard(watchdog_.get(),
                        absl::StrCat("MPI_Reduce_scatter_block of ", count, " floats per rank"));
  MPI_RETURN_IF_ERROR(MPI_Reduce_scatter_block(send, recv, static_cast<int>(count), MPI_FLOAT,
                                               MPI_SUM, comm_));
  return absl::OkStatus();
}

absl::Status MpiCommunicator::AllGather(const float* send, float* recv, int64_t count) {
  QT_CHECK_ARG(count >= 0 && count <= kMaxCount, "AllGather: count ", count, " outside [0, ",
               kMaxCount, "]");
  Watchdog::Scope guard(watchdog_.get(),
                        absl::StrCat("MPI_Allgather of ", count, " floats per rank"));
  MPI_RETURN_IF_ERROR(MPI_Allgather(send, static_cast<int>(count), MPI_FLOAT, recv,
                                    static_cast<int>(count), MPI_FLOAT, comm_));
  return absl::OkStatus();
}

absl::Status MpiCommunicator::AllGatherBytes(const void* send, void* recv, int64_t bytes) {
  QT_CHECK_ARG(bytes >= 0 && bytes <= kMaxCount, "AllGatherBytes: size ", bytes,
               " outside [0, ", kMaxCount, "]");
  Watchdog::Scope guard(watchdog_.get(),
                        absl::StrCat("MPI_Allgather of ", bytes, " bytes per rank"));
  MPI_RETURN_IF_ERROR(MPI_Allgather(send, static_cast<int>(bytes), MPI_BYTE, recv,
                                    static_cast<int>(bytes), MPI_BYTE, comm_));
  return absl::OkStatus();
}

absl::Status MpiCommunicator::Broadcast(void* data, int64_t bytes, int root) {
  QT_CHECK_ARG(root >= 0 && root < world_, "Broadcast: root ", root, " outside [0, ", world_,
               ")");
  QT_CHECK_ARG(bytes >= 0 && (bytes == 0 || data != nullptr), "Broadcast: bad buffer (",
               bytes, " bytes)");
  Watchdog::Scope guard(watchdog_.get(),
                        absl::StrCat("MPI_Bcast of ", bytes, " bytes from rank ", root));
  char* p = static_cast<char*>(data);
  for (int64_t off = 0; off < bytes; off += kMaxCount) {
    const int count = static_cast<int>(std::min(kMaxCount, bytes - off));
    MPI_RETURN_IF_ERROR(MPI_Bcast(p + off, count, MPI_BYTE, root, comm_));
  }
  return absl::OkStatus();
}

absl::Status MpiCommunicator::Barrier() {
  Watchdog::Scope guard(watchdog_.get(), "MPI_Barrier");
  MPI_RETURN_IF_ERROR(MPI_Barrier(comm_));
  return absl::OkStatus();
}

}  // namespace qtrain
