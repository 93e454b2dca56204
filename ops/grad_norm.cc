// Global gradient norm and clipping, CPU reference (see grad_norm.h).
#include "ops/grad_norm.h"

#include <algorithm>

namespace qtrain::ops {

// Serial on purpose: the norm feeds the clip factor, and a thread-count dependent summation
// order would make resumed runs drift from uninterrupted ones.
template <typename F>
double sum_squares(const F* grads, int64_t n) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double g = grads[i];
    sum += g * g;
  }
  return sum;
}

template <typename F>
F clip_by_global_norm(F* grads, int64_t n, double norm, double max_norm) {
  const F factor = static_cast<F>(std::min(1.0, max_norm / (norm + 1e-6)));
  if (factor != F(1)) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) grads[i] *= factor;
  }
  return factor;
}

template double sum_squares<float>(const float*, int64_t);
template double sum_squares<double>(const double*, int64_t);
template float clip_by_global_norm<float>(float*, int64_t, double, double);
template double clip_by_global_norm<double>(double*, int64_t, double, double);

}  // namespace qtrain::ops
