// Tests of causal self-attention: softmax rows, causality, hand cases, gradients against
// finite differences, accumulate semantics, float vs double.
#include "ops/attention.h"

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

constexpr int B = 2, T = 5, C = 12, NH = 3;
constexpr int kInp = B * T * 3 * C, kOut = B * T * C, kAtt = B * NH * T * T;

TEST(AttentionTest, SoftmaxRowsSumToOneAndAreCausal) {
  const std::vector<double> inp = RandomVector(kInp, 1, -2, 2);
  std::vector<double> out(kOut), att(kAtt, -7.0);
  attention_forward(out.data(), att.data(), inp.data(), B, T, C, NH);
  for (int bh = 0; bh < B * NH; ++bh) {
    for (int t = 0; t < T; ++t) {
      const double* row = &att[(bh * T + t) * T];
      double sum = 0;
      for (int t2 = 0; t2 <= t; ++t2) {
        EXPECT_GT(row[t2], 0.0);
        sum += row[t2];
      }
      EXPECT_NEAR(sum, 1.0, 1e-14);
      for (int t2 = t + 1; t2 < T; ++t2) EXPECT_EQ(row[t2], 0.0) << "bh " << bh << " t " << t;
    }
  }
}

TEST(AttentionTest, FutureTokensDoNotChangeEarlierOutputs) {
  std::vector<double> inp = RandomVector(kInp, 2);
  std::vector<double> out1(kOut), att1(kAtt), out2(kOut), att2(kAtt);
  attention_forward(out1.data(), att1.data(), inp.data(), B, T, C, NH);
  const int t_changed = 3;
  for (int b = 0; b < B; ++b) {
    for (int j = 0; j < 3 * C; ++j) inp[(b * T + t_changed) * 3 * C + j] += 0.5 + 0.01 * j;
  }
  attention_forward(out2.data(), att2.data(), inp.data(), B, T, C, NH);
  for (int b = 0; b < B; ++b) {
    for (int t = 0; t < T; ++t) {
      bool same = true;
      for (int c = 0; c < C; ++c) same &= out1[(b * T + t) * C + c] == out2[(b * T + t) * C + c];
      if (t < t_changed) {
        EXPECT_TRUE(same) << "b " << b << " t " << t << " saw the future";
      } else {
        EXPECT_FALSE(same) << "b " << b << " t " << t << " ignored a visible token";
      }
    }
  }
}

TEST(AttentionTest, ZeroQueriesAverageTheVisibleValues) {
  // q = 0 makes every score equal, so row t is the mean of v_0..v_t; head h of the output
  // must come from columns h*hs.. of v.
  const int b = 1, t = 4, c = 6, nh = 2;
  std::vector<double> inp = RandomVector(b * t * 3 * c, 3);
  for (int i = 0; i < t; ++i) {
    for (int j = 0; j < c; ++j) inp[i * 3 * c + j] = 0.0;
  }
  std::vector<double> out(b * t * c), att(b * nh * t * t);
  attention_forward(out.data(), att.data(), inp.data(), b, t, c, nh);
  for (int i = 0; i < t; ++i) {
    for (int j = 0; j < c; ++j) {
      double mean = 0;
      for (int i2 = 0; i2 <= i; ++i2) mean += inp[i2 * 3 * c + 2 * c + j];
      mean /= (i + 1);
      EXPECT_NEAR(out[i * c + j], mean, 1e-14) << "t " << i << " c " << j;
    }
  }
}

TEST(AttentionTest, HandComputedTwoTokens) {
  // One head, hs = 2, T = 2: row 1 weights softmax(q1.k0/sqrt2, q1.k1/sqrt2).
  const std::vector<double> inp = {
      // q       k        v
      1, 0,   1, 1,   1, 2,   // t=0
      0, 2,   0, 1,   3, -1,  // t=1
  };
  std::vector<double> out(4), att(4);
  attention_forward(out.data(), att.data(), inp.data(), 1, 2, 2, 1);
  const double s0 = 2 / std::sqrt(2.0), s1 = 2 / std::sqrt(2.0);  // q1.k0 = 2, q1.k1 = 2
  const double a0 = std::exp(s0) / (std::exp(s0) + std::exp(s1));
  EXPECT_DOUBLE_EQ(att[0], 1.0);
  EXPECT_EQ(att[1], 0.0);
  EXPECT_NEAR(att[2], a0, 1e-15);
  EXPECT_NEAR(att[3], 1 - a0, 1e-15);
  EXPECT_DOUBLE_EQ(out[0], 1.0);
  EXPECT_DOUBLE_EQ(out[1], 2.0);
  EXPECT_NEAR(out[2], a0 * 1 + (1 - a0) * 3, 1e-15);
  EXPECT_NEAR(out[3], a0 * 2 + (1 - a0) * -1, 1e-15);
}

TEST(AttentionTest, BackwardMatchesFiniteDifferences) {
  std::vector<double> inp = RandomVector(kInp, 4, -1.5, 1.5);
  const std::vector<double> dout = RandomVector(kOut, 5);
  std::vector<double> out(kOut), att(kAtt);
  auto loss = [&] {
    attention_forward(out.data(), att.data(), inp.data(), B, T, C, NH);
    return Dot(dout, out);
  };
  loss();
  std::vector<double> dinp(kInp, 0.0), scratch(kAtt, 123.0);
  attention_backward(dinp.data(), scratch.data(), dout.data(), inp.data(), att.data(), B, T, C,
                     NH);
  ExpectGradNear(dinp, NumericGrad(inp, loss), "dinp", 1e-6);
}

TEST(AttentionTest, BackwardAccumulates) {
  const std::vector<double> inp = RandomVector(kInp, 6), dout = RandomVector(kOut, 7);
  std::vector<double> out(kOut), att(kAtt), scratch(kAtt);
  attention_forward(out.data(), att.data(), inp.data(), B, T, C, NH);
  std::vector<double> once(kInp, 0.0), twice(kInp, 0.0);
  attention_backward(once.data(), scratch.data(), dout.data(), inp.data(), att.data(), B, T, C,
                     NH);
  for (int i = 0; i < 2; ++i) {
    attention_backward(twice.data(), scratch.data(), dout.data(), inp.data(), att.data(), B, T,
                       C, NH);
  }
  // Contributions add into dinp one by one, so the second call rounds differently: near, not
  // bitwise.
  for (int i = 0; i < kInp; ++i) {
    EXPECT_NEAR(twice[i], 2 * once[i], 1e-13 * (1 + std::abs(once[i])));
  }
}

TEST(AttentionTest, FloatMatchesDouble) {
  const std::vector<double> inp = RandomVector(kInp, 8, -2, 2);
  std::vector<double> out(kOut), att(kAtt);
  attention_forward(out.data(), att.data(), inp.data(), B, T, C, NH);
  const std::vector<float> inp_f = ToFloat(inp);
  std::vector<float> out_f(kOut), att_f(kAtt);
  attention_forward(out_f.data(), att_f.data(), inp_f.data(), B, T, C, NH);
  ExpectAllNear(out_f, out, 1e-5, 1e-5, "out");
  ExpectAllNear(att_f, att, 1e-6, 1e-5, "att");
}

}  // namespace
}  // namespace qtrain::ops
