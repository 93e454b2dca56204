// TWEO outlier loss on a block's output (the residual stream after a block) and the outlier
// metrics tracked with it (peak |a|, kurtosis): CPU reference, float in the trainer, double in
// gradient checks. Reductions are in double and do not depend on the OpenMP thread count.
#ifndef QTRAIN_OPS_TWEO_H_
#define QTRAIN_OPS_TWEO_H_

#include <cstdint>

namespace qtrain::ops {

// ---- TWEO outlier loss on a block output A (n elements) ----
// Returns (1/n) * sum_i (|a_i| / (tau + eps))^p, accumulated in double. n == 0 gives 0.
template <typename F>
double tweo_forward(const F* a, int64_t n, double tau, double p, double eps);
// da (n) += scale * d/da of the value above, i.e.
// scale * (p/n) * (|a|/(tau+eps))^(p-1) * sign(a) / (tau+eps). Expects p >= 1.
template <typename F>
void tweo_backward(F* da, const F* a, int64_t n, double tau, double p, double eps, double scale);
// peak = max |a|; kurtosis = E[(a - mean)^4] / Var^2 (population moments, double, two passes);
// kurtosis 0 when the variance is 0. n == 0 gives 0, 0.
template <typename F>
void activation_stats(const F* a, int64_t n, double* peak, double* kurtosis);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_TWEO_H_
