// GPU parity of the CUDA FP8 kernels (ops/cuda/fp8_cuda.h, the FP8 forms of layernorm and AdamW)
// against the CPU FP8 emulation (ops/quant/fp8.h): codes bit-exact, scales, scale_inv and amax
// exact, histories as DelayedScaler keeps them. Odd sizes, both the vector and the scalar
// branch of every kernel (sizes and pointer offsets chosen to select each), special values
// (NaN, +-inf, -0, subnormals, values that saturate), outputs poisoned (0xFF, a code no encode
// writes) before each run with guard bands checked after. Tagged "gpu".
#include "ops/cuda/fp8_cuda.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "ops/cuda/adamw_cuda.h"
#include "ops/cuda/layernorm_cuda.h"
#include "ops/quant/fp8.h"
#include "tests/ops/cuda_test_util.h"

namespace qtrain::ops {
namespace {

using testing::DeviceArray;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

uint32_t Bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}

// Exact equality of floats, NaN equal to NaN (any payload).
void ExpectSameFloat(float got, float want, const std::string& what) {
  if (std::isnan(want)) {
    EXPECT_TRUE(std::isnan(got)) << what << ": got " << got << ", want NaN";
  } else {
    EXPECT_EQ(Bits(got), Bits(want)) << what << ": got " << got << " want " << want;
  }
}

void ExpectSameFloats(const std::vector<float>& got, const std::vector<float>& want,
                      const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const bool same = std::isnan(want[i]) ? std::isnan(got[i]) : Bits(got[i]) == Bits(want[i]);
    if (!same && bad++ < 8) {
      ADD_FAILURE() << what << "[" << i << "]: got " << got[i] << " want " << want[i];
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " differ";
}

void ExpectSameCodes(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want,
                     const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  int bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] != want[i] && bad++ < 8) {
      ADD_FAILURE() << what << "[" << i << "]: got 0x" << std::hex << int(got[i]) << " want 0x"
                    << int(want[i]) << std::dec;
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << got.size() << " codes differ";
}

template <typename T>
std::vector<T> Transpose(const std::vector<T>& a, int64_t rows, int64_t cols) {
  std::vector<T> t(a.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = a[r * cols + c];
  return t;
}

// Random values of several magnitudes (so that a scale saturates some and sends others into the
// subnormal range), with special values sprinkled in when `specials`.
std::vector<float> TestValues(int64_t n, uint32_t seed, bool specials, double range = 4.0) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  std::uniform_int_distribution<int> e(-12, 4);
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = static_cast<float>(range * u(gen) * std::ldexp(1.0, e(gen)));
  if (specials && n > 8) {
    const float sp[] = {kNaN, kInf, -kInf, -0.0f, 1e-30f, -1e-40f, 65504.f, -3e38f};
    for (int j = 0; j < 8; ++j) v[(static_cast<int64_t>(j) * 7919 + 3) % n] = sp[j];
  }
  return v;
}

struct Bf16Values {
  std::vector<bf16> bits;
  std::vector<float> values;  // exactly the BF16 values
};

Bf16Values ToBf16Values(const std::vector<float>& v) {
  Bf16Values b;
  b.bits = ToBf16(v);
  b.values = Bf16ToFloat(b.bits);
  return b;
}

std::vector<uint8_t> CpuEncode(const std::vector<float>& v, float scale, Fp8Format f) {
  std::vector<uint8_t> out(v.size());
  EXPECT_TRUE(fp8_encode_array(out.data(), v.data(), static_cast<int64_t>(v.size()), scale, f).ok());
  return out;
}

// ---------------------------------------------------------------------------------------------
// Scaling state

TEST(Fp8ScalingStateTest, RejectsBadSpecs) {
  QT_SKIP_WITHOUT_GPU();
  EXPECT_EQ(Fp8ScalingState::Create({}, 16).status().code(), absl::StatusCode::kInvalidArgument);
  const std::vector<Fp8TensorSpec> bad_margin = {{Fp8Format::kE4M3, 0}, {Fp8Format::kE5M2, 65}};
  const absl::Status s = Fp8ScalingState::Create(bad_margin, 16).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("tensor 1 (E5M2): margin = 65"), absl::string_view::npos) << s;
  EXPECT_EQ(Fp8ScalingState::Create(bad_margin, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// Every tensor of a state against its own DelayedScaler over steps of amaxes that exercise each
// rule: zeros (scale kept), NaN/inf (stored as inf, scale kept until it rolls out), negative
// (magnitude), tiny (quotient overflows: kept), huge, margins.
TEST(Fp8ScalingStateTest, DelayedUpdateMatchesDelayedScaler) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  const int H = 5;
  const std::vector<Fp8TensorSpec> specs = {{Fp8Format::kE4M3, 0},  {Fp8Format::kE4M3, 2},
                                            {Fp8Format::kE5M2, 0},  {Fp8Format::kE5M2, 7},
                                            {Fp8Format::kE4M3, 64}, {Fp8Format::kE5M2, 1},
                                            {Fp8Format::kE4M3, 0}};
  const int K = static_cast<int>(specs.size());
  absl::StatusOr<std::unique_ptr<Fp8ScalingState>> state = Fp8ScalingState::Create(specs, H);
  QT_ASSERT_OK(state.status());
  std::vector<DelayedScaler> cpu;
  for (const Fp8TensorSpec& s : specs) cpu.push_back(*DelayedScaler::Create(s.format, H, s.margin));
  const std::vector<float> pattern = {0.0f, 3.5f, kNaN,    1e-3f, 0.0f,  -250.f, kInf,  7e4f,
                                      1e-39f, 2.0f, 0.125f, 1e30f, 1e-20f, 5.f,  0.0f,  448.f,
                                      -kInf, 0.3f, 12.f,   1e-44f};
  std::mt19937 gen(5);
  for (int step = 0; step < 40; ++step) {
    std::vector<float> amax(K);
    for (int k = 0; k < K; ++k) {
      amax[k] = step < 20 ? pattern[(step + 3 * k) % pattern.size()]
                          : static_cast<float>(std::ldexp(1.0, static_cast<int>(gen() % 40) - 20));
    }
    QT_ASSERT_OK(CopyHostToDevice((*state)->amax(), amax.data(), K * sizeof(float)));
    // Tensors 0..4 in one launch, 5..6 in another (the range form).
    QT_ASSERT_OK(fp8_delayed_update_cuda(**state, 0, 5, stream.get()));
    QT_ASSERT_OK(fp8_delayed_update_cuda(**state, 5, -1, stream.get()));
    QT_ASSERT_OK(stream.Sync());
    for (int k = 0; k < K; ++k) cpu[k].update(amax[k]);
    std::vector<float> got_amax(K), got_scale(K), got_inv(K), got_hist(K * H);
    QT_ASSERT_OK(CopyDeviceToHost(got_amax.data(), (*state)->amax(), K * sizeof(float)));
    QT_ASSERT_OK(CopyDeviceToHost(got_scale.data(), (*state)->scale(), K * sizeof(float)));
    QT_ASSERT_OK(CopyDeviceToHost(got_inv.data(), (*state)->scale_inv(), K * sizeof(float)));
    QT_ASSERT_OK(CopyDeviceToHost(got_hist.data(), (*state)->history(), K * H * sizeof(float)));
    for (int k = 0; k < K; ++k) {
      const std::string what = "step " + std::to_string(step) + " tensor " + std::to_string(k);
      ExpectSameFloat(got_scale[k], cpu[k].scale(), what + " scale");
      ExpectSameFloat(got_inv[k], 1.0f / cpu[k].scale(), what + " scale_inv");
      EXPECT_EQ(Bits(got_amax[k]), 0u) << what << ": amax not cleared";
      const std::vector<float> h = cpu[k].history();
      ExpectSameFloats(std::vector<float>(got_hist.begin() + k * H, got_hist.begin() + (k + 1) * H),
                       h, what + " history");
    }
  }
  // Download gives what Restore takes; Upload of it into a fresh state continues identically.
  std::vector<float> hist, scale;
  QT_ASSERT_OK((*state)->Download(&hist, &scale));
  absl::StatusOr<std::unique_ptr<Fp8ScalingState>> resumed = Fp8ScalingState::Create(specs, H);
  QT_ASSERT_OK(resumed.status());
  QT_ASSERT_OK((*resumed)->Upload(hist, scale));
  const std::vector<float> amax(K, 0.75f);
  QT_ASSERT_OK(CopyHostToDevice((*resumed)->amax(), amax.data(), K * sizeof(float)));
  QT_ASSERT_OK(fp8_delayed_update_cuda(**resumed, 0, -1, stream.get()));
  QT_ASSERT_OK(stream.Sync());
  std::vector<float> h2, s2;
  QT_ASSERT_OK((*resumed)->Download(&h2, &s2));
  for (int k = 0; k < K; ++k) {
    absl::StatusOr<DelayedScaler> r = DelayedScaler::Restore(
        specs[k].format, specs[k].margin,
        std::vector<float>(hist.begin() + k * H, hist.begin() + (k + 1) * H), scale[k]);
    QT_ASSERT_OK(r.status());
    r->update(0.75f);
    ExpectSameFloat(s2[k], r->scale(), "resumed scale " + std::to_string(k));
    ExpectSameFloats(std::vector<float>(h2.begin() + k * H, h2.begin() + (k + 1) * H),
                     r->history(), "resumed history " + std::to_string(k));
  }
  // Upload checks its input as Restore does.
  std::vector<float> bad_hist = hist;
  bad_hist[3] = -1.0f;
  absl::Status st = (*resumed)->Upload(bad_hist, scale);
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("tensor 0 history[3] = -1"), absl::string_view::npos) << st;
  std::vector<float> bad_scale = scale;
  bad_scale[2] = 0.0f;
  st = (*resumed)->Upload(hist, bad_scale);
  EXPECT_NE(st.message().find("tensor 2 scale = 0"), absl::string_view::npos) << st;
  EXPECT_EQ((*resumed)->Upload(hist, {1.0f}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(fp8_delayed_update_cuda(**resumed, 3, 5, stream.get()).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(Fp8ScalingStateTest, CurrentScaleMatchesCpuAndLeavesHistory) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  const std::vector<Fp8TensorSpec> specs = {{Fp8Format::kE4M3, 0}, {Fp8Format::kE5M2, 0},
                                            {Fp8Format::kE4M3, 3}, {Fp8Format::kE5M2, 2},
                                            {Fp8Format::kE4M3, 0}, {Fp8Format::kE4M3, 0},
                                            {Fp8Format::kE5M2, 0}, {Fp8Format::kE4M3, 1}};
  const int K = static_cast<int>(specs.size()), H = 3;
  absl::StatusOr<std::unique_ptr<Fp8ScalingState>> state = Fp8ScalingState::Create(specs, H);
  QT_ASSERT_OK(state.status());
  const std::vector<float> amax = {3.0f, 0.0f, kNaN, kInf, 1e-39f, 448.f, 123.456f, 1e-5f};
  QT_ASSERT_OK(CopyHostToDevice((*state)->amax(), amax.data(), K * sizeof(float)));
  // Tensors 1..6 only.
  QT_ASSERT_OK(fp8_current_scale_cuda(**state, 1, 6, stream.get()));
  QT_ASSERT_OK(stream.Sync());
  std::vector<float> got_amax(K), got_scale(K), got_inv(K), got_hist(K * H);
  QT_ASSERT_OK(CopyDeviceToHost(got_amax.data(), (*state)->amax(), K * sizeof(float)));
  QT_ASSERT_OK(CopyDeviceToHost(got_scale.data(), (*state)->scale(), K * sizeof(float)));
  QT_ASSERT_OK(CopyDeviceToHost(got_inv.data(), (*state)->scale_inv(), K * sizeof(float)));
  QT_ASSERT_OK(CopyDeviceToHost(got_hist.data(), (*state)->history(), K * H * sizeof(float)));
  for (int k = 0; k < K; ++k) {
    const bool in_range = k >= 1 && k <= 6;
    const float want = in_range ? fp8_current_scale(amax[k], specs[k].format, specs[k].margin) : 1.0f;
    ExpectSameFloat(got_scale[k], want, "scale " + std::to_string(k));
    ExpectSameFloat(got_inv[k], 1.0f / want, "scale_inv " + std::to_string(k));
    ExpectSameFloat(got_amax[k], in_range ? 0.0f : amax[k], "amax " + std::to_string(k));
  }
  ExpectSameFloats(got_hist, std::vector<float>(K * H, 0.0f), "history");
}

// ---------------------------------------------------------------------------------------------
// Casts

struct CastCase {
  int64_t rows, cols;
  int offset;  // elements of every array off 16-byte alignment (forces the scalar branch)
};

const CastCase kCastCases[] = {{1, 1, 0},     {7, 13, 0},   {16, 16, 0},   {64, 64, 0},
                               {48, 80, 0},   {100, 37, 0}, {130, 200, 0}, {256, 1024, 0},
                               {96, 160, 1},  {33, 64, 0},  {64, 33, 0},   {1000, 48, 0},
                               {17, 1000, 3},  {272, 208, 0}, {2064, 784, 0}};

template <typename T>
void RunCastCase(const CastCase& c, Fp8Format format, bool want_out, bool want_t, bool with_amax,
                 const testing::TestStream& stream) {
  SCOPED_TRACE(::testing::Message() << "rows=" << c.rows << " cols=" << c.cols << " offset="
                                    << c.offset << (format == Fp8Format::kE4M3 ? " E4M3" : " E5M2")
                                    << (std::is_same<T, float>::value ? " fp32" : " bf16")
                                    << " out=" << want_out << " out_t=" << want_t
                                    << " amax=" << with_amax);
  const int64_t n = c.rows * c.cols;
  std::vector<float> values = TestValues(n, static_cast<uint32_t>(n + c.offset), true);
  std::vector<T> host(n);
  if constexpr (std::is_same<T, float>::value) {
    host = values;
  } else {
    host = ToBf16(values);
    values = Bf16ToFloat(host);
  }
  const float scale = format == Fp8Format::kE4M3 ? 37.5f : 1500.25f;
  DeviceArray<T> d_in(host, c.offset);
  DeviceArray<uint8_t> d_out(n, c.offset), d_out_t(n, c.offset);
  DeviceArray<float> d_scale(std::vector<float>{scale});
  const float prior = 0.25f;  // the amax already there: the result is max(prior, amax(in))
  DeviceArray<float> d_amax(std::vector<float>{prior});
  QT_ASSERT_OK(fp8_cast_cuda(want_out ? d_out.get() : nullptr, want_t ? d_out_t.get() : nullptr,
                             with_amax ? d_amax.get() : nullptr, d_in.get(), c.rows, c.cols,
                             format, d_scale.get(), stream.get()));
  QT_ASSERT_OK(stream.Sync());
  const std::vector<uint8_t> want = CpuEncode(values, scale, format);
  if (want_out) ExpectSameCodes(d_out.ToHost("out"), want, "out");
  if (want_t) ExpectSameCodes(d_out_t.ToHost("out_t"), Transpose(want, c.rows, c.cols), "out_t");
  if (!want_out) {
    for (uint8_t b : d_out.ToHost("out")) ASSERT_EQ(b, 0xFF) << "out written though null";
  }
  const float a = amax(values.data(), n);
  ExpectSameFloat(d_amax.ToHost("amax")[0],
                  with_amax ? (std::isnan(a) ? a : std::max(a, prior)) : prior, "amax");
}

TEST(Fp8CastTest, MatchesCpuEncodeTransposeAndAmax) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  for (const CastCase& c : kCastCases) {
    for (Fp8Format f : {Fp8Format::kE4M3, Fp8Format::kE5M2}) {
      RunCastCase<bf16>(c, f, true, true, true, stream);
      RunCastCase<float>(c, f, true, true, true, stream);
    }
  }
  // One output at a time, and no amax.
  for (const CastCase& c : {CastCase{64, 48, 0}, CastCase{31, 9, 0}}) {
    RunCastCase<bf16>(c, Fp8Format::kE4M3, true, false, false, stream);
    RunCastCase<bf16>(c, Fp8Format::kE5M2, false, true, true, stream);
    RunCastCase<float>(c, Fp8Format::kE4M3, false, true, false, stream);
  }
}

TEST(Fp8CastTest, RejectsBadArguments) {
  QT_SKIP_WITHOUT_GPU();
  DeviceArray<bf16> in(4);
  DeviceArray<uint8_t> out(4);
  DeviceArray<float> scale(std::vector<float>{1.0f});
  EXPECT_EQ(fp8_cast_cuda(nullptr, nullptr, nullptr, in.get(), 2, 2, Fp8Format::kE4M3,
                          scale.get(), nullptr)
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(fp8_cast_cuda(out.get(), nullptr, nullptr, in.get(), 2, 2, Fp8Format::kE4M3, nullptr,
                          nullptr)
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(fp8_cast_cuda(out.get(), nullptr, nullptr, in.get(), -1, 2, Fp8Format::kE4M3,
                          scale.get(), nullptr)
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(Fp8AmaxTest, MatchesCpuAmax) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  for (int64_t n : {1, 7, 8, 9, 1000, 4096, 1 << 20, (1 << 20) + 3}) {
    for (int offset : {0, 1}) {
      for (bool specials : {false, true}) {
        SCOPED_TRACE(::testing::Message() << "n=" << n << " offset=" << offset
                                          << " specials=" << specials);
        const std::vector<float> v = TestValues(n, static_cast<uint32_t>(n), specials && n > 8);
        const Bf16Values b = ToBf16Values(v);
        DeviceArray<bf16> d_b(b.bits, offset);
        DeviceArray<float> d_f(v, offset);
        DeviceArray<float> amax_b(std::vector<float>{0.0f}), amax_f(std::vector<float>{0.0f});
        QT_ASSERT_OK(fp8_amax_cuda(amax_b.get(), d_b.get(), n, stream.get()));
        QT_ASSERT_OK(fp8_amax_cuda(amax_f.get(), d_f.get(), n, stream.get()));
        QT_ASSERT_OK(stream.Sync());
        ExpectSameFloat(amax_b.ToHost()[0], amax(b.values.data(), n), "bf16 amax");
        ExpectSameFloat(amax_f.ToHost()[0], amax(v.data(), n), "fp32 amax");
      }
    }
  }
}

TEST(Fp8TransposeTest, MatchesHostTranspose) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  for (const CastCase& c : kCastCases) {
    SCOPED_TRACE(::testing::Message() << "rows=" << c.rows << " cols=" << c.cols
                                      << " offset=" << c.offset);
    const int64_t n = c.rows * c.cols;
    std::vector<uint8_t> codes(n);
    std::mt19937 gen(static_cast<uint32_t>(n));
    for (uint8_t& b : codes) b = static_cast<uint8_t>(gen() % 255);  // never the poison 0xFF
    DeviceArray<uint8_t> d_in(codes, c.offset), d_out(n, c.offset);
    QT_ASSERT_OK(fp8_transpose_cuda(d_out.get(), d_in.get(), c.rows, c.cols, stream.get()));
    QT_ASSERT_OK(stream.Sync());
    ExpectSameCodes(d_out.ToHost("out"), Transpose(codes, c.rows, c.cols), "transpose");
  }
}

// ---------------------------------------------------------------------------------------------
// Block quantization

struct BlockCase {
  int64_t rows, cols;
  int offset;
};

const BlockCase kBlockCases[] = {{1, 1, 0},     {5, 130, 0},   {128, 128, 0}, {200, 300, 0},
                                 {256, 512, 0}, {64, 1000, 0}, {48, 136, 0},  {130, 8, 0},
                                 {256, 256, 1}, {384, 96, 0},  {3, 129, 2}};

TEST(Fp8BlockQuantizeTest, ActivationTilesAndTransposeMatchCpu) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  for (const BlockCase& c : kBlockCases) {
    for (Fp8Format f : {Fp8Format::kE4M3, Fp8Format::kE5M2}) {
      SCOPED_TRACE(::testing::Message() << "R=" << c.rows << " K=" << c.cols
                                        << " offset=" << c.offset
                                        << (f == Fp8Format::kE4M3 ? " E4M3" : " E5M2"));
      const int64_t R = c.rows, K = c.cols, n = R * K;
      std::vector<float> v = TestValues(n, static_cast<uint32_t>(n + 17), true, 30.0);
      // One whole 1x128 tile of zeros (scale 1) where the shape has room.
      if (R > 2 && K >= 128) std::fill(v.begin() + 2 * K, v.begin() + 2 * K + 128, 0.0f);
      const Bf16Values b = ToBf16Values(v);
      const int64_t nb = fp8_num_blocks(K), np = fp8_num_blocks(R);
      std::vector<uint8_t> want(n), want_t(n);
      std::vector<float> want_s(nb * R), want_st(np * K);
      QT_ASSERT_OK(fp8_quantize_1x128(want.data(), want_s.data(), b.values.data(), R, K, f));
      const std::vector<float> vt = Transpose(b.values, R, K);
      QT_ASSERT_OK(fp8_quantize_1x128(want_t.data(), want_st.data(), vt.data(), K, R, f));
      DeviceArray<bf16> d_in(b.bits, c.offset);
      DeviceArray<uint8_t> d_out(n, c.offset), d_out_t(n, c.offset);
      DeviceArray<float> d_s(nb * R), d_st(np * K);
      QT_ASSERT_OK(fp8_block_quantize_act_cuda(d_out.get(), d_s.get(), d_out_t.get(), d_st.get(),
                                               d_in.get(), R, K, f, stream.get()));
      QT_ASSERT_OK(stream.Sync());
      ExpectSameCodes(d_out.ToHost("out"), want, "codes");
      ExpectSameFloats(d_s.ToHost("scale_inv"), want_s, "scale_inv");
      ExpectSameCodes(d_out_t.ToHost("out_t"), want_t, "transposed codes");
      ExpectSameFloats(d_st.ToHost("scale_inv_t"), want_st, "transposed scale_inv");
      // Only the transpose.
      DeviceArray<uint8_t> d_out_t2(n);
      DeviceArray<float> d_st2(np * K);
      QT_ASSERT_OK(fp8_block_quantize_act_cuda(nullptr, nullptr, d_out_t2.get(), d_st2.get(),
                                               d_in.get(), R, K, f, stream.get()));
      QT_ASSERT_OK(stream.Sync());
      ExpectSameCodes(d_out_t2.ToHost("out_t only"), want_t, "transposed codes alone");
    }
  }
}

TEST(Fp8BlockQuantizeTest, WeightBlocksAndTransposeMatchCpu) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  for (const BlockCase& c : kBlockCases) {
    SCOPED_TRACE(::testing::Message() << "OC=" << c.rows << " K=" << c.cols
                                      << " offset=" << c.offset);
    const int64_t OC = c.rows, K = c.cols, n = OC * K;
    std::vector<float> w = TestValues(n, static_cast<uint32_t>(n + 5), true, 0.05);
    const int64_t ld = fp8_block_scale_ld(K), ld_t = fp8_block_scale_ld(OC);
    const int64_t nb = fp8_num_blocks(K), np = fp8_num_blocks(OC);
    std::vector<uint8_t> want(n), want_t(n);
    std::vector<float> want_s(np * ld), want_st(nb * ld_t);
    const Fp8Format f = Fp8Format::kE4M3;
    QT_ASSERT_OK(fp8_quantize_128x128(want.data(), want_s.data(), ld, w.data(), OC, K, f));
    const std::vector<float> wt = Transpose(w, OC, K);
    QT_ASSERT_OK(fp8_quantize_128x128(want_t.data(), want_st.data(), ld_t, wt.data(), K, OC, f));
    // The transpose's codes are the codes transposed (no re-quantization).
    ExpectSameCodes(want_t, Transpose(want, OC, K), "CPU: transposed blocks");
    DeviceArray<float> d_w(w, c.offset);
    DeviceArray<uint8_t> d_out(n, c.offset), d_out_t(n, c.offset);
    DeviceArray<float> d_s(np * ld), d_st(nb * ld_t);
    QT_ASSERT_OK(fp8_block_quantize_weight_cuda(d_out.get(), d_s.get(), d_out_t.get(),
                                                d_st.get(), d_w.get(), OC, K, f, stream.get()));
    QT_ASSERT_OK(stream.Sync());
    ExpectSameCodes(d_out.ToHost("out"), want, "codes");
    ExpectSameFloats(d_s.ToHost("scale_inv"), want_s, "scale grid");
    ExpectSameCodes(d_out_t.ToHost("out_t"), want_t, "transposed codes");
    ExpectSameFloats(d_st.ToHost("scale_inv_t"), want_st, "transposed grid");
  }
}

// ---------------------------------------------------------------------------------------------
// Layernorm -> FP8: mean/rstd/residual exactly as the BF16 forms, codes = encode(their BF16
// output * scale), amax = max |their output|.

struct LnCase {
  int N, C;
  int out_offset;  // FP8 output's offset in bytes (1: scalar branch although C % 8 == 0)
};

TEST(LayernormFp8Test, CodesAreTheCastOfTheBf16Output) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  const LnCase cases[] = {{1, 8, 0}, {7, 37, 0}, {64, 768, 0}, {33, 1600, 0}, {20, 64, 1},
                          {9, 100, 0}};
  for (const LnCase& c : cases) {
    for (Fp8Format f : {Fp8Format::kE4M3, Fp8Format::kE5M2}) {
      for (bool residual : {false, true}) {
        SCOPED_TRACE(::testing::Message() << "N=" << c.N << " C=" << c.C << " offset="
                                          << c.out_offset << " residual=" << residual
                                          << (f == Fp8Format::kE4M3 ? " E4M3" : " E5M2"));
        const int64_t n = static_cast<int64_t>(c.N) * c.C;
        const testing::Bf16Data a = testing::RandomBf16(n, 1, -3, 3),
                                b = testing::RandomBf16(n, 2, -2, 2),
                                w = testing::RandomBf16(c.C, 3, 0.5, 1.5),
                                bias = testing::RandomBf16(c.C, 4, -0.2, 0.2);
        DeviceArray<bf16> d_a(a.bits), d_b(b.bits), d_w(w.bits), d_bias(bias.bits);
        DeviceArray<bf16> ref_res(n), ref_out(n), res(n), out_amax(n), res_amax(n);
        DeviceArray<float> ref_mean(c.N), ref_rstd(c.N), mean(c.N), rstd(c.N), mean2(c.N),
            rstd2(c.N);
        DeviceArray<uint8_t> codes(n, c.out_offset);
        const float scale = f == Fp8Format::kE4M3 ? 60.f : 9000.f;
        DeviceArray<float> d_scale(std::vector<float>{scale});
        DeviceArray<float> amax_fp8(std::vector<float>{0.0f}), amax_bf16(std::vector<float>{0.0f});
        if (residual) {
          QT_ASSERT_OK(residual_layernorm_forward_cuda(ref_res.get(), ref_out.get(), ref_mean.get(),
                                                       ref_rstd.get(), d_a.get(), d_b.get(),
                                                       d_w.get(), d_bias.get(), c.N, c.C,
                                                       stream.get()));
          QT_ASSERT_OK(residual_layernorm_forward_fp8_cuda(
              res.get(), codes.get(), mean.get(), rstd.get(), amax_fp8.get(), d_a.get(),
              d_b.get(), d_w.get(), d_bias.get(), c.N, c.C, f, d_scale.get(), stream.get()));
          QT_ASSERT_OK(residual_layernorm_forward_amax_cuda(
              res_amax.get(), out_amax.get(), mean2.get(), rstd2.get(), amax_bf16.get(),
              d_a.get(), d_b.get(), d_w.get(), d_bias.get(), c.N, c.C, stream.get()));
        } else {
          QT_ASSERT_OK(layernorm_forward_cuda(ref_out.get(), ref_mean.get(), ref_rstd.get(),
                                              d_a.get(), d_w.get(), d_bias.get(), c.N, c.C,
                                              stream.get()));
          QT_ASSERT_OK(layernorm_forward_fp8_cuda(codes.get(), mean.get(), rstd.get(),
                                                  amax_fp8.get(), d_a.get(), d_w.get(),
                                                  d_bias.get(), c.N, c.C, f, d_scale.get(),
                                                  stream.get()));
          QT_ASSERT_OK(layernorm_forward_amax_cuda(out_amax.get(), mean2.get(), rstd2.get(),
                                                   amax_bf16.get(), d_a.get(), d_w.get(),
                                                   d_bias.get(), c.N, c.C, stream.get()));
        }
        QT_ASSERT_OK(stream.Sync());
        const std::vector<float> y = Bf16ToFloat(ref_out.ToHost("ref out"));
        ExpectSameCodes(codes.ToHost("codes"), CpuEncode(y, scale, f), "FP8 codes");
        if (c.out_offset == 0) {
          ExpectSameFloats(mean.ToHost("mean"), ref_mean.ToHost(), "mean");
          ExpectSameFloats(rstd.ToHost("rstd"), ref_rstd.ToHost(), "rstd");
        } else {
          // A misaligned FP8 output takes the scalar branch, whose statistics sum the row in
          // another order than the BF16 form's vector branch (seen: 1 ulp of rstd).
          testing::ExpectNear(mean.ToHost("mean"), ref_mean.ToHost(), 1e-6, 1e-6, "mean");
          testing::ExpectNear(rstd.ToHost("rstd"), ref_rstd.ToHost(), 0, 1e-6, "rstd");
        }
        ExpectSameFloats(mean2.ToHost("mean2"), ref_mean.ToHost(), "mean (amax form)");
        ExpectSameFloats(rstd2.ToHost("rstd2"), ref_rstd.ToHost(), "rstd (amax form)");
        testing::ExpectBitwiseEqual(out_amax.ToHost("out (amax form)"), ref_out.ToHost(),
                                    "BF16 output of the amax form");
        if (residual) {
          testing::ExpectBitwiseEqual(res.ToHost("residual"), ref_res.ToHost(), "residual");
          testing::ExpectBitwiseEqual(res_amax.ToHost("residual (amax form)"), ref_res.ToHost(),
                                      "residual (amax form)");
        }
        const float a_ref = amax(y.data(), n);
        ExpectSameFloat(amax_fp8.ToHost()[0], a_ref, "amax (FP8 form)");
        ExpectSameFloat(amax_bf16.ToHost()[0], a_ref, "amax (BF16 form)");
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// AdamW with FP8 weight copies: params, moments and BF16 copies bit-identical to the plain
// multi update; codes = encode(new params * scale[k]); amax[k] = max(prior, amax(new params)).

TEST(AdamwFp8Test, WritesCodesAndAmaxOfTheNewWeights) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  const int64_t n = 30011;
  const std::vector<AdamwSegment> segments = {{0, 9000, true}, {9000, 3, false},
                                              {9003, 21000, true}, {30003, 8, false}};
  // FP8 copies: inside segments, unaligned starts and ends, on and across chunk boundaries.
  struct Fp8Seg {
    int64_t offset, size;
    int index;
    Fp8Format format;
    bool bf16;
  };
  const Fp8Seg fp8[] = {{1, 4097, 2, Fp8Format::kE4M3, true},
                        {5000, 3001, 0, Fp8Format::kE5M2, false},
                        {9003, 21000, 1, Fp8Format::kE4M3, true},
                        {30003, 5, 3, Fp8Format::kE4M3, false}};
  std::vector<std::unique_ptr<DeviceArray<uint8_t>>> codes;
  std::vector<AdamwFp8Segment> fsegs;
  for (const Fp8Seg& f : fp8) {
    codes.push_back(std::make_unique<DeviceArray<uint8_t>>(f.size, static_cast<int>(f.offset % 3)));
    fsegs.push_back({f.offset, f.size, f.index, codes.back()->get(), f.format, f.bf16});
  }
  absl::StatusOr<std::unique_ptr<AdamwPlan>> plan = AdamwPlan::Create(segments, n, fsegs);
  QT_ASSERT_OK(plan.status());
  absl::StatusOr<std::unique_ptr<AdamwPlan>> plain = AdamwPlan::Create(segments, n);
  QT_ASSERT_OK(plain.status());
  EXPECT_EQ((*plan)->num_fp8_segments(), 4);
  EXPECT_EQ((*plan)->max_scale_index(), 3);

  const std::vector<float> p0 = testing::RandomFloats(n, 1, -0.5, 0.5);
  const std::vector<float> g = testing::RandomFloats(n, 2, -0.01, 0.01);
  const std::vector<float> scale = {900.f, 350.f, 2000.f, 123.f};
  const std::vector<float> prior = {0.0f, 0.01f, 100.f, 0.0f};  // amax already there
  for (bool bf16_grads : {false, true}) {
    SCOPED_TRACE(bf16_grads ? "bf16 grads" : "fp32 grads");
    const std::vector<bf16> gb = ToBf16(g);
    DeviceArray<float> p(p0), m(std::vector<float>(n, 0.f)), v(std::vector<float>(n, 0.f));
    DeviceArray<float> p2(p0), m2(std::vector<float>(n, 0.f)), v2(std::vector<float>(n, 0.f));
    DeviceArray<float> gf(g);
    DeviceArray<bf16> gh(gb), pb(n), pb2(n);
    DeviceArray<float> d_scale(scale), d_amax(prior);
    std::vector<float> want_amax = prior;
    for (int t = 1; t <= 2; ++t) {
      SCOPED_TRACE(::testing::Message() << "step " << t);
      for (auto& c : codes) c->Poison();
      pb.Poison();
      pb2.Poison();
      if (bf16_grads) {
        QT_ASSERT_OK(adamw_update_multi_fp8_cuda(**plan, p.get(), pb.get(), gh.get(), m.get(),
                                                 v.get(), 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, t,
                                                 nullptr, d_scale.get(), d_amax.get(),
                                                 stream.get()));
        QT_ASSERT_OK(adamw_update_multi_cuda(**plain, p2.get(), pb2.get(), gh.get(), m2.get(),
                                             v2.get(), 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, t,
                                             nullptr, stream.get()));
      } else {
        QT_ASSERT_OK(adamw_update_multi_fp8_cuda(**plan, p.get(), pb.get(), gf.get(), m.get(),
                                                 v.get(), 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, t,
                                                 nullptr, d_scale.get(), d_amax.get(),
                                                 stream.get()));
        QT_ASSERT_OK(adamw_update_multi_cuda(**plain, p2.get(), pb2.get(), gf.get(), m2.get(),
                                             v2.get(), 1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, t,
                                             nullptr, stream.get()));
      }
      QT_ASSERT_OK(stream.Sync());
      const std::vector<float> newp = p.ToHost("params");
      testing::ExpectBitwiseEqual(newp, p2.ToHost(), "params");
      testing::ExpectBitwiseEqual(m.ToHost("m"), m2.ToHost(), "m");
      testing::ExpectBitwiseEqual(v.ToHost("v"), v2.ToHost(), "v");
      const std::vector<bf16> b1 = pb.ToHost("bf16"), b2 = pb2.ToHost();
      std::vector<bool> skip_bf16(n, false);
      for (size_t s = 0; s < fsegs.size(); ++s) {
        const Fp8Seg& f = fp8[s];
        const std::vector<float> seg(newp.begin() + f.offset, newp.begin() + f.offset + f.size);
        ExpectSameCodes(codes[s]->ToHost("codes"), CpuEncode(seg, scale[f.index], f.format),
                        "codes of FP8 segment " + std::to_string(s));
        want_amax[f.index] = std::max(want_amax[f.index], amax(seg.data(), f.size));
        for (int64_t i = f.offset; i < f.offset + f.size; ++i) skip_bf16[i] = !f.bf16;
      }
      int bad = 0;
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t want = skip_bf16[i] ? 0xFFFF : b2[i].bits;
        if (b1[i].bits != want && bad++ < 5) {
          ADD_FAILURE() << "bf16 copy at " << i << ": 0x" << std::hex << b1[i].bits << " want 0x"
                        << want << std::dec << (skip_bf16[i] ? " (write_bf16 false)" : "");
        }
      }
      EXPECT_EQ(bad, 0);
      ExpectSameFloats(d_amax.ToHost("amax"), want_amax, "amax");
    }
  }
  // Amax only (fp8_scale null): codes untouched, amax exactly max(prior, amax(new params)).
  DeviceArray<float> p(p0), m(std::vector<float>(n, 0.f)), v(std::vector<float>(n, 0.f)),
      gf(g), d_amax(prior);
  for (auto& c : codes) c->Poison();
  QT_ASSERT_OK(adamw_update_multi_fp8_cuda(**plan, p.get(), nullptr, gf.get(), m.get(), v.get(),
                                           1e-2f, 0.9f, 0.95f, 1e-8f, 0.1f, 1, nullptr, nullptr,
                                           d_amax.get(), stream.get()));
  QT_ASSERT_OK(stream.Sync());
  const std::vector<float> newp = p.ToHost("params");
  std::vector<float> want_amax = prior;
  for (size_t s = 0; s < fsegs.size(); ++s) {
    const Fp8Seg& f = fp8[s];
    want_amax[f.index] = std::max(want_amax[f.index], amax(newp.data() + f.offset, f.size));
    for (uint8_t b : codes[s]->ToHost("codes")) ASSERT_EQ(b, 0xFF) << "codes written (amax only)";
  }
  ExpectSameFloats(d_amax.ToHost("amax"), want_amax, "amax (amax-only update)");
}

TEST(AdamwFp8Test, PlanRejectsBadFp8Segments) {
  uint8_t dummy = 0;
  const std::vector<AdamwSegment> segments = {{0, 100, true}, {100, 50, false}};
  struct Bad {
    std::vector<AdamwFp8Segment> fp8;
    const char* message;
  };
  const Bad bad[] = {
      {{{90, 20, 0, &dummy}}, "FP8 segment 0 (offset=90 size=20) is not inside one of the segments"},
      {{{0, 10, 0, &dummy}, {5, 10, 1, &dummy}},
       "FP8 segment 0 (offset=0 size=10) overlaps FP8 segment 1 (offset=5 size=10)"},
      {{{0, 10, -1, &dummy}}, "FP8 segment 0 (offset=0 size=10 scale_index=-1"},
      {{{0, 10, 0, nullptr}}, "codes=null"},
  };
  for (const Bad& b : bad) {
    const absl::StatusOr<std::unique_ptr<AdamwPlan>> plan = AdamwPlan::Create(segments, 150, b.fp8);
    ASSERT_FALSE(plan.ok()) << b.message;
    EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument) << plan.status();
    EXPECT_NE(plan.status().message().find(b.message), absl::string_view::npos)
        << plan.status() << "\n  expected: " << b.message;
  }
}

}  // namespace
}  // namespace qtrain::ops
