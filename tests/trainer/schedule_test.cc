// Cosine schedule with warmup.
#include "trainer/schedule.h"

#include "gtest/gtest.h"

namespace qtrain {
namespace {

TEST(CosineSchedule, WarmupThenCosineToMin) {
  CosineSchedule s{1.0f, 10, 110, 0.1f};
  EXPECT_FLOAT_EQ(s.LrAt(0), 0.1f);
  EXPECT_FLOAT_EQ(s.LrAt(4), 0.5f);
  EXPECT_FLOAT_EQ(s.LrAt(9), 1.0f);
  EXPECT_FLOAT_EQ(s.LrAt(10), 1.0f);
  EXPECT_NEAR(s.LrAt(60), 0.55f, 1e-6);  // halfway: min + (peak-min)/2
  EXPECT_NEAR(s.LrAt(110), 0.1f, 1e-6);
  EXPECT_NEAR(s.LrAt(500), 0.1f, 1e-6);  // clamps past the end
  for (int i = 11; i < 110; ++i) EXPECT_LE(s.LrAt(i), s.LrAt(i - 1));
}

TEST(CosineSchedule, NoWarmup) {
  CosineSchedule s{2.0f, 0, 100, 0.0f};
  EXPECT_FLOAT_EQ(s.LrAt(0), 2.0f);
  EXPECT_NEAR(s.LrAt(100), 0.0f, 1e-6);
}

}  // namespace
}  // namespace qtrain
