// Sinks that send a run's output to the parameter service (parameter_service.address): metrics
// rows, streamed in the background in batches (the step loop never waits for the network;
// Finish waits for the last rows, within the client's deadline), and checkpoints, uploaded
// from the file the out_dir sink just wrote (the save waits for the service's commit).
#ifndef QTRAIN_TRAINER_SERVICE_SINKS_H_
#define QTRAIN_TRAINER_SERVICE_SINKS_H_

#include <deque>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "distributed/ps/client.h"
#include "trainer/sinks.h"

namespace qtrain {

class ServiceMetricsSink : public RunSink {
 public:
  ServiceMetricsSink(std::shared_ptr<ps::PsClient> client, std::string job_id);
  ~ServiceMetricsSink() override;  // rows Finish did not deliver are dropped
  // Queues the row. The first row also tells the service to drop stored rows after the step
  // before it (a resumed run replaces what its predecessor logged later, as metrics.jsonl does).
  absl::Status WriteMetrics(int step, const MetricRow& row) override;
  // Waits until every row is stored, or fails naming the service after its deadline.
  absl::Status Finish() override;

 private:
  void Loop();

  std::shared_ptr<ps::PsClient> client_;
  const std::string job_id_;
  absl::Mutex mu_;
  std::deque<ps::MetricRow> queue_ ABSL_GUARDED_BY(mu_);
  int64_t truncate_after_ ABSL_GUARDED_BY(mu_) = -2;  // -2: no row yet; set by the first row
  bool truncate_sent_ ABSL_GUARDED_BY(mu_) = false;
  bool sending_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::string last_error_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

class ServiceCheckpointSink : public RunSink {
 public:
  // keep_last: how many of the job's checkpoints the service keeps (the job's
  // checkpoint.keep_last).
  ServiceCheckpointSink(std::shared_ptr<ps::PsClient> client, std::string job_id, int keep_last)
      : client_(std::move(client)), job_id_(std::move(job_id)), keep_last_(keep_last) {}
  absl::Status WriteCheckpoint(const CheckpointData& checkpoint) override;

 private:
  std::shared_ptr<ps::PsClient> client_;
  const std::string job_id_;
  const int keep_last_;
};

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_SERVICE_SINKS_H_
