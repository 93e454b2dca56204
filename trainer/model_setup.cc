// ModelConfigFromSpec, Teacher, AddModelMetrics.
#include "trainer/model_setup.h"

#include <algorithm>
#include <fstream>

#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
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

HostMemoryEstimate EstimateHostMemory(const JobSpec& spec) {
  const ModelSpec& m = spec.model();
  const double C = m.n_embd(), L = m.n_layer(), NH = m.n_head();
  const double V = std::max(m.vocab_size(), m.padded_vocab_size());
  const double B = spec.training().batch_size(), T = spec.training().seq_len();
  HostMemoryEstimate e;
  const double params = V * C + static_cast<double>(m.max_seq_len()) * C +
                        L * (12 * C * C + 13 * C) + 2 * C;
  e.parameters = static_cast<int64_t>(std::min(params, 9e18));
  e.parameter_bytes = params * 16;  // weights, gradients, Adam m and v, fp32
  if (spec.device() != CUDA) {
    // Per block: 16 (N, C) tensors and the (B, NH, T, T) attention; then the backward's
    // scratch, the logits' probabilities and the final layernorm (trainer/gpt.cc Allocate).
    const double N = B * T, att = B * NH * T * T;
    e.activation_bytes = 4 * (L * (16 * N * C + att) + 18 * N * C + att + N * V);
  }
  return e;
}

namespace {
std::string Bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int u = 0;
  while (b >= 1024 && u < 6) {
    b /= 1024;
    ++u;
  }
  return absl::StrFormat("%.1f %s", b, units[u]);
}
}  // namespace

std::string DescribeHostMemory(const HostMemoryEstimate& e, const JobSpec& spec) {
  std::string text = absl::StrFormat(
      "about %s of host memory (%.4gM parameters: %s for fp32 weights, gradients and AdamW "
      "moments", Bytes(e.total()), e.parameters / 1e6, Bytes(e.parameter_bytes));
  if (e.activation_bytes > 0) {
    absl::StrAppend(&text, absl::StrFormat(", plus %s of activations for batch_size %d x "
                                           "seq_len %d", Bytes(e.activation_bytes),
                                           spec.training().batch_size(),
                                           spec.training().seq_len()));
  }
  return text + ")";
}

absl::Status CheckHostMemory(const JobSpec& spec) {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  double kib = -1;
  while (meminfo >> key) {
    if (key == "MemAvailable:") {
      meminfo >> kib;
      break;
    }
    meminfo.ignore(1 << 10, '\n');
  }
  if (kib <= 0) return absl::OkStatus();
  const HostMemoryEstimate e = EstimateHostMemory(spec);
  const double available = kib * 1024;
  if (e.total() <= available) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(
      "the model of job '", spec.name(), "' needs ", DescribeHostMemory(e, spec),
      "; this machine has ", Bytes(available), " available. Make model.n_embd, model.n_layer "
      "or model.vocab_size smaller (or training.batch_size / seq_len for the activations)"));
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

absl::Status CheckEvalBatches(const DataLoader& val, int batches, const std::string& setting) {
  if (batches <= val.steps_per_epoch()) return absl::OkStatus();
  const std::vector<std::string>& shards = val.shard_paths();
  return absl::FailedPreconditionError(absl::StrCat(
      setting, ": ", batches, " batches of ", val.world_size(), " x ", val.B(), " x ", val.T(),
      " tokens, but the val split (", shards.size() == 1 ? shards[0] : absl::StrCat(shards.size(), " shards"),
      ", ", val.total_tokens(), " tokens) holds only ", val.steps_per_epoch(),
      ": lower ", setting, " to ", val.steps_per_epoch(), " or use a larger val split"));
}

absl::StatusOr<double> EvaluateLoss(const BatchLossFn& loss_of, DataLoader* val, int batches) {
  RETURN_IF_ERROR(CheckEvalBatches(*val, batches, "evaluation batches"));
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
