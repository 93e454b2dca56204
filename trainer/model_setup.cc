// ModelConfigFromSpec, Teacher, AddModelMetrics.
#include "trainer/model_setup.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "ops/status_macros.h"
#include "configs/job_spec_loader.h"
#include "trainer/checkpoint.h"
#include "trainer/safetensors.h"

namespace qtrain {

absl::StatusOr<GptConfig> ModelConfigFromSpec(const JobSpec& spec) {
  const ModelSpec& ms = spec.model();
  GptConfig gc;
  gc.n_layer = ms.n_layer();
  gc.n_embd = ms.n_embd();
  gc.n_head = ms.n_head();
  gc.vocab_size = ms.vocab_size();
  gc.padded_vocab_size = ms.padded_vocab_size();
  gc.max_seq_len = ms.max_seq_len();
  ASSIGN_OR_RETURN(gc.precision, PrecisionConfig::FromSpec(spec.precision(), ms.n_layer()));
  const TweoSpec& t = spec.precision().tweo();
  gc.tweo.enabled = t.enabled();
  gc.tweo.lambda = t.lambda();
  gc.tweo.tau = t.tau();
  gc.tweo.p = t.p();
  gc.tweo.eps = t.eps();
  return gc;
}

GradDtype GradDtypeFromSpec(const TrainingSpec& training) {
  return training.grad_dtype() == GRAD_BF16 ? GradDtype::kBf16 : GradDtype::kFp32;
}

absl::Status ConfigureDeviceModel(const TrainingSpec& training, DeviceModel* model) {
  model->set_deterministic(training.deterministic());
  return model->set_lm_head_chunks(training.lm_head_chunks());
}

bool IsQuantizerParam(const std::string& name) {
  for (const char* suffix : {".w_scale", ".w_zero", ".x_scale", ".x_zero", ".phi_l", ".phi_r"}) {
    if (absl::EndsWith(name, suffix)) return true;
  }
  return false;
}

absl::StatusOr<std::unique_ptr<Teacher>> Teacher::Load(const JobSpec& spec) {
  const DistillSpec& d = spec.precision().distill();
  ASSIGN_OR_RETURN(GptConfig gc, ModelConfigFromSpec(spec));
  gc.precision = PrecisionConfig();  // the teacher runs in full precision
  gc.tweo = TweoOptions();
  std::unique_ptr<Teacher> t(new Teacher());
  ASSIGN_OR_RETURN(t->model_, Gpt::Create(gc));
  ASSIGN_OR_RETURN(int loaded, LoadWeights(d.teacher_checkpoint(), &t->model_->params(),
                                           [](const std::string&) { return false; }));
  (void)loaded;
  t->loss_ = d.loss() == DistillSpec::KL ? ops::DistillLoss::kKl : ops::DistillLoss::kMse;
  t->weight_ = d.weight();
  return t;
}

absl::StatusOr<double> Teacher::Loss(const Gpt* student, const int32_t* inputs, int B, int T,
                                     float scale) {
  ASSIGN_OR_RETURN(double unused, model_->Forward(inputs, nullptr, B, T));
  (void)unused;
  model_->Logits(&teacher_logits_);
  student->Logits(&student_logits_);
  const int N = B * T, V = student->config().vocab_size;
  const double loss =
      ops::distill_forward(student_logits_.data(), teacher_logits_.data(), N, V, loss_);
  dlogits_.assign(static_cast<size_t>(N) * V, 0.0f);
  ops::distill_backward(dlogits_.data(), student_logits_.data(), teacher_logits_.data(), N, V,
                        loss_, scale * weight_);
  return loss;
}

absl::StatusOr<double> EvaluateLoss(const BatchLossFn& loss_of, DataLoader* val, int batches) {
  val->Reset();
  const int B = val->B(), T = val->T();
  std::vector<int32_t> x(static_cast<size_t>(B) * T), y(static_cast<size_t>(B) * T);
  double sum = 0;
  for (int i = 0; i < batches; ++i) {
    RETURN_IF_ERROR(val->Next(x.data(), y.data()));
    ASSIGN_OR_RETURN(double loss, loss_of(x.data(), y.data(), B, T));
    sum += loss;
  }
  return sum / batches;
}

absl::StatusOr<double> EvaluateLoss(Gpt* model, DataLoader* val, int batches) {
  return EvaluateLoss(
      [model](const int32_t* x, const int32_t* y, int B, int T) {
        return model->Forward(x, y, B, T);
      },
      val, batches);
}

absl::StatusOr<JobSpec> JobSpecFromCheckpoint(const std::string& path) {
  ASSIGN_OR_RETURN(SafeTensors st, ReadSafeTensors(path));
  ASSIGN_OR_RETURN(std::string text, st.Meta("job_spec", path));
  return ParseJobSpec(text, path + " (job_spec metadata)");
}

absl::StatusOr<std::unique_ptr<Gpt>> LoadModelForEval(const JobSpec& spec,
                                                      const std::string& checkpoint) {
  ASSIGN_OR_RETURN(GptConfig gc, ModelConfigFromSpec(spec));
  ASSIGN_OR_RETURN(std::unique_ptr<Gpt> model, Gpt::Create(gc));
  ASSIGN_OR_RETURN(TrainState state, LoadCheckpoint(checkpoint, &model->params(), nullptr));
  (void)state;
  RETURN_IF_ERROR(model->RestoreStateFromBuffers());
  return model;
}

void AddModelMetrics(const Gpt& model, const JobSpec& spec, double tweo, double distill,
                     bool has_teacher, MetricRow* row) {
  if (spec.precision().tweo().enabled()) row->push_back({"tweo_loss", tweo});
  if (has_teacher) row->push_back({"distill_loss", distill});
  const std::vector<BlockStats> stats = model.block_stats();
  for (size_t l = 0; l < stats.size(); ++l) {
    row->push_back({absl::StrCat("peak_act.", l), stats[l].peak});
    row->push_back({absl::StrCat("kurtosis.", l), stats[l].kurtosis});
  }
  if (spec.precision().aux_lowrank().enabled()) {
    const std::vector<int> ranks = model.phi_ranks();
    for (size_t l = 0; l < ranks.size(); ++l) {
      row->push_back({absl::StrCat("phi_rank.", l), static_cast<double>(ranks[l])});
    }
  }
}

}  // namespace qtrain
