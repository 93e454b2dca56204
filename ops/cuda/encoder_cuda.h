// Host API of the CUDA token + position embedding (BF16 storage, fp32 math and fp32 weight
// gradients); the reference is ops/encoder.h. All pointers are device pointers; work is
// queued on `stream`.
#ifndef QTRAIN_OPS_CUDA_ENCODER_CUDA_H_
#define QTRAIN_OPS_CUDA_ENCODER_CUDA_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ops/cuda/bf16.h"

typedef struct CUstream_st* cudaStream_t;

namespace qtrain::ops {

// out (B,T,C) = wte[inp[b,t]] + wpe[t], the sum formed in fp32 and rounded once.
// inp (B,T) tokens, wte (V,C), wpe (>= T,C). V is not in the CPU signature: the kernel uses it
// to keep a bad token from reading outside wte (its row becomes NaN, which the loss shows; a
// kernel cannot return a status). InvalidArgument on bad shapes or null pointers.
absl::Status encoder_forward_cuda(bf16* out, const int32_t* inp, const bf16* wte,
                                  const bf16* wpe, int B, int T, int C, int V,
                                  cudaStream_t stream);

// Bytes of device workspace that encoder_backward_cuda needs for these sizes (the radix sort's
// buffers). Needs a CUDA device (the sort sizes its temporary storage for it).
absl::StatusOr<int64_t> encoder_backward_cuda_workspace_bytes(int B, int T, int V);

// dwte (V,C) += scatter-add of dout (B,T,C) by token; dwpe (>= T,C) += sum over b. fp32
// gradients. Deterministic without float atomics: positions are stably sorted by token and
// each token's rows are summed in (b,t) order by one thread per channel, so repeated runs are
// bit-identical. Tokens outside [0,V) are skipped. `workspace` holds at least
// encoder_backward_cuda_workspace_bytes(B, T, V) bytes.
absl::Status encoder_backward_cuda(float* dwte, float* dwpe, const bf16* dout,
                                   const int32_t* inp, int B, int T, int C, int V,
                                   void* workspace, int64_t workspace_bytes,
                                   cudaStream_t stream);
// The same with BF16 gradients (training.grad_dtype): each sum is formed in fp32, added to the
// gradient's value in fp32 and rounded once.
absl::Status encoder_backward_cuda(bf16* dwte, bf16* dwpe, const bf16* dout,
                                   const int32_t* inp, int B, int T, int C, int V,
                                   void* workspace, int64_t workspace_bytes,
                                   cudaStream_t stream);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_CUDA_ENCODER_CUDA_H_
