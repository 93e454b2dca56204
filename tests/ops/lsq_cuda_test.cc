// GPU parity of the CUDA LSQ/LSQ+ quantizers (ops/cuda/lsq_cuda.h) against the CPU oracle
// (ops/quant/lsq.h): weight forward (BF16 copy = bf16(CPU q) bit for bit, int8 codes exact,
// fp32 residual exact, Phi's product added once), the weight backward (mask exact, step/offset
// sums within fp32 tolerance), the standalone activation pass (per tensor, per token) and its
// backward, the first-batch step init; every bit width, granularity (per-group with a group
// that does not divide the row), both modes, odd sizes, the vector and element-wise branches,
// poisoned outputs with guard bands. Tagged "gpu"; the argument checks run without a device.
#include "ops/cuda/lsq_cuda.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "ops/cuda/bf16.h"
#include "ops/cuda/device.h"
#include "ops/quant/fp16.h"
#include "ops/quant/lsq.h"
#include "tests/ops/cuda_test_util.h"

namespace qtrain::ops {
namespace {

using testing::DeviceArray;
using testing::ExpectBitwiseEqual;
using testing::ExpectNear;
using testing::RandomFloats;
using testing::TestStream;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
const int kBits[] = {2, 3, 4, 8};

std::string Name(const LsqConfig& c, int64_t rows, int64_t cols) {
  const char* g = c.granularity == QuantGranularity::kPerTensor
                      ? "tensor"
                      : (c.granularity == QuantGranularity::kPerChannel ? "channel" : "group");
  return absl::StrCat(c.bits, "-bit ", c.mode == LsqMode::kSymmetric ? "sym" : "asym", " per-",
                      g, c.granularity == QuantGranularity::kPerGroup
                             ? absl::StrCat(" G=", c.group_size)
                             : std::string(),
                      " ", rows, "x", cols);
}

// Weight-like values with elements exactly on rounding ties and on the clip bounds of their
// scale, so that half-to-even rounding and the bound convention are exercised.
struct WeightCase {
  LsqConfig cfg;
  int64_t rows, cols;
  std::vector<float> w, s, beta;
};

WeightCase MakeWeightCase(const LsqConfig& cfg, int64_t rows, int64_t cols, uint32_t seed) {
  WeightCase wc{cfg, rows, cols, RandomFloats(rows * cols, seed, -1.0, 1.0), {}, {}};
  const int64_t S = *lsq_num_scales(cfg, rows, cols);
  const QuantRange range = *quant_range(cfg.bits, cfg.mode);
  std::vector<float> u = RandomFloats(S, seed + 1, 0.5, 1.0);
  wc.s.resize(S);
  // About a fifth of the values clip: s = span / (0.8 * levels), a power of two for every
  // third scale (then ties (k + 0.5) s are exact).
  const float levels = static_cast<float>(range.qp + range.qn);
  for (int64_t k = 0; k < S; ++k) {
    wc.s[k] = k % 3 == 0 ? std::ldexp(1.0f, -static_cast<int>(std::log2(levels)))
                         : 2.0f * u[k] / (0.8f * levels);
  }
  if (cfg.mode == LsqMode::kAsymmetric) {
    wc.beta = RandomFloats(S, seed + 2, -1.0, -0.6);
  }
  // Ties and bounds on a few elements of each row (in the scale of that element).
  const int64_t gpr = cfg.granularity == QuantGranularity::kPerGroup
                          ? (cols + cfg.group_size - 1) / cfg.group_size
                          : 1;
  for (int64_t r = 0; r < rows; ++r) {
    for (int t = 0; t < 4 && t < cols; ++t) {
      const int64_t c = (t * 7 + r * 3) % cols;
      int64_t k = 0;
      if (cfg.granularity == QuantGranularity::kPerChannel) k = r;
      if (cfg.granularity == QuantGranularity::kPerGroup) k = r * gpr + c / cfg.group_size;
      const float b = cfg.mode == LsqMode::kAsymmetric ? wc.beta[k] : 0.f;
      float x;
      switch (t) {
        case 0: x = 1.5f; break;                                   // tie
        case 1: x = -0.5f; break;                                  // tie (clips to 0 if asym)
        case 2: x = static_cast<float>(range.qp); break;           // on the upper bound
        default: x = static_cast<float>(-range.qn) + 0.5f; break;  // tie near the lower one
      }
      wc.w[r * cols + c] = x * wc.s[k] + b;
    }
  }
  return wc;
}

// The configurations and shapes every weight test runs: (rows, cols, group) chosen to hit the
// vector branch (cols and group multiples of 8) and the element-wise one, a group that does
// not divide the row (200 = 4 * 48 + 8; 37 = 5 * 7 + 2; 1300 = 2 * 600 + 100), a group wider
// than the row, and segments long enough for the backward's block-per-segment branch.
struct Shape {
  QuantGranularity gran;
  int group;
  int64_t rows, cols;
};
const Shape kShapes[] = {
    {QuantGranularity::kPerChannel, 0, 64, 256},  {QuantGranularity::kPerChannel, 0, 5, 37},
    {QuantGranularity::kPerGroup, 32, 16, 256},   {QuantGranularity::kPerGroup, 48, 6, 200},
    {QuantGranularity::kPerGroup, 7, 5, 37},      {QuantGranularity::kPerGroup, 64, 3, 40},
    {QuantGranularity::kPerTensor, 0, 33, 96},    {QuantGranularity::kPerTensor, 0, 3, 13},
    // Rows of >= 512 elements: the backward's block-per-segment branch (vector and scalar).
    {QuantGranularity::kPerChannel, 0, 9, 1000},  {QuantGranularity::kPerChannel, 0, 4, 777},
    {QuantGranularity::kPerTensor, 0, 20, 640},   {QuantGranularity::kPerGroup, 600, 3, 1300},
};

std::vector<LsqConfig> AllConfigs() {
  std::vector<LsqConfig> out;
  for (const Shape& sh : kShapes) {
    for (int bits : kBits) {
      for (LsqMode mode : {LsqMode::kSymmetric, LsqMode::kAsymmetric}) {
        LsqConfig c;
        c.bits = bits;
        c.mode = mode;
        c.granularity = sh.gran;
        c.group_size = sh.group > 0 ? sh.group : 128;
        out.push_back(c);
      }
    }
  }
  return out;
}

// Runs the weight forward on the device with every output and compares against the CPU.
// offset > 0 shifts every device array off 16-byte alignment (the element-wise branch).
void CheckWeightForward(const WeightCase& wc, int64_t offset, bool with_phi) {
  const LsqConfig& cfg = wc.cfg;
  const int64_t n = wc.rows * wc.cols;
  SCOPED_TRACE(Name(cfg, wc.rows, wc.cols) + (offset ? " unaligned" : "") +
               (with_phi ? " +phi" : ""));
  const bool asym = cfg.mode == LsqMode::kAsymmetric;
  std::vector<float> ref(n);
  ASSERT_TRUE(lsq_forward(ref.data(), wc.w.data(), wc.s.data(), asym ? wc.beta.data() : nullptr,
                          wc.rows, wc.cols, cfg)
                  .ok());
  std::vector<int32_t> ref_codes(n);
  ASSERT_TRUE(lsq_quantize_codes(ref_codes.data(), wc.w.data(), wc.s.data(),
                                 asym ? wc.beta.data() : nullptr, wc.rows, wc.cols, cfg)
                  .ok());
  const std::vector<float> phi = RandomFloats(n, 99, -0.01, 0.01);

  TestStream stream;
  DeviceArray<float> w(wc.w, offset), s(wc.s, offset), phi_d(phi, offset);
  DeviceArray<float> beta(asym ? wc.beta : std::vector<float>{0.f}, offset);
  DeviceArray<bf16> out(n, offset);
  DeviceArray<int8_t> codes(n, offset);
  DeviceArray<float> resid(n, offset);
  const absl::Status st = lsq_weight_forward_cuda(
      out.get(), asym ? nullptr : codes.get(), resid.get(), w.get(), s.get(),
      asym ? beta.get() : nullptr, with_phi ? phi_d.get() : nullptr, wc.rows, wc.cols, cfg,
      stream.get());
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_TRUE(stream.Sync().ok());

  const std::vector<bf16> got = out.ToHost("out");
  const std::vector<float> got_resid = resid.ToHost("residual");
  int bad = 0;
  for (int64_t i = 0; i < n && bad < 8; ++i) {
    const float want = with_phi ? ref[i] + phi[i] : ref[i];
    if (got[i].bits != FloatToBf16(want).bits) {
      ADD_FAILURE() << "out[" << i << "] = " << Bf16ToFloat(got[i]) << ", want bf16(" << want
                    << ")";
      ++bad;
    }
    const float want_resid = wc.w[i] - ref[i];
    if (std::memcmp(&got_resid[i], &want_resid, 4) != 0) {
      ADD_FAILURE() << "residual[" << i << "] = " << got_resid[i] << ", want " << want_resid;
      ++bad;
    }
  }
  if (!asym) {
    const std::vector<int8_t> got_codes = codes.ToHost("codes");
    for (int64_t i = 0; i < n; ++i) {
      if (got_codes[i] != ref_codes[i]) {
        ADD_FAILURE() << "codes[" << i << "] = " << int{got_codes[i]} << ", want "
                      << ref_codes[i];
        break;
      }
    }
  }
  // The steps were positive: left as they were.
  ExpectBitwiseEqual(s.ToHost("s"), wc.s, "s unchanged");
}

TEST(LsqWeightCuda, ForwardMatchesCpuEveryConfig) {
  QT_SKIP_WITHOUT_GPU();
  uint32_t seed = 1;
  const std::vector<LsqConfig> cfgs = AllConfigs();
  size_t i = 0;
  for (const Shape& sh : kShapes) {
    for (int b = 0; b < 8; ++b, ++i) {
      const WeightCase wc = MakeWeightCase(cfgs[i], sh.rows, sh.cols, seed++);
      CheckWeightForward(wc, 0, false);
    }
  }
}

TEST(LsqWeightCuda, ForwardUnalignedAndPhiBranches) {
  QT_SKIP_WITHOUT_GPU();
  for (LsqMode mode : {LsqMode::kSymmetric, LsqMode::kAsymmetric}) {
    LsqConfig cfg;
    cfg.bits = 4;
    cfg.mode = mode;
    cfg.granularity = QuantGranularity::kPerGroup;
    cfg.group_size = 32;
    const WeightCase wc = MakeWeightCase(cfg, 16, 256, 7);
    CheckWeightForward(wc, 1, false);  // element-wise branch of a vector shape
    CheckWeightForward(wc, 0, true);
    CheckWeightForward(wc, 3, true);
  }
}

TEST(LsqWeightCuda, ForwardClampsStepsInPlace) {
  QT_SKIP_WITHOUT_GPU();
  LsqConfig cfg;
  cfg.bits = 4;
  WeightCase wc = MakeWeightCase(cfg, 6, 64, 3);
  wc.s[1] = 0.f;
  wc.s[3] = -2.f;
  wc.s[4] = kNaN;
  std::vector<float> clamped = wc.s;
  for (float& v : clamped) {
    if (!(v >= kLsqMinStep)) v = kLsqMinStep;
  }
  std::vector<float> ref(wc.w.size());
  ASSERT_TRUE(lsq_forward(ref.data(), wc.w.data(), clamped.data(), nullptr, 6, 64, cfg).ok());
  TestStream stream;
  DeviceArray<float> w(wc.w), s(wc.s);
  DeviceArray<bf16> out(wc.w.size());
  QT_ASSERT_OK(lsq_weight_forward_cuda(out.get(), nullptr, nullptr, w.get(), s.get(), nullptr,
                                       nullptr, 6, 64, cfg, stream.get()));
  ASSERT_TRUE(stream.Sync().ok());
  ExpectBitwiseEqual(s.ToHost("s"), clamped, "clamped steps");
  const std::vector<bf16> got = out.ToHost("out");
  for (size_t i = 0; i < ref.size(); ++i) {
    ASSERT_EQ(got[i].bits, FloatToBf16(ref[i]).bits) << i;
  }
}

// Per scale, g * the sum of |each element's ds term| + |dbeta term| (the scale of the fp32
// rounding of a sum whose terms may cancel): the tolerance of the step gradients.
std::vector<double> AbsTermSums(const std::vector<float>& g, const std::vector<float>& v,
                                const std::vector<float>& s, const std::vector<float>* beta,
                                int64_t rows, int64_t cols, const LsqConfig& cfg) {
  const QuantRange r = *quant_range(cfg.bits, cfg.mode);
  const int64_t S = static_cast<int64_t>(s.size());
  const int64_t gpr = cfg.granularity == QuantGranularity::kPerGroup
                          ? (cols + cfg.group_size - 1) / cfg.group_size
                          : 1;
  std::vector<double> sum(S, 0.0);
  std::vector<int64_t> count(S, 0);
  for (int64_t i = 0; i < rows * cols; ++i) {
    const int64_t row = i / cols, c = i % cols;
    int64_t k = 0;
    if (cfg.granularity == QuantGranularity::kPerChannel) k = row;
    if (cfg.granularity == QuantGranularity::kPerGroup) k = row * gpr + c / cfg.group_size;
    const float b = beta != nullptr ? (*beta)[k] : 0.f;
    const float x = beta != nullptr ? (v[i] - b) / s[k] : v[i] / s[k];
    double t;
    if (x <= -r.qn) t = r.qn + 1.0;
    else if (x >= r.qp) t = r.qp + 1.0;
    else t = std::abs(std::nearbyint(x) - x);
    sum[k] += std::abs(static_cast<double>(g[i])) * t;
    ++count[k];
  }
  for (int64_t k = 0; k < S; ++k) {
    double n = cfg.grad_scale_count > 0 ? cfg.grad_scale_count : count[k];
    if (cfg.grad_scale == LsqGradScale::kLsq) sum[k] /= std::sqrt(n * r.qp);
  }
  return sum;
}

// The weight backward: dw masked in place (exact), ds/dbeta against lsq_backward.
template <typename G>
void CheckWeightBackward(const WeightCase& wc, int64_t offset, GradWrite write) {
  constexpr bool kBf16 = std::is_same<G, bf16>::value;
  const LsqConfig& cfg = wc.cfg;
  const int64_t n = wc.rows * wc.cols;
  const int64_t S = static_cast<int64_t>(wc.s.size());
  SCOPED_TRACE(Name(cfg, wc.rows, wc.cols) + (kBf16 ? " bf16" : " fp32") +
               (offset ? " unaligned" : "") +
               (write == GradWrite::kOverwrite ? " overwrite" : " accumulate"));
  const bool asym = cfg.mode == LsqMode::kAsymmetric;
  // dW_eff: BF16-valued for the BF16 case, so that CPU and GPU see the same values.
  std::vector<float> g = RandomFloats(n, 11, -1.0, 1.0);
  std::vector<G> g_dev(n);
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (kBf16) {
      g_dev[i] = FloatToBf16(g[i]);
      g[i] = Bf16ToFloat(g_dev[i]);
    } else {
      g_dev[i] = g[i];
    }
  }
  // Prior step gradients (accumulate must add to them), BF16-valued for BF16.
  std::vector<float> ds0 = RandomFloats(S, 12, -0.1, 0.1), db0 = RandomFloats(S, 13, -0.1, 0.1);
  std::vector<G> ds0_dev(S), db0_dev(S);
  for (int64_t k = 0; k < S; ++k) {
    if constexpr (kBf16) {
      ds0_dev[k] = FloatToBf16(ds0[k]);
      db0_dev[k] = FloatToBf16(db0[k]);
      ds0[k] = Bf16ToFloat(ds0_dev[k]);
      db0[k] = Bf16ToFloat(db0_dev[k]);
    } else {
      ds0_dev[k] = ds0[k];
      db0_dev[k] = db0[k];
    }
  }
  std::vector<float> ref_dw(n, 0.f);
  std::vector<float> ref_ds(S, 0.f), ref_db(S, 0.f);
  if (write == GradWrite::kAccumulate) {
    ref_ds = ds0;
    ref_db = db0;
  }
  ASSERT_TRUE(lsq_backward(ref_dw.data(), ref_ds.data(), asym ? ref_db.data() : nullptr,
                           g.data(), wc.w.data(), wc.s.data(), asym ? wc.beta.data() : nullptr,
                           wc.rows, wc.cols, cfg)
                  .ok());
  // The CPU sums in double then rounds to float (and the accumulate adds in float); the GPU
  // sums in double in another order: one fp32 rounding apart, plus one BF16 rounding.
  const std::vector<double> sum_abs =
      AbsTermSums(g, wc.w, wc.s, asym ? &wc.beta : nullptr, wc.rows, wc.cols, cfg);

  TestStream stream;
  DeviceArray<float> w(wc.w, offset), s(wc.s, offset);
  DeviceArray<float> beta(asym ? wc.beta : std::vector<float>{0.f}, offset);
  DeviceArray<G> dw(g_dev, offset), ds(ds0_dev, offset), db(db0_dev, offset);
  const int64_t ws_bytes = lsq_weight_backward_cuda_workspace_bytes(wc.rows, wc.cols, cfg);
  DeviceArray<double> ws(std::max<int64_t>(1, ws_bytes / 8));
  const absl::Status st = lsq_weight_backward_cuda(
      dw.get(), ds.get(), asym ? db.get() : nullptr, w.get(), s.get(),
      asym ? beta.get() : nullptr, wc.rows, wc.cols, cfg, ws.get(), ws_bytes, stream.get(), write);
  ASSERT_TRUE(st.ok()) << st;
  ASSERT_TRUE(stream.Sync().ok());
  const std::vector<G> got_dw = dw.ToHost("dw");
  for (int64_t i = 0; i < n; ++i) {
    float v;
    if constexpr (kBf16) v = Bf16ToFloat(got_dw[i]);
    else v = got_dw[i];
    if (std::memcmp(&v, &ref_dw[i], 4) != 0) {
      ADD_FAILURE() << "dw[" << i << "] = " << v << ", want " << ref_dw[i];
      break;
    }
  }
  const double rtol = kBf16 ? testing::kBf16Eps : 4.0 * std::numeric_limits<float>::epsilon();
  std::vector<double> atol(S);
  for (int64_t k = 0; k < S; ++k) atol[k] = 1e-7 * sum_abs[k] + 1e-30;
  auto to_float = [](const std::vector<G>& v) {
    std::vector<float> f(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      if constexpr (kBf16) f[i] = Bf16ToFloat(v[i]);
      else f[i] = v[i];
    }
    return f;
  };
  ExpectNear(to_float(ds.ToHost("ds")), ref_ds, 0, rtol, "ds", &atol);
  if (asym) ExpectNear(to_float(db.ToHost("dbeta")), ref_db, 0, rtol, "dbeta", &atol);
}

TEST(LsqWeightCuda, BackwardMatchesCpuEveryConfig) {
  QT_SKIP_WITHOUT_GPU();
  uint32_t seed = 100;
  const std::vector<LsqConfig> cfgs = AllConfigs();
  size_t i = 0;
  for (const Shape& sh : kShapes) {
    for (int b = 0; b < 8; ++b, ++i) {
      const WeightCase wc = MakeWeightCase(cfgs[i], sh.rows, sh.cols, seed++);
      CheckWeightBackward<float>(wc, 0, b % 2 ? GradWrite::kAccumulate : GradWrite::kOverwrite);
      CheckWeightBackward<bf16>(wc, 0, b % 2 ? GradWrite::kOverwrite : GradWrite::kAccumulate);
    }
  }
}

TEST(LsqWeightCuda, BackwardUnalignedGradScaleCountAndDeterminism) {
  QT_SKIP_WITHOUT_GPU();
  LsqConfig cfg;
  cfg.bits = 3;
  cfg.mode = LsqMode::kAsymmetric;
  cfg.granularity = QuantGranularity::kPerGroup;
  cfg.group_size = 64;
  WeightCase wc = MakeWeightCase(cfg, 8, 256, 21);
  CheckWeightBackward<float>(wc, 1, GradWrite::kAccumulate);
  CheckWeightBackward<bf16>(wc, 5, GradWrite::kOverwrite);
  wc.cfg.grad_scale_count = 1000;
  CheckWeightBackward<float>(wc, 0, GradWrite::kOverwrite);
  wc.cfg.grad_scale = LsqGradScale::kNone;
  CheckWeightBackward<float>(wc, 0, GradWrite::kOverwrite);

  // Two runs give the same bits (per tensor: the two-pass reduction).
  LsqConfig pt;
  pt.bits = 8;
  pt.granularity = QuantGranularity::kPerTensor;
  const WeightCase t = MakeWeightCase(pt, 300, 72, 22);
  std::vector<float> results[2];
  for (auto& res : results) {
    TestStream stream;
    DeviceArray<float> w(t.w), s(t.s), dw(RandomFloats(300 * 72, 5)), ds(std::vector<float>{0.f});
    const int64_t ws_bytes = lsq_weight_backward_cuda_workspace_bytes(300, 72, pt);
    ASSERT_GT(ws_bytes, 0);
    DeviceArray<double> ws(ws_bytes / 8);
    QT_ASSERT_OK(lsq_weight_backward_cuda(dw.get(), ds.get(), nullptr, w.get(), s.get(), nullptr,
                                          300, 72, pt, ws.get(), ws_bytes, stream.get(),
                                          GradWrite::kOverwrite));
    ASSERT_TRUE(stream.Sync().ok());
    res = ds.ToHost("ds");
  }
  ExpectBitwiseEqual(results[0], results[1], "per-tensor ds, two runs");
}

// ---- Activations.

// BF16-valued activations (what the quantizers see on the GPU), with a zero row and, when
// asked, a row holding a NaN.
std::vector<float> Activations(int64_t N, int64_t C, uint32_t seed, bool nan_row) {
  std::vector<float> x = RandomFloats(N * C, seed, -3.0, 3.0);
  for (float& v : x) v = Bf16ToFloat(FloatToBf16(v));
  if (N > 2) {
    for (int64_t c = 0; c < C; ++c) x[1 * C + c] = 0.f;
  }
  if (nan_row && N > 3) x[3 * C + C / 2] = kNaN;
  return x;
}

struct ActCase {
  ActQuantMode mode;
  int bits;
  LsqMode lsq;
  int64_t N, C, offset;
};

std::vector<float> ToFloatVec(const std::vector<bf16>& v) { return Bf16ToFloat(v); }

// Host codes of a per-token row scale (0 where x / scale is NaN), as the kernels write them.
int8_t HostCode(float x, float scale, const QuantRange& r) {
  float v = std::nearbyint(x / scale);
  if (std::isnan(v)) return 0;
  v = std::min(std::max(v, static_cast<float>(-r.qn)), static_cast<float>(r.qp));
  return static_cast<int8_t>(v);
}

void CheckActForwardBackward(const ActCase& ac) {
  const bool per_token = ac.mode == ActQuantMode::kPerToken;
  const bool asym = ac.lsq == LsqMode::kAsymmetric;
  SCOPED_TRACE(absl::StrCat(per_token ? "per-token " : "per-tensor ", ac.bits, "-bit ",
                            asym ? "asym " : "sym ", ac.N, "x", ac.C,
                            ac.offset ? " unaligned" : ""));
  const int64_t N = ac.N, C = ac.C, n = N * C;
  const std::vector<float> x = Activations(N, C, 31 + ac.bits, per_token);
  std::vector<bf16> xb(n);
  for (int64_t i = 0; i < n; ++i) xb[i] = FloatToBf16(x[i]);
  const QuantRange range = *quant_range(ac.bits, ac.lsq);
  const float step = asym ? 6.0f / (0.8f * range.qp) : 3.0f / (0.8f * range.qp);
  const float offset = asym ? -2.4f : 0.f;
  LsqConfig cfg;
  cfg.bits = ac.bits;
  cfg.mode = ac.lsq;
  cfg.granularity = QuantGranularity::kPerTensor;
  cfg.grad_scale_count = C;

  // CPU forward.
  std::vector<float> ref(n), ref_scales(N, 0.f);
  std::vector<int8_t> ref_codes(n);
  if (per_token) {
    ASSERT_TRUE(per_token_quant_forward(ref.data(), ref_scales.data(), x.data(), N, C, ac.bits)
                    .ok());
    for (int64_t i = 0; i < n; ++i) ref_codes[i] = HostCode(x[i], ref_scales[i / C], range);
  } else {
    ASSERT_TRUE(lsq_forward(ref.data(), x.data(), &step, asym ? &offset : nullptr, 1, n, cfg).ok());
    if (!asym) {
      std::vector<int32_t> c32(n);
      ASSERT_TRUE(lsq_quantize_codes(c32.data(), x.data(), &step, nullptr, 1, n, cfg).ok());
      for (int64_t i = 0; i < n; ++i) ref_codes[i] = static_cast<int8_t>(c32[i]);
    }
  }

  TestStream stream;
  const int64_t off = ac.offset;
  DeviceArray<bf16> inp(xb, off), out(n, off), rec(n, off);
  DeviceArray<float> step_d(std::vector<float>{step}), offset_d(std::vector<float>{offset});
  DeviceArray<float> scales(N);
  DeviceArray<int8_t> codes(n, off);
  ActQuant q;
  q.mode = ac.mode;
  q.bits = ac.bits;
  q.lsq_mode = ac.lsq;
  if (!per_token) {
    q.step = step_d.get();
    if (asym) q.offset = offset_d.get();
  } else {
    q.token_scales = scales.get();
  }
  if (!asym) q.codes = codes.get();
  QT_ASSERT_OK(act_quant_forward_cuda(out.get(), inp.get(), N, C, q, stream.get()));
  ASSERT_TRUE(stream.Sync().ok());
  const std::vector<bf16> got = out.ToHost("out");
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(ref[i])) {
      ASSERT_TRUE(std::isnan(Bf16ToFloat(got[i]))) << "out[" << i << "] should be NaN";
    } else {
      ASSERT_EQ(got[i].bits, FloatToBf16(ref[i]).bits)
          << "out[" << i << "] = " << Bf16ToFloat(got[i]) << ", want bf16(" << ref[i] << ")";
    }
  }
  if (!asym) {
    const std::vector<int8_t> got_codes = codes.ToHost("codes");
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(got_codes[i], ref_codes[i]) << "codes[" << i << "]";
  }
  if (per_token) {
    const std::vector<float> got_scales = scales.ToHost("token_scales");
    for (int64_t r = 0; r < N; ++r) {
      if (std::isnan(ref_scales[r])) {
        EXPECT_TRUE(std::isnan(got_scales[r])) << "scale[" << r << "]";
      } else {
        EXPECT_EQ(got_scales[r], ref_scales[r]) << "scale[" << r << "]";
      }
    }
  }

  // Backward, both write modes, with the recomputed output.
  std::vector<float> dout = RandomFloats(n, 41, -1.0, 1.0), d0 = RandomFloats(n, 42, -1.0, 1.0);
  for (float& v : dout) v = Bf16ToFloat(FloatToBf16(v));
  for (float& v : d0) v = Bf16ToFloat(FloatToBf16(v));
  std::vector<float> ref_mask(n, 0.f);
  float ref_ds = 0.f, ref_db = 0.f, abs_ds = 0.f, abs_db = 0.f;  // abs: tolerance scale
  if (per_token) {
    ref_mask = dout;
  } else {
    ASSERT_TRUE(lsq_backward(ref_mask.data(), &ref_ds, asym ? &ref_db : nullptr, dout.data(),
                             x.data(), &step, asym ? &offset : nullptr, 1, n, cfg)
                    .ok());
    const std::vector<float> sv{step}, bv{offset};
    const std::vector<double> a =
        AbsTermSums(dout, x, sv, asym ? &bv : nullptr, 1, n, cfg);
    abs_ds = static_cast<float>(a[0]);
    abs_db = abs_ds;
  }
  const int64_t ws_bytes = act_quant_backward_cuda_workspace_bytes(N, C, q);
  DeviceArray<double> ws(std::max<int64_t>(1, ws_bytes / 8));
  for (GradWrite dw : {GradWrite::kOverwrite, GradWrite::kAccumulate}) {
    SCOPED_TRACE(dw == GradWrite::kOverwrite ? "dinp overwrite" : "dinp accumulate");
    DeviceArray<bf16> dout_d(ToBf16(dout), off), dinp(ToBf16(d0), off);
    DeviceArray<float> ds(std::vector<float>{0.5f}), db(std::vector<float>{0.25f});
    rec.Poison();
    QT_ASSERT_OK(act_quant_backward_cuda(dinp.get(), per_token ? nullptr : ds.get(),
                                         per_token || !asym ? nullptr : db.get(), dout_d.get(),
                                         inp.get(), N, C, q, ws.get(), ws_bytes, stream.get(), dw,
                                         GradWrite::kAccumulate, rec.get()));
    ASSERT_TRUE(stream.Sync().ok());
    const std::vector<bf16> got_dinp = dinp.ToHost("dinp");
    for (int64_t i = 0; i < n; ++i) {
      const float want = dw == GradWrite::kOverwrite ? ref_mask[i] : d0[i] + ref_mask[i];
      ASSERT_EQ(got_dinp[i].bits, FloatToBf16(want).bits)
          << "dinp[" << i << "] = " << Bf16ToFloat(got_dinp[i]) << ", want bf16(" << want << ")";
    }
    const std::vector<bf16> got_rec = rec.ToHost("out_recompute");
    for (int64_t i = 0; i < n; ++i) {
      if (std::isnan(Bf16ToFloat(got[i]))) {
        ASSERT_TRUE(std::isnan(Bf16ToFloat(got_rec[i]))) << i;
      } else {
        ASSERT_EQ(got_rec[i].bits, got[i].bits) << "out_recompute[" << i << "] differs";
      }
    }
    if (!per_token) {
      const double tol_s = 1e-6 * abs_ds + 1e-30, tol_b = 1e-6 * abs_db + 1e-30;
      EXPECT_NEAR(ds.ToHost("dstep")[0], 0.5f + ref_ds, tol_s + 1e-7);
      if (asym) {
        EXPECT_NEAR(db.ToHost("doffset")[0], 0.25f + ref_db, tol_b + 1e-7);
      }
    }
  }
}

TEST(ActQuantCuda, ForwardBackwardMatchCpu) {
  QT_SKIP_WITHOUT_GPU();
  const int64_t shapes[][3] = {{16, 768, 0}, {7, 37, 0}, {5, 64, 1}, {300, 136, 0}, {2, 5, 3}};
  for (const auto& sh : shapes) {
    for (int bits : kBits) {
      CheckActForwardBackward({ActQuantMode::kPerToken, bits, LsqMode::kSymmetric, sh[0], sh[1],
                               sh[2]});
      for (LsqMode m : {LsqMode::kSymmetric, LsqMode::kAsymmetric}) {
        CheckActForwardBackward({ActQuantMode::kPerTensor, bits, m, sh[0], sh[1], sh[2]});
      }
    }
  }
}

TEST(ActQuantCuda, PerTensorStepClampedAndNoneIsACopy) {
  QT_SKIP_WITHOUT_GPU();
  const std::vector<float> x = Activations(4, 24, 3, false);
  TestStream stream;
  DeviceArray<bf16> inp(ToBf16(x)), out(x.size());
  DeviceArray<float> step(std::vector<float>{-1.f});
  ActQuant q;
  q.mode = ActQuantMode::kPerTensor;
  q.bits = 8;
  q.step = step.get();
  QT_ASSERT_OK(act_quant_forward_cuda(out.get(), inp.get(), 4, 24, q, stream.get()));
  ASSERT_TRUE(stream.Sync().ok());
  EXPECT_EQ(step.ToHost("step")[0], kLsqMinStep);
  ActQuant none;
  QT_ASSERT_OK(act_quant_forward_cuda(out.get(), inp.get(), 4, 24, none, stream.get()));
  ASSERT_TRUE(stream.Sync().ok());
  ExpectBitwiseEqual(ToFloatVec(out.ToHost("out")), x, "kNone copies");
}

TEST(ActQuantCuda, InitMatchesCpu) {
  QT_SKIP_WITHOUT_GPU();
  const int64_t sizes[] = {1, 37, 4096 + 5, 300000};
  for (int64_t n : sizes) {
    std::vector<float> x = RandomFloats(n, static_cast<uint32_t>(n), -2.0, 3.0);
    for (float& v : x) v = Bf16ToFloat(FloatToBf16(v));
    for (LsqInit method : {LsqInit::kLsq, LsqInit::kMseSearch}) {
      for (LsqMode mode : {LsqMode::kSymmetric, LsqMode::kAsymmetric}) {
        for (int bits : {4, 8}) {
          SCOPED_TRACE(absl::StrCat("n=", n, method == LsqInit::kLsq ? " lsq" : " mse",
                                    mode == LsqMode::kSymmetric ? " sym " : " asym ", bits));
          LsqConfig cfg;
          cfg.bits = bits;
          cfg.mode = mode;
          cfg.granularity = QuantGranularity::kPerTensor;
          LsqInitOptions opt;
          opt.method = method;
          float s_ref = 0, b_ref = 0;
          const bool asym = mode == LsqMode::kAsymmetric;
          ASSERT_TRUE(lsq_init(&s_ref, asym ? &b_ref : nullptr, x.data(), 1, n, cfg, opt).ok());
          TestStream stream;
          DeviceArray<bf16> xd(ToBf16(x), n % 2);
          DeviceArray<float> s(1), b(1);
          const int64_t ws_bytes = lsq_act_init_cuda_workspace_bytes(n, opt);
          DeviceArray<double> ws(ws_bytes / 8);
          QT_ASSERT_OK(lsq_act_init_cuda(s.get(), asym ? b.get() : nullptr, xd.get(), n, bits,
                                         mode, opt, ws.get(), ws_bytes, stream.get()));
          ASSERT_TRUE(stream.Sync().ok());
          // Same statistic in double over another order: equal, or one float ulp apart.
          const float s_got = s.ToHost("step")[0];
          EXPECT_NEAR(s_got, s_ref, 2 * std::numeric_limits<float>::epsilon() * s_ref)
              << "step";
          if (asym) {
            EXPECT_NEAR(b.ToHost("offset")[0], b_ref, 1e-6 * std::abs(b_ref)) << "offset";
          }
        }
      }
    }
  }
  // All zeros: step 1.
  TestStream stream;
  DeviceArray<bf16> z(ToBf16(std::vector<float>(100, 0.f)));
  DeviceArray<float> s(1);
  const int64_t ws_bytes = lsq_act_init_cuda_workspace_bytes(100);
  DeviceArray<double> ws(ws_bytes / 8);
  QT_ASSERT_OK(lsq_act_init_cuda(s.get(), nullptr, z.get(), 100, 4, LsqMode::kSymmetric, {},
                                 ws.get(), ws_bytes, stream.get()));
  ASSERT_TRUE(stream.Sync().ok());
  EXPECT_EQ(s.ToHost("step")[0], 1.f);
}

// precision.qat.fp16_scales: the steps and offsets Linear::ClampSteps hands the forward.
TEST(LsqWeightCuda, Fp16StepsMatchLinear) {
  QT_SKIP_WITHOUT_GPU();
  std::vector<float> s = RandomFloats(1000, 51, 1e-9, 1.0);
  std::vector<float> z = RandomFloats(1000, 52, -70000.0, 70000.0);
  s[0] = -1.f, s[1] = 0.f, s[2] = kNaN, s[3] = 1e6f, s[4] = 65504.f, s[5] = 3e-8f;
  std::vector<float> want_s(s.size()), want_s16(s.size()), want_z16(z.size());
  for (size_t i = 0; i < s.size(); ++i) {
    want_s[i] = s[i] >= kLsqMinStep ? s[i] : kLsqMinStep;
    want_s16[i] = std::max(round_to_fp16(std::min(want_s[i], kFp16Max)), kFp16MinSubnormal);
    want_z16[i] = round_to_fp16(std::clamp(z[i], -kFp16Max, kFp16Max));
  }
  TestStream stream;
  DeviceArray<float> ds(s), dz(z), s16(s.size()), z16(z.size());
  QT_ASSERT_OK(lsq_fp16_steps_cuda(s16.get(), z16.get(), ds.get(), dz.get(), 1000, stream.get()));
  ASSERT_TRUE(stream.Sync().ok());
  ExpectBitwiseEqual(ds.ToHost("s"), want_s, "clamped s");
  ExpectBitwiseEqual(s16.ToHost("s16"), want_s16, "s16");
  ExpectBitwiseEqual(z16.ToHost("z16"), want_z16, "z16");
  EXPECT_TRUE(absl::IsInvalidArgument(
      lsq_fp16_steps_cuda(s16.get(), nullptr, ds.get(), dz.get(), 1000, stream.get())));
}

// ---- Argument checks: no device needed (the launchers reject before any CUDA call).
TEST(LsqCudaArgs, RejectsBadArguments) {
  float* const fake = reinterpret_cast<float*>(0x1000);
  bf16* const fake_b = reinterpret_cast<bf16*>(0x1000);
  int8_t* const fake_c = reinterpret_cast<int8_t*>(0x1000);
  LsqConfig asym;
  asym.mode = LsqMode::kAsymmetric;
  // Codes of LSQ+ do not map to the INT8 GEMM.
  absl::Status st = lsq_weight_forward_cuda(nullptr, fake_c, nullptr, fake, fake, fake, nullptr,
                                            4, 8, asym, nullptr);
  EXPECT_TRUE(absl::IsInvalidArgument(st)) << st;
  EXPECT_NE(st.message().find("symmetric"), absl::string_view::npos) << st;
  // Symmetric with a beta; asymmetric without.
  LsqConfig sym;
  EXPECT_TRUE(absl::IsInvalidArgument(lsq_weight_forward_cuda(fake_b, nullptr, nullptr, fake,
                                                              fake, fake, nullptr, 4, 8, sym,
                                                              nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(lsq_weight_forward_cuda(fake_b, nullptr, nullptr, fake,
                                                              fake, nullptr, nullptr, 4, 8, asym,
                                                              nullptr)));
  // No output; bad bits; bad shape; per-group with group 0.
  EXPECT_TRUE(absl::IsInvalidArgument(lsq_weight_forward_cuda(
      nullptr, nullptr, nullptr, fake, fake, nullptr, nullptr, 4, 8, sym, nullptr)));
  LsqConfig b1 = sym;
  b1.bits = 1;
  EXPECT_TRUE(absl::IsInvalidArgument(lsq_weight_forward_cuda(
      fake_b, nullptr, nullptr, fake, fake, nullptr, nullptr, 4, 8, b1, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(lsq_weight_forward_cuda(
      fake_b, nullptr, nullptr, fake, fake, nullptr, nullptr, 0, 8, sym, nullptr)));
  LsqConfig g0 = sym;
  g0.granularity = QuantGranularity::kPerGroup;
  g0.group_size = 0;
  EXPECT_TRUE(absl::IsInvalidArgument(lsq_weight_forward_cuda(
      fake_b, nullptr, nullptr, fake, fake, nullptr, nullptr, 4, 8, g0, nullptr)));
  // Backward: dbeta for symmetric; per-tensor without workspace.
  EXPECT_TRUE(absl::IsInvalidArgument(lsq_weight_backward_cuda(
      fake, fake, fake, fake, fake, nullptr, 4, 8, sym, nullptr, 0, nullptr)));
  LsqConfig pt = sym;
  pt.granularity = QuantGranularity::kPerTensor;
  EXPECT_TRUE(absl::IsInvalidArgument(lsq_weight_backward_cuda(
      fake, fake, nullptr, fake, fake, nullptr, 4, 8, pt, nullptr, 0, nullptr)));
  // Activations: per-token with a step; per-tensor without; asymmetric codes.
  ActQuant tok;
  tok.mode = ActQuantMode::kPerToken;
  tok.step = fake;
  EXPECT_TRUE(absl::IsInvalidArgument(act_quant_forward_cuda(fake_b, fake_b, 2, 8, tok, nullptr)));
  ActQuant ten;
  ten.mode = ActQuantMode::kPerTensor;
  EXPECT_TRUE(absl::IsInvalidArgument(act_quant_forward_cuda(fake_b, fake_b, 2, 8, ten, nullptr)));
  ten.step = fake;
  ten.lsq_mode = LsqMode::kAsymmetric;
  ten.offset = fake;
  ten.codes = fake_c;
  EXPECT_TRUE(absl::IsInvalidArgument(act_quant_forward_cuda(fake_b, fake_b, 2, 8, ten, nullptr)));
  ten.codes = nullptr;
  ten.bits = 9;
  EXPECT_TRUE(absl::IsInvalidArgument(act_quant_forward_cuda(fake_b, fake_b, 2, 8, ten, nullptr)));
  // Init: symmetric with an offset; too little workspace.
  EXPECT_TRUE(absl::IsInvalidArgument(lsq_act_init_cuda(fake, fake, fake_b, 10, 4,
                                                        LsqMode::kSymmetric, {}, fake, 1 << 20,
                                                        nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(lsq_act_init_cuda(fake, nullptr, fake_b, 10, 4,
                                                        LsqMode::kSymmetric, {}, fake, 8,
                                                        nullptr)));
}

}  // namespace
}  // namespace qtrain::ops
