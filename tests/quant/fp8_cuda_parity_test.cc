// fp8_encode against CUDA's own host conversion (__nv_cvt_float_to_fp8 from cuda_fp8.h, used
// as an oracle only; see cuda_fp8_oracle.cc) over a strided sweep of all float bit patterns.
// QT_FP8_EXHAUSTIVE=1 in the environment sweeps all 2^32 patterns (minutes; not for CI).
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "gtest/gtest.h"
#include "ops/quant/fp8.h"

extern "C" uint8_t qt_test_cuda_fp8_encode(float x, int e5m2, int nosat);

namespace qtrain::ops {
namespace {

void Sweep(uint64_t stride) {
  struct Case {
    Fp8Format format;
    Fp8Saturation sat;
  };
  const Case cases[] = {
      {Fp8Format::kE4M3, Fp8Saturation::kSatFinite},
      {Fp8Format::kE5M2, Fp8Saturation::kSatFinite},
      {Fp8Format::kE4M3, Fp8Saturation::kNoSat},
      {Fp8Format::kE5M2, Fp8Saturation::kNoSat},
  };
  for (const Case& c : cases) {
    int64_t mismatches = 0;
    for (uint64_t b = 0; b < (1ull << 32); b += stride) {
      const uint32_t bits = static_cast<uint32_t>(b);
      float x;
      std::memcpy(&x, &bits, 4);
      const uint8_t got = fp8_encode(x, c.format, c.sat);
      const uint8_t want = qt_test_cuda_fp8_encode(x, c.format == Fp8Format::kE5M2,
                                                   c.sat == Fp8Saturation::kNoSat);
      if (got != want && ++mismatches <= 10) {
        ADD_FAILURE() << "float bits 0x" << std::hex << bits << " (" << x << "): got 0x"
                      << int(got) << " cuda 0x" << int(want);
      }
    }
    EXPECT_EQ(mismatches, 0);
  }
}

TEST(Fp8CudaParity, StridedSweepOfAllFloats) {
  const char* env = std::getenv("QT_FP8_EXHAUSTIVE");
  // An odd prime stride visits every residue of the low bits, so mantissa tails, exponents
  // and signs are all exercised; ~3.5M patterns per case.
  Sweep(env != nullptr && std::strcmp(env, "1") == 0 ? 1 : 1223);
}

}  // namespace
}  // namespace qtrain::ops
