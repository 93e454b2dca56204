// GPU parity of the CUDA token + position embedding against the CPU reference (ops/encoder.h):
// forward bit-exact (one fp32 add of two BF16 values, rounded once, on both sides), backward
// within fp32 summation-order tolerance and bit-identical across runs, both access branches,
// bad tokens. Tagged "gpu".
#include "ops/cuda/encoder_cuda.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "ops/encoder.h"
#include "tests/ops/cuda_test_util.h"
#include "tests/ops/grad_check.h"

namespace qtrain::ops {
namespace {

using testing::DeviceArray;
using testing::RandomBf16;
using testing::RandomFloats;

struct Shape {
  int B, T, C, V;
  int offset;  // elements by which every bf16 array is shifted off 16-byte alignment
};

// Vec8 branch (C % 8 == 0, aligned), scalar branch (odd C, or shifted pointers), one token
// vocabulary (every position collides), GPT-2-sized rows.
const Shape kShapes[] = {{1, 1, 1, 1, 0},    {2, 7, 8, 5, 0},     {3, 17, 13, 50, 0},
                         {2, 33, 24, 1, 0},  {2, 9, 16, 11, 1},   {4, 64, 768, 8192, 0},
                         {1, 300, 40, 7, 0}};

TEST(EncoderCudaTest, RejectsBadArguments) {
  bf16 b{};
  int32_t tok = 0;
  absl::Status s = encoder_forward_cuda(&b, &tok, &b, &b, 0, 1, 1, 1, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("B=0"), absl::string_view::npos) << s;
  EXPECT_EQ(encoder_forward_cuda(&b, nullptr, &b, &b, 1, 1, 1, 1, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  float f = 0;
  s = encoder_backward_cuda(&f, &f, &b, &tok, 1, 1, 1, 1, nullptr, 0, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("workspace"), absl::string_view::npos) << s;
}

TEST(EncoderCudaTest, ForwardIsBitExact) {
  QT_SKIP_WITHOUT_GPU();
  for (const Shape& sh : kShapes) {
    SCOPED_TRACE(::testing::Message() << "B=" << sh.B << " T=" << sh.T << " C=" << sh.C
                                    << " V=" << sh.V << " offset=" << sh.offset);
    const int64_t N = static_cast<int64_t>(sh.B) * sh.T;
    const auto wte = RandomBf16(static_cast<int64_t>(sh.V) * sh.C, 1);
    const auto wpe = RandomBf16(static_cast<int64_t>(sh.T) * sh.C, 2);
    const std::vector<int32_t> tokens = ops::testing::RandomTokens(N, sh.V, 3);
    std::vector<float> ref(N * sh.C);
    encoder_forward(ref.data(), tokens.data(), wte.values.data(), wpe.values.data(), sh.B, sh.T,
                    sh.C);
    DeviceArray<bf16> d_out(N * sh.C, sh.offset), d_wte(wte.bits, sh.offset),
        d_wpe(wpe.bits, sh.offset);
    DeviceArray<int32_t> d_tok(tokens);
    QT_ASSERT_OK(encoder_forward_cuda(d_out.get(), d_tok.get(), d_wte.get(), d_wpe.get(), sh.B,
                                      sh.T, sh.C, sh.V, nullptr));
    QT_ASSERT_OK(SynchronizeDevice());
    const std::vector<bf16> got = d_out.ToHost("out");
    int mismatches = 0;
    for (int64_t i = 0; i < N * sh.C; ++i) {
      if (got[i].bits != FloatToBf16(ref[i]).bits && mismatches++ < 5) {
        ADD_FAILURE() << "out[" << i << "]: gpu " << Bf16ToFloat(got[i]) << " cpu " << ref[i];
      }
    }
    EXPECT_EQ(mismatches, 0);
  }
}

TEST(EncoderCudaTest, ForwardGivesNanRowsForBadTokens) {
  QT_SKIP_WITHOUT_GPU();
  const int B = 1, T = 4, C = 16, V = 10;
  const auto wte = RandomBf16(V * C, 4), wpe = RandomBf16(T * C, 5);
  const std::vector<int32_t> tokens = {3, -1, 10, 9};
  DeviceArray<bf16> d_out(B * T * C), d_wte(wte.bits), d_wpe(wpe.bits);
  DeviceArray<int32_t> d_tok(tokens);
  QT_ASSERT_OK(encoder_forward_cuda(d_out.get(), d_tok.get(), d_wte.get(), d_wpe.get(), B, T, C,
                                    V, nullptr));
  const std::vector<float> got = Bf16ToFloat(d_out.ToHost("out"));
  for (int t = 0; t < T; ++t) {
    const bool bad = tokens[t] < 0 || tokens[t] >= V;
    for (int c = 0; c < C; ++c) {
      EXPECT_EQ(std::isnan(got[t * C + c]), bad) << "t=" << t << " c=" << c;
    }
  }
}

TEST(EncoderCudaTest, BackwardAccumulatesLikeCpuAndIsDeterministic) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  for (const Shape& sh : kShapes) {
    SCOPED_TRACE(::testing::Message() << "B=" << sh.B << " T=" << sh.T << " C=" << sh.C
                                    << " V=" << sh.V);
    const int64_t N = static_cast<int64_t>(sh.B) * sh.T;
    const auto dout = RandomBf16(N * sh.C, 6);
    std::vector<int32_t> tokens = ops::testing::RandomTokens(N, sh.V, 7);
    // Heavy repetition: a third of the positions share token 0 (long runs in the sort).
    for (int64_t i = 0; i < N; i += 3) tokens[i] = 0;
    const std::vector<float> dwte0 = RandomFloats(static_cast<int64_t>(sh.V) * sh.C, 8);
    const std::vector<float> dwpe0 = RandomFloats(static_cast<int64_t>(sh.T) * sh.C, 9);
    std::vector<float> dwte_ref = dwte0, dwpe_ref = dwpe0;
    encoder_backward(dwte_ref.data(), dwpe_ref.data(), dout.values.data(), tokens.data(), sh.B,
                     sh.T, sh.C);
    // Tolerance: the number of terms per token row / position row times fp32 roundoff.
    std::vector<int> count(sh.V, 0);
    for (int32_t t : tokens) ++count[t];
    std::vector<double> atol_wte(dwte_ref.size());
    for (size_t i = 0; i < atol_wte.size(); ++i) atol_wte[i] = 1e-6 * (count[i / sh.C] + 1);

    absl::StatusOr<int64_t> ws_bytes = encoder_backward_cuda_workspace_bytes(sh.B, sh.T, sh.V);
    ASSERT_TRUE(ws_bytes.ok()) << ws_bytes.status();
    DeviceArray<unsigned char> ws(*ws_bytes);
    DeviceArray<bf16> d_dout(dout.bits);
    DeviceArray<int32_t> d_tok(tokens);
    std::vector<float> first_wte, first_wpe;
    for (int run = 0; run < 2; ++run) {
      DeviceArray<float> d_dwte(dwte0), d_dwpe(dwpe0);
      QT_ASSERT_OK(encoder_backward_cuda(d_dwte.get(), d_dwpe.get(), d_dout.get(), d_tok.get(),
                                         sh.B, sh.T, sh.C, sh.V, ws.get(), *ws_bytes,
                                         stream.get()));
      QT_ASSERT_OK(stream.Sync());
      const std::vector<float> got_wte = d_dwte.ToHost("dwte");
      const std::vector<float> got_wpe = d_dwpe.ToHost("dwpe");
      if (run == 0) {
        testing::ExpectNear(got_wte, dwte_ref, 0, 1e-6, "dwte", &atol_wte);
        testing::ExpectNear(got_wpe, dwpe_ref, 1e-6 * (sh.B + 1), 1e-6, "dwpe");
        first_wte = got_wte;
        first_wpe = got_wpe;
      } else {
        testing::ExpectBitwiseEqual(got_wte, first_wte, "dwte run 2 vs run 1");
        testing::ExpectBitwiseEqual(got_wpe, first_wpe, "dwpe run 2 vs run 1");
      }
    }
  }
}

// BF16 gradients: the fp32 path's sums added to the BF16 start in fp32 and rounded once, so
// every element is within one BF16 rounding of bf16(float(start) + fp32 increment).
TEST(EncoderCudaTest, Bf16GradientsAreTheFp32SumsRoundedOnce) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  for (const Shape& sh : kShapes) {
    SCOPED_TRACE(::testing::Message() << "B=" << sh.B << " T=" << sh.T << " C=" << sh.C
                                    << " V=" << sh.V);
    const int64_t N = static_cast<int64_t>(sh.B) * sh.T;
    const int64_t nwte = static_cast<int64_t>(sh.V) * sh.C, nwpe = static_cast<int64_t>(sh.T) * sh.C;
    const auto dout = RandomBf16(N * sh.C, 16);
    const std::vector<int32_t> tokens = ops::testing::RandomTokens(N, sh.V, 17);
    const auto wte0 = RandomBf16(nwte, 18), wpe0 = RandomBf16(nwpe, 19);
    absl::StatusOr<int64_t> ws_bytes = encoder_backward_cuda_workspace_bytes(sh.B, sh.T, sh.V);
    ASSERT_TRUE(ws_bytes.ok()) << ws_bytes.status();
    DeviceArray<unsigned char> ws(*ws_bytes);
    DeviceArray<bf16> d_dout(dout.bits);
    DeviceArray<int32_t> d_tok(tokens);
    DeviceArray<float> f_wte(wte0.values), f_wpe(wpe0.values);
    DeviceArray<bf16> b_wte(wte0.bits), b_wpe(wpe0.bits);
    QT_ASSERT_OK(encoder_backward_cuda(f_wte.get(), f_wpe.get(), d_dout.get(), d_tok.get(), sh.B,
                                       sh.T, sh.C, sh.V, ws.get(), *ws_bytes, stream.get()));
    QT_ASSERT_OK(encoder_backward_cuda(b_wte.get(), b_wpe.get(), d_dout.get(), d_tok.get(), sh.B,
                                       sh.T, sh.C, sh.V, ws.get(), *ws_bytes, stream.get()));
    QT_ASSERT_OK(stream.Sync());
    // The same fp32 sums in the same order: the BF16 result is exactly the fp32 one rounded.
    const std::vector<float> fw = f_wte.ToHost("wte32"), fp = f_wpe.ToHost("wpe32");
    const std::vector<bf16> bw = b_wte.ToHost("wte16"), bp = b_wpe.ToHost("wpe16");
    for (int64_t i = 0; i < nwte; ++i) {
      ASSERT_EQ(bw[i].bits, FloatToBf16(fw[i]).bits) << "dwte[" << i << "]";
    }
    for (int64_t i = 0; i < nwpe; ++i) {
      ASSERT_EQ(bp[i].bits, FloatToBf16(fp[i]).bits) << "dwpe[" << i << "]";
    }
  }
}

TEST(EncoderCudaTest, BackwardSkipsBadTokens) {
  QT_SKIP_WITHOUT_GPU();
  const int B = 2, T = 3, C = 8, V = 4;
  const auto dout = RandomBf16(B * T * C, 10);
  const std::vector<int32_t> tokens = {1, -5, 3, 4, 1, 0};  // -5 and 4 are out of range
  std::vector<float> dwte_ref(V * C, 0.f), dwpe_ref(T * C, 0.f);
  for (int i = 0; i < B * T; ++i) {
    for (int c = 0; c < C; ++c) {
      const float d = dout.values[i * C + c];
      if (tokens[i] >= 0 && tokens[i] < V) dwte_ref[tokens[i] * C + c] += d;
      dwpe_ref[(i % T) * C + c] += d;  // the position gradient does not depend on the token
    }
  }
  absl::StatusOr<int64_t> ws_bytes = encoder_backward_cuda_workspace_bytes(B, T, V);
  ASSERT_TRUE(ws_bytes.ok()) << ws_bytes.status();
  DeviceArray<unsigned char> ws(*ws_bytes);
  DeviceArray<bf16> d_dout(dout.bits);
  DeviceArray<int32_t> d_tok(tokens);
  DeviceArray<float> d_dwte(std::vector<float>(V * C, 0.f)), d_dwpe(std::vector<float>(T * C, 0.f));
  QT_ASSERT_OK(encoder_backward_cuda(d_dwte.get(), d_dwpe.get(), d_dout.get(), d_tok.get(), B, T,
                                     C, V, ws.get(), *ws_bytes, nullptr));
  QT_ASSERT_OK(SynchronizeDevice());
  testing::ExpectNear(d_dwte.ToHost("dwte"), dwte_ref, 1e-6, 1e-6, "dwte");
  testing::ExpectNear(d_dwpe.ToHost("dwpe"), dwpe_ref, 1e-6, 1e-6, "dwpe");
}

TEST(EncoderCudaTest, BackwardRejectsSmallWorkspace) {
  QT_SKIP_WITHOUT_GPU();
  absl::StatusOr<int64_t> need = encoder_backward_cuda_workspace_bytes(2, 8, 100);
  ASSERT_TRUE(need.ok()) << need.status();
  DeviceArray<unsigned char> ws(*need);
  float f = 0;
  bf16 b{};
  int32_t tok = 0;
  const absl::Status s =
      encoder_backward_cuda(&f, &f, &b, &tok, 2, 8, 4, 100, ws.get(), *need - 1, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("needs"), absl::string_view::npos) << s;
}

}  // namespace
}  // namespace qtrain::ops
