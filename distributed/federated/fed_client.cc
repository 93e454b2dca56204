// RunFedClient: join, then task -> pull -> local round -> push -> submit, riding out restarts.
#include "distributed/federated/fed_client.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "configs/job_spec_loader.h"
#include "distributed/federated/adapter_io.h"
#include "distributed/federated/aggregate.h"
#include "distributed/federated/client_data.h"
#include "distributed/federated/federated.grpc.pb.h"
#include "distributed/federated/federation.h"
#include "distributed/federated/local_training.h"
#include "distributed/federated/rdp_accountant.h"
#include "ops/status_macros.h"
#include "trainer/lora_model.h"

namespace qtrain::federated {
namespace {

// Errors after which joining again may help: the server is away, restarted (it forgot the
// worker, or has not resumed the federation yet) or slow.
bool Reconnectable(const absl::Status& s) {
  return absl::IsUnavailable(s) || absl::IsNotFound(s) || absl::IsDeadlineExceeded(s) ||
         absl::IsCancelled(s);  // a call in flight when the server stopped
}

class Client {
 public:
  explicit Client(const FedClientOptions& o) : o_(o) {}

  absl::Status Run() {
    RETURN_IF_ERROR(Setup());
    RETURN_IF_ERROR(WithReconnect("joining", [&] { return Connect(); }));
    std::thread beat([this] { HeartbeatLoop(); });
    absl::Status s = Loop();
    done_ = true;
    beat.join();
    return s;
  }

 private:
  void Log(const std::string& line) const {
    if (o_.quiet) return;
    std::printf("qtrain_fed_client[%s]: %s\n", who_.c_str(), line.c_str());
    std::fflush(stdout);
  }

  absl::Status Setup() {
    ASSIGN_OR_RETURN(spec_, LoadJobSpec(o_.job_path));
    if (spec_.federated().aggregation() == FederatedSpec::AGGREGATION_UNSPECIFIED) {
      return absl::InvalidArgumentError(
          absl::StrCat(o_.job_path, ": not a federated job (federated.aggregation is unset)"));
    }
    if (o_.clients.empty()) return absl::InvalidArgumentError("no logical clients to serve");
    job_ = spec_.name();
    who_ = absl::StrCat("clients ", absl::StrJoin(o_.clients, ","));
    ASSIGN_OR_RETURN(model_, CreateLoraModel(spec_));
    base_hash_ = BaseHashHex(BaseHash(*model_));
    ASSIGN_OR_RETURN(layout_, AdapterLayout::FromStore(model_->lora_params()));
    aggregation_ = AggregationOf(spec_);
    local_ = LocalConfigFromSpec(spec_);
    ASSIGN_OR_RETURN(ps_, ps::PsClient::Create(o_.service));
    stub_ = FederatedService::NewStub(ps_->channel());
    std::random_device rd;
    instance_ = absl::StrFormat("%016x%08x", (uint64_t{rd()} << 32) | rd(), getpid());
    return absl::OkStatus();
  }

  template <class Req, class Resp>
  absl::Status Unary(const char* what, bool idempotent,
                     grpc::Status (FederatedService::Stub::*method)(grpc::ClientContext*,
                                                                      const Req&, Resp*),
                     const Req& req, Resp* resp) {
    return ps_->Call(what, idempotent, ps_->options().deadline, [&](grpc::ClientContext* ctx) {
      return (stub_.get()->*method)(ctx, req, resp);
    });
  }

  // Registers the job (idempotent), starts or finds the federation, checks the base, joins.
  absl::Status Connect() {
    absl::StatusOr<ps::RegisterJobResponse> reg = ps_->RegisterJob(job_, JobSpecToText(spec_));
    if (!reg.ok()) return reg.status();
    StartRequest sreq;
    sreq.set_job_id(job_);
    StartResponse sresp;
    RETURN_IF_ERROR(Unary("Start", true, &FederatedService::Stub::Start, sreq, &sresp));
    if (sresp.base_hash() != base_hash_) {
      return absl::FailedPreconditionError(absl::StrCat(
          "this process's base ", spec_.lora().base(), " has hash ", base_hash_,
          ", the federation's has ", sresp.base_hash(), ": not joining"));
    }
    JoinRequest j;
    j.set_job_id(job_);
    j.set_instance_id(instance_);
    for (int c : o_.clients) j.add_clients(c);
    j.set_base_hash(base_hash_);
    j.set_spec_hash(absl::StrFormat("%016x", JobSpecHash(spec_)));
    char host[256] = {};
    gethostname(host, sizeof(host) - 1);
    j.set_host(host);
    j.set_pid(getpid());
    JoinResponse jr;
    RETURN_IF_ERROR(Unary("Join", true, &FederatedService::Stub::Join, j, &jr));
    {
      absl::MutexLock lock(&mu_);
      worker_ = jr.worker_id();
      beat_ms_ = jr.heartbeat_interval_ms();
    }
    Log(absl::StrCat("joined job ", job_, " at ", o_.service.address, " as worker ",
                     jr.worker_id(), " (round ", sresp.round(), "/", sresp.rounds(), ", base ",
                     base_hash_, ")"));
    return absl::OkStatus();
  }

  // Runs `fn`; while it fails in a way a reconnect can fix, reconnects and runs it again,
  // for at most server_wait from the first failure.
  absl::Status WithReconnect(const std::string& what, const std::function<absl::Status()>& fn) {
    absl::Time first_failure = absl::InfiniteFuture();
    while (true) {
      absl::Status s = fn();
      if (s.ok() || !Reconnectable(s)) return s;
      const absl::Time now = absl::Now();
      if (first_failure == absl::InfiniteFuture()) {
        first_failure = now;
        Log(absl::StrCat(what, ": ", s.message(), "; reconnecting"));
      }
      if (now - first_failure > o_.server_wait) {
        return absl::UnavailableError(absl::StrCat(what, ": gave up after ",
                                                   absl::FormatDuration(o_.server_wait), ": ",
                                                   s.message()));
      }
      absl::SleepFor(absl::Milliseconds(500));
      absl::Status c = Connect();
      if (!c.ok() && !Reconnectable(c)) return c;
    }
  }

  std::string worker() {
    absl::MutexLock lock(&mu_);
    return worker_;
  }

  void HeartbeatLoop() {
    while (!done_) {
      int ms;
      {
        absl::MutexLock lock(&mu_);
        ms = beat_ms_;
      }
      absl::SleepFor(absl::Milliseconds(ms));
      HeartbeatRequest h;
      h.set_job_id(job_);
      h.set_worker_id(worker());
      h.set_client(current_client_);
      HeartbeatResponse r;
      grpc::ClientContext ctx;
      ps_->Prepare(&ctx, absl::Now() + absl::Milliseconds(std::max(ms, 1000)));
      (void)stub_->Heartbeat(&ctx, h, &r);  // failures: the main loop rejoins
    }
  }

  absl::StatusOr<ClientData*> Data(int client) {
    auto it = data_.find(client);
    if (it != data_.end()) return &it->second;
    const std::vector<std::string> genres(spec_.data().genres().begin(),
                                          spec_.data().genres().end());
    ASSIGN_OR_RETURN(std::string pattern,
                     ClientPattern(spec_.federated().client_train_pattern(), client, genres));
    ASSIGN_OR_RETURN(ClientData d, ClientData::Open(pattern, spec_.training().seq_len(),
                                                    spec_.model().vocab_size()));
    Log(absl::StrCat("client ", client, ": ", d.sequences(), " sequences from ", pattern));
    return &data_.emplace(client, std::move(d)).first->second;
  }

  // sigma of this client: the task's, or derived from the target epsilon at its own sample
  // rate for every round (a client sent every round is the worst case).
  absl::StatusOr<double> Noise(int client, const Task& t, const ClientData& d) {
    const FederatedSpec& f = spec_.federated();
    if (t.dp_noise() > 0 || f.dp_epsilon() <= 0) return t.dp_noise();
    auto it = sigma_.find(client);
    if (it != sigma_.end()) return it->second;
    const double q = DpSampleRate(local_, d);
    ASSIGN_OR_RETURN(double sigma,
                     NoiseMultiplierForEpsilon(f.dp_epsilon(), f.dp_delta(), q,
                                               int64_t{f.rounds()} * f.local_steps()));
    Log(absl::StrFormat("client %d: DP-SGD sigma %.4f for epsilon %.2f at delta %g (q %.5f, %d "
                        "steps)", client, sigma, f.dp_epsilon(), f.dp_delta(), q,
                        f.rounds() * f.local_steps()));
    sigma_[client] = sigma;
    return sigma;
  }

  absl::Status Train(const Task& t) {
    const int c = t.client();
    if (!o_.fault.empty() && t.round() == o_.fault_round &&
        (o_.fault_client < 0 || o_.fault_client == c)) {
      Log(absl::StrCat("fault injection: ", o_.fault, " in round ", t.round() + 1, " (client ", c,
                       ")"));
      if (o_.fault == "die") std::_Exit(3);
      while (true) absl::SleepFor(absl::Seconds(3600));  // "stall": heartbeats go on
    }
    current_client_ = c;
    absl::StatusOr<std::optional<ps::TensorSetData>> pulled =
        ps_->PullTensors(t.adapter_set(), t.adapter_version());
    if (!pulled.ok()) return pulled.status();
    if (!pulled->has_value()) return absl::NotFoundError("the round's adapter is gone");
    const ps::TensorSetData& set = **pulled;
    std::vector<ps::TensorSpec> specs(set.info.tensors().begin(), set.info.tensors().end());
    std::vector<absl::string_view> views(set.data.begin(), set.data.end());
    ASSIGN_OR_RETURN(std::vector<float> adapter,
                     FlattenAdapterTensors(specs, views, model_->lora_params(), layout_.size,
                                           absl::StrCat(t.adapter_set(), " v",
                                                        t.adapter_version())));
    ASSIGN_OR_RETURN(ClientData * data, Data(c));
    LocalConfig cfg = local_;
    cfg.lr = t.lr();
    cfg.seed = t.seed();
    ASSIGN_OR_RETURN(cfg.dp_noise, Noise(c, t, *data));
    ASSIGN_OR_RETURN(LocalResult r,
                     TrainLocally(model_.get(), layout_, aggregation_, adapter, *data, cfg));
    const FederatedSpec& f = spec_.federated();
    double epsilon = 0;
    if (cfg.dp_clip > 0) {
      epsilon = EpsilonAfter(cfg.dp_noise, DpSampleRate(cfg, *data),
                             t.dp_steps_before() + cfg.steps, f.dp_delta());
    }
    const int64_t n = layout_.update_size(aggregation_);
    ASSIGN_OR_RETURN(std::vector<ps::TensorSpec> out_specs,
                     AdapterTensorSpecs(model_->lora_params(), n));
    const std::vector<absl::string_view> out_data =
        AdapterTensorData(r.delta, n, model_->lora_params());
    std::vector<ps::TensorIn> ins;
    for (size_t i = 0; i < out_specs.size(); ++i) ins.push_back({out_specs[i], out_data[i]});
    ASSIGN_OR_RETURN(int64_t version,
                     ps_->PushTensors(UpdateSetName(job_, c), ins,
                                      {{"round", absl::StrCat(t.round())},
                                       {"attempt", absl::StrCat(t.attempt())},
                                       {"client", absl::StrCat(c)}}));
    SubmitUpdateRequest s;
    s.set_job_id(job_);
    s.set_worker_id(worker());
    s.set_client(c);
    s.set_round(t.round());
    s.set_attempt(t.attempt());
    s.set_update_set(UpdateSetName(job_, c));
    s.set_update_version(version);
    s.set_samples(data->sequences());
    s.set_epsilon(epsilon);
    s.set_train_loss(r.mean_loss);
    s.set_train_seconds(r.seconds);
    SubmitUpdateResponse sr;
    RETURN_IF_ERROR(Unary("SubmitUpdate", true, &FederatedService::Stub::SubmitUpdate, s, &sr));
    current_client_ = -1;
    Log(absl::StrFormat("client %d round %d: loss %.4f over %d steps (%d sequences)%s, %.1f s, "
                        "update v%d %s", c, t.round() + 1, r.mean_loss, cfg.steps, r.sequences,
                        cfg.dp_clip > 0
                            ? absl::StrFormat(", epsilon %.3f, sigma %.3f, %d/%d clipped, "
                                              "per-sample norm mean %.3g max %.3g",
                                              epsilon, cfg.dp_noise, r.clip.clipped,
                                              r.clip.samples,
                                              r.clip.sum_norm / std::max(1, r.clip.samples),
                                              r.clip.max_norm)
                            : "",
                        r.seconds, version,
                        sr.accepted() ? "accepted" : "not taken: " + sr.message()));
    return absl::OkStatus();
  }

  absl::Status Loop() {
    while (true) {
      GetTaskResponse resp;
      RETURN_IF_ERROR(WithReconnect("GetTask", [&] {
        GetTaskRequest g;
        g.set_job_id(job_);
        g.set_worker_id(worker());
        return Unary("GetTask", true, &FederatedService::Stub::GetTask, g, &resp);
      }));
      if (resp.state() == GetTaskResponse::FINISHED) {
        Log("the federation finished");
        return absl::OkStatus();
      }
      if (resp.state() == GetTaskResponse::WAIT) {
        absl::SleepFor(absl::Milliseconds(std::max(20, resp.retry_ms())));
        continue;
      }
      const Task t = resp.task();
      RETURN_IF_ERROR(WithReconnect(absl::StrCat("round ", t.round() + 1, " of client ",
                                                 t.client()),
                                    [&] { return Train(t); }));
    }
  }

  const FedClientOptions o_;
  JobSpec spec_;
  std::string job_, who_, base_hash_, instance_;
  std::unique_ptr<Gpt> model_;
  AdapterLayout layout_;
  Aggregation aggregation_ = Aggregation::kFedSvd;
  LocalConfig local_;
  std::unique_ptr<ps::PsClient> ps_;
  std::unique_ptr<FederatedService::Stub> stub_;
  std::map<int, ClientData> data_;
  std::map<int, double> sigma_;
  absl::Mutex mu_;
  std::string worker_ ABSL_GUARDED_BY(mu_);
  int beat_ms_ ABSL_GUARDED_BY(mu_) = 1000;
  std::atomic<bool> done_{false};
  std::atomic<int> current_client_{-1};
};

}  // namespace

absl::Status RunFedClient(const FedClientOptions& options) {
  Client c(options);
  return c.Run();
}

}  // namespace qtrain::federated
