// Machine-readable metrics: one JSON object per line in <out_dir>/metrics.jsonl, flushed per
// line so a crash loses nothing already logged (tools/plot_metrics.py draws it).
#ifndef QTRAIN_TRAINER_METRICS_H_
#define QTRAIN_TRAINER_METRICS_H_

#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace qtrain {

using MetricRow = std::vector<std::pair<std::string, double>>;

class MetricsLog {
 public:
  // Opens for appending. With resume_step >= 0, rows of later steps (written after that
  // checkpoint by a run that then died) are dropped first, so the log matches the resumed run.
  static absl::StatusOr<MetricsLog> Open(const std::string& path, int resume_step = -1);
  MetricsLog(MetricsLog&& other) noexcept;
  MetricsLog& operator=(MetricsLog&&) = delete;
  ~MetricsLog();

  absl::Status Write(int step, const MetricRow& row);

 private:
  MetricsLog(FILE* f, std::string path) : file_(f), path_(std::move(path)) {}
  FILE* file_ = nullptr;
  std::string path_;
};

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_METRICS_H_
