// Host API of the quantizing GELU of QAT (the MLP's second GEMM input): forward from the BF16
// pre-activation to the fake-quantized GELU output (per-tensor learned LSQ/LSQ+ or per-token
// dynamic, optional int8 codes), and the backward that masks the incoming gradient, reduces the
// per-tensor step/offset gradient and applies GELU' in one pass. For the CUDA model with
// MatmulContext::set_gelu_fusion(false): the fc GEMM writes the pre-activation (bias epilogue),
// then this kernel. References: ops/gelu.h (tanh approximation) and ops/quant/lsq.h.
// Device pointers, row-major (N, C); work is queued on `stream`.
#ifndef QTRAIN_OPS_CUDA_GELU_QUANT_CUDA_H_
#define QTRAIN_OPS_CUDA_GELU_QUANT_CUDA_H_

#include <cstdint>

#include "absl/status/status.h"
#include "ops/cuda/bf16.h"
#include "ops/cuda/grad_write.h"
#include "ops/cuda/lsq_cuda.h"

typedef struct CUstream_st* cudaStream_t;

namespace qtrain::ops {

// out (N, C) = bf16(Q(v)), v = bf16(gelu(pre)) exactly as gelu_forward_cuda(bf16) writes it
// (with q.mode == kNone this is that kernel's output, bit for bit); q.codes / q.token_scales
// written when given. kPerTensor: grid-stride over the elements, 16-byte accesses where C % 8
// == 0 and the pointers are aligned; kPerToken: one warp per row (an absmax pass computing the
// GELU, then a pass that recomputes it and writes; the row is re-read from L1/L2).
absl::Status gelu_forward_quant_cuda(bf16* out, const bf16* pre, int64_t N, int64_t C,
                                     const ActQuant& q, cudaStream_t stream);

// dpre (N, C) = gelu'(pre) * dv with dv = dout masked by `inside` (kPerTensor; dout itself for
// kPerToken / kNone), formed in fp32 and rounded once; OVERWRITES dpre (the pre-activation's
// gradient has one consumer), which may equal dout (in place, as the model writes dGELU over
// the GELU output buffer). v and x recomputed per element from pre as in the forward.
// kPerTensor: dstep (and doffset for LSQ+, else null) receive g * lsq_backward's sums over all
// elements (deterministic, double), written with dparams. out_recompute (N, C), optional: the
// forward's output again (kPerToken needs q.token_scales), for the proj weight-gradient GEMM
// when the model did not keep it; must not alias dout/dpre.
// workspace: act_quant_backward_cuda_workspace_bytes(N, C, q).
absl::Status gelu_backward_quant_cuda(bf16* dpre, float* dstep, float* doffset,
                                      const bf16* dout, const bf16* pre, int64_t N, int64_t C,
                                      const ActQuant& q, void* workspace,
                                      int64_t workspace_bytes, cudaStream_t stream,
                                      GradWrite dparams = GradWrite::kAccumulate,
                                      bf16* out_recompute = nullptr);
absl::Status gelu_backward_quant_cuda(bf16* dpre, bf16* dstep, bf16* doffset, const bf16* dout,
                                      const bf16* pre, int64_t N, int64_t C, const ActQuant& q,
                                      void* workspace, int64_t workspace_bytes,
                                      cudaStream_t stream,
                                      GradWrite dparams = GradWrite::kAccumulate,
                                      bf16* out_recompute = nullptr);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_CUDA_GELU_QUANT_CUDA_H_
