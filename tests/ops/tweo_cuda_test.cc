// GPU parity of the TWEO outlier statistics (ops/cuda/tweo_cuda.h) against the CPU reference
// (ops/tweo.h): the loss term, peak and kurtosis over BF16 block outputs of odd sizes on both
// access branches, bit-identical reruns; and the TWEO gradient fused into the layernorm
// backward against the CPU's tweo_backward plus layernorm_backward. Tagged "gpu".
#include "ops/cuda/tweo_cuda.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "ops/cuda/layernorm_cuda.h"
#include "ops/cuda/layernorm_quant_cuda.h"
#include "ops/layernorm.h"
#include "ops/tweo.h"
#include "tests/ops/cuda_test_util.h"

namespace qtrain::ops {
namespace {

using testing::DeviceArray;
using testing::kBf16Eps;
using testing::RandomBf16;

TEST(TweoCudaTest, RejectsBadArguments) {
  double d = 0;
  const bf16 b{0};
  absl::Status s = block_output_stats_cuda(&d, &b, 1, 3, 4, 1e-6, nullptr, 0, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("workspace"), absl::string_view::npos) << s;
  s = block_output_stats_cuda(&d, &b, 1, 3, 0.5, 1e-6, &d, 1 << 20, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("p must be"), absl::string_view::npos) << s;
  s = block_output_stats_cuda(&d, &b, 1, -1, 4, 0, &d, 1 << 20, nullptr);
  EXPECT_NE(s.message().find("tau + eps"), absl::string_view::npos) << s;
}

TEST(TweoCudaTest, StatsMatchCpu) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  DeviceArray<unsigned char> ws(block_output_stats_cuda_workspace_bytes());
  for (int offset : {0, 3}) {
    for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{1001}, int64_t{300007}}) {
      for (double p : {4.0, 2.0, 3.0}) {
        SCOPED_TRACE(::testing::Message() << "n=" << n << " offset=" << offset << " p=" << p);
        // A heavy tail, as block outputs have: a few values far beyond tau.
        testing::Bf16Data a = RandomBf16(n, static_cast<uint32_t>(n + offset), -2, 3);
        for (int64_t i = 0; i < n; i += 997) {
          a.bits[i] = FloatToBf16(40.0f * (i % 2 ? 1 : -1));
          a.values[i] = Bf16ToFloat(a.bits[i]);
        }
        DeviceArray<bf16> d_a(a.bits, offset);
        DeviceArray<double> d_out(kNumBlockOutputStats);
        std::vector<std::vector<double>> runs;
        for (int run = 0; run < 2; ++run) {
          QT_ASSERT_OK(block_output_stats_cuda(d_out.get(), d_a.get(), n, 3.0, p, 1e-6, ws.get(),
                                               ws.size(), stream.get()));
          QT_ASSERT_OK(stream.Sync());
          runs.push_back(d_out.ToHost("stats"));
        }
        testing::ExpectBitwiseEqual(runs[0], runs[1], "stats rerun");
        const BlockOutputSummary got = SummarizeBlockOutputStats(runs[0].data(), n);
        const double tweo = tweo_forward(a.values.data(), n, 3.0, p, 1e-6);
        double peak = 0, kurt = 0;
        activation_stats(a.values.data(), n, &peak, &kurt);
        EXPECT_NEAR(got.tweo, tweo, 1e-12 * tweo);
        EXPECT_EQ(got.peak, peak);
        EXPECT_NEAR(got.kurtosis, kurt, 1e-9 * kurt + 1e-12);
      }
    }
  }
}

// dinp of the fused backward equals the CPU's tweo_backward into dinp followed by the layernorm
// backward, within the BF16 rounding of dinp; a = 0 leaves the plain backward's bits.
TEST(TweoCudaTest, LayernormBackwardAddsTheTweoGradient) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  struct Shape {
    int N, C;
  };
  for (const Shape sh : {Shape{37, 64}, Shape{129, 768}, Shape{17, 100}, Shape{8, 1600}}) {
    SCOPED_TRACE(::testing::Message() << "N=" << sh.N << " C=" << sh.C);
    const int64_t n = static_cast<int64_t>(sh.N) * sh.C;
    testing::Bf16Data x = RandomBf16(n, 1, -8, 8);  // |x| past tau: a large TWEO gradient
    testing::Bf16Data dy = RandomBf16(n, 2), w = RandomBf16(sh.C, 3, 0.5, 1.5),
                      b = RandomBf16(sh.C, 4), dx0 = RandomBf16(n, 5);
    std::vector<float> mean(sh.N), rstd(sh.N);
    std::vector<float> y(n);
    layernorm_forward(y.data(), mean.data(), rstd.data(), x.values.data(), w.values.data(),
                      b.values.data(), sh.N, sh.C);
    // loss_scale * lambda / n_layer, large enough that the term shows at BF16 precision (the
    // coefficient divides by n).
    const double scale = 0.05 * static_cast<double>(n);
    std::vector<float> dx_ref = dx0.values, dw_ref(sh.C, 0), db_ref(sh.C, 0);
    tweo_backward(dx_ref.data(), x.values.data(), n, 3.0, 4.0, 1e-6, scale);
    layernorm_backward(dx_ref.data(), dw_ref.data(), db_ref.data(), dy.values.data(),
                       x.values.data(), w.values.data(), mean.data(), rstd.data(), sh.N, sh.C);
    DeviceArray<bf16> d_x(x.bits), d_dy(dy.bits), d_w(w.bits), d_b(b.bits);
    DeviceArray<float> d_mean(mean), d_rstd(rstd), d_dw(sh.C), d_db(sh.C);
    const int64_t wsb = layernorm_backward_cuda_workspace_bytes(sh.N, sh.C);
    DeviceArray<unsigned char> ws(wsb);
    const TweoGradTerm term = TweoGradTerm::Make(scale, 3.0, 4.0, 1e-6, n);
    ASSERT_NE(term.a, 0.f);
    // Each element's value is ~dx0 + tweo + ln, rounded once: tolerance from its terms.
    std::vector<double> atol(n);
    for (int64_t i = 0; i < n; ++i) atol[i] = 1e-3 + 2 * kBf16Eps * std::abs(dx_ref[i]);
    {
      // The quantizing layernorm backward (QAT's) adds the same term; without a quantizer it is
      // the plain layernorm backward.
      const ActQuant none;
      const int64_t qb = layernorm_backward_quant_cuda_workspace_bytes(sh.N, sh.C, none);
      DeviceArray<unsigned char> qws(qb);
      DeviceArray<bf16> d_dx(dx0.bits);
      QT_ASSERT_OK(layernorm_backward_quant_cuda(
          d_dx.get(), d_dw.get(), d_db.get(), static_cast<float*>(nullptr),
          static_cast<float*>(nullptr), d_dy.get(), d_x.get(), d_w.get(), d_b.get(),
          d_mean.get(), d_rstd.get(), sh.N, sh.C, none, qws.get(), qb, stream.get(),
          GradWrite::kOverwrite, nullptr, term));
      QT_ASSERT_OK(stream.Sync());
      testing::ExpectNear(Bf16ToFloat(d_dx.ToHost("quant dinp")), dx_ref, 0, 0,
                          "quantizing backward's dinp with TWEO", &atol);
    }
    std::vector<bf16> plain;
    for (bool with : {false, true}) {
      DeviceArray<bf16> d_dx(dx0.bits);
      QT_ASSERT_OK(layernorm_backward_cuda(d_dx.get(), d_dw.get(), d_db.get(), d_dy.get(),
                                           d_x.get(), d_w.get(), d_b.get(), d_mean.get(),
                                           d_rstd.get(), sh.N, sh.C, ws.get(), wsb, stream.get(),
                                           GradWrite::kOverwrite, nullptr,
                                           with ? term : TweoGradTerm{}));
      QT_ASSERT_OK(stream.Sync());
      const std::vector<bf16> got = d_dx.ToHost("dinp");
      if (!with) {
        plain = got;
        continue;
      }
      testing::ExpectNear(Bf16ToFloat(got), dx_ref, 0, 0, "dinp with TWEO", &atol);
      int differ = 0;
      for (int64_t i = 0; i < n; ++i) differ += got[i].bits != plain[i].bits;
      EXPECT_GT(differ, n / 2) << "the TWEO term changed too few elements";
    }
  }
}

}  // namespace
}  // namespace qtrain::ops
