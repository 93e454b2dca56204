// TWEO outlier loss and activation outlier metrics, CPU reference (see tweo.h).
#include "ops/tweo.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace qtrain::ops {
namespace {

// Elements per task of the reductions: each chunk is summed in order into its own slot and the
// slots are added serially, so the bits of a sum do not depend on the thread count (the loss
// value and the metrics must be identical after a resume on a different machine).
constexpr int64_t kChunk = 4096;

int64_t NumChunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

double SumSlots(const std::vector<double>& slots) {
  double s = 0;
  for (double v : slots) s += v;
  return s;
}

}  // namespace

template <typename F>
double tweo_forward(const F* a, int64_t n, double tau, double p, double eps) {
  if (n <= 0) return 0.0;
  const double inv_t = 1.0 / (tau + eps);
  const int64_t chunks = NumChunks(n);
  std::vector<double> partial(chunks, 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t i1 = std::min(n, (ch + 1) * kChunk);
    double s = 0;
    for (int64_t i = ch * kChunk; i < i1; ++i) {
      s += std::pow(std::abs(static_cast<double>(a[i])) * inv_t, p);
    }
    partial[ch] = s;
  }
  return SumSlots(partial) / static_cast<double>(n);
}

template <typename F>
void tweo_backward(F* da, const F* a, int64_t n, double tau, double p, double eps,
                   double scale) {
  if (n <= 0) return;
  const double inv_t = 1.0 / (tau + eps);
  const double coef = scale * p / static_cast<double>(n) * inv_t;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    const double x = a[i];
    // sign(0) = 0 keeps the p = 1 case (pow(0, 0) = 1) at a zero gradient for a = 0.
    const double sign = (x > 0) - (x < 0);
    da[i] += static_cast<F>(coef * std::pow(std::abs(x) * inv_t, p - 1.0) * sign);
  }
}

template <typename F>
void activation_stats(const F* a, int64_t n, double* peak, double* kurtosis) {
  *peak = 0.0;
  *kurtosis = 0.0;
  if (n <= 0) return;
  const int64_t chunks = NumChunks(n);
  std::vector<double> sum(chunks, 0.0), mx(chunks, 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t i1 = std::min(n, (ch + 1) * kChunk);
    double s = 0, m = 0;
    for (int64_t i = ch * kChunk; i < i1; ++i) {
      const double x = a[i];
      s += x;
      m = std::max(m, std::abs(x));
    }
    sum[ch] = s;
    mx[ch] = m;
  }
  *peak = *std::max_element(mx.begin(), mx.end());
  const double mean = SumSlots(sum) / static_cast<double>(n);

  // Second pass around the mean: the one-pass E[x^4] - ... form cancels catastrophically for
  // activations with a large mean.
  std::vector<double> m2(chunks, 0.0), m4(chunks, 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t i1 = std::min(n, (ch + 1) * kChunk);
    double s2 = 0, s4 = 0;
    for (int64_t i = ch * kChunk; i < i1; ++i) {
      const double d = static_cast<double>(a[i]) - mean;
      const double d2 = d * d;
      s2 += d2;
      s4 += d2 * d2;
    }
    m2[ch] = s2;
    m4[ch] = s4;
  }
  const double var = SumSlots(m2) / static_cast<double>(n);
  const double fourth = SumSlots(m4) / static_cast<double>(n);
  *kurtosis = var > 0 ? fourth / (var * var) : 0.0;
}

template double tweo_forward<float>(const float*, int64_t, double, double, double);
template double tweo_forward<double>(const double*, int64_t, double, double, double);
template void tweo_backward<float>(float*, const float*, int64_t, double, double, double,
                                   double);
template void tweo_backward<double>(double*, const double*, int64_t, double, double, double,
                                    double);
template void activation_stats<float>(const float*, int64_t, double*, double*);
template void activation_stats<double>(const double*, int64_t, double*, double*);

}  // namespace qtrain::ops
