// Host API of the CUDA LSQ/LSQ+ quantizers of QAT: the weight quantizer (fp32 master weight ->
// BF16 compute copy, optional int8 codes, straight-through backward with the step/offset
// gradients), the activation quantizer descriptor shared by the fused layernorm / GELU variants
// (layernorm_quant_cuda.h, gelu_quant_cuda.h), a standalone activation pass for tensors written
// by a library (the attention output), and the first-batch activation step init. The reference
// is ops/quant/lsq.h, whose arithmetic these kernels reproduce bit for bit. All pointers are
// device pointers, row-major like the CPU ops; work is queued on `stream`; nothing here
// synchronizes the host.
#ifndef QTRAIN_OPS_CUDA_LSQ_CUDA_H_
#define QTRAIN_OPS_CUDA_LSQ_CUDA_H_

#include <cstdint>

#include "absl/status/status.h"
#include "ops/cuda/bf16.h"
#include "ops/cuda/grad_write.h"
#include "ops/quant/lsq.h"

typedef struct CUstream_st* cudaStream_t;

namespace qtrain::ops {

// Learned steps are clamped to at least this before use (NaN too), in place, as
// Linear::ClampSteps does on the CPU (trainer/linear.cc's kMinStep): an optimizer step may push
// a step to zero or below, where fake quantization is undefined.
inline constexpr float kLsqMinStep = 1e-8f;

// ---- Arithmetic (every kernel below; ops/quant/lsq.h spells it out) ----
// x = v / s, or (v - beta) / s for LSQ+ (__fdiv_rn / __fsub_rn: true IEEE division, no
// reciprocal); r = rintf(x) (half to even), clamped to [-Qn, Qp]; q = r * s (+ beta) with
// __fmul_rn / __fadd_rn (never contracted into an FMA). So q is bit for bit the CPU's
// lsq_forward<float> of the same v, s, beta; a BF16 output is bf16(q), rounded once to nearest
// even; codes are r. NaN v gives NaN q (and code 0, as the CPU writes for lsq_quantize_codes'
// rejected elements). The backward classifies each element by the same x: inside when
// -Qn < x < Qp, clipped otherwise (a value exactly on a bound counts as clipped).
//
// Gradient sums (ds, dbeta) are formed in double in a fixed partition and order that depends
// only on the shape (never on the GPU, the stream or timing), multiplied by g in double, then
// written (GradWrite) in the gradient's type: deterministic, no atomics. The CPU sums the same
// exact per-element terms in double in index order, so the two differ only by the double
// rounding of the order (far below float precision: the float results agree to an ulp, nearly
// always exactly).

// ======================= Weights =======================

// Fake-quantizes an fp32 master weight w (rows, cols) = (OC, C) with steps s (S) and, for LSQ+,
// offsets beta (S), S = lsq_num_scales(cfg, rows, cols), in cfg's granularity (per tensor, per
// channel = row, per group along a row; a row's last group may be shorter, see lsq.h). Run it
// once per optimizer step right after the update (in place of the plain BF16 copy the AdamW
// kernel would write: pass params_bf16 = nullptr there for QAT weights, or let it write and
// overwrite it here), so that the forward GEMM reads the quantized weight.
// Outputs, each optional (null: skipped), none aliasing the inputs:
//   out (rows, cols) BF16: bf16(q + phi_add) where phi_add is given (Phi: W_eff = Q(W) +
//       L diag(gamma) R formed by phi_product_cuda, added in fp32 and rounded once), bf16(q)
//       otherwise;
//   codes (rows, cols) int8: r, the integer levels (for the INT8 GEMM). Symmetric modes only
//       (LSQ+ codes carry an offset the INT8 GEMM cannot apply; 8-bit LSQ+ codes do not fit
//       int8): InvalidArgument otherwise;
//   residual (rows, cols) fp32: w - q, the quantization error whose rank-r SVD initialises Phi
//       (bit for bit the CPU's `w[i] - wq[i]` of Linear::InitQuantizers).
// s is clamped in place to >= kLsqMinStep first (so s is not const); beta is read only. At
// least one output must be given. 16-byte accesses (8 elements per thread) where cols % 8 == 0,
// per-group group_size % 8 == 0 and every pointer given is 16-byte aligned; one element per
// access otherwise (both paths give the same bits).
absl::Status lsq_weight_forward_cuda(bf16* out, int8_t* codes, float* residual, const float* w,
                                     float* s, const float* beta, const float* phi_add,
                                     int64_t rows, int64_t cols, const LsqConfig& cfg,
                                     cudaStream_t stream);

// Workspace bytes of lsq_weight_backward_cuda (0 except for kPerTensor, which sums per-row
// partials in a second pass).
int64_t lsq_weight_backward_cuda_workspace_bytes(int64_t rows, int64_t cols,
                                                 const LsqConfig& cfg);

// Straight-through backward of lsq_weight_forward_cuda. On entry dw (rows, cols) holds the
// gradient with respect to the quantized weight the GEMMs used (dW_eff, as matmul_backward_cuda
// left it); on exit it holds the weight gradient: dW_eff where inside, 0 where clipped (in
// place, exact: no rounding). ds (S) and dbeta (S, LSQ+ only, else must be null) receive, per
// scale k, g * sum over the scale's elements of
//   inside: ds: dW_eff * (round(x) - x)   dbeta: 0
//   clipped low (x <= -Qn): ds: dW_eff * (-Qn), dbeta: dW_eff; high (x >= Qp): ds: dW_eff * Qp,
//   dbeta: dW_eff,
// g = 1 / sqrt(N * Qp) (N = elements of scale k: cols per channel, group_size or the short last
// group's length per group, rows * cols per tensor; or cfg.grad_scale_count when > 0; g = 1 for
// LsqGradScale::kNone), written with ds_write (kOverwrite: =, kAccumulate: +=, the fp32 value
// rounded once to G). ds or dbeta may be null to skip them (dw is always masked).
// w, s, beta: what the forward used (s as clamped by it). With Phi, run phi_backward_cuda on
// the unmasked dW_eff first. Everything here is linear in dW_eff and the mask depends only on
// w, s, beta: run it ONCE per optimizer step on the accumulated dW_eff of all micro-batches
// (before or after the gradient all-reduce, before the gradient norm), not once per micro-batch
// over an accumulating buffer (which would count earlier micro-batches' ds again).
// One warp per segment (a group, a channel, or a row of a per-tensor weight; one block for
// segments of >= 512 elements), 16-byte accesses
// under the forward's conditions (for BF16 dw: dw 16-byte aligned; fp32: the same).
absl::Status lsq_weight_backward_cuda(float* dw, float* ds, float* dbeta, const float* w,
                                      const float* s, const float* beta, int64_t rows,
                                      int64_t cols, const LsqConfig& cfg, void* workspace,
                                      int64_t workspace_bytes, cudaStream_t stream,
                                      GradWrite ds_write = GradWrite::kAccumulate);
// BF16 parameter gradients (training.grad_dtype: GRAD_BF16): the masked dw stays exact; the
// sums are formed from the BF16 dW_eff values as above and rounded once to BF16.
absl::Status lsq_weight_backward_cuda(bf16* dw, bf16* ds, bf16* dbeta, const float* w,
                                      const float* s, const float* beta, int64_t rows,
                                      int64_t cols, const LsqConfig& cfg, void* workspace,
                                      int64_t workspace_bytes, cudaStream_t stream,
                                      GradWrite ds_write = GradWrite::kAccumulate);

// precision.qat.fp16_scales (Linear::ClampSteps and wsteps/wzeros): clamps the learned steps s
// (n) in place to >= kLsqMinStep, then writes the fp16 values the forward and backward quantize
// with: s16 = max(fp16(min(s, 65504)), 2^-24) and, when z (the LSQ+ offsets, n) is given,
// z16 = fp16(clamp(z, -65504, 65504)), each the nearest fp16 (ties to even) as a float
// (__float2half_rn, ops::round_to_fp16). Pass s16 / z16 as s / beta to the weight kernels
// above; the fp32 s, z stay the parameters that learn (straight-through). z16 must be null
// exactly when z is.
absl::Status lsq_fp16_steps_cuda(float* s16, float* z16, float* s, const float* z, int64_t n,
                                 cudaStream_t stream);

// ======================= Activations =======================

// How the kernel that produces a GEMM input quantizes it (Linear's act_quant): the value
// quantized is the BF16 activation the unquantized kernel would have written (v = bf16(y)),
// so a fused kernel equals "plain kernel, then lsq_forward / per_token_quant_forward on its
// BF16 output" bit for bit, and the backward can recompute v exactly.
enum class ActQuantMode {
  kNone,       // the plain kernel
  kPerTensor,  // learned LSQ (kSymmetric) or LSQ+ (kAsymmetric): device scalars step, offset
  kPerToken,   // dynamic symmetric absmax per row (per_token_quant_forward); backward identity
};

struct ActQuant {
  ActQuantMode mode = ActQuantMode::kNone;
  int bits = 8;                            // 2..8 (the job spec allows 4 or 8)
  LsqMode lsq_mode = LsqMode::kSymmetric;  // kPerToken: must be kSymmetric
  // kPerTensor: the learned step, one device float, clamped in place to >= kLsqMinStep by the
  // forward (the backward reads the clamped value).
  float* step = nullptr;
  // kPerTensor + kAsymmetric: the learned offset, one device float; null otherwise.
  const float* offset = nullptr;
  // kPerToken: the N row scales absmax(row) / Qp (1 for an all-zero row), written by the
  // forward; needed by the INT8 GEMM (the codes' scales) and by a backward that recomputes the
  // quantized output. May be null when neither needs them. Read-only in backward.
  float* token_scales = nullptr;
  // Optional int8 codes (N, C) of the quantized output, for matmul_int8_forward_cuda
  // (symmetric only; the per-tensor codes' scale is *step, the per-token ones' token_scales).
  int8_t* codes = nullptr;
  // Gradient scale of the per-tensor step/offset: g = 1 / sqrt(count * Qp) with count =
  // grad_scale_count if > 0, else C, the features of one token (LsqConfig::grad_scale_count of
  // Linear::act_lsq_config: never batch x sequence); kNone: g = 1.
  LsqGradScale grad_scale = LsqGradScale::kLsq;
  int64_t grad_scale_count = 0;
};

// Validates q for a tensor of N rows of C features: mode/bits/offset/pointer consistency, codes
// only for symmetric modes, token_scales given for kPerToken when `need_token_scales`.
absl::Status ValidateActQuant(const char* op, const ActQuant& q, int64_t N, int64_t C,
                              bool need_token_scales);
// The checks of an activation backward's parameter-gradient arguments: dstep and doffset only
// for per-tensor quantization, doffset only for LSQ+; the workspace (`need` bytes, 8-byte
// aligned) when need > 0.
absl::Status ValidateActQuantGrads(const char* op, const ActQuant& q, const void* dstep,
                                   const void* doffset, const void* workspace,
                                   int64_t workspace_bytes, int64_t need);

// Workspace bytes of the per-tensor step/offset gradient of every activation backward below and
// in layernorm_quant_cuda.h / gelu_quant_cuda.h: fixed-order double partials (0 for kNone and
// kPerToken). A function of N and C alone.
int64_t act_quant_backward_cuda_workspace_bytes(int64_t N, int64_t C, const ActQuant& q);

// Standalone quantizing pass over a BF16 activation that a library wrote (cuDNN's attention
// output): out (N, C) = bf16(Q(inp)), plus q.codes / q.token_scales when given. One read of inp
// and one write of out (and of the codes): the cheapest possible form, since cuDNN's epilogue
// cannot quantize; out may equal inp (in place) but the attention backward needs its output
// unquantized, so the model writes q into a separate buffer (or recomputes it in backward with
// act_quant_backward_cuda's out_recompute). kPerToken: one warp per row (absmax pass, then the
// write; the row is re-read from L1/L2); kPerTensor: grid-stride, 16-byte accesses where
// aligned. Also the first training step's pass (after lsq_act_init_cuda) of a fused kernel's
// output.
absl::Status act_quant_forward_cuda(bf16* out, const bf16* inp, int64_t N, int64_t C,
                                    const ActQuant& q, cudaStream_t stream);

// Its backward: dinp (N, C) = dout masked by `inside` (kPerTensor) or dout itself (kPerToken;
// kNone), written with dinp_write (kOverwrite: =; kAccumulate: bf16(float(dinp) + masked), one
// rounding); dinp may equal dout when overwriting. kPerTensor: dstep (and doffset for LSQ+,
// else null) receive g * the sums of lsq_backward's terms over all N * C elements, written with
// dparams. out_recompute (N, C), optional: bf16(Q(inp)) again, bit for bit the forward's output
// (kPerToken needs q.token_scales from the forward), for the weight-gradient GEMM.
// workspace: act_quant_backward_cuda_workspace_bytes(N, C, q).
absl::Status act_quant_backward_cuda(bf16* dinp, float* dstep, float* doffset, const bf16* dout,
                                     const bf16* inp, int64_t N, int64_t C, const ActQuant& q,
                                     void* workspace, int64_t workspace_bytes,
                                     cudaStream_t stream,
                                     GradWrite dinp_write = GradWrite::kOverwrite,
                                     GradWrite dparams = GradWrite::kAccumulate,
                                     bf16* out_recompute = nullptr);
absl::Status act_quant_backward_cuda(bf16* dinp, bf16* dstep, bf16* doffset, const bf16* dout,
                                     const bf16* inp, int64_t N, int64_t C, const ActQuant& q,
                                     void* workspace, int64_t workspace_bytes,
                                     cudaStream_t stream,
                                     GradWrite dinp_write = GradWrite::kOverwrite,
                                     GradWrite dparams = GradWrite::kAccumulate,
                                     bf16* out_recompute = nullptr);

// Workspace bytes of lsq_act_init_cuda for n elements (fixed-order double partials).
int64_t lsq_act_init_cuda_workspace_bytes(int64_t n, const LsqInitOptions& options = {});

// First-batch init of a per-tensor activation quantizer (what Linear::ForwardQat does with
// lsq_init on its first training batch), over the n BF16 values of the unquantized activation
// x (run the producing kernel once with ActQuantMode::kNone, then this, then
// act_quant_forward_cuda for that first step). Same statistics and formulas as lsq_init:
//   kLsq, symmetric:  step = 2 * mean|x| / sqrt(Qp);  kLsq, asymmetric: offset = min x,
//   step = (max x - min x) / Qp;  kMseSearch: lsq_init's grid search (the candidates' squared
//   errors summed in double), smallest alpha on ties;  a zero statistic gives step 1 (and
//   offset min).
// step (1 device float) written; offset (1 device float) written for kAsymmetric, must be null
// for kSymmetric. Sums in double over a fixed partition (deterministic); the CPU sums the same
// terms in double in index order, so the double statistics differ by rounding only and the
// float step almost always agrees bit for bit ON THE SAME INPUT. The GPU trainer's input is the
// BF16 activation, the CPU trainer's the fp32 one: that difference (2^-9 relative per element)
// dominates, and the steps of the two trainers differ at that level. A non-finite input gives
// a non-finite step, which the forward's clamp turns into kLsqMinStep (the CPU rejects it).
absl::Status lsq_act_init_cuda(float* step, float* offset, const bf16* x, int64_t n, int bits,
                               LsqMode mode, const LsqInitOptions& options, void* workspace,
                               int64_t workspace_bytes, cudaStream_t stream);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_CUDA_LSQ_CUDA_H_
