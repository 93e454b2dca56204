// PrecisionConfig: job spec precision block -> per-Linear options.
#include "trainer/precision.h"

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace qtrain {
namespace {

LinearMode ModeOf(LinearPrecision p) {
  switch (p) {
    case FP8:
      return LinearMode::kFp8;
    case QAT:
      return LinearMode::kQat;
    default:
      return LinearMode::kFull;
  }
}

ops::QuantGranularity GranularityOf(qtrain::QuantGranularity g) {
  switch (g) {
    case qtrain::PER_TENSOR:
      return ops::QuantGranularity::kPerTensor;
    case qtrain::PER_GROUP:
      return ops::QuantGranularity::kPerGroup;
    default:
      return ops::QuantGranularity::kPerChannel;
  }
}

}  // namespace

absl::StatusOr<PrecisionConfig> PrecisionConfig::FromSpec(const PrecisionSpec& spec,
                                                         int n_layer) {
  PrecisionConfig c;
  c.keep_ends_ = spec.keep_first_last_blocks();
  c.n_layer_ = n_layer;
  if (c.keep_ends_ < 0 || (c.keep_ends_ > 0 && n_layer <= 0)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "precision.keep_first_last_blocks: ", c.keep_ends_,
        n_layer <= 0 ? " needs the model's n_layer" : " must be >= 0"));
  }
  LinearOptions& o = c.base_;
  o.mode = ModeOf(spec.linear());
  switch (spec.fp8().scaling()) {
    case CURRENT:
      o.fp8.recipe = Fp8Recipe::kCurrent;
      break;
    case BLOCK:
      o.fp8.recipe = Fp8Recipe::kBlock;
      break;
    default:
      o.fp8.recipe = Fp8Recipe::kDelayed;
  }
  o.fp8.fast_accum_fprop = spec.fp8().fprop_accumulation() != SPLIT;
  o.fp8.fast_accum_backward = spec.fp8().backward_accumulation() == FAST;
  o.fp8.history_len = spec.fp8().amax_history_len() > 0 ? spec.fp8().amax_history_len() : 16;
  o.fp8.margin = spec.fp8().margin();
  const QatSpec& q = spec.qat();
  o.qat.weight_bits = q.weight_bits() > 0 ? q.weight_bits() : 4;
  o.qat.weight_granularity = GranularityOf(q.weight_granularity());
  o.qat.group_size = q.group_size() > 0 ? q.group_size() : 128;
  o.qat.weight_asymmetric = q.weight_asymmetric();
  o.qat.act_bits = q.act_bits();
  if (q.act_bits() == 0) {
    o.qat.act = ActQuant::kNone;
  } else if (q.act_granularity() == qtrain::PER_TOKEN) {
    o.qat.act = ActQuant::kPerToken;
  } else {
    o.qat.act = ActQuant::kPerTensor;
  }
  o.qat.act_asymmetric = q.act_asymmetric();
  o.qat.scale_init = q.scale_init() == MSE_SEARCH ? ops::LsqInit::kMseSearch : ops::LsqInit::kLsq;
  o.qat.int8_forward = q.int8_forward();
  o.qat.fp16_scales = q.fp16_scales();
  const AuxLowRankSpec& a = spec.aux_lowrank();
  o.phi.enabled = a.enabled();
  o.phi.rank = a.rank() > 0 ? a.rank() : 32;
  o.phi.decay_period = a.decay_period();
  o.phi.start_step = a.start_step();
  for (const LayerOverride& ov : spec.overrides()) {
    c.overrides_.emplace_back(ov.match(), ModeOf(ov.precision()));
  }
  return c;
}

bool PrecisionConfig::Matches(const std::string& pattern, const std::string& name) {
  if (pattern == "*") return true;
  if (absl::EndsWith(pattern, ".*")) {
    return absl::StartsWith(name, pattern.substr(0, pattern.size() - 1));
  }
  return pattern == name;
}

LinearOptions PrecisionConfig::For(const std::string& linear_name) const {
  LinearOptions o = base_;
  for (const auto& [pattern, mode] : overrides_) {
    if (Matches(pattern, linear_name)) o.mode = mode;
  }
  int block = -1;
  if (keep_ends_ > 0 && absl::StartsWith(linear_name, "block.") &&
      absl::SimpleAtoi(linear_name.substr(6, linear_name.find('.', 6) - 6), &block) &&
      (block < keep_ends_ || block >= n_layer_ - keep_ends_)) {
    o.mode = LinearMode::kFull;
  }
  if (o.mode != LinearMode::kQat) o.phi.enabled = false;
  return o;
}

}  // namespace qtrain
