// FP8 conversions against independent references written here: the code table from the
// sign/exponent/mantissa bits, a brute-force nearest-value encoder over every float16 input,
// tie and saturation cases, the scaled helpers and the delayed/current scaling recipes.
#include "ops/quant/fp8.h"

#include <cmath>
#include <cstring>
#include <deque>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace qtrain::ops {
namespace {

constexpr Fp8Format kFormats[] = {Fp8Format::kE4M3, Fp8Format::kE5M2};
constexpr Fp8Saturation kSats[] = {Fp8Saturation::kSatFinite, Fp8Saturation::kNoSat};

struct Spec {
  int ebits, mbits, bias;
};
Spec SpecOf(Fp8Format f) { return f == Fp8Format::kE4M3 ? Spec{4, 3, 7} : Spec{5, 2, 15}; }
const char* Name(Fp8Format f) { return f == Fp8Format::kE4M3 ? "E4M3" : "E5M2"; }

// What each code means, straight from the format definitions (OCP FP8 / the FP8 paper):
// returns NaN for NaN codes, +-inf for E5M2's inf codes.
double ReferenceValue(int code, Fp8Format f) {
  const Spec sp = SpecOf(f);
  const int s = (code >> 7) & 1;
  const int e = (code >> sp.mbits) & ((1 << sp.ebits) - 1);
  const int m = code & ((1 << sp.mbits) - 1);
  const int emax_field = (1 << sp.ebits) - 1;
  const double sign = s ? -1.0 : 1.0;
  if (f == Fp8Format::kE4M3 && e == emax_field && m == (1 << sp.mbits) - 1) return NAN;
  if (f == Fp8Format::kE5M2 && e == emax_field) return m == 0 ? sign * INFINITY : NAN;
  const double frac = m / std::pow(2.0, sp.mbits);
  if (e == 0) return sign * frac * std::pow(2.0, 1 - sp.bias);
  return sign * (1.0 + frac) * std::pow(2.0, e - sp.bias);
}

// Non-negative finite values (code, value), ascending.
std::vector<std::pair<int, double>> FiniteNonNegative(Fp8Format f) {
  std::vector<std::pair<int, double>> out;
  for (int c = 0; c < 128; ++c) {
    const double v = ReferenceValue(c, f);
    if (std::isfinite(v)) out.push_back({c, v});
  }
  return out;
}

// Slow-but-obvious encoder: the nearest candidate, ties to the even code (= even mantissa).
// Candidates are the finite values; without saturation also the first value past the top
// (E4M3: 480, code 0x7F = NaN; E5M2: 65536, code 0x7C = inf), which is what an unbounded
// exponent would round to.
uint8_t BruteForceEncode(double x, Fp8Format f, Fp8Saturation sat) {
  if (std::isnan(x)) return 0x7F;
  const int sign = std::signbit(x) ? 0x80 : 0;
  const double a = std::fabs(x);
  // Candidate lists per (format, saturation), built once.
  static const auto* const kCands = [] {
    auto* c = new std::vector<std::pair<int, double>>[4];
    for (int i = 0; i < 4; ++i) {
      const Fp8Format fi = i / 2 ? Fp8Format::kE5M2 : Fp8Format::kE4M3;
      c[i] = FiniteNonNegative(fi);
      if (i % 2)
        c[i].push_back(fi == Fp8Format::kE4M3 ? std::make_pair(0x7F, 480.0)
                                              : std::make_pair(0x7C, 65536.0));
    }
    return c;
  }();
  const auto& cands =
      kCands[(f == Fp8Format::kE5M2 ? 2 : 0) + (sat == Fp8Saturation::kNoSat ? 1 : 0)];
  if (std::isinf(a)) return static_cast<uint8_t>(sign | cands.back().first);
  int best = -1;
  double best_d = INFINITY;
  for (const auto& [code, v] : cands) {
    const double d = std::fabs(a - v);  // exact: both have few significant bits
    if (d < best_d || (d == best_d && (code & 1) == 0)) {
      best = code;
      best_d = d;
    }
  }
  return static_cast<uint8_t>(sign | best);
}

float HalfToFloat(uint16_t h) {
  const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  float v;
  if (e == 31) {
    v = m == 0 ? INFINITY : NAN;
  } else if (e == 0) {
    v = std::ldexp(static_cast<float>(m), -24);
  } else {
    v = std::ldexp(static_cast<float>(m + 1024), e - 25);
  }
  return s ? -v : v;
}

TEST(Fp8Decode, EveryCodeMatchesBitDefinition) {
  for (Fp8Format f : kFormats) {
    int finite = 0, nans = 0, infs = 0;
    for (int c = 0; c < 256; ++c) {
      const double ref = ReferenceValue(c, f);
      const float got = fp8_decode(static_cast<uint8_t>(c), f);
      SCOPED_TRACE(testing::Message() << Name(f) << " code 0x" << std::hex << c);
      if (std::isnan(ref)) {
        EXPECT_TRUE(std::isnan(got));
        EXPECT_TRUE(fp8_is_nan(static_cast<uint8_t>(c), f));
        ++nans;
      } else {
        EXPECT_EQ(static_cast<double>(got), ref);
        EXPECT_EQ(std::signbit(got), (c & 0x80) != 0);  // -0 is 0x80
        EXPECT_FALSE(fp8_is_nan(static_cast<uint8_t>(c), f));
        EXPECT_EQ(fp8_is_inf(static_cast<uint8_t>(c), f), std::isinf(ref));
        (std::isinf(ref) ? infs : finite)++;
      }
    }
    if (f == Fp8Format::kE4M3) {
      EXPECT_EQ(finite, 254);
      EXPECT_EQ(nans, 2);  // 0x7F, 0xFF
      EXPECT_EQ(infs, 0);
    } else {
      EXPECT_EQ(finite, 248);
      EXPECT_EQ(nans, 6);  // S.11111.{01,10,11}
      EXPECT_EQ(infs, 2);
    }
  }
}

TEST(Fp8Decode, AnchorValues) {
  const Fp8Format e4 = Fp8Format::kE4M3, e5 = Fp8Format::kE5M2;
  EXPECT_EQ(fp8_decode(0x7E, e4), 448.0f);
  EXPECT_EQ(fp8_decode(0xFE, e4), -448.0f);
  EXPECT_EQ(fp8_decode(0x38, e4), 1.0f);
  EXPECT_EQ(fp8_decode(0x08, e4), std::ldexp(1.0f, -6));  // min normal
  EXPECT_EQ(fp8_decode(0x01, e4), std::ldexp(1.0f, -9));  // min subnormal
  EXPECT_EQ(fp8_decode(0x07, e4), 7 * std::ldexp(1.0f, -9));
  EXPECT_EQ(fp8_decode(0x7B, e5), 57344.0f);
  EXPECT_EQ(fp8_decode(0x3C, e5), 1.0f);
  EXPECT_EQ(fp8_decode(0x04, e5), std::ldexp(1.0f, -14));
  EXPECT_EQ(fp8_decode(0x01, e5), std::ldexp(1.0f, -16));
  EXPECT_EQ(fp8_decode(0x7C, e5), INFINITY);
  EXPECT_EQ(fp8_decode(0xFC, e5), -INFINITY);
  EXPECT_EQ(fp8_max(e4), 448.0f);
  EXPECT_EQ(fp8_max(e5), 57344.0f);
}

TEST(Fp8Encode, RoundTripsEveryNonNaNCode) {
  for (Fp8Format f : kFormats) {
    for (int c = 0; c < 256; ++c) {
      const uint8_t code = static_cast<uint8_t>(c);
      if (fp8_is_nan(code, f)) continue;
      const float v = fp8_decode(code, f);
      SCOPED_TRACE(testing::Message() << Name(f) << " code 0x" << std::hex << c);
      EXPECT_EQ(fp8_encode(v, f, Fp8Saturation::kNoSat), code);
      // Saturation only changes E5M2's infinities, which become +-max.
      const uint8_t sat = fp8_encode(v, f, Fp8Saturation::kSatFinite);
      if (fp8_is_inf(code, f)) {
        EXPECT_EQ(sat, (code & 0x80) | 0x7B);
      } else {
        EXPECT_EQ(sat, code);
      }
    }
  }
}

TEST(Fp8Encode, EveryFloat16MatchesBruteForce) {
  int checked = 0;
  for (Fp8Format f : kFormats) {
    for (Fp8Saturation sat : kSats) {
      for (int h = 0; h < 65536; ++h) {
        const float x = HalfToFloat(static_cast<uint16_t>(h));
        const uint8_t want = BruteForceEncode(x, f, sat);
        const uint8_t got = fp8_encode(x, f, sat);
        if (got != want) {
          ADD_FAILURE() << Name(f) << (sat == Fp8Saturation::kNoSat ? " nosat" : " satfinite")
                        << " half 0x" << std::hex << h << " = " << x << ": got 0x" << int(got)
                        << " want 0x" << int(want);
          if (++checked > 20) return;  // enough to diagnose
        }
      }
    }
  }
}

TEST(Fp8Encode, RandomFloatsAndDoublesMatchBruteForce) {
  std::mt19937 rng(7);
  for (Fp8Format f : kFormats) {
    // Exponents from well below the smallest subnormal to above the overflow threshold.
    const int lo = f == Fp8Format::kE4M3 ? -13 : -20, hi = f == Fp8Format::kE4M3 ? 10 : 18;
    std::uniform_int_distribution<int> exp(lo, hi);
    std::uniform_real_distribution<double> mant(1.0, 2.0);
    for (int i = 0; i < 20000; ++i) {
      const double d = std::ldexp(mant(rng), exp(rng)) * (i % 2 ? -1 : 1);
      const float x = static_cast<float>(d);
      for (Fp8Saturation sat : kSats) {
        ASSERT_EQ(fp8_encode(x, f, sat), BruteForceEncode(x, f, sat)) << x;
        ASSERT_EQ(fp8_encode(d, f, sat), BruteForceEncode(d, f, sat)) << d;
      }
    }
  }
}

// Exact midpoints between neighbours, and one float ulp either side of them.
TEST(Fp8Encode, MidpointsTieToEvenAndNeighboursRoundToNearest) {
  for (Fp8Format f : kFormats) {
    const auto vals = FiniteNonNegative(f);
    for (size_t i = 0; i + 1 < vals.size(); ++i) {
      const auto [c0, v0] = vals[i];
      const auto [c1, v1] = vals[i + 1];
      const float mid = static_cast<float>((v0 + v1) / 2);
      ASSERT_EQ(static_cast<double>(mid), (v0 + v1) / 2);  // representable in float
      const int even = (c0 & 1) == 0 ? c0 : c1;
      for (Fp8Saturation sat : kSats) {
        EXPECT_EQ(fp8_encode(mid, f, sat), even) << Name(f) << " mid " << mid;
        EXPECT_EQ(fp8_encode(-mid, f, sat), 0x80 | even) << Name(f) << " mid " << -mid;
        EXPECT_EQ(fp8_encode(std::nextafter(mid, 0.0f), f, sat), c0) << mid;
        EXPECT_EQ(fp8_encode(std::nextafter(mid, INFINITY), f, sat), c1) << mid;
      }
    }
  }
}

TEST(Fp8Encode, NamedTiesAndSubnormals) {
  const Fp8Format e4 = Fp8Format::kE4M3, e5 = Fp8Format::kE5M2;
  EXPECT_EQ(fp8_encode(1.0625, e4), 0x38);                  // 1 + 1/16: between 1 (even) and 1.125
  EXPECT_EQ(fp8_encode(1.1875, e4), 0x3A);                  // between 1.125 (odd) and 1.25 (even)
  EXPECT_EQ(fp8_encode(std::ldexp(1.0, -10), e4), 0x00);    // half the min subnormal
  EXPECT_EQ(fp8_encode(-std::ldexp(1.0, -10), e4), 0x80);   // ... keeps its sign
  EXPECT_EQ(fp8_encode(std::ldexp(1.001, -10), e4), 0x01);  // just above: min subnormal
  EXPECT_EQ(fp8_encode(3 * std::ldexp(1.0, -10), e4), 0x02);   // 1.5 * min subnormal: to 2
  EXPECT_EQ(fp8_encode(15 * std::ldexp(1.0, -10), e4), 0x08);  // 7.5 ulps: up to min normal
  EXPECT_EQ(fp8_encode(std::ldexp(1.0, -17), e5), 0x00);
  EXPECT_EQ(fp8_encode(3 * std::ldexp(1.0, -17), e5), 0x02);
  EXPECT_EQ(fp8_encode(1.125, e5), 0x3C);  // between 1 (even) and 1.25
  EXPECT_EQ(fp8_encode(1.375, e5), 0x3E);  // between 1.25 (odd) and 1.5
  EXPECT_EQ(fp8_encode(0.0, e4), 0x00);
  EXPECT_EQ(fp8_encode(-0.0, e4), 0x80);
  EXPECT_EQ(fp8_encode(1e-300, e5), 0x00);  // double subnormal territory
  EXPECT_EQ(fp8_encode(-5e-324, e5), 0x80);
}

TEST(Fp8Encode, SaturationAndOverflow) {
  const Fp8Format e4 = Fp8Format::kE4M3, e5 = Fp8Format::kE5M2;
  const Fp8Saturation no = Fp8Saturation::kNoSat;
  // E4M3: 464 = 448 + half ulp ties to 448 (even); beyond it overflows.
  EXPECT_EQ(fp8_encode(464.0, e4), 0x7E);
  EXPECT_EQ(fp8_encode(464.0, e4, no), 0x7E);
  EXPECT_EQ(fp8_encode(465.0, e4), 0x7E);
  EXPECT_EQ(fp8_encode(465.0, e4, no), 0x7F);
  EXPECT_EQ(fp8_encode(-1e30, e4), 0xFE);
  EXPECT_EQ(fp8_encode(-1e30, e4, no), 0xFF);
  // E5M2: 61440 = max + half ulp ties to the odd max's even neighbour, inf.
  EXPECT_EQ(fp8_encode(61439.0, e5, no), 0x7B);
  EXPECT_EQ(fp8_encode(61440.0, e5), 0x7B);
  EXPECT_EQ(fp8_encode(61440.0, e5, no), 0x7C);
  EXPECT_EQ(fp8_encode(-1e300, e5), 0xFB);
  EXPECT_EQ(fp8_encode(-1e300, e5, no), 0xFC);
  EXPECT_EQ(fp8_encode(std::numeric_limits<double>::max(), e5), 0x7B);
}

TEST(Fp8Encode, InfinityAndNaN) {
  const double inf = std::numeric_limits<double>::infinity();
  const Fp8Saturation no = Fp8Saturation::kNoSat;
  EXPECT_EQ(fp8_encode(inf, Fp8Format::kE4M3), 0x7E);
  EXPECT_EQ(fp8_encode(-inf, Fp8Format::kE4M3), 0xFE);
  EXPECT_EQ(fp8_encode(inf, Fp8Format::kE5M2), 0x7B);
  EXPECT_EQ(fp8_encode(-inf, Fp8Format::kE5M2), 0xFB);
  EXPECT_EQ(fp8_encode(inf, Fp8Format::kE4M3, no), 0x7F);  // no inf in E4M3: NaN
  EXPECT_EQ(fp8_encode(-inf, Fp8Format::kE4M3, no), 0xFF);
  EXPECT_EQ(fp8_encode(inf, Fp8Format::kE5M2, no), 0x7C);
  EXPECT_EQ(fp8_encode(-inf, Fp8Format::kE5M2, no), 0xFC);
  float payload_nan;
  const uint32_t bits = 0xFFC12345u;  // negative NaN with a payload
  std::memcpy(&payload_nan, &bits, 4);
  for (Fp8Format f : kFormats) {
    for (Fp8Saturation sat : kSats) {
      EXPECT_EQ(fp8_encode(std::nan(""), f, sat), kFp8CanonicalNaN);
      EXPECT_EQ(fp8_encode(-std::nan(""), f, sat), kFp8CanonicalNaN);
      EXPECT_EQ(fp8_encode(payload_nan, f, sat), kFp8CanonicalNaN);
    }
    EXPECT_TRUE(std::isnan(fp8_decode(0x7F, f)));
    EXPECT_TRUE(std::isnan(fp8_decode(0xFF, f)));
  }
}

TEST(Fp8Arrays, QuantizeDequantizeIsDecodeEncodeOverScale) {
  std::mt19937 rng(3);
  std::normal_distribution<float> nd(0.0f, 3.0f);
  std::vector<float> in(1001), out(1001);
  for (float& x : in) x = nd(rng);
  in[0] = INFINITY;
  in[1] = -INFINITY;
  in[2] = NAN;
  in[3] = 0.0f;
  in[4] = 1e9f;
  for (Fp8Format f : kFormats) {
    const float scale = 37.5f;
    ASSERT_TRUE(fp8_quantize_dequantize(out.data(), in.data(), 1001, scale, f).ok());
    std::vector<uint8_t> codes(1001);
    std::vector<float> dec(1001);
    ASSERT_TRUE(fp8_encode_array(codes.data(), in.data(), 1001, scale, f).ok());
    ASSERT_TRUE(fp8_decode_array(dec.data(), codes.data(), 1001, scale, f).ok());
    for (int i = 0; i < 1001; ++i) {
      const float prod = in[i] * scale;  // the product is rounded in float first
      const uint8_t c = fp8_encode(static_cast<double>(prod), f);
      EXPECT_EQ(codes[i], c);
      const float want = fp8_decode(c, f) / scale;
      if (std::isnan(want)) {
        EXPECT_TRUE(std::isnan(out[i]) && std::isnan(dec[i])) << i;
      } else {
        EXPECT_EQ(out[i], want) << i;
        EXPECT_EQ(dec[i], want) << i;
      }
    }
    EXPECT_EQ(out[0], fp8_max(f) / scale);  // inf saturates
    EXPECT_EQ(out[1], -fp8_max(f) / scale);
    EXPECT_TRUE(std::isnan(out[2]));
    EXPECT_EQ(out[4], fp8_max(f) / scale);
    // In place.
    std::vector<float> inplace = in;
    ASSERT_TRUE(fp8_quantize_dequantize(inplace.data(), inplace.data(), 1001, scale, f).ok());
    for (int i = 3; i < 1001; ++i) EXPECT_EQ(inplace[i], out[i]);
  }
}

TEST(Fp8Arrays, DoubleVersionRoundsTheDoubleProduct) {
  const double x = 1.0 + std::ldexp(1.0, -40);  // rounds to 1.0 in float, not in double
  double out;
  ASSERT_TRUE(fp8_quantize_dequantize(&out, &x, 1, 1.0625f, Fp8Format::kE4M3).ok());
  // x * 1.0625 is just above the midpoint 1.0625 between 1 and 1.125: rounds up.
  EXPECT_EQ(out, 1.125 / 1.0625);
  float xf = 1.0f;
  float outf;
  ASSERT_TRUE(fp8_quantize_dequantize(&outf, &xf, 1, 1.0625f, Fp8Format::kE4M3).ok());
  EXPECT_EQ(outf, 1.0f / 1.0625f);  // exactly on the midpoint: ties to 1.0
}

TEST(Fp8Arrays, RejectsBadScale) {
  float x = 1.0f, y;
  for (float bad : {0.0f, -1.0f, INFINITY, NAN}) {
    const absl::Status st = fp8_quantize_dequantize(&y, &x, 1, bad, Fp8Format::kE4M3);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(st.message().find("scale = "), absl::string_view::npos) << st.message();
  }
  uint8_t c;
  EXPECT_FALSE(fp8_encode_array(&c, &x, -1, 1.0f, Fp8Format::kE4M3).ok());
  EXPECT_FALSE(fp8_decode_array<float>(nullptr, &c, 1, 1.0f, Fp8Format::kE4M3).ok());
  EXPECT_TRUE(fp8_decode_array<float>(nullptr, nullptr, 0, 1.0f, Fp8Format::kE4M3).ok());
}

TEST(Fp8Amax, MaxAbsWithInfAndNaN) {
  const float a[] = {0.5f, -3.25f, 2.0f};
  EXPECT_EQ(amax(a, 3), 3.25f);
  EXPECT_EQ(amax(a, 0), 0.0f);
  const double b[] = {-1.0, INFINITY, 2.0};
  EXPECT_EQ(amax(b, 3), INFINITY);
  const float c[] = {1.0f, NAN, 5.0f};
  EXPECT_TRUE(std::isnan(amax(c, 3)));
}

TEST(Fp8Scale, FromAmax) {
  EXPECT_EQ(fp8_scale_from_amax(2.0f, Fp8Format::kE4M3, 0, 7.0f), 224.0f);
  EXPECT_EQ(fp8_scale_from_amax(2.0f, Fp8Format::kE4M3, 2, 7.0f), 56.0f);
  EXPECT_EQ(fp8_scale_from_amax(3.0f, Fp8Format::kE5M2, 1, 7.0f), (57344.0f / 3.0f) / 2.0f);
  EXPECT_EQ(fp8_scale_from_amax(0.0f, Fp8Format::kE4M3, 0, 7.0f), 7.0f);
  EXPECT_EQ(fp8_scale_from_amax(INFINITY, Fp8Format::kE4M3, 0, 7.0f), 7.0f);
  EXPECT_EQ(fp8_scale_from_amax(NAN, Fp8Format::kE4M3, 0, 7.0f), 7.0f);
  EXPECT_EQ(fp8_scale_from_amax(1e-44f, Fp8Format::kE5M2, 0, 7.0f), 7.0f);  // 57344/1e-44 = inf
  EXPECT_EQ(fp8_current_scale(0.0f, Fp8Format::kE4M3), 1.0f);
  EXPECT_EQ(fp8_current_scale(448.0f, Fp8Format::kE4M3), 1.0f);
  EXPECT_EQ(fp8_current_scale(4.0f, Fp8Format::kE4M3, 1), 56.0f);
}

TEST(DelayedScaler, WindowRollsMaxAndMargin) {
  auto or_scaler = DelayedScaler::Create(Fp8Format::kE4M3, 4, 1);
  ASSERT_TRUE(or_scaler.ok()) << or_scaler.status();
  DelayedScaler sc = *std::move(or_scaler);
  EXPECT_EQ(sc.scale(), 1.0f);
  EXPECT_EQ(sc.history(), std::vector<float>(4, 0.0f));
  sc.update(0.0f);  // only zeros so far: keep scale 1
  EXPECT_EQ(sc.scale(), 1.0f);
  sc.update(2.0f);
  EXPECT_EQ(sc.scale(), 448.0f / 2.0f / 2.0f);  // margin 1
  sc.update(1.0f);
  sc.update(-1.0f);  // stored as 1
  EXPECT_EQ(sc.history(), (std::vector<float>{0.0f, 2.0f, 1.0f, 1.0f}));
  sc.update(1.0f);
  EXPECT_EQ(sc.window_amax(), 2.0f);  // 2 still in the window
  EXPECT_EQ(sc.scale(), 112.0f);
  sc.update(1.0f);  // 2 rolls out
  EXPECT_EQ(sc.history(), (std::vector<float>{1.0f, 1.0f, 1.0f, 1.0f}));
  EXPECT_EQ(sc.scale(), 224.0f);
  // An overflowed step freezes the scale until it leaves the window.
  sc.update(INFINITY);
  EXPECT_EQ(sc.scale(), 224.0f);
  for (int i = 0; i < 3; ++i) {
    sc.update(4.0f);
    EXPECT_EQ(sc.scale(), 224.0f) << i;
  }
  sc.update(4.0f);
  EXPECT_EQ(sc.scale(), 448.0f / 4.0f / 2.0f);
  sc.update(NAN);  // NaN is stored as inf too
  EXPECT_EQ(sc.history().back(), INFINITY);
  EXPECT_EQ(sc.scale(), 56.0f);
}

TEST(DelayedScaler, MatchesBruteForceWindowOverRandomSequence) {
  for (int len : {1, 3, 16}) {
    auto sc = DelayedScaler::Create(Fp8Format::kE5M2, len, 2).value();
    std::mt19937 rng(len);
    std::exponential_distribution<float> ed(0.5f);
    std::deque<float> window(len, 0.0f);
    float prev = 1.0f;
    for (int t = 0; t < 100; ++t) {
      const float a = t % 17 == 5 ? 0.0f : ed(rng);
      sc.update(a);
      window.push_back(a);
      window.pop_front();
      float m = 0.0f;
      for (float w : window) m = std::max(m, w);
      const float want = m > 0 ? std::ldexp(57344.0f / m, -2) : prev;
      ASSERT_EQ(sc.scale(), want) << "len " << len << " t " << t;
      prev = want;
    }
  }
}

TEST(DelayedScaler, DefaultsAndValidation) {
  auto sc = DelayedScaler::Create(Fp8Format::kE4M3).value();
  EXPECT_EQ(sc.history_len(), 16);
  EXPECT_EQ(sc.margin(), 0);
  auto bad_len = DelayedScaler::Create(Fp8Format::kE4M3, 0);
  ASSERT_FALSE(bad_len.ok());
  EXPECT_NE(bad_len.status().message().find("history_len = 0"), absl::string_view::npos);
  auto bad_margin = DelayedScaler::Create(Fp8Format::kE5M2, 16, -1);
  ASSERT_FALSE(bad_margin.ok());
  EXPECT_NE(bad_margin.status().message().find("margin = -1"), absl::string_view::npos);
}

TEST(DelayedScaler, RestoreContinuesIdentically) {
  auto a = DelayedScaler::Create(Fp8Format::kE4M3, 5, 1).value();
  for (float x : {3.0f, 1.0f, 8.0f}) a.update(x);
  auto b = DelayedScaler::Restore(Fp8Format::kE4M3, 1, a.history(), a.scale()).value();
  for (float x : {0.5f, 2.0f, 0.25f, 0.125f, 0.1f, 0.3f, 0.0f}) {
    a.update(x);
    b.update(x);
    ASSERT_EQ(a.scale(), b.scale());
    ASSERT_EQ(a.history(), b.history());
  }
  EXPECT_FALSE(DelayedScaler::Restore(Fp8Format::kE4M3, 0, {}, 1.0f).ok());
  EXPECT_FALSE(DelayedScaler::Restore(Fp8Format::kE4M3, 0, {1.0f, NAN}, 1.0f).ok());
  EXPECT_FALSE(DelayedScaler::Restore(Fp8Format::kE4M3, 0, {1.0f}, 0.0f).ok());
  EXPECT_TRUE(DelayedScaler::Restore(Fp8Format::kE4M3, 0, {1.0f, INFINITY}, 2.0f).ok());
}

// ---- Block scaling reference (DeepSeek-V3 tiles and blocks, cuBLASLt scale layouts).

TEST(Fp8Block, Tiles1x128ByHand) {
  // 2 rows x 130 columns: tiles [0, 128) and [128, 130) per row.
  const int64_t rows = 2, cols = 130;
  std::vector<float> in(rows * cols, 0.0f);
  in[0] = 2.0f;                 // row 0, tile 0: amax 2
  in[129] = -0.5f;              // row 0, tile 1: amax 0.5
  in[cols + 5] = std::nanf(""); // row 1, tile 0: NaN -> scale 1
  // row 1, tile 1: all zeros -> scale 1
  std::vector<uint8_t> codes(rows * cols);
  std::vector<float> scale_inv(2 * rows, -1.0f);
  ASSERT_TRUE(fp8_quantize_1x128(codes.data(), scale_inv.data(), in.data(), rows, cols,
                                 Fp8Format::kE4M3)
                  .ok());
  // scale_inv[b * rows + r]
  EXPECT_EQ(scale_inv[0], 1.0f / (448.0f / 2.0f));
  EXPECT_EQ(scale_inv[1], 1.0f);
  EXPECT_EQ(scale_inv[2], 1.0f / (448.0f / 0.5f));
  EXPECT_EQ(scale_inv[3], 1.0f);
  EXPECT_EQ(codes[0], 0x7E);    // 2 * 224 = 448, the largest E4M3
  EXPECT_EQ(codes[129], 0xFE);  // -0.5 * 896 = -448
  EXPECT_EQ(codes[cols + 5], kFp8CanonicalNaN);
  EXPECT_EQ(codes[1], 0x00);
  // Dequantized: code * scale_inv.
  std::vector<float> out(rows * cols);
  ASSERT_TRUE(fp8_dequantize_blocks(out.data(), codes.data(), scale_inv.data(), 0, rows, cols,
                                    Fp8Format::kE4M3)
                  .ok());
  EXPECT_EQ(out[0], 2.0f);
  EXPECT_EQ(out[129], -0.5f);
  EXPECT_TRUE(std::isnan(out[cols + 5]));
}

TEST(Fp8Block, Tiles1x128MatchPerTileEncodeArray) {
  const int64_t rows = 7, cols = 300;
  std::vector<float> in(rows * cols);
  uint32_t state = 12345;
  for (float& x : in) {
    state = state * 1664525u + 1013904223u;
    x = (static_cast<float>(state >> 8) / 16777216.0f - 0.5f) * std::ldexp(1.0f, state % 13);
  }
  std::vector<uint8_t> codes(rows * cols);
  std::vector<float> scale_inv(fp8_num_blocks(cols) * rows);
  ASSERT_TRUE(fp8_quantize_1x128(codes.data(), scale_inv.data(), in.data(), rows, cols,
                                 Fp8Format::kE5M2)
                  .ok());
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < fp8_num_blocks(cols); ++b) {
      const int64_t c0 = b * 128, len = std::min<int64_t>(128, cols - c0);
      const float s = fp8_block_scale(amax(in.data() + r * cols + c0, len), Fp8Format::kE5M2);
      std::vector<uint8_t> want(len);
      ASSERT_TRUE(fp8_encode_array(want.data(), in.data() + r * cols + c0, len, s,
                                   Fp8Format::kE5M2)
                      .ok());
      for (int64_t c = 0; c < len; ++c) ASSERT_EQ(codes[r * cols + c0 + c], want[c]);
      EXPECT_EQ(scale_inv[b * rows + r], 1.0f / s);
    }
  }
}

TEST(Fp8Block, Blocks128x128ScaleGridPaddingAndTranspose) {
  const int64_t rows = 130, cols = 260;  // 2 x 3 blocks, partial at both edges
  std::vector<float> in(rows * cols);
  for (int64_t i = 0; i < rows * cols; ++i) in[i] = std::sin(0.37f * i) * 0.01f;
  in[129 * cols + 259] = 7.0f;  // the corner block (1, 2) alone gets amax 7
  const int64_t ld = fp8_block_scale_ld(cols);
  EXPECT_EQ(ld, 4);
  std::vector<uint8_t> codes(rows * cols);
  std::vector<float> grid(2 * ld, -1.0f);
  ASSERT_TRUE(fp8_quantize_128x128(codes.data(), grid.data(), ld, in.data(), rows, cols,
                                   Fp8Format::kE4M3)
                  .ok());
  EXPECT_EQ(grid[1 * ld + 2], 1.0f / (448.0f / 7.0f));
  EXPECT_EQ(grid[0 * ld + 3], 0.0f);  // padding
  EXPECT_EQ(grid[1 * ld + 3], 0.0f);
  EXPECT_EQ(codes[129 * cols + 259], 0x7E);
  // Every block's codes are encode(x * s) with that block's own amax.
  for (int64_t p = 0; p < 2; ++p) {
    for (int64_t b = 0; b < 3; ++b) {
      float m = 0;
      for (int64_t r = p * 128; r < std::min<int64_t>(rows, p * 128 + 128); ++r)
        for (int64_t c = b * 128; c < std::min<int64_t>(cols, b * 128 + 128); ++c)
          m = std::max(m, std::fabs(in[r * cols + c]));
      const float s = fp8_block_scale(m, Fp8Format::kE4M3);
      EXPECT_EQ(grid[p * ld + b], 1.0f / s);
      for (int64_t r = p * 128; r < std::min<int64_t>(rows, p * 128 + 128); ++r)
        for (int64_t c = b * 128; c < std::min<int64_t>(cols, b * 128 + 128); ++c)
          ASSERT_EQ(codes[r * cols + c], fp8_encode(in[r * cols + c] * s, Fp8Format::kE4M3));
    }
  }
  // The transpose quantizes to the transposed codes and grid.
  std::vector<float> t(rows * cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = in[r * cols + c];
  const int64_t ld_t = fp8_block_scale_ld(rows);
  std::vector<uint8_t> codes_t(rows * cols);
  std::vector<float> grid_t(3 * ld_t);
  ASSERT_TRUE(fp8_quantize_128x128(codes_t.data(), grid_t.data(), ld_t, t.data(), cols, rows,
                                   Fp8Format::kE4M3)
                  .ok());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) ASSERT_EQ(codes_t[c * rows + r], codes[r * cols + c]);
  for (int64_t p = 0; p < 2; ++p)
    for (int64_t b = 0; b < 3; ++b) EXPECT_EQ(grid_t[b * ld_t + p], grid[p * ld + b]);
}

TEST(Fp8Block, RejectsBadArguments) {
  float f = 0;
  uint8_t c = 0;
  EXPECT_EQ(fp8_quantize_1x128(&c, &f, &f, -1, 1, Fp8Format::kE4M3).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(fp8_quantize_1x128(nullptr, &f, &f, 1, 1, Fp8Format::kE4M3).code(),
            absl::StatusCode::kInvalidArgument);
  const absl::Status s = fp8_quantize_128x128(&c, &f, 1, &f, 1, 200, Fp8Format::kE4M3);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("scale_ld = 1 must be >= ceil(cols / 128) = 2"),
            absl::string_view::npos)
      << s;
  EXPECT_TRUE(fp8_quantize_1x128(nullptr, nullptr, nullptr, 0, 5, Fp8Format::kE4M3).ok());
}

}  // namespace
}  // namespace qtrain::ops
