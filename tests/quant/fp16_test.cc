// fp16 conversion against the compiler's own _Float16 (GCC's x86 conversions, round to
// nearest even): every fp16 value round-trips, and floats around every fp16 value and rounding
// tie, plus a strided sweep of all float bit patterns, convert as the compiler does.
#include "ops/quant/fp16.h"

#include <cmath>
#include <cstring>

#include "gtest/gtest.h"

namespace qtrain::ops {
namespace {

uint16_t Reference(float x) {
  const _Float16 h = static_cast<_Float16>(x);
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}

float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

void ExpectSame(float x) {
  const uint16_t got = fp32_to_fp16(x), want = Reference(x);
  if (std::isnan(x)) {
    ASSERT_EQ(got & 0x7C00u, 0x7C00u);
    ASSERT_NE(got & 0x3FFu, 0u);
    return;
  }
  ASSERT_EQ(got, want) << "x = " << x << " (bits 0x" << std::hex << Bits(x) << ")";
}

TEST(Fp16, EveryHalfRoundTripsExactly) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = fp16_to_fp32(static_cast<uint16_t>(h));
    _Float16 ref;
    const uint16_t hb = static_cast<uint16_t>(h);
    std::memcpy(&ref, &hb, 2);
    if (std::isnan(f)) {
      ASSERT_TRUE(std::isnan(static_cast<float>(ref)));
      continue;
    }
    ASSERT_EQ(Bits(f), Bits(static_cast<float>(ref))) << h;
    ASSERT_EQ(fp32_to_fp16(f), h) << h;
  }
}

TEST(Fp16, NeighboursOfEveryHalfAndTieRoundAsTheCompiler) {
  for (uint32_t h = 0; h < 0x7C00; ++h) {
    const float lo = fp16_to_fp32(static_cast<uint16_t>(h));
    const float hi = fp16_to_fp32(static_cast<uint16_t>(h + 1));
    const float mid = lo + (hi - lo) / 2;  // the tie, exact in float
    for (float x : {lo, mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e9f),
                    std::nextafter(lo, 1e9f)}) {
      ExpectSame(x);
      ExpectSame(-x);
    }
  }
  EXPECT_EQ(fp32_to_fp16(65504.0f), 0x7BFFu);
  EXPECT_EQ(fp32_to_fp16(65519.996f), 0x7BFFu);
  EXPECT_EQ(fp32_to_fp16(65520.0f), 0x7C00u);  // the tie above the largest finite overflows
  EXPECT_EQ(fp32_to_fp16(kFp16MinSubnormal / 2), 0u);
  EXPECT_EQ(fp32_to_fp16(std::nextafter(kFp16MinSubnormal / 2, 1.0f)), 1u);
  EXPECT_EQ(round_to_fp16(0.1f), 0.0999755859375f);
}

TEST(Fp16, StridedSweepOfAllFloats) {
  for (uint64_t u = 0; u < (1ull << 32); u += 65521) ExpectSame(FromBits(static_cast<uint32_t>(u)));
}

}  // namespace
}  // namespace qtrain::ops
