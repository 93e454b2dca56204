// AdamW optimizer step: CPU reference (fp32 master weights and state in the trainer).
#ifndef QTRAIN_OPS_ADAMW_H_
#define QTRAIN_OPS_ADAMW_H_

#include <cstdint>

namespace qtrain::ops {

// AdamW with decoupled weight decay, bias-corrected; t is the 1-based step.
// params, grads, m, v (n). m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// mhat = m/(1-b1^t), vhat = v/(1-b2^t);
// p -= lr * (mhat / (sqrt(vhat) + eps) + weight_decay * p)
template <typename F>
void adamw_update(F* params, const F* grads, F* m, F* v, int64_t n, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int t);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_ADAMW_H_
