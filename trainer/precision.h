// Per-Linear precision, resolved from the job spec's precision block (default + overrides):
// the validated C++ form that trainer/linear.h consumes.
#ifndef QTRAIN_TRAINER_PRECISION_H_
#define QTRAIN_TRAINER_PRECISION_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "configs/job_spec.pb.h"
#include "ops/quant/fp8.h"
#include "ops/quant/lsq.h"

namespace qtrain {

enum class LinearMode { kFull, kFp8, kQat };

// How a Linear's FP8 tensors are scaled (precision.fp8.scaling).
enum class Fp8Recipe { kDelayed, kCurrent, kBlock };

struct Fp8Options {
  Fp8Recipe recipe = Fp8Recipe::kDelayed;
  int history_len = 16;
  int margin = 0;
  // GPU GEMM accumulation (precision.fp8.*_accumulation): Hopper's fast (reduced-precision)
  // accumulation in the forward GEMM, promoted (split) accumulation in dgrad and wgrad.
  bool fast_accum_fprop = true;
  bool fast_accum_backward = false;
};

enum class ActQuant { kNone, kPerTensor, kPerToken };

struct QatOptions {
  int weight_bits = 4;
  ops::QuantGranularity weight_granularity = ops::QuantGranularity::kPerChannel;
  int group_size = 128;
  bool weight_asymmetric = false;
  int act_bits = 0;  // 0: activations stay in full precision
  ActQuant act = ActQuant::kNone;
  bool act_asymmetric = false;
  ops::LsqInit scale_init = ops::LsqInit::kLsq;
  bool int8_forward = false;  // CUDA: INT8 tensor-core forward GEMM
  bool fp16_scales = false;   // weight steps and zero points used as their fp16 roundings
};

struct PhiOptions {
  bool enabled = false;
  int rank = 32;
  int decay_period = 0;  // 0: no decay, Phi stays at full rank
  int start_step = 0;
};

struct LinearOptions {
  LinearMode mode = LinearMode::kFull;
  Fp8Options fp8;
  QatOptions qat;
  PhiOptions phi;  // only on kQat Linears
};

// The precision of every Linear of a model: a default and ordered overrides by name pattern.
class PrecisionConfig {
 public:
  // n_layer: the model's blocks (needed by keep_first_last_blocks; 0 when unknown, which
  // keep_first_last_blocks > 0 refuses).
  static absl::StatusOr<PrecisionConfig> FromSpec(const PrecisionSpec& spec, int n_layer = 0);
  // The options of the Linear named e.g. "block.3.attn.qkv"; the last matching override wins.
  LinearOptions For(const std::string& linear_name) const;
  // True when `pattern` ("*", "block.<i>.*", "block.<i>.attn.qkv", ...) names `linear_name`.
  static bool Matches(const std::string& pattern, const std::string& linear_name);

  const LinearOptions& base() const { return base_; }

 private:
  LinearOptions base_;
  std::vector<std::pair<std::string, LinearMode>> overrides_;
  int keep_ends_ = 0, n_layer_ = 0;  // blocks [0, keep_ends_) and [n_layer_ - keep_ends_, ...)
};

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_PRECISION_H_
