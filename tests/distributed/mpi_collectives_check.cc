// The MPI communicator, GradientSync and DistributedContext across real ranks. A GoogleTest
// binary with its own main: run it under `mpirun -np N` (mpi_collectives_test.sh does, N = 2
// and 3); every rank runs every test and the exit code is non-zero if any rank failed.
#include <mpi.h>
#include <unistd.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "distributed/distributed_context.h"
#include "distributed/gradient_sync.h"
#include "distributed/mpi_communicator.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qtrain {
namespace {

using ::testing::HasSubstr;

std::unique_ptr<MpiCommunicator> Comm(absl::Duration timeout = absl::Seconds(60),
                                      Watchdog::OnTimeout on_timeout = nullptr) {
  absl::StatusOr<std::unique_ptr<MpiCommunicator>> c =
      MpiCommunicator::Create(timeout, std::move(on_timeout));
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *std::move(c) : nullptr;
}

// A value only rank r contributes at index i, so sums have closed forms.
float Val(int r, int64_t i) { return static_cast<float>((r + 1) * 1000 + i % 97); }

TEST(Mpi, AllReduceSumFloatAndDouble) {
  auto c = Comm();
  const int w = c->world_size(), r = c->rank();
  std::vector<float> f(1001);
  for (int64_t i = 0; i < 1001; ++i) f[i] = Val(r, i);
  ASSERT_TRUE(c->AllReduceSum(f.data(), f.size()).ok());
  for (int64_t i = 0; i < 1001; ++i) {
    float want = 0;
    for (int q = 0; q < w; ++q) want += Val(q, i);
    ASSERT_EQ(f[i], want) << i;
  }
  double d[2] = {0.5 * r, 1.0};
  ASSERT_TRUE(c->AllReduceSum(d, 2).ok());
  EXPECT_DOUBLE_EQ(d[0], 0.25 * w * (w - 1));
  EXPECT_DOUBLE_EQ(d[1], w);
}

TEST(Mpi, ReduceScatterAllGatherBroadcastBarrier) {
  auto c = Comm();
  const int w = c->world_size(), r = c->rank();
  const int64_t count = 5;
  std::vector<float> send(w * count), recv(count);
  for (int64_t i = 0; i < w * count; ++i) send[i] = Val(r, i);
  ASSERT_TRUE(c->ReduceScatterSum(send.data(), recv.data(), count).ok());
  for (int64_t i = 0; i < count; ++i) {
    float want = 0;
    for (int q = 0; q < w; ++q) want += Val(q, r * count + i);
    EXPECT_EQ(recv[i], want);
  }
  std::vector<float> mine(count, static_cast<float>(r)), all(w * count);
  ASSERT_TRUE(c->AllGather(mine.data(), all.data(), count).ok());
  for (int q = 0; q < w; ++q) EXPECT_EQ(all[q * count + count - 1], q);
  for (int root = 0; root < w; ++root) {
    std::string text = r == root ? absl::StrCat("from ", root) : "xxxxxx";
    ASSERT_TRUE(c->Broadcast(text.data(), text.size(), root).ok());
    EXPECT_EQ(text, absl::StrCat("from ", root));
  }
  absl::StatusOr<std::vector<uint64_t>> ids = c->AllGatherU64(100 + r);
  ASSERT_TRUE(ids.ok());
  for (int q = 0; q < w; ++q) EXPECT_EQ((*ids)[q], 100u + q);
  EXPECT_TRUE(c->Barrier().ok());
  char byte = 0;
  EXPECT_FALSE(c->Broadcast(&byte, 1, w).ok());  // no such root
}

TEST(Mpi, LocalRankCountsRanksOnThisMachine) {
  auto c = Comm();
  EXPECT_EQ(c->local_size(), c->world_size());  // one machine
  EXPECT_EQ(c->local_rank(), c->rank());
}

// Every bucket and shard path: n not a multiple of the world size, buckets of 3 floats (so
// several rounds and padded last chunks), and shards that may be empty (n < world * chunk).
TEST(GradientSync, BucketedMeansAndShardsMatchClosedForms) {
  auto c = Comm();
  const int w = c->world_size(), r = c->rank();
  for (int64_t n : {int64_t{1}, int64_t{2}, int64_t{103}}) {
    SCOPED_TRACE(absl::StrCat("n=", n));
    GradientSync sync(c.get(), n, 3 * sizeof(float));
    std::vector<float> mean(n);
    for (int64_t i = 0; i < n; ++i) {
      for (int q = 0; q < w; ++q) mean[i] += Val(q, i);
      mean[i] *= 1.0f / w;
    }
    std::vector<float> g(n);
    for (int64_t i = 0; i < n; ++i) g[i] = Val(r, i);
    ASSERT_TRUE(sync.AllReduceMean(g.data()).ok());
    EXPECT_EQ(g, mean);
    for (int64_t i = 0; i < n; ++i) g[i] = Val(r, i);
    ASSERT_TRUE(sync.AllReduceSum(g.data()).ok());
    for (int64_t i = 0; i < n; ++i) {
      float sum = 0;
      for (int q = 0; q < w; ++q) sum += Val(q, i);
      ASSERT_EQ(g[i], sum) << i;
    }

    // Shards tile [0, n) in rank order.
    EXPECT_EQ(sync.ShardBegin(0), 0);
    EXPECT_EQ(sync.ShardEnd(w - 1), n);
    for (int q = 1; q < w; ++q) EXPECT_EQ(sync.ShardBegin(q), sync.ShardEnd(q - 1));

    for (int64_t i = 0; i < n; ++i) g[i] = Val(r, i);
    ASSERT_TRUE(sync.ReduceScatterMean(g.data()).ok());
    double want_ss = 0;
    for (int64_t i = 0; i < n; ++i) want_ss += static_cast<double>(mean[i]) * mean[i];
    for (int64_t i = sync.begin(); i < sync.end(); ++i) EXPECT_EQ(g[i], mean[i]) << i;
    absl::StatusOr<double> ss = sync.ShardedSumSquares(g.data());
    ASSERT_TRUE(ss.ok());
    EXPECT_NEAR(*ss, want_ss, 1e-9 * want_ss);

    // Each rank "updates" its shard (marks it with its rank), then the all-gather.
    std::vector<float> p(n, -1.0f);
    for (int64_t i = sync.begin(); i < sync.end(); ++i) p[i] = static_cast<float>(r);
    ASSERT_TRUE(sync.AllGatherShards(p.data()).ok());
    for (int q = 0; q < w; ++q) {
      for (int64_t i = sync.ShardBegin(q); i < sync.ShardEnd(q); ++i) ASSERT_EQ(p[i], q);
    }
    // From a shard-only buffer (ZeRO-1 moments before a checkpoint).
    std::vector<float> shard(sync.end() - sync.begin()), full(n, -1.0f);
    for (size_t i = 0; i < shard.size(); ++i) shard[i] = static_cast<float>(sync.begin() + i);
    ASSERT_TRUE(sync.AllGatherShards(shard.data(), full.data()).ok());
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(full[i], static_cast<float>(i));
  }
}

TEST(DistributedContext, AgreesOnErrorsAndJobs) {
  absl::StatusOr<std::unique_ptr<DistributedContext>> made =
      DistributedContext::Wrap(Comm(), DistributedSpec());
  ASSERT_TRUE(made.ok()) << made.status();
  DistributedContext& ctx = **made;
  const int w = ctx.world_size(), r = ctx.rank();

  EXPECT_TRUE(ctx.AllOk(absl::OkStatus(), "nothing").ok());
  // The last rank fails: every rank returns its error, named.
  absl::Status s = ctx.AllOk(r == w - 1 ? absl::NotFoundError("shard missing")
                                        : absl::OkStatus(),
                             "opening data");
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(IsAgreedError(s));
  if (r == w - 1) {
    EXPECT_EQ(s.message(), "opening data: shard missing");
  } else {
    EXPECT_THAT(std::string(s.message()),
                HasSubstr(absl::StrCat("rank ", w - 1, " (host ")));
    EXPECT_THAT(std::string(s.message()), HasSubstr("opening data: shard missing"));
  }

  EXPECT_TRUE(ctx.VerifySameJob(77).ok());
  s = ctx.VerifySameJob(r == w - 1 ? 78 : 77);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr(absl::StrCat("job spec mismatch: rank ", w - 1, " (host ")));
  EXPECT_TRUE(IsAgreedError(s));

  std::vector<float> same(10, 1.5f);
  EXPECT_TRUE(ctx.VerifyIdentical(same.data(), 10, "at step 3").ok());
  if (r == w - 1) same[9] = 2.0f;
  s = ctx.VerifyIdentical(same.data(), 10, "by step 3");
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(std::string(s.message()), HasSubstr("replicas diverged by step 3"));

  std::string text = r == 0 ? std::string(5000, 'q') : "";
  ASSERT_TRUE(ctx.BroadcastString(&text, 0).ok());
  EXPECT_EQ(text, std::string(5000, 'q'));
}

// The watchdog reports a collective that waits too long for a late rank; here its callback only
// records (the real one aborts the job) and the late rank arrives after all.
TEST(Watchdog, ReportsACollectiveStuckOnALateRank) {
  absl::Notification fired;
  std::string message;
  auto c = Comm(absl::Milliseconds(300), [&](const std::string& m) {
    message = m;
    fired.Notify();
  });
  c->SetActivity("step 9");
  if (c->rank() == c->world_size() - 1) absl::SleepFor(absl::Seconds(1.5));
  ASSERT_TRUE(c->Barrier().ok());
  if (c->rank() == 0) {
    ASSERT_TRUE(fired.WaitForNotificationWithTimeout(absl::Seconds(5)));
    EXPECT_THAT(message, HasSubstr("rank 0 of "));
    EXPECT_THAT(message, HasSubstr("MPI_Barrier did not finish within distributed.timeout_s = "
                                   "300ms (step 9): another rank has died or hangs"));
  }
  if (c->rank() == c->world_size() - 1) {
    EXPECT_FALSE(fired.HasBeenNotified());
  }
}

}  // namespace
}  // namespace qtrain

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  ::testing::InitGoogleTest(&argc, argv);
  // Rank 0 prints the usual report; the others only their failures.
  if (rank != 0) {
    ::testing::TestEventListeners& l = ::testing::UnitTest::GetInstance()->listeners();
    delete l.Release(l.default_result_printer());
  }
  int failed = RUN_ALL_TESTS() != 0;
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (failed) std::fprintf(stderr, "mpi_collectives_check: rank %d FAILED\n", rank);
  MPI_Finalize();
  return any_failed;
}
