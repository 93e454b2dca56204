// Linear in each precision mode: FP8 emulation, QAT with Phi (init = best rank-r fit of the
// quantization error, rank decay to 0, then the pure quantized path), gradients of Phi.
#include "trainer/linear.h"

#include <cmath>
#include <vector>

#include "gtest/gtest.h"
#include "ops/cpu_ops.h"
#include "ops/lowrank.h"
#include "ops/quant/fp16.h"
#include "ops/quant/fp8.h"
#include "ops/quant/lsq.h"
#include "trainer/rng.h"

namespace qtrain {
namespace {

constexpr int C = 24, OC = 20, N = 5;

std::vector<float> Random(int64_t n, uint64_t seed, float sd = 1.0f) {
  Rng rng(seed);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(rng.Normal() * sd);
  return v;
}

struct Fixture {
  ParamStore store;
  Linear lin;
  Fixture(const LinearOptions& o) {
    lin = Linear(&store, "l", C, OC, o);
    store.Finalize();
    std::vector<float> w = Random(OC * C, 1, 0.5f), b = Random(OC, 2, 0.1f);
    std::copy(w.begin(), w.end(), store.param(lin.weight_index()));
    std::copy(b.begin(), b.end(), store.param(lin.bias_index()));
  }
};

LinearOptions QatOptions4(bool phi, int rank = 8, int period = 0) {
  LinearOptions o;
  o.mode = LinearMode::kQat;
  o.qat.weight_bits = 4;
  o.qat.act = ActQuant::kNone;
  o.phi.enabled = phi;
  o.phi.rank = rank;
  o.phi.decay_period = period;
  return o;
}

TEST(Linear, PhiInitIsBestRankRFitOfQuantizationError) {
  Fixture f(QatOptions4(true, 8));
  ASSERT_TRUE(f.lin.InitQuantizers().ok());
  EXPECT_EQ(f.lin.phi_rank(), 8);
  std::vector<float> qw, eff;
  ASSERT_TRUE(f.lin.EffectiveWeight(&qw, /*fold_phi=*/false).ok());
  ASSERT_TRUE(f.lin.EffectiveWeight(&eff, /*fold_phi=*/true).ok());
  const float* w = f.store.param(f.lin.weight_index());
  std::vector<float> err(OC * C), L(OC * 8), R(8 * C);
  double resid = 0;
  for (int i = 0; i < OC * C; ++i) {
    err[i] = w[i] - qw[i];
    resid += double(w[i] - eff[i]) * (w[i] - eff[i]);
  }
  std::vector<double> sv;
  ops::lowrank_factorize(L.data(), R.data(), err.data(), OC, C, 8, 8, &sv);
  double tail = 0;
  for (size_t i = 8; i < sv.size(); ++i) tail += sv[i] * sv[i];
  // Eckart-Young: the residual of Q(W) + L R is exactly the discarded spectrum.
  EXPECT_NEAR(resid, tail, 1e-4 * tail);
  EXPECT_GT(sv[0], 0.0);
}

TEST(Linear, RankDecayHalvesEachPeriodThenPhiIsGone) {
  const int T = 4;
  Fixture f(QatOptions4(true, 8, T));
  ASSERT_TRUE(f.lin.InitQuantizers().ok());
  std::vector<int> expected_rank = {8, 4, 2, 1, 0, 0};
  for (int step = 0; step < 6 * T; ++step) {
    std::vector<int> reset;
    f.lin.ApplyRankSchedule(step, &reset);
    const int period = step / T;
    EXPECT_EQ(f.lin.phi_rank(), expected_rank[period]) << "step " << step;
    // A re-factorisation happens exactly at the first step of periods 1..4.
    EXPECT_EQ(!reset.empty(), step % T == 0 && period >= 1 && period <= 4) << "step " << step;
    const std::vector<float>& gamma = f.store.buffer(f.store.num_buffers() - 1);
    const int k = f.lin.phi_rank();
    const float u = 0.5f * (1 + std::cos(float(M_PI) * (step % T) / T));
    for (int j = 0; j < 8; ++j) {
      const float want = j < k / 2 ? 1.0f : (j < k ? u : 0.0f);
      EXPECT_FLOAT_EQ(gamma[j], want) << "step " << step << " component " << j;
    }
  }
  // Rank 0: the output is exactly the quantized path Q(x) Q(W)^T + b.
  std::vector<float> x = Random(N * C, 3), out(N * OC), ref(N * OC), qw;
  ASSERT_TRUE(f.lin.Forward(out.data(), x.data(), N, true).ok());
  ASSERT_TRUE(f.lin.EffectiveWeight(&qw, true).ok());
  ops::matmul_forward(ref.data(), x.data(), qw.data(), f.store.param(f.lin.bias_index()), N, C, OC);
  for (int i = 0; i < N * OC; ++i) EXPECT_EQ(out[i], ref[i]) << i;
}

TEST(Linear, RefactorisationKeepsTheTopHalfProduct) {
  Fixture f(QatOptions4(true, 8, 2));
  ASSERT_TRUE(f.lin.InitQuantizers().ok());
  std::vector<int> reset;
  f.lin.ApplyRankSchedule(0, &reset);
  // Expected after the period: L[:, :4] R[:4, :].
  const float* L = f.store.param(f.lin.weight_index() + 3);  // weight, bias, w_scale, phi_l
  const float* R = f.store.param(f.lin.weight_index() + 4);
  std::vector<double> want(OC * C, 0.0);
  for (int o = 0; o < OC; ++o)
    for (int j = 0; j < 4; ++j)
      for (int c = 0; c < C; ++c) want[o * C + c] += double(L[o * 8 + j]) * R[j * C + c];
  f.lin.ApplyRankSchedule(2, &reset);
  ASSERT_EQ(f.lin.phi_rank(), 4);
  for (int o = 0; o < OC; ++o)
    for (int c = 0; c < C; ++c) {
      double got = 0;
      for (int j = 0; j < 4; ++j) got += double(L[o * 8 + j]) * R[j * C + c];
      EXPECT_NEAR(got, want[o * C + c], 1e-5);
    }
  for (int o = 0; o < OC; ++o)
    for (int j = 4; j < 8; ++j) EXPECT_EQ(L[o * 8 + j], 0.0f);
}

// d(sum(dout * out))/d(L, R) against central differences (Phi is smooth in L and R).
TEST(Linear, PhiGradientsMatchFiniteDifferences) {
  Fixture f(QatOptions4(true, 4));
  ASSERT_TRUE(f.lin.InitQuantizers().ok());
  const int l_idx = f.lin.weight_index() + 3, r_idx = f.lin.weight_index() + 4;
  ASSERT_EQ(f.store.info(l_idx).name, "l.phi_l");
  ASSERT_EQ(f.store.info(r_idx).name, "l.phi_r");
  // Larger factors so the Phi term stands above float noise.
  for (int idx : {l_idx, r_idx})
    for (int64_t i = 0; i < f.store.info(idx).size; ++i) f.store.param(idx)[i] *= 5;
  std::vector<float> x = Random(N * C, 4), dout = Random(N * OC, 5), out(N * OC), dx(N * C, 0);
  f.store.ZeroGrads();
  ASSERT_TRUE(f.lin.Forward(out.data(), x.data(), N, true).ok());
  ASSERT_TRUE(f.lin.Backward(dx.data(), dout.data(), x.data(), N, true).ok());
  auto objective = [&]() {
    std::vector<float> o(N * OC);
    EXPECT_TRUE(f.lin.Forward(o.data(), x.data(), N, false).ok());
    double s = 0;
    for (int i = 0; i < N * OC; ++i) s += double(o[i]) * dout[i];
    return s;
  };
  for (int idx : {l_idx, r_idx}) {
    for (int64_t i = 0; i < f.store.info(idx).size; i += 7) {
      float* p = f.store.param(idx) + i;
      const float orig = *p, h = 1e-2f;
      *p = orig + h;
      const double up = objective();
      *p = orig - h;
      const double down = objective();
      *p = orig;
      const double fd = (up - down) / (2 * h);
      EXPECT_NEAR(f.store.grad(idx)[i], fd, 2e-3 + 1e-3 * std::fabs(fd)) << f.store.info(idx).name << "[" << i << "]";
    }
  }
}

TEST(Linear, Fp8CurrentScalingUsesFp8OperandsInAllThreeGemms) {
  LinearOptions o;
  o.mode = LinearMode::kFp8;
  o.fp8.recipe = Fp8Recipe::kCurrent;
  Fixture f(o);
  std::vector<float> x = Random(N * C, 6, 3.0f), out(N * OC), ref(N * OC);
  ASSERT_TRUE(f.lin.Forward(out.data(), x.data(), N, true).ok());
  const float* w = f.store.param(f.lin.weight_index());
  std::vector<float> xq(N * C), wq(OC * C);
  const float sx = ops::fp8_current_scale(ops::amax(x.data(), N * C), ops::Fp8Format::kE4M3);
  const float sw = ops::fp8_current_scale(ops::amax(w, OC * C), ops::Fp8Format::kE4M3);
  ASSERT_TRUE(ops::fp8_quantize_dequantize(xq.data(), x.data(), N * C, sx, ops::Fp8Format::kE4M3).ok());
  ASSERT_TRUE(ops::fp8_quantize_dequantize(wq.data(), w, OC * C, sw, ops::Fp8Format::kE4M3).ok());
  ops::matmul_forward(ref.data(), xq.data(), wq.data(), f.store.param(f.lin.bias_index()), N, C, OC);
  for (int i = 0; i < N * OC; ++i) ASSERT_EQ(out[i], ref[i]) << i;
  // Backward: dgrad and wgrad from the E5M2 gradient and the E4M3 operands.
  std::vector<float> dout = Random(N * OC, 7, 1e-3f), dx(N * C, 0), dxr(N * C, 0), dwr(OC * C, 0);
  f.store.ZeroGrads();
  ASSERT_TRUE(f.lin.Backward(dx.data(), dout.data(), x.data(), N, true).ok());
  std::vector<float> gq(N * OC);
  const float sg = ops::fp8_current_scale(ops::amax(dout.data(), N * OC), ops::Fp8Format::kE5M2);
  ASSERT_TRUE(ops::fp8_quantize_dequantize(gq.data(), dout.data(), N * OC, sg, ops::Fp8Format::kE5M2).ok());
  int differ = 0;
  for (int i = 0; i < N * OC; ++i) differ += gq[i] != dout[i];
  EXPECT_GT(differ, 0) << "E5M2 rounding should change some gradients";
  ops::matmul_backward(dxr.data(), dwr.data(), static_cast<float*>(nullptr), gq.data(), xq.data(),
                       wq.data(), N, C, OC);
  for (int i = 0; i < N * C; ++i) ASSERT_EQ(dx[i], dxr[i]) << i;
  for (int i = 0; i < OC * C; ++i) ASSERT_EQ(f.store.grad(f.lin.weight_index())[i], dwr[i]) << i;
}

// The block recipe against the CPU block reference, on shapes with several tiles and partial
// ones: forward x in 1x128 tiles along C and W in 128x128 blocks; dgrad dy in 1x128 tiles along
// OC; wgrad dy^T and x^T in 1x128 tiles along N. Bit-exact (the same CPU ops).
TEST(Linear, Fp8BlockScalingUsesTilesAndBlocksInAllThreeGemms) {
  const int bn = 130, bc = 300, boc = 140;
  LinearOptions o;
  o.mode = LinearMode::kFp8;
  o.fp8.recipe = Fp8Recipe::kBlock;
  ParamStore store;
  Linear lin(&store, "l", bc, boc, o);
  store.Finalize();
  std::vector<float> w = Random(boc * bc, 11, 0.05f), b = Random(boc, 12, 0.1f);
  w[7] = 3.0f;  // one block with a large amax, so the 128x128 scales differ
  std::copy(w.begin(), w.end(), store.param(lin.weight_index()));
  std::copy(b.begin(), b.end(), store.param(lin.bias_index()));
  std::vector<float> x = Random(bn * bc, 13, 2.0f), out(bn * boc), ref(bn * boc);
  x[5] = 300.f;  // one tile with an outlier
  ASSERT_TRUE(lin.Forward(out.data(), x.data(), bn, true).ok());
  const auto fake = [](const std::vector<float>& in, int64_t rows, int64_t cols, bool blocks) {
    std::vector<uint8_t> codes(rows * cols);
    const int64_t ld = blocks ? ops::fp8_block_scale_ld(cols) : 0;
    std::vector<float> si(blocks ? ops::fp8_num_blocks(rows) * ld : ops::fp8_num_blocks(cols) * rows);
    std::vector<float> q(rows * cols);
    EXPECT_TRUE((blocks ? ops::fp8_quantize_128x128(codes.data(), si.data(), ld, in.data(), rows,
                                                    cols, ops::Fp8Format::kE4M3)
                        : ops::fp8_quantize_1x128(codes.data(), si.data(), in.data(), rows, cols,
                                                  ops::Fp8Format::kE4M3))
                    .ok());
    EXPECT_TRUE(ops::fp8_dequantize_blocks(q.data(), codes.data(), si.data(), ld, rows, cols,
                                           ops::Fp8Format::kE4M3)
                    .ok());
    return q;
  };
  const auto transpose = [](const std::vector<float>& a, int64_t rows, int64_t cols) {
    std::vector<float> t(a.size());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = a[r * cols + c];
    return t;
  };
  const std::vector<float> xq = fake(x, bn, bc, false), wq = fake(w, boc, bc, true);
  ops::matmul_forward(ref.data(), xq.data(), wq.data(), b.data(), bn, bc, boc);
  for (int i = 0; i < bn * boc; ++i) ASSERT_EQ(out[i], ref[i]) << i;
  // The tiles matter: per-tensor E4M3 scaling of the same x gives other values.
  std::vector<float> xt_q(bn * bc);
  const float st = ops::fp8_current_scale(ops::amax(x.data(), bn * bc), ops::Fp8Format::kE4M3);
  ASSERT_TRUE(ops::fp8_quantize_dequantize(xt_q.data(), x.data(), bn * bc, st, ops::Fp8Format::kE4M3).ok());
  EXPECT_NE(xt_q, xq);

  std::vector<float> dout = Random(bn * boc, 14, 1e-3f), dx(bn * bc, 0), dxr(bn * bc, 0),
                     dwr(boc * bc, 0), dbr(boc, 0);
  store.ZeroGrads();
  ASSERT_TRUE(lin.Backward(dx.data(), dout.data(), x.data(), bn, true).ok());
  const std::vector<float> gq = fake(dout, bn, boc, false);
  ops::matmul_backward(dxr.data(), static_cast<float*>(nullptr), static_cast<float*>(nullptr),
                       gq.data(), xq.data(), wq.data(), bn, bc, boc);
  const std::vector<float> gw = transpose(fake(transpose(dout, bn, boc), boc, bn, false), boc, bn);
  const std::vector<float> xw = transpose(fake(transpose(x, bn, bc), bc, bn, false), bc, bn);
  ops::matmul_backward(static_cast<float*>(nullptr), dwr.data(), static_cast<float*>(nullptr),
                       gw.data(), xw.data(), wq.data(), bn, bc, boc);
  for (int i = 0; i < bn; ++i)
    for (int k = 0; k < boc; ++k) dbr[k] += dout[int64_t{i} * boc + k];
  for (int i = 0; i < bn * bc; ++i) ASSERT_EQ(dx[i], dxr[i]) << "dinp " << i;
  for (int i = 0; i < boc * bc; ++i) ASSERT_EQ(store.grad(lin.weight_index())[i], dwr[i]) << "dW " << i;
  for (int i = 0; i < boc; ++i) ASSERT_EQ(store.grad(lin.bias_index())[i], dbr[i]) << "db " << i;
  EXPECT_NE(xw, xq) << "wgrad must use x's 128x1 tiles, not the forward's 1x128 ones";
}

TEST(Linear, Fp8DelayedScalingUsesHistoryAndSurvivesSaveRestore) {
  LinearOptions o;
  o.mode = LinearMode::kFp8;
  o.fp8.recipe = Fp8Recipe::kDelayed;
  o.fp8.history_len = 3;
  Fixture f(o);
  std::vector<float> x = Random(N * C, 8, 100.0f), out(N * OC), out2(N * OC);
  // First step: scale 1 (no history yet); 100-sigma inputs saturate E4M3's 448 at scale 1.
  ASSERT_TRUE(f.lin.Forward(out.data(), x.data(), N, true).ok());
  ASSERT_TRUE(f.lin.Forward(out2.data(), x.data(), N, true).ok());
  int changed = 0;
  for (int i = 0; i < N * OC; ++i) changed += out[i] != out2[i];
  EXPECT_GT(changed, 0) << "the second step should use the scale from the first step's amax";
  f.lin.SaveStateToBuffers();
  ParamStore store2;
  Linear lin2(&store2, "l", C, OC, o);
  store2.Finalize();
  store2.params() = f.store.params();
  for (int i = 0; i < f.store.num_buffers(); ++i) store2.buffer(i) = f.store.buffer(i);
  ASSERT_TRUE(lin2.RestoreStateFromBuffers().ok());
  std::vector<float> a(N * OC), b(N * OC);
  ASSERT_TRUE(f.lin.Forward(a.data(), x.data(), N, true).ok());
  ASSERT_TRUE(lin2.Forward(b.data(), x.data(), N, true).ok());
  EXPECT_EQ(a, b);
}

TEST(Linear, QatRequiresInit) {
  Fixture f(QatOptions4(false));
  std::vector<float> x = Random(N * C, 9), out(N * OC);
  absl::Status s = f.lin.Forward(out.data(), x.data(), N, true);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("l:"), std::string::npos) << s;
}

}  // namespace
}  // namespace qtrain

namespace qtrain {
namespace {

// qat.fp16_scales: the forward quantizes with the fp16 roundings of the learned steps and zero
// points (so a GGUF block stores them exactly), the gradient reaches the fp32 parameters
// (straight-through), and those keep changes smaller than an fp16 ulp.
TEST(Linear, Fp16ScalesQuantizeWithFp16StepsAndKeepFp32Masters) {
  for (bool asym : {false, true}) {
    SCOPED_TRACE(asym ? "LSQ+" : "LSQ");
    LinearOptions o = QatOptions4(false);
    o.qat.weight_granularity = ops::QuantGranularity::kPerGroup;
    o.qat.group_size = 8;
    o.qat.weight_asymmetric = asym;
    o.qat.fp16_scales = true;
    Fixture f(o);
    ASSERT_TRUE(f.lin.InitQuantizers().ok());
    float* s = f.store.param(f.lin.w_scale_index());
    const int64_t ns = f.store.info(f.lin.w_scale_index()).size;
    ASSERT_EQ(ns, OC * C / 8);
    // Steps that fp16 cannot hold: a third of an ulp above an fp16 value.
    for (int64_t i = 0; i < ns; ++i) s[i] = ops::round_to_fp16(s[i]) * (1 + 1.0f / 3 / 1024);
    std::vector<float> steps, zeros;
    ASSERT_TRUE(f.lin.WeightSteps(&steps, &zeros).ok());
    EXPECT_EQ(zeros.empty(), !asym);
    for (int64_t i = 0; i < ns; ++i) {
      ASSERT_EQ(steps[i], ops::round_to_fp16(s[i])) << i;
      ASSERT_NE(steps[i], s[i]) << i;  // the master is not rounded
      if (asym) ASSERT_EQ(zeros[i], ops::round_to_fp16(f.store.param(f.lin.w_zero_index())[i]));
    }
    // Q(W) is codes * fp16 step (+ fp16 zero point), bit for bit.
    std::vector<float> qw, deq(OC * C);
    std::vector<int32_t> codes;
    ASSERT_TRUE(f.lin.EffectiveWeight(&qw, false).ok());
    ASSERT_TRUE(f.lin.WeightCodes(&codes, false).ok());
    ASSERT_TRUE(ops::lsq_dequantize(deq.data(), codes.data(), steps.data(),
                                    asym ? zeros.data() : nullptr, OC, C,
                                    f.lin.weight_lsq_config())
                    .ok());
    EXPECT_EQ(qw, deq);
    // The gradient reaches the fp32 steps.
    std::vector<float> x = Random(N * C, 4), y(N * OC), dy = Random(N * OC, 5), dx(N * C, 0.0f);
    f.store.ZeroGrads();
    ASSERT_TRUE(f.lin.Forward(y.data(), x.data(), N, true).ok());
    ASSERT_TRUE(f.lin.Backward(dx.data(), dy.data(), x.data(), N, true).ok());
    double g = 0;
    for (int64_t i = 0; i < ns; ++i) g += std::abs(f.store.grad(f.lin.w_scale_index())[i]);
    EXPECT_GT(g, 0);
    // A change below half an ulp moves the master only; repeated, it moves the step.
    const float before = steps[0];
    const float ulp = ops::round_to_fp16(before * (1 + 1.0f / 1024)) - before;
    s[0] = before;
    for (int k = 0; k < 4; ++k) {
      s[0] += ulp / 5;
      ASSERT_TRUE(f.lin.WeightSteps(&steps, nullptr).ok());
      if (k == 0) EXPECT_EQ(steps[0], before);
    }
    EXPECT_GT(steps[0], before);
  }
}

}  // namespace
}  // namespace qtrain
