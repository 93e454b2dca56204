// The modules qtrain_ps always runs: ParameterServiceModule (qtrain.ps.ParameterService: jobs,
// workers, rendezvous, metrics, checkpoints, tensor sets; every request validated against the
// configured limits) and HealthModule (grpc.health.v1.Health).
#ifndef QTRAIN_DISTRIBUTED_PS_PARAM_SERVICE_H_
#define QTRAIN_DISTRIBUTED_PS_PARAM_SERVICE_H_

#include <memory>
#include <set>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "distributed/ps/service_module.h"

namespace qtrain::ps {

inline constexpr char kParameterService[] = "qtrain.ps.ParameterService";
inline constexpr char kHealthService[] = "grpc.health.v1.Health";
// Chunk size of downloads and pulls (uploads choose their own, up to limits.max_chunk_bytes).
inline constexpr int64_t kChunkBytes = 1 << 20;

class ParameterServiceModule : public ServiceModule {
 public:
  explicit ParameterServiceModule(ServerEnv env);
  std::string name() const override { return "params"; }
  void Register(MethodRegistry* registry) override;

  // OK when `job_id` is known or a new job fits under limits.max_jobs (it is then known).
  absl::Status AdmitJob(const std::string& job_id);
  bool KnownJob(const std::string& job_id);

 private:
  ServerEnv env_;
  const absl::Time started_ = absl::Now();
  absl::Mutex mu_;
  std::set<std::string> jobs_ ABSL_GUARDED_BY(mu_);
};

class HealthModule : public ServiceModule {
 public:
  std::string name() const override { return "health"; }
  void Register(MethodRegistry* registry) override;
  // The services Check reports SERVING (all registered ones, and "").
  void SetServices(std::set<std::string> services) { services_ = std::move(services); }

 private:
  std::set<std::string> services_;
};

}  // namespace qtrain::ps

#endif  // QTRAIN_DISTRIBUTED_PS_PARAM_SERVICE_H_
