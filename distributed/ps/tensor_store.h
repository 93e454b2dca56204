// TensorStore: the parameter store. Named tensor sets with versions 1, 2, ...: each version a
// safetensors file <storage>/tensors/<name>/v_NNNNNNNNNN.safetensors (its header holds the
// tensors and the metadata, so Python opens it as is) beside a small .json record, committed
// like checkpoints (partial file, fsync, atomic rename). The newest keep_versions versions of
// each set are kept. Pushes stream in, pulls stream out, and in-process callers (the federated
// server module) use Put/Get directly.
#ifndef QTRAIN_DISTRIBUTED_PS_TENSOR_STORE_H_
#define QTRAIN_DISTRIBUTED_PS_TENSOR_STORE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "distributed/proto/param_service.pb.h"
#include "distributed/ps/dtype.h"
#include "distributed/ps/storage.h"

namespace qtrain::ps {

struct TensorStoreLimits {
  int64_t max_set_bytes = int64_t{64} << 30;
  int max_tensors = 100000;
  int max_sets = 100000;
  int max_name_bytes = 256;
  int max_metadata_entries = 1024;
  int max_metadata_value_bytes = 64 << 10;
};

// One tensor of a set read back whole.
struct StoredTensor {
  TensorSpec spec;
  std::string bytes;
};

struct StoredTensorSet {
  TensorSetInfo info;
  std::vector<StoredTensor> tensors;  // in the set's order
};

class TensorStore {
 public:
  TensorStore(std::string dir, int keep_versions, TensorStoreLimits limits);

  // Writes one new version. Data comes in header order, contiguous; Commit assigns the
  // version (the latest + 1), checking expected_version at that moment.
  class Writer {
   public:
    absl::Status Add(const TensorData& data);
    absl::StatusOr<int64_t> Commit();
    // True when the header's idempotency key matches a stored version: data is ignored and
    // Commit returns that version.
    bool duplicate() const { return duplicate_version_ > 0; }

   private:
    friend class TensorStore;
    Writer() = default;
    TensorStore* store_ = nullptr;
    PushTensorsRequest::Header header_;
    std::vector<int64_t> sizes_;  // bytes per tensor
    std::unique_ptr<PartialFile> file_;
    int64_t data_bytes_ = 0;
    size_t tensor_ = 0;  // the tensor being received
    int64_t offset_ = 0;  // within it
    int64_t duplicate_version_ = 0;
  };

  // Checks names, dtypes, shapes, sizes and metadata against the limits (InvalidArgument or
  // ResourceExhausted naming the field), then opens the partial file.
  absl::StatusOr<std::unique_ptr<Writer>> Begin(const PushTensorsRequest::Header& header);

  // In-process push of whole tensors.
  absl::StatusOr<int64_t> Put(const PushTensorsRequest::Header& header,
                              const std::vector<absl::string_view>& data);

  // version 0: the latest. NotFound naming the set (and version).
  absl::StatusOr<TensorSetInfo> Info(const std::string& name, int64_t version);
  // The whole set in memory.
  absl::StatusOr<StoredTensorSet> Get(const std::string& name, int64_t version);
  // Path of a version's file and the byte offset of its data section (for streaming pulls).
  absl::StatusOr<std::pair<std::string, int64_t>> DataFile(const std::string& name,
                                                           int64_t version);
  std::vector<TensorSetInfo> List();  // latest of each, without tensors
  int64_t Latest(const std::string& name);  // 0: none

 private:
  struct Version {
    TensorSetInfo info;
    int64_t data_offset = 0;
    std::string idempotency_key;
  };
  std::string SetDir(const std::string& name) const;
  std::string DataPath(const std::string& name, int64_t version) const;
  std::string RecordPath(const std::string& name, int64_t version) const;
  absl::StatusOr<Version> ReadVersion(const std::string& name, int64_t version);
  void LoadSet(const std::string& name) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::string dir_;
  const int keep_versions_;
  const TensorStoreLimits limits_;
  absl::Mutex mu_;
  std::map<std::string, std::map<int64_t, Version>> sets_ ABSL_GUARDED_BY(mu_);
};

}  // namespace qtrain::ps

#endif  // QTRAIN_DISTRIBUTED_PS_TENSOR_STORE_H_
