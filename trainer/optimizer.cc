// AdamW::Step: clip, then one decoupled-weight-decay Adam update per tensor.
#include "trainer/optimizer.h"

#include <cmath>

#include "ops/cpu_ops.h"

namespace qtrain {

AdamW::AdamW(const AdamWConfig& config, int64_t num_params)
    : config_(config), m_(num_params, 0.0f), v_(num_params, 0.0f) {}

double AdamW::Step(ParamStore* store, float lr) {
  std::vector<float>& grads = store->grads();
  const int64_t n = static_cast<int64_t>(grads.size());
  const double norm = std::sqrt(ops::sum_squares(grads.data(), n));
  if (config_.grad_clip > 0) ops::clip_by_global_norm(grads.data(), n, norm, config_.grad_clip);
  ++t_;
  for (const ParamInfo& info : store->infos()) {
    ops::adamw_update(store->params().data() + info.offset, grads.data() + info.offset,
                      m_.data() + info.offset, v_.data() + info.offset, info.size, lr,
                      config_.beta1, config_.beta2, config_.eps,
                      info.decay ? config_.weight_decay : 0.0f, t_);
  }
  return norm;
}

}  // namespace qtrain
