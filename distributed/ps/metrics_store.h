// MetricsStore: each job's metric rows, durable as <storage>/jobs/<job>/metrics.jsonl (the
// trainer's format: one JSON object per line, "step" plus the named values, non-finite values
// null). An append is fdatasynced before it is acknowledged; a torn last line (never
// acknowledged) is cut off when the file is opened again. Followers wait for new rows.
#ifndef QTRAIN_DISTRIBUTED_PS_METRICS_STORE_H_
#define QTRAIN_DISTRIBUTED_PS_METRICS_STORE_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "distributed/proto/param_service.pb.h"
#include "distributed/ps/storage.h"

namespace qtrain::ps {

class MetricsStore {
 public:
  // `jobs_dir` is <storage>/jobs.
  explicit MetricsStore(std::string jobs_dir) : jobs_dir_(std::move(jobs_dir)) {}

  // Rows with step <= the last stored step are skipped (a retried batch); after
  // truncate_after (if set) drops stored rows of later steps first. Rows must have strictly
  // increasing steps >= 0 (InvalidArgument otherwise; nothing is stored then).
  absl::StatusOr<AppendMetricsResponse> Append(const AppendMetricsRequest& request);

  // Up to `max_rows` rows with step > after_step, in order.
  absl::StatusOr<std::vector<MetricRow>> Read(const std::string& job_id, int64_t after_step,
                                              int max_rows);
  // Last stored step, -1 when none.
  int64_t LastStep(const std::string& job_id);

  // Calls `wake` once (without the lock) when job_id gets rows after `after_step`, or at once
  // when it has them already. Returns a handle for Unwatch.
  uint64_t Watch(const std::string& job_id, int64_t after_step, std::function<void()> wake);
  void Unwatch(const std::string& job_id, uint64_t handle);
  // Wakes every follower of the job (its state changed).
  void WakeAll(const std::string& job_id);

  // JSON line of one row (exactly what the file holds).
  static std::string RowToJson(const MetricRow& row);
  static absl::StatusOr<MetricRow> RowFromJson(const std::string& line);

 private:
  struct JobMetrics {
    std::unique_ptr<AppendFile> file;
    int64_t last_step = -1;
    // (step, byte offset) every few rows: reads seek near their start.
    std::vector<std::pair<int64_t, int64_t>> index;
    int64_t rows = 0;
    std::map<uint64_t, std::pair<int64_t, std::function<void()>>> watchers;
  };
  // NotFound without `create` when the job has no metrics file.
  absl::StatusOr<JobMetrics*> Load(const std::string& job_id, bool create)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::string PathOf(const std::string& job_id) const;

  const std::string jobs_dir_;
  absl::Mutex mu_;
  std::map<std::string, JobMetrics> jobs_ ABSL_GUARDED_BY(mu_);
  uint64_t next_handle_ ABSL_GUARDED_BY(mu_) = 1;
};

}  // namespace qtrain::ps

#endif  // QTRAIN_DISTRIBUTED_PS_METRICS_STORE_H_
