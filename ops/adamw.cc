// AdamW step, CPU reference (see adamw.h).
#include "ops/adamw.h"

#include <cmath>

namespace qtrain::ops {

template <typename F>
void adamw_update(F* params, const F* grads, F* m, F* v, int64_t n, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int t) {
  const F b1 = beta1;
  const F b2 = beta2;
  const F bc1 = F(1) - std::pow(b1, static_cast<F>(t));
  const F bc2 = F(1) - std::pow(b2, static_cast<F>(t));
  const F lr_f = lr;
  const F eps_f = eps;
  const F wd = weight_decay;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const F g = grads[i];
    const F mi = b1 * m[i] + (F(1) - b1) * g;
    const F vi = b2 * v[i] + (F(1) - b2) * g * g;
    m[i] = mi;
    v[i] = vi;
    const F mhat = mi / bc1;
    const F vhat = vi / bc2;
    params[i] -= lr_f * (mhat / (std::sqrt(vhat) + eps_f) + wd * params[i]);
  }
}

template void adamw_update<float>(float*, const float*, float*, float*, int64_t, float, float,
                                  float, float, float, int);
template void adamw_update<double>(double*, const double*, double*, double*, int64_t, float,
                                   float, float, float, float, int);

}  // namespace qtrain::ops
