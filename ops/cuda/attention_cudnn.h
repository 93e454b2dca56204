// Internal to the attention launchers (attention.cu): cuDNN 9's fused flash attention (causal,
// BF16) on the packed (B,T,3C) q|k|v layout, with the forward / backward contracts of
// attention_cuda.h except that backward overwrites dinp. Plans are built once per shape.
#ifndef QTRAIN_OPS_CUDA_ATTENTION_CUDNN_H_
#define QTRAIN_OPS_CUDA_ATTENTION_CUDNN_H_

#include "absl/status/status.h"
#include "ops/cuda/bf16.h"

typedef struct CUstream_st* cudaStream_t;

namespace qtrain::ops::cudnn_attention {

// Head size a multiple of 8 up to 128, the n pointers 16-byte aligned, cuDNN >= 9 loaded and
// the current device a Hopper (sm_90). Whether a plan builds for a shape is known only at the
// first Forward / Backward of that shape.
bool Supported(int head_size, const void* const* ptrs, int n);

absl::Status Forward(bf16* out, float* lse, const bf16* inp, int B, int T, int C, int NH,
                     cudaStream_t stream);

// dinp (B,T,3C) = gradients of q, k, v (overwritten). dq is summed with fp32 atomics: the
// result can differ in the last bits from run to run.
absl::Status Backward(bf16* dinp, const bf16* dout, const bf16* inp, const bf16* out,
                      const float* lse, int B, int T, int C, int NH, cudaStream_t stream);

}  // namespace qtrain::ops::cudnn_attention

#endif  // QTRAIN_OPS_CUDA_ATTENTION_CUDNN_H_
