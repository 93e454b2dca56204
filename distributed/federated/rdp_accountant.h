// Privacy accounting for DP-SGD on federated clients: Rényi DP of the Poisson-subsampled
// Gaussian mechanism (Mironov, Talwar, Zhang 2019, "Rényi Differential Privacy of the Sampled
// Gaussian Mechanism", Sec. 3.3: the integer-order binomial sum, and for fractional orders the
// two erfc series around z0 = sigma^2 log(1/q - 1) + 1/2), composed over steps by addition, and
// converted to (epsilon, delta) with the bound Opacus uses (Balle et al. 2020, Thm. 21):
//   epsilon = min_alpha rdp(alpha) + log((alpha - 1) / alpha) - (log delta + log alpha) / (alpha - 1).
#ifndef QTRAIN_DISTRIBUTED_FEDERATED_RDP_ACCOUNTANT_H_
#define QTRAIN_DISTRIBUTED_FEDERATED_RDP_ACCOUNTANT_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"

namespace qtrain::federated {

// Opacus's default orders: 1.1, 1.2, ..., 10.9, then 12, 13, ..., 63.
std::vector<double> DefaultRdpOrders();

// RDP at order `alpha` (> 1; +inf allowed) of one step of the Gaussian mechanism with noise
// multiplier `sigma` (std / sensitivity) on a Poisson sample of rate `q` in [0, 1].
double SampledGaussianRdp(double q, double sigma, double alpha);

struct PrivacySpent {
  double epsilon = 0;
  double order = 0;  // the order that gave the minimum
};

// The (epsilon, delta) bound from RDP values at `orders`; +inf epsilon when nothing is finite.
PrivacySpent EpsilonFromRdp(const std::vector<double>& orders, const std::vector<double>& rdp,
                            double delta);

class RdpAccountant {
 public:
  explicit RdpAccountant(std::vector<double> orders = DefaultRdpOrders());
  // Composes `steps` DP-SGD steps with noise multiplier sigma at sample rate q.
  void Step(double sigma, double q, int64_t steps = 1);
  PrivacySpent Spent(double delta) const { return EpsilonFromRdp(orders_, rdp_, delta); }
  const std::vector<double>& orders() const { return orders_; }
  const std::vector<double>& rdp() const { return rdp_; }

 private:
  std::vector<double> orders_, rdp_;
};

// Epsilon at delta after `steps` steps (one accountant, default orders).
double EpsilonAfter(double sigma, double q, int64_t steps, double delta);

// The smallest noise multiplier (to within `precision`) that keeps epsilon at delta after
// `steps` steps at rate q at or below target_epsilon, searched as Opacus's get_noise_multiplier
// did when its tests were written: the upper end is doubled from 10 until it suffices, then
// [0.01, upper] is bisected until it is narrower than `precision`; the sufficient end is
// returned, so its epsilon is <= the target. InvalidArgument for targets that are not positive
// and finite, or q, delta outside (0, 1).
absl::StatusOr<double> NoiseMultiplierForEpsilon(double target_epsilon, double delta, double q,
                                                 int64_t steps, double precision = 0.01);

}  // namespace qtrain::federated

#endif  // QTRAIN_DISTRIBUTED_FEDERATED_RDP_ACCOUNTANT_H_
