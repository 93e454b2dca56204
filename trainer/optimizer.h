// AdamW over a ParamStore with global-norm gradient clipping; its moments are checkpointed.
#ifndef QTRAIN_TRAINER_OPTIMIZER_H_
#define QTRAIN_TRAINER_OPTIMIZER_H_

#include <cstdint>
#include <vector>

#include "trainer/param_store.h"

namespace qtrain {

struct AdamWConfig {
  float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.1f;
  float grad_clip = 1.0f;  // 0 disables clipping
};

class AdamW {
 public:
  AdamW(const AdamWConfig& config, int64_t num_params);

  // Clips the gradients by global norm, then updates every parameter. Returns the gradient
  // norm before clipping. Bumps step().
  double Step(ParamStore* store, float lr);

  int step() const { return t_; }
  void set_step(int t) { t_ = t; }
  std::vector<float>& m() { return m_; }
  std::vector<float>& v() { return v_; }
  const std::vector<float>& m() const { return m_; }
  const std::vector<float>& v() const { return v_; }

 private:
  AdamWConfig config_;
  int t_ = 0;  // completed updates
  std::vector<float> m_, v_;
};

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_OPTIMIZER_H_
