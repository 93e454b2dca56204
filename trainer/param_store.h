// Named tensors over one contiguous fp32 buffer each for parameters, gradients and the two
// AdamW moments (llm.c's layout: one allocation, one all-reduce, one optimizer pass).
#ifndef QTRAIN_TRAINER_PARAM_STORE_H_
#define QTRAIN_TRAINER_PARAM_STORE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace qtrain {

struct ParamInfo {
  std::string name;
  std::vector<int64_t> shape;
  int64_t offset = 0;  // in elements, into each buffer
  int64_t size = 0;
  bool decay = false;  // AdamW weight decay applies (2-D weights)
};

class ParamStore {
 public:
  // A model's store: tensor offsets are multiples of kAlignElements, so that every BF16 device
  // copy of a tensor is 16-byte aligned (cuBLASLt and the vector kernels need it; see
  // ParamStore::Add). The flat buffers then hold zero gaps between tensors that no tensor owns
  // (num_elements() counts them). Stores whose flat buffer is itself a wire format (LoRA
  // adapters) stay packed (align 1, the default).
  static constexpr int64_t kAlignElements = 8;
  explicit ParamStore(int64_t align_elements = 1) : align_(align_elements) {}

  // Adds a tensor; returns its index. Call all Adds before Finalize.
  int Add(const std::string& name, std::vector<int64_t> shape, bool decay);
  // Allocates the buffers (zeroed). Without grads the tensors are frozen: there is no gradient
  // buffer (grad() must not be called), e.g. the base model under LoRA adapters.
  void Finalize(bool with_grads = true);
  bool has_grads() const { return grads_.size() == params_.size(); }

  int64_t num_elements() const { return total_; }
  int size() const { return static_cast<int>(infos_.size()); }
  const ParamInfo& info(int i) const { return infos_[i]; }
  const std::vector<ParamInfo>& infos() const { return infos_; }
  absl::StatusOr<int> Find(const std::string& name) const;

  float* param(int i) { return params_.data() + infos_[i].offset; }
  const float* param(int i) const { return params_.data() + infos_[i].offset; }
  float* grad(int i) { return grads_.data() + infos_[i].offset; }
  const float* grad(int i) const { return grads_.data() + infos_[i].offset; }

  std::vector<float>& params() { return params_; }
  const std::vector<float>& params() const { return params_; }
  std::vector<float>& grads() { return grads_; }
  const std::vector<float>& grads() const { return grads_; }

  void ZeroGrads();

  // Buffers: non-trainable state that checkpoints must carry (quantizer init flags, FP8 amax
  // histories, the rank of a low-rank module). Each is its own vector and may be added at any
  // time; indices stay valid.
  int AddBuffer(const std::string& name, int64_t size, float init = 0.0f);
  int num_buffers() const { return static_cast<int>(buffers_.size()); }
  const std::string& buffer_name(int i) const { return buffer_names_[i]; }
  std::vector<float>& buffer(int i) { return buffers_[i]; }
  const std::vector<float>& buffer(int i) const { return buffers_[i]; }

 private:
  std::vector<std::string> buffer_names_;
  std::vector<std::vector<float>> buffers_;
  std::vector<ParamInfo> infos_;
  int64_t total_ = 0;
  int64_t align_ = 1;
  std::vector<float> params_, grads_;
};

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_PARAM_STORE_H_
