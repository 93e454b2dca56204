// The CUDA GPT's precision features against the CPU trainer's model (trainer/gpt.h), which is
// their oracle: the TWEO outlier loss (its gradient fused into the layernorm backward, the
// block-output statistics), and per-Linear FP8 and QAT modes. Tag gpu: runs on the GPU machine
// (tools/gpu_tests.sh).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <vector>

#include <cstring>
#include <string>

#include "gtest/gtest.h"
#include "configs/job_spec.pb.h"
#include "tests/gpu/gpt_test_util.h"
#include "trainer/cuda/gpt_cuda.h"
#include "trainer/gpt.h"
#include "trainer/optimizer.h"
#include "trainer/precision.h"

namespace qtrain {
namespace {

using testing::GpuStep;
using testing::InitQuantizersWithBatch;
using testing::MakeBatch;
using testing::MakeCpu;
using testing::MakeGpu;
using testing::RelL2;
using testing::TestAdam;

// A TWEO term large enough to matter at a random init's small activations.
GptConfig TweoConfig() {
  GptConfig c{3, 64, 4, 256, 64};
  c.tweo.enabled = true;
  c.tweo.lambda = 40.0;
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
  EXPECT_GT(tweo_effect, 5 * worst) << "the TWEO term barely changes the gradients here";
}

// ---------------------------------------------------------------------------------------------
// FP8 and QAT against the CPU trainer's Linear (the oracle). C = 64 keeps every GEMM dimension
// a multiple of 16 (cuBLASLt's FP8 kernels); B * T = 256 tokens.

constexpr int kB = 4, kT = 64;

GptConfig PrecisionConfigOf(const PrecisionSpec& spec, int n_layer = 2) {
  GptConfig c{n_layer, 64, 4, 256, 64};
  absl::StatusOr<PrecisionConfig> pc = PrecisionConfig::FromSpec(spec, n_layer);
  EXPECT_TRUE(pc.ok()) << pc.status();
  if (pc.ok()) c.precision = *pc;
  return c;
}

PrecisionSpec Fp8Spec(Fp8Scaling scaling) {
  PrecisionSpec p;
  p.set_linear(FP8);
  p.mutable_fp8()->set_scaling(scaling);
  p.mutable_fp8()->set_amax_history_len(4);
  return p;
}

// The worst gradient rel L2 over the parameters, printing each.
double WorstGradient(const std::vector<float>& gpu, const ParamStore& cpu, const char* what) {
  double worst = 0;
  for (const ParamInfo& info : cpu.infos()) {
    const double rel = RelL2(gpu.data() + info.offset, cpu.grads().data() + info.offset, info.size);
    std::printf("[%s] grad %-28s rel L2 %.2e\n", what, info.name.c_str(), rel);
    worst = std::max(worst, rel);
  }
  return worst;
}

class GptCudaFp8 : public ::testing::TestWithParam<Fp8Scaling> {};

// 20 AdamW steps of the FP8 model on both trainers from the same weights: the losses stay
// together, the first step's gradients agree, the FP8 GEMMs ran, and W's scaling history on the
// device is the CPU's bit for bit (W's amax is of the same fp32 masters on both).
TEST_P(GptCudaFp8, TwentyStepsFollowTheCpuFp8Trainer) {
  SKIP_WITHOUT_GPU();
  const Fp8Scaling scaling = GetParam();
  const GptConfig config = PrecisionConfigOf(Fp8Spec(scaling));
  std::unique_ptr<Gpt> cpu = MakeCpu(config, 17);
  std::unique_ptr<CudaGpt> gpu = MakeGpu(*cpu);
  ASSERT_NE(gpu, nullptr);
  AdamW opt(TestAdam(), cpu->num_parameters());
  const float lr = 3e-3f;
  double first_loss = 0, last_loss = 0;
  for (int step = 1; step <= 20; ++step) {
    if (step == 2 && scaling == DELAYED) {
      // After one update both hold amax(W_0) as the newest W history entry, and it is of the
      // same fp32 masters on both: bit for bit (later entries follow weights that the two
      // trainers' slightly different gradients moved apart).
      ParamStore down = cpu->params();
      cpu->SaveStateToBuffers();
      ASSERT_OK(gpu->Download(&down, nullptr));
      int compared = 0;
      for (int i = 0; i < down.num_buffers(); ++i) {
        const std::string& name = down.buffer_name(i);
        if (name.find(".fp8_amax_history") == std::string::npos) continue;
        const std::vector<float>& g = down.buffer(i);
        const std::vector<float>& c = cpu->params().buffer(i);
        const size_t h = g.size() / 3;
        EXPECT_EQ(g[2 * h - 1], c[2 * h - 1]) << name << ": amax(W_0)";
        EXPECT_GT(g[2 * h - 1], 0.f) << name;
        ++compared;
      }
      EXPECT_EQ(compared, 8);
    }
    std::vector<int32_t> x, y;
    MakeBatch(kB, kT, config.vocab_size, 2000 + step % 4, &x, &y);
    absl::StatusOr<double> lc = cpu->Forward(x.data(), y.data(), kB, kT, /*training=*/true);
    ASSERT_TRUE(lc.ok()) << lc.status();
    cpu->params().ZeroGrads();
    ASSERT_OK(cpu->Backward(1.0f));
    if (step == 1) {
      // One Forward/Backward from the same weights: every gradient.
      ASSERT_OK(gpu->ZeroGrads());
      absl::StatusOr<double> lg = gpu->Forward(x.data(), y.data(), kB, kT, 1.0f);
      ASSERT_TRUE(lg.ok()) << lg.status();
      ASSERT_OK(gpu->Backward(1.0f));
      std::vector<float> grads;
      ASSERT_OK(gpu->DownloadGrads(&grads));
      const double worst = WorstGradient(grads, cpu->params(), Fp8Scaling_Name(scaling).c_str());
      EXPECT_LT(worst, 0.15) << "FP8 gradients far from the CPU FP8 trainer's";
      EXPECT_NEAR(*lg, *lc, 2e-2);
      ASSERT_GT(gpu->fp8_gemm_calls(), 0) << "no FP8 GEMM ran";
      ASSERT_OK(gpu->ZeroGrads());
    }
    const double norm_cpu = opt.Step(&cpu->params(), lr);
    double norm_gpu = 0;
    absl::StatusOr<double> lg = GpuStep(gpu.get(), x, y, kB, kT, lr, step, &norm_gpu);
    ASSERT_TRUE(lg.ok()) << lg.status();
    std::printf("[%s] step %2d loss cpu %.5f gpu %.5f | norm cpu %.4f gpu %.4f\n",
                Fp8Scaling_Name(scaling).c_str(), step, *lc, *lg, norm_cpu, norm_gpu);
    EXPECT_NEAR(*lg, *lc, 3e-2 + 1e-2 * std::abs(*lc)) << "step " << step;
    if (step == 1) first_loss = *lg;
    last_loss = *lg;
  }
  EXPECT_LT(last_loss, first_loss - 0.3) << "the FP8 GPU model did not learn";
}

INSTANTIATE_TEST_SUITE_P(Recipes, GptCudaFp8, ::testing::Values(DELAYED, CURRENT, BLOCK),
                         [](const ::testing::TestParamInfo<Fp8Scaling>& i) {
                           return Fp8Scaling_Name(i.param);
                         });

// FP8 runs resumed through Download/Upload continue bit for bit (deterministic attention):
// the scaling histories and scales travel in the host model's buffers.
TEST(GptCudaFp8Resume, DelayedScalingResumeIsBitIdentical) {
  SKIP_WITHOUT_GPU();
  const GptConfig config = PrecisionConfigOf(Fp8Spec(DELAYED));
  std::unique_ptr<Gpt> cpu = MakeCpu(config, 3);
  auto run = [&](DeviceModel* m, int first, int count) {
    std::vector<double> out;
    for (int step = first; step < first + count; ++step) {
      std::vector<int32_t> x, y;
      MakeBatch(kB, kT, config.vocab_size, 500 + step, &x, &y);
      absl::StatusOr<double> l = GpuStep(m, x, y, kB, kT, 2e-3f, step);
      EXPECT_TRUE(l.ok()) << l.status();
      out.push_back(l.ok() ? *l : NAN);
    }
    return out;
  };
  std::unique_ptr<CudaGpt> straight = MakeGpu(*cpu, /*deterministic=*/true);
  ASSERT_NE(straight, nullptr);
  const std::vector<double> all = run(straight.get(), 1, 8);
  std::unique_ptr<CudaGpt> first = MakeGpu(*cpu, /*deterministic=*/true);
  std::vector<double> resumed = run(first.get(), 1, 4);
  ParamStore saved = cpu->params();
  AdamW opt(TestAdam(), cpu->num_parameters());
  ASSERT_OK(first->Download(&saved, &opt));
  first.reset();
  absl::StatusOr<std::unique_ptr<CudaGpt>> second = CudaGpt::Create(config, saved);
  ASSERT_TRUE(second.ok()) << second.status();
  (*second)->set_deterministic(true);
  ASSERT_OK((*second)->Upload(saved, &opt));
  for (double l : run(second->get(), 5, 4)) resumed.push_back(l);
  ASSERT_EQ(all.size(), resumed.size());
  for (size_t i = 0; i < all.size(); ++i) {
    EXPECT_EQ(std::memcmp(&all[i], &resumed[i], sizeof(double)), 0)
        << "step " << i + 1 << ": " << all[i] << " vs " << resumed[i];
  }
}

// Bad precision settings on CUDA are refused naming the Linear and the problem (the job-spec
// validator names the field first; this is the model's own check).
TEST(GptCudaFp8Errors, LayoutWithoutScalingBuffersIsNamed) {
  SKIP_WITHOUT_GPU();
  const GptConfig fp8 = PrecisionConfigOf(Fp8Spec(DELAYED));
  GptConfig plain{2, 64, 4, 256, 64};
  std::unique_ptr<Gpt> full = MakeCpu(plain, 1);
  // An FP8 model over a layout without its buffers: Upload names what is missing.
  absl::StatusOr<std::unique_ptr<CudaGpt>> m = CudaGpt::Create(fp8, full->params());
  ASSERT_TRUE(m.ok()) << m.status();
  const absl::Status up = (*m)->Upload(full->params(), nullptr);
  EXPECT_EQ(up.code(), absl::StatusCode::kInvalidArgument) << up;
  EXPECT_NE(up.message().find("FP8 scaling buffers"), std::string::npos) << up;
}

// ---------------------------------------------------------------------------------------------
// QAT.

struct QatCase {
  const char* name;
  int wbits, abits;
  QuantGranularity wgran, agran;
  int group;
  bool wasym, phi, int8;
  bool fp16 = false;  // qat.fp16_scales (GGUF's fp16 block scales)
};

std::vector<QatCase> QatCases() {
  return {
      {"W4A4", 4, 4, PER_CHANNEL, PER_TENSOR, 0, false, false, false},
      {"W4A4_phi", 4, 4, PER_CHANNEL, PER_TENSOR, 0, false, true, false},
      {"W3A4_group32_asym", 3, 4, PER_GROUP, PER_TENSOR, 32, true, false, false},
      {"W2A16_group32_phi", 2, 0, PER_GROUP, GRANULARITY_UNSPECIFIED, 32, false, true, false},
      {"W8A8_token", 8, 8, PER_CHANNEL, PER_TOKEN, 0, false, false, false},
      {"W8A8_int8", 8, 8, PER_CHANNEL, PER_TOKEN, 0, false, false, true},
      {"W4A8_int8_tensor", 4, 8, PER_CHANNEL, PER_TENSOR, 0, false, false, true},
      {"W4A4_group32_fp16_scales", 4, 4, PER_GROUP, PER_TENSOR, 32, false, false, false, true},
      {"W4A16_group32_asym_fp16_phi", 4, 0, PER_GROUP, GRANULARITY_UNSPECIFIED, 32, true, true,
       false, true},
  };
}

PrecisionSpec QatSpecOf(const QatCase& q) {
  PrecisionSpec p;
  p.set_linear(QAT);
  QatSpec* s = p.mutable_qat();
  s->set_weight_bits(q.wbits);
  s->set_act_bits(q.abits);
  s->set_weight_granularity(q.wgran);
  if (q.group > 0) s->set_group_size(q.group);
  s->set_act_granularity(q.agran);
  s->set_weight_asymmetric(q.wasym);
  s->set_int8_forward(q.int8);
  s->set_fp16_scales(q.fp16);
  if (q.phi) {
    p.mutable_aux_lowrank()->set_enabled(true);
    p.mutable_aux_lowrank()->set_rank(8);
    p.mutable_aux_lowrank()->set_decay_period(5);
  }
  return p;
}

class GptCudaQat : public ::testing::TestWithParam<QatCase> {};

// The CPU QAT model initialises its quantizers (steps from the weights, Phi from the SVD, the
// activation steps on a first batch); the GPU model starts from those parameters and buffers.
// Then: one step's loss and every gradient (the LSQ step gradients included), and 20 steps of
// both trainers with the rank schedule, whose Phi ranks must agree step for step.
TEST_P(GptCudaQat, StepsFollowTheCpuQatTrainer) {
  SKIP_WITHOUT_GPU();
  const QatCase& q = GetParam();
  const GptConfig config = PrecisionConfigOf(QatSpecOf(q));
  std::unique_ptr<Gpt> cpu = MakeCpu(config, 29);
  ASSERT_OK(InitQuantizersWithBatch(cpu.get(), kB, kT, 77));
  std::vector<int32_t> x, y;
  std::unique_ptr<CudaGpt> gpu = MakeGpu(*cpu);
  ASSERT_NE(gpu, nullptr);

  MakeBatch(kB, kT, config.vocab_size, 78, &x, &y);
  absl::StatusOr<double> lc = cpu->Forward(x.data(), y.data(), kB, kT, true);
  ASSERT_TRUE(lc.ok()) << lc.status();
  cpu->params().ZeroGrads();
  ASSERT_OK(cpu->Backward(1.0f));
  ASSERT_OK(gpu->ZeroGrads());
  absl::StatusOr<double> lg = gpu->Forward(x.data(), y.data(), kB, kT, 1.0f);
  ASSERT_TRUE(lg.ok()) << lg.status();
  ASSERT_OK(gpu->Backward(1.0f));
  std::vector<float> grads;
  ASSERT_OK(gpu->DownloadGrads(&grads));
  std::printf("[%s] loss cpu %.6f gpu %.6f\n", q.name, *lc, *lg);
  EXPECT_NEAR(*lg, *lc, 2e-2);
  // The GPU quantizes BF16 activations, the CPU fp32 ones: at 4 bits some codes flip, and the
  // learned activation steps' gradients, sums of (round(x) - x) over every element, see other
  // fractional parts altogether (at 8 bits a BF16 x / s keeps about one fractional bit). Those
  // are checked bit for bit on equal inputs by the kernel tests; here they must be finite, and
  // every other gradient close.
  const bool coarse = q.abits == 4 || q.wbits <= 3;
  double worst = 0;
  for (const ParamInfo& info : cpu->params().infos()) {
    const double rel = RelL2(grads.data() + info.offset,
                             cpu->params().grads().data() + info.offset, info.size);
    const bool act_step = info.name.find(".x_scale") != std::string::npos ||
                          info.name.find(".x_zero") != std::string::npos;
    EXPECT_TRUE(std::isfinite(rel)) << info.name;
    if (!act_step) worst = std::max(worst, rel);
  }
  std::printf("[%s] worst gradient rel L2 (activation steps aside) %.3f\n", q.name, worst);
  EXPECT_LT(worst, coarse ? 0.35 : 0.1);

  AdamW opt(TestAdam(), cpu->num_parameters());
  std::unique_ptr<CudaGpt> g2 = MakeGpu(*cpu);
  ASSERT_NE(g2, nullptr);
  double first = 0, last = 0;
  for (int step = 0; step < 20; ++step) {
    MakeBatch(kB, kT, config.vocab_size, 3000 + step % 4, &x, &y);
    for (int idx : cpu->ApplyRankSchedule(step)) {
      opt.ResetMoments(cpu->params().info(idx).offset, cpu->params().info(idx).size);
    }
    ASSERT_OK(g2->ApplyRankSchedule(step));
    EXPECT_EQ(g2->phi_ranks(), cpu->phi_ranks()) << "step " << step;
    absl::StatusOr<double> l1 = cpu->Forward(x.data(), y.data(), kB, kT, true);
    ASSERT_TRUE(l1.ok());
    cpu->params().ZeroGrads();
    ASSERT_OK(cpu->Backward(1.0f));
    opt.Step(&cpu->params(), 2e-3f);
    absl::StatusOr<double> l2 = GpuStep(g2.get(), x, y, kB, kT, 2e-3f, step + 1);
    ASSERT_TRUE(l2.ok()) << l2.status();
    std::printf("[%s] step %2d loss cpu %.5f gpu %.5f rank %d\n", q.name, step + 1, *l1, *l2,
                g2->phi_ranks()[0]);
    EXPECT_NEAR(*l2, *l1, 3e-2 + 1e-2 * std::abs(*l1)) << "step " << step + 1;
    if (step == 0) first = *l2;
    last = *l2;
  }
  EXPECT_LT(last, first - 0.2) << "the QAT GPU model did not learn";

  // An evaluation right after the last update (no ApplyRankSchedule in between, as the trainer
  // evaluates) sees the updated quantized weights: the CPU's eval loss, and exactly the loss of
  // the same evaluation once W_eff is formed explicitly. (The Phi Linears' BF16 copies held the
  // latent W after an update until the next step formed W_eff; evaluations then ran unquantized
  // Phi Linears.)
  absl::StatusOr<double> ev_cpu = cpu->Forward(x.data(), y.data(), kB, kT, false);
  ASSERT_TRUE(ev_cpu.ok()) << ev_cpu.status();
  absl::StatusOr<double> ev_gpu = g2->Forward(x.data(), y.data(), kB, kT, 0.f);
  ASSERT_TRUE(ev_gpu.ok()) << ev_gpu.status();
  ASSERT_OK(g2->ApplyRankSchedule(19));  // the last step's rank and gamma again: W_eff anew
  absl::StatusOr<double> ev_formed = g2->Forward(x.data(), y.data(), kB, kT, 0.f);
  ASSERT_TRUE(ev_formed.ok()) << ev_formed.status();
  std::printf("[%s] eval after the update: cpu %.6f gpu %.6f (W_eff formed: %.6f)\n", q.name,
              *ev_cpu, *ev_gpu, *ev_formed);
  EXPECT_NEAR(*ev_gpu, *ev_formed, 1e-6 * std::abs(*ev_formed));
  EXPECT_NEAR(*ev_gpu, *ev_cpu, 3e-2 + 1e-2 * std::abs(*ev_cpu));
}

INSTANTIATE_TEST_SUITE_P(Schemes, GptCudaQat, ::testing::ValuesIn(QatCases()),
                         [](const ::testing::TestParamInfo<QatCase>& i) { return i.param.name; });

// Phi's init on the device (cuSOLVER) reproduces the CPU's L diag(gamma) R (Eigen's SVD):
// compare the products, the factors' signs may differ.
TEST(GptCudaQatPhi, DeviceInitMatchesTheCpuProduct) {
  SKIP_WITHOUT_GPU();
  const GptConfig config = PrecisionConfigOf(QatSpecOf(QatCases()[1]));
  std::unique_ptr<Gpt> cpu = MakeCpu(config, 31);
  std::unique_ptr<Gpt> host = MakeCpu(config, 31);
  ASSERT_OK(cpu->InitQuantizers(PhiInit::kHere));
  ASSERT_OK(host->InitQuantizers(PhiInit::kSkip));
  std::unique_ptr<CudaGpt> gpu = MakeGpu(*host);
  ASSERT_NE(gpu, nullptr);
  ASSERT_OK(gpu->InitPhi());
  ParamStore down = host->params();
  ASSERT_OK(gpu->Download(&down, nullptr));
  int checked = 0;
  for (const ParamInfo& info : down.infos()) {
    if (info.name.find(".phi_l") == std::string::npos) continue;
    const std::string base = info.name.substr(0, info.name.size() - 6);
    const ParamInfo& r = down.info(*down.Find(base + ".phi_r"));
    const int OC = static_cast<int>(info.shape[0]), k = static_cast<int>(info.shape[1]),
              C = static_cast<int>(r.shape[1]);
    auto product = [&](const ParamStore& ps) {
      std::vector<double> m(static_cast<size_t>(OC) * C, 0.0);
      for (int o = 0; o < OC; ++o)
        for (int j = 0; j < k; ++j)
          for (int c = 0; c < C; ++c)
            m[o * C + c] += static_cast<double>(ps.params()[info.offset + o * k + j]) *
                            ps.params()[r.offset + j * C + c];
      return m;
    };
    const std::vector<double> g = product(down), c = product(cpu->params());
    double num = 0, den = 0;
    for (size_t i = 0; i < g.size(); ++i) {
      num += (g[i] - c[i]) * (g[i] - c[i]);
      den += c[i] * c[i];
    }
    const double rel = std::sqrt(num / den);
    std::printf("%s: L R rel L2 %.2e\n", base.c_str(), rel);
    EXPECT_LT(rel, 1e-4) << base;
    ++checked;
  }
  EXPECT_EQ(checked, 8);
  EXPECT_EQ(gpu->phi_ranks(), cpu->phi_ranks());
}

// A QAT run with Phi resumed through Download/Upload across a rank-decay period end continues
// bit for bit.
TEST(GptCudaQatResume, ResumeThroughARankDecayBoundaryIsBitIdentical) {
  SKIP_WITHOUT_GPU();
  const GptConfig config = PrecisionConfigOf(QatSpecOf(QatCases()[1]));
  std::unique_ptr<Gpt> cpu = MakeCpu(config, 8);
  ASSERT_OK(cpu->InitQuantizers());
  auto run = [&](CudaGpt* m, int first, int count) {
    std::vector<double> out;
    for (int step = first; step < first + count; ++step) {
      std::vector<int32_t> x, y;
      MakeBatch(kB, kT, config.vocab_size, 900 + step, &x, &y);
      EXPECT_TRUE(m->ApplyRankSchedule(step).ok());
      absl::StatusOr<double> l = GpuStep(m, x, y, kB, kT, 2e-3f, step + 1);
      EXPECT_TRUE(l.ok()) << l.status();
      out.push_back(l.ok() ? *l : NAN);
    }
    return out;
  };
  std::unique_ptr<CudaGpt> straight = MakeGpu(*cpu, true);
  ASSERT_NE(straight, nullptr);
  const std::vector<double> all = run(straight.get(), 0, 12);  // period 5: ends at 5 and 10
  std::unique_ptr<CudaGpt> first = MakeGpu(*cpu, true);
  std::vector<double> resumed = run(first.get(), 0, 4);
  ParamStore saved = cpu->params();
  AdamW opt(TestAdam(), cpu->num_parameters());
  ASSERT_OK(first->Download(&saved, &opt));
  first.reset();
  absl::StatusOr<std::unique_ptr<CudaGpt>> second = CudaGpt::Create(config, saved);
  ASSERT_TRUE(second.ok()) << second.status();
  (*second)->set_deterministic(true);
  ASSERT_OK((*second)->Upload(saved, &opt));
  for (double l : run(second->get(), 4, 8)) resumed.push_back(l);
  for (size_t i = 0; i < all.size(); ++i) {
    EXPECT_EQ(std::memcmp(&all[i], &resumed[i], sizeof(double)), 0)
        << "step " << i + 1 << ": " << all[i] << " vs " << resumed[i];
  }
  EXPECT_EQ(straight->phi_ranks(), (*second)->phi_ranks());
  EXPECT_LT(straight->phi_ranks()[0], 8) << "the run crossed no period end";
}

}  // namespace
}  // namespace qtrain
