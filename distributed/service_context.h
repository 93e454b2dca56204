// Data-parallel ranks that meet through the parameter service (distributed.coordinator) instead
// of MPI: each rank registers with the service (rank, world size, host, hashes of its binary and
// job spec), heartbeats, waits at the rendezvous for its peers, and joins a TCP ring with them.
// Works with any launcher, or none: plain processes, `srun` without PMI, ssh.
#ifndef QTRAIN_DISTRIBUTED_SERVICE_CONTEXT_H_
#define QTRAIN_DISTRIBUTED_SERVICE_CONTEXT_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "configs/job_spec.pb.h"
#include "distributed/distributed_context.h"
#include "distributed/ps/client.h"

namespace qtrain {

// Where this process sits in the job, as its launcher or its flags say.
struct ServiceLaunch {
  int rank = -1;       // -1: the launcher's (QTRAIN_RANK, SLURM_PROCID, ...) or the service's
  int world_size = 0;  // 0: the launcher's (QTRAIN_WORLD_SIZE, SLURM_NTASKS, ...)
  uint64_t spec_hash = 0;  // JobSpecHash of the spec this rank runs
};

// The job's name on the service: parameter_service.job_id, else the job's name.
std::string ServiceJobId(const JobSpec& spec);

// Client options for the service at `address` from the job's parameter_service section: the
// token (its token_file, else $QTRAIN_PS_TOKEN_FILE or $QTRAIN_PS_TOKEN), TLS files, deadline.
absl::StatusOr<ps::ClientOptions> ServiceClientOptions(const JobSpec& spec,
                                                       const std::string& address);

// Registers, heartbeats, rendezvouses and connects the ring; collective over the job's ranks.
// The context's membership reports the run's end to the service (DistributedContext::Finish);
// a stop order from the service (another rank died) makes every later collective fail with
// the service's reason, naming the dead rank.
absl::StatusOr<std::unique_ptr<DistributedContext>> JoinThroughService(const JobSpec& spec,
                                                                       const ServiceLaunch& launch);

}  // namespace qtrain

#endif  // QTRAIN_DISTRIBUTED_SERVICE_CONTEXT_H_
