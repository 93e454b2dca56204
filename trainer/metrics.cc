// MetricsLog: JSON lines via nlohmann::json (non-finite values become null).
#include "trainer/metrics.h"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "ops/status_macros.h"
#include "trainer/atomic_file.h"

namespace qtrain {

absl::StatusOr<MetricsLog> MetricsLog::Open(const std::string& path, int resume_step) {
  if (resume_step >= 0) {
    std::ifstream in(path);
    if (in) {
      std::string line, kept;
      while (std::getline(in, line)) {
        nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
        if (j.is_discarded() || !j.contains("step") || !j["step"].is_number()) continue;
        if (j["step"].get<double>() <= resume_step) kept += line + "\n";
      }
      RETURN_IF_ERROR(WriteFileAtomically(path, {kept}));
    }
  }
  FILE* f = std::fopen(path.c_str(), "a");
  if (f == nullptr) {
    return absl::InternalError(
        absl::StrCat("cannot open metrics log ", path, ": ", std::strerror(errno)));
  }
  return MetricsLog(f, path);
}

MetricsLog::MetricsLog(MetricsLog&& other) noexcept
    : file_(other.file_), path_(std::move(other.path_)) {
  other.file_ = nullptr;
}

MetricsLog::~MetricsLog() {
  if (file_ != nullptr) std::fclose(file_);
}

absl::Status MetricsLog::Write(int step, const MetricRow& row) {
  nlohmann::json j;
  j["step"] = step;
  for (const auto& [key, value] : row) {
    if (std::isfinite(value)) {
      j[key] = value;
    } else {
      j[key] = nullptr;
    }
  }
  const std::string line = j.dump() + "\n";
  if (std::fwrite(line.data(), 1, line.size(), file_) != line.size() || std::fflush(file_) != 0) {
    return absl::InternalError(absl::StrCat("cannot write metrics log ", path_, ": ",
                                            std::strerror(errno)));
  }
  return absl::OkStatus();
}

}  // namespace qtrain
