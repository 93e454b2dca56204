// Tests of the residual add: values, gradients against finite differences, accumulate.
#include "ops/residual.h"

#include <vector>

#include "gtest/gtest.h"
#include "tests/ops/grad_check.h"

namespace qtrain::ops {
namespace {

using testing::Dot;
using testing::ExpectGradNear;
using testing::NumericGrad;
using testing::RandomVector;

constexpr int kN = 13;

TEST(ResidualTest, ForwardAdds) {
  const std::vector<float> a = {1.f, -2.f, 3.5f}, b = {0.5f, 2.f, -1.f};
  std::vector<float> out(3);
  residual_forward(out.data(), a.data(), b.data(), 3);
  EXPECT_EQ(out, (std::vector<float>{1.5f, 0.f, 2.5f}));
}

TEST(ResidualTest, BackwardMatchesFiniteDifferences) {
  std::vector<double> a = RandomVector(kN, 1), b = RandomVector(kN, 2);
  const std::vector<double> dout = RandomVector(kN, 3);
  std::vector<double> out(kN);
  auto loss = [&] {
    residual_forward(out.data(), a.data(), b.data(), kN);
    return Dot(dout, out);
  };
  std::vector<double> da(kN, 0.0), db(kN, 0.0);
  residual_backward(da.data(), db.data(), dout.data(), kN);
  ExpectGradNear(da, NumericGrad(a, loss), "dinp1");
  ExpectGradNear(db, NumericGrad(b, loss), "dinp2");
}

TEST(ResidualTest, BackwardAccumulatesIntoBoth) {
  const std::vector<double> dout = RandomVector(kN, 4);
  std::vector<double> da(kN, 1.0), db(kN, -1.0);
  residual_backward(da.data(), db.data(), dout.data(), kN);
  residual_backward(da.data(), db.data(), dout.data(), kN);
  for (int i = 0; i < kN; ++i) {
    EXPECT_DOUBLE_EQ(da[i], 1.0 + 2 * dout[i]);
    EXPECT_DOUBLE_EQ(db[i], -1.0 + 2 * dout[i]);
  }
}

}  // namespace
}  // namespace qtrain::ops
