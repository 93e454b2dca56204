// Coordinator: the workers of every job, in memory. Registration (rank, world size, hashes that
// must agree across ranks), heartbeats, dead-worker detection within the heartbeat timeout (the
// job's other ranks are then told to stop, with the dead worker's name), clean and failed
// leaves, and the rendezvous that hands every rank its peers without MPI.
//
// Each job has a current *attempt*: the set of workers of one run. Registering into a job whose
// attempt is over (failed, finished, or without live workers) starts the next attempt, so a
// restarted job needs no clean-up. Worker state is not durable: after a restart of the service,
// running workers re-register with `rejoin` (WorkerSession does it on NOT_FOUND).
#ifndef QTRAIN_DISTRIBUTED_PS_COORDINATOR_H_
#define QTRAIN_DISTRIBUTED_PS_COORDINATOR_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "distributed/proto/param_service.pb.h"

namespace qtrain::ps {

struct CoordinatorOptions {
  absl::Duration heartbeat_interval = absl::Seconds(1);
  absl::Duration heartbeat_timeout = absl::Seconds(10);  // when a worker asks for none
  absl::Duration min_heartbeat_timeout = absl::Milliseconds(200);
  absl::Duration max_heartbeat_timeout = absl::Minutes(10);
  absl::Duration rendezvous_timeout = absl::Minutes(10);
  int max_world_size = 65536;
  int max_jobs = 10000;
  absl::Duration sweep_every = absl::Milliseconds(50);
};

// A summary of one job's current attempt.
struct AttemptView {
  JobState state = REGISTERED;
  int64_t attempt = 0;
  int world_size = 0;
  int live_workers = 0;
  std::string failure;
};

class Coordinator {
 public:
  using RendezvousDone = std::function<void(const absl::Status&, const RendezvousResponse&)>;

  explicit Coordinator(CoordinatorOptions options);
  ~Coordinator();  // stops the sweep thread; pending rendezvous get Unavailable
  Coordinator(const Coordinator&) = delete;
  Coordinator& operator=(const Coordinator&) = delete;

  // The request is assumed validated for sizes and names (ParameterServiceModule does it).
  absl::StatusOr<RegisterWorkerResponse> Register(const RegisterWorkerRequest& request);
  // NotFound for a worker the service does not know (e.g. after a restart): re-register.
  absl::StatusOr<HeartbeatResponse> Heartbeat(const HeartbeatRequest& request);
  absl::Status Leave(const LeaveRequest& request);
  absl::StatusOr<ListWorkersResponse> ListWorkers(const std::string& job_id) const;
  // Answers `done` once every rank of the worker's attempt has called Rendezvous, when the
  // attempt fails, or after the rendezvous timeout. `done` runs without the coordinator's lock.
  void Rendezvous(const RendezvousRequest& request, RendezvousDone done);

  std::optional<AttemptView> View(const std::string& job_id) const;
  std::vector<std::string> JobIds() const;
  // Called (without the lock) with a job's id whenever its state changes.
  void SetListener(std::function<void(const std::string& job_id)> listener);

  // One pass of dead-worker and rendezvous-timeout detection (the sweep thread calls it).
  void Sweep();

 private:
  struct Worker {
    RegisterWorkerRequest info;
    std::string worker_id;
    WorkerStatus::State state = WorkerStatus::ALIVE;
    absl::Time last_heartbeat;
    absl::Duration timeout;
    int64_t step = 0;
    std::string detail;
  };
  struct Waiter {
    RendezvousDone done;
    absl::Time since;
  };
  struct Attempt {
    int64_t number = 0;
    int world_size = 0;
    JobState state = WAITING;
    std::map<int, Worker> workers;  // by rank
    std::map<std::string, int> rank_of;  // worker id -> rank
    std::map<int, Waiter> waiters;  // by rank
    std::string bootstrap;          // rank 0's blob
    bool bootstrap_set = false;
    std::string session_key;
    std::string failure;
  };
  struct Job {
    std::unique_ptr<Attempt> attempt;
    int64_t attempts = 0;
  };
  // Completions to run after the lock is released.
  struct Pending {
    std::vector<std::pair<RendezvousDone, absl::StatusOr<RendezvousResponse>>> calls;
    std::vector<std::string> changed_jobs;
  };

  static bool Over(const Attempt& a);
  static std::string Who(const Worker& w);
  Worker* FindWorker(const std::string& job_id, const std::string& worker_id, Job** job)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Fail(const std::string& job_id, Attempt* a, const std::string& why, Pending* pending)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void MaybeFinish(const std::string& job_id, Attempt* a, Pending* pending)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void CompleteRendezvous(Attempt* a, Pending* pending) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Run(Pending pending);

  const CoordinatorOptions options_;
  mutable absl::Mutex mu_;
  std::map<std::string, Job> jobs_ ABSL_GUARDED_BY(mu_);
  std::function<void(const std::string&)> listener_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread sweeper_;
};

}  // namespace qtrain::ps

#endif  // QTRAIN_DISTRIBUTED_PS_COORDINATOR_H_
