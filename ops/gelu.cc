// GELU (tanh approximation), CPU reference (see gelu.h); ops/cuda/gelu.cu mirrors the formulas.
#include "ops/gelu.h"

#include <cmath>

namespace qtrain::ops {
namespace {

constexpr double kSqrt2OverPi = 0.79788456080286535588;  // sqrt(2/pi)
constexpr double kCubic = 0.044715;

}  // namespace

template <typename F>
void gelu_forward(F* out, const F* inp, int64_t n) {
  const F k = F(kSqrt2OverPi);
  const F a = F(kCubic);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const F x = inp[i];
    out[i] = F(0.5) * x * (F(1) + std::tanh(k * (x + a * x * x * x)));
  }
}

template <typename F>
void gelu_backward(F* dinp, const F* inp, const F* dout, int64_t n) {
  const F k = F(kSqrt2OverPi);
  const F a = F(kCubic);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const F x = inp[i];
    const F th = std::tanh(k * (x + a * x * x * x));
    // sech^2 = 1 - tanh^2 stays finite where cosh would overflow.
    const F sech2 = F(1) - th * th;
    const F grad = F(0.5) * (F(1) + th) + F(0.5) * x * sech2 * k * (F(1) + F(3) * a * x * x);
    dinp[i] += grad * dout[i];
  }
}

template void gelu_forward<float>(float*, const float*, int64_t);
template void gelu_forward<double>(double*, const double*, int64_t);
template void gelu_backward<float>(float*, const float*, const float*, int64_t);
template void gelu_backward<double>(double*, const double*, const double*, int64_t);

}  // namespace qtrain::ops
