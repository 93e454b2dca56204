// GGUF writer and reader (layout in gguf.h).
#include "trainer/gguf.h"

#include <cstring>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "ops/status_macros.h"
#include "trainer/atomic_file.h"

namespace qtrain {
namespace {

using Scalar = std::variant<int64_t, uint64_t, double, bool, std::string>;

constexpr uint64_t kMaxStringBytes = 1ull << 30;

// Little-endian appends.
template <typename T>
void Put(std::string* out, T v) {
  out->append(reinterpret_cast<const char*>(&v), sizeof(T));
}
void PutString(std::string* out, const std::string& s) {
  Put<uint64_t>(out, s.size());
  out->append(s);
}

void PutScalar(std::string* out, GgufType t, const Scalar& v) {
  switch (t) {
    case GgufType::kU8: Put<uint8_t>(out, static_cast<uint8_t>(std::get<uint64_t>(v))); break;
    case GgufType::kI8: Put<int8_t>(out, static_cast<int8_t>(std::get<int64_t>(v))); break;
    case GgufType::kU16: Put<uint16_t>(out, static_cast<uint16_t>(std::get<uint64_t>(v))); break;
    case GgufType::kI16: Put<int16_t>(out, static_cast<int16_t>(std::get<int64_t>(v))); break;
    case GgufType::kU32: Put<uint32_t>(out, static_cast<uint32_t>(std::get<uint64_t>(v))); break;
    case GgufType::kI32: Put<int32_t>(out, static_cast<int32_t>(std::get<int64_t>(v))); break;
    case GgufType::kU64: Put<uint64_t>(out, std::get<uint64_t>(v)); break;
    case GgufType::kI64: Put<int64_t>(out, std::get<int64_t>(v)); break;
    case GgufType::kF32: Put<float>(out, static_cast<float>(std::get<double>(v))); break;
    case GgufType::kF64: Put<double>(out, std::get<double>(v)); break;
    case GgufType::kBool: Put<int8_t>(out, std::get<bool>(v) ? 1 : 0); break;
    case GgufType::kString: PutString(out, std::get<std::string>(v)); break;
    case GgufType::kArray: break;  // not a scalar
  }
}

uint64_t Pad(uint64_t n, uint64_t a) { return (n + a - 1) / a * a; }

const char* TypeName(GgufType t) {
  static const char* kNames[] = {"u8",  "i8",     "u16",   "i16", "u32", "i32", "f32",
                                 "bool", "string", "array", "u64", "i64", "f64"};
  const uint32_t i = static_cast<uint32_t>(t);
  return i < 13 ? kNames[i] : "unknown";
}

// Bounds-checked little-endian reads over the whole file.
class Cursor {
 public:
  Cursor(const std::string& b, const std::string& path) : b_(b), path_(path) {}
  template <typename T>
  absl::StatusOr<T> Get(const std::string& what) {
    if (pos_ + sizeof(T) > b_.size()) return Truncated(what);
    T v;
    std::memcpy(&v, b_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  absl::StatusOr<std::string> String(const std::string& what) {
    ASSIGN_OR_RETURN(uint64_t n, Get<uint64_t>(what));
    if (n > kMaxStringBytes || pos_ + n > b_.size()) return Truncated(what);
    std::string s = b_.substr(pos_, n);
    pos_ += n;
    return s;
  }
  absl::Status Truncated(const std::string& what) const {
    return absl::DataLossError(
        absl::StrCat(path_, ": truncated or corrupt at byte ", pos_, " (reading ", what, ")"));
  }
  uint64_t pos() const { return pos_; }
  void set_pos(uint64_t p) { pos_ = p; }

 private:
  const std::string& b_;
  const std::string& path_;
  uint64_t pos_ = 0;
};

absl::StatusOr<Scalar> ReadScalar(Cursor* c, GgufType t, const std::string& what) {
  switch (t) {
    case GgufType::kU8: { ASSIGN_OR_RETURN(uint8_t v, c->Get<uint8_t>(what)); return Scalar(uint64_t{v}); }
    case GgufType::kI8: { ASSIGN_OR_RETURN(int8_t v, c->Get<int8_t>(what)); return Scalar(int64_t{v}); }
    case GgufType::kU16: { ASSIGN_OR_RETURN(uint16_t v, c->Get<uint16_t>(what)); return Scalar(uint64_t{v}); }
    case GgufType::kI16: { ASSIGN_OR_RETURN(int16_t v, c->Get<int16_t>(what)); return Scalar(int64_t{v}); }
    case GgufType::kU32: { ASSIGN_OR_RETURN(uint32_t v, c->Get<uint32_t>(what)); return Scalar(uint64_t{v}); }
    case GgufType::kI32: { ASSIGN_OR_RETURN(int32_t v, c->Get<int32_t>(what)); return Scalar(int64_t{v}); }
    case GgufType::kU64: { ASSIGN_OR_RETURN(uint64_t v, c->Get<uint64_t>(what)); return Scalar(v); }
    case GgufType::kI64: { ASSIGN_OR_RETURN(int64_t v, c->Get<int64_t>(what)); return Scalar(v); }
    case GgufType::kF32: { ASSIGN_OR_RETURN(float v, c->Get<float>(what)); return Scalar(double{v}); }
    case GgufType::kF64: { ASSIGN_OR_RETURN(double v, c->Get<double>(what)); return Scalar(v); }
    case GgufType::kBool: { ASSIGN_OR_RETURN(int8_t v, c->Get<int8_t>(what)); return Scalar(v != 0); }
    case GgufType::kString: { ASSIGN_OR_RETURN(std::string s, c->String(what)); return Scalar(std::move(s)); }
    case GgufType::kArray: break;
  }
  return absl::DataLossError(absl::StrCat(what, ": bad value type ", static_cast<uint32_t>(t)));
}

}  // namespace

GgufValue GgufValue::String(std::string s) {
  GgufValue v;
  v.type = GgufType::kString;
  v.scalar = std::move(s);
  return v;
}
GgufValue GgufValue::U32(uint32_t x) {
  GgufValue v;
  v.type = GgufType::kU32;
  v.scalar = uint64_t{x};
  return v;
}
GgufValue GgufValue::I32(int32_t x) {
  GgufValue v;
  v.type = GgufType::kI32;
  v.scalar = int64_t{x};
  return v;
}
GgufValue GgufValue::F32(float x) {
  GgufValue v;
  v.type = GgufType::kF32;
  v.scalar = double{x};
  return v;
}
GgufValue GgufValue::Bool(bool x) {
  GgufValue v;
  v.type = GgufType::kBool;
  v.scalar = x;
  return v;
}
GgufValue GgufValue::Strings(const std::vector<std::string>& xs) {
  GgufValue v;
  v.type = GgufType::kArray;
  v.elem = GgufType::kString;
  for (const std::string& s : xs) v.array.emplace_back(s);
  return v;
}
GgufValue GgufValue::I32s(const std::vector<int32_t>& xs) {
  GgufValue v;
  v.type = GgufType::kArray;
  v.elem = GgufType::kI32;
  for (int32_t x : xs) v.array.emplace_back(int64_t{x});
  return v;
}

const GgufValue* GgufFile::Find(const std::string& key) const {
  for (const auto& [k, v] : kv)
    if (k == key) return &v;
  return nullptr;
}

const GgufTensorInfo* GgufFile::FindTensor(const std::string& name) const {
  for (const GgufTensorInfo& t : tensors)
    if (t.name == name) return &t;
  return nullptr;
}

absl::StatusOr<std::string> GgufFile::GetString(const std::string& key,
                                                const std::string& path) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat(path, ": no metadata key '", key, "'"));
  if (v->type != GgufType::kString) {
    return absl::DataLossError(absl::StrCat(path, ": metadata '", key, "' is ", TypeName(v->type),
                                            ", expected string"));
  }
  return std::get<std::string>(v->scalar);
}

absl::StatusOr<int64_t> GgufFile::GetInt(const std::string& key, const std::string& path) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat(path, ": no metadata key '", key, "'"));
  if (std::holds_alternative<int64_t>(v->scalar) && v->type != GgufType::kArray) {
    return std::get<int64_t>(v->scalar);
  }
  if (std::holds_alternative<uint64_t>(v->scalar) && v->type != GgufType::kArray) {
    return static_cast<int64_t>(std::get<uint64_t>(v->scalar));
  }
  return absl::DataLossError(absl::StrCat(path, ": metadata '", key, "' is ", TypeName(v->type),
                                          ", expected an integer"));
}

absl::StatusOr<double> GgufFile::GetFloat(const std::string& key, const std::string& path) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return absl::NotFoundError(absl::StrCat(path, ": no metadata key '", key, "'"));
  if (v->type != GgufType::kF32 && v->type != GgufType::kF64) {
    return absl::DataLossError(absl::StrCat(path, ": metadata '", key, "' is ", TypeName(v->type),
                                            ", expected a float"));
  }
  return std::get<double>(v->scalar);
}

void GgufWriter::Add(const std::string& key, GgufValue value) {
  kv_.emplace_back(key, std::move(value));
}

absl::Status GgufWriter::AddTensor(const std::string& name, std::vector<int64_t> ne,
                                   ops::GgmlType type, std::string bytes) {
  QT_CHECK_ARG(!ne.empty() && ne.size() <= 4, "GGUF tensor '", name, "' needs 1 to 4 dims");
  int64_t rows = 1;
  for (size_t i = 1; i < ne.size(); ++i) rows *= ne[i];
  ASSIGN_OR_RETURN(int64_t row_bytes, ops::ggml_row_bytes(type, ne[0]));
  QT_CHECK_ARG(static_cast<int64_t>(bytes.size()) == rows * row_bytes, "GGUF tensor '", name,
               "': ", bytes.size(), " bytes, its shape and type need ", rows * row_bytes);
  tensors_.push_back({name, std::move(ne), type, std::move(bytes)});
  return absl::OkStatus();
}

absl::Status GgufWriter::Write(const std::string& path) const {
  std::set<std::string> seen;
  for (const auto& [k, v] : kv_) {
    QT_CHECK_ARG(seen.insert(k).second, "GGUF metadata key '", k, "' given twice");
  }
  seen.clear();
  for (const Entry& t : tensors_) {
    QT_CHECK_ARG(seen.insert(t.name).second, "GGUF tensor '", t.name, "' given twice");
  }
  constexpr uint64_t kAlign = 32;  // GGUF's default; no general.alignment key needed
  std::string head = "GGUF";
  Put<uint32_t>(&head, 3);
  Put<uint64_t>(&head, tensors_.size());
  Put<uint64_t>(&head, kv_.size());
  for (const auto& [k, v] : kv_) {
    PutString(&head, k);
    Put<uint32_t>(&head, static_cast<uint32_t>(v.type));
    if (v.type == GgufType::kArray) {
      Put<uint32_t>(&head, static_cast<uint32_t>(v.elem));
      Put<uint64_t>(&head, v.array.size());
      for (const Scalar& s : v.array) PutScalar(&head, v.elem, s);
    } else {
      PutScalar(&head, v.type, v.scalar);
    }
  }
  uint64_t offset = 0;
  for (const Entry& t : tensors_) {
    PutString(&head, t.name);
    Put<uint32_t>(&head, static_cast<uint32_t>(t.ne.size()));
    for (int64_t d : t.ne) Put<int64_t>(&head, d);
    Put<uint32_t>(&head, static_cast<uint32_t>(t.type));
    Put<uint64_t>(&head, offset);
    offset = Pad(offset + t.bytes.size(), kAlign);
  }
  head.resize(Pad(head.size(), kAlign), '\0');
  std::vector<std::string> pads;
  pads.reserve(tensors_.size());
  std::vector<absl::string_view> pieces = {head};
  for (const Entry& t : tensors_) {
    pieces.push_back(t.bytes);
    pads.emplace_back(Pad(t.bytes.size(), kAlign) - t.bytes.size(), '\0');
    pieces.push_back(pads.back());
  }
  return WriteFileAtomically(path, pieces);
}

absl::StatusOr<GgufFile> ReadGguf(const std::string& path) {
  ASSIGN_OR_RETURN(std::string bytes, ReadFile(path));
  GgufFile f;
  Cursor c(bytes, path);
  if (bytes.size() < 4 || bytes.compare(0, 4, "GGUF") != 0) {
    return absl::DataLossError(absl::StrCat(path, ": not a GGUF file (no 'GGUF' magic)"));
  }
  c.set_pos(4);
  ASSIGN_OR_RETURN(f.version, c.Get<uint32_t>("version"));
  if (f.version != 2 && f.version != 3) {
    return absl::DataLossError(absl::StrCat(path, ": GGUF version ", f.version, ", expected 2 or 3"));
  }
  ASSIGN_OR_RETURN(uint64_t n_tensors, c.Get<uint64_t>("tensor count"));
  ASSIGN_OR_RETURN(uint64_t n_kv, c.Get<uint64_t>("metadata count"));
  if (n_tensors > bytes.size() || n_kv > bytes.size()) return c.Truncated("the counts");
  std::set<std::string> keys;
  for (uint64_t i = 0; i < n_kv; ++i) {
    ASSIGN_OR_RETURN(std::string key, c.String(absl::StrCat("metadata key ", i)));
    if (!keys.insert(key).second) {
      return absl::DataLossError(absl::StrCat(path, ": metadata key '", key, "' appears twice"));
    }
    const std::string what = absl::StrCat("metadata '", key, "'");
    ASSIGN_OR_RETURN(uint32_t type, c.Get<uint32_t>(what));
    if (type > 12) {
      return absl::DataLossError(absl::StrCat(path, ": ", what, " has value type ", type));
    }
    GgufValue v;
    v.type = static_cast<GgufType>(type);
    if (v.type == GgufType::kArray) {
      ASSIGN_OR_RETURN(uint32_t elem, c.Get<uint32_t>(what));
      if (elem > 12 || elem == static_cast<uint32_t>(GgufType::kArray)) {
        return absl::DataLossError(absl::StrCat(path, ": ", what, " is an array of type ", elem));
      }
      v.elem = static_cast<GgufType>(elem);
      ASSIGN_OR_RETURN(uint64_t n, c.Get<uint64_t>(what));
      if (n > bytes.size() - c.pos()) return c.Truncated(what);
      v.array.reserve(n);
      for (uint64_t j = 0; j < n; ++j) {
        ASSIGN_OR_RETURN(Scalar s, ReadScalar(&c, v.elem, what));
        v.array.push_back(std::move(s));
      }
    } else {
      ASSIGN_OR_RETURN(v.scalar, ReadScalar(&c, v.type, what));
    }
    f.kv.emplace_back(key, std::move(v));
  }
  if (const GgufValue* a = f.Find("general.alignment")) {
    if (a->type != GgufType::kU32 || std::get<uint64_t>(a->scalar) == 0 ||
        (std::get<uint64_t>(a->scalar) & (std::get<uint64_t>(a->scalar) - 1)) != 0) {
      return absl::DataLossError(absl::StrCat(path, ": general.alignment must be a u32 power of 2"));
    }
    f.alignment = static_cast<uint32_t>(std::get<uint64_t>(a->scalar));
  }
  std::set<std::string> names;
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensorInfo t;
    ASSIGN_OR_RETURN(t.name, c.String(absl::StrCat("tensor name ", i)));
    if (!names.insert(t.name).second) {
      return absl::DataLossError(absl::StrCat(path, ": tensor '", t.name, "' appears twice"));
    }
    const std::string what = absl::StrCat("tensor '", t.name, "'");
    ASSIGN_OR_RETURN(uint32_t n_dims, c.Get<uint32_t>(what));
    if (n_dims < 1 || n_dims > 4) {
      return absl::DataLossError(absl::StrCat(path, ": ", what, " has ", n_dims, " dims"));
    }
    int64_t rows = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      ASSIGN_OR_RETURN(int64_t ne, c.Get<int64_t>(what));
      if (ne < 0 || ne > (int64_t{1} << 40)) {
        return absl::DataLossError(absl::StrCat(path, ": ", what, " has dim ", d, " = ", ne));
      }
      t.ne.push_back(ne);
      if (d > 0) rows *= ne;
    }
    ASSIGN_OR_RETURN(t.type, c.Get<uint32_t>(what));
    if (!ops::ggml_type_supported(t.type)) {
      return absl::UnimplementedError(absl::StrCat(
          path, ": ", what, " has ggml type ", t.type,
          "; qtrain reads F32, F16, Q4_0, Q4_1 and Q8_0 tensors"));
    }
    absl::StatusOr<int64_t> row_bytes = ops::ggml_row_bytes(static_cast<ops::GgmlType>(t.type), t.ne[0]);
    if (!row_bytes.ok()) {
      return absl::DataLossError(absl::StrCat(path, ": ", what, ": ", row_bytes.status().message()));
    }
    t.nbytes = static_cast<uint64_t>(rows * *row_bytes);
    ASSIGN_OR_RETURN(t.offset, c.Get<uint64_t>(what));
    f.tensors.push_back(std::move(t));
  }
  const uint64_t data_start = Pad(c.pos(), f.alignment);
  uint64_t expect = 0;
  for (const GgufTensorInfo& t : f.tensors) {
    if (t.offset != expect) {
      return absl::DataLossError(absl::StrCat(path, ": tensor '", t.name, "' at offset ", t.offset,
                                              ", expected ", expect, " (tensors must be contiguous)"));
    }
    expect = Pad(t.offset + t.nbytes, f.alignment);
  }
  const uint64_t last_end =
      f.tensors.empty() ? 0 : f.tensors.back().offset + f.tensors.back().nbytes;
  if (data_start + last_end > bytes.size()) {
    return absl::DataLossError(absl::StrCat(path, ": the tensor data needs ", data_start + last_end,
                                            " bytes, the file has ", bytes.size(), " (truncated)"));
  }
  f.data = bytes.substr(data_start);
  return f;
}

}  // namespace qtrain
