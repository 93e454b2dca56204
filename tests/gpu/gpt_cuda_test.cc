// The CUDA GPT (trainer/cuda) against the CPU Gpt: loss, logits and every gradient of one step
// from the same weights, 20 optimizer steps of loss, bit-identical reruns and resume through
// Download/Upload. Tag gpu: runs on the GPU machine (tools/gpu_tests.sh).
#include "trainer/cuda/gpt_cuda.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "ops/cuda/device.h"
#include "ops/status_macros.h"
#include "trainer/gpt.h"
#include "trainer/optimizer.h"
#include "tests/gpu/gpt_test_util.h"

namespace qtrain {
namespace {

using testing::MakeBatch;
using testing::Shape;
using testing::Shapes;
using testing::MakeCpu;
using testing::MakeGpu;
using testing::RelL2;
using testing::GpuStep;
using testing::TestAdam;

class GptCudaGolden : public ::testing::TestWithParam<Shape> {};

// Loss, logits and every gradient of one Forward/Backward from the same weights. BF16 weights
// and activations with fp32 accumulation: a few 1e-3 relative per rounding, a few 1e-2 after
// the whole backward pass.
TEST_P(GptCudaGolden, LossLogitsAndEveryGradientMatchCpu) {
  SKIP_WITHOUT_GPU();
  const Shape& s = GetParam();
  std::unique_ptr<Gpt> cpu = MakeCpu(s.config, 7);
  std::unique_ptr<CudaGpt> gpu = MakeGpu(*cpu);
  ASSERT_NE(gpu, nullptr);
  std::vector<int32_t> x, y;
  MakeBatch(s.B, s.T, s.config.vocab_size, 11, &x, &y);

  absl::StatusOr<double> lc = cpu->Forward(x.data(), y.data(), s.B, s.T);
  ASSERT_TRUE(lc.ok()) << lc.status();
  std::vector<float> logits_cpu;
  cpu->Logits(&logits_cpu);
  cpu->params().ZeroGrads();
  ASSERT_OK(cpu->Backward(1.0f));

  ASSERT_OK(gpu->ZeroGrads());
  absl::StatusOr<double> lg = gpu->Forward(x.data(), y.data(), s.B, s.T, 1.0f);
  ASSERT_TRUE(lg.ok()) << lg.status();
  ASSERT_OK(gpu->Backward(1.0f));
  std::vector<float> grads;
  ASSERT_OK(gpu->DownloadGrads(&grads));
  std::printf("[%s] loss cpu %.6f gpu %.6f\n", s.name, *lc, *lg);
  EXPECT_NEAR(*lg, *lc, 1e-2);

  const ParamStore& ps = cpu->params();
  double worst = 0;
  for (const ParamInfo& info : ps.infos()) {
    const double rel = RelL2(grads.data() + info.offset, ps.grads().data() + info.offset,
                             info.size);
    worst = std::max(worst, rel);
    std::printf("[%s] grad %-26s rel L2 %.2e\n", s.name, info.name.c_str(), rel);
    EXPECT_LT(rel, 3e-2) << "gradient of " << info.name;
  }
  std::printf("[%s] worst gradient rel L2 %.2e\n", s.name, worst);

  // Logits of a few rows (after Backward: Logits recomputes them).
  const int N = s.B * s.T, V = s.config.vocab_size;
  std::vector<int> rows = {0, 1, s.T - 1, N / 2, N - 1};
  absl::StatusOr<std::vector<float>> lgpu = gpu->Logits(rows);
  ASSERT_TRUE(lgpu.ok()) << lgpu.status();
  for (size_t i = 0; i < rows.size(); ++i) {
    const double rel = RelL2(lgpu->data() + i * V, logits_cpu.data() + rows[i] * V, V);
    EXPECT_LT(rel, 2e-2) << "logits row " << rows[i];
  }
}

// B and T may change between calls; the activations follow.
TEST_P(GptCudaGolden, BatchShapeChangesMatchCpu) {
  SKIP_WITHOUT_GPU();
  const Shape& s = GetParam();
  std::unique_ptr<Gpt> cpu = MakeCpu(s.config, 9);
  std::unique_ptr<CudaGpt> gpu = MakeGpu(*cpu);
  ASSERT_NE(gpu, nullptr);
  for (auto [B, T] : {std::pair<int, int>{1, 5}, {s.B, s.T}, {2, 33}}) {
    std::vector<int32_t> x, y;
    MakeBatch(B, T, s.config.vocab_size, 100 + B * T, &x, &y);
    absl::StatusOr<double> lc = cpu->Forward(x.data(), y.data(), B, T);
    absl::StatusOr<double> lg = gpu->Forward(x.data(), y.data(), B, T, 0.f);
    ASSERT_TRUE(lc.ok() && lg.ok());
    EXPECT_NEAR(*lg, *lc, 1e-2) << "B=" << B << " T=" << T;
  }
  std::vector<int32_t> x(4, 0), y(4, 0);
  EXPECT_FALSE(gpu->Forward(x.data(), y.data(), 1, s.config.max_seq_len + 1, 1.0f).ok());
  x[2] = s.config.vocab_size;
  EXPECT_FALSE(gpu->Forward(x.data(), y.data(), 1, 4, 1.0f).ok());
  EXPECT_FALSE(gpu->Backward(1.0f).ok()) << "Backward after a failed Forward";
  x[2] = 0;
  EXPECT_FALSE(gpu->Forward(x.data(), nullptr, 1, 4, 1.0f).ok()) << "backward without targets";
  EXPECT_FALSE(gpu->Forward(x.data(), y.data(), 1, 4, -1.0f).ok()) << "negative scale";
  ASSERT_TRUE(gpu->Forward(x.data(), y.data(), 1, 4, 0.f).ok());
  EXPECT_EQ(gpu->Backward(1.0f).code(), absl::StatusCode::kFailedPrecondition)
      << "Backward after an evaluation Forward";
  ASSERT_TRUE(gpu->Forward(x.data(), y.data(), 1, 4, 0.5f).ok());
  const absl::Status other = gpu->Backward(1.0f);
  EXPECT_EQ(other.code(), absl::StatusCode::kFailedPrecondition) << other;
  EXPECT_NE(other.message().find("backward_scale 0.5"), absl::string_view::npos) << other;
}

INSTANTIATE_TEST_SUITE_P(Shapes, GptCudaGolden, ::testing::ValuesIn(Shapes()),
                         [](const ::testing::TestParamInfo<Shape>& i) { return i.param.name; });

// 20 AdamW steps (clip and weight decay active) on both; the losses stay together.
// FP32 and BF16 gradients (training.grad_dtype).
class GptCudaSteps : public ::testing::TestWithParam<GradDtype> {};

TEST_P(GptCudaSteps, TwentyStepsFollowCpu) {
  SKIP_WITHOUT_GPU();
  const Shape s = Shapes()[0];
  std::unique_ptr<Gpt> cpu = MakeCpu(s.config, 5);
  std::unique_ptr<CudaGpt> gpu = MakeGpu(*cpu, false, GetParam());
  ASSERT_NE(gpu, nullptr);
  AdamW opt(TestAdam(), cpu->num_parameters());
  const float lr = 3e-3f;
  double first = 0, last_cpu = 0;
  for (int step = 1; step <= 20; ++step) {
    std::vector<int32_t> x, y;
    MakeBatch(s.B, s.T, s.config.vocab_size, 1000 + step % 4, &x, &y);
    absl::StatusOr<double> lc = cpu->Forward(x.data(), y.data(), s.B, s.T);
    ASSERT_TRUE(lc.ok());
    cpu->params().ZeroGrads();
    ASSERT_OK(cpu->Backward(1.0f));
    const double norm_cpu = opt.Step(&cpu->params(), lr);
    double norm_gpu = 0;
    absl::StatusOr<double> lg = GpuStep(gpu.get(), x, y, s.B, s.T, lr, step, &norm_gpu);
    ASSERT_TRUE(lg.ok()) << lg.status();
    std::printf("step %2d loss cpu %.5f gpu %.5f | grad norm cpu %.4f gpu %.4f\n", step, *lc,
                *lg, norm_cpu, norm_gpu);
    EXPECT_NEAR(*lg, *lc, 2e-2 + 5e-3 * std::abs(*lc)) << "step " << step;
    EXPECT_NEAR(norm_gpu, norm_cpu, 0.05 * norm_cpu + 1e-3) << "step " << step;
    if (step == 1) first = *lc;
    last_cpu = *lc;
  }
  EXPECT_LT(last_cpu, first - 0.3) << "the run should learn something for the check to mean much";
  // The device's master weights after 20 steps.
  ParamStore host = cpu->params();
  ASSERT_OK(gpu->Download(&host, nullptr));
  double num = 0, den = 0;
  for (int64_t i = 0; i < host.num_elements(); ++i) {
    const double d = static_cast<double>(host.params()[i]) - cpu->params().params()[i];
    num += d * d;
    den += static_cast<double>(cpu->params().params()[i]) * cpu->params().params()[i];
  }
  EXPECT_LT(std::sqrt(num / den), 2e-2);
}

INSTANTIATE_TEST_SUITE_P(GradDtypes, GptCudaSteps,
                         ::testing::Values(GradDtype::kFp32, GradDtype::kBf16),
                         [](const ::testing::TestParamInfo<GradDtype>& i) {
                           return i.param == GradDtype::kBf16 ? "bf16" : "fp32";
                         });

// BF16 gradients are the FP32 path's rounded once per write: every tensor within a few BF16
// ulps of the FP32 model's (relative L2 well under 1e-2), and the CPU's tolerance holds.
TEST_P(GptCudaGolden, Bf16GradientsMatchFp32AndCpu) {
  SKIP_WITHOUT_GPU();
  const Shape& s = GetParam();
  std::unique_ptr<Gpt> cpu = MakeCpu(s.config, 7);
  std::unique_ptr<CudaGpt> g32 = MakeGpu(*cpu, true);
  std::unique_ptr<CudaGpt> g16 = MakeGpu(*cpu, true, GradDtype::kBf16);
  ASSERT_TRUE(g32 != nullptr && g16 != nullptr);
  EXPECT_EQ(g16->grad_dtype(), GradDtype::kBf16);
  std::vector<int32_t> x, y;
  MakeBatch(s.B, s.T, s.config.vocab_size, 11, &x, &y);
  ASSERT_TRUE(cpu->Forward(x.data(), y.data(), s.B, s.T).ok());
  cpu->params().ZeroGrads();
  ASSERT_OK(cpu->Backward(1.0f));
  std::vector<float> a, b;
  for (auto [m, out] : {std::pair<CudaGpt*, std::vector<float>*>{g32.get(), &a}, {g16.get(), &b}}) {
    ASSERT_OK(m->ZeroGrads());
    ASSERT_TRUE(m->Forward(x.data(), y.data(), s.B, s.T, 1.0f).ok());
    ASSERT_OK(m->Backward(1.0f));
    ASSERT_OK(m->DownloadGrads(out));
  }
  const ParamStore& ps = cpu->params();
  for (const ParamInfo& info : ps.infos()) {
    EXPECT_LT(RelL2(b.data() + info.offset, a.data() + info.offset, info.size), 1e-2)
        << "bf16 vs fp32 gradient of " << info.name;
    EXPECT_LT(RelL2(b.data() + info.offset, ps.grads().data() + info.offset, info.size), 3e-2)
        << "bf16 vs cpu gradient of " << info.name;
  }
}

// Runs `steps` steps on a fresh device model from the same init; returns the losses.
std::vector<double> RunSteps(const Shape& s, DeviceModel* m, int first_step, int steps) {
  std::vector<double> losses;
  for (int step = first_step; step < first_step + steps; ++step) {
    std::vector<int32_t> x, y;
    MakeBatch(s.B, s.T, s.config.vocab_size, 2000 + step, &x, &y);
    absl::StatusOr<double> l = GpuStep(m, x, y, s.B, s.T, 1e-3f, step);
    EXPECT_TRUE(l.ok()) << l.status();
    losses.push_back(l.ok() ? *l : NAN);
  }
  return losses;
}

void ExpectBitIdentical(const std::vector<double>& a, const std::vector<double>& b,
                        const char* what) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(std::memcmp(&a[i], &b[i], sizeof(double)), 0)
        << what << ": step " << i << " loss " << a[i] << " vs " << b[i];
  }
}

TEST(GptCuda, RerunsAreBitIdentical) {
  SKIP_WITHOUT_GPU();
  for (const Shape& s : Shapes()) {
    std::unique_ptr<Gpt> cpu = MakeCpu(s.config, 3);
    std::unique_ptr<CudaGpt> a = MakeGpu(*cpu, /*deterministic=*/true);
    std::unique_ptr<CudaGpt> b = MakeGpu(*cpu, /*deterministic=*/true);
    ASSERT_TRUE(a && b);
    const std::vector<double> la = RunSteps(s, a.get(), 1, 6);
    const std::vector<double> lb = RunSteps(s, b.get(), 1, 6);
    ExpectBitIdentical(la, lb, s.name);
    ParamStore pa = cpu->params(), pb = cpu->params();
    ASSERT_OK(a->Download(&pa, nullptr));
    ASSERT_OK(b->Download(&pb, nullptr));
    EXPECT_EQ(std::memcmp(pa.params().data(), pb.params().data(), pa.num_elements() * 4), 0)
        << s.name << ": parameters differ after identical runs";
  }
}

// training.lm_head_chunks: the LM head in 3 row chunks gives the loss and gradients of the
// whole batch at once (the chunk GEMMs may sum in another order: a few BF16 roundings).
TEST_P(GptCudaGolden, LmHeadChunksMatchWholeBatch) {
  SKIP_WITHOUT_GPU();
  const Shape& s = GetParam();
  std::unique_ptr<Gpt> cpu = MakeCpu(s.config, 21);
  std::unique_ptr<CudaGpt> whole = MakeGpu(*cpu, true), chunked = MakeGpu(*cpu, true);
  ASSERT_TRUE(whole && chunked);
  ASSERT_OK(chunked->set_lm_head_chunks(3));
  EXPECT_EQ(chunked->set_lm_head_chunks(-1).code(), absl::StatusCode::kInvalidArgument);
  std::vector<int32_t> x, y;
  MakeBatch(s.B, s.T, s.config.vocab_size, 23, &x, &y);
  std::vector<float> a, b;
  double la = 0, lb = 0;
  for (auto [m, out, loss] : {std::tuple<CudaGpt*, std::vector<float>*, double*>{whole.get(), &a, &la},
                              {chunked.get(), &b, &lb}}) {
    ASSERT_OK(m->ZeroGrads());
    absl::StatusOr<double> l = m->Forward(x.data(), y.data(), s.B, s.T, 1.0f);
    ASSERT_TRUE(l.ok()) << l.status();
    *loss = *l;
    ASSERT_OK(m->Backward(1.0f));
    ASSERT_OK(m->DownloadGrads(out));
  }
  EXPECT_NEAR(lb, la, 1e-3);
  for (const ParamInfo& info : cpu->params().infos()) {
    EXPECT_LT(RelL2(b.data() + info.offset, a.data() + info.offset, info.size), 1e-2)
        << "gradient of " << info.name;
  }
}

// The AdamW update overlapped with the next forward (its own stream, per-range events) gives
// the same bits as the update in line on the model's stream (what profiling does), for both
// gradient types; also with an evaluation Forward and a checkpoint Download between steps.
TEST(GptCuda, OverlappedUpdateEqualsInlineUpdate) {
  SKIP_WITHOUT_GPU();
  const Shape s = Shapes()[1];
  for (GradDtype g : {GradDtype::kFp32, GradDtype::kBf16}) {
    std::unique_ptr<Gpt> cpu = MakeCpu(s.config, 12);
    std::unique_ptr<CudaGpt> overlapped = MakeGpu(*cpu, true, g);
    std::unique_ptr<CudaGpt> inline_update = MakeGpu(*cpu, true, g);
    ASSERT_TRUE(overlapped && inline_update);
    inline_update->set_profiling(true);
    std::vector<double> la, lb;
    for (int step = 1; step <= 6; ++step) {
      std::vector<int32_t> x, y;
      MakeBatch(s.B, s.T, s.config.vocab_size, 3000 + step, &x, &y);
      for (auto [m, out] : {std::pair<CudaGpt*, std::vector<double>*>{overlapped.get(), &la},
                            {inline_update.get(), &lb}}) {
        absl::StatusOr<double> l =
            GpuStep(m, x, y, s.B, s.T, 2e-3f, step, nullptr, /*sync=*/false);
        ASSERT_TRUE(l.ok()) << l.status();
        out->push_back(*l);
        if (step == 3) {  // an evaluation and a checkpoint read right after an update
          ASSERT_TRUE(m->Forward(x.data(), y.data(), s.B, s.T, 0.f).ok());
          ParamStore host = cpu->params();
          ASSERT_OK(m->Download(&host, nullptr));
        }
      }
    }
    ExpectBitIdentical(la, lb, g == GradDtype::kBf16 ? "bf16" : "fp32");
    ParamStore pa = cpu->params(), pb = cpu->params();
    ASSERT_OK(overlapped->Download(&pa, nullptr));
    ASSERT_OK(inline_update->Download(&pb, nullptr));
    EXPECT_EQ(std::memcmp(pa.params().data(), pb.params().data(), pa.num_elements() * 4), 0);
  }
}

// Stopping after 3 steps (Download params and moments, a new device model, Upload) and going
// on gives the same losses and weights as not stopping, bit for bit.
TEST(GptCuda, ResumeThroughHostIsBitIdentical) {
  SKIP_WITHOUT_GPU();
  const Shape s = Shapes()[1];
  std::unique_ptr<Gpt> cpu = MakeCpu(s.config, 4);
  std::unique_ptr<CudaGpt> straight = MakeGpu(*cpu, /*deterministic=*/true);
  ASSERT_NE(straight, nullptr);
  const std::vector<double> all = RunSteps(s, straight.get(), 1, 6);

  std::unique_ptr<CudaGpt> first = MakeGpu(*cpu, /*deterministic=*/true);
  ASSERT_NE(first, nullptr);
  const std::vector<double> head = RunSteps(s, first.get(), 1, 3);
  ParamStore saved = cpu->params();
  AdamW opt(TestAdam(), cpu->num_parameters());
  ASSERT_OK(first->Download(&saved, &opt));
  first.reset();
  absl::StatusOr<std::unique_ptr<CudaGpt>> second = CudaGpt::Create(s.config, saved);
  ASSERT_TRUE(second.ok()) << second.status();
  (*second)->set_deterministic(true);
  ASSERT_OK((*second)->Upload(saved, &opt));
  std::vector<double> resumed = head;
  for (double l : RunSteps(s, second->get(), 4, 3)) resumed.push_back(l);
  ExpectBitIdentical(all, resumed, "resumed run");

  ParamStore p1 = cpu->params(), p2 = cpu->params();
  AdamW o1(TestAdam(), cpu->num_parameters()), o2(TestAdam(), cpu->num_parameters());
  ASSERT_OK(straight->Download(&p1, &o1));
  ASSERT_OK((*second)->Download(&p2, &o2));
  EXPECT_EQ(std::memcmp(p1.params().data(), p2.params().data(), p1.num_elements() * 4), 0);
  EXPECT_EQ(std::memcmp(o1.m().data(), o2.m().data(), p1.num_elements() * 4), 0);
  EXPECT_EQ(std::memcmp(o1.v().data(), o2.v().data(), p1.num_elements() * 4), 0);
}

// A loss scale (gradient accumulation) scales every gradient: two half-scaled backward passes
// of one batch give the gradient of one full pass.
TEST(GptCuda, LossScaleAndAccumulation) {
  SKIP_WITHOUT_GPU();
  const Shape s = Shapes()[0];
  std::unique_ptr<Gpt> cpu = MakeCpu(s.config, 8);
  std::unique_ptr<CudaGpt> gpu = MakeGpu(*cpu);
  ASSERT_NE(gpu, nullptr);
  std::vector<int32_t> x, y;
  MakeBatch(s.B, s.T, s.config.vocab_size, 77, &x, &y);
  ASSERT_OK(gpu->ZeroGrads());
  ASSERT_TRUE(gpu->Forward(x.data(), y.data(), s.B, s.T, 1.0f).ok());
  ASSERT_OK(gpu->Backward(1.0f));
  std::vector<float> full;
  ASSERT_OK(gpu->DownloadGrads(&full));
  ASSERT_OK(gpu->ZeroGrads());
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(gpu->Forward(x.data(), y.data(), s.B, s.T, 0.5f).ok());
    ASSERT_OK(gpu->Backward(0.5f));
  }
  std::vector<float> halves;
  ASSERT_OK(gpu->DownloadGrads(&halves));
  EXPECT_LT(RelL2(halves.data(), full.data(), static_cast<int64_t>(full.size())), 1e-2);
  // A ZeroGrads that no Backward follows still clears (it is deferred to the next Backward).
  ASSERT_OK(gpu->ZeroGrads());
  absl::StatusOr<double> ss = gpu->GradSumSquares();
  ASSERT_TRUE(ss.ok()) << ss.status();
  EXPECT_EQ(*ss, 0.0);
  ASSERT_OK(gpu->ZeroGrads());
  std::vector<float> zeros;
  ASSERT_OK(gpu->DownloadGrads(&zeros));
  for (float g : zeros) ASSERT_EQ(g, 0.0f);
}

// The hook the trainer overlaps NCCL with: every gradient range reported once, blocks first
// in backward order (highest block first), with an event, and the gradients unchanged by it.
TEST(GptCuda, GradientReadyHookCoversEveryRangeOnceInBackwardOrder) {
  SKIP_WITHOUT_GPU();
  const Shape s = Shapes()[0];
  std::unique_ptr<Gpt> cpu = MakeCpu(s.config, 8);
  std::unique_ptr<CudaGpt> gpu = MakeGpu(*cpu);
  ASSERT_NE(gpu, nullptr);
  std::vector<int32_t> x, y;
  MakeBatch(s.B, s.T, s.config.vocab_size, 91, &x, &y);
  ASSERT_OK(gpu->ZeroGrads());
  ASSERT_TRUE(gpu->Forward(x.data(), y.data(), s.B, s.T, 1.0f).ok());
  ASSERT_OK(gpu->Backward(1.0f));
  std::vector<float> plain;
  ASSERT_OK(gpu->DownloadGrads(&plain));

  std::vector<std::pair<int64_t, int64_t>> ranges;
  gpu->SetGradientReadyHook([&](int64_t begin, int64_t end, void* ready) {
    EXPECT_NE(ready, nullptr);
    ranges.emplace_back(begin, end);
    return absl::OkStatus();
  });
  ASSERT_OK(gpu->ZeroGrads());
  ASSERT_TRUE(gpu->Forward(x.data(), y.data(), s.B, s.T, 1.0f).ok());
  ASSERT_OK(gpu->Backward(1.0f));
  gpu->SetGradientReadyHook(nullptr);
  std::vector<float> hooked;
  ASSERT_OK(gpu->DownloadGrads(&hooked));
  ASSERT_EQ(hooked.size(), plain.size());
  EXPECT_EQ(std::memcmp(hooked.data(), plain.data(), plain.size() * sizeof(float)), 0);

  const ParamStore& ps = cpu->params();
  ASSERT_GE(ranges.size(), static_cast<size_t>(s.config.n_layer));
  for (int i = 0; i < s.config.n_layer; ++i) {
    // Range i is block n_layer-1-i: it starts at that block's first tensor.
    const std::string first = "block." + std::to_string(s.config.n_layer - 1 - i) + ".ln1.weight";
    const absl::StatusOr<int> idx = ps.Find(first);
    ASSERT_TRUE(idx.ok());
    EXPECT_EQ(ranges[i].first, ps.info(*idx).offset) << "range " << i;
  }
  std::vector<std::pair<int64_t, int64_t>> sorted = ranges;
  std::sort(sorted.begin(), sorted.end());
  int64_t at = 0;
  for (const auto& [b, e] : sorted) {
    EXPECT_EQ(b, at) << "gap or overlap";
    EXPECT_GT(e, b);
    at = e;
  }
  EXPECT_EQ(at, ps.num_elements());
}

}  // namespace
}  // namespace qtrain
