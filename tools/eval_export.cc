// eval_export: val loss of a model straight from an export: a qtrain export (packed integer
// weights: unpacks, dequantizes with the exported steps and runs the quantized forward) or a
// GGUF file (qtrain's own GGUF reader dequantizes the Q4_0/Q4_1/Q8_0 blocks; tools/gguf_gpt2.h).
// --device=cuda runs the same model on the GPU (trainer/cuda: its QAT forward re-quantizes the
// dequantized weights with the exported steps, which gives back the exported codes), on the
// same val batches as the trainer's evaluation, so the figure sits beside the run's val_loss.
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "configs/job_spec_loader.h"
#include "ops/status_macros.h"
#include "trainer/cli.h"
#include "trainer/device_model.h"
#include "trainer/data_loader.h"
#include "tools/gguf_gpt2.h"
#include "trainer/export_reader.h"
#include "trainer/gguf.h"
#include "trainer/model_setup.h"

ABSL_FLAG(std::string, export_path, "",
          "a //tools:export file: qtrain safetensors (--format=qtrain) or GGUF (--format=gguf)");
ABSL_FLAG(std::string, val_pattern, "", "override the job's data.val_pattern");
ABSL_FLAG(int, batches, 0, "val batches (default: the job's eval.batches)");
ABSL_FLAG(int, batch_size, 0,
          "sequences per batch (default: the job's; needed for a GGUF without qtrain.job_spec)");
ABSL_FLAG(int, seq_len, 0, "tokens per sequence (default: the job's)");
ABSL_FLAG(std::string, device, "cpu",
          "cpu (the reference forward) or cuda (the CUDA model, for models of useful size)");

namespace qtrain {
namespace {

bool IsGguf(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  return in.read(magic, 4) && std::string(magic, 4) == "GGUF";
}

absl::StatusOr<double> EvalExport(const std::string& path, std::string val_pattern, int batches) {
  JobSpec spec;
  std::unique_ptr<Gpt> model;
  if (IsGguf(path)) {
    ASSIGN_OR_RETURN(GgufFile file, ReadGguf(path));
    ASSIGN_OR_RETURN(model, LoadGgufGpt2(file, path));
    if (file.Find("qtrain.job_spec") != nullptr) {
      ASSIGN_OR_RETURN(std::string text, file.GetString("qtrain.job_spec", path));
      ASSIGN_OR_RETURN(spec, ParseJobSpec(text, path + " (qtrain.job_spec)"));
    }
  } else {
    ASSIGN_OR_RETURN(model, LoadExportedModel(path, &spec));
  }
  if (val_pattern.empty()) val_pattern = spec.data().val_pattern();
  if (batches <= 0) batches = spec.eval().batches();
  int B = absl::GetFlag(FLAGS_batch_size), T = absl::GetFlag(FLAGS_seq_len);
  if (B <= 0) B = spec.training().batch_size();
  if (T <= 0) T = spec.training().seq_len();
  if (val_pattern.empty() || batches <= 0 || B <= 0 || T <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        path, " carries no qtrain job spec: give --val_pattern, --batches, --batch_size and "
              "--seq_len"));
  }
  ASSIGN_OR_RETURN(std::unique_ptr<DataLoader> val,
                   DataLoader::Open(val_pattern, B, T, 0, 1, model->config().vocab_size));
  if (absl::GetFlag(FLAGS_device) == "cpu") return EvaluateLoss(model.get(), val.get(), batches);
  ASSIGN_OR_RETURN(std::unique_ptr<DeviceModel> dev,
                   CreateCudaModelForwardOnly(model->config(), model->params()));
  RETURN_IF_ERROR(dev->set_lm_head_chunks(spec.training().lm_head_chunks()));
  RETURN_IF_ERROR(dev->Upload(model->params(), nullptr));
  return EvaluateLoss(
      [&dev](const int32_t* x, const int32_t* y, int b, int t) {
        return dev->Forward(x, y, b, t, 0.f);
      },
      val.get(), batches);
}

}  // namespace
}  // namespace qtrain

int main(int argc, char** argv) {
  std::vector<char*> rest = qtrain::InitCommandLine(
      argc, argv, "eval_export --export_path=PATH [--val_pattern=GLOB] [--batches=N] [--batch_size=N] "
      "[--seq_len=N] [--device=cpu|cuda]", __FILE__);
  if (rest.size() > 1) return qtrain::UsageError("eval_export", absl::StrCat("unexpected argument '", rest[1], "'"));
  const std::string path = absl::GetFlag(FLAGS_export_path);
  if (path.empty()) return qtrain::UsageError("eval_export", "--export_path is required");
  const std::string device = absl::GetFlag(FLAGS_device);
  if (device != "cpu" && device != "cuda") {
    return qtrain::UsageError("eval_export",
                              absl::StrCat("--device must be cpu or cuda, got '", device, "'"));
  }
  absl::StatusOr<double> loss =
      qtrain::EvalExport(path, absl::GetFlag(FLAGS_val_pattern), absl::GetFlag(FLAGS_batches));
  if (!loss.ok()) {
    std::fprintf(stderr, "eval_export: %s\n", std::string(loss.status().message()).c_str());
    return 1;
  }
  std::printf("val_loss %.6f\n", *loss);
  return 0;
}
