// NcclCommunicator's collectives on GPUs against sums computed on the CPU. Runs as one rank on
// its own (tools/gpu_tests.sh) or as N ranks under `mpirun -np N` (one GPU per local rank, MPI
// bootstrapping NCCL). Without a GPU it skips, or fails when QTRAIN_REQUIRE_GPU=1.
#include <mpi.h>

#include <cmath>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "distributed/communicator.h"
#include "distributed/mpi_communicator.h"
#include "distributed/nccl_communicator.h"
#include "gtest/gtest.h"
#include "ops/cuda/device.h"

namespace qtrain {
namespace {

// The bootstrap of this process: MPI under mpirun, else a world of one.
Communicator* g_bootstrap = nullptr;

// Rank-dependent integers below 2^24: sums are exact in float whatever the reduction order.
float Val(int r, int64_t i) { return static_cast<float>((r + 1) * 1000 + i % 97); }

class NcclGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<int> devices = ops::DeviceCount();
    ASSERT_TRUE(devices.ok()) << devices.status();
    if (*devices == 0) {
      if (std::getenv("QTRAIN_REQUIRE_GPU") != nullptr) FAIL() << "no GPU";
      GTEST_SKIP() << "no GPU";
    }
    const int device = g_bootstrap->local_rank() % *devices;
    absl::StatusOr<std::unique_ptr<NcclCommunicator>> c =
        NcclCommunicator::Create(g_bootstrap, device, absl::Seconds(120));
    ASSERT_TRUE(c.ok()) << c.status();
    nccl_ = *std::move(c);
  }
  void TearDown() override {
    for (void* p : buffers_) (void)ops::DeviceFree(p);
  }

  template <typename T>
  T* Upload(const std::vector<T>& host) {
    absl::StatusOr<void*> p = ops::DeviceMalloc(std::max<int64_t>(1, host.size()) * sizeof(T));
    EXPECT_TRUE(p.ok()) << p.status();
    buffers_.push_back(*p);
    EXPECT_TRUE(ops::CopyHostToDevice(*p, host.data(), host.size() * sizeof(T)).ok());
    return static_cast<T*>(*p);
  }
  template <typename T>
  std::vector<T> Download(const T* device, size_t n) {
    std::vector<T> host(n);
    EXPECT_TRUE(ops::CopyDeviceToHost(host.data(), device, n * sizeof(T)).ok());
    return host;
  }

  std::unique_ptr<NcclCommunicator> nccl_;
  std::vector<void*> buffers_;
};

TEST_F(NcclGpuTest, AllReduceSumMatchesTheCpuSum) {
  const int w = nccl_->world_size(), r = nccl_->rank();
  // Odd sizes: one element, not a multiple of anything, and a few MiB (several NCCL chunks).
  for (int64_t n : {int64_t{1}, int64_t{1001}, int64_t{3} << 20}) {
    SCOPED_TRACE(absl::StrCat("n=", n));
    std::vector<float> host(n);
    for (int64_t i = 0; i < n; ++i) host[i] = Val(r, i);
    float* d = Upload(host);
    ASSERT_TRUE(nccl_->AllReduceSum(d, n).ok());
    std::vector<float> got = Download(d, n);
    for (int64_t i = 0; i < n; ++i) {
      float want = 0;
      for (int q = 0; q < w; ++q) want += Val(q, i);
      ASSERT_EQ(got[i], want) << "element " << i;
    }
  }
}

TEST_F(NcclGpuTest, AllReduceSumOfArbitraryFloatsWithinRoundingOfTheCpuSum) {
  const int w = nccl_->world_size(), r = nccl_->rank();
  const int64_t n = 100003;
  auto value = [](int q, int64_t i) { return std::sin(0.37 * i + q) * (1 + q); };
  std::vector<float> host(n);
  for (int64_t i = 0; i < n; ++i) host[i] = static_cast<float>(value(r, i));
  float* d = Upload(host);
  ASSERT_TRUE(nccl_->AllReduceSumAsync(d, n).ok());
  ASSERT_TRUE(nccl_->Synchronize().ok());
  std::vector<float> got = Download(d, n);
  for (int64_t i = 0; i < n; ++i) {
    double want = 0, mag = 0;
    for (int q = 0; q < w; ++q) {
      want += static_cast<float>(value(q, i));
      mag += std::fabs(static_cast<float>(value(q, i)));
    }
    ASSERT_NEAR(got[i], want, 1e-7 + mag * w * 6e-8) << "element " << i;
  }
  std::vector<double> dd = {0.5 * r, 1.0};
  double* ddev = Upload(dd);
  ASSERT_TRUE(nccl_->AllReduceSum(ddev, 2).ok());
  std::vector<double> dgot = Download(ddev, 2);
  EXPECT_DOUBLE_EQ(dgot[0], 0.25 * w * (w - 1));
  EXPECT_DOUBLE_EQ(dgot[1], w);
}

TEST_F(NcclGpuTest, ReduceScatterAllGatherBroadcastBarrier) {
  const int w = nccl_->world_size(), r = nccl_->rank();
  const int64_t count = 4099;
  std::vector<float> send(w * count);
  for (int64_t i = 0; i < w * count; ++i) send[i] = Val(r, i);
  float* dsend = Upload(send);
  float* drecv = Upload(std::vector<float>(count));
  ASSERT_TRUE(nccl_->ReduceScatterSum(dsend, drecv, count).ok());
  std::vector<float> got = Download(drecv, count);
  for (int64_t i = 0; i < count; ++i) {
    float want = 0;
    for (int q = 0; q < w; ++q) want += Val(q, r * count + i);
    ASSERT_EQ(got[i], want) << i;
  }
  float* dmine = Upload(std::vector<float>(count, static_cast<float>(r)));
  float* dall = Upload(std::vector<float>(w * count));
  ASSERT_TRUE(nccl_->AllGather(dmine, dall, count).ok());
  std::vector<float> all = Download(dall, w * count);
  for (int q = 0; q < w; ++q) EXPECT_EQ(all[q * count + count - 1], q);
  for (int root = 0; root < w; ++root) {
    std::vector<uint8_t> bytes(777, r == root ? 0x5a : 0);
    uint8_t* db = Upload(bytes);
    ASSERT_TRUE(nccl_->Broadcast(db, 777, root).ok());
    EXPECT_EQ(Download(db, 777), std::vector<uint8_t>(777, 0x5a));
  }
  EXPECT_TRUE(nccl_->Barrier().ok());
}

}  // namespace
}  // namespace qtrain

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  const bool under_mpirun = std::getenv("OMPI_COMM_WORLD_SIZE") != nullptr;
  std::unique_ptr<qtrain::Communicator> bootstrap;
  if (under_mpirun) {
    int provided = 0;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
    absl::StatusOr<std::unique_ptr<qtrain::MpiCommunicator>> mpi =
        qtrain::MpiCommunicator::Create(absl::Seconds(300));
    if (!mpi.ok()) {
      std::fprintf(stderr, "%s\n", std::string(mpi.status().message()).c_str());
      return 1;
    }
    bootstrap = *std::move(mpi);
  } else {
    bootstrap = std::make_unique<qtrain::SingleProcessCommunicator>();
  }
  qtrain::g_bootstrap = bootstrap.get();
  int failed = RUN_ALL_TESTS() != 0;
  if (under_mpirun) {
    int any = 0;
    MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    bootstrap.reset();
    MPI_Finalize();
    failed = any;
  }
  return failed;
}
