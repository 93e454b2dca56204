// What qtrain's main does with the parameter service: jobs fetched from it (--job=ps://JOB,
// hash-checked), ranks that meet through it (distributed.coordinator), the job spec registered
// and the metrics and checkpoints sent to it (parameter_service.address), and resuming from a
// checkpoint stored there (--resume=ps://JOB/latest) on a node without the old out_dir.
#ifndef QTRAIN_TRAINER_SERVICE_RUN_H_
#define QTRAIN_TRAINER_SERVICE_RUN_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "configs/job_spec.pb.h"
#include "distributed/distributed_context.h"
#include "trainer/sinks.h"

namespace qtrain {

inline constexpr char kServiceScheme[] = "ps://";

// `job` is a file, or ps://JOB: the spec registered as JOB on the service at `address`
// (--coordinator, else $QTRAIN_PS_ADDRESS), checked against its SHA-256 and validated.
// `overrides` (--set, --steps, --out_dir) apply before defaults and validation (LoadJobSpec).
absl::StatusOr<JobSpec> LoadJobForRun(const std::string& job, const std::string& address,
                                      const std::vector<std::string>& overrides = {});

// The job's context: through the service when it has distributed.coordinator (rank and world
// size from the flags, else the launcher), else DistributedContext::Create (MPI or one
// process).
absl::StatusOr<std::unique_ptr<DistributedContext>> CreateRunContext(const JobSpec& spec,
                                                                     int rank, int world_size);

// The address metrics, checkpoints and ps:// resumes use: parameter_service.address, else
// distributed.coordinator; "" when the job names no service.
std::string ServiceAddress(const JobSpec& spec);

// Rank 0 with parameter_service.address: registers the spec (unless it came from the
// service) and returns the metrics and checkpoint sinks. Elsewhere: none.
absl::StatusOr<std::vector<std::unique_ptr<RunSink>>> MakeServiceSinks(const JobSpec& spec,
                                                                       bool register_spec,
                                                                       bool is_root);

// --resume=ps://JOB/latest or ps://JOB/STEP: rank 0 downloads the checkpoint into
// <out_dir>/checkpoints/ and every rank gets its path (collective; an error is agreed). Other
// values come back unchanged.
absl::StatusOr<std::string> FetchResume(const JobSpec& spec, const std::string& resume,
                                        DistributedContext* dist);

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_SERVICE_RUN_H_
