// Communicator::AllGatherU64 and the single-process communicator.
#include "distributed/communicator.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "ops/status_macros.h"

namespace qtrain {

absl::StatusOr<std::vector<uint64_t>> Communicator::AllGatherU64(uint64_t value) {
  std::vector<uint64_t> all(world_size());
  RETURN_IF_ERROR(AllGatherBytes(&value, all.data(), sizeof(value)));
  return all;
}

absl::Status SingleProcessCommunicator::AllReduceSum(float* data, int64_t n) {
  QT_CHECK_ARG(n >= 0 && (n == 0 || data != nullptr), "AllReduceSum: bad buffer (n=", n, ")");
  return absl::OkStatus();
}

absl::Status SingleProcessCommunicator::AllReduceSum(double* data, int64_t n) {
  QT_CHECK_ARG(n >= 0 && (n == 0 || data != nullptr), "AllReduceSum: bad buffer (n=", n, ")");
  return absl::OkStatus();
}

absl::Status SingleProcessCommunicator::ReduceScatterSum(const float* send, float* recv,
                                                         int64_t count) {
  QT_CHECK_ARG(count >= 0, "ReduceScatterSum: negative count ", count);
  if (count > 0 && send != recv) std::memmove(recv, send, count * sizeof(float));
  return absl::OkStatus();
}

absl::Status SingleProcessCommunicator::AllGather(const float* send, float* recv,
                                                  int64_t count) {
  QT_CHECK_ARG(count >= 0, "AllGather: negative count ", count);
  if (count > 0 && send != recv) std::memmove(recv, send, count * sizeof(float));
  return absl::OkStatus();
}

absl::Status SingleProcessCommunicator::AllGatherBytes(const void* send, void* recv,
                                                       int64_t bytes) {
  QT_CHECK_ARG(bytes >= 0, "AllGatherBytes: negative size ", bytes);
  if (bytes > 0 && send != recv) std::memmove(recv, send, bytes);
  return absl::OkStatus();
}

absl::Status SingleProcessCommunicator::Broadcast(void* data, int64_t bytes, int root) {
  QT_CHECK_ARG(root == 0, "Broadcast: root ", root, " outside [0, 1)");
  QT_CHECK_ARG(bytes >= 0, "Broadcast: negative size ", bytes);
  (void)data;
  return absl::OkStatus();
}

}  // namespace qtrain
