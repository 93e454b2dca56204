// GPU parity of the CUDA AdamW step against the CPU reference (ops/adamw.h): several steps,
// weight decay on/off, both access branches, the gradient scale, and the BF16 copy, which must
// be exactly the nearest-even rounding of the fp32 params. Tagged "gpu".
#include "ops/cuda/adamw_cuda.h"

#include <cmath>
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
  s = adamw_update_cuda(&f, nullptr, nullptr, &f, &f, 1, 1e-3f, 0.9f, 0.95f, 1e-8f, 0.f, 1,
                        nullptr, nullptr);
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
  int offset;  // floats (and bf16s) off 16-byte alignment: the element-wise branch
  float weight_decay;
  float grad_scale;  // 0: none
};

TEST(AdamwCudaTest, StepsMatchCpuAndBf16CopyIsExact) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  const Case cases[] = {{1, 0, 0.f, 0.f},        {3, 0, 0.1f, 0.f},     {1000, 0, 0.1f, 0.5f},
                        {1001, 1, 0.1f, 0.f},    {4097, 3, 0.f, 0.25f}, {(1 << 20) + 5, 0, 0.1f, 0.f},
                        {3 * (1 << 20) + 1, 2, 0.01f, 0.7f}};
  const float lr = 3e-3f, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
  for (const Case& c : cases) {
    SCOPED_TRACE(::testing::Message() << "n=" << c.n << " offset=" << c.offset
                                      << " wd=" << c.weight_decay << " scale=" << c.grad_scale);
    std::vector<float> p = RandomFloats(c.n, 1), m(c.n, 0.f), v(c.n, 0.f);
    DeviceArray<float> d_p(p, c.offset), d_m(m, c.offset), d_v(v, c.offset), d_g(c.n, c.offset);
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
}

}  // namespace
}  // namespace qtrain::ops
