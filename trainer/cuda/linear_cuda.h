// One Linear of the CUDA GPT in the precision mode the job spec gives it: the GPU twin of
// trainer/linear.h. The model code (trainer/cuda/gpt_cuda.cc) makes the same calls whatever the
// mode and never branches on it; everything a mode needs happens here:
//   producing the input   Input{FromLayernorm, FromTensor}, and the GELU output of the Linear
//                         before it (Forward with a `gelu_consumer`), written in the form this
//                         Linear's GEMM reads (BF16, FP8 codes + scales, fake-quantized BF16);
//   Forward               out = x W^T + b (optionally through GELU for the next Linear);
//   backward              BackwardData (dinp = dout W), BackwardWeight (dW, db), and the
//                         backward of the producer (InputBackward*: the layernorm backward, the
//                         activation quantizer's straight-through mask and step gradient);
//   per step              FinishGradients (QAT: Phi's gradients, the weight quantizer's mask and
//                         step gradient, once on the accumulated weight gradient), PrepareWeights
//                         after the optimizer (FP8 weight copies, Q(W) + L diag(gamma) R).
// The model owns the memory: the flat fp32 master, gradient and BF16-copy buffers in the host
// ParamStore's layout (a Linear knows its tensors' offsets), the activation block (a Linear
// carves its per-layer inputs out of it), shared scratch (LinearContext) and the FP8 scaling
// state of all FP8 tensors.
//
// Modes (LinearMode):
//   kFull: BF16 GEMMs (cuBLASLt, GELU/bias epilogues), the input recomputed in backward.
//   kFp8:  HYBRID FP8 (E4M3 x and W, E5M2 dy) in all three GEMMs; recipes delayed (amax history
//          on the device), current (this step's amax) and block (1x128 / 128x128, E4M3).
//   kQat:  LSQ/LSQ+ fake-quantized W (per channel / group) and x (per tensor learned / per
//          token), QVGen's Phi in weight space, optionally the INT8 tensor-core forward.
#ifndef QTRAIN_TRAINER_CUDA_LINEAR_CUDA_H_
#define QTRAIN_TRAINER_CUDA_LINEAR_CUDA_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ops/cuda/bf16.h"
#include "ops/cuda/grad_write.h"
#include "ops/cuda/layernorm_cuda.h"
#include "ops/cuda/lsq_cuda.h"
#include "ops/cuda/matmul_cuda.h"
#include "ops/quant/fp8.h"
#include "trainer/cuda/carver.h"
#include "trainer/param_store.h"
#include "trainer/precision.h"

typedef struct CUstream_st* cudaStream_t;

namespace qtrain {

namespace ops {
class Fp8MatmulContext;
class Fp8ScalingState;
class Int8MatmulContext;
class PhiContext;
}  // namespace ops

// Where a Linear's input comes from, which decides what its forward reads and its backward
// recomputes: a layernorm's output (qkv, mlp.fc: written into shared scratch or the Linear's
// codes, recomputed in backward), a tensor the model keeps unquantized (attn.proj: the attention
// output, which the attention backward needs as it was; a quantized copy goes to scratch), or
// the GELU output of the Linear before (mlp.proj: written in this Linear's form and kept).
enum class LinearInputSource { kLayernorm, kTensor, kGelu };

// The model's device state that a Linear's calls work in. Scratch is shared by all Linears and
// sized by the model for the widest of them (MaxScratch); each call uses it only within itself.
struct LinearContext {
  ops::MatmulContext* mm = nullptr;
  ops::Fp8MatmulContext* fp8 = nullptr;   // FP8 models
  ops::Int8MatmulContext* int8 = nullptr;  // QAT with the INT8 forward
  ops::PhiContext* phi = nullptr;          // QAT with Phi
  ops::Fp8ScalingState* scaling = nullptr;  // FP8 models: the scaling state of every FP8 tensor
  cudaStream_t stream = nullptr;
  float* params = nullptr;         // flat fp32 masters
  ops::bf16* params_bf16 = nullptr;  // flat BF16 compute copies
  void* mm_ws = nullptr;            // matmul_backward_cuda's bias-gradient workspace
  int64_t mm_ws_bytes = 0;
  int N = 0;  // tokens of the current batch
  // Shared scratch for the current batch (null where no Linear needs it).
  ops::bf16* ln = nullptr;        // (N, C) a layernorm's BF16 output (recomputed in backward)
  ops::bf16* xq = nullptr;        // (N, 4C) BF16: a quantized copy of a tensor input
  uint8_t* dy8 = nullptr;         // (N, 4C) FP8 codes of an output gradient
  uint8_t* dy8_t = nullptr;       // (4C, N) its transpose
  uint8_t* x8_t = nullptr;        // (4C, N) the transpose of a saved FP8 input
  float* dy_sinv = nullptr;       // block recipe: tile scales of dy8, dy8_t
  float* dy_sinv_t = nullptr;
  int8_t* x_i8 = nullptr;         // (N, 4C) int8 activation codes (INT8 forward)
  void* q_ws = nullptr;           // activation-quantizer backward / init workspace
  int64_t q_ws_bytes = 0;
  // For PrepareWeights / FinishGradients (on the stream given to them).
  float* phi_ws = nullptr;        // (4C * C) fp32: Phi's product P
  void* aux_ws = nullptr;         // the weight quantizer's and Phi's backward workspaces
  int64_t aux_ws_bytes = 0;
  // Per-op profiling (CudaGpt::set_profiling): labels the device time since the last mark.
  std::function<absl::Status(const char*)> mark;
  absl::Status Mark(const char* op) const { return mark ? mark(op) : absl::OkStatus(); }
};

// Which of LinearContext's shared scratch the model's Linears need (AddScratchNeeds), and the
// largest workspaces: the model carves them for the widest Linear (4C features, N tokens).
struct LinearScratch {
  bool xq = false, fp8 = false, fp8_block = false, int8 = false;
  int64_t q_ws_bytes = 0;    // per batch
  int64_t aux_ws_bytes = 0;  // per step (weights)
  bool phi = false;
};

// The (residual +) layernorm that produces a Linear's input: residual = a + b (b null: plain
// layernorm of a, residual null), then layernorm with weight/bias; mean/rstd saved (N).
struct LayernormArgs {
  ops::bf16* residual = nullptr;
  const ops::bf16* a = nullptr;
  const ops::bf16* b = nullptr;
  const ops::bf16* weight = nullptr;
  const ops::bf16* bias = nullptr;
  float* mean = nullptr;
  float* rstd = nullptr;
  int C = 0;
};

// Its backward: dinp (+)= d layernorm from dout (the Linear's BackwardData output), the
// layernorm's parameter gradients, inp the layernorm's input; tweo as layernorm_cuda.h.
template <typename G>
struct LayernormBackwardArgs {
  ops::bf16* dinp = nullptr;
  G* dweight = nullptr;
  G* dbias = nullptr;
  const ops::bf16* dout = nullptr;
  const ops::bf16* inp = nullptr;
  const ops::bf16* weight = nullptr;
  const ops::bf16* bias = nullptr;
  const float* mean = nullptr;
  const float* rstd = nullptr;
  int C = 0;
  void* ws = nullptr;
  int64_t ws_bytes = 0;
  ops::GradWrite gw = ops::GradWrite::kAccumulate;
  ops::TweoGradTerm tweo;
};

// A device allocation that lives as long as the model (CudaGpt::Alloc).
using DeviceAllocFn = std::function<absl::StatusOr<void*>(int64_t bytes)>;

class CudaLinear {
 public:
  // name: "block.<l>.attn.qkv" etc.; `layout` the host model's ParamStore (the offsets of
  // "<name>.weight" (out, in), "<name>.bias" (out) and the mode's parameters and buffers).
  // fp8_first: for kFp8, the index of this Linear's first of three tensors (x, W, dy) in the
  // model's scaling state.
  static absl::StatusOr<CudaLinear> Create(const std::string& name, int in_features,
                                           int out_features, const LinearOptions& options,
                                           LinearInputSource source, const ParamStore& layout,
                                           int fp8_first = -1);

  const std::string& name() const { return name_; }
  LinearMode mode() const { return opt_.mode; }
  const LinearOptions& options() const { return opt_; }
  int in_features() const { return in_; }
  int out_features() const { return out_; }
  int64_t weight_offset() const { return w_; }
  int64_t bias_offset() const { return b_; }
  LinearInputSource source() const { return source_; }
  // What this Linear adds to the model's shared scratch for N tokens.
  void AddScratchNeeds(int64_t N, LinearScratch* s) const;

  // Long-lived device buffers (FP8 weight codes, QAT int8 codes, gamma); once, after Create.
  // weight_bf16: this weight's BF16 compute copy in the model's flat array. An FP8 Linear never
  // reads it, so W's codes and W^T's live there (2 bytes per element) when the sizes keep them
  // 16-byte aligned: FP8 weights then cost no memory beyond BF16's.
  absl::Status AllocateState(const DeviceAllocFn& alloc, ops::bf16* weight_bf16);
  // Per-batch buffers (FP8 inputs kept for backward, per-token scales): both carving passes.
  void CarveActivations(Carver& k, int64_t N);

  // ---- the input, written by its producer for this Linear ----
  // From a (residual +) layernorm (qkv, mlp.fc). `training`: quantizer state may advance
  // (first-batch activation step init; FP8 amax recording).
  absl::Status InputFromLayernorm(const LinearContext& c, const LayernormArgs& ln, bool training);
  // From a tensor another kernel wrote, x (N, in) BF16, kept by the model (attn.proj's input,
  // the attention output).
  absl::Status InputFromTensor(const LinearContext& c, const ops::bf16* x, bool training);

  // ---- forward ----
  // out (N, out) = x W^T + b with x as the producer wrote it. With gelu_consumer (mlp.fc), the
  // output is gelu(x W^T + b) written as gelu_consumer's input (its mode's form): BF16 into
  // `out`, FP8 codes into its buffers, or quantized BF16 into `out`; pre_act (N, out) receives
  // the pre-activation.
  absl::Status Forward(const LinearContext& c, ops::bf16* out, bool training,
                       CudaLinear* gelu_consumer = nullptr, ops::bf16* pre_act = nullptr,
                       const ops::bf16* tensor_input = nullptr);

  // ---- backward ----
  // Prepares the output gradient dout (N, out) for the two GEMMs (FP8: its codes and their
  // transpose). Call once per backward before BackwardData/BackwardWeight.
  absl::Status BeginBackward(const LinearContext& c, const ops::bf16* dout, bool training);
  // dinp (N, in) = dout W (overwritten). With gelu_pre (N, in), the input was gelu(gelu_pre):
  // dinp receives the gradient with respect to gelu_pre through this Linear's input quantizer
  // (step gradient into grads for QAT).
  template <typename G>
  absl::Status BackwardData(const LinearContext& c, ops::bf16* dinp, const ops::bf16* dout,
                            G* grads, const ops::bf16* gelu_pre, ops::GradWrite gw);
  // dW, db of dout against the forward's input (`tensor_input`: the BF16 tensor of
  // InputFromTensor / the GELU output, where the mode reads it), written or added per gw.
  template <typename G>
  absl::Status BackwardWeight(const LinearContext& c, G* grads, const ops::bf16* dout,
                              const ops::bf16* tensor_input, ops::GradWrite gw);
  // The producer's backward. Layernorm inputs: the layernorm backward (through the activation
  // quantizer: mask, step gradient), recomputing the input for BackwardWeight where needed.
  template <typename G>
  absl::Status InputBackwardLayernorm(const LinearContext& c, G* grads,
                                      const LayernormBackwardArgs<G>& ln);
  // Tensor inputs: d (N, in), the gradient with respect to the quantized input, masked in
  // place (QAT per tensor; nothing otherwise), step gradient into grads. x: the forward's
  // tensor input.
  template <typename G>
  absl::Status InputBackwardTensor(const LinearContext& c, G* grads, ops::bf16* d,
                                   const ops::bf16* x, ops::GradWrite gw);

  // ---- once per optimizer step ----
  // On the accumulated (and all-reduced) weight gradient: QAT's Phi gradients and the weight
  // quantizer's straight-through mask and step/offset gradients (nothing otherwise).
  template <typename G>
  absl::Status FinishGradients(const LinearContext& c, G* grads, cudaStream_t stream);
  // After the optimizer updated the fp32 masters (and AdamW wrote the BF16 copy): the weight the
  // forward reads. FP8: the codes' transpose (delayed: AdamW wrote the codes), current: amax ->
  // scale -> codes, block: the 128x128 codes; QAT: bf16(Q(W) + L diag(gamma) R) (+ int8 codes).
  // kAfterUpload: the masters came from the host (checkpoint, init): the delayed recipe's codes
  // are cast here (with their amax recorded), since no AdamW wrote them.
  enum class WeightsFrom { kAfterUpdate, kAfterUpload };
  absl::Status PrepareWeights(const LinearContext& c, cudaStream_t stream, WeightsFrom from);
  // The FP8 weight codes AdamW writes (delayed recipe) — the plan's FP8 segment.
  bool adamw_writes_fp8() const;
  uint8_t* weight_codes() const { return w8_; }
  int fp8_weight_index() const { return fp8_first_ + 1; }

  // ---- QAT state ----
  // Phi's active rank, its factors' offsets, gamma on the device.
  int phi_rank() const { return phi_rank_; }
  void set_phi_rank(int k) { phi_rank_ = k; }
  int phi_rmax() const { return rmax_; }
  int64_t phi_l_offset() const { return phi_l_; }
  int64_t phi_r_offset() const { return phi_r_; }
  float* phi_gamma() const { return gamma_; }
  // Whether the per-tensor activation step has been initialised (the host buffer's flag).
  bool act_initialized() const { return act_init_; }
  void set_act_initialized(bool on) { act_init_ = on; }
  // Offsets of the QAT parameters in the flat buffers (-1: absent).
  int64_t w_scale_offset() const { return ws_; }
  int64_t w_zero_offset() const { return wz_; }
  int64_t x_scale_offset() const { return xs_; }
  int64_t x_zero_offset() const { return xz_; }
  ops::LsqConfig weight_lsq_config() const;
  bool int8_forward() const { return int8_; }
  // The weight steps / zero points the quantizer uses: the parameters, or their fp16 roundings
  // under qat.fp16_scales (as of the last RoundStepsFp16). WZeros is null for symmetric weights.
  float* WSteps(const LinearContext& c) const { return ws16_ ? ws16_ : c.params + ws_; }
  const float* WZeros(const LinearContext& c) const {
    if (wz_ < 0) return nullptr;
    return wz16_ ? wz16_ : c.params + wz_;
  }
  // qat.fp16_scales: clamps the learned steps and forms their fp16 roundings from the current
  // parameters (Linear::ClampSteps); a no-op otherwise. PrepareWeights calls it.
  absl::Status RoundStepsFp16(const LinearContext& c, cudaStream_t stream);

 private:
  CudaLinear() = default;
  const ops::bf16* Weight(const LinearContext& c) const { return c.params_bf16 + w_; }
  const ops::bf16* Bias(const LinearContext& c) const { return c.params_bf16 + b_; }
  // The activation quantizer of this (QAT) Linear for N rows.
  ops::ActQuant ActQuantFor(const LinearContext& c, bool with_codes) const;
  // FP8 tensors of this Linear in the scaling state.
  int kx() const { return fp8_first_; }
  int kw() const { return fp8_first_ + 1; }
  int kg() const { return fp8_first_ + 2; }
  // FP8: casts a BF16 input x (N, in) into this Linear's kept codes (recipe's form).
  absl::Status CastInput(const LinearContext& c, const ops::bf16* x, bool training);
  // QAT: out = Q(x) (x (N, in) BF16, out may equal x), initialising the per-tensor step from x
  // on the first training batch.
  absl::Status QuantizeTensor(const LinearContext& c, ops::bf16* out, const ops::bf16* x,
                              bool training);
  // This Linear (the GELU's consumer) takes gelu(pre) (N, in) as its input: writes it into out
  // (BF16 modes) and its own form (FP8 codes, QAT quantized values).
  absl::Status InputFromGelu(const LinearContext& c, ops::bf16* out, const ops::bf16* pre,
                             bool training);
  // Whether the Linear before may fuse GELU into its BF16-output GEMM epilogue for this
  // consumer (its input is the plain BF16 GELU output), or write FP8 codes for it directly.
  bool TakesPlainGelu() const;
  bool TakesFp8GeluEpilogue() const;
 public:
  // Whether this Linear's forward writes `consumer`'s FP8 codes straight from its GELU epilogue
  // (FP8 -> FP8 with per-tensor scales): the BF16 GELU output then never exists, and the model
  // need not keep a buffer for it.
  bool WritesFp8GeluFor(const CudaLinear& consumer) const {
    return opt_.mode == LinearMode::kFp8 && recipe_ != Fp8Recipe::kBlock &&
           consumer.TakesFp8GeluEpilogue();
  }

 private:
  // The FP8 operand of this Linear's saved input for wgrad (x^T, (in, N)).
  absl::StatusOr<const uint8_t*> InputTransposed(const LinearContext& c);

  std::string name_;
  int in_ = 0, out_ = 0;
  LinearOptions opt_;
  LinearInputSource source_ = LinearInputSource::kLayernorm;
  int64_t w_ = -1, b_ = -1;
  // FP8.
  Fp8Recipe recipe_ = Fp8Recipe::kDelayed;
  int fp8_first_ = -1;
  uint8_t *w8_ = nullptr, *w8_t_ = nullptr;  // W codes (out, in) and W^T (in, out)
  float *w_sinv_ = nullptr, *w_sinv_t_ = nullptr;  // block recipe: 128x128 grids
  uint8_t *x8_ = nullptr, *x8_t_ = nullptr;         // per batch: x codes (N, in), x^T (in, N)
  bool x8_t_valid_ = false;  // x8_t_ holds this forward's x^T (else BackwardWeight transposes)
  float *x_sinv_ = nullptr, *x_sinv_t_ = nullptr;  // block recipe: their tile scales
  int64_t N_ = 0;
  // QAT.
  int64_t ws_ = -1, wz_ = -1, xs_ = -1, xz_ = -1, phi_l_ = -1, phi_r_ = -1;
  int rmax_ = 0, phi_rank_ = 0;
  float* gamma_ = nullptr;          // (rmax) device
  int8_t* w_i8_ = nullptr;          // (out, in) int8 codes of Q(W) (INT8 forward)
  int64_t n_steps_ = 0;             // weight steps (per channel or group)
  float *ws16_ = nullptr, *wz16_ = nullptr;  // qat.fp16_scales: fp16-rounded steps, zeros
  float* token_scales_ = nullptr;   // per batch (N): per-token activation scales
  bool act_init_ = true;
  bool int8_ = false;
};

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_CUDA_LINEAR_CUDA_H_
