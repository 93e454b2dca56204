// FederatedModule: the FederatedService methods over the job's Federation.
#include "distributed/federated/federated_module.h"

#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "configs/job_spec_loader.h"
#include "distributed/ps/job_store.h"
#include "distributed/ps/metrics_store.h"

namespace qtrain::federated {
namespace {

// Round metrics into the service's metrics store (step = round), beside rounds.jsonl.
class MetricsStoreSink : public RunSink {
 public:
  MetricsStoreSink(ps::MetricsStore* store, std::string job_id)
      : store_(store), job_id_(std::move(job_id)) {}
  absl::Status WriteMetrics(int step, const MetricRow& row) override {
    ps::AppendMetricsRequest req;
    req.set_job_id(job_id_);
    ps::MetricRow* r = req.add_rows();
    r->set_step(step);
    for (const auto& [name, value] : row) {
      ps::Metric* m = r->add_metrics();
      m->set_name(name);
      m->set_value(value);
    }
    return store_->Append(req).status();
  }

 private:
  ps::MetricsStore* store_;
  std::string job_id_;
};

}  // namespace

void FederatedModule::Shutdown() {
  std::map<std::string, std::unique_ptr<Federation>> feds;
  {
    absl::MutexLock lock(&mu_);
    feds.swap(federations_);
  }
  for (auto& [id, f] : feds) f->Stop();
}

absl::StatusOr<Federation*> FederatedModule::Find(const std::string& job_id, bool start) {
  absl::MutexLock lock(&mu_);
  auto it = federations_.find(job_id);
  if (it != federations_.end()) return it->second.get();
  if (!start) {
    return absl::NotFoundError(
        absl::StrCat("the federation of job '", job_id, "' is not running: call Start"));
  }
  std::optional<ps::JobRecord> rec = env_.jobs->Get(job_id);
  if (!rec) {
    return absl::NotFoundError(absl::StrCat(
        "job '", job_id, "' is not registered with the parameter service (RegisterJob first)"));
  }
  absl::StatusOr<JobSpec> spec = ParseJobSpec(rec->spec_text, "job " + job_id);
  if (!spec.ok()) return spec.status();
  auto sink = std::make_unique<MetricsStoreSink>(env_.metrics, job_id);
  FederationOptions o;
  o.tensors = env_.tensors;
  o.extra_sink = sink.get();
  absl::StatusOr<std::unique_ptr<Federation>> f = Federation::Create(job_id, *spec, o);
  if (!f.ok()) return f.status();
  Federation* raw = f->get();
  sinks_[job_id] = std::move(sink);
  federations_[job_id] = *std::move(f);
  raw->Run();
  return raw;
}

void FederatedModule::Register(ps::MethodRegistry* r) {
  using grpc::Status;
  const ps::MethodOptions disk{0, ps::Blocking::kYes};
  const char* svc = kFederatedService;
  // Every method: find the job's federation, call it, map the status.
  auto wrap = [this](auto call, bool start) {
    return [this, call, start](const ps::CallInfo&, const auto& req, auto* resp) -> Status {
      absl::StatusOr<Federation*> f = Find(req.job_id(), start);
      if (!f.ok()) return ps::ToGrpc(f.status());
      auto out = call(*f, req);
      if (!out.ok()) return ps::ToGrpc(out.status());
      *resp = *std::move(out);
      return Status::OK;
    };
  };
  r->Unary<StartRequest, StartResponse>(
      svc, "Start",
      wrap([](Federation* f, const StartRequest&) -> absl::StatusOr<StartResponse> {
             return f->Info();
           }, true),
      disk);
  r->Unary<JoinRequest, JoinResponse>(
      svc, "Join",
      wrap([](Federation* f, const JoinRequest& q) { return f->Join(q); }, false));
  r->Unary<GetTaskRequest, GetTaskResponse>(
      svc, "GetTask",
      wrap([](Federation* f, const GetTaskRequest& q) { return f->GetTask(q); }, false));
  r->Unary<SubmitUpdateRequest, SubmitUpdateResponse>(
      svc, "SubmitUpdate",
      wrap([](Federation* f, const SubmitUpdateRequest& q) { return f->Submit(q); }, false),
      disk);
  r->Unary<HeartbeatRequest, HeartbeatResponse>(
      svc, "Heartbeat",
      wrap([](Federation* f, const HeartbeatRequest& q) { return f->Heartbeat(q); }, false));
  r->Unary<FederationStatusRequest, FederationStatusResponse>(
      svc, "Status",
      wrap([](Federation* f, const FederationStatusRequest&)
               -> absl::StatusOr<FederationStatusResponse> { return f->Status(); },
           false));
}

ps::ModuleFactory FederatedModuleFactory() {
  return [](ps::ServerEnv env) -> absl::StatusOr<std::unique_ptr<ps::ServiceModule>> {
    return std::unique_ptr<ps::ServiceModule>(new FederatedModule(env));
  };
}

}  // namespace qtrain::federated
