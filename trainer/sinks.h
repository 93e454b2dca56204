// Where a run's output goes: metrics rows and checkpoints leave the step loop through one
// interface, RunSink, so a new destination (the parameter service) is a new sink, not a new
// branch of the loop. The local ones: the JSONL metrics file and the checkpoint directory.
#ifndef QTRAIN_TRAINER_SINKS_H_
#define QTRAIN_TRAINER_SINKS_H_

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "trainer/checkpoint.h"
#include "trainer/metrics.h"
#include "trainer/optimizer.h"
#include "trainer/param_store.h"

namespace qtrain {

// A checkpoint as the loop hands it out: views of the host state, valid during the call only.
struct CheckpointData {
  const ParamStore& params;  // weights and buffers (device runs have downloaded them)
  const AdamW& optimizer;    // moments of every parameter (ZeRO-1 shards already gathered)
  const TrainState& state;   // step, data position, RNG, job spec, data-parallel shape
  // Where the out_dir sink writes this checkpoint (CheckpointPath(out_dir, step)). The session
  // attaches that sink first, so a later sink may read the finished file (e.g. to upload it).
  std::string local_path;
};

// Rank 0 alone emits: every method is called there only, in step order. An error ends the run
// with it. Methods a sink does not care about keep their no-op default.
class RunSink {
 public:
  virtual ~RunSink() = default;
  // The row of optimizer step `step` (1-based): train_loss, lr, grad_norm, tokens_per_s,
  // step_ms, model statistics, and val_loss on eval steps.
  virtual absl::Status WriteMetrics(int step, const MetricRow& row) { return absl::OkStatus(); }
  virtual absl::Status WriteCheckpoint(const CheckpointData& checkpoint) {
    return absl::OkStatus();
  }
  // The last step is done (and checkpointed): flush or commit what is pending.
  virtual absl::Status Finish() { return absl::OkStatus(); }
};

// Several sinks as one, called in the order they were added; the first error stops the call.
class SinkFanOut : public RunSink {
 public:
  void Add(RunSink* sink) { sinks_.push_back(sink); }  // not owned
  void Add(std::unique_ptr<RunSink> sink) {
    sinks_.push_back(sink.get());
    owned_.push_back(std::move(sink));
  }
  bool empty() const { return sinks_.empty(); }

  absl::Status WriteMetrics(int step, const MetricRow& row) override;
  absl::Status WriteCheckpoint(const CheckpointData& checkpoint) override;
  absl::Status Finish() override;

 private:
  std::vector<RunSink*> sinks_;
  std::vector<std::unique_ptr<RunSink>> owned_;
};

// <out_dir>/metrics.jsonl, one JSON object per row (trainer/metrics.h).
class JsonlMetricsSink : public RunSink {
 public:
  // resume_step >= 0 drops rows of later steps first (see MetricsLog::Open).
  static absl::StatusOr<std::unique_ptr<JsonlMetricsSink>> Open(const std::string& path,
                                                                int resume_step);
  absl::Status WriteMetrics(int step, const MetricRow& row) override;

 private:
  explicit JsonlMetricsSink(MetricsLog log) : log_(std::move(log)) {}
  MetricsLog log_;
};

// <out_dir>/checkpoints/step_NNNNNNNN.safetensors, written atomically, keeping the newest
// `keep_last` (trainer/checkpoint.h).
class LocalCheckpointSink : public RunSink {
 public:
  LocalCheckpointSink(std::string out_dir, int keep_last)
      : out_dir_(std::move(out_dir)), keep_last_(keep_last) {}
  absl::Status WriteCheckpoint(const CheckpointData& checkpoint) override;

 private:
  std::string out_dir_;
  int keep_last_;
};

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_SINKS_H_
