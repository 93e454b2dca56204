// Tests of the distillation losses (MSE, KL): hand values, stability of the log-softmax,
// gradients against float64 finite differences for both losses, accumulate semantics, float vs
// double, thread-count independence.
#include "ops/distill.h"

#include <omp.h>

#include <cmath>
#include <cstring>
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

constexpr int N = 5, V = 17;

TEST(DistillTest, MseHandComputed) {
  const std::vector<double> s = {1, 2, 3, 5}, t = {0, 2, 3, 3};  // N = 2, V = 2
  // Rows: (1 + 0) / 2 = 0.5 and (0 + 4) / 2 = 2.
  EXPECT_DOUBLE_EQ(distill_forward(s.data(), t.data(), 2, 2, DistillLoss::kMse), 1.25);
  std::vector<double> ds = {1, 1, 1, 1};
  distill_backward(ds.data(), s.data(), t.data(), 2, 2, DistillLoss::kMse, 0.5);
  // 1 + scale * 2 (s - t) / (N V).
  EXPECT_DOUBLE_EQ(ds[0], 1 + 0.5 * 2 * 1 / 4.0);
  EXPECT_DOUBLE_EQ(ds[1], 1.0);
  EXPECT_DOUBLE_EQ(ds[3], 1 + 0.5 * 2 * 2 / 4.0);
}

TEST(DistillTest, KlHandComputed) {
  // Row 0: pt = (3/4, 1/4), ps = (1/2, 1/2). Row 1: identical distributions, KL 0.
  const std::vector<double> s = {0, 0, 1, 2}, t = {std::log(3.0), 0, 1, 2};
  const double kl0 = 0.75 * std::log(1.5) + 0.25 * std::log(0.5);
  EXPECT_NEAR(distill_forward(s.data(), t.data(), 2, 2, DistillLoss::kKl), kl0 / 2, 1e-15);
  std::vector<double> ds(4, 0.0);
  distill_backward(ds.data(), s.data(), t.data(), 2, 2, DistillLoss::kKl, 1.0);
  // (ps - pt) / N.
  EXPECT_NEAR(ds[0], (0.5 - 0.75) / 2, 1e-15);
  EXPECT_NEAR(ds[1], (0.5 - 0.25) / 2, 1e-15);
  EXPECT_NEAR(ds[2], 0.0, 1e-15);
  EXPECT_NEAR(ds[3], 0.0, 1e-15);
}

TEST(DistillTest, KlIsShiftInvariantStableAndNonNegative) {
  std::vector<double> s = RandomVector(N * V, 1, -3, 3);
  std::vector<double> t = RandomVector(N * V, 2, -3, 3);
  const double kl = distill_forward(s.data(), t.data(), N, V, DistillLoss::kKl);
  EXPECT_GT(kl, 0.0);
  EXPECT_NEAR(distill_forward(t.data(), t.data(), N, V, DistillLoss::kKl), 0.0, 1e-15);
  // Per-row shifts of either side (large enough to overflow a naive exp) change nothing.
  for (int n = 0; n < N; ++n) {
    for (int v = 0; v < V; ++v) {
      s[n * V + v] += 1000.0 * (n + 1);
      t[n * V + v] -= 800.0 * n;
    }
  }
  EXPECT_NEAR(distill_forward(s.data(), t.data(), N, V, DistillLoss::kKl), kl, 1e-12);
  std::vector<double> ds(N * V, 0.0);
  distill_backward(ds.data(), s.data(), t.data(), N, V, DistillLoss::kKl, 1.0);
  for (int n = 0; n < N; ++n) {
    double row = 0;
    for (int v = 0; v < V; ++v) {
      ASSERT_TRUE(std::isfinite(ds[n * V + v]));
      row += ds[n * V + v];
    }
    EXPECT_NEAR(row, 0.0, 1e-15);  // ps and pt both sum to 1
  }
}

TEST(DistillTest, KlWithMaskedTeacherLogitsIsFinite) {
  std::vector<double> s = RandomVector(2 * 4, 3), t = RandomVector(2 * 4, 4);
  t[1] = -INFINITY;  // a teacher that rules a token out
  const double kl = distill_forward(s.data(), t.data(), 2, 4, DistillLoss::kKl);
  EXPECT_TRUE(std::isfinite(kl));
  EXPECT_GT(kl, 0.0);
  std::vector<double> ds(2 * 4, 0.0);
  distill_backward(ds.data(), s.data(), t.data(), 2, 4, DistillLoss::kKl, 1.0);
  for (double g : ds) EXPECT_TRUE(std::isfinite(g));
  EXPECT_GT(ds[1], 0.0);  // pushed down: only ps remains
}

TEST(DistillTest, BackwardMatchesFiniteDifferences) {
  const double scale = 0.7;
  for (DistillLoss kind : {DistillLoss::kMse, DistillLoss::kKl}) {
    SCOPED_TRACE(kind == DistillLoss::kMse ? "mse" : "kl");
    std::vector<double> s = RandomVector(N * V, 5, -3, 3);
    const std::vector<double> t = RandomVector(N * V, 6, -3, 3);
    auto loss = [&] { return scale * distill_forward(s.data(), t.data(), N, V, kind); };
    std::vector<double> ds(N * V, 0.0);
    distill_backward(ds.data(), s.data(), t.data(), N, V, kind, scale);
    ExpectGradNear(ds, NumericGrad(s, loss), "dstudent");
  }
}

TEST(DistillTest, BackwardAccumulates) {
  const std::vector<double> s = RandomVector(N * V, 7), t = RandomVector(N * V, 8);
  for (DistillLoss kind : {DistillLoss::kMse, DistillLoss::kKl}) {
    std::vector<double> once(N * V, 0.0), twice(N * V, 0.0);
    distill_backward(once.data(), s.data(), t.data(), N, V, kind, 1.5);
    for (int i = 0; i < 2; ++i) distill_backward(twice.data(), s.data(), t.data(), N, V, kind, 1.5);
    for (int i = 0; i < N * V; ++i) {
      EXPECT_NE(once[i], 0.0);
      EXPECT_DOUBLE_EQ(twice[i], 2 * once[i]);
    }
  }
}

TEST(DistillTest, FloatMatchesDouble) {
  const std::vector<double> s = RandomVector(N * V, 9, -4, 4), t = RandomVector(N * V, 10, -4, 4);
  const std::vector<float> s_f = ToFloat(s), t_f = ToFloat(t);
  for (DistillLoss kind : {DistillLoss::kMse, DistillLoss::kKl}) {
    const double v = distill_forward(s.data(), t.data(), N, V, kind);
    EXPECT_NEAR(distill_forward(s_f.data(), t_f.data(), N, V, kind), v, 1e-6 * v);
    std::vector<double> ds(N * V, 0.0);
    std::vector<float> ds_f(N * V, 0.0f);
    distill_backward(ds.data(), s.data(), t.data(), N, V, kind, 1.0);
    distill_backward(ds_f.data(), s_f.data(), t_f.data(), N, V, kind, 1.0f);
    ExpectAllNear(ds_f, ds, 1e-7, 1e-5, "dstudent");
  }
}

TEST(DistillTest, SameBitsAcrossThreadCounts) {
  const int n = 67, v = 301;
  const std::vector<float> s = ToFloat(RandomVector(n * v, 11, -5, 5));
  const std::vector<float> t = ToFloat(RandomVector(n * v, 12, -5, 5));
  auto run = [&] {
    std::vector<double> r;
    for (DistillLoss kind : {DistillLoss::kMse, DistillLoss::kKl}) {
      r.push_back(distill_forward(s.data(), t.data(), n, v, kind));
      std::vector<float> ds(n * v, 0.0f);
      distill_backward(ds.data(), s.data(), t.data(), n, v, kind, 1.0f);
      r.insert(r.end(), ds.begin(), ds.end());
    }
    return r;
  };
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const std::vector<double> ref = run();
  for (int threads : {2, 3}) {
    omp_set_num_threads(threads);
    const std::vector<double> got = run();
    ASSERT_EQ(got.size(), ref.size());
    EXPECT_EQ(std::memcmp(got.data(), ref.data(), ref.size() * sizeof(double)), 0)
        << threads << " threads";
  }
  omp_set_num_threads(saved);
}

}  // namespace
}  // namespace qtrain::ops
