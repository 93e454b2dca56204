// WorkerSession: registration, heartbeats, rejoin after a service restart, leave.
#include "distributed/ps/worker_session.h"

#include <unistd.h>

#include <cstdio>

#include "absl/strings/str_cat.h"
#include "distributed/ps/digest.h"

namespace qtrain::ps {

absl::StatusOr<std::unique_ptr<WorkerSession>> WorkerSession::Join(
    std::shared_ptr<PsClient> client, WorkerOptions options, OnStop on_stop) {
  std::unique_ptr<WorkerSession> s(new WorkerSession());
  s->client_ = std::move(client);
  s->options_ = std::move(options);
  s->on_stop_ = std::move(on_stop);
  s->instance_id_ = RandomId();
  RegisterWorkerRequest req;
  req.set_job_id(s->options_.job_id);
  req.set_rank(s->options_.rank);
  req.set_world_size(s->options_.world_size);
  req.set_host(s->options_.host);
  req.set_pid(getpid());
  req.set_binary_hash(s->options_.binary_hash);
  req.set_spec_hash(s->options_.spec_hash);
  req.set_peer_address(s->options_.peer_address);
  req.set_heartbeat_timeout_ms(absl::ToInt64Milliseconds(s->options_.heartbeat_timeout));
  req.set_instance_id(s->instance_id_);
  absl::StatusOr<RegisterWorkerResponse> r = s->client_->RegisterWorker(req);
  if (!r.ok()) return r.status();
  s->rank_ = r->rank();
  s->attempt_ = r->attempt();
  s->worker_id_ = r->worker_id();
  s->interval_ = s->options_.heartbeat_interval > absl::ZeroDuration()
                     ? s->options_.heartbeat_interval
                     : absl::Milliseconds(r->heartbeat_interval_ms());
  // Several heartbeats must fit in the timeout, whatever the job asked for.
  s->interval_ = std::min(s->interval_, absl::Milliseconds(r->heartbeat_timeout_ms()) / 3);
  s->interval_ = std::max(s->interval_, absl::Milliseconds(20));
  s->thread_ = std::thread([p = s.get()] { p->Loop(); });
  return s;
}

WorkerSession::~WorkerSession() {
  Finish(absl::UnknownError("the worker ended without reporting how"));
}

std::string WorkerSession::WorkerId() const {
  absl::MutexLock lock(&mu_);
  return worker_id_;
}

void WorkerSession::Loop() {
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      if (mu_.AwaitWithTimeout(absl::Condition(&finished_), interval_)) return;
    }
    HeartbeatRequest hb;
    hb.set_job_id(options_.job_id);
    hb.set_worker_id(WorkerId());
    hb.set_step(step_.load());
    absl::StatusOr<HeartbeatResponse> r = client_->Heartbeat(hb, std::max(interval_, absl::Seconds(1)));
    if (r.ok()) {
      warned_ = false;
      if (r->action() == HeartbeatResponse::STOP && !stop_sent_) {
        stop_sent_ = true;
        on_stop_(absl::StrCat("the parameter service at ", client_->address(),
                              " stopped job ", options_.job_id, ": ", r->reason()));
      }
      continue;
    }
    if (absl::IsNotFound(r.status())) {
      // The service restarted and forgot the workers: join again with the same rank.
      RegisterWorkerRequest req;
      req.set_job_id(options_.job_id);
      req.set_rank(rank_);
      req.set_world_size(options_.world_size);
      req.set_host(options_.host);
      req.set_pid(getpid());
      req.set_binary_hash(options_.binary_hash);
      req.set_spec_hash(options_.spec_hash);
      req.set_peer_address(options_.peer_address);
      req.set_heartbeat_timeout_ms(absl::ToInt64Milliseconds(options_.heartbeat_timeout));
      req.set_instance_id(instance_id_);
      req.set_rejoin(true);
      absl::StatusOr<RegisterWorkerResponse> again = client_->RegisterWorker(req);
      if (again.ok()) {
        absl::MutexLock lock(&mu_);
        worker_id_ = again->worker_id();
        continue;
      }
      r = again.status();
    }
    if (!warned_) {
      warned_ = true;
      std::fprintf(stderr,
                   "qtrain: rank %d: heartbeat to the parameter service failed (%s); training "
                   "goes on, retrying\n",
                   rank_, std::string(r.status().message()).c_str());
    }
  }
}

absl::StatusOr<RendezvousResponse> WorkerSession::Rendezvous(const std::string& bootstrap,
                                                             absl::Duration timeout) {
  RendezvousRequest req;
  req.set_job_id(options_.job_id);
  req.set_worker_id(WorkerId());
  req.set_bootstrap(bootstrap);
  return client_->Rendezvous(req, timeout);
}

void WorkerSession::Finish(const absl::Status& status) {
  {
    absl::MutexLock lock(&mu_);
    if (finished_) return;
    finished_ = true;
  }
  if (thread_.joinable()) thread_.join();
  LeaveRequest req;
  req.set_job_id(options_.job_id);
  req.set_worker_id(WorkerId());
  req.set_failed(!status.ok());
  req.set_message(std::string(status.message()).substr(0, 8000));
  // Best effort: the service may be gone; its timeout then tells the others.
  (void)client_->Leave(req);
}

}  // namespace qtrain::ps
