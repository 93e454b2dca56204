// Host API of the quantizing layernorm kernels of QAT: layernorm and residual + layernorm
// forward whose output is the fake-quantized GEMM input (per-tensor learned LSQ/LSQ+ or
// per-token dynamic, optional int8 codes for the INT8 GEMM), and the layernorm backward that
// applies the quantizer's straight-through mask and reduces the per-tensor step/offset gradient
// in the same pass that recomputes the output. References: ops/layernorm.h + ops/residual.h
// for the layernorm (its GPU form layernorm_cuda.h) and ops/quant/lsq.h for the quantizer.
// Device pointers, row-major; work is queued on `stream`.
#ifndef QTRAIN_OPS_CUDA_LAYERNORM_QUANT_CUDA_H_
#define QTRAIN_OPS_CUDA_LAYERNORM_QUANT_CUDA_H_

#include <cstdint>

#include "absl/status/status.h"
#include "ops/cuda/bf16.h"
#include "ops/cuda/grad_write.h"
#include "ops/cuda/layernorm_cuda.h"
#include "ops/cuda/lsq_cuda.h"

typedef struct CUstream_st* cudaStream_t;

namespace qtrain::ops {

// out (N, C) = bf16(Q(v)) with v = bf16(layernorm(inp)) the output layernorm_forward_cuda
// writes (the same mean, rstd and affine expression, so with q.mode == kNone this IS
// layernorm_forward_cuda, bit for bit); mean, rstd (N) fp32 for backward; q.codes /
// q.token_scales written when given (see ActQuant). One warp per row; kPerToken adds one pass
// over the row for its absmax (the row is re-read from L1).
absl::Status layernorm_forward_quant_cuda(bf16* out, float* mean, float* rstd, const bf16* inp,
                                          const bf16* weight, const bf16* bias, int N, int C,
                                          const ActQuant& q, cudaStream_t stream);

// residual (N, C) = bf16(a + b) (formed in fp32, rounded once), out = bf16(Q(bf16(layernorm(
// residual)))), as residual_layernorm_forward_cuda followed by the quantizer.
absl::Status residual_layernorm_forward_quant_cuda(bf16* residual, bf16* out, float* mean,
                                                   float* rstd, const bf16* a, const bf16* b,
                                                   const bf16* weight, const bf16* bias, int N,
                                                   int C, const ActQuant& q,
                                                   cudaStream_t stream);

// Workspace bytes of layernorm_backward_quant_cuda: the [dweight | dbias] partial rows of the
// fixed row partition plus the step/offset partials (act_quant_backward_cuda_workspace_bytes).
int64_t layernorm_backward_quant_cuda_workspace_bytes(int N, int C, const ActQuant& q);

// Layernorm backward through the quantizer. dout (N, C) is the gradient with respect to the
// quantized output (the GEMM's dinp). Per element the kernel recomputes v = bf16(y) (y the
// layernorm output from inp, mean, rstd, weight, bias: bias is required) and x = v / s (or
// (v - beta) / s), then:
//   dy = dout where inside (kPerTensor), dout (kPerToken, kNone);
//   dinp (N, C) += layernorm backward of dy, as layernorm_backward_cuda (fp32, rounded once);
//   dweight, dbias (C) += (kOverwrite: =) the sums over rows, deterministic;
//   dstep, doffset (kPerTensor; doffset only for LSQ+, else null): g * lsq_backward's sums of
//     dout terms over all N * C elements, written with dparams (deterministic, double);
//   out_recompute (N, C), optional: the forward's quantized output bf16(Q(v)) bit for bit
//     (kPerToken needs q.token_scales as the forward wrote them), for the weight-gradient GEMM,
//     so that the model need not keep it.
//   tweo: the TWEO outlier loss's gradient at inp (layernorm_cuda.h's TweoGradTerm), added to
//     dinp when inp is a block output.
// mean, rstd as the forward saved them; q as the forward used it (step clamped by it).
absl::Status layernorm_backward_quant_cuda(bf16* dinp, float* dweight, float* dbias,
                                           float* dstep, float* doffset, const bf16* dout,
                                           const bf16* inp, const bf16* weight,
                                           const bf16* bias, const float* mean,
                                           const float* rstd, int N, int C, const ActQuant& q,
                                           void* workspace, int64_t workspace_bytes,
                                           cudaStream_t stream,
                                           GradWrite dparams = GradWrite::kAccumulate,
                                           bf16* out_recompute = nullptr,
                                           const TweoGradTerm& tweo = {});
// BF16 parameter gradients: every sum in fp32/double, rounded once to BF16 when written.
absl::Status layernorm_backward_quant_cuda(bf16* dinp, bf16* dweight, bf16* dbias, bf16* dstep,
                                           bf16* doffset, const bf16* dout, const bf16* inp,
                                           const bf16* weight, const bf16* bias,
                                           const float* mean, const float* rstd, int N, int C,
                                           const ActQuant& q, void* workspace,
                                           int64_t workspace_bytes, cudaStream_t stream,
                                           GradWrite dparams = GradWrite::kAccumulate,
                                           bf16* out_recompute = nullptr,
                                           const TweoGradTerm& tweo = {});

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_CUDA_LAYERNORM_QUANT_CUDA_H_
