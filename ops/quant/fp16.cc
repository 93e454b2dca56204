// fp16 <-> float on the bits, independent of the FPU's rounding mode.
#include "ops/quant/fp16.h"

#include <cstring>

namespace qtrain::ops {

uint16_t fp32_to_fp16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t abs = u & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return sign | 0x7E00u;  // NaN
  if (abs >= 0x477FF000u) return sign | 0x7C00u;  // >= 65520 (max + half an ulp): inf
  const int exp = static_cast<int>(abs >> 23) - 127;
  if (exp >= -14) {
    // Normal: keep 10 mantissa bits of 23, rounding the 13 dropped ones to nearest even. A
    // carry out of the mantissa correctly bumps the exponent.
    const uint32_t mant = abs & 0x7FFFFFu;
    uint32_t h = (static_cast<uint32_t>(exp + 15) << 10) | (mant >> 13);
    const uint32_t rest = mant & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
    return sign | static_cast<uint16_t>(h);
  }
  // Subnormal (or zero): value = m * 2^-24 with m = round(|x| * 2^24), m <= 1024 (1024 is the
  // smallest normal, reached by rounding up).
  if (exp < -25) return sign;  // below half the smallest subnormal (ties at 2^-25 go to 0)
  const uint32_t mant = (abs & 0x7FFFFFu) | 0x800000u;  // 24-bit significand, value mant*2^(exp-23)
  const int shift = -exp - 1;  // m = mant >> (shift) with the dropped bits rounded; 14..24
  const uint32_t m = mant >> shift;
  const uint32_t rest = mant & ((1u << shift) - 1);
  const uint32_t half = 1u << (shift - 1);
  uint32_t r = m;
  if (rest > half || (rest == half && (m & 1u))) ++r;
  return sign | static_cast<uint16_t>(r);
}

float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  uint32_t u;
  if (exp == 0x1F) {
    u = sign | 0x7F800000u | (mant << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    u = sign;
  } else {
    // Subnormal: mant * 2^-24, exactly representable as a normal float.
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;
    std::memcpy(&u, &v, 4);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

}  // namespace qtrain::ops
