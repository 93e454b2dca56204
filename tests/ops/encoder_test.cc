// Tests of the token + position embedding: hand values, gradients against finite differences,
// accumulate semantics, float vs double.
#include "ops/encoder.h"

#include <vector>

#include "gtest/gtest.h"
#include "tests/ops/grad_check.h"

namespace qtrain::ops {
namespace {

using testing::Dot;
using testing::ExpectAllNear;
using testing::ExpectGradNear;
using testing::NumericGrad;
using testing::RandomTokens;
using testing::RandomVector;
using testing::ToFloat;

constexpr int B = 2, T = 5, C = 7, V = 11, kMaxT = 6;

TEST(EncoderTest, ForwardAddsTokenAndPositionRows) {
  const std::vector<int32_t> inp = {2, 0, 2};  // B=1, T=3
  std::vector<double> wte(3 * 2), wpe(4 * 2);
  for (int i = 0; i < 6; ++i) wte[i] = 10 * i;
  for (int i = 0; i < 8; ++i) wpe[i] = i;
  std::vector<double> out(3 * 2, -1);
  encoder_forward(out.data(), inp.data(), wte.data(), wpe.data(), 1, 3, 2);
  EXPECT_EQ(out, (std::vector<double>{40 + 0, 50 + 1, 0 + 2, 10 + 3, 40 + 4, 50 + 5}));
}

TEST(EncoderTest, BackwardMatchesFiniteDifferences) {
  std::vector<int32_t> inp = RandomTokens(B * T, V, 1);
  inp[7] = inp[1];  // a repeated token must receive the sum of both gradients
  std::vector<double> wte = RandomVector(V * C, 2);
  std::vector<double> wpe = RandomVector(kMaxT * C, 3);
  const std::vector<double> dout = RandomVector(B * T * C, 4);
  std::vector<double> out(B * T * C);
  auto loss = [&] {
    encoder_forward(out.data(), inp.data(), wte.data(), wpe.data(), B, T, C);
    return Dot(dout, out);
  };
  std::vector<double> dwte(V * C, 0.0), dwpe(kMaxT * C, 0.0);
  encoder_backward(dwte.data(), dwpe.data(), dout.data(), inp.data(), B, T, C);
  ExpectGradNear(dwte, NumericGrad(wte, loss), "dwte");
  ExpectGradNear(dwpe, NumericGrad(wpe, loss), "dwpe");
  for (int c = 0; c < C; ++c) EXPECT_EQ(dwpe[T * C + c], 0.0) << "positions >= T untouched";
}

TEST(EncoderTest, BackwardAccumulates) {
  const std::vector<int32_t> inp = RandomTokens(B * T, V, 5);
  const std::vector<double> dout = RandomVector(B * T * C, 6);
  std::vector<double> once_wte(V * C, 0.0), once_wpe(kMaxT * C, 0.0);
  encoder_backward(once_wte.data(), once_wpe.data(), dout.data(), inp.data(), B, T, C);
  std::vector<double> twice_wte(V * C, 0.0), twice_wpe(kMaxT * C, 0.0);
  encoder_backward(twice_wte.data(), twice_wpe.data(), dout.data(), inp.data(), B, T, C);
  encoder_backward(twice_wte.data(), twice_wpe.data(), dout.data(), inp.data(), B, T, C);
  for (size_t i = 0; i < once_wte.size(); ++i) EXPECT_DOUBLE_EQ(twice_wte[i], 2 * once_wte[i]);
  for (size_t i = 0; i < once_wpe.size(); ++i) EXPECT_DOUBLE_EQ(twice_wpe[i], 2 * once_wpe[i]);
}

TEST(EncoderTest, FloatMatchesDouble) {
  const std::vector<int32_t> inp = RandomTokens(B * T, V, 7);
  const std::vector<double> wte = RandomVector(V * C, 8), wpe = RandomVector(kMaxT * C, 9);
  std::vector<double> out_d(B * T * C);
  encoder_forward(out_d.data(), inp.data(), wte.data(), wpe.data(), B, T, C);
  const std::vector<float> wte_f = ToFloat(wte), wpe_f = ToFloat(wpe);
  std::vector<float> out_f(B * T * C);
  encoder_forward(out_f.data(), inp.data(), wte_f.data(), wpe_f.data(), B, T, C);
  ExpectAllNear(out_f, out_d, 1e-6, 1e-6, "out");
}

}  // namespace
}  // namespace qtrain::ops
