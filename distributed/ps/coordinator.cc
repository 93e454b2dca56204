// Coordinator: attempts, workers, heartbeats, rendezvous and the sweep.
#include "distributed/ps/coordinator.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "distributed/ps/digest.h"

namespace qtrain::ps {
namespace {

std::string Seconds(absl::Duration d) {
  return absl::StrFormat("%.1f s", absl::ToDoubleSeconds(d));
}

}  // namespace

Coordinator::Coordinator(CoordinatorOptions options) : options_(options) {
  sweeper_ = std::thread([this] {
    for (;;) {
      {
        absl::MutexLock lock(&mu_);
        mu_.AwaitWithTimeout(absl::Condition(&stop_), options_.sweep_every);
        if (stop_) return;
      }
      Sweep();
    }
  });
}

Coordinator::~Coordinator() {
  Pending pending;
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
    for (auto& [id, job] : jobs_) {
      if (!job.attempt) continue;
      for (auto& [rank, w] : job.attempt->waiters) {
        pending.calls.push_back(
            {std::move(w.done), absl::UnavailableError("the parameter service is shutting down")});
      }
      job.attempt->waiters.clear();
    }
  }
  sweeper_.join();
  for (auto& [done, result] : pending.calls) done(result.status(), RendezvousResponse());
}

void Coordinator::SetListener(std::function<void(const std::string&)> listener) {
  absl::MutexLock lock(&mu_);
  listener_ = std::move(listener);
}

bool Coordinator::Over(const Attempt& a) {
  if (a.state == FAILED || a.state == FINISHED) return true;
  for (const auto& [rank, w] : a.workers) {
    if (w.state == WorkerStatus::ALIVE) return false;
  }
  return true;
}

std::string Coordinator::Who(const Worker& w) {
  return absl::StrCat("rank ", w.info.rank(), " (host ", w.info.host(), ", pid ", w.info.pid(),
                      ")");
}

void Coordinator::Run(Pending pending) {
  for (auto& [done, result] : pending.calls) {
    done(result.status(), result.ok() ? *result : RendezvousResponse());
  }
  if (pending.changed_jobs.empty()) return;
  std::function<void(const std::string&)> listener;
  {
    absl::MutexLock lock(&mu_);
    listener = listener_;
  }
  if (!listener) return;
  for (const std::string& job : pending.changed_jobs) listener(job);
}

absl::StatusOr<RegisterWorkerResponse> Coordinator::Register(const RegisterWorkerRequest& req) {
  if (req.world_size() < 1 || req.world_size() > options_.max_world_size) {
    return absl::InvalidArgumentError(absl::StrCat("world_size: must be in [1, ",
                                                   options_.max_world_size, "], got ",
                                                   req.world_size()));
  }
  if (req.rank() < -1 || req.rank() >= req.world_size()) {
    return absl::InvalidArgumentError(absl::StrCat("rank: must be -1 (assign) or in [0, ",
                                                   req.world_size(), "), got ", req.rank()));
  }
  if (req.rejoin() && req.rank() < 0) {
    return absl::InvalidArgumentError("rank: a rejoining worker must name its rank");
  }
  absl::Duration timeout = options_.heartbeat_timeout;
  if (req.heartbeat_timeout_ms() < 0) {
    return absl::InvalidArgumentError(absl::StrCat("heartbeat_timeout_ms: must be >= 0, got ",
                                                   req.heartbeat_timeout_ms()));
  }
  if (req.heartbeat_timeout_ms() > 0) {
    timeout = std::clamp(absl::Milliseconds(req.heartbeat_timeout_ms()),
                         options_.min_heartbeat_timeout, options_.max_heartbeat_timeout);
  }
  Pending pending;
  RegisterWorkerResponse resp;
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(req.job_id());
    if (it == jobs_.end()) {
      if (static_cast<int>(jobs_.size()) >= options_.max_jobs) {
        return absl::ResourceExhaustedError(
            absl::StrCat("the service holds its limit of ", options_.max_jobs, " jobs"));
      }
      it = jobs_.emplace(req.job_id(), Job()).first;
    }
    Job& job = it->second;
    // A retried registration (same process) gets the same answer.
    if (job.attempt && !req.instance_id().empty()) {
      for (const auto& [rank, w] : job.attempt->workers) {
        if (w.info.instance_id() == req.instance_id() && w.state == WorkerStatus::ALIVE) {
          resp.set_worker_id(w.worker_id);
          resp.set_rank(rank);
          resp.set_attempt(job.attempt->number);
          resp.set_heartbeat_interval_ms(absl::ToInt64Milliseconds(options_.heartbeat_interval));
          resp.set_heartbeat_timeout_ms(absl::ToInt64Milliseconds(w.timeout));
          return resp;
        }
      }
    }
    if (!job.attempt || Over(*job.attempt)) {
      job.attempt = std::make_unique<Attempt>();
      job.attempt->number = ++job.attempts;
      job.attempt->world_size = req.world_size();
      job.attempt->session_key = RandomBytes(32);
      job.attempt->state = req.rejoin() ? RUNNING : WAITING;
      pending.changed_jobs.push_back(req.job_id());
    }
    Attempt& a = *job.attempt;
    if (a.world_size != req.world_size()) {
      std::vector<std::string> ranks;
      for (const auto& [rank, w] : a.workers) ranks.push_back(absl::StrCat(rank));
      return absl::FailedPreconditionError(absl::StrCat(
          "job ", req.job_id(), ": this worker asks for world size ", req.world_size(),
          ", but attempt ", a.number, " has world size ", a.world_size, " (ranks ",
          absl::StrJoin(ranks, ", "), " registered); start every rank with the same world size"));
    }
    if (!req.rejoin() && a.state == RUNNING) {
      return absl::FailedPreconditionError(absl::StrCat(
          "job ", req.job_id(), ": attempt ", a.number,
          " is running with all its ranks; a new rank cannot join it"));
    }
    int rank = req.rank();
    if (rank < 0) {
      rank = 0;
      while (rank < a.world_size && a.workers.count(rank)) ++rank;
      if (rank == a.world_size) {
        return absl::AlreadyExistsError(absl::StrCat("job ", req.job_id(), ": all ", a.world_size,
                                                     " ranks of attempt ", a.number,
                                                     " are taken"));
      }
    }
    if (auto w = a.workers.find(rank); w != a.workers.end()) {
      return absl::AlreadyExistsError(absl::StrCat(
          "job ", req.job_id(), ": ", Who(w->second), " already holds rank ", rank,
          " of attempt ", a.number, " (started twice, or a stale process?)"));
    }
    // Every rank must run the same job spec and the same binary: compare with any other.
    if (!a.workers.empty()) {
      const Worker& first = a.workers.begin()->second;
      const std::string me = absl::StrCat("rank ", rank, " (host ", req.host(), ")");
      if (first.info.spec_hash() != req.spec_hash()) {
        return absl::FailedPreconditionError(absl::StrCat(
            "job spec mismatch in job ", req.job_id(), ": ", me, " runs a job spec with hash ",
            req.spec_hash(), ", ", Who(first), " one with hash ", first.info.spec_hash(),
            "; every rank must load the same job file with the same command-line overrides"));
      }
      if (first.info.binary_hash() != req.binary_hash()) {
        return absl::FailedPreconditionError(absl::StrCat(
            "code version mismatch in job ", req.job_id(), ": ", me,
            " runs a qtrain binary with hash ", req.binary_hash(), ", ", Who(first),
            " one with hash ", first.info.binary_hash(),
            "; build once and start the same binary on every node"));
      }
    }
    Worker& w = a.workers[rank];
    w.info = req;
    w.info.set_rank(rank);
    w.worker_id = RandomId();
    a.rank_of[w.worker_id] = rank;
    w.last_heartbeat = absl::Now();
    w.timeout = timeout;
    resp.set_worker_id(w.worker_id);
    resp.set_rank(rank);
    resp.set_attempt(a.number);
    resp.set_heartbeat_interval_ms(absl::ToInt64Milliseconds(options_.heartbeat_interval));
    resp.set_heartbeat_timeout_ms(absl::ToInt64Milliseconds(timeout));
    pending.changed_jobs.push_back(req.job_id());
  }
  Run(std::move(pending));
  return resp;
}

Coordinator::Worker* Coordinator::FindWorker(const std::string& job_id,
                                             const std::string& worker_id, Job** job) {
  auto it = jobs_.find(job_id);
  if (it == jobs_.end() || !it->second.attempt) return nullptr;
  *job = &it->second;
  Attempt& a = *it->second.attempt;
  auto r = a.rank_of.find(worker_id);
  return r == a.rank_of.end() ? nullptr : &a.workers.at(r->second);
}

absl::StatusOr<HeartbeatResponse> Coordinator::Heartbeat(const HeartbeatRequest& req) {
  absl::MutexLock lock(&mu_);
  Job* job = nullptr;
  Worker* w = FindWorker(req.job_id(), req.worker_id(), &job);
  if (w == nullptr) {
    return absl::NotFoundError(absl::StrCat("job ", req.job_id(),
                                            ": no such worker in the current attempt "
                                            "(the service restarted, or the attempt ended)"));
  }
  HeartbeatResponse resp;
  const Attempt& a = *job->attempt;
  if (w->state != WorkerStatus::ALIVE) {
    resp.set_action(HeartbeatResponse::STOP);
    resp.set_reason(a.failure.empty()
                        ? absl::StrCat(Who(*w), " was declared ", WorkerStatus::State_Name(w->state),
                                       ": ", w->detail)
                        : a.failure);
    return resp;
  }
  w->last_heartbeat = absl::Now();
  w->step = req.step();
  if (a.state == FAILED) {
    resp.set_action(HeartbeatResponse::STOP);
    resp.set_reason(a.failure);
  }
  return resp;
}

absl::Status Coordinator::Leave(const LeaveRequest& req) {
  Pending pending;
  {
    absl::MutexLock lock(&mu_);
    Job* job = nullptr;
    Worker* w = FindWorker(req.job_id(), req.worker_id(), &job);
    if (w == nullptr) return absl::OkStatus();  // idempotent: gone already
    if (w->state != WorkerStatus::ALIVE) return absl::OkStatus();
    Attempt* a = job->attempt.get();
    if (req.failed()) {
      w->state = WorkerStatus::FAILED;
      w->detail = req.message();
      Fail(req.job_id(), a, absl::StrCat(Who(*w), " failed: ", req.message()), &pending);
    } else {
      w->state = WorkerStatus::LEFT;
      MaybeFinish(req.job_id(), a, &pending);
    }
    pending.changed_jobs.push_back(req.job_id());
  }
  Run(std::move(pending));
  return absl::OkStatus();
}

void Coordinator::Fail(const std::string& job_id, Attempt* a, const std::string& why,
                       Pending* pending) {
  if (a->state == FAILED) return;
  a->state = FAILED;
  a->failure = why;
  for (auto& [rank, waiter] : a->waiters) {
    pending->calls.push_back(
        {std::move(waiter.done),
         absl::FailedPreconditionError(absl::StrCat("job ", job_id, " stopped: ", why))});
  }
  a->waiters.clear();
  pending->changed_jobs.push_back(job_id);
}

void Coordinator::MaybeFinish(const std::string& job_id, Attempt* a, Pending* pending) {
  if (a->state == FAILED) return;
  for (const auto& [rank, w] : a->workers) {
    if (w.state != WorkerStatus::LEFT) return;
  }
  if (static_cast<int>(a->workers.size()) < a->world_size) return;
  a->state = FINISHED;
  pending->changed_jobs.push_back(job_id);
}

absl::StatusOr<ListWorkersResponse> Coordinator::ListWorkers(const std::string& job_id) const {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  ListWorkersResponse resp;
  if (it == jobs_.end() || !it->second.attempt) {
    resp.set_state(REGISTERED);
    return resp;
  }
  const Attempt& a = *it->second.attempt;
  resp.set_state(a.state);
  resp.set_attempt(a.number);
  resp.set_world_size(a.world_size);
  resp.set_failure(a.failure);
  const absl::Time now = absl::Now();
  for (const auto& [rank, w] : a.workers) {
    WorkerStatus* s = resp.add_workers();
    s->set_rank(rank);
    s->set_worker_id(w.worker_id);
    s->set_host(w.info.host());
    s->set_pid(w.info.pid());
    s->set_state(w.state);
    s->set_last_heartbeat_age_ms(absl::ToInt64Milliseconds(now - w.last_heartbeat));
    s->set_step(w.step);
    s->set_peer_address(w.info.peer_address());
    s->set_detail(w.detail);
  }
  return resp;
}

void Coordinator::CompleteRendezvous(Attempt* a, Pending* pending) {
  if (static_cast<int>(a->waiters.size()) < a->world_size || !a->bootstrap_set) return;
  RendezvousResponse base;
  base.set_world_size(a->world_size);
  base.set_attempt(a->number);
  base.set_bootstrap(a->bootstrap);
  base.set_session_key(a->session_key);
  for (const auto& [rank, w] : a->workers) {
    Peer* p = base.add_peers();
    p->set_rank(rank);
    p->set_host(w.info.host());
    p->set_pid(w.info.pid());
    p->set_address(w.info.peer_address());
  }
  for (auto& [rank, waiter] : a->waiters) {
    RendezvousResponse r = base;
    r.set_rank(rank);
    pending->calls.push_back({std::move(waiter.done), r});
  }
  a->waiters.clear();
  a->state = RUNNING;
}

void Coordinator::Rendezvous(const RendezvousRequest& req, RendezvousDone done) {
  Pending pending;
  {
    absl::MutexLock lock(&mu_);
    Job* job = nullptr;
    Worker* w = FindWorker(req.job_id(), req.worker_id(), &job);
    if (w == nullptr) {
      pending.calls.push_back(
          {std::move(done), absl::NotFoundError(absl::StrCat(
                                "job ", req.job_id(), ": no such worker in the current attempt"))});
    } else if (job->attempt->state == FAILED) {
      pending.calls.push_back(
          {std::move(done), absl::FailedPreconditionError(absl::StrCat(
                                "job ", req.job_id(), " stopped: ", job->attempt->failure))});
    } else if (job->attempt->state == RUNNING) {
      pending.calls.push_back(
          {std::move(done), absl::FailedPreconditionError(absl::StrCat(
                                "job ", req.job_id(), ": attempt ", job->attempt->number,
                                " passed its rendezvous already"))});
    } else {
      Attempt* a = job->attempt.get();
      const int rank = w->info.rank();
      if (rank == 0) {
        a->bootstrap = req.bootstrap();
        a->bootstrap_set = true;
      }
      // One waiter per rank: a retried call replaces the earlier one.
      auto old = a->waiters.find(rank);
      if (old != a->waiters.end()) {
        pending.calls.push_back(
            {std::move(old->second.done),
             absl::AbortedError("replaced by a newer Rendezvous call of the same worker")});
      }
      a->waiters[rank] = Waiter{std::move(done), absl::Now()};
      CompleteRendezvous(a, &pending);
      if (a->state == RUNNING) pending.changed_jobs.push_back(req.job_id());
    }
  }
  Run(std::move(pending));
}

std::optional<AttemptView> Coordinator::View(const std::string& job_id) const {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return std::nullopt;
  AttemptView v;
  if (!it->second.attempt) return v;
  const Attempt& a = *it->second.attempt;
  v.state = a.state;
  v.attempt = a.number;
  v.world_size = a.world_size;
  v.failure = a.failure;
  for (const auto& [rank, w] : a.workers) v.live_workers += w.state == WorkerStatus::ALIVE;
  if (v.state != FAILED && v.state != FINISHED && v.live_workers == 0) v.state = REGISTERED;
  return v;
}

std::vector<std::string> Coordinator::JobIds() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> ids;
  for (const auto& [id, job] : jobs_) ids.push_back(id);
  return ids;
}

void Coordinator::Sweep() {
  Pending pending;
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = absl::Now();
    for (auto& [id, job] : jobs_) {
      Attempt* a = job.attempt.get();
      if (a == nullptr || a->state == FAILED || a->state == FINISHED) continue;
      for (auto& [rank, w] : a->workers) {
        if (w.state != WorkerStatus::ALIVE) continue;
        const absl::Duration silent = now - w.last_heartbeat;
        if (silent <= w.timeout) continue;
        w.state = WorkerStatus::DEAD;
        w.detail = absl::StrCat("no heartbeat for ", Seconds(silent), " (heartbeat_timeout ",
                                Seconds(w.timeout), ")");
        Fail(id, a, absl::StrCat(Who(w), " is dead: ", w.detail), &pending);
      }
      if (a->state == WAITING && !a->waiters.empty()) {
        absl::Time oldest = absl::InfiniteFuture();
        for (const auto& [rank, waiter] : a->waiters) oldest = std::min(oldest, waiter.since);
        if (now - oldest > options_.rendezvous_timeout) {
          std::vector<std::string> missing;
          for (int r = 0; r < a->world_size; ++r) {
            if (!a->waiters.count(r)) missing.push_back(absl::StrCat(r));
          }
          Fail(id, a,
               absl::StrCat("rendezvous timed out after ", Seconds(options_.rendezvous_timeout),
                            ": ", a->waiters.size(), " of ", a->world_size,
                            " ranks arrived (missing ranks ", absl::StrJoin(missing, ", "), ")"),
               &pending);
        }
      }
    }
  }
  Run(std::move(pending));
}

}  // namespace qtrain::ps
