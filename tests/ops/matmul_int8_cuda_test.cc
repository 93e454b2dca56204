// GPU parity of the INT8 forward GEMM (ops/cuda/matmul_int8_cuda.h): bit for bit against a host
// replica of its arithmetic (exact int32 sums, then the documented fp32 roundings and one BF16
// rounding), within one output rounding of the exact value, and within the BF16 fake-quant
// GEMM's own roundings of that GEMM's result (matmul_forward_cuda on the dequantized BF16
// operands), for per-token and per-tensor activation scales, with and without bias, 4- and 8-bit
// codes, row chunks (a small scratch), GPT-2 widths; end to end from the weight and activation
// quantizers' codes. Tagged "gpu"; the argument checks run without a device.
#include "ops/cuda/matmul_int8_cuda.h"

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "ops/cuda/bf16.h"
#include "ops/cuda/device.h"
#include "ops/cuda/lsq_cuda.h"
#include "ops/cuda/matmul_cuda.h"
#include "tests/ops/cuda_test_util.h"

namespace qtrain::ops {
namespace {

using testing::DeviceArray;
using testing::RandomFloats;
using testing::TestStream;

std::vector<int8_t> RandomCodes(int64_t n, int bits, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> d(-(1 << (bits - 1)), (1 << (bits - 1)) - 1);
  std::vector<int8_t> v(n);
  for (int8_t& c : v) c = static_cast<int8_t>(d(gen));
  return v;
}

struct Case {
  int N, C, OC, wbits, abits;
  bool per_token, bias;
  int64_t scratch_bytes;  // 0: the default
};

std::string Name(const Case& c) {
  return absl::StrCat("N=", c.N, " C=", c.C, " OC=", c.OC, " W", c.wbits, "A", c.abits,
                      c.per_token ? " per-token" : " per-tensor", c.bias ? " +bias" : "",
                      c.scratch_bytes ? absl::StrCat(" scratch=", c.scratch_bytes) : "");
}

void Check(const Case& c) {
  SCOPED_TRACE(Name(c));
  const int64_t N = c.N, C = c.C, OC = c.OC;
  const std::vector<int8_t> xc = RandomCodes(N * C, c.abits, 1 + c.C), wc = RandomCodes(OC * C, c.wbits, 2 + c.OC);
  const std::vector<float> xs = RandomFloats(c.per_token ? N : 1, 3, 0.01, 0.1);
  const std::vector<float> ws = RandomFloats(OC, 4, 0.001, 0.01);
  std::vector<bf16> bias = ToBf16(RandomFloats(OC, 5, -1.0, 1.0));

  // Host replica (the kernel's documented arithmetic) and the exact value.
  std::vector<float> replica(N * OC);
  std::vector<double> exact(N * OC), abs_sum(N * OC);
  for (int64_t r = 0; r < N; ++r) {
    const float x_s = c.per_token ? xs[r] : xs[0];
    for (int64_t o = 0; o < OC; ++o) {
      int64_t acc = 0, acc_abs = 0;
      for (int64_t k = 0; k < C; ++k) {
        const int p = int{xc[r * C + k]} * int{wc[o * C + k]};
        acc += p;
        acc_abs += std::abs(p);
      }
      float y = static_cast<float>(static_cast<int32_t>(acc)) * ws[o];
      y = y * x_s;
      if (c.bias) y = y + Bf16ToFloat(bias[o]);
      replica[r * OC + o] = y;
      exact[r * OC + o] = static_cast<double>(acc) * ws[o] * x_s +
                          (c.bias ? Bf16ToFloat(bias[o]) : 0.0);
      abs_sum[r * OC + o] = static_cast<double>(acc_abs) * ws[o] * x_s;
    }
  }

  TestStream stream;
  auto ctx = c.scratch_bytes > 0
                 ? Int8MatmulContext::Create(Int8MatmulContext::kDefaultWorkspaceBytes,
                                             c.scratch_bytes)
                 : Int8MatmulContext::Create();
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  DeviceArray<int8_t> d_x(xc), d_w(wc);
  DeviceArray<float> d_xs(xs), d_ws(ws);
  DeviceArray<bf16> d_bias(bias), out(N * OC);
  QT_ASSERT_OK(matmul_int8_forward_cuda(**ctx, out.get(), d_x.get(), d_xs.get(),
                                        c.per_token ? Int8ActScale::kPerToken
                                                    : Int8ActScale::kPerTensor,
                                        d_w.get(), d_ws.get(), c.bias ? d_bias.get() : nullptr,
                                        c.N, c.C, c.OC, stream.get()));
  ASSERT_TRUE(stream.Sync().ok());
  const std::vector<bf16> got = out.ToHost("out");
  int bad = 0;
  for (int64_t i = 0; i < N * OC && bad < 8; ++i) {
    if (got[i].bits != FloatToBf16(replica[i]).bits) {
      ADD_FAILURE() << "out[" << i / OC << ", " << i % OC << "] = " << Bf16ToFloat(got[i])
                    << ", want bf16(" << replica[i] << ")";
      ++bad;
    }
  }
  // Within one BF16 rounding (and a few fp32 ones) of the exact value.
  std::vector<double> atol(N * OC);
  for (int64_t i = 0; i < N * OC; ++i) atol[i] = 1e-6 * abs_sum[i] + 1e-30;
  testing::ExpectNear(Bf16ToFloat(got), exact, 0, testing::kBf16Eps, "vs exact", &atol);

  // The BF16 fake-quant GEMM on the dequantized operands: its own roundings (each operand to
  // BF16, 2^-9 relative; the product to BF16 before the bias) bound the difference.
  std::vector<bf16> xq(N * C), wq(OC * C);
  for (int64_t i = 0; i < N * C; ++i) {
    xq[i] = FloatToBf16(static_cast<float>(xc[i]) * (c.per_token ? xs[i / C] : xs[0]));
  }
  for (int64_t i = 0; i < OC * C; ++i) wq[i] = FloatToBf16(static_cast<float>(wc[i]) * ws[i / C]);
  auto mm = MatmulContext::Create(EpilogueFusion::kAuto, MatmulContext::kDefaultWorkspaceBytes,
                                  /*autotune=*/false);
  ASSERT_TRUE(mm.ok()) << mm.status();
  DeviceArray<bf16> d_xq(xq), d_wq(wq), fq(N * OC);
  QT_ASSERT_OK(matmul_forward_cuda(**mm, fq.get(), d_xq.get(), d_wq.get(),
                                   c.bias ? d_bias.get() : nullptr, c.N, c.C, c.OC,
                                   stream.get()));
  ASSERT_TRUE(stream.Sync().ok());
  std::vector<double> atol_fq(N * OC);
  for (int64_t i = 0; i < N * OC; ++i) atol_fq[i] = 2.5 * testing::kBf16Eps * abs_sum[i];
  testing::ExpectNear(Bf16ToFloat(got), Bf16ToFloat(fq.ToHost("fake-quant")), 0,
                      2 * testing::kBf16Eps, "vs BF16 fake-quant GEMM", &atol_fq);
}

TEST(MatmulInt8Cuda, MatchesReplicaExactAndFakeQuant) {
  QT_SKIP_WITHOUT_GPU();
  const Case cases[] = {
      {1, 4, 4, 8, 8, true, false, 0},        {37, 64, 12, 4, 8, true, true, 0},
      {37, 64, 12, 8, 8, false, true, 0},     {200, 96, 40, 4, 4, true, true, 48 * 40 * 4 + 12},
      {256, 768, 2304, 4, 8, true, true, 0},  {64, 3072, 768, 8, 8, false, true, 0},
      {130, 1600, 256, 8, 8, true, false, 64 * 256 * 4},
  };
  for (const Case& c : cases) Check(c);
}

TEST(MatmulInt8Cuda, ChunkRows) {
  QT_SKIP_WITHOUT_GPU();
  auto ctx = Int8MatmulContext::Create(0, 100 * 64 * 4);
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  EXPECT_EQ((*ctx)->chunk_rows(64), 96);   // 100 rounded down to a multiple of 16
  EXPECT_EQ((*ctx)->chunk_rows(6400), 1);  // fewer than 16 rows fit
}

// From the quantizers: per-channel 4-bit weight codes and steps, per-token 8-bit activation
// codes and scales; against the fake-quant GEMM on the same quantizers' BF16 outputs.
TEST(MatmulInt8Cuda, EndToEndFromQuantizers) {
  QT_SKIP_WITHOUT_GPU();
  const int N = 96, C = 768, OC = 256;
  const std::vector<float> w = RandomFloats(static_cast<int64_t>(OC) * C, 7, -0.1, 0.1);
  std::vector<float> s(OC, 0.1f / 7);
  const std::vector<bf16> x = ToBf16(RandomFloats(static_cast<int64_t>(N) * C, 8, -2.0, 2.0));
  TestStream stream;
  DeviceArray<float> d_w(w), d_s(s), d_tok(N);
  DeviceArray<bf16> d_x(x), wq(static_cast<int64_t>(OC) * C), xq(static_cast<int64_t>(N) * C);
  DeviceArray<int8_t> wc(static_cast<int64_t>(OC) * C), xc(static_cast<int64_t>(N) * C);
  LsqConfig cfg;
  cfg.bits = 4;
  QT_ASSERT_OK(lsq_weight_forward_cuda(wq.get(), wc.get(), nullptr, d_w.get(), d_s.get(), nullptr,
                                       nullptr, OC, C, cfg, stream.get()));
  ActQuant q;
  q.mode = ActQuantMode::kPerToken;
  q.bits = 8;
  q.token_scales = d_tok.get();
  q.codes = xc.get();
  QT_ASSERT_OK(act_quant_forward_cuda(xq.get(), d_x.get(), N, C, q, stream.get()));
  auto ctx = Int8MatmulContext::Create();
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  DeviceArray<bf16> out(static_cast<int64_t>(N) * OC), fq(static_cast<int64_t>(N) * OC);
  QT_ASSERT_OK(matmul_int8_forward_cuda(**ctx, out.get(), xc.get(), d_tok.get(),
                                        Int8ActScale::kPerToken, wc.get(), d_s.get(), nullptr, N,
                                        C, OC, stream.get()));
  auto mm = MatmulContext::Create(EpilogueFusion::kAuto, MatmulContext::kDefaultWorkspaceBytes,
                                  false);
  ASSERT_TRUE(mm.ok()) << mm.status();
  QT_ASSERT_OK(matmul_forward_cuda(**mm, fq.get(), xq.get(), wq.get(), nullptr, N, C, OC,
                                   stream.get()));
  ASSERT_TRUE(stream.Sync().ok());
  // |x| <= 2, |w| <= 0.1: sum |xq wq| <= 768 * 0.2; relative L2 within a few BF16 roundings.
  const double rel = testing::RelL2(Bf16ToFloat(out.ToHost("int8")), Bf16ToFloat(fq.ToHost("bf16")));
  EXPECT_LT(rel, 4 * testing::kBf16Eps) << "relative L2 INT8 vs BF16 fake-quant GEMM";
  EXPECT_GT(testing::MaxAbs(Bf16ToFloat(out.ToHost("int8"))), 0.1) << "output should not vanish";
}

TEST(MatmulInt8CudaArgs, RejectsShapesCublasLtCannotRun) {
  QT_SKIP_WITHOUT_GPU();
  auto ctx = Int8MatmulContext::Create();
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  DeviceArray<int8_t> c(256);
  DeviceArray<float> f(64);
  DeviceArray<bf16> o(256);
  // C % 4 != 0, OC % 4 != 0, misaligned codes, a null scale: InvalidArgument, nothing launched.
  EXPECT_TRUE(absl::IsInvalidArgument(matmul_int8_forward_cuda(
      **ctx, o.get(), c.get(), f.get(), Int8ActScale::kPerToken, c.get(), f.get(), nullptr, 8, 6,
      8, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(matmul_int8_forward_cuda(
      **ctx, o.get(), c.get(), f.get(), Int8ActScale::kPerToken, c.get(), f.get(), nullptr, 8, 8,
      6, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(matmul_int8_forward_cuda(
      **ctx, o.get(), c.get() + 4, f.get(), Int8ActScale::kPerToken, c.get(), f.get(), nullptr,
      8, 8, 8, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(matmul_int8_forward_cuda(
      **ctx, o.get(), c.get(), nullptr, Int8ActScale::kPerToken, c.get(), f.get(), nullptr, 8, 8,
      8, nullptr)));
}

}  // namespace
}  // namespace qtrain::ops
