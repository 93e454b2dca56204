// TensorStore: safetensors files written as the data streams in, versioned commits, recovery.
#include "distributed/ps/tensor_store.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "distributed/ps/digest.h"
#include "nlohmann/json.hpp"
#include "trainer/atomic_file.h"

namespace qtrain::ps {
namespace {

using Json = nlohmann::json;

std::string Dump(const Json& j) { return j.dump(-1, ' ', false, Json::error_handler_t::replace); }

int64_t VersionOf(const std::string& file) {
  if (!absl::StartsWith(file, "v_") || !absl::EndsWith(file, ".json")) return -1;
  int64_t v = -1;
  if (!absl::SimpleAtoi(file.substr(2, file.size() - 2 - 5), &v) || v < 1) return -1;
  return v;
}

absl::Status CheckText(absl::string_view what, absl::string_view s, size_t max) {
  if (s.size() > max) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": ", s.size(), " bytes, more than the limit of ", max));
  }
  for (unsigned char c : s) {
    if (c < 0x20 || c == 0x7f) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": holds a control character"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

TensorStore::TensorStore(std::string dir, int keep_versions, TensorStoreLimits limits)
    : dir_(std::move(dir)), keep_versions_(keep_versions), limits_(limits) {
  absl::MutexLock lock(&mu_);
  for (const std::string& name : ListDir(dir_)) {
    if (CheckName("set", name, 1 << 20).ok()) LoadSet(name);
  }
}

std::string TensorStore::SetDir(const std::string& name) const {
  return absl::StrCat(dir_, "/", name);
}
std::string TensorStore::DataPath(const std::string& name, int64_t version) const {
  return absl::StrFormat("%s/v_%010d.safetensors", SetDir(name), version);
}
std::string TensorStore::RecordPath(const std::string& name, int64_t version) const {
  return absl::StrFormat("%s/v_%010d.json", SetDir(name), version);
}

absl::StatusOr<TensorStore::Version> TensorStore::ReadVersion(const std::string& name,
                                                              int64_t version) {
  const std::string data = DataPath(name, version);
  absl::StatusOr<std::string> record_text = ReadFile(RecordPath(name, version));
  if (!record_text.ok()) return record_text.status();
  Json record = Json::parse(*record_text, nullptr, false);
  if (record.is_discarded() || !record.is_object()) {
    return absl::DataLossError(absl::StrCat(RecordPath(name, version), ": not JSON"));
  }
  const int fd = ::open(data.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat("no data file ", data));
  uint64_t header_len = 0;
  std::string header;
  bool ok = ::pread(fd, &header_len, 8, 0) == 8 && header_len < (uint64_t{1} << 31);
  if (ok) {
    header.resize(header_len);
    ok = ::pread(fd, header.data(), header_len, 8) == static_cast<ssize_t>(header_len);
  }
  ::close(fd);
  if (!ok) return absl::DataLossError(absl::StrCat(data, ": truncated header"));
  Json h = Json::parse(header, nullptr, false);
  if (h.is_discarded() || !h.is_object() || !record.contains("tensor_order") ||
      !record["tensor_order"].is_array()) {
    return absl::DataLossError(absl::StrCat(data, ": bad safetensors header or record"));
  }
  Version v;
  v.data_offset = 8 + static_cast<int64_t>(header_len);
  v.idempotency_key = record.value("idempotency_key", std::string());
  v.info.set_name(name);
  v.info.set_version(version);
  v.info.set_committed_unix_ms(record.value("committed_unix_ms", int64_t{0}));
  int64_t bytes = 0;
  for (const Json& tname : record["tensor_order"]) {
    if (!tname.is_string() || !h.contains(tname.get<std::string>())) {
      return absl::DataLossError(absl::StrCat(data, ": tensor order names a missing tensor"));
    }
    const Json& t = h[tname.get<std::string>()];
    TensorSpec* spec = v.info.add_tensors();
    spec->set_name(tname.get<std::string>());
    spec->set_dtype(t.value("dtype", std::string()));
    for (const Json& d : t["shape"]) spec->add_shape(d.get<int64_t>());
    bytes += t["data_offsets"][1].get<int64_t>() - t["data_offsets"][0].get<int64_t>();
  }
  if (h.contains("__metadata__")) {
    for (auto it = h["__metadata__"].begin(); it != h["__metadata__"].end(); ++it) {
      if (it.value().is_string()) (*v.info.mutable_metadata())[it.key()] = it.value();
    }
  }
  v.info.set_data_bytes(bytes);
  return v;
}

void TensorStore::LoadSet(const std::string& name) {
  RemovePartials(SetDir(name));
  std::map<int64_t, Version>& versions = sets_[name];
  for (const std::string& file : ListDir(SetDir(name))) {
    const int64_t v = VersionOf(file);
    if (v < 0) continue;
    absl::StatusOr<Version> read = absl::DataLossError("unreadable");
    try {
      read = ReadVersion(name, v);
    } catch (const nlohmann::json::exception&) {
    }
    if (!read.ok()) {
      // The record of a version whose data rename never happened.
      ::unlink(RecordPath(name, v).c_str());
      continue;
    }
    versions[v] = *std::move(read);
  }
  if (versions.empty()) sets_.erase(name);
}

absl::StatusOr<std::unique_ptr<TensorStore::Writer>> TensorStore::Begin(
    const PushTensorsRequest::Header& h) {
  if (absl::Status s = CheckName("name", h.name(), limits_.max_name_bytes); !s.ok()) return s;
  if (h.tensors_size() == 0) return absl::InvalidArgumentError("tensors: a set needs a tensor");
  if (h.tensors_size() > limits_.max_tensors) {
    return absl::ResourceExhaustedError(absl::StrCat("tensors: ", h.tensors_size(),
                                                     " tensors, the limit is ",
                                                     limits_.max_tensors));
  }
  if (h.metadata_size() > limits_.max_metadata_entries) {
    return absl::ResourceExhaustedError(absl::StrCat("metadata: ", h.metadata_size(),
                                                     " entries, the limit is ",
                                                     limits_.max_metadata_entries));
  }
  for (const auto& [k, v] : h.metadata()) {
    if (absl::Status s = CheckText("metadata key", k, limits_.max_name_bytes); !s.ok()) return s;
    if (k.empty()) return absl::InvalidArgumentError("metadata: empty key");
    if (v.size() > static_cast<size_t>(limits_.max_metadata_value_bytes)) {
      return absl::InvalidArgumentError(absl::StrCat("metadata '", k, "': ", v.size(),
                                                     " bytes, the limit is ",
                                                     limits_.max_metadata_value_bytes));
    }
  }
  if (h.has_expected_version() && h.expected_version() < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("expected_version: must be >= 0, got ", h.expected_version()));
  }
  if (h.idempotency_key().size() > 128) {
    return absl::InvalidArgumentError("idempotency_key: more than 128 bytes");
  }
  std::unique_ptr<Writer> w(new Writer());
  w->store_ = this;
  w->header_ = h;
  Json header = Json::object();
  std::set<std::string> names;
  int64_t total = 0;
  for (const TensorSpec& t : h.tensors()) {
    if (t.name().empty() || t.name().rfind("__", 0) == 0) {
      return absl::InvalidArgumentError(absl::StrCat("tensor name '", t.name(),
                                                     "': empty or reserved (starts with __)"));
    }
    if (absl::Status s = CheckText("tensor name", t.name(), limits_.max_name_bytes); !s.ok()) {
      return s;
    }
    if (!names.insert(t.name()).second) {
      return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name(), "' appears twice"));
    }
    const int dsize = TensorDtypeBytes(t.dtype());
    if (dsize == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", t.name(), "': unknown dtype '", t.dtype().substr(0, 32), "'"));
    }
    if (t.shape_size() > 8) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", t.name(), "': ", t.shape_size(), " dimensions (at most 8)"));
    }
    int64_t bytes = dsize;
    for (int64_t d : t.shape()) {
      if (d < 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("tensor '", t.name(), "': negative dimension ", d));
      }
      if (d != 0 && bytes > limits_.max_set_bytes / d) {
        bytes = limits_.max_set_bytes + 1;  // overflow-safe: beyond the limit
        break;
      }
      bytes *= d;
    }
    if (bytes > limits_.max_set_bytes - total) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "the set holds more than the limit of ", limits_.max_set_bytes, " bytes"));
    }
    Json jt = {{"dtype", t.dtype()},
               {"shape", Json(std::vector<int64_t>(t.shape().begin(), t.shape().end()))},
               {"data_offsets", {total, total + bytes}}};
    header[t.name()] = jt;
    w->sizes_.push_back(bytes);
    total += bytes;
  }
  Json meta = Json::object();
  for (const auto& [k, v] : h.metadata()) meta[k] = v;
  header["__metadata__"] = meta;
  w->data_bytes_ = total;
  {
    absl::MutexLock lock(&mu_);
    auto it = sets_.find(h.name());
    if (it == sets_.end() && static_cast<int>(sets_.size()) >= limits_.max_sets) {
      return absl::ResourceExhaustedError(
          absl::StrCat("the store holds its limit of ", limits_.max_sets, " tensor sets"));
    }
    if (it != sets_.end() && !h.idempotency_key().empty()) {
      for (const auto& [v, ver] : it->second) {
        if (ver.idempotency_key == h.idempotency_key()) w->duplicate_version_ = v;
      }
    }
  }
  if (w->duplicate()) return w;
  if (absl::Status s = MakeDirs(SetDir(h.name())); !s.ok()) return s;
  absl::StatusOr<std::unique_ptr<PartialFile>> file = PartialFile::Create(SetDir(h.name()));
  if (!file.ok()) return file.status();
  w->file_ = *std::move(file);
  std::string text = Dump(header);
  text.append((8 - text.size() % 8) % 8, ' ');
  const uint64_t len = text.size();
  char len_bytes[8];
  std::memcpy(len_bytes, &len, 8);
  if (absl::Status s = w->file_->Write(len_bytes, 8); !s.ok()) return s;
  if (absl::Status s = w->file_->Write(text); !s.ok()) return s;
  while (w->tensor_ < w->sizes_.size() && w->sizes_[w->tensor_] == 0) ++w->tensor_;
  return w;
}

absl::Status TensorStore::Writer::Add(const TensorData& d) {
  if (duplicate()) return absl::OkStatus();
  if (tensor_ >= sizes_.size()) {
    return absl::InvalidArgumentError("data after the last tensor's bytes");
  }
  if (d.tensor() != static_cast<int>(tensor_) || d.offset() != offset_) {
    return absl::InvalidArgumentError(absl::StrCat("data for tensor ", d.tensor(), " at offset ",
                                                   d.offset(), ", expected tensor ", tensor_,
                                                   " at offset ", offset_));
  }
  if (d.data().empty() || offset_ + static_cast<int64_t>(d.data().size()) > sizes_[tensor_]) {
    return absl::InvalidArgumentError(
        absl::StrCat("data for tensor ", tensor_, ": ", d.data().size(), " bytes at offset ",
                     offset_, " do not fit its ", sizes_[tensor_], " bytes"));
  }
  if (Crc32c(d.data()) != d.crc32c()) {
    return absl::DataLossError(absl::StrCat("tensor ", tensor_, " at offset ", offset_,
                                            ": CRC32C mismatch"));
  }
  if (absl::Status s = file_->Write(d.data()); !s.ok()) return s;
  offset_ += static_cast<int64_t>(d.data().size());
  if (offset_ == sizes_[tensor_]) {
    offset_ = 0;
    ++tensor_;
    while (tensor_ < sizes_.size() && sizes_[tensor_] == 0) ++tensor_;
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> TensorStore::Writer::Commit() {
  if (duplicate()) return duplicate_version_;
  if (tensor_ < sizes_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("the push ended inside tensor ", tensor_,
                                                   " ('", header_.tensors(tensor_).name(),
                                                   "') of ", sizes_.size()));
  }
  if (absl::Status s = file_->Sync(); !s.ok()) return s;
  TensorStore* store = store_;
  const std::string& name = header_.name();
  absl::MutexLock lock(&store->mu_);
  std::map<int64_t, Version>& versions = store->sets_[name];
  const int64_t latest = versions.empty() ? 0 : versions.rbegin()->first;
  if (header_.has_expected_version() && header_.expected_version() != latest) {
    if (versions.empty()) store->sets_.erase(name);
    return absl::AbortedError(absl::StrCat("tensor set ", name, " is at version ", latest,
                                           ", the push expected ",
                                           header_.expected_version()));
  }
  const int64_t version = latest + 1;
  Version v;
  v.info.set_name(name);
  v.info.set_version(version);
  *v.info.mutable_tensors() = header_.tensors();
  *v.info.mutable_metadata() = header_.metadata();
  v.info.set_data_bytes(data_bytes_);
  v.info.set_committed_unix_ms(absl::ToUnixMillis(absl::Now()));
  v.data_offset = file_->size() - data_bytes_;
  v.idempotency_key = header_.idempotency_key();
  // The tensors' order lives in the record: the safetensors header is a JSON object (no order)
  // and must hold nothing but tensors and __metadata__ for other readers.
  Json order = Json::array();
  for (const TensorSpec& t : header_.tensors()) order.push_back(t.name());
  const Json record = {{"version", version},
                       {"committed_unix_ms", v.info.committed_unix_ms()},
                       {"idempotency_key", v.idempotency_key},
                       {"data_bytes", data_bytes_},
                       {"tensor_order", order}};
  if (absl::Status s = WriteFileAtomically(store->RecordPath(name, version), {Dump(record) + "\n"});
      !s.ok()) {
    if (versions.empty()) store->sets_.erase(name);
    return s;
  }
  if (absl::Status s = file_->Commit(store->DataPath(name, version)); !s.ok()) {
    ::unlink(store->RecordPath(name, version).c_str());
    if (versions.empty()) store->sets_.erase(name);
    return s;
  }
  versions[version] = std::move(v);
  while (static_cast<int>(versions.size()) > store->keep_versions_) {
    const int64_t oldest = versions.begin()->first;
    ::unlink(store->DataPath(name, oldest).c_str());
    ::unlink(store->RecordPath(name, oldest).c_str());
    versions.erase(versions.begin());
  }
  return version;
}

absl::StatusOr<int64_t> TensorStore::Put(const PushTensorsRequest::Header& header,
                                         const std::vector<absl::string_view>& data) {
  if (static_cast<int>(data.size()) != header.tensors_size()) {
    return absl::InvalidArgumentError(absl::StrCat("Put: ", data.size(), " buffers for ",
                                                   header.tensors_size(), " tensors"));
  }
  absl::StatusOr<std::unique_ptr<Writer>> w = Begin(header);
  if (!w.ok()) return w.status();
  for (size_t i = 0; i < data.size(); ++i) {
    if (static_cast<int64_t>(data[i].size()) != (*w)->sizes_[i]) {
      return absl::InvalidArgumentError(absl::StrCat("Put: tensor '", header.tensors(i).name(),
                                                     "' has ", data[i].size(), " bytes, its shape needs ",
                                                     (*w)->sizes_[i]));
    }
    if (data[i].empty() || (*w)->duplicate()) continue;
    TensorData d;
    d.set_tensor(static_cast<int>(i));
    d.set_offset(0);
    d.set_data(std::string(data[i]));
    d.set_crc32c(Crc32c(d.data()));
    if (absl::Status s = (*w)->Add(d); !s.ok()) return s;
  }
  return (*w)->Commit();
}

absl::StatusOr<TensorSetInfo> TensorStore::Info(const std::string& name, int64_t version) {
  absl::MutexLock lock(&mu_);
  auto it = sets_.find(name);
  if (it == sets_.end() || it->second.empty()) {
    return absl::NotFoundError(absl::StrCat("no tensor set '", name, "'"));
  }
  if (version == 0) return it->second.rbegin()->second.info;
  auto v = it->second.find(version);
  if (v == it->second.end()) {
    return absl::NotFoundError(absl::StrCat("tensor set '", name, "' has no version ", version,
                                            " (kept: ", it->second.begin()->first, "..",
                                            it->second.rbegin()->first, ")"));
  }
  return v->second.info;
}

absl::StatusOr<std::pair<std::string, int64_t>> TensorStore::DataFile(const std::string& name,
                                                                      int64_t version) {
  absl::MutexLock lock(&mu_);
  auto it = sets_.find(name);
  if (it == sets_.end() || it->second.empty()) {
    return absl::NotFoundError(absl::StrCat("no tensor set '", name, "'"));
  }
  auto v = version == 0 ? std::prev(it->second.end()) : it->second.find(version);
  if (v == it->second.end()) {
    return absl::NotFoundError(absl::StrCat("tensor set '", name, "' has no version ", version));
  }
  return std::make_pair(DataPath(name, v->first), v->second.data_offset);
}

absl::StatusOr<StoredTensorSet> TensorStore::Get(const std::string& name, int64_t version) {
  absl::StatusOr<TensorSetInfo> info = Info(name, version);
  if (!info.ok()) return info.status();
  absl::StatusOr<std::pair<std::string, int64_t>> file = DataFile(name, info->version());
  if (!file.ok()) return file.status();
  // Opened before anything else can delete it: the open file stays readable.
  const int fd = ::open(file->first.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat("cannot open ", file->first));
  StoredTensorSet out;
  out.info = *info;
  int64_t offset = file->second;
  for (const TensorSpec& t : info->tensors()) {
    int64_t bytes = TensorDtypeBytes(t.dtype());
    for (int64_t d : t.shape()) bytes *= d;
    StoredTensor st;
    st.spec = t;
    st.bytes.resize(bytes);
    if (bytes > 0 && ::pread(fd, st.bytes.data(), bytes, offset) != bytes) {
      ::close(fd);
      return absl::DataLossError(absl::StrCat(file->first, ": short read of '", t.name(), "'"));
    }
    offset += bytes;
    out.tensors.push_back(std::move(st));
  }
  ::close(fd);
  return out;
}

std::vector<TensorSetInfo> TensorStore::List() {
  absl::MutexLock lock(&mu_);
  std::vector<TensorSetInfo> out;
  for (const auto& [name, versions] : sets_) {
    if (versions.empty()) continue;
    TensorSetInfo info = versions.rbegin()->second.info;
    info.clear_tensors();
    out.push_back(std::move(info));
  }
  return out;
}

int64_t TensorStore::Latest(const std::string& name) {
  absl::MutexLock lock(&mu_);
  auto it = sets_.find(name);
  return it == sets_.end() || it->second.empty() ? 0 : it->second.rbegin()->first;
}

}  // namespace qtrain::ps
