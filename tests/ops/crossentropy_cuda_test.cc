// GPU parity of the fused softmax cross-entropy and the tied LM head against the CPU reference
// (ops/crossentropy.h): the softmax kernel on given BF16 logits against float64 (both access
// branches, vocabularies from 7 to GPT-2's), the in-place dlogits, bad targets, the
// deterministic mean, and the whole head (GEMMs included) forward and backward. Tagged "gpu".
#include "ops/cuda/crossentropy_cuda.h"

#include <cmath>
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "ops/crossentropy.h"
#include "ops/distill.h"
#include "tests/ops/cuda_test_util.h"
#include "tests/ops/grad_check.h"

namespace qtrain::ops {
namespace {

using testing::DeviceArray;
using testing::kBf16Eps;
using testing::RandomBf16;

TEST(CrossentropyCudaTest, RejectsBadArguments) {
  float f = 0;
  bf16 b{};
  int32_t t = 0;
  absl::Status s = crossentropy_softmax_cuda(&f, nullptr, &b, &t, 0, 5, 1.f, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("N=0"), absl::string_view::npos) << s;
  s = crossentropy_softmax_cuda(&f, nullptr, &b, nullptr, 1, 5, 1.f, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("targets=0"), absl::string_view::npos) << s;
}

struct SoftmaxShape {
  int N, V, offset;  // offset shifts the logits off 16-byte alignment (element-wise branch)
};

TEST(CrossentropyCudaTest, SoftmaxKernelMatchesFloat64) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  const SoftmaxShape shapes[] = {{1, 1, 0},   {3, 7, 0},      {16, 256, 0},     {5, 256, 1},
                                 {9, 1000, 0}, {4, 50257, 0}, {4, 50304, 0},
                                 {2, 65544, 0}};  // > 64K: the two-pass 16-byte kernel
  for (const SoftmaxShape& sh : shapes) {
    for (float dloss : {1.0f, 0.25f}) {
      SCOPED_TRACE(::testing::Message() << "N=" << sh.N << " V=" << sh.V << " offset="
                                        << sh.offset << " dloss=" << dloss);
      const int64_t n = static_cast<int64_t>(sh.N) * sh.V;
      const auto logits = RandomBf16(n, 1, -8, 8);
      std::vector<int32_t> targets = ops::testing::RandomTokens(sh.N, sh.V, 2);
      targets[0] = sh.V - 1;  // the last element: the tail of the vector loop
      std::vector<double> loss_ref(sh.N), dl_ref(n);
      double mean_ref = 0;
      for (int r = 0; r < sh.N; ++r) {
        const float* row = logits.values.data() + static_cast<int64_t>(r) * sh.V;
        double maxv = row[0];
        for (int v = 1; v < sh.V; ++v) maxv = std::max<double>(maxv, row[v]);
        double sum = 0;
        for (int v = 0; v < sh.V; ++v) sum += std::exp(row[v] - maxv);
        loss_ref[r] = std::log(sum) - (row[targets[r]] - maxv);
        mean_ref += loss_ref[r] / sh.N;
        for (int v = 0; v < sh.V; ++v) {
          const double p = std::exp(row[v] - maxv) / sum;
          dl_ref[static_cast<int64_t>(r) * sh.V + v] =
              dloss / sh.N * (p - (v == targets[r] ? 1.0 : 0.0));
        }
      }
      DeviceArray<bf16> d_logits(logits.bits, sh.offset);
      DeviceArray<int32_t> d_targets(targets);
      DeviceArray<float> d_losses(sh.N);
      DeviceArray<double> d_mean(1);
      QT_ASSERT_OK(crossentropy_softmax_cuda(d_losses.get(), d_mean.get(), d_logits.get(),
                                             d_targets.get(), sh.N, sh.V, dloss, stream.get()));
      QT_ASSERT_OK(stream.Sync());
      const std::vector<float> losses = d_losses.ToHost("losses");
      testing::ExpectNear(losses, loss_ref, 1e-5, 1e-5, "losses");
      const std::vector<double> mean = d_mean.ToHost("mean");
      EXPECT_NEAR(mean[0], mean_ref, 1e-5 * (1 + std::abs(mean_ref)));
      // One BF16 rounding of dlogits; fast exp within a few fp32 ulp.
      testing::ExpectNear(Bf16ToFloat(d_logits.ToHost("dlogits")), dl_ref,
                          1e-6 * dloss / sh.N, kBf16Eps + 1e-5, "dlogits");
    }
  }
}

TEST(CrossentropyCudaTest, BadTargetGivesNanLossAndMeanIsDeterministic) {
  QT_SKIP_WITHOUT_GPU();
  const int N = 1000, V = 64;
  const auto logits = RandomBf16(N * V, 3, -4, 4);
  std::vector<int32_t> targets = ops::testing::RandomTokens(N, V, 4);
  DeviceArray<int32_t> d_targets(targets);
  DeviceArray<float> d_losses(N);
  std::vector<double> means;
  for (int run = 0; run < 2; ++run) {
    DeviceArray<bf16> d_logits(logits.bits);
    DeviceArray<double> d_mean(1);
    QT_ASSERT_OK(crossentropy_softmax_cuda(d_losses.get(), d_mean.get(), d_logits.get(),
                                           d_targets.get(), N, V, 1.f, nullptr));
    QT_ASSERT_OK(SynchronizeDevice());
    means.push_back(d_mean.ToHost("mean")[0]);
  }
  testing::ExpectBitwiseEqual(std::vector<double>{means[0]}, std::vector<double>{means[1]},
                              "mean loss rerun");
  targets[5] = V;
  targets[7] = -1;
  d_targets.Upload(targets);
  DeviceArray<bf16> d_logits(logits.bits);
  QT_ASSERT_OK(crossentropy_softmax_cuda(d_losses.get(), nullptr, d_logits.get(),
                                         d_targets.get(), N, V, 1.f, nullptr));
  const std::vector<float> losses = d_losses.ToHost("losses");
  for (int i = 0; i < N; ++i) {
    EXPECT_EQ(std::isnan(losses[i]), i == 5 || i == 7) << "row " << i;
  }
}

struct HeadShape {
  int N, C, V;
};

TEST(CrossentropyCudaTest, LmHeadForwardBackwardMatchCpu) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  absl::StatusOr<std::unique_ptr<MatmulContext>> ctx = MatmulContext::Create();
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  const HeadShape shapes[] = {{1, 8, 5}, {37, 64, 301}, {64, 128, 1024}, {128, 768, 4096}};
  for (const HeadShape& sh : shapes) {
    SCOPED_TRACE(::testing::Message() << "N=" << sh.N << " C=" << sh.C << " V=" << sh.V);
    const int64_t nx = static_cast<int64_t>(sh.N) * sh.C, nw = static_cast<int64_t>(sh.V) * sh.C;
    const auto x = RandomBf16(nx, 5, -2, 2), wte = RandomBf16(nw, 6, -0.2, 0.2);
    const std::vector<int32_t> targets = ops::testing::RandomTokens(sh.N, sh.V, 7);
    // dx starts at zero: a BF16 start of O(1) would round away increments of O(1/N).
    testing::Bf16Data dx0;
    dx0.bits.assign(nx, FloatToBf16(0.f));
    dx0.values.assign(nx, 0.f);
    const std::vector<float> dwte0 = testing::RandomFloats(nw, 9);
    const float dloss = 1.0f;
    std::vector<float> losses_ref(sh.N), probs(static_cast<size_t>(sh.N) * sh.V);
    const double mean_ref = lm_head_crossentropy_forward(
        losses_ref.data(), probs.data(), x.values.data(), wte.values.data(), targets.data(),
        sh.N, sh.C, sh.V);
    std::vector<float> dx_ref = dx0.values, dwte_ref = dwte0;
    lm_head_crossentropy_backward(dx_ref.data(), dwte_ref.data(), probs.data(), x.values.data(),
                                  wte.values.data(), targets.data(), sh.N, sh.C, sh.V, dloss);
    // probs now holds the CPU dlogits: scales of the backward GEMMs' errors.
    double max_logit = 0;
    for (int64_t i = 0; i < nx; ++i) max_logit = std::max<double>(max_logit, std::abs(x.values[i]));
    max_logit *= 0.2 * sh.C;  // |x| |wte| bound

    DeviceArray<bf16> d_x(x.bits), d_wte(wte.bits), d_logits(static_cast<int64_t>(sh.N) * sh.V),
        d_dx(dx0.bits);
    DeviceArray<int32_t> d_targets(targets);
    DeviceArray<float> d_losses(sh.N), d_dwte(dwte0);
    DeviceArray<double> d_mean(1);
    QT_ASSERT_OK(lm_head_crossentropy_forward_cuda(**ctx, d_losses.get(), d_mean.get(),
                                                   d_logits.get(), d_x.get(), d_wte.get(),
                                                   d_targets.get(), sh.N, sh.C, sh.V, dloss,
                                                   stream.get()));
    QT_ASSERT_OK(lm_head_crossentropy_backward_cuda(**ctx, d_dx.get(), d_dwte.get(),
                                                    d_logits.get(), d_x.get(), d_wte.get(),
                                                    sh.N, sh.C, sh.V, stream.get()));
    QT_ASSERT_OK(stream.Sync());
    // The logits are rounded to BF16 before the softmax: a loss moves by about 2^-9 |logit|.
    const std::vector<float> losses = d_losses.ToHost("losses");
    testing::ExpectNear(losses, losses_ref, 1e-4 + kBf16Eps * std::min(max_logit, 16.0), 1e-4,
                        "losses");
    EXPECT_NEAR(d_mean.ToHost("mean")[0], mean_ref, 1e-4 + kBf16Eps * std::min(max_logit, 16.0));
    const std::vector<float> dx = Bf16ToFloat(d_dx.ToHost("dx"));
    const std::vector<float> dwte = d_dwte.ToHost("dwte");
    // Gradients relative to their own scale: rel. L2 error of the increments, and elementwise
    // with an absolute floor of 2^-4 of the largest increment. The BF16 logits (2^-8 |z|, with
    // |z| up to ~10 here) move each probability by a few percent at worst; that sets the floor.
    std::vector<float> inc_ref(nx), inc_got(nx);
    for (int64_t i = 0; i < nx; ++i) {
      inc_ref[i] = dx_ref[i] - dx0.values[i];
      inc_got[i] = dx[i] - dx0.values[i];
    }
    EXPECT_LT(testing::RelL2(inc_got, inc_ref), 2e-2) << "dx";
    testing::ExpectNear(dx, dx_ref, testing::MaxAbs(inc_ref) / 16, kBf16Eps, "dx");
    std::vector<float> winc_ref(nw), winc_got(nw);
    for (int64_t i = 0; i < nw; ++i) {
      winc_ref[i] = dwte_ref[i] - dwte0[i];
      winc_got[i] = dwte[i] - dwte0[i];
    }
    EXPECT_LT(testing::RelL2(winc_got, winc_ref), 2e-2) << "dwte";
    testing::ExpectNear(dwte, dwte_ref, testing::MaxAbs(winc_ref) / 16, 1e-5, "dwte");
  }
}

// The chunked head (the CUDA model's training Forward) against the one-chunk forward+backward
// above: chunks of every size, dx written over (poisoned first: every row must be written),
// dwte written over then accumulated, BF16 dwte, and the forward-only mode.
TEST(CrossentropyCudaTest, ChunkedLmHeadMatchesWholeBatch) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  absl::StatusOr<std::unique_ptr<MatmulContext>> ctx = MatmulContext::Create();
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  const int N = 200, C = 64, V = 520;
  const int64_t nx = static_cast<int64_t>(N) * C, nw = static_cast<int64_t>(V) * C;
  const auto x = RandomBf16(nx, 15, -2, 2), wte = RandomBf16(nw, 16, -0.2, 0.2);
  const std::vector<int32_t> targets = ops::testing::RandomTokens(N, V, 17);
  DeviceArray<bf16> d_x(x.bits), d_wte(wte.bits);
  DeviceArray<int32_t> d_targets(targets);
  const float dloss = 0.5f;
  // Reference: the whole batch at once.
  DeviceArray<bf16> d_logits(nx / C * V), d_dx(nx);
  DeviceArray<float> d_losses(N), d_dwte(nw);
  DeviceArray<double> d_mean(1);
  QT_ASSERT_OK(lm_head_crossentropy_forward_cuda(**ctx, d_losses.get(), d_mean.get(),
                                                 d_logits.get(), d_x.get(), d_wte.get(),
                                                 d_targets.get(), N, C, V, dloss, stream.get()));
  QT_ASSERT_OK(lm_head_crossentropy_backward_cuda(**ctx, d_dx.get(), d_dwte.get(), d_logits.get(),
                                                  d_x.get(), d_wte.get(), N, C, V, stream.get(),
                                                  GradWrite::kOverwrite, GradWrite::kOverwrite));
  QT_ASSERT_OK(stream.Sync());
  const std::vector<float> losses_ref = d_losses.ToHost("losses");
  const double mean_ref = d_mean.ToHost("mean")[0];
  const std::vector<float> dx_ref = Bf16ToFloat(d_dx.ToHost("dx"));
  const std::vector<float> dwte_ref = d_dwte.ToHost("dwte");
  const std::vector<bf16> poison(nx, bf16{0x7fc0});  // NaN
  for (int chunk : {N, 64, 37, 1}) {
    SCOPED_TRACE(::testing::Message() << "chunk_rows=" << chunk);
    DeviceArray<bf16> c_logits(static_cast<int64_t>(chunk) * V), c_dx(poison);
    DeviceArray<float> c_losses(N), c_dwte(testing::RandomFloats(nw, 3));
    DeviceArray<bf16> c_dwte16(nw);
    DeviceArray<double> c_mean(1);
    QT_ASSERT_OK(lm_head_crossentropy_chunked_cuda(
        **ctx, c_losses.get(), c_mean.get(), c_logits.get(), chunk, c_dx.get(), c_dwte.get(),
        d_x.get(), d_wte.get(), d_targets.get(), N, C, V, dloss, stream.get(),
        GradWrite::kOverwrite, GradWrite::kOverwrite));
    QT_ASSERT_OK(stream.Sync());
    testing::ExpectNear(c_losses.ToHost("losses"), losses_ref, 1e-3, 1e-3, "losses");
    EXPECT_NEAR(c_mean.ToHost("mean")[0], mean_ref, 1e-3);
    const std::vector<float> dx = Bf16ToFloat(c_dx.ToHost("dx"));
    for (float v : dx) ASSERT_FALSE(std::isnan(v)) << "a dx row was not written";
    EXPECT_LT(testing::RelL2(dx, dx_ref), 1e-2) << "dx";
    EXPECT_LT(testing::RelL2(c_dwte.ToHost("dwte"), dwte_ref), 1e-2) << "dwte";
    // Accumulate: a second call adds the same gradient again.
    QT_ASSERT_OK(lm_head_crossentropy_chunked_cuda(
        **ctx, c_losses.get(), nullptr, c_logits.get(), chunk, nullptr, c_dwte.get(), d_x.get(),
        d_wte.get(), d_targets.get(), N, C, V, dloss, stream.get(), GradWrite::kAccumulate));
    QT_ASSERT_OK(stream.Sync());
    std::vector<float> twice = dwte_ref;
    for (float& v : twice) v *= 2;
    EXPECT_LT(testing::RelL2(c_dwte.ToHost("dwte"), twice), 1e-2) << "accumulated dwte";
    // BF16 dwte: the fp32 result rounded.
    QT_ASSERT_OK(lm_head_crossentropy_chunked_cuda(
        **ctx, c_losses.get(), nullptr, c_logits.get(), chunk, nullptr, c_dwte16.get(),
        d_x.get(), d_wte.get(), d_targets.get(), N, C, V, dloss, stream.get(),
        GradWrite::kOverwrite));
    QT_ASSERT_OK(stream.Sync());
    // Each chunk adds its term to the BF16 gradient with one rounding: with one-row chunks
    // that is N roundings (a random walk of ~sqrt(N) BF16 ulps).
    const int chunks = (N + chunk - 1) / chunk;
    EXPECT_LT(testing::RelL2(Bf16ToFloat(c_dwte16.ToHost("dwte16")), dwte_ref),
              chunks <= 8 ? 1e-2 : 4e-2);
    // Forward only: the losses, nothing else.
    DeviceArray<float> f_losses(N);
    DeviceArray<double> f_mean(1);
    QT_ASSERT_OK(lm_head_crossentropy_chunked_cuda(
        **ctx, f_losses.get(), f_mean.get(), c_logits.get(), chunk, nullptr,
        static_cast<float*>(nullptr), d_x.get(), d_wte.get(), d_targets.get(), N, C, V, dloss,
        stream.get()));
    QT_ASSERT_OK(stream.Sync());
    testing::ExpectNear(f_losses.ToHost("losses"), losses_ref, 1e-3, 1e-3, "forward-only losses");
  }
  float f = 0;
  bf16 b{};
  int32_t t = 0;
  const absl::Status bad = lm_head_crossentropy_chunked_cuda(
      **ctx, &f, nullptr, &b, 0, nullptr, static_cast<float*>(nullptr), &b, &b, &t, 1, 1, 1, 1.f,
      nullptr);
  EXPECT_EQ(bad.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.message().find("chunk_rows"), absl::string_view::npos) << bad;
}

// A padded table (model.padded_vocab_size) and distillation against a frozen teacher
// (LmHeadExtras) in the chunked head, against a float64 reference built from the CPU ops
// (ops/distill.h for the distillation term): the padded columns take no part in the softmax,
// their rows of dwte get exactly zero (poisoned first), the per-row and mean losses, dx and
// dwte; KL and MSE; uneven chunks.
TEST(CrossentropyCudaTest, PaddedTableAndDistillationMatchFloat64) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  absl::StatusOr<std::unique_ptr<MatmulContext>> ctx = MatmulContext::Create();
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  const int N = 96, C = 64, V = 517, Vt = 576;
  const int64_t nx = static_cast<int64_t>(N) * C, nw = static_cast<int64_t>(Vt) * C;
  const auto x = RandomBf16(nx, 31, -2, 2), wte = RandomBf16(nw, 32, -0.3, 0.3);
  const auto tx = RandomBf16(nx, 33, -2, 2), twte = RandomBf16(nw, 34, -0.3, 0.3);
  const std::vector<int32_t> targets = ops::testing::RandomTokens(N, V, 35);
  DeviceArray<bf16> d_x(x.bits), d_wte(wte.bits), d_tx(tx.bits), d_twte(twte.bits);
  DeviceArray<int32_t> d_targets(targets);
  // Logits of the first V rows in float64 from the BF16 inputs.
  auto logits_of = [&](const std::vector<float>& a, const std::vector<float>& w) {
    std::vector<double> z(static_cast<size_t>(N) * V);
    for (int n = 0; n < N; ++n) {
      for (int v = 0; v < V; ++v) {
        double acc = 0;
        for (int c = 0; c < C; ++c) acc += static_cast<double>(a[n * C + c]) * w[v * C + c];
        z[static_cast<size_t>(n) * V + v] = acc;
      }
    }
    return z;
  };
  const std::vector<double> zs = logits_of(x.values, wte.values);
  const std::vector<double> zt = logits_of(tx.values, twte.values);
  const float dloss = 0.5f, weight = 0.7f;
  for (const bool distill : {false, true}) {
    for (const DistillLoss kind : {DistillLoss::kKl, DistillLoss::kMse}) {
      if (!distill && kind == DistillLoss::kMse) continue;
      SCOPED_TRACE(::testing::Message() << "distill=" << distill
                                        << " kind=" << (kind == DistillLoss::kKl ? "KL" : "MSE"));
      // Reference: cross-entropy per row, the distillation term by ops/distill.h, their
      // dlogits, then dx and dwte.
      std::vector<double> loss_ref(N), dz(static_cast<size_t>(N) * V, 0.0);
      double ce_mean = 0;
      for (int n = 0; n < N; ++n) {
        const double* row = zs.data() + static_cast<size_t>(n) * V;
        double m = row[0];
        for (int v = 1; v < V; ++v) m = std::max(m, row[v]);
        double sum = 0;
        for (int v = 0; v < V; ++v) sum += std::exp(row[v] - m);
        loss_ref[n] = std::log(sum) - (row[targets[n]] - m);
        ce_mean += loss_ref[n] / N;
        for (int v = 0; v < V; ++v) {
          dz[static_cast<size_t>(n) * V + v] =
              dloss / N * (std::exp(row[v] - m) / sum - (v == targets[n] ? 1.0 : 0.0));
        }
      }
      double distill_ref = 0;
      if (distill) {
        distill_ref = distill_forward(zs.data(), zt.data(), N, V, kind);
        distill_backward(dz.data(), zs.data(), zt.data(), N, V, kind,
                         static_cast<double>(dloss) * weight);
      }
      std::vector<double> dx_ref(nx, 0.0), dwte_ref(nw, 0.0);
      for (int n = 0; n < N; ++n) {
        for (int v = 0; v < V; ++v) {
          const double g = dz[static_cast<size_t>(n) * V + v];
          for (int c = 0; c < C; ++c) {
            dx_ref[n * C + c] += g * wte.values[v * C + c];
            dwte_ref[v * C + c] += g * x.values[n * C + c];
          }
        }
      }
      for (int chunk : {N, 40}) {
        SCOPED_TRACE(::testing::Message() << "chunk_rows=" << chunk);
        DeviceArray<bf16> c_logits(static_cast<int64_t>(chunk) * Vt),
            t_logits(static_cast<int64_t>(chunk) * Vt), c_dx(nx);
        DeviceArray<float> c_losses(N), c_dwte(std::vector<float>(nw, NAN)), d_losses(N);
        DeviceArray<double> c_mean(1), d_mean(1);
        LmHeadExtras extras;
        extras.table_rows = Vt;
        if (distill) {
          extras.teacher_x = d_tx.get();
          extras.teacher_wte = d_twte.get();
          extras.teacher_logits = t_logits.get();
          extras.distill = kind;
          extras.distill_weight = weight;
          extras.distill_losses = d_losses.get();
          extras.mean_distill = d_mean.get();
        }
        QT_ASSERT_OK(lm_head_crossentropy_chunked_cuda(
            **ctx, c_losses.get(), c_mean.get(), c_logits.get(), chunk, c_dx.get(), c_dwte.get(),
            d_x.get(), d_wte.get(), d_targets.get(), N, C, V, dloss, stream.get(),
            GradWrite::kOverwrite, GradWrite::kOverwrite, extras));
        QT_ASSERT_OK(stream.Sync());
        // BF16 logits: a loss moves by about 2^-9 |logit| (|logit| < ~4 here).
        testing::ExpectNear(c_losses.ToHost("losses"), loss_ref, 2e-2, 1e-2, "losses");
        EXPECT_NEAR(c_mean.ToHost("mean")[0], ce_mean, 1e-2);
        if (distill) {
          const double got = d_mean.ToHost("mean distill")[0];
          std::printf("distill %s: mean %.6f, reference %.6f\n",
                      kind == DistillLoss::kKl ? "KL" : "MSE", got, distill_ref);
          EXPECT_NEAR(got, distill_ref, 2e-2 * std::max(1.0, std::abs(distill_ref)));
          EXPECT_GT(std::abs(distill_ref), 1e-3) << "a distillation term too small to test";
        }
        const std::vector<float> dx = Bf16ToFloat(c_dx.ToHost("dx"));
        const std::vector<float> dwte = c_dwte.ToHost("dwte");
        std::vector<float> dx_r(dx_ref.begin(), dx_ref.end()), dw_r(dwte_ref.begin(), dwte_ref.end());
        EXPECT_LT(testing::RelL2(dx, dx_r), 3e-2) << "dx";
        EXPECT_LT(testing::RelL2(dwte, dw_r), 3e-2) << "dwte";
        for (int64_t i = static_cast<int64_t>(V) * C; i < nw; ++i) {
          ASSERT_EQ(dwte[i], 0.0f) << "padded row " << i / C << " of dwte";
        }
      }
    }
  }
  // A table smaller than the vocabulary is refused.
  LmHeadExtras bad;
  bad.table_rows = V - 1;
  float f = 0;
  bf16 b{};
  int32_t t = 0;
  const absl::Status s = lm_head_crossentropy_chunked_cuda(
      **ctx, &f, nullptr, &b, 1, nullptr, static_cast<float*>(nullptr), &b, &b, &t, 1, 1, V, 1.f,
      nullptr, GradWrite::kAccumulate, GradWrite::kAccumulate, bad);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
}

}  // namespace
}  // namespace qtrain::ops
