// Host API of the INT8 tensor-core forward GEMM of QAT Linears with symmetric per-channel
// weights and symmetric per-token or per-tensor activations (W8A8, W4A8, and also W4A4 /
// W8A4: Hopper has no INT4 MMA, but every code of up to 8 bits is exact in int8): cuBLASLt
// INT8 GEMM with int32 accumulation into a scratch, then our epilogue kernel applying the
// weight and activation scales and the bias and writing BF16. The reference is the fake-quant
// BF16 forward, out = Q(x) Q(W)^T + b (ops/matmul.h on ops/quant/lsq.h's outputs). Device
// pointers, row-major like matmul_cuda.h; work is queued on `stream`.
//
// Why scales in our own epilogue: cuBLASLt's IMMA kernels write int32 (scale type int32) or
// int8 (fp32 alpha, optionally one per row of D); neither gives BF16 with a per-column
// (per-token) scale (cuBLASLt's outer-vector scale mode is documented for its FP8 GEMMs). The
// int32 result therefore goes through a scratch, in row chunks sized so that a chunk stays in
// L2 (Int8MatmulContext::scratch_bytes), and the epilogue reads it from there.
//
// What does not map (use the BF16 fake-quant GEMM): per-group weight steps (the scale varies
// along the reduced dimension), LSQ+ offsets (asymmetric codes: the offset terms would need
// row/column sums of the codes), Phi before it decays to rank 0 (W_eff is off the grid).
// Shape constraints (cuBLASLt IMMA, ORDER_COL, "TN"): C (the reduced dimension) and OC
// multiples of 4 (GPT-2's are multiples of 64); x_codes and w_codes 16-byte aligned; |acc| <
// 2^31: C * 128 * 128 < 2^31, i.e. C < 131072.
#ifndef QTRAIN_OPS_CUDA_MATMUL_INT8_CUDA_H_
#define QTRAIN_OPS_CUDA_MATMUL_INT8_CUDA_H_

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ops/cuda/bf16.h"

typedef struct CUstream_st* cudaStream_t;

namespace qtrain::ops {

// Owns the cuBLASLt handle, its workspace, the int32 scratch and a cache of algorithm choices
// per problem shape. One per device and thread of control; calls are serialized by a mutex and
// must stay on one stream at a time (the scratch is shared).
class Int8MatmulContext {
 public:
  static constexpr int64_t kDefaultWorkspaceBytes = 32 << 20;
  // 24 MiB of int32 per chunk: well inside the H200's 50 MB L2 next to the chunk's operands.
  static constexpr int64_t kDefaultScratchBytes = 24 << 20;

  // Unavailable without a CUDA device.
  static absl::StatusOr<std::unique_ptr<Int8MatmulContext>> Create(
      int64_t workspace_bytes = kDefaultWorkspaceBytes,
      int64_t scratch_bytes = kDefaultScratchBytes);
  ~Int8MatmulContext();
  Int8MatmulContext(const Int8MatmulContext&) = delete;
  Int8MatmulContext& operator=(const Int8MatmulContext&) = delete;

  int64_t scratch_bytes() const;
  // Rows of one GEMM chunk for OC output channels: scratch_bytes / (4 OC), at least 1.
  int64_t chunk_rows(int OC) const;

  struct Impl;
  Impl* impl() { return impl_.get(); }

 private:
  explicit Int8MatmulContext(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Where the activation codes' scale comes from.
enum class Int8ActScale {
  kPerTensor,  // x_scale: one device float (the learned step, as the quantizer clamped it)
  kPerToken,   // x_scale: N device floats (ActQuant::token_scales)
};

// out (N, OC) BF16 = x (N, C) W (OC, C)^T + bias, with x = x_codes * x_scale (per token or per
// tensor) and W = w_codes * w_scale[o] (per channel, lsq_weight_forward_cuda's codes and steps):
//   acc[n, o] = sum_c x_codes[n, c] w_codes[o, c]           (int32, exact)
//   out[n, o] = bf16( fl( fl(float(acc) * w_scale[o]) * xs ) + bias[o] )
// with xs = x_scale[n] or x_scale[0], every operation one IEEE fp32 rounding (__fmul_rn,
// __fadd_rn) and one rounding to BF16 (bias may be null: no add). In exact arithmetic this is
// exactly the fake-quant product (q = code * step are the values the fake-quant GEMM would
// multiply), so it differs from the exact result by the output's BF16 rounding plus a few
// fp32 roundings (float(acc) is exact below 2^24); the BF16 fake-quant GEMM itself rounds each
// q to BF16 first (2^-9 relative each) and its product to BF16 before the bias. The codes must
// be of the quantizers' ranges (|code| <= 128); anything in int8 is accepted.
absl::Status matmul_int8_forward_cuda(Int8MatmulContext& ctx, bf16* out, const int8_t* x_codes,
                                      const float* x_scale, Int8ActScale x_scale_kind,
                                      const int8_t* w_codes, const float* w_scale,
                                      const bf16* bias, int N, int C, int OC,
                                      cudaStream_t stream);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_CUDA_MATMUL_INT8_CUDA_H_
