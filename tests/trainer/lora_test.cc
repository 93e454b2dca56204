// LoRA on the GPT: the frozen base (no gradient buffer, state untouched), B = 0 reproduces the
// base exactly, orthonormal A, adapter gradients against finite differences on full-precision
// and QAT bases, per-sample gradients against a backward per sample.
#include "trainer/lora.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "trainer/gpt.h"
#include "trainer/rng.h"

namespace qtrain {
namespace {

constexpr int kB = 3, kT = 5, kVocab = 13;

GptConfig SmallConfig(bool qat, bool train_a) {
  GptConfig c{2, 16, 2, kVocab, 7};
  if (qat) {
    PrecisionSpec p;
    p.set_linear(QAT);
    p.mutable_qat()->set_weight_bits(4);
    c.precision = *PrecisionConfig::FromSpec(p);
  }
  c.lora.rank = 3;
  c.lora.alpha = 6;  // scale 2: a scale that is not 1 must show in the gradients
  c.lora.targets = {"attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"};
  c.lora.train_a = train_a;
  return c;
}

struct Batch {
  std::vector<int32_t> x, y;
};

Batch RandomBatch(int B, uint64_t seed) {
  Batch b{std::vector<int32_t>(B * kT), std::vector<int32_t>(B * kT)};
  Rng rng(seed);
  for (int i = 0; i < B * kT; ++i) {
    b.x[i] = rng.NextU64() % kVocab;
    b.y[i] = rng.NextU64() % kVocab;
  }
  return b;
}

std::unique_ptr<Gpt> Make(const GptConfig& c) {
  absl::StatusOr<std::unique_ptr<Gpt>> m = Gpt::Create(c);
  EXPECT_TRUE(m.ok()) << m.status();
  (*m)->InitWeights(5, 0.3f);
  EXPECT_TRUE((*m)->InitQuantizers().ok());
  (*m)->InitLora(11);
  return *std::move(m);
}

void RandomizeB(Gpt* m, uint64_t seed) {
  Rng rng(seed);
  ParamStore& ls = m->lora_params();
  for (const ParamInfo& info : ls.infos()) {
    if (info.name.find(".lora_b") == std::string::npos) continue;
    for (int64_t i = 0; i < info.size; ++i) ls.params()[info.offset + i] = rng.Normal() * 0.3;
  }
}

TEST(Lora, AdaptersAreTheirOwnTensorsAndTheBaseHasNoGradients) {
  const GptConfig c = SmallConfig(false, false);
  auto m = Make(c);
  EXPECT_FALSE(m->params().has_grads());
  const ParamStore& ls = m->lora_params();
  ASSERT_EQ(ls.size(), 2 * 2 * 4);  // (A, B) x 2 blocks x 4 Linears
  // B tensors first (the trainable range when A is frozen), then A.
  for (int i = 0; i < 8; ++i) EXPECT_NE(ls.info(i).name.find(".lora_b"), std::string::npos);
  for (int i = 8; i < 16; ++i) EXPECT_NE(ls.info(i).name.find(".lora_a"), std::string::npos);
  EXPECT_EQ(ls.info(0).name, "block.0.attn.qkv.lora_b");
  EXPECT_EQ(ls.info(0).shape, (std::vector<int64_t>{48, 3}));
  EXPECT_EQ(ls.info(8).shape, (std::vector<int64_t>{3, 16}));
  EXPECT_EQ(ls.info(3).name, "block.0.mlp.proj.lora_b");
  EXPECT_EQ(ls.info(11).shape, (std::vector<int64_t>{3, 64}));
}

TEST(Lora, OnlyTargetedLinearsGetAdapters) {
  GptConfig c = SmallConfig(false, false);
  c.lora.targets = {"attn.qkv", "mlp.proj"};
  auto m = Make(c);
  int adapted = 0;
  for (Linear* l : m->linears()) {
    const bool want = l->name().find("qkv") != std::string::npos ||
                      l->name().find("mlp.proj") != std::string::npos;
    EXPECT_EQ(l->lora() != nullptr, want) << l->name();
    EXPECT_TRUE(l->frozen()) << l->name();
    adapted += l->lora() != nullptr;
  }
  EXPECT_EQ(adapted, 4);
  c.lora.targets = {"nothing"};
  EXPECT_FALSE(Gpt::Create(c).ok());
  c.lora.targets = {"attn.qkv"};
  c.lora.rank = 17;  // > n_embd 16
  absl::StatusOr<std::unique_ptr<Gpt>> bad = Gpt::Create(c);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("lora.rank 17"), std::string::npos) << bad.status();
}

TEST(Lora, ARowsAreOrthonormalAndBStartsAtZero) {
  auto m = Make(SmallConfig(false, false));
  const ParamStore& ls = m->lora_params();
  for (const ParamInfo& info : ls.infos()) {
    const float* p = ls.params().data() + info.offset;
    if (info.name.find(".lora_b") != std::string::npos) {
      for (int64_t i = 0; i < info.size; ++i) ASSERT_EQ(p[i], 0.0f) << info.name;
      continue;
    }
    const int r = info.shape[0], n = info.shape[1];
    for (int i = 0; i < r; ++i) {
      for (int j = 0; j < r; ++j) {
        double dot = 0;
        for (int k = 0; k < n; ++k) dot += double(p[i * n + k]) * p[j * n + k];
        EXPECT_NEAR(dot, i == j ? 1.0 : 0.0, 1e-6) << info.name << " rows " << i << "," << j;
      }
    }
  }
}

// With B = 0 the adapted model is the base, bit for bit; and training steps do not change the
// base's parameters or buffers (QAT steps, activation-step flags).
void ExpectZeroBIsTheBase(bool qat) {
  GptConfig c = SmallConfig(qat, false);
  auto m = Make(c);
  GptConfig base_config = c;
  base_config.lora = LoraOptions();
  auto base = *Gpt::Create(base_config);
  base->params().params() = m->params().params();
  for (int i = 0; i < m->params().num_buffers(); ++i) {
    base->params().buffer(i) = m->params().buffer(i);
  }
  const Batch b = RandomBatch(kB, 3);
  const std::vector<float> params_before = m->params().params();
  const double with = *m->Forward(b.x.data(), b.y.data(), kB, kT, /*training=*/true);
  const double without = *base->Forward(b.x.data(), b.y.data(), kB, kT, /*training=*/false);
  EXPECT_EQ(with, without);
  m->lora_params().ZeroGrads();
  ASSERT_TRUE(m->Backward(1.0f).ok());
  EXPECT_EQ(m->params().params(), params_before);
  for (int i = 0; i < m->params().num_buffers(); ++i) {
    EXPECT_EQ(m->params().buffer(i), base->params().buffer(i)) << m->params().buffer_name(i);
  }
  // dB is not zero (B = 0 still has a gradient); dA is (frozen).
  double b_norm = 0, a_norm = 0;
  const ParamStore& ls = m->lora_params();
  for (const ParamInfo& info : ls.infos()) {
    double& acc = info.name.find(".lora_b") != std::string::npos ? b_norm : a_norm;
    for (int64_t i = 0; i < info.size; ++i) acc += std::fabs(ls.grads()[info.offset + i]);
  }
  EXPECT_GT(b_norm, 1e-4);
  EXPECT_EQ(a_norm, 0.0);
}

TEST(Lora, ZeroBIsTheFullPrecisionBase) { ExpectZeroBIsTheBase(false); }
TEST(Lora, ZeroBIsTheQatBase) { ExpectZeroBIsTheBase(true); }

// Adapter gradients against central differences of the loss (float model: loose step and
// tolerance, as gpt_test; the low-rank op itself is checked in float64 in tests/ops).
void CheckAdapterGradients(bool qat) {
  auto m = Make(SmallConfig(qat, /*train_a=*/true));
  RandomizeB(m.get(), 7);  // B != 0 so that A has a gradient
  const Batch b = RandomBatch(2, 9);
  ParamStore& ls = m->lora_params();
  ls.ZeroGrads();
  ASSERT_TRUE(m->Forward(b.x.data(), b.y.data(), 2, kT, true).ok());
  ASSERT_TRUE(m->Backward(1.0f).ok());
  const std::vector<float> grads = ls.grads();
  Rng rng(13);
  int checked = 0;
  // The QAT forward re-quantizes every weight per call: fewer probes keep the test fast.
  const int probes = qat ? 1 : 3;
  for (const ParamInfo& info : ls.infos()) {
    for (int k = 0; k < probes; ++k) {
      const int64_t i = info.offset + rng.NextU64() % info.size;
      const float orig = ls.params()[i];
      const float h = 1e-2f;
      ls.params()[i] = orig + h;
      const double lp = *m->Forward(b.x.data(), b.y.data(), 2, kT);
      ls.params()[i] = orig - h;
      const double lm = *m->Forward(b.x.data(), b.y.data(), 2, kT);
      ls.params()[i] = orig;
      const double fd = (lp - lm) / (2 * h);
      EXPECT_NEAR(grads[i], fd, 2e-3 + 2e-2 * std::fabs(fd)) << info.name << " elem "
                                                             << i - info.offset;
      ++checked;
    }
  }
  EXPECT_EQ(checked, probes * ls.size());
}

TEST(Lora, GradientsMatchFiniteDifferencesOnAFullPrecisionBase) { CheckAdapterGradients(false); }
TEST(Lora, GradientsMatchFiniteDifferencesOnAQatBase) { CheckAdapterGradients(true); }

// Per-sample gradients from one backward equal a backward on each sequence alone (the
// definition), and sum to the batch gradient; Backward(B) makes each the gradient of that
// sequence's mean loss.
void CheckPerSample(bool train_a) {
  auto m = Make(SmallConfig(false, train_a));
  RandomizeB(m.get(), 17);
  const Batch b = RandomBatch(kB, 19);
  ParamStore& ls = m->lora_params();
  const int64_t n = ls.num_elements();
  std::vector<float> ps(kB * n, 0.0f);
  ls.ZeroGrads();
  m->SetLoraPerSampleGrads(ps.data());
  ASSERT_TRUE(m->Forward(b.x.data(), b.y.data(), kB, kT, true).ok());
  ASSERT_TRUE(m->Backward(static_cast<float>(kB)).ok());
  m->SetLoraPerSampleGrads(nullptr);
  const std::vector<float> batch = ls.grads();
  std::vector<double> sum(n, 0.0);
  for (int s = 0; s < kB; ++s) {
    ls.ZeroGrads();
    ASSERT_TRUE(m->Forward(b.x.data() + s * kT, b.y.data() + s * kT, 1, kT, true).ok());
    ASSERT_TRUE(m->Backward(1.0f).ok());
    double norm = 0;
    for (int64_t i = 0; i < n; ++i) {
      const float want = ls.grads()[i];
      const float got = ps[s * n + i];
      ASSERT_NEAR(got, want, 1e-5 + 1e-4 * std::fabs(want)) << "sample " << s << " elem " << i;
      sum[i] += got;
      norm += double(got) * got;
    }
    EXPECT_GT(norm, 1e-8);
  }
  for (int64_t i = 0; i < n; ++i) ASSERT_NEAR(sum[i], batch[i], 1e-5 + 1e-4 * std::fabs(batch[i]));
  // Frozen A: its per-sample entries stay zero.
  if (!train_a) {
    for (const ParamInfo& info : ls.infos()) {
      if (info.name.find(".lora_a") == std::string::npos) continue;
      for (int s = 0; s < kB; ++s) {
        for (int64_t i = 0; i < info.size; ++i) ASSERT_EQ(ps[s * n + info.offset + i], 0.0f);
      }
    }
  }
}

TEST(Lora, PerSampleGradientsOfBAreEachSequencesOwnBackward) { CheckPerSample(false); }
TEST(Lora, PerSampleGradientsOfAAndBAreEachSequencesOwnBackward) { CheckPerSample(true); }

}  // namespace
}  // namespace qtrain
