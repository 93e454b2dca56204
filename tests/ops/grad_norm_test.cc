// Tests of the gradient norm and global-norm clipping.
#include "ops/grad_norm.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "tests/ops/grad_check.h"

namespace qtrain::ops {
namespace {

using testing::RandomVector;

TEST(GradNormTest, SumSquaresHandComputed) {
  const std::vector<float> g = {3.f, -4.f, 0.f, 0.5f};
  EXPECT_DOUBLE_EQ(sum_squares(g.data(), 4), 25.25);
  EXPECT_DOUBLE_EQ(sum_squares(g.data(), 0), 0.0);
}

TEST(GradNormTest, SumSquaresAccumulatesInDouble) {
  // 2^25 ones: a float accumulator would stall at 2^24.
  const std::vector<float> g(1 << 25, 1.f);
  EXPECT_EQ(sum_squares(g.data(), static_cast<int64_t>(g.size())), double(1 << 25));
}

TEST(GradNormTest, ClipScalesDownToMaxNorm) {
  std::vector<double> g = RandomVector(11, 1, -3, 3);
  const std::vector<double> g0 = g;
  const double norm = std::sqrt(sum_squares(g.data(), 11));
  ASSERT_GT(norm, 1.0);
  const double factor = clip_by_global_norm(g.data(), 11, norm, 1.0);
  EXPECT_DOUBLE_EQ(factor, 1.0 / (norm + 1e-6));
  for (int i = 0; i < 11; ++i) EXPECT_DOUBLE_EQ(g[i], g0[i] * factor);
  EXPECT_NEAR(std::sqrt(sum_squares(g.data(), 11)), 1.0, 1e-6);
}

TEST(GradNormTest, ClipLeavesSmallGradientsAlone) {
  std::vector<float> g = {0.1f, -0.2f};
  const double norm = std::sqrt(sum_squares(g.data(), 2));
  EXPECT_EQ(clip_by_global_norm(g.data(), 2, norm, 1.0), 1.f);
  EXPECT_EQ(g, (std::vector<float>{0.1f, -0.2f}));
  // At norm == max_norm the 1e-6 guard still shaves a hair off, as the formula says.
  EXPECT_LT(clip_by_global_norm(g.data(), 2, 1.0, 1.0), 1.f);
}

}  // namespace
}  // namespace qtrain::ops
