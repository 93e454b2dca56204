// Tests of the fused tied LM head + cross-entropy: uniform logits, a hand case, stability,
// gradients against finite differences, accumulate semantics, float vs double.
#include "ops/crossentropy.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "tests/ops/grad_check.h"

namespace qtrain::ops {
namespace {

using testing::ExpectAllNear;
using testing::ExpectGradNear;
using testing::NumericGrad;
using testing::RandomTokens;
using testing::RandomVector;
using testing::ToFloat;

constexpr int N = 7, C = 5, V = 11;

TEST(CrossEntropyTest, UniformLogitsGiveLogV) {
  const std::vector<double> x(N * C, 0.0);  // zero features -> all logits 0
  const std::vector<double> wte = RandomVector(V * C, 1);
  const std::vector<int32_t> targets = RandomTokens(N, V, 2);
  std::vector<double> losses(N), probs(N * V);
  const double mean = lm_head_crossentropy_forward(losses.data(), probs.data(), x.data(),
                                                   wte.data(), targets.data(), N, C, V);
  EXPECT_NEAR(mean, std::log(static_cast<double>(V)), 1e-14);
  for (int n = 0; n < N; ++n) EXPECT_NEAR(losses[n], std::log(static_cast<double>(V)), 1e-14);
  for (double p : probs) EXPECT_NEAR(p, 1.0 / V, 1e-15);
}

TEST(CrossEntropyTest, HandComputedTwoClasses) {
  // C = 1, x = 1: logits are wte itself.
  const std::vector<double> x = {1.0, 1.0};
  const std::vector<double> wte = {2.0, -1.0};
  const std::vector<int32_t> targets = {0, 1};
  std::vector<double> losses(2), probs(4);
  const double mean = lm_head_crossentropy_forward(losses.data(), probs.data(), x.data(),
                                                   wte.data(), targets.data(), 2, 1, 2);
  const double lse = std::log(std::exp(2.0) + std::exp(-1.0));
  EXPECT_NEAR(losses[0], lse - 2.0, 1e-15);
  EXPECT_NEAR(losses[1], lse + 1.0, 1e-15);
  EXPECT_NEAR(mean, lse + (-2.0 + 1.0) / 2, 1e-15);
  EXPECT_NEAR(probs[0], std::exp(2.0 - lse), 1e-15);
  EXPECT_NEAR(probs[0] + probs[1], 1.0, 1e-15);
}

TEST(CrossEntropyTest, LargeLogitsStayFinite) {
  const std::vector<float> x = {1000.f, -1000.f};  // C = 1, N = 2
  const std::vector<float> wte = {1.f, 0.f, -1.f};  // V = 3
  const std::vector<int32_t> targets = {2, 2};       // worst class first, best class second
  std::vector<float> losses(2), probs(6);
  const double mean = lm_head_crossentropy_forward(losses.data(), probs.data(), x.data(),
                                                   wte.data(), targets.data(), 2, 1, 3);
  EXPECT_FLOAT_EQ(losses[0], 2000.f);  // logits 1000, 0, -1000: loss = 1000 - (-1000)
  EXPECT_NEAR(losses[1], 0.f, 1e-6);
  EXPECT_NEAR(mean, 1000.0, 1e-3);
  for (float p : probs) EXPECT_TRUE(std::isfinite(p));
}

TEST(CrossEntropyTest, BackwardMatchesFiniteDifferences) {
  std::vector<double> x = RandomVector(N * C, 3), wte = RandomVector(V * C, 4);
  const std::vector<int32_t> targets = RandomTokens(N, V, 5);
  const double dloss = 0.7;
  std::vector<double> losses(N), probs(N * V);
  auto loss = [&] {
    return dloss * lm_head_crossentropy_forward(losses.data(), probs.data(), x.data(),
                                                wte.data(), targets.data(), N, C, V);
  };
  loss();
  std::vector<double> dx(N * C, 0.0), dwte(V * C, 0.0);
  lm_head_crossentropy_backward(dx.data(), dwte.data(), probs.data(), x.data(), wte.data(),
                                targets.data(), N, C, V, dloss);
  // Gradients here are O(0.1), so ExpectGradNear's floor of 1 makes 1e-7 an absolute bound.
  ExpectGradNear(dx, NumericGrad(x, loss), "dx", 1e-7);
  ExpectGradNear(dwte, NumericGrad(wte, loss), "dwte", 1e-7);
}

TEST(CrossEntropyTest, BackwardWritesDlogitsIntoProbs) {
  const std::vector<double> x = RandomVector(N * C, 6), wte = RandomVector(V * C, 7);
  const std::vector<int32_t> targets = RandomTokens(N, V, 8);
  std::vector<double> losses(N), probs(N * V);
  lm_head_crossentropy_forward(losses.data(), probs.data(), x.data(), wte.data(),
                               targets.data(), N, C, V);
  const std::vector<double> saved = probs;
  std::vector<double> dx(N * C, 0.0), dwte(V * C, 0.0);
  lm_head_crossentropy_backward(dx.data(), dwte.data(), probs.data(), x.data(), wte.data(),
                                targets.data(), N, C, V, 2.0);
  for (int n = 0; n < N; ++n) {
    double row_sum = 0;
    for (int v = 0; v < V; ++v) {
      const double expect = (saved[n * V + v] - (v == targets[n] ? 1.0 : 0.0)) * 2.0 / N;
      EXPECT_NEAR(probs[n * V + v], expect, 1e-16);
      row_sum += probs[n * V + v];
    }
    EXPECT_NEAR(row_sum, 0.0, 1e-15);  // softmax gradients sum to zero per row
  }
}

TEST(CrossEntropyTest, BackwardAccumulates) {
  const std::vector<double> x = RandomVector(N * C, 9), wte = RandomVector(V * C, 10);
  const std::vector<int32_t> targets = RandomTokens(N, V, 11);
  std::vector<double> losses(N), probs(N * V);
  auto step = [&](std::vector<double>& dx, std::vector<double>& dwte) {
    lm_head_crossentropy_forward(losses.data(), probs.data(), x.data(), wte.data(),
                                 targets.data(), N, C, V);  // backward consumed probs
    lm_head_crossentropy_backward(dx.data(), dwte.data(), probs.data(), x.data(), wte.data(),
                                  targets.data(), N, C, V, 1.0);
  };
  std::vector<double> dx1(N * C, 0.0), dwte1(V * C, 0.0), dx2(N * C, 0.0), dwte2(V * C, 0.0);
  step(dx1, dwte1);
  step(dx2, dwte2);
  step(dx2, dwte2);
  for (int i = 0; i < N * C; ++i) EXPECT_DOUBLE_EQ(dx2[i], 2 * dx1[i]);
  for (int i = 0; i < V * C; ++i) EXPECT_DOUBLE_EQ(dwte2[i], 2 * dwte1[i]);
}

TEST(CrossEntropyTest, FloatMatchesDouble) {
  const std::vector<double> x = RandomVector(N * C, 12, -2, 2), wte = RandomVector(V * C, 13);
  const std::vector<int32_t> targets = RandomTokens(N, V, 14);
  std::vector<double> losses(N), probs(N * V);
  const double mean = lm_head_crossentropy_forward(losses.data(), probs.data(), x.data(),
                                                   wte.data(), targets.data(), N, C, V);
  const std::vector<float> x_f = ToFloat(x), wte_f = ToFloat(wte);
  std::vector<float> losses_f(N), probs_f(N * V);
  const double mean_f = lm_head_crossentropy_forward(losses_f.data(), probs_f.data(),
                                                     x_f.data(), wte_f.data(), targets.data(),
                                                     N, C, V);
  EXPECT_NEAR(mean_f, mean, 1e-5);
  ExpectAllNear(losses_f, losses, 1e-5, 1e-5, "losses");
  ExpectAllNear(probs_f, probs, 1e-6, 1e-5, "probs");
}

}  // namespace
}  // namespace qtrain::ops
