// NcclCommunicator on a machine without a GPU (CI): Create fails with a clear Unavailable status
// naming the CUDA error, and nothing crashes. (The collectives themselves are checked on GPUs by
// nccl_communicator_gpu_test.) On a GPU machine the same test creates a one-rank communicator.
#include <string>

#include "distributed/communicator.h"
#include "distributed/nccl_communicator.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ops/cuda/device.h"

namespace qtrain {
namespace {

using ::testing::HasSubstr;

TEST(NcclCommunicator, CreateNeedsAUsableGpu) {
  absl::StatusOr<int> devices = ops::DeviceCount();
  ASSERT_TRUE(devices.ok()) << devices.status();
  SingleProcessCommunicator bootstrap;
  absl::StatusOr<std::unique_ptr<NcclCommunicator>> nccl =
      NcclCommunicator::Create(&bootstrap, 0, absl::Seconds(60));
  if (*devices == 0) {
    ASSERT_FALSE(nccl.ok());
    EXPECT_EQ(nccl.status().code(), absl::StatusCode::kUnavailable) << nccl.status();
    EXPECT_THAT(std::string(nccl.status().message()), HasSubstr("cudaGetDeviceCount"));
    return;
  }
  ASSERT_TRUE(nccl.ok()) << nccl.status();
  EXPECT_EQ((*nccl)->world_size(), 1);
  EXPECT_EQ((*nccl)->backend(), "NCCL");
}

TEST(NcclCommunicator, DeviceOutOfRangeIsNamed) {
  absl::StatusOr<int> devices = ops::DeviceCount();
  ASSERT_TRUE(devices.ok());
  if (*devices == 0) GTEST_SKIP() << "no GPU: the device check comes after the CUDA check";
  SingleProcessCommunicator bootstrap;
  absl::StatusOr<std::unique_ptr<NcclCommunicator>> nccl =
      NcclCommunicator::Create(&bootstrap, *devices, absl::Seconds(60));
  ASSERT_FALSE(nccl.ok());
  EXPECT_THAT(std::string(nccl.status().message()), HasSubstr("CUDA device"));
}

}  // namespace
}  // namespace qtrain
