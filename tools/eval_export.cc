// eval_export: val loss of a model straight from an export (packed integer weights): unpacks,
// dequantizes with the exported steps and runs the quantized forward.
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "configs/job_spec_loader.h"
#include "ops/status_macros.h"
#include "trainer/data_loader.h"
#include "trainer/export_reader.h"
#include "trainer/model_setup.h"

ABSL_FLAG(std::string, export_path, "", "safetensors written by //tools:export");
ABSL_FLAG(std::string, val_pattern, "", "override the job's data.val_pattern");
ABSL_FLAG(int, batches, 0, "val batches (default: the job's eval.batches)");

namespace qtrain {
namespace {

absl::StatusOr<double> EvalExport(const std::string& path, std::string val_pattern, int batches) {
  JobSpec spec;
  ASSIGN_OR_RETURN(std::unique_ptr<Gpt> model, LoadExportedModel(path, &spec));
  if (val_pattern.empty()) val_pattern = spec.data().val_pattern();
  if (batches <= 0) batches = spec.eval().batches();
  ASSIGN_OR_RETURN(std::unique_ptr<DataLoader> val,
                   DataLoader::Open(val_pattern, spec.training().batch_size(),
                                    spec.training().seq_len(), 0, 1, spec.model().vocab_size()));
  return EvaluateLoss(model.get(), val.get(), batches);
}

}  // namespace
}  // namespace qtrain

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const std::string path = absl::GetFlag(FLAGS_export_path);
  if (path.empty()) {
    std::fprintf(stderr, "eval_export: --export_path is required\n");
    return 2;
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
