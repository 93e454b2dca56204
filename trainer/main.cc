// qtrain: trains the model a job spec describes. `qtrain --job=configs/tiny_cpu.textproto`;
// data-parallel under `mpirun -np N` or `srun --mpi=pmix` when the job sets distributed.backend,
// or through the parameter service with --coordinator (trainer/service_run.h).
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "configs/job_spec_loader.h"
#include "distributed/distributed_context.h"
#include "trainer/cli.h"
#include "trainer/service_run.h"
#include "trainer/sinks.h"
#include "trainer/trainer.h"

ABSL_FLAG(std::string, job, "",
          "path of the job spec (text protobuf), e.g. configs/tiny_cpu.textproto, or ps://JOB "
          "for a job registered with the parameter service at --coordinator");
ABSL_FLAG(std::optional<int>, steps, std::nullopt,
          "override training.steps (the same as --set=training.steps=N)");
ABSL_FLAG(std::string, out_dir, "",
          "override out_dir (checkpoints, metrics.jsonl; the same as --set=out_dir=DIR)");
// Read with RepeatedFlagValues (abseil would keep only the last --set); defined here for --help
// and so that abseil accepts it.
ABSL_FLAG(std::string, set, "",
          "override any job field before validation: FIELD=VALUE, repeatable and "
          "comma-separated, e.g. --set=schedule.warmup_steps=5 --set=optimizer.lr=1e-3 (strings "
          "as typed, enums by name, a block as '{...}' in text format)");
ABSL_FLAG(std::string, resume, "",
          "resume: 'latest' (newest checkpoint in out_dir), a checkpoint path, or "
          "ps://JOB/latest (ps://JOB/STEP) from the parameter service");
ABSL_FLAG(int, global_batch, -1,
          "sequences per optimizer step over all ranks: sets training.batch_size to "
          "global_batch / (ranks * grad_accum), so one job file serves any number of ranks that "
          "divides it (and a checkpoint resumes on another number of ranks)");
ABSL_FLAG(std::string, backend, "",
          "override distributed.backend: 'mpi' (what the launch/ scripts pass, so any job file "
          "runs data-parallel) or 'none'");
ABSL_FLAG(bool, quiet, false, "no progress lines");
ABSL_FLAG(bool, overwrite, false,
          "start afresh in an out_dir that holds another run: delete its checkpoints and "
          "metrics.jsonl first (without it such an out_dir is refused)");
ABSL_FLAG(bool, allow_spec_change, false,
          "resume even though the job differs from the checkpoint's in a way that breaks a "
          "bit-identical resume (learning rate, schedule, --steps, precision, ...); the "
          "differences are printed either way");
ABSL_FLAG(std::string, coordinator, "",
          "host:port of a qtrain_ps: set distributed.coordinator (ranks meet through the service, "
          "no MPI) and where --job=ps://JOB is fetched from");
ABSL_FLAG(std::string, parameter_service, "",
          "host:port: set parameter_service.address (the job spec, metrics and checkpoints go "
          "to that qtrain_ps too)");
ABSL_FLAG(int, rank, -1, "with --coordinator: this process's rank (default: the launcher's, "
          "$QTRAIN_RANK, or the service assigns one)");
ABSL_FLAG(int, world_size, 0, "with --coordinator: the number of ranks (default: the launcher's "
          "or $QTRAIN_WORLD_SIZE)");

namespace {

// Prefixes messages with the rank when there are several, so interleaved output stays legible.
std::string Prefix(const qtrain::DistributedContext* dist) {
  if (dist == nullptr || dist->world_size() == 1) return "qtrain: ";
  return absl::StrCat("qtrain: rank ", dist->rank(), ": ");
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> set_values = qtrain::RepeatedFlagValues(argc, argv, "set");
  std::vector<char*> rest = qtrain::InitCommandLine(
      argc, argv,
      "qtrain --job=PATH|ps://JOB [--steps=N] [--out_dir=DIR] [--set=FIELD=VALUE,...] "
      "[--resume=latest|PATH] [--overwrite] [--allow_spec_change] [--global_batch=N] "
      "[--backend=mpi] [--coordinator=HOST:PORT]",
      __FILE__);
  if (rest.size() > 1) {
    return qtrain::UsageError("qtrain", absl::StrCat("unexpected argument '", rest[1], "'"));
  }
  const std::string job = absl::GetFlag(FLAGS_job);
  if (job.empty()) {
    return qtrain::UsageError("qtrain", "--job is required (e.g. --job=configs/tiny_cpu.textproto)");
  }
  // Overrides go in before defaults and validation, as if the job file said so.
  std::vector<std::string> overrides;
  if (const std::optional<int> steps = absl::GetFlag(FLAGS_steps); steps.has_value()) {
    overrides.push_back(absl::StrCat("training.steps=", *steps));
  }
  if (!absl::GetFlag(FLAGS_out_dir).empty()) {
    overrides.push_back(absl::StrCat("out_dir=", absl::GetFlag(FLAGS_out_dir)));
  }
  for (const std::string& s : set_values) overrides.push_back(s);
  const std::string coordinator = absl::GetFlag(FLAGS_coordinator);
  absl::StatusOr<qtrain::JobSpec> spec = qtrain::LoadJobForRun(job, coordinator, overrides);
  if (!spec.ok()) {
    std::fprintf(stderr, "qtrain: %s\n", std::string(spec.status().message()).c_str());
    return 1;
  }
  if (const std::string backend = absl::GetFlag(FLAGS_backend); !backend.empty()) {
    if (backend == "mpi") {
      spec->mutable_distributed()->set_backend(qtrain::DistributedSpec::MPI);
    } else if (backend == "none") {
      spec->mutable_distributed()->set_backend(qtrain::DistributedSpec::BACKEND_UNSPECIFIED);
    } else {
      std::fprintf(stderr, "qtrain: --backend must be 'mpi' or 'none', got '%s'\n",
                   backend.c_str());
      return 2;
    }
  }

  if (!coordinator.empty()) spec->mutable_distributed()->set_coordinator(coordinator);
  if (!absl::GetFlag(FLAGS_parameter_service).empty()) {
    spec->mutable_parameter_service()->set_address(absl::GetFlag(FLAGS_parameter_service));
  }

  absl::StatusOr<std::unique_ptr<qtrain::DistributedContext>> dist = qtrain::CreateRunContext(
      *spec, absl::GetFlag(FLAGS_rank), absl::GetFlag(FLAGS_world_size));
  if (!dist.ok()) {
    std::fprintf(stderr, "qtrain: %s\n", std::string(dist.status().message()).c_str());
    return 1;
  }
  const int world = (*dist)->world_size();
  if (const int global = absl::GetFlag(FLAGS_global_batch); global >= 0) {
    const int per_step = world * spec->training().grad_accum();
    if (global == 0 || global % per_step != 0) {
      // Every rank sees the same numbers: all exit alike, rank 0 says why.
      if ((*dist)->is_root()) {
        std::fprintf(stderr,
                     "qtrain: --global_batch=%d is not a positive multiple of ranks (%d) x "
                     "training.grad_accum (%d)\n",
                     global, world, spec->training().grad_accum());
      }
      return 1;
    }
    spec->mutable_training()->set_batch_size(global / per_step);
  }
  // The overrides may have made the job invalid (warmup longer than --steps, ...): every rank
  // judges the same spec, rank 0 says why.
  if (absl::Status valid = (*dist)->AllOk(qtrain::ValidateJobSpec(*spec), "job spec");
      !valid.ok()) {
    if ((*dist)->is_root()) {
      std::fprintf(stderr, "qtrain: %s\n", std::string(valid.message()).c_str());
    }
    return 1;
  }

  qtrain::RunOptions options;
  absl::StatusOr<std::string> resume =
      qtrain::FetchResume(*spec, absl::GetFlag(FLAGS_resume), dist->get());
  absl::StatusOr<std::vector<std::unique_ptr<qtrain::RunSink>>> sinks = qtrain::MakeServiceSinks(
      *spec, !absl::StartsWith(job, qtrain::kServiceScheme), (*dist)->is_root());
  absl::Status ready = resume.status();
  if (ready.ok()) ready = (*dist)->AllOk(sinks.status(), "connecting to the parameter service");
  if (!ready.ok()) {
    if ((*dist)->is_root()) {
      std::fprintf(stderr, "qtrain: %s\n", std::string(ready.message()).c_str());
    }
    (*dist)->Finish(ready);
    return 1;
  }
  options.resume = *resume;
  options.quiet = absl::GetFlag(FLAGS_quiet);
  options.overwrite = absl::GetFlag(FLAGS_overwrite);
  options.allow_spec_change = absl::GetFlag(FLAGS_allow_spec_change);
  options.dist = dist->get();
  for (const auto& sink : *sinks) options.sinks.push_back(sink.get());
  absl::StatusOr<qtrain::RunResult> result = qtrain::RunTraining(*spec, options);
  // The parameter service (when the ranks met through it) learns how this rank ended.
  (*dist)->Finish(result.status());
  if (!result.ok()) {
    // An error every rank holds (a spec mismatch, a checkpoint rank 0 could not read): rank 0
    // reports it and all exit normally. An error of this rank alone: report it and stop the
    // whole job, since the other ranks would wait for this one in the next collective.
    const bool agreed = qtrain::IsAgreedError(result.status());
    if (!agreed || (*dist)->is_root()) {
      std::fprintf(stderr, "%s%s\n", Prefix(dist->get()).c_str(),
                   std::string(result.status().message()).c_str());
    }
    if (!agreed) (*dist)->AbortJob(1);
    return 1;
  }
  return 0;
}
