// Layernorm over the last dim, CPU reference (see layernorm.h).
#include "ops/layernorm.h"

#include <algorithm>
#include <cmath>

namespace qtrain::ops {
namespace {

constexpr double kEps = 1e-5;
// Columns per task of the dweight/dbias pass: each task owns its columns and walks the rows in
// order, so the sums do not depend on how many threads run.
constexpr int kColChunk = 32;

}  // namespace

template <typename F>
void layernorm_forward(F* out, F* mean, F* rstd, const F* inp, const F* weight, const F* bias,
                       int N, int C) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const F* x = inp + static_cast<int64_t>(n) * C;
    F* y = out + static_cast<int64_t>(n) * C;
    F m = 0;
    for (int c = 0; c < C; ++c) m += x[c];
    m /= C;
    F var = 0;  // biased (divide by C), as in GPT-2
    for (int c = 0; c < C; ++c) {
      const F d = x[c] - m;
      var += d * d;
    }
    var /= C;
    const F s = F(1) / std::sqrt(var + F(kEps));
    for (int c = 0; c < C; ++c) y[c] = (s * (x[c] - m)) * weight[c] + bias[c];
    mean[n] = m;
    rstd[n] = s;
  }
}

template <typename F>
void layernorm_backward(F* dinp, F* dweight, F* dbias, const F* dout, const F* inp,
                        const F* weight, const F* mean, const F* rstd, int N, int C) {
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const F* x = inp + static_cast<int64_t>(n) * C;
    const F* dy = dout + static_cast<int64_t>(n) * C;
    F* dx = dinp + static_cast<int64_t>(n) * C;
    const F m = mean[n];
    const F s = rstd[n];
    // dnorm = weight * dy; dx = s * (dnorm - mean(dnorm) - norm * mean(dnorm * norm)).
    F dnorm_mean = 0;
    F dnorm_norm_mean = 0;
    for (int c = 0; c < C; ++c) {
      const F norm = (x[c] - m) * s;
      const F dnorm = weight[c] * dy[c];
      dnorm_mean += dnorm;
      dnorm_norm_mean += dnorm * norm;
    }
    dnorm_mean /= C;
    dnorm_norm_mean /= C;
    for (int c = 0; c < C; ++c) {
      const F norm = (x[c] - m) * s;
      const F dnorm = weight[c] * dy[c];
      dx[c] += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * s;
    }
  }

  const int chunks = (C + kColChunk - 1) / kColChunk;
#pragma omp parallel for schedule(static)
  for (int chunk = 0; chunk < chunks; ++chunk) {
    const int c0 = chunk * kColChunk;
    const int c1 = std::min(C, c0 + kColChunk);
    for (int n = 0; n < N; ++n) {
      const F* x = inp + static_cast<int64_t>(n) * C;
      const F* dy = dout + static_cast<int64_t>(n) * C;
      for (int c = c0; c < c1; ++c) {
        dweight[c] += (x[c] - mean[n]) * rstd[n] * dy[c];
        dbias[c] += dy[c];
      }
    }
  }
}

template void layernorm_forward<float>(float*, float*, float*, const float*, const float*,
                                       const float*, int, int);
template void layernorm_forward<double>(double*, double*, double*, const double*,
                                        const double*, const double*, int, int);
template void layernorm_backward<float>(float*, float*, float*, const float*, const float*,
                                        const float*, const float*, const float*, int, int);
template void layernorm_backward<double>(double*, double*, double*, const double*,
                                         const double*, const double*, const double*,
                                         const double*, int, int);

}  // namespace qtrain::ops
