// GPT forward and backward over the CPU reference ops.
#include "trainer/gpt.h"

#include <algorithm>
#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "ops/cpu_ops.h"
#include "ops/quant/fp8.h"
#include "ops/quant/lsq.h"
#include "ops/status_macros.h"
#include "ops/tweo.h"
#include "trainer/rng.h"

namespace qtrain {
namespace {

void Zero(std::vector<float>& v) { std::fill(v.begin(), v.end(), 0.0f); }

ops::LsqConfig ResidualLsqConfig(int bits) {
  ops::LsqConfig cfg;
  cfg.bits = bits;
  cfg.mode = ops::LsqMode::kSymmetric;
  cfg.granularity = ops::QuantGranularity::kPerTensor;
  return cfg;
}

}  // namespace

absl::StatusOr<ResidualQuant> ResidualQuantFromAmax(int bits, const std::vector<float>& amax) {
  ASSIGN_OR_RETURN(ops::QuantRange r, ops::quant_range(bits, ops::LsqMode::kSymmetric));
  ResidualQuant rq;
  rq.bits = bits;
  for (size_t p = 0; p < amax.size(); ++p) {
    if (!std::isfinite(amax[p]) || amax[p] < 0) {
      return absl::InvalidArgumentError(absl::StrCat("residual point ", p, ": calibrated amax ",
                                                     amax[p], " must be finite and >= 0"));
    }
    rq.steps.push_back(ops::step_from_amax(amax[p], r));
  }
  return rq;
}

absl::StatusOr<std::unique_ptr<Gpt>> Gpt::Create(const GptConfig& c) {
  if (c.n_layer <= 0 || c.n_embd <= 0 || c.n_head <= 0 || c.vocab_size <= 1 ||
      c.max_seq_len <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "model shape must be positive: n_layer=", c.n_layer, " n_embd=", c.n_embd,
        " n_head=", c.n_head, " vocab_size=", c.vocab_size, " max_seq_len=", c.max_seq_len));
  }
  if (c.padded_vocab_size != 0 && c.padded_vocab_size < c.vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat("model.padded_vocab_size ", c.padded_vocab_size,
                                                   " is less than model.vocab_size ", c.vocab_size));
  }
  if (c.n_embd % c.n_head != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("model.n_head ", c.n_head, " does not divide model.n_embd ", c.n_embd));
  }
  std::unique_ptr<Gpt> m(new Gpt(c));
  const int C = c.n_embd;
  ParamStore& s = m->store_;
  // Padded rows (table_rows() > vocab_size) are never looked up, and the LM head reads only the
  // first vocab_size rows, so they stay out of the softmax as in llm.c.
  m->wte_ = s.Add("wte", {c.table_rows(), C}, true);
  m->wpe_ = s.Add("wpe", {c.max_seq_len, C}, true);
  for (int l = 0; l < c.n_layer; ++l) {
    const std::string p = absl::StrCat("block.", l, ".");
    Block b;
    b.ln1w = s.Add(p + "ln1.weight", {C}, false);
    b.ln1b = s.Add(p + "ln1.bias", {C}, false);
    const PrecisionConfig& pc = c.precision;
    b.qkv = Linear(&s, p + "attn.qkv", C, 3 * C, pc.For(p + "attn.qkv"));
    b.attn_proj = Linear(&s, p + "attn.proj", C, C, pc.For(p + "attn.proj"));
    b.ln2w = s.Add(p + "ln2.weight", {C}, false);
    b.ln2b = s.Add(p + "ln2.bias", {C}, false);
    b.fc = Linear(&s, p + "mlp.fc", C, 4 * C, pc.For(p + "mlp.fc"));
    b.mlp_proj = Linear(&s, p + "mlp.proj", 4 * C, C, pc.For(p + "mlp.proj"));
    m->blocks_.push_back(std::move(b));
  }
  m->lnfw_ = s.Add("lnf.weight", {C}, false);
  m->lnfb_ = s.Add("lnf.bias", {C}, false);
  const LoraOptions& lo = c.lora;
  s.Finalize(/*with_grads=*/!lo.enabled());
  if (lo.enabled()) {
    std::vector<Linear*> targets;
    for (Linear* l : m->linears()) {
      l->set_frozen(true);
      if (lo.Targets(l->name())) targets.push_back(l);
    }
    if (targets.empty()) {
      return absl::InvalidArgumentError("LoRA: no Linear matches the adapter targets");
    }
    ParamStore& ls = m->lora_store_;
    // All B tensors first, then all A: with A frozen an optimizer owns just the leading range.
    std::vector<int> b_idx, a_idx;
    for (Linear* l : targets) {
      if (lo.rank > std::min(l->in_features(), l->out_features())) {
        return absl::InvalidArgumentError(absl::StrCat("lora.rank ", lo.rank, " exceeds ",
                                                       l->name(), "'s ", l->out_features(), "x",
                                                       l->in_features()));
      }
      b_idx.push_back(ls.Add(l->name() + ".lora_b", {l->out_features(), lo.rank}, false));
    }
    for (Linear* l : targets) {
      a_idx.push_back(ls.Add(l->name() + ".lora_a", {lo.rank, l->in_features()}, false));
    }
    ls.Finalize();
    const float scale = lo.alpha / lo.rank;
    for (size_t i = 0; i < targets.size(); ++i) {
      targets[i]->AttachLora(LoraModule(&ls, a_idx[i], b_idx[i], targets[i]->in_features(),
                                        targets[i]->out_features(), lo.rank, scale, lo.train_a));
    }
    m->frozen_dw_.assign(C, 0.0f);
    m->frozen_db_.assign(C, 0.0f);
  }
  m->residual_amax_.assign(num_residual_points(c.n_layer), 0.0f);
  return m;
}

absl::Status Gpt::set_residual_quant(std::optional<ResidualQuant> rq) {
  if (rq.has_value()) {
    if (!ops::quant_range(rq->bits, ops::LsqMode::kSymmetric).ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("residual quantization bits must be in [2, 16], got ", rq->bits));
    }
    const int n = num_residual_points(config_.n_layer);
    if (static_cast<int>(rq->steps.size()) != n) {
      return absl::InvalidArgumentError(absl::StrCat(
          "residual quantization needs ", n, " steps (2 * n_layer + 1), got ", rq->steps.size()));
    }
    for (int p = 0; p < n; ++p) {
      if (!(rq->steps[p] > 0) || !std::isfinite(rq->steps[p])) {
        return absl::InvalidArgumentError(absl::StrCat("residual quantization step ", p, " is ",
                                                       rq->steps[p], ", must be finite and > 0"));
      }
    }
  }
  residual_quant_ = std::move(rq);
  return absl::OkStatus();
}

const float* Gpt::residual_point(int p) const {
  if (p == 0) return encoded_.data();
  const BlockActs& a = acts_[(p - 1) / 2];
  return (p - 1) % 2 == 0 ? a.res2.data() : a.res3.data();
}

absl::Status Gpt::ResidualPoint(int p, float* x, int64_t n) {
  if (residual_calibrating_) {
    residual_amax_[p] = std::max(residual_amax_[p], ops::amax(x, n));
    return absl::OkStatus();
  }
  // In place: lsq_forward allows out == v.
  return ops::lsq_forward(x, x, &residual_quant_->steps[p], nullptr, 1, n,
                          ResidualLsqConfig(residual_quant_->bits));
}

void Gpt::InitLora(uint64_t seed) {
  Rng rng(seed);
  for (Linear* l : linears()) {
    if (l->lora() != nullptr) l->lora()->Init(&rng);
  }
}

void Gpt::InitWeights(uint64_t seed, float std) {
  Rng rng(seed);
  const float proj_std = std / std::sqrt(2.0f * config_.n_layer);
  auto normal = [&](int idx, float sd) {
    float* p = store_.param(idx);
    for (int64_t i = 0; i < store_.info(idx).size; ++i) p[i] = static_cast<float>(rng.Normal() * sd);
  };
  auto fill = [&](int idx, float v) {
    std::fill(store_.param(idx), store_.param(idx) + store_.info(idx).size, v);
  };
  normal(wte_, std);
  // Padded rows: never a token, never a logit; zeros keep them inert and exports exact.
  std::fill(store_.param(wte_) + static_cast<int64_t>(config_.vocab_size) * config_.n_embd,
            store_.param(wte_) + store_.info(wte_).size, 0.0f);
  normal(wpe_, std);
  for (Block& b : blocks_) {
    fill(b.ln1w, 1.0f);
    fill(b.ln1b, 0.0f);
    fill(b.ln2w, 1.0f);
    fill(b.ln2b, 0.0f);
    normal(b.qkv.weight_index(), std);
    fill(b.qkv.bias_index(), 0.0f);
    normal(b.attn_proj.weight_index(), proj_std);
    fill(b.attn_proj.bias_index(), 0.0f);
    normal(b.fc.weight_index(), std);
    fill(b.fc.bias_index(), 0.0f);
    normal(b.mlp_proj.weight_index(), proj_std);
    fill(b.mlp_proj.bias_index(), 0.0f);
  }
  fill(lnfw_, 1.0f);
  fill(lnfb_, 0.0f);
}

double Gpt::flops_per_token(int T) const {
  // 6 FLOPs per parameter per token for the matmuls (the tied head counts once through wte),
  // minus the position table which is a lookup; plus causal attention's QK^T and AV:
  // 6 * L * T * C on average per token (forward 2*2*T/2*C, times 3 for backward).
  const double n = static_cast<double>(num_parameters()) -
                   static_cast<double>(config_.max_seq_len) * config_.n_embd;
  return 6.0 * n + 6.0 * config_.n_layer * T * config_.n_embd;
}

void Gpt::Allocate(int B, int T) {
  if (B == B_ && T == T_) return;
  B_ = B;
  T_ = T;
  const int64_t N = static_cast<int64_t>(B) * T;
  const int64_t C = config_.n_embd, V = config_.vocab_size, NH = config_.n_head;
  const int64_t att = static_cast<int64_t>(B) * NH * T * T;
  inputs_.assign(N, 0);
  targets_.assign(N, 0);
  encoded_.assign(N * C, 0);
  lnf_.assign(N * C, 0);
  lnf_mean_.assign(N, 0);
  lnf_rstd_.assign(N, 0);
  probs_.assign(N * V, 0);
  losses_.assign(N, 0);
  acts_.assign(config_.n_layer, BlockActs{});
  for (BlockActs& a : acts_) {
    a.ln1.assign(N * C, 0);
    a.ln1_mean.assign(N, 0);
    a.ln1_rstd.assign(N, 0);
    a.qkv.assign(N * 3 * C, 0);
    a.att.assign(att, 0);
    a.atty.assign(N * C, 0);
    a.res2.assign(N * C, 0);
    a.ln2.assign(N * C, 0);
    a.ln2_mean.assign(N, 0);
    a.ln2_rstd.assign(N, 0);
    a.fch.assign(N * 4 * C, 0);
    a.fch_gelu.assign(N * 4 * C, 0);
    a.res3.assign(N * C, 0);
  }
  dres_.assign(N * C, 0);
  dln_.assign(N * C, 0);
  dqkv_.assign(N * 3 * C, 0);
  datty_.assign(N * C, 0);
  dfch_.assign(N * 4 * C, 0);
  dfch_gelu_.assign(N * 4 * C, 0);
  att_scratch_.assign(att, 0);
  dlnf_.assign(N * C, 0);
}

const float* Gpt::block_output(int l) const { return acts_[l].res3.data(); }

absl::StatusOr<double> Gpt::Forward(const int32_t* inputs, const int32_t* targets, int B,
                                    int T, bool training) {
  if (B <= 0 || T <= 0 || T > config_.max_seq_len) {
    return absl::InvalidArgumentError(absl::StrCat("batch shape B=", B, " T=", T,
                                                   " must be positive with T <= max_seq_len ",
                                                   config_.max_seq_len));
  }
  const int N = B * T, C = config_.n_embd, V = config_.vocab_size, NH = config_.n_head;
  for (int i = 0; i < N; ++i) {
    if (inputs[i] < 0 || inputs[i] >= V || (targets && (targets[i] < 0 || targets[i] >= V))) {
      return absl::InvalidArgumentError(absl::StrCat("token at position ", i,
                                                     " is outside the vocabulary [0, ", V, ")"));
    }
  }
  if (training && residual_quant_.has_value()) {
    return absl::FailedPreconditionError(
        "residual-stream quantization (Gpt::set_residual_quant) is evaluation-only: a training "
        "Forward ran while it is on");
  }
  Allocate(B, T);
  training_ = training;
  // Off (the default) the stream costs one branch per point.
  const bool residual_hook = residual_calibrating_ || residual_quant_.has_value();
  residual_quantized_ = residual_quant_.has_value() && !residual_calibrating_;
  const int64_t NC = static_cast<int64_t>(N) * C;
  std::copy(inputs, inputs + N, inputs_.begin());
  ops::encoder_forward(encoded_.data(), inputs, store_.param(wte_), store_.param(wpe_), B, T, C);
  if (residual_hook) RETURN_IF_ERROR(ResidualPoint(0, encoded_.data(), NC));
  const float* x = encoded_.data();
  for (int l = 0; l < config_.n_layer; ++l) {
    const Block& b = blocks_[l];
    BlockActs& a = acts_[l];
    ops::layernorm_forward(a.ln1.data(), a.ln1_mean.data(), a.ln1_rstd.data(), x,
                           store_.param(b.ln1w), store_.param(b.ln1b), N, C);
    RETURN_IF_ERROR(blocks_[l].qkv.Forward(a.qkv.data(), a.ln1.data(), N, training));
    ops::attention_forward(a.atty.data(), a.att.data(), a.qkv.data(), B, T, C, NH);
    RETURN_IF_ERROR(blocks_[l].attn_proj.Forward(a.res2.data(), a.atty.data(), N, training));
    ops::residual_forward(a.res2.data(), a.res2.data(), x, NC);
    if (residual_hook) RETURN_IF_ERROR(ResidualPoint(1 + 2 * l, a.res2.data(), NC));
    ops::layernorm_forward(a.ln2.data(), a.ln2_mean.data(), a.ln2_rstd.data(), a.res2.data(),
                           store_.param(b.ln2w), store_.param(b.ln2b), N, C);
    RETURN_IF_ERROR(blocks_[l].fc.Forward(a.fch.data(), a.ln2.data(), N, training));
    ops::gelu_forward(a.fch_gelu.data(), a.fch.data(), static_cast<int64_t>(N) * 4 * C);
    RETURN_IF_ERROR(blocks_[l].mlp_proj.Forward(a.res3.data(), a.fch_gelu.data(), N, training));
    ops::residual_forward(a.res3.data(), a.res3.data(), a.res2.data(), NC);
    if (residual_hook) RETURN_IF_ERROR(ResidualPoint(2 + 2 * l, a.res3.data(), NC));
    x = a.res3.data();
  }
  ops::layernorm_forward(lnf_.data(), lnf_mean_.data(), lnf_rstd_.data(), x,
                         store_.param(lnfw_), store_.param(lnfb_), N, C);
  tweo_loss_ = 0;
  if (config_.tweo.enabled) {
    const TweoOptions& tw = config_.tweo;
    for (int l = 0; l < config_.n_layer; ++l) {
      tweo_loss_ += ops::tweo_forward(acts_[l].res3.data(), static_cast<int64_t>(N) * C, tw.tau,
                                      tw.p, tw.eps);
    }
    tweo_loss_ *= tw.lambda / config_.n_layer;
  }
  if (targets == nullptr) return 0.0;
  std::copy(targets, targets + N, targets_.begin());
  return ops::lm_head_crossentropy_forward(losses_.data(), probs_.data(), lnf_.data(),
                                           store_.param(wte_), targets, N, C, V);
}

absl::Status Gpt::Backward(float loss_scale, const float* extra_dlogits) {
  if (residual_quantized_) {
    return absl::FailedPreconditionError(
        "residual-stream quantization (Gpt::set_residual_quant) is evaluation-only: Backward "
        "after a Forward that quantized the stream");
  }
  const int B = B_, T = T_, N = B * T, C = config_.n_embd, V = config_.vocab_size,
            NH = config_.n_head, L = config_.n_layer;
  // A frozen base: no embedding gradients, layernorm parameter gradients into scratch.
  const bool frozen = base_frozen();
  auto grad = [&](int idx) { return frozen ? nullptr : store_.grad(idx); };
  auto ln_dw = [&](int idx) { return frozen ? frozen_dw_.data() : store_.grad(idx); };
  auto ln_db = [&](int idx) { return frozen ? frozen_db_.data() : store_.grad(idx); };
  PerSampleGrads ps{per_sample_, B, T, lora_store_.num_elements()};
  for (Linear* l : linears()) l->set_per_sample(per_sample_ != nullptr ? &ps : nullptr);
  Zero(dlnf_);
  ops::lm_head_crossentropy_backward(dlnf_.data(), grad(wte_), probs_.data(), lnf_.data(),
                                     store_.param(wte_), targets_.data(), N, C, V, loss_scale);
  if (extra_dlogits != nullptr) {
    ops::matmul_backward(dlnf_.data(), grad(wte_), static_cast<float*>(nullptr), extra_dlogits,
                         lnf_.data(), store_.param(wte_), N, C, V);
  }
  // dres_ carries d loss / d residual stream, flowing down through the blocks.
  Zero(dres_);
  const float* top = L > 0 ? acts_[L - 1].res3.data() : encoded_.data();
  ops::layernorm_backward(dres_.data(), ln_dw(lnfw_), ln_db(lnfb_), dlnf_.data(), top,
                          store_.param(lnfw_), lnf_mean_.data(), lnf_rstd_.data(), N, C);
  for (int l = L - 1; l >= 0; --l) {
    const Block& b = blocks_[l];
    BlockActs& a = acts_[l];
    const float* x = l > 0 ? acts_[l - 1].res3.data() : encoded_.data();
    if (config_.tweo.enabled) {
      // The outlier term's gradient joins the residual stream at this block's output.
      const TweoOptions& tw = config_.tweo;
      ops::tweo_backward(dres_.data(), a.res3.data(), static_cast<int64_t>(N) * C, tw.tau, tw.p,
                         tw.eps, loss_scale * tw.lambda / L);
    }
    // MLP branch: res3 = res2 + proj(gelu(fc(ln2(res2)))).
    Zero(dfch_gelu_);
    RETURN_IF_ERROR(blocks_[l].mlp_proj.Backward(dfch_gelu_.data(), dres_.data(),
                                                 a.fch_gelu.data(), N, training_));
    Zero(dfch_);
    ops::gelu_backward(dfch_.data(), a.fch.data(), dfch_gelu_.data(),
                       static_cast<int64_t>(N) * 4 * C);
    Zero(dln_);
    RETURN_IF_ERROR(blocks_[l].fc.Backward(dln_.data(), dfch_.data(), a.ln2.data(), N, training_));
    ops::layernorm_backward(dres_.data(), ln_dw(b.ln2w), ln_db(b.ln2b), dln_.data(),
                            a.res2.data(), store_.param(b.ln2w), a.ln2_mean.data(),
                            a.ln2_rstd.data(), N, C);
    // Attention branch: res2 = x + proj(attn(qkv(ln1(x)))).
    Zero(datty_);
    RETURN_IF_ERROR(blocks_[l].attn_proj.Backward(datty_.data(), dres_.data(), a.atty.data(), N,
                                                  training_));
    Zero(dqkv_);
    ops::attention_backward(dqkv_.data(), att_scratch_.data(), datty_.data(), a.qkv.data(),
                            a.att.data(), B, T, C, NH);
    Zero(dln_);
    RETURN_IF_ERROR(blocks_[l].qkv.Backward(dln_.data(), dqkv_.data(), a.ln1.data(), N, training_));
    ops::layernorm_backward(dres_.data(), ln_dw(b.ln1w), ln_db(b.ln1b), dln_.data(), x,
                            store_.param(b.ln1w), a.ln1_mean.data(), a.ln1_rstd.data(), N, C);
  }
  for (Linear* l : linears()) l->set_per_sample(nullptr);
  if (!frozen) {
    ops::encoder_backward(store_.grad(wte_), store_.grad(wpe_), dres_.data(), inputs_.data(), B,
                          T, C);
  }
  return absl::OkStatus();
}

std::vector<BlockStats> Gpt::block_stats() const {
  std::vector<BlockStats> out(config_.n_layer);
  const int64_t n = static_cast<int64_t>(B_) * T_ * config_.n_embd;
  for (int l = 0; l < config_.n_layer && n > 0; ++l) {
    ops::activation_stats(acts_[l].res3.data(), n, &out[l].peak, &out[l].kurtosis);
  }
  return out;
}

void Gpt::Logits(std::vector<float>* logits) const {
  const int N = B_ * T_;
  logits->assign(static_cast<size_t>(N) * config_.vocab_size, 0.0f);
  ops::matmul_forward(logits->data(), lnf_.data(), store_.param(wte_),
                      static_cast<const float*>(nullptr), N, config_.n_embd, config_.vocab_size);
}

std::vector<Linear*> Gpt::linears() {
  std::vector<Linear*> out;
  for (Block& b : blocks_) {
    for (Linear* l : {&b.qkv, &b.attn_proj, &b.fc, &b.mlp_proj}) out.push_back(l);
  }
  return out;
}

absl::Status Gpt::InitQuantizers(PhiInit phi) {
  for (Linear* l : linears()) RETURN_IF_ERROR(l->InitQuantizers(phi));
  return absl::OkStatus();
}

std::vector<int> Gpt::ApplyRankSchedule(int step) {
  std::vector<int> reset;
  for (Linear* l : linears()) l->ApplyRankSchedule(step, &reset);
  return reset;
}

std::vector<int> Gpt::phi_ranks() const {
  std::vector<int> out;
  for (const Block& b : blocks_) {
    out.push_back(std::max({b.qkv.phi_rank(), b.attn_proj.phi_rank(), b.fc.phi_rank(),
                            b.mlp_proj.phi_rank()}));
  }
  return out;
}

void Gpt::SaveStateToBuffers() {
  for (Linear* l : linears()) l->SaveStateToBuffers();
}

absl::Status Gpt::RestoreStateFromBuffers() {
  for (Linear* l : linears()) RETURN_IF_ERROR(l->RestoreStateFromBuffers());
  return absl::OkStatus();
}

}  // namespace qtrain
