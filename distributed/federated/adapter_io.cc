// AdapterTensorSpecs, AdapterTensorData, FlattenAdapterTensors.
#include "distributed/federated/adapter_io.h"

#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace qtrain::federated {

absl::StatusOr<std::vector<ps::TensorSpec>> AdapterTensorSpecs(const ParamStore& lora,
                                                               int64_t n) {
  std::vector<ps::TensorSpec> out;
  int64_t covered = 0;
  for (const ParamInfo& info : lora.infos()) {
    if (info.offset >= n) break;
    ps::TensorSpec s;
    s.set_name(info.name);
    s.set_dtype("F32");
    for (int64_t d : info.shape) s.add_shape(d);
    out.push_back(std::move(s));
    covered = info.offset + info.size;
  }
  if (covered != n) {
    return absl::InvalidArgumentError(
        absl::StrCat("adapter tensors: ", n, " floats do not end on a tensor edge"));
  }
  return out;
}

std::vector<absl::string_view> AdapterTensorData(const std::vector<float>& flat, int64_t n,
                                                 const ParamStore& lora) {
  std::vector<absl::string_view> out;
  for (const ParamInfo& info : lora.infos()) {
    if (info.offset >= n) break;
    out.emplace_back(reinterpret_cast<const char*>(flat.data() + info.offset),
                     static_cast<size_t>(info.size) * sizeof(float));
  }
  return out;
}

absl::StatusOr<std::vector<float>> FlattenAdapterTensors(
    const std::vector<ps::TensorSpec>& specs, const std::vector<absl::string_view>& data,
    const ParamStore& lora, int64_t n, const std::string& what) {
  absl::StatusOr<std::vector<ps::TensorSpec>> want = AdapterTensorSpecs(lora, n);
  if (!want.ok()) return want.status();
  if (specs.size() != want->size() || data.size() != want->size()) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", specs.size(), " tensors, the job's "
                                                   "adapter has ", want->size()));
  }
  std::vector<float> out(n);
  for (size_t i = 0; i < specs.size(); ++i) {
    const ps::TensorSpec& s = specs[i];
    const ps::TensorSpec& w = (*want)[i];
    const std::vector<int64_t> shape(s.shape().begin(), s.shape().end());
    const std::vector<int64_t> wshape(w.shape().begin(), w.shape().end());
    if (s.name() != w.name() || s.dtype() != "F32" || shape != wshape) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": tensor ", i, " is '", s.name(), "' ", s.dtype(), " [",
          absl::StrJoin(shape, ","), "], the job's adapter has '", w.name(), "' F32 [",
          absl::StrJoin(wshape, ","), "]"));
    }
    const ParamInfo& info = lora.info(static_cast<int>(i));
    if (data[i].size() != static_cast<size_t>(info.size) * sizeof(float)) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": tensor '", s.name(), "' has ",
                                                     data[i].size(), " bytes"));
    }
    std::memcpy(out.data() + info.offset, data[i].data(), data[i].size());
  }
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(out[i])) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": non-finite value at ", i));
    }
  }
  return out;
}

}  // namespace qtrain::federated
