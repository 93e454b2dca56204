// Helpers of the CUDA model's GPU tests: GPU presence, structured token batches, the CPU and
// GPU models from one set of weights, one optimizer step on a DeviceModel as
// trainer/session.cc drives it. Host code only.
#ifndef QTRAIN_TESTS_GPU_GPT_TEST_UTIL_H_
#define QTRAIN_TESTS_GPU_GPT_TEST_UTIL_H_

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "ops/cuda/device.h"
#include "ops/status_macros.h"
#include "trainer/cuda/gpt_cuda.h"
#include "trainer/gpt.h"
#include "trainer/optimizer.h"

namespace qtrain::testing {

inline bool HaveGpu() {
  const absl::StatusOr<int> count = ops::DeviceCount();
  const bool have = count.ok() && *count > 0;
  if (!have && std::getenv("QTRAIN_REQUIRE_GPU") != nullptr) {
    ADD_FAILURE() << "QTRAIN_REQUIRE_GPU is set but no CUDA device is usable";
  }
  return have;
}

#define SKIP_WITHOUT_GPU() \
  if (!::qtrain::testing::HaveGpu()) GTEST_SKIP() << "no CUDA device"

#define ASSERT_OK(expr)                                 \
  do {                                                  \
    const ::absl::Status st_ = (expr);                  \
    ASSERT_TRUE(st_.ok()) << st_;                       \
  } while (0)

struct Shape {
  const char* name;
  GptConfig config;
  int B, T;
};

// hs 16 takes the attention's plain kernel, hs 64 its tensor-core kernel; T = 61 is no
// multiple of any tile.
std::vector<Shape> Shapes() {
  return {{"L2_C64_H4", {2, 64, 4, 256, 64}, 4, 64},
          {"L2_C128_H2", {2, 128, 2, 256, 64}, 3, 61}};
}

// Tokens with structure (a noisy counter) so that a few steps of training lower the loss.
inline void MakeBatch(int B, int T, int V, uint32_t seed, std::vector<int32_t>* x,
               std::vector<int32_t>* y) {
  std::mt19937 gen(seed);
  x->resize(static_cast<size_t>(B) * T);
  y->resize(x->size());
  for (int b = 0; b < B; ++b) {
    int tok = static_cast<int>(gen() % V);
    for (int t = 0; t < T; ++t) {
      (*x)[b * T + t] = tok;
      tok = (gen() % 4 == 0) ? static_cast<int>(gen() % V) : (tok + 1) % V;
      (*y)[b * T + t] = tok;
    }
  }
}

inline double RelL2(const float* got, const float* ref, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(got[i]) - ref[i];
    num += d * d;
    den += static_cast<double>(ref[i]) * ref[i];
  }
  if (den == 0) return num == 0 ? 0 : INFINITY;
  return std::sqrt(num / den);
}

inline std::unique_ptr<Gpt> MakeCpu(const GptConfig& config, uint64_t seed) {
  absl::StatusOr<std::unique_ptr<Gpt>> m = Gpt::Create(config);
  EXPECT_TRUE(m.ok()) << m.status();
  (*m)->InitWeights(seed, 0.02f);
  return *std::move(m);
}

// deterministic: our attention kernels instead of cuDNN's (whose dq uses atomics), as the
// bit-identical tests need.
// forward_only: CudaGpt::Create's (a teacher, an evaluation).
inline std::unique_ptr<CudaGpt> MakeGpu(const Gpt& cpu, bool deterministic = false,
                                 GradDtype grads = GradDtype::kFp32, bool forward_only = false) {
  absl::StatusOr<std::unique_ptr<CudaGpt>> m =
      CudaGpt::Create(cpu.config(), cpu.params(), grads, forward_only);
  EXPECT_TRUE(m.ok()) << m.status();
  if (!m.ok()) return nullptr;
  (*m)->set_deterministic(deterministic);
  const absl::Status s = (*m)->Upload(cpu.params(), nullptr);
  EXPECT_TRUE(s.ok()) << s;
  return *std::move(m);
}

// QAT on the CPU model as the trainer starts it: steps from the weights, Phi from the SVD,
// the per-tensor activation steps from a first training batch (tokens from `seed`), all saved
// to the model's buffers for a GPU model made from it.
inline absl::Status InitQuantizersWithBatch(Gpt* cpu, int B, int T, uint32_t seed) {
  RETURN_IF_ERROR(cpu->InitQuantizers());
  std::vector<int32_t> x, y;
  MakeBatch(B, T, cpu->config().vocab_size, seed, &x, &y);
  RETURN_IF_ERROR(cpu->Forward(x.data(), y.data(), B, T, /*training=*/true).status());
  cpu->SaveStateToBuffers();
  return absl::OkStatus();
}

inline AdamWConfig TestAdam() {
  AdamWConfig a;
  a.weight_decay = 0.1f;
  a.grad_clip = 1.0f;
  return a;
}

// One optimizer step on the device, as trainer/session.cc drives it; sync: wait for the update (else
// it may still run when the next step's Forward starts, as in training).
inline absl::StatusOr<double> GpuStep(DeviceModel* m, const std::vector<int32_t>& x,
                                      const std::vector<int32_t>& y, int B, int T, float lr,
                                      int t, double* norm = nullptr, bool sync = true) {
  RETURN_IF_ERROR(m->ZeroGrads());
  ASSIGN_OR_RETURN(const double loss, m->Forward(x.data(), y.data(), B, T, 1.0f));
  RETURN_IF_ERROR(m->Backward(1.0f));
  ASSIGN_OR_RETURN(const double ss, m->GradSumSquares());
  if (norm != nullptr) *norm = std::sqrt(ss);
  RETURN_IF_ERROR(m->Update(lr, std::sqrt(ss), TestAdam(), t));
  if (sync) RETURN_IF_ERROR(m->Synchronize());
  return loss;
}

}  // namespace qtrain::testing

#endif  // QTRAIN_TESTS_GPU_GPT_TEST_UTIL_H_
