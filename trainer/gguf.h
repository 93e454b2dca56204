// GGUF files (version 3, llama.cpp's format): "GGUF", version, tensor and key-value counts,
// typed key-value metadata, tensor infos (name, dims with the fastest-varying first, ggml
// type, offset), then the tensor data, each tensor aligned (general.alignment, default 32).
// A writer that lays the file out as llama.cpp's reader expects (offsets contiguous up to
// alignment padding) and a reader that checks all of it.
#ifndef QTRAIN_TRAINER_GGUF_H_
#define QTRAIN_TRAINER_GGUF_H_

#include <cstdint>
#include <map>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"
#include "ops/quant/ggml_blocks.h"

namespace qtrain {

// Value types of GGUF metadata.
enum class GgufType : uint32_t {
  kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7,
  kString = 8, kArray = 9, kU64 = 10, kI64 = 11, kF64 = 12,
};

// A metadata value: a scalar (integers widened to int64/uint64, floats to double) or an array
// of one element type.
struct GgufValue {
  GgufType type = GgufType::kU32;
  GgufType elem = GgufType::kU32;  // arrays only
  std::variant<int64_t, uint64_t, double, bool, std::string> scalar;
  std::vector<std::variant<int64_t, uint64_t, double, bool, std::string>> array;

  static GgufValue String(std::string s);
  static GgufValue U32(uint32_t v);
  static GgufValue I32(int32_t v);
  static GgufValue F32(float v);
  static GgufValue Bool(bool v);
  static GgufValue Strings(const std::vector<std::string>& v);
  static GgufValue I32s(const std::vector<int32_t>& v);
};

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> ne;  // dims, fastest-varying first: a row-major (rows, cols) is {cols, rows}
  uint32_t type = 0;        // ggml type
  uint64_t offset = 0;      // into the data section
  uint64_t nbytes = 0;
};

struct GgufFile {
  uint32_t version = 3;
  std::vector<std::pair<std::string, GgufValue>> kv;  // in file order
  std::vector<GgufTensorInfo> tensors;                // in file order
  std::string data;                                   // the data section
  uint32_t alignment = 32;

  const GgufValue* Find(const std::string& key) const;
  const GgufTensorInfo* FindTensor(const std::string& name) const;
  // Typed getters; errors name the key, the file (`path`) and the type found.
  absl::StatusOr<std::string> GetString(const std::string& key, const std::string& path) const;
  absl::StatusOr<int64_t> GetInt(const std::string& key, const std::string& path) const;
  absl::StatusOr<double> GetFloat(const std::string& key, const std::string& path) const;
  const char* TensorData(const GgufTensorInfo& t) const { return data.data() + t.offset; }
};

class GgufWriter {
 public:
  void Add(const std::string& key, GgufValue value);
  // `bytes` are the tensor's data in ggml's layout for `type` (ops/quant/ggml_blocks.h).
  absl::Status AddTensor(const std::string& name, std::vector<int64_t> ne, ops::GgmlType type,
                         std::string bytes);
  // Writes atomically (trainer/atomic_file.h). Keys and tensor names must be unique.
  absl::Status Write(const std::string& path) const;

 private:
  std::vector<std::pair<std::string, GgufValue>> kv_;
  struct Entry {
    std::string name;
    std::vector<int64_t> ne;
    ops::GgmlType type;
    std::string bytes;
  };
  std::vector<Entry> tensors_;
};

// Reads and checks a whole file: magic, version 2 or 3, counts, every key and value (types,
// string and array lengths within the file), tensor dims and types, row sizes against the
// block size, offsets contiguous and in bounds. Errors name the path and the key or tensor.
absl::StatusOr<GgufFile> ReadGguf(const std::string& path);

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_GGUF_H_
