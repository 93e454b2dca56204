// CUDA runtime errors as absl::Status: CUDA_RETURN_IF_ERROR carries file:line and the call's
// text like RETURN_IF_ERROR (ops/status_macros.h) does.
#ifndef QTRAIN_OPS_CUDA_CUDA_STATUS_H_
#define QTRAIN_OPS_CUDA_CUDA_STATUS_H_

#include <cuda_runtime_api.h>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace qtrain::internal {

// Out of memory and a missing device/driver get their own codes so callers can react (retry
// smaller, skip GPU work); everything else is Internal.
inline absl::Status CudaErrorToStatus(cudaError_t err, const char* file, int line,
                                      const char* expr) {
  const std::string msg = absl::StrCat(cudaGetErrorName(err), ": ", cudaGetErrorString(err),
                                       "\n  at ", file, ":", line, " in ", expr);
  switch (err) {
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(msg);
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
      return absl::UnavailableError(msg);
    default:
      return absl::InternalError(msg);
  }
}

}  // namespace qtrain::internal

#define CUDA_RETURN_IF_ERROR(expr)                                                        \
  do {                                                                                    \
    const cudaError_t qt_cuda_err_ = (expr);                                              \
    if (qt_cuda_err_ != cudaSuccess)                                                      \
      return ::qtrain::internal::CudaErrorToStatus(qt_cuda_err_, __FILE__, __LINE__, #expr); \
  } while (0)

#endif  // QTRAIN_OPS_CUDA_CUDA_STATUS_H_
