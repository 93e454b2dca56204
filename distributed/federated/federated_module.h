// The federated service as a module of qtrain_ps (distributed/ps/service_module.h): one
// Federation per federated job registered with the parameter service, started by the first
// client's Start call (and resumed from the job's last round checkpoint after a restart), on the
// server's port, token, TLS, limits and stores. Round metrics also go to the job's metrics.
#ifndef QTRAIN_DISTRIBUTED_FEDERATED_FEDERATED_MODULE_H_
#define QTRAIN_DISTRIBUTED_FEDERATED_FEDERATED_MODULE_H_

#include <map>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "distributed/federated/federation.h"
#include "distributed/ps/server.h"
#include "distributed/ps/service_module.h"

namespace qtrain::federated {

inline constexpr char kFederatedService[] = "qtrain.federated.FederatedService";

class FederatedModule : public ps::ServiceModule {
 public:
  explicit FederatedModule(ps::ServerEnv env) : env_(env) {}
  ~FederatedModule() override { Shutdown(); }
  std::string name() const override { return "federated"; }
  void Register(ps::MethodRegistry* registry) override;
  void Shutdown() override;

 private:
  // The running federation of `job_id`; with start, creates it from the registered spec.
  absl::StatusOr<Federation*> Find(const std::string& job_id, bool start);

  ps::ServerEnv env_;
  absl::Mutex mu_;
  std::map<std::string, std::unique_ptr<RunSink>> sinks_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::unique_ptr<Federation>> federations_ ABSL_GUARDED_BY(mu_);
};

// For PsServer::Start (qtrain_ps adds it).
ps::ModuleFactory FederatedModuleFactory();

}  // namespace qtrain::federated

#endif  // QTRAIN_DISTRIBUTED_FEDERATED_FEDERATED_MODULE_H_
