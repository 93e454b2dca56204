// safetensors files (8-byte little-endian header length, JSON header, raw little-endian
// data), the format of checkpoints and exports, so Python users open them directly.
#ifndef QTRAIN_TRAINER_SAFETENSORS_H_
#define QTRAIN_TRAINER_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "trainer/atomic_file.h"

namespace qtrain {

// A tensor to write: a view of caller-owned bytes.
struct TensorView {
  std::string name;
  std::string dtype;  // "F32", "F64", "I32", "U8", "U16", "I8", "BF16", "F16"
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t nbytes = 0;
};

// A tensor read back: owns its bytes.
struct Tensor {
  std::string dtype;
  std::vector<int64_t> shape;
  std::string bytes;
  int64_t num_elements() const;
  // Copies out as floats; FailedPrecondition unless dtype is F32 and the count matches.
  absl::Status CopyTo(float* out, int64_t n, const std::string& what) const;
};

struct SafeTensors {
  std::map<std::string, Tensor> tensors;
  std::map<std::string, std::string> metadata;
  // NotFound naming the tensor (and `file` for context) when absent.
  absl::StatusOr<const Tensor*> Get(const std::string& name, const std::string& file) const;
  absl::StatusOr<std::string> Meta(const std::string& key, const std::string& file) const;
};

// Bytes per element of a dtype name; 0 for an unknown name.
int DtypeSize(const std::string& dtype);

// Writes atomically (trainer/atomic_file.h). Tensor names must be unique.
absl::Status WriteSafeTensors(const std::string& path, const std::vector<TensorView>& tensors,
                              const std::map<std::string, std::string>& metadata,
                              const WriteProgressHook& hook = nullptr);

// Reads and checks the whole file: header length within the file, valid JSON, known dtypes,
// shapes that agree with byte ranges, ranges in bounds and non-overlapping. Every error names
// the path.
absl::StatusOr<SafeTensors> ReadSafeTensors(const std::string& path);

// Only the "__metadata__" of a file's header (the tensor data is not read, nor checked): cheap
// enough to look at every checkpoint of a directory. DataLoss names the path when the header is
// not readable.
absl::StatusOr<std::map<std::string, std::string>> ReadSafeTensorsMetadata(const std::string& path);

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_SAFETENSORS_H_
