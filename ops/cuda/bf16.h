// The BF16 storage type of the CUDA ops' host API, with host conversions (round to nearest
// even, NaN kept), for host code built by g++ without CUDA headers.
#ifndef QTRAIN_OPS_CUDA_BF16_H_
#define QTRAIN_OPS_CUDA_BF16_H_

#include <cstdint>
#include <cstring>
#include <vector>

namespace qtrain::ops {

// Same size, alignment and bits as CUDA's __nv_bfloat16, which the .cu files reinterpret it
// as. A distinct type (not __nv_bfloat16 itself) so that the launchers' signatures mangle the
// same in g++ and nvcc translation units.
struct bf16 {
  uint16_t bits;
};
static_assert(sizeof(bf16) == 2 && alignof(bf16) == 2, "bf16 must match __nv_bfloat16");

inline float Bf16ToFloat(bf16 x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even, as __float2bfloat16 does; NaN stays a (quiet) NaN, infinities and
// overflow to infinity follow IEEE.
inline bf16 FloatToBf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x0040u)};
  const uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>((u + rounding) >> 16)};
}

inline std::vector<bf16> ToBf16(const std::vector<float>& v) {
  std::vector<bf16> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = FloatToBf16(v[i]);
  return out;
}

inline std::vector<float> Bf16ToFloat(const std::vector<bf16>& v) {
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = Bf16ToFloat(v[i]);
  return out;
}

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_CUDA_BF16_H_
