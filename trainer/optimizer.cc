// AdamW::Step / Update: clip, then one decoupled-weight-decay Adam update per tensor (or per
// piece of a tensor inside the owned range).
#include "trainer/optimizer.h"

#include <algorithm>
#include <cmath>

#include "ops/cpu_ops.h"

namespace qtrain {

AdamW::AdamW(const AdamWConfig& config, int64_t num_params)
    : AdamW(config, num_params, 0, num_params) {}

AdamW::AdamW(const AdamWConfig& config, int64_t num_params, int64_t begin, int64_t end)
    : config_(config),
      num_params_(num_params),
      begin_(begin),
      end_(end),
      m_(end - begin, 0.0f),
      v_(end - begin, 0.0f) {}

double AdamW::Step(ParamStore* store, float lr) {
  const double norm =
      std::sqrt(ops::sum_squares(store->grads().data() + begin_, end_ - begin_));
  Update(store, lr, norm);
  return norm;
}

void AdamW::Update(ParamStore* store, float lr, double grad_norm) {
  float* grads = store->grads().data();
  if (config_.grad_clip > 0) {
    ops::clip_by_global_norm(grads + begin_, end_ - begin_, grad_norm, config_.grad_clip);
  }
  ++t_;
  for (const ParamInfo& info : store->infos()) {
    const int64_t lo = std::max(info.offset, begin_);
    const int64_t hi = std::min(info.offset + info.size, end_);
    if (lo >= hi) continue;
    ops::adamw_update(store->params().data() + lo, grads + lo, m_.data() + (lo - begin_),
                      v_.data() + (lo - begin_), hi - lo, lr, config_.beta1, config_.beta2,
                      config_.eps, info.decay ? config_.weight_decay : 0.0f, t_);
  }
}

void AdamW::ResetMoments(int64_t offset, int64_t size) {
  const int64_t lo = std::max(offset, begin_);
  const int64_t hi = std::min(offset + size, end_);
  if (lo >= hi) return;
  std::fill(m_.begin() + (lo - begin_), m_.begin() + (hi - begin_), 0.0f);
  std::fill(v_.begin() + (lo - begin_), v_.begin() + (hi - begin_), 0.0f);
}

}  // namespace qtrain
