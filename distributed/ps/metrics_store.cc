// MetricsStore: JSONL append with fdatasync, sparse step index, followers.
#include "distributed/ps/metrics_store.h"

#include <cmath>
#include <fstream>
#include <set>

#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "trainer/atomic_file.h"

namespace qtrain::ps {
namespace {

constexpr int64_t kIndexEvery = 256;

}  // namespace

std::string MetricsStore::RowToJson(const MetricRow& row) {
  nlohmann::json j;
  j["step"] = row.step();
  for (const Metric& m : row.metrics()) {
    if (std::isfinite(m.value())) {
      j[m.name()] = m.value();
    } else {
      j[m.name()] = nullptr;
    }
  }
  return j.dump();
}

absl::StatusOr<MetricRow> MetricsStore::RowFromJson(const std::string& line) {
  nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("step") || !j["step"].is_number_integer()) {
    return absl::DataLossError(absl::StrCat("not a metrics row: ", line.substr(0, 80)));
  }
  MetricRow row;
  row.set_step(j["step"].get<int64_t>());
  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "step") continue;
    Metric* m = row.add_metrics();
    m->set_name(it.key());
    m->set_value(it.value().is_number() ? it.value().get<double>() : NAN);
  }
  return row;
}

std::string MetricsStore::PathOf(const std::string& job_id) const {
  return absl::StrCat(jobs_dir_, "/", job_id, "/metrics.jsonl");
}

absl::StatusOr<MetricsStore::JobMetrics*> MetricsStore::Load(const std::string& job_id,
                                                              bool create) {
  auto it = jobs_.find(job_id);
  if (it != jobs_.end() && it->second.file) return &it->second;
  if (!create && ::access(PathOf(job_id).c_str(), F_OK) != 0) {
    return absl::NotFoundError(absl::StrCat("job ", job_id, " has no metrics"));
  }
  if (absl::Status s = MakeDirs(absl::StrCat(jobs_dir_, "/", job_id)); !s.ok()) return s;
  absl::StatusOr<std::unique_ptr<AppendFile>> file = AppendFile::Open(PathOf(job_id), true);
  if (!file.ok()) return file.status();
  JobMetrics& jm = jobs_[job_id];
  jm.file = *std::move(file);
  jm.index.clear();
  jm.rows = 0;
  jm.last_step = -1;
  std::ifstream in(PathOf(job_id), std::ios::binary);
  std::string line;
  int64_t offset = 0;
  while (std::getline(in, line)) {
    absl::StatusOr<MetricRow> row = RowFromJson(line);
    if (row.ok()) {
      if (jm.rows % kIndexEvery == 0) jm.index.push_back({row->step(), offset});
      ++jm.rows;
      jm.last_step = row->step();
    }
    offset += static_cast<int64_t>(line.size()) + 1;
  }
  return &jm;
}

absl::StatusOr<AppendMetricsResponse> MetricsStore::Append(const AppendMetricsRequest& req) {
  std::vector<std::function<void()>> wake;
  AppendMetricsResponse resp;
  {
    absl::MutexLock lock(&mu_);
    absl::StatusOr<JobMetrics*> loaded = Load(req.job_id(), true);
    if (!loaded.ok()) return loaded.status();
    JobMetrics* jm = *loaded;
    // Validate the whole batch before touching the file.
    int64_t prev = -1;
    for (const MetricRow& row : req.rows()) {
      if (row.step() < 0 || row.step() <= prev) {
        return absl::InvalidArgumentError(absl::StrCat(
            "rows: steps must be >= 0 and strictly increasing, got ", row.step(), " after ",
            prev));
      }
      prev = row.step();
      std::set<std::string> names;
      for (const Metric& m : row.metrics()) {
        if (m.name() == "step" || !names.insert(m.name()).second) {
          return absl::InvalidArgumentError(absl::StrCat("rows: metric name '", m.name(),
                                                         "' repeated or reserved in step ",
                                                         row.step()));
        }
      }
    }
    if (req.has_truncate_after() && jm->last_step > req.truncate_after()) {
      std::string kept;
      {
        std::ifstream in(PathOf(req.job_id()), std::ios::binary);
        std::string line;
        while (std::getline(in, line)) {
          absl::StatusOr<MetricRow> row = RowFromJson(line);
          if (row.ok() && row->step() <= req.truncate_after()) kept += line + "\n";
        }
      }
      jm->file.reset();
      if (absl::Status s = WriteFileAtomically(PathOf(req.job_id()), {kept}); !s.ok()) return s;
      absl::StatusOr<JobMetrics*> reloaded = Load(req.job_id(), true);
      if (!reloaded.ok()) return reloaded.status();
      jm = *reloaded;
    }
    std::string text;
    int stored = 0;
    int64_t last = jm->last_step;
    const int64_t base = jm->file->size();
    std::vector<std::pair<int64_t, int64_t>> new_index;
    int64_t rows = jm->rows;
    for (const MetricRow& row : req.rows()) {
      if (row.step() <= last) continue;
      if (rows % kIndexEvery == 0) {
        new_index.push_back({row.step(), base + static_cast<int64_t>(text.size())});
      }
      text += RowToJson(row);
      text += '\n';
      last = row.step();
      ++rows;
      ++stored;
    }
    if (!text.empty()) {
      if (absl::Status s = jm->file->Append(text); !s.ok()) return s;
      jm->last_step = last;
      jm->rows = rows;
      jm->index.insert(jm->index.end(), new_index.begin(), new_index.end());
      for (auto it = jm->watchers.begin(); it != jm->watchers.end();) {
        if (it->second.first < last) {
          wake.push_back(std::move(it->second.second));
          it = jm->watchers.erase(it);
        } else {
          ++it;
        }
      }
    }
    resp.set_last_step(jm->last_step);
    resp.set_rows_stored(stored);
  }
  for (auto& w : wake) w();
  return resp;
}

absl::StatusOr<std::vector<MetricRow>> MetricsStore::Read(const std::string& job_id,
                                                          int64_t after_step, int max_rows) {
  int64_t start = 0;
  int64_t end = 0;
  {
    absl::MutexLock lock(&mu_);
    absl::StatusOr<JobMetrics*> loaded = Load(job_id, false);
    if (absl::IsNotFound(loaded.status())) return std::vector<MetricRow>();
    if (!loaded.ok()) return loaded.status();
    for (const auto& [step, offset] : (*loaded)->index) {
      if (step > after_step) break;
      start = offset;
    }
    end = (*loaded)->file->size();  // only acknowledged rows
  }
  std::vector<MetricRow> rows;
  std::ifstream in(PathOf(job_id), std::ios::binary);
  in.seekg(start);
  std::string line;
  int64_t pos = start;
  while (static_cast<int>(rows.size()) < max_rows && pos < end && std::getline(in, line)) {
    pos += static_cast<int64_t>(line.size()) + 1;
    absl::StatusOr<MetricRow> row = RowFromJson(line);
    if (row.ok() && row->step() > after_step) rows.push_back(*std::move(row));
  }
  return rows;
}

int64_t MetricsStore::LastStep(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  absl::StatusOr<JobMetrics*> loaded = Load(job_id, false);
  return loaded.ok() ? (*loaded)->last_step : -1;
}

uint64_t MetricsStore::Watch(const std::string& job_id, int64_t after_step,
                             std::function<void()> wake) {
  uint64_t handle = 0;
  {
    absl::MutexLock lock(&mu_);
    absl::StatusOr<JobMetrics*> loaded = Load(job_id, false);
    handle = next_handle_++;
    if (!loaded.ok() || (*loaded)->last_step <= after_step) {
      jobs_[job_id].watchers[handle] = {after_step, std::move(wake)};
      return handle;
    }
  }
  wake();
  return handle;
}

void MetricsStore::Unwatch(const std::string& job_id, uint64_t handle) {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  if (it != jobs_.end()) it->second.watchers.erase(handle);
}

void MetricsStore::WakeAll(const std::string& job_id) {
  std::vector<std::function<void()>> wake;
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(job_id);
    if (it == jobs_.end()) return;
    for (auto& [h, w] : it->second.watchers) wake.push_back(std::move(w.second));
    it->second.watchers.clear();
  }
  for (auto& w : wake) w();
}

}  // namespace qtrain::ps
