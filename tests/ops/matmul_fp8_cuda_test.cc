// GPU parity of the FP8 GEMMs (ops/cuda/matmul_fp8_cuda.h) against the CPU GEMM over the same
// FP8 codes: the codes are made on the CPU (ops/quant/fp8.h: per-tensor encode, 1x128 tiles,
// 128x128 blocks), decoded and scaled in double, multiplied in double. Every output type (BF16,
// fp32, fp32 and BF16 accumulation, FP8 with scale and amax), bias and GELU epilogues, the
// E4M3/E5M2 pairs of fprop/dgrad/wgrad, fast and split accumulation, per-tensor and block
// scales, odd shapes, and each backend (cuBLASLt, our kernel, automatic) are checked within the
// fp32 accumulation tolerance (wider for fast accumulation). Tagged "gpu".
#include "ops/cuda/matmul_fp8_cuda.h"

#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "ops/cuda/matmul_cuda.h"
#include "ops/gelu.h"
#include "ops/quant/fp8.h"
#include "tests/ops/cuda_test_util.h"

namespace qtrain::ops {
namespace {

using testing::DeviceArray;

// One operand made on the host: codes (rows, K), scales as the layout wants, and the exact
// dequantized values in double.
struct HostOperand {
  int64_t rows = 0, K = 0;
  Fp8Format format = Fp8Format::kE4M3;
  Fp8ScaleLayout layout = Fp8ScaleLayout::kPerTensor;
  std::vector<uint8_t> codes;
  std::vector<float> scale_inv;
  int64_t scale_ld = 0;
  std::vector<double> deq;
};

std::vector<float> Randn(int64_t n, uint32_t seed, double sigma) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> d(0.0, sigma);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(d(gen));
  return v;
}

HostOperand MakeOperand(const std::vector<float>& v, int64_t rows, int64_t K, Fp8Format f,
                        Fp8ScaleLayout layout) {
  HostOperand op;
  op.rows = rows;
  op.K = K;
  op.format = f;
  op.layout = layout;
  op.codes.resize(rows * K);
  op.deq.resize(rows * K);
  switch (layout) {
    case Fp8ScaleLayout::kPerTensor: {
      const float s = fp8_current_scale(amax(v.data(), rows * K), f);
      EXPECT_TRUE(fp8_encode_array(op.codes.data(), v.data(), rows * K, s, f).ok());
      op.scale_inv = {1.0f / s};
      for (int64_t i = 0; i < rows * K; ++i) {
        op.deq[i] = static_cast<double>(fp8_decode(op.codes[i], f)) * op.scale_inv[0];
      }
      break;
    }
    case Fp8ScaleLayout::kTile1x128: {
      op.scale_inv.resize(fp8_num_blocks(K) * rows);
      EXPECT_TRUE(fp8_quantize_1x128(op.codes.data(), op.scale_inv.data(), v.data(), rows, K, f).ok());
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = 0; k < K; ++k) {
          op.deq[r * K + k] = static_cast<double>(fp8_decode(op.codes[r * K + k], f)) *
                              op.scale_inv[(k / 128) * rows + r];
        }
      break;
    }
    case Fp8ScaleLayout::kBlock128x128: {
      op.scale_ld = fp8_block_scale_ld(K);
      op.scale_inv.resize(fp8_num_blocks(rows) * op.scale_ld);
      EXPECT_TRUE(fp8_quantize_128x128(op.codes.data(), op.scale_inv.data(), op.scale_ld,
                                       v.data(), rows, K, f)
                      .ok());
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = 0; k < K; ++k) {
          op.deq[r * K + k] = static_cast<double>(fp8_decode(op.codes[r * K + k], f)) *
                              op.scale_inv[(r / 128) * op.scale_ld + k / 128];
        }
      break;
    }
  }
  return op;
}

struct DeviceOperand {
  explicit DeviceOperand(const HostOperand& h) : codes(h.codes), scale(h.scale_inv) {
    op.codes = codes.get();
    op.format = h.format;
    op.scaling = h.layout;
    op.scale_inv = scale.get();
    op.scale_ld = h.scale_ld;
  }
  DeviceArray<uint8_t> codes;
  DeviceArray<float> scale;
  Fp8Operand op;
};

// ref (N, OC) = X W^T in double, and sum |terms| per element (the accumulation tolerance).
struct Reference {
  std::vector<double> out, abs_sum;
};

Reference Gemm(const HostOperand& x, const HostOperand& w) {
  const int64_t N = x.rows, OC = w.rows, K = x.K;
  Reference r;
  r.out.assign(N * OC, 0.0);
  r.abs_sum.assign(N * OC, 0.0);
  for (int64_t i = 0; i < N; ++i)
    for (int64_t j = 0; j < OC; ++j) {
      double s = 0, a = 0;
      const double* xi = x.deq.data() + i * K;
      const double* wj = w.deq.data() + j * K;
      for (int64_t k = 0; k < K; ++k) {
        s += xi[k] * wj[k];
        a += std::abs(xi[k] * wj[k]);
      }
      r.out[i * OC + j] = s;
      r.abs_sum[i * OC + j] = a;
    }
  return r;
}

double GeluD(double x) {
  const double kS = 0.7978845608028654, kC = 0.044715;
  return 0.5 * x * (1.0 + std::tanh(kS * (x + kC * x * x * x)));
}

struct GemmRun {
  Fp8OutType type = Fp8OutType::kBf16;
  GradWrite write = GradWrite::kOverwrite;
  bool bias = false;
  bool gelu = false;
  Fp8Accumulation acc = Fp8Accumulation::kSplit;
  Fp8GemmBackend backend = Fp8GemmBackend::kAuto;
};

std::string Name(const GemmRun& r) {
  const char* t = r.type == Fp8OutType::kBf16 ? "bf16" : r.type == Fp8OutType::kFp32 ? "fp32" : "fp8";
  const char* b = r.backend == Fp8GemmBackend::kAuto        ? "auto"
                  : r.backend == Fp8GemmBackend::kCublasLt ? "cublaslt"
                                                            : "own";
  return std::string(t) + (r.write == GradWrite::kAccumulate ? "+=" : "") +
         (r.bias ? " bias" : "") + (r.gelu ? " gelu" : "") +
         (r.acc == Fp8Accumulation::kFast ? " fast " : " split ") + b;
}

// Runs one GEMM and checks it against ref. Returns the output bits (for repeat checks).
std::vector<uint8_t> CheckRun(Fp8MatmulContext& ctx, const HostOperand& hx,
                              const HostOperand& hw, const Reference& ref, const GemmRun& run,
                              const testing::TestStream& stream) {
  SCOPED_TRACE(Name(run));
  const int N = static_cast<int>(hx.rows), K = static_cast<int>(hx.K),
            OC = static_cast<int>(hw.rows);
  const int64_t n = static_cast<int64_t>(N) * OC;
  DeviceOperand x(hx), w(hw);
  const testing::Bf16Data bias = testing::RandomBf16(OC, 77, -0.5, 0.5);
  DeviceArray<bf16> d_bias(bias.bits), pre(n);
  // Prior contents for accumulation.
  const std::vector<float> prior = testing::RandomFloats(n, 99, -1.0, 1.0);
  const std::vector<bf16> prior_b = ToBf16(prior);
  DeviceArray<float> out_f(n);
  DeviceArray<bf16> out_b(n);
  DeviceArray<uint8_t> out_8(n);
  if (run.write == GradWrite::kAccumulate) {
    out_f.Upload(prior);
    out_b.Upload(prior_b);
  }
  // FP8 output scale from the reference's amax (what a delayed scale would roughly be).
  double ref_amax = 0;
  std::vector<double> want(n), pre_want(n);
  for (int64_t i = 0; i < n; ++i) {
    double v = ref.out[i];
    if (run.bias) v += Bf16ToFloat(bias.bits[i % OC]);
    pre_want[i] = v;
    if (run.gelu) v = GeluD(v);
    want[i] = v;
    ref_amax = std::max(ref_amax, std::abs(v));
  }
  const float out_scale = run.type == Fp8OutType::kFp8
                              ? fp8_current_scale(static_cast<float>(ref_amax), Fp8Format::kE4M3, 1)
                              : 1.0f;
  DeviceArray<float> d_out_scale(std::vector<float>{out_scale});
  DeviceArray<float> d_amax(std::vector<float>{0.0f});
  Fp8MatmulOutput out;
  out.type = run.type;
  out.write = run.write;
  out.data = run.type == Fp8OutType::kBf16   ? static_cast<void*>(out_b.get())
             : run.type == Fp8OutType::kFp32 ? static_cast<void*>(out_f.get())
                                              : static_cast<void*>(out_8.get());
  out.fp8_format = Fp8Format::kE4M3;
  out.fp8_scale = d_out_scale.get();
  out.fp8_amax = d_amax.get();
  Fp8MatmulOptions opt;
  opt.bias = run.bias ? d_bias.get() : nullptr;
  opt.act = run.gelu ? Activation::kGelu : Activation::kNone;
  opt.pre_act = run.gelu ? pre.get() : nullptr;
  opt.accumulation = run.acc;
  opt.backend = run.backend;
  const int64_t lt_before = ctx.cublaslt_calls(), own_before = ctx.own_kernel_calls();
  const absl::Status s = fp8_matmul_cuda(ctx, out, x.op, w.op, N, K, OC, opt, stream.get());
  EXPECT_TRUE(s.ok()) << s;
  if (!s.ok()) return {};
  EXPECT_TRUE(stream.Sync().ok());
  if (run.backend == Fp8GemmBackend::kCublasLt) EXPECT_EQ(ctx.cublaslt_calls(), lt_before + 1);
  if (run.backend == Fp8GemmBackend::kOwnKernel) EXPECT_EQ(ctx.own_kernel_calls(), own_before + 1);
  // Hopper's FP8 tensor cores keep partial sums at reduced precision (about 14 bits per
  // DeepSeek-V3). Measured on the H200 with cuBLAS 13.1 (K <= 1000): fast accumulation within
  // 2^-9.3 of the sum of |terms| (block-scaled operands too: cuBLASLt honours fast accumulation
  // there as well), split (promoted) accumulation within 2^-12.7 (2026-12-02, second machine;
  // 2^-15 on the first). Our kernel accumulates every mma in fp32. Wrong scales or codes would
  // be off by O(1) of the result, far outside these bounds.
  const bool own = run.backend == Fp8GemmBackend::kOwnKernel ||
                   (run.backend == Fp8GemmBackend::kAuto && ctx.own_kernel_calls() > own_before);
  const bool fast = run.acc == Fp8Accumulation::kFast && !own;
  const double acc_eps =
      own ? std::ldexp(1.0, -16) : (fast ? std::ldexp(1.0, -8) : std::ldexp(1.0, -12));
  std::vector<double> atol(n), got(n), expect(n);
  double gelu_slope = run.gelu ? 1.2 : 1.0;  // |gelu'| <= 1.13
  for (int64_t i = 0; i < n; ++i) {
    atol[i] = acc_eps * ref.abs_sum[i] * gelu_slope + 1e-30;
    expect[i] = want[i];
  }
  double rtol = 0;
  std::vector<uint8_t> bits;
  if (run.type == Fp8OutType::kBf16) {
    const std::vector<bf16> g = out_b.ToHost("out");
    for (int64_t i = 0; i < n; ++i) {
      got[i] = Bf16ToFloat(g[i]);
      if (run.write == GradWrite::kAccumulate) expect[i] += Bf16ToFloat(prior_b[i]);
    }
    // One BF16 rounding of the result (two with a GELU of the rounded pre-activation).
    rtol = run.gelu ? 3 * testing::kBf16Eps : testing::kBf16Eps;
    if (run.gelu) {
      for (int64_t i = 0; i < n; ++i) atol[i] += testing::kBf16Eps * std::abs(pre_want[i]);
    }
    bits.assign(reinterpret_cast<const uint8_t*>(g.data()),
                reinterpret_cast<const uint8_t*>(g.data()) + 2 * n);
  } else if (run.type == Fp8OutType::kFp32) {
    const std::vector<float> g = out_f.ToHost("out");
    for (int64_t i = 0; i < n; ++i) {
      got[i] = g[i];
      if (run.write == GradWrite::kAccumulate) {
        expect[i] += prior[i];
        atol[i] += std::abs(prior[i]) * std::ldexp(1.0, -23);
      }
    }
    rtol = std::ldexp(1.0, -22);
    if (run.gelu) rtol = 2 * testing::kBf16Eps;  // GELU of the BF16 pre-activation
    bits.assign(reinterpret_cast<const uint8_t*>(g.data()),
                reinterpret_cast<const uint8_t*>(g.data()) + 4 * n);
  } else {
    const std::vector<uint8_t> g = out_8.ToHost("out");
    for (int64_t i = 0; i < n; ++i) got[i] = fp8_decode(g[i], Fp8Format::kE4M3) / out_scale;
    // One E4M3 rounding (3 mantissa bits; up to one unit for results near a tie), subnormals.
    rtol = 0.125 + (run.gelu ? 2 * testing::kBf16Eps : 0.0);
    for (int64_t i = 0; i < n; ++i) {
      atol[i] += std::ldexp(1.0, -9) / out_scale + testing::kBf16Eps * std::abs(pre_want[i]);
    }
    // amax of the unscaled output values (after bias and GELU).
    const float got_amax = d_amax.ToHost("amax")[0];
    EXPECT_NEAR(got_amax, ref_amax, ref_amax * 1e-2 + 1e-6) << "amax";
    bits = g;
  }
  testing::ExpectNear(got, expect, 0.0, rtol, "out", &atol);
  if (run.gelu) {
    std::vector<double> pre_tol(n);
    for (int64_t i = 0; i < n; ++i) pre_tol[i] = acc_eps * ref.abs_sum[i] + 1e-30;
    testing::ExpectNear(Bf16ToFloat(pre.ToHost("pre_act")), pre_want, 0.0, testing::kBf16Eps,
                        "pre_act", &pre_tol);
  }
  return bits;
}

struct Shape {
  int N, K, OC;
};

bool LtShape(const Shape& s) { return s.N % 16 == 0 && s.K % 16 == 0 && s.OC % 16 == 0; }

// The contexts and stream of one test (made after the GPU check: without a device the test
// skips before any CUDA call). Prints which backend ran each problem.
struct Fixture {
  Fixture() {
    absl::StatusOr<std::unique_ptr<MatmulContext>> base = MatmulContext::Create();
    EXPECT_TRUE(base.ok()) << base.status();
    if (!base.ok()) return;
    base_ = std::move(*base);
    absl::StatusOr<std::unique_ptr<Fp8MatmulContext>> ctx = Fp8MatmulContext::Create(base_.get());
    EXPECT_TRUE(ctx.ok()) << ctx.status();
    if (ctx.ok()) ctx_ = std::move(*ctx);
  }
  ~Fixture() {
    if (ctx_ == nullptr) return;
    for (const Fp8GemmRecord& r : ctx_->report()) {
      std::printf("  %s: %s%s%s\n", r.problem.c_str(), r.cublaslt ? "cuBLASLt" : "own kernel",
                  r.why_not.empty() ? "" : "; cuBLASLt: ", r.why_not.c_str());
    }
  }
  std::unique_ptr<MatmulContext> base_;
  std::unique_ptr<Fp8MatmulContext> ctx_;
  testing::TestStream stream_;
};

#define QT_FP8_FIXTURE()          \
  QT_SKIP_WITHOUT_GPU();          \
  Fixture fixture;                \
  ASSERT_NE(fixture.ctx_, nullptr); \
  Fp8MatmulContext* ctx_ = fixture.ctx_.get(); \
  const testing::TestStream& stream_ = fixture.stream_

// fprop (E4M3 x E4M3), dgrad (X = dy E5M2, W = W^T E4M3), wgrad (X = dy^T E5M2, W = x^T E4M3)
// and E4M3 x E5M2, per-tensor scales, every output and epilogue, fast and split, each backend.
TEST(Fp8MatmulTest, PerTensorMatchesCpuGemm) {
  QT_FP8_FIXTURE();
  const Shape shapes[] = {{37, 50, 29}, {64, 128, 64}, {128, 256, 192}, {100, 300, 130},
                          {256, 768, 384}, {48, 1000, 32}};
  struct Formats {
    Fp8Format x, w;
  };
  const Formats formats[] = {{Fp8Format::kE4M3, Fp8Format::kE4M3},
                             {Fp8Format::kE5M2, Fp8Format::kE4M3},
                             {Fp8Format::kE4M3, Fp8Format::kE5M2}};
  for (const Shape& sh : shapes) {
    for (const Formats& f : formats) {
      SCOPED_TRACE(::testing::Message() << "N=" << sh.N << " K=" << sh.K << " OC=" << sh.OC
                                        << " X=" << (f.x == Fp8Format::kE4M3 ? "e4m3" : "e5m2")
                                        << " W=" << (f.w == Fp8Format::kE4M3 ? "e4m3" : "e5m2"));
      const HostOperand x = MakeOperand(Randn(int64_t{sh.N} * sh.K, sh.N + 1, 1.0), sh.N, sh.K,
                                        f.x, Fp8ScaleLayout::kPerTensor);
      const HostOperand w = MakeOperand(Randn(int64_t{sh.OC} * sh.K, sh.OC + 2, 0.05), sh.OC,
                                        sh.K, f.w, Fp8ScaleLayout::kPerTensor);
      const Reference ref = Gemm(x, w);
      std::vector<Fp8GemmBackend> backends = {Fp8GemmBackend::kOwnKernel, Fp8GemmBackend::kAuto};
      if (LtShape(sh)) backends.push_back(Fp8GemmBackend::kCublasLt);
      for (Fp8GemmBackend b : backends) {
        for (Fp8Accumulation acc : {Fp8Accumulation::kFast, Fp8Accumulation::kSplit}) {
          GemmRun r;
          r.backend = b;
          r.acc = acc;
          CheckRun(*ctx_, x, w, ref, r, stream_);  // bf16
          r.type = Fp8OutType::kFp32;
          CheckRun(*ctx_, x, w, ref, r, stream_);
          r.write = GradWrite::kAccumulate;  // wgrad's fp32 accumulation
          CheckRun(*ctx_, x, w, ref, r, stream_);
          r.type = Fp8OutType::kBf16;  // BF16 gradient accumulation through the fp32 scratch
          CheckRun(*ctx_, x, w, ref, r, stream_);
        }
        if (f.x == Fp8Format::kE4M3 && f.w == Fp8Format::kE4M3) {
          // fprop epilogues: bias, GELU with BF16 and FP8 outputs.
          GemmRun r;
          r.backend = b;
          r.acc = Fp8Accumulation::kFast;
          r.bias = true;
          CheckRun(*ctx_, x, w, ref, r, stream_);
          r.gelu = true;
          CheckRun(*ctx_, x, w, ref, r, stream_);
          r.type = Fp8OutType::kFp8;
          CheckRun(*ctx_, x, w, ref, r, stream_);
          r.bias = false;
          CheckRun(*ctx_, x, w, ref, r, stream_);
          r.gelu = false;
          CheckRun(*ctx_, x, w, ref, r, stream_);
        }
      }
    }
  }
}

// DeepSeek-V3's block recipe, all E4M3: fprop X 1x128 . W 128x128, dgrad dy 1x128 . W^T
// 128x128 (W^T's grid is W's transposed), wgrad dy^T 1x128 . x^T 1x128 (tiles along N).
TEST(Fp8MatmulTest, BlockScaledMatchesCpuGemm) {
  QT_FP8_FIXTURE();
  const Shape shapes[] = {{256, 768, 384}, {128, 208, 256}, {64, 128, 128}, {37, 50, 29},
                          {130, 300, 140}};
  const Fp8Format e4 = Fp8Format::kE4M3;
  for (const Shape& sh : shapes) {
    SCOPED_TRACE(::testing::Message() << "N=" << sh.N << " C=" << sh.K << " OC=" << sh.OC);
    const int N = sh.N, C = sh.K, OC = sh.OC;
    const std::vector<float> xv = Randn(int64_t{N} * C, 11, 1.0);
    const std::vector<float> wv = Randn(int64_t{OC} * C, 12, 0.05);
    std::vector<float> gv = Randn(int64_t{N} * OC, 13, 1e-3);
    // Outliers, so that per-tile scales differ a lot from each other.
    for (size_t i = 0; i < gv.size(); i += 997) gv[i] *= 300.f;
    std::vector<float> wtv(wv.size()), xtv(xv.size()), gtv(gv.size());
    for (int o = 0; o < OC; ++o)
      for (int c = 0; c < C; ++c) wtv[int64_t{c} * OC + o] = wv[int64_t{o} * C + c];
    for (int i = 0; i < N; ++i)
      for (int c = 0; c < C; ++c) xtv[int64_t{c} * N + i] = xv[int64_t{i} * C + c];
    for (int i = 0; i < N; ++i)
      for (int o = 0; o < OC; ++o) gtv[int64_t{o} * N + i] = gv[int64_t{i} * OC + o];
    struct Problem {
      const char* name;
      HostOperand x, w;
    };
    const Problem problems[] = {
        {"fprop", MakeOperand(xv, N, C, e4, Fp8ScaleLayout::kTile1x128),
         MakeOperand(wv, OC, C, e4, Fp8ScaleLayout::kBlock128x128)},
        {"dgrad", MakeOperand(gv, N, OC, e4, Fp8ScaleLayout::kTile1x128),
         MakeOperand(wtv, C, OC, e4, Fp8ScaleLayout::kBlock128x128)},
        {"wgrad", MakeOperand(gtv, OC, N, e4, Fp8ScaleLayout::kTile1x128),
         MakeOperand(xtv, C, N, e4, Fp8ScaleLayout::kTile1x128)},
    };
    for (const Problem& p : problems) {
      SCOPED_TRACE(p.name);
      const Reference ref = Gemm(p.x, p.w);
      const Shape gs{static_cast<int>(p.x.rows), static_cast<int>(p.x.K),
                     static_cast<int>(p.w.rows)};
      std::vector<Fp8GemmBackend> backends = {Fp8GemmBackend::kOwnKernel, Fp8GemmBackend::kAuto};
      if (LtShape(gs)) backends.push_back(Fp8GemmBackend::kCublasLt);
      for (Fp8GemmBackend b : backends) {
        GemmRun r;
        r.backend = b;
        r.acc = Fp8Accumulation::kFast;  // ignored: block scales always promote
        CheckRun(*ctx_, p.x, p.w, ref, r, stream_);
        r.type = Fp8OutType::kFp32;
        r.write = GradWrite::kAccumulate;
        CheckRun(*ctx_, p.x, p.w, ref, r, stream_);
        // Epilogues with block scales: cuBLASLt's documentation does not promise them, so only
        // the automatic path (which falls back) and our kernel are required to run them; the
        // report printed at the end says which ran.
        if (std::string(p.name) == "fprop" && b != Fp8GemmBackend::kCublasLt) {
          GemmRun e;
          e.backend = b;
          e.bias = true;
          CheckRun(*ctx_, p.x, p.w, ref, e, stream_);
          e.gelu = true;
          CheckRun(*ctx_, p.x, p.w, ref, e, stream_);
        }
      }
    }
  }
}

// The scales must matter: a wrong scale layout (1x128 scales read as per-row-block) is caught.
TEST(Fp8MatmulTest, WrongScalesAreDetectedByTheReference) {
  QT_FP8_FIXTURE();
  const int N = 64, K = 256, OC = 64;
  std::vector<float> xv = Randn(int64_t{N} * K, 21, 1.0);
  for (int i = 0; i < N; ++i) xv[int64_t{i} * K + 200] = 500.f;  // second tile: other scales
  const HostOperand x = MakeOperand(xv, N, K, Fp8Format::kE4M3, Fp8ScaleLayout::kTile1x128);
  const HostOperand w =
      MakeOperand(Randn(int64_t{OC} * K, 22, 0.05), OC, K, Fp8Format::kE4M3,
                  Fp8ScaleLayout::kBlock128x128);
  const Reference ref = Gemm(x, w);
  // Swap the two K tiles' scales: the result must be far from the reference.
  HostOperand bad = x;
  for (int i = 0; i < N; ++i) std::swap(bad.scale_inv[i], bad.scale_inv[N + i]);
  DeviceOperand dx(bad), dw(w);
  DeviceArray<float> out(int64_t{N} * OC);
  Fp8MatmulOutput o;
  o.type = Fp8OutType::kFp32;
  o.data = out.get();
  Fp8MatmulOptions opt;
  opt.backend = Fp8GemmBackend::kOwnKernel;
  QT_ASSERT_OK(fp8_matmul_cuda(*ctx_, o, dx.op, dw.op, N, K, OC, opt, stream_.get()));
  QT_ASSERT_OK(stream_.Sync());
  const std::vector<float> g = out.ToHost();
  EXPECT_GT(testing::RelL2(g, ref.out), 0.1) << "swapped tile scales went unnoticed";
}

TEST(Fp8MatmulTest, RepeatedCallsAreBitIdentical) {
  QT_FP8_FIXTURE();
  const int N = 128, K = 256, OC = 192;
  const HostOperand x = MakeOperand(Randn(int64_t{N} * K, 31, 1.0), N, K, Fp8Format::kE4M3,
                                    Fp8ScaleLayout::kPerTensor);
  const HostOperand w = MakeOperand(Randn(int64_t{OC} * K, 32, 0.05), OC, K, Fp8Format::kE4M3,
                                    Fp8ScaleLayout::kPerTensor);
  const Reference ref = Gemm(x, w);
  for (Fp8GemmBackend b : {Fp8GemmBackend::kOwnKernel, Fp8GemmBackend::kCublasLt}) {
    GemmRun r;
    r.backend = b;
    r.type = Fp8OutType::kFp32;
    const std::vector<uint8_t> a = CheckRun(*ctx_, x, w, ref, r, stream_);
    const std::vector<uint8_t> c = CheckRun(*ctx_, x, w, ref, r, stream_);
    testing::ExpectBitwiseEqual(a, c, "repeat");
  }
}

TEST(Fp8MatmulTest, RejectsBadArguments) {
  QT_FP8_FIXTURE();
  DeviceArray<uint8_t> codes(64 * 64);
  DeviceArray<float> scale(std::vector<float>(64, 1.0f));
  DeviceArray<bf16> out(64 * 64), pre(64 * 64);
  Fp8Operand x{codes.get(), Fp8Format::kE4M3, Fp8ScaleLayout::kPerTensor, scale.get(), 0};
  Fp8Operand w = x;
  Fp8MatmulOutput o;
  o.data = out.get();
  Fp8MatmulOptions opt;
  const auto code = [&](const Fp8MatmulOutput& oo, const Fp8Operand& xx, const Fp8Operand& ww,
                        int N, int K, int OC, const Fp8MatmulOptions& op) {
    return fp8_matmul_cuda(*ctx_, oo, xx, ww, N, K, OC, op, stream_.get());
  };
  EXPECT_EQ(code(o, x, w, 0, 64, 64, opt).code(), absl::StatusCode::kInvalidArgument);
  Fp8Operand x5 = x, w5 = w;
  x5.format = w5.format = Fp8Format::kE5M2;
  absl::Status s = code(o, x5, w5, 64, 64, 64, opt);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("E5M2 x E5M2"), absl::string_view::npos) << s;
  Fp8MatmulOutput o8 = o;
  o8.type = Fp8OutType::kFp8;
  o8.fp8_scale = scale.get();
  Fp8Operand xb = x;
  xb.scaling = Fp8ScaleLayout::kTile1x128;
  s = code(o8, xb, w, 64, 64, 64, opt);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("FP8 output needs per-tensor operands"), absl::string_view::npos) << s;
  o8.fp8_scale = nullptr;
  EXPECT_EQ(code(o8, x, w, 64, 64, 64, opt).code(), absl::StatusCode::kInvalidArgument);
  Fp8MatmulOptions bad = opt;
  bad.pre_act = pre.get();
  EXPECT_EQ(code(o, x, w, 64, 64, 64, bad).code(), absl::StatusCode::kInvalidArgument);
  Fp8Operand xn = x;
  xn.scale_inv = nullptr;
  EXPECT_EQ(code(o, xn, w, 64, 64, 64, opt).code(), absl::StatusCode::kInvalidArgument);
  // cuBLASLt only, on a shape it cannot take: Unimplemented naming the reason.
  Fp8MatmulOptions lt = opt;
  lt.backend = Fp8GemmBackend::kCublasLt;
  s = code(o, x, w, 60, 64, 64, lt);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented) << s;
  EXPECT_NE(s.message().find("cuBLASLt"), absl::string_view::npos) << s;
}

}  // namespace
}  // namespace qtrain::ops
