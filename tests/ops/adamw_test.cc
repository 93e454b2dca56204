// Tests of the AdamW step against its formula, written out independently here.
#include "ops/adamw.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "tests/ops/grad_check.h"

namespace qtrain::ops {
namespace {

using testing::ExpectAllNear;
using testing::RandomVector;
using testing::ToFloat;

constexpr int kN = 9;
constexpr float kLr = 1e-2f, kB1 = 0.9f, kB2 = 0.95f, kEps = 1e-8f, kWd = 0.1f;

TEST(AdamWTest, FirstStepFromZeroStateMovesByLrTimesSign) {
  // Step 1 from m = v = 0: mhat = g, vhat = g^2, so the Adam part is g / (|g| + eps),
  // about sign(g) whatever the gradient's scale.
  std::vector<double> p = {1.0, -2.0, 0.5}, g = {0.3, -4.0, 1e-3};
  std::vector<double> m(3, 0.0), v(3, 0.0);
  const std::vector<double> p0 = p;
  adamw_update(p.data(), g.data(), m.data(), v.data(), 3, kLr, kB1, kB2, kEps, kWd, 1);
  for (int i = 0; i < 3; ++i) {
    const double adam = g[i] / (std::abs(g[i]) + kEps);
    EXPECT_NEAR(std::abs(adam), 1.0, 1e-5);
    EXPECT_NEAR(p[i], p0[i] - kLr * (adam + kWd * p0[i]), 1e-12) << i;
    EXPECT_NEAR(m[i], (1 - double{kB1}) * g[i], 1e-12) << i;
    EXPECT_NEAR(v[i], (1 - double{kB2}) * g[i] * g[i], 1e-12) << i;
  }
}

TEST(AdamWTest, ThreeStepsMatchTheFormula) {
  std::vector<double> p = RandomVector(kN, 1), m(kN, 0.0), v(kN, 0.0);
  std::vector<double> rp = p, rm = m, rv = v;
  const double b1 = kB1, b2 = kB2, lr = kLr, eps = kEps, wd = kWd;
  for (int t = 1; t <= 3; ++t) {
    const std::vector<double> g = RandomVector(kN, 10 + t);
    adamw_update(p.data(), g.data(), m.data(), v.data(), kN, kLr, kB1, kB2, kEps, kWd, t);
    for (int i = 0; i < kN; ++i) {
      rm[i] = b1 * rm[i] + (1 - b1) * g[i];
      rv[i] = b2 * rv[i] + (1 - b2) * g[i] * g[i];
      const double mhat = rm[i] / (1 - std::pow(b1, t));
      const double vhat = rv[i] / (1 - std::pow(b2, t));
      rp[i] -= lr * (mhat / (std::sqrt(vhat) + eps) + wd * rp[i]);
    }
    ExpectAllNear(m, rm, 1e-15, 1e-13, "m");
    ExpectAllNear(v, rv, 1e-15, 1e-13, "v");
    ExpectAllNear(p, rp, 1e-15, 1e-13, "params");
  }
}

TEST(AdamWTest, ZeroGradientOnlyDecays) {
  std::vector<float> p = {2.f, -3.f}, g = {0.f, 0.f}, m = {0.f, 0.f}, v = {0.f, 0.f};
  adamw_update(p.data(), g.data(), m.data(), v.data(), 2, kLr, kB1, kB2, kEps, kWd, 5);
  EXPECT_FLOAT_EQ(p[0], 2.f * (1 - kLr * kWd));
  EXPECT_FLOAT_EQ(p[1], -3.f * (1 - kLr * kWd));
}

TEST(AdamWTest, FloatMatchesDouble) {
  std::vector<double> p = RandomVector(kN, 2), m = RandomVector(kN, 3, -0.1, 0.1);
  std::vector<double> v = RandomVector(kN, 4, 0.01, 0.1);
  const std::vector<double> g = RandomVector(kN, 5);
  std::vector<float> pf = ToFloat(p), mf = ToFloat(m), vf = ToFloat(v);
  const std::vector<float> gf = ToFloat(g);
  adamw_update(p.data(), g.data(), m.data(), v.data(), kN, kLr, kB1, kB2, kEps, kWd, 7);
  adamw_update(pf.data(), gf.data(), mf.data(), vf.data(), kN, kLr, kB1, kB2, kEps, kWd, 7);
  ExpectAllNear(pf, p, 1e-6, 1e-6, "params");
  ExpectAllNear(mf, m, 1e-7, 1e-6, "m");
  ExpectAllNear(vf, v, 1e-7, 1e-6, "v");
}

}  // namespace
}  // namespace qtrain::ops
