// WorkerSession: one training process's membership in a job on the parameter service:
// registration, a heartbeat thread (which re-registers when the service restarted and lost
// it, and reports a stop order from the service through on_stop), the rendezvous, and the
// final Leave that tells the service (and so the other ranks) how this rank ended.
#ifndef QTRAIN_DISTRIBUTED_PS_WORKER_SESSION_H_
#define QTRAIN_DISTRIBUTED_PS_WORKER_SESSION_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "distributed/ps/client.h"

namespace qtrain::ps {

struct WorkerOptions {
  std::string job_id;
  int rank = -1;  // -1: the service assigns one
  int world_size = 1;
  std::string host;
  std::string peer_address;
  std::string binary_hash, spec_hash;
  absl::Duration heartbeat_timeout = absl::ZeroDuration();   // 0: the server's
  absl::Duration heartbeat_interval = absl::ZeroDuration();  // 0: the server's
};

class WorkerSession {
 public:
  // Called once, from the heartbeat thread, with the service's reason to stop.
  using OnStop = std::function<void(const std::string& reason)>;

  static absl::StatusOr<std::unique_ptr<WorkerSession>> Join(std::shared_ptr<PsClient> client,
                                                             WorkerOptions options, OnStop on_stop);
  // Leave(failed) unless Finish was called.
  ~WorkerSession();
  WorkerSession(const WorkerSession&) = delete;
  WorkerSession& operator=(const WorkerSession&) = delete;

  int rank() const { return rank_; }
  int64_t attempt() const { return attempt_; }
  // Waits for every rank (the heartbeats go on meanwhile).
  absl::StatusOr<RendezvousResponse> Rendezvous(const std::string& bootstrap,
                                                absl::Duration timeout);
  // Progress shown by `qtrain_ps_cli workers`.
  void SetStep(int64_t step) { step_.store(step); }
  // The run ended: OK is a clean leave, an error is reported to the service (which stops the
  // other ranks, naming this one). Stops the heartbeats. Idempotent.
  void Finish(const absl::Status& status);

 private:
  WorkerSession() = default;
  void Loop();
  std::string WorkerId() const;

  std::shared_ptr<PsClient> client_;
  WorkerOptions options_;
  OnStop on_stop_;
  int rank_ = 0;
  int64_t attempt_ = 0;
  std::string instance_id_;
  absl::Duration interval_;
  std::atomic<int64_t> step_{0};
  mutable absl::Mutex mu_;
  std::string worker_id_ ABSL_GUARDED_BY(mu_);
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_sent_ = false;
  bool warned_ = false;
  std::thread thread_;
};

}  // namespace qtrain::ps

#endif  // QTRAIN_DISTRIBUTED_PS_WORKER_SESSION_H_
