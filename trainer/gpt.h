// GPT-2 style model on the CPU reference ops: pre-LN blocks, learned positions, LM head tied
// to the token embedding. Holds parameters (ParamStore) and the activations of one batch.
#ifndef QTRAIN_TRAINER_GPT_H_
#define QTRAIN_TRAINER_GPT_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "trainer/linear.h"
#include "trainer/lora.h"
#include "trainer/param_store.h"
#include "trainer/precision.h"

namespace qtrain {

// TWEO: L += lambda * (1/L_blocks) * sum_l mean((|A_l| / (tau + eps))^p) over block outputs.
struct TweoOptions {
  bool enabled = false;
  double lambda = 0.01, tau = 3.0, p = 4.0, eps = 1e-6;
};

struct GptConfig {
  int table_rows() const { return padded_vocab_size > 0 ? padded_vocab_size : vocab_size; }
  int n_layer = 0;
  int n_embd = 0;
  int n_head = 0;
  int vocab_size = 256;  // tokens (and LM head logits)
  int max_seq_len = 0;
  PrecisionConfig precision;  // per-Linear modes (default: all full precision)
  TweoOptions tweo;
  int padded_vocab_size = 0;  // rows of wte, >= vocab_size; 0 means vocab_size
  // LoRA adapters (trainer/lora.h); when enabled the base parameters are frozen: they have no
  // gradient buffer, and only lora_params() trains.
  LoraOptions lora;
};

// Evaluation-only fake quantization of the residual stream itself (W8A8 PTQ as the TWEO paper
// deploys it): symmetric per-tensor, q = clamp(round(x / s), -Qn, Qp) * s (ops::lsq_forward),
// one static step per residual point (Gpt::num_residual_points). The quantized value replaces
// the stream in place, so the next layernorm and the next residual add both read it.
struct ResidualQuant {
  int bits = 8;
  std::vector<float> steps;  // one per residual point, each finite and > 0
};
// Static steps s = amax / Qp from calibrated absmax values (an amax of 0 gets s = 1, as
// Linear::SetActivationStepFromAmax).
absl::StatusOr<ResidualQuant> ResidualQuantFromAmax(int bits, const std::vector<float>& amax);

// Per block: the largest |activation| of its output and the output's kurtosis.
struct BlockStats {
  double peak = 0, kurtosis = 0;
};

class Gpt {
 public:
  // Validates the shape and registers every parameter (zero-initialised).
  static absl::StatusOr<std::unique_ptr<Gpt>> Create(const GptConfig& config);

  // GPT-2 init: N(0, std) weights, residual projections N(0, std/sqrt(2L)), zero biases,
  // layernorm weight 1.
  void InitWeights(uint64_t seed, float std);

  // Runs the model on inputs (B,T). With targets (B,T), returns the mean cross-entropy (the
  // task loss; the TWEO term is tweo_loss()) and keeps what Backward needs; without, returns 0
  // and computes the final hidden states only. B and T may change between calls; T <=
  // max_seq_len. `training` lets quantizers advance their state (evaluation does not).
  absl::StatusOr<double> Forward(const int32_t* inputs, const int32_t* targets, int B, int T,
                                 bool training = false);

  // Accumulates into the gradients d(loss_scale * (task loss + TWEO term))/d params of the last
  // Forward. extra_dlogits (B*T, V), when given, is added to the gradient of the logits
  // (distillation).
  absl::Status Backward(float loss_scale, const float* extra_dlogits = nullptr);

  // TWEO term of the last Forward (0 when disabled).
  double tweo_loss() const { return tweo_loss_; }
  // Peak |A_l| and kurtosis of each block output of the last Forward.
  std::vector<BlockStats> block_stats() const;
  // Logits (B*T, V) of the last Forward: final hidden states @ wte^T.
  void Logits(std::vector<float>* logits) const;

  // Quantizers: step init from the current weights and Phi init (call once weights are final,
  // not after a resume); QVGen rank decay for the step about to run (returns the parameter
  // tensors whose optimizer state must be reset); per-block Phi rank (max over its Linears).
  absl::Status InitQuantizers(PhiInit phi = PhiInit::kHere);
  std::vector<int> ApplyRankSchedule(int step);
  std::vector<int> phi_ranks() const;
  // Non-trainable state (FP8 scalers) <-> checkpoint buffers.
  void SaveStateToBuffers();
  absl::Status RestoreStateFromBuffers();
  // Every Linear, block by block (qkv, attn.proj, mlp.fc, mlp.proj).
  std::vector<Linear*> linears();

  ParamStore& params() { return store_; }
  const ParamStore& params() const { return store_; }
  // LoRA: the adapter tensors ("<linear>.lora_b" (out, r) for every adapted Linear, then
  // "<linear>.lora_a" (r, in)), their init (orthonormal A, zero B), and whether the base is
  // frozen. While per-sample gradients are set (null clears), Backward also adds each
  // sequence's share of the adapter gradients into per_sample (B, lora_params().num_elements())
  // (trainer/lora.h, PerSampleGrads); Backward(B) then makes each share the gradient of that
  // sequence's own mean loss.
  ParamStore& lora_params() { return lora_store_; }
  const ParamStore& lora_params() const { return lora_store_; }
  void InitLora(uint64_t seed);
  bool base_frozen() const { return config_.lora.enabled(); }
  void SetLoraPerSampleGrads(float* per_sample) { per_sample_ = per_sample; }
  const GptConfig& config() const { return config_; }
  int64_t num_parameters() const { return store_.num_elements(); }
  // Model FLOPs per token of forward+backward (6N + attention), for throughput figures.
  double flops_per_token(int T) const;

  // Residual stream after block l of the last Forward, (B,T,C).
  const float* block_output(int l) const;

  // Residual stream points, 2*n_layer+1 of them: 0 the embedding output (block 0's input),
  // 1+2l block l's res2 (after the attention residual add), 2+2l its res3 (its output,
  // block_output(l)). residual_point(p) is point p of the last Forward, (B,T,C).
  static int num_residual_points(int n_layer) { return 2 * n_layer + 1; }
  const float* residual_point(int p) const;
  // Residual-stream fake quantization (ResidualQuant; nullopt turns it off, the default).
  // Evaluation only: while it is on, Forward(training=true) fails, and so does Backward after a
  // Forward that quantized the stream (the straight-through gradient of a static residual
  // quantizer is nothing the trainer uses). InvalidArgument for bits outside [2, 16] or a step
  // count other than num_residual_points.
  absl::Status set_residual_quant(std::optional<ResidualQuant> rq);
  const std::optional<ResidualQuant>& residual_quant() const { return residual_quant_; }
  // PTQ calibration of the residual points, as Linear::set_calibrating: while calibrating,
  // Forward records max |x| of each point (a running max over Forwards, from 0 at Create) and
  // does not quantize the stream.
  void set_residual_calibrating(bool on) { residual_calibrating_ = on; }
  const std::vector<float>& residual_calibrated_amax() const { return residual_amax_; }

 private:
  explicit Gpt(const GptConfig& config) : config_(config) {}
  void Allocate(int B, int T);

  struct Block {
    int ln1w, ln1b, ln2w, ln2b;
    Linear qkv, attn_proj, fc, mlp_proj;
  };
  struct BlockActs {
    std::vector<float> ln1, ln1_mean, ln1_rstd, qkv, att, atty, res2, ln2, ln2_mean,
        ln2_rstd, fch, fch_gelu, res3;
  };

  GptConfig config_;
  ParamStore store_{ParamStore::kAlignElements};
  ParamStore lora_store_;
  float* per_sample_ = nullptr;
  // Frozen base: gradients of layernorm parameters land here and are dropped.
  std::vector<float> frozen_dw_, frozen_db_;
  int wte_ = -1, wpe_ = -1, lnfw_ = -1, lnfb_ = -1;
  std::vector<Block> blocks_;

  // Activations of the last Forward.
  int B_ = 0, T_ = 0;
  std::vector<int32_t> inputs_, targets_;
  std::vector<float> encoded_, lnf_, lnf_mean_, lnf_rstd_, probs_, losses_;
  std::vector<BlockActs> acts_;
  // Backward scratch.
  std::vector<float> dres_, dln_, dqkv_, datty_, dfch_, dfch_gelu_, att_scratch_, dlnf_;
  double tweo_loss_ = 0;
  bool training_ = false;

  // Residual point p of the current Forward, x (n): calibrate or fake-quantize it in place.
  absl::Status ResidualPoint(int p, float* x, int64_t n);
  std::optional<ResidualQuant> residual_quant_;
  bool residual_calibrating_ = false;
  bool residual_quantized_ = false;  // the last Forward quantized the stream
  std::vector<float> residual_amax_;
};

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_GPT_H_
