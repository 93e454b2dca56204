// Host API of the CUDA linear layer on cuBLASLt: BF16 inputs, fp32 accumulation, bias and GELU
// fused into the GEMM epilogue where cuBLASLt can, weight gradients (fp32 or BF16) accumulated
// in place, a deterministic bias gradient (our column sum overlapped with the GEMMs, or
// cuBLASLt's BGRADB epilogue), and optional autotuning of cuBLASLt's algorithm choice. The
// reference is ops/matmul.h (+ ops/gelu.h). All matrix pointers are device pointers, row-major
// like the CPU ops; work is queued on `stream`.
#ifndef QTRAIN_OPS_CUDA_MATMUL_CUDA_H_
#define QTRAIN_OPS_CUDA_MATMUL_CUDA_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ops/cuda/bf16.h"
#include "ops/cuda/grad_write.h"

typedef struct CUstream_st* cudaStream_t;

namespace qtrain::ops {

// kAuto: fuse bias/GELU (forward) and the GELU gradient (backward) into cuBLASLt's epilogue
// when it offers an algorithm for the shapes and alignments at hand, else run a plain GEMM plus
// our own kernel. The bias gradient is our deterministic column sum of dout, run on a side
// stream concurrently with the call's GEMMs (memory-bound beside compute-bound): on an H100 with
// cuBLAS 13.0 that beat cuBLASLt's BGRADB epilogue at every GPT-2 shape (per 124M layer, N =
// 16384: 399 us for the four weight+bias gradients overlapped, 480 us one after the other,
// 517 us with BGRADB; per 1.5B layer 1538, 1642 and 1752 us).
// kAll: as kAuto, and the bias gradient fused into the weight-gradient GEMM (BGRADB) where
// cuBLASLt offers it (for other GPUs or cuBLAS versions; the tests cover that branch with it).
// kNever: always our kernels (one more rounding to BF16 between GEMM and epilogue; the tests
// use it to cover that branch).
enum class EpilogueFusion { kAuto, kNever, kAll };

enum class Activation { kNone, kGelu };

// What autotuning measured for one GEMM problem (MatmulContext::autotune_report).
struct MatmulTuneRecord {
  // e.g. "backward dweight m=768 n=3072 k=16384 NT D=fp32 beta=1 epilogue=none" (cuBLASLt's
  // column-major terms: D (m x n) = op(A) op(B), k the reduced dimension).
  std::string problem;
  int candidates = 0;       // cuBLASLt's heuristic candidates that ran
  int chosen = 0;           // the chosen one's index in the heuristic's order (0 = its pick)
  double default_ms = 0;    // mean time of heuristic #0 (NaN if it failed to run)
  double chosen_ms = 0;     // mean time of the chosen candidate
};

// Owns the cuBLASLt handle, its workspace and a cache of algorithm choices per problem (shape,
// types, epilogue, pointer alignments). One per device and thread of control; calls on one
// context are serialized by a mutex, and its work must stay on one stream at a time (the
// cuBLASLt workspace, the BF16 gradient scratch and the side stream of the bias gradient are
// shared by all calls).
//
// Autotuning (on by default): the first call of a problem asks cuBLASLt's heuristic for up to
// 8 candidate algorithms, times each on the caller's stream (one warm-up, then two rounds of 5
// runs between CUDA events, the better round counting; this waits for the stream) and keeps
// the fastest, heuristic #0 unless another is at least 2% faster; candidates that fail are
// skipped. The timing runs never change what the caller sees: a GEMM with beta != 0 is timed
// into a temporary buffer of D's size, and one with beta = 0 writes only outputs that the real
// call then overwrites in full. Off, the heuristic's first choice is taken. On an H100 (cuBLAS
// 13.0) at GPT-2 shapes the heuristic's pick was kept for most GEMMs and the others gained 2-7%
// in isolation, which end-to-end timings did not resolve from noise (about 5%).
// Either way each problem's algorithm is fixed once chosen, and a fixed cuBLASLt algorithm
// gives bit-identical results run to run (its split-K reduction schemes sum in a fixed order);
// but timing noise can make the autotuned choice, and so the rounding of results, differ
// between processes and machines: deterministic training turns autotuning off. Autotuning is
// skipped (the heuristic's first choice kept) while the stream is captured into a CUDA graph.
class MatmulContext {
 public:
  static constexpr int64_t kDefaultWorkspaceBytes = 32 << 20;  // what cuBLAS asks for on Hopper
  static constexpr int kAutotuneCandidates = 8;

  // Needs a CUDA device (Unavailable without one).
  static absl::StatusOr<std::unique_ptr<MatmulContext>> Create(
      EpilogueFusion fusion = EpilogueFusion::kAuto,
      int64_t workspace_bytes = kDefaultWorkspaceBytes, bool autotune = true);
  ~MatmulContext();
  MatmulContext(const MatmulContext&) = delete;
  MatmulContext& operator=(const MatmulContext&) = delete;

  EpilogueFusion fusion() const;
  // GEMMs that ran with a fused epilogue / with a separate epilogue kernel since creation (so
  // tests can tell which branch ran). The bias gradient counts too: one fused per BGRADB GEMM
  // (kAll), one unfused per run of our column sum.
  int64_t fused_epilogues() const;
  int64_t unfused_epilogues() const;

  // Whether the GELU (forward) and its gradient (backward) go into cuBLASLt's epilogue
  // (GELU_AUX[_BIAS], DGELU) under kAuto/kAll; default on. Off: the GEMM (with the bias epilogue
  // in forward) writes the pre-activation / the output gradient, and our vectorised kernel
  // applies GELU / multiplies by GELU' (one more read and write of that tensor; the GELU is
  // then taken of the BF16-rounded pre-activation, which is what backward sees anyway). On the
  // H100 that was 1.1-1.6% slower per GPT-2 training step than the fused epilogues
  // (docs/benchmarks.md); it is there for GPUs and cuBLAS versions where it is not.
  bool gelu_fusion() const;
  void set_gelu_fusion(bool on);

  bool autotune() const;
  // Switching forgets the choices made so far, so that every problem is chosen again under the
  // new setting (the report is kept).
  void set_autotune(bool on);
  // One record per problem autotuned since creation, in the order first met.
  std::vector<MatmulTuneRecord> autotune_report() const;

  // The cuBLASLt handle (a cublasLtHandle_t), its workspace and the mutex that serializes their
  // use, for sibling GEMM wrappers that share them (Fp8MatmulContext, matmul_fp8_cuda.h): a
  // caller holds `mutex` while it queues work that uses the handle or the workspace.
  struct Shared {
    void* handle = nullptr;
    void* workspace = nullptr;
    size_t workspace_bytes = 0;
    std::mutex* mutex = nullptr;
  };
  Shared shared();

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

// Workspace bytes of matmul_backward_cuda when the caller passes dbias (0 when N or OC is not
// positive): the column sum's partial sums, which also hold the OC fp32 values of the fused
// bias gradient when it must be added rather than written. The same for both overloads.
int64_t matmul_backward_cuda_workspace_bytes(int N, int OC);

// dinp (N,C) += dout (N,OC) @ weight (OC,C)  (BF16, skipped if null; cuBLASLt rounds the
//                                             product to BF16 before adding the old dinp);
// dweight (OC,C) += dout^T @ inp (N,C)        (skipped if null);
// dbias (OC) += column sums of dout           (skipped if null; deterministic: our
//                                             fixed-order sum on a side stream that the
//                                             caller's stream waits for before the call's
//                                             later work, or with kAll cuBLASLt's BGRADB).
// With dinp_gelu_pre (N,C) non-null, inp was gelu(dinp_gelu_pre) and dinp is OVERWRITTEN with
// the gradient with respect to dinp_gelu_pre: (dout @ weight) * gelu'(dinp_gelu_pre) (the
// GELU's output gradient has no other consumer, so nothing is lost by not accumulating).
// dparams == kOverwrite: dweight and dbias are written (=) instead of accumulated; likewise
// dinp with dinp_write == kOverwrite. workspace: matmul_backward_cuda_workspace_bytes(N, OC)
// bytes, 4-byte aligned, needed only with dbias.
//
// dweight and dbias are fp32 or BF16 (the model's BF16 gradient option). BF16: the values are
// formed in fp32 and rounded once: kOverwrite writes bf16(value), kAccumulate bf16(old + value)
// (the weight gradient then goes through an fp32 scratch of OC*C values that the context keeps,
// since cuBLASLt would round the product to BF16 before adding the old value).
absl::Status matmul_backward_cuda(MatmulContext& ctx, bf16* dinp, float* dweight, float* dbias,
                                  const bf16* dout, const bf16* inp, const bf16* weight, int N,
                                  int C, int OC, void* workspace, int64_t workspace_bytes,
                                  cudaStream_t stream, const bf16* dinp_gelu_pre = nullptr,
                                  GradWrite dparams = GradWrite::kAccumulate,
                                  GradWrite dinp_write = GradWrite::kAccumulate);
absl::Status matmul_backward_cuda(MatmulContext& ctx, bf16* dinp, bf16* dweight, bf16* dbias,
                                  const bf16* dout, const bf16* inp, const bf16* weight, int N,
                                  int C, int OC, void* workspace, int64_t workspace_bytes,
                                  cudaStream_t stream, const bf16* dinp_gelu_pre = nullptr,
                                  GradWrite dparams = GradWrite::kAccumulate,
                                  GradWrite dinp_write = GradWrite::kAccumulate);
// dinp only, with dweight and dbias written as nullptr literals (which fit both overloads).
inline absl::Status matmul_backward_cuda(MatmulContext& ctx, bf16* dinp, std::nullptr_t dweight,
                                         std::nullptr_t dbias, const bf16* dout, const bf16* inp,
                                         const bf16* weight, int N, int C, int OC,
                                         void* workspace, int64_t workspace_bytes,
                                         cudaStream_t stream,
                                         const bf16* dinp_gelu_pre = nullptr,
                                         GradWrite dparams = GradWrite::kAccumulate,
                                         GradWrite dinp_write = GradWrite::kAccumulate) {
  return matmul_backward_cuda(ctx, dinp, static_cast<float*>(dweight),
                              static_cast<float*>(dbias), dout, inp, weight, N, C, OC, workspace,
                              workspace_bytes, stream, dinp_gelu_pre, dparams, dinp_write);
}

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_CUDA_MATMUL_CUDA_H_
