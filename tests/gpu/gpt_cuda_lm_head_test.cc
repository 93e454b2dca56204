// The CUDA GPT's LM-head features against the CPU trainer's model (trainer/gpt.h), their
// oracle: a padded vocabulary (model.padded_vocab_size: wte has more rows than the vocabulary,
// the padded rows never take part) and distillation from a frozen full-precision teacher
// (precision.distill: KL on logits or MSE, chunked with the student's LM head), also under
// W4A4 QAT with Phi as the golden asks. Tag gpu: runs on the GPU machine.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "configs/job_spec.pb.h"
#include "ops/distill.h"
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

constexpr int kB = 4, kT = 64;

// ---------------------------------------------------------------------------------------------
// Padded vocabulary.

// Loss, logits and every gradient of one step with wte padded from 250 to 320 rows (250 is no
// multiple of 8: the GEMMs run over the padded table, the softmax over the vocabulary), the
// padded rows' gradient exactly zero; then 20 steps beside the CPU trainer, whose padded rows
// move only by weight decay.
TEST(GptCudaPaddedVocab, StepsFollowTheCpuModel) {
  SKIP_WITHOUT_GPU();
  GptConfig config{2, 64, 4, 250, 64};
  config.padded_vocab_size = 320;
  std::unique_ptr<Gpt> cpu = MakeCpu(config, 41);
  ASSERT_EQ(cpu->params().info(*cpu->params().Find("wte")).shape[0], 320);
  std::unique_ptr<CudaGpt> gpu = MakeGpu(*cpu);
  ASSERT_NE(gpu, nullptr);
  std::vector<int32_t> x, y;
  MakeBatch(kB, kT, config.vocab_size, 42, &x, &y);
  absl::StatusOr<double> lc = cpu->Forward(x.data(), y.data(), kB, kT, true);
  ASSERT_TRUE(lc.ok()) << lc.status();
  cpu->params().ZeroGrads();
  ASSERT_OK(cpu->Backward(1.0f));
  ASSERT_OK(gpu->ZeroGrads());
  absl::StatusOr<double> lg = gpu->Forward(x.data(), y.data(), kB, kT, 1.0f);
  ASSERT_TRUE(lg.ok()) << lg.status();
  ASSERT_OK(gpu->Backward(1.0f));
  std::printf("padded vocab: loss cpu %.6f gpu %.6f\n", *lc, *lg);
  EXPECT_NEAR(*lg, *lc, 1e-2);
  std::vector<float> grads;
  ASSERT_OK(gpu->DownloadGrads(&grads));
  const ParamStore& ps = cpu->params();
  for (const ParamInfo& info : ps.infos()) {
    EXPECT_LT(RelL2(grads.data() + info.offset, ps.grads().data() + info.offset, info.size), 3e-2)
        << info.name;
  }
  const ParamInfo& wte = ps.info(*ps.Find("wte"));
  for (int64_t i = int64_t{250} * 64; i < wte.size; ++i) {
    ASSERT_EQ(grads[wte.offset + i], 0.0f) << "padded row " << i / 64 << " of wte's gradient";
  }
  // Logits: vocab_size columns, as the CPU model's.
  std::vector<float> cpu_logits;
  cpu->Logits(&cpu_logits);
  absl::StatusOr<std::vector<float>> rows = gpu->Logits({0, 77});
  ASSERT_TRUE(rows.ok()) << rows.status();
  ASSERT_EQ(rows->size(), 2u * 250);
  EXPECT_LT(RelL2(rows->data(), cpu_logits.data(), 250), 2e-2);
  EXPECT_LT(RelL2(rows->data() + 250, cpu_logits.data() + 77 * 250, 250), 2e-2);

  AdamW opt(TestAdam(), cpu->num_parameters());
  std::unique_ptr<CudaGpt> g2 = MakeGpu(*cpu);
  ASSERT_NE(g2, nullptr);
  double first = 0, last = 0;
  for (int step = 0; step < 20; ++step) {
    MakeBatch(kB, kT, config.vocab_size, 4000 + step % 4, &x, &y);
    absl::StatusOr<double> l1 = cpu->Forward(x.data(), y.data(), kB, kT, true);
    ASSERT_TRUE(l1.ok());
    cpu->params().ZeroGrads();
    ASSERT_OK(cpu->Backward(1.0f));
    opt.Step(&cpu->params(), 2e-3f);
    absl::StatusOr<double> l2 = GpuStep(g2.get(), x, y, kB, kT, 2e-3f, step + 1);
    ASSERT_TRUE(l2.ok()) << l2.status();
    EXPECT_NEAR(*l2, *l1, 2e-2 + 5e-3 * std::abs(*l1)) << "step " << step + 1;
    if (step == 0) first = *l2;
    last = *l2;
  }
  EXPECT_LT(last, first - 0.2) << "the padded-vocabulary GPU model did not learn";
}

// ---------------------------------------------------------------------------------------------
// Distillation.

struct DistillCase {
  const char* name;
  ops::DistillLoss loss;
  bool qat;  // W4A4 QAT with Phi (rank 8, decaying every 5 steps)
};

GptConfig StudentConfig(bool qat) {
  GptConfig c{2, 64, 4, 256, 64};
  if (!qat) return c;
  PrecisionSpec p;
  p.set_linear(QAT);
  p.mutable_qat()->set_weight_bits(4);
  p.mutable_qat()->set_act_bits(4);
  p.mutable_qat()->set_weight_granularity(PER_CHANNEL);
  p.mutable_qat()->set_act_granularity(PER_TENSOR);
  p.mutable_aux_lowrank()->set_enabled(true);
  p.mutable_aux_lowrank()->set_rank(8);
  p.mutable_aux_lowrank()->set_decay_period(5);
  absl::StatusOr<PrecisionConfig> pc = PrecisionConfig::FromSpec(p, c.n_layer);
  EXPECT_TRUE(pc.ok()) << pc.status();
  if (pc.ok()) c.precision = *pc;
  return c;
}

// The CPU trainer's distillation step (trainer/model_setup.cc's Teacher::Loss): the student's
// forward, the teacher's, the loss of their logits, the student's backward with its dlogits.
struct CpuDistillStep {
  double ce = 0, distill = 0;
};
absl::StatusOr<CpuDistillStep> CpuStep(Gpt* student, Gpt* teacher, const std::vector<int32_t>& x,
                                       const std::vector<int32_t>& y, ops::DistillLoss loss,
                                       float weight) {
  CpuDistillStep r;
  ASSIGN_OR_RETURN(r.ce, student->Forward(x.data(), y.data(), kB, kT, true));
  ASSIGN_OR_RETURN(double unused, teacher->Forward(x.data(), nullptr, kB, kT));
  (void)unused;
  std::vector<float> s, t;
  student->Logits(&s);
  teacher->Logits(&t);
  const int N = kB * kT, V = student->config().vocab_size;
  r.distill = ops::distill_forward(s.data(), t.data(), N, V, loss);
  std::vector<float> dlogits(s.size(), 0.0f);
  ops::distill_backward(dlogits.data(), s.data(), t.data(), N, V, loss, weight);
  student->params().ZeroGrads();
  RETURN_IF_ERROR(student->Backward(1.0f, dlogits.data()));
  return r;
}

class GptCudaDistill : public ::testing::TestWithParam<DistillCase> {};

// One step's losses (task and distillation) and every gradient against the CPU trainer, with a
// check that the distillation term moves the gradients; then 20 steps of both trainers (with
// the rank schedule under QAT), the losses within tolerance and the distillation loss falling.
TEST_P(GptCudaDistill, StepsFollowTheCpuTrainer) {
  SKIP_WITHOUT_GPU();
  const DistillCase& dc = GetParam();
  const float weight = 2.0f;
  const GptConfig tconfig{2, 64, 4, 256, 64};
  std::unique_ptr<Gpt> teacher = MakeCpu(tconfig, 51);
  {
    // A confident teacher (logits of a few units), so that the term is far from zero.
    ParamStore& tp = teacher->params();
    const ParamInfo& wte = tp.info(*tp.Find("wte"));
    for (int64_t i = 0; i < wte.size; ++i) tp.params()[wte.offset + i] *= 20.0f;
  }
  const GptConfig sconfig = StudentConfig(dc.qat);
  std::unique_ptr<Gpt> cpu = MakeCpu(sconfig, 52);
  std::vector<int32_t> x, y;
  if (dc.qat) ASSERT_OK(InitQuantizersWithBatch(cpu.get(), kB, kT, 53));
  auto make_student = [&]() -> std::unique_ptr<CudaGpt> {
    std::unique_ptr<CudaGpt> s = MakeGpu(*cpu);
    // The trainer's teacher: forward only (no gradients or moments).
    std::unique_ptr<CudaGpt> t = MakeGpu(*teacher, false, GradDtype::kBf16, true);
    if (s == nullptr || t == nullptr) return nullptr;
    const absl::Status st = s->SetTeacher(std::move(t), dc.loss, weight);
    EXPECT_TRUE(st.ok()) << st;
    return st.ok() ? std::move(s) : nullptr;
  };
  std::unique_ptr<CudaGpt> gpu = make_student();
  ASSERT_NE(gpu, nullptr);

  MakeBatch(kB, kT, sconfig.vocab_size, 54, &x, &y);
  absl::StatusOr<CpuDistillStep> c1 = CpuStep(cpu.get(), teacher.get(), x, y, dc.loss, weight);
  ASSERT_TRUE(c1.ok()) << c1.status();
  const std::vector<float> cpu_grads = cpu->params().grads();
  ASSERT_OK(gpu->ZeroGrads());
  absl::StatusOr<double> lg = gpu->Forward(x.data(), y.data(), kB, kT, 1.0f);
  ASSERT_TRUE(lg.ok()) << lg.status();
  ASSERT_OK(gpu->Backward(1.0f));
  std::printf("[%s] loss cpu %.6f gpu %.6f | distill cpu %.6f gpu %.6f\n", dc.name, c1->ce, *lg,
              c1->distill, gpu->distill_loss());
  EXPECT_NEAR(*lg, c1->ce, 2e-2);
  ASSERT_GT(c1->distill, 1e-3) << "the test's distillation term is too small to check";
  EXPECT_NEAR(gpu->distill_loss(), c1->distill, 3e-2 * c1->distill + 1e-4);
  std::vector<float> grads;
  ASSERT_OK(gpu->DownloadGrads(&grads));
  // The same step without the teacher on the CPU: the term must matter.
  ASSERT_TRUE(cpu->Forward(x.data(), y.data(), kB, kT, true).ok());
  cpu->params().ZeroGrads();
  ASSERT_OK(cpu->Backward(1.0f));
  const std::vector<float> plain = cpu->params().grads();
  double worst = 0, effect = 0;
  for (const ParamInfo& info : cpu->params().infos()) {
    const bool act_step = info.name.find(".x_scale") != std::string::npos ||
                          info.name.find(".x_zero") != std::string::npos;
    const double rel = RelL2(grads.data() + info.offset, cpu_grads.data() + info.offset, info.size);
    EXPECT_TRUE(std::isfinite(rel)) << info.name;
    if (act_step) continue;  // BF16 vs fp32 activations at 4 bits (gpt_cuda_precision_test)
    worst = std::max(worst, rel);
    effect = std::max(effect, RelL2(plain.data() + info.offset, cpu_grads.data() + info.offset,
                                    info.size));
  }
  std::printf("[%s] worst gradient rel L2 %.3f; the distillation term moves them by %.3f\n",
              dc.name, worst, effect);
  EXPECT_LT(worst, dc.qat ? 0.35 : 3e-2);
  EXPECT_GT(effect, 3 * worst) << "the distillation term barely changes the gradients here";

  // 20 steps. The CPU model restarts from the state the GPU student was made from.
  cpu = MakeCpu(sconfig, 52);
  if (dc.qat) ASSERT_OK(InitQuantizersWithBatch(cpu.get(), kB, kT, 53));
  std::unique_ptr<CudaGpt> g2 = make_student();
  ASSERT_NE(g2, nullptr);
  AdamW opt(TestAdam(), cpu->num_parameters());
  double first = 0, last = 0;
  for (int step = 0; step < 20; ++step) {
    MakeBatch(kB, kT, sconfig.vocab_size, 5000 + step % 4, &x, &y);
    for (int idx : cpu->ApplyRankSchedule(step)) {
      opt.ResetMoments(cpu->params().info(idx).offset, cpu->params().info(idx).size);
    }
    ASSERT_OK(g2->ApplyRankSchedule(step));
    EXPECT_EQ(g2->phi_ranks(), cpu->phi_ranks()) << "step " << step;
    absl::StatusOr<CpuDistillStep> c = CpuStep(cpu.get(), teacher.get(), x, y, dc.loss, weight);
    ASSERT_TRUE(c.ok()) << c.status();
    opt.Step(&cpu->params(), 2e-3f);
    absl::StatusOr<double> l2 = GpuStep(g2.get(), x, y, kB, kT, 2e-3f, step + 1);
    ASSERT_TRUE(l2.ok()) << l2.status();
    std::printf("[%s] step %2d loss cpu %.5f gpu %.5f | distill cpu %.5f gpu %.5f\n", dc.name,
                step + 1, c->ce, *l2, c->distill, g2->distill_loss());
    EXPECT_NEAR(*l2, c->ce, 3e-2 + 1e-2 * std::abs(c->ce)) << "step " << step + 1;
    EXPECT_NEAR(g2->distill_loss(), c->distill, 5e-2 * c->distill + 1e-3) << "step " << step + 1;
    if (step == 0) first = g2->distill_loss();
    last = g2->distill_loss();
  }
  EXPECT_LT(last, 0.9 * first) << "the student did not move towards the teacher";

  // An evaluation forward is plain cross-entropy (no teacher, no distillation loss change).
  const double before = g2->distill_loss();
  absl::StatusOr<double> ev = g2->Forward(x.data(), y.data(), kB, kT, 0.0f);
  ASSERT_TRUE(ev.ok()) << ev.status();
  EXPECT_EQ(g2->distill_loss(), before);
}

INSTANTIATE_TEST_SUITE_P(Losses, GptCudaDistill,
                         ::testing::Values(DistillCase{"KL", ops::DistillLoss::kKl, false},
                                           DistillCase{"MSE", ops::DistillLoss::kMse, false},
                                           DistillCase{"W4A4_phi_KL", ops::DistillLoss::kKl, true}),
                         [](const ::testing::TestParamInfo<DistillCase>& i) {
                           return i.param.name;
                         });

// A forward-only model evaluates like the full one, allocates no gradients or moments, and
// refuses the training calls naming them.
TEST(GptCudaForwardOnly, EvaluatesAndRefusesTraining) {
  SKIP_WITHOUT_GPU();
  std::unique_ptr<Gpt> cpu = MakeCpu(GptConfig{2, 64, 4, 256, 64}, 3);
  std::unique_ptr<CudaGpt> full = MakeGpu(*cpu, false, GradDtype::kBf16);
  std::unique_ptr<CudaGpt> fwd = MakeGpu(*cpu, false, GradDtype::kBf16, true);
  ASSERT_NE(full, nullptr);
  ASSERT_NE(fwd, nullptr);
  std::vector<int32_t> x, y;
  MakeBatch(kB, kT, 256, 5, &x, &y);
  absl::StatusOr<double> a = full->Forward(x.data(), y.data(), kB, kT, 0.f);
  absl::StatusOr<double> b = fwd->Forward(x.data(), y.data(), kB, kT, 0.f);
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_NEAR(*a, *b, 1e-6 * std::abs(*a));
  // Gradients (2 bytes) and both moments (8 bytes) per parameter are not there.
  EXPECT_LE(fwd->allocated_bytes(), full->allocated_bytes() - 10 * cpu->num_parameters());
  const absl::Status train = fwd->Forward(x.data(), y.data(), kB, kT, 1.f).status();
  EXPECT_EQ(train.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(train.message().find("forward-only"), std::string::npos) << train;
  EXPECT_EQ(fwd->Update(1e-3f, 1.0, AdamWConfig{}, 1).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(fwd->GradSumSquares().status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(fwd->device_grads(), nullptr);
}

// A teacher that does not fit is refused naming the field.
TEST(GptCudaDistillErrors, MismatchedTeacherIsNamed) {
  SKIP_WITHOUT_GPU();
  std::unique_ptr<Gpt> s = MakeCpu(GptConfig{2, 64, 4, 256, 64}, 1);
  std::unique_ptr<Gpt> t = MakeCpu(GptConfig{2, 128, 4, 256, 64}, 2);
  std::unique_ptr<CudaGpt> gs = MakeGpu(*s), gt = MakeGpu(*t);
  ASSERT_NE(gs, nullptr);
  ASSERT_NE(gt, nullptr);
  const absl::Status st = gs->SetTeacher(std::move(gt), ops::DistillLoss::kKl, 1.0f);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("precision.distill.teacher_checkpoint"), std::string::npos) << st;
}

}  // namespace
}  // namespace qtrain
