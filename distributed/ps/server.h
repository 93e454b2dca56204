// PsServer: one qtrain_ps instance (what main starts, and what tests start in-process): takes
// the storage directory's lock, recovers the stores (partial uploads removed, torn metric lines
// cut), loads the token and TLS files, registers the modules and serves.
#ifndef QTRAIN_DISTRIBUTED_PS_SERVER_H_
#define QTRAIN_DISTRIBUTED_PS_SERVER_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "distributed/proto/server_config.pb.h"
#include "distributed/ps/service_module.h"

namespace qtrain::ps {

class CheckpointStore;
class Coordinator;
class DirLock;
class JobStore;
class MetricsStore;
class TensorStore;

// Makes a module once the stores exist (e.g. the federated server).
using ModuleFactory = std::function<absl::StatusOr<std::unique_ptr<ServiceModule>>(ServerEnv)>;

class PsServer {
 public:
  // `config` as loaded (defaults are applied again, harmlessly). Serving when it returns.
  static absl::StatusOr<std::unique_ptr<PsServer>> Start(
      const ServerConfig& config, std::vector<ModuleFactory> extra_modules = {});
  ~PsServer();  // Shutdown

  int port() const;
  // host:port actually bound (the configured host with the picked port).
  std::string address() const;
  const ServerEnv& env() const { return env_; }
  // Modules' Shutdown, then the gRPC server (in-flight calls get `grace`).
  void Shutdown(absl::Duration grace = absl::Seconds(2));

 private:
  PsServer() = default;
  ServerConfig config_;
  std::unique_ptr<DirLock> lock_;
  std::unique_ptr<JobStore> jobs_;
  std::unique_ptr<MetricsStore> metrics_;
  std::unique_ptr<CheckpointStore> checkpoints_;
  std::unique_ptr<TensorStore> tensors_;
  std::unique_ptr<Coordinator> coordinator_;
  std::unique_ptr<UploadSlots> uploads_;
  std::unique_ptr<RpcServer> rpc_;
  std::vector<std::unique_ptr<ServiceModule>> modules_;
  ServerEnv env_;
  bool stopped_ = false;
};

}  // namespace qtrain::ps

#endif  // QTRAIN_DISTRIBUTED_PS_SERVER_H_
