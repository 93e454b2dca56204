// CUDA FP8 kernels: per-tensor scaling state and its updates, casts with transpose and amax,
// amax, FP8 transpose, block quantization.
#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "ops/cuda/cuda_status.h"
#include "ops/cuda/cuda_utils.cuh"
#include "ops/cuda/fp8_cuda.h"
#include "ops/cuda/fp8_utils.cuh"
#include "ops/status_macros.h"

namespace qtrain::ops {
namespace {
absl::Status Todo(const char* fn) {
  return absl::UnimplementedError(absl::StrCat(fn, ": not implemented yet"));
}
}  // namespace

Fp8ScalingState::Fp8ScalingState(std::vector<Fp8TensorSpec> specs, int history_len, void* block,
                                 void* table)
    : specs_(std::move(specs)),
      num_tensors_(static_cast<int>(specs_.size())),
      history_len_(history_len),
      block_(block),
      device_specs_(table) {
  float* f = static_cast<float*>(block_);
  amax_ = f;
  scale_ = f + num_tensors_;
  scale_inv_ = f + 2 * num_tensors_;
  history_ = f + 3 * num_tensors_;
}

Fp8ScalingState::~Fp8ScalingState() {
  if (block_ != nullptr) cudaFree(block_);
  if (device_specs_ != nullptr) cudaFree(device_specs_);
}

absl::StatusOr<std::unique_ptr<Fp8ScalingState>> Fp8ScalingState::Create(
    absl::Span<const Fp8TensorSpec> specs, int history_len) {
  return Todo("Fp8ScalingState::Create");
}
absl::Status Fp8ScalingState::Download(std::vector<float>*, std::vector<float>*) const {
  return Todo("Fp8ScalingState::Download");
}
absl::Status Fp8ScalingState::Upload(const std::vector<float>&, const std::vector<float>&) {
  return Todo("Fp8ScalingState::Upload");
}
absl::Status fp8_delayed_update_cuda(const Fp8ScalingState&, int, int, cudaStream_t) {
  return Todo("fp8_delayed_update_cuda");
}
absl::Status fp8_current_scale_cuda(const Fp8ScalingState&, int, int, cudaStream_t) {
  return Todo("fp8_current_scale_cuda");
}
absl::Status fp8_cast_cuda(uint8_t*, uint8_t*, float*, const bf16*, int64_t, int64_t, Fp8Format,
                           const float*, cudaStream_t) {
  return Todo("fp8_cast_cuda");
}
absl::Status fp8_cast_cuda(uint8_t*, uint8_t*, float*, const float*, int64_t, int64_t,
                           Fp8Format, const float*, cudaStream_t) {
  return Todo("fp8_cast_cuda");
}
absl::Status fp8_amax_cuda(float*, const bf16*, int64_t, cudaStream_t) {
  return Todo("fp8_amax_cuda");
}
absl::Status fp8_amax_cuda(float*, const float*, int64_t, cudaStream_t) {
  return Todo("fp8_amax_cuda");
}
absl::Status fp8_transpose_cuda(uint8_t*, const uint8_t*, int64_t, int64_t, cudaStream_t) {
  return Todo("fp8_transpose_cuda");
}
absl::Status fp8_block_quantize_act_cuda(uint8_t*, float*, uint8_t*, float*, const bf16*,
                                         int64_t, int64_t, Fp8Format, cudaStream_t) {
  return Todo("fp8_block_quantize_act_cuda");
}
absl::Status fp8_block_quantize_weight_cuda(uint8_t*, float*, uint8_t*, float*, const float*,
                                            int64_t, int64_t, Fp8Format, cudaStream_t) {
  return Todo("fp8_block_quantize_weight_cuda");
}

}  // namespace qtrain::ops
