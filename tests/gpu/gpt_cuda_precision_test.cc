// The CUDA GPT's precision features against the CPU trainer's model (trainer/gpt.h), which is
// their oracle: the TWEO outlier loss (its gradient fused into the layernorm backward, the
// block-output statistics), and per-Linear FP8 and QAT modes. Tag gpu: runs on the GPU machine
// (tools/gpu_tests.sh).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "tests/gpu/gpt_test_util.h"
#include "trainer/cuda/gpt_cuda.h"
#include "trainer/gpt.h"

namespace qtrain {
namespace {

using testing::MakeBatch;
using testing::MakeCpu;
using testing::MakeGpu;
using testing::RelL2;

// A TWEO term large enough to matter at a random init's small activations.
GptConfig TweoConfig() {
  GptConfig c{3, 64, 4, 256, 64};
  c.tweo.enabled = true;
  c.tweo.lambda = 2.0;
  c.tweo.tau = 0.25;
  return c;
}

// Loss, TWEO term, block statistics and every gradient of one step, against the CPU model;
// and the TWEO term must move the gradients (so a dropped term cannot pass).
TEST(GptCudaTweo, LossStatsAndGradientsMatchCpu) {
  SKIP_WITHOUT_GPU();
  const GptConfig config = TweoConfig();
  const int B = 3, T = 61;
  std::unique_ptr<Gpt> cpu = MakeCpu(config, 21);
  std::unique_ptr<CudaGpt> gpu = MakeGpu(*cpu);
  ASSERT_NE(gpu, nullptr);
  std::vector<int32_t> x, y;
  MakeBatch(B, T, config.vocab_size, 5, &x, &y);
  const float scale = 0.5f;

  absl::StatusOr<double> lc = cpu->Forward(x.data(), y.data(), B, T, /*training=*/true);
  ASSERT_TRUE(lc.ok()) << lc.status();
  cpu->params().ZeroGrads();
  ASSERT_OK(cpu->Backward(scale));
  const std::vector<BlockStats> cpu_stats = cpu->block_stats();

  gpu->set_block_stats(true);
  EXPECT_EQ(gpu->output_stats().status().code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_OK(gpu->ZeroGrads());
  absl::StatusOr<double> lg = gpu->Forward(x.data(), y.data(), B, T, scale);
  ASSERT_TRUE(lg.ok()) << lg.status();
  ASSERT_OK(gpu->Backward(scale));
  std::vector<float> grads;
  ASSERT_OK(gpu->DownloadGrads(&grads));
  absl::StatusOr<DeviceModel::OutputStats> st = gpu->output_stats();
  ASSERT_TRUE(st.ok()) << st.status();

  std::printf("loss cpu %.6f gpu %.6f | tweo cpu %.6f gpu %.6f\n", *lc, *lg, cpu->tweo_loss(),
              st->tweo_loss);
  EXPECT_NEAR(*lg, *lc, 1e-2);
  ASSERT_GT(cpu->tweo_loss(), 1e-3) << "the test's TWEO term is too small to check";
  EXPECT_NEAR(st->tweo_loss, cpu->tweo_loss(), 3e-2 * cpu->tweo_loss());
  ASSERT_EQ(st->blocks.size(), cpu_stats.size());
  for (size_t l = 0; l < cpu_stats.size(); ++l) {
    std::printf("block %zu peak cpu %.4f gpu %.4f | kurtosis cpu %.3f gpu %.3f\n", l,
                cpu_stats[l].peak, st->blocks[l].peak, cpu_stats[l].kurtosis,
                st->blocks[l].kurtosis);
    EXPECT_NEAR(st->blocks[l].peak, cpu_stats[l].peak, 1e-2 * cpu_stats[l].peak);
    EXPECT_NEAR(st->blocks[l].kurtosis, cpu_stats[l].kurtosis, 5e-2 * cpu_stats[l].kurtosis);
  }

  // The same step without TWEO on the CPU: the gradients must differ from TWEO's clearly more
  // than the GPU differs from the CPU.
  GptConfig plain = config;
  plain.tweo.enabled = false;
  std::unique_ptr<Gpt> cpu_plain = MakeCpu(plain, 21);
  ASSERT_TRUE(cpu_plain->Forward(x.data(), y.data(), B, T, true).ok());
  cpu_plain->params().ZeroGrads();
  ASSERT_OK(cpu_plain->Backward(scale));

  const ParamStore& ps = cpu->params();
  double worst = 0, tweo_effect = 0;
  for (const ParamInfo& info : ps.infos()) {
    const double rel = RelL2(grads.data() + info.offset, ps.grads().data() + info.offset,
                             info.size);
    const double effect = RelL2(cpu_plain->params().grads().data() + info.offset,
                                ps.grads().data() + info.offset, info.size);
    worst = std::max(worst, rel);
    tweo_effect = std::max(tweo_effect, effect);
    EXPECT_LT(rel, 3e-2) << "gradient of " << info.name;
  }
  std::printf("worst gradient rel L2 %.2e; the TWEO term moves gradients by up to %.2e\n", worst,
              tweo_effect);
  EXPECT_GT(tweo_effect, 10 * worst) << "the TWEO term barely changes the gradients here";
}

}  // namespace
}  // namespace qtrain
