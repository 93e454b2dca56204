// ParamStore: named views into contiguous parameter and gradient buffers.
#include "trainer/param_store.h"

#include <algorithm>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace qtrain {

int ParamStore::Add(const std::string& name, std::vector<int64_t> shape, bool decay) {
  ParamInfo info;
  info.name = name;
  info.size = 1;
  for (int64_t d : shape) info.size *= d;
  info.shape = std::move(shape);
  // In an aligned store every tensor starts at a multiple of align_, so that its BF16 copy is
  // 16-byte and its fp32 master 32-byte aligned wherever the tensor before it ended: a
  // one-element tensor (a learned activation step) would otherwise shift every later weight by
  // 2 bytes in BF16, and cuBLASLt then falls back to its alignment-1 kernels (the W4A4 step ran
  // 2.5x slower). The gaps stay zero: no tensor owns them, the optimizer skips them, sums see
  // zeros.
  total_ = (total_ + align_ - 1) / align_ * align_;
  info.offset = total_;
  info.decay = decay;
  total_ += info.size;
  infos_.push_back(std::move(info));
  return static_cast<int>(infos_.size()) - 1;
}

void ParamStore::Finalize(bool with_grads) {
  params_.assign(total_, 0.0f);
  grads_.assign(with_grads ? total_ : 0, 0.0f);
}

absl::StatusOr<int> ParamStore::Find(const std::string& name) const {
  for (int i = 0; i < size(); ++i) {
    if (infos_[i].name == name) return i;
  }
  return absl::NotFoundError(absl::StrCat("no parameter named '", name, "'"));
}

int ParamStore::AddBuffer(const std::string& name, int64_t size, float init) {
  buffer_names_.push_back(name);
  buffers_.emplace_back(size, init);
  return static_cast<int>(buffers_.size()) - 1;
}

void ParamStore::ZeroGrads() { std::fill(grads_.begin(), grads_.end(), 0.0f); }

}  // namespace qtrain
