// Phi on cuBLAS/cuSOLVER (lowrank_cuda.h).
// (Stub: the implementation lands next; every entry point returns Unimplemented.)
#include "ops/cuda/lowrank_cuda.h"

namespace qtrain::ops {

absl::Status ReleaseScratch() {
  return absl::UnimplementedError("ReleaseScratch: not implemented yet");
}

absl::Status phi_gamma_cuda(float* gamma, int rmax, int k, float u, cudaStream_t stream) {
  return absl::UnimplementedError("phi_gamma_cuda: not implemented yet");
}

absl::Status phi_product_cuda(PhiContext& ctx, float* P, const float* L, const float* R,
                              const float* gamma, int OC, int C, int rmax, int k,
                              void* workspace, int64_t workspace_bytes, cudaStream_t stream) {
  return absl::UnimplementedError("phi_product_cuda: not implemented yet");
}

absl::Status phi_backward_cuda(PhiContext& ctx, float* dL, float* dR, const float* dW_eff,
                               const float* L, const float* R, const float* gamma, int OC,
                               int C, int rmax, int k, void* workspace, int64_t workspace_bytes,
                               cudaStream_t stream, GradWrite write) {
  return absl::UnimplementedError("phi_backward_cuda: not implemented yet");
}

absl::Status phi_backward_cuda(PhiContext& ctx, bf16* dL, bf16* dR, const bf16* dW_eff,
                               const bf16* L, const bf16* R, const float* gamma, int OC, int C,
                               int rmax, int k, void* workspace, int64_t workspace_bytes,
                               cudaStream_t stream, GradWrite write) {
  return absl::UnimplementedError("phi_backward_cuda: not implemented yet");
}

absl::Status phi_factorize_cuda(PhiContext& ctx, float* L, float* R, const float* M, int OC,
                                int C, int rmax, int k, cudaStream_t stream,
                                std::vector<double>* top_singular_values) {
  return absl::UnimplementedError("phi_factorize_cuda: not implemented yet");
}

absl::Status phi_refactorize_cuda(PhiContext& ctx, float* L, float* R, int OC, int C, int rmax,
                                  int k_in, int k_out, cudaStream_t stream) {
  return absl::UnimplementedError("phi_refactorize_cuda: not implemented yet");
}

}  // namespace qtrain::ops
namespace qtrain::ops {
struct PhiContext::Impl {};
PhiContext::PhiContext(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
PhiContext::~PhiContext() = default;
absl::StatusOr<std::unique_ptr<PhiContext>> PhiContext::Create() {
  return absl::UnimplementedError("PhiContext: not implemented yet");
}
absl::Status PhiContext::ReleaseScratch() { return absl::OkStatus(); }
int64_t PhiContext::scratch_bytes() const { return 0; }
int64_t phi_product_cuda_workspace_bytes(int, int) { return 0; }
int64_t phi_backward_cuda_workspace_bytes(int, int, int) { return 0; }
}  // namespace qtrain::ops
