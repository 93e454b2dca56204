// PsServer: assembly of stores, coordinator, modules and the RpcServer.
#include "distributed/ps/server.h"

#include "absl/strings/str_cat.h"
#include "distributed/ps/auth.h"
#include "distributed/ps/checkpoint_store.h"
#include "distributed/ps/config.h"
#include "distributed/ps/coordinator.h"
#include "distributed/ps/job_store.h"
#include "distributed/ps/metrics_store.h"
#include "distributed/ps/param_service.h"
#include "distributed/ps/storage.h"
#include "distributed/ps/tensor_store.h"
#include "trainer/atomic_file.h"

namespace qtrain::ps {

absl::StatusOr<std::unique_ptr<PsServer>> PsServer::Start(const ServerConfig& config_in,
                                                          std::vector<ModuleFactory> extra) {
  std::unique_ptr<PsServer> s(new PsServer());
  s->config_ = config_in;
  ApplyServerDefaults(&s->config_);
  if (absl::Status v = ValidateServerConfig(s->config_); !v.ok()) return v;
  const ServerConfig& c = s->config_;
  absl::StatusOr<std::string> token = LoadToken(c.token_file(), c.token_env());
  if (!token.ok()) return token.status();
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> creds = MakeServerCredentials(c.tls());
  if (!creds.ok()) return creds.status();

  absl::StatusOr<std::unique_ptr<DirLock>> lock = DirLock::Acquire(c.storage_dir());
  if (!lock.ok()) return lock.status();
  s->lock_ = *std::move(lock);
  const std::string jobs_dir = c.storage_dir() + "/jobs";
  const std::string tensors_dir = c.storage_dir() + "/tensors";
  if (absl::Status m = MakeDirs(jobs_dir); !m.ok()) return m;
  if (absl::Status m = MakeDirs(tensors_dir); !m.ok()) return m;
  s->jobs_ = std::make_unique<JobStore>(jobs_dir);
  s->metrics_ = std::make_unique<MetricsStore>(jobs_dir);
  s->checkpoints_ = std::make_unique<CheckpointStore>(jobs_dir, c.retention().keep_checkpoints());
  const Limits& l = c.limits();
  TensorStoreLimits tl;
  tl.max_set_bytes = l.max_tensor_set_bytes();
  tl.max_tensors = l.max_tensors_per_set();
  tl.max_sets = l.max_tensor_sets();
  tl.max_name_bytes = l.max_name_bytes();
  tl.max_metadata_entries = l.max_metadata_entries();
  tl.max_metadata_value_bytes = l.max_metadata_value_bytes();
  s->tensors_ =
      std::make_unique<TensorStore>(tensors_dir, c.retention().keep_tensor_versions(), tl);
  const Timeouts& t = c.timeouts();
  CoordinatorOptions co;
  co.heartbeat_interval = absl::Milliseconds(t.heartbeat_interval_ms());
  co.heartbeat_timeout = absl::Milliseconds(t.heartbeat_timeout_ms());
  co.min_heartbeat_timeout = absl::Milliseconds(t.min_heartbeat_timeout_ms());
  co.max_heartbeat_timeout = absl::Milliseconds(t.max_heartbeat_timeout_ms());
  co.rendezvous_timeout = absl::Milliseconds(t.rendezvous_timeout_ms());
  co.max_world_size = l.max_world_size();
  co.max_jobs = l.max_jobs();
  s->coordinator_ = std::make_unique<Coordinator>(co);
  s->uploads_ = std::make_unique<UploadSlots>(l.max_concurrent_uploads());

  RpcServer::Options ro;
  ro.address = c.address();
  ro.credentials = *creds;
  ro.token = *token;
  ro.max_message_bytes = l.max_message_bytes();
  ro.max_control_message_bytes = l.max_control_message_bytes();
  ro.max_pending_calls = l.max_pending_calls();
  ro.stream_idle_timeout = absl::Milliseconds(t.stream_idle_timeout_ms());
  ro.worker_threads = c.worker_threads();
  s->rpc_ = std::make_unique<RpcServer>(ro);

  ServerEnv& env = s->env_;
  env.config = &s->config_;
  env.storage_dir = c.storage_dir();
  env.pool = s->rpc_->pool();
  env.jobs = s->jobs_.get();
  env.metrics = s->metrics_.get();
  env.checkpoints = s->checkpoints_.get();
  env.tensors = s->tensors_.get();
  env.coordinator = s->coordinator_.get();
  env.uploads = s->uploads_.get();
  // Followers of a job's metrics learn when it ends.
  MetricsStore* metrics = s->metrics_.get();
  s->coordinator_->SetListener([metrics](const std::string& job) { metrics->WakeAll(job); });

  auto health = std::make_unique<HealthModule>();
  HealthModule* health_ptr = health.get();
  s->modules_.push_back(std::move(health));
  s->modules_.push_back(std::make_unique<ParameterServiceModule>(env));
  for (ModuleFactory& make : extra) {
    absl::StatusOr<std::unique_ptr<ServiceModule>> m = make(env);
    if (!m.ok()) return m.status();
    s->modules_.push_back(*std::move(m));
  }
  for (auto& m : s->modules_) m->Register(s->rpc_->registry());
  const std::vector<std::string> names = s->rpc_->registry()->ServiceNames();
  health_ptr->SetServices(std::set<std::string>(names.begin(), names.end()));
  if (absl::Status st = s->rpc_->Start(); !st.ok()) return st;
  if (!c.port_file().empty()) {
    if (absl::Status w = WriteFileAtomically(c.port_file(), {absl::StrCat(s->port(), "\n")});
        !w.ok()) {
      return w;
    }
  }
  return s;
}

PsServer::~PsServer() { Shutdown(absl::ZeroDuration()); }

int PsServer::port() const { return rpc_->port(); }

std::string PsServer::address() const {
  const std::string& a = config_.address();
  return absl::StrCat(a.substr(0, a.rfind(':')), ":", port());
}

void PsServer::Shutdown(absl::Duration grace) {
  if (stopped_) return;
  stopped_ = true;
  for (auto& m : modules_) m->Shutdown();
  if (rpc_) rpc_->Shutdown(grace);
  // The coordinator answers rendezvous still waiting (none can be: the server cancelled them).
  coordinator_.reset();
}

}  // namespace qtrain::ps
