// The RDP accountant of the Poisson-subsampled Gaussian mechanism, in log space throughout.
#include "distributed/federated/rdp_accountant.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"

namespace qtrain::federated {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// log(e^a + e^b), with -inf as log 0.
double LogAdd(double a, double b) {
  if (a == -kInf) return b;
  if (b == -kInf) return a;
  const double hi = std::max(a, b), lo = std::min(a, b);
  return hi + std::log1p(std::exp(lo - hi));
}

// log(e^a - e^b) for a >= b.
double LogSub(double a, double b) {
  if (b == -kInf) return a;
  if (a <= b) return -kInf;
  return a + std::log1p(-std::exp(b - a));
}

// log erfc(x): directly while erfc(x) is comfortably representable, else its asymptotic series
// erfc(x) = e^{-x^2} / (x sqrt(pi)) (1 - 1/(2x^2) + 3/(4x^4) - 15/(8x^6) + ...).
double LogErfc(double x) {
  if (x < 20) return std::log(std::erfc(x));
  const double x2 = x * x;
  return -x2 - std::log(x) - 0.5 * std::log(M_PI) +
         std::log1p(-1 / (2 * x2) + 3 / (4 * x2 * x2) - 15 / (8 * x2 * x2 * x2));
}

// log A_alpha for integer alpha: log sum_k C(alpha, k) (1-q)^(alpha-k) q^k e^{(k^2-k)/(2 s^2)}.
double LogAInteger(double q, double sigma, int64_t alpha) {
  double log_a = -kInf;
  double log_binom = 0;  // log C(alpha, k)
  for (int64_t k = 0; k <= alpha; ++k) {
    if (k > 0) log_binom += std::log(static_cast<double>(alpha - k + 1)) - std::log(double(k));
    const double kd = static_cast<double>(k);
    const double term = log_binom + (alpha - kd) * std::log1p(-q) + kd * std::log(q) +
                        (kd * kd - kd) / (2 * sigma * sigma);
    log_a = LogAdd(log_a, term);
  }
  return log_a;
}

// log A_alpha for fractional alpha: the two series of Mironov et al. (2019), Sec. 3.3, with the
// generalised binomial coefficient C(alpha, i), which changes sign past alpha: positive and
// negative terms are summed apart in log space and subtracted at the end.
double LogAFractional(double q, double sigma, double alpha) {
  const double z0 = sigma * sigma * std::log(1 / q - 1) + 0.5;
  const double log_half = std::log(0.5);
  double pos = -kInf, neg = -kInf;
  double log_binom = 0;  // log |C(alpha, i)|
  int sign = 1;
  for (int64_t i = 0; i < 100000; ++i) {
    if (i > 0) {
      const double f = alpha - static_cast<double>(i - 1);
      log_binom += std::log(std::fabs(f)) - std::log(static_cast<double>(i));
      if (f < 0) sign = -sign;
    }
    const double id = static_cast<double>(i);
    const double j = alpha - id;
    const double log_t0 = log_binom + id * std::log(q) + j * std::log1p(-q);
    const double log_t1 = log_binom + j * std::log(q) + id * std::log1p(-q);
    const double log_e0 = log_half + LogErfc((id - z0) / (M_SQRT2 * sigma));
    const double log_e1 = log_half + LogErfc((z0 - j) / (M_SQRT2 * sigma));
    const double log_s0 = log_t0 + (id * id - id) / (2 * sigma * sigma) + log_e0;
    const double log_s1 = log_t1 + (j * j - j) / (2 * sigma * sigma) + log_e1;
    const double s = LogAdd(log_s0, log_s1);
    if (sign > 0) {
      pos = LogAdd(pos, s);
    } else {
      neg = LogAdd(neg, s);
    }
    // A_alpha >= 1, so once past alpha (where the terms shrink) e^-30 is far below it.
    if (id > alpha && std::max(log_s0, log_s1) < -30) break;
  }
  return LogSub(pos, neg);
}

}  // namespace

std::vector<double> DefaultRdpOrders() {
  std::vector<double> orders;
  for (int x = 1; x < 100; ++x) orders.push_back(1 + x / 10.0);
  for (int a = 12; a < 64; ++a) orders.push_back(a);
  return orders;
}

double SampledGaussianRdp(double q, double sigma, double alpha) {
  if (q <= 0) return 0;
  if (sigma <= 0 || std::isinf(alpha)) return kInf;
  if (q >= 1) return alpha / (2 * sigma * sigma);
  const double log_a = alpha == std::floor(alpha)
                           ? LogAInteger(q, sigma, static_cast<int64_t>(alpha))
                           : LogAFractional(q, sigma, alpha);
  return log_a / (alpha - 1);
}

PrivacySpent EpsilonFromRdp(const std::vector<double>& orders, const std::vector<double>& rdp,
                            double delta) {
  PrivacySpent best{kInf, 0};
  for (size_t i = 0; i < orders.size() && i < rdp.size(); ++i) {
    const double a = orders[i];
    if (!(a > 1)) continue;
    const double eps =
        rdp[i] - (std::log(delta) + std::log(a)) / (a - 1) + std::log((a - 1) / a);
    if (std::isnan(eps)) continue;
    if (eps < best.epsilon) best = {eps, a};
  }
  if (best.epsilon < 0) best.epsilon = 0;
  return best;
}

RdpAccountant::RdpAccountant(std::vector<double> orders)
    : orders_(std::move(orders)), rdp_(orders_.size(), 0.0) {}

void RdpAccountant::Step(double sigma, double q, int64_t steps) {
  for (size_t i = 0; i < orders_.size(); ++i) {
    rdp_[i] += static_cast<double>(steps) * SampledGaussianRdp(q, sigma, orders_[i]);
  }
}

double EpsilonAfter(double sigma, double q, int64_t steps, double delta) {
  RdpAccountant acc;
  acc.Step(sigma, q, steps);
  return acc.Spent(delta).epsilon;
}

absl::StatusOr<double> NoiseMultiplierForEpsilon(double target_epsilon, double delta, double q,
                                                 int64_t steps, double precision) {
  if (!(target_epsilon > 0) || std::isinf(target_epsilon)) {
    return absl::InvalidArgumentError(
        absl::StrCat("target epsilon must be > 0 and finite, got ", target_epsilon));
  }
  if (!(delta > 0 && delta < 1) || !(q > 0 && q <= 1) || steps <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("noise for a target epsilon needs delta in "
                                                   "(0, 1), q in (0, 1] and steps > 0, got ",
                                                   delta, ", ", q, ", ", steps));
  }
  // The bracket of Opacus's get_noise_multiplier: from 0.01 (less noise is no protection) to
  // 10, doubled until it suffices.
  double low = 0.01, high = 10, eps_high = kInf;
  while (eps_high > target_epsilon) {
    high *= 2;
    eps_high = EpsilonAfter(high, q, steps, delta);
    if (high > 1e6) {
      return absl::InvalidArgumentError(absl::StrCat(
          "no noise multiplier up to 1e6 reaches epsilon ", target_epsilon, " at delta ", delta));
    }
  }
  while (high - low > precision) {
    const double mid = (low + high) / 2;
    if (EpsilonAfter(mid, q, steps, delta) < target_epsilon) {
      high = mid;
    } else {
      low = mid;
    }
  }
  return high;
}

}  // namespace qtrain::federated
