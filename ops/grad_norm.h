// Global gradient norm and clipping: CPU reference, deterministic (fixed summation order).
#ifndef QTRAIN_OPS_GRAD_NORM_H_
#define QTRAIN_OPS_GRAD_NORM_H_

#include <cstdint>

namespace qtrain::ops {

// Sum of squares of grads (n) (double accumulation, fixed order).
template <typename F>
double sum_squares(const F* grads, int64_t n);
// grads (n) *= min(1, max_norm / (norm + 1e-6)); returns the factor applied.
template <typename F>
F clip_by_global_norm(F* grads, int64_t n, double norm, double max_norm);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_GRAD_NORM_H_
