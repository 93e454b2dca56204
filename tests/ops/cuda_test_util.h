// Helpers of the GPU parity tests: device arrays poisoned with NaN (0xFF bytes) and followed by
// a guard band that must stay poisoned, BF16 rounding of host data, and tolerance checks that
// report the worst elements. Host code only (the CUDA runtime is reached through device.h).
#ifndef QTRAIN_TESTS_OPS_CUDA_TEST_UTIL_H_
#define QTRAIN_TESTS_OPS_CUDA_TEST_UTIL_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "ops/cuda/bf16.h"
#include "ops/cuda/device.h"

namespace qtrain::ops::testing {

// 2^-8: the unit roundoff of BF16 (8 significant bits), the bound of one rounding's relative
// error; tolerances add one term per rounding a result goes through.
constexpr double kBf16Eps = 1.0 / 256;
constexpr int64_t kGuard = 64;          // poisoned elements after every array

// Without a device the GPU tests skip, except where QTRAIN_REQUIRE_GPU is set (tools/gpu_tests.sh
// sets it), so that a broken driver on the GPU machine fails instead of passing vacuously.
inline bool HaveGpu() {
  const absl::StatusOr<int> count = DeviceCount();
  EXPECT_TRUE(count.ok()) << count.status();
  const bool have = count.ok() && *count > 0;
  if (!have && std::getenv("QTRAIN_REQUIRE_GPU") != nullptr) {
    ADD_FAILURE() << "QTRAIN_REQUIRE_GPU is set but no CUDA device is usable";
  }
  return have;
}

#define QT_SKIP_WITHOUT_GPU() \
  if (!::qtrain::ops::testing::HaveGpu()) GTEST_SKIP() << "no CUDA device"

#define QT_ASSERT_OK(expr)                                   \
  do {                                                       \
    const ::absl::Status qt_test_status_ = (expr);           \
    ASSERT_TRUE(qt_test_status_.ok()) << qt_test_status_;    \
  } while (0)

// True when all bytes of x are 0xFF: the poison pattern (a NaN for float and BF16, -1 for ints).
template <typename T>
bool IsPoison(const T& x) {
  unsigned char bytes[sizeof(T)];
  std::memcpy(bytes, &x, sizeof(T));
  for (unsigned char b : bytes) {
    if (b != 0xFF) return false;
  }
  return true;
}

// n elements of T on the device plus kGuard poisoned ones; `offset` extra leading poisoned
// elements shift get() off the allocation's alignment (for the unaligned dispatch branches).
template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(int64_t n, int64_t offset = 0)
      : n_(n), offset_(offset), total_(offset + n + kGuard) {
    absl::StatusOr<void*> p = DeviceMalloc(total_ * static_cast<int64_t>(sizeof(T)));
    EXPECT_TRUE(p.ok()) << p.status();
    if (p.ok()) base_ = static_cast<T*>(*p);
    Poison();
  }
  DeviceArray(const std::vector<T>& host, int64_t offset = 0)
      : DeviceArray(static_cast<int64_t>(host.size()), offset) {
    Upload(host);
  }
  ~DeviceArray() { EXPECT_TRUE(DeviceFree(base_).ok()); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;

  T* get() { return base_ + offset_; }
  const T* get() const { return base_ + offset_; }
  int64_t size() const { return n_; }
  int64_t bytes() const { return n_ * static_cast<int64_t>(sizeof(T)); }

  // Both wait for the device: cudaMemset and a pageable cudaMemcpy may still be in flight when
  // they return, and the kernels under test run on non-blocking streams that do not order
  // after the legacy default stream.
  void Poison() {
    const absl::Status s = DeviceMemset(base_, 0xFF, total_ * static_cast<int64_t>(sizeof(T)));
    EXPECT_TRUE(s.ok()) << s;
    EXPECT_TRUE(SynchronizeDevice().ok());
  }
  void Upload(const std::vector<T>& host) {
    ASSERT_EQ(static_cast<int64_t>(host.size()), n_);
    const absl::Status s = CopyHostToDevice(get(), host.data(), bytes());
    ASSERT_TRUE(s.ok()) << s;
    ASSERT_TRUE(SynchronizeDevice().ok());
  }
  // The n elements; fails the test if the guard band or the leading offset lost its poison.
  std::vector<T> ToHost(const std::string& what = "") const {
    std::vector<T> all(total_);
    const absl::Status s =
        CopyDeviceToHost(all.data(), base_, total_ * static_cast<int64_t>(sizeof(T)));
    EXPECT_TRUE(s.ok()) << s;
    for (int64_t i = 0; i < offset_; ++i) {
      EXPECT_TRUE(IsPoison(all[i])) << what << ": written before the start at " << i - offset_;
    }
    for (int64_t i = offset_ + n_; i < total_; ++i) {
      if (!IsPoison(all[i])) {
        ADD_FAILURE() << what << ": written past the end at " << i - offset_ << " (n=" << n_
                      << ")";
        break;
      }
    }
    return std::vector<T>(all.begin() + offset_, all.begin() + offset_ + n_);
  }

 private:
  int64_t n_, offset_, total_;
  T* base_ = nullptr;
};

// Random values in [lo, hi) rounded to BF16, returned both as bf16 and as the exact floats.
struct Bf16Data {
  std::vector<bf16> bits;
  std::vector<float> values;
};

inline Bf16Data RandomBf16(int64_t n, uint32_t seed, double lo = -1.0, double hi = 1.0) {
  std::vector<double> d(n);
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  for (double& x : d) x = dist(gen);
  Bf16Data out;
  out.bits.resize(n);
  out.values.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    out.bits[i] = FloatToBf16(static_cast<float>(d[i]));
    out.values[i] = Bf16ToFloat(out.bits[i]);
  }
  return out;
}

inline std::vector<float> RandomFloats(int64_t n, uint32_t seed, double lo = -1.0,
                                       double hi = 1.0) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = static_cast<float>(dist(gen));
  return v;
}

inline std::vector<float> ToFloats(const std::vector<bf16>& v) { return Bf16ToFloat(v); }

// Elementwise |got - ref| <= atol[i] + rtol * |ref| (atol per element or one value); NaN in
// got fails unless ref is NaN too. Reports the first failures and the worst ratio.
template <typename G, typename R>
void ExpectNear(const std::vector<G>& got, const std::vector<R>& ref, double atol, double rtol,
                const std::string& what, const std::vector<double>* atol_per_element = nullptr) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  int failures = 0;
  double worst = 0;
  size_t worst_i = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double g = static_cast<double>(got[i]), r = static_cast<double>(ref[i]);
    if (std::isnan(r) && std::isnan(g)) continue;
    const double tol = (atol_per_element ? (*atol_per_element)[i] : atol) + rtol * std::abs(r);
    const double err = std::abs(g - r);
    const double ratio = tol > 0 ? err / tol : (err > 0 ? INFINITY : 0);
    if (!(ratio <= worst)) {  // NaN lands here too
      worst = std::isnan(ratio) ? INFINITY : ratio;
      worst_i = i;
    }
    if (!(err <= tol) && failures++ < 8) {
      ADD_FAILURE() << what << "[" << i << "]: gpu " << g << " ref " << r << " |err| " << err
                    << " > tol " << tol;
    }
  }
  EXPECT_EQ(failures, 0) << what << ": " << failures << " of " << got.size()
                         << " out of tolerance; worst err/tol " << worst << " at " << worst_i;
}

// ||got - ref|| / ||ref|| (0 when both are 0); NaN anywhere gives NaN.
template <typename G, typename R>
double RelL2(const std::vector<G>& got, const std::vector<R>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = static_cast<double>(got[i]) - static_cast<double>(ref[i]);
    num += d * d;
    den += static_cast<double>(ref[i]) * static_cast<double>(ref[i]);
  }
  if (den == 0) return num == 0 ? 0 : INFINITY;
  return std::sqrt(num / den);
}

inline double MaxAbs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, std::abs(static_cast<double>(x)));
  return m;
}

// Bitwise equality of two arrays (determinism checks).
template <typename T>
void ExpectBitwiseEqual(const std::vector<T>& a, const std::vector<T>& b,
                        const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::memcmp(&a[i], &b[i], sizeof(T)) != 0) {
      ADD_FAILURE() << what << ": runs differ first at " << i;
      return;
    }
  }
}

// A stream for the test's lifetime.
class TestStream {
 public:
  TestStream() {
    absl::StatusOr<cudaStream_t> s = CreateStream();
    EXPECT_TRUE(s.ok()) << s.status();
    if (s.ok()) stream_ = *s;
  }
  ~TestStream() {
    if (stream_ != nullptr) {
      EXPECT_TRUE(DestroyStream(stream_).ok());
    }
  }
  cudaStream_t get() const { return stream_; }
  absl::Status Sync() const { return SynchronizeStream(stream_); }

 private:
  cudaStream_t stream_ = nullptr;
};

}  // namespace qtrain::ops::testing

#endif  // QTRAIN_TESTS_OPS_CUDA_TEST_UTIL_H_
