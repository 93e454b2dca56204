// CreateLoraModel, LoadBase, BaseHash.
#include "trainer/lora_model.h"

#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "ops/status_macros.h"
#include "trainer/export_reader.h"
#include "trainer/model_setup.h"
#include "trainer/safetensors.h"

namespace qtrain {
namespace {

constexpr char kCheckpointFormat[] = "qtrain-checkpoint-v1";

class Fnv1a {
 public:
  void Add(const void* data, size_t n) {
    const unsigned char* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < n; ++i) {
      h_ ^= p[i];
      h_ *= 0x100000001b3ull;
    }
  }
  void Add(const std::string& s) {
    const uint64_t n = s.size();
    Add(&n, sizeof(n));
    Add(s.data(), s.size());
  }
  uint64_t value() const { return h_; }

 private:
  uint64_t h_ = 0xcbf29ce484222325ull;
};

// Checkpoint tensors into the model; quantizer parameters may be missing (then initialised
// from the loaded weights), anything else missing is an error naming it.
absl::Status LoadCheckpointBase(const SafeTensors& st, const std::string& path, Gpt* model) {
  ParamStore& ps = model->params();
  bool init_quantizers = false;
  for (const ParamInfo& info : ps.infos()) {
    const std::string name = "model/" + info.name;
    if (!st.tensors.count(name) && IsQuantizerParam(info.name)) {
      init_quantizers = true;
      continue;
    }
    ASSIGN_OR_RETURN(const Tensor* t, st.Get(name, path));
    if (t->shape != info.shape) {
      return absl::FailedPreconditionError(absl::StrCat(
          path, ": base tensor '", name, "' has shape [", absl::StrJoin(t->shape, ","),
          "], the job's model expects [", absl::StrJoin(info.shape, ","), "]"));
    }
    RETURN_IF_ERROR(t->CopyTo(ps.params().data() + info.offset, info.size,
                              absl::StrCat(path, ": tensor '", name, "'")));
  }
  if (init_quantizers) return model->InitQuantizers();
  for (int i = 0; i < ps.num_buffers(); ++i) {
    const std::string name = "buffer/" + ps.buffer_name(i);
    ASSIGN_OR_RETURN(const Tensor* t, st.Get(name, path));
    std::vector<float>& b = ps.buffer(i);
    RETURN_IF_ERROR(t->CopyTo(b.data(), static_cast<int64_t>(b.size()),
                              absl::StrCat(path, ": tensor '", name, "'")));
  }
  return model->RestoreStateFromBuffers();
}

}  // namespace

LoraOptions LoraOptionsFromSpec(const JobSpec& spec) {
  LoraOptions o;
  const LoraSpec& l = spec.lora();
  o.rank = l.rank();
  o.alpha = l.alpha();
  o.targets.assign(l.targets().begin(), l.targets().end());
  o.train_a = spec.federated().aggregation() == FederatedSpec::FEDAVG_LORA;
  return o;
}

absl::StatusOr<std::unique_ptr<Gpt>> CreateLoraModel(const JobSpec& spec) {
  if (spec.lora().rank() <= 0) {
    return absl::InvalidArgumentError("lora.rank: a LoRA model needs rank > 0");
  }
  ASSIGN_OR_RETURN(GptConfig gc, ModelConfigFromSpec(spec));
  gc.lora = LoraOptionsFromSpec(spec);
  ASSIGN_OR_RETURN(std::unique_ptr<Gpt> model, Gpt::Create(gc));
  RETURN_IF_ERROR(LoadBase(spec.lora().base(), model.get()));
  model->InitLora(spec.seed() ^ 0x10a0ull);
  return model;
}

absl::Status LoadBase(const std::string& path, Gpt* model) {
  ASSIGN_OR_RETURN(SafeTensors st, ReadSafeTensors(path));
  ASSIGN_OR_RETURN(std::string format, st.Meta("format", path));
  if (format == kExportFormat) return LoadExportWeights(st, path, model);
  if (format == kCheckpointFormat) return LoadCheckpointBase(st, path, model);
  return absl::FailedPreconditionError(absl::StrCat(path, ": format '", format, "', expected '",
                                                    kCheckpointFormat, "' or '", kExportFormat,
                                                    "' as a LoRA base"));
}

uint64_t BaseHash(const Gpt& model) {
  const ParamStore& ps = model.params();
  Fnv1a h;
  for (const ParamInfo& info : ps.infos()) {
    h.Add(info.name);
    for (int64_t d : info.shape) h.Add(&d, sizeof(d));
    h.Add(ps.params().data() + info.offset, static_cast<size_t>(info.size) * sizeof(float));
  }
  for (int i = 0; i < ps.num_buffers(); ++i) {
    h.Add(ps.buffer_name(i));
    h.Add(ps.buffer(i).data(), ps.buffer(i).size() * sizeof(float));
  }
  return h.value();
}

std::string BaseHashHex(uint64_t hash) { return absl::StrFormat("%016x", hash); }

}  // namespace qtrain
