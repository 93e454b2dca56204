// GPU parity of Phi on cuBLAS/cuSOLVER (ops/cuda/lowrank_cuda.h) against the CPU reference
// (ops/lowrank.h and the rules of trainer/linear.cc): the rank-decay gamma; the product
// L diag(gamma) R and W_eff = bf16(Q(W) + product) through lsq_weight_forward_cuda; the
// gradients of L and R from dW_eff = dout^T x against lowrank_backward (fp32 and BF16, both
// write modes, the inactive part zeroed); the dense SVD init and the period-end
// re-factorisation against lowrank_factorize, comparing products (the factors' signs differ),
// both orientations, a noise-like W - Q(W), rank-deficient and zero inputs. Tagged "gpu".
#include "ops/cuda/lowrank_cuda.h"

#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "ops/cuda/bf16.h"
#include "ops/cuda/device.h"
#include "ops/cuda/lsq_cuda.h"
#include "ops/lowrank.h"
#include "ops/quant/lsq.h"
#include "tests/ops/cuda_test_util.h"

namespace qtrain::ops {
namespace {

using testing::DeviceArray;
using testing::ExpectNear;
using testing::RandomFloats;
using testing::TestStream;

// P (OC x C) = L[:, :k] diag(gamma) R[:k], in double.
std::vector<double> Product(const std::vector<float>& L, const std::vector<float>& R,
                            const std::vector<float>* gamma, int OC, int C, int rmax, int k) {
  std::vector<double> p(static_cast<size_t>(OC) * C, 0.0);
  for (int o = 0; o < OC; ++o) {
    for (int j = 0; j < k; ++j) {
      const double l = L[static_cast<size_t>(o) * rmax + j] * (gamma ? (*gamma)[j] : 1.0);
      for (int c = 0; c < C; ++c) p[static_cast<size_t>(o) * C + c] += l * R[static_cast<size_t>(j) * C + c];
    }
  }
  return p;
}

double RelFrob(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += b[i] * b[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

// A matrix with singular values 10, 9, ..., plus noise of the given size (a clear gap after
// `rank` components when noise is small).
std::vector<float> Planted(int OC, int C, int rank, double noise, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> d(0.0, 1.0);
  std::vector<double> m(static_cast<size_t>(OC) * C, 0.0);
  for (int j = 0; j < rank; ++j) {
    std::vector<double> u(OC), v(C);
    double nu = 0, nv = 0;
    for (double& x : u) {
      x = d(gen);
      nu += x * x;
    }
    for (double& x : v) {
      x = d(gen);
      nv += x * x;
    }
    const double s = 10.0 - j;
    for (int o = 0; o < OC; ++o) {
      for (int c = 0; c < C; ++c) m[static_cast<size_t>(o) * C + c] += s * u[o] * v[c] / std::sqrt(nu * nv);
    }
  }
  std::vector<float> out(m.size());
  for (size_t i = 0; i < m.size(); ++i) out[i] = static_cast<float>(m[i] + noise * d(gen));
  return out;
}

TEST(PhiCuda, GammaFollowsTheSchedule) {
  QT_SKIP_WITHOUT_GPU();
  TestStream stream;
  const int rmax = 12;
  for (int k : {0, 1, 2, 5, 8, 12}) {
    DeviceArray<float> g(rmax);
    QT_ASSERT_OK(phi_gamma_cuda(g.get(), rmax, k, 0.3f, stream.get()));
    ASSERT_TRUE(stream.Sync().ok());
    const std::vector<float> got = g.ToHost("gamma");
    for (int j = 0; j < rmax; ++j) {
      const float want = j < k / 2 ? 1.f : (j < k ? 0.3f : 0.f);
      EXPECT_EQ(got[j], want) << "k=" << k << " j=" << j;
    }
  }
}

TEST(PhiCuda, ProductAndEffectiveWeight) {
  QT_SKIP_WITHOUT_GPU();
  auto ctx = PhiContext::Create();
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  TestStream stream;
  const int shapes[][4] = {{64, 48, 8, 5}, {37, 130, 6, 6}, {768, 2304, 32, 32}, {5, 7, 4, 0}};
  for (const auto& sh : shapes) {
    const int OC = sh[0], C = sh[1], rmax = sh[2], k = sh[3];
    SCOPED_TRACE(absl::StrCat(OC, "x", C, " rmax=", rmax, " k=", k));
    const std::vector<float> L = RandomFloats(static_cast<int64_t>(OC) * rmax, 1, -0.1, 0.1);
    const std::vector<float> R = RandomFloats(static_cast<int64_t>(rmax) * C, 2, -0.1, 0.1);
    const std::vector<float> gamma = RandomFloats(rmax, 3, 0.0, 1.0);
    DeviceArray<float> dL(L), dR(R), dg(gamma), P(static_cast<int64_t>(OC) * C);
    const int64_t ws_bytes = phi_product_cuda_workspace_bytes(OC, k);
    DeviceArray<float> ws(ws_bytes / 4 + 4);
    QT_ASSERT_OK(phi_product_cuda(**ctx, P.get(), dL.get(), dR.get(), dg.get(), OC, C, rmax, k,
                                  ws.get(), ws_bytes, stream.get()));
    ASSERT_TRUE(stream.Sync().ok());
    const std::vector<double> ref = Product(L, R, &gamma, OC, C, rmax, k);
    const std::vector<float> got = P.ToHost("P");
    // fp32 sums of k terms of size <= 0.01: a few ulp of the terms' magnitude.
    ExpectNear(got, ref, 1e-8 * (k + 1), 1e-6, "P");

    // W_eff = bf16(Q(W) + P) through the weight quantizer.
    const std::vector<float> w = RandomFloats(static_cast<int64_t>(OC) * C, 4, -1.0, 1.0);
    std::vector<float> s(OC, 0.2f);
    LsqConfig cfg;
    cfg.bits = 4;
    std::vector<float> q(w.size());
    ASSERT_TRUE(lsq_forward(q.data(), w.data(), s.data(), nullptr, OC, C, cfg).ok());
    DeviceArray<float> dw(w), ds(s);
    DeviceArray<bf16> weff(static_cast<int64_t>(OC) * C);
    QT_ASSERT_OK(lsq_weight_forward_cuda(weff.get(), nullptr, nullptr, dw.get(), ds.get(),
                                         nullptr, P.get(), OC, C, cfg, stream.get()));
    ASSERT_TRUE(stream.Sync().ok());
    std::vector<double> weff_ref(w.size());
    for (size_t i = 0; i < w.size(); ++i) weff_ref[i] = q[i] + ref[i];
    ExpectNear(Bf16ToFloat(weff.ToHost("W_eff")), weff_ref, 1e-7, testing::kBf16Eps, "W_eff");
  }
}

template <typename G>
void CheckBackward(int N, int OC, int C, int rmax, int k, GradWrite write) {
  constexpr bool kBf16 = std::is_same<G, bf16>::value;
  SCOPED_TRACE(absl::StrCat("N=", N, " ", OC, "x", C, " rmax=", rmax, " k=", k,
                            kBf16 ? " bf16" : " fp32",
                            write == GradWrite::kOverwrite ? " overwrite" : " accumulate"));
  auto ctx = PhiContext::Create();
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  // BF16-valued operands for the BF16 case, so that CPU and GPU multiply the same numbers.
  auto round = [&](std::vector<float> v) {
    if (kBf16) {
      for (float& x : v) x = Bf16ToFloat(FloatToBf16(x));
    }
    return v;
  };
  const std::vector<float> x = RandomFloats(static_cast<int64_t>(N) * C, 5, -1.0, 1.0);
  const std::vector<float> dout = RandomFloats(static_cast<int64_t>(N) * OC, 6, -1.0, 1.0);
  const std::vector<float> L = round(RandomFloats(static_cast<int64_t>(OC) * rmax, 7, -0.5, 0.5));
  const std::vector<float> R = round(RandomFloats(static_cast<int64_t>(rmax) * C, 8, -0.5, 0.5));
  const std::vector<float> gamma = RandomFloats(rmax, 9, 0.2, 1.0);
  // dW_eff = dout^T x (rounded to G), the weight-gradient GEMM's output.
  std::vector<float> dweff(static_cast<size_t>(OC) * C, 0.f);
  for (int o = 0; o < OC; ++o) {
    for (int c = 0; c < C; ++c) {
      double acc = 0;
      for (int n = 0; n < N; ++n) acc += static_cast<double>(dout[static_cast<size_t>(n) * OC + o]) * x[static_cast<size_t>(n) * C + c];
      dweff[static_cast<size_t>(o) * C + c] = static_cast<float>(acc);
    }
  }
  dweff = round(dweff);
  // CPU: lowrank_backward in activation space; its dL, dR are the weight-space ones exactly
  // (in exact arithmetic), with dW_eff unrounded: the BF16 case adds that rounding.
  std::vector<float> hidden(static_cast<size_t>(N) * rmax, 0.f), out(static_cast<size_t>(N) * OC, 0.f);
  lowrank_forward(out.data(), hidden.data(), x.data(), L.data(), R.data(), gamma.data(), N, C, OC,
                  rmax, k);
  const std::vector<float> dl0 = round(RandomFloats(static_cast<int64_t>(OC) * rmax, 10, -1, 1));
  const std::vector<float> dr0 = round(RandomFloats(static_cast<int64_t>(rmax) * C, 11, -1, 1));
  std::vector<float> dl_ref(OC * static_cast<size_t>(rmax), 0.f), dr_ref(static_cast<size_t>(rmax) * C, 0.f);
  if (write == GradWrite::kAccumulate) {
    dl_ref = dl0;
    dr_ref = dr0;
  }
  lowrank_backward(static_cast<float*>(nullptr), dl_ref.data(), dr_ref.data(), dout.data(),
                   x.data(), hidden.data(), L.data(), R.data(), gamma.data(), N, C, OC, rmax, k);
  // Tolerances: the sums' magnitudes (|dW| |R| and |L| |dW|).
  std::vector<double> atol_l(dl_ref.size(), 1e-6), atol_r(dr_ref.size(), 1e-6);
  for (int o = 0; o < OC; ++o) {
    for (int j = 0; j < k; ++j) {
      double a = 0;
      for (int c = 0; c < C; ++c) a += std::abs(dweff[static_cast<size_t>(o) * C + c] * R[static_cast<size_t>(j) * C + c]);
      atol_l[static_cast<size_t>(o) * rmax + j] += (kBf16 ? 4 * testing::kBf16Eps : 4e-5) * a;
    }
  }
  for (int j = 0; j < k; ++j) {
    for (int c = 0; c < C; ++c) {
      double a = 0;
      for (int o = 0; o < OC; ++o) a += std::abs(L[static_cast<size_t>(o) * rmax + j] * dweff[static_cast<size_t>(o) * C + c]);
      atol_r[static_cast<size_t>(j) * C + c] += (kBf16 ? 4 * testing::kBf16Eps : 4e-5) * a;
    }
  }
  auto to_g = [](const std::vector<float>& v) {
    std::vector<G> g(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      if constexpr (kBf16) g[i] = FloatToBf16(v[i]);
      else g[i] = v[i];
    }
    return g;
  };
  auto from_g = [](const std::vector<G>& v) {
    std::vector<float> f(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      if constexpr (kBf16) f[i] = Bf16ToFloat(v[i]);
      else f[i] = v[i];
    }
    return f;
  };
  TestStream stream;
  DeviceArray<G> d_dw(to_g(dweff)), d_L(to_g(L)), d_R(to_g(R));
  DeviceArray<G> d_dl(OC * static_cast<int64_t>(rmax)), d_dr(static_cast<int64_t>(rmax) * C);
  if (write == GradWrite::kAccumulate) {
    d_dl.Upload(to_g(dl0));
    d_dr.Upload(to_g(dr0));
  }  // else left poisoned (NaN): every element must be written
  DeviceArray<float> d_g(gamma);
  const int64_t ws_bytes = phi_backward_cuda_workspace_bytes(OC, C, k);
  DeviceArray<float> ws(ws_bytes / 4 + 64);
  QT_ASSERT_OK(phi_backward_cuda(**ctx, d_dl.get(), d_dr.get(), d_dw.get(), d_L.get(), d_R.get(),
                                 d_g.get(), OC, C, rmax, k, ws.get(), ws_bytes, stream.get(),
                                 write));
  ASSERT_TRUE(stream.Sync().ok());
  const double rtol = kBf16 ? testing::kBf16Eps : 1e-6;
  ExpectNear(from_g(d_dl.ToHost("dL")), dl_ref, 0, rtol, "dL", &atol_l);
  ExpectNear(from_g(d_dr.ToHost("dR")), dr_ref, 0, rtol, "dR", &atol_r);
}

TEST(PhiCuda, BackwardMatchesLowrankBackward) {
  QT_SKIP_WITHOUT_GPU();
  CheckBackward<float>(40, 64, 48, 8, 5, GradWrite::kOverwrite);
  CheckBackward<float>(40, 64, 48, 8, 8, GradWrite::kAccumulate);
  CheckBackward<bf16>(33, 37, 130, 6, 3, GradWrite::kOverwrite);
  CheckBackward<bf16>(33, 37, 130, 6, 6, GradWrite::kAccumulate);
  CheckBackward<float>(64, 256, 192, 32, 16, GradWrite::kOverwrite);
  CheckBackward<float>(8, 16, 24, 4, 0, GradWrite::kOverwrite);
}

// Factors against lowrank_factorize: products, the zeroed tail, singular values, balance.
void CheckFactorize(const std::vector<float>& M, int OC, int C, int rmax, int k, double tol,
                    const std::string& what) {
  SCOPED_TRACE(absl::StrCat(what, " ", OC, "x", C, " rmax=", rmax, " k=", k));
  std::vector<float> Lc(static_cast<size_t>(OC) * rmax), Rc(static_cast<size_t>(rmax) * C);
  std::vector<double> sv_cpu;
  lowrank_factorize(Lc.data(), Rc.data(), M.data(), OC, C, rmax, k, &sv_cpu);
  auto ctx = PhiContext::Create();
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  TestStream stream;
  DeviceArray<float> dM(M), dL(static_cast<int64_t>(OC) * rmax), dR(static_cast<int64_t>(rmax) * C);
  std::vector<double> sv_gpu;
  QT_ASSERT_OK(phi_factorize_cuda(**ctx, dL.get(), dR.get(), dM.get(), OC, C, rmax, k,
                                  stream.get(), &sv_gpu));
  const std::vector<float> Lg = dL.ToHost("L"), Rg = dR.ToHost("R");
  const std::vector<double> pg = Product(Lg, Rg, nullptr, OC, C, rmax, rmax);  // all of rmax
  const std::vector<double> pc = Product(Lc, Rc, nullptr, OC, C, rmax, k);
  EXPECT_LT(RelFrob(pg, pc), tol) << "L R vs CPU";
  for (int o = 0; o < OC; ++o) {
    for (int j = k; j < rmax; ++j) ASSERT_EQ(Lg[static_cast<size_t>(o) * rmax + j], 0.f) << "L tail";
  }
  for (size_t i = static_cast<size_t>(k) * C; i < Rg.size(); ++i) ASSERT_EQ(Rg[i], 0.f) << "R tail";
  ASSERT_EQ(static_cast<int>(sv_gpu.size()), k);
  for (int j = 0; j < k; ++j) {
    EXPECT_NEAR(sv_gpu[j], sv_cpu[j], 1e-6 * sv_cpu[0] + 1e-12) << "sigma_" << j;
  }
  // Balanced split: |L_j|^2 = |R_j|^2 = sigma_j.
  for (int j = 0; j < k; ++j) {
    double nl = 0, nr = 0;
    for (int o = 0; o < OC; ++o) nl += static_cast<double>(Lg[static_cast<size_t>(o) * rmax + j]) * Lg[static_cast<size_t>(o) * rmax + j];
    for (int c = 0; c < C; ++c) nr += static_cast<double>(Rg[static_cast<size_t>(j) * C + c]) * Rg[static_cast<size_t>(j) * C + c];
    if (sv_cpu[j] > 1e-6 * sv_cpu[0]) {
      EXPECT_NEAR(nl, sv_cpu[j], 1e-4 * sv_cpu[j]) << "|L_" << j << "|^2";
      EXPECT_NEAR(nr, sv_cpu[j], 1e-4 * sv_cpu[j]) << "|R_" << j << "|^2";
    }
  }
}

TEST(PhiCuda, FactorizeMatchesCpuSvd) {
  QT_SKIP_WITHOUT_GPU();
  CheckFactorize(Planted(96, 64, 10, 1e-3, 1), 96, 64, 12, 8, 1e-5, "planted, OC > C");
  CheckFactorize(Planted(40, 150, 10, 1e-3, 2), 40, 150, 16, 10, 1e-5, "planted, OC < C");
  CheckFactorize(Planted(300, 300, 4, 1e-2, 3), 300, 300, 4, 4, 1e-5, "square");
  CheckFactorize(Planted(50, 30, 3, 0.0, 4), 50, 30, 8, 6, 1e-5, "rank 3 asked for 6");
  CheckFactorize(std::vector<float>(20 * 10, 0.f), 20, 10, 4, 4, 1e-30, "zeros");
  // Phi's init input: W - Q(W) of a 4-bit per-channel quantizer, noise-like.
  const int OC = 256, C = 192;
  const std::vector<float> w = RandomFloats(static_cast<int64_t>(OC) * C, 5, -1.0, 1.0);
  LsqConfig cfg;
  cfg.bits = 4;
  std::vector<float> s(OC);
  ASSERT_TRUE(lsq_init(s.data(), static_cast<float*>(nullptr), w.data(), OC, C, cfg).ok());
  std::vector<float> q(w.size()), err(w.size());
  ASSERT_TRUE(lsq_forward(q.data(), w.data(), s.data(), nullptr, OC, C, cfg).ok());
  for (size_t i = 0; i < w.size(); ++i) err[i] = w[i] - q[i];
  CheckFactorize(err, OC, C, 32, 32, 1e-4, "W - Q(W)");
}

TEST(PhiCuda, RefactorizeMatchesCpu) {
  QT_SKIP_WITHOUT_GPU();
  const int cases[][5] = {{96, 64, 16, 8, 8}, {40, 150, 16, 16, 4}, {200, 120, 32, 1, 1},
                          {64, 64, 8, 4, 0}};
  for (const auto& cs : cases) {
    const int OC = cs[0], C = cs[1], rmax = cs[2], k_in = cs[3], k_out = cs[4];
    SCOPED_TRACE(absl::StrCat(OC, "x", C, " rmax=", rmax, " k_in=", k_in, " k_out=", k_out));
    std::vector<float> L = RandomFloats(static_cast<int64_t>(OC) * rmax, 20, -0.3, 0.3);
    std::vector<float> R = RandomFloats(static_cast<int64_t>(rmax) * C, 21, -0.3, 0.3);
    // CPU: M = L[:, :k_in] R[:k_in], factorised at k_out (Linear::ApplyRankSchedule).
    const std::vector<double> m = Product(L, R, nullptr, OC, C, rmax, k_in);
    std::vector<float> mf(m.begin(), m.end());
    std::vector<float> Lc(L.size()), Rc(R.size());
    lowrank_factorize(Lc.data(), Rc.data(), mf.data(), OC, C, rmax, k_out);
    auto ctx = PhiContext::Create();
    ASSERT_TRUE(ctx.ok()) << ctx.status();
    TestStream stream;
    DeviceArray<float> dL(L), dR(R);
    QT_ASSERT_OK(phi_refactorize_cuda(**ctx, dL.get(), dR.get(), OC, C, rmax, k_in, k_out,
                                      stream.get()));
    const std::vector<float> Lg = dL.ToHost("L"), Rg = dR.ToHost("R");
    const std::vector<double> pg = Product(Lg, Rg, nullptr, OC, C, rmax, rmax);
    const std::vector<double> pc = Product(Lc, Rc, nullptr, OC, C, rmax, k_out);
    if (k_out == 0) {
      for (double v : pg) ASSERT_EQ(v, 0.0);
      continue;
    }
    EXPECT_LT(RelFrob(pg, pc), 1e-5) << "L R vs CPU";
    if (k_out == k_in) {
      EXPECT_LT(RelFrob(pg, m), 1e-5) << "the kept product is unchanged";
    }
    for (int o = 0; o < OC; ++o) {
      for (int j = k_out; j < rmax; ++j) ASSERT_EQ(Lg[static_cast<size_t>(o) * rmax + j], 0.f);
    }
  }
}

TEST(PhiCudaArgs, RejectsBadShapes) {
  QT_SKIP_WITHOUT_GPU();
  auto ctx = PhiContext::Create();
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  DeviceArray<float> a(64);
  EXPECT_TRUE(absl::IsInvalidArgument(
      phi_factorize_cuda(**ctx, a.get(), a.get(), a.get(), 4, 4, 4, 5, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(
      phi_refactorize_cuda(**ctx, a.get(), a.get(), 4, 4, 4, 2, 3, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(phi_product_cuda(**ctx, a.get(), a.get(), a.get(), a.get(),
                                                       4, 4, 4, 4, nullptr, 0, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(phi_gamma_cuda(a.get(), 4, 5, 0.5f, nullptr)));
}

}  // namespace
}  // namespace qtrain::ops
