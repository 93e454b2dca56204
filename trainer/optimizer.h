// AdamW over a ParamStore with global-norm gradient clipping; its moments are checkpointed.
// Under ZeRO-1 one AdamW owns a shard [begin, end) of the flat parameter buffer and holds the
// moments of that shard only.
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
  // Owns every parameter.
  AdamW(const AdamWConfig& config, int64_t num_params);
  // Owns parameters [begin, end) of `num_params` (a ZeRO-1 shard; may be empty).
  AdamW(const AdamWConfig& config, int64_t num_params, int64_t begin, int64_t end);

  // Clips the gradients of the owned range by their norm, then updates them. Returns that norm
  // before clipping. Bumps step(). For an optimizer that owns everything this is the global norm.
  double Step(ParamStore* store, float lr);

  // The update half of Step, for callers that computed the global gradient norm themselves
  // (over shards): scales grads[begin, end) by min(1, grad_clip / norm), updates params[begin,
  // end) and bumps step(). Weight decay follows each tensor's flag, also for a tensor that a
  // shard boundary cuts.
  void Update(ParamStore* store, float lr, double grad_norm);

  // Zeroes the moments of parameters [offset, offset + size) that this optimizer owns (a
  // re-initialised tensor starts its Adam state afresh; under ZeRO-1 each rank its piece).
  void ResetMoments(int64_t offset, int64_t size);

  int step() const { return t_; }
  void set_step(int t) { t_ = t; }
  int64_t num_params() const { return num_params_; }
  int64_t begin() const { return begin_; }
  int64_t end() const { return end_; }
  bool sharded() const { return begin_ != 0 || end_ != num_params_; }
  const AdamWConfig& config() const { return config_; }
  // Moments of the owned range: m()[i] belongs to parameter begin() + i.
  std::vector<float>& m() { return m_; }
  std::vector<float>& v() { return v_; }
  const std::vector<float>& m() const { return m_; }
  const std::vector<float>& v() const { return v_; }

 private:
  AdamWConfig config_;
  int64_t num_params_ = 0, begin_ = 0, end_ = 0;
  int t_ = 0;  // completed updates
  std::vector<float> m_, v_;
};

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_OPTIMIZER_H_
