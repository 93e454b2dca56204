// Tests of GELU (tanh approximation): hand values, asymptotes, gradients against finite
// differences, accumulate semantics, float vs double.
#include "ops/gelu.h"

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

constexpr int kN = 17;

double Gelu(double x) {
  return 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
}

TEST(GeluTest, ForwardValues) {
  const std::vector<double> inp = {0.0, 1.0, -1.0, 2.5, 30.0, -30.0};
  std::vector<double> out(inp.size());
  gelu_forward(out.data(), inp.data(), static_cast<int64_t>(inp.size()));
  EXPECT_EQ(out[0], 0.0);
  EXPECT_NEAR(out[1], 0.8411919906082768, 1e-15);  // tanh form at 1
  EXPECT_NEAR(out[2], -0.15880800939172324, 1e-15);
  EXPECT_NEAR(out[3], Gelu(2.5), 1e-15);
  EXPECT_DOUBLE_EQ(out[4], 30.0);
  EXPECT_EQ(out[5], 0.0);
}

TEST(GeluTest, BackwardMatchesFiniteDifferences) {
  std::vector<double> inp = RandomVector(kN, 1, -4, 4);
  const std::vector<double> dout = RandomVector(kN, 2);
  std::vector<double> out(kN);
  auto loss = [&] {
    gelu_forward(out.data(), inp.data(), kN);
    return Dot(dout, out);
  };
  std::vector<double> dinp(kN, 0.0);
  gelu_backward(dinp.data(), inp.data(), dout.data(), kN);
  ExpectGradNear(dinp, NumericGrad(inp, loss), "dinp");
}

TEST(GeluTest, BackwardFiniteForLargeInputs) {
  const std::vector<float> inp = {100.f, -100.f, 1e4f, -1e4f};
  const std::vector<float> dout(4, 1.f);
  std::vector<float> dinp(4, 0.f);
  gelu_backward(dinp.data(), inp.data(), dout.data(), 4);
  EXPECT_FLOAT_EQ(dinp[0], 1.f);
  EXPECT_FLOAT_EQ(dinp[1], 0.f);
  EXPECT_FLOAT_EQ(dinp[2], 1.f);
  EXPECT_FLOAT_EQ(dinp[3], 0.f);
}

TEST(GeluTest, BackwardAccumulates) {
  const std::vector<double> inp = RandomVector(kN, 3, -3, 3), dout = RandomVector(kN, 4);
  std::vector<double> start = RandomVector(kN, 5), once = start, twice = start;
  gelu_backward(once.data(), inp.data(), dout.data(), kN);
  gelu_backward(twice.data(), inp.data(), dout.data(), kN);
  gelu_backward(twice.data(), inp.data(), dout.data(), kN);
  for (int i = 0; i < kN; ++i) EXPECT_NEAR(twice[i] - start[i], 2 * (once[i] - start[i]), 1e-14);
}

TEST(GeluTest, FloatMatchesDouble) {
  const std::vector<double> inp = RandomVector(kN, 6, -5, 5), dout = RandomVector(kN, 7);
  std::vector<double> out(kN), dinp(kN, 0.0);
  gelu_forward(out.data(), inp.data(), kN);
  gelu_backward(dinp.data(), inp.data(), dout.data(), kN);
  const std::vector<float> inp_f = ToFloat(inp), dout_f = ToFloat(dout);
  std::vector<float> out_f(kN), dinp_f(kN, 0.f);
  gelu_forward(out_f.data(), inp_f.data(), kN);
  gelu_backward(dinp_f.data(), inp_f.data(), dout_f.data(), kN);
  ExpectAllNear(out_f, out, 1e-6, 1e-6, "out");
  ExpectAllNear(dinp_f, dinp, 1e-6, 1e-5, "dinp");
}

}  // namespace
}  // namespace qtrain::ops
