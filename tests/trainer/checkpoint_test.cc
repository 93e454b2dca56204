// Checkpoints: round trip, crash safety, rejection of truncated/corrupt/mismatched files.
#include "trainer/checkpoint.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "gtest/gtest.h"
#include "trainer/atomic_file.h"

namespace qtrain {
namespace {

namespace fs = std::filesystem;

std::string FreshDir(const std::string& name) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string dir = std::string(tmp ? tmp : "/tmp") + "/" + name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

ParamStore MakeStore() {
  ParamStore s;
  s.Add("w", {3, 5}, true);
  s.Add("b", {5}, false);
  s.Finalize();
  return s;
}

void Fill(ParamStore& s, AdamW& opt, float base) {
  for (int64_t i = 0; i < s.num_elements(); ++i) {
    s.params()[i] = base + 0.25f * i;
    opt.m()[i] = -base * i;
    opt.v()[i] = base * 0.5f + i;
  }
  opt.set_step(static_cast<int>(base));
}

TrainState State(int step) {
  TrainState st;
  st.step = step;
  st.data = {2, 4096, 1};
  st.rng = Rng(42).Serialize();
  st.job_spec = "name: \"x\"";
  return st;
}

TEST(Checkpoint, RoundTripRestoresEverything) {
  const std::string dir = FreshDir("ckpt_rt");
  ParamStore s = MakeStore();
  AdamW opt({}, s.num_elements());
  Fill(s, opt, 3.0f);
  ASSERT_TRUE(SaveCheckpoint(dir, s, &opt, State(7), 0).ok());

  ParamStore s2 = MakeStore();
  AdamW opt2({}, s2.num_elements());
  absl::StatusOr<TrainState> st = LoadCheckpoint(CheckpointPath(dir, 7), &s2, &opt2);
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(st->step, 7);
  EXPECT_EQ(st->data.shard, 2);
  EXPECT_EQ(st->data.offset, 4096);
  EXPECT_EQ(st->data.epoch, 1);
  EXPECT_EQ(st->rng, Rng(42).Serialize());
  EXPECT_EQ(st->job_spec, "name: \"x\"");
  EXPECT_EQ(s2.params(), s.params());
  EXPECT_EQ(opt2.m(), opt.m());
  EXPECT_EQ(opt2.v(), opt.v());
  EXPECT_EQ(opt2.step(), 3);
}

TEST(Checkpoint, KeepLastDeletesOlder) {
  const std::string dir = FreshDir("ckpt_keep");
  ParamStore s = MakeStore();
  AdamW opt({}, s.num_elements());
  for (int step : {10, 20, 30}) ASSERT_TRUE(SaveCheckpoint(dir, s, &opt, State(step), 2).ok());
  EXPECT_FALSE(fs::exists(CheckpointPath(dir, 10)));
  EXPECT_TRUE(fs::exists(CheckpointPath(dir, 20)));
  EXPECT_EQ(*LatestCheckpoint(dir), CheckpointPath(dir, 30));
}

TEST(Checkpoint, KeepLastRotatesOnlyTheSameRun) {
  const std::string dir = FreshDir("ckpt_keep_runs");
  ParamStore s = MakeStore();
  AdamW opt({}, s.num_elements());
  auto of_run = [](int step, const std::string& id) {
    TrainState st = State(step);
    st.run_id = id;
    return st;
  };
  // Another run's later checkpoints, then this run's three saves with keep_last 2.
  for (int step : {100, 200}) ASSERT_TRUE(SaveCheckpoint(dir, s, &opt, of_run(step, "other"), 0).ok());
  for (int step : {10, 20, 30}) ASSERT_TRUE(SaveCheckpoint(dir, s, &opt, of_run(step, "mine"), 2).ok());
  EXPECT_TRUE(fs::exists(CheckpointPath(dir, 100)));
  EXPECT_TRUE(fs::exists(CheckpointPath(dir, 200)));
  EXPECT_FALSE(fs::exists(CheckpointPath(dir, 10)));
  EXPECT_TRUE(fs::exists(CheckpointPath(dir, 20)));
  EXPECT_TRUE(fs::exists(CheckpointPath(dir, 30)));
  EXPECT_EQ(LoadCheckpoint(CheckpointPath(dir, 30), &s, nullptr)->run_id, "mine");
  EXPECT_EQ((*ReadCheckpointMetadata(CheckpointPath(dir, 100))).at("run_id"), "other");
  EXPECT_NE(NewRunId(), NewRunId());
}

TEST(Checkpoint, CrashMidWriteLeavesPreviousUsable) {
  const std::string dir = FreshDir("ckpt_crash");
  ParamStore s = MakeStore();
  AdamW opt({}, s.num_elements());
  Fill(s, opt, 1.0f);
  ASSERT_TRUE(SaveCheckpoint(dir, s, &opt, State(100), 0).ok());
  // A child process dies (as if killed) after writing part of the next checkpoint.
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    Fill(s, opt, 9.0f);
    (void)SaveCheckpoint(dir, s, &opt, State(200), 0, [](size_t written) {
      if (written > 64) _exit(3);
    });
    _exit(0);
  }
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  ASSERT_EQ(WEXITSTATUS(status), 3) << "the fault hook did not fire";
  EXPECT_FALSE(fs::exists(CheckpointPath(dir, 200)));
  absl::StatusOr<std::string> latest = LatestCheckpoint(dir);
  ASSERT_TRUE(latest.ok()) << latest.status();
  EXPECT_EQ(*latest, CheckpointPath(dir, 100));
  ParamStore s2 = MakeStore();
  AdamW opt2({}, s2.num_elements());
  absl::StatusOr<TrainState> st = LoadCheckpoint(*latest, &s2, &opt2);
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(s2.params()[3], 1.0f + 0.75f);
}

TEST(Checkpoint, TruncatedOrCorruptRejectedWithPath) {
  const std::string dir = FreshDir("ckpt_bad");
  ParamStore s = MakeStore();
  AdamW opt({}, s.num_elements());
  Fill(s, opt, 2.0f);
  ASSERT_TRUE(SaveCheckpoint(dir, s, &opt, State(5), 0).ok());
  const std::string path = CheckpointPath(dir, 5);
  const std::string bytes = *ReadFile(path);

  ASSERT_TRUE(WriteFileAtomically(path, {absl::string_view(bytes).substr(0, bytes.size() / 2)}).ok());
  absl::StatusOr<TrainState> st = LoadCheckpoint(path, &s, &opt);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.status().message().find(path), std::string::npos) << st.status();

  std::string flipped = bytes;
  flipped[bytes.size() - 10] ^= 0x01;
  ASSERT_TRUE(WriteFileAtomically(path, {flipped}).ok());
  st = LoadCheckpoint(path, &s, &opt);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.status().message().find("checksum"), std::string::npos) << st.status();
}

TEST(Checkpoint, ShapeMismatchNamesTensor) {
  const std::string dir = FreshDir("ckpt_shape");
  ParamStore s = MakeStore();
  AdamW opt({}, s.num_elements());
  ASSERT_TRUE(SaveCheckpoint(dir, s, &opt, State(1), 0).ok());
  ParamStore other;
  other.Add("w", {5, 3}, true);
  other.Add("b", {5}, false);
  other.Finalize();
  AdamW opt2({}, other.num_elements());
  absl::StatusOr<TrainState> st = LoadCheckpoint(CheckpointPath(dir, 1), &other, &opt2);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.status().message().find("model/w"), std::string::npos) << st.status();
}

TEST(Checkpoint, NoCheckpointIsNotFound) {
  const std::string dir = FreshDir("ckpt_none");
  absl::StatusOr<std::string> latest = LatestCheckpoint(dir);
  ASSERT_FALSE(latest.ok());
  EXPECT_EQ(latest.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace qtrain
