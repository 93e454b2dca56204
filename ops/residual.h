// Residual add: CPU reference (float in the trainer, double in gradient checks).
#ifndef QTRAIN_OPS_RESIDUAL_H_
#define QTRAIN_OPS_RESIDUAL_H_

#include <cstdint>

namespace qtrain::ops {

// out (n) = inp1 (n) + inp2 (n).
template <typename F>
void residual_forward(F* out, const F* inp1, const F* inp2, int64_t n);
template <typename F>
void residual_backward(F* dinp1, F* dinp2, const F* dout, int64_t n);  // both +=

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_RESIDUAL_H_
