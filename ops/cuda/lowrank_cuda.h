// Host API of QVGen's auxiliary low-rank module Phi on the GPU, in weight space: the rank-k
// product L diag(gamma) R that the weight quantizer adds onto Q(W) (W_eff = Q(W) + L diag(gamma)
// R, formed once per step, so the forward stays one GEMM), the gradients of L and R from the
// weight gradient, the rank-decay gamma, and the SVD (re-)factorisations by cuSOLVER in fp64
// (init from W - Q(W); the kept half at each rank-decay period end). The references are
// ops/lowrank.h (lowrank_factorize; lowrank_forward/backward in activation space, which is the
// same map: Q(x) (Q(W) + L G R)^T = Q(x) Q(W)^T + (Q(x) R^T) G L^T) and trainer/linear.cc
// (InitQuantizers, ApplyRankSchedule, AddPhiProduct). L (OC, rmax) and R (rmax, C) are
// row-major with only their first k columns / rows active, as on the CPU. Device pointers;
// work is queued on `stream`.
#ifndef QTRAIN_OPS_CUDA_LOWRANK_CUDA_H_
#define QTRAIN_OPS_CUDA_LOWRANK_CUDA_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ops/cuda/bf16.h"
#include "ops/cuda/grad_write.h"

typedef struct CUstream_st* cudaStream_t;

namespace qtrain::ops {

// Owns a cuBLAS and a cuSOLVER handle (and the factorisations' fp64 scratch, grown on first use
// of a larger shape and kept; ReleaseScratch() frees it, e.g. after the init). One per device
// and thread of control; not thread-safe; each call sets the handles' stream to its own.
class PhiContext {
 public:
  // Unavailable without a CUDA device.
  static absl::StatusOr<std::unique_ptr<PhiContext>> Create();
  ~PhiContext();
  PhiContext(const PhiContext&) = delete;
  PhiContext& operator=(const PhiContext&) = delete;

  // Frees the factorisations' scratch (waits for the device). The next factorisation
  // allocates again.
  absl::Status ReleaseScratch();
  int64_t scratch_bytes() const;

  struct Impl;
  Impl* impl() { return impl_.get(); }

 private:
  explicit PhiContext(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// gamma (rmax) for rank k within a decay period at position u = (1 + cos(pi t / T)) / 2 (the
// host computes u in float exactly as Linear::ApplyRankSchedule): gamma[j] = 1 for j < k / 2,
// u for k / 2 <= j < k, 0 beyond. Before the decay starts (or with decay_period 0) pass u = 1.
// A launch with scalar arguments: no host-to-device copy in the step.
absl::Status phi_gamma_cuda(float* gamma, int rmax, int k, float u, cudaStream_t stream);

// Workspace bytes of phi_product_cuda: L[:, :k] diag(gamma) as OC x k fp32.
int64_t phi_product_cuda_workspace_bytes(int OC, int k);

// P (OC, C) fp32 = L[:, :k] diag(gamma[:k]) R[:k, :] (overwritten; all zeros for k == 0), the
// term lsq_weight_forward_cuda adds onto Q(W) in fp32 before the one BF16 rounding of W_eff.
// gamma is folded into L first (each l * gamma[j] rounded in fp32, as AddPhiProduct does), then
// one fp32 SGEMM (cuBLAS, fp32 accumulation, no TF32) with the rank as its inner dimension:
// about 2 * OC * C * k flops, memory-bound on the OC * C write. L, R fp32 masters, gamma (rmax)
// device. The SGEMM's summation order differs from the CPU loop's: agreement to fp32 rounding.
absl::Status phi_product_cuda(PhiContext& ctx, float* P, const float* L, const float* R,
                              const float* gamma, int OC, int C, int rmax, int k,
                              void* workspace, int64_t workspace_bytes, cudaStream_t stream);

// Workspace bytes of phi_backward_cuda: the two fp32 products (k * (OC + C) floats).
int64_t phi_backward_cuda_workspace_bytes(int OC, int C, int k);

// Gradients of L and R from the gradient of W_eff (OC, C) (the weight-gradient GEMM's output,
// BEFORE lsq_weight_backward_cuda masks it in place):
//   dL[:, :k] (+)= dW_eff R[:k]^T diag(gamma),   dR[:k, :] (+)= diag(gamma) L[:, :k]^T dW_eff,
// (lowrank_backward's dL, dR in weight space: dW_eff = dout^T Q(x)), each product one GEMM with
// fp32 accumulation into the workspace, then gamma applied and the result written with
// `write` (kAccumulate: +=, kOverwrite: =; rounded once to the gradient type). Under
// kOverwrite the inactive part (columns >= k of dL, rows >= k of dR) is written 0, so a
// deferred-zero gradient buffer holds no stale values; under kAccumulate it is left alone.
// gamma (rmax) device. k == 0: nothing but the zeros of kOverwrite.
// fp32 gradients: dW_eff, L, R fp32 (the masters).
absl::Status phi_backward_cuda(PhiContext& ctx, float* dL, float* dR, const float* dW_eff,
                               const float* L, const float* R, const float* gamma, int OC,
                               int C, int rmax, int k, void* workspace, int64_t workspace_bytes,
                               cudaStream_t stream, GradWrite write = GradWrite::kAccumulate);
// BF16 gradients: dW_eff BF16 and L, R their BF16 copies (params_bf16), as the forward GEMMs
// read them; the products still accumulate in fp32.
absl::Status phi_backward_cuda(PhiContext& ctx, bf16* dL, bf16* dR, const bf16* dW_eff,
                               const bf16* L, const bf16* R, const float* gamma, int OC, int C,
                               int rmax, int k, void* workspace, int64_t workspace_bytes,
                               cudaStream_t stream, GradWrite write = GradWrite::kAccumulate);

// Best rank-k factorisation of M (OC, C) fp32 as lowrank_factorize: L[:, :k] = U_k sqrt(S_k),
// R[:k, :] = sqrt(S_k) V_k^T, the remaining columns of L and rows of R set to 0;
// k <= min(OC, C, rmax). Phi's init: M = W - Q(W) (lsq_weight_forward_cuda's `residual`),
// k = rmax. In fp64: M is widened, the Gram matrix of its smaller side formed (cublasDsyrk),
// its top-k eigenpairs taken (cusolverDnDsyevdx, eigenvalue index range), and the other side's
// vectors formed as M V / sigma (or U^T M / sigma) by one DGEMM; components with
// sigma <= 1e-10 * sigma_max get L, R = 0 (their share of the product is negligible). The
// Gram matrix squares the condition number, which costs nothing for the top components in
// fp64 (relative errors ~1e-16 * (sigma_max / sigma_j)^2): L R agrees with the CPU's BDCSVD
// product to fp32 rounding unless sigma_k and sigma_{k+1} nearly coincide (then the rank-k
// truncation itself is ill-defined and neither is "right"). Factors differ from the CPU's by
// the signs of the singular vector pairs: compare products. Cost at GPT-2 1.5B shapes
// (6400 x 1600): the fp64 Gram (~16 GFLOP) and a 1600 x 1600 eigensolve.
// SYNCHRONIZES the stream (the solver's info flag is checked; the singular values are copied
// back when asked for): for the init and the period ends, not for every step.
// top_singular_values, when non-null, receives sigma_1 >= ... >= sigma_k.
absl::Status phi_factorize_cuda(PhiContext& ctx, float* L, float* R, const float* M, int OC,
                                int C, int rmax, int k, cudaStream_t stream,
                                std::vector<double>* top_singular_values = nullptr);

// Re-factorisation at a rank-decay period end (Linear::ApplyRankSchedule): the matrix
// M = L[:, :k_in] R[:k_in, :] (gamma 1: the kept top half) is re-factorised at rank k_out
// (<= k_in <= min(OC, C, rmax)) in place, as lowrank_factorize(L, R, M, ..., k_out) would,
// without ever forming M: QR of L[:, :k_in] and of R[:k_in, :]^T (cusolverDnDgeqrf/Dorgqr, fp64),
// SVD of the k_in x k_in product of their triangles (cusolverDnDgesvd), then the rotations.
// The schedule calls it with k_in = k_out = keep = k / 2 after dropping the bottom half; for
// keep == 0 the model just zeroes L and R. Columns >= k_out of L and rows >= k_out of R are
// set to 0. The model resets the AdamW moments of L and R afterwards (the `reset` list of
// ApplyRankSchedule). SYNCHRONIZES the stream (solver info).
absl::Status phi_refactorize_cuda(PhiContext& ctx, float* L, float* R, int OC, int C, int rmax,
                                  int k_in, int k_out, cudaStream_t stream);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_CUDA_LOWRANK_CUDA_H_
