// Host API of the CUDA global gradient norm (deterministic two-pass sum of squares in fp64)
// and clipping. The reference is ops/grad_norm.h. All pointers are device pointers; work is
// queued on `stream`, and nothing here waits for the device.
#ifndef QTRAIN_OPS_CUDA_GRAD_NORM_CUDA_H_
#define QTRAIN_OPS_CUDA_GRAD_NORM_CUDA_H_

#include <cstdint>

#include "absl/status/status.h"
#include "ops/cuda/bf16.h"

typedef struct CUstream_st* cudaStream_t;

namespace qtrain::ops {

// Workspace bytes of sum_squares_cuda (a fixed number of fp64 partial sums).
int64_t sum_squares_cuda_workspace_bytes();

// *out (device, one double) = sum of grads[i]^2 over grads (n), squares and sums in fp64.
// Deterministic: a fixed grid (independent of the device) of block partials reduced in a fixed
// tree order, then one block sums the partials; no atomics.
absl::Status sum_squares_cuda(double* out, const float* grads, int64_t n, void* workspace,
                              int64_t workspace_bytes, cudaStream_t stream);
// The same over BF16 gradients: squares of the exactly widened values, summed in fp64 with the
// partition above, so the bits equal those of the fp32 overload fed the widened values when
// both take the same access branch (16-byte aligned fp32 and 8-byte aligned BF16 pointers, or
// neither).
absl::Status sum_squares_cuda(double* out, const bf16* grads, int64_t n, void* workspace,
                              int64_t workspace_bytes, cudaStream_t stream);

// *factor (device float) = min(1, max_norm / (sqrt(*sum_squares) + 1e-6)), computed in double
// and rounded to float exactly as clip_by_global_norm does on the CPU with norm =
// sqrt(sum_squares). Feed it to adamw_update_cuda's grad_scale to clip without a pass.
absl::Status clip_factor_cuda(float* factor, const double* sum_squares, double max_norm,
                              cudaStream_t stream);

// grads (n) *= the factor above (left untouched where it is 1); *factor receives it when
// factor is not null.
absl::Status clip_by_global_norm_cuda(float* grads, int64_t n, const double* sum_squares,
                                      double max_norm, float* factor, cudaStream_t stream);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_CUDA_GRAD_NORM_CUDA_H_
