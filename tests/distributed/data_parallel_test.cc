// Data-parallel training end to end through launch/mpirun.sh and the qtrain binary: 2 ranks
// with batch B match one process with batch 2B, ZeRO-1 matches plain data parallelism, and a
// checkpoint resumes on another number of ranks with the same global batch.
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/distributed/test_util.h"
#include "trainer/checkpoint.h"
#include "trainer/safetensors.h"

namespace qtrain::testing {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::Not;

constexpr double kDeadline = 120;

class DataParallelTest : public ::testing::Test {
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

  // `np` ranks through launch/mpirun.sh (1 rank too: the same MPI path, a world of one).
  ProcessResult Launch(const TinyJob& job, int np, const std::string& flags) {
    const std::string cmd =
        absl::StrCat(Runfile("launch/mpirun.sh"), " --quiet ", flags);
    ProcessResult r = RunCommand(cmd, kDeadline,
                                 {absl::StrCat("NP=", np), "JOB=" + job.Write(),
                                  "QTRAIN_BIN=" + Runfile("trainer/qtrain"),
                                  "THREADS_PER_RANK=1"});
    EXPECT_FALSE(r.timed_out) << r.output;
    return r;
  }

  static std::string corpus_;
};

std::string DataParallelTest::corpus_;

std::map<std::string, std::vector<float>> Weights(const TinyJob& job, int step) {
  absl::StatusOr<std::map<std::string, std::vector<float>>> w =
      ReadWeights(CheckpointPath(job.out_dir, step));
  EXPECT_TRUE(w.ok()) << w.status();
  return w.ok() ? *w : std::map<std::string, std::vector<float>>{};
}

TEST_F(DataParallelTest, TwoRanksMatchOneProcessWithTwiceTheBatch) {
  // One job file for both: --global_batch=8 makes batch_size 8 on one rank, 4 on two.
  TinyJob one = Job("one_rank");
  ProcessResult r1 = Launch(one, 1, "--global_batch=8");
  ASSERT_EQ(r1.exit_code, 0) << r1.output;
  TinyJob two = Job("two_ranks");
  ProcessResult r2 = Launch(two, 2, "--global_batch=8");
  ASSERT_EQ(r2.exit_code, 0) << r2.output;

  // Same tokens, same mean gradient; only the summation order differs (float rounding).
  const double diff = MaxAbsDiff(Weights(one, 10), Weights(two, 10));
  std::printf("max |param difference| after 10 steps, 2 ranks x B=4 vs 1 x B=8: %.3g\n", diff);
  EXPECT_LT(diff, 2e-5) << "parameters after 10 steps differ by " << diff;
  EXPECT_GT(MaxAbsDiff(Weights(one, 5), Weights(one, 10)), 1e-3);  // it did train

  // Fixed bucket order, same world size: a second run is bit-identical.
  TinyJob again = Job("two_ranks_again");
  ProcessResult r3 = Launch(again, 2, "--global_batch=8");
  ASSERT_EQ(r3.exit_code, 0) << r3.output;
  EXPECT_EQ(MaxAbsDiff(Weights(two, 10), Weights(again, 10)), 0.0);

  // The logged losses are global means: they match step by step, val included.
  MetricsRows m1 = ReadMetricsRows(one.out_dir), m2 = ReadMetricsRows(two.out_dir);
  ASSERT_EQ(m1.train_loss.size(), 10u);
  ASSERT_EQ(m2.train_loss.size(), 10u);  // rank 0 alone writes metrics
  for (int i = 0; i < 10; ++i) {
    EXPECT_NEAR(m1.train_loss[i], m2.train_loss[i], 1e-4) << "step " << i + 1;
    EXPECT_NEAR(m1.val_loss[i], m2.val_loss[i], 1e-4) << "step " << i + 1;
  }
  EXPECT_GT(m1.val_loss[4], 0);
}

TEST_F(DataParallelTest, Zero1MatchesPlainDataParallel) {
  TinyJob plain = Job("plain_dp");
  ProcessResult r1 = Launch(plain, 2, "");
  ASSERT_EQ(r1.exit_code, 0) << r1.output;
  TinyJob zero = Job("zero1_dp");
  zero.zero1 = true;
  ProcessResult r2 = Launch(zero, 2, "");
  ASSERT_EQ(r2.exit_code, 0) << r2.output;
  const double diff = MaxAbsDiff(Weights(plain, 10), Weights(zero, 10));
  std::printf("max |param difference| after 10 steps, ZeRO-1 vs plain data parallel: %.3g\n",
              diff);
  // Same sums per element; only the norm for clipping is summed over two shards.
  EXPECT_LT(diff, 1e-6) << "ZeRO-1 parameters differ from plain data parallel by " << diff;

  // The checkpoint holds whole moments (gathered from the shards): identical tensor sets.
  absl::StatusOr<SafeTensors> a = ReadSafeTensors(CheckpointPath(plain.out_dir, 10));
  absl::StatusOr<SafeTensors> b = ReadSafeTensors(CheckpointPath(zero.out_dir, 10));
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_EQ(a->tensors.size(), b->tensors.size());
  for (const auto& [name, t] : a->tensors) {
    ASSERT_TRUE(b->tensors.count(name)) << name;
    EXPECT_EQ(t.bytes.size(), b->tensors.at(name).bytes.size()) << name;
  }
}

TEST_F(DataParallelTest, ResumesOnAnotherNumberOfRanks) {
  // Reference: ZeRO-1 on 2 ranks straight through 10 steps.
  TinyJob full = Job("resume_full");
  full.zero1 = true;
  ProcessResult r = Launch(full, 2, "--global_batch=8");
  ASSERT_EQ(r.exit_code, 0) << r.output;

  // Same job, "killed" after its step-5 checkpoint, resumed on one rank with the same global
  // batch: the checkpoint's data position and gathered moments carry over.
  TinyJob part = Job("resume_part");
  part.zero1 = true;
  part.out_dir = full.out_dir + "_part";
  fs::remove_all(part.out_dir);
  r = Launch(part, 2, "--global_batch=8");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  fs::remove(CheckpointPath(part.out_dir, 10));
  r = Launch(part, 1, "--global_batch=8 --resume=latest");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const double diff = MaxAbsDiff(Weights(full, 10), Weights(part, 10));
  std::printf("max |param difference|, resumed at step 5 on 1 rank vs 2 ranks throughout: %.3g\n",
              diff);
  EXPECT_LT(diff, 2e-5) << "resumed on 1 rank, parameters differ by " << diff;

  // Without --global_batch the job's batch_size 4 on one rank halves the global batch: refused.
  fs::remove(CheckpointPath(part.out_dir, 10));
  r = Launch(part, 1, "--resume=latest");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr("global batch of 8 sequences (2 ranks)"));
  EXPECT_THAT(r.output, HasSubstr("--global_batch=8"));
}

TEST_F(DataParallelTest, QuantizedModelsKeepTheirReplicasIdentical) {
  // QAT activation steps initialise from the first training batch, which each rank sees only a
  // slice of; FP8 amax histories follow each rank's own activations. The replicas must still
  // hold identical parameters at every checkpoint (qtrain compares them and stops if not).
  for (const std::string precision :
       {"linear: QAT qat { weight_bits: 4 act_bits: 8 }", "linear: FP8"}) {
    SCOPED_TRACE(precision);
    TinyJob job = Job(precision[8] == 'Q' ? "dp_qat" : "dp_fp8");
    job.precision = precision;
    ProcessResult r = Launch(job, 2, "");
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_THAT(r.output, Not(HasSubstr("diverged")));
    EXPECT_TRUE(fs::exists(CheckpointPath(job.out_dir, 10)));
  }
}

TEST_F(DataParallelTest, GradientAccumulationOnTwoRanksMatchesOneRank) {
  // 2 ranks x batch 2 x 2 micro-steps = 1 rank x batch 4 x 2 micro-steps: same 8 sequences.
  TinyJob one = Job("accum_one");
  one.grad_accum = 2;
  one.batch_size = 4;
  ProcessResult r1 = Launch(one, 1, "");
  ASSERT_EQ(r1.exit_code, 0) << r1.output;
  TinyJob two = Job("accum_two");
  two.grad_accum = 2;
  two.batch_size = 2;
  ProcessResult r2 = Launch(two, 2, "");
  ASSERT_EQ(r2.exit_code, 0) << r2.output;
  const double diff = MaxAbsDiff(Weights(one, 10), Weights(two, 10));
  std::printf("max |param difference|, grad_accum 2: 2 ranks x B=2 vs 1 x B=4: %.3g\n", diff);
  EXPECT_LT(diff, 2e-5) << diff;
}

}  // namespace
}  // namespace qtrain::testing
