// RunTraining: a TrainingSession (trainer/session.h) built and run.
#include "trainer/trainer.h"

#include <memory>

#include "ops/status_macros.h"
#include "trainer/session.h"

namespace qtrain {

absl::StatusOr<RunResult> RunTraining(const JobSpec& spec, const RunOptions& options) {
  absl::StatusOr<std::unique_ptr<TrainingSession>> session =
      TrainingSession::Create(spec, options);
  if (!session.ok()) return session.status();  // annotated where it arose, or agreed
  return (*session)->Run();
}

}  // namespace qtrain
