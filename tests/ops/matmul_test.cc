// Tests of the linear layer: hand values, a naive reference across the row/column block
// boundaries, gradients against finite differences, null bias/dinp, accumulate, float vs
// double.
#include "ops/matmul.h"

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

constexpr int N = 7, C = 5, OC = 9;

std::vector<double> NaiveForward(const std::vector<double>& inp, const std::vector<double>& w,
                                 const std::vector<double>* bias, int n, int c, int oc) {
  std::vector<double> out(static_cast<size_t>(n) * oc);
  for (int i = 0; i < n; ++i) {
    for (int o = 0; o < oc; ++o) {
      double s = bias ? (*bias)[o] : 0.0;
      for (int k = 0; k < c; ++k) s += inp[i * c + k] * w[o * c + k];
      out[i * oc + o] = s;
    }
  }
  return out;
}

TEST(MatmulTest, ForwardHandComputed) {
  const std::vector<double> inp = {1, 2, 3, 4, 5, 6};   // (2,3)
  const std::vector<double> w = {1, 0, -1, 2, 1, 0};    // (2,3)
  const std::vector<double> bias = {0.5, -1};
  std::vector<double> out(4);
  matmul_forward(out.data(), inp.data(), w.data(), bias.data(), 2, 3, 2);
  EXPECT_EQ(out, (std::vector<double>{1 - 3 + 0.5, 2 + 2 - 1, 4 - 6 + 0.5, 8 + 5 - 1}));
  matmul_forward(out.data(), inp.data(), w.data(), static_cast<const double*>(nullptr), 2, 3, 2);
  EXPECT_EQ(out, (std::vector<double>{-2, 4, -2, 13}));
}

TEST(MatmulTest, ForwardMatchesNaiveAcrossBlocks) {
  const int n = 150, c = 33, oc = 70;  // several row blocks and output-channel blocks, ragged
  const std::vector<double> inp = RandomVector(n * c, 1), w = RandomVector(oc * c, 2);
  const std::vector<double> bias = RandomVector(oc, 3);
  std::vector<double> out(n * oc);
  matmul_forward(out.data(), inp.data(), w.data(), bias.data(), n, c, oc);
  ExpectAllNear(out, NaiveForward(inp, w, &bias, n, c, oc), 1e-12, 1e-12, "out");
}

TEST(MatmulTest, BackwardMatchesFiniteDifferences) {
  std::vector<double> inp = RandomVector(N * C, 4), w = RandomVector(OC * C, 5);
  std::vector<double> bias = RandomVector(OC, 6);
  const std::vector<double> dout = RandomVector(N * OC, 7);
  std::vector<double> out(N * OC);
  auto loss = [&] {
    matmul_forward(out.data(), inp.data(), w.data(), bias.data(), N, C, OC);
    return Dot(dout, out);
  };
  std::vector<double> dinp(N * C, 0.0), dw(OC * C, 0.0), db(OC, 0.0);
  matmul_backward(dinp.data(), dw.data(), db.data(), dout.data(), inp.data(), w.data(), N, C,
                  OC);
  ExpectGradNear(dinp, NumericGrad(inp, loss), "dinp");
  ExpectGradNear(dw, NumericGrad(w, loss), "dweight");
  ExpectGradNear(db, NumericGrad(bias, loss), "dbias");
}

TEST(MatmulTest, BackwardAcrossBlocksMatchesNaive) {
  const int n = 150, c = 33, oc = 70;
  const std::vector<double> inp = RandomVector(n * c, 8), w = RandomVector(oc * c, 9);
  const std::vector<double> dout = RandomVector(n * oc, 10);
  std::vector<double> dinp(n * c, 1.0), dw(oc * c, 2.0), db(oc, 3.0);
  matmul_backward(dinp.data(), dw.data(), db.data(), dout.data(), inp.data(), w.data(), n, c,
                  oc);
  std::vector<double> ref_dinp(n * c, 1.0), ref_dw(oc * c, 2.0), ref_db(oc, 3.0);
  for (int i = 0; i < n; ++i) {
    for (int o = 0; o < oc; ++o) {
      const double g = dout[i * oc + o];
      ref_db[o] += g;
      for (int k = 0; k < c; ++k) {
        ref_dinp[i * c + k] += g * w[o * c + k];
        ref_dw[o * c + k] += g * inp[i * c + k];
      }
    }
  }
  ExpectAllNear(dinp, ref_dinp, 1e-12, 1e-12, "dinp");
  ExpectAllNear(dw, ref_dw, 1e-12, 1e-12, "dweight");
  ExpectAllNear(db, ref_db, 1e-12, 1e-12, "dbias");
}

TEST(MatmulTest, BackwardWithNullDinpAndDbias) {
  const std::vector<double> inp = RandomVector(N * C, 11), w = RandomVector(OC * C, 12);
  const std::vector<double> dout = RandomVector(N * OC, 13);
  std::vector<double> dinp(N * C, 0.0), dw_full(OC * C, 0.0), db(OC, 0.0);
  matmul_backward(dinp.data(), dw_full.data(), db.data(), dout.data(), inp.data(), w.data(), N,
                  C, OC);
  std::vector<double> dw(OC * C, 0.0);
  matmul_backward(static_cast<double*>(nullptr), dw.data(), static_cast<double*>(nullptr),
                  dout.data(), inp.data(), w.data(), N, C, OC);
  EXPECT_EQ(dw, dw_full);
}

TEST(MatmulTest, BackwardAccumulates) {
  const std::vector<double> inp = RandomVector(N * C, 14), w = RandomVector(OC * C, 15);
  const std::vector<double> dout = RandomVector(N * OC, 16);
  std::vector<double> dinp1(N * C, 0.0), dw1(OC * C, 0.0), db1(OC, 0.0);
  matmul_backward(dinp1.data(), dw1.data(), db1.data(), dout.data(), inp.data(), w.data(), N, C,
                  OC);
  std::vector<double> dinp2(N * C, 0.0), dw2(OC * C, 0.0), db2(OC, 0.0);
  for (int i = 0; i < 2; ++i) {
    matmul_backward(dinp2.data(), dw2.data(), db2.data(), dout.data(), inp.data(), w.data(), N,
                    C, OC);
  }
  for (int i = 0; i < N * C; ++i) EXPECT_DOUBLE_EQ(dinp2[i], 2 * dinp1[i]);
  for (int i = 0; i < OC * C; ++i) EXPECT_DOUBLE_EQ(dw2[i], 2 * dw1[i]);
  for (int i = 0; i < OC; ++i) EXPECT_DOUBLE_EQ(db2[i], 2 * db1[i]);
}

TEST(MatmulTest, FloatMatchesDouble) {
  const int n = 70, c = 41, oc = 37;
  const std::vector<double> inp = RandomVector(n * c, 17), w = RandomVector(oc * c, 18);
  const std::vector<double> bias = RandomVector(oc, 19);
  std::vector<double> out(n * oc);
  matmul_forward(out.data(), inp.data(), w.data(), bias.data(), n, c, oc);
  const std::vector<float> inp_f = ToFloat(inp), w_f = ToFloat(w), b_f = ToFloat(bias);
  std::vector<float> out_f(n * oc);
  matmul_forward(out_f.data(), inp_f.data(), w_f.data(), b_f.data(), n, c, oc);
  ExpectAllNear(out_f, out, 1e-5, 1e-5, "out");
}

}  // namespace
}  // namespace qtrain::ops
