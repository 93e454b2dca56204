// Host API of the CUDA causal multi-head self-attention: flash attention (tiles of queries and
// keys, online softmax, no T x T matrix in memory) forward and a deterministic backward, on
// BF16 tensor cores (mma.sync) for head sizes 32, 64, 80, 96 and 128, with a plain CUDA-core
// kernel of the same algorithm for any other head size up to 256. The reference is
// ops/attention.h. On Hopper, cuDNN 9's fused flash attention is the faster path (kCudnn), our
// kernels the fallback and the deterministic path. All pointers are device pointers; work is
// queued on `stream`.
#ifndef QTRAIN_OPS_CUDA_ATTENTION_CUDA_H_
#define QTRAIN_OPS_CUDA_ATTENTION_CUDA_H_

#include <cstdint>

#include "absl/status/status.h"
#include "ops/cuda/bf16.h"
#include "ops/cuda/grad_write.h"

typedef struct CUstream_st* cudaStream_t;

namespace qtrain::ops {

// kAuto: cuDNN where it applies (see kCudnn) and the caller neither asks for determinism nor,
// in backward, for accumulation; else tensor cores where supported (head size 32/64/80/96/128,
// inp 16-byte aligned), else the plain kernel; a cuDNN plan that fails to build for a shape
// falls back to ours. kTensorCore: InvalidArgument where unsupported. kSimple: always the plain
// kernel (slow; for odd head sizes and as a second implementation in tests). kCudnn: cuDNN's
// fused flash attention (head size a multiple of 8 up to 128, T >= 16, 16-byte aligned
// pointers, a Hopper GPU, cuDNN >= 9): FailedPrecondition / InvalidArgument where it does not apply, the
// plan's error where cuDNN refuses the shape. Its backward sums dq with atomics, so it is not
// bit-reproducible and refuses `deterministic`.
enum class AttentionKernel { kAuto, kTensorCore, kSimple, kCudnn };

// Whether kAuto picks the tensor-core kernel for this head size (hs = C / NH).
bool attention_cuda_uses_tensor_cores(int head_size);

// inp (B,T,3C) holds q,k,v as in the CPU op; out (B,T,C) BF16; lse (B,NH,T) fp32 receives the
// natural-log softmax denominators log(sum_t2 exp(scale q.k_t2)), which backward needs instead
// of the CPU op's (B,NH,T,T) probabilities. scale = 1/sqrt(hs). Softmax statistics and the
// output accumulate in fp32; the probabilities meet V as BF16.
absl::Status attention_forward_cuda(bf16* out, float* lse, const bf16* inp, int B, int T, int C,
                                    int NH, cudaStream_t stream,
                                    AttentionKernel kernel = AttentionKernel::kAuto,
                                    bool deterministic = false);

// Workspace bytes of attention_backward_cuda: one fp32 per (b, h, t).
int64_t attention_backward_cuda_workspace_bytes(int B, int T, int NH);

// dinp (B,T,3C) += gradients of q, k, v (each element read, summed in fp32, rounded once), or
// = with write kOverwrite (which cuDNN needs). out and lse as the forward wrote them (either
// implementation's: both store the natural-log denominators). Our kernels are deterministic:
// dq is computed by one pass over key tiles per query tile and dk, dv by one pass over query
// tiles per key tile (the score tiles are computed twice, which costs FLOPs but needs no
// atomics); `deterministic` keeps kAuto on them.
absl::Status attention_backward_cuda(bf16* dinp, const bf16* dout, const bf16* inp,
                                     const bf16* out, const float* lse, int B, int T, int C,
                                     int NH, void* workspace, int64_t workspace_bytes,
                                     cudaStream_t stream,
                                     AttentionKernel kernel = AttentionKernel::kAuto,
                                     GradWrite write = GradWrite::kAccumulate,
                                     bool deterministic = false);

// Whether kAuto would use cuDNN for this head size and these pointers (not whether its plan
// builds for a shape). For tests and benchmarks.
bool attention_cuda_cudnn_available(int head_size, const void* inp);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_CUDA_ATTENTION_CUDA_H_
