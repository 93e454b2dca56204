// GPU parity of the CUDA fused residual + layernorm forward and the fused layernorm backward
// against the CPU reference (ops/layernorm.h): odd and GPT-2 widths, every dispatch branch of
// the backward (16-byte and scalar access, rows held in registers or read twice, columns split
// into slabs), accumulate and overwrite semantics, fp32 and BF16 parameter gradients,
// bit-identical reruns, and the recomputed forward output bit for bit against both forward
// kernels. Tagged "gpu".
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

// The backward's branches: kVec8 rows of 1..8 chunks of 256 columns in registers (C = 8, 512,
// 768, 1024, 1280, 1536, 1600, 2048), kVec8 rows read twice (8192), slabs of columns past
// 12800 (13000; 12801 scalar), scalar access for odd C or an offset of 1 or 4 elements (2 or 8
// bytes); N from 1 row to the GPT-2 shapes (16384 x 768, 4096 x 1600).
const Shape kBackwardShapes[] = {
    {1, 1, 0},      {7, 8, 0},       {3, 37, 0},       {65, 64, 1},    {200, 512, 0},
    {130, 768, 0},  {1, 768, 0},     {16384, 768, 0},  {1000, 768, 4}, {77, 1024, 0},
    {41, 1280, 0},  {50, 1536, 0},   {64, 1600, 0},    {4096, 1600, 0}, {300, 2048, 0},
    {33, 2000, 1},  {5, 8192, 0},    {17, 13000, 0},   {6, 12801, 0},  {2000, 37, 0}};

// Runs the backward on device copies of the given host data, `offset` elements off 16-byte
// alignment (0: the vector branch where C % 8 == 0), and returns what it wrote; the workspace's
// guard band must stay untouched. G is the parameter gradients' type (float or bf16).
template <typename G>
struct BackwardResult {
  std::vector<bf16> dinp, out;  // out: the recomputed forward output (empty when not asked)
  std::vector<G> dweight, dbias;
};

template <typename G>
BackwardResult<G> RunBackward(const Shape& sh, const std::vector<bf16>& dinp0,
                              const std::vector<G>& dw0, const std::vector<G>& db0,
                              const std::vector<bf16>& dout, const std::vector<bf16>& inp,
                              const std::vector<bf16>& weight, const std::vector<bf16>& bias,
                              const std::vector<float>& mean, const std::vector<float>& rstd,
                              GradWrite write, bool recompute, cudaStream_t stream) {
  BackwardResult<G> r;
  const int64_t n = static_cast<int64_t>(sh.N) * sh.C;
  const int64_t ws_bytes = layernorm_backward_cuda_workspace_bytes(sh.N, sh.C);
  DeviceArray<unsigned char> ws(ws_bytes);
  DeviceArray<bf16> d_dx(dinp0, sh.offset), d_dy(dout, sh.offset), d_x(inp, sh.offset),
      d_w(weight, sh.offset), d_b(bias, sh.offset), d_out(recompute ? n : 0, sh.offset);
  DeviceArray<float> d_mean(mean), d_rstd(rstd);
  // Poisoned (NaN) unless accumulating: every element must be written.
  DeviceArray<G> d_dw(sh.C), d_db(sh.C);
  if (write == GradWrite::kAccumulate) {
    d_dw.Upload(dw0);
    d_db.Upload(db0);
  }
  // Without the recomputed output the bias is not needed: pass none.
  const absl::Status s = layernorm_backward_cuda(
      d_dx.get(), d_dw.get(), d_db.get(), d_dy.get(), d_x.get(), d_w.get(),
      recompute ? d_b.get() : nullptr, d_mean.get(), d_rstd.get(), sh.N, sh.C, ws.get(), ws_bytes,
      stream, write, recompute ? d_out.get() : nullptr);
  EXPECT_TRUE(s.ok()) << s;
  EXPECT_TRUE(SynchronizeStream(stream).ok());
  r.dinp = d_dx.ToHost("dinp");
  r.dweight = d_dw.ToHost("dweight");
  r.dbias = d_db.ToHost("dbias");
  if (recompute) r.out = d_out.ToHost("out_recompute");
  ws.ToHost("workspace");  // the guard band after the workspace must keep its poison
  return r;
}

// Backward inputs of one shape: x, dy, weight, bias, an initial dinp and the forward's
// statistics (CPU reference).
struct BackwardCase {
  Shape sh;
  testing::Bf16Data x, dy, w, bias, dx0;
  std::vector<float> mean, rstd;
};

BackwardCase MakeBackwardCase(const Shape& sh, uint32_t seed) {
  BackwardCase c;
  c.sh = sh;
  const int64_t n = static_cast<int64_t>(sh.N) * sh.C;
  c.x = RandomBf16(n, seed, -2, 2);
  c.dy = RandomBf16(n, seed + 1);
  c.w = RandomBf16(sh.C, seed + 2, 0.5, 1.5);
  c.bias = RandomBf16(sh.C, seed + 3);
  c.dx0 = RandomBf16(n, seed + 4);
  std::vector<float> out(n);
  c.mean.resize(sh.N);
  c.rstd.resize(sh.N);
  layernorm_forward(out.data(), c.mean.data(), c.rstd.data(), c.x.values.data(),
                    c.w.values.data(), c.bias.values.data(), sh.N, sh.C);
  return c;
}

template <typename G>
BackwardResult<G> RunBackward(const BackwardCase& c, const std::vector<G>& dw0,
                              const std::vector<G>& db0, GradWrite write, bool recompute,
                              cudaStream_t stream) {
  return RunBackward<G>(c.sh, c.dx0.bits, dw0, db0, c.dy.bits, c.x.bits, c.w.bits, c.bias.bits,
                        c.mean, c.rstd, write, recompute, stream);
}

TEST(LayernormCudaTest, RejectsBadArguments) {
  bf16 b{};
  float f = 0;
  absl::Status s = layernorm_forward_cuda(&b, &f, &f, &b, &b, &b, 0, 4, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("N=0"), absl::string_view::npos) << s;
  s = residual_layernorm_forward_cuda(&b, &b, &f, &f, &b, nullptr, &b, &b, 1, 4, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("b=0"), absl::string_view::npos) << s;
  // The earlier form (no bias, no recomputed output) and the BF16-gradient overload.
  s = layernorm_backward_cuda(&b, &f, &f, &b, &b, &b, &f, &f, 100, 4, &f, 4, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("workspace"), absl::string_view::npos) << s;
  s = layernorm_backward_cuda(&b, &b, &b, &b, &b, &b, &b, &f, &f, 100, 4, &f, 4, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("workspace"), absl::string_view::npos) << s;
  // The recomputed output needs the forward's bias.
  s = layernorm_backward_cuda(&b, &f, &f, &b, &b, &b, nullptr, &f, &f, 1, 4, &f, 1 << 20, nullptr,
                              GradWrite::kOverwrite, &b);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("bias"), absl::string_view::npos) << s;
  s = layernorm_backward_cuda(&b, static_cast<bf16*>(nullptr), &b, &b, &b, &b, &b, &f, &f, 1, 4,
                              &f, 1 << 20, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("dweight=0"), absl::string_view::npos) << s;
  // One partial row [dweight | dbias] of 2C floats per block of rows, at most one per row.
  EXPECT_EQ(layernorm_backward_cuda_workspace_bytes(0, 4), 0);
  EXPECT_EQ(layernorm_backward_cuda_workspace_bytes(4, -1), 0);
  for (const Shape& sh : kBackwardShapes) {
    const int64_t row_bytes = 2 * sh.C * static_cast<int64_t>(sizeof(float));
    const int64_t ws = layernorm_backward_cuda_workspace_bytes(sh.N, sh.C);
    EXPECT_GT(ws, 0) << sh.N << "x" << sh.C;
    EXPECT_EQ(ws % row_bytes, 0) << sh.N << "x" << sh.C;
    EXPECT_LE(ws, sh.N * row_bytes) << sh.N << "x" << sh.C;
  }
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
  for (const Shape& sh : kBackwardShapes) {
    SCOPED_TRACE(::testing::Message() << "N=" << sh.N << " C=" << sh.C << " offset=" << sh.offset);
    const BackwardCase c = MakeBackwardCase(sh, 8);
    const std::vector<float> dw0 = RandomFloats(sh.C, 13), db0 = RandomFloats(sh.C, 14);
    std::vector<float> dx_ref = c.dx0.values, dw_ref = dw0, db_ref = db0;
    layernorm_backward(dx_ref.data(), dw_ref.data(), db_ref.data(), c.dy.values.data(),
                       c.x.values.data(), c.w.values.data(), c.mean.data(), c.rstd.data(), sh.N,
                       sh.C);
    // dweight/dbias sum N terms: tolerance from the sum of their magnitudes.
    std::vector<double> atol_dw(sh.C, 1e-6), atol_db(sh.C, 1e-6);
    for (int64_t r = 0; r < sh.N; ++r) {
      for (int c2 = 0; c2 < sh.C; ++c2) {
        const double d = c.dy.values[r * sh.C + c2];
        atol_dw[c2] += 4e-6 * std::abs((c.x.values[r * sh.C + c2] - c.mean[r]) * c.rstd[r] * d);
        atol_db[c2] += 4e-6 * std::abs(d);
      }
    }
    const BackwardResult<float> first =
        RunBackward<float>(c, dw0, db0, GradWrite::kAccumulate, false, stream.get());
    testing::ExpectNear(Bf16ToFloat(first.dinp), dx_ref, 1e-3, kBf16Eps, "dinp");
    testing::ExpectNear(first.dweight, dw_ref, 0, 1e-6, "dweight", &atol_dw);
    testing::ExpectNear(first.dbias, db_ref, 0, 1e-6, "dbias", &atol_db);
    const BackwardResult<float> second =
        RunBackward<float>(c, dw0, db0, GradWrite::kAccumulate, false, stream.get());
    testing::ExpectBitwiseEqual(second.dinp, first.dinp, "dinp rerun");
    testing::ExpectBitwiseEqual(second.dweight, first.dweight, "dweight rerun");
    testing::ExpectBitwiseEqual(second.dbias, first.dbias, "dbias rerun");
  }
}

// The recomputed output is bit for bit what the forward kernels wrote, whichever access branch
// either side took; asking for it changes none of the other outputs.
TEST(LayernormCudaTest, BackwardRecomputesForwardOutputBitExact) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  struct RecomputeShape {
    int N, C, fwd_offset, bwd_offset;
  };
  const RecomputeShape shapes[] = {
      {1, 37, 0, 0},        {5, 37, 1, 0},     {2000, 37, 0, 1},   {1, 768, 0, 0},
      {16384, 768, 0, 0},   {300, 768, 1, 0},  {300, 768, 0, 1},   {1, 1600, 0, 0},
      {4096, 1600, 0, 0},   {99, 1600, 0, 4},  {64, 8, 0, 0},      {33, 2000, 1, 1},
      {3, 8192, 0, 0},      {9, 13000, 0, 0},  {4, 12801, 0, 0}};
  for (const RecomputeShape& rs : shapes) {
    for (const bool residual : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "N=" << rs.N << " C=" << rs.C << " forward offset="
                                        << rs.fwd_offset << " backward offset=" << rs.bwd_offset
                                        << (residual ? " residual" : " plain"));
      const int64_t n = static_cast<int64_t>(rs.N) * rs.C;
      const auto a = RandomBf16(n, 20, -3, 3), b = RandomBf16(n, 21, -1, 1);
      const auto w = RandomBf16(rs.C, 22, -1.5, 1.5), bias = RandomBf16(rs.C, 23, -1, 1);
      DeviceArray<bf16> d_a(a.bits, rs.fwd_offset), d_b(b.bits, rs.fwd_offset),
          d_w(w.bits, rs.fwd_offset), d_bias(bias.bits, rs.fwd_offset), d_res(n, rs.fwd_offset),
          d_out(n, rs.fwd_offset);
      DeviceArray<float> d_mean(rs.N), d_rstd(rs.N);
      if (residual) {
        QT_ASSERT_OK(residual_layernorm_forward_cuda(d_res.get(), d_out.get(), d_mean.get(),
                                                     d_rstd.get(), d_a.get(), d_b.get(),
                                                     d_w.get(), d_bias.get(), rs.N, rs.C,
                                                     stream.get()));
      } else {
        QT_ASSERT_OK(layernorm_forward_cuda(d_out.get(), d_mean.get(), d_rstd.get(), d_a.get(),
                                            d_w.get(), d_bias.get(), rs.N, rs.C, stream.get()));
      }
      QT_ASSERT_OK(stream.Sync());
      const std::vector<bf16> inp = residual ? d_res.ToHost("residual") : a.bits;
      const std::vector<bf16> out = d_out.ToHost("out");
      const std::vector<float> mean = d_mean.ToHost("mean"), rstd = d_rstd.ToHost("rstd");

      const Shape sh{rs.N, rs.C, rs.bwd_offset};
      const auto dy = RandomBf16(n, 24), dx0 = RandomBf16(n, 25);
      const BackwardResult<float> with = RunBackward<float>(
          sh, dx0.bits, {}, {}, dy.bits, inp, w.bits, bias.bits, mean, rstd,
          GradWrite::kOverwrite, true, stream.get());
      int mismatches = 0;
      int64_t first = -1;
      for (int64_t i = 0; i < n; ++i) {
        if (with.out[i].bits != out[i].bits) {
          if (first < 0) first = i;
          ++mismatches;
        }
      }
      EXPECT_EQ(mismatches, 0) << "first at " << first << ": recomputed "
                               << (first >= 0 ? Bf16ToFloat(with.out[first]) : 0.f)
                               << " forward " << (first >= 0 ? Bf16ToFloat(out[first]) : 0.f);
      const BackwardResult<float> without = RunBackward<float>(
          sh, dx0.bits, {}, {}, dy.bits, inp, w.bits, bias.bits, mean, rstd,
          GradWrite::kOverwrite, false, stream.get());
      testing::ExpectBitwiseEqual(with.dinp, without.dinp, "dinp with/without out_recompute");
      testing::ExpectBitwiseEqual(with.dweight, without.dweight, "dweight with/without");
      testing::ExpectBitwiseEqual(with.dbias, without.dbias, "dbias with/without");
    }
  }
}

// BF16 parameter gradients are the fp32 path's sums rounded once: kOverwrite writes bf16(sum),
// kAccumulate bf16(float(old) + sum); fp32 kAccumulate is old + sum exactly; dinp is the same.
TEST(LayernormCudaTest, BackwardBf16GradientsRoundTheFp32Sums) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  const Shape shapes[] = {{1, 1, 0},      {3, 37, 0},     {65, 64, 1},    {130, 768, 0},
                          {16384, 768, 0}, {4096, 1600, 0}, {33, 2000, 1}, {17, 13000, 0}};
  for (const Shape& sh : shapes) {
    SCOPED_TRACE(::testing::Message() << "N=" << sh.N << " C=" << sh.C << " offset=" << sh.offset);
    const BackwardCase c = MakeBackwardCase(sh, 30);
    const BackwardResult<float> sums =
        RunBackward<float>(c, {}, {}, GradWrite::kOverwrite, false, stream.get());
    // fp32: the old values plus the sums.
    const std::vector<float> dw0 = RandomFloats(sh.C, 31), db0 = RandomFloats(sh.C, 32);
    const BackwardResult<float> acc32 =
        RunBackward<float>(c, dw0, db0, GradWrite::kAccumulate, false, stream.get());
    std::vector<float> dw_acc(sh.C), db_acc(sh.C);
    for (int i = 0; i < sh.C; ++i) {
      dw_acc[i] = dw0[i] + sums.dweight[i];
      db_acc[i] = db0[i] + sums.dbias[i];
    }
    testing::ExpectBitwiseEqual(acc32.dweight, dw_acc, "fp32 dweight accumulate");
    testing::ExpectBitwiseEqual(acc32.dbias, db_acc, "fp32 dbias accumulate");
    // BF16 overwrite: the sums rounded once.
    const BackwardResult<bf16> over16 =
        RunBackward<bf16>(c, {}, {}, GradWrite::kOverwrite, false, stream.get());
    testing::ExpectBitwiseEqual(over16.dweight, ToBf16(sums.dweight), "bf16 dweight overwrite");
    testing::ExpectBitwiseEqual(over16.dbias, ToBf16(sums.dbias), "bf16 dbias overwrite");
    testing::ExpectBitwiseEqual(over16.dinp, sums.dinp, "dinp (bf16 gradients)");
    // BF16 accumulate: one rounding of old + sum.
    const auto dw0b = RandomBf16(sh.C, 33), db0b = RandomBf16(sh.C, 34);
    const BackwardResult<bf16> acc16 =
        RunBackward<bf16>(c, dw0b.bits, db0b.bits, GradWrite::kAccumulate, false, stream.get());
    std::vector<bf16> dw_acc16(sh.C), db_acc16(sh.C);
    for (int i = 0; i < sh.C; ++i) {
      dw_acc16[i] = FloatToBf16(dw0b.values[i] + sums.dweight[i]);
      db_acc16[i] = FloatToBf16(db0b.values[i] + sums.dbias[i]);
    }
    testing::ExpectBitwiseEqual(acc16.dweight, dw_acc16, "bf16 dweight accumulate");
    testing::ExpectBitwiseEqual(acc16.dbias, db_acc16, "bf16 dbias accumulate");
    testing::ExpectBitwiseEqual(acc16.dinp, sums.dinp, "dinp (bf16 accumulate)");
  }
}

}  // namespace
}  // namespace qtrain::ops
