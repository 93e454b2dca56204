// GPT model: loss at init, whole-model gradients against finite differences.
#include "trainer/gpt.h"

#include <cmath>
#include <cstdlib>
#include <vector>

#include "gtest/gtest.h"
#include "trainer/rng.h"

namespace qtrain {
namespace {

TEST(Gpt, RejectsBadShapes) {
  EXPECT_FALSE(Gpt::Create({2, 10, 3, 16, 8}).ok());  // 3 does not divide 10
  EXPECT_FALSE(Gpt::Create({0, 8, 2, 16, 8}).ok());
}

TEST(Gpt, InitialLossNearLogVocab) {
  auto m = *Gpt::Create({2, 32, 4, 64, 16});
  m->InitWeights(1, 0.02f);
  std::vector<int32_t> x(2 * 16), y(2 * 16);
  Rng rng(3);
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = rng.NextU64() % 64;
    y[i] = rng.NextU64() % 64;
  }
  absl::StatusOr<double> loss = m->Forward(x.data(), y.data(), 2, 16);
  ASSERT_TRUE(loss.ok());
  EXPECT_NEAR(*loss, std::log(64.0), 0.05);
  x[0] = 64;
  EXPECT_FALSE(m->Forward(x.data(), y.data(), 2, 16).ok());
  EXPECT_FALSE(m->Forward(x.data(), y.data(), 2, 17).ok());
}

// A padded vocabulary (llm.c's 50257 -> 50304) adds rows to wte that are never a token and
// never a logit: loss and logits equal the unpadded model's with the same weights, the padded
// rows get no gradient, and a token id in the padding is rejected.
TEST(Gpt, PaddedVocabularyRowsStayOutOfTheSoftmax) {
  GptConfig plain{2, 16, 2, 40, 8};
  GptConfig padded = plain;
  padded.padded_vocab_size = 48;
  auto a = *Gpt::Create(plain);
  auto b = *Gpt::Create(padded);
  ASSERT_EQ(b->params().info(0).name, "wte");
  EXPECT_EQ(b->params().info(0).shape, (std::vector<int64_t>{48, 16}));
  a->InitWeights(4, 0.1f);
  b->InitWeights(4, 0.1f);
  for (int64_t i = 40 * 16; i < 48 * 16; ++i) EXPECT_EQ(b->params().param(0)[i], 0.0f);
  // Same weights, and junk in the padding that must not matter.
  for (int t = 0; t < a->params().size(); ++t) {
    const ParamInfo& info = a->params().info(t);
    std::copy(a->params().param(t), a->params().param(t) + info.size, b->params().param(t));
  }
  for (int64_t i = 40 * 16; i < 48 * 16; ++i) b->params().param(0)[i] = 5.0f;
  std::vector<int32_t> x(2 * 8), y(2 * 8);
  Rng rng(11);
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = rng.NextU64() % 40;
    y[i] = rng.NextU64() % 40;
  }
  const double la = *a->Forward(x.data(), y.data(), 2, 8);
  const double lb = *b->Forward(x.data(), y.data(), 2, 8);
  EXPECT_EQ(la, lb);
  std::vector<float> ga, gb;
  a->Logits(&ga);
  b->Logits(&gb);
  EXPECT_EQ(ga, gb);
  b->params().ZeroGrads();
  ASSERT_TRUE(b->Backward(1.0f).ok());
  for (int64_t i = 40 * 16; i < 48 * 16; ++i) ASSERT_EQ(b->params().grad(0)[i], 0.0f);
  x[3] = 44;
  EXPECT_FALSE(b->Forward(x.data(), y.data(), 2, 8).ok());
  padded.padded_vocab_size = 39;
  EXPECT_FALSE(Gpt::Create(padded).ok());
}

// Every parameter tensor's gradient, sampled, against central differences of the loss (task
// loss plus the TWEO term when on). The model runs in float, so the step and tolerance are
// loose; the ops are checked in float64 one by one in tests/ops.
void CheckGradients(const GptConfig& config) {
  auto m = *Gpt::Create(config);
  m->InitWeights(5, 0.3f);  // large init: gradients well above float noise
  const int B = 2, T = 7;
  std::vector<int32_t> x(B * T), y(B * T);
  Rng rng(9);
  for (int i = 0; i < B * T; ++i) {
    x[i] = rng.NextU64() % 13;
    y[i] = rng.NextU64() % 13;
  }
  ParamStore& p = m->params();
  p.ZeroGrads();
  ASSERT_TRUE(m->Forward(x.data(), y.data(), B, T).ok());
  ASSERT_TRUE(m->Backward(1.0f).ok());
  auto objective = [&]() { return *m->Forward(x.data(), y.data(), B, T) + m->tweo_loss(); };
  const std::vector<float> grads = p.grads();
  int checked = 0;
  for (const ParamInfo& info : p.infos()) {
    for (int k = 0; k < 3; ++k) {
      const int64_t i = info.offset + (rng.NextU64() % info.size);
      const float orig = p.params()[i];
      const float h = 1e-2f;
      p.params()[i] = orig + h;
      const double lp = objective();
      p.params()[i] = orig - h;
      const double lm = objective();
      p.params()[i] = orig;
      const double fd = (lp - lm) / (2 * h);
      EXPECT_NEAR(grads[i], fd, 2e-3 + 2e-2 * std::fabs(fd)) << info.name << " elem " << i - info.offset;
      ++checked;
    }
  }
  EXPECT_EQ(checked, 3 * p.size());
}

TEST(Gpt, GradientsMatchFiniteDifferences) {
  GptConfig c{2, 16, 2, 13, 7};
  CheckGradients(c);
}

TEST(Gpt, GradientsWithTweoMatchFiniteDifferences) {
  GptConfig c{2, 16, 2, 13, 7};
  c.tweo.enabled = true;
  c.tweo.lambda = 0.5;  // large enough to matter against the task loss
  c.tweo.tau = 1.0;
  CheckGradients(c);
}

TEST(Gpt, TweoLossMatchesFormula) {
  GptConfig c{3, 16, 2, 13, 7};
  c.tweo.enabled = true;
  auto m = *Gpt::Create(c);
  m->InitWeights(2, 0.5f);
  std::vector<int32_t> x(7, 3), y(7, 4);
  ASSERT_TRUE(m->Forward(x.data(), y.data(), 1, 7).ok());
  double want = 0;
  for (int l = 0; l < 3; ++l) {
    const float* a = m->block_output(l);
    double s = 0;
    for (int i = 0; i < 7 * 16; ++i) s += std::pow(std::fabs(a[i]) / (3.0 + 1e-6), 4.0);
    want += s / (7 * 16);
  }
  want *= 0.01 / 3;
  EXPECT_NEAR(m->tweo_loss(), want, 1e-9 + 1e-6 * want);
  const std::vector<BlockStats> st = m->block_stats();
  ASSERT_EQ(st.size(), 3u);
  for (const BlockStats& b : st) EXPECT_GT(b.peak, 0);
}

}  // namespace
}  // namespace qtrain
