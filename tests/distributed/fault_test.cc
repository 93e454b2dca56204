// Failures between ranks end the job with a clear error instead of a hang: a killed rank, a
// hung (stopped) rank caught by the watchdog within distributed.timeout_s, ranks that run
// different job specs or different binaries, and several ranks without a distributed backend.
#include <signal.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/distributed/test_util.h"

namespace qtrain::testing {
namespace {

namespace fs = std::filesystem;
using ::testing::AnyOf;
using ::testing::HasSubstr;
using ::testing::Not;

int Count(const std::string& text, const std::string& needle) {
  int n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

class FaultTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    corpus_ = TmpDir() + "/corpus";
    ASSERT_TRUE(WriteCorpus(corpus_).ok());
  }

  TinyJob Job(const std::string& name) {
    TinyJob job;
    job.name = name;
    job.out_dir = TmpDir() + "/" + name;
    job.corpus_dir = corpus_;
    fs::remove_all(job.out_dir);
    return job;
  }

  std::vector<std::string> LaunchEnv(const TinyJob& job) {
    return {"NP=2", "JOB=" + job.Write(), "QTRAIN_BIN=" + Runfile("trainer/qtrain"),
            "THREADS_PER_RANK=1"};
  }

  // mpirun itself for jobs mpirun.sh does not cover (a different command per rank).
  static std::string Mpirun() {
    return geteuid() == 0 ? "mpirun --allow-run-as-root --oversubscribe"
                          : "mpirun --oversubscribe";
  }

  static std::string corpus_;
};

std::string FaultTest::corpus_;

TEST_F(FaultTest, KilledRankStopsTheOtherWithAClearError) {
  TinyJob job = Job("killed");
  job.steps = 1000000;  // runs until a rank is killed
  job.ckpt_every = 0;
  job.timeout_s = 10;
  Child mpirun(Runfile("launch/mpirun.sh"), TmpDir() + "/killed.log", LaunchEnv(job));
  ASSERT_TRUE(mpirun.WaitForOutput("step     2/", 60)) << mpirun.Output();
  const pid_t rank1 = FindRank(mpirun.pid(), 1);
  ASSERT_GT(rank1, 0) << "no rank 1 among the children of mpirun " << mpirun.pid();
  const double t0 = NowSeconds();
  ASSERT_EQ(kill(rank1, SIGKILL), 0);
  ProcessResult r = mpirun.Wait(job.timeout_s + 30);
  ASSERT_FALSE(r.timed_out) << "the job hung after rank 1 died:\n" << r.output;
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_LT(NowSeconds() - t0, job.timeout_s + 15) << r.output;
  // mpirun names the dead rank; the survivor says why it stops (the launcher's SIGTERM or its
  // own watchdog, whichever comes first).
  EXPECT_THAT(r.output, HasSubstr("rank 1"));
  EXPECT_THAT(r.output, AnyOf(HasSubstr("rank 0 of 2 (host"), HasSubstr("exited on signal 9")))
      << r.output;
}

TEST_F(FaultTest, HungRankMakesTheWatchdogStopTheJobWithinTheTimeout) {
  TinyJob job = Job("hung");
  job.steps = 1000000;
  job.ckpt_every = 0;
  job.timeout_s = 4;
  Child mpirun(Runfile("launch/mpirun.sh"), TmpDir() + "/hung.log", LaunchEnv(job));
  ASSERT_TRUE(mpirun.WaitForOutput("step     2/", 60)) << mpirun.Output();
  const pid_t rank1 = FindRank(mpirun.pid(), 1);
  ASSERT_GT(rank1, 0) << "no rank 1 among the children of mpirun " << mpirun.pid();
  // A stopped process is alive to mpirun: only rank 0's watchdog can notice.
  const double t0 = NowSeconds();
  ASSERT_EQ(kill(rank1, SIGSTOP), 0);
  ProcessResult r = mpirun.Wait(job.timeout_s + 30);
  const double elapsed = NowSeconds() - t0;
  kill(rank1, SIGKILL);  // in case it outlived the job
  ASSERT_FALSE(r.timed_out) << "no watchdog: the job hung\n" << r.output;
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_GE(elapsed, job.timeout_s - 0.5) << r.output;
  EXPECT_LT(elapsed, job.timeout_s + 15) << r.output;
  EXPECT_THAT(r.output, HasSubstr("rank 0 of 2 (host"));
  EXPECT_THAT(r.output, HasSubstr("did not finish within distributed.timeout_s = 4s"));
  EXPECT_THAT(r.output, HasSubstr("another rank has died or hangs"));
}

TEST_F(FaultTest, JobSpecMismatchBetweenRanksIsDetected) {
  TinyJob a = Job("mismatch");
  TinyJob b = a;
  b.name = "mismatch_b";  // same out_dir, different spec (the name differs)
  const std::string qtrain = Runfile("trainer/qtrain");
  const std::string cmd =
      absl::StrCat(Mpirun(), " -x OMP_NUM_THREADS=1 -np 1 ", qtrain, " --job=", a.Write(),
                   " : -np 1 ", qtrain, " --job=", b.Write());
  ProcessResult r = RunCommand(cmd, 60);
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("job spec mismatch: rank 1 (host"));
  // Every rank knows: rank 0 alone reports, and all stop without an abort.
  EXPECT_EQ(Count(r.output, "job spec mismatch"), 1) << r.output;
  EXPECT_THAT(r.output, Not(HasSubstr("MPI_ABORT")));
  EXPECT_FALSE(fs::exists(a.out_dir + "/metrics.jsonl"));  // stopped before training
}

TEST_F(FaultTest, CodeVersionMismatchBetweenRanksIsDetected) {
  TinyJob job = Job("binary_mismatch");
  // Another build of qtrain: the same binary with one more byte at the end.
  const std::string other = TmpDir() + "/qtrain_other";
  fs::copy_file(Runfile("trainer/qtrain"), other, fs::copy_options::overwrite_existing);
  std::ofstream(other, std::ios::app | std::ios::binary) << '\n';
  fs::permissions(other, fs::perms::owner_all);
  const std::string cmd =
      absl::StrCat(Mpirun(), " -x OMP_NUM_THREADS=1 -np 1 ", Runfile("trainer/qtrain"),
                   " --job=", job.Write(), " : -np 1 ", other, " --job=", job.Write());
  ProcessResult r = RunCommand(cmd, 60);
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("code version mismatch: rank 1 (host"));
  EXPECT_EQ(Count(r.output, "code version mismatch"), 1) << r.output;
}

TEST_F(FaultTest, SeveralRanksWithoutABackendAreRefused) {
  TinyJob job = Job("no_backend");
  const std::string cmd = absl::StrCat(Mpirun(), " -x OMP_NUM_THREADS=1 -np 2 ",
                                       Runfile("trainer/qtrain"), " --backend=none --job=",
                                       job.Write());
  ProcessResult r = RunCommand(cmd, 60);
  ASSERT_FALSE(r.timed_out) << r.output;
  EXPECT_NE(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("add `distributed { backend: MPI }`"));
}

}  // namespace
}  // namespace qtrain::testing
