// fp8_encode against CUDA's own host conversion (__nv_cvt_float_to_fp8 from cuda_fp8.h, used
// as an oracle only; see cuda_fp8_oracle.cc): every bfloat16 value (which includes every FP8
// midpoint) with its float neighbours, plus a strided sweep of all float bit patterns.
// QT_FP8_EXHAUSTIVE=1 in the environment sweeps all 2^32 patterns (minutes; not for CI).
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "ops/quant/fp8.h"

extern "C" uint8_t qt_test_cuda_fp8_encode(float x, int e5m2, int nosat);

namespace qtrain::ops {
namespace {

struct Case {
  Fp8Format format;
  Fp8Saturation sat;
};
constexpr Case kCases[] = {
    {Fp8Format::kE4M3, Fp8Saturation::kSatFinite},
    {Fp8Format::kE5M2, Fp8Saturation::kSatFinite},
    {Fp8Format::kE4M3, Fp8Saturation::kNoSat},
    {Fp8Format::kE5M2, Fp8Saturation::kNoSat},
};

// Compares one float bit pattern; counts and reports (the first few) mismatches.
void Check(uint32_t bits, const Case& c, int64_t* mismatches) {
  float x;
  std::memcpy(&x, &bits, 4);
  const uint8_t got = fp8_encode(x, c.format, c.sat);
  const uint8_t want =
      qt_test_cuda_fp8_encode(x, c.format == Fp8Format::kE5M2, c.sat == Fp8Saturation::kNoSat);
  if (got != want && ++*mismatches <= 10) {
    ADD_FAILURE() << (c.format == Fp8Format::kE4M3 ? "E4M3" : "E5M2")
                  << (c.sat == Fp8Saturation::kNoSat ? " nosat" : " satfinite") << " float bits 0x"
                  << std::hex << bits << " (" << x << "): got 0x" << int(got) << " cuda 0x"
                  << int(want);
  }
}

// FP8 midpoints have at most 5 significant bits and lie within bfloat16's exponent range, so
// every tie is a bfloat16 value (float bits with 16 zero low bits); its float neighbours probe
// both sides of it.
TEST(Fp8CudaParity, EveryBfloat16AndNeighbours) {
  for (const Case& c : kCases) {
    int64_t mismatches = 0;
    for (uint32_t hi = 0; hi < 65536; ++hi) {
      const uint32_t bits = hi << 16;
      Check(bits, c, &mismatches);
      Check(bits + 1, c, &mismatches);  // one ulp further from zero
      Check(bits - 1, c, &mismatches);  // one ulp nearer zero (wraps harmlessly at 0)
    }
    EXPECT_EQ(mismatches, 0);
  }
}

TEST(Fp8CudaParity, StridedSweepOfAllFloats) {
  const char* env = std::getenv("QT_FP8_EXHAUSTIVE");
  // An odd stride visits every residue of the low bits, so mantissa tails, exponents and signs
  // are all exercised; ~3.5M patterns per case.
  const uint64_t stride = env != nullptr && std::strcmp(env, "1") == 0 ? 1 : 1223;
  for (const Case& c : kCases) {
    int64_t mismatches = 0;
    for (uint64_t b = 0; b < (1ull << 32); b += stride) {
      Check(static_cast<uint32_t>(b), c, &mismatches);
    }
    EXPECT_EQ(mismatches, 0);
  }
}

}  // namespace
}  // namespace qtrain::ops
