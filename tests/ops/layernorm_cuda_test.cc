// GPU parity of the CUDA fused residual + layernorm forward and the layernorm backward against
// the CPU reference (ops/layernorm.h): odd and GPT-2 widths, both access branches, accumulate
// semantics, bit-identical reruns of the backward. Tagged "gpu".
#include "ops/cuda/layernorm_cuda.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "ops/layernorm.h"
#include "tests/ops/cuda_test_util.h"

namespace qtrain::ops {
namespace {

using testing::DeviceArray;
using testing::kBf16Eps;
using testing::RandomBf16;
using testing::RandomFloats;

struct Shape {
  int N, C, offset;  // offset: bf16 arrays shifted off 16-byte alignment (scalar branch)
};

const Shape kShapes[] = {{1, 1, 0},   {7, 8, 0},     {3, 37, 0},   {65, 64, 1},
                         {130, 768, 0}, {64, 1600, 0}, {33, 2000, 1}, {5, 8192, 0}};

TEST(LayernormCudaTest, RejectsBadArguments) {
  bf16 b{};
  float f = 0;
  absl::Status s = layernorm_forward_cuda(&b, &f, &f, &b, &b, &b, 0, 4, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("N=0"), absl::string_view::npos) << s;
  s = residual_layernorm_forward_cuda(&b, &b, &f, &f, &b, nullptr, &b, &b, 1, 4, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("b=0"), absl::string_view::npos) << s;
  s = layernorm_backward_cuda(&b, &f, &f, &b, &b, &b, &f, &f, 100, 4, &f, 4, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("workspace"), absl::string_view::npos) << s;
  EXPECT_EQ(layernorm_backward_cuda_workspace_bytes(100, 4), 2 * 2 * 4 * 4);
}

TEST(LayernormCudaTest, ResidualForwardMatchesCpu) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  for (const Shape& sh : kShapes) {
    SCOPED_TRACE(::testing::Message() << "N=" << sh.N << " C=" << sh.C << " offset=" << sh.offset);
    const int64_t n = static_cast<int64_t>(sh.N) * sh.C;
    const auto a = RandomBf16(n, 1, -2, 2), b = RandomBf16(n, 2, -2, 2);
    const auto w = RandomBf16(sh.C, 3, 0.5, 1.5), bias = RandomBf16(sh.C, 4, -0.5, 0.5);
    // Reference: the residual is one fp32 add rounded to BF16 (bit-exact on both sides), then
    // the CPU layernorm of that rounded residual.
    std::vector<bf16> res_ref(n);
    std::vector<float> res_vals(n);
    for (int64_t i = 0; i < n; ++i) {
      res_ref[i] = FloatToBf16(a.values[i] + b.values[i]);
      res_vals[i] = Bf16ToFloat(res_ref[i]);
    }
    std::vector<float> out_ref(n), mean_ref(sh.N), rstd_ref(sh.N);
    layernorm_forward(out_ref.data(), mean_ref.data(), rstd_ref.data(), res_vals.data(),
                      w.values.data(), bias.values.data(), sh.N, sh.C);

    DeviceArray<bf16> d_a(a.bits, sh.offset), d_b(b.bits, sh.offset), d_w(w.bits, sh.offset),
        d_bias(bias.bits, sh.offset), d_res(n, sh.offset), d_out(n, sh.offset);
    DeviceArray<float> d_mean(sh.N), d_rstd(sh.N);
    QT_ASSERT_OK(residual_layernorm_forward_cuda(d_res.get(), d_out.get(), d_mean.get(),
                                                 d_rstd.get(), d_a.get(), d_b.get(), d_w.get(),
                                                 d_bias.get(), sh.N, sh.C, stream.get()));
    QT_ASSERT_OK(stream.Sync());
    const std::vector<bf16> res = d_res.ToHost("residual");
    int mismatches = 0;
    for (int64_t i = 0; i < n; ++i) mismatches += res[i].bits != res_ref[i].bits;
    EXPECT_EQ(mismatches, 0) << "residual must be the rounded fp32 sum";
    testing::ExpectNear(d_mean.ToHost("mean"), mean_ref, 1e-6, 1e-5, "mean");
    testing::ExpectNear(d_rstd.ToHost("rstd"), rstd_ref, 0, 1e-5, "rstd");
    // One BF16 rounding of the output, plus fp32 statistics in another order.
    testing::ExpectNear(Bf16ToFloat(d_out.ToHost("out")), out_ref, 1e-4, kBf16Eps, "out");
  }
}

TEST(LayernormCudaTest, PlainForwardMatchesCpu) {
  QT_SKIP_WITHOUT_GPU();
  for (const Shape& sh : kShapes) {
    SCOPED_TRACE(::testing::Message() << "N=" << sh.N << " C=" << sh.C << " offset=" << sh.offset);
    const int64_t n = static_cast<int64_t>(sh.N) * sh.C;
    // A large common offset per row: the two-pass variance must not cancel catastrophically.
    auto x = RandomBf16(n, 5, 7, 9);
    const auto w = RandomBf16(sh.C, 6, -1, 1), bias = RandomBf16(sh.C, 7, -1, 1);
    std::vector<float> out_ref(n), mean_ref(sh.N), rstd_ref(sh.N);
    layernorm_forward(out_ref.data(), mean_ref.data(), rstd_ref.data(), x.values.data(),
                      w.values.data(), bias.values.data(), sh.N, sh.C);
    DeviceArray<bf16> d_x(x.bits, sh.offset), d_w(w.bits, sh.offset), d_bias(bias.bits, sh.offset),
        d_out(n, sh.offset);
    DeviceArray<float> d_mean(sh.N), d_rstd(sh.N);
    QT_ASSERT_OK(layernorm_forward_cuda(d_out.get(), d_mean.get(), d_rstd.get(), d_x.get(),
                                        d_w.get(), d_bias.get(), sh.N, sh.C, nullptr));
    QT_ASSERT_OK(SynchronizeDevice());
    testing::ExpectNear(d_mean.ToHost("mean"), mean_ref, 1e-5, 1e-5, "mean");
    // rstd of a row with C == 1 is 1/sqrt(eps): variance 0 on both sides.
    testing::ExpectNear(d_rstd.ToHost("rstd"), rstd_ref, 0, 1e-3, "rstd");
    testing::ExpectNear(Bf16ToFloat(d_out.ToHost("out")), out_ref, 2e-3, kBf16Eps, "out");
  }
}

TEST(LayernormCudaTest, BackwardAccumulatesLikeCpuAndIsDeterministic) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  for (const Shape& sh : kShapes) {
    SCOPED_TRACE(::testing::Message() << "N=" << sh.N << " C=" << sh.C << " offset=" << sh.offset);
    const int64_t n = static_cast<int64_t>(sh.N) * sh.C;
    const auto x = RandomBf16(n, 8, -2, 2), dy = RandomBf16(n, 9);
    const auto w = RandomBf16(sh.C, 10, 0.5, 1.5), bias = RandomBf16(sh.C, 11);
    const auto dx0 = RandomBf16(n, 12);
    const std::vector<float> dw0 = RandomFloats(sh.C, 13), db0 = RandomFloats(sh.C, 14);
    std::vector<float> out(n), mean(sh.N), rstd(sh.N);
    layernorm_forward(out.data(), mean.data(), rstd.data(), x.values.data(), w.values.data(),
                      bias.values.data(), sh.N, sh.C);
    std::vector<float> dx_ref = dx0.values, dw_ref = dw0, db_ref = db0;
    layernorm_backward(dx_ref.data(), dw_ref.data(), db_ref.data(), dy.values.data(),
                       x.values.data(), w.values.data(), mean.data(), rstd.data(), sh.N, sh.C);
    // dweight/dbias sum N terms: tolerance from the sum of their magnitudes.
    std::vector<double> atol_dw(sh.C, 0), atol_db(sh.C, 0);
    for (int r = 0; r < sh.N; ++r) {
      for (int c = 0; c < sh.C; ++c) {
        const double d = dy.values[r * sh.C + c];
        atol_dw[c] += 4e-6 * std::abs((x.values[r * sh.C + c] - mean[r]) * rstd[r] * d);
        atol_db[c] += 4e-6 * std::abs(d);
      }
    }
    for (int c = 0; c < sh.C; ++c) {
      atol_dw[c] += 1e-6;
      atol_db[c] += 1e-6;
    }
    const int64_t ws_bytes = layernorm_backward_cuda_workspace_bytes(sh.N, sh.C);
    DeviceArray<unsigned char> ws(ws_bytes);
    DeviceArray<bf16> d_x(x.bits, sh.offset), d_dy(dy.bits, sh.offset), d_w(w.bits, sh.offset);
    DeviceArray<float> d_mean(mean), d_rstd(rstd);
    std::vector<bf16> first_dx;
    std::vector<float> first_dw, first_db;
    for (int run = 0; run < 2; ++run) {
      DeviceArray<bf16> d_dx(dx0.bits, sh.offset);
      DeviceArray<float> d_dw(dw0), d_db(db0);
      QT_ASSERT_OK(layernorm_backward_cuda(d_dx.get(), d_dw.get(), d_db.get(), d_dy.get(),
                                           d_x.get(), d_w.get(), d_mean.get(), d_rstd.get(),
                                           sh.N, sh.C, ws.get(), ws_bytes, stream.get()));
      QT_ASSERT_OK(stream.Sync());
      const std::vector<bf16> dx = d_dx.ToHost("dinp");
      const std::vector<float> dw = d_dw.ToHost("dweight"), db = d_db.ToHost("dbias");
      if (run == 0) {
        testing::ExpectNear(Bf16ToFloat(dx), dx_ref, 1e-3, kBf16Eps, "dinp");
        testing::ExpectNear(dw, dw_ref, 0, 1e-6, "dweight", &atol_dw);
        testing::ExpectNear(db, db_ref, 0, 1e-6, "dbias", &atol_db);
        first_dx = dx;
        first_dw = dw;
        first_db = db;
      } else {
        testing::ExpectBitwiseEqual(dx, first_dx, "dinp rerun");
        testing::ExpectBitwiseEqual(dw, first_dw, "dweight rerun");
        testing::ExpectBitwiseEqual(db, first_db, "dbias rerun");
      }
    }
  }
}

}  // namespace
}  // namespace qtrain::ops
