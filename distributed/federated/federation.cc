// Federation: round thread, client tasks, updates, round checkpoints in the tensor store.
#include "distributed/federated/federation.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "configs/job_spec_loader.h"
#include "distributed/federated/adapter_io.h"
#include "ops/status_macros.h"
#include "trainer/lora_model.h"
#include "trainer/model_setup.h"
#include "trainer/rng.h"
#include "trainer/schedule.h"

namespace qtrain::federated {
namespace {

uint64_t Mix(uint64_t a, uint64_t b) {
  uint64_t z = a ^ (b + 0x9E3779B97F4A7C15ull + (a << 6) + (a >> 2));
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::string JoinInts(const std::vector<int>& v) { return absl::StrJoin(v, ","); }

}  // namespace

Aggregation AggregationOf(const JobSpec& spec) {
  switch (spec.federated().aggregation()) {
    case FederatedSpec::FEDAVG_LORA:
      return Aggregation::kFedAvgLora;
    case FederatedSpec::FFA_LORA:
      return Aggregation::kFfaLora;
    default:
      return Aggregation::kFedSvd;
  }
}

std::string AdapterSetName(const std::string& job_id) { return job_id + ".fed.adapter"; }
std::string UpdateSetName(const std::string& job_id, int client) {
  return absl::StrCat(job_id, ".fed.update.", client);
}

Federation::Federation(std::string job_id, JobSpec spec, FederationOptions options)
    : job_id_(std::move(job_id)),
      spec_(std::move(spec)),
      options_(options),
      aggregation_(AggregationOf(spec_)),
      adapter_set_(AdapterSetName(job_id_)) {}

Federation::~Federation() { Stop(); }

absl::StatusOr<std::unique_ptr<Federation>> Federation::Create(const std::string& job_id,
                                                               const JobSpec& spec,
                                                               FederationOptions options) {
  if (spec.federated().aggregation() == FederatedSpec::AGGREGATION_UNSPECIFIED) {
    return absl::FailedPreconditionError(
        absl::StrCat("job '", job_id, "' is not federated (federated.aggregation is unset)"));
  }
  if (options.tensors == nullptr) return absl::InvalidArgumentError("Federation: no tensor store");
  std::unique_ptr<Federation> f(new Federation(job_id, spec, options));
  RETURN_IF_ERROR(f->Init());
  return f;
}

void Federation::Log(const std::string& line) const {
  if (options_.quiet) return;
  std::printf("federated %s: %s\n", job_id_.c_str(), line.c_str());
  std::fflush(stdout);
}

absl::Status Federation::Init() {
  ASSIGN_OR_RETURN(model_, CreateLoraModel(spec_));
  base_hash_ = BaseHashHex(BaseHash(*model_));
  ASSIGN_OR_RETURN(layout_, AdapterLayout::FromStore(model_->lora_params()));
  const TrainingSpec& t = spec_.training();
  ASSIGN_OR_RETURN(val_, DataLoader::Open(spec_.data().val_pattern(), t.batch_size(), t.seq_len(),
                                          0, 1, spec_.model().vocab_size()));
  const int clients = spec_.federated().clients();
  std::vector<int64_t> participations(clients, 0);
  std::vector<float> adapter;
  int64_t round = 0, version = options_.tensors->Latest(adapter_set_);
  if (version > 0) {
    // Resume after the last committed round.
    ASSIGN_OR_RETURN(ps::StoredTensorSet set, options_.tensors->Get(adapter_set_, version));
    const std::string what = absl::StrCat("round checkpoint ", adapter_set_, " v", version);
    auto meta = [&](const std::string& key) -> absl::StatusOr<std::string> {
      auto it = set.info.metadata().find(key);
      if (it == set.info.metadata().end()) {
        return absl::DataLossError(absl::StrCat(what, ": no metadata '", key, "'"));
      }
      return it->second;
    };
    ASSIGN_OR_RETURN(std::string hash, meta("base_hash"));
    if (hash != base_hash_) {
      return absl::FailedPreconditionError(absl::StrCat(
          what, " was written for a base with hash ", hash, "; this server's base ",
          spec_.lora().base(), " has ", base_hash_));
    }
    ASSIGN_OR_RETURN(std::string r, meta("round"));
    ASSIGN_OR_RETURN(std::string parts, meta("participations"));
    std::vector<std::string> p = absl::StrSplit(parts, ',', absl::SkipEmpty());
    if (!absl::SimpleAtoi(r, &round) || static_cast<int>(p.size()) != clients) {
      return absl::DataLossError(absl::StrCat(what, ": bad round '", r, "' or participations"));
    }
    for (int c = 0; c < clients; ++c) {
      if (!absl::SimpleAtoi(p[c], &participations[c])) {
        return absl::DataLossError(absl::StrCat(what, ": bad participation '", p[c], "'"));
      }
    }
    std::vector<ps::TensorSpec> specs;
    std::vector<absl::string_view> data;
    for (const ps::StoredTensor& st : set.tensors) {
      specs.push_back(st.spec);
      data.push_back(st.bytes);
    }
    ASSIGN_OR_RETURN(adapter, FlattenAdapterTensors(specs, data, model_->lora_params(),
                                                    layout_.size, what));
    Log(absl::StrCat("resuming after round ", round, " from ", adapter_set_, " v", version));
  } else {
    const std::vector<float>& init = model_->lora_params().params();
    adapter.assign(init.begin(), init.end());
  }
  {
    absl::MutexLock lock(&mu_);
    round_ = round;
    participations_ = participations;
    adapter_ = adapter;
    adapter_version_ = version;
    finished_ = round_ >= spec_.federated().rounds();
  }
  if (version == 0) RETURN_IF_ERROR(Commit(0, adapter));
  std::error_code ec;
  std::filesystem::create_directories(spec_.out_dir(), ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", spec_.out_dir()));
  // A fresh federation starts its log afresh; a resumed one drops rows past its checkpoint.
  if (version == 0) std::filesystem::remove(spec_.out_dir() + "/rounds.jsonl", ec);
  ASSIGN_OR_RETURN(rounds_log_, JsonlMetricsSink::Open(spec_.out_dir() + "/rounds.jsonl",
                                                       static_cast<int>(round)));
  sinks_.Add(rounds_log_.get());
  if (options_.extra_sink != nullptr) sinks_.Add(options_.extra_sink);
  if (version == 0) {
    // Round 0: the base itself (B = 0), the reference every round is measured against.
    ASSIGN_OR_RETURN(double val, Evaluate(adapter));
    RETURN_IF_ERROR(sinks_.WriteMetrics(0, {{"val_loss", val}}));
    Log(absl::StrFormat("round 0 (the base): val loss %.4f", val));
  }
  Log(absl::StrCat(AggregationName(aggregation_), ", ", spec_.federated().rounds(), " rounds of ",
                   spec_.federated().clients(), " clients, adapter ", layout_.size, " floats (",
                   layout_.modules.size(), " Linears, rank ", spec_.lora().rank(), "), base ",
                   spec_.lora().base(), " hash ", base_hash_));
  return absl::OkStatus();
}

absl::Status Federation::Commit(int64_t round, const std::vector<float>& adapter) {
  ps::PushTensorsRequest::Header h;
  h.set_name(adapter_set_);
  ASSIGN_OR_RETURN(std::vector<ps::TensorSpec> specs,
                   AdapterTensorSpecs(model_->lora_params(), layout_.size));
  for (ps::TensorSpec& s : specs) *h.add_tensors() = std::move(s);
  std::vector<int64_t> parts;
  int64_t expected = 0;
  {
    absl::MutexLock lock(&mu_);
    parts = participations_;
    expected = adapter_version_;
  }
  auto& m = *h.mutable_metadata();
  m["round"] = absl::StrCat(round);
  m["participations"] = absl::StrJoin(parts, ",");
  m["base_hash"] = base_hash_;
  m["aggregation"] = AggregationName(aggregation_);
  m["job"] = job_id_;
  // Only this federation writes the set: anything else at this point is a second server.
  h.set_expected_version(expected);
  ASSIGN_OR_RETURN(int64_t version, options_.tensors->Put(
                                        h, AdapterTensorData(adapter, layout_.size,
                                                             model_->lora_params())));
  absl::MutexLock lock(&mu_);
  adapter_version_ = version;
  return absl::OkStatus();
}

absl::StatusOr<double> Federation::Evaluate(const std::vector<float>& adapter) {
  std::copy(adapter.begin(), adapter.end(), model_->lora_params().params().begin());
  return EvaluateLoss(model_.get(), val_.get(), spec_.eval().batches());
}

void Federation::Run() {
  if (thread_.joinable()) return;
  thread_ = std::thread([this] { RunRounds(); });
}

void Federation::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
    changed_.SignalAll();
  }
  if (thread_.joinable()) thread_.join();
}

bool Federation::Alive(const Worker& w, absl::Time now) const {
  return !w.replaced &&
         now - w.last_seen < absl::Seconds(spec_.federated().client_timeout_s());
}

std::vector<int> Federation::AvailableClients(absl::Time now) const {
  std::set<int> s;
  for (const auto& [id, w] : workers_) {
    if (Alive(w, now)) s.insert(w.clients.begin(), w.clients.end());
  }
  return std::vector<int>(s.begin(), s.end());
}

bool Federation::finished() const {
  absl::MutexLock lock(&mu_);
  return finished_;
}

std::vector<float> Federation::adapter() const {
  absl::MutexLock lock(&mu_);
  return adapter_;
}

StartResponse Federation::Info() const {
  absl::MutexLock lock(&mu_);
  StartResponse r;
  r.set_round(round_);
  r.set_rounds(spec_.federated().rounds());
  r.set_base_hash(base_hash_);
  r.set_finished(finished_);
  r.set_adapter_set(adapter_set_);
  r.set_dp_noise(spec_.federated().dp_noise());
  return r;
}

absl::StatusOr<JoinResponse> Federation::Join(const JoinRequest& req) {
  const std::string who = absl::StrCat(req.host(), ":", req.pid(), " (clients ",
                                       absl::StrJoin(req.clients(), ","), ")");
  if (req.base_hash() != base_hash_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "client process ", who, " has a base with hash ", req.base_hash(), "; federation '",
        job_id_, "' runs on ", spec_.lora().base(), " with hash ", base_hash_,
        ": refused (every client must load the same frozen base)"));
  }
  const std::string spec_hash = absl::StrFormat("%016x", JobSpecHash(spec_));
  if (req.spec_hash() != spec_hash) {
    return absl::FailedPreconditionError(
        absl::StrCat("client process ", who, " runs a job spec with hash ", req.spec_hash(),
                     ", federation '", job_id_, "' has ", spec_hash, ": refused"));
  }
  if (req.clients().empty()) {
    return absl::InvalidArgumentError(absl::StrCat("client process ", who, " serves no clients"));
  }
  for (int c : req.clients()) {
    if (c < 0 || c >= spec_.federated().clients()) {
      return absl::InvalidArgumentError(absl::StrCat("client process ", who, ": client ", c,
                                                     " is outside [0, federated.clients ",
                                                     spec_.federated().clients(), ")"));
    }
  }
  absl::MutexLock lock(&mu_);
  const absl::Time now = absl::Now();
  std::string id;
  for (auto& [wid, w] : workers_) {
    if (w.instance == req.instance_id() && !req.instance_id().empty()) id = wid;
  }
  if (id.empty()) id = absl::StrCat("w", ++next_worker_);
  Worker& w = workers_[id];
  w.instance = req.instance_id();
  w.clients = std::set<int>(req.clients().begin(), req.clients().end());
  w.host = req.host();
  w.pid = req.pid();
  w.last_seen = now;
  w.replaced = false;
  // A client belongs to the newest process that claims it (a restarted client rejoins).
  for (auto& [wid, other] : workers_) {
    if (wid == id) continue;
    for (int c : w.clients) {
      if (other.clients.erase(c) > 0) {
        Log(absl::StrCat("client ", c, " moved from worker ", wid, " to ", id));
        auto a = assigned_.find(c);
        if (a != assigned_.end() && a->second == wid) assigned_.erase(a);
      }
    }
    if (other.clients.empty()) other.replaced = true;
  }
  Log(absl::StrCat("worker ", id, " = ", who, " joined"));
  changed_.SignalAll();
  JoinResponse resp;
  resp.set_worker_id(id);
  resp.set_heartbeat_interval_ms(
      std::max(100, static_cast<int>(spec_.federated().client_timeout_s() * 1000 / 5)));
  return resp;
}

absl::StatusOr<GetTaskResponse> Federation::GetTask(const GetTaskRequest& req) {
  absl::MutexLock lock(&mu_);
  auto it = workers_.find(req.worker_id());
  if (it == workers_.end()) {
    return absl::NotFoundError(absl::StrCat("unknown worker '", req.worker_id(),
                                            "' (the server restarted?): join again"));
  }
  Worker& w = it->second;
  if (w.replaced) {
    return absl::FailedPreconditionError(absl::StrCat(
        "worker ", req.worker_id(), ": its clients were taken over by a newer process"));
  }
  const absl::Time now = absl::Now();
  w.last_seen = now;
  GetTaskResponse resp;
  if (finished_) {
    resp.set_state(GetTaskResponse::FINISHED);
    return resp;
  }
  resp.set_state(GetTaskResponse::WAIT);
  resp.set_retry_ms(100);
  if (!open_) return resp;
  const FederatedSpec& f = spec_.federated();
  for (int c : w.clients) {
    if (std::find(selected_.begin(), selected_.end(), c) == selected_.end() || answered_.count(c)) {
      continue;
    }
    auto a = assigned_.find(c);
    if (a != assigned_.end() && a->second != req.worker_id()) {
      auto other = workers_.find(a->second);
      if (other != workers_.end() && Alive(other->second, now)) continue;
    }
    assigned_[c] = req.worker_id();
    const CosineSchedule schedule{spec_.optimizer().lr(), spec_.schedule().warmup_steps(),
                                  f.rounds(), spec_.schedule().min_lr_ratio()};
    Task* t = resp.mutable_task();
    t->set_round(round_);
    t->set_attempt(attempt_);
    t->set_client(c);
    t->set_adapter_set(adapter_set_);
    t->set_adapter_version(adapter_version_);
    t->set_lr(schedule.LrAt(static_cast<int>(round_)));
    t->set_dp_noise(f.dp_noise());
    // The rounds this client was sent before this one, each local_steps DP-SGD steps.
    t->set_dp_steps_before((participations_[c] - 1) * f.local_steps());
    t->set_seed(Mix(Mix(spec_.seed(), static_cast<uint64_t>(round_) * 1000 + attempt_),
                    static_cast<uint64_t>(c)));
    resp.set_state(GetTaskResponse::TASK);
    return resp;
  }
  return resp;
}

absl::StatusOr<SubmitUpdateResponse> Federation::Submit(const SubmitUpdateRequest& req) {
  const int c = req.client();
  SubmitUpdateResponse resp;
  // Whether the update still belongs to the open round; returns the reason when not.
  auto stale = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) -> std::string {
    auto it = workers_.find(req.worker_id());
    if (it == workers_.end() || it->second.replaced) {
      return absl::StrCat("worker ", req.worker_id(), " is not (or no longer) joined");
    }
    it->second.last_seen = absl::Now();
    if (!open_ || req.round() != round_ || req.attempt() != attempt_) {
      return absl::StrCat("round ", req.round(), " attempt ", req.attempt(), " is not open (now ",
                          open_ ? "round " : "between rounds after round ", round_,
                          open_ ? absl::StrCat(" attempt ", attempt_) : std::string(), ")");
    }
    if (std::find(selected_.begin(), selected_.end(), c) == selected_.end()) {
      return absl::StrCat("client ", c, " is not sampled in round ", round_);
    }
    if (answered_.count(c)) return absl::StrCat("client ", c, " already answered round ", round_);
    auto a = assigned_.find(c);
    if (a == assigned_.end() || a->second != req.worker_id()) {
      return absl::StrCat("client ", c, " of round ", round_, " is not assigned to worker ",
                          req.worker_id());
    }
    return "";
  };
  {
    absl::MutexLock lock(&mu_);
    const std::string why = stale();
    if (!why.empty()) {
      resp.set_message(why);
      return resp;
    }
  }
  if (req.samples() <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("client ", c, ": samples must be > 0, got ",
                                                   req.samples()));
  }
  if (req.update_set() != UpdateSetName(job_id_, c)) {
    return absl::InvalidArgumentError(absl::StrCat("client ", c, ": update set '", req.update_set(),
                                                   "', expected '", UpdateSetName(job_id_, c), "'"));
  }
  ASSIGN_OR_RETURN(ps::StoredTensorSet set,
                   options_.tensors->Get(req.update_set(), req.update_version()));
  std::vector<ps::TensorSpec> specs;
  std::vector<absl::string_view> data;
  for (const ps::StoredTensor& st : set.tensors) {
    specs.push_back(st.spec);
    data.push_back(st.bytes);
  }
  ASSIGN_OR_RETURN(std::vector<float> delta,
                   FlattenAdapterTensors(specs, data, model_->lora_params(),
                                         layout_.update_size(aggregation_),
                                         absl::StrCat("client ", c, "'s update ",
                                                      req.update_set(), " v",
                                                      req.update_version())));
  absl::MutexLock lock(&mu_);
  const std::string why = stale();
  if (!why.empty()) {
    resp.set_message(why);
    return resp;
  }
  answered_[c] = ClientUpdate{absl::StrCat("client ", c), std::move(delta), req.samples()};
  epsilon_[c] = req.epsilon();
  train_loss_[c] = req.train_loss();
  changed_.SignalAll();
  resp.set_accepted(true);
  return resp;
}

absl::StatusOr<HeartbeatResponse> Federation::Heartbeat(const HeartbeatRequest& req) {
  absl::MutexLock lock(&mu_);
  auto it = workers_.find(req.worker_id());
  if (it == workers_.end()) {
    return absl::NotFoundError(absl::StrCat("unknown worker '", req.worker_id(),
                                            "' (the server restarted?): join again"));
  }
  it->second.last_seen = absl::Now();
  HeartbeatResponse r;
  r.set_finished(finished_);
  return r;
}

FederationStatusResponse Federation::Status() const {
  absl::MutexLock lock(&mu_);
  FederationStatusResponse r;
  r.set_round(round_);
  r.set_rounds(spec_.federated().rounds());
  r.set_attempt(attempt_);
  for (int c : selected_) r.add_selected(c);
  for (const auto& [c, u] : answered_) r.add_answered(c);
  const absl::Time now = absl::Now();
  for (const auto& [id, w] : workers_) r.set_live_workers(r.live_workers() + Alive(w, now));
  r.set_finished(finished_);
  r.set_last_val_loss(last_val_loss_);
  return r;
}

void Federation::RunRounds() {
  const FederatedSpec& f = spec_.federated();
  const int total = f.clients();
  const int want = std::max(f.min_clients(),
                            static_cast<int>(std::ceil(f.client_fraction() * total - 1e-9)));
  absl::Time last_wait_log = absl::InfinitePast();
  while (true) {
    int64_t round;
    int attempt;
    std::vector<int> selected;
    absl::Time deadline;
    {
      absl::MutexLock lock(&mu_);
      // 1. Enough clients to sample from.
      // Waits for a full sample, or, after client_timeout_s, for at least min_clients: a slow
      // start or a dead client does not hold the federation up for long. The server's first
      // round waits for every client instead: otherwise it is sampled from the clients of
      // whichever process joined first (with 2 processes and a fraction of 0.5, all of them).
      std::vector<int> avail;
      const absl::Time wait_start = absl::Now();
      const int need = sampled_ ? want : total;
      while (true) {
        if (stop_) return;
        if (round_ >= f.rounds()) {
          finished_ = true;
          changed_.SignalAll();
          Log(absl::StrCat("finished ", round_, " rounds"));
          return;
        }
        avail = AvailableClients(absl::Now());
        const int have = static_cast<int>(avail.size());
        if (have >= need || (have >= f.min_clients() &&
                             absl::Now() - wait_start > absl::Seconds(f.client_timeout_s()))) {
          break;
        }
        if (absl::Now() - last_wait_log > absl::Seconds(10)) {
          Log(absl::StrCat("round ", round_ + 1, ": waiting for clients (", avail.size(),
                           " available, min_clients ", f.min_clients(), ")"));
          last_wait_log = absl::Now();
        }
        changed_.WaitWithTimeout(&mu_, absl::Milliseconds(200));
      }
      // 2. Sample: a fixed-size subset, reproducible from the seed, round and attempt.
      round = round_;
      attempt = attempt_;
      Rng rng(Mix(spec_.seed() ^ 0x5a4b1e5ull, static_cast<uint64_t>(round) * 1000 + attempt));
      const int n = std::min(want, static_cast<int>(avail.size()));
      for (int i = 0; i < n; ++i) {
        const int j = i + static_cast<int>(rng.Uniform() * (avail.size() - i));
        std::swap(avail[i], avail[j]);
      }
      selected.assign(avail.begin(), avail.begin() + n);
      sampled_ = true;
      std::sort(selected.begin(), selected.end());
      selected_ = selected;
      answered_.clear();
      assigned_.clear();
      epsilon_.clear();
      train_loss_.clear();
      // DP is accounted from the moment a client is sent the round (conservative).
      for (int c : selected) ++participations_[c];
      open_ = true;
      deadline = absl::Now() + absl::Seconds(f.round_timeout_s());
      changed_.SignalAll();
    }
    Log(absl::StrCat("round ", round + 1, "/", f.rounds(), attempt > 0 ? absl::StrCat(" (attempt ", attempt + 1, ")") : "",
                     ": clients ", JoinInts(selected)));
    const auto t_round = std::chrono::steady_clock::now();
    // 3. Collect until every sampled client answered, the timeout, or no one left to wait for.
    std::vector<ClientUpdate> updates;
    std::vector<std::string> dropped;
    double loss_sum = 0, eps_max = 0;
    {
      absl::MutexLock lock(&mu_);
      std::string why_stop = "all answered";
      while (true) {
        if (stop_) {
          open_ = false;
          return;
        }
        if (answered_.size() == selected_.size()) break;
        const absl::Time now = absl::Now();
        if (now >= deadline) {
          why_stop = "round timeout";
          break;
        }
        bool anyone = false;
        for (int c : selected_) {
          if (answered_.count(c)) continue;
          for (const auto& [id, w] : workers_) anyone |= Alive(w, now) && w.clients.count(c) > 0;
        }
        if (!anyone) {
          why_stop = "every client left is unserved or dead";
          break;
        }
        changed_.WaitWithTimeout(&mu_, absl::Milliseconds(100));
      }
      open_ = false;
      const absl::Time now = absl::Now();
      for (int c : selected_) {
        auto a = answered_.find(c);
        if (a != answered_.end()) {
          updates.push_back(a->second);
          loss_sum += train_loss_[c];
          eps_max = std::max(eps_max, epsilon_[c]);
          continue;
        }
        std::string reason = "no live process serves it";
        auto as = assigned_.find(c);
        for (const auto& [id, w] : workers_) {
          if (!w.clients.count(c)) continue;
          reason = Alive(w, now) ? (as != assigned_.end() ? "no answer by the round timeout (stalled)"
                                                          : "never asked for its task")
                                 : absl::StrCat("worker ", id, " (", w.host, ":", w.pid,
                                                ") is dead (silent for ",
                                                absl::FormatDuration(now - w.last_seen), ")");
        }
        dropped.push_back(absl::StrCat("client ", c, ": ", reason));
      }
      if (!dropped.empty()) {
        Log(absl::StrCat("round ", round + 1, ": ", why_stop, "; dropped ",
                         absl::StrJoin(dropped, "; ")));
      }
      if (static_cast<int>(updates.size()) < f.min_clients()) {
        Log(absl::StrCat("round ", round + 1, ": ", updates.size(), " of ", selected_.size(),
                         " answered, below min_clients ", f.min_clients(), ": re-sampling"));
        ++attempt_;
        selected_.clear();
        continue;
      }
    }
    // 4. Aggregate, evaluate, commit: the new version is the round's checkpoint.
    std::vector<float> adapter = this->adapter();
    AggregateOptions ao;
    absl::StatusOr<AggregateStats> stats = Aggregate(aggregation_, layout_, updates, &adapter, ao);
    if (!stats.ok()) {
      Log(absl::StrCat("round ", round + 1, ": aggregation failed: ", stats.status().message(),
                       "; re-sampling"));
      absl::MutexLock lock(&mu_);
      ++attempt_;
      selected_.clear();
      continue;
    }
    const bool eval = (f.eval_every_rounds() > 0 && (round + 1) % f.eval_every_rounds() == 0) ||
                      round + 1 == f.rounds();
    double val = NAN;
    if (eval) {
      absl::StatusOr<double> v = Evaluate(adapter);
      if (v.ok()) {
        val = *v;
      } else {
        Log(absl::StrCat("round ", round + 1, ": evaluation failed: ", v.status().message()));
      }
    }
    absl::Status committed = Commit(round + 1, adapter);
    if (!committed.ok()) {
      // Without its checkpoint the round does not count: stop rather than diverge from disk.
      Log(absl::StrCat("round ", round + 1, ": cannot commit the round checkpoint: ",
                       committed.message(), "; the federation stops"));
      absl::MutexLock lock(&mu_);
      stop_ = true;
      return;
    }
    const double round_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t_round).count();
    {
      absl::MutexLock lock(&mu_);
      adapter_ = adapter;
      round_ = round + 1;
      attempt_ = 0;
      selected_.clear();
      assigned_.clear();
      answered_.clear();
      if (eval) last_val_loss_ = val;
      changed_.SignalAll();
    }
    // 5. The round's metrics.
    const double down = static_cast<double>(layout_.size) * sizeof(float);
    const double up = static_cast<double>(layout_.update_size(aggregation_)) * sizeof(float);
    MetricRow row = {{"clients_sampled", static_cast<double>(selected.size())},
                     {"clients_answered", static_cast<double>(updates.size())},
                     {"clients_dropped", static_cast<double>(dropped.size())},
                     {"train_loss", loss_sum / updates.size()},
                     {"aggregate_ms", stats->seconds * 1e3},
                     {"round_s", round_s},
                     {"bytes_down_per_client", down},
                     {"bytes_up_per_client", up}};
    if (f.dp_clip() > 0) row.push_back({"epsilon_max", eps_max});
    if (aggregation_ == Aggregation::kFedAvgLora) row.push_back({"discrepancy", stats->discrepancy});
    if (aggregation_ == Aggregation::kFedSvd) {
      row.push_back({"orthonormality_error", stats->orthonormality_error});
    }
    if (eval) row.push_back({"val_loss", val});
    if (absl::Status s = sinks_.WriteMetrics(static_cast<int>(round + 1), row); !s.ok()) {
      Log(absl::StrCat("round ", round + 1, ": metrics: ", s.message()));
    }
    Log(absl::StrFormat("round %d/%d done: %d of %d answered, train loss %.4f%s%s, aggregate %.1f ms, "
                        "%.1f s", round + 1, f.rounds(), updates.size(), selected.size(),
                        loss_sum / updates.size(),
                        eval ? absl::StrFormat(", val loss %.4f", val) : "",
                        f.dp_clip() > 0 ? absl::StrFormat(", epsilon %.3f", eps_max) : "",
                        stats->seconds * 1e3, round_s));
  }
}

}  // namespace qtrain::federated
