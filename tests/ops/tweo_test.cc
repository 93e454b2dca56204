// Tests of the TWEO outlier loss and activation stats: hand values, gradients against float64
// finite differences (negative values, p = 2, 4, 3.5), accumulate semantics, float vs double,
// thread-count independence.
#include "ops/tweo.h"

#include <omp.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "tests/ops/grad_check.h"

namespace qtrain::ops {
namespace {

using testing::ExpectAllNear;
using testing::ExpectGradNear;
using testing::NumericGrad;
using testing::RandomVector;
using testing::ToFloat;

constexpr int64_t kN = 37;

TEST(TweoTest, ForwardHandComputed) {
  const std::vector<double> a = {3, -6, 0, 1.5};
  // p = 4, tau + eps = 3: (1 + 16 + 0 + 1/16) / 4.
  EXPECT_DOUBLE_EQ(tweo_forward(a.data(), 4, 3.0, 4.0, 0.0), 17.0625 / 4);
  // p = 2: (1 + 4 + 0 + 1/4) / 4.
  EXPECT_DOUBLE_EQ(tweo_forward(a.data(), 4, 3.0, 2.0, 0.0), 5.25 / 4);
  // eps enters the denominator: tau = 2.5, eps = 0.5 is the same as tau = 3.
  EXPECT_DOUBLE_EQ(tweo_forward(a.data(), 4, 2.5, 4.0, 0.5), 17.0625 / 4);
  // Default eps barely moves it.
  EXPECT_NEAR(tweo_forward(a.data(), 4, 3.0, 4.0, 1e-6), 17.0625 / 4, 1e-4);
  EXPECT_EQ(tweo_forward(a.data(), 0, 3.0, 4.0, 1e-6), 0.0);
}

TEST(TweoTest, ForwardFloatAccumulatesInDouble) {
  // One 1e12 term then a thousand 1s: a float accumulator (ulp 65536 there) drops the 1s.
  std::vector<float> a(1001, 1.0f);
  a[0] = 1e3f;
  const double v = tweo_forward(a.data(), 1001, 1.0, 4.0, 0.0);
  EXPECT_NEAR(v * 1001, 1e12 + 1000, 1e-3);
}

TEST(TweoTest, BackwardMatchesFiniteDifferences) {
  const double tau = 3.0, eps = 1e-6, scale = 0.7;
  for (double p : {2.0, 4.0, 3.5}) {
    SCOPED_TRACE(p);
    std::vector<double> a = RandomVector(kN, 1, -6, 6);
    int negatives = 0;
    for (double x : a) negatives += x < 0;
    ASSERT_GT(negatives, 5);
    auto loss = [&] { return scale * tweo_forward(a.data(), kN, tau, p, eps); };
    std::vector<double> da(kN, 0.0);
    tweo_backward(da.data(), a.data(), kN, tau, p, eps, scale);
    ExpectGradNear(da, NumericGrad(a, loss), "da");
  }
}

TEST(TweoTest, BackwardHandComputed) {
  const std::vector<double> a = {3, -3, 0};
  std::vector<double> da = {1, 1, 1};
  // p = 4, tau = 3: scale * (4/3) * 1^3 * sign(a) / 3, added onto 1.
  tweo_backward(da.data(), a.data(), 3, 3.0, 4.0, 0.0, 0.5);
  EXPECT_DOUBLE_EQ(da[0], 1 + 0.5 * 4.0 / 9.0);
  EXPECT_DOUBLE_EQ(da[1], 1 - 0.5 * 4.0 / 9.0);
  EXPECT_DOUBLE_EQ(da[2], 1.0);
}

TEST(TweoTest, BackwardAccumulates) {
  const std::vector<double> a = RandomVector(kN, 2, -5, 5);
  std::vector<double> once(kN, 0.0), twice(kN, 0.0);
  tweo_backward(once.data(), a.data(), kN, 3.0, 4.0, 1e-6, 1.3);
  for (int i = 0; i < 2; ++i) tweo_backward(twice.data(), a.data(), kN, 3.0, 4.0, 1e-6, 1.3);
  for (int64_t i = 0; i < kN; ++i) {
    EXPECT_NE(once[i], 0.0);
    EXPECT_DOUBLE_EQ(twice[i], 2 * once[i]);
  }
}

TEST(TweoTest, FloatMatchesDouble) {
  const std::vector<double> a = RandomVector(kN, 3, -8, 8);
  const std::vector<float> a_f = ToFloat(a);
  const double v = tweo_forward(a.data(), kN, 3.0, 4.0, 1e-6);
  const double v_f = tweo_forward(a_f.data(), kN, 3.0, 4.0, 1e-6);
  EXPECT_NEAR(v_f, v, 1e-6 * v);
  std::vector<double> da(kN, 0.0);
  std::vector<float> da_f(kN, 0.0f);
  tweo_backward(da.data(), a.data(), kN, 3.0, 4.0, 1e-6, 0.01);
  tweo_backward(da_f.data(), a_f.data(), kN, 3.0, 4.0, 1e-6, 0.01);
  ExpectAllNear(da_f, da, 1e-9, 1e-5, "da");
}

TEST(ActivationStatsTest, HandComputed) {
  double peak = -1, kurt = -1;
  // Two-point distribution: kurtosis 1, whatever its location and scale.
  const std::vector<double> two = {2, 4, 2, 4, 4, 2};
  activation_stats(two.data(), 6, &peak, &kurt);
  EXPECT_DOUBLE_EQ(peak, 4.0);
  EXPECT_DOUBLE_EQ(kurt, 1.0);
  // {0, 0, 0, 4}: mean 1, deviations -1,-1,-1,3: Var = 12/4 = 3, E[d^4] = 84/4 = 21.
  const std::vector<double> spike = {0, 0, 0, 4};
  activation_stats(spike.data(), 4, &peak, &kurt);
  EXPECT_DOUBLE_EQ(peak, 4.0);
  EXPECT_DOUBLE_EQ(kurt, 21.0 / 9.0);
  // Peak is on |a|.
  const std::vector<double> neg = {1, -7, 2};
  activation_stats(neg.data(), 3, &peak, &kurt);
  EXPECT_DOUBLE_EQ(peak, 7.0);
}

TEST(ActivationStatsTest, ConstantAndEmpty) {
  double peak = -1, kurt = -1;
  const std::vector<float> c(9, -2.5f);
  activation_stats(c.data(), 9, &peak, &kurt);
  EXPECT_DOUBLE_EQ(peak, 2.5);
  EXPECT_EQ(kurt, 0.0);
  peak = kurt = -1;
  activation_stats(c.data(), 0, &peak, &kurt);
  EXPECT_EQ(peak, 0.0);
  EXPECT_EQ(kurt, 0.0);
}

TEST(ActivationStatsTest, GaussianSampleHasKurtosisThree) {
  std::mt19937 gen(4);
  std::normal_distribution<double> dist(5.0, 2.0);
  const int64_t n = 200001;  // odd, spans many reduction chunks; std error of kurtosis ~0.011
  std::vector<double> a(n);
  for (double& x : a) x = dist(gen);
  double peak = 0, kurt = 0;
  activation_stats(a.data(), n, &peak, &kurt);
  EXPECT_NEAR(kurt, 3.0, 0.06);
  double want_peak = 0;
  for (double x : a) want_peak = std::max(want_peak, std::abs(x));
  EXPECT_EQ(peak, want_peak);
}

TEST(ActivationStatsTest, LargeMeanIsStable) {
  // A one-pass moment formula loses everything here; two passes around the mean do not.
  std::vector<double> a(1001);
  for (size_t i = 0; i < a.size(); ++i) a[i] = 1e8 + (i % 2 == 0 ? 1.0 : -1.0);
  double peak = 0, kurt = 0;
  activation_stats(a.data(), static_cast<int64_t>(a.size()), &peak, &kurt);
  EXPECT_EQ(peak, 1e8 + 1);
  EXPECT_NEAR(kurt, 1.0, 1e-4);  // 501 vs 500 points: not exactly symmetric
}

TEST(TweoTest, SameBitsAcrossThreadCounts) {
  const int64_t n = 3 * 4096 + 77;  // several reduction chunks, a ragged last one
  const std::vector<float> a = ToFloat(RandomVector(n, 5, -9, 9));
  auto run = [&] {
    std::vector<double> r(4);
    r[0] = tweo_forward(a.data(), n, 3.0, 4.0, 1e-6);
    activation_stats(a.data(), n, &r[1], &r[2]);
    std::vector<float> da(n, 0.0f);
    tweo_backward(da.data(), a.data(), n, 3.0, 4.0, 1e-6, 0.01);
    double s = 0;
    for (float g : da) s += g;
    r[3] = s;
    return r;
  };
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const std::vector<double> ref = run();
  for (int threads : {2, 3}) {
    omp_set_num_threads(threads);
    const std::vector<double> got = run();
    EXPECT_EQ(std::memcmp(got.data(), ref.data(), ref.size() * sizeof(double)), 0)
        << threads << " threads";
  }
  omp_set_num_threads(saved);
}

}  // namespace
}  // namespace qtrain::ops
