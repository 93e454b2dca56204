// LSQ / LSQ+ reference ops: ranges, reachability of every code, ties, clipping, per-group
// edges, gradients against the formula and against finite differences, init, codes, and
// per-token dynamic quantization.
#include "ops/quant/lsq.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qtrain::ops {
namespace {

using ::testing::HasSubstr;

template <typename F>
std::vector<F> RandomVec(int64_t n, uint32_t seed, double stddev = 1.0) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, stddev);
  std::vector<F> v(n);
  for (auto& x : v) x = static_cast<F>(nd(rng));
  return v;
}

// Scale index of element (r, c), written independently of the library's segment walk.
int64_t ScaleOf(const LsqConfig& cfg, int64_t r, int64_t c, int64_t cols) {
  switch (cfg.granularity) {
    case QuantGranularity::kPerTensor:
      return 0;
    case QuantGranularity::kPerChannel:
      return r;
    case QuantGranularity::kPerGroup:
      return r * ((cols + cfg.group_size - 1) / cfg.group_size) + c / cfg.group_size;
  }
  return -1;
}

int64_t CountOf(const LsqConfig& cfg, int64_t k, int64_t rows, int64_t cols) {
  int64_t n = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) n += ScaleOf(cfg, r, c, cols) == k;
  return n;
}

TEST(QuantRange, SymmetricAndAsymmetric) {
  for (int b = 2; b <= 16; ++b) {
    const QuantRange s = quant_range(b, LsqMode::kSymmetric).value();
    EXPECT_EQ(s.qn, 1 << (b - 1));
    EXPECT_EQ(s.qp, (1 << (b - 1)) - 1);
    const QuantRange a = quant_range(b, LsqMode::kAsymmetric).value();
    EXPECT_EQ(a.qn, 0);
    EXPECT_EQ(a.qp, (1 << b) - 1);
  }
  EXPECT_EQ(quant_range(2, LsqMode::kSymmetric)->lo(), -2);
  EXPECT_EQ(quant_range(2, LsqMode::kSymmetric)->hi(), 1);
  EXPECT_EQ(quant_range(8, LsqMode::kSymmetric)->lo(), -128);
  EXPECT_EQ(quant_range(3, LsqMode::kAsymmetric)->hi(), 7);
  for (int bad : {0, 1, 17, -4}) {
    auto r = quant_range(bad, LsqMode::kSymmetric);
    ASSERT_FALSE(r.ok());
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("bits = " + std::to_string(bad)));
  }
}

TEST(LsqNumScales, Granularities) {
  LsqConfig cfg;
  cfg.granularity = QuantGranularity::kPerTensor;
  EXPECT_EQ(lsq_num_scales(cfg, 5, 7).value(), 1);
  cfg.granularity = QuantGranularity::kPerChannel;
  EXPECT_EQ(lsq_num_scales(cfg, 5, 7).value(), 5);
  cfg.granularity = QuantGranularity::kPerGroup;
  cfg.group_size = 3;
  EXPECT_EQ(lsq_num_scales(cfg, 5, 7).value(), 15);  // groups of 3, 3, 1
  cfg.group_size = 7;
  EXPECT_EQ(lsq_num_scales(cfg, 5, 7).value(), 5);
  cfg.group_size = 100;  // one short group per row
  EXPECT_EQ(lsq_num_scales(cfg, 5, 7).value(), 5);
  cfg.group_size = 0;
  auto bad = lsq_num_scales(cfg, 5, 7);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("group_size = 0"));
  cfg.group_size = 2;
  EXPECT_FALSE(lsq_num_scales(cfg, 0, 7).ok());
  cfg.bits = 1;
  EXPECT_FALSE(lsq_num_scales(cfg, 5, 7).ok());
}

// Every level of every bit width is produced, and nothing outside the range.
TEST(LsqForward, EveryCodeReachable) {
  for (int bits : {2, 3, 4, 8}) {
    for (LsqMode mode : {LsqMode::kSymmetric, LsqMode::kAsymmetric}) {
      LsqConfig cfg;
      cfg.bits = bits;
      cfg.mode = mode;
      cfg.granularity = QuantGranularity::kPerTensor;
      const QuantRange qr = quant_range(bits, mode).value();
      const float s = 0.25f;
      const float beta = mode == LsqMode::kAsymmetric ? -3.0f : 0.0f;
      // A ramp from 3 steps below the lowest level to 3 above the highest, 4 points per step.
      std::vector<float> v;
      for (int i = 4 * (qr.lo() - 3); i <= 4 * (qr.hi() + 3); ++i) v.push_back(beta + i * s / 4);
      const int64_t n = static_cast<int64_t>(v.size());
      std::vector<int32_t> codes(n);
      std::vector<float> q(n);
      const float* bp = mode == LsqMode::kAsymmetric ? &beta : nullptr;
      ASSERT_TRUE(lsq_quantize_codes(codes.data(), v.data(), &s, bp, 1, n, cfg).ok());
      ASSERT_TRUE(lsq_forward(q.data(), v.data(), &s, bp, 1, n, cfg).ok());
      std::set<int32_t> seen(codes.begin(), codes.end());
      EXPECT_EQ(static_cast<int>(seen.size()), qr.hi() - qr.lo() + 1) << bits;
      EXPECT_EQ(*seen.begin(), qr.lo());
      EXPECT_EQ(*seen.rbegin(), qr.hi());
      for (int64_t i = 0; i < n; ++i) {
        const float want = mode == LsqMode::kAsymmetric ? codes[i] * s + beta : codes[i] * s;
        ASSERT_EQ(q[i], want) << i;
      }
    }
  }
}

// std::nearbyint rounds in the current rounding mode, round-to-nearest-even by default: 2.5
// -> 2, -2.5 -> -2. (std::round would go away from zero: 2.5 -> 3.) The op follows nearbyint,
// like the GPU's rintf / cvt.rni.
TEST(LsqForward, TiesRoundHalfToEven) {
  EXPECT_EQ(std::nearbyint(2.5), 2.0);
  EXPECT_EQ(std::nearbyint(-2.5), -2.0);
  EXPECT_EQ(std::nearbyint(3.5), 4.0);
  EXPECT_EQ(std::round(2.5), 3.0);
  LsqConfig cfg;
  cfg.bits = 4;
  cfg.granularity = QuantGranularity::kPerTensor;
  const double s = 0.5;
  const std::vector<double> v = {0.25, 0.75, 1.25, -0.25, -0.75, -1.25, 1.75, 3.25};
  const std::vector<int32_t> want = {0, 2, 2, 0, -2, -2, 4, 6};  // v/s = .5 1.5 2.5 ...
  std::vector<int32_t> codes(v.size());
  ASSERT_TRUE(lsq_quantize_codes(codes.data(), v.data(), &s, nullptr, 1, v.size(), cfg).ok());
  EXPECT_EQ(codes, want);
  // The same for LSQ+: ties of (v - beta) / s.
  cfg.mode = LsqMode::kAsymmetric;
  const double beta = -1.0;
  const std::vector<double> va = {-0.75, -0.25, 0.25};  // x = 0.5, 1.5, 2.5
  std::vector<int32_t> ca(3);
  ASSERT_TRUE(lsq_quantize_codes(ca.data(), va.data(), &s, &beta, 1, 3, cfg).ok());
  EXPECT_EQ(ca, (std::vector<int32_t>{0, 2, 2}));
}

// dv, ds, dbeta at named points: inside, on each bound, beyond each bound; += semantics.
TEST(LsqBackward, ClipGradientsSymmetric) {
  LsqConfig cfg;
  cfg.bits = 3;  // levels -4..3
  cfg.granularity = QuantGranularity::kPerTensor;
  cfg.grad_scale = LsqGradScale::kNone;
  const double s = 1.0;
  const std::vector<double> v = {-5.0, -4.0, -3.7, 0.3, 2.6, 3.0, 9.0};
  const std::vector<double> dout = {1, 10, 100, 1000, 10000, 100000, 1000000};
  std::vector<double> dv(v.size(), 0.5);
  double ds = 0.25;
  ASSERT_TRUE(
      lsq_backward(dv.data(), &ds, nullptr, dout.data(), v.data(), &s, nullptr, 1, v.size(), cfg)
          .ok());
  // Bounds count as clipped (x <= -Qn, x >= Qp).
  EXPECT_EQ(dv, (std::vector<double>{0.5, 0.5, 100.5, 1000.5, 10000.5, 0.5, 0.5}));
  const double want_ds = 0.25 + 1 * -4 + 10 * -4 + 100 * (-4 - -3.7) + 1000 * (0 - 0.3) +
                         10000 * (3 - 2.6) + 100000 * 3 + 1000000 * 3;
  EXPECT_NEAR(ds, want_ds, 1e-9);
  // With g: the same sum times 1/sqrt(N * Qp).
  cfg.grad_scale = LsqGradScale::kLsq;
  double ds_g = 0.0;
  ASSERT_TRUE(
      lsq_backward(nullptr, &ds_g, nullptr, dout.data(), v.data(), &s, nullptr, 1, v.size(), cfg)
          .ok());
  EXPECT_NEAR(ds_g, (want_ds - 0.25) / std::sqrt(7.0 * 3.0), 1e-9);
  cfg.grad_scale_count = 2;
  double ds_n = 0.0;
  ASSERT_TRUE(
      lsq_backward(nullptr, &ds_n, nullptr, dout.data(), v.data(), &s, nullptr, 1, v.size(), cfg)
          .ok());
  EXPECT_NEAR(ds_n, (want_ds - 0.25) / std::sqrt(2.0 * 3.0), 1e-9);
}

TEST(LsqBackward, ZeroPointAsymmetric) {
  LsqConfig cfg;
  cfg.bits = 2;  // levels 0..3
  cfg.mode = LsqMode::kAsymmetric;
  cfg.granularity = QuantGranularity::kPerTensor;
  cfg.grad_scale = LsqGradScale::kNone;
  const double s = 0.5, beta = -1.0;
  // x = (v + 1) / 0.5 = -1, 0, 0.8, 2.2, 3, 5
  const std::vector<double> v = {-1.5, -1.0, -0.6, 0.1, 0.5, 1.5};
  const std::vector<double> dout = {1, 10, 100, 1000, 10000, 100000};
  std::vector<double> q(v.size());
  ASSERT_TRUE(lsq_forward(q.data(), v.data(), &s, &beta, 1, v.size(), cfg).ok());
  EXPECT_EQ(q, (std::vector<double>{-1.0, -1.0, -0.5, 0.0, 0.5, 0.5}));
  std::vector<double> dv(v.size(), 0.0);
  double ds = 0.0, db = 1.0;
  ASSERT_TRUE(
      lsq_backward(dv.data(), &ds, &db, dout.data(), v.data(), &s, &beta, 1, v.size(), cfg).ok());
  EXPECT_EQ(dv, (std::vector<double>{0, 0, 100, 1000, 0, 0}));
  // Clipped low contributes -Qn = 0 to ds; clipped high Qp = 3.
  EXPECT_NEAR(ds, 100 * (1 - 0.8) + 1000 * (2 - 2.2) + 10000 * 3 + 100000 * 3, 1e-9);
  // dq/dbeta = 1 where clipped, 0 inside under the STE.
  EXPECT_EQ(db, 1.0 + 1 + 10 + 10000 + 100000);
  // LSQ+ scales dbeta by the same g.
  cfg.grad_scale = LsqGradScale::kLsq;
  double db_g = 0.0;
  ASSERT_TRUE(
      lsq_backward(nullptr, nullptr, &db_g, dout.data(), v.data(), &s, &beta, 1, v.size(), cfg)
          .ok());
  EXPECT_NEAR(db_g, (1 + 10 + 10000 + 100000) / std::sqrt(6.0 * 3.0), 1e-9);
}

// The formula written out per element in the test, over every granularity and mode, in
// float and double: dv exactly, ds/dbeta to rounding.
template <typename F>
void CheckBackwardAgainstFormula(const LsqConfig& cfg, int64_t rows, int64_t cols) {
  const bool asym = cfg.mode == LsqMode::kAsymmetric;
  const QuantRange qr = quant_range(cfg.bits, cfg.mode).value();
  const int64_t S = lsq_num_scales(cfg, rows, cols).value();
  const auto v = RandomVec<F>(rows * cols, 11);
  const auto dout = RandomVec<F>(rows * cols, 12);
  std::vector<F> s(S), beta(S);
  std::mt19937 rng(13);
  std::uniform_real_distribution<double> us(0.05, 0.4), ub(-0.5, 0.0);
  for (int64_t k = 0; k < S; ++k) {
    s[k] = static_cast<F>(us(rng));
    beta[k] = static_cast<F>(asym ? ub(rng) : 0.0);
  }
  const F* bp = asym ? beta.data() : nullptr;
  std::vector<F> dv(rows * cols, F(0.5)), ds(S, F(1)), db(S, F(2));
  ASSERT_TRUE(lsq_backward(dv.data(), ds.data(), asym ? db.data() : nullptr, dout.data(), v.data(),
                           s.data(), bp, rows, cols, cfg)
                  .ok());
  std::vector<double> want_ds(S, 0.0), want_db(S, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t i = r * cols + c, k = ScaleOf(cfg, r, c, cols);
      const F x = asym ? (v[i] - beta[k]) / s[k] : v[i] / s[k];
      if (x <= qr.lo()) {
        want_ds[k] += dout[i] * double(qr.lo());
        want_db[k] += dout[i];
        EXPECT_EQ(dv[i], F(0.5));
      } else if (x >= qr.hi()) {
        want_ds[k] += dout[i] * double(qr.hi());
        want_db[k] += dout[i];
        EXPECT_EQ(dv[i], F(0.5));
      } else {
        want_ds[k] += dout[i] * double(std::nearbyint(x) - x);
        EXPECT_EQ(dv[i], F(0.5) + dout[i]);
      }
    }
  }
  const double tol = std::is_same<F, float>::value ? 1e-5 : 1e-12;
  for (int64_t k = 0; k < S; ++k) {
    const double g = 1.0 / std::sqrt(double(CountOf(cfg, k, rows, cols)) * qr.qp);
    EXPECT_NEAR(ds[k], 1.0 + want_ds[k] * g, tol * (1 + std::fabs(want_ds[k] * g))) << k;
    if (asym) {
      EXPECT_NEAR(db[k], 2.0 + want_db[k] * g, tol * (1 + std::fabs(want_db[k] * g))) << k;
    }
  }
}

std::vector<LsqConfig> AllConfigs() {
  std::vector<LsqConfig> out;
  for (int bits : {2, 3, 4, 8}) {
    for (LsqMode mode : {LsqMode::kSymmetric, LsqMode::kAsymmetric}) {
      for (QuantGranularity g : {QuantGranularity::kPerTensor, QuantGranularity::kPerChannel,
                                 QuantGranularity::kPerGroup}) {
        LsqConfig cfg;
        cfg.bits = bits;
        cfg.mode = mode;
        cfg.granularity = g;
        cfg.group_size = 4;  // with 13 columns: groups of 4, 4, 4, 1
        out.push_back(cfg);
      }
    }
  }
  return out;
}

TEST(LsqBackward, MatchesFormulaEveryConfig) {
  for (const LsqConfig& cfg : AllConfigs()) {
    SCOPED_TRACE(testing::Message() << "bits " << cfg.bits << " mode " << int(cfg.mode) << " gran "
                                    << int(cfg.granularity));
    CheckBackwardAgainstFormula<float>(cfg, 5, 13);
    CheckBackwardAgainstFormula<double>(cfg, 5, 13);
  }
}

// Loss = sum dout * q over a (rows, cols) tensor, evaluated in double.
double Loss(const std::vector<double>& v, const std::vector<double>& s,
            const std::vector<double>& beta, const std::vector<double>& dout, int64_t rows,
            int64_t cols, const LsqConfig& cfg) {
  std::vector<double> q(v.size());
  const bool asym = cfg.mode == LsqMode::kAsymmetric;
  EXPECT_TRUE(
      lsq_forward(q.data(), v.data(), s.data(), asym ? beta.data() : nullptr, rows, cols, cfg)
          .ok());
  double l = 0;
  for (size_t i = 0; i < q.size(); ++i) l += dout[i] * q[i];
  return l;
}

// Values whose x = (v - beta) / s sits at least 0.1 away from every rounding boundary and
// from both clip bounds, so that small perturbations of v, s, beta keep every code.
std::vector<double> SafeValues(const LsqConfig& cfg, const std::vector<double>& s,
                               const std::vector<double>& beta, int64_t rows, int64_t cols,
                               uint32_t seed, bool clipped_only) {
  const QuantRange qr = quant_range(cfg.bits, cfg.mode).value();
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> level(qr.lo(), qr.hi());
  std::uniform_real_distribution<double> frac(-0.4, 0.4), beyond(0.1, 3.0), coin(0, 1);
  std::vector<double> v(rows * cols);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t k = ScaleOf(cfg, r, c, cols);
      double x;
      const double u = coin(rng);
      if (clipped_only || u < 0.3) {
        x = u < (clipped_only ? 0.5 : 0.15) ? qr.lo() - beyond(rng) : qr.hi() + beyond(rng);
      } else {
        int l = level(rng);
        double f = frac(rng);
        // keep inside-points strictly inside the clip bounds by 0.1
        if (l == qr.lo() && f < 0.1) f = 0.1 + (0.4 - 0.1) * coin(rng);
        if (l == qr.hi() && f > -0.1) f = -0.1 - (0.4 - 0.1) * coin(rng);
        x = l + f;
      }
      v[r * cols + c] = x * s[k] + beta[k];
    }
  }
  return v;
}

// Finite differences in double, where the loss is differentiable (codes unchanged):
// (1) The true loss. Clipped elements have q = bound * s + beta, whose derivatives the STE
//     reproduces exactly (ds: bound, dbeta: 1, dv: 0). Inside elements have q = code * s +
//     beta, true derivatives ds: code, dbeta: 1, dv: 0; the STE instead passes gradient
//     through the rounding, giving code - x, 0 and 1. So STE == FD - (the pass-through terms)
//     and, on a tensor where everything is clipped, STE == FD exactly.
// (2) The STE surrogate q~ = s * (code0 + x - x0) + beta inside (code0, x0 frozen at the
//     evaluation point; the rounding's derivative taken as 1): its FD must equal dv, ds and
//     dbeta everywhere, which checks the chain rule through (v - beta) / s.
TEST(LsqBackward, FiniteDifferences) {
  const int64_t rows = 3, cols = 7;
  for (LsqConfig cfg : AllConfigs()) {
    cfg.group_size = 3;  // 3, 3, 1
    cfg.grad_scale = LsqGradScale::kNone;
    SCOPED_TRACE(testing::Message() << "bits " << cfg.bits << " mode " << int(cfg.mode) << " gran "
                                    << int(cfg.granularity));
    const bool asym = cfg.mode == LsqMode::kAsymmetric;
    const QuantRange qr = quant_range(cfg.bits, cfg.mode).value();
    const int64_t S = lsq_num_scales(cfg, rows, cols).value();
    std::vector<double> s(S), beta(S, 0.0);
    for (int64_t k = 0; k < S; ++k) {
      s[k] = 0.1 + 0.05 * k;
      if (asym) beta[k] = -0.3 + 0.07 * k;
    }
    const auto dout = RandomVec<double>(rows * cols, 21);
    for (bool clipped_only : {false, true}) {
      const auto v = SafeValues(cfg, s, beta, rows, cols, 22, clipped_only);
      std::vector<double> dv(v.size(), 0.0), ds(S, 0.0), db(S, 0.0);
      ASSERT_TRUE(lsq_backward(dv.data(), ds.data(), asym ? db.data() : nullptr, dout.data(),
                               v.data(), s.data(), asym ? beta.data() : nullptr, rows, cols, cfg)
                      .ok());
      // Pass-through terms of the STE, per scale.
      std::vector<double> inside_x(S, 0.0), inside_dout(S, 0.0);
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t i = r * cols + c, k = ScaleOf(cfg, r, c, cols);
          const double x = (v[i] - beta[k]) / s[k];
          if (x > qr.lo() && x < qr.hi()) {
            inside_x[k] += dout[i] * x;
            inside_dout[k] += dout[i];
          } else {
            EXPECT_EQ(dv[i], 0.0);
          }
        }
      }
      // q is linear in v, s, beta while the codes hold, so central differences are exact up
      // to roundoff; h is small enough that no x moves by more than ~0.03.
      const double h = 1e-5;
      for (int64_t k = 0; k < S; ++k) {
        auto sp = s, sm = s;
        sp[k] += h;
        sm[k] -= h;
        const double fd_s =
            (Loss(v, sp, beta, dout, rows, cols, cfg) - Loss(v, sm, beta, dout, rows, cols, cfg)) /
            (2 * h);
        EXPECT_NEAR(ds[k], fd_s - inside_x[k], 1e-6) << "ds " << k;
        if (clipped_only) {
          EXPECT_NEAR(ds[k], fd_s, 1e-6) << "ds " << k;
        }
        if (asym) {
          auto bp = beta, bm = beta;
          bp[k] += h;
          bm[k] -= h;
          const double fd_b =
              (Loss(v, s, bp, dout, rows, cols, cfg) - Loss(v, s, bm, dout, rows, cols, cfg)) /
              (2 * h);
          EXPECT_NEAR(db[k], fd_b - inside_dout[k], 1e-6) << "dbeta " << k;
          if (clipped_only) {
            EXPECT_NEAR(db[k], fd_b, 1e-6) << "dbeta " << k;
          }
        }
      }

      // (2) The surrogate.
      std::vector<double> code0(v.size()), x0(v.size());
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t c = 0; c < cols; ++c) {
          const int64_t i = r * cols + c, k = ScaleOf(cfg, r, c, cols);
          x0[i] = (v[i] - beta[k]) / s[k];
          code0[i] = std::min<double>(qr.hi(), std::max<double>(qr.lo(), std::nearbyint(x0[i])));
        }
      }
      auto surrogate = [&](const std::vector<double>& vv, const std::vector<double>& ss,
                           const std::vector<double>& bb) {
        double l = 0;
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t c = 0; c < cols; ++c) {
            const int64_t i = r * cols + c, k = ScaleOf(cfg, r, c, cols);
            const double x = (vv[i] - bb[k]) / ss[k];
            const bool inside = x0[i] > qr.lo() && x0[i] < qr.hi();
            const double q =
                inside ? ss[k] * (code0[i] + x - x0[i]) + bb[k] : ss[k] * code0[i] + bb[k];
            l += dout[i] * q;
          }
        }
        return l;
      };
      for (size_t i = 0; i < v.size(); ++i) {
        auto vp = v, vm = v;
        vp[i] += h;
        vm[i] -= h;
        const double fd = (surrogate(vp, s, beta) - surrogate(vm, s, beta)) / (2 * h);
        EXPECT_NEAR(dv[i], fd, 1e-6) << "dv " << i;
      }
      for (int64_t k = 0; k < S; ++k) {
        auto sp = s, sm = s;
        sp[k] += h;
        sm[k] -= h;
        EXPECT_NEAR(ds[k], (surrogate(v, sp, beta) - surrogate(v, sm, beta)) / (2 * h), 1e-6);
        if (asym) {
          auto bp = beta, bm = beta;
          bp[k] += h;
          bm[k] -= h;
          EXPECT_NEAR(db[k], (surrogate(v, s, bp) - surrogate(v, s, bm)) / (2 * h), 1e-6);
        }
      }
    }
  }
}

// C not a multiple of G: the last group of each row is shorter, has its own scale, and its
// N (for g and for init) counts only its own elements.
TEST(LsqPerGroup, ShortLastGroup) {
  LsqConfig cfg;
  cfg.bits = 4;
  cfg.granularity = QuantGranularity::kPerGroup;
  cfg.group_size = 4;
  const int64_t rows = 2, cols = 10;  // groups: [0,4) [4,8) [8,10)
  ASSERT_EQ(lsq_num_scales(cfg, rows, cols).value(), 6);
  std::vector<double> s = {1, 2, 4, 8, 16, 32};
  std::vector<double> v(rows * cols, 3.0);  // every element 3.0
  std::vector<double> q(v.size());
  ASSERT_TRUE(lsq_forward(q.data(), v.data(), s.data(), nullptr, rows, cols, cfg).ok());
  // row 0: 3/1 -> 3, 3/2 = 1.5 -> 2 -> 4, 3/4 = .75 -> 1 -> 4; row 1: 3/8 -> 0, 3/16 -> 0, 0.
  const std::vector<double> want = {3, 3, 3, 3, 4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
  EXPECT_EQ(q, want);
  // g of the short groups uses N = 2.
  std::vector<double> dout(v.size(), 1.0), ds(6, 0.0);
  ASSERT_TRUE(lsq_backward(nullptr, ds.data(), nullptr, dout.data(), v.data(), s.data(), nullptr,
                           rows, cols, cfg)
                  .ok());
  const double qp = 7;
  EXPECT_NEAR(ds[0], 4 * (3 - 3.0) / std::sqrt(4 * qp), 1e-12);
  EXPECT_NEAR(ds[1], 4 * (2 - 1.5) / std::sqrt(4 * qp), 1e-12);
  EXPECT_NEAR(ds[2], 2 * (1 - 0.75) / std::sqrt(2 * qp), 1e-12);
  EXPECT_NEAR(ds[5], 2 * (0 - 3.0 / 32) / std::sqrt(2 * qp), 1e-12);
  // init: mean |v| over the 2 elements of the short group.
  std::vector<double> w = {1, 1, 1, 1, 2, 2, 2, 2, 10, 30, -1, -1, -1, -1, 0, 0, 0, 0, 5, -5};
  std::vector<double> s0(6);
  ASSERT_TRUE(lsq_init(s0.data(), nullptr, w.data(), rows, cols, cfg).ok());
  const double k = 2.0 / std::sqrt(qp);
  EXPECT_DOUBLE_EQ(s0[0], k * 1);
  EXPECT_DOUBLE_EQ(s0[1], k * 2);
  EXPECT_DOUBLE_EQ(s0[2], k * 20);
  EXPECT_DOUBLE_EQ(s0[3], k * 1);
  EXPECT_EQ(s0[4], 1.0);  // all-zero group
  EXPECT_DOUBLE_EQ(s0[5], k * 5);
  // A group size larger than the row: one short group per row.
  cfg.group_size = 64;
  ASSERT_EQ(lsq_num_scales(cfg, rows, cols).value(), 2);
  std::vector<double> s1(2);
  ASSERT_TRUE(lsq_init(s1.data(), nullptr, w.data(), rows, cols, cfg).ok());
  EXPECT_DOUBLE_EQ(s1[0], k * (4 + 8 + 40) / 10.0);
  EXPECT_DOUBLE_EQ(s1[1], k * (4 + 10) / 10.0);
}

TEST(LsqInit, FormulasSymmetricAndAsymmetric) {
  const int64_t rows = 3, cols = 50;
  const auto v = RandomVec<float>(rows * cols, 31, 0.02);
  for (int bits : {2, 3, 4, 8}) {
    LsqConfig cfg;
    cfg.bits = bits;
    const double qp = quant_range(bits, LsqMode::kSymmetric)->qp;
    std::vector<float> s(rows);
    ASSERT_TRUE(lsq_init(s.data(), nullptr, v.data(), rows, cols, cfg).ok());
    for (int64_t r = 0; r < rows; ++r) {
      double sum = 0;
      for (int64_t c = 0; c < cols; ++c) sum += std::fabs(double(v[r * cols + c]));
      EXPECT_EQ(s[r], static_cast<float>(2.0 * (sum / cols) / std::sqrt(qp))) << bits;
    }
    cfg.mode = LsqMode::kAsymmetric;
    const double qpa = quant_range(bits, LsqMode::kAsymmetric)->qp;
    std::vector<float> sa(rows), ba(rows);
    ASSERT_TRUE(lsq_init(sa.data(), ba.data(), v.data(), rows, cols, cfg).ok());
    for (int64_t r = 0; r < rows; ++r) {
      float lo = v[r * cols], hi = v[r * cols];
      for (int64_t c = 0; c < cols; ++c) {
        lo = std::min(lo, v[r * cols + c]);
        hi = std::max(hi, v[r * cols + c]);
      }
      EXPECT_EQ(ba[r], lo);
      EXPECT_EQ(sa[r], static_cast<float>((double(hi) - double(lo)) / qpa));
      // The min/max init covers the group without clipping: the ends are exact levels.
      std::vector<float> q(cols);
      ASSERT_TRUE(lsq_forward(q.data(), v.data() + r * cols, &sa[r], &ba[r], 1, cols, cfg).ok());
      for (int64_t c = 0; c < cols; ++c)
        EXPECT_LE(std::fabs(q[c] - v[r * cols + c]), 0.5f * sa[r] * 1.0001f);
    }
  }
}

double SquaredError(const std::vector<double>& v, double s, const double* beta,
                    const LsqConfig& cfg) {
  std::vector<double> q(v.size());
  EXPECT_TRUE(lsq_forward(q.data(), v.data(), &s, beta, 1, v.size(), cfg).ok());
  double e = 0;
  for (size_t i = 0; i < v.size(); ++i) e += (q[i] - v[i]) * (q[i] - v[i]);
  return e;
}

TEST(LsqInit, MseSearchPicksBestGridPoint) {
  // Gaussian body plus one outlier: clipping the outlier pays off at low bit widths.
  auto v = RandomVec<double>(256, 41);
  v[17] = 12.0;
  double amax = 0;
  for (double x : v) amax = std::max(amax, std::fabs(x));
  for (int bits : {2, 3, 4}) {
    LsqConfig cfg;
    cfg.bits = bits;
    cfg.granularity = QuantGranularity::kPerTensor;
    LsqInitOptions opt;
    opt.method = LsqInit::kMseSearch;
    double s = 0;
    ASSERT_TRUE(lsq_init(&s, nullptr, v.data(), 1, 256, cfg, opt).ok());
    const double qp = quant_range(bits, LsqMode::kSymmetric)->qp;
    const double got_err = SquaredError(v, s, nullptr, cfg);
    bool on_grid = false;
    for (int a = 0; a < 71; ++a) {
      const double alpha = 0.3 + 0.7 * a / 70.0;
      const double cand = alpha * amax / qp;
      on_grid |= cand == s;
      EXPECT_LE(got_err, SquaredError(v, cand, nullptr, cfg)) << "alpha " << alpha;
    }
    EXPECT_TRUE(on_grid) << s;
    // From 3 bits on, clipping the outlier pays; at 2 bits (levels -2s..s) the outlier's
    // error outweighs rounding the body to zero, and alpha = 1 wins.
    if (bits >= 3) {
      EXPECT_LT(s, amax / qp) << bits;
    }
  }
  // Asymmetric: same property over the centred grid.
  LsqConfig cfg;
  cfg.bits = 3;
  cfg.mode = LsqMode::kAsymmetric;
  cfg.granularity = QuantGranularity::kPerTensor;
  LsqInitOptions opt;
  opt.method = LsqInit::kMseSearch;
  double s = 0, b = 0;
  ASSERT_TRUE(lsq_init(&s, &b, v.data(), 1, 256, cfg, opt).ok());
  double lo = v[0], hi = v[0];
  for (double x : v) lo = std::min(lo, x), hi = std::max(hi, x);
  const double err = SquaredError(v, s, &b, cfg);
  for (int a = 0; a < 71; ++a) {
    const double alpha = 0.3 + 0.7 * a / 70.0;
    const double cs = alpha * (hi - lo) / 7, cb = lo + (1 - alpha) * (hi - lo) / 2;
    EXPECT_LE(err, SquaredError(v, cs, &cb, cfg));
  }
  // Degenerate groups and bad options.
  const std::vector<double> zeros(8, 0.0);
  double sz = 0;
  cfg.mode = LsqMode::kSymmetric;
  ASSERT_TRUE(lsq_init(&sz, nullptr, zeros.data(), 1, 8, cfg, opt).ok());
  EXPECT_EQ(sz, 1.0);
  opt.grid_points = 0;
  EXPECT_FALSE(lsq_init(&sz, nullptr, zeros.data(), 1, 8, cfg, opt).ok());
}

TEST(LsqCodes, DequantizeEqualsForwardBitForBit) {
  for (const LsqConfig& cfg : AllConfigs()) {
    const int64_t rows = 4, cols = 13;
    const bool asym = cfg.mode == LsqMode::kAsymmetric;
    const int64_t S = lsq_num_scales(cfg, rows, cols).value();
    const auto v = RandomVec<float>(rows * cols, 51);
    std::vector<float> s(S), beta(S);
    ASSERT_TRUE(lsq_init(s.data(), asym ? beta.data() : nullptr, v.data(), rows, cols, cfg).ok());
    const float* bp = asym ? beta.data() : nullptr;
    std::vector<int32_t> codes(v.size());
    std::vector<float> q(v.size()), dq(v.size());
    ASSERT_TRUE(lsq_quantize_codes(codes.data(), v.data(), s.data(), bp, rows, cols, cfg).ok());
    ASSERT_TRUE(lsq_forward(q.data(), v.data(), s.data(), bp, rows, cols, cfg).ok());
    ASSERT_TRUE(lsq_dequantize(dq.data(), codes.data(), s.data(), bp, rows, cols, cfg).ok());
    const QuantRange qr = quant_range(cfg.bits, cfg.mode).value();
    for (size_t i = 0; i < v.size(); ++i) {
      ASSERT_EQ(q[i], dq[i]) << i;
      ASSERT_GE(codes[i], qr.lo());
      ASSERT_LE(codes[i], qr.hi());
    }
    // In place forward.
    std::vector<float> w = v;
    ASSERT_TRUE(lsq_forward(w.data(), w.data(), s.data(), bp, rows, cols, cfg).ok());
    EXPECT_EQ(w, q);
  }
}

TEST(LsqValidation, NamesTheBadArgument) {
  LsqConfig cfg;
  cfg.granularity = QuantGranularity::kPerChannel;
  const std::vector<float> v(6, 1.0f);
  std::vector<float> out(6);
  const std::vector<float> s = {0.1f, -0.2f};
  auto st = lsq_forward(out.data(), v.data(), s.data(), nullptr, 2, 3, cfg);
  ASSERT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(st.message()), HasSubstr("s[1] = -0.2"));
  const std::vector<float> good = {0.1f, 0.2f};
  const std::vector<float> beta = {0.0f, 0.0f};
  st = lsq_forward(out.data(), v.data(), good.data(), beta.data(), 2, 3, cfg);
  EXPECT_THAT(std::string(st.message()), HasSubstr("beta must be null"));
  cfg.mode = LsqMode::kAsymmetric;
  st = lsq_forward(out.data(), v.data(), good.data(), nullptr, 2, 3, cfg);
  EXPECT_THAT(std::string(st.message()), HasSubstr("beta is null"));
  const std::vector<float> nan_beta = {0.0f, NAN};
  st = lsq_forward(out.data(), v.data(), good.data(), nan_beta.data(), 2, 3, cfg);
  EXPECT_THAT(std::string(st.message()), HasSubstr("beta[1]"));
  cfg.mode = LsqMode::kSymmetric;
  std::vector<int32_t> codes = {0, 1, 2, 7, -8, 8};
  st = lsq_dequantize(out.data(), codes.data(), good.data(), nullptr, 2, 3, cfg);
  EXPECT_THAT(std::string(st.message()), HasSubstr("code[1, 2] = 8 outside [-8, 7]"));
  std::vector<float> with_nan = {1, 2, NAN, 4, 5, 6};
  st = lsq_quantize_codes(codes.data(), with_nan.data(), good.data(), nullptr, 2, 3, cfg);
  EXPECT_THAT(std::string(st.message()), HasSubstr("v[0, 2] is NaN"));
  // A NaN input passes through the forward as NaN.
  ASSERT_TRUE(lsq_forward(out.data(), with_nan.data(), good.data(), nullptr, 2, 3, cfg).ok());
  EXPECT_TRUE(std::isnan(out[2]));
  EXPECT_FALSE(lsq_forward(out.data(), v.data(), good.data(), nullptr, 0, 3, cfg).ok());
}

TEST(PerToken, ScalesCodesAndStraightThrough) {
  const int64_t N = 4, C = 9;
  for (int bits : {4, 8}) {
    auto x = RandomVec<float>(N * C, 61 + bits);
    for (int64_t c = 0; c < C; ++c) x[2 * C + c] = 0.0f;  // an all-zero row
    const float qp = static_cast<float>((1 << (bits - 1)) - 1);
    std::vector<float> out(N * C), scales(N);
    ASSERT_TRUE(per_token_quant_forward(out.data(), scales.data(), x.data(), N, C, bits).ok());
    std::vector<int32_t> codes(N * C);
    std::vector<float> sc2(N);
    ASSERT_TRUE(per_token_quantize_codes(codes.data(), sc2.data(), x.data(), N, C, bits).ok());
    EXPECT_EQ(scales, sc2);
    for (int64_t n = 0; n < N; ++n) {
      float am = 0;
      int64_t arg = 0;
      for (int64_t c = 0; c < C; ++c) {
        if (std::fabs(x[n * C + c]) > am) am = std::fabs(x[n * C + c]), arg = c;
      }
      EXPECT_EQ(scales[n], am == 0 ? 1.0f : am / qp);
      if (am > 0) {
        EXPECT_EQ(std::abs(codes[n * C + arg]), static_cast<int>(qp));
      }
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = n * C + c;
        const float want = std::nearbyint(x[i] / scales[n]) * scales[n];
        EXPECT_EQ(out[i], want);
        EXPECT_EQ(out[i], codes[i] * scales[n]);
        EXPECT_LE(std::fabs(out[i] - x[i]), 0.5f * scales[n] * 1.0001f);
      }
    }
    // Dequantize through lsq_dequantize (per-channel, symmetric) gives the forward exactly.
    LsqConfig cfg;
    cfg.bits = bits;
    std::vector<float> dq(N * C);
    ASSERT_TRUE(lsq_dequantize(dq.data(), codes.data(), scales.data(), nullptr, N, C, cfg).ok());
    EXPECT_EQ(dq, out);
  }
  std::vector<double> dinp = {1, 2, 3}, dout = {0.5, -1, 4};
  per_token_quant_backward(dinp.data(), dout.data(), 3);
  EXPECT_EQ(dinp, (std::vector<double>{1.5, 1, 7}));
  // A row with inf: NaN outputs from the forward, an error from the codes.
  std::vector<double> bad = {1, INFINITY, 2, 3, 4, 5};
  std::vector<double> o(6), sc(2);
  ASSERT_TRUE(per_token_quant_forward(o.data(), sc.data(), bad.data(), 2, 3, 8).ok());
  EXPECT_TRUE(std::isnan(o[0]) && std::isnan(o[1]) && std::isnan(o[2]));
  EXPECT_EQ(o[5], 5.0 / 127 * 127);
  std::vector<int32_t> cc(6);
  auto st = per_token_quantize_codes(cc.data(), sc.data(), bad.data(), 2, 3, 8);
  EXPECT_THAT(std::string(st.message()), HasSubstr("row 0"));
  EXPECT_FALSE(per_token_quant_forward(o.data(), sc.data(), bad.data(), 2, 3, 1).ok());
}

}  // namespace
}  // namespace qtrain::ops
