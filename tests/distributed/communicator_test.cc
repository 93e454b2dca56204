// In-process tests of the distributed building blocks: the single-process communicator,
// launcher detection, the watchdog, hashing, the context's agreement helpers in a world of one,
// and the ZeRO-1 sharded optimizer against the whole one.
#include <atomic>
#include <cmath>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "distributed/communicator.h"
#include "distributed/distributed_context.h"
#include "distributed/gradient_sync.h"
#include "distributed/launch_env.h"
#include "distributed/watchdog.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "trainer/optimizer.h"
#include "trainer/param_store.h"
#include "trainer/rng.h"

namespace qtrain {
namespace {

using ::testing::HasSubstr;

TEST(SingleProcessCommunicator, CollectivesAreIdentities) {
  SingleProcessCommunicator c;
  EXPECT_EQ(c.world_size(), 1);
  std::vector<float> a = {1, 2, 3};
  ASSERT_TRUE(c.AllReduceSum(a.data(), 3).ok());
  EXPECT_EQ(a, (std::vector<float>{1, 2, 3}));
  std::vector<float> out(3);
  ASSERT_TRUE(c.ReduceScatterSum(a.data(), out.data(), 3).ok());
  EXPECT_EQ(out, a);
  std::fill(out.begin(), out.end(), 0.0f);
  ASSERT_TRUE(c.AllGather(a.data(), out.data(), 3).ok());
  EXPECT_EQ(out, a);
  absl::StatusOr<std::vector<uint64_t>> all = c.AllGatherU64(42);
  ASSERT_TRUE(all.ok());
  EXPECT_EQ(*all, std::vector<uint64_t>{42});
  EXPECT_FALSE(c.Broadcast(a.data(), 12, 1).ok());  // no rank 1
  EXPECT_FALSE(c.AllReduceSum(static_cast<float*>(nullptr), 3).ok());
}

LaunchEnv Detect(const std::map<std::string, std::string>& env) {
  return DetectLaunchEnv([&env](const char* name) -> const char* {
    auto it = env.find(name);
    return it == env.end() ? nullptr : it->second.c_str();
  });
}

TEST(LaunchEnv, ReadsMpirunSrunAndNothing) {
  LaunchEnv e = Detect({});
  EXPECT_EQ(e.launcher, "");
  EXPECT_EQ(e.world_size, 1);

  e = Detect({{"OMPI_COMM_WORLD_RANK", "3"}, {"OMPI_COMM_WORLD_SIZE", "4"},
              {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}});
  EXPECT_EQ(e.launcher, "mpirun");
  EXPECT_EQ(e.rank, 3);
  EXPECT_EQ(e.world_size, 4);
  EXPECT_EQ(e.local_rank, 1);

  e = Detect({{"SLURM_STEP_ID", "0"}, {"SLURM_PROCID", "5"}, {"SLURM_STEP_NUM_TASKS", "8"},
              {"SLURM_NTASKS", "8"}, {"SLURM_LOCALID", "1"}});
  EXPECT_EQ(e.launcher, "srun");
  EXPECT_EQ(e.rank, 5);
  EXPECT_EQ(e.world_size, 8);
  EXPECT_EQ(e.local_rank, 1);
}

TEST(LaunchEnv, BatchScriptOutsideAStepIsOneProcess) {
  // What sbatch's script sees (checked on a real cluster): no step id.
  LaunchEnv e = Detect({{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "2"}, {"SLURM_LOCALID", "0"},
                        {"SLURM_JOB_ID", "7"}});
  EXPECT_EQ(e.launcher, "");
  EXPECT_EQ(e.world_size, 1);
}

TEST(LaunchEnv, MpirunInsideAnAllocationWinsOverSlurm) {
  // mpirun's daemons are srun tasks: SLURM_PROCID numbers nodes, not ranks.
  LaunchEnv e = Detect({{"SLURM_STEP_ID", "0"}, {"SLURM_PROCID", "1"}, {"SLURM_NTASKS", "2"},
                        {"OMPI_COMM_WORLD_RANK", "6"}, {"OMPI_COMM_WORLD_SIZE", "8"}});
  EXPECT_EQ(e.launcher, "mpirun");
  EXPECT_EQ(e.rank, 6);
  EXPECT_EQ(e.world_size, 8);
}

TEST(Watchdog, FiresOnceWithAMessageNamingTheCallAndActivity) {
  std::atomic<int> fired{0};
  std::string message;
  absl::Notification done;
  Watchdog w(absl::Milliseconds(50), "rank 0 of 2 (host h)", [&](const std::string& m) {
    message = m;
    if (fired.fetch_add(1) == 0) done.Notify();
  });
  w.SetActivity("step 12");
  w.Arm("MPI_Allreduce of 8 floats");
  ASSERT_TRUE(done.WaitForNotificationWithTimeout(absl::Seconds(10)));
  absl::SleepFor(absl::Milliseconds(150));  // no second report for the same call
  w.Disarm();
  EXPECT_EQ(fired.load(), 1);
  EXPECT_THAT(message, HasSubstr("rank 0 of 2 (host h): MPI_Allreduce of 8 floats did not finish "
                                 "within distributed.timeout_s = 50ms (step 12)"));
}

TEST(Watchdog, QuietWhenCallsFinishInTime) {
  std::atomic<int> fired{0};
  Watchdog w(absl::Milliseconds(200), "r", [&](const std::string&) { fired++; });
  for (int i = 0; i < 20; ++i) {
    Watchdog::Scope s(&w, "call");
    absl::SleepFor(absl::Milliseconds(5));
  }
  absl::SleepFor(absl::Milliseconds(300));  // disarmed: nothing pending
  EXPECT_EQ(fired.load(), 0);
}

TEST(HashBytes, StableAndSensitive) {
  const std::string a = "the same job spec, byte for byte";
  std::string b = a;
  EXPECT_EQ(HashBytes(a.data(), a.size()), HashBytes(b.data(), b.size()));
  b.back() ^= 1;
  EXPECT_NE(HashBytes(a.data(), a.size()), HashBytes(b.data(), b.size()));
  // Chaining equals one pass over the whole buffer when split at a multiple of 8.
  const uint64_t whole = HashBytes(a.data(), a.size());
  EXPECT_EQ(HashBytes(a.data() + 8, a.size() - 8, HashBytes(a.data(), 8)), whole);
  absl::StatusOr<uint64_t> exe = ExecutableHash();
  ASSERT_TRUE(exe.ok()) << exe.status();
  EXPECT_EQ(*ExecutableHash(), *exe);
}

TEST(DistributedContext, SingleProcessAgreesWithItself) {
  DistributedSpec spec;
  spec.set_bucket_mb(2);
  spec.set_timeout_s(7);
  std::unique_ptr<DistributedContext> ctx = DistributedContext::SingleProcess(spec);
  EXPECT_EQ(ctx->world_size(), 1);
  EXPECT_TRUE(ctx->is_root());
  EXPECT_EQ(ctx->bucket_bytes(), 2 << 20);
  EXPECT_EQ(ctx->timeout(), absl::Seconds(7));
  EXPECT_TRUE(ctx->VerifySameJob(123).ok());
  EXPECT_TRUE(ctx->AllOk(absl::OkStatus(), "x").ok());
  absl::Status s = ctx->AllOk(absl::NotFoundError("no file"), "opening data");
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()), HasSubstr("opening data: no file"));
  EXPECT_TRUE(IsAgreedError(s));
  EXPECT_FALSE(IsAgreedError(absl::NotFoundError("plain")));
  std::string text = "abc";
  EXPECT_TRUE(ctx->BroadcastString(&text, 0).ok());
  EXPECT_EQ(text, "abc");
}

TEST(DistributedContext, DefaultsWhenTheJobLeavesThemZero) {
  std::unique_ptr<DistributedContext> ctx = DistributedContext::SingleProcess();
  EXPECT_EQ(ctx->bucket_bytes(), int64_t{kDefaultBucketMb} << 20);
  EXPECT_EQ(ctx->timeout(), absl::Seconds(kDefaultTimeoutS));
}

TEST(DistributedContext, CreateWithoutBackendIsOneProcess) {
  absl::StatusOr<std::unique_ptr<DistributedContext>> ctx =
      DistributedContext::Create(DistributedSpec());
  ASSERT_TRUE(ctx.ok()) << ctx.status();
  EXPECT_EQ((*ctx)->world_size(), 1);
  EXPECT_EQ((*ctx)->comm().backend(), "single");
}

TEST(GradientSync, ShardLayoutCoversEveryValueOnce) {
  SingleProcessCommunicator c;
  GradientSync s(&c, 10, 4 * 3);
  EXPECT_EQ(s.bucket_elems(), 3);
  EXPECT_EQ(s.begin(), 0);
  EXPECT_EQ(s.end(), 10);
  std::vector<float> g = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  ASSERT_TRUE(s.AllReduceMean(g.data()).ok());
  EXPECT_EQ(g[9], 10);
  absl::StatusOr<double> ss = s.ShardedSumSquares(g.data());
  ASSERT_TRUE(ss.ok());
  EXPECT_EQ(*ss, 385);
}

// A model-like store: two decayed matrices and an undecayed vector, sizes chosen so that shard
// boundaries cut tensors.
ParamStore MakeStore() {
  ParamStore ps;
  ps.Add("w1", {5, 7}, true);
  ps.Add("b1", {7}, false);
  ps.Add("w2", {7, 3}, true);
  ps.Finalize();
  Rng rng(3);
  for (float& p : ps.params()) p = static_cast<float>(rng.Normal());
  return ps;
}

TEST(Zero1Optimizer, ShardsUpdateExactlyLikeTheWholeOptimizer) {
  AdamWConfig config;
  config.grad_clip = 0.5f;  // active: the norm below is larger
  ParamStore whole = MakeStore();
  const int64_t n = whole.num_elements();
  AdamW full(config, n);
  // Three "ranks", each with its own replica and its shard of the optimizer.
  const int world = 3;
  const int64_t shard = (n + world - 1) / world;
  std::vector<ParamStore> replicas(world, MakeStore());
  std::vector<AdamW> shards;
  for (int r = 0; r < world; ++r) {
    shards.emplace_back(config, n, std::min(n, r * shard), std::min(n, (r + 1) * shard));
    EXPECT_TRUE(shards.back().sharded());
  }
  Rng rng(5);
  for (int step = 0; step < 4; ++step) {
    std::vector<float> g(n);
    for (float& x : g) x = static_cast<float>(rng.Normal());
    whole.grads() = g;
    const double norm = full.Step(&whole, 0.01f);
    for (int r = 0; r < world; ++r) {
      replicas[r].grads() = g;
      shards[r].Update(&replicas[r], 0.01f, norm);
    }
    // The all-gather: every replica takes each shard's updated parameters.
    for (int r = 0; r < world; ++r) {
      for (int o = 0; o < world; ++o) {
        for (int64_t i = shards[o].begin(); i < shards[o].end(); ++i) {
          replicas[r].params()[i] = replicas[o].params()[i];
        }
      }
    }
    if (step == 1) {
      // A re-initialised tensor (w2) restarts its moments on whichever shards hold it.
      const ParamInfo& w2 = whole.info(2);
      full.ResetMoments(w2.offset, w2.size);
      for (AdamW& s : shards) s.ResetMoments(w2.offset, w2.size);
    }
  }
  for (int r = 0; r < world; ++r) {
    EXPECT_EQ(replicas[r].params(), whole.params()) << "replica " << r;
    for (int64_t i = shards[r].begin(); i < shards[r].end(); ++i) {
      EXPECT_EQ(shards[r].m()[i - shards[r].begin()], full.m()[i]);
      EXPECT_EQ(shards[r].v()[i - shards[r].begin()], full.v()[i]);
    }
  }
  EXPECT_EQ(shards[0].step(), 4);
}

TEST(Zero1Optimizer, WholeOptimizerIsNotSharded) {
  AdamW full(AdamWConfig(), 10);
  EXPECT_FALSE(full.sharded());
  EXPECT_EQ(full.m().size(), 10u);
  AdamW part(AdamWConfig(), 10, 4, 8);
  EXPECT_EQ(part.m().size(), 4u);
}

}  // namespace
}  // namespace qtrain
