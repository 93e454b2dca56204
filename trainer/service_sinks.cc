// ServiceMetricsSink (a sender thread with a queue) and ServiceCheckpointSink.
#include "trainer/service_sinks.h"

#include <cstdio>

#include "absl/strings/str_cat.h"

namespace qtrain {
namespace {

// Rows a batch carries at most, and rows the queue may hold while the service is away.
constexpr int kBatchRows = 500;
constexpr size_t kMaxQueuedRows = 1000000;

}  // namespace

ServiceMetricsSink::ServiceMetricsSink(std::shared_ptr<ps::PsClient> client, std::string job_id)
    : client_(std::move(client)), job_id_(std::move(job_id)) {
  thread_ = std::thread([this] { Loop(); });
}

ServiceMetricsSink::~ServiceMetricsSink() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  thread_.join();
}

absl::Status ServiceMetricsSink::WriteMetrics(int step, const MetricRow& row) {
  ps::MetricRow r;
  r.set_step(step);
  for (const auto& [name, value] : row) {
    ps::Metric* m = r.add_metrics();
    m->set_name(name);
    m->set_value(value);
  }
  absl::MutexLock lock(&mu_);
  if (queue_.size() >= kMaxQueuedRows) {
    return absl::UnavailableError(absl::StrCat("metrics to the parameter service at ",
                                               client_->address(), ": ", queue_.size(),
                                               " rows undelivered: ", last_error_));
  }
  if (truncate_after_ == -2) truncate_after_ = step - 1;
  queue_.push_back(std::move(r));
  return absl::OkStatus();
}

void ServiceMetricsSink::Loop() {
  bool warned = false;
  for (;;) {
    ps::AppendMetricsRequest req;
    req.set_job_id(job_id_);
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](ServiceMetricsSink* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu_) {
            return s->stop_ || !s->queue_.empty();
          },
          this));
      if (stop_) return;
      for (size_t i = 0; i < queue_.size() && i < static_cast<size_t>(kBatchRows); ++i) {
        *req.add_rows() = queue_[i];
      }
      if (!truncate_sent_) req.set_truncate_after(truncate_after_);
      sending_ = true;
    }
    absl::StatusOr<ps::AppendMetricsResponse> r = client_->AppendMetrics(req);
    absl::MutexLock lock(&mu_);
    sending_ = false;
    if (r.ok()) {
      // Stored (or already there from a retried batch): drop exactly what was sent.
      queue_.erase(queue_.begin(), queue_.begin() + req.rows_size());
      truncate_sent_ = true;
      last_error_.clear();
      warned = false;
      continue;
    }
    last_error_ = std::string(r.status().message());
    if (!warned) {
      warned = true;
      std::fprintf(stderr, "qtrain: metrics to the parameter service are delayed: %s\n",
                   last_error_.c_str());
    }
    // The client retried within its deadline already; wait a little before the next round.
    mu_.AwaitWithTimeout(absl::Condition(&stop_), absl::Seconds(1));
    if (stop_) return;
  }
}

absl::Status ServiceMetricsSink::Finish() {
  absl::MutexLock lock(&mu_);
  const bool drained = mu_.AwaitWithTimeout(
      absl::Condition(
          +[](ServiceMetricsSink* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu_) {
            return s->queue_.empty() && !s->sending_;
          },
          this),
      client_->options().deadline);
  if (drained) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat(
      "metrics to the parameter service at ", client_->address(), ": ", queue_.size(),
      " rows not delivered at the end of the run",
      last_error_.empty() ? "" : absl::StrCat(": ", last_error_)));
}

absl::Status ServiceCheckpointSink::WriteCheckpoint(const CheckpointData& c) {
  absl::StatusOr<ps::CheckpointInfo> info =
      client_->UploadCheckpoint(job_id_, c.state.step, c.local_path, keep_last_);
  if (!info.ok()) {
    return absl::Status(info.status().code(),
                        absl::StrCat("uploading the step-", c.state.step,
                                     " checkpoint: ", info.status().message()));
  }
  return absl::OkStatus();
}

}  // namespace qtrain
