// SinkFanOut and the local sinks (metrics.jsonl, the checkpoint directory).
#include "trainer/sinks.h"

#include <utility>

#include "ops/status_macros.h"

namespace qtrain {

// A sink's error goes on as it is (it names its file or service), as the loop's own writes did.
#define RETURN_FIRST_ERROR(expr)      \
  do {                                \
    absl::Status qt_sink_ = (expr);   \
    if (!qt_sink_.ok()) return qt_sink_; \
  } while (0)

absl::Status SinkFanOut::WriteMetrics(int step, const MetricRow& row) {
  for (RunSink* s : sinks_) RETURN_FIRST_ERROR(s->WriteMetrics(step, row));
  return absl::OkStatus();
}

absl::Status SinkFanOut::WriteCheckpoint(const CheckpointData& checkpoint) {
  for (RunSink* s : sinks_) RETURN_FIRST_ERROR(s->WriteCheckpoint(checkpoint));
  return absl::OkStatus();
}

absl::Status SinkFanOut::Finish() {
  for (RunSink* s : sinks_) RETURN_FIRST_ERROR(s->Finish());
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<JsonlMetricsSink>> JsonlMetricsSink::Open(const std::string& path,
                                                                         int resume_step) {
  ASSIGN_OR_RETURN(MetricsLog log, MetricsLog::Open(path, resume_step));
  return std::unique_ptr<JsonlMetricsSink>(new JsonlMetricsSink(std::move(log)));
}

absl::Status JsonlMetricsSink::WriteMetrics(int step, const MetricRow& row) {
  return log_.Write(step, row);
}

absl::Status LocalCheckpointSink::WriteCheckpoint(const CheckpointData& c) {
  return SaveCheckpoint(out_dir_, c.params, &c.optimizer, c.state, keep_last_);
}

}  // namespace qtrain
