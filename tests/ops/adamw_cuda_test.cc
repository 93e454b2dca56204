// GPU parity of the CUDA AdamW step against the CPU reference (ops/adamw.h): several steps,
// weight decay on/off, every access branch (float4 body with scalar ends at any alignment
// phase, all-scalar where the buffers' phases differ), the gradient scale, and the BF16 copy,
// which must be exactly the nearest-even rounding of the fp32 params. The one-launch
// multi-tensor form must give the bits of per-segment single-range calls and leave elements
// outside its segments alone; BF16 gradients must give the bits of fp32 gradients holding the
// same values. Plan validation runs on the host (no GPU needed). Tagged "gpu".
#include "ops/cuda/adamw_cuda.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "ops/adamw.h"
#include "tests/ops/cuda_test_util.h"

namespace qtrain::ops {
namespace {

using testing::DeviceArray;
using testing::RandomFloats;

TEST(AdamwCudaTest, RejectsBadArguments) {
  float f = 0;
  absl::Status s =
      adamw_update_cuda(&f, nullptr, &f, &f, &f, 1, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.f, 0, nullptr,
                        nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("t must be >= 1"), absl::string_view::npos) << s;
  s = adamw_update_cuda(&f, nullptr, static_cast<const float*>(nullptr), &f, &f, 1, 1e-3f, 0.9f,
                        0.95f, 1e-8f, 0.f, 1, nullptr, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("grads=0"), absl::string_view::npos) << s;
  EXPECT_EQ(adamw_update_cuda(&f, nullptr, &f, &f, &f, 1, 1e-3f, 1.0f, 0.95f, 1e-8f, 0.f, 1,
                              nullptr, nullptr)
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(adamw_update_cuda(&f, nullptr, &f, &f, &f, 0, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.f, 1,
                                nullptr, nullptr)
                  .ok());
}

struct Case {
  int64_t n;
  int offset;  // elements of every array off 16-byte alignment (float4 body after a head)
  float weight_decay;
  float grad_scale;  // 0: none
  int grad_offset = -1;  // the gradients' own offset where >= 0: unequal phases, all scalar
};

TEST(AdamwCudaTest, StepsMatchCpuAndBf16CopyIsExact) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  const Case cases[] = {{1, 0, 0.f, 0.f},
                        {3, 0, 0.1f, 0.f},
                        {1000, 0, 0.1f, 0.5f},
                        {1001, 1, 0.1f, 0.f},
                        {4097, 3, 0.f, 0.25f},
                        {(1 << 20) + 5, 0, 0.1f, 0.f},
                        {3 * (1 << 20) + 1, 2, 0.01f, 0.7f},
                        {2, 1, 0.1f, 0.f},  // shorter than the head to the first boundary
                        {40001, 0, 0.1f, 0.5f, 1},
                        {33333, 2, 0.f, 0.f, 0}};
  const float lr = 3e-3f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "n=" << c.n << " offset=" << c.offset
                                      << " wd=" << c.weight_decay << " scale=" << c.grad_scale
                                      << " grad_offset=" << c.grad_offset);
    std::vector<float> p = RandomFloats(c.n, 1), m(c.n, 0.f), v(c.n, 0.f);
    DeviceArray<float> d_p(p, c.offset), d_m(m, c.offset), d_v(v, c.offset),
        d_g(c.n, c.grad_offset >= 0 ? c.grad_offset : c.offset);
    DeviceArray<bf16> d_pb(c.n, c.offset);
    DeviceArray<float> d_scale(std::vector<float>{c.grad_scale});
    for (int t = 1; t <= 3; ++t) {
      std::vector<float> g = RandomFloats(c.n, 10 + t, -0.1, 0.1);
      d_g.Upload(g);
      if (c.grad_scale != 0.f) {
        for (float& x : g) x *= c.grad_scale;  // what the kernel does, one float multiply
      }
      adamw_update(p.data(), g.data(), m.data(), v.data(), c.n, lr, beta1, beta2, eps,
                   c.weight_decay, t);
      QT_ASSERT_OK(adamw_update_cuda(d_p.get(), d_pb.get(), d_g.get(), d_m.get(), d_v.get(), c.n,
                                     lr, beta1, beta2, eps, c.weight_decay, t,
                                     c.grad_scale != 0.f ? d_scale.get() : nullptr,
                                     stream.get()));
    }
    QT_ASSERT_OK(stream.Sync());
    const std::vector<float> gp = d_p.ToHost("params"), gm = d_m.ToHost("m"),
                             gv = d_v.ToHost("v");
    // Only multiply-add contraction may differ between g++ and nvcc: a few ulp of each term.
    testing::ExpectNear(gm, m, 1e-9, 1e-6, "m");
    testing::ExpectNear(gv, v, 1e-12, 1e-5, "v");
    testing::ExpectNear(gp, p, 1e-7, 1e-6, "params");
    const std::vector<bf16> pb = d_pb.ToHost("params_bf16");
    int mismatches = 0;
    for (int64_t i = 0; i < c.n; ++i) {
      if (pb[i].bits != FloatToBf16(gp[i]).bits && mismatches++ < 5) {
        ADD_FAILURE() << "params_bf16[" << i << "] = " << Bf16ToFloat(pb[i])
                      << " is not the rounding of " << gp[i];
      }
    }
    EXPECT_EQ(mismatches, 0);
  }
}

TEST(AdamwCudaTest, NullBf16CopyIsSkipped) {
  QT_SKIP_WITHOUT_GPU();
  const int64_t n = 77;
  std::vector<float> p = RandomFloats(n, 2), g = RandomFloats(n, 3), m(n, 0.f), v(n, 0.f);
  DeviceArray<float> d_p(p), d_g(g), d_m(m), d_v(v);
  QT_ASSERT_OK(adamw_update_cuda(d_p.get(), nullptr, d_g.get(), d_m.get(), d_v.get(), n, 1e-3f,
                                 0.9f, 0.999f, 1e-8f, 0.f, 1, nullptr, nullptr));
  QT_ASSERT_OK(SynchronizeDevice());
  adamw_update(p.data(), g.data(), m.data(), v.data(), n, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.f, 1);
  testing::ExpectNear(d_p.ToHost("params"), p, 1e-7, 1e-6, "params");
  // The multi form too, over two segments of the same buffers (step 2).
  const std::vector<AdamwSegment> segments = {{0, 40, true}, {40, n - 40, false}};
  absl::StatusOr<std::unique_ptr<AdamwPlan>> plan = AdamwPlan::Create(segments, n);
  QT_ASSERT_OK(plan.status());
  QT_ASSERT_OK(adamw_update_multi_cuda(**plan, d_p.get(), nullptr, d_g.get(), d_m.get(),
                                       d_v.get(), 1e-3f, 0.9f, 0.999f, 1e-8f, 0.1f, 2, nullptr,
                                       nullptr));
  QT_ASSERT_OK(SynchronizeDevice());
  adamw_update(p.data(), g.data(), m.data(), v.data(), 40, 1e-3f, 0.9f, 0.999f, 1e-8f, 0.1f, 2);
  adamw_update(p.data() + 40, g.data() + 40, m.data() + 40, v.data() + 40, n - 40, 1e-3f, 0.9f,
               0.999f, 1e-8f, 0.f, 2);
  testing::ExpectNear(d_p.ToHost("params"), p, 1e-7, 1e-6, "params after the multi step");
}

TEST(AdamwCudaTest, Bf16GradOverloadRejectsBadArguments) {
  float f = 0;
  const bf16 gb{0};
  absl::Status s = adamw_update_cuda(&f, nullptr, static_cast<const bf16*>(nullptr), &f, &f, 1,
                                     1e-3f, 0.9f, 0.95f, 1e-8f, 0.f, 1, nullptr, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("grads=0"), absl::string_view::npos) << s;
  s = adamw_update_cuda(&f, nullptr, &gb, &f, &f, -1, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.f, 1, nullptr,
                        nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("n must be >= 0"), absl::string_view::npos) << s;
}

// Runs without a GPU: the plan checks its segments on the host before any CUDA call, and a plan
// without elements allocates nothing.
TEST(AdamwCudaTest, PlanRejectsBadSegments) {
  struct Bad {
    std::vector<AdamwSegment> segments;
    int64_t n;
    const char* message;
  };
  const int64_t kMax = std::numeric_limits<int64_t>::max();
  const Bad bad[] = {
      {{{0, 10, true}, {-1, 5, false}}, 100,
       "segment 1 (offset=-1 size=5) is not inside [0, 100)"},
      {{{0, -2, true}}, 100, "segment 0 (offset=0 size=-2) is not inside [0, 100)"},
      {{{0, 10, true}, {95, 6, true}}, 100,
       "segment 1 (offset=95 size=6) is not inside [0, 100)"},
      {{{kMax, 1, true}}, 100, "segment 0 (offset=9223372036854775807 size=1)"},
      {{{5, kMax, true}}, 100, "segment 0 (offset=5 size=9223372036854775807)"},
      {{{50, 10, true}, {0, 10, false}, {55, 1, true}}, 100,
       "segment 0 (offset=50 size=10) overlaps segment 2 (offset=55 size=1)"},
      {{{0, 10, true}, {10, 10, false}, {3, 1, true}}, 100,
       "segment 0 (offset=0 size=10) overlaps segment 2 (offset=3 size=1)"},
      {{{0, 1, true}}, -1, "n must be >= 0, got -1"},
  };
  for (const Bad& b : bad) {
    const absl::StatusOr<std::unique_ptr<AdamwPlan>> plan = AdamwPlan::Create(b.segments, b.n);
    ASSERT_FALSE(plan.ok()) << b.message;
    EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument) << plan.status();
    EXPECT_NE(plan.status().message().find(b.message), absl::string_view::npos)
        << plan.status() << "\n  expected: " << b.message;
  }
  // Empty segments contain nothing, so they may sit anywhere inside, even on each other.
  const std::vector<AdamwSegment> empty = {{3, 0, true}, {3, 0, false}, {10, 0, true}};
  for (const std::vector<AdamwSegment>& segments : {std::vector<AdamwSegment>{}, empty}) {
    absl::StatusOr<std::unique_ptr<AdamwPlan>> plan = AdamwPlan::Create(segments, 10);
    QT_ASSERT_OK(plan.status());
    EXPECT_EQ((*plan)->num_chunks(), 0);
    EXPECT_EQ((*plan)->num_elements(), 0);
    EXPECT_EQ((*plan)->size(), 10);
    // Nothing to launch; the arguments are still checked.
    float f = 0;
    QT_ASSERT_OK(adamw_update_multi_cuda(**plan, &f, nullptr, &f, &f, &f, 1e-3f, 0.9f, 0.95f,
                                         1e-8f, 0.1f, 1, nullptr, nullptr));
    const absl::Status s = adamw_update_multi_cuda(**plan, &f, nullptr, &f, &f, &f, 1e-3f, 0.9f,
                                                   0.95f, 1e-8f, 0.1f, 0, nullptr, nullptr);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find("adamw_update_multi_cuda: step t must be >= 1"),
              absl::string_view::npos)
        << s;
  }
}

// A flat buffer of kFlatN elements: segments of odd sizes at unaligned offsets, on and across
// chunk boundaries (multiples of 16384, hence of any smaller power-of-two chunk size), several
// chunks long, in no particular order, with
// gaps (elements 108..110, 56389..56399, 69999) that no segment covers and an empty segment.
constexpr int64_t kFlatN = 70000;
const std::vector<AdamwSegment>& FlatSegments() {
  static const std::vector<AdamwSegment> segments = {
      {16389, 40000, true}, {0, 1, true},    {111, 16273, false}, {1, 7, false},
      {56400, 13599, false}, {500, 0, true}, {8, 100, true},      {16384, 5, true}};
  return segments;
}
// Chunks of the plan: a segment is cut at every multiple of kChunkElements inside it.
int64_t FlatChunks() {
  const int64_t c = AdamwPlan::kChunkElements;
  int64_t chunks = 0;
  for (const AdamwSegment& s : FlatSegments()) {
    if (s.size > 0) chunks += (s.offset + s.size - 1) / c - s.offset / c + 1;
  }
  return chunks;
}

// Offsets (elements) of each flat array from its allocation's 16-byte alignment.
struct Layout {
  const char* name;
  int p, g, m, v, pb;
};
const Layout kLayouts[] = {
    {"aligned", 0, 0, 0, 0, 0},        {"phase 1", 1, 1, 1, 1, 1},
    {"phase 3", 3, 3, 3, 3, 3},        {"grads off phase (scalar)", 0, 2, 0, 0, 0},
    {"bf16 copy off phase (scalar)", 2, 2, 2, 2, 3}, {"v off phase (scalar)", 1, 1, 1, 0, 1},
};

// One set of flat device buffers; p, m, v start from values fixed by the seed.
struct Flat {
  Flat(int64_t n, const Layout& l)
      : p0(RandomFloats(n, 7)),
        m0(RandomFloats(n, 8, -0.01, 0.01)),
        v0(RandomFloats(n, 9, 0.0, 1e-4)),
        p(p0, l.p),
        m(m0, l.m),
        v(v0, l.v),
        g(n, l.g),
        gb(n, l.g),
        pb(n, l.pb) {}
  std::vector<float> p0, m0, v0;
  DeviceArray<float> p, m, v, g;
  DeviceArray<bf16> gb, pb;
};

constexpr float kLr = 3e-3f, kBeta1 = 0.9f, kBeta2 = 0.95f, kEps = 1e-8f, kWd = 0.1f;

// Bitwise equality of the state of two buffers (NaN poison included).
void ExpectSameState(const Flat& a, const Flat& b, const std::string& what) {
  testing::ExpectBitwiseEqual(a.p.ToHost("params"), b.p.ToHost("params"), what + " params");
  testing::ExpectBitwiseEqual(a.m.ToHost("m"), b.m.ToHost("m"), what + " m");
  testing::ExpectBitwiseEqual(a.v.ToHost("v"), b.v.ToHost("v"), what + " v");
  testing::ExpectBitwiseEqual(a.pb.ToHost("params_bf16"), b.pb.ToHost("params_bf16"),
                              what + " params_bf16");
}

TEST(AdamwCudaTest, MultiMatchesPerRangeCallsBitwiseAndCpu) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  absl::StatusOr<std::unique_ptr<AdamwPlan>> plan_or = AdamwPlan::Create(FlatSegments(), kFlatN);
  QT_ASSERT_OK(plan_or.status());
  const AdamwPlan& plan = **plan_or;
  EXPECT_EQ(plan.num_chunks(), FlatChunks());
  EXPECT_EQ(plan.num_elements(), kFlatN - 15);
  DeviceArray<float> d_scale(std::vector<float>{0.5f});
  for (const Layout& layout : kLayouts) {
    for (bool scaled : {false, true}) {
      SCOPED_TRACE(::testing::Message() << layout.name << (scaled ? ", grad_scale" : ""));
      const float* scale = scaled ? d_scale.get() : nullptr;
      Flat multi(kFlatN, layout), single(kFlatN, layout);
      std::vector<float> p = multi.p0, m = multi.m0, v = multi.v0;
      for (int t = 1; t <= 3; ++t) {
        std::vector<float> g = RandomFloats(kFlatN, 20 + t, -0.1, 0.1);
        multi.g.Upload(g);
        single.g.Upload(g);
        QT_ASSERT_OK(adamw_update_multi_cuda(plan, multi.p.get(), multi.pb.get(), multi.g.get(),
                                             multi.m.get(), multi.v.get(), kLr, kBeta1, kBeta2,
                                             kEps, kWd, t, scale, stream.get()));
        if (scaled) {
          for (float& x : g) x *= 0.5f;  // what the kernel does, one float multiply
        }
        for (const AdamwSegment& s : FlatSegments()) {
          const int64_t o = s.offset;
          const float wd = s.decay ? kWd : 0.f;
          QT_ASSERT_OK(adamw_update_cuda(single.p.get() + o, single.pb.get() + o,
                                         single.g.get() + o, single.m.get() + o,
                                         single.v.get() + o, s.size, kLr, kBeta1, kBeta2, kEps,
                                         wd, t, scale, stream.get()));
          adamw_update(p.data() + o, g.data() + o, m.data() + o, v.data() + o, s.size, kLr,
                       kBeta1, kBeta2, kEps, wd, t);
        }
      }
      QT_ASSERT_OK(stream.Sync());
      ExpectSameState(multi, single, "multi vs per-range");
      const std::vector<float> gp = multi.p.ToHost("params"), gm = multi.m.ToHost("m"),
                               gv = multi.v.ToHost("v");
      testing::ExpectNear(gm, m, 1e-9, 1e-6, "m");
      testing::ExpectNear(gv, v, 1e-12, 1e-5, "v");
      testing::ExpectNear(gp, p, 1e-7, 1e-6, "params");
      // Inside segments the BF16 copy is the rounding of the params; in the gaps nothing moved.
      std::vector<bool> covered(kFlatN, false);
      for (const AdamwSegment& s : FlatSegments()) {
        for (int64_t i = s.offset; i < s.offset + s.size; ++i) covered[i] = true;
      }
      const std::vector<bf16> pb = multi.pb.ToHost("params_bf16");
      int bad = 0;
      for (int64_t i = 0; i < kFlatN; ++i) {
        const bool ok =
            covered[i]
                ? pb[i].bits == FloatToBf16(gp[i]).bits
                : testing::IsPoison(pb[i]) && std::memcmp(&gp[i], &multi.p0[i], 4) == 0 &&
                      std::memcmp(&gm[i], &multi.m0[i], 4) == 0 &&
                      std::memcmp(&gv[i], &multi.v0[i], 4) == 0;
        if (!ok && bad++ < 5) {
          ADD_FAILURE() << (covered[i] ? "params_bf16 is not the rounding of params"
                                       : "gap element was written")
                        << " at " << i;
        }
      }
      EXPECT_EQ(bad, 0);
    }
  }
}

// BF16 gradients against fp32 gradients holding the same values: single range and multi, every
// layout, with and without the scale; all state bit for bit.
TEST(AdamwCudaTest, Bf16GradsMatchFp32GradsBitwise) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  absl::StatusOr<std::unique_ptr<AdamwPlan>> plan_or = AdamwPlan::Create(FlatSegments(), kFlatN);
  QT_ASSERT_OK(plan_or.status());
  const AdamwPlan& plan = **plan_or;
  DeviceArray<float> d_scale(std::vector<float>{0.25f});
  for (const Layout& layout : kLayouts) {
    for (bool multi : {false, true}) {
      for (bool scaled : {false, true}) {
        SCOPED_TRACE(::testing::Message() << layout.name << (multi ? ", multi" : ", single")
                                          << (scaled ? ", grad_scale" : ""));
        const float* scale = scaled ? d_scale.get() : nullptr;
        Flat f32(kFlatN, layout), b16(kFlatN, layout);
        for (int t = 1; t <= 2; ++t) {
          const testing::Bf16Data g = testing::RandomBf16(kFlatN, 40 + t, -0.1, 0.1);
          f32.g.Upload(g.values);
          b16.gb.Upload(g.bits);
          if (multi) {
            QT_ASSERT_OK(adamw_update_multi_cuda(plan, f32.p.get(), f32.pb.get(), f32.g.get(),
                                                 f32.m.get(), f32.v.get(), kLr, kBeta1, kBeta2,
                                                 kEps, kWd, t, scale, stream.get()));
            QT_ASSERT_OK(adamw_update_multi_cuda(plan, b16.p.get(), b16.pb.get(), b16.gb.get(),
                                                 b16.m.get(), b16.v.get(), kLr, kBeta1, kBeta2,
                                                 kEps, kWd, t, scale, stream.get()));
          } else {
            QT_ASSERT_OK(adamw_update_cuda(f32.p.get(), f32.pb.get(), f32.g.get(), f32.m.get(),
                                           f32.v.get(), kFlatN, kLr, kBeta1, kBeta2, kEps, kWd,
                                           t, scale, stream.get()));
            QT_ASSERT_OK(adamw_update_cuda(b16.p.get(), b16.pb.get(), b16.gb.get(), b16.m.get(),
                                           b16.v.get(), kFlatN, kLr, kBeta1, kBeta2, kEps, kWd,
                                           t, scale, stream.get()));
          }
        }
        QT_ASSERT_OK(stream.Sync());
        ExpectSameState(b16, f32, "bf16 vs fp32 grads");
        // Not vacuous: the params moved.
        const std::vector<float> gp = b16.p.ToHost("params");
        EXPECT_NE(std::memcmp(gp.data(), b16.p0.data(), 4 * 8), 0);
      }
    }
  }
}

}  // namespace
}  // namespace qtrain::ops
