// Tests of the QVGen low-rank module: hand-computed forward, gradients against float64 finite
// differences with k < rmax (inactive columns of dL / rows of dR get nothing, inactive hidden
// columns are neither written nor read), k = 0, null dinp, accumulate semantics, float vs double,
// thread-count independence; the SVD factorisation (exact at k = rank, Eckart-Young error,
// balanced factors).
#include "ops/lowrank.h"

#include <omp.h>

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "gtest/gtest.h"
#include "tests/ops/grad_check.h"

namespace qtrain::ops {
namespace {

using testing::Dot;
using testing::ExpectAllNear;
using testing::ExpectGradNear;
using testing::NumericGrad;
using testing::RandomVector;
using testing::ToFloat;

constexpr int N = 7, C = 11, OC = 9, RMAX = 5, K = 3;

// out (N, OC) = sum_{j<k} (inp R[j]^T) gamma[j] L[:, j]^T, by plain loops.
std::vector<double> NaiveForward(const std::vector<double>& inp, const std::vector<double>& L,
                                 const std::vector<double>& R, const std::vector<double>& gamma,
                                 int n, int c, int oc, int rmax, int k) {
  std::vector<double> out(n * oc, 0.0);
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < k; ++j) {
      double h = 0;
      for (int cc = 0; cc < c; ++cc) h += inp[i * c + cc] * R[j * c + cc];
      for (int o = 0; o < oc; ++o) out[i * oc + o] += h * gamma[j] * L[o * rmax + j];
    }
  }
  return out;
}

// (OC, C) = L (OC, rmax) @ R (rmax, C).
std::vector<double> Product(const std::vector<double>& L, const std::vector<double>& R, int oc,
                            int c, int rmax) {
  std::vector<double> m(oc * c, 0.0);
  for (int o = 0; o < oc; ++o) {
    for (int j = 0; j < rmax; ++j) {
      for (int cc = 0; cc < c; ++cc) m[o * c + cc] += L[o * rmax + j] * R[j * c + cc];
    }
  }
  return m;
}

double SquaredNorm(const std::vector<double>& v) { return Dot(v, v); }

TEST(LowrankTest, ForwardHandComputed) {
  // N = 1, C = 2, OC = 2, rmax = 2.
  const std::vector<double> inp = {1, 2};
  const std::vector<double> R = {3, -1, 5, 5};      // R[0] = (3, -1), R[1] = (5, 5)
  const std::vector<double> L = {2, 7, -4, 7};      // L[:, 0] = (2, -4), L[:, 1] = (7, 7)
  const std::vector<double> gamma = {0.5, 9};
  std::vector<double> out = {10, 20}, hidden = {42, 42};
  lowrank_forward(out.data(), hidden.data(), inp.data(), L.data(), R.data(), gamma.data(), 1, 2,
                  2, 2, 1);
  EXPECT_DOUBLE_EQ(hidden[0], 1.0);   // 3 - 2
  EXPECT_DOUBLE_EQ(hidden[1], 42.0);  // inactive column untouched
  EXPECT_DOUBLE_EQ(out[0], 10 + 1 * 0.5 * 2);
  EXPECT_DOUBLE_EQ(out[1], 20 + 1 * 0.5 * -4);
  out = {0, 0};
  lowrank_forward(out.data(), hidden.data(), inp.data(), L.data(), R.data(), gamma.data(), 1, 2,
                  2, 2, 2);
  EXPECT_DOUBLE_EQ(hidden[1], 15.0);  // 5 + 10
  EXPECT_DOUBLE_EQ(out[0], 1 * 0.5 * 2 + 15 * 9 * 7);
  EXPECT_DOUBLE_EQ(out[1], 1 * 0.5 * -4 + 15 * 9 * 7);
}

TEST(LowrankTest, ForwardMatchesLoopsAndLeavesInactiveHidden) {
  const std::vector<double> inp = RandomVector(N * C, 1), L = RandomVector(OC * RMAX, 2);
  const std::vector<double> R = RandomVector(RMAX * C, 3), gamma = RandomVector(RMAX, 4, 0, 1);
  const std::vector<double> base = RandomVector(N * OC, 5);
  std::vector<double> out = base, hidden(N * RMAX, -123.0);
  lowrank_forward(out.data(), hidden.data(), inp.data(), L.data(), R.data(), gamma.data(), N, C,
                  OC, RMAX, K);
  const std::vector<double> want = NaiveForward(inp, L, R, gamma, N, C, OC, RMAX, K);
  for (int i = 0; i < N * OC; ++i) EXPECT_NEAR(out[i] - base[i], want[i], 1e-13) << i;
  for (int i = 0; i < N; ++i) {
    for (int j = 0; j < RMAX; ++j) {
      if (j < K) {
        double h = 0;
        for (int c = 0; c < C; ++c) h += inp[i * C + c] * R[j * C + c];
        EXPECT_NEAR(hidden[i * RMAX + j], h, 1e-14);
      } else {
        EXPECT_EQ(hidden[i * RMAX + j], -123.0) << "hidden[" << i << ", " << j << "] written";
      }
    }
  }
}

TEST(LowrankTest, BackwardMatchesFiniteDifferences) {
  std::vector<double> inp = RandomVector(N * C, 6), L = RandomVector(OC * RMAX, 7);
  std::vector<double> R = RandomVector(RMAX * C, 8);
  const std::vector<double> gamma = RandomVector(RMAX, 9, 0.2, 1.0);
  const std::vector<double> dout = RandomVector(N * OC, 10);
  std::vector<double> out(N * OC), hidden(N * RMAX);
  auto loss = [&] {
    std::fill(out.begin(), out.end(), 0.0);
    lowrank_forward(out.data(), hidden.data(), inp.data(), L.data(), R.data(), gamma.data(), N,
                    C, OC, RMAX, K);
    return Dot(dout, out);
  };
  loss();
  std::vector<double> dinp(N * C, 0.0), dL(OC * RMAX, 0.0), dR(RMAX * C, 0.0);
  lowrank_backward(dinp.data(), dL.data(), dR.data(), dout.data(), inp.data(), hidden.data(),
                   L.data(), R.data(), gamma.data(), N, C, OC, RMAX, K);
  const std::vector<double> num_inp = NumericGrad(inp, loss);
  const std::vector<double> num_L = NumericGrad(L, loss);
  const std::vector<double> num_R = NumericGrad(R, loss);
  ExpectGradNear(dinp, num_inp, "dinp");
  ExpectGradNear(dL, num_L, "dL");
  ExpectGradNear(dR, num_R, "dR");
  // The inactive components do not take part: numerically zero and left at zero.
  for (int o = 0; o < OC; ++o) {
    for (int j = K; j < RMAX; ++j) {
      EXPECT_EQ(num_L[o * RMAX + j], 0.0);
      EXPECT_EQ(dL[o * RMAX + j], 0.0);
    }
  }
  for (int j = K; j < RMAX; ++j) {
    for (int c = 0; c < C; ++c) {
      EXPECT_EQ(num_R[j * C + c], 0.0);
      EXPECT_EQ(dR[j * C + c], 0.0);
    }
  }
}

TEST(LowrankTest, BackwardIgnoresInactiveComponents) {
  const std::vector<double> inp = RandomVector(N * C, 11), L = RandomVector(OC * RMAX, 12);
  const std::vector<double> R = RandomVector(RMAX * C, 13), gamma = RandomVector(RMAX, 14);
  const std::vector<double> dout = RandomVector(N * OC, 15);
  std::vector<double> out(N * OC, 0.0), hidden(N * RMAX, 0.0);
  lowrank_forward(out.data(), hidden.data(), inp.data(), L.data(), R.data(), gamma.data(), N, C,
                  OC, RMAX, K);
  auto backward = [&](const std::vector<double>& h, std::vector<double>* dinp,
                      std::vector<double>* dL, std::vector<double>* dR) {
    dinp->assign(N * C, 0.0);
    dL->assign(OC * RMAX, 7.0);  // sentinel: the inactive part must keep it
    dR->assign(RMAX * C, 7.0);
    lowrank_backward(dinp->data(), dL->data(), dR->data(), dout.data(), inp.data(), h.data(),
                     L.data(), R.data(), gamma.data(), N, C, OC, RMAX, K);
  };
  std::vector<double> dinp1, dL1, dR1, dinp2, dL2, dR2;
  backward(hidden, &dinp1, &dL1, &dR1);
  // NaN in the inactive hidden columns must not reach any gradient.
  std::vector<double> poisoned = hidden;
  for (int i = 0; i < N; ++i) {
    for (int j = K; j < RMAX; ++j) {
      poisoned[i * RMAX + j] = std::numeric_limits<double>::quiet_NaN();
    }
  }
  backward(poisoned, &dinp2, &dL2, &dR2);
  EXPECT_EQ(dinp1, dinp2);
  EXPECT_EQ(dL1, dL2);
  EXPECT_EQ(dR1, dR2);
  for (int o = 0; o < OC; ++o) {
    for (int j = 0; j < RMAX; ++j) {
      if (j >= K) {
        EXPECT_EQ(dL1[o * RMAX + j], 7.0);
      } else {
        EXPECT_NE(dL1[o * RMAX + j], 7.0);
      }
    }
  }
  for (int j = 0; j < RMAX; ++j) {
    for (int c = 0; c < C; ++c) {
      if (j >= K) {
        EXPECT_EQ(dR1[j * C + c], 7.0);
      } else {
        EXPECT_NE(dR1[j * C + c], 7.0);
      }
    }
  }
}

TEST(LowrankTest, NullDinpGivesSameWeightGradients) {
  const std::vector<double> inp = RandomVector(N * C, 16), L = RandomVector(OC * RMAX, 17);
  const std::vector<double> R = RandomVector(RMAX * C, 18), gamma = RandomVector(RMAX, 19);
  const std::vector<double> dout = RandomVector(N * OC, 20);
  std::vector<double> out(N * OC, 0.0), hidden(N * RMAX, 0.0);
  lowrank_forward(out.data(), hidden.data(), inp.data(), L.data(), R.data(), gamma.data(), N, C,
                  OC, RMAX, K);
  std::vector<double> dinp(N * C, 0.0), dL1(OC * RMAX, 0.0), dR1(RMAX * C, 0.0);
  std::vector<double> dL2(OC * RMAX, 0.0), dR2(RMAX * C, 0.0);
  lowrank_backward(dinp.data(), dL1.data(), dR1.data(), dout.data(), inp.data(), hidden.data(),
                   L.data(), R.data(), gamma.data(), N, C, OC, RMAX, K);
  lowrank_backward<double>(nullptr, dL2.data(), dR2.data(), dout.data(), inp.data(),
                           hidden.data(), L.data(), R.data(), gamma.data(), N, C, OC, RMAX, K);
  EXPECT_EQ(dL1, dL2);
  EXPECT_EQ(dR1, dR2);
}

TEST(LowrankTest, NullFactorGradientsLeaveTheOtherUnchanged) {
  const std::vector<double> inp = RandomVector(N * C, 46), L = RandomVector(OC * RMAX, 47);
  const std::vector<double> R = RandomVector(RMAX * C, 48), gamma = RandomVector(RMAX, 49);
  const std::vector<double> dout = RandomVector(N * OC, 50);
  std::vector<double> out(N * OC, 0.0), hidden(N * RMAX, 0.0);
  lowrank_forward(out.data(), hidden.data(), inp.data(), L.data(), R.data(), gamma.data(), N, C,
                  OC, RMAX, K);
  std::vector<double> dinp1(N * C, 0.0), dL1(OC * RMAX, 0.0), dR1(RMAX * C, 0.0);
  lowrank_backward(dinp1.data(), dL1.data(), dR1.data(), dout.data(), inp.data(), hidden.data(),
                   L.data(), R.data(), gamma.data(), N, C, OC, RMAX, K);
  std::vector<double> dinp2(N * C, 0.0), dL2(OC * RMAX, 0.0), dR2(RMAX * C, 0.0);
  lowrank_backward<double>(dinp2.data(), dL2.data(), nullptr, dout.data(), inp.data(),
                           hidden.data(), L.data(), R.data(), gamma.data(), N, C, OC, RMAX, K);
  lowrank_backward<double>(nullptr, nullptr, dR2.data(), dout.data(), inp.data(), hidden.data(),
                           L.data(), R.data(), gamma.data(), N, C, OC, RMAX, K);
  EXPECT_EQ(dinp1, dinp2);
  EXPECT_EQ(dL1, dL2);
  EXPECT_EQ(dR1, dR2);
}

// Per-sample shares: each equals lowrank_backward run on that sample's rows alone (a backward
// per sample, the definition), and they sum to the batch gradient.
TEST(LowrankTest, PerSampleGradientsAreEachSamplesOwnBackward) {
  const int S = 3, T = 4, n = S * T;
  const std::vector<double> inp = RandomVector(n * C, 51), L = RandomVector(OC * RMAX, 52);
  const std::vector<double> R = RandomVector(RMAX * C, 53), gamma = RandomVector(RMAX, 54);
  const std::vector<double> dout = RandomVector(n * OC, 55);
  std::vector<double> out(n * OC, 0.0), hidden(n * RMAX, 0.0);
  lowrank_forward(out.data(), hidden.data(), inp.data(), L.data(), R.data(), gamma.data(), n, C,
                  OC, RMAX, K);
  // One stride holds both factors, as a flat adapter buffer does: dL at 0, dR after it.
  const int64_t stride = OC * RMAX + RMAX * C;
  std::vector<double> ps(S * stride, 0.0);
  lowrank_backward_per_sample(ps.data(), ps.data() + OC * RMAX, stride, dout.data(), inp.data(),
                              hidden.data(), L.data(), gamma.data(), S, T, C, OC, RMAX, K);
  std::vector<double> sum(stride, 0.0);
  for (int s = 0; s < S; ++s) {
    std::vector<double> dL(OC * RMAX, 0.0), dR(RMAX * C, 0.0);
    lowrank_backward<double>(nullptr, dL.data(), dR.data(), dout.data() + s * T * OC,
                             inp.data() + s * T * C, hidden.data() + s * T * RMAX, L.data(),
                             R.data(), gamma.data(), T, C, OC, RMAX, K);
    dL.insert(dL.end(), dR.begin(), dR.end());
    const std::vector<double> got(ps.begin() + s * stride, ps.begin() + (s + 1) * stride);
    ExpectAllNear(got, dL, 1e-13, 1e-12, "sample " + std::to_string(s));
    for (int64_t i = 0; i < stride; ++i) sum[i] += got[i];
  }
  std::vector<double> dL(OC * RMAX, 0.0), dR(RMAX * C, 0.0);
  lowrank_backward<double>(nullptr, dL.data(), dR.data(), dout.data(), inp.data(), hidden.data(),
                           L.data(), R.data(), gamma.data(), n, C, OC, RMAX, K);
  dL.insert(dL.end(), dR.begin(), dR.end());
  ExpectAllNear(sum, dL, 1e-12, 1e-12, "sum over samples");
  // A null factor is skipped; the other's shares do not change.
  std::vector<double> only_l(S * stride, 0.0);
  lowrank_backward_per_sample<double>(only_l.data(), nullptr, stride, dout.data(), inp.data(),
                                      hidden.data(), L.data(), gamma.data(), S, T, C, OC, RMAX, K);
  for (int s = 0; s < S; ++s) {
    for (int64_t i = 0; i < stride; ++i) {
      EXPECT_EQ(only_l[s * stride + i], i < OC * RMAX ? ps[s * stride + i] : 0.0);
    }
  }
}

TEST(LowrankTest, RankZeroIsANoOp) {
  const std::vector<double> inp = RandomVector(N * C, 21), L = RandomVector(OC * RMAX, 22);
  const std::vector<double> R = RandomVector(RMAX * C, 23), gamma = RandomVector(RMAX, 24);
  const std::vector<double> dout = RandomVector(N * OC, 25);
  const std::vector<double> out0 = RandomVector(N * OC, 26), hidden0(N * RMAX, 3.0);
  std::vector<double> out = out0, hidden = hidden0;
  lowrank_forward(out.data(), hidden.data(), inp.data(), L.data(), R.data(), gamma.data(), N, C,
                  OC, RMAX, 0);
  EXPECT_EQ(out, out0);
  EXPECT_EQ(hidden, hidden0);
  std::vector<double> dinp(N * C, 1.0), dL(OC * RMAX, 2.0), dR(RMAX * C, 3.0);
  lowrank_backward(dinp.data(), dL.data(), dR.data(), dout.data(), inp.data(), hidden.data(),
                   L.data(), R.data(), gamma.data(), N, C, OC, RMAX, 0);
  EXPECT_EQ(dinp, std::vector<double>(N * C, 1.0));
  EXPECT_EQ(dL, std::vector<double>(OC * RMAX, 2.0));
  EXPECT_EQ(dR, std::vector<double>(RMAX * C, 3.0));
}

TEST(LowrankTest, BackwardAccumulates) {
  const std::vector<double> inp = RandomVector(N * C, 27), L = RandomVector(OC * RMAX, 28);
  const std::vector<double> R = RandomVector(RMAX * C, 29), gamma = RandomVector(RMAX, 30);
  const std::vector<double> dout = RandomVector(N * OC, 31);
  std::vector<double> out(N * OC, 0.0), hidden(N * RMAX, 0.0);
  lowrank_forward(out.data(), hidden.data(), inp.data(), L.data(), R.data(), gamma.data(), N, C,
                  OC, RMAX, K);
  auto run = [&](int times, std::vector<double>* dinp, std::vector<double>* dL,
                 std::vector<double>* dR) {
    dinp->assign(N * C, 0.0);
    dL->assign(OC * RMAX, 0.0);
    dR->assign(RMAX * C, 0.0);
    for (int i = 0; i < times; ++i) {
      lowrank_backward(dinp->data(), dL->data(), dR->data(), dout.data(), inp.data(),
                       hidden.data(), L.data(), R.data(), gamma.data(), N, C, OC, RMAX, K);
    }
  };
  std::vector<double> dinp1, dL1, dR1, dinp2, dL2, dR2;
  run(1, &dinp1, &dL1, &dR1);
  run(2, &dinp2, &dL2, &dR2);
  for (int i = 0; i < N * C; ++i) EXPECT_DOUBLE_EQ(dinp2[i], 2 * dinp1[i]);
  for (int i = 0; i < OC * RMAX; ++i) EXPECT_DOUBLE_EQ(dL2[i], 2 * dL1[i]);
  for (int i = 0; i < RMAX * C; ++i) EXPECT_DOUBLE_EQ(dR2[i], 2 * dR1[i]);
  // The forward accumulates too.
  std::vector<double> out2(N * OC, 0.0);
  for (int i = 0; i < 2; ++i) {
    lowrank_forward(out2.data(), hidden.data(), inp.data(), L.data(), R.data(), gamma.data(), N,
                    C, OC, RMAX, K);
  }
  for (int i = 0; i < N * OC; ++i) EXPECT_DOUBLE_EQ(out2[i], 2 * out[i]);
}

TEST(LowrankTest, FloatMatchesDouble) {
  const std::vector<double> inp = RandomVector(N * C, 32), L = RandomVector(OC * RMAX, 33);
  const std::vector<double> R = RandomVector(RMAX * C, 34), gamma = RandomVector(RMAX, 35);
  const std::vector<double> dout = RandomVector(N * OC, 36);
  std::vector<double> out(N * OC, 0.0), hidden(N * RMAX, 0.0);
  std::vector<double> dinp(N * C, 0.0), dL(OC * RMAX, 0.0), dR(RMAX * C, 0.0);
  lowrank_forward(out.data(), hidden.data(), inp.data(), L.data(), R.data(), gamma.data(), N, C,
                  OC, RMAX, K);
  lowrank_backward(dinp.data(), dL.data(), dR.data(), dout.data(), inp.data(), hidden.data(),
                   L.data(), R.data(), gamma.data(), N, C, OC, RMAX, K);
  const std::vector<float> inp_f = ToFloat(inp), L_f = ToFloat(L), R_f = ToFloat(R);
  const std::vector<float> gamma_f = ToFloat(gamma), dout_f = ToFloat(dout);
  std::vector<float> out_f(N * OC, 0.0f), hidden_f(N * RMAX, 0.0f);
  std::vector<float> dinp_f(N * C, 0.0f), dL_f(OC * RMAX, 0.0f), dR_f(RMAX * C, 0.0f);
  lowrank_forward(out_f.data(), hidden_f.data(), inp_f.data(), L_f.data(), R_f.data(),
                  gamma_f.data(), N, C, OC, RMAX, K);
  lowrank_backward(dinp_f.data(), dL_f.data(), dR_f.data(), dout_f.data(), inp_f.data(),
                   hidden_f.data(), L_f.data(), R_f.data(), gamma_f.data(), N, C, OC, RMAX, K);
  ExpectAllNear(out_f, out, 1e-5, 1e-5, "out");
  ExpectAllNear(dinp_f, dinp, 1e-5, 1e-5, "dinp");
  ExpectAllNear(dL_f, dL, 1e-5, 1e-5, "dL");
  ExpectAllNear(dR_f, dR, 1e-5, 1e-5, "dR");
}

TEST(LowrankTest, SameBitsAcrossThreadCounts) {
  const int n = 150, c = 70, oc = 40, rmax = 8, k = 5;  // ragged row, channel and column blocks
  const std::vector<float> inp = ToFloat(RandomVector(n * c, 37));
  const std::vector<float> L = ToFloat(RandomVector(oc * rmax, 38));
  const std::vector<float> R = ToFloat(RandomVector(rmax * c, 39));
  const std::vector<float> gamma = ToFloat(RandomVector(rmax, 40));
  const std::vector<float> dout = ToFloat(RandomVector(n * oc, 41));
  auto run = [&] {
    std::vector<float> out(n * oc, 0.0f), hidden(n * rmax, 0.0f);
    std::vector<float> dinp(n * c, 0.0f), dL(oc * rmax, 0.0f), dR(rmax * c, 0.0f);
    lowrank_forward(out.data(), hidden.data(), inp.data(), L.data(), R.data(), gamma.data(), n,
                    c, oc, rmax, k);
    lowrank_backward(dinp.data(), dL.data(), dR.data(), dout.data(), inp.data(), hidden.data(),
                     L.data(), R.data(), gamma.data(), n, c, oc, rmax, k);
    std::vector<float> all;
    for (const auto* v : {&out, &hidden, &dinp, &dL, &dR}) {
      all.insert(all.end(), v->begin(), v->end());
    }
    return all;
  };
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const std::vector<float> ref = run();
  for (int threads : {2, 3}) {
    omp_set_num_threads(threads);
    const std::vector<float> got = run();
    ASSERT_EQ(got.size(), ref.size());
    EXPECT_EQ(std::memcmp(got.data(), ref.data(), ref.size() * sizeof(float)), 0)
        << threads << " threads";
  }
  omp_set_num_threads(saved);
}

TEST(LowrankFactorizeTest, ExactAtTheMatrixRank) {
  for (const auto& [oc, c] : {std::pair{9, 12}, std::pair{12, 9}}) {
    SCOPED_TRACE(oc);
    constexpr int rank = 3, rmax = 5;
    // M = A B has rank 3.
    const std::vector<double> A = RandomVector(oc * rank, 43), B = RandomVector(rank * c, 44);
    std::vector<double> M(oc * c, 0.0);
    for (int o = 0; o < oc; ++o) {
      for (int j = 0; j < rank; ++j) {
        for (int cc = 0; cc < c; ++cc) M[o * c + cc] += A[o * rank + j] * B[j * c + cc];
      }
    }
    std::vector<double> L(oc * rmax, 99.0), R(rmax * c, 99.0), sv;
    lowrank_factorize(L.data(), R.data(), M.data(), oc, c, rmax, rank, &sv);
    ASSERT_EQ(sv.size(), static_cast<size_t>(std::min(oc, c)));
    for (size_t i = 1; i < sv.size(); ++i) EXPECT_GE(sv[i - 1], sv[i]);
    EXPECT_GT(sv[rank - 1], 1e-3);
    for (size_t i = rank; i < sv.size(); ++i) EXPECT_LT(sv[i], 1e-12 * sv[0]);
    const std::vector<double> LR = Product(L, R, oc, c, rmax);
    ExpectAllNear(LR, M, 1e-12, 1e-12, "L R");
    for (int o = 0; o < oc; ++o) {
      for (int j = rank; j < rmax; ++j) EXPECT_EQ(L[o * rmax + j], 0.0);
    }
    for (int j = rank; j < rmax; ++j) {
      for (int cc = 0; cc < c; ++cc) EXPECT_EQ(R[j * c + cc], 0.0);
    }
  }
}

TEST(LowrankFactorizeTest, ErrorIsTheDiscardedSpectrum) {
  // Eckart-Young: the best rank-k approximation leaves exactly sum_{i>=k} s_i^2.
  for (const auto& [oc, c] : {std::pair{13, 10}, std::pair{10, 21}}) {
    SCOPED_TRACE(oc);
    const int rmax = 8;
    const std::vector<double> M = RandomVector(oc * c, 45);
    for (int k : {1, 4, 7}) {
      SCOPED_TRACE(k);
      std::vector<double> L(oc * rmax), R(rmax * c), sv;
      lowrank_factorize(L.data(), R.data(), M.data(), oc, c, rmax, k, &sv);
      double total = 0, discarded = 0;
      for (size_t i = 0; i < sv.size(); ++i) {
        total += sv[i] * sv[i];
        if (static_cast<int>(i) >= k) discarded += sv[i] * sv[i];
      }
      EXPECT_NEAR(total, SquaredNorm(M), 1e-12 * total);
      std::vector<double> diff = Product(L, R, oc, c, rmax);
      for (int i = 0; i < oc * c; ++i) diff[i] = M[i] - diff[i];
      EXPECT_NEAR(SquaredNorm(diff), discarded, 1e-8 * discarded);

      // Balanced factors: L^T L = R R^T = diag(s_0..s_{k-1}), zero beyond k.
      for (int i = 0; i < rmax; ++i) {
        for (int j = 0; j < rmax; ++j) {
          double ltl = 0, rrt = 0;
          for (int o = 0; o < oc; ++o) ltl += L[o * rmax + i] * L[o * rmax + j];
          for (int cc = 0; cc < c; ++cc) rrt += R[i * c + cc] * R[j * c + cc];
          const double want = (i == j && i < k) ? sv[i] : 0.0;
          EXPECT_NEAR(ltl, want, 1e-12 * sv[0]) << "L^T L [" << i << ", " << j << "]";
          EXPECT_NEAR(rrt, want, 1e-12 * sv[0]) << "R R^T [" << i << ", " << j << "]";
        }
      }
    }
  }
}

TEST(LowrankFactorizeTest, RankZeroZeroesTheFactorsAndStillReportsTheSpectrum) {
  const std::vector<double> M = RandomVector(6 * 4, 46);
  std::vector<double> L(6 * 3, 5.0), R(3 * 4, 5.0), sv;
  lowrank_factorize(L.data(), R.data(), M.data(), 6, 4, 3, 0, &sv);
  EXPECT_EQ(L, std::vector<double>(6 * 3, 0.0));
  EXPECT_EQ(R, std::vector<double>(3 * 4, 0.0));
  ASSERT_EQ(sv.size(), 4u);
  double total = 0;
  for (double s : sv) total += s * s;
  EXPECT_NEAR(total, SquaredNorm(M), 1e-12 * total);
}

TEST(LowrankFactorizeTest, FloatMatchesDouble) {
  const int oc = 12, c = 17, rmax = 6, k = 4;
  const std::vector<double> M = RandomVector(oc * c, 47);
  std::vector<double> L(oc * rmax), R(rmax * c), sv;
  lowrank_factorize(L.data(), R.data(), M.data(), oc, c, rmax, k, &sv);
  const std::vector<float> M_f = ToFloat(M);
  std::vector<float> L_f(oc * rmax), R_f(rmax * c);
  std::vector<double> sv_f;
  lowrank_factorize(L_f.data(), R_f.data(), M_f.data(), oc, c, rmax, k, &sv_f);
  ExpectAllNear(sv_f, sv, 1e-6, 1e-6, "singular values");
  const std::vector<double> LR = Product(L, R, oc, c, rmax);
  const std::vector<double> LR_f =
      Product(std::vector<double>(L_f.begin(), L_f.end()),
              std::vector<double>(R_f.begin(), R_f.end()), oc, c, rmax);
  ExpectAllNear(LR_f, LR, 1e-5, 1e-5, "L R");
}

TEST(LowrankFactorizeTest, SameBitsAcrossThreadCounts) {
  // Large enough for BDCSVD's blocked steps, whose GEMMs change bits with the thread count when
  // Eigen threads them itself (checked without the guard: 500x400 does not; 600x500 does, from
  // singular vector 62 on). In double: a float cast hides last-bit differences most of the time.
  const int oc = 600, c = 500, rmax = 128, k = 128;
  const std::vector<double> M = RandomVector(oc * c, 42);
  auto run = [&] {
    std::vector<double> L(oc * rmax), R(rmax * c), sv;
    lowrank_factorize(L.data(), R.data(), M.data(), oc, c, rmax, k, &sv);
    L.insert(L.end(), R.begin(), R.end());
    L.insert(L.end(), sv.begin(), sv.end());
    return L;
  };
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const std::vector<double> ref = run();
  omp_set_num_threads(2);
  const std::vector<double> got = run();
  ASSERT_EQ(got.size(), ref.size());
  EXPECT_EQ(std::memcmp(got.data(), ref.data(), ref.size() * sizeof(double)), 0);
  omp_set_num_threads(saved);
}

}  // namespace
}  // namespace qtrain::ops
