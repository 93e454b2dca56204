// FP8 (E4M3 "fn" and E5M2) conversions, fake quantization and per-tensor scaling (delayed and
// current) for the CPU reference. Bit-exact with CUDA's __nv_cvt_float_to_fp8
// (docs/quantization.md).
#ifndef QTRAIN_OPS_QUANT_FP8_H_
#define QTRAIN_OPS_QUANT_FP8_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qtrain::ops {

// E4M3: bias 7, no infinities, NaN = S.1111.111 (0x7F/0xFF), max finite 448.
// E5M2: bias 15, IEEE-like: inf = S.11111.00, NaN = S.11111.{01,10,11}, max finite 57344.
enum class Fp8Format { kE4M3, kE5M2 };

// kSatFinite (the default, and what the trainer uses): finite values beyond the largest finite
// value AND infinities become +-max finite, as __NV_SATFINITE / cvt.rn.satfinite do.
// kNoSat: overflow becomes +-inf (E5M2) or NaN (E4M3, which has no inf), as __NV_NOSAT does.
enum class Fp8Saturation { kSatFinite, kNoSat };

// The canonical NaN code written for every NaN input, whatever its sign or payload (both
// formats; CUDA writes the same).
inline constexpr uint8_t kFp8CanonicalNaN = 0x7F;

// Largest finite value: 448 (E4M3) or 57344 (E5M2).
constexpr float fp8_max(Fp8Format format) { return format == Fp8Format::kE4M3 ? 448.0f : 57344.0f; }

// Round-to-nearest-even of x to the format, subnormals exact, then overflow per `sat`; NaN ->
// kFp8CanonicalNaN; the sign of zero is kept (-0.0 and negative underflow give 0x80). Takes
// double so that float and double callers round the exact value once (float -> double is exact).
uint8_t fp8_encode(double x, Fp8Format format, Fp8Saturation sat = Fp8Saturation::kSatFinite);

// Exact value of a code (every FP8 value is a float). NaN codes give a quiet NaN.
float fp8_decode(uint8_t code, Fp8Format format);

bool fp8_is_nan(uint8_t code, Fp8Format format);
bool fp8_is_inf(uint8_t code, Fp8Format format);  // always false for E4M3

// ---- arrays, scaled. `scale` multiplies into the FP8 range: code = encode(x * scale) ----
// The product x * scale is rounded in F (float in the trainer), then encoded: the GPU kernel
// does the same float multiply followed by cvt.rn.satfinite.
// out (n) codes, in (n). InvalidArgument if scale is not finite and > 0.
template <typename F>
absl::Status fp8_encode_array(uint8_t* out, const F* in, int64_t n, float scale, Fp8Format format);
// out (n) = decode(in) / scale (an IEEE division in F, not a multiply by 1/scale).
template <typename F>
absl::Status fp8_decode_array(F* out, const uint8_t* in, int64_t n, float scale, Fp8Format format);
// Fake quantization: out (n) = decode(encode(in * scale)) / scale, in (n); out may alias in.
// Saturating: +-inf in -> +-fp8_max/scale out, NaN stays NaN. The backward is the identity
// (straight-through), so there is no separate backward op.
template <typename F>
absl::Status fp8_quantize_dequantize(F* out, const F* in, int64_t n, float scale, Fp8Format format);

// max |in[i]| over in (n); 0 for n == 0; inf if any element is infinite, NaN if any is NaN
// (either way the scaling below keeps its previous scale).
template <typename F>
F amax(const F* in, int64_t n);

// scale = fp8_max / amax / 2^margin, rounded in float (the division, then an exact power of
// two). Returns `fallback` when amax is 0, negative, inf or NaN, or when the quotient is not a
// finite positive float (amax so tiny that fp8_max / amax overflows).
float fp8_scale_from_amax(float amax, Fp8Format format, int margin, float fallback);

// Current scaling: the scale for a tensor from that tensor's own amax; fallback 1.
inline float fp8_current_scale(float amax, Fp8Format format, int margin = 0) {
  return fp8_scale_from_amax(amax, format, margin, 1.0f);
}

// ---- Block scaling (DeepSeek-V3's recipe): one FP32 scale per 128 consecutive elements of a
// row (1x128 tiles: activations and gradients) or per 128x128 block (weights). The layouts of
// the scale arrays are those cuBLASLt's block-scaled FP8 GEMMs read on Hopper
// (CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F / BLK128x128_32F), so the CPU reference and the GPU
// kernels (ops/cuda/fp8_cuda.h) share them.
inline constexpr int kFp8BlockSize = 128;

// ceil(n / 128): tiles along a dimension of n elements.
constexpr int64_t fp8_num_blocks(int64_t n) { return (n + kFp8BlockSize - 1) / kFp8BlockSize; }
// The row stride of a 128x128 scale grid as cuBLASLt wants it: ceil(cols / 128) rounded up to a
// multiple of 4.
constexpr int64_t fp8_block_scale_ld(int64_t cols) { return (fp8_num_blocks(cols) + 3) / 4 * 4; }

// The scale of one tile or block from its amax: s = fp8_max / amax (fp8_current_scale with
// margin 0, fallback 1: an all-zero block, or one holding inf/NaN, gets s = 1). Codes are
// encode(x * s) as fp8_encode_array; the GEMMs dequantize with scale_inv = 1.0f / s (an IEEE
// division), which is what the scale arrays below hold.
inline float fp8_block_scale(float block_amax, Fp8Format format) {
  return fp8_current_scale(block_amax, format, 0);
}

// 1x128 tiles along the rows of in (rows, cols), row-major: tile (r, b) is in[r, 128b ..
// min(128b + 128, cols)) (the last tile of a row is shorter when cols % 128 != 0).
//   codes (rows, cols): encode(in * s_(r,b)), exactly as fp8_encode_array with that scale;
//   scale_inv (ceil(cols/128), rows) row-major, i.e. rows contiguous: scale_inv[b * rows + r] =
//     1 / s_(r,b) (cuBLASLt's VEC128_32F layout, "M-major").
// The 128x1 tiles of DeepSeek's backward (a tensor's transpose, quantized along its rows) are
// this function applied to the transposed tensor. rows, cols >= 0.
absl::Status fp8_quantize_1x128(uint8_t* codes, float* scale_inv, const float* in, int64_t rows,
                                int64_t cols, Fp8Format format);

// 128x128 blocks of in (rows, cols), row-major: block (p, b) covers rows [128p, 128p + 128) and
// cols [128b, 128b + 128), clipped at the edges.
//   codes (rows, cols): encode(in * s_(p,b));
//   scale_inv (ceil(rows/128), scale_ld) row-major: scale_inv[p * scale_ld + b] = 1 / s_(p,b),
//     scale_ld >= ceil(cols/128) (cuBLASLt's BLK128x128_32F layout with scale_ld =
//     fp8_block_scale_ld(cols), "K-major"); the padding entries b >= ceil(cols/128) are set to 0.
// The transpose's codes are these codes transposed and its scale grid this grid transposed
// (no re-quantization): a block's scale does not depend on the orientation.
absl::Status fp8_quantize_128x128(uint8_t* codes, float* scale_inv, int64_t scale_ld,
                                  const float* in, int64_t rows, int64_t cols, Fp8Format format);

// out (rows, cols) = decode(codes) * scale_inv of the element's tile or block, one float
// multiply (how the block-scaled GEMMs apply the scales; the per-tensor fp8_decode_array divides
// by the scale instead). scale_ld == 0: the 1x128 layout of fp8_quantize_1x128; scale_ld > 0:
// the 128x128 grid of fp8_quantize_128x128 with that row stride.
absl::Status fp8_dequantize_blocks(float* out, const uint8_t* codes, const float* scale_inv,
                                   int64_t scale_ld, int64_t rows, int64_t cols,
                                   Fp8Format format);

// Delayed scaling (Transformer Engine's recipe): the scale used at step t comes from the amaxes
// of the last `history_len` steps before t. Usage per step:
//   quantize with scaler.scale(); a = amax(tensor); scaler.update(a);
// The history starts as zeros and the scale as 1.
class DelayedScaler {
 public:
  static constexpr int kDefaultHistoryLen = 16;

  // history_len >= 1; margin in [0, 64] (a negative margin would clip the largest values on
  // purpose, which no recipe here wants).
  static absl::StatusOr<DelayedScaler> Create(Fp8Format format,
                                              int history_len = kDefaultHistoryLen, int margin = 0);
  // Rebuilds a scaler from saved state (checkpoint resume): history oldest first, its length
  // is the window; scale must be finite and > 0.
  static absl::StatusOr<DelayedScaler> Restore(Fp8Format format, int margin,
                                               const std::vector<float>& history_oldest_first,
                                               float scale);

  // Appends amax (dropping the oldest entry once the window is full) and recomputes the scale
  // from the window maximum. A NaN or inf amax is stored as +inf: the window maximum is then
  // inf and the previous scale is kept until that entry rolls out (an overflowed step says
  // nothing about the right scale, and one bad step must not zero the scale). A window
  // maximum of 0 (only zeros seen) also keeps the previous scale. Negative amax is stored as
  // its magnitude.
  void update(float amax);

  float scale() const { return scale_; }
  // Maximum over the window (what the scale was computed from).
  float window_amax() const;
  // The window, oldest first; always history_len entries (zeros before the first updates).
  std::vector<float> history() const;
  int history_len() const { return static_cast<int>(ring_.size()); }
  int margin() const { return margin_; }
  Fp8Format format() const { return format_; }

 private:
  DelayedScaler(Fp8Format format, int history_len, int margin)
      : format_(format), margin_(margin), ring_(history_len, 0.0f) {}

  Fp8Format format_;
  int margin_;
  std::vector<float> ring_;  // ring buffer; next_ is the oldest entry, overwritten next
  int next_ = 0;
  float scale_ = 1.0f;
};

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_QUANT_FP8_H_
