// safetensors writer and validating reader (nlohmann::json for the header).
#include "trainer/safetensors.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"

namespace qtrain {
namespace {

constexpr char kChecksumKey[] = "qtrain.checksum";

// 64-bit FNV-1a over 8-byte words (then the tail bytes): catches flipped or zeroed data in a
// file whose structure is intact. Not cryptographic; it guards against accidents.
uint64_t Checksum(const std::vector<absl::string_view>& parts) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (absl::string_view p : parts) {
    size_t i = 0;
    for (; i + 8 <= p.size(); i += 8) {
      uint64_t w;
      std::memcpy(&w, p.data() + i, 8);
      h = (h ^ w) * 0x100000001b3ull;
    }
    for (; i < p.size(); ++i) h = (h ^ static_cast<uint8_t>(p[i])) * 0x100000001b3ull;
  }
  return h;
}

}  // namespace

int DtypeSize(const std::string& d) {
  if (d == "F64" || d == "I64" || d == "U64") return 8;
  if (d == "F32" || d == "I32" || d == "U32") return 4;
  if (d == "F16" || d == "BF16" || d == "I16" || d == "U16") return 2;
  if (d == "U8" || d == "I8" || d == "BOOL" || d == "F8_E4M3" || d == "F8_E5M2") return 1;
  return 0;
}

int64_t Tensor::num_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::Status Tensor::CopyTo(float* out, int64_t n, const std::string& what) const {
  if (dtype != "F32") {
    return absl::FailedPreconditionError(
        absl::StrCat(what, ": expected dtype F32, found ", dtype));
  }
  if (num_elements() != n) {
    return absl::FailedPreconditionError(absl::StrCat(
        what, ": expected ", n, " elements, found ", num_elements(), " (shape [",
        absl::StrJoin(shape, ","), "])"));
  }
  std::memcpy(out, bytes.data(), n * sizeof(float));
  return absl::OkStatus();
}

absl::StatusOr<const Tensor*> SafeTensors::Get(const std::string& name,
                                               const std::string& file) const {
  auto it = tensors.find(name);
  if (it == tensors.end()) {
    return absl::NotFoundError(absl::StrCat(file, ": no tensor named '", name, "'"));
  }
  return &it->second;
}

absl::StatusOr<std::string> SafeTensors::Meta(const std::string& key,
                                              const std::string& file) const {
  auto it = metadata.find(key);
  if (it == metadata.end()) {
    return absl::NotFoundError(absl::StrCat(file, ": no metadata key '", key, "'"));
  }
  return it->second;
}

absl::Status WriteSafeTensors(const std::string& path, const std::vector<TensorView>& tensors,
                              const std::map<std::string, std::string>& metadata,
                              const WriteProgressHook& hook) {
  std::vector<absl::string_view> data;
  for (const TensorView& t : tensors) data.emplace_back(static_cast<const char*>(t.data), t.nbytes);
  std::map<std::string, std::string> meta = metadata;
  meta[kChecksumKey] = absl::StrCat(absl::Hex(Checksum(data), absl::kZeroPad16));
  nlohmann::json header = nlohmann::json::object();
  header["__metadata__"] = meta;
  size_t offset = 0;
  std::set<std::string> names;
  for (const TensorView& t : tensors) {
    const int es = DtypeSize(t.dtype);
    if (es == 0) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", t.name,
                                                     "' has unknown dtype '", t.dtype, "'"));
    }
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    if (static_cast<size_t>(n) * es != t.nbytes) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", t.name, "' shape [",
                                                     absl::StrJoin(t.shape, ","), "] needs ",
                                                     n * es, " bytes, got ", t.nbytes));
    }
    if (!names.insert(t.name).second || t.name == "__metadata__") {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": duplicate or reserved tensor name '", t.name, "'"));
    }
    header[t.name] = {{"dtype", t.dtype},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + t.nbytes}}};
    offset += t.nbytes;
  }
  std::string json = header.dump();
  // Pad with spaces so the data starts 8-byte aligned (as the reference writer does).
  while ((json.size() + 8) % 8 != 0) json.push_back(' ');
  const uint64_t len = json.size();
  char len_bytes[8];
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  std::vector<absl::string_view> pieces = {absl::string_view(len_bytes, 8), json};
  pieces.insert(pieces.end(), data.begin(), data.end());
  return WriteFileAtomically(path, pieces, hook);
}

absl::StatusOr<SafeTensors> ReadSafeTensors(const std::string& path) {
  absl::StatusOr<std::string> file = ReadFile(path);
  if (!file.ok()) return file.status();
  const std::string& buf = *file;
  auto corrupt = [&](const std::string& why) {
    return absl::DataLossError(absl::StrCat(path, ": not a valid safetensors file: ", why));
  };
  if (buf.size() < 8) return corrupt(absl::StrCat("only ", buf.size(), " bytes"));
  uint64_t len = 0;
  for (int i = 0; i < 8; ++i) len |= static_cast<uint64_t>(static_cast<uint8_t>(buf[i])) << (8 * i);
  if (len > buf.size() - 8) {
    return corrupt(absl::StrCat("header length ", len, " exceeds the file size ", buf.size(),
                                " (truncated?)"));
  }
  nlohmann::json header = nlohmann::json::parse(buf.begin() + 8, buf.begin() + 8 + len, nullptr,
                                                /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object()) return corrupt("header is not a JSON object");
  const size_t data_start = 8 + len;
  const size_t data_size = buf.size() - data_start;
  SafeTensors out;
  std::vector<std::pair<size_t, size_t>> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object()) return corrupt("__metadata__ is not an object");
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string()) return corrupt(absl::StrCat("metadata '", m.key(), "' is not a string"));
        out.metadata[m.key()] = m->get<std::string>();
      }
      continue;
    }
    const nlohmann::json& e = *it;
    const std::string where = absl::StrCat("tensor '", it.key(), "'");
    if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") ||
        !e.contains("data_offsets") || !e["dtype"].is_string() || !e["shape"].is_array() ||
        !e["data_offsets"].is_array() || e["data_offsets"].size() != 2) {
      return corrupt(absl::StrCat(where, " lacks dtype, shape or data_offsets"));
    }
    Tensor t;
    t.dtype = e["dtype"].get<std::string>();
    const int es = DtypeSize(t.dtype);
    if (es == 0) return corrupt(absl::StrCat(where, " has unknown dtype '", t.dtype, "'"));
    for (const auto& d : e["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) {
        return corrupt(absl::StrCat(where, " has a bad shape"));
      }
      t.shape.push_back(d.get<int64_t>());
    }
    if (!e["data_offsets"][0].is_number_unsigned() || !e["data_offsets"][1].is_number_unsigned()) {
      return corrupt(absl::StrCat(where, " has non-integer data_offsets"));
    }
    const size_t begin = e["data_offsets"][0].get<size_t>();
    const size_t end = e["data_offsets"][1].get<size_t>();
    if (begin > end || end > data_size) {
      return corrupt(absl::StrCat(where, " data [", begin, ", ", end, ") lies outside the ",
                                  data_size, " data bytes (truncated?)"));
    }
    if (static_cast<size_t>(t.num_elements()) * es != end - begin) {
      return corrupt(absl::StrCat(where, " shape [", absl::StrJoin(t.shape, ","),
                                  "] disagrees with its ", end - begin, " bytes"));
    }
    t.bytes = buf.substr(data_start + begin, end - begin);
    ranges.emplace_back(begin, end);
    out.tensors[it.key()] = std::move(t);
  }
  std::sort(ranges.begin(), ranges.end());
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].first < ranges[i - 1].second) return corrupt("tensor data ranges overlap");
  }
  // Files written by qtrain carry a checksum of the data in file order; others may not.
  auto sum = out.metadata.find(kChecksumKey);
  if (sum != out.metadata.end()) {
    std::vector<absl::string_view> data;
    for (const auto& r : ranges) data.emplace_back(buf.data() + data_start + r.first, r.second - r.first);
    const std::string got = absl::StrCat(absl::Hex(Checksum(data), absl::kZeroPad16));
    if (got != sum->second) {
      return corrupt(absl::StrCat("data checksum ", got, " does not match the header's ",
                                  sum->second, " (corrupted bytes)"));
    }
    out.metadata.erase(sum);
  }
  return out;
}

absl::StatusOr<std::map<std::string, std::string>> ReadSafeTensorsMetadata(
    const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  auto corrupt = [&](const std::string& why) {
    return absl::DataLossError(absl::StrCat(path, ": not a valid safetensors file: ", why));
  };
  char len_bytes[8];
  if (!in.read(len_bytes, 8)) return corrupt("shorter than 8 bytes");
  uint64_t len = 0;
  for (int i = 0; i < 8; ++i) len |= static_cast<uint64_t>(static_cast<uint8_t>(len_bytes[i])) << (8 * i);
  constexpr uint64_t kMaxHeader = uint64_t{100} << 20;  // safetensors' own limit is 100 MB
  if (len > kMaxHeader) return corrupt(absl::StrCat("header length ", len, " is implausible"));
  std::string json(len, '\0');
  if (!in.read(json.data(), static_cast<std::streamsize>(len))) return corrupt("truncated header");
  nlohmann::json header = nlohmann::json::parse(json, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object()) return corrupt("header is not a JSON object");
  std::map<std::string, std::string> meta;
  auto it = header.find("__metadata__");
  if (it == header.end()) return meta;
  if (!it->is_object()) return corrupt("__metadata__ is not an object");
  for (auto m = it->begin(); m != it->end(); ++m) {
    if (!m->is_string()) return corrupt(absl::StrCat("metadata '", m.key(), "' is not a string"));
    meta[m.key()] = m->get<std::string>();
  }
  meta.erase(kChecksumKey);
  return meta;
}

}  // namespace qtrain
