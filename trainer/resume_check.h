// What a resume changes: the differences between the job spec a checkpoint was written with and
// the one resuming it, each marked as keeping a bit-identical resume or breaking it.
#ifndef QTRAIN_TRAINER_RESUME_CHECK_H_
#define QTRAIN_TRAINER_RESUME_CHECK_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "configs/job_spec.pb.h"

namespace qtrain {

struct SpecChange {
  std::string field;          // "optimizer.lr"
  std::string before, after;  // text-format values; "(unset)" for an absent optional
  // Paths, evaluation/checkpoint/logging cadence, the data-parallel layout (the global batch is
  // checked on its own): the resumed steps compute what the uninterrupted run would have.
  bool resume_safe = false;
  std::string note;  // why it matters, for some fields (e.g. training.steps)
};

// Field by field (defaults applied to both sides), in schema order. `checkpoint_spec` is the
// text a checkpoint carries; it is parsed without validation (a rule added since the checkpoint
// was written must not make it unreadable). InvalidArgument when it does not parse.
absl::StatusOr<std::vector<SpecChange>> CompareSpecsForResume(const std::string& checkpoint_spec,
                                                              const JobSpec& now);

// "  optimizer.lr: 0.01 -> 0.02" lines, with the note in parentheses.
std::string FormatSpecChanges(const std::vector<SpecChange>& changes);

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_RESUME_CHECK_H_
