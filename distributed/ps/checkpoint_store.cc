// CheckpointStore: partial files, verification, atomic commit, retention, recovery scan.
#include "distributed/ps/checkpoint_store.h"

#include <unistd.h>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "trainer/atomic_file.h"

namespace qtrain::ps {
namespace {

// Step of "step_00001234.safetensors" (or .json), -1 otherwise.
int64_t StepOf(const std::string& name, const std::string& ext) {
  if (!absl::StartsWith(name, "step_") || !absl::EndsWith(name, ext)) return -1;
  int64_t step = -1;
  const std::string digits = name.substr(5, name.size() - 5 - ext.size());
  if (digits.empty() || !absl::SimpleAtoi(digits, &step) || step < 0) return -1;
  return step;
}

}  // namespace

CheckpointStore::CheckpointStore(std::string jobs_dir, int keep_default)
    : jobs_dir_(std::move(jobs_dir)), keep_default_(keep_default) {
  absl::MutexLock lock(&mu_);
  for (const std::string& job : ListDir(jobs_dir_)) LoadJob(job);
}

std::string CheckpointStore::Dir(const std::string& job_id) const {
  return absl::StrCat(jobs_dir_, "/", job_id, "/checkpoints");
}

std::string CheckpointStore::DataPath(const std::string& job_id, int64_t step) const {
  return absl::StrFormat("%s/step_%08d.safetensors", Dir(job_id), step);
}

std::string CheckpointStore::RecordPath(const std::string& job_id, int64_t step) const {
  return absl::StrFormat("%s/step_%08d.json", Dir(job_id), step);
}

void CheckpointStore::LoadJob(const std::string& job_id) {
  const std::string dir = Dir(job_id);
  RemovePartials(dir);
  std::map<int64_t, CheckpointInfo>& found = jobs_[job_id];
  for (const std::string& name : ListDir(dir)) {
    const int64_t step = StepOf(name, ".json");
    if (step < 0) continue;
    const std::string data = DataPath(job_id, step);
    absl::StatusOr<std::string> text = ReadFile(dir + "/" + name);
    nlohmann::json j = text.ok() ? nlohmann::json::parse(*text, nullptr, false) : nlohmann::json();
    if (::access(data.c_str(), F_OK) != 0 || j.is_discarded() || !j.is_object()) {
      // A record whose rename of the data never happened: the upload did not commit.
      ::unlink((dir + "/" + name).c_str());
      continue;
    }
    CheckpointInfo info;
    info.set_job_id(job_id);
    info.set_step(step);
    try {
      info.set_size(j.value("size", int64_t{0}));
      info.set_sha256(j.value("sha256", std::string()));
      info.set_committed_unix_ms(j.value("committed_unix_ms", int64_t{0}));
    } catch (const nlohmann::json::exception&) {
      continue;  // written by this server, so not expected; skip rather than stop
    }
    found[step] = info;
  }
  if (found.empty()) jobs_.erase(job_id);
}

absl::StatusOr<std::unique_ptr<CheckpointStore::Upload>> CheckpointStore::Begin(
    const UploadCheckpointRequest::Header& header) {
  if (absl::Status s = MakeDirs(Dir(header.job_id())); !s.ok()) return s;
  absl::StatusOr<std::unique_ptr<PartialFile>> file = PartialFile::Create(Dir(header.job_id()));
  if (!file.ok()) return file.status();
  std::unique_ptr<Upload> up(new Upload());
  up->store_ = this;
  up->header_ = header;
  up->file_ = *std::move(file);
  return up;
}

absl::Status CheckpointStore::Upload::Add(const Chunk& chunk) {
  if (chunk.offset() != received_) {
    return absl::InvalidArgumentError(absl::StrCat("chunk at offset ", chunk.offset(),
                                                   ", expected ", received_,
                                                   " (chunks must come in order)"));
  }
  if (received_ + static_cast<int64_t>(chunk.data().size()) > header_.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat("chunk at offset ", chunk.offset(), " of ", chunk.data().size(),
                     " bytes runs past the announced size ", header_.size()));
  }
  if (Crc32c(chunk.data()) != chunk.crc32c()) {
    return absl::DataLossError(absl::StrCat("chunk at offset ", chunk.offset(),
                                            ": CRC32C mismatch (corrupted in transit)"));
  }
  if (absl::Status s = file_->Write(chunk.data()); !s.ok()) return s;
  sha_.Update(chunk.data());
  received_ += static_cast<int64_t>(chunk.data().size());
  return absl::OkStatus();
}

absl::StatusOr<CheckpointInfo> CheckpointStore::Upload::Commit(const std::string& sha256_hex) {
  if (received_ != header_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("the upload ended after ", received_, " of ",
                                                   header_.size(), " bytes"));
  }
  const std::string got = sha_.HexDigest();
  if (got != sha256_hex) {
    return absl::DataLossError(absl::StrCat("SHA-256 mismatch: the client says ", sha256_hex,
                                            ", the bytes received hash to ", got));
  }
  CheckpointStore* store = store_;
  const std::string& job = header_.job_id();
  CheckpointInfo info;
  info.set_job_id(job);
  info.set_step(header_.step());
  info.set_size(received_);
  info.set_sha256(got);
  info.set_committed_unix_ms(absl::ToUnixMillis(absl::Now()));
  nlohmann::json record = {{"step", info.step()},
                           {"size", info.size()},
                           {"sha256", info.sha256()},
                           {"committed_unix_ms", info.committed_unix_ms()}};
  if (absl::Status s = file_->Sync(); !s.ok()) return s;
  // Record first, data second: a crash in between leaves a record without data, which the
  // next start removes; visible data always has its record.
  absl::MutexLock lock(&store->mu_);
  if (absl::Status s =
          WriteFileAtomically(store->RecordPath(job, header_.step()), {record.dump() + "\n"});
      !s.ok()) {
    return s;
  }
  if (absl::Status s = file_->Commit(store->DataPath(job, header_.step())); !s.ok()) return s;
  std::map<int64_t, CheckpointInfo>& mine = store->jobs_[job];
  mine[info.step()] = info;
  const int keep = header_.keep_last() > 0 ? header_.keep_last() : store->keep_default_;
  while (keep > 0 && static_cast<int>(mine.size()) > keep) {
    const int64_t oldest = mine.begin()->first;
    ::unlink(store->DataPath(job, oldest).c_str());
    ::unlink(store->RecordPath(job, oldest).c_str());
    mine.erase(mine.begin());
  }
  return info;
}

std::vector<CheckpointInfo> CheckpointStore::List(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  std::vector<CheckpointInfo> out;
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) return out;
  for (const auto& [step, info] : it->second) out.push_back(info);
  return out;
}

absl::StatusOr<CheckpointInfo> CheckpointStore::Find(const std::string& job_id, int64_t step) {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  if (it == jobs_.end() || it->second.empty()) {
    return absl::NotFoundError(absl::StrCat("job ", job_id, " has no checkpoints"));
  }
  if (step < 0) return it->second.rbegin()->second;
  auto s = it->second.find(step);
  if (s == it->second.end()) {
    return absl::NotFoundError(absl::StrCat("job ", job_id, " has no checkpoint of step ", step,
                                            " (latest: ", it->second.rbegin()->first, ")"));
  }
  return s->second;
}

int CheckpointStore::Count(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(job_id);
  return it == jobs_.end() ? 0 : static_cast<int>(it->second.size());
}

}  // namespace qtrain::ps
