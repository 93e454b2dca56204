// Distillation loss against teacher logits, CPU reference (see distill.h).
#include "ops/distill.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace qtrain::ops {
namespace {

// max and log(sum exp(x - max)) of one row, so log_softmax(x)_v = x_v - max - lse.
template <typename F>
void RowLogSumExp(const F* x, int V, double* max, double* lse) {
  double m = -INFINITY;
  for (int v = 0; v < V; ++v) m = std::max(m, static_cast<double>(x[v]));
  double s = 0;
  for (int v = 0; v < V; ++v) s += std::exp(static_cast<double>(x[v]) - m);
  *max = m;
  *lse = std::log(s);
}

}  // namespace

template <typename F>
double distill_forward(const F* student_logits, const F* teacher_logits, int N, int V,
                       DistillLoss loss) {
  if (N <= 0 || V <= 0) return 0.0;
  // One slot per row, summed serially afterwards: thread-count independent bits.
  std::vector<double> row_loss(N, 0.0);
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const F* s = student_logits + static_cast<int64_t>(n) * V;
    const F* t = teacher_logits + static_cast<int64_t>(n) * V;
    double acc = 0;
    if (loss == DistillLoss::kMse) {
      for (int v = 0; v < V; ++v) {
        const double d = static_cast<double>(s[v]) - static_cast<double>(t[v]);
        acc += d * d;
      }
      acc /= V;
    } else {
      double smax, slse, tmax, tlse;
      RowLogSumExp(s, V, &smax, &slse);
      RowLogSumExp(t, V, &tmax, &tlse);
      for (int v = 0; v < V; ++v) {
        const double log_pt = static_cast<double>(t[v]) - tmax - tlse;
        const double pt = std::exp(log_pt);
        // pt == 0 contributes 0 (lim p log p); skipping it avoids 0 * -inf for masked logits.
        if (pt == 0) continue;
        const double log_ps = static_cast<double>(s[v]) - smax - slse;
        acc += pt * (log_pt - log_ps);
      }
    }
    row_loss[n] = acc;
  }
  double sum = 0;
  for (double r : row_loss) sum += r;
  return sum / N;
}

template <typename F>
void distill_backward(F* dstudent, const F* student_logits, const F* teacher_logits, int N,
                      int V, DistillLoss loss, F scale) {
  if (N <= 0 || V <= 0) return;
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const F* s = student_logits + static_cast<int64_t>(n) * V;
    const F* t = teacher_logits + static_cast<int64_t>(n) * V;
    F* ds = dstudent + static_cast<int64_t>(n) * V;
    if (loss == DistillLoss::kMse) {
      const double coef = 2.0 * static_cast<double>(scale) / (static_cast<double>(N) * V);
      for (int v = 0; v < V; ++v) {
        ds[v] += static_cast<F>(coef * (static_cast<double>(s[v]) - static_cast<double>(t[v])));
      }
    } else {
      // d KL(pt || ps) / d s = ps - pt (pt sums to 1).
      const double coef = static_cast<double>(scale) / N;
      double smax, slse, tmax, tlse;
      RowLogSumExp(s, V, &smax, &slse);
      RowLogSumExp(t, V, &tmax, &tlse);
      for (int v = 0; v < V; ++v) {
        const double ps = std::exp(static_cast<double>(s[v]) - smax - slse);
        const double pt = std::exp(static_cast<double>(t[v]) - tmax - tlse);
        ds[v] += static_cast<F>(coef * (ps - pt));
      }
    }
  }
}

template double distill_forward<float>(const float*, const float*, int, int, DistillLoss);
template double distill_forward<double>(const double*, const double*, int, int, DistillLoss);
template void distill_backward<float>(float*, const float*, const float*, int, int, DistillLoss,
                                      float);
template void distill_backward<double>(double*, const double*, const double*, int, int,
                                       DistillLoss, double);

}  // namespace qtrain::ops
