// GPU parity of the quantizing layernorm (layernorm_quant_cuda.h) and GELU (gelu_quant_cuda.h)
// kernels: with no quantizer they reproduce the plain kernels (layernorm bit for bit); with one,
// their output is bf16(CPU lsq_forward / per_token_quant_forward of the plain BF16 output) bit
// for bit, codes and token scales exact; the backward matches the CPU chain (ops/quant/lsq.h's
// straight-through mask and step/offset sums, then ops/layernorm.h / ops/gelu.h's backward)
// within fp32/BF16 tolerance, and the recomputed output equals the forward's bit for bit.
// Every bit width, per tensor (LSQ and LSQ+) and per token, odd and GPT-2 widths, the vector and
// element-wise branches, both gradient types. Tagged "gpu".
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "ops/cuda/bf16.h"
#include "ops/cuda/device.h"
#include "ops/cuda/gelu_cuda.h"
#include "ops/cuda/gelu_quant_cuda.h"
#include "ops/cuda/layernorm_cuda.h"
#include "ops/cuda/layernorm_quant_cuda.h"
#include "ops/cuda/lsq_cuda.h"
#include "ops/gelu.h"
#include "ops/layernorm.h"
#include "ops/quant/lsq.h"
#include "tests/ops/cuda_test_util.h"

namespace qtrain::ops {
namespace {

using testing::DeviceArray;
using testing::ExpectBitwiseEqual;
using testing::ExpectNear;
using testing::kBf16Eps;
using testing::RandomBf16;
using testing::RandomFloats;
using testing::TestStream;

struct QCase {
  ActQuantMode mode;
  int bits;
  LsqMode lsq;
};

std::string Name(const QCase& q, int64_t N, int64_t C, int64_t offset) {
  const char* m = q.mode == ActQuantMode::kNone
                      ? "none"
                      : (q.mode == ActQuantMode::kPerToken ? "per-token" : "per-tensor");
  return absl::StrCat(m, " ", q.bits, "-bit ", q.lsq == LsqMode::kSymmetric ? "sym" : "asym",
                      " ", N, "x", C, offset ? " unaligned" : "");
}

std::vector<QCase> Cases() {
  std::vector<QCase> out;
  for (int bits : {2, 3, 4, 8}) {
    out.push_back({ActQuantMode::kPerToken, bits, LsqMode::kSymmetric});
    out.push_back({ActQuantMode::kPerTensor, bits, LsqMode::kSymmetric});
    out.push_back({ActQuantMode::kPerTensor, bits, LsqMode::kAsymmetric});
  }
  return out;
}

// Device-side quantizer state for one case: the step/offset chosen from the plain output's
// range so that some values clip, the token scales, the codes.
struct QState {
  QState(const QCase& c, const std::vector<float>& plain, int64_t N, int64_t C, int64_t offset)
      : cfg(), step(std::vector<float>{1.f}), offset_d(std::vector<float>{0.f}), scales(N),
        codes(N * C, offset) {
    cfg.bits = c.bits;
    cfg.mode = c.lsq;
    cfg.granularity = QuantGranularity::kPerTensor;
    cfg.grad_scale_count = C;
    float lo = 0, hi = 0;
    for (float v : plain) {
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    const QuantRange r = *quant_range(c.bits, c.lsq);
    if (c.lsq == LsqMode::kAsymmetric) {
      s = 0.8f * (hi - lo) / r.qp;
      b = 0.9f * lo;
    } else {
      s = 0.8f * std::max(hi, -lo) / r.qp;
    }
    step.Upload({s});
    offset_d.Upload({b});
    q.mode = c.mode;
    q.bits = c.bits;
    q.lsq_mode = c.lsq;
    if (c.mode == ActQuantMode::kPerTensor) {
      q.step = step.get();
      if (c.lsq == LsqMode::kAsymmetric) q.offset = offset_d.get();
    } else if (c.mode == ActQuantMode::kPerToken) {
      q.token_scales = scales.get();
    }
    if (c.mode != ActQuantMode::kNone && c.lsq == LsqMode::kSymmetric) q.codes = codes.get();
  }
  LsqConfig cfg;
  float s = 1.f, b = 0.f;
  DeviceArray<float> step, offset_d, scales;
  DeviceArray<int8_t> codes;
  ActQuant q;
};

// The CPU forward of the quantizer on the plain BF16 output (values), its codes and scales.
struct QRef {
  std::vector<float> out, scales;
  std::vector<int8_t> codes;
};

QRef CpuQuant(const QCase& c, const QState& st, const std::vector<float>& v, int64_t N,
              int64_t C) {
  QRef r;
  const int64_t n = N * C;
  if (c.mode == ActQuantMode::kNone) {  // no quantizer: the plain output
    r.out = v;
    return r;
  }
  r.out.resize(n);
  r.codes.resize(n);
  if (c.mode == ActQuantMode::kPerToken) {
    r.scales.resize(N);
    EXPECT_TRUE(per_token_quant_forward(r.out.data(), r.scales.data(), v.data(), N, C, c.bits).ok());
    std::vector<int32_t> c32(n);
    EXPECT_TRUE(per_token_quantize_codes(c32.data(), r.scales.data(), v.data(), N, C, c.bits).ok());
    for (int64_t i = 0; i < n; ++i) r.codes[i] = static_cast<int8_t>(c32[i]);
  } else {
    const bool asym = c.lsq == LsqMode::kAsymmetric;
    EXPECT_TRUE(lsq_forward(r.out.data(), v.data(), &st.s, asym ? &st.b : nullptr, 1, n, st.cfg)
                    .ok());
    if (!asym) {
      std::vector<int32_t> c32(n);
      EXPECT_TRUE(lsq_quantize_codes(c32.data(), v.data(), &st.s, nullptr, 1, n, st.cfg).ok());
      for (int64_t i = 0; i < n; ++i) r.codes[i] = static_cast<int8_t>(c32[i]);
    }
  }
  return r;
}

void ExpectQuantized(const QCase& c, QState& st, const QRef& ref, const std::vector<bf16>& got,
                     int64_t N) {
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_EQ(got[i].bits, FloatToBf16(ref.out[i]).bits)
        << "out[" << i << "] = " << Bf16ToFloat(got[i]) << ", want bf16(" << ref.out[i] << ")";
  }
  if (st.q.codes != nullptr) {
    const std::vector<int8_t> codes = st.codes.ToHost("codes");
    for (size_t i = 0; i < codes.size(); ++i) ASSERT_EQ(codes[i], ref.codes[i]) << "codes[" << i << "]";
  }
  if (c.mode == ActQuantMode::kPerToken) {
    const std::vector<float> scales = st.scales.ToHost("token_scales");
    for (int64_t r = 0; r < N; ++r) ASSERT_EQ(scales[r], ref.scales[r]) << "scale[" << r << "]";
  }
}

// The CPU straight-through pass on the plain output v: the masked gradient and the sums.
struct MaskRef {
  std::vector<float> dy;
  float ds = 0, db = 0, tol = 0;
};

MaskRef CpuMask(const QCase& c, const QState& st, const std::vector<float>& v,
                const std::vector<float>& dout) {
  MaskRef m;
  const int64_t n = static_cast<int64_t>(v.size());
  m.dy.assign(n, 0.f);
  if (c.mode != ActQuantMode::kPerTensor) {
    m.dy = dout;
    return m;
  }
  const bool asym = c.lsq == LsqMode::kAsymmetric;
  EXPECT_TRUE(lsq_backward(m.dy.data(), &m.ds, asym ? &m.db : nullptr, dout.data(), v.data(),
                           &st.s, asym ? &st.b : nullptr, 1, n, st.cfg)
                  .ok());
  // Tolerance: fp32 rounding of sums of terms that may cancel: 1e-6 of the |terms| sum.
  const QuantRange r = *quant_range(c.bits, c.lsq);
  double abs_sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float x = asym ? (v[i] - st.b) / st.s : v[i] / st.s;
    const double t = x <= -r.qn || x >= r.qp ? r.qp + r.qn + 1.0 : 1.0;
    abs_sum += std::abs(static_cast<double>(dout[i])) * t;
  }
  m.tol = static_cast<float>(1e-6 * abs_sum / std::sqrt(st.cfg.grad_scale_count * 1.0 * r.qp) +
                             1e-7);
  return m;
}

template <typename G>
std::vector<float> AsFloat(const std::vector<G>& v) {
  std::vector<float> f(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if constexpr (std::is_same<G, bf16>::value) f[i] = Bf16ToFloat(v[i]);
    else f[i] = v[i];
  }
  return f;
}

template <typename G>
std::vector<G> FromFloat(const std::vector<float>& v) {
  std::vector<G> g(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if constexpr (std::is_same<G, bf16>::value) g[i] = FloatToBf16(v[i]);
    else g[i] = v[i];
  }
  return g;
}

// ======================= Layernorm =======================

struct LnShape {
  int N, C, offset;
};
const LnShape kLnShapes[] = {{7, 37, 0}, {33, 768, 0}, {9, 1600, 0}, {65, 64, 1}, {3, 8, 0}};

template <typename G>
void CheckLayernorm(const QCase& c, const LnShape& sh, bool residual, GradWrite write) {
  const int N = sh.N, C = sh.C;
  const int64_t n = static_cast<int64_t>(N) * C, off = sh.offset;
  SCOPED_TRACE(Name(c, N, C, off) + (residual ? " residual" : "") +
               (std::is_same<G, bf16>::value ? " bf16-grads" : " fp32-grads") +
               (write == GradWrite::kOverwrite ? " overwrite" : " accumulate"));
  const testing::Bf16Data a = RandomBf16(n, 1 + C, -2.0, 2.0), b = RandomBf16(n, 2 + C, -1.0, 1.0);
  const testing::Bf16Data w = RandomBf16(C, 3, 0.5, 1.5), bias = RandomBf16(C, 4, -0.5, 0.5);
  TestStream stream;
  DeviceArray<bf16> da(a.bits, off), db(b.bits, off), dw(w.bits, off), dbias(bias.bits, off);
  DeviceArray<bf16> plain(n, off), plain_res(n, off), res(n, off), out(n, off);
  DeviceArray<float> mean(N), rstd(N), mean_q(N), rstd_q(N);
  // The plain kernel, then the quantizing one with kNone: the same bits.
  if (residual) {
    QT_ASSERT_OK(residual_layernorm_forward_cuda(plain_res.get(), plain.get(), mean.get(),
                                                 rstd.get(), da.get(), db.get(), dw.get(),
                                                 dbias.get(), N, C, stream.get()));
  } else {
    QT_ASSERT_OK(layernorm_forward_cuda(plain.get(), mean.get(), rstd.get(), da.get(), dw.get(),
                                        dbias.get(), N, C, stream.get()));
  }
  ASSERT_TRUE(stream.Sync().ok());
  const std::vector<bf16> plain_h = plain.ToHost("plain");
  const std::vector<float> v = Bf16ToFloat(plain_h);
  QState none_st(QCase{ActQuantMode::kNone, 8, LsqMode::kSymmetric}, v, N, C, off);
  if (residual) {
    QT_ASSERT_OK(residual_layernorm_forward_quant_cuda(res.get(), out.get(), mean_q.get(),
                                                       rstd_q.get(), da.get(), db.get(), dw.get(),
                                                       dbias.get(), N, C, none_st.q, stream.get()));
  } else {
    QT_ASSERT_OK(layernorm_forward_quant_cuda(out.get(), mean_q.get(), rstd_q.get(), da.get(),
                                              dw.get(), dbias.get(), N, C, none_st.q,
                                              stream.get()));
  }
  ASSERT_TRUE(stream.Sync().ok());
  ExpectBitwiseEqual(AsFloat(out.ToHost("out kNone")), v, "kNone vs layernorm_forward_cuda");
  ExpectBitwiseEqual(mean_q.ToHost("mean"), mean.ToHost("mean"), "mean");
  ExpectBitwiseEqual(rstd_q.ToHost("rstd"), rstd.ToHost("rstd"), "rstd");
  if (residual) {
    ExpectBitwiseEqual(AsFloat(res.ToHost("residual")), AsFloat(plain_res.ToHost("residual")),
                       "residual");
  }

  // Quantized forward.
  QState st(c, v, N, C, off);
  if (residual) {
    QT_ASSERT_OK(residual_layernorm_forward_quant_cuda(res.get(), out.get(), mean_q.get(),
                                                       rstd_q.get(), da.get(), db.get(), dw.get(),
                                                       dbias.get(), N, C, st.q, stream.get()));
  } else {
    QT_ASSERT_OK(layernorm_forward_quant_cuda(out.get(), mean_q.get(), rstd_q.get(), da.get(),
                                              dw.get(), dbias.get(), N, C, st.q, stream.get()));
  }
  ASSERT_TRUE(stream.Sync().ok());
  const std::vector<bf16> qout = out.ToHost("out");
  ExpectQuantized(c, st, CpuQuant(c, st, v, N, C), qout, N);
  if (::testing::Test::HasFatalFailure()) return;

  // Backward of the layernorm input (the residual when there is one).
  const std::vector<float> x = residual ? AsFloat(res.ToHost("residual")) : a.values;
  const std::vector<float> dout = Bf16ToFloat(RandomBf16(n, 5, -1.0, 1.0).bits);
  const std::vector<float> dinp0 = Bf16ToFloat(RandomBf16(n, 6, -0.5, 0.5).bits);
  const std::vector<float> dw0 = AsFloat(FromFloat<G>(RandomFloats(C, 7, -0.1, 0.1)));
  const std::vector<float> db0 = AsFloat(FromFloat<G>(RandomFloats(C, 8, -0.1, 0.1)));
  const MaskRef mref = CpuMask(c, st, v, dout);
  std::vector<float> dx_ref = dinp0, dw_ref(C, 0.f), db_ref(C, 0.f);
  if (write == GradWrite::kAccumulate) {
    dw_ref = dw0;
    db_ref = db0;
  }
  const std::vector<float> mean_h = mean_q.ToHost("mean"), rstd_h = rstd_q.ToHost("rstd");
  layernorm_backward(dx_ref.data(), dw_ref.data(), db_ref.data(), mref.dy.data(), x.data(),
                     w.values.data(), mean_h.data(), rstd_h.data(), N, C);
  std::vector<double> atol_dw(C, 1e-6), atol_db(C, 1e-6);
  for (int64_t r = 0; r < N; ++r) {
    for (int c2 = 0; c2 < C; ++c2) {
      const double d = mref.dy[r * C + c2];
      atol_dw[c2] += 4e-6 * std::abs((x[r * C + c2] - mean_h[r]) * rstd_h[r] * d);
      atol_db[c2] += 4e-6 * std::abs(d);
    }
  }
  DeviceArray<bf16> d_x(residual ? ToBf16(x) : a.bits, off), d_dout(ToBf16(dout), off);
  DeviceArray<bf16> d_dinp(ToBf16(dinp0), off), rec(n, off);
  DeviceArray<G> d_dw(FromFloat<G>(dw0), off), d_db(FromFloat<G>(db0), off);
  DeviceArray<G> d_ds(FromFloat<G>({0.5f})), d_doff(FromFloat<G>({0.25f}));
  const int64_t ws_bytes = layernorm_backward_quant_cuda_workspace_bytes(N, C, st.q);
  DeviceArray<double> ws(ws_bytes / 8 + 1);
  const bool per_tensor = c.mode == ActQuantMode::kPerTensor;
  const bool asym = per_tensor && c.lsq == LsqMode::kAsymmetric;
  QT_ASSERT_OK(layernorm_backward_quant_cuda(
      d_dinp.get(), d_dw.get(), d_db.get(), per_tensor ? d_ds.get() : nullptr,
      asym ? d_doff.get() : nullptr, d_dout.get(), d_x.get(), dw.get(), dbias.get(),
      mean_q.get(), rstd_q.get(), N, C, st.q, ws.get(), ws_bytes, stream.get(), write, rec.get()));
  ASSERT_TRUE(stream.Sync().ok());
  ExpectNear(Bf16ToFloat(d_dinp.ToHost("dinp")), dx_ref, 1e-3, kBf16Eps, "dinp");
  const double rtol = std::is_same<G, bf16>::value ? kBf16Eps : 1e-6;
  ExpectNear(AsFloat(d_dw.ToHost("dweight")), dw_ref, 0, rtol, "dweight", &atol_dw);
  ExpectNear(AsFloat(d_db.ToHost("dbias")), db_ref, 0, rtol, "dbias", &atol_db);
  ExpectBitwiseEqual(AsFloat(rec.ToHost("out_recompute")), AsFloat(qout), "out_recompute");
  if (per_tensor) {
    const float base_s = write == GradWrite::kAccumulate ? 0.5f : 0.f;
    const float base_b = write == GradWrite::kAccumulate ? 0.25f : 0.f;
    const double r2 = std::is_same<G, bf16>::value ? kBf16Eps : 0;
    const float got_s = AsFloat(d_ds.ToHost("dstep"))[0];
    EXPECT_NEAR(got_s, base_s + mref.ds, mref.tol + r2 * std::abs(base_s + mref.ds)) << "dstep";
    if (asym) {
      const float got_b = AsFloat(d_doff.ToHost("doffset"))[0];
      EXPECT_NEAR(got_b, base_b + mref.db, mref.tol + r2 * std::abs(base_b + mref.db))
          << "doffset";
    }
  }
}

TEST(LayernormQuantCuda, ForwardBackwardMatchCpu) {
  QT_SKIP_WITHOUT_GPU();
  int i = 0;
  for (const LnShape& sh : kLnShapes) {
    for (const QCase& c : Cases()) {
      const GradWrite write = i % 2 ? GradWrite::kAccumulate : GradWrite::kOverwrite;
      if (i % 3 == 0) {
        CheckLayernorm<bf16>(c, sh, i % 4 == 0, write);
      } else {
        CheckLayernorm<float>(c, sh, i % 4 == 0, write);
      }
      ++i;
    }
  }
  // The GPT-2 124M shape once per mode.
  for (const QCase& c : {QCase{ActQuantMode::kPerTensor, 4, LsqMode::kSymmetric},
                         QCase{ActQuantMode::kPerToken, 8, LsqMode::kSymmetric},
                         QCase{ActQuantMode::kNone, 8, LsqMode::kSymmetric}}) {
    CheckLayernorm<bf16>(c, {4096, 768, 0}, true, GradWrite::kOverwrite);
  }
}

TEST(LayernormQuantCuda, BackwardIsDeterministic) {
  QT_SKIP_WITHOUT_GPU();
  const int N = 2048, C = 768;
  const int64_t n = static_cast<int64_t>(N) * C;
  const testing::Bf16Data x = RandomBf16(n, 1, -2, 2), w = RandomBf16(C, 2, 0.5, 1.5),
                          b = RandomBf16(C, 3, -0.5, 0.5), g = RandomBf16(n, 4, -1, 1);
  TestStream stream;
  DeviceArray<bf16> dx(x.bits), dw(w.bits), db(b.bits), dg(g.bits), out(n), dinp(n);
  DeviceArray<float> mean(N), rstd(N), step(std::vector<float>{0.05f}), gw(C), gb(C), ds(1);
  ActQuant q;
  q.mode = ActQuantMode::kPerTensor;
  q.bits = 4;
  q.step = step.get();
  QT_ASSERT_OK(layernorm_forward_quant_cuda(out.get(), mean.get(), rstd.get(), dx.get(), dw.get(),
                                            db.get(), N, C, q, stream.get()));
  const int64_t ws_bytes = layernorm_backward_quant_cuda_workspace_bytes(N, C, q);
  DeviceArray<double> ws(ws_bytes / 8 + 1);
  std::vector<float> runs[2][3];
  for (auto& r : runs) {
    dinp.Poison();
    QT_ASSERT_OK(layernorm_backward_quant_cuda(dinp.get(), gw.get(), gb.get(), ds.get(), nullptr,
                                               dg.get(), dx.get(), dw.get(), db.get(), mean.get(),
                                               rstd.get(), N, C, q, ws.get(), ws_bytes,
                                               stream.get(), GradWrite::kOverwrite));
    ASSERT_TRUE(stream.Sync().ok());
    r[0] = gw.ToHost("dweight");
    r[1] = gb.ToHost("dbias");
    r[2] = ds.ToHost("dstep");
  }
  for (int k = 0; k < 3; ++k) ExpectBitwiseEqual(runs[0][k], runs[1][k], "rerun");
}

// ======================= GELU =======================

struct GeluShape {
  int64_t N, C, offset;
};
const GeluShape kGeluShapes[] = {{7, 37, 0}, {16, 3072, 0}, {5, 64, 1}, {3, 13, 3}, {129, 200, 0}};

template <typename G>
void CheckGelu(const QCase& c, const GeluShape& sh, bool in_place) {
  const int64_t N = sh.N, C = sh.C, n = N * C, off = sh.offset;
  SCOPED_TRACE(Name(c, N, C, off) + (std::is_same<G, bf16>::value ? " bf16-grads" : "") +
               (in_place ? " in place" : ""));
  const testing::Bf16Data pre = RandomBf16(n, 11 + C, -4.0, 4.0);
  TestStream stream;
  DeviceArray<bf16> d_pre(pre.bits, off), plain(n, off), out(n, off);
  QT_ASSERT_OK(gelu_forward_cuda(plain.get(), d_pre.get(), n, stream.get()));
  QState none_st(QCase{ActQuantMode::kNone, 8, LsqMode::kSymmetric}, pre.values, N, C, off);
  QT_ASSERT_OK(gelu_forward_quant_cuda(out.get(), d_pre.get(), N, C, none_st.q, stream.get()));
  ASSERT_TRUE(stream.Sync().ok());
  // The same expression (cu::Gelu) as the plain kernel; within one BF16 rounding even if the
  // compiler contracts it differently in the two kernels.
  const std::vector<float> v = Bf16ToFloat(out.ToHost("out kNone"));
  ExpectNear(v, Bf16ToFloat(plain.ToHost("plain")), 0, kBf16Eps, "kNone vs gelu_forward_cuda");
  std::vector<float> gelu_ref(n);
  gelu_forward(gelu_ref.data(), pre.values.data(), n);
  ExpectNear(v, gelu_ref, 1e-5, kBf16Eps, "kNone vs CPU gelu");

  QState st(c, v, N, C, off);
  QT_ASSERT_OK(gelu_forward_quant_cuda(out.get(), d_pre.get(), N, C, st.q, stream.get()));
  ASSERT_TRUE(stream.Sync().ok());
  const std::vector<bf16> qout = out.ToHost("out");
  ExpectQuantized(c, st, CpuQuant(c, st, v, N, C), qout, N);
  if (::testing::Test::HasFatalFailure()) return;

  const std::vector<float> dout = Bf16ToFloat(RandomBf16(n, 12, -1.0, 1.0).bits);
  const MaskRef mref = CpuMask(c, st, v, dout);
  std::vector<float> dpre_ref(n, 0.f);
  gelu_backward(dpre_ref.data(), pre.values.data(), mref.dy.data(), n);
  DeviceArray<bf16> d_dout(ToBf16(dout), off), d_dpre(n, off), rec(n, off);
  DeviceArray<G> d_ds(FromFloat<G>({0.5f})), d_doff(FromFloat<G>({0.25f}));
  const int64_t ws_bytes = act_quant_backward_cuda_workspace_bytes(N, C, st.q);
  DeviceArray<double> ws(ws_bytes / 8 + 1);
  const bool per_tensor = c.mode == ActQuantMode::kPerTensor;
  const bool asym = per_tensor && c.lsq == LsqMode::kAsymmetric;
  bf16* dpre = in_place ? d_dout.get() : d_dpre.get();
  QT_ASSERT_OK(gelu_backward_quant_cuda(dpre, per_tensor ? d_ds.get() : nullptr,
                                        asym ? d_doff.get() : nullptr, d_dout.get(), d_pre.get(),
                                        N, C, st.q, ws.get(), ws_bytes, stream.get(),
                                        GradWrite::kAccumulate, rec.get()));
  ASSERT_TRUE(stream.Sync().ok());
  const std::vector<float> got =
      Bf16ToFloat(in_place ? d_dout.ToHost("dpre (in place)") : d_dpre.ToHost("dpre"));
  // GELU' through tanhf: device and glibc within a few ulp, amplified by |x| (gelu_cuda_test).
  ExpectNear(got, dpre_ref, 1e-5, kBf16Eps + 16 * std::numeric_limits<float>::epsilon(), "dpre");
  ExpectBitwiseEqual(AsFloat(rec.ToHost("out_recompute")), AsFloat(qout), "out_recompute");
  if (per_tensor) {
    const double r2 = std::is_same<G, bf16>::value ? kBf16Eps : 0;
    EXPECT_NEAR(AsFloat(d_ds.ToHost("dstep"))[0], 0.5f + mref.ds,
                mref.tol + r2 * std::abs(0.5f + mref.ds));
    if (asym) {
      EXPECT_NEAR(AsFloat(d_doff.ToHost("doffset"))[0], 0.25f + mref.db,
                  mref.tol + r2 * std::abs(0.25f + mref.db));
    }
  }
}

TEST(GeluQuantCuda, ForwardBackwardMatchCpu) {
  QT_SKIP_WITHOUT_GPU();
  int i = 0;
  for (const GeluShape& sh : kGeluShapes) {
    for (const QCase& c : Cases()) {
      if (i % 2) {
        CheckGelu<bf16>(c, sh, i % 3 == 0);
      } else {
        CheckGelu<float>(c, sh, i % 3 == 0);
      }
      ++i;
    }
  }
}

// ---- Argument checks (no device needed).
TEST(ActQuantFusedArgs, RejectsBadArguments) {
  bf16* const p = reinterpret_cast<bf16*>(0x1000);
  float* const f = reinterpret_cast<float*>(0x1000);
  ActQuant tok;
  tok.mode = ActQuantMode::kPerToken;
  tok.lsq_mode = LsqMode::kAsymmetric;
  EXPECT_TRUE(absl::IsInvalidArgument(
      layernorm_forward_quant_cuda(p, f, f, p, p, p, 4, 8, tok, nullptr)));
  tok.lsq_mode = LsqMode::kSymmetric;
  // The recomputed per-token output needs the forward's scales.
  EXPECT_TRUE(absl::IsInvalidArgument(layernorm_backward_quant_cuda(
      p, f, f, nullptr, nullptr, p, p, p, p, f, f, 4, 8, tok, f, 1 << 20, nullptr,
      GradWrite::kAccumulate, p)));
  // Too wide for the shared accumulators; missing bias; too little workspace.
  ActQuant none;
  EXPECT_TRUE(absl::IsInvalidArgument(layernorm_backward_quant_cuda(
      p, f, f, nullptr, nullptr, p, p, p, p, f, f, 4, 20000, none, f, 1 << 30, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(layernorm_backward_quant_cuda(
      p, f, f, nullptr, nullptr, p, p, p, nullptr, f, f, 4, 8, none, f, 1 << 20, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(layernorm_backward_quant_cuda(
      p, f, f, nullptr, nullptr, p, p, p, p, f, f, 4, 8, none, f, 8, nullptr)));
  // dstep without a per-tensor quantizer; recompute aliasing dout.
  EXPECT_TRUE(absl::IsInvalidArgument(
      gelu_backward_quant_cuda(p, f, nullptr, p, p, 4, 8, none, f, 1 << 20, nullptr)));
  EXPECT_TRUE(absl::IsInvalidArgument(gelu_backward_quant_cuda(
      p, static_cast<float*>(nullptr), nullptr, p, p, 4, 8, none, f, 1 << 20, nullptr,
      GradWrite::kAccumulate, p)));
}

}  // namespace
}  // namespace qtrain::ops
