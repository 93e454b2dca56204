// GPT-2 124M shape at init: the CUDA model's loss and logits against the PyTorch reference
// (tools/reference/torch_gpt2.py) on the same weights, read from a qtrain checkpoint. Tag gpu;
// tools/gpu_tests.sh sets QTRAIN_TORCH_GPT2 to the script (skipped when unset).
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "ops/cuda/device.h"
#include "trainer/checkpoint.h"
#include "trainer/cuda/gpt_cuda.h"
#include "trainer/gpt.h"
#include "trainer/safetensors.h"

namespace qtrain {
namespace {

TEST(TorchReference, Gpt2SmallAtInitMatchesPyTorch) {
  const absl::StatusOr<int> count = ops::DeviceCount();
  if (!count.ok() || *count == 0) {
    if (std::getenv("QTRAIN_REQUIRE_GPU") != nullptr) ADD_FAILURE() << "no CUDA device";
    GTEST_SKIP() << "no CUDA device";
  }
  const char* script = std::getenv("QTRAIN_TORCH_GPT2");
  if (script == nullptr || *script == '\0') {
    GTEST_SKIP() << "QTRAIN_TORCH_GPT2 (path of tools/reference/torch_gpt2.py) is not set";
  }
  const GptConfig config{12, 768, 12, 50304, 1024};
  const int B = 2, T = 1024, V = config.vocab_size;
  absl::StatusOr<std::unique_ptr<Gpt>> cpu = Gpt::Create(config);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  (*cpu)->InitWeights(1337, 0.02f);

  const std::string dir = absl::StrCat(::testing::TempDir(), "/torch_reference");
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  TrainState state;
  state.job_spec =
      "name: \"gpt2_124m_init\"\nmodel { n_layer: 12 n_embd: 768 n_head: 12 vocab_size: 50304 "
      "max_seq_len: 1024 }\n";
  ASSERT_TRUE(SaveCheckpoint(dir, (*cpu)->params(), nullptr, state, 0).ok());
  const std::string ckpt = CheckpointPath(dir, 0);

  std::vector<int32_t> x(B * T), y(B * T);
  std::mt19937 gen(42);
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = static_cast<int32_t>(gen() % V);
    y[i] = static_cast<int32_t>(gen() % V);
  }
  absl::StatusOr<std::unique_ptr<CudaGpt>> gpu = CudaGpt::Create(config, (*cpu)->params());
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  ASSERT_TRUE((*gpu)->Upload((*cpu)->params(), nullptr).ok());
  absl::StatusOr<double> loss = (*gpu)->Forward(x.data(), y.data(), B, T, 0.f);
  ASSERT_TRUE(loss.ok()) << loss.status();
  std::vector<int32_t> rows;
  for (int r = 0; r < B * T; r += 97) rows.push_back(r);
  rows.push_back(B * T - 1);
  absl::StatusOr<std::vector<float>> logits =
      (*gpu)->Logits(std::vector<int>(rows.begin(), rows.end()));
  ASSERT_TRUE(logits.ok()) << logits.status();

  const std::string batch = dir + "/qtrain_batch.safetensors";
  std::vector<TensorView> views = {
      {"inputs", "I32", {B, T}, x.data(), x.size() * 4},
      {"targets", "I32", {B, T}, y.data(), y.size() * 4},
      {"rows", "I32", {static_cast<int64_t>(rows.size())}, rows.data(), rows.size() * 4},
      {"logits", "F32", {static_cast<int64_t>(rows.size()), V}, logits->data(),
       logits->size() * 4}};
  ASSERT_TRUE(WriteSafeTensors(batch, views, {{"loss", absl::StrCat(*loss)}}).ok());
  std::printf("qtrain CUDA loss %.6f on B=%d T=%d\n", *loss, B, T);

  const std::string cmd = absl::StrCat("python3 ", script, " --checkpoint ", ckpt,
                                       " --compare ", batch, " --logits_tol 3e-2 2>&1");
  std::fflush(stdout);
  const int rc = std::system(cmd.c_str());
  EXPECT_EQ(rc, 0) << cmd << " failed (exit status " << rc << "): see its output above";
}

}  // namespace
}  // namespace qtrain
