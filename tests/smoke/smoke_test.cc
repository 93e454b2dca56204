#include "gtest/gtest.h"
#include "ops/status_macros.h"
#include <Eigen/Dense>
absl::StatusOr<int> F(int x) { QT_CHECK_ARG(x > 0, "x=", x); return x; }
absl::Status G(int x) { ASSIGN_OR_RETURN(int y, F(x)); (void)y; return absl::OkStatus(); }
TEST(Smoke, Works) { EXPECT_FALSE(G(-1).ok()); EXPECT_TRUE(G(1).ok()); Eigen::MatrixXf m(2,2); }
