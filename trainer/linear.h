// One Linear layer of the model: y (N,OC) = x (N,C) @ W (OC,C)^T + b, in the precision the job
// spec gives it. The place where each Linear's precision mode lives, so the model code above
// it never changes with precision:
//   kFull: plain fp32 (CPU reference).
//   kFp8:  x, W quantized to E4M3 and the output gradient to E5M2 (HYBRID), per-tensor delayed
//          or current scaling; or the block recipe (DeepSeek-V3: E4M3 everywhere, 1x128 tiles of
//          x and dy, 128x128 blocks of W, 128x1 tiles of x and dy for wgrad); all three GEMMs on
//          the FP8 values, straight-through to x and W.
//   kQat:  LSQ/LSQ+ fake quantization of W (per channel or group, learned steps) and of x
//          (per tensor with a learned step, or per token, dynamic), plus QVGen's auxiliary
//          low-rank module Phi: y += L diag(gamma) R Q(x), which decays to rank 0.
// Any mode can be frozen (no gradients of its own parameters, e.g. a LoRA base) and can carry a
// LoRA adapter (trainer/lora.h) on its unquantized input.
#ifndef QTRAIN_TRAINER_LINEAR_H_
#define QTRAIN_TRAINER_LINEAR_H_

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "ops/quant/fp8.h"
#include "ops/quant/lsq.h"
#include "trainer/lora.h"
#include "trainer/param_store.h"
#include "trainer/precision.h"

namespace qtrain {

// QVGen's rank schedule for the 0-based step about to run (Linear::ApplyRankSchedule, and the
// CUDA model's): Phi's rank after the completed periods (rmax halved once per period, then 0)
// and u = (1 + cos(pi t / T)) / 2, the gamma of the bottom half within the current period.
// inactive (before start_step, or no decay period): the rank stays and gamma is 1.
struct PhiSchedule {
  bool active = false;
  int target_rank = 0;
  float u = 1.0f;
};
PhiSchedule PhiScheduleAt(const PhiOptions& phi, int rmax, int step);

// Where InitQuantizers initialises Phi from the SVD of W - Q(W): here (the CPU, Eigen), or
// nowhere, because a device model does it (DeviceModel::InitPhi, cuSOLVER).
enum class PhiInit { kHere, kSkip };

class Linear {
 public:
  Linear() = default;
  // Registers weight (OC,C), bias (OC) and the mode's parameters and buffers in `store` as
  // "<name>.weight", "<name>.bias", "<name>.w_scale", ... (see linear.cc).
  Linear(ParamStore* store, const std::string& name, int in_features, int out_features,
         const LinearOptions& options = {});

  const std::string& name() const { return name_; }
  int in_features() const { return in_; }
  int out_features() const { return out_; }
  int weight_index() const { return w_; }
  int bias_index() const { return b_; }
  const LinearOptions& options() const { return opt_; }

  // out (N,OC) from inp (N,C). With training, quantizer state advances (FP8 amax histories,
  // first-batch activation step init); evaluation leaves it alone.
  absl::Status Forward(float* out, const float* inp, int N, bool training);
  // dinp (N,C) +=, and every parameter gradient +=, from dout (N,OC) of the last Forward.
  absl::Status Backward(float* dinp, const float* dout, const float* inp, int N, bool training);

  // Sets the weight quantizers' steps from the current weights (LSQ init or MSE search) and
  // Phi from the rank-r SVD of W - Q(W). Activation steps initialise on the next training
  // Forward. Call after the weights are final (init or loaded), not after a resume.
  absl::Status InitQuantizers(PhiInit phi = PhiInit::kHere);
  // Rank decay (QVGen) for the 0-based step about to run: sets gamma, and at period ends drops
  // the bottom half and re-factorises by SVD. Appends the indices of re-factorised parameter
  // tensors (whose optimizer moments no longer mean anything) to `reset`.
  void ApplyRankSchedule(int step, std::vector<int>* reset);
  // Current rank of Phi (0 when absent or decayed away).
  int phi_rank() const;
  // Activation quantizer statistics for PTQ calibration: while calibrating, Forward records
  // max |x| and does not quantize activations.
  void set_calibrating(bool on) { calibrating_ = on; }
  float calibrated_amax() const { return calib_amax_; }
  // Sets a per-tensor static activation step s = amax / Qp (PTQ).
  absl::Status SetActivationStepFromAmax(float amax);

  // PTQ: per-tensor (or per-scale) weight steps from absmax, s = max|W| / Qp; marks the weight
  // quantizer initialised.
  absl::Status SetWeightStepFromAbsmax();
  // Loads exported integer codes (OC,C) with their steps (and offsets): W becomes the
  // dequantized weight, so Q(W) reproduces the codes; Phi is absent (rank 0).
  absl::Status LoadQuantized(const std::vector<int32_t>& codes, const std::vector<float>& steps,
                             const std::vector<float>* zeros);
  // Integer codes of Q(W) (optionally of Q(W) + L diag(gamma) R, re-quantized with the same
  // steps, when Phi has not decayed to 0 yet).
  absl::Status WeightCodes(std::vector<int32_t>* codes, bool fold_phi);
  // The weight steps (and zero points; zeros may be null, cleared for symmetric weights) that
  // go with WeightCodes: the learned ones clamped, rounded to fp16 under qat.fp16_scales.
  absl::Status WeightSteps(std::vector<float>* steps, std::vector<float>* zeros);

  // A frozen Linear's Backward computes dinp (and its adapter's gradients) only, never the
  // gradients of its own parameters, and its Forward never advances quantizer state (FP8
  // histories, first-batch activation steps): the base stays bit-for-bit what was loaded.
  void set_frozen(bool frozen) { frozen_ = frozen; }
  bool frozen() const { return frozen_; }
  // LoRA: Forward adds the adapter's term, Backward its gradients (and, while set, per-sample
  // gradients into `per_sample`).
  void AttachLora(const LoraModule& module) { lora_ = module; }
  LoraModule* lora() { return lora_ ? &*lora_ : nullptr; }
  const LoraModule* lora() const { return lora_ ? &*lora_ : nullptr; }
  void set_per_sample(const PerSampleGrads* per_sample) { per_sample_ = per_sample; }

  // FP8 scaler state <-> checkpoint buffers.
  void SaveStateToBuffers();
  absl::Status RestoreStateFromBuffers();

  // The weight the forward uses: Q(W) (+ L diag(gamma) R folded in when fold_phi), (OC,C).
  absl::Status EffectiveWeight(std::vector<float>* w, bool fold_phi);
  ops::LsqConfig weight_lsq_config() const;
  ops::LsqConfig act_lsq_config() const;
  int w_scale_index() const { return ws_; }
  int w_zero_index() const { return wz_; }
  int x_scale_index() const { return xs_; }
  int x_zero_index() const { return xz_; }
  // Phi's factor tensors (L, R) in the ParamStore; empty without Phi.
  std::vector<int> phi_param_indices() const;

 private:
  absl::Status ForwardBase(float* out, const float* inp, int N, bool training);
  absl::Status BackwardBase(float* dinp, const float* dout, const float* inp, int N,
                            bool training);
  absl::Status QuantizeWeight();
  absl::Status ForwardQat(float* out, const float* inp, int N, bool training);
  absl::Status BackwardQat(float* dinp, const float* dout, const float* inp, int N);
  absl::Status ForwardFp8(float* out, const float* inp, int N, bool training);
  absl::Status BackwardFp8(float* dinp, const float* dout, const float* inp, int N,
                           bool training);
  absl::Status ForwardFp8Block(float* out, const float* inp, int N);
  absl::Status BackwardFp8Block(float* dinp, const float* dout, const float* inp, int N);
  // Clamps the learned steps to a positive floor and, under qat.fp16_scales, forms ws16_ / wz16_.
  void ClampSteps();
  // The weight steps / zero points the quantizer uses (after ClampSteps): the parameters, or
  // their fp16 roundings under qat.fp16_scales. wzeros() is null for symmetric weights.
  const float* wsteps() const;
  const float* wzeros() const;
  // m (OC,C) += L[:, :k] diag(gamma[:k]) R[:k, :] (gamma null: all ones).
  void AddPhiProduct(float* m, int k, const float* gamma) const;

  ParamStore* store_ = nullptr;
  std::string name_;
  int in_ = 0, out_ = 0;
  LinearOptions opt_;
  int w_ = -1, b_ = -1;
  // QAT: weight step/offset (params), activation step/offset (params), init flags (buffer).
  int ws_ = -1, wz_ = -1, xs_ = -1, xz_ = -1, qinit_ = -1;
  // Phi: L (OC, r), R (r, C) (params); rank and gamma (buffers).
  int phi_l_ = -1, phi_r_ = -1, phi_rank_ = -1, phi_gamma_ = -1, rmax_ = 0;
  // FP8 scalers for x, W, dout and their checkpoint buffers.
  std::vector<ops::DelayedScaler> scalers_;
  int fp8_hist_ = -1, fp8_scale_ = -1;

  bool frozen_ = false;
  std::optional<LoraModule> lora_;
  const PerSampleGrads* per_sample_ = nullptr;

  bool calibrating_ = false;
  float calib_amax_ = 0;

  // Saved for backward / scratch.
  std::vector<float> xq_, wq_, gq_, dxq_, dwq_, hidden_;
  std::vector<float> ws16_, wz16_;
};

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_LINEAR_H_
