// JobStore: registered specs on disk and in memory.
#include "distributed/ps/job_store.h"

#include <sys/stat.h>

#include "absl/strings/str_cat.h"
#include "distributed/ps/digest.h"
#include "distributed/ps/storage.h"
#include "nlohmann/json.hpp"
#include "trainer/atomic_file.h"

namespace qtrain::ps {

JobStore::JobStore(std::string jobs_dir) : jobs_dir_(std::move(jobs_dir)) {
  absl::MutexLock lock(&mu_);
  for (const std::string& job : ListDir(jobs_dir_)) {
    const std::string dir = absl::StrCat(jobs_dir_, "/", job);
    absl::StatusOr<std::string> record = ReadFile(dir + "/job.json");
    absl::StatusOr<std::string> spec = ReadFile(dir + "/job_spec.textproto");
    if (!record.ok() || !spec.ok()) continue;
    nlohmann::json j = nlohmann::json::parse(*record, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("spec_sha256") ||
        !j["spec_sha256"].is_string()) {
      continue;
    }
    // The record is written after the spec: a spec without a matching record is one whose
    // registration did not finish (or an older one that a replace was overwriting).
    if (j["spec_sha256"].get<std::string>() != Sha256Hex(*spec)) continue;
    specs_[job] = {*spec, j["spec_sha256"].get<std::string>()};
  }
}

absl::StatusOr<bool> JobStore::Register(const std::string& job_id, const std::string& spec_text,
                                        bool replace) {
  const std::string sha = Sha256Hex(spec_text);
  absl::MutexLock lock(&mu_);
  auto it = specs_.find(job_id);
  if (it != specs_.end()) {
    if (it->second.spec_sha256 == sha) return false;
    if (!replace) {
      return absl::AlreadyExistsError(absl::StrCat(
          "job ", job_id, " is registered with another spec (SHA-256 ", it->second.spec_sha256,
          ", this one ", sha, "); pass replace to overwrite it"));
    }
  }
  const std::string dir = absl::StrCat(jobs_dir_, "/", job_id);
  if (absl::Status s = MakeDirs(dir); !s.ok()) return s;
  if (absl::Status s = WriteFileAtomically(dir + "/job_spec.textproto", {spec_text}); !s.ok()) {
    return s;
  }
  const nlohmann::json record = {{"spec_sha256", sha}};
  if (absl::Status s = WriteFileAtomically(dir + "/job.json", {record.dump() + "\n"}); !s.ok()) {
    return s;
  }
  specs_[job_id] = {spec_text, sha};
  return true;
}

std::optional<JobRecord> JobStore::Get(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  auto it = specs_.find(job_id);
  if (it == specs_.end()) return std::nullopt;
  return it->second;
}

std::vector<std::string> JobStore::StoredJobIds() const {
  std::vector<std::string> out;
  for (const std::string& job : ListDir(jobs_dir_)) {
    struct stat st;
    if (CheckName("job", job, 4096).ok() &&
        ::stat(absl::StrCat(jobs_dir_, "/", job).c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
      out.push_back(job);
    }
  }
  return out;
}

bool JobStore::Known(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  return specs_.count(job_id) > 0;
}

}  // namespace qtrain::ps
