// Host API of the CUDA tied LM head fused with softmax cross-entropy: the logits GEMM on
// cuBLASLt, then one kernel that computes the loss and overwrites the logits with dlogits in
// place (never two copies of the logits). The reference is ops/crossentropy.h. All pointers
// are device pointers; work is queued on `stream`.
#ifndef QTRAIN_OPS_CUDA_CROSSENTROPY_CUDA_H_
#define QTRAIN_OPS_CUDA_CROSSENTROPY_CUDA_H_

#include <cstdint>

#include "absl/status/status.h"
#include "ops/cuda/bf16.h"
#include "ops/cuda/matmul_cuda.h"
#include "ops/distill.h"

typedef struct CUstream_st* cudaStream_t;

namespace qtrain::ops {

// logits (N,V) in, dlogits out, in place: per row, losses[n] = logsumexp(row) - row[target]
// (fp32 math on the BF16 logits) and row = dloss / N * (softmax(row) - onehot(target)).
// Fusing the backward's first step into the forward is what keeps one buffer: dloss (the
// gradient of the mean loss, 1 for plain training) must be known up front. mean_loss (device,
// one double, may be null) = the mean of losses in a fixed order (deterministic). A target
// outside [0,V) gives a NaN loss (a kernel cannot return a status). 16-byte accesses when V % 8
// == 0 and logits is 16-byte aligned; element-wise otherwise.
absl::Status crossentropy_softmax_cuda(float* losses, double* mean_loss, bf16* logits,
                                       const int32_t* targets, int N, int V, float dloss,
                                       cudaStream_t stream);

// logits (N,V) = x (N,C) @ wte (V,C)^T, then crossentropy_softmax_cuda on them: on return
// `logits` holds dlogits for lm_head_crossentropy_backward_cuda.
absl::Status lm_head_crossentropy_forward_cuda(MatmulContext& ctx, float* losses,
                                               double* mean_loss, bf16* logits, const bf16* x,
                                               const bf16* wte, const int32_t* targets, int N,
                                               int C, int V, float dloss, cudaStream_t stream);

// dx (N,C) += dlogits (N,V) @ wte (BF16); dwte (V,C) += dlogits^T @ x (fp32). Either output
// may be null to skip it; either is written over instead with its GradWrite kOverwrite.
absl::Status lm_head_crossentropy_backward_cuda(MatmulContext& ctx, bf16* dx, float* dwte,
                                                const bf16* dlogits, const bf16* x,
                                                const bf16* wte, int N, int C, int V,
                                                cudaStream_t stream,
                                                GradWrite dwte_write = GradWrite::kAccumulate,
                                                GradWrite dx_write = GradWrite::kAccumulate);

// What the chunked LM head does beyond the plain cross-entropy (each optional).
struct LmHeadExtras {
  // model.padded_vocab_size: wte has table_rows >= V rows (llm.c pads GPT-2's 50257 to 50304,
  // a multiple of 64 that keeps cuBLASLt on its fast kernels); the GEMMs run over all of them,
  // the logits rows are table_rows wide, and the padded columns take no part in the softmax:
  // their dlogits are 0, so their rows of dwte get a zero gradient (the CPU model never reads
  // them). 0: V.
  int table_rows = 0;
  // precision.distill: a frozen teacher's final hidden states teacher_x (N, C) and embedding
  // teacher_wte (table_rows, C). Per chunk, its logits go into teacher_logits (chunk_rows,
  // table_rows), so full logits of teacher and student never coexist; distill_losses[n] gets
  // row n's distillation loss (ops/distill.h: KL(p_t || p_s) or (1/V) sum (s - t)^2),
  // mean_distill (may be null) their mean, and dlogits gains
  // dloss / N * distill_weight * d distill / d s.
  const bf16* teacher_x = nullptr;
  const bf16* teacher_wte = nullptr;
  bf16* teacher_logits = nullptr;
  DistillLoss distill = DistillLoss::kKl;
  float distill_weight = 0.f;
  float* distill_losses = nullptr;
  double* mean_distill = nullptr;
};

// The LM head and its cross-entropy, forward and (when dx or dwte is non-null) backward, over
// chunks of chunk_rows rows, so that the logits of only one chunk exist at a time: `logits`
// holds (min(chunk_rows, N), V). Per chunk: logits = x @ wte^T, the chunk's losses and, in
// place, dlogits = dloss / N * (softmax - onehot) (crossentropy_softmax_cuda's math with the
// mean over all N rows), then dx's rows of the chunk (dx_write) and dwte (dwte_write for the
// first chunk, += for the others) from them. Without dx and dwte it is the forward only (an
// evaluation). mean_loss (may be null) = mean of all N losses (deterministic). One chunk of N
// rows is lm_head_crossentropy_forward_cuda then _backward_cuda.
absl::Status lm_head_crossentropy_chunked_cuda(MatmulContext& ctx, float* losses,
                                               double* mean_loss, bf16* logits, int chunk_rows,
                                               bf16* dx, float* dwte, const bf16* x,
                                               const bf16* wte, const int32_t* targets, int N,
                                               int C, int V, float dloss, cudaStream_t stream,
                                               GradWrite dwte_write = GradWrite::kAccumulate,
                                               GradWrite dx_write = GradWrite::kAccumulate,
                                               const LmHeadExtras& extras = {});
// The same with BF16 gradients (training.grad_dtype).
absl::Status lm_head_crossentropy_chunked_cuda(MatmulContext& ctx, float* losses,
                                               double* mean_loss, bf16* logits, int chunk_rows,
                                               bf16* dx, bf16* dwte, const bf16* x,
                                               const bf16* wte, const int32_t* targets, int N,
                                               int C, int V, float dloss, cudaStream_t stream,
                                               GradWrite dwte_write = GradWrite::kAccumulate,
                                               GradWrite dx_write = GradWrite::kAccumulate,
                                               const LmHeadExtras& extras = {});

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_CUDA_CROSSENTROPY_CUDA_H_
