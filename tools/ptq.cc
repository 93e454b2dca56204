// ptq: W8A8 per-tensor static post-training quantization of a full-precision checkpoint:
// weight steps from max|W|, activation steps from max|x| over calibration batches of the
// train split (absmax calibration), then the val loss of the quantized model next to the
// full-precision one. With --residual the residual stream itself is quantized too (static
// per-tensor steps, same bits), the W8A8 deployment the TWEO paper measures: extreme outliers
// in the block outputs make per-tensor scales useless there.
#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "configs/job_spec_loader.h"
#include "ops/status_macros.h"
#include "trainer/checkpoint.h"
#include "trainer/cli.h"
#include "trainer/data_loader.h"
#include "trainer/gpt.h"
#include "trainer/model_setup.h"

ABSL_FLAG(std::string, checkpoint, "", "full-precision qtrain checkpoint");
ABSL_FLAG(int, bits, 8, "weight and activation bits (per-tensor, symmetric)");
ABSL_FLAG(int, calib_batches, 16, "train batches for activation calibration");
ABSL_FLAG(int, batches, 0, "val batches (default: the job's eval.batches)");
ABSL_FLAG(int, batch_size, 0,
          "sequences per calibration and val batch (default: the job's training.batch_size)");
ABSL_FLAG(bool, residual, false,
          "also quantize the residual stream (embedding output, every block's res2 and output) "
          "with static per-tensor steps from absmax calibration, same bits; reports both results");
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
  const int calib_batches = absl::GetFlag(FLAGS_calib_batches);
  if (calib_batches < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("--calib_batches must be at least 1, got ", calib_batches));
  }
  if (absl::GetFlag(FLAGS_batches) < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--batches must be positive (0: the job's eval.batches), got ",
                     absl::GetFlag(FLAGS_batches)));
  }
  if (absl::GetFlag(FLAGS_batch_size) < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--batch_size must be positive (0: the job's training.batch_size), got ",
                     absl::GetFlag(FLAGS_batch_size)));
  }
  const bool residual = absl::GetFlag(FLAGS_residual);
  const int batches = absl::GetFlag(FLAGS_batches) > 0 ? absl::GetFlag(FLAGS_batches)
                                                       : spec.eval().batches();
  const int B = absl::GetFlag(FLAGS_batch_size) > 0 ? absl::GetFlag(FLAGS_batch_size)
                                                    : spec.training().batch_size();
  const int T = spec.training().seq_len();
  const int V = spec.model().vocab_size();
  ASSIGN_OR_RETURN(std::unique_ptr<DataLoader> val,
                   DataLoader::Open(spec.data().val_pattern(), B, T, 0, 1, V));
  ASSIGN_OR_RETURN(std::unique_ptr<DataLoader> train,
                   DataLoader::Open(spec.data().train_pattern(), B, T, 0, 1, V));

  // The full-precision reference, and the one calibration pass: every Linear's input and every
  // residual point, absmax over the train batches, all from the full-precision model.
  ASSIGN_OR_RETURN(GptConfig fp_config, ModelConfigFromSpec(spec));
  fp_config.precision = PrecisionConfig();
  ASSIGN_OR_RETURN(std::unique_ptr<Gpt> fp, Gpt::Create(fp_config));
  ASSIGN_OR_RETURN(int loaded, LoadWeights(ckpt, &fp->params(), IsQuantizerParam));
  (void)loaded;
  ASSIGN_OR_RETURN(double fp_loss, EvaluateLoss(fp.get(), val.get(), batches));
  for (Linear* lin : fp->linears()) lin->set_calibrating(true);
  fp->set_residual_calibrating(true);
  std::vector<int32_t> x(static_cast<size_t>(B) * T), y(static_cast<size_t>(B) * T);
  for (int i = 0; i < calib_batches; ++i) {
    RETURN_IF_ERROR(train->Next(x.data(), y.data()));
    ASSIGN_OR_RETURN(double unused, fp->Forward(x.data(), nullptr, B, T));
    (void)unused;
  }
  std::vector<float> act_amax;
  for (Linear* lin : fp->linears()) act_amax.push_back(lin->calibrated_amax());
  const std::vector<float> residual_amax = fp->residual_calibrated_amax();
  fp.reset();  // a 124M model's activations at T 1024 are gigabytes

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
  const std::vector<Linear*> linears = model->linears();
  double max_amax = 0;
  for (size_t i = 0; i < linears.size(); ++i) {
    RETURN_IF_ERROR(linears[i]->SetWeightStepFromAbsmax());
    RETURN_IF_ERROR(linears[i]->SetActivationStepFromAmax(act_amax[i]));
    max_amax = std::max<double>(max_amax, act_amax[i]);
  }
  ASSIGN_OR_RETURN(double q_loss, EvaluateLoss(model.get(), val.get(), batches));
  std::printf("checkpoint %s\nfp32 val_loss %.6f\nw%da%d per-tensor PTQ val_loss %.6f\n"
              "degradation %+.6f\nlargest calibrated activation amax %.3f\n",
              ckpt.c_str(), fp_loss, bits, bits, q_loss, q_loss - fp_loss, max_amax);
  if (!residual) {
    std::printf(
        "{\"fp_val_loss\": %.6f, \"ptq_val_loss\": %.6f, \"bits\": %d, \"max_act_amax\": %.4f}\n",
        fp_loss, q_loss, bits, max_amax);
    return absl::OkStatus();
  }

  // The Linears as above, and the residual stream quantized with the same bits.
  ASSIGN_OR_RETURN(ResidualQuant rq, ResidualQuantFromAmax(bits, residual_amax));
  RETURN_IF_ERROR(model->set_residual_quant(rq));
  ASSIGN_OR_RETURN(double qr_loss, EvaluateLoss(model.get(), val.get(), batches));
  const double max_residual =
      residual_amax.empty() ? 0.0 : *std::max_element(residual_amax.begin(), residual_amax.end());
  std::printf("w%da%d per-tensor PTQ + residual stream val_loss %.6f\n"
              "degradation %+.6f\nlargest calibrated residual amax %.3f\n",
              bits, bits, qr_loss, qr_loss - fp_loss, max_residual);
  std::printf(
      "{\"fp_val_loss\": %.6f, \"ptq_val_loss\": %.6f, \"bits\": %d, \"max_act_amax\": %.4f, "
      "\"ptq_residual_val_loss\": %.6f, \"max_residual_amax\": %.4f}\n",
      fp_loss, q_loss, bits, max_amax, qr_loss, max_residual);
  return absl::OkStatus();
}

}  // namespace
}  // namespace qtrain

int main(int argc, char** argv) {
  std::vector<char*> rest = qtrain::InitCommandLine(
      argc, argv,
      "ptq --checkpoint=PATH [--bits=8|4] [--residual] [--calib_batches=N] [--batches=N] "
      "[--batch_size=N] [--train_pattern=GLOB] [--val_pattern=GLOB]",
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
