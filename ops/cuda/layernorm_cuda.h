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
#include "ops/quant/fp8.h"

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

// ---- FP8 forms (ops/cuda/fp8_cuda.h): the same kernel and statistics, other outputs.
//
// With a known (delayed) scale the output goes out as FP8 directly: out_fp8 (N,C) =
// encode(float(y) * *scale) where y is the BF16 value the forms above write (so the codes equal
// fp8_cast_cuda of their output, bit for bit, and mean/rstd/residual are bit-identical to
// theirs when both take the same access branch: a misaligned output takes the scalar one); *amax = max(*amax, max |y|) (atomicMax on the bits; may be null). The transposed copy
// that wgrad needs is left to fp8_transpose_cuda: the row-per-warp layernorm would write it one
// byte per row and column. Beyond the input reads, FP8 output + transpose move 3 bytes per
// element (1 written, 1 read and 1 written by the transpose), a BF16 output + fp8_cast_cuda
// with its transpose 6 (2 written, 2 read, 2 written): per GPT-2 124M layernorm (16384 x 768)
// 38 MB against 75 MB.
// 8-byte FP8 stores where C % 8 == 0 and out_fp8 is 8-byte aligned (with the BF16 inputs'
// 16-byte alignment); else one element per access.
absl::Status layernorm_forward_fp8_cuda(uint8_t* out_fp8, float* mean, float* rstd, float* amax,
                                        const bf16* inp, const bf16* weight, const bf16* bias,
                                        int N, int C, Fp8Format format, const float* scale,
                                        cudaStream_t stream);
absl::Status residual_layernorm_forward_fp8_cuda(bf16* residual, uint8_t* out_fp8, float* mean,
                                                 float* rstd, float* amax, const bf16* a,
                                                 const bf16* b, const bf16* weight,
                                                 const bf16* bias, int N, int C,
                                                 Fp8Format format, const float* scale,
                                                 cudaStream_t stream);

// Current scaling: the BF16 output exactly as layernorm_forward_cuda /
// residual_layernorm_forward_cuda write it, plus *amax = max(*amax, max |out|) in the same pass;
// the cast (fp8_cast_cuda with the scale fp8_current_scale_cuda derives) follows.
absl::Status layernorm_forward_amax_cuda(bf16* out, float* mean, float* rstd, float* amax,
                                         const bf16* inp, const bf16* weight, const bf16* bias,
                                         int N, int C, cudaStream_t stream);
absl::Status residual_layernorm_forward_amax_cuda(bf16* residual, bf16* out, float* mean,
                                                  float* rstd, float* amax, const bf16* a,
                                                  const bf16* b, const bf16* weight,
                                                  const bf16* bias, int N, int C,
                                                  cudaStream_t stream);

// The TWEO outlier loss's gradient with respect to the layernorm's input, added to dinp by
// the backward that reads that input anyway (the input of a block's first layernorm, and of
// the final one, is the previous block's output A): dinp += a * (|x| inv)^(p-1) sign(x) in
// fp32 (x^3 exactly for p = 4), before the one rounding to BF16; a = 0 adds nothing.
// Make() forms it as ops::tweo_backward's coefficient: a = scale * p / n / (tau + eps),
// inv = 1 / (tau + eps), with scale = loss_scale * lambda / n_layer and n the elements of A.
struct TweoGradTerm {
  float a = 0.f;
  float inv = 0.f;
  float p = 4.f;
  static TweoGradTerm Make(double scale, double tau, double p, double eps, int64_t n);
};

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
//   tweo: the TWEO term above (a = 0: none), when inp is a block output.
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
                                     bf16* out_recompute = nullptr,
                                     const TweoGradTerm& tweo = {});

// The same with BF16 parameter gradients (the sums stay fp32): kOverwrite writes
// bf16(sum), kAccumulate bf16(float(old) + sum), each rounded once to nearest even.
absl::Status layernorm_backward_cuda(bf16* dinp, bf16* dweight, bf16* dbias, const bf16* dout,
                                     const bf16* inp, const bf16* weight, const bf16* bias,
                                     const float* mean, const float* rstd, int N, int C,
                                     void* workspace, int64_t workspace_bytes, cudaStream_t stream,
                                     GradWrite dparams = GradWrite::kAccumulate,
                                     bf16* out_recompute = nullptr,
                                     const TweoGradTerm& tweo = {});

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
