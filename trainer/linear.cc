// Linear layer: full precision, FP8 (emulated bit-exactly) and LSQ QAT with Phi, over the CPU
// reference ops.
#include "trainer/linear.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "ops/cpu_ops.h"
#include "ops/lowrank.h"
#include "ops/quant/fp16.h"
#include "ops/status_macros.h"

namespace qtrain {
namespace {

// Steps are clamped to this before use: an optimizer step may push a learned step size to
// zero or below, where fake quantization is undefined.
constexpr float kMinStep = 1e-8f;

enum Fp8Tensor { kX = 0, kW = 1, kG = 2 };

}  // namespace

Linear::Linear(ParamStore* store, const std::string& name, int in_features, int out_features,
               const LinearOptions& options)
    : store_(store), name_(name), in_(in_features), out_(out_features), opt_(options) {
  w_ = store->Add(name + ".weight", {out_features, in_features}, /*decay=*/true);
  b_ = store->Add(name + ".bias", {out_features}, /*decay=*/false);
  if (opt_.mode == LinearMode::kQat) {
    // Shapes only; quant_range/lsq_num_scales validate at InitQuantizers (the job spec
    // validator has already checked bits and group sizes).
    const int64_t nscales = lsq_num_scales(weight_lsq_config(), out_, in_).value_or(1);
    ws_ = store->Add(name + ".w_scale", {nscales}, false);
    if (opt_.qat.weight_asymmetric) wz_ = store->Add(name + ".w_zero", {nscales}, false);
    if (opt_.qat.act == ActQuant::kPerTensor) {
      xs_ = store->Add(name + ".x_scale", {1}, false);
      if (opt_.qat.act_asymmetric) xz_ = store->Add(name + ".x_zero", {1}, false);
    }
    qinit_ = store->AddBuffer(name + ".quant_initialized", 2);  // [weights, activations]
    if (opt_.phi.enabled) {
      rmax_ = std::min({opt_.phi.rank, in_, out_});
      phi_l_ = store->Add(name + ".phi_l", {out_, rmax_}, false);
      phi_r_ = store->Add(name + ".phi_r", {rmax_, in_}, false);
      phi_rank_ = store->AddBuffer(name + ".phi_rank", 1, 0.0f);
      phi_gamma_ = store->AddBuffer(name + ".phi_gamma", rmax_, 1.0f);
    }
  } else if (opt_.mode == LinearMode::kFp8) {
    const int h = opt_.fp8.history_len;
    for (ops::Fp8Format f : {ops::Fp8Format::kE4M3, ops::Fp8Format::kE4M3, ops::Fp8Format::kE5M2}) {
      scalers_.push_back(*ops::DelayedScaler::Create(f, h, opt_.fp8.margin));
    }
    fp8_hist_ = store->AddBuffer(name + ".fp8_amax_history", 3 * h);
    fp8_scale_ = store->AddBuffer(name + ".fp8_scale", 3, 1.0f);
  }
}

ops::LsqConfig Linear::weight_lsq_config() const {
  ops::LsqConfig c;
  c.bits = opt_.qat.weight_bits;
  c.mode = opt_.qat.weight_asymmetric ? ops::LsqMode::kAsymmetric : ops::LsqMode::kSymmetric;
  c.granularity = opt_.qat.weight_granularity;
  c.group_size = opt_.qat.group_size;
  return c;
}

ops::LsqConfig Linear::act_lsq_config() const {
  ops::LsqConfig c;
  c.bits = opt_.qat.act_bits;
  c.mode = opt_.qat.act_asymmetric ? ops::LsqMode::kAsymmetric : ops::LsqMode::kSymmetric;
  c.granularity = ops::QuantGranularity::kPerTensor;
  // LSQ's gradient scale counts the features of one example (a token), so a bigger batch
  // does not shrink the step's gradient.
  c.grad_scale_count = in_;
  return c;
}

int Linear::phi_rank() const {
  return phi_rank_ < 0 ? 0 : static_cast<int>(store_->buffer(phi_rank_)[0]);
}

void Linear::ClampSteps() {
  for (int idx : {ws_, xs_}) {
    if (idx < 0) continue;
    float* s = store_->param(idx);
    for (int64_t i = 0; i < store_->info(idx).size; ++i) {
      if (!(s[i] >= kMinStep)) s[i] = kMinStep;  // also replaces NaN
    }
  }
  if (ws_ < 0 || !opt_.qat.fp16_scales) return;
  // qat.fp16_scales: the forward uses the steps (and zero points) GGUF can store; the fp32
  // parameters stay the learned values and get the gradient (straight-through).
  const int64_t n = store_->info(ws_).size;
  const float* s = store_->param(ws_);
  ws16_.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    ws16_[i] = std::max(ops::round_to_fp16(std::min(s[i], ops::kFp16Max)), ops::kFp16MinSubnormal);
  }
  if (wz_ >= 0) {
    const float* z = store_->param(wz_);
    wz16_.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      wz16_[i] = ops::round_to_fp16(std::clamp(z[i], -ops::kFp16Max, ops::kFp16Max));
    }
  }
}

const float* Linear::wsteps() const {
  return opt_.qat.fp16_scales ? ws16_.data() : store_->param(ws_);
}

const float* Linear::wzeros() const {
  if (wz_ < 0) return nullptr;
  return opt_.qat.fp16_scales ? wz16_.data() : store_->param(wz_);
}

absl::Status Linear::WeightSteps(std::vector<float>* steps, std::vector<float>* zeros) {
  if (opt_.mode != LinearMode::kQat) {
    return absl::FailedPreconditionError(absl::StrCat(name_, ": not a QAT Linear"));
  }
  ClampSteps();
  const int64_t n = store_->info(ws_).size;
  steps->assign(wsteps(), wsteps() + n);
  if (zeros != nullptr) {
    if (wz_ >= 0) {
      zeros->assign(wzeros(), wzeros() + n);
    } else {
      zeros->clear();
    }
  }
  return absl::OkStatus();
}

absl::Status Linear::QuantizeWeight() {
  wq_.resize(static_cast<size_t>(out_) * in_);
  ClampSteps();
  return ops::lsq_forward(wq_.data(), store_->param(w_), wsteps(), wzeros(), out_, in_,
                          weight_lsq_config());
}

absl::Status Linear::InitQuantizers(PhiInit phi) {
  if (opt_.mode != LinearMode::kQat) return absl::OkStatus();
  ops::LsqInitOptions init;
  init.method = opt_.qat.scale_init;
  RETURN_IF_ERROR(ops::lsq_init(store_->param(ws_), wz_ >= 0 ? store_->param(wz_) : nullptr,
                                store_->param(w_), out_, in_, weight_lsq_config(), init));
  store_->buffer(qinit_)[0] = 1;
  store_->buffer(qinit_)[1] = 0;
  if (phi_l_ >= 0 && phi == PhiInit::kHere) {
    // Phi starts as the best rank-r approximation of the quantization error W - Q(W).
    RETURN_IF_ERROR(QuantizeWeight());
    std::vector<float> err(wq_.size());
    const float* w = store_->param(w_);
    for (size_t i = 0; i < err.size(); ++i) err[i] = w[i] - wq_[i];
    ops::lowrank_factorize(store_->param(phi_l_), store_->param(phi_r_), err.data(), out_, in_,
                           rmax_, rmax_);
    store_->buffer(phi_rank_)[0] = static_cast<float>(rmax_);
    std::fill(store_->buffer(phi_gamma_).begin(), store_->buffer(phi_gamma_).end(), 1.0f);
  }
  return absl::OkStatus();
}

PhiSchedule PhiScheduleAt(const PhiOptions& p, int rmax, int step) {
  PhiSchedule s;
  if (p.decay_period <= 0 || step < p.start_step) return s;
  const int t = step - p.start_step;
  const int periods_done = t / p.decay_period;
  const int pos = t % p.decay_period;
  s.active = true;
  s.target_rank = rmax;
  for (int i = 0; i < periods_done && s.target_rank > 0; ++i) s.target_rank /= 2;
  // Within the period the top half keeps gamma 1 and the bottom half fades out by a cosine.
  s.u = 0.5f * (1.0f + std::cos(static_cast<float>(M_PI) * pos / p.decay_period));
  return s;
}

void Linear::ApplyRankSchedule(int step, std::vector<int>* reset) {
  if (phi_l_ < 0) return;
  std::vector<float>& gamma = store_->buffer(phi_gamma_);
  int k = phi_rank();
  const PhiSchedule sched = PhiScheduleAt(opt_.phi, rmax_, step);
  if (!sched.active) {
    std::fill(gamma.begin(), gamma.end(), 1.0f);
    return;
  }
  const int target = sched.target_rank;
  while (k > target) {
    const int keep = k / 2;
    float* L = store_->param(phi_l_);
    float* R = store_->param(phi_r_);
    if (keep == 0) {
      std::fill(L, L + static_cast<int64_t>(out_) * rmax_, 0.0f);
      std::fill(R, R + static_cast<int64_t>(rmax_) * in_, 0.0f);
    } else {
      // M = L[:, :keep] R[:keep, :] (the kept top half, gamma 1), re-factorised at rank keep.
      std::vector<float> m(static_cast<size_t>(out_) * in_, 0.0f);
      AddPhiProduct(m.data(), keep, /*gamma=*/nullptr);
      ops::lowrank_factorize(L, R, m.data(), out_, in_, rmax_, keep);
    }
    k = keep;
    store_->buffer(phi_rank_)[0] = static_cast<float>(k);
    reset->push_back(phi_l_);
    reset->push_back(phi_r_);
  }
  const float u = sched.u;
  for (int j = 0; j < rmax_; ++j) gamma[j] = j < k / 2 ? 1.0f : (j < k ? u : 0.0f);
}

absl::Status Linear::SetActivationStepFromAmax(float amax) {
  if (xs_ < 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(name_, ": no per-tensor activation quantizer to calibrate"));
  }
  ASSIGN_OR_RETURN(ops::QuantRange r, ops::quant_range(opt_.qat.act_bits, ops::LsqMode::kSymmetric));
  store_->param(xs_)[0] = ops::step_from_amax(amax, r);
  store_->buffer(qinit_)[1] = 1;
  return absl::OkStatus();
}

absl::Status Linear::SetWeightStepFromAbsmax() {
  if (opt_.mode != LinearMode::kQat) {
    return absl::FailedPreconditionError(absl::StrCat(name_, ": not a QAT Linear"));
  }
  const ops::LsqConfig cfg = weight_lsq_config();
  ASSIGN_OR_RETURN(ops::QuantRange r, ops::quant_range(cfg.bits, cfg.mode));
  ASSIGN_OR_RETURN(int64_t nscales, ops::lsq_num_scales(cfg, out_, in_));
  if (cfg.mode != ops::LsqMode::kSymmetric || nscales != 1) {
    return absl::UnimplementedError(
        absl::StrCat(name_, ": absmax weight calibration supports symmetric per-tensor steps"));
  }
  const float a = ops::amax(store_->param(w_), static_cast<int64_t>(out_) * in_);
  store_->param(ws_)[0] = ops::step_from_amax(a, r);
  store_->buffer(qinit_)[0] = 1;
  return absl::OkStatus();
}

absl::Status Linear::LoadQuantized(const std::vector<int32_t>& codes,
                                   const std::vector<float>& steps,
                                   const std::vector<float>* zeros) {
  if (opt_.mode != LinearMode::kQat) {
    return absl::FailedPreconditionError(absl::StrCat(name_, ": not a QAT Linear"));
  }
  const int64_t ns = store_->info(ws_).size;
  if (static_cast<int64_t>(steps.size()) != ns || (wz_ >= 0) != (zeros != nullptr) ||
      (zeros != nullptr && static_cast<int64_t>(zeros->size()) != ns) ||
      static_cast<int64_t>(codes.size()) != static_cast<int64_t>(out_) * in_) {
    return absl::InvalidArgumentError(absl::StrCat(
        name_, ": exported codes/steps/zero points do not fit the layer (", codes.size(),
        " codes, ", steps.size(), " steps for ", out_, "x", in_, " with ", ns, " steps)"));
  }
  std::copy(steps.begin(), steps.end(), store_->param(ws_));
  if (zeros != nullptr) std::copy(zeros->begin(), zeros->end(), store_->param(wz_));
  ClampSteps();
  RETURN_IF_ERROR(ops::lsq_dequantize(store_->param(w_), codes.data(), wsteps(), wzeros(), out_,
                                      in_, weight_lsq_config()));
  store_->buffer(qinit_)[0] = 1;
  if (phi_rank_ >= 0) store_->buffer(phi_rank_)[0] = 0;
  return absl::OkStatus();
}

absl::Status Linear::WeightCodes(std::vector<int32_t>* codes, bool fold_phi) {
  std::vector<float> w;
  RETURN_IF_ERROR(EffectiveWeight(&w, fold_phi));
  codes->resize(w.size());
  return ops::lsq_quantize_codes(codes->data(), w.data(), wsteps(), wzeros(), out_, in_,
                                 weight_lsq_config());
}

absl::Status Linear::Forward(float* out, const float* inp, int N, bool training) {
  RETURN_IF_ERROR(ForwardBase(out, inp, N, training && !frozen_));
  if (lora_) lora_->Forward(out, inp, N);
  return absl::OkStatus();
}

absl::Status Linear::Backward(float* dinp, const float* dout, const float* inp, int N,
                              bool training) {
  RETURN_IF_ERROR(BackwardBase(dinp, dout, inp, N, training && !frozen_));
  if (lora_) lora_->Backward(dinp, dout, inp, N, per_sample_);
  return absl::OkStatus();
}

absl::Status Linear::ForwardBase(float* out, const float* inp, int N, bool training) {
  if (calibrating_) {
    const float a = ops::amax(inp, static_cast<int64_t>(N) * in_);
    calib_amax_ = std::max(calib_amax_, a);
  }
  switch (opt_.mode) {
    case LinearMode::kFull:
      ops::matmul_forward(out, inp, store_->param(w_), store_->param(b_), N, in_, out_);
      return absl::OkStatus();
    case LinearMode::kFp8:
      return ForwardFp8(out, inp, N, training);
    case LinearMode::kQat:
      return ForwardQat(out, inp, N, training);
  }
  return absl::InternalError("unknown Linear mode");
}

absl::Status Linear::BackwardBase(float* dinp, const float* dout, const float* inp, int N,
                                  bool training) {
  switch (opt_.mode) {
    case LinearMode::kFull:
      ops::matmul_backward(dinp, frozen_ ? nullptr : store_->grad(w_),
                           frozen_ ? nullptr : store_->grad(b_), dout, inp, store_->param(w_), N,
                           in_, out_);
      return absl::OkStatus();
    case LinearMode::kFp8:
      return BackwardFp8(dinp, dout, inp, N, training);
    case LinearMode::kQat:
      return BackwardQat(dinp, dout, inp, N);
  }
  return absl::InternalError("unknown Linear mode");
}

absl::Status Linear::ForwardQat(float* out, const float* inp, int N, bool training) {
  if (store_->buffer(qinit_)[0] == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat(name_, ": weight quantizer used before InitQuantizers"));
  }
  const int64_t n = static_cast<int64_t>(N) * in_;
  const float* x = inp;
  if (opt_.qat.act != ActQuant::kNone && !calibrating_) {
    xq_.resize(n);
    if (opt_.qat.act == ActQuant::kPerToken) {
      RETURN_IF_ERROR(ops::per_token_quant_forward(xq_.data(), static_cast<float*>(nullptr), inp,
                                                   N, in_, opt_.qat.act_bits));
    } else {
      float* xz = xz_ >= 0 ? store_->param(xz_) : nullptr;
      if (store_->buffer(qinit_)[1] == 0) {
        if (!training) {
          return absl::FailedPreconditionError(absl::StrCat(
              name_, ": activation step not initialised (train a step or calibrate first)"));
        }
        // LSQ initialises the activation step from the first batch it sees.
        ops::LsqInitOptions init;
        init.method = opt_.qat.scale_init;
        RETURN_IF_ERROR(ops::lsq_init(store_->param(xs_), xz, inp, 1, n, act_lsq_config(), init));
        store_->buffer(qinit_)[1] = 1;
      }
      ClampSteps();
      RETURN_IF_ERROR(ops::lsq_forward(xq_.data(), inp, store_->param(xs_), xz, 1, n,
                                       act_lsq_config()));
    }
    x = xq_.data();
  }
  RETURN_IF_ERROR(QuantizeWeight());
  ops::matmul_forward(out, x, wq_.data(), store_->param(b_), N, in_, out_);
  const int k = phi_rank();
  if (k > 0) {
    hidden_.resize(static_cast<size_t>(N) * rmax_);
    ops::lowrank_forward(out, hidden_.data(), x, store_->param(phi_l_), store_->param(phi_r_),
                         store_->buffer(phi_gamma_).data(), N, in_, out_, rmax_, k);
  }
  return absl::OkStatus();
}

absl::Status Linear::BackwardQat(float* dinp, const float* dout, const float* inp, int N) {
  const int64_t n = static_cast<int64_t>(N) * in_;
  const bool act_q = opt_.qat.act != ActQuant::kNone;
  const float* x = act_q ? xq_.data() : inp;
  // A frozen base passes gradients through to dinp only (null parameter gradients).
  auto grad = [this](int idx) { return frozen_ || idx < 0 ? nullptr : store_->grad(idx); };
  dxq_.assign(n, 0.0f);
  dwq_.assign(frozen_ ? 0 : static_cast<size_t>(out_) * in_, 0.0f);
  const int k = phi_rank();
  if (k > 0) {
    ops::lowrank_backward(dxq_.data(), grad(phi_l_), grad(phi_r_), dout, x, hidden_.data(),
                          store_->param(phi_l_), store_->param(phi_r_),
                          store_->buffer(phi_gamma_).data(), N, in_, out_, rmax_, k);
  }
  ops::matmul_backward(dxq_.data(), frozen_ ? nullptr : dwq_.data(), grad(b_), dout, x,
                       wq_.data(), N, in_, out_);
  // Straight-through into W, with LSQ's gradients for the steps (and offsets).
  if (!frozen_) {
    RETURN_IF_ERROR(ops::lsq_backward(store_->grad(w_), store_->grad(ws_), grad(wz_),
                                      dwq_.data(), store_->param(w_), wsteps(), wzeros(), out_,
                                      in_, weight_lsq_config()));
  }
  if (dinp == nullptr) return absl::OkStatus();
  switch (opt_.qat.act) {
    case ActQuant::kNone:
      for (int64_t i = 0; i < n; ++i) dinp[i] += dxq_[i];
      break;
    case ActQuant::kPerToken:
      ops::per_token_quant_backward(dinp, dxq_.data(), n);
      break;
    case ActQuant::kPerTensor:
      RETURN_IF_ERROR(ops::lsq_backward(dinp, grad(xs_), grad(xz_), dxq_.data(), inp,
                                        store_->param(xs_), xz_ >= 0 ? store_->param(xz_) : nullptr,
                                        1, n, act_lsq_config()));
      break;
  }
  return absl::OkStatus();
}

namespace {

// Block-scaled fake quantization (DeepSeek-V3's recipe, E4M3): in (rows, cols) -> out, the
// decoded codes times their tile's (1x128 along cols) or block's (128x128) scale_inv, exactly
// what the block-scaled GEMMs multiply (ops/quant/fp8.h).
absl::Status BlockFakeQuant(float* out, const float* in, int64_t rows, int64_t cols,
                            bool blocks_128x128) {
  std::vector<uint8_t> codes(rows * cols);
  const int64_t ld = blocks_128x128 ? ops::fp8_block_scale_ld(cols) : 0;
  std::vector<float> scale_inv(blocks_128x128 ? ops::fp8_num_blocks(rows) * ld
                                              : ops::fp8_num_blocks(cols) * rows);
  if (blocks_128x128) {
    RETURN_IF_ERROR(ops::fp8_quantize_128x128(codes.data(), scale_inv.data(), ld, in, rows, cols,
                                              ops::Fp8Format::kE4M3));
  } else {
    RETURN_IF_ERROR(ops::fp8_quantize_1x128(codes.data(), scale_inv.data(), in, rows, cols,
                                            ops::Fp8Format::kE4M3));
  }
  return ops::fp8_dequantize_blocks(out, codes.data(), scale_inv.data(), ld, rows, cols,
                                    ops::Fp8Format::kE4M3);
}

// out (cols, rows) = in (rows, cols) transposed.
std::vector<float> Transposed(const float* in, int64_t rows, int64_t cols) {
  std::vector<float> t(rows * cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = in[r * cols + c];
  return t;
}

}  // namespace

// Block recipe: x in 1x128 tiles along C, W in 128x128 blocks, all E4M3, no scaler state.
absl::Status Linear::ForwardFp8Block(float* out, const float* inp, int N) {
  xq_.resize(static_cast<size_t>(N) * in_);
  wq_.resize(static_cast<size_t>(out_) * in_);
  RETURN_IF_ERROR(BlockFakeQuant(xq_.data(), inp, N, in_, /*blocks_128x128=*/false));
  RETURN_IF_ERROR(BlockFakeQuant(wq_.data(), store_->param(w_), out_, in_, true));
  ops::matmul_forward(out, xq_.data(), wq_.data(), store_->param(b_), N, in_, out_);
  return absl::OkStatus();
}

// dgrad: dy in 1x128 tiles along OC times the forward's W blocks (W^T's blocks hold the same
// values). wgrad: dy^T and x^T each in 1x128 tiles along N (128x1 tiles of dy and x, DeepSeek's
// backward), which quantizes x differently from the forward.
absl::Status Linear::BackwardFp8Block(float* dinp, const float* dout, const float* inp, int N) {
  const int64_t ng = static_cast<int64_t>(N) * out_, nx = static_cast<int64_t>(N) * in_;
  gq_.resize(ng);
  RETURN_IF_ERROR(BlockFakeQuant(gq_.data(), dout, N, out_, false));
  if (dinp != nullptr) {
    ops::matmul_backward(dinp, static_cast<float*>(nullptr), static_cast<float*>(nullptr),
                         gq_.data(), xq_.data(), wq_.data(), N, in_, out_);
  }
  if (frozen_) return absl::OkStatus();
  std::vector<float> gt = Transposed(dout, N, out_), xt = Transposed(inp, N, in_);
  std::vector<float> gtq(ng), xtq(nx);
  RETURN_IF_ERROR(BlockFakeQuant(gtq.data(), gt.data(), out_, N, false));
  RETURN_IF_ERROR(BlockFakeQuant(xtq.data(), xt.data(), in_, N, false));
  const std::vector<float> gw = Transposed(gtq.data(), out_, N), xw = Transposed(xtq.data(), in_, N);
  ops::matmul_backward(static_cast<float*>(nullptr), store_->grad(w_),
                       static_cast<float*>(nullptr), gw.data(), xw.data(), wq_.data(), N, in_,
                       out_);
  float* db = store_->grad(b_);
  for (int i = 0; i < N; ++i) {
    const float* row = dout + static_cast<int64_t>(i) * out_;
    for (int o = 0; o < out_; ++o) db[o] += row[o];
  }
  return absl::OkStatus();
}

absl::Status Linear::ForwardFp8(float* out, const float* inp, int N, bool training) {
  if (opt_.fp8.recipe == Fp8Recipe::kBlock) return ForwardFp8Block(out, inp, N);
  const int64_t n = static_cast<int64_t>(N) * in_;
  const int64_t nw = static_cast<int64_t>(out_) * in_;
  const float* w = store_->param(w_);
  xq_.resize(n);
  wq_.resize(nw);
  const float ax = ops::amax(inp, n);
  const float aw = ops::amax(w, nw);
  const bool delayed = opt_.fp8.recipe == Fp8Recipe::kDelayed;
  const float sx = delayed ? scalers_[kX].scale()
                           : ops::fp8_current_scale(ax, ops::Fp8Format::kE4M3, opt_.fp8.margin);
  const float sw = delayed ? scalers_[kW].scale()
                           : ops::fp8_current_scale(aw, ops::Fp8Format::kE4M3, opt_.fp8.margin);
  RETURN_IF_ERROR(ops::fp8_quantize_dequantize(xq_.data(), inp, n, sx, ops::Fp8Format::kE4M3));
  RETURN_IF_ERROR(ops::fp8_quantize_dequantize(wq_.data(), w, nw, sw, ops::Fp8Format::kE4M3));
  if (delayed && training) {
    scalers_[kX].update(ax);
    scalers_[kW].update(aw);
  }
  ops::matmul_forward(out, xq_.data(), wq_.data(), store_->param(b_), N, in_, out_);
  return absl::OkStatus();
}

absl::Status Linear::BackwardFp8(float* dinp, const float* dout, const float* inp, int N,
                                 bool training) {
  if (opt_.fp8.recipe == Fp8Recipe::kBlock) return BackwardFp8Block(dinp, dout, inp, N);
  const int64_t ng = static_cast<int64_t>(N) * out_;
  gq_.resize(ng);
  const float ag = ops::amax(dout, ng);
  const bool delayed = opt_.fp8.recipe == Fp8Recipe::kDelayed;
  const float sg = delayed
                       ? scalers_[kG].scale()
                       : ops::fp8_current_scale(ag, ops::Fp8Format::kE5M2, opt_.fp8.margin);
  RETURN_IF_ERROR(ops::fp8_quantize_dequantize(gq_.data(), dout, ng, sg, ops::Fp8Format::kE5M2));
  if (delayed && training) scalers_[kG].update(ag);
  // dgrad and wgrad both on FP8 operands; the bias gradient from the unquantized gradient.
  ops::matmul_backward(dinp, frozen_ ? nullptr : store_->grad(w_), static_cast<float*>(nullptr),
                       gq_.data(), xq_.data(), wq_.data(), N, in_, out_);
  if (frozen_) return absl::OkStatus();
  float* db = store_->grad(b_);
  for (int i = 0; i < N; ++i) {
    const float* row = dout + static_cast<int64_t>(i) * out_;
    for (int o = 0; o < out_; ++o) db[o] += row[o];
  }
  return absl::OkStatus();
}

void Linear::SaveStateToBuffers() {
  if (fp8_hist_ < 0) return;
  const int h = opt_.fp8.history_len;
  for (int t = 0; t < 3; ++t) {
    const std::vector<float> hist = scalers_[t].history();
    std::copy(hist.begin(), hist.end(), store_->buffer(fp8_hist_).begin() + t * h);
    store_->buffer(fp8_scale_)[t] = scalers_[t].scale();
  }
}

absl::Status Linear::RestoreStateFromBuffers() {
  if (fp8_hist_ < 0) return absl::OkStatus();
  const int h = opt_.fp8.history_len;
  for (int t = 0; t < 3; ++t) {
    const auto begin = store_->buffer(fp8_hist_).begin() + t * h;
    std::vector<float> hist(begin, begin + h);
    ASSIGN_OR_RETURN(scalers_[t], ops::DelayedScaler::Restore(scalers_[t].format(), opt_.fp8.margin,
                                                              hist, store_->buffer(fp8_scale_)[t]));
  }
  return absl::OkStatus();
}

void Linear::AddPhiProduct(float* m, int k, const float* gamma) const {
  const float* L = store_->param(phi_l_);
  const float* R = store_->param(phi_r_);
  for (int o = 0; o < out_; ++o) {
    float* mo = m + static_cast<int64_t>(o) * in_;
    for (int j = 0; j < k; ++j) {
      float l = L[static_cast<int64_t>(o) * rmax_ + j];
      if (gamma != nullptr) l *= gamma[j];
      const float* r = R + static_cast<int64_t>(j) * in_;
      for (int c = 0; c < in_; ++c) mo[c] += l * r[c];
    }
  }
}

std::vector<int> Linear::phi_param_indices() const {
  if (phi_l_ < 0) return {};
  return {phi_l_, phi_r_};
}

absl::Status Linear::EffectiveWeight(std::vector<float>* w, bool fold_phi) {
  const int64_t nw = static_cast<int64_t>(out_) * in_;
  const float* weight = store_->param(w_);
  if (opt_.mode != LinearMode::kQat) {
    w->assign(weight, weight + nw);
    return absl::OkStatus();
  }
  RETURN_IF_ERROR(QuantizeWeight());
  *w = wq_;
  const int k = phi_rank();
  if (fold_phi && k > 0) {
    AddPhiProduct(w->data(), k, store_->buffer(phi_gamma_).data());
  }
  return absl::OkStatus();
}

}  // namespace qtrain
