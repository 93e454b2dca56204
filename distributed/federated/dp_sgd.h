// DP-SGD's private gradient (Abadi et al. 2016) from per-sample gradients: each sample's
// gradient is clipped to L2 norm <= C, the clipped gradients are summed, Gaussian noise of
// std sigma * C is added to every coordinate, and the sum is divided by the expected batch
// size (Poisson sampling: q * N, as Opacus does, so the noise scale does not depend on the
// drawn batch).
#ifndef QTRAIN_DISTRIBUTED_FEDERATED_DP_SGD_H_
#define QTRAIN_DISTRIBUTED_FEDERATED_DP_SGD_H_

#include <cstdint>
#include <vector>

#include "trainer/rng.h"

namespace qtrain::federated {

struct ClipStats {
  int samples = 0;
  int clipped = 0;            // samples whose norm exceeded C
  double max_norm = 0;        // before clipping
  double sum_norm = 0;        // before clipping (mean = sum_norm / samples)
};

// Rows s = 0..samples-1 of per_sample (row s at per_sample + s * stride; the first n floats of
// each row are the gradient): clipped in place to norm <= clip, then added into sum (n).
void ClipAndAccumulate(float* per_sample, int samples, int64_t stride, int64_t n, float clip,
                       std::vector<double>* sum, ClipStats* stats);

// out (n) = (sum + N(0, (sigma * clip)^2) per coordinate) / expected_batch.
void NoisyMean(const std::vector<double>& sum, double sigma, float clip, double expected_batch,
               Rng* rng, float* out);

}  // namespace qtrain::federated

#endif  // QTRAIN_DISTRIBUTED_FEDERATED_DP_SGD_H_
