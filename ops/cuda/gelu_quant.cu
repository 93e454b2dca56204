// Quantizing GELU kernels (gelu_quant_cuda.h).
// (Stub: the implementation lands next; every entry point returns Unimplemented.)
#include "ops/cuda/gelu_quant_cuda.h"

namespace qtrain::ops {

absl::Status gelu_forward_quant_cuda(bf16* out, const bf16* pre, int64_t N, int64_t C,
                                     const ActQuant& q, cudaStream_t stream) {
  return absl::UnimplementedError("gelu_forward_quant_cuda: not implemented yet");
}

absl::Status gelu_backward_quant_cuda(bf16* dpre, float* dstep, float* doffset,
                                      const bf16* dout, const bf16* pre, int64_t N, int64_t C,
                                      const ActQuant& q, void* workspace,
                                      int64_t workspace_bytes, cudaStream_t stream,
                                      GradWrite dparams,
                                      bf16* out_recompute) {
  return absl::UnimplementedError("gelu_backward_quant_cuda: not implemented yet");
}

absl::Status gelu_backward_quant_cuda(bf16* dpre, bf16* dstep, bf16* doffset, const bf16* dout,
                                      const bf16* pre, int64_t N, int64_t C, const ActQuant& q,
                                      void* workspace, int64_t workspace_bytes,
                                      cudaStream_t stream,
                                      GradWrite dparams,
                                      bf16* out_recompute) {
  return absl::UnimplementedError("gelu_backward_quant_cuda: not implemented yet");
}

}  // namespace qtrain::ops
