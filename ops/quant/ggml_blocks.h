// GGUF/ggml tensor types qtrain writes and reads: F32, F16 and the block formats Q4_0, Q4_1
// and Q8_0 (32 weights per block, one fp16 scale, Q4_1 also an fp16 minimum), built from
// integer codes and scales -- no re-quantization -- and dequantized as ggml defines them:
//   Q4_0: 18 bytes  {fp16 d; uint8 qs[16]}  w[j] = (q[j] - 8) * d, q in [0, 15]
//   Q4_1: 20 bytes  {fp16 d; fp16 m; uint8 qs[16]}  w[j] = q[j] * d + m
//   Q8_0: 34 bytes  {fp16 d; int8 qs[32]}  w[j] = qs[j] * d
// with the 4-bit codes of element j in the low nibble of qs[j] and those of element j + 16 in
// its high nibble (j < 16). Checked against ggml-common.h / ggml-quants.c of llama.cpp.
#ifndef QTRAIN_OPS_QUANT_GGML_BLOCKS_H_
#define QTRAIN_OPS_QUANT_GGML_BLOCKS_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qtrain::ops {

enum class GgmlType : uint32_t { kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8 };

inline constexpr int kGgmlBlock = 32;

// "F32", "F16", "Q4_0", "Q4_1", "Q8_0"; "type <n>" for other values.
const char* ggml_type_name(uint32_t type);
// True for the types above.
bool ggml_type_supported(uint32_t type);
// Bytes of one row of n elements; InvalidArgument when n is not a multiple of the block size.
absl::StatusOr<int64_t> ggml_row_bytes(GgmlType type, int64_t n);

// From LSQ codes (n a multiple of 32) and per-block fp16 scale bits (n / 32 of them):
//   Q4_0 takes symmetric 4-bit codes in [-8, 7] (stored as code + 8),
//   Q8_0 symmetric 8-bit codes in [-128, 127],
//   Q4_1 asymmetric 4-bit codes in [0, 15] with the fp16 bits of the offsets in `m`.
// InvalidArgument naming the first code outside the range (nothing is written then).
absl::Status ggml_pack_q4_0(uint8_t* out, const int32_t* codes, const uint16_t* d, int64_t n);
absl::Status ggml_pack_q8_0(uint8_t* out, const int32_t* codes, const uint16_t* d, int64_t n);
absl::Status ggml_pack_q4_1(uint8_t* out, const int32_t* codes, const uint16_t* d,
                            const uint16_t* m, int64_t n);

// out (n floats) from one row of `type` data: F32 copied, F16 widened, blocks dequantized with
// the formulas above in float (the product rounded, then the minimum added: no fused
// multiply-add, so Q4_1 equals LSQ+'s r * s + beta bit for bit).
absl::Status ggml_dequantize(GgmlType type, const uint8_t* in, float* out, int64_t n);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_QUANT_GGML_BLOCKS_H_
