// DP-SGD on clients: clipping bounds every per-sample gradient and keeps its direction, the
// noise has the promised scale, and the RDP accountant reproduces published values:
//   - Google dp_accounting, rdp_privacy_accountant_test.py (test_compute_rdp_poisson_sampled_
//     gaussian: q = 0.01, sigma = 2.5, 50 steps, RDP at orders 1.5, 2.5, 5, 50, 100 of
//     6.5007e-04, 1.0854e-03, 2.1808e-03, 2.3846e-02, 1.6742e+02 with the signed series of
//     Mironov et al. that Opacus also sums; later versions of that test sum the series' absolute
//     values for fractional orders, an upper bound: 6.70579741e-04 and 1.08548710e-03, with the
//     integer orders unchanged; test_compute_epsilon_delta_pure_dp: constant RDP 1.1 at orders
//     2..32 gives epsilon 1.32783806176 at delta 1e-5);
//   - Opacus, opacus/tests/accountants_test.py (test_rdp_accountant: sigma = 1.5, q = 0.04,
//     90 epochs = 2250 steps, delta 1e-5 gives epsilon 7.32911117143; test_get_noise_multiplier:
//     epsilon 8 over the same schedule needs sigma 1.425307617, its bisection to 0.01 in sigma).
#include <cmath>
#include <limits>
#include <vector>

#include "distributed/federated/dp_sgd.h"
#include "distributed/federated/rdp_accountant.h"
#include "gtest/gtest.h"
#include "trainer/rng.h"

namespace qtrain::federated {
namespace {

TEST(RdpAccountant, SampledGaussianRdpMatchesDpAccounting) {
  const double orders[] = {1.5, 2.5, 5, 50, 100};
  const double want[] = {6.5007e-04, 1.0854e-03, 2.1808e-03, 2.3846e-02, 1.6742e+02};
  // The later absolute-value bound: above ours at fractional orders, equal at integer ones.
  const double bound[] = {6.70579741e-04, 1.08548710e-03, 2.18075656e-03, 2.38460375e-02,
                          1.67416308e02};
  RdpAccountant acc({1.5, 2.5, 5, 50, 100, std::numeric_limits<double>::infinity()});
  acc.Step(2.5, 0.01, 50);
  for (int i = 0; i < 5; ++i) {
    SCOPED_TRACE(orders[i]);
    EXPECT_NEAR(acc.rdp()[i], want[i], 1e-4 * want[i]);
    if (i < 2) {
      EXPECT_LT(acc.rdp()[i], bound[i]);
    } else {
      EXPECT_NEAR(acc.rdp()[i], bound[i], 1e-7 * bound[i]);
    }
  }
  EXPECT_TRUE(std::isinf(acc.rdp()[5]));
}

TEST(RdpAccountant, ConversionMatchesDpAccountingOnPureDp) {
  std::vector<double> orders, rdp;
  for (int a = 2; a <= 32; ++a) {
    orders.push_back(a);
    rdp.push_back(1.1);
  }
  const PrivacySpent p = EpsilonFromRdp(orders, rdp, 1e-5);
  EXPECT_NEAR(p.epsilon, 1.32783806176, 1e-9);
  EXPECT_EQ(p.order, 32);
}

TEST(RdpAccountant, EpsilonMatchesOpacus) {
  RdpAccountant acc;  // Opacus's default orders
  const int64_t steps = static_cast<int64_t>(90 / 0.04);
  ASSERT_EQ(steps, 2250);
  acc.Step(1.5, 0.04, steps);
  EXPECT_NEAR(acc.Spent(1e-5).epsilon, 7.32911117143, 1e-7);
  // Step by step composes to the same (RDP adds up).
  RdpAccountant one_by_one, at_once;
  for (int i = 0; i < 5; ++i) one_by_one.Step(1.5, 0.04);
  at_once.Step(1.5, 0.04, 5);
  for (size_t i = 0; i < at_once.rdp().size(); ++i) {
    EXPECT_NEAR(one_by_one.rdp()[i], at_once.rdp()[i], 1e-12 * at_once.rdp()[i]);
  }
}

TEST(RdpAccountant, NoiseForATargetEpsilonMatchesOpacus) {
  absl::StatusOr<double> sigma = NoiseMultiplierForEpsilon(8, 1e-5, 0.04, 2250);
  ASSERT_TRUE(sigma.ok()) << sigma.status();
  EXPECT_NEAR(*sigma, 1.425307617, 1e-8);
  EXPECT_LE(EpsilonAfter(*sigma, 0.04, 2250, 1e-5), 8.0);
  EXPECT_GT(EpsilonAfter(*sigma - 0.01, 0.04, 2250, 1e-5), 8.0);  // within the precision
  absl::StatusOr<double> fine = NoiseMultiplierForEpsilon(8, 1e-5, 0.04, 2250, 1e-4);
  ASSERT_TRUE(fine.ok());
  EXPECT_NEAR(EpsilonAfter(*fine, 0.04, 2250, 1e-5), 8.0, 2e-3);
  EXPECT_FALSE(NoiseMultiplierForEpsilon(0, 1e-5, 0.04, 10).ok());
  EXPECT_FALSE(NoiseMultiplierForEpsilon(6, 1.5, 0.04, 10).ok());
  EXPECT_FALSE(NoiseMultiplierForEpsilon(6, 1e-5, 0, 10).ok());
}

TEST(RdpAccountant, LimitsAndMonotonicity) {
  // q = 1 is the plain Gaussian mechanism: alpha / (2 sigma^2); q = 0 costs nothing.
  EXPECT_NEAR(SampledGaussianRdp(1.0, 2.0, 3.5), 3.5 / 8, 1e-15);
  EXPECT_EQ(SampledGaussianRdp(0.0, 2.0, 3.5), 0.0);
  EXPECT_TRUE(std::isinf(SampledGaussianRdp(0.1, 0.0, 2)));
  // Integer and fractional orders agree where they meet (the fractional series at 3 +- 1e-9).
  const double at3 = SampledGaussianRdp(0.05, 1.1, 3.0);
  EXPECT_NEAR(SampledGaussianRdp(0.05, 1.1, 3.0 + 1e-9), at3, 1e-6 * at3);
  const double e = EpsilonAfter(1.0, 0.01, 1000, 1e-5);
  EXPECT_LT(EpsilonAfter(2.0, 0.01, 1000, 1e-5), e);   // more noise
  EXPECT_GT(EpsilonAfter(1.0, 0.02, 1000, 1e-5), e);   // larger batches
  EXPECT_GT(EpsilonAfter(1.0, 0.01, 2000, 1e-5), e);   // more steps
  EXPECT_GT(EpsilonAfter(1.0, 0.01, 1000, 1e-7), e);   // smaller delta
}

TEST(DpSgd, ClippingBoundsEveryPerSampleGradientAndKeepsItsDirection) {
  const int S = 40;
  const int64_t n = 37, stride = 50;  // the row holds more than the clipped part
  const float clip = 1.0f;
  Rng rng(1);
  std::vector<float> rows(S * stride);
  for (int s = 0; s < S; ++s) {
    const double scale = std::pow(10.0, -1.5 + 3.0 * s / S);  // norms ~0.2 .. 190
    for (int64_t i = 0; i < stride; ++i) rows[s * stride + i] = rng.Normal() * scale;
  }
  const std::vector<float> before = rows;
  std::vector<double> sum;
  ClipStats st;
  ClipAndAccumulate(rows.data(), S, stride, n, clip, &sum, &st);
  EXPECT_EQ(st.samples, S);
  EXPECT_GT(st.clipped, 0);
  EXPECT_LT(st.clipped, S);
  std::vector<double> want(n, 0.0);
  int clipped = 0;
  for (int s = 0; s < S; ++s) {
    double norm_before = 0, norm_after = 0, dot = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double b = before[s * stride + i], a = rows[s * stride + i];
      norm_before += b * b;
      norm_after += a * a;
      dot += a * b;
      want[i] += a;
    }
    norm_before = std::sqrt(norm_before);
    norm_after = std::sqrt(norm_after);
    EXPECT_LE(norm_after, clip) << "sample " << s;
    if (norm_before <= clip) {
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(rows[s * stride + i], before[s * stride + i]);
    } else {
      ++clipped;
      EXPECT_NEAR(norm_after, clip, 1e-5);
      EXPECT_NEAR(dot / (norm_after * norm_before), 1.0, 1e-6);  // same direction
    }
    // Beyond the first n floats nothing is touched.
    for (int64_t i = n; i < stride; ++i) ASSERT_EQ(rows[s * stride + i], before[s * stride + i]);
  }
  EXPECT_EQ(clipped, st.clipped);
  for (int64_t i = 0; i < n; ++i) EXPECT_NEAR(sum[i], want[i], 1e-9);
}

TEST(DpSgd, NoisyMeanHasStdSigmaClipOverTheExpectedBatch) {
  const int64_t n = 200000;
  std::vector<double> sum(n, 3.0);
  std::vector<float> out(n);
  Rng rng(2);
  NoisyMean(sum, 0.0, 1.0f, 4.0, &rng, out.data());
  for (float v : out) ASSERT_EQ(v, 0.75f);
  NoisyMean(sum, 2.0, 0.5f, 4.0, &rng, out.data());
  double mean = 0, var = 0;
  for (float v : out) mean += v;
  mean /= n;
  for (float v : out) var += (v - mean) * (v - mean);
  const double sd = std::sqrt(var / (n - 1));
  EXPECT_NEAR(mean, 0.75, 0.005);
  EXPECT_NEAR(sd, 2.0 * 0.5 / 4.0, 0.01 * 0.25);
}

}  // namespace
}  // namespace qtrain::federated
