// qtrain: trains the model a job spec describes. `qtrain --job=configs/tiny_cpu.textproto`.
#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "configs/job_spec_loader.h"
#include "trainer/trainer.h"

ABSL_FLAG(std::string, job, "", "path of the job spec (text protobuf), e.g. configs/tiny_cpu.textproto");
ABSL_FLAG(int, steps, -1, "override training.steps");
ABSL_FLAG(std::string, out_dir, "", "override out_dir (checkpoints, metrics.jsonl)");
ABSL_FLAG(std::string, resume, "",
          "resume: 'latest' (newest checkpoint in out_dir) or a checkpoint path");
ABSL_FLAG(bool, quiet, false, "no progress lines");

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("qtrain --job=PATH [--steps=N] [--out_dir=DIR] [--resume=latest|PATH]");
  absl::ParseCommandLine(argc, argv);
  const std::string job = absl::GetFlag(FLAGS_job);
  if (job.empty()) {
    std::fprintf(stderr, "qtrain: --job is required (e.g. --job=configs/tiny_cpu.textproto)\n");
    return 2;
  }
  absl::StatusOr<qtrain::JobSpec> spec = qtrain::LoadJobSpec(job);
  if (!spec.ok()) {
    std::fprintf(stderr, "qtrain: %s\n", std::string(spec.status().message()).c_str());
    return 1;
  }
  if (absl::GetFlag(FLAGS_steps) >= 0) spec->mutable_training()->set_steps(absl::GetFlag(FLAGS_steps));
  if (!absl::GetFlag(FLAGS_out_dir).empty()) spec->set_out_dir(absl::GetFlag(FLAGS_out_dir));
  qtrain::RunOptions options;
  options.resume = absl::GetFlag(FLAGS_resume);
  options.quiet = absl::GetFlag(FLAGS_quiet);
  absl::StatusOr<qtrain::RunResult> result = qtrain::RunTraining(*spec, options);
  if (!result.ok()) {
    std::fprintf(stderr, "qtrain: %s\n", std::string(result.status().message()).c_str());
    return 1;
  }
  return 0;
}
