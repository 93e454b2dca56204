// Host API of the FP8 GEMMs: out (N,OC) = X (N,K) . W (OC,K)^T on FP8 codes with per-tensor or
// block (1x128 / 128x128) scales, fp32 accumulation, BF16/fp32/FP8 output, bias and GELU
// epilogues — through cuBLASLt where it supports the case (sharing a MatmulContext's handle and
// workspace), else through our own tensor-core kernel that applies the block scales when it
// promotes each 128-wide K chunk's partial sums to fp32 (DeepSeek-V3's scheme). The reference is
// the CPU GEMM over the decoded codes (ops/quant/fp8.h decode, ops/matmul.h). All pointers are
// device pointers; work is queued on `stream`; no host synchronization.
//
// Both operands are row-major with K contiguous (Hopper's FP8 GEMMs take only this "TN" form),
// so each GEMM of an FP8 Linear y = x W^T maps onto fp8_matmul_cuda as:
//   fprop  y  (N,OC) = x (N,C)[E4M3] . W (OC,C)^T[E4M3]       X = x,    W = W,    K = C;
//   dgrad  dx (N,C)  = dy (N,OC)[E5M2] . (W^T (C,OC))^T[E4M3]  X = dy,   W = W^T,  K = OC;
//   wgrad  dW (OC,C) = dy^T (OC,N)[E5M2] . (x^T (C,N))^T[E4M3] X = dy^T, W = x^T,  K = N
//          (fp32 output with GradWrite::kAccumulate, or BF16 through an fp32 scratch).
// The transposed copies come from the casts that write the codes (fp8_cast_cuda's out_t,
// fp8_transpose_cuda, fp8_block_quantize_*_cuda). In the block recipe everything is E4M3 and
// the operands are: fprop x 1x128 + W 128x128; dgrad dy 1x128 + W^T 128x128; wgrad dy^T 1x128
// (tiles along N) + x^T 1x128 (tiles along N) — the combinations cuBLASLt offers on sm_90
// (not 128x128 with 128x128).
#ifndef QTRAIN_OPS_CUDA_MATMUL_FP8_CUDA_H_
#define QTRAIN_OPS_CUDA_MATMUL_FP8_CUDA_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ops/cuda/bf16.h"
#include "ops/cuda/grad_write.h"
#include "ops/cuda/matmul_cuda.h"
#include "ops/quant/fp8.h"

typedef struct CUstream_st* cudaStream_t;

namespace qtrain::ops {

// How an operand's codes are scaled. scale_inv holds the dequantization factors (1 / scale).
enum class Fp8ScaleLayout {
  kPerTensor,     // one float
  kTile1x128,     // (ceil(K/128), rows) floats, rows contiguous (fp8_quantize_1x128's layout)
  kBlock128x128,  // (ceil(rows/128), scale_ld) floats (fp8_quantize_128x128's layout)
};

// One GEMM operand: codes (rows, K) row-major, K contiguous (rows = N for X, OC for W).
struct Fp8Operand {
  const uint8_t* codes = nullptr;
  Fp8Format format = Fp8Format::kE4M3;
  Fp8ScaleLayout scaling = Fp8ScaleLayout::kPerTensor;
  const float* scale_inv = nullptr;  // device
  // kBlock128x128: the grid's row stride; 0 means fp8_block_scale_ld(K) (what
  // fp8_block_quantize_weight_cuda writes). Unused otherwise.
  int64_t scale_ld = 0;
};

enum class Fp8OutType { kBf16, kFp32, kFp8 };

struct Fp8MatmulOutput {
  void* data = nullptr;  // (N, OC): bf16, float or FP8 codes per `type`
  Fp8OutType type = Fp8OutType::kBf16;
  // kBf16/kFp32: kAccumulate adds the product to what `data` holds (beta = 1; a BF16 sum is
  // formed in fp32 and rounded once, through an fp32 scratch of N*OC floats that the context
  // keeps). kFp8 output is always written.
  GradWrite write = GradWrite::kOverwrite;
  // kFp8 only: codes = encode(value * *scale) (satfinite), and *amax = max(*amax, max |value|)
  // over the unscaled values (after bias and GELU), atomically; amax may be null. Per-tensor
  // operands only (cuBLASLt has no FP8 output with block scales).
  Fp8Format fp8_format = Fp8Format::kE4M3;
  const float* fp8_scale = nullptr;
  float* fp8_amax = nullptr;
};

// kFast: cuBLASLt's CUBLASLT_MATMUL_DESC_FAST_ACCUM (Hopper's FP8 tensor cores keep partial
// sums at reduced precision over the whole K loop; faster; fprop's default). kSplit: partial
// sums promoted to fp32 at intervals (dgrad and wgrad's default). Block-scaled GEMMs always
// promote once per 128-wide K chunk (that is where their scales apply), so kFast is ignored
// for them. Our own kernel accumulates every mma in fp32 either way.
enum class Fp8Accumulation { kFast, kSplit };

// kAuto: cuBLASLt where it has an algorithm for the problem, else our kernel (the context
// counts which ran). kCublasLt: cuBLASLt only; a problem it declines gives Unimplemented naming
// cuBLASLt's status and the problem. kOwnKernel: always our kernel (tests, and GPUs/cuBLAS
// versions without the block-scaled modes).
enum class Fp8GemmBackend { kAuto, kCublasLt, kOwnKernel };

struct Fp8MatmulOptions {
  const bf16* bias = nullptr;  // (OC), added before the activation
  // kGelu: out = gelu(pre), and pre_act (N,OC) receives the BF16 pre-activation (bias added)
  // that the backward needs — cuBLASLt's GELU_AUX(_BIAS) epilogue; with FP8 output that is the
  // GELU output cast to FP8 in the epilogue (fc1 -> fc2). Where cuBLASLt declines it, the GEMM
  // writes pre_act and our kernel applies GELU and the output cast (one more read of pre_act).
  Activation act = Activation::kNone;
  bf16* pre_act = nullptr;
  Fp8Accumulation accumulation = Fp8Accumulation::kFast;
  Fp8GemmBackend backend = Fp8GemmBackend::kAuto;
};

// What ran for one problem (Fp8MatmulContext::report), for tests and benchmarks.
struct Fp8GemmRecord {
  std::string problem;  // "m=768 n=16384 k=768 A=e4m3 B=e4m3 D=bf16 scale=tensor,tensor ..."
  bool cublaslt = false;  // false: our kernel
  std::string why_not;    // cuBLASLt's status when it declined (kAuto fell back)
};

// FP8 GEMMs on a MatmulContext's cuBLASLt handle and workspace (its mutex serializes the use;
// same one-stream-at-a-time rule). Keeps its own algorithm cache (heuristic first choice per
// problem, pointer alignments included) and the scratch of BF16 accumulation.
class Fp8MatmulContext {
 public:
  // `base` must outlive the context. Unavailable without a device.
  static absl::StatusOr<std::unique_ptr<Fp8MatmulContext>> Create(MatmulContext* base);
  ~Fp8MatmulContext();
  Fp8MatmulContext(const Fp8MatmulContext&) = delete;
  Fp8MatmulContext& operator=(const Fp8MatmulContext&) = delete;

  int64_t cublaslt_calls() const;
  int64_t own_kernel_calls() const;
  // One record per distinct problem, in the order first met.
  std::vector<Fp8GemmRecord> report() const;

  struct Impl;
  Impl* impl() { return impl_.get(); }

 private:
  explicit Fp8MatmulContext(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// out (N,OC) (=|+=) act(X (N,K) . W (OC,K)^T * scales + bias).
// Validates (InvalidArgument naming the value): N, K, OC >= 1; non-null codes and scale_inv;
// operand formats E4M3 x E4M3, E4M3 x E5M2 or E5M2 x E4M3 (what Hopper's FP8 tensor cores
// take); FP8 output only with per-tensor operands, an fp8_scale and write = kOverwrite; pre_act
// given exactly with kGelu; out must not alias the inputs.
// cuBLASLt runs the problem when K, N, OC are multiples of 16 and every pointer is 16-byte
// aligned (its FP8 requirements) and it offers an algorithm; block scales further need N and
// OC multiples of 4 and 16-byte aligned scale arrays.
absl::Status fp8_matmul_cuda(Fp8MatmulContext& ctx, const Fp8MatmulOutput& out,
                             const Fp8Operand& x, const Fp8Operand& w, int N, int K, int OC,
                             const Fp8MatmulOptions& options, cudaStream_t stream);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_CUDA_MATMUL_FP8_CUDA_H_
