// LSQ/LSQ+ weight and activation quantizers (lsq_cuda.h).
// (Stub: the implementation lands next; every entry point returns Unimplemented.)
#include "ops/cuda/lsq_cuda.h"

namespace qtrain::ops {

absl::Status lsq_weight_forward_cuda(bf16* out, int8_t* codes, float* residual, const float* w,
                                     float* s, const float* beta, const float* phi_add,
                                     int64_t rows, int64_t cols, const LsqConfig& cfg,
                                     cudaStream_t stream) {
  return absl::UnimplementedError("lsq_weight_forward_cuda: not implemented yet");
}

absl::Status lsq_weight_backward_cuda(float* dw, float* ds, float* dbeta, const float* w,
                                      const float* s, const float* beta, int64_t rows,
                                      int64_t cols, const LsqConfig& cfg, void* workspace,
                                      int64_t workspace_bytes, cudaStream_t stream,
                                      GradWrite ds_write) {
  return absl::UnimplementedError("lsq_weight_backward_cuda: not implemented yet");
}

absl::Status lsq_weight_backward_cuda(bf16* dw, bf16* ds, bf16* dbeta, const float* w,
                                      const float* s, const float* beta, int64_t rows,
                                      int64_t cols, const LsqConfig& cfg, void* workspace,
                                      int64_t workspace_bytes, cudaStream_t stream,
                                      GradWrite ds_write) {
  return absl::UnimplementedError("lsq_weight_backward_cuda: not implemented yet");
}

absl::Status ValidateActQuant(const char* op, const ActQuant& q, int64_t N, int64_t C,
                              bool need_token_scales) {
  return absl::UnimplementedError("ValidateActQuant: not implemented yet");
}

absl::Status act_quant_forward_cuda(bf16* out, const bf16* inp, int64_t N, int64_t C,
                                    const ActQuant& q, cudaStream_t stream) {
  return absl::UnimplementedError("act_quant_forward_cuda: not implemented yet");
}

absl::Status act_quant_backward_cuda(bf16* dinp, float* dstep, float* doffset, const bf16* dout,
                                     const bf16* inp, int64_t N, int64_t C, const ActQuant& q,
                                     void* workspace, int64_t workspace_bytes,
                                     cudaStream_t stream,
                                     GradWrite dinp_write,
                                     GradWrite dparams,
                                     bf16* out_recompute) {
  return absl::UnimplementedError("act_quant_backward_cuda: not implemented yet");
}

absl::Status act_quant_backward_cuda(bf16* dinp, bf16* dstep, bf16* doffset, const bf16* dout,
                                     const bf16* inp, int64_t N, int64_t C, const ActQuant& q,
                                     void* workspace, int64_t workspace_bytes,
                                     cudaStream_t stream,
                                     GradWrite dinp_write,
                                     GradWrite dparams,
                                     bf16* out_recompute) {
  return absl::UnimplementedError("act_quant_backward_cuda: not implemented yet");
}

absl::Status lsq_act_init_cuda(float* step, float* offset, const bf16* x, int64_t n, int bits,
                               LsqMode mode, const LsqInitOptions& options, void* workspace,
                               int64_t workspace_bytes, cudaStream_t stream) {
  return absl::UnimplementedError("lsq_act_init_cuda: not implemented yet");
}

}  // namespace qtrain::ops
namespace qtrain::ops {
int64_t lsq_weight_backward_cuda_workspace_bytes(int64_t, int64_t, const LsqConfig&) { return 0; }
int64_t act_quant_backward_cuda_workspace_bytes(int64_t, int64_t, const ActQuant&) { return 0; }
int64_t lsq_act_init_cuda_workspace_bytes(int64_t, const LsqInitOptions&) { return 0; }
}  // namespace qtrain::ops
