// ServiceModule: how a gRPC service joins qtrain_ps. A module registers typed handlers for
// the methods of its own proto service on the shared RpcServer (same port, same bearer token,
// same TLS, same limits) and reaches the server's durable state through ServerEnv. The
// parameter service and the health service are modules; the federated server is meant to be
// one (see docs/parameter_service.md, "Adding a service").
#ifndef QTRAIN_DISTRIBUTED_PS_SERVICE_MODULE_H_
#define QTRAIN_DISTRIBUTED_PS_SERVICE_MODULE_H_

#include <atomic>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "distributed/proto/server_config.pb.h"
#include "distributed/ps/rpc_server.h"

namespace qtrain::ps {

class Coordinator;
class CheckpointStore;
class JobStore;
class MetricsStore;
class TensorStore;

// A shared cap on streams that write to the disk at once (checkpoint uploads, tensor pushes,
// and whatever a module adds): each holds a Slot for its lifetime.
class UploadSlots {
 public:
  explicit UploadSlots(int limit) : limit_(limit) {}
  class Slot {
   public:
    explicit Slot(UploadSlots* owner) : owner_(owner) {}
    ~Slot() { owner_->used_.fetch_sub(1); }
    Slot(const Slot&) = delete;
    Slot& operator=(const Slot&) = delete;

   private:
    UploadSlots* owner_;
  };
  // ResourceExhausted when all are taken.
  absl::StatusOr<std::unique_ptr<Slot>> Acquire() {
    if (used_.fetch_add(1) >= limit_) {
      used_.fetch_sub(1);
      return absl::ResourceExhaustedError(
          absl::StrCat("the server already runs its limit of ", limit_,
                       " uploads (limits.max_concurrent_uploads); retry later"));
    }
    return std::make_unique<Slot>(this);
  }

 private:
  const int limit_;
  std::atomic<int> used_{0};
};

// What the server shares with its modules; everything outlives every module.
struct ServerEnv {
  const ServerConfig* config = nullptr;  // defaults applied
  std::string storage_dir;
  WorkerPool* pool = nullptr;  // for blocking work a module starts itself
  JobStore* jobs = nullptr;
  MetricsStore* metrics = nullptr;
  CheckpointStore* checkpoints = nullptr;
  TensorStore* tensors = nullptr;
  Coordinator* coordinator = nullptr;
  UploadSlots* uploads = nullptr;
  // Directory a module may own for its own files: <storage>/modules/<name>/ (created).
  std::string ModuleDir(const std::string& module_name) const;
};

class ServiceModule {
 public:
  virtual ~ServiceModule() = default;
  // Short name for logs and ModuleDir ("params", "health", "federated").
  virtual std::string name() const = 0;
  // Registers every method of the module's services (a method left out fails the start).
  virtual void Register(MethodRegistry* registry) = 0;
  // Called before the server stops accepting calls: finish long polls, stop threads.
  virtual void Shutdown() {}
};

}  // namespace qtrain::ps

#endif  // QTRAIN_DISTRIBUTED_PS_SERVICE_MODULE_H_
