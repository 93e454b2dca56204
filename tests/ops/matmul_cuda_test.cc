// GPU parity of the cuBLASLt linear layer against the CPU reference (ops/matmul.h, ops/gelu.h):
// forward with and without bias and GELU, fused and unfused epilogues, odd and aligned shapes;
// backward dinp (accumulated), dweight (fp32, accumulated), dbias (deterministic), the fused
// GELU gradient. Tolerances: fp32 accumulation error bounded by 2^-14 of the sum of |terms|,
// plus 2^-8 relative per BF16 rounding. cuBLASLt's BF16 epilogues round the GEMM result before
// adding bias or beta*C and before the GELU gradient (seen on an H100: fused and unfused paths
// give the same bits), so those results carry a second rounding of the GEMM part, like our
// unfused path. Tagged "gpu".
#include "ops/cuda/matmul_cuda.h"

#include <cmath>
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "ops/gelu.h"
#include "ops/matmul.h"
#include "tests/ops/cuda_test_util.h"

namespace qtrain::ops {
namespace {

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

std::unique_ptr<MatmulContext> MakeContext(EpilogueFusion fusion) {
  absl::StatusOr<std::unique_ptr<MatmulContext>> ctx = MatmulContext::Create(fusion);
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

TEST(MatmulCudaTest, ForwardMatchesCpuEveryEpilogue) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  for (EpilogueFusion fusion : {EpilogueFusion::kAuto, EpilogueFusion::kNever}) {
    std::unique_ptr<MatmulContext> ctx = MakeContext(fusion);
    ASSERT_NE(ctx, nullptr);
    for (const Shape& sh : kShapes) {
      for (bool with_bias : {false, true}) {
        for (Activation act : {Activation::kNone, Activation::kGelu}) {
          SCOPED_TRACE(::testing::Message()
                       << "fusion=" << (fusion == EpilogueFusion::kAuto ? "auto" : "never")
                       << " N=" << sh.N << " C=" << sh.C << " OC=" << sh.OC
                       << " bias=" << with_bias << " gelu=" << (act == Activation::kGelu));
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
          QT_ASSERT_OK(matmul_forward_cuda(*ctx, d_out.get(), d_x.get(), d_w.get(),
                                           with_bias ? d_bias.get() : nullptr, sh.N, sh.C,
                                           sh.OC, stream.get(), act,
                                           gelu ? d_pre.get() : nullptr));
          QT_ASSERT_OK(stream.Sync());
          const std::vector<float> out = Bf16ToFloat(d_out.ToHost("out"));
          if (!gelu) {
            testing::ExpectNear(out, pre_ref, 0, kBf16Eps, "out", &atol);
            continue;
          }
          testing::ExpectNear(Bf16ToFloat(d_pre.ToHost("pre_act")), pre_ref, 0, kBf16Eps,
                              "pre_act", &atol);
          std::vector<float> out_ref(pre_ref.size());
          gelu_forward(out_ref.data(), pre_ref.data(), static_cast<int64_t>(pre_ref.size()));
          // |gelu'| <= 1.13 carries the pre-activation's error, including its rounding to
          // BF16 before the GELU, into the output, which is rounded once more.
          std::vector<double> atol_gelu(atol);
          for (size_t i = 0; i < atol_gelu.size(); ++i) {
            atol_gelu[i] = 1.2 * (atol[i] + kBf16Eps * std::abs(pre_ref[i]));
          }
          testing::ExpectNear(out, out_ref, 0, kBf16Eps, "gelu out", &atol_gelu);
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
  for (EpilogueFusion fusion : {EpilogueFusion::kAuto, EpilogueFusion::kNever}) {
    std::unique_ptr<MatmulContext> ctx = MakeContext(fusion);
    ASSERT_NE(ctx, nullptr);
    for (const Shape& sh : kShapes) {
      SCOPED_TRACE(::testing::Message()
                   << "fusion=" << (fusion == EpilogueFusion::kAuto ? "auto" : "never")
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
    if (fusion == EpilogueFusion::kNever) {
      EXPECT_EQ(ctx->fused_epilogues(), 0);
    }
  }
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
