// RunTraining: a TrainingSession (trainer/session.h) built and run.
#include "trainer/trainer.h"

#include <memory>
#include <new>

#include "absl/strings/str_cat.h"

#include "ops/status_macros.h"
#include "trainer/model_setup.h"
#include "trainer/session.h"

namespace qtrain {

absl::StatusOr<RunResult> RunTraining(const JobSpec& spec, const RunOptions& options) {
  try {
    absl::StatusOr<std::unique_ptr<TrainingSession>> session =
        TrainingSession::Create(spec, options);
    if (!session.ok()) return session.status();  // annotated where it arose, or agreed
    return (*session)->Run();
  } catch (const std::bad_alloc&) {
    // CheckHostMemory refuses what cannot fit at all; this is the machine running short later
    // (other processes, an estimate below the truth). Say what the run needs, not "bad_alloc".
    return absl::ResourceExhaustedError(absl::StrCat(
        "out of host memory: job '", spec.name(), "' needs ",
        DescribeHostMemory(EstimateHostMemory(spec), spec)));
  }
}

}  // namespace qtrain
