// Host API of the CUDA layernorm kernels: residual add fused with layernorm forward, and a
// layernorm backward whose weight/bias gradients are reduced deterministically and which can
// recompute the forward's output on the way (BF16 storage, fp32 math and statistics). The
// reference is ops/layernorm.h (+ ops/residual.h). All pointers are device pointers; work is
// queued on `stream`.
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

// Workspace bytes of layernorm_backward_cuda: one fp32 partial row [dweight | dbias] (2C
// floats) per block of the backward kernel, at most N of them. The partition into blocks (one
// wave that fills the 132 SMs of an H100/H200) depends on N and C alone, not on the device or
// the pointers' alignment; so do this size and the summation order of dweight/dbias.
// InvalidArgument-free: returns 0 for non-positive sizes.
int64_t layernorm_backward_cuda_workspace_bytes(int N, int C);

// Layernorm backward, reading dout and inp once:
//   dinp (N,C) += (w dy - mean(w dy) - xhat mean(w dy xhat)) rstd, formed in fp32 and rounded to
//                 BF16 once (xhat = (inp - mean) rstd);
//   dweight (C) += sum over rows of xhat dy, dbias (C) += sum over rows of dy; written over
//                 instead with dparams == kOverwrite;
//   out_recompute (N,C), when non-null: the forward's output bf16(xhat * weight + bias), bit for
//                 bit what layernorm_forward_cuda / residual_layernorm_forward_cuda wrote from
//                 this inp, mean and rstd (the same expression and rounding), so that callers
//                 need not keep it. Must not overlap the other arrays. Costs one extra write of N*C BF16 values.
//   bias (C): the forward's bias, read only for out_recompute (may be null without it).
// mean, rstd as saved by the forward. Two kernels, deterministic (bit-identical from run to
// run, no atomics): the first reads each row of dout and inp once, one warp per row (per slab
// of 12800 columns for wider rows), rows spread over the grid in a fixed interleave; each warp adds its rows' dweight/dbias terms in
// row order to accumulators of its own, and each block adds its warps' in warp order into its
// partial row of the workspace. The second adds the partial rows in a fixed order (32
// interleaved sequential sums, then those in order) and writes dweight/dbias.
// 16-byte accesses where C % 8 == 0 and dinp, dout, inp, weight (and out_recompute, bias when
// used) are 16-byte aligned, else one element per access.
absl::Status layernorm_backward_cuda(bf16* dinp, float* dweight, float* dbias, const bf16* dout,
                                     const bf16* inp, const bf16* weight, const bf16* bias,
                                     const float* mean, const float* rstd, int N, int C,
                                     void* workspace, int64_t workspace_bytes, cudaStream_t stream,
                                     GradWrite dparams = GradWrite::kAccumulate,
                                     bf16* out_recompute = nullptr);

// The same with BF16 parameter gradients (the sums stay fp32): kOverwrite writes
// bf16(sum), kAccumulate bf16(float(old) + sum), each rounded once to nearest even.
absl::Status layernorm_backward_cuda(bf16* dinp, bf16* dweight, bf16* dbias, const bf16* dout,
                                     const bf16* inp, const bf16* weight, const bf16* bias,
                                     const float* mean, const float* rstd, int N, int C,
                                     void* workspace, int64_t workspace_bytes, cudaStream_t stream,
                                     GradWrite dparams = GradWrite::kAccumulate,
                                     bf16* out_recompute = nullptr);

// The earlier form, without bias and recomputed output (fp32 gradients).
inline absl::Status layernorm_backward_cuda(bf16* dinp, float* dweight, float* dbias,
                                            const bf16* dout, const bf16* inp,
                                            const bf16* weight, const float* mean,
                                            const float* rstd, int N, int C, void* workspace,
                                            int64_t workspace_bytes, cudaStream_t stream,
                                            GradWrite dparams = GradWrite::kAccumulate) {
  return layernorm_backward_cuda(dinp, dweight, dbias, dout, inp, weight, nullptr, mean, rstd, N,
                                 C, workspace, workspace_bytes, stream, dparams, nullptr);
}

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_CUDA_LAYERNORM_CUDA_H_
