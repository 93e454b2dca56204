// One Linear of the CUDA GPT in the precision mode the job spec gives it: the GPU twin of
// trainer/linear.h, so that the model code (trainer/cuda/gpt_cuda.cc) calls the same three
// operations whatever the mode and never branches on it:
//   Forward         out = act(x W^T + b)
//   BackwardData    dinp = dout W              (optionally through the GELU that made x)
//   BackwardWeight  dW, db from dout and the saved input
// The model owns the memory (flat parameter, gradient and BF16 copy buffers in the host
// ParamStore's layout; activations); a Linear knows its tensors' offsets in it and the form its
// input takes (LinearInput), which the producer of that input (a layernorm, the attention, the
// GELU epilogue of the Linear before it) writes for it.
#ifndef QTRAIN_TRAINER_CUDA_LINEAR_CUDA_H_
#define QTRAIN_TRAINER_CUDA_LINEAR_CUDA_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "ops/cuda/bf16.h"
#include "ops/cuda/grad_write.h"
#include "ops/cuda/matmul_cuda.h"
#include "trainer/precision.h"

typedef struct CUstream_st* cudaStream_t;

namespace qtrain {

// A Linear's input as its producer wrote it, (N, in).
struct LinearInput {
  const ops::bf16* bf16 = nullptr;  // the BF16 values the BF16 GEMMs read
};

// The device state of the model that a Linear's calls work in.
struct LinearContext {
  ops::MatmulContext* mm = nullptr;
  cudaStream_t stream = nullptr;
  const ops::bf16* params_bf16 = nullptr;  // the flat BF16 compute copies of the parameters
  void* mm_ws = nullptr;                   // matmul_backward_cuda's bias-gradient workspace
  int64_t mm_ws_bytes = 0;
};

class CudaLinear {
 public:
  // name: "block.<l>.attn.qkv" etc.; the offsets of "<name>.weight" (out, in) and
  // "<name>.bias" (out) in the flat buffers.
  CudaLinear(std::string name, int in_features, int out_features, const LinearOptions& options,
             int64_t weight_offset, int64_t bias_offset);

  const std::string& name() const { return name_; }
  LinearMode mode() const { return opt_.mode; }
  int in_features() const { return in_; }
  int out_features() const { return out_; }
  int64_t weight_offset() const { return w_; }
  int64_t bias_offset() const { return b_; }

  // out (N, out) = act(x W^T + b); act == kGelu also writes the pre-activation to pre_act.
  absl::Status Forward(const LinearContext& c, ops::bf16* out, const LinearInput& x, int N,
                       ops::Activation act = ops::Activation::kNone,
                       ops::bf16* pre_act = nullptr) const;
  // dinp (N, in) = dout (N, out) W, written over. With gelu_pre (N, in) non-null, the input was
  // gelu(gelu_pre) and dinp receives the gradient with respect to gelu_pre instead.
  absl::Status BackwardData(const LinearContext& c, ops::bf16* dinp, const ops::bf16* dout,
                            int N, const ops::bf16* gelu_pre = nullptr) const;
  // The weight and bias gradients (grads: the flat gradient buffer, fp32 or BF16) of dout
  // against the input x of the forward, written (kOverwrite) or added (kAccumulate).
  template <typename G>
  absl::Status BackwardWeight(const LinearContext& c, G* grads, const ops::bf16* dout,
                              const LinearInput& x, int N, ops::GradWrite gw) const;
  // BackwardData (without GELU) and BackwardWeight in one call, for a Linear whose input is
  // still at hand when its output gradient arrives.
  template <typename G>
  absl::Status Backward(const LinearContext& c, ops::bf16* dinp, G* grads, const ops::bf16* dout,
                        const LinearInput& x, int N, ops::GradWrite gw) const;

 private:
  const ops::bf16* Weight(const LinearContext& c) const { return c.params_bf16 + w_; }
  const ops::bf16* Bias(const LinearContext& c) const { return c.params_bf16 + b_; }

  std::string name_;
  int in_, out_;
  LinearOptions opt_;
  int64_t w_, b_;
};

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_CUDA_LINEAR_CUDA_H_
