// ptq: W8A8 per-tensor static post-training quantization of a full-precision checkpoint:
// weight steps from max|W|, activation steps from max|x| over calibration batches of the
// train split (absmax calibration), then the val loss of the quantized model next to the
// full-precision one. The figure TWEO is about: outliers make per-tensor scales useless.
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "configs/job_spec_loader.h"
#include "ops/status_macros.h"
#include "trainer/checkpoint.h"
#include "trainer/cli.h"
#include "trainer/data_loader.h"
#include "trainer/model_setup.h"

ABSL_FLAG(std::string, checkpoint, "", "full-precision qtrain checkpoint");
ABSL_FLAG(int, bits, 8, "weight and activation bits (per-tensor, symmetric)");
ABSL_FLAG(int, calib_batches, 16, "train batches for activation calibration");
ABSL_FLAG(int, batches, 0, "val batches (default: the job's eval.batches)");
ABSL_FLAG(std::string, train_pattern, "", "override the job's data.train_pattern");
ABSL_FLAG(std::string, val_pattern, "", "override the job's data.val_pattern");

namespace qtrain {
namespace {

// PTQ starts from full-precision weights. A QAT checkpoint's latent weights were trained for its
// own quantizers (and carry their steps): quantizing them afresh would measure nothing useful.
absl::Status RequireFullPrecision(const JobSpec& spec, const std::string& ckpt) {
  const PrecisionSpec& p = spec.precision();
  bool qat = p.linear() == QAT;
  for (const LayerOverride& o : p.overrides()) qat = qat || o.precision() == QAT;
  if (!qat) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      ckpt, " is a QAT checkpoint (precision.linear ", LinearPrecision_Name(p.linear()), ", ",
      p.qat().weight_bits(), "-bit weights, ",
      p.qat().act_bits() == 0 ? std::string("full-precision")
                              : absl::StrCat(p.qat().act_bits(), "-bit"),
      " activations): PTQ "
      "quantizes a full-precision checkpoint. Its own quantized model is evaluated with "
      "//tools:export --checkpoint=", ckpt, " --out=X then //tools:eval_export --export_path=X"));
}

absl::Status Ptq(const std::string& ckpt) {
  ASSIGN_OR_RETURN(JobSpec spec, JobSpecFromCheckpoint(ckpt));
  RETURN_IF_ERROR(RequireFullPrecision(spec, ckpt));
  if (!absl::GetFlag(FLAGS_train_pattern).empty()) {
    spec.mutable_data()->set_train_pattern(absl::GetFlag(FLAGS_train_pattern));
  }
  if (!absl::GetFlag(FLAGS_val_pattern).empty()) {
    spec.mutable_data()->set_val_pattern(absl::GetFlag(FLAGS_val_pattern));
  }
  const int bits = absl::GetFlag(FLAGS_bits);
  if (bits != 4 && bits != 8) {
    return absl::InvalidArgumentError(absl::StrCat("--bits must be 4 or 8, got ", bits));
  }
  const int batches = absl::GetFlag(FLAGS_batches) > 0 ? absl::GetFlag(FLAGS_batches)
                                                       : spec.eval().batches();
  const int B = spec.training().batch_size(), T = spec.training().seq_len();
  const int V = spec.model().vocab_size();
  ASSIGN_OR_RETURN(std::unique_ptr<DataLoader> val,
                   DataLoader::Open(spec.data().val_pattern(), B, T, 0, 1, V));
  ASSIGN_OR_RETURN(std::unique_ptr<DataLoader> train,
                   DataLoader::Open(spec.data().train_pattern(), B, T, 0, 1, V));

  // The full-precision reference.
  ASSIGN_OR_RETURN(GptConfig fp_config, ModelConfigFromSpec(spec));
  fp_config.precision = PrecisionConfig();
  ASSIGN_OR_RETURN(std::unique_ptr<Gpt> fp, Gpt::Create(fp_config));
  ASSIGN_OR_RETURN(int loaded, LoadWeights(ckpt, &fp->params(), IsQuantizerParam));
  (void)loaded;
  ASSIGN_OR_RETURN(double fp_loss, EvaluateLoss(fp.get(), val.get(), batches));

  // The same weights with every block Linear in W{bits}A{bits} per-tensor static.
  JobSpec q = spec;
  PrecisionSpec* p = q.mutable_precision();
  p->Clear();
  p->set_linear(QAT);
  p->mutable_qat()->set_weight_bits(bits);
  p->mutable_qat()->set_weight_granularity(PER_TENSOR);
  p->mutable_qat()->set_act_bits(bits);
  p->mutable_qat()->set_act_granularity(PER_TENSOR);
  ASSIGN_OR_RETURN(GptConfig qc, ModelConfigFromSpec(q));
  ASSIGN_OR_RETURN(std::unique_ptr<Gpt> model, Gpt::Create(qc));
  ASSIGN_OR_RETURN(loaded, LoadWeights(ckpt, &model->params(), IsQuantizerParam));
  for (Linear* lin : model->linears()) {
    RETURN_IF_ERROR(lin->SetWeightStepFromAbsmax());
    lin->set_calibrating(true);
  }
  std::vector<int32_t> x(static_cast<size_t>(B) * T), y(static_cast<size_t>(B) * T);
  for (int i = 0; i < absl::GetFlag(FLAGS_calib_batches); ++i) {
    RETURN_IF_ERROR(train->Next(x.data(), y.data()));
    ASSIGN_OR_RETURN(double unused, model->Forward(x.data(), nullptr, B, T));
    (void)unused;
  }
  double max_amax = 0;
  for (Linear* lin : model->linears()) {
    lin->set_calibrating(false);
    RETURN_IF_ERROR(lin->SetActivationStepFromAmax(lin->calibrated_amax()));
    max_amax = std::max<double>(max_amax, lin->calibrated_amax());
  }
  ASSIGN_OR_RETURN(double q_loss, EvaluateLoss(model.get(), val.get(), batches));
  std::printf("checkpoint %s\nfp32 val_loss %.6f\nw%da%d per-tensor PTQ val_loss %.6f\n"
              "degradation %+.6f\nlargest calibrated activation amax %.3f\n",
              ckpt.c_str(), fp_loss, bits, bits, q_loss, q_loss - fp_loss, max_amax);
  std::printf("{\"fp_val_loss\": %.6f, \"ptq_val_loss\": %.6f, \"bits\": %d, \"max_act_amax\": %.4f}\n",
              fp_loss, q_loss, bits, max_amax);
  return absl::OkStatus();
}

}  // namespace
}  // namespace qtrain

int main(int argc, char** argv) {
  std::vector<char*> rest = qtrain::InitCommandLine(
      argc, argv,
      "ptq --checkpoint=PATH [--bits=8|4] [--calib_batches=N] [--batches=N] "
      "[--train_pattern=GLOB] [--val_pattern=GLOB]",
      __FILE__);
  if (rest.size() > 1) return qtrain::UsageError("ptq", absl::StrCat("unexpected argument '", rest[1], "'"));
  const std::string ckpt = absl::GetFlag(FLAGS_checkpoint);
  if (ckpt.empty()) return qtrain::UsageError("ptq", "--checkpoint is required");
  absl::Status s = qtrain::Ptq(ckpt);
  if (!s.ok()) {
    std::fprintf(stderr, "ptq: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
