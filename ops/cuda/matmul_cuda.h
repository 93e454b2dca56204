// Host API of the CUDA linear layer on cuBLASLt: BF16 inputs, fp32 accumulation, bias and GELU
// fused into the GEMM epilogue where cuBLASLt can, fp32 weight gradients accumulated in place
// (beta = 1), a deterministic bias gradient. The reference is ops/matmul.h (+ ops/gelu.h).
// All matrix pointers are device pointers, row-major like the CPU ops; work is queued on
// `stream`.
#ifndef QTRAIN_OPS_CUDA_MATMUL_CUDA_H_
#define QTRAIN_OPS_CUDA_MATMUL_CUDA_H_

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ops/cuda/bf16.h"
#include "ops/cuda/grad_write.h"

typedef struct CUstream_st* cudaStream_t;

namespace qtrain::ops {

// kAuto: fuse bias/GELU into cuBLASLt's epilogue when it offers an algorithm for the shapes and
// alignments at hand, else run a plain GEMM plus our own epilogue kernel. kNever: always the
// latter (one more rounding to BF16 between GEMM and epilogue; the tests use it to cover that
// branch).
enum class EpilogueFusion { kAuto, kNever };

enum class Activation { kNone, kGelu };

// Owns the cuBLASLt handle, its workspace and a cache of heuristic choices per problem shape.
// One per device and thread of control; calls on one context are serialized by a mutex.
class MatmulContext {
 public:
  static constexpr int64_t kDefaultWorkspaceBytes = 32 << 20;  // what cuBLAS asks for on Hopper

  // Needs a CUDA device (Unavailable without one).
  static absl::StatusOr<std::unique_ptr<MatmulContext>> Create(
      EpilogueFusion fusion = EpilogueFusion::kAuto,
      int64_t workspace_bytes = kDefaultWorkspaceBytes);
  ~MatmulContext();
  MatmulContext(const MatmulContext&) = delete;
  MatmulContext& operator=(const MatmulContext&) = delete;

  EpilogueFusion fusion() const;
  // GEMMs that ran with a fused epilogue / with the separate epilogue kernel since creation
  // (so tests can tell which branch ran).
  int64_t fused_epilogues() const;
  int64_t unfused_epilogues() const;

  struct Impl;
  Impl* impl() { return impl_.get(); }

 private:
  explicit MatmulContext(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// out (N,OC) = act(inp (N,C) @ weight (OC,C)^T + bias (OC)); bias may be null.
// act == kGelu needs pre_act (N,OC): it receives the BF16 pre-activation that backward needs;
// with kNone pre_act must be null. out must not alias the inputs.
absl::Status matmul_forward_cuda(MatmulContext& ctx, bf16* out, const bf16* inp,
                                 const bf16* weight, const bf16* bias, int N, int C, int OC,
                                 cudaStream_t stream, Activation act = Activation::kNone,
                                 bf16* pre_act = nullptr);

// Workspace bytes of matmul_backward_cuda (the bias gradient's partial sums); 0 when the
// caller passes no dbias.
int64_t matmul_backward_cuda_workspace_bytes(int N, int OC);

// dinp (N,C) += dout (N,OC) @ weight (OC,C)  (BF16, the sum rounded once; skipped if null);
// dweight (OC,C) += dout^T @ inp (N,C)        (fp32, skipped if null);
// dbias (OC) += column sums of dout           (fp32, deterministic, skipped if null).
// With dinp_gelu_pre (N,C) non-null, inp was gelu(dinp_gelu_pre) and dinp is OVERWRITTEN with
// the gradient with respect to dinp_gelu_pre: (dout @ weight) * gelu'(dinp_gelu_pre) (the
// GELU's output gradient has no other consumer, so nothing is lost by not accumulating).
// dparams == kOverwrite: dweight and dbias are written (=) instead of accumulated; likewise
// dinp with dinp_write == kOverwrite.
absl::Status matmul_backward_cuda(MatmulContext& ctx, bf16* dinp, float* dweight, float* dbias,
                                  const bf16* dout, const bf16* inp, const bf16* weight, int N,
                                  int C, int OC, void* workspace, int64_t workspace_bytes,
                                  cudaStream_t stream, const bf16* dinp_gelu_pre = nullptr,
                                  GradWrite dparams = GradWrite::kAccumulate,
                                  GradWrite dinp_write = GradWrite::kAccumulate);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_CUDA_MATMUL_CUDA_H_
