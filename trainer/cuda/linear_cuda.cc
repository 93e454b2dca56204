// CudaLinear: the per-Linear precision dispatch of the CUDA GPT (see linear_cuda.h).
#include "trainer/cuda/linear_cuda.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "ops/status_macros.h"

namespace qtrain {

using ops::bf16;

CudaLinear::CudaLinear(std::string name, int in_features, int out_features,
                       const LinearOptions& options, int64_t weight_offset, int64_t bias_offset)
    : name_(std::move(name)),
      in_(in_features),
      out_(out_features),
      opt_(options),
      w_(weight_offset),
      b_(bias_offset) {}

absl::Status CudaLinear::Forward(const LinearContext& c, bf16* out, const LinearInput& x, int N,
                                 ops::Activation act, bf16* pre_act) const {
  return ops::matmul_forward_cuda(*c.mm, out, x.bf16, Weight(c), Bias(c), N, in_, out_, c.stream,
                                  act, pre_act);
}

absl::Status CudaLinear::BackwardData(const LinearContext& c, bf16* dinp, const bf16* dout, int N,
                                      const bf16* gelu_pre) const {
  return ops::matmul_backward_cuda(*c.mm, dinp, nullptr, nullptr, dout, nullptr, Weight(c), N,
                                   in_, out_, c.mm_ws, c.mm_ws_bytes, c.stream, gelu_pre,
                                   ops::GradWrite::kAccumulate, ops::GradWrite::kOverwrite);
}

template <typename G>
absl::Status CudaLinear::BackwardWeight(const LinearContext& c, G* grads, const bf16* dout,
                                        const LinearInput& x, int N, ops::GradWrite gw) const {
  return ops::matmul_backward_cuda(*c.mm, nullptr, grads + w_, grads + b_, dout, x.bf16, nullptr,
                                   N, in_, out_, c.mm_ws, c.mm_ws_bytes, c.stream, nullptr, gw);
}

template <typename G>
absl::Status CudaLinear::Backward(const LinearContext& c, bf16* dinp, G* grads, const bf16* dout,
                                  const LinearInput& x, int N, ops::GradWrite gw) const {
  return ops::matmul_backward_cuda(*c.mm, dinp, grads + w_, grads + b_, dout, x.bf16, Weight(c),
                                   N, in_, out_, c.mm_ws, c.mm_ws_bytes, c.stream, nullptr, gw,
                                   ops::GradWrite::kOverwrite);
}

template absl::Status CudaLinear::BackwardWeight(const LinearContext&, float*, const bf16*,
                                                 const LinearInput&, int, ops::GradWrite) const;
template absl::Status CudaLinear::BackwardWeight(const LinearContext&, bf16*, const bf16*,
                                                 const LinearInput&, int, ops::GradWrite) const;
template absl::Status CudaLinear::Backward(const LinearContext&, bf16*, float*, const bf16*,
                                           const LinearInput&, int, ops::GradWrite) const;
template absl::Status CudaLinear::Backward(const LinearContext&, bf16*, bf16*, const bf16*,
                                           const LinearInput&, int, ops::GradWrite) const;

}  // namespace qtrain
