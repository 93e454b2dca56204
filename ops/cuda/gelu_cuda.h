// Host API of the CUDA GELU kernels (fp32 and BF16 storage, fp32 math; tanh approximation, same
// formula as ops/gelu.h, which is their reference). All pointers are device pointers; work is
// queued on `stream`.
#ifndef QTRAIN_OPS_CUDA_GELU_CUDA_H_
#define QTRAIN_OPS_CUDA_GELU_CUDA_H_

#include <cstdint>

#include "absl/status/status.h"
#include "ops/cuda/bf16.h"

// The runtime's own typedef (driver_types.h), repeated so that host code which only launches
// needs no CUDA include path; a repeated identical typedef is legal C++.
typedef struct CUstream_st* cudaStream_t;

namespace qtrain::ops {

// out (n) = gelu(inp (n)). InvalidArgument for n < 0 or null pointers; Internal (with the CUDA
// error string) when the launch fails. Asynchronous: kernel faults surface at the next sync.
absl::Status gelu_forward_cuda(float* out, const float* inp, int64_t n, cudaStream_t stream);
// dinp (n) += gelu'(inp (n)) * dout (n), accumulating like the CPU op.
absl::Status gelu_backward_cuda(float* dinp, const float* inp, const float* dout, int64_t n,
                                cudaStream_t stream);

// BF16 storage: values are widened to fp32, computed as above and rounded once (nearest even).
// 16-byte accesses where every pointer is 16-byte aligned, element-wise otherwise.
absl::Status gelu_forward_cuda(bf16* out, const bf16* inp, int64_t n, cudaStream_t stream);
// dinp (n) += gelu'(inp) * dout: the sum is formed in fp32 and rounded once.
absl::Status gelu_backward_cuda(bf16* dinp, const bf16* inp, const bf16* dout, int64_t n,
                                cudaStream_t stream);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_CUDA_GELU_CUDA_H_
