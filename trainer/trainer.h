// The training loop's entry point: job spec -> model, data, optimizer -> steps with evaluation,
// checkpoints, metrics and a progress line (trainer/session.h holds the loop itself).
#ifndef QTRAIN_TRAINER_TRAINER_H_
#define QTRAIN_TRAINER_TRAINER_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "configs/job_spec.pb.h"

namespace qtrain {

class DistributedContext;  // distributed/distributed_context.h
class RunSink;             // trainer/sinks.h

struct RunOptions {
  // "" starts fresh; "latest" resumes from the newest checkpoint in out_dir; anything else
  // is a checkpoint path.
  std::string resume;
  bool quiet = false;  // no progress lines (tests)
  // A fresh run refuses an out_dir that holds another run's checkpoints or metrics; with
  // overwrite it deletes them first (never a file the job reads: init_from, the teacher).
  bool overwrite = false;
  // A resume whose job spec differs from the checkpoint's in a way that breaks a bit-identical
  // resume (trainer/resume_check.h) is refused unless this is set; the differences are printed.
  bool allow_spec_change = false;
  // The ranks of a data-parallel job (qtrain's main makes it from the job's distributed
  // section); null trains in this process alone, whatever distributed.backend says.
  DistributedContext* dist = nullptr;
  // Where else the run's metrics rows and checkpoints go (e.g. the parameter service), beside
  // out_dir's metrics.jsonl and checkpoints/, which always come first. Not owned; rank 0 alone
  // calls them.
  std::vector<RunSink*> sinks;
};

struct RunResult {
  int steps_done = 0;
  double final_train_loss = 0;
  double final_val_loss = 0;
  double tokens_per_s = 0;  // mean over the run, warm-up step excluded
  // Resumed from a checkpoint at (or past) training.steps: nothing was trained.
  bool already_finished = false;
};

// Runs the validated job to spec.training().steps() steps.
absl::StatusOr<RunResult> RunTraining(const JobSpec& spec, const RunOptions& options);

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_TRAINER_H_
