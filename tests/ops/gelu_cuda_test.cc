// GPU parity of the CUDA GELU (fp32 and BF16 storage) against the CPU reference (ops/gelu.h) on
// odd sizes, with the outputs poisoned by NaN first and a NaN guard band past n that must stay
// untouched. Tagged "gpu"; the argument checks need no device and run wherever the binary does.
#include "ops/cuda/gelu_cuda.h"

#include <cfloat>
#include <cmath>
#include <limits>
#include <vector>

#include "gtest/gtest.h"
#include "ops/cuda/device.h"
#include "ops/gelu.h"
#include "tests/ops/cuda_test_util.h"
#include "tests/ops/grad_check.h"

namespace qtrain::ops {
namespace {

using testing::RandomVector;
using testing::ToFloat;

constexpr int64_t kGuard = 37;  // NaN elements after the n valid ones
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
// Device tanhf is within 2 ulp, glibc's within 1; the backward's 1 - tanh^2 amplifies that
// by up to ~|x|, hence the absolute floor.
constexpr double kAtol = 1e-5, kRtol = 16 * FLT_EPSILON;

// Odd sizes: one element, less than a warp, ragged blocks, and more than the launcher's grid
// (4096 blocks x 256 threads) so the grid-stride loop runs several rounds.
const int64_t kSizes[] = {1, 7, 257, 100003, 3 * 4096 * 256 + 13};

// Skips without a device, or fails where QTRAIN_REQUIRE_GPU is set (tools/gpu_tests.sh).
bool HaveGpu() { return testing::HaveGpu(); }

#define SKIP_WITHOUT_GPU() \
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device"

// Device buffer of n + kGuard floats holding `init` (length n or n + kGuard), NaN elsewhere.
class DeviceBuffer {
 public:
  DeviceBuffer(int64_t n, const std::vector<float>& init) : size_(n + kGuard) {
    std::vector<float> host(size_, kNaN);
    std::copy(init.begin(), init.end(), host.begin());
    absl::StatusOr<void*> ptr = DeviceMalloc(size_ * sizeof(float));
    EXPECT_TRUE(ptr.ok()) << ptr.status();
    if (!ptr.ok()) return;
    ptr_ = static_cast<float*>(*ptr);
    const absl::Status s = CopyHostToDevice(ptr_, host.data(), size_ * sizeof(float));
    EXPECT_TRUE(s.ok()) << s;
  }
  ~DeviceBuffer() { EXPECT_TRUE(DeviceFree(ptr_).ok()); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  float* get() { return ptr_; }
  std::vector<float> ToHost() const {
    std::vector<float> host(size_);
    const absl::Status s = CopyDeviceToHost(host.data(), ptr_, size_ * sizeof(float));
    EXPECT_TRUE(s.ok()) << s;
    return host;
  }

 private:
  int64_t size_;
  float* ptr_ = nullptr;
};

// Inputs in [-8, 8] plus the edges: 0, huge magnitudes where tanh saturates.
std::vector<float> Inputs(int64_t n, uint32_t seed) {
  std::vector<float> x = ToFloat(RandomVector(n, seed, -8, 8));
  const float specials[] = {0.f, -0.f, 30.f, -30.f, 1e4f, -1e4f};
  for (int i = 0; i < 6 && i < n; ++i) x[(i * 7919) % n] = specials[i];
  return x;
}

void ExpectMatchesAndGuardIntact(const std::vector<float>& got, const std::vector<float>& ref,
                                 int64_t n, const char* what) {
  int failures = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double tol = kAtol + kRtol * std::abs(ref[i]);
    if (!(std::abs(double{got[i]} - ref[i]) <= tol) && failures++ < 10) {
      ADD_FAILURE() << what << " n=" << n << " [" << i << "]: gpu " << got[i] << " cpu "
                    << ref[i];
    }
  }
  EXPECT_EQ(failures, 0) << what << " n=" << n;
  for (int64_t i = n; i < n + kGuard; ++i) {
    ASSERT_TRUE(std::isnan(got[i])) << what << " n=" << n << " wrote past the end at " << i;
  }
}

TEST(GeluCudaTest, RejectsBadArgumentsWithoutTouchingTheDevice) {
  float buf = 0.f;
  absl::Status s = gelu_forward_cuda(&buf, &buf, -1, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("-1"), absl::string_view::npos) << s;
  EXPECT_EQ(gelu_forward_cuda(nullptr, &buf, 1, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  s = gelu_backward_cuda(&buf, nullptr, &buf, 3, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("inp"), absl::string_view::npos) << s;
  EXPECT_EQ(gelu_backward_cuda(&buf, &buf, nullptr, 3, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(gelu_backward_cuda(&buf, &buf, &buf, -5, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  // n == 0 launches nothing, so it succeeds even on a machine without a GPU.
  EXPECT_TRUE(gelu_forward_cuda(&buf, &buf, 0, nullptr).ok());
}

TEST(GeluCudaTest, ForwardMatchesCpuReference) {
  SKIP_WITHOUT_GPU();
  for (int64_t n : kSizes) {
    const std::vector<float> x = Inputs(n, 1);
    std::vector<float> ref(n);
    gelu_forward(ref.data(), x.data(), n);
    DeviceBuffer d_in(n, x), d_out(n, {});  // output all NaN
    ASSERT_TRUE(gelu_forward_cuda(d_out.get(), d_in.get(), n, nullptr).ok());
    ASSERT_TRUE(SynchronizeDevice().ok());
    ExpectMatchesAndGuardIntact(d_out.ToHost(), ref, n, "forward");
  }
}

TEST(GeluCudaTest, BackwardAccumulatesLikeCpuReference) {
  SKIP_WITHOUT_GPU();
  const absl::StatusOr<cudaStream_t> stream_or = CreateStream();
  ASSERT_TRUE(stream_or.ok()) << stream_or.status();
  cudaStream_t stream = *stream_or;
  for (int64_t n : kSizes) {
    const std::vector<float> x = Inputs(n, 2), dy = ToFloat(RandomVector(n, 3));
    const std::vector<float> start = ToFloat(RandomVector(n, 4));
    std::vector<float> ref = start;
    gelu_backward(ref.data(), x.data(), dy.data(), n);
    gelu_backward(ref.data(), x.data(), dy.data(), n);
    DeviceBuffer d_x(n, x), d_dy(n, dy), d_dx(n, start);  // guard band NaN
    for (int rep = 0; rep < 2; ++rep) {
      const absl::Status s = gelu_backward_cuda(d_dx.get(), d_x.get(), d_dy.get(), n, stream);
      ASSERT_TRUE(s.ok()) << s;
    }
    ASSERT_TRUE(SynchronizeStream(stream).ok());
    ExpectMatchesAndGuardIntact(d_dx.ToHost(), ref, n, "backward x2");
  }
  EXPECT_TRUE(DestroyStream(stream).ok());
}

TEST(GeluCudaTest, ForwardOnAStreamWithUnalignedPointers) {
  SKIP_WITHOUT_GPU();
  // Views at an odd offset: kernels must not assume vector alignment.
  const int64_t n = 1001;
  const std::vector<float> x = Inputs(n + 1, 5);
  std::vector<float> ref(n);
  gelu_forward(ref.data(), x.data() + 1, n);
  DeviceBuffer d_in(n + 1, x), d_out(n + 1, {});
  const absl::StatusOr<cudaStream_t> stream = CreateStream();
  ASSERT_TRUE(stream.ok()) << stream.status();
  ASSERT_TRUE(gelu_forward_cuda(d_out.get() + 1, d_in.get() + 1, n, *stream).ok());
  ASSERT_TRUE(SynchronizeStream(*stream).ok());
  EXPECT_TRUE(DestroyStream(*stream).ok());
  std::vector<float> got = d_out.ToHost();
  EXPECT_TRUE(std::isnan(got[0])) << "wrote before the start";
  got.erase(got.begin());
  ExpectMatchesAndGuardIntact(got, ref, n, "forward offset");
}

// ---- BF16 storage: inputs are BF16 values, the reference is the fp32 CPU op on them, and the
// only extra error is the one rounding of the output (2^-8 relative) ----

std::vector<float> Bf16Inputs(int64_t n, uint32_t seed) {
  std::vector<float> x = Inputs(n, seed);
  for (float& v : x) v = Bf16ToFloat(FloatToBf16(v));
  return x;
}

TEST(GeluCudaTest, Bf16RejectsBadArguments) {
  bf16 b{};
  EXPECT_EQ(gelu_forward_cuda(&b, &b, -1, nullptr).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(gelu_forward_cuda(static_cast<bf16*>(nullptr), &b, 1, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  const absl::Status s = gelu_backward_cuda(&b, &b, static_cast<const bf16*>(nullptr), 2, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("dout"), absl::string_view::npos) << s;
  EXPECT_TRUE(gelu_forward_cuda(&b, &b, 0, nullptr).ok());
}

TEST(GeluCudaTest, Bf16ForwardMatchesCpuReference) {
  SKIP_WITHOUT_GPU();
  for (int64_t offset : {0, 1}) {  // 16-byte vector branch, element-wise branch
    for (int64_t n : kSizes) {
      const std::vector<float> x = Bf16Inputs(n, 11);
      std::vector<float> ref(n);
      gelu_forward(ref.data(), x.data(), n);
      testing::DeviceArray<bf16> d_in(ToBf16(x), offset), d_out(n, offset);
      const absl::Status s = gelu_forward_cuda(d_out.get(), d_in.get(), n, nullptr);
      ASSERT_TRUE(s.ok()) << s;
      ASSERT_TRUE(SynchronizeDevice().ok());
      testing::ExpectNear(Bf16ToFloat(d_out.ToHost("bf16 forward")), ref, kAtol,
                          testing::kBf16Eps, "bf16 forward");
    }
  }
}

TEST(GeluCudaTest, Bf16BackwardAccumulatesLikeCpuReference) {
  SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  for (int64_t offset : {0, 1}) {
    for (int64_t n : kSizes) {
      const std::vector<float> x = Bf16Inputs(n, 12);
      const auto dy = testing::RandomBf16(n, 13), start = testing::RandomBf16(n, 14);
      std::vector<float> ref = start.values;
      gelu_backward(ref.data(), x.data(), dy.values.data(), n);
      testing::DeviceArray<bf16> d_x(ToBf16(x), offset), d_dy(dy.bits, offset),
          d_dx(start.bits, offset);
      const absl::Status s =
          gelu_backward_cuda(d_dx.get(), d_x.get(), d_dy.get(), n, stream.get());
      ASSERT_TRUE(s.ok()) << s;
      ASSERT_TRUE(stream.Sync().ok());
      testing::ExpectNear(Bf16ToFloat(d_dx.ToHost("bf16 backward")), ref, kAtol,
                          testing::kBf16Eps, "bf16 backward");
    }
  }
}

}  // namespace
}  // namespace qtrain::ops
