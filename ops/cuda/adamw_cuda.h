// Host API of the CUDA AdamW step over fp32 master weights that also writes their BF16 copy
// (the weights the BF16 kernels read). The reference is ops/adamw.h. All pointers are device
// pointers; work is queued on `stream`.
#ifndef QTRAIN_OPS_CUDA_ADAMW_CUDA_H_
#define QTRAIN_OPS_CUDA_ADAMW_CUDA_H_

#include <cstdint>

#include "absl/status/status.h"
#include "ops/cuda/bf16.h"

typedef struct CUstream_st* cudaStream_t;

namespace qtrain::ops {

// params, grads, m, v (n) fp32, as adamw_update: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// p -= lr * (m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + weight_decay * p), t >= 1.
// params_bf16 (n) (may be null): receives the updated params rounded to nearest even, exactly
// FloatToBf16(params[i]). grad_scale (device, one float, may be null): g = grads[i] *
// *grad_scale, e.g. the clip factor of clip_by_global_norm_cuda, which spares a pass over the
// gradients. The bias corrections are computed on the host in float with std::pow, like the
// CPU op, so both see the same constants.
absl::Status adamw_update_cuda(float* params, bf16* params_bf16, const float* grads, float* m,
                               float* v, int64_t n, float lr, float beta1, float beta2,
                               float eps, float weight_decay, int t, const float* grad_scale,
                               cudaStream_t stream);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_CUDA_ADAMW_CUDA_H_
