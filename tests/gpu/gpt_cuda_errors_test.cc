// CreateCudaModel's refusals, which need no GPU (so this runs in CI): Unimplemented naming the
// feature for what the CUDA path lacks, Unavailable with a clear message without a device.
#include <memory>

#include "gtest/gtest.h"
#include "configs/job_spec.pb.h"
#include "ops/cuda/device.h"
#include "trainer/cuda/gpt_cuda.h"
#include "trainer/device_model.h"
#include "trainer/gpt.h"
#include "trainer/precision.h"

namespace qtrain {
namespace {

// FP8 and QAT Linears run on CUDA: without a device the only refusal is the missing device.
TEST(GptCudaErrors, Fp8AndQatLinearsAreAccepted) {
  for (LinearPrecision mode : {FP8, QAT}) {
    GptConfig config{2, 64, 4, 256, 64};
    PrecisionSpec spec;
    spec.set_linear(mode);
    spec.mutable_qat()->set_weight_bits(4);
    absl::StatusOr<PrecisionConfig> pc = PrecisionConfig::FromSpec(spec, config.n_layer);
    ASSERT_TRUE(pc.ok()) << pc.status();
    config.precision = *pc;
    absl::StatusOr<std::unique_ptr<Gpt>> cpu = Gpt::Create(config);
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    absl::StatusOr<std::unique_ptr<DeviceModel>> m =
        CreateCudaModel(config, (*cpu)->params(), GradDtype::kFp32);
    absl::StatusOr<int> count = ops::DeviceCount();
    ASSERT_TRUE(count.ok()) << count.status();
    if (*count > 0) {
      EXPECT_TRUE(m.ok()) << m.status();
    } else {
      EXPECT_EQ(m.status().code(), absl::StatusCode::kUnavailable) << m.status();
    }
  }
}

// TWEO runs on CUDA: without a device the only refusal is the missing device.
TEST(GptCudaErrors, TweoIsAccepted) {
  GptConfig config{2, 64, 4, 256, 64};
  config.tweo.enabled = true;
  absl::StatusOr<std::unique_ptr<Gpt>> cpu = Gpt::Create(config);
  ASSERT_TRUE(cpu.ok());
  absl::StatusOr<std::unique_ptr<DeviceModel>> m = CreateCudaModel(config, (*cpu)->params(), GradDtype::kFp32);
  absl::StatusOr<int> count = ops::DeviceCount();
  ASSERT_TRUE(count.ok()) << count.status();
  if (*count > 0) {
    EXPECT_TRUE(m.ok()) << m.status();
  } else {
    EXPECT_EQ(m.status().code(), absl::StatusCode::kUnavailable) << m.status();
  }
}

TEST(GptCudaErrors, NoDeviceIsUnavailable) {
  absl::StatusOr<int> count = ops::DeviceCount();
  ASSERT_TRUE(count.ok()) << count.status();
  if (*count > 0) GTEST_SKIP() << "a CUDA device is present";
  const GptConfig config{2, 64, 4, 256, 64};
  absl::StatusOr<std::unique_ptr<Gpt>> cpu = Gpt::Create(config);
  ASSERT_TRUE(cpu.ok());
  absl::StatusOr<std::unique_ptr<DeviceModel>> m = CreateCudaModel(config, (*cpu)->params(), GradDtype::kFp32);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.status().code(), absl::StatusCode::kUnavailable) << m.status();
  EXPECT_NE(m.status().message().find("no CUDA device"), absl::string_view::npos) << m.status();
}

}  // namespace
}  // namespace qtrain
