// JobStore: job specs registered with the service, durable as <storage>/jobs/<job>/
// job_spec.textproto plus job.json (its SHA-256), both written atomically, the record last.
#ifndef QTRAIN_DISTRIBUTED_PS_JOB_STORE_H_
#define QTRAIN_DISTRIBUTED_PS_JOB_STORE_H_

#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"

namespace qtrain::ps {

struct JobRecord {
  std::string spec_text;
  std::string spec_sha256;
};

class JobStore {
 public:
  explicit JobStore(std::string jobs_dir);
  // AlreadyExists when a different spec is registered and !replace. Returns whether it
  // changed anything.
  absl::StatusOr<bool> Register(const std::string& job_id, const std::string& spec_text,
                                bool replace);
  std::optional<JobRecord> Get(const std::string& job_id);
  // Ids of every job with anything stored (spec, metrics, checkpoints).
  std::vector<std::string> StoredJobIds() const;
  bool Known(const std::string& job_id);

 private:
  const std::string jobs_dir_;
  absl::Mutex mu_;
  std::map<std::string, JobRecord> specs_ ABSL_GUARDED_BY(mu_);
};

}  // namespace qtrain::ps

#endif  // QTRAIN_DISTRIBUTED_PS_JOB_STORE_H_
