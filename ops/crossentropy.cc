// Tied LM head + softmax cross-entropy, CPU reference (see crossentropy.h). The two GEMMs go
// through matmul (Eigen, thread-count independent); the softmax is plain per-row loops.
#include "ops/crossentropy.h"

#include <cassert>
#include <cmath>

#include "ops/matmul.h"

namespace qtrain::ops {

template <typename F>
double lm_head_crossentropy_forward(F* losses, F* probs, const F* x, const F* wte,
                                    const int32_t* targets, int N, int C, int V) {
  matmul_forward(probs, x, wte, static_cast<const F*>(nullptr), N, C, V);  // logits
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    F* row = probs + static_cast<int64_t>(n) * V;
    const int32_t target = targets[n];
    assert(target >= 0 && target < V);
    F maxv = row[0];
    for (int v = 1; v < V; ++v) maxv = row[v] > maxv ? row[v] : maxv;
    const F target_logit = row[target];
    F sum = 0;
    for (int v = 0; v < V; ++v) {
      row[v] = std::exp(row[v] - maxv);
      sum += row[v];
    }
    // Log-sum-exp instead of -log(prob): a tiny target prob would underflow to 0 in float.
    losses[n] = std::log(sum) - (target_logit - maxv);
    const F inv = F(1) / sum;
    for (int v = 0; v < V; ++v) row[v] *= inv;
  }
  double total = 0;  // index order: the reported loss is bit-reproducible
  for (int n = 0; n < N; ++n) total += static_cast<double>(losses[n]);
  return N > 0 ? total / N : 0.0;
}

template <typename F>
void lm_head_crossentropy_backward(F* dx, F* dwte, F* probs, const F* x, const F* wte,
                                   const int32_t* targets, int N, int C, int V, F dloss) {
  const F scale = dloss / static_cast<F>(N);
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    F* row = probs + static_cast<int64_t>(n) * V;
    row[targets[n]] -= F(1);
    for (int v = 0; v < V; ++v) row[v] *= scale;
  }
  // dx (N,C) += dlogits @ wte; dwte (V,C) += dlogits^T @ x.
  matmul_backward(dx, dwte, static_cast<F*>(nullptr), probs, x, wte, N, C, V);
}

template double lm_head_crossentropy_forward<float>(float*, float*, const float*, const float*,
                                                    const int32_t*, int, int, int);
template double lm_head_crossentropy_forward<double>(double*, double*, const double*,
                                                     const double*, const int32_t*, int, int,
                                                     int);
template void lm_head_crossentropy_backward<float>(float*, float*, float*, const float*,
                                                   const float*, const int32_t*, int, int, int,
                                                   float);
template void lm_head_crossentropy_backward<double>(double*, double*, double*, const double*,
                                                    const double*, const int32_t*, int, int,
                                                    int, double);

}  // namespace qtrain::ops
