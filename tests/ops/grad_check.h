// Test helpers for the CPU ops: seeded random tensors and central finite differences in
// float64, which every op's backward is checked against.
#ifndef QTRAIN_TESTS_OPS_GRAD_CHECK_H_
#define QTRAIN_TESTS_OPS_GRAD_CHECK_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace qtrain::ops::testing {

inline std::vector<double> RandomVector(int64_t n, uint32_t seed, double lo = -1.0,
                                        double hi = 1.0) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> v(n);
  for (double& x : v) x = dist(gen);
  return v;
}

inline std::vector<int32_t> RandomTokens(int64_t n, int32_t vocab, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int32_t> dist(0, vocab - 1);
  std::vector<int32_t> v(n);
  for (int32_t& x : v) x = dist(gen);
  return v;
}

inline std::vector<float> ToFloat(const std::vector<double>& v) {
  return std::vector<float>(v.begin(), v.end());
}

inline double Dot(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// d loss / d x by central differences; x is perturbed in place and restored exactly.
template <typename LossFn>
std::vector<double> NumericGrad(std::vector<double>& x, LossFn loss, double h = 1e-6) {
  std::vector<double> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double saved = x[i];
    x[i] = saved + h;
    const double up = loss();
    x[i] = saved - h;
    const double down = loss();
    x[i] = saved;
    g[i] = (up - down) / (2 * h);
  }
  return g;
}

// Elementwise |analytic - numeric| <= rtol * max(1, |numeric|), and the gradient is not
// trivially zero (a backward that writes nothing must not pass).
inline void ExpectGradNear(const std::vector<double>& analytic,
                           const std::vector<double>& numeric, const std::string& what,
                           double rtol = 1e-6) {
  ASSERT_EQ(analytic.size(), numeric.size()) << what;
  double max_abs = 0;
  int failures = 0;
  for (size_t i = 0; i < analytic.size(); ++i) {
    max_abs = std::max(max_abs, std::abs(numeric[i]));
    const double tol = rtol * std::max(1.0, std::abs(numeric[i]));
    if (!(std::abs(analytic[i] - numeric[i]) <= tol) && failures++ < 10) {
      ADD_FAILURE() << what << "[" << i << "]: analytic " << analytic[i] << " vs numeric "
                    << numeric[i];
    }
  }
  EXPECT_EQ(failures, 0) << what;
  EXPECT_GT(max_abs, 1e-3) << what << ": gradient is (almost) zero, the check proves nothing";
}

// |a - b| <= atol + rtol * |b| elementwise, for float-vs-double forward agreement.
template <typename A, typename B>
void ExpectAllNear(const std::vector<A>& a, const std::vector<B>& b, double atol, double rtol,
                   const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  int failures = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    const double x = a[i];
    const double y = b[i];
    if (!(std::abs(x - y) <= atol + rtol * std::abs(y)) && failures++ < 10) {
      ADD_FAILURE() << what << "[" << i << "]: " << x << " vs " << y;
    }
  }
  EXPECT_EQ(failures, 0) << what;
}

}  // namespace qtrain::ops::testing

#endif  // QTRAIN_TESTS_OPS_GRAD_CHECK_H_
