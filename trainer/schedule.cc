// CosineSchedule::LrAt.
#include "trainer/schedule.h"

#include <algorithm>
#include <cmath>

namespace qtrain {

float CosineSchedule::LrAt(int step) const {
  if (step < warmup_steps) return peak_lr * (step + 1) / warmup_steps;
  const float min_lr = peak_lr * min_lr_ratio;
  const int decay_steps = std::max(1, total_steps - warmup_steps);
  const float progress = std::min(1.0f, static_cast<float>(step - warmup_steps) / decay_steps);
  const float coeff = 0.5f * (1.0f + std::cos(static_cast<float>(M_PI) * progress));
  return min_lr + coeff * (peak_lr - min_lr);
}

}  // namespace qtrain
