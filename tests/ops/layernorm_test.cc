// Tests of layernorm: hand-computed mean/var, gradients against finite differences, accumulate
// semantics, float vs double.
#include "ops/layernorm.h"

#include <cmath>
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

constexpr int N = 7, C = 13;

TEST(LayernormTest, ForwardHandComputed) {
  const std::vector<double> inp = {1, 2, 3, 4, -2, -2, -2, 6};  // N=2, C=4
  const std::vector<double> weight = {1, 2, 1, 1}, bias = {0, 0, 0.5, 0};
  std::vector<double> out(8), mean(2), rstd(2);
  layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), weight.data(),
                    bias.data(), 2, 4);
  EXPECT_DOUBLE_EQ(mean[0], 2.5);
  EXPECT_DOUBLE_EQ(rstd[0], 1 / std::sqrt(1.25 + 1e-5));  // var = (2.25+0.25+0.25+2.25)/4
  EXPECT_DOUBLE_EQ(mean[1], 0.0);
  EXPECT_DOUBLE_EQ(rstd[1], 1 / std::sqrt(12.0 + 1e-5));  // var = (4+4+4+36)/4
  const double s = rstd[0];
  EXPECT_DOUBLE_EQ(out[0], -1.5 * s);
  EXPECT_DOUBLE_EQ(out[1], 2 * (-0.5 * s));
  EXPECT_DOUBLE_EQ(out[2], 0.5 * s + 0.5);
  EXPECT_DOUBLE_EQ(out[3], 1.5 * s);
}

TEST(LayernormTest, NormalizedRowsHaveZeroMeanUnitVariance) {
  const std::vector<double> inp = RandomVector(N * C, 1, -3, 5);
  const std::vector<double> ones(C, 1.0), zeros(C, 0.0);
  std::vector<double> out(N * C), mean(N), rstd(N);
  layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), ones.data(), zeros.data(),
                    N, C);
  for (int n = 0; n < N; ++n) {
    double m = 0, v = 0;
    for (int c = 0; c < C; ++c) m += out[n * C + c];
    m /= C;
    for (int c = 0; c < C; ++c) v += (out[n * C + c] - m) * (out[n * C + c] - m);
    v /= C;
    EXPECT_NEAR(m, 0.0, 1e-12);
    EXPECT_NEAR(v, 1.0, 1e-3);  // eps = 1e-5 pulls it slightly below 1
    EXPECT_LT(v, 1.0);
  }
}

TEST(LayernormTest, BackwardMatchesFiniteDifferences) {
  std::vector<double> inp = RandomVector(N * C, 2, -2, 2);
  std::vector<double> weight = RandomVector(C, 3, 0.5, 1.5);
  std::vector<double> bias = RandomVector(C, 4);
  const std::vector<double> dout = RandomVector(N * C, 5);
  std::vector<double> out(N * C), mean(N), rstd(N);
  auto loss = [&] {
    layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), weight.data(),
                      bias.data(), N, C);
    return Dot(dout, out);
  };
  loss();
  std::vector<double> dinp(N * C, 0.0), dweight(C, 0.0), dbias(C, 0.0);
  layernorm_backward(dinp.data(), dweight.data(), dbias.data(), dout.data(), inp.data(),
                     weight.data(), mean.data(), rstd.data(), N, C);
  ExpectGradNear(dinp, NumericGrad(inp, loss), "dinp", 1e-5);
  ExpectGradNear(dweight, NumericGrad(weight, loss), "dweight");
  ExpectGradNear(dbias, NumericGrad(bias, loss), "dbias");
}

TEST(LayernormTest, BackwardAccumulates) {
  const std::vector<double> inp = RandomVector(N * C, 6), weight = RandomVector(C, 7);
  const std::vector<double> bias = RandomVector(C, 8), dout = RandomVector(N * C, 9);
  std::vector<double> out(N * C), mean(N), rstd(N);
  layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), weight.data(), bias.data(),
                    N, C);
  auto run = [&](int times, std::vector<double>& dinp, std::vector<double>& dw,
                 std::vector<double>& db) {
    dinp.assign(N * C, 0.0);
    dw.assign(C, 0.0);
    db.assign(C, 0.0);
    for (int i = 0; i < times; ++i) {
      layernorm_backward(dinp.data(), dw.data(), db.data(), dout.data(), inp.data(),
                         weight.data(), mean.data(), rstd.data(), N, C);
    }
  };
  std::vector<double> dinp1, dw1, db1, dinp2, dw2, db2;
  run(1, dinp1, dw1, db1);
  run(2, dinp2, dw2, db2);
  for (int i = 0; i < N * C; ++i) EXPECT_DOUBLE_EQ(dinp2[i], 2 * dinp1[i]);
  for (int c = 0; c < C; ++c) {
    EXPECT_DOUBLE_EQ(dw2[c], 2 * dw1[c]);
    EXPECT_DOUBLE_EQ(db2[c], 2 * db1[c]);
  }
}

TEST(LayernormTest, FloatMatchesDouble) {
  const std::vector<double> inp = RandomVector(N * C, 10, -4, 4), weight = RandomVector(C, 11);
  const std::vector<double> bias = RandomVector(C, 12);
  std::vector<double> out(N * C), mean(N), rstd(N);
  layernorm_forward(out.data(), mean.data(), rstd.data(), inp.data(), weight.data(), bias.data(),
                    N, C);
  const std::vector<float> inp_f = ToFloat(inp), w_f = ToFloat(weight), b_f = ToFloat(bias);
  std::vector<float> out_f(N * C), mean_f(N), rstd_f(N);
  layernorm_forward(out_f.data(), mean_f.data(), rstd_f.data(), inp_f.data(), w_f.data(),
                    b_f.data(), N, C);
  ExpectAllNear(out_f, out, 1e-5, 1e-5, "out");
  ExpectAllNear(mean_f, mean, 1e-6, 1e-5, "mean");
  ExpectAllNear(rstd_f, rstd, 1e-6, 1e-5, "rstd");
}

}  // namespace
}  // namespace qtrain::ops
