// Host API of the CUDA layernorm kernels: residual add fused with layernorm forward, and a
// layernorm backward whose weight/bias gradients are reduced deterministically (BF16 storage,
// fp32 math and statistics). The reference is ops/layernorm.h (+ ops/residual.h). All pointers
// are device pointers; work is queued on `stream`.
#ifndef QTRAIN_OPS_CUDA_LAYERNORM_CUDA_H_
#define QTRAIN_OPS_CUDA_LAYERNORM_CUDA_H_

#include <cstdint>

#include "absl/status/status.h"
#include "ops/cuda/bf16.h"
#include "ops/cuda/grad_write.h"

typedef struct CUstream_st* cudaStream_t;

namespace qtrain::ops {

// residual (N,C) = a + b (formed in fp32, rounded to BF16 once); out (N,C) = layernorm of that
// rounded residual (what backward will see) with weight, bias (C); mean, rstd (N) fp32 saved
// for backward; eps = 1e-5, biased variance as in GPT-2.
absl::Status residual_layernorm_forward_cuda(bf16* residual, bf16* out, float* mean, float* rstd,
                                             const bf16* a, const bf16* b, const bf16* weight,
                                             const bf16* bias, int N, int C,
                                             cudaStream_t stream);

// out (N,C) = layernorm(inp (N,C)); as above without the residual.
absl::Status layernorm_forward_cuda(bf16* out, float* mean, float* rstd, const bf16* inp,
                                    const bf16* weight, const bf16* bias, int N, int C,
                                    cudaStream_t stream);

// Workspace bytes of layernorm_backward_cuda: one fp32 partial sum per column and per block of
// 64 rows. InvalidArgument-free: returns 0 for non-positive sizes.
int64_t layernorm_backward_cuda_workspace_bytes(int N, int C);

// dinp (N,C) += (BF16, the sum formed in fp32 and rounded once), dweight (C) +=, dbias (C) +=
// (fp32; written over instead with dparams == kOverwrite). mean, rstd as saved by the forward.
// Deterministic: per chunk of 64 rows each column is summed by a fixed warp/row assignment and
// the warps' sums in warp order, a second pass sums the chunks in order; no atomics.
absl::Status layernorm_backward_cuda(bf16* dinp, float* dweight, float* dbias, const bf16* dout,
                                     const bf16* inp, const bf16* weight, const float* mean,
                                     const float* rstd, int N, int C, void* workspace,
                                     int64_t workspace_bytes, cudaStream_t stream,
                                     GradWrite dparams = GradWrite::kAccumulate);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_CUDA_LAYERNORM_CUDA_H_
