// FP8 conversions by integer manipulation of the double's bits (no dependence on the FPU
// rounding mode), scaled array helpers, amax and the delayed/current scaling recipes.
#include "ops/quant/fp8.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>

#include "ops/status_macros.h"

namespace qtrain::ops {
namespace {

struct Fp8Params {
  int mbits;          // explicit mantissa bits
  int bias;           // exponent bias
  int max_code;       // magnitude code of the largest finite value
  int overflow_code;  // magnitude code written for overflow under kNoSat
};

constexpr Fp8Params ParamsOf(Fp8Format format) {
  return format == Fp8Format::kE4M3 ? Fp8Params{3, 7, 0x7E, 0x7F}    // 448; NaN
                                    : Fp8Params{2, 15, 0x7B, 0x7C};  // 57344; inf
}

const char* FormatName(Fp8Format format) { return format == Fp8Format::kE4M3 ? "E4M3" : "E5M2"; }

float DecodeSlow(uint8_t code, Fp8Format format) {
  const Fp8Params p = ParamsOf(format);
  const int mag = code & 0x7F;
  const int be = mag >> p.mbits;
  const int field = mag & ((1 << p.mbits) - 1);
  float v;
  if (format == Fp8Format::kE4M3 && mag == 0x7F) {
    v = std::numeric_limits<float>::quiet_NaN();
  } else if (format == Fp8Format::kE5M2 && be == 31) {
    v = field == 0 ? std::numeric_limits<float>::infinity()
                   : std::numeric_limits<float>::quiet_NaN();
  } else if (be == 0) {  // subnormal: field * 2^(emin - mbits), emin = 1 - bias
    v = std::ldexp(static_cast<float>(field), 1 - p.bias - p.mbits);
  } else {
    v = std::ldexp(static_cast<float>(field + (1 << p.mbits)), be - p.bias - p.mbits);
  }
  return (code & 0x80) ? -v : v;
}

using DecodeTable = std::array<float, 256>;

DecodeTable BuildTable(Fp8Format format) {
  DecodeTable t{};
  for (int c = 0; c < 256; ++c) t[c] = DecodeSlow(static_cast<uint8_t>(c), format);
  return t;
}

const DecodeTable& TableOf(Fp8Format format) {
  static const DecodeTable e4m3 = BuildTable(Fp8Format::kE4M3);
  static const DecodeTable e5m2 = BuildTable(Fp8Format::kE5M2);
  return format == Fp8Format::kE4M3 ? e4m3 : e5m2;
}

absl::Status CheckArrayArgs(const char* op, const void* out, const void* in, int64_t n,
                            float scale) {
  QT_CHECK_ARG(n >= 0, op, ": n = ", n, " must be >= 0");
  QT_CHECK_ARG(n == 0 || (out != nullptr && in != nullptr), op, ": null out or in with n = ", n);
  QT_CHECK_ARG(std::isfinite(scale) && scale > 0.0f, op, ": scale = ", scale,
               " must be finite and > 0");
  return absl::OkStatus();
}

}  // namespace

uint8_t fp8_encode(double x, Fp8Format format, Fp8Saturation sat) {
  const Fp8Params p = ParamsOf(format);
  uint64_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const int sign = (bits >> 63) ? 0x80 : 0;
  const uint64_t mag = bits & 0x7FFFFFFFFFFFFFFFull;
  constexpr uint64_t kInfBits = 0x7FF0000000000000ull;
  if (mag > kInfBits) return kFp8CanonicalNaN;
  const int overflow = sat == Fp8Saturation::kSatFinite ? p.max_code : p.overflow_code;
  if (mag == kInfBits) return static_cast<uint8_t>(sign | overflow);

  // |x| = sig * 2^(e - 52), sig < 2^53 (double subnormals have no hidden bit).
  const int dexp = static_cast<int>(mag >> 52);
  const uint64_t frac = mag & ((1ull << 52) - 1);
  const uint64_t sig = dexp == 0 ? frac : (frac | (1ull << 52));
  const int e = dexp == 0 ? -1022 : dexp - 1023;
  if (sig == 0) return static_cast<uint8_t>(sign);

  // Target exponent: below the format's minimum normal exponent the quantum stops shrinking
  // (subnormals), so everything is counted in units of 2^(et - mbits).
  const int emin = 1 - p.bias;
  int et = e < emin ? emin : e;
  const int shift = 52 - p.mbits + (et - e);
  // shift >= 54 means |x| < 2^53 * 2^(-shift) * quantum <= quantum / 2: rounds to zero
  // (strictly below the tie, since sig < 2^53).
  if (shift >= 54) return static_cast<uint8_t>(sign);
  uint64_t m = sig >> shift;
  const uint64_t rem = sig & ((1ull << shift) - 1);
  const uint64_t half = 1ull << (shift - 1);
  if (rem > half || (rem == half && (m & 1))) ++m;  // ties to even

  const uint64_t hidden = 1ull << p.mbits;
  int be;
  uint64_t field;
  if (m >= hidden) {
    if (m == (hidden << 1)) {  // rounding carried into the next binade
      m >>= 1;
      ++et;
    }
    be = et + p.bias;
    field = m - hidden;
  } else {  // subnormal (et == emin here) or rounded up to the smallest normal above
    be = 0;
    field = m;
  }
  // be can be far above the exponent field for large |x|; compare before narrowing.
  const int64_t code = (static_cast<int64_t>(be) << p.mbits) | static_cast<int64_t>(field);
  if (code > p.max_code) return static_cast<uint8_t>(sign | overflow);
  return static_cast<uint8_t>(sign | static_cast<int>(code));
}

float fp8_decode(uint8_t code, Fp8Format format) { return TableOf(format)[code]; }

bool fp8_is_nan(uint8_t code, Fp8Format format) {
  const int mag = code & 0x7F;
  return format == Fp8Format::kE4M3 ? mag == 0x7F : mag > 0x7C;
}

bool fp8_is_inf(uint8_t code, Fp8Format format) {
  return format == Fp8Format::kE5M2 && (code & 0x7F) == 0x7C;
}

template <typename F>
absl::Status fp8_encode_array(uint8_t* out, const F* in, int64_t n, float scale, Fp8Format format) {
  RETURN_IF_ERROR(CheckArrayArgs("fp8_encode_array", out, in, n, scale));
  const F s = static_cast<F>(scale);
  for (int64_t i = 0; i < n; ++i) out[i] = fp8_encode(static_cast<double>(in[i] * s), format);
  return absl::OkStatus();
}

template <typename F>
absl::Status fp8_decode_array(F* out, const uint8_t* in, int64_t n, float scale, Fp8Format format) {
  RETURN_IF_ERROR(CheckArrayArgs("fp8_decode_array", out, in, n, scale));
  const DecodeTable& table = TableOf(format);
  const F s = static_cast<F>(scale);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<F>(table[in[i]]) / s;
  return absl::OkStatus();
}

template <typename F>
absl::Status fp8_quantize_dequantize(F* out, const F* in, int64_t n, float scale,
                                     Fp8Format format) {
  RETURN_IF_ERROR(CheckArrayArgs("fp8_quantize_dequantize", out, in, n, scale));
  const DecodeTable& table = TableOf(format);
  const F s = static_cast<F>(scale);
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t code = fp8_encode(static_cast<double>(in[i] * s), format);
    out[i] = static_cast<F>(table[code]) / s;
  }
  return absl::OkStatus();
}

template <typename F>
F amax(const F* in, int64_t n) {
  F m = 0;
  for (int64_t i = 0; i < n; ++i) {
    const F a = std::fabs(in[i]);
    if (std::isnan(a)) return a;
    if (a > m) m = a;
  }
  return m;
}

float fp8_scale_from_amax(float amax, Fp8Format format, int margin, float fallback) {
  if (!(amax > 0.0f) || !std::isfinite(amax)) return fallback;
  const float s = std::ldexp(fp8_max(format) / amax, -margin);
  if (!(s > 0.0f) || !std::isfinite(s)) return fallback;
  return s;
}

namespace {

absl::Status CheckBlockArgs(const char* op, const void* codes, const void* scale_inv,
                            const void* data, int64_t rows, int64_t cols) {
  QT_CHECK_ARG(rows >= 0 && cols >= 0, op, ": rows = ", rows, ", cols = ", cols,
               " must be >= 0");
  QT_CHECK_ARG(rows * cols == 0 || (codes != nullptr && scale_inv != nullptr && data != nullptr),
               op, ": null pointer with rows = ", rows, ", cols = ", cols);
  return absl::OkStatus();
}

}  // namespace

absl::Status fp8_quantize_1x128(uint8_t* codes, float* scale_inv, const float* in, int64_t rows,
                                int64_t cols, Fp8Format format) {
  RETURN_IF_ERROR(CheckBlockArgs("fp8_quantize_1x128", codes, scale_inv, in, rows, cols));
  const int64_t nb = fp8_num_blocks(cols);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t c0 = b * kFp8BlockSize, c1 = std::min<int64_t>(cols, c0 + kFp8BlockSize);
      const float* x = in + r * cols;
      const float s = fp8_block_scale(amax(x + c0, c1 - c0), format);
      for (int64_t c = c0; c < c1; ++c) {
        codes[r * cols + c] = fp8_encode(static_cast<double>(x[c] * s), format);
      }
      scale_inv[b * rows + r] = 1.0f / s;
    }
  }
  return absl::OkStatus();
}

absl::Status fp8_quantize_128x128(uint8_t* codes, float* scale_inv, int64_t scale_ld,
                                  const float* in, int64_t rows, int64_t cols, Fp8Format format) {
  RETURN_IF_ERROR(CheckBlockArgs("fp8_quantize_128x128", codes, scale_inv, in, rows, cols));
  const int64_t nb = fp8_num_blocks(cols), np = fp8_num_blocks(rows);
  QT_CHECK_ARG(scale_ld >= nb, "fp8_quantize_128x128: scale_ld = ", scale_ld,
               " must be >= ceil(cols / 128) = ", nb);
  for (int64_t p = 0; p < np; ++p) {
    const int64_t r0 = p * kFp8BlockSize, r1 = std::min<int64_t>(rows, r0 + kFp8BlockSize);
    for (int64_t b = 0; b < scale_ld; ++b) {
      if (b >= nb) {
        scale_inv[p * scale_ld + b] = 0.0f;
        continue;
      }
      const int64_t c0 = b * kFp8BlockSize, c1 = std::min<int64_t>(cols, c0 + kFp8BlockSize);
      float m = 0.0f;
      for (int64_t r = r0; r < r1 && !std::isnan(m); ++r) {
        const float a = amax(in + r * cols + c0, c1 - c0);
        if (std::isnan(a) || a > m) m = a;
      }
      const float s = fp8_block_scale(m, format);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = c0; c < c1; ++c) {
          codes[r * cols + c] = fp8_encode(static_cast<double>(in[r * cols + c] * s), format);
        }
      }
      scale_inv[p * scale_ld + b] = 1.0f / s;
    }
  }
  return absl::OkStatus();
}

absl::Status fp8_dequantize_blocks(float* out, const uint8_t* codes, const float* scale_inv,
                                   int64_t scale_ld, int64_t rows, int64_t cols,
                                   Fp8Format format) {
  RETURN_IF_ERROR(CheckBlockArgs("fp8_dequantize_blocks", codes, scale_inv, out, rows, cols));
  QT_CHECK_ARG(scale_ld == 0 || scale_ld >= fp8_num_blocks(cols), "fp8_dequantize_blocks: scale_ld = ",
               scale_ld, " must be 0 (1x128 tiles) or >= ceil(cols / 128) = ",
               fp8_num_blocks(cols));
  const DecodeTable& table = TableOf(format);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t b = c / kFp8BlockSize;
      const float si = scale_ld == 0 ? scale_inv[b * rows + r]
                                     : scale_inv[(r / kFp8BlockSize) * scale_ld + b];
      out[r * cols + c] = table[codes[r * cols + c]] * si;
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<DelayedScaler> DelayedScaler::Create(Fp8Format format, int history_len, int margin) {
  QT_CHECK_ARG(history_len >= 1, "DelayedScaler(", FormatName(format),
               "): history_len = ", history_len, " must be >= 1");
  QT_CHECK_ARG(margin >= 0 && margin <= 64, "DelayedScaler(", FormatName(format),
               "): margin = ", margin, " must be in [0, 64]");
  return DelayedScaler(format, history_len, margin);
}

absl::StatusOr<DelayedScaler> DelayedScaler::Restore(Fp8Format format, int margin,
                                                     const std::vector<float>& history_oldest_first,
                                                     float scale) {
  ASSIGN_OR_RETURN(DelayedScaler scaler,
                   Create(format, static_cast<int>(history_oldest_first.size()), margin));
  for (size_t i = 0; i < history_oldest_first.size(); ++i) {
    const float a = history_oldest_first[i];
    QT_CHECK_ARG(a >= 0.0f, "DelayedScaler::Restore: history[", i, "] = ", a,
                 " must be >= 0 (or +inf)");
  }
  QT_CHECK_ARG(std::isfinite(scale) && scale > 0.0f, "DelayedScaler::Restore: scale = ", scale,
               " must be finite and > 0");
  scaler.ring_ = history_oldest_first;
  scaler.next_ = 0;
  scaler.scale_ = scale;
  return scaler;
}

void DelayedScaler::update(float amax) {
  float a = std::fabs(amax);
  if (!std::isfinite(a)) a = std::numeric_limits<float>::infinity();
  ring_[next_] = a;
  next_ = (next_ + 1) % static_cast<int>(ring_.size());
  scale_ = fp8_scale_from_amax(window_amax(), format_, margin_, scale_);
}

float DelayedScaler::window_amax() const {
  float m = 0.0f;
  for (float a : ring_) m = a > m ? a : m;
  return m;
}

std::vector<float> DelayedScaler::history() const {
  const int len = static_cast<int>(ring_.size());
  std::vector<float> h(len);
  for (int i = 0; i < len; ++i) h[i] = ring_[(next_ + i) % len];
  return h;
}

#define QT_FP8_INSTANTIATE(F)                                                                \
  template absl::Status fp8_encode_array<F>(uint8_t*, const F*, int64_t, float, Fp8Format);  \
  template absl::Status fp8_decode_array<F>(F*, const uint8_t*, int64_t, float, Fp8Format);  \
  template absl::Status fp8_quantize_dequantize<F>(F*, const F*, int64_t, float, Fp8Format); \
  template F amax<F>(const F*, int64_t);

QT_FP8_INSTANTIATE(float)
QT_FP8_INSTANTIATE(double)
#undef QT_FP8_INSTANTIATE

}  // namespace qtrain::ops
