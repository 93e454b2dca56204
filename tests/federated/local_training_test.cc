// A client's local round: only the trained factors move and are sent (B; A and B under
// FedAvg-LoRA), the round lowers the client's loss, and under DP-SGD every step's update is
// bounded by the clip (SGD, no noise: |step| <= lr * C * drawn / expected batch).
#include "distributed/federated/local_training.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <vector>

#include "gtest/gtest.h"
#include "trainer/rng.h"
#include "trainer/shard.h"

namespace qtrain::federated {
namespace {

std::string TmpDir() {
  const char* tmp = std::getenv("TEST_TMPDIR");
  return tmp ? tmp : "/tmp";
}

struct Client {
  std::unique_ptr<Gpt> model;
  AdapterLayout layout;
  ClientData data;
};

Client Make(bool train_a) {
  GptConfig c{1, 16, 2, 32, 8};
  c.lora.rank = 2;
  c.lora.alpha = 2;
  c.lora.targets = {"attn.qkv", "mlp.fc"};
  c.lora.train_a = train_a;
  auto m = *Gpt::Create(c);
  m->InitWeights(3, 0.2f);
  m->InitLora(4);
  // A repetitive corpus the adapters can learn something about.
  const std::string dir = TmpDir() + "/local";
  std::filesystem::create_directories(dir);
  std::vector<uint16_t> t(4000);
  for (size_t i = 0; i < t.size(); ++i) t[i] = static_cast<uint16_t>((i * 7) % 11 + 3);
  EXPECT_TRUE(WriteShard(dir + "/c.bin", t).ok());
  AdapterLayout l = *AdapterLayout::FromStore(m->lora_params());
  return {std::move(m), l, *ClientData::Open(dir + "/c.bin", 8, 32)};
}

LocalConfig Config() {
  LocalConfig c;
  c.steps = 8;
  c.batch = 4;
  c.lr = 2e-2f;
  c.adam.grad_clip = 1.0f;
  c.seed = 9;
  return c;
}

TEST(LocalTraining, FfaSendsBOnlyAndLowersTheLoss) {
  Client s = Make(false);
  const std::vector<float> start = s.model->lora_params().params();
  absl::StatusOr<LocalResult> r1 =
      TrainLocally(s.model.get(), s.layout, Aggregation::kFfaLora, start, s.data, Config());
  ASSERT_TRUE(r1.ok()) << r1.status();
  ASSERT_EQ(static_cast<int64_t>(r1->delta.size()), s.layout.b_size);
  double norm = 0;
  for (float d : r1->delta) norm += d * d;
  EXPECT_GT(norm, 0);
  // A did not move in the model either.
  for (int64_t i = s.layout.b_size; i < s.layout.size; ++i) {
    ASSERT_EQ(s.model->lora_params().params()[i], start[i]);
  }
  // A second round from the trained adapter starts lower than the first did.
  std::vector<float> next = start;
  for (size_t i = 0; i < r1->delta.size(); ++i) next[i] += r1->delta[i];
  absl::StatusOr<LocalResult> r2 =
      TrainLocally(s.model.get(), s.layout, Aggregation::kFfaLora, next, s.data, Config());
  ASSERT_TRUE(r2.ok());
  EXPECT_LT(r2->mean_loss, r1->mean_loss);
  EXPECT_EQ(r1->sequences, 8 * 4);
}

TEST(LocalTraining, FedAvgSendsAAndB) {
  Client s = Make(true);
  const std::vector<float> start = s.model->lora_params().params();
  LocalConfig c = Config();
  c.sgd = true;
  absl::StatusOr<LocalResult> r =
      TrainLocally(s.model.get(), s.layout, Aggregation::kFedAvgLora, start, s.data, c);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(static_cast<int64_t>(r->delta.size()), s.layout.size);
  double a_norm = 0;
  for (int64_t i = s.layout.b_size; i < s.layout.size; ++i) a_norm += r->delta[i] * r->delta[i];
  EXPECT_GT(a_norm, 0);  // B moved in step 1, so A has gradients after it
}

TEST(LocalTraining, DpStepsAreBoundedByTheClip) {
  Client s = Make(false);
  const std::vector<float> start = s.model->lora_params().params();
  LocalConfig c = Config();
  c.sgd = true;
  c.steps = 1;
  c.dp_clip = 1e-3f;  // far below the per-sample norms: every sample is clipped
  c.dp_noise = 0;
  absl::StatusOr<LocalResult> r =
      TrainLocally(s.model.get(), s.layout, Aggregation::kFfaLora, start, s.data, c);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->clip.samples, r->sequences);
  EXPECT_EQ(r->clip.clipped, r->clip.samples);
  EXPECT_GT(r->clip.max_norm, c.dp_clip);
  double norm = 0;
  for (float d : r->delta) norm += d * d;
  const double expected_batch = DpSampleRate(c, s.data) * s.data.sequences();
  EXPECT_LE(std::sqrt(norm), c.lr * c.dp_clip * r->sequences / expected_batch * (1 + 1e-4));
  EXPECT_GT(norm, 0);
  // With noise multiplier sigma the step adds noise of norm ~ lr sigma C sqrt(n) / batch.
  c.dp_noise = 4.0;
  absl::StatusOr<LocalResult> noisy =
      TrainLocally(s.model.get(), s.layout, Aggregation::kFfaLora, start, s.data, c);
  ASSERT_TRUE(noisy.ok());
  double nn = 0;
  for (float d : noisy->delta) nn += d * d;
  const double noise = c.lr * c.dp_noise * c.dp_clip * std::sqrt(double(s.layout.b_size)) /
                       expected_batch;
  const double signal = std::sqrt(norm);
  EXPECT_GT(std::sqrt(nn), 0.75 * noise - signal);
  EXPECT_LT(std::sqrt(nn), 1.25 * noise + signal);
}

}  // namespace
}  // namespace qtrain::federated
