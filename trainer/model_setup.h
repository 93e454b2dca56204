// From a validated job spec to the model's C++ config, plus the pieces of a step that depend
// on the precision block: the distillation teacher and the per-block model metrics.
#ifndef QTRAIN_TRAINER_MODEL_SETUP_H_
#define QTRAIN_TRAINER_MODEL_SETUP_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "configs/job_spec.pb.h"
#include "ops/distill.h"
#include "trainer/data_loader.h"
#include "trainer/device_model.h"
#include "trainer/gpt.h"
#include "trainer/metrics.h"

namespace qtrain {

absl::StatusOr<GptConfig> ModelConfigFromSpec(const JobSpec& spec);

// Host memory a run of `spec` will allocate, estimated from the shapes: fp32 weights,
// gradients and AdamW moments (16 bytes per parameter), plus the CPU model's activations and
// their gradients for one micro-batch (none for a device run, whose activations live on the
// GPU).
struct HostMemoryEstimate {
  int64_t parameters = 0;
  double parameter_bytes = 0;
  double activation_bytes = 0;
  double total() const { return parameter_bytes + activation_bytes; }
};
HostMemoryEstimate EstimateHostMemory(const JobSpec& spec);
// "about 3.1 TiB of host memory (195.7G parameters: ..., plus ... of activations ...)".
std::string DescribeHostMemory(const HostMemoryEstimate& estimate, const JobSpec& spec);
// ResourceExhausted before anything is allocated when the estimate exceeds the memory this
// machine has available (/proc/meminfo MemAvailable); OK when that cannot be read.
absl::Status CheckHostMemory(const JobSpec& spec);

// The device model's share of the training block: the gradient type to create it with, then
// the settings of the created model (training.deterministic, training.lm_head_chunks).
GradDtype GradDtypeFromSpec(const TrainingSpec& training);
absl::Status ConfigureDeviceModel(const TrainingSpec& training, DeviceModel* model);

// Parameters that a full-precision checkpoint lacks and InitQuantizers sets: LSQ steps and
// offsets, Phi factors.
bool IsQuantizerParam(const std::string& name);

// A frozen full-precision copy of the model, loaded from precision.distill.teacher_checkpoint.
class Teacher {
 public:
  static absl::StatusOr<std::unique_ptr<Teacher>> Load(const JobSpec& spec);
  // Runs the teacher on inputs (B,T), compares with the student's logits of its last Forward
  // and returns the distillation loss; dlogits() then holds scale * weight * d loss / d logits.
  absl::StatusOr<double> Loss(const Gpt* student, const int32_t* inputs, int B, int T,
                              float scale);
  const float* dlogits() const { return dlogits_.data(); }
  // For a device teacher (DeviceModel::SetTeacher): the loaded model and the loss settings.
  const GptConfig& config() const { return model_->config(); }
  const ParamStore& params() const { return model_->params(); }
  ops::DistillLoss loss() const { return loss_; }
  float weight() const { return weight_; }

 private:
  std::unique_ptr<Gpt> model_;
  ops::DistillLoss loss_ = ops::DistillLoss::kMse;
  float weight_ = 1;
  std::vector<float> teacher_logits_, student_logits_, dlogits_;
};

// Mean loss over `batches` batches from the start of `val` (the same batches every time),
// each computed by `loss_of(inputs, targets, B, T)`; the Gpt overload uses model->Forward.
using BatchLossFn =
    std::function<absl::StatusOr<double>(const int32_t*, const int32_t*, int, int)>;
absl::StatusOr<double> EvaluateLoss(const BatchLossFn& loss_of, DataLoader* val, int batches);

// FailedPrecondition when `val` holds fewer than `batches` distinct batches (an evaluation
// would count some twice), naming `setting` (e.g. "eval.batches") and the val shards.
absl::Status CheckEvalBatches(const DataLoader& val, int batches, const std::string& setting);
absl::StatusOr<double> EvaluateLoss(Gpt* model, DataLoader* val, int batches);

// The job spec a checkpoint or export carries in its metadata ("job_spec"), validated.
absl::StatusOr<JobSpec> JobSpecFromCheckpoint(const std::string& path);

// A model built from `spec` with the weights, quantizer parameters and buffers of a qtrain
// checkpoint (no optimizer state), ready to evaluate.
absl::StatusOr<std::unique_ptr<Gpt>> LoadModelForEval(const JobSpec& spec,
                                                      const std::string& checkpoint);

// Adds per-step model metrics: tweo_loss, distill_loss, and per block l "peak_act.l",
// "kurtosis.l" (block output statistics) and "phi_rank.l" when Phi is on.
void AddModelMetrics(const Gpt& model, const JobSpec& spec, double tweo, double distill,
                     bool has_teacher, MetricRow* row);

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_MODEL_SETUP_H_
