// GPU parity of the cuBLASLt linear layer against the CPU reference (ops/matmul.h, ops/gelu.h):
// forward with and without bias and GELU, fused and unfused epilogues, odd and aligned shapes;
// backward dinp (accumulated), dweight and dbias (fp32 and BF16, accumulated and overwritten),
// the bias gradient fused into the weight-gradient GEMM (cuBLASLt's BGRADB) and our column sum
// (16-byte and scalar kernels), the fused GELU gradient, autotuning (same results, buffers
// untouched by the timing runs, repeat calls bit-identical). Tolerances: fp32 accumulation
// error bounded by 2^-14 of the sum of |terms|, plus 2^-8 relative per BF16 rounding.
// cuBLASLt's BF16 epilogues round the GEMM result before adding bias or beta*C and before the
// GELU gradient (seen on an H100: fused and unfused paths give the same bits; with beta = 1
// about a third of the elements differ from a single rounding of the fp32 sum), so those
// results carry a second rounding of the GEMM part, like our unfused path. Tagged "gpu".
#include "ops/cuda/matmul_cuda.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "ops/gelu.h"
#include "ops/matmul.h"
#include "tests/ops/cuda_test_util.h"

namespace qtrain::ops {
namespace {

using testing::Bf16Data;
using testing::DeviceArray;
using testing::kBf16Eps;
using testing::RandomBf16;
using testing::RandomFloats;

constexpr double kAccum = 1.0 / 16384;  // fp32 accumulation error per unit of sum |terms|

struct Shape {
  int N, C, OC;
};

// Odd sizes (cuBLASLt without 16-byte alignment, unfused GELU even under kAuto since the GELU
// input's leading dimension must be a multiple of 8), tiny ones, and GPT-2-like ones.
const Shape kShapes[] = {{1, 1, 1},     {37, 53, 29},   {5, 16, 24},
                         {64, 128, 192}, {100, 768, 96}, {256, 64, 3072}};

// Autotuning off unless asked: the tests that check which branch ran want cuBLASLt's stable
// heuristic choice.
std::unique_ptr<MatmulContext> MakeContext(EpilogueFusion fusion, bool autotune = false) {
  absl::StatusOr<std::unique_ptr<MatmulContext>> ctx =
      MatmulContext::Create(fusion, MatmulContext::kDefaultWorkspaceBytes, autotune);
  EXPECT_TRUE(ctx.ok()) << ctx.status();
  return ctx.ok() ? std::move(*ctx) : nullptr;
}

// sum_k |a[n,k]| |b[o,k]| (+|bias|): the scale of the fp32 accumulation error of a[n] . b[o].
std::vector<double> AbsDots(const std::vector<float>& a, const std::vector<float>& b,
                            const std::vector<float>* bias, int N, int K, int O) {
  std::vector<double> out(static_cast<size_t>(N) * O);
  for (int n = 0; n < N; ++n) {
    for (int o = 0; o < O; ++o) {
      double s = bias ? std::abs((*bias)[o]) : 0.0;
      for (int k = 0; k < K; ++k) s += std::abs(a[n * K + k]) * std::abs(b[o * K + k]);
      out[static_cast<size_t>(n) * O + o] = kAccum * s + 1e-6;
    }
  }
  return out;
}

std::vector<float> Transpose(const std::vector<float>& m, int rows, int cols) {
  std::vector<float> t(m.size());
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) t[c * rows + r] = m[r * cols + c];
  }
  return t;
}

// One forward call against the CPU reference; returns the output (and pre_act with kGelu) so
// that callers can compare runs.
void CheckForward(MatmulContext& ctx, cudaStream_t stream, const Shape& sh, bool with_bias,
                  Activation act, std::vector<float>* out_got = nullptr) {
  const double wscale = 1.0 / std::sqrt(static_cast<double>(sh.C));
  const auto x = RandomBf16(static_cast<int64_t>(sh.N) * sh.C, 1);
  const auto w = RandomBf16(static_cast<int64_t>(sh.OC) * sh.C, 2, -wscale, wscale);
  const auto bias = RandomBf16(sh.OC, 3, -0.5, 0.5);
  const std::vector<float>* bias_vals = with_bias ? &bias.values : nullptr;
  std::vector<float> pre_ref(static_cast<size_t>(sh.N) * sh.OC);
  matmul_forward(pre_ref.data(), x.values.data(), w.values.data(),
                 with_bias ? bias.values.data() : nullptr, sh.N, sh.C, sh.OC);
  std::vector<double> atol = AbsDots(x.values, w.values, bias_vals, sh.N, sh.C, sh.OC);
  if (with_bias) {  // the GEMM part is rounded before the bias is added
    std::vector<float> xw(pre_ref.size());
    matmul_forward(xw.data(), x.values.data(), w.values.data(),
                   static_cast<const float*>(nullptr), sh.N, sh.C, sh.OC);
    for (size_t i = 0; i < atol.size(); ++i) atol[i] += kBf16Eps * std::abs(xw[i]);
  }

  DeviceArray<bf16> d_x(x.bits), d_w(w.bits), d_bias(bias.bits),
      d_out(static_cast<int64_t>(sh.N) * sh.OC), d_pre(static_cast<int64_t>(sh.N) * sh.OC);
  const bool gelu = act == Activation::kGelu;
  QT_ASSERT_OK(matmul_forward_cuda(ctx, d_out.get(), d_x.get(), d_w.get(),
                                   with_bias ? d_bias.get() : nullptr, sh.N, sh.C, sh.OC, stream,
                                   act, gelu ? d_pre.get() : nullptr));
  QT_ASSERT_OK(SynchronizeStream(stream));
  const std::vector<float> out = Bf16ToFloat(d_out.ToHost("out"));
  if (out_got != nullptr) *out_got = out;
  if (!gelu) {
    testing::ExpectNear(out, pre_ref, 0, kBf16Eps, "out", &atol);
    return;
  }
  const std::vector<float> pre = Bf16ToFloat(d_pre.ToHost("pre_act"));
  if (out_got != nullptr) out_got->insert(out_got->end(), pre.begin(), pre.end());
  testing::ExpectNear(pre, pre_ref, 0, kBf16Eps, "pre_act", &atol);
  std::vector<float> out_ref(pre_ref.size());
  gelu_forward(out_ref.data(), pre_ref.data(), static_cast<int64_t>(pre_ref.size()));
  // |gelu'| <= 1.13 carries the pre-activation's error, including its rounding to BF16 before
  // the GELU, into the output, which is rounded once more.
  std::vector<double> atol_gelu(atol);
  for (size_t i = 0; i < atol_gelu.size(); ++i) {
    atol_gelu[i] = 1.2 * (atol[i] + kBf16Eps * std::abs(pre_ref[i]));
  }
  testing::ExpectNear(out, out_ref, 0, kBf16Eps, "gelu out", &atol_gelu);
}

TEST(MatmulCudaTest, ForwardMatchesCpuEveryEpilogue) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  // kAuto with GELU fusion on and off (our GELU kernel after the GEMM), and kNever.
  for (int mode = 0; mode < 3; ++mode) {
    const EpilogueFusion fusion = mode < 2 ? EpilogueFusion::kAuto : EpilogueFusion::kNever;
    std::unique_ptr<MatmulContext> ctx = MakeContext(fusion);
    ASSERT_NE(ctx, nullptr);
    ctx->set_gelu_fusion(mode == 0);
    EXPECT_EQ(ctx->gelu_fusion(), mode == 0);
    for (const Shape& sh : kShapes) {
      for (bool with_bias : {false, true}) {
        for (Activation act : {Activation::kNone, Activation::kGelu}) {
          SCOPED_TRACE(::testing::Message()
                       << "fusion=" << (fusion == EpilogueFusion::kAuto ? "auto" : "never")
                       << " gelu_fusion=" << ctx->gelu_fusion()
                       << " N=" << sh.N << " C=" << sh.C << " OC=" << sh.OC
                       << " bias=" << with_bias << " gelu=" << (act == Activation::kGelu));
          CheckForward(*ctx, stream.get(), sh, with_bias, act);
        }
      }
    }
    if (fusion == EpilogueFusion::kNever) {
      EXPECT_EQ(ctx->fused_epilogues(), 0);
      EXPECT_GT(ctx->unfused_epilogues(), 0);
    } else {
      // Odd widths always take the unfused GELU; the aligned ones normally fuse.
      EXPECT_GT(ctx->unfused_epilogues(), 0);
      std::printf("kAuto: %lld fused, %lld unfused epilogues\n",
                  static_cast<long long>(ctx->fused_epilogues()),
                  static_cast<long long>(ctx->unfused_epilogues()));
    }
  }
}

TEST(MatmulCudaTest, BackwardAccumulatesLikeCpuAndIsDeterministic) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  std::unique_ptr<MatmulContext> ctx = MakeContext(EpilogueFusion::kAuto);
  ASSERT_NE(ctx, nullptr);
  for (const Shape& sh : kShapes) {
    SCOPED_TRACE(::testing::Message() << "N=" << sh.N << " C=" << sh.C << " OC=" << sh.OC);
    const int64_t nx = static_cast<int64_t>(sh.N) * sh.C, nw = static_cast<int64_t>(sh.OC) * sh.C;
    const double wscale = 1.0 / std::sqrt(static_cast<double>(sh.C));
    const auto x = RandomBf16(nx, 4), w = RandomBf16(nw, 5, -wscale, wscale);
    const auto dy = RandomBf16(static_cast<int64_t>(sh.N) * sh.OC, 6);
    const auto dx0 = RandomBf16(nx, 7);
    const std::vector<float> dw0 = RandomFloats(nw, 8), db0 = RandomFloats(sh.OC, 9);
    std::vector<float> dx_ref = dx0.values, dw_ref = dw0, db_ref = db0;
    matmul_backward(dx_ref.data(), dw_ref.data(), db_ref.data(), dy.values.data(),
                    x.values.data(), w.values.data(), sh.N, sh.C, sh.OC);
    // dinp[n,c] = sum_o dy[n,o] w[o,c]; dweight[o,c] = sum_n dy[n,o] x[n,c].
    std::vector<double> atol_dx =
        AbsDots(dy.values, Transpose(w.values, sh.OC, sh.C), nullptr, sh.N, sh.OC, sh.C);
    for (int64_t i = 0; i < nx; ++i) {  // the GEMM part is rounded before beta * dinp is added
      atol_dx[i] += kBf16Eps * std::abs(dx_ref[i] - dx0.values[i]);
    }
    const std::vector<double> atol_dw =
        AbsDots(Transpose(dy.values, sh.N, sh.OC), Transpose(x.values, sh.N, sh.C), nullptr,
                sh.OC, sh.N, sh.C);
    const int64_t ws_bytes = matmul_backward_cuda_workspace_bytes(sh.N, sh.OC);
    DeviceArray<unsigned char> ws(ws_bytes);
    DeviceArray<bf16> d_x(x.bits), d_w(w.bits), d_dy(dy.bits);
    std::vector<float> first_dw, first_db;
    for (int run = 0; run < 2; ++run) {
      DeviceArray<bf16> d_dx(dx0.bits);
      DeviceArray<float> d_dw(dw0), d_db(db0);
      QT_ASSERT_OK(matmul_backward_cuda(*ctx, d_dx.get(), d_dw.get(), d_db.get(), d_dy.get(),
                                        d_x.get(), d_w.get(), sh.N, sh.C, sh.OC, ws.get(),
                                        ws_bytes, stream.get()));
      QT_ASSERT_OK(stream.Sync());
      const std::vector<float> dw = d_dw.ToHost("dweight"), db = d_db.ToHost("dbias");
      if (run == 0) {
        testing::ExpectNear(Bf16ToFloat(d_dx.ToHost("dinp")), dx_ref, 0, kBf16Eps, "dinp",
                            &atol_dx);
        testing::ExpectNear(dw, dw_ref, 0, 1e-6, "dweight", &atol_dw);
        testing::ExpectNear(db, db_ref, 1e-6 * sh.N, 1e-6, "dbias");
        first_dw = dw;
        first_db = db;
      } else {
        testing::ExpectBitwiseEqual(dw, first_dw, "dweight rerun");
        testing::ExpectBitwiseEqual(db, first_db, "dbias rerun");
      }
    }
  }
}

TEST(MatmulCudaTest, BackwardSkipsNullOutputs) {
  QT_SKIP_WITHOUT_GPU();
  std::unique_ptr<MatmulContext> ctx = MakeContext(EpilogueFusion::kAuto);
  ASSERT_NE(ctx, nullptr);
  const int N = 9, C = 16, OC = 8;
  const auto x = RandomBf16(N * C, 10), w = RandomBf16(OC * C, 11), dy = RandomBf16(N * OC, 12);
  std::vector<float> dw_ref(OC * C, 0.f), db_ref(OC, 0.f), dx_unused(N * C, 0.f);
  matmul_backward(dx_unused.data(), dw_ref.data(), db_ref.data(), dy.values.data(),
                  x.values.data(), w.values.data(), N, C, OC);
  DeviceArray<bf16> d_x(x.bits), d_w(w.bits), d_dy(dy.bits);
  DeviceArray<float> d_dw(std::vector<float>(OC * C, 0.f));
  // Only dweight: dinp and dbias null, no workspace needed.
  QT_ASSERT_OK(matmul_backward_cuda(*ctx, nullptr, d_dw.get(), nullptr, d_dy.get(), d_x.get(),
                                    nullptr, N, C, OC, nullptr, 0, nullptr));
  QT_ASSERT_OK(SynchronizeDevice());
  testing::ExpectNear(d_dw.ToHost("dweight"), dw_ref, 1e-4, 1e-5, "dweight only");
  // dbias without workspace is an error that names the workspace.
  float f = 0;
  const absl::Status s = matmul_backward_cuda(*ctx, nullptr, nullptr, &f, d_dy.get(), d_x.get(),
                                              nullptr, N, C, OC, nullptr, 0, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("workspace"), absl::string_view::npos) << s;
}

TEST(MatmulCudaTest, FusedGeluGradientMatchesCpu) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  for (int mode = 0; mode < 3; ++mode) {
    const EpilogueFusion fusion = mode < 2 ? EpilogueFusion::kAuto : EpilogueFusion::kNever;
    std::unique_ptr<MatmulContext> ctx = MakeContext(fusion);
    ASSERT_NE(ctx, nullptr);
    ctx->set_gelu_fusion(mode == 0);
    for (const Shape& sh : kShapes) {
      SCOPED_TRACE(::testing::Message()
                   << "fusion=" << (fusion == EpilogueFusion::kAuto ? "auto" : "never")
                   << " gelu_fusion=" << ctx->gelu_fusion()
                   << " N=" << sh.N << " C=" << sh.C << " OC=" << sh.OC);
      // This layer's input is gelu(pre): dpre = (dy @ w) * gelu'(pre), overwritten.
      const int64_t nx = static_cast<int64_t>(sh.N) * sh.C;
      const auto pre = RandomBf16(nx, 13, -3, 3);
      const auto w = RandomBf16(static_cast<int64_t>(sh.OC) * sh.C, 14);
      const auto dy = RandomBf16(static_cast<int64_t>(sh.N) * sh.OC, 15);
      std::vector<float> dgelu_out(nx, 0.f), dw_unused(static_cast<size_t>(sh.OC) * sh.C, 0.f);
      std::vector<float> x(nx);
      gelu_forward(x.data(), pre.values.data(), nx);
      matmul_backward(dgelu_out.data(), dw_unused.data(), static_cast<float*>(nullptr),
                      dy.values.data(), x.data(), w.values.data(), sh.N, sh.C, sh.OC);
      std::vector<float> dpre_ref(nx, 0.f);
      gelu_backward(dpre_ref.data(), pre.values.data(), dgelu_out.data(), nx);
      std::vector<double> atol =
          AbsDots(dy.values, Transpose(w.values, sh.OC, sh.C), nullptr, sh.N, sh.OC, sh.C);
      for (int64_t i = 0; i < nx; ++i) {  // |gelu'| <= 1.13; dgelu_out is rounded first
        atol[i] = 1.2 * (atol[i] + kBf16Eps * std::abs(dgelu_out[i]));
      }
      DeviceArray<bf16> d_pre(pre.bits), d_w(w.bits), d_dy(dy.bits), d_dpre(nx);  // poisoned
      QT_ASSERT_OK(matmul_backward_cuda(*ctx, d_dpre.get(), nullptr, nullptr, d_dy.get(),
                                        nullptr, d_w.get(), sh.N, sh.C, sh.OC, nullptr, 0,
                                        stream.get(), d_pre.get()));
      QT_ASSERT_OK(stream.Sync());
      testing::ExpectNear(Bf16ToFloat(d_dpre.ToHost("dpre")), dpre_ref, 0, kBf16Eps, "dpre",
                          &atol);
    }
    if (fusion == EpilogueFusion::kNever || !ctx->gelu_fusion()) {
      EXPECT_EQ(ctx->fused_epilogues(), 0);
    }
  }
}

// ---- The bias gradient's two branches, BF16 gradients, autotuning.

// Host data of one backward problem. The initial gradients are BF16 values, so that the fp32
// and BF16 gradient paths start from the same numbers.
struct BackwardData {
  Bf16Data x, w, dy, dx0, dw0, db0;
};

BackwardData MakeBackwardData(const Shape& sh, uint32_t seed) {
  const int64_t nx = static_cast<int64_t>(sh.N) * sh.C, nw = static_cast<int64_t>(sh.OC) * sh.C;
  const double wscale = 1.0 / std::sqrt(static_cast<double>(sh.C));
  return {RandomBf16(nx, seed),
          RandomBf16(nw, seed + 1, -wscale, wscale),
          RandomBf16(static_cast<int64_t>(sh.N) * sh.OC, seed + 2),
          RandomBf16(nx, seed + 3),
          RandomBf16(nw, seed + 4),
          RandomBf16(sh.OC, seed + 5, -4, 4)};
}

// CPU results and per-element tolerances of one backward call (dinp accumulated; dweight and
// dbias accumulated onto dw0/db0 or overwritten).
struct BackwardRef {
  std::vector<float> dx, dw, db;
  std::vector<double> atol_dx, atol_dw, atol_db;
};

BackwardRef MakeBackwardRef(const BackwardData& d, const Shape& sh, GradWrite dparams) {
  const bool acc = dparams == GradWrite::kAccumulate;
  BackwardRef r;
  r.dx = d.dx0.values;
  r.dw = acc ? d.dw0.values : std::vector<float>(d.dw0.values.size(), 0.f);
  r.db = acc ? d.db0.values : std::vector<float>(sh.OC, 0.f);
  matmul_backward(r.dx.data(), r.dw.data(), r.db.data(), d.dy.values.data(), d.x.values.data(),
                  d.w.values.data(), sh.N, sh.C, sh.OC);
  r.atol_dx = AbsDots(d.dy.values, Transpose(d.w.values, sh.OC, sh.C), nullptr, sh.N, sh.OC,
                      sh.C);
  for (size_t i = 0; i < r.dx.size(); ++i) {  // the GEMM part is rounded before dinp is added
    r.atol_dx[i] += kBf16Eps * std::abs(r.dx[i] - d.dx0.values[i]);
  }
  r.atol_dw = AbsDots(Transpose(d.dy.values, sh.N, sh.OC), Transpose(d.x.values, sh.N, sh.C),
                      nullptr, sh.OC, sh.N, sh.C);
  r.atol_db.assign(sh.OC, 1e-6);
  for (int n = 0; n < sh.N; ++n) {
    for (int o = 0; o < sh.OC; ++o) r.atol_db[o] += kAccum * std::abs(d.dy.values[n * sh.OC + o]);
  }
  return r;
}

std::vector<float> AsFloats(const std::vector<float>& v) { return v; }
std::vector<float> AsFloats(const std::vector<bf16>& v) { return Bf16ToFloat(v); }
template <typename G>
std::vector<G> GradsFrom(const Bf16Data& d);
template <>
std::vector<float> GradsFrom<float>(const Bf16Data& d) { return d.values; }
template <>
std::vector<bf16> GradsFrom<bf16>(const Bf16Data& d) { return d.bits; }

struct BackwardOut {
  std::vector<float> dx, dw, db;
};

// One matmul_backward_cuda call with gradients of type G (fp32 or BF16), dinp accumulated.
// Overwritten gradients start poisoned (NaN), so an unwritten element fails. misaligned: dout
// and dbias one element past their allocation's alignment (cuBLASLt without 16-byte
// alignment; our scalar column-sum kernel).
template <typename G>
BackwardOut RunBackward(MatmulContext& ctx, cudaStream_t stream, const BackwardData& d,
                        const Shape& sh, GradWrite dparams, bool misaligned) {
  const int64_t off = misaligned ? 1 : 0;
  const int64_t nw = static_cast<int64_t>(sh.OC) * sh.C;
  DeviceArray<bf16> d_x(d.x.bits), d_w(d.w.bits), d_dy(d.dy.bits, off), d_dx(d.dx0.bits);
  DeviceArray<G> d_dw(nw), d_db(sh.OC, off);
  if (dparams == GradWrite::kAccumulate) {
    d_dw.Upload(GradsFrom<G>(d.dw0));
    d_db.Upload(GradsFrom<G>(d.db0));
  }
  const int64_t ws_bytes = matmul_backward_cuda_workspace_bytes(sh.N, sh.OC);
  DeviceArray<unsigned char> ws(ws_bytes);
  BackwardOut out;
  const absl::Status s = matmul_backward_cuda(
      ctx, d_dx.get(), d_dw.get(), d_db.get(), d_dy.get(), d_x.get(), d_w.get(), sh.N, sh.C,
      sh.OC, ws.get(), ws_bytes, stream, nullptr, dparams, GradWrite::kAccumulate);
  EXPECT_TRUE(s.ok()) << s;
  const absl::Status sync = SynchronizeStream(stream);
  EXPECT_TRUE(sync.ok()) << sync;
  if (!s.ok() || !sync.ok()) return out;
  out.dx = Bf16ToFloat(d_dx.ToHost("dinp"));
  out.dw = AsFloats(d_dw.ToHost("dweight"));
  out.db = AsFloats(d_db.ToHost("dbias"));
  return out;
}

void ExpectMatchesRef(const BackwardOut& out, const BackwardRef& ref, bool bf16_grads) {
  const double rtol = bf16_grads ? kBf16Eps : 1e-6;  // one rounding of the result to BF16
  testing::ExpectNear(out.dx, ref.dx, 0, kBf16Eps, "dinp", &ref.atol_dx);
  testing::ExpectNear(out.dw, ref.dw, 0, rtol, "dweight", &ref.atol_dw);
  testing::ExpectNear(out.db, ref.db, 0, rtol, "dbias", &ref.atol_db);
}

const char* WriteName(GradWrite w) {
  return w == GradWrite::kAccumulate ? "accumulate" : "overwrite";
}

// Odd sizes, sizes cuBLASLt can tile (multiples of 8 and 16-byte aligned pointers: BGRADB is
// expected there), and a GPT-2-like width.
const Shape kBiasShapes[] = {{1, 1, 1},      {37, 53, 29},   {5, 16, 24},   {64, 128, 192},
                             {128, 256, 64}, {100, 768, 96}, {256, 64, 3072}};

const char* FusionName(EpilogueFusion f) {
  return f == EpilogueFusion::kAuto ? "auto" : f == EpilogueFusion::kNever ? "never" : "all";
}

// The bias gradient's branches: our column sum (16-byte and scalar kernels) on the side stream
// beside the GEMMs under kAuto and kNever; fused into the weight-gradient GEMM (BGRADB) under
// kAll where cuBLASLt offers it, else the column sum. fp32 and BF16 gradients, accumulated and
// overwritten, aligned and misaligned dout/dbias.
TEST(MatmulCudaTest, BiasGradientFusedAndUnfusedMatchCpu) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  std::vector<std::unique_ptr<MatmulContext>> contexts;
  for (EpilogueFusion f : {EpilogueFusion::kAuto, EpilogueFusion::kNever, EpilogueFusion::kAll}) {
    contexts.push_back(MakeContext(f));
    ASSERT_NE(contexts.back(), nullptr);
  }
  uint32_t seed = 20;
  for (const Shape& sh : kBiasShapes) {
    const BackwardData data = MakeBackwardData(sh, seed += 10);
    const bool tileable = sh.N % 8 == 0 && sh.C % 8 == 0 && sh.OC % 8 == 0;
    for (GradWrite dparams : {GradWrite::kAccumulate, GradWrite::kOverwrite}) {
      const BackwardRef ref = MakeBackwardRef(data, sh, dparams);
      for (const std::unique_ptr<MatmulContext>& ctx : contexts) {
        const EpilogueFusion fusion = ctx->fusion();
        for (bool misaligned : {false, true}) {
          for (bool bf16_grads : {false, true}) {
            SCOPED_TRACE(::testing::Message()
                         << "N=" << sh.N << " C=" << sh.C << " OC=" << sh.OC << " "
                         << WriteName(dparams) << " fusion=" << FusionName(fusion)
                         << " misaligned=" << misaligned << " grads="
                         << (bf16_grads ? "bf16" : "fp32"));
            const int64_t fused0 = ctx->fused_epilogues(), unfused0 = ctx->unfused_epilogues();
            const BackwardOut out =
                bf16_grads ? RunBackward<bf16>(*ctx, stream.get(), data, sh, dparams, misaligned)
                           : RunBackward<float>(*ctx, stream.get(), data, sh, dparams, misaligned);
            ExpectMatchesRef(out, ref, bf16_grads);
            // dinp has no epilogue here: the counters move for the bias gradient alone.
            const int64_t fused = ctx->fused_epilogues() - fused0,
                          unfused = ctx->unfused_epilogues() - unfused0;
            EXPECT_EQ(fused + unfused, 1);
            if (fusion != EpilogueFusion::kAll) {
              EXPECT_EQ(unfused, 1);
            } else if (tileable && !misaligned) {
              EXPECT_EQ(fused, 1) << "cuBLASLt offered no BGRADB algorithm for a tileable shape";
            } else if (fused == 0) {
              std::printf("N=%d C=%d OC=%d %s misaligned=%d %s: cuBLASLt has no BGRADB, "
                          "fell back to the column sum\n",
                          sh.N, sh.C, sh.OC, WriteName(dparams), misaligned ? 1 : 0,
                          bf16_grads ? "bf16" : "fp32");
            }
          }
        }
      }
    }
  }
  EXPECT_EQ(contexts[0]->fused_epilogues(), 0);
  EXPECT_EQ(contexts[1]->fused_epilogues(), 0);
}

// The column sum on the side stream is joined into the caller's stream: work queued there
// after the call sees the bias gradient. Chained on one stream: our column sum (kAuto) writes
// dbias, then a kAll call adds its BGRADB result to it from the caller's stream (and dbias
// alone, without a GEMM to overlap, runs on the caller's stream too).
TEST(MatmulCudaTest, SideStreamBiasGradientIsJoined) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  std::unique_ptr<MatmulContext> ctx_auto = MakeContext(EpilogueFusion::kAuto);
  std::unique_ptr<MatmulContext> ctx_all = MakeContext(EpilogueFusion::kAll);
  ASSERT_NE(ctx_auto, nullptr);
  ASSERT_NE(ctx_all, nullptr);
  const Shape sh{2048, 256, 3072};
  const BackwardData d = MakeBackwardData(sh, 77);
  std::vector<float> db_ref(sh.OC, 0.f);
  for (int n = 0; n < sh.N; ++n) {
    for (int o = 0; o < sh.OC; ++o) db_ref[o] += d.dy.values[n * sh.OC + o];
  }
  std::vector<double> atol(sh.OC, 1e-6);
  for (int n = 0; n < sh.N; ++n) {
    for (int o = 0; o < sh.OC; ++o) atol[o] += 3 * kAccum * std::abs(d.dy.values[n * sh.OC + o]);
  }
  for (float& v : db_ref) v *= 3;
  const int64_t nw = static_cast<int64_t>(sh.OC) * sh.C;
  DeviceArray<bf16> d_x(d.x.bits), d_w(d.w.bits), d_dy(d.dy.bits),
      d_dx(static_cast<int64_t>(sh.N) * sh.C);
  DeviceArray<float> d_dw(nw), d_db(sh.OC);
  const int64_t ws_bytes = matmul_backward_cuda_workspace_bytes(sh.N, sh.OC);
  DeviceArray<unsigned char> ws1(ws_bytes), ws2(ws_bytes);
  QT_ASSERT_OK(matmul_backward_cuda(*ctx_auto, d_dx.get(), d_dw.get(), d_db.get(), d_dy.get(),
                                    d_x.get(), d_w.get(), sh.N, sh.C, sh.OC, ws1.get(), ws_bytes,
                                    stream.get(), nullptr, GradWrite::kOverwrite,
                                    GradWrite::kOverwrite));
  QT_ASSERT_OK(matmul_backward_cuda(*ctx_all, nullptr, d_dw.get(), d_db.get(), d_dy.get(),
                                    d_x.get(), nullptr, sh.N, sh.C, sh.OC, ws2.get(), ws_bytes,
                                    stream.get(), nullptr, GradWrite::kAccumulate));
  QT_ASSERT_OK(matmul_backward_cuda(*ctx_auto, nullptr, nullptr, d_db.get(), d_dy.get(),
                                    nullptr, nullptr, sh.N, sh.C, sh.OC, ws1.get(), ws_bytes,
                                    stream.get(), nullptr, GradWrite::kAccumulate));
  QT_ASSERT_OK(stream.Sync());
  EXPECT_EQ(ctx_all->fused_epilogues(), 1);
  testing::ExpectNear(d_db.ToHost("dbias"), db_ref, 0, 1e-6, "dbias after three calls", &atol);
}

// Ordinal of a BF16 value on the number line (one step per representable value; +0 == -0).
int64_t Bf16Ordinal(float x) {
  const bf16 b = FloatToBf16(x);
  const int64_t magnitude = b.bits & 0x7fff;
  return (b.bits & 0x8000) != 0 ? -magnitude : magnitude;
}

// The BF16 gradient overload is the fp32 one rounded once: within one BF16 step of
// bf16(fp32 result) (the two may use different cuBLASLt algorithms, whose fp32 sums differ in
// the last bits); dinp, the same GEMM in both, is bit-identical.
TEST(MatmulCudaTest, Bf16GradientsWithinOneUlpOfFp32Path) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  for (EpilogueFusion fusion : {EpilogueFusion::kAuto, EpilogueFusion::kAll}) {
    std::unique_ptr<MatmulContext> ctx = MakeContext(fusion);
    ASSERT_NE(ctx, nullptr);
    uint32_t seed = 200;
    for (const Shape& sh : kBiasShapes) {
      const BackwardData data = MakeBackwardData(sh, seed += 10);
      for (GradWrite dparams : {GradWrite::kAccumulate, GradWrite::kOverwrite}) {
        SCOPED_TRACE(::testing::Message()
                     << "fusion=" << FusionName(fusion) << " N=" << sh.N << " C=" << sh.C
                     << " OC=" << sh.OC << " " << WriteName(dparams));
        const BackwardOut f32 = RunBackward<float>(*ctx, stream.get(), data, sh, dparams, false);
        const BackwardOut b16 = RunBackward<bf16>(*ctx, stream.get(), data, sh, dparams, false);
        ASSERT_EQ(f32.dw.size(), b16.dw.size());
        ASSERT_EQ(f32.db.size(), b16.db.size());
        testing::ExpectBitwiseEqual(b16.dx, f32.dx, "dinp");
        for (const auto& [name, a, b] :
             {std::tuple<const char*, const std::vector<float>*, const std::vector<float>*>{
                  "dweight", &b16.dw, &f32.dw},
              {"dbias", &b16.db, &f32.db}}) {
          int bad = 0;
          for (size_t i = 0; i < a->size(); ++i) {
            const int64_t steps = std::abs(Bf16Ordinal((*a)[i]) - Bf16Ordinal((*b)[i]));
            if (steps > 1 && bad++ < 5) {
              ADD_FAILURE() << name << "[" << i << "]: bf16 path " << (*a)[i] << ", fp32 path "
                            << (*b)[i] << " rounds to a value " << steps << " steps away";
            }
          }
          EXPECT_EQ(bad, 0) << name;
        }
      }
    }
  }
}

// Autotuning picks among cuBLASLt's candidates by timing them, without changing what the
// caller sees: an accumulation (beta = 1) done once with autotuning on matches the CPU like the
// untuned one (a timing run that touched the caller's buffers would add the product again or
// leave garbage), overwritten outputs are complete, and repeating a call from the same state is
// bit-identical (the choice is cached).
TEST(MatmulCudaTest, AutotuneKeepsResultsAndCallerBuffers) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  std::unique_ptr<MatmulContext> tuned = MakeContext(EpilogueFusion::kAuto, true);
  std::unique_ptr<MatmulContext> untuned = MakeContext(EpilogueFusion::kAuto, false);
  // kAll: the BGRADB GEMM (whose bias output the timing runs write) autotuned too.
  std::unique_ptr<MatmulContext> tuned_all = MakeContext(EpilogueFusion::kAll, true);
  ASSERT_NE(tuned, nullptr);
  ASSERT_NE(untuned, nullptr);
  ASSERT_NE(tuned_all, nullptr);
  EXPECT_TRUE(tuned->autotune());
  EXPECT_FALSE(untuned->autotune());
  const Shape shapes[] = {{37, 53, 29}, {64, 128, 192}, {256, 64, 3072}, {512, 256, 768}};
  uint32_t seed = 400;
  for (const Shape& sh : shapes) {
    for (bool with_bias : {false, true}) {
      for (Activation act : {Activation::kNone, Activation::kGelu}) {
        SCOPED_TRACE(::testing::Message() << "forward N=" << sh.N << " C=" << sh.C << " OC="
                                          << sh.OC << " bias=" << with_bias
                                          << " gelu=" << (act == Activation::kGelu));
        std::vector<float> first, again;
        CheckForward(*tuned, stream.get(), sh, with_bias, act, &first);
        CheckForward(*tuned, stream.get(), sh, with_bias, act, &again);
        testing::ExpectBitwiseEqual(again, first, "forward repeat");
        CheckForward(*untuned, stream.get(), sh, with_bias, act);
      }
    }
    const BackwardData data = MakeBackwardData(sh, seed += 10);
    for (GradWrite dparams : {GradWrite::kAccumulate, GradWrite::kOverwrite}) {
      const BackwardRef ref = MakeBackwardRef(data, sh, dparams);
      for (bool bf16_grads : {false, true}) {
        SCOPED_TRACE(::testing::Message() << "backward N=" << sh.N << " C=" << sh.C << " OC="
                                          << sh.OC << " " << WriteName(dparams) << " grads="
                                          << (bf16_grads ? "bf16" : "fp32"));
        auto run = [&](MatmulContext& ctx) {
          return bf16_grads ? RunBackward<bf16>(ctx, stream.get(), data, sh, dparams, false)
                            : RunBackward<float>(ctx, stream.get(), data, sh, dparams, false);
        };
        for (MatmulContext* ctx : {tuned.get(), tuned_all.get()}) {
          const BackwardOut first = run(*ctx);  // tunes this problem's GEMMs
          ExpectMatchesRef(first, ref, bf16_grads);
          const BackwardOut again = run(*ctx);
          testing::ExpectBitwiseEqual(again.dx, first.dx, "dinp repeat");
          testing::ExpectBitwiseEqual(again.dw, first.dw, "dweight repeat");
          testing::ExpectBitwiseEqual(again.db, first.db, "dbias repeat");
        }
        ExpectMatchesRef(run(*untuned), ref, bf16_grads);
      }
    }
  }
  EXPECT_GT(tuned_all->fused_epilogues(), 0);
  std::vector<MatmulTuneRecord> report = tuned_all->autotune_report();
  EXPECT_FALSE(report.empty());
  const std::vector<MatmulTuneRecord> tuned_report = tuned->autotune_report();
  EXPECT_FALSE(tuned_report.empty());
  report.insert(report.end(), tuned_report.begin(), tuned_report.end());
  EXPECT_TRUE(untuned->autotune_report().empty());
  bool several = false;
  for (const MatmulTuneRecord& r : report) {
    std::printf("autotune: %s: %d candidates, #%d %.4f ms vs #0 %.4f ms\n", r.problem.c_str(),
                r.candidates, r.chosen, r.chosen_ms, r.default_ms);
    EXPECT_GE(r.candidates, 1) << r.problem;
    EXPECT_GE(r.chosen, 0) << r.problem;
    EXPECT_LT(r.chosen, MatmulContext::kAutotuneCandidates) << r.problem;
    EXPECT_GT(r.chosen_ms, 0) << r.problem;
    if (!std::isnan(r.default_ms)) {
      EXPECT_LE(r.chosen_ms, r.default_ms) << r.problem;
    }
    several = several || r.candidates > 1;
  }
  EXPECT_TRUE(several) << "cuBLASLt offered a single candidate for every problem";
  // Switched off, the problems are chosen again by the heuristic alone: nothing is timed.
  tuned->set_autotune(false);
  EXPECT_FALSE(tuned->autotune());
  const Shape& sh = shapes[1];
  const BackwardData data = MakeBackwardData(sh, 999);
  ExpectMatchesRef(
      RunBackward<float>(*tuned, stream.get(), data, sh, GradWrite::kAccumulate, false),
      MakeBackwardRef(data, sh, GradWrite::kAccumulate), false);
  EXPECT_EQ(tuned->autotune_report().size(), tuned_report.size());
}

TEST(MatmulCudaTest, RejectsBadArguments) {
  QT_SKIP_WITHOUT_GPU();  // a context needs a device
  std::unique_ptr<MatmulContext> ctx = MakeContext(EpilogueFusion::kAuto);
  ASSERT_NE(ctx, nullptr);
  bf16 b{};
  absl::Status s = matmul_forward_cuda(*ctx, &b, &b, &b, nullptr, 0, 4, 4, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("N=0"), absl::string_view::npos) << s;
  s = matmul_forward_cuda(*ctx, &b, &b, &b, nullptr, 4, 4, 4, nullptr, Activation::kGelu);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("pre_act"), absl::string_view::npos) << s;
  s = matmul_backward_cuda(*ctx, nullptr, nullptr, nullptr, &b, &b, &b, 4, 4, 4, nullptr, 0,
                           nullptr, &b);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace qtrain::ops
