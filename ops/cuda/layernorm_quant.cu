// Quantizing layernorm kernels (layernorm_quant_cuda.h).
// (Stub: the implementation lands next; every entry point returns Unimplemented.)
#include "ops/cuda/layernorm_quant_cuda.h"

namespace qtrain::ops {

absl::Status layernorm_forward_quant_cuda(bf16* out, float* mean, float* rstd, const bf16* inp,
                                          const bf16* weight, const bf16* bias, int N, int C,
                                          const ActQuant& q, cudaStream_t stream) {
  return absl::UnimplementedError("layernorm_forward_quant_cuda: not implemented yet");
}

absl::Status residual_layernorm_forward_quant_cuda(bf16* residual, bf16* out, float* mean,
                                                   float* rstd, const bf16* a, const bf16* b,
                                                   const bf16* weight, const bf16* bias, int N,
                                                   int C, const ActQuant& q,
                                                   cudaStream_t stream) {
  return absl::UnimplementedError("residual_layernorm_forward_quant_cuda: not implemented yet");
}

absl::Status layernorm_backward_quant_cuda(bf16* dinp, float* dweight, float* dbias,
                                           float* dstep, float* doffset, const bf16* dout,
                                           const bf16* inp, const bf16* weight,
                                           const bf16* bias, const float* mean,
                                           const float* rstd, int N, int C, const ActQuant& q,
                                           void* workspace, int64_t workspace_bytes,
                                           cudaStream_t stream,
                                           GradWrite dparams,
                                           bf16* out_recompute) {
  return absl::UnimplementedError("layernorm_backward_quant_cuda: not implemented yet");
}

absl::Status layernorm_backward_quant_cuda(bf16* dinp, bf16* dweight, bf16* dbias, bf16* dstep,
                                           bf16* doffset, const bf16* dout, const bf16* inp,
                                           const bf16* weight, const bf16* bias,
                                           const float* mean, const float* rstd, int N, int C,
                                           const ActQuant& q, void* workspace,
                                           int64_t workspace_bytes, cudaStream_t stream,
                                           GradWrite dparams,
                                           bf16* out_recompute) {
  return absl::UnimplementedError("layernorm_backward_quant_cuda: not implemented yet");
}

}  // namespace qtrain::ops
namespace qtrain::ops {
int64_t layernorm_backward_quant_cuda_workspace_bytes(int, int, const ActQuant&) { return 0; }
}  // namespace qtrain::ops
