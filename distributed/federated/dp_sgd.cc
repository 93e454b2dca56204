// Per-sample clipping and the noisy mean of DP-SGD.
#include "distributed/federated/dp_sgd.h"

#include <algorithm>
#include <cmath>

namespace qtrain::federated {

void ClipAndAccumulate(float* per_sample, int samples, int64_t stride, int64_t n, float clip,
                       std::vector<double>* sum, ClipStats* stats) {
  sum->resize(n, 0.0);
  for (int s = 0; s < samples; ++s) {
    float* g = per_sample + s * stride;
    double norm2 = 0;
    for (int64_t i = 0; i < n; ++i) norm2 += double(g[i]) * g[i];
    const double norm = std::sqrt(norm2);
    // The factor is computed in double and applied in float; rounding can leave the norm a few
    // ulps above C, so the factor aims a hair below it.
    if (norm > clip) {
      const float f = static_cast<float>(clip / norm * (1 - 1e-6));
      for (int64_t i = 0; i < n; ++i) g[i] *= f;
      ++stats->clipped;
    }
    for (int64_t i = 0; i < n; ++i) (*sum)[i] += g[i];
    stats->max_norm = std::max(stats->max_norm, norm);
    stats->sum_norm += norm;
    ++stats->samples;
  }
}

void NoisyMean(const std::vector<double>& sum, double sigma, float clip, double expected_batch,
               Rng* rng, float* out) {
  const double std = sigma * clip;
  for (size_t i = 0; i < sum.size(); ++i) {
    const double noise = std > 0 ? std * rng->Normal() : 0.0;
    out[i] = static_cast<float>((sum[i] + noise) / expected_batch);
  }
}

}  // namespace qtrain::federated
