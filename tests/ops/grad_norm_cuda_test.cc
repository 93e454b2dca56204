// GPU parity of the CUDA gradient norm and clipping against the CPU reference
// (ops/grad_norm.h): fp64 sums over odd sizes (both access branches, more elements than the
// fixed grid covers in one sweep), bit-identical reruns, clip factors and scaled gradients
// bit-exact against the CPU given the same norm; the sum over BF16 gradients against the fp64
// sum of their widened values and, bit for bit, the fp32 path over those values. Tagged "gpu".
#include "ops/cuda/grad_norm_cuda.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "ops/grad_norm.h"
#include "tests/ops/cuda_test_util.h"

namespace qtrain::ops {
namespace {

using testing::DeviceArray;
using testing::RandomFloats;

TEST(GradNormCudaTest, RejectsBadArguments) {
  double d = 0;
  float f = 0;
  absl::Status s = sum_squares_cuda(&d, &f, 10, nullptr, 0, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("workspace"), absl::string_view::npos) << s;
  EXPECT_EQ(sum_squares_cuda(&d, &f, -1, &d, 1 << 20, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  s = clip_by_global_norm_cuda(&f, 1, &d, 0.0, nullptr, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("max_norm"), absl::string_view::npos) << s;
  EXPECT_EQ(clip_factor_cuda(nullptr, &d, 1.0, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  const bf16 b{0};
  s = sum_squares_cuda(&d, &b, 10, nullptr, 0, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("workspace"), absl::string_view::npos) << s;
  s = sum_squares_cuda(&d, static_cast<const bf16*>(nullptr), 3, &d, 1 << 20, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("grads is null"), absl::string_view::npos) << s;
}

TEST(GradNormCudaTest, SumOfSquaresMatchesCpuAndIsDeterministic) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  DeviceArray<unsigned char> ws(sum_squares_cuda_workspace_bytes());
  for (int offset : {0, 1}) {
    for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{5}, int64_t{1000}, int64_t{262147},
                      int64_t{3 * (1 << 20) + 7}}) {
      SCOPED_TRACE(::testing::Message() << "n=" << n << " offset=" << offset);
      const std::vector<float> g = RandomFloats(n, 1, -3, 3);
      const double ref = sum_squares(g.data(), n);
      DeviceArray<float> d_g(g, offset);
      DeviceArray<double> d_out(1);
      std::vector<double> runs;
      for (int run = 0; run < 2; ++run) {
        QT_ASSERT_OK(sum_squares_cuda(d_out.get(), d_g.get(), n, ws.get(), ws.size(),
                                      stream.get()));
        QT_ASSERT_OK(stream.Sync());
        runs.push_back(d_out.ToHost("sum")[0]);
      }
      EXPECT_NEAR(runs[0], ref, 1e-12 * ref + 1e-300);
      testing::ExpectBitwiseEqual(std::vector<double>{runs[0]}, std::vector<double>{runs[1]},
                                  "sum rerun");
    }
  }
}

TEST(GradNormCudaTest, ClipMatchesCpuBitwise) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  DeviceArray<unsigned char> ws(sum_squares_cuda_workspace_bytes());
  const int64_t n = 100003;
  for (double max_norm : {1.0, 1e6}) {  // clipping, and a factor of exactly 1 (no-op)
    SCOPED_TRACE(::testing::Message() << "max_norm=" << max_norm);
    const std::vector<float> g = RandomFloats(n, 2);
    DeviceArray<float> d_g(g);
    DeviceArray<double> d_sum(1);
    DeviceArray<float> d_factor(1), d_factor2(1);
    QT_ASSERT_OK(sum_squares_cuda(d_sum.get(), d_g.get(), n, ws.get(), ws.size(), stream.get()));
    QT_ASSERT_OK(clip_factor_cuda(d_factor2.get(), d_sum.get(), max_norm, stream.get()));
    QT_ASSERT_OK(clip_by_global_norm_cuda(d_g.get(), n, d_sum.get(), max_norm, d_factor.get(),
                                          stream.get()));
    QT_ASSERT_OK(stream.Sync());
    const double sum = d_sum.ToHost("sum")[0];
    std::vector<float> ref = g;
    const float factor_ref = clip_by_global_norm(ref.data(), n, std::sqrt(sum), max_norm);
    const float factor = d_factor.ToHost("factor")[0];
    EXPECT_EQ(factor, factor_ref);
    EXPECT_EQ(d_factor2.ToHost("factor")[0], factor_ref);
    if (max_norm == 1.0) {
      EXPECT_LT(factor, 1.f);
    } else {
      EXPECT_EQ(factor, 1.f);
    }
    testing::ExpectBitwiseEqual(d_g.ToHost("grads"), ref, "clipped grads");
  }
}

// BF16 gradients: the fp64 sum of the squares of the widened values, and the very bits of the
// fp32 overload over those values where both take the same branch: offset 0 (both vector),
// 1 (both element-wise), and BF16 at offset 4 (8-byte aligned: vector) against fp32 at 0.
TEST(GradNormCudaTest, SumOfSquaresOverBf16MatchesWidenedFp32) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  DeviceArray<unsigned char> ws(sum_squares_cuda_workspace_bytes());
  for (int offset : {0, 1, 4}) {
    for (int64_t n : {int64_t{0}, int64_t{1}, int64_t{5}, int64_t{1000}, int64_t{262147},
                      int64_t{3 * (1 << 20) + 7}}) {
      SCOPED_TRACE(::testing::Message() << "n=" << n << " offset=" << offset);
      const testing::Bf16Data g = testing::RandomBf16(n, 3, -3, 3);
      double ref = 0;
      for (float x : g.values) ref += static_cast<double>(x) * static_cast<double>(x);
      DeviceArray<bf16> d_gb(g.bits, offset);
      DeviceArray<float> d_g(g.values, offset == 1 ? 1 : 0);
      DeviceArray<double> d_out(1), d_out32(1);
      std::vector<double> runs;
      for (int run = 0; run < 2; ++run) {
        QT_ASSERT_OK(sum_squares_cuda(d_out.get(), d_gb.get(), n, ws.get(), ws.size(),
                                      stream.get()));
        QT_ASSERT_OK(stream.Sync());
        runs.push_back(d_out.ToHost("sum")[0]);
      }
      QT_ASSERT_OK(
          sum_squares_cuda(d_out32.get(), d_g.get(), n, ws.get(), ws.size(), stream.get()));
      QT_ASSERT_OK(stream.Sync());
      EXPECT_NEAR(runs[0], ref, 1e-12 * ref + 1e-300);
      testing::ExpectBitwiseEqual(std::vector<double>{runs[0]}, std::vector<double>{runs[1]},
                                  "bf16 sum rerun");
      testing::ExpectBitwiseEqual(std::vector<double>{runs[0]}, d_out32.ToHost("fp32 sum"),
                                  "bf16 vs fp32 sum");
    }
  }
}

}  // namespace
}  // namespace qtrain::ops
