// GELU (tanh approximation): CPU reference, also the oracle of ops/cuda/gelu.cu.
#ifndef QTRAIN_OPS_GELU_H_
#define QTRAIN_OPS_GELU_H_

#include <cstdint>

namespace qtrain::ops {

// out (n) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), x = inp (n).
template <typename F>
void gelu_forward(F* out, const F* inp, int64_t n);
template <typename F>
void gelu_backward(F* dinp, const F* inp, const F* dout, int64_t n);  // dinp +=

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_GELU_H_
