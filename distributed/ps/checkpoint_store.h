// CheckpointStore: each job's checkpoints under <storage>/jobs/<job>/checkpoints/, named as the
// trainer names them (step_NNNNNNNN.safetensors) so a download resumes as it is. An upload goes
// to .partial/, each chunk checked (offset, CRC32C), the whole file's SHA-256 checked at the
// end; only then is it fsynced and renamed into place (its .json record first), so a
// checkpoint is visible only when complete and survives a crash of the server.
#ifndef QTRAIN_DISTRIBUTED_PS_CHECKPOINT_STORE_H_
#define QTRAIN_DISTRIBUTED_PS_CHECKPOINT_STORE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "distributed/proto/param_service.pb.h"
#include "distributed/ps/digest.h"
#include "distributed/ps/storage.h"

namespace qtrain::ps {

class CheckpointStore {
 public:
  // Scans <jobs_dir>/*/checkpoints, removing partial uploads and records without data.
  CheckpointStore(std::string jobs_dir, int keep_default);

  // One upload in progress. Destroyed before Commit, it leaves nothing behind.
  class Upload {
   public:
    // Chunks come in order: offset == bytes received so far.
    absl::Status Add(const Chunk& chunk);
    // Checks size and SHA-256, then makes the checkpoint visible.
    absl::StatusOr<CheckpointInfo> Commit(const std::string& sha256_hex);
    int64_t received() const { return received_; }

   private:
    friend class CheckpointStore;
    Upload() = default;
    CheckpointStore* store_ = nullptr;
    UploadCheckpointRequest::Header header_;
    std::unique_ptr<PartialFile> file_;
    Sha256 sha_;
    int64_t received_ = 0;
  };

  // `header` is validated by the caller for names and limits.
  absl::StatusOr<std::unique_ptr<Upload>> Begin(const UploadCheckpointRequest::Header& header);

  std::vector<CheckpointInfo> List(const std::string& job_id);
  // step -1: the latest. NotFound naming the job.
  absl::StatusOr<CheckpointInfo> Find(const std::string& job_id, int64_t step);
  std::string DataPath(const std::string& job_id, int64_t step) const;
  int Count(const std::string& job_id);

 private:
  std::string Dir(const std::string& job_id) const;
  std::string RecordPath(const std::string& job_id, int64_t step) const;
  void LoadJob(const std::string& job_id) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string jobs_dir_;
  const int keep_default_;
  absl::Mutex mu_;
  std::map<std::string, std::map<int64_t, CheckpointInfo>> jobs_ ABSL_GUARDED_BY(mu_);
};

}  // namespace qtrain::ps

#endif  // QTRAIN_DISTRIBUTED_PS_CHECKPOINT_STORE_H_
