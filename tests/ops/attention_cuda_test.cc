// GPU parity of the CUDA flash attention against the CPU reference (ops/attention.h), which
// materializes T x T: forward output and log-sum-exp, backward (accumulated into dinp) for the
// tensor-core kernel at every head size it supports and the plain kernel at others, odd T
// (partial tiles, single row), many tiles, unaligned input, bit-identical reruns, and the two
// implementations against each other; cuDNN's fused attention (kCudnn, where the GPU and cuDNN
// support it) against the same reference with NaN-poisoned outputs. Tagged "gpu".
#include "ops/cuda/attention_cuda.h"

#include <cmath>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "ops/attention.h"
#include "tests/ops/cuda_test_util.h"

namespace qtrain::ops {
namespace {

using testing::DeviceArray;
using testing::kBf16Eps;
using testing::RandomBf16;

struct Shape {
  int B, T, NH, hs;
};

std::string Name(const Shape& s, AttentionKernel k) {
  return ::testing::PrintToString(s.B) + "x" + ::testing::PrintToString(s.T) + " NH=" +
         ::testing::PrintToString(s.NH) + " hs=" + ::testing::PrintToString(s.hs) +
         (k == AttentionKernel::kSimple ? " simple"
          : k == AttentionKernel::kCudnn ? " cudnn"
                                         : " tensor-core");
}

// log-sum-exp of the scaled scores per (b, h, t), in double.
std::vector<double> LseRef(const std::vector<float>& inp, const Shape& s) {
  const int C = s.NH * s.hs;
  const int64_t C3 = 3LL * C;
  const double scale = 1.0 / std::sqrt(static_cast<double>(s.hs));
  std::vector<double> lse(static_cast<size_t>(s.B) * s.NH * s.T);
  std::vector<double> row(s.T);
  for (int b = 0; b < s.B; ++b) {
    for (int h = 0; h < s.NH; ++h) {
      for (int t = 0; t < s.T; ++t) {
        const float* q = inp.data() + (static_cast<int64_t>(b) * s.T + t) * C3 + h * s.hs;
        double maxv = -INFINITY;
        for (int t2 = 0; t2 <= t; ++t2) {
          const float* k = inp.data() + (static_cast<int64_t>(b) * s.T + t2) * C3 + C + h * s.hs;
          double dot = 0;
          for (int i = 0; i < s.hs; ++i) dot += static_cast<double>(q[i]) * k[i];
          row[t2] = dot * scale;
          maxv = std::max(maxv, row[t2]);
        }
        double sum = 0;
        for (int t2 = 0; t2 <= t; ++t2) sum += std::exp(row[t2] - maxv);
        lse[(static_cast<size_t>(b) * s.NH + h) * s.T + t] = maxv + std::log(sum);
      }
    }
  }
  return lse;
}

struct Result {
  std::vector<float> out, lse, dinp;
};

// Runs forward and backward on the GPU; dinp starts from dinp0.
Result RunGpu(const Shape& s, AttentionKernel kernel, const std::vector<bf16>& inp,
              const std::vector<bf16>& dout, const std::vector<bf16>& dinp0,
              cudaStream_t stream, int offset = 0) {
  const int C = s.NH * s.hs;
  const int64_t n_out = static_cast<int64_t>(s.B) * s.T * C;
  Result r;
  DeviceArray<bf16> d_inp(inp, offset), d_out(n_out), d_dout(dout), d_dinp(dinp0);
  DeviceArray<float> d_lse(static_cast<int64_t>(s.B) * s.NH * s.T);
  const int64_t ws_bytes = attention_backward_cuda_workspace_bytes(s.B, s.T, s.NH);
  DeviceArray<unsigned char> ws(ws_bytes);
  absl::Status st =
      attention_forward_cuda(d_out.get(), d_lse.get(), d_inp.get(), s.B, s.T, C, s.NH, stream,
                             kernel);
  EXPECT_TRUE(st.ok()) << st;
  if (!st.ok()) return r;
  // cuDNN overwrites dinp (the caller poisons dinp0 to prove it).
  const GradWrite write =
      kernel == AttentionKernel::kCudnn ? GradWrite::kOverwrite : GradWrite::kAccumulate;
  st = attention_backward_cuda(d_dinp.get(), d_dout.get(), d_inp.get(), d_out.get(), d_lse.get(),
                               s.B, s.T, C, s.NH, ws.get(), ws_bytes, stream, kernel, write);
  EXPECT_TRUE(st.ok()) << st;
  st = SynchronizeStream(stream);
  EXPECT_TRUE(st.ok()) << st;
  r.out = Bf16ToFloat(d_out.ToHost("out"));
  r.lse = d_lse.ToHost("lse");
  r.dinp = Bf16ToFloat(d_dinp.ToHost("dinp"));
  return r;
}

// Compares one third (q, k or v) of dinp: the increments over dinp0 by relative L2 error, and
// every element with a floor of 2^-6 of the largest increment of that third.
void ExpectGradPart(const std::vector<float>& got, const std::vector<float>& ref,
                    const std::vector<float>& start, const Shape& s, int part,
                    const std::string& what) {
  const int C = s.NH * s.hs;
  std::vector<float> g, r, total_ref, total_got;
  for (int64_t row = 0; row < static_cast<int64_t>(s.B) * s.T; ++row) {
    for (int c = 0; c < C; ++c) {
      const int64_t i = row * 3 * C + static_cast<int64_t>(part) * C + c;
      g.push_back(got[i] - start[i]);
      r.push_back(ref[i] - start[i]);
      total_got.push_back(got[i]);
      total_ref.push_back(ref[i]);
    }
  }
  EXPECT_LT(testing::RelL2(g, r), 1.5e-2) << what;
  testing::ExpectNear(total_got, total_ref, testing::MaxAbs(r) / 64, kBf16Eps, what);
}

void CheckAgainstCpu(const Shape& s, AttentionKernel kernel, cudaStream_t stream,
                     int offset = 0) {
  SCOPED_TRACE(Name(s, kernel) + (offset ? " unaligned" : ""));
  const int C = s.NH * s.hs;
  const int64_t n_inp = static_cast<int64_t>(s.B) * s.T * 3 * C;
  const int64_t n_out = static_cast<int64_t>(s.B) * s.T * C;
  const auto inp = RandomBf16(n_inp, 1 + s.T + s.hs, -2, 2);
  const auto dout = RandomBf16(n_out, 2 + s.T);
  auto dinp0 = RandomBf16(n_inp, 3 + s.hs, -0.5, 0.5);
  if (kernel == AttentionKernel::kCudnn) {
    // Overwritten: NaN on the device, zero as the reference's starting point.
    for (int64_t i = 0; i < n_inp; ++i) {
      dinp0.bits[i] = bf16{0x7fc0};
      dinp0.values[i] = 0.f;
    }
  }
  std::vector<float> out_ref(n_out), att(static_cast<size_t>(s.B) * s.NH * s.T * s.T);
  attention_forward(out_ref.data(), att.data(), inp.values.data(), s.B, s.T, C, s.NH);
  std::vector<float> dinp_ref = dinp0.values, scratch(att.size());
  attention_backward(dinp_ref.data(), scratch.data(), dout.values.data(), inp.values.data(),
                     att.data(), s.B, s.T, C, s.NH);
  const std::vector<double> lse_ref = LseRef(inp.values, s);

  Result r = RunGpu(s, kernel, inp.bits, dout.bits, dinp0.bits, stream, offset);
  ASSERT_EQ(r.out.size(), out_ref.size());
  // P meets V in BF16 (2^-9 relative each), the output is rounded once: 2^-8 of |v| <= 2.
  testing::ExpectNear(r.out, out_ref, 2 * kBf16Eps, kBf16Eps, "out");
  testing::ExpectNear(r.lse, lse_ref, 1e-4, 1e-5, "lse");
  ExpectGradPart(r.dinp, dinp_ref, dinp0.values, s, 0, "dq");
  ExpectGradPart(r.dinp, dinp_ref, dinp0.values, s, 1, "dk");
  ExpectGradPart(r.dinp, dinp_ref, dinp0.values, s, 2, "dv");
}

TEST(AttentionCudaTest, RejectsBadArguments) {
  bf16 b{};
  float f = 0;
  absl::Status s = attention_forward_cuda(&b, &f, &b, 1, 4, 10, 3, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("must divide"), absl::string_view::npos) << s;
  s = attention_forward_cuda(&b, &f, &b, 1, 4, 48, 1, nullptr, AttentionKernel::kTensorCore);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("head size 48"), absl::string_view::npos) << s;
  s = attention_forward_cuda(&b, &f, &b, 1, 4, 300, 1, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("256"), absl::string_view::npos) << s;
  s = attention_backward_cuda(&b, &b, &b, &b, &f, 1, 4, 64, 1, nullptr, 0, nullptr);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("workspace"), absl::string_view::npos) << s;
  EXPECT_TRUE(attention_cuda_uses_tensor_cores(64));
  EXPECT_FALSE(attention_cuda_uses_tensor_cores(48));
}

TEST(AttentionCudaTest, TensorCoreKernelMatchesCpuEveryHeadSize) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  for (int hs : {32, 64, 80, 96, 128}) {
    for (int T : {1, 17, 64, 100, 129}) {
      CheckAgainstCpu({2, T, 3, hs}, AttentionKernel::kTensorCore, stream.get());
    }
  }
}

TEST(AttentionCudaTest, TensorCoreKernelManyTiles) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  CheckAgainstCpu({1, 1024, 2, 64}, AttentionKernel::kTensorCore, stream.get());
  CheckAgainstCpu({1, 300, 2, 128}, AttentionKernel::kTensorCore, stream.get());  // dk/dv kBn 32
  CheckAgainstCpu({3, 257, 1, 32}, AttentionKernel::kTensorCore, stream.get());
}

TEST(AttentionCudaTest, SimpleKernelMatchesCpu) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  for (int hs : {8, 24, 40, 64, 136}) {
    for (int T : {1, 33, 70}) {
      CheckAgainstCpu({2, T, 2, hs}, AttentionKernel::kSimple, stream.get());
    }
  }
}

TEST(AttentionCudaTest, AutoFallsBackForUnalignedInput) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  // inp one element off alignment: kAuto runs the plain kernel, kTensorCore refuses.
  CheckAgainstCpu({1, 40, 2, 64}, AttentionKernel::kAuto, stream.get(), /*offset=*/1);
  DeviceArray<bf16> d_inp(1 * 8 * 3 * 64, 1), d_out(8 * 64);
  DeviceArray<float> d_lse(8);
  const absl::Status s = attention_forward_cuda(d_out.get(), d_lse.get(), d_inp.get(), 1, 8, 64,
                                                1, stream.get(), AttentionKernel::kTensorCore);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
}

TEST(AttentionCudaTest, BackwardIsDeterministicAndKernelsAgree) {
  QT_SKIP_WITHOUT_GPU();
  testing::TestStream stream;
  const Shape s{2, 200, 4, 64};
  const int C = s.NH * s.hs;
  const int64_t n_inp = static_cast<int64_t>(s.B) * s.T * 3 * C;
  const auto inp = RandomBf16(n_inp, 21, -2, 2);
  const auto dout = RandomBf16(static_cast<int64_t>(s.B) * s.T * C, 22);
  const std::vector<bf16> zeros(n_inp, FloatToBf16(0.f));
  const Result a = RunGpu(s, AttentionKernel::kTensorCore, inp.bits, dout.bits, zeros,
                          stream.get());
  const Result b = RunGpu(s, AttentionKernel::kTensorCore, inp.bits, dout.bits, zeros,
                          stream.get());
  testing::ExpectBitwiseEqual(a.out, b.out, "out rerun");
  testing::ExpectBitwiseEqual(a.lse, b.lse, "lse rerun");
  testing::ExpectBitwiseEqual(a.dinp, b.dinp, "dinp rerun");
  const Result plain = RunGpu(s, AttentionKernel::kSimple, inp.bits, dout.bits, zeros,
                              stream.get());
  EXPECT_LT(testing::RelL2(a.out, plain.out), 1e-2);
  EXPECT_LT(testing::RelL2(a.dinp, plain.dinp), 2e-2);
  testing::ExpectNear(a.lse, plain.lse, 1e-4, 1e-5, "lse tensor-core vs plain");
}

bool CudnnHere() {
  return testing::HaveGpu() && attention_cuda_cudnn_available(64, nullptr);
}

TEST(AttentionCudaTest, CudnnMatchesCpu) {
  QT_SKIP_WITHOUT_GPU();
  if (!CudnnHere()) GTEST_SKIP() << "cuDNN attention does not apply on this GPU";
  testing::TestStream stream;
  for (const Shape& s : {Shape{2, 16, 2, 64}, Shape{2, 17, 3, 32}, Shape{1, 200, 2, 64},
                         Shape{2, 130, 2, 128}, Shape{1, 96, 2, 72}, Shape{1, 64, 3, 16}}) {
    CheckAgainstCpu(s, AttentionKernel::kCudnn, stream.get());
  }
}

TEST(AttentionCudaTest, CudnnAgreesWithOurKernelsAndAutoPicksIt) {
  QT_SKIP_WITHOUT_GPU();
  if (!CudnnHere()) GTEST_SKIP() << "cuDNN attention does not apply on this GPU";
  testing::TestStream stream;
  const Shape s{2, 1024, 2, 64};
  const int C = s.NH * s.hs;
  const int64_t n_inp = static_cast<int64_t>(s.B) * s.T * 3 * C;
  const auto inp = RandomBf16(n_inp, 31, -2, 2);
  const auto dout = RandomBf16(static_cast<int64_t>(s.B) * s.T * C, 32);
  const std::vector<bf16> zeros(n_inp, FloatToBf16(0.f));
  const Result ours = RunGpu(s, AttentionKernel::kTensorCore, inp.bits, dout.bits, zeros,
                             stream.get());
  const Result cud = RunGpu(s, AttentionKernel::kCudnn, inp.bits, dout.bits, zeros, stream.get());
  EXPECT_LT(testing::RelL2(cud.out, ours.out), 1e-2);
  EXPECT_LT(testing::RelL2(cud.dinp, ours.dinp), 2e-2);
  testing::ExpectNear(cud.lse, ours.lse, 1e-4, 1e-5, "lse cudnn vs tensor-core");
  // kAuto's forward is cuDNN's here: the same bits.
  const Result aut = RunGpu(s, AttentionKernel::kAuto, inp.bits, dout.bits, zeros, stream.get());
  testing::ExpectBitwiseEqual(aut.out, cud.out, "out auto vs cudnn");
}

// Below T = 16 cuDNN is not used: kAuto runs our kernels (matching the CPU), kCudnn refuses.
TEST(AttentionCudaTest, CudnnNotUsedForShortSequences) {
  QT_SKIP_WITHOUT_GPU();
  if (!CudnnHere()) GTEST_SKIP() << "cuDNN attention does not apply on this GPU";
  testing::TestStream stream;
  CheckAgainstCpu({2, 1, 2, 64}, AttentionKernel::kAuto, stream.get());
  DeviceArray<bf16> x(2 * 1 * 3 * 128), o(2 * 128);
  DeviceArray<float> l(4);
  const absl::Status s = attention_forward_cuda(o.get(), l.get(), x.get(), 2, 1, 128, 2,
                                                stream.get(), AttentionKernel::kCudnn);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
}

TEST(AttentionCudaTest, CudnnRefusesDeterminismAndAccumulation) {
  bf16 b{};
  float f = 0;
  absl::Status s = attention_backward_cuda(&b, &b, &b, &b, &f, 1, 4, 64, 1, &f, 64, nullptr,
                                           AttentionKernel::kCudnn, GradWrite::kOverwrite,
                                           /*deterministic=*/true);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("deterministic"), absl::string_view::npos) << s;
  s = attention_backward_cuda(&b, &b, &b, &b, &f, 1, 4, 64, 1, &f, 64, nullptr,
                              AttentionKernel::kCudnn, GradWrite::kAccumulate);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("kOverwrite"), absl::string_view::npos) << s;
}

}  // namespace
}  // namespace qtrain::ops
