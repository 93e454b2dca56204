// GPT model: loss at init, whole-model gradients against finite differences, residual-stream
// fake quantization and its calibration.
#include "trainer/gpt.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
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

// ---- residual-stream fake quantization (evaluation-only PTQ of the stream itself) ----

// A large-init model whose targets are its own argmax predictions: the full-precision loss is
// well below log V, so whatever corrupts the stream shows as a loss increase.
struct Confident {
  std::unique_ptr<Gpt> m;
  std::vector<int32_t> x, y;
  int B = 2, T = 8;
  double fp_loss = 0;
};

Confident MakeConfident(const GptConfig& c, uint64_t seed) {
  Confident f;
  f.m = *Gpt::Create(c);
  f.m->InitWeights(seed, 0.5f);
  const int n = f.B * f.T, V = c.vocab_size;
  f.x.resize(n);
  f.y.resize(n);
  Rng rng(seed + 1);
  for (int i = 0; i < n; ++i) f.x[i] = rng.NextU64() % V;
  EXPECT_TRUE(f.m->Forward(f.x.data(), nullptr, f.B, f.T).ok());
  std::vector<float> logits;
  f.m->Logits(&logits);
  for (int i = 0; i < n; ++i) {
    const float* row = logits.data() + static_cast<size_t>(i) * V;
    f.y[i] = static_cast<int32_t>(std::max_element(row, row + V) - row);
  }
  f.fp_loss = *f.m->Forward(f.x.data(), f.y.data(), f.B, f.T);
  return f;
}

// Calibrates every residual point on f's batch and returns the static steps for `bits`.
ResidualQuant Calibrate(Confident& f, int bits) {
  f.m->set_residual_calibrating(true);
  EXPECT_TRUE(f.m->Forward(f.x.data(), nullptr, f.B, f.T).ok());
  f.m->set_residual_calibrating(false);
  return *ResidualQuantFromAmax(bits, f.m->residual_calibrated_amax());
}

const GptConfig kResidualModel{3, 32, 4, 64, 8};

TEST(GptResidualQuant, EightBitStreamIsOnTheGridAndCloseToFullPrecision) {
  Confident f = MakeConfident(kResidualModel, 21);
  ASSERT_LT(f.fp_loss, std::log(64.0) - 1.0);
  const int P = Gpt::num_residual_points(3);
  ASSERT_EQ(P, 7);
  const int64_t n = static_cast<int64_t>(f.B) * f.T * 32;
  // The full-precision stream is not on any such grid (so the check below can fail).
  const ResidualQuant rq = Calibrate(f, 8);
  ASSERT_TRUE(f.m->Forward(f.x.data(), f.y.data(), f.B, f.T).ok());
  int off_grid = 0;
  for (int p = 0; p < P; ++p) {
    for (int64_t i = 0; i < n; ++i) {
      const double r = f.m->residual_point(p)[i] / rq.steps[p];
      off_grid += std::fabs(r - std::nearbyint(r)) > 1e-3;
    }
  }
  EXPECT_GT(off_grid, P * n / 2);

  ASSERT_TRUE(f.m->set_residual_quant(rq).ok());
  const double q_loss = *f.m->Forward(f.x.data(), f.y.data(), f.B, f.T);
  for (int p = 0; p < P; ++p) {
    const float* v = f.m->residual_point(p);
    int levels_used_above_64 = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double r = v[i] / rq.steps[p];
      ASSERT_NEAR(r, std::nearbyint(r), 1e-3) << "point " << p << " elem " << i;
      ASSERT_GE(std::nearbyint(r), -128) << "point " << p;
      ASSERT_LE(std::nearbyint(r), 127) << "point " << p;
      levels_used_above_64 += std::fabs(r) > 64;
    }
    EXPECT_GT(levels_used_above_64, 0) << "point " << p << " uses only a corner of the range";
  }
  // block_output is the same (quantized) stream.
  EXPECT_EQ(f.m->block_output(2), f.m->residual_point(6));
  EXPECT_NE(q_loss, f.fp_loss);
  EXPECT_NEAR(q_loss, f.fp_loss, 0.05);
}

TEST(GptResidualQuant, CoarseQuantizationIsClearlyWorse) {
  Confident f = MakeConfident(kResidualModel, 21);
  ASSERT_TRUE(f.m->set_residual_quant(Calibrate(f, 8)).ok());
  const double q8 = *f.m->Forward(f.x.data(), f.y.data(), f.B, f.T);
  ASSERT_TRUE(f.m->set_residual_quant(Calibrate(f, 2)).ok());
  const double q2 = *f.m->Forward(f.x.data(), f.y.data(), f.B, f.T);
  // Measured: fp 0.917, 8-bit stream 0.938, 2-bit stream 6.41.
  EXPECT_GT(q2, f.fp_loss + 2.0) << "fp " << f.fp_loss << " 8-bit " << q8 << " 2-bit " << q2;
  EXPECT_GT(q2 - f.fp_loss, 20 * (q8 - f.fp_loss));
  // A step far above every |x| rounds the whole stream to 0.
  ResidualQuant huge{8, std::vector<float>(7, 1e4f)};
  ASSERT_TRUE(f.m->set_residual_quant(huge).ok());
  const double q_huge = *f.m->Forward(f.x.data(), f.y.data(), f.B, f.T);
  const int64_t n = static_cast<int64_t>(f.B) * f.T * 32;
  for (int p = 0; p < 7; ++p) {
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(f.m->residual_point(p)[i], 0.0f) << p;
  }
  EXPECT_GT(q_huge, f.fp_loss + 1.0);
}

TEST(GptResidualQuant, CalibrationRecordsTheAbsmaxOfEachPoint) {
  const GptConfig c = kResidualModel;
  auto m = *Gpt::Create(c);
  m->InitWeights(8, 0.5f);
  const int B = 2, T = 8, C = c.n_embd, P = Gpt::num_residual_points(c.n_layer);
  const int64_t n = static_cast<int64_t>(B) * T * C;
  EXPECT_EQ(m->residual_calibrated_amax(), std::vector<float>(P, 0.0f));
  std::vector<float> want(P, 0.0f);
  Rng rng(5);
  for (int batch = 0; batch < 2; ++batch) {
    std::vector<int32_t> x(B * T);
    for (int32_t& t : x) t = rng.NextU64() % c.vocab_size;
    m->set_residual_calibrating(true);
    ASSERT_TRUE(m->Forward(x.data(), nullptr, B, T).ok());
    m->set_residual_calibrating(false);
    // Point 0 directly: wte[token] + wpe[position].
    const float* wte = m->params().param(0);
    const float* wpe = m->params().param(1);
    for (int i = 0; i < B * T; ++i) {
      for (int k = 0; k < C; ++k) {
        const float e = wte[static_cast<int64_t>(x[i]) * C + k] + wpe[(i % T) * C + k];
        want[0] = std::max(want[0], std::fabs(e));
      }
    }
    for (int l = 0; l < c.n_layer; ++l) {
      for (int64_t i = 0; i < n; ++i) {
        want[1 + 2 * l] = std::max(want[1 + 2 * l], std::fabs(m->residual_point(1 + 2 * l)[i]));
        want[2 + 2 * l] = std::max(want[2 + 2 * l], std::fabs(m->block_output(l)[i]));
      }
    }
    // A running max over both batches, point by point.
    EXPECT_EQ(m->residual_calibrated_amax(), want) << "after batch " << batch;
  }
  // The stream grows through the blocks, so the points are not interchangeable.
  EXPECT_NE(want[0], want[P - 1]);
  // Calibrating with the quantizer on records the unquantized stream and leaves it alone.
  std::vector<int32_t> x(B * T, 3);
  ASSERT_TRUE(m->Forward(x.data(), nullptr, B, T).ok());
  const std::vector<float> fp(m->block_output(2), m->block_output(2) + n);
  ASSERT_TRUE(m->set_residual_quant(ResidualQuant{2, std::vector<float>(P, 1.0f)}).ok());
  ASSERT_TRUE(m->Forward(x.data(), nullptr, B, T).ok());
  EXPECT_NE(std::vector<float>(m->block_output(2), m->block_output(2) + n), fp);
  m->set_residual_calibrating(true);
  ASSERT_TRUE(m->Forward(x.data(), nullptr, B, T).ok());
  m->set_residual_calibrating(false);
  EXPECT_EQ(std::vector<float>(m->block_output(2), m->block_output(2) + n), fp);
}

TEST(GptResidualQuant, OffIsBitIdentical) {
  const GptConfig c = kResidualModel;
  auto a = *Gpt::Create(c);
  auto b = *Gpt::Create(c);
  a->InitWeights(4, 0.5f);
  b->InitWeights(4, 0.5f);
  std::vector<int32_t> x(2 * 8), y(2 * 8);
  Rng rng(7);
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = rng.NextU64() % 64;
    y[i] = rng.NextU64() % 64;
  }
  const double la = *a->Forward(x.data(), y.data(), 2, 8, /*training=*/true);
  a->params().ZeroGrads();
  ASSERT_TRUE(a->Backward(1.0f).ok());
  std::vector<float> ga;
  a->Logits(&ga);
  // b: quantizer on, then off; a calibration pass; then the same training step as a.
  ResidualQuant rq{8, std::vector<float>(7, 0.01f)};
  ASSERT_TRUE(b->set_residual_quant(rq).ok());
  const double lq = *b->Forward(x.data(), y.data(), 2, 8);
  EXPECT_NE(lq, la);
  ASSERT_TRUE(b->set_residual_quant(std::nullopt).ok());
  b->set_residual_calibrating(true);
  EXPECT_EQ(*b->Forward(x.data(), y.data(), 2, 8), la);
  b->set_residual_calibrating(false);
  EXPECT_EQ(*b->Forward(x.data(), y.data(), 2, 8, /*training=*/true), la);
  b->params().ZeroGrads();
  ASSERT_TRUE(b->Backward(1.0f).ok());
  std::vector<float> gb;
  b->Logits(&gb);
  EXPECT_EQ(ga, gb);
  EXPECT_EQ(a->params().grads(), b->params().grads());
}

TEST(GptResidualQuant, TrainingWithItOnFailsClearly) {
  auto m = *Gpt::Create(kResidualModel);
  m->InitWeights(4, 0.1f);
  std::vector<int32_t> x(8, 1), y(8, 2);
  ASSERT_TRUE(m->set_residual_quant(ResidualQuant{8, std::vector<float>(7, 0.05f)}).ok());
  absl::StatusOr<double> train = m->Forward(x.data(), y.data(), 1, 8, /*training=*/true);
  ASSERT_FALSE(train.ok());
  EXPECT_EQ(train.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(train.status().message().find("evaluation-only"), std::string::npos)
      << train.status();
  EXPECT_NE(train.status().message().find("set_residual_quant"), std::string::npos);
  ASSERT_TRUE(m->Forward(x.data(), y.data(), 1, 8).ok());
  absl::Status back = m->Backward(1.0f);
  EXPECT_EQ(back.code(), absl::StatusCode::kFailedPrecondition) << back;
  EXPECT_NE(back.message().find("Backward after a Forward that quantized the stream"),
            std::string::npos)
      << back;
  // Off again: training works.
  ASSERT_TRUE(m->set_residual_quant(std::nullopt).ok());
  ASSERT_TRUE(m->Forward(x.data(), y.data(), 1, 8, /*training=*/true).ok());
  EXPECT_TRUE(m->Backward(1.0f).ok());
}

TEST(GptResidualQuant, RejectsBadSettings) {
  auto m = *Gpt::Create(kResidualModel);
  auto msg = [&](ResidualQuant rq) { return std::string(m->set_residual_quant(rq).message()); };
  EXPECT_NE(msg({8, std::vector<float>(6, 1.0f)}).find("needs 7 steps (2 * n_layer + 1), got 6"),
            std::string::npos);
  EXPECT_NE(msg({1, std::vector<float>(7, 1.0f)}).find("bits must be in [2, 16], got 1"),
            std::string::npos);
  std::vector<float> steps(7, 1.0f);
  steps[3] = 0.0f;
  EXPECT_NE(msg({8, steps}).find("step 3 is 0"), std::string::npos);
  steps[3] = NAN;
  EXPECT_NE(msg({8, steps}).find("step 3 is nan"), std::string::npos);
  EXPECT_FALSE(m->residual_quant().has_value());
  // Steps from amax: amax / Qp, and 1 for a point that was all zeros.
  ResidualQuant rq = *ResidualQuantFromAmax(8, {127.0f, 0.0f, 12.7f});
  ASSERT_EQ(rq.steps.size(), 3u);
  EXPECT_EQ(rq.steps[0], 1.0f);
  EXPECT_EQ(rq.steps[1], 1.0f);
  EXPECT_FLOAT_EQ(rq.steps[2], 0.1f);
  EXPECT_EQ(ResidualQuantFromAmax(4, {7.0f})->steps, std::vector<float>{1.0f});
  EXPECT_FALSE(ResidualQuantFromAmax(8, {INFINITY}).ok());
}

}  // namespace
}  // namespace qtrain
