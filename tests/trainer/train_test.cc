// The training loop end to end on a synthetic corpus: resume is bit-identical, metrics and
// checkpoints appear, learning happens.
#include "trainer/trainer.h"

#include <cstdlib>
#include <functional>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "configs/job_spec_loader.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "trainer/checkpoint.h"
#include "trainer/rng.h"
#include "trainer/safetensors.h"
#include "trainer/shard.h"
#include "trainer/model_setup.h"
#include "trainer/sinks.h"

namespace qtrain {
namespace {

namespace fs = std::filesystem;

std::string TmpDir() {
  const char* tmp = std::getenv("TEST_TMPDIR");
  return tmp ? tmp : "/tmp";
}

// A corpus with structure to learn: repeated phrases with a little noise.
void WriteCorpus(const std::string& dir) {
  fs::create_directories(dir);
  Rng rng(11);
  const std::string phrases[] = {"the cat sat on the mat. ", "a dog ran in the park. ",
                                 "we like to read books. "};
  for (const char* split : {"train", "val"}) {
    std::vector<uint16_t> tokens;
    while (tokens.size() < 40000) {
      const std::string& p = phrases[rng.NextU64() % 3];
      for (char c : p) tokens.push_back(static_cast<uint8_t>(c));
    }
    ASSERT_TRUE(WriteShard(absl::StrCat(dir, "/", split, "_a.bin"), tokens).ok());
  }
}

JobSpec TinyJob(const std::string& name) {
  const std::string data = TmpDir() + "/corpus";
  if (!fs::exists(data + "/train_a.bin")) WriteCorpus(data);
  const std::string text = absl::StrCat(R"(
    name: ")", name, R"("
    seed: 7
    out_dir: ")", TmpDir(), "/", name, R"("
    model { n_layer: 2 n_embd: 32 n_head: 4 }
    data { train_pattern: ")", data, R"(/train_*.bin" val_pattern: ")", data, R"(/val_*.bin" }
    optimizer { lr: 0.01 }
    schedule { warmup_steps: 2 }
    training { steps: 8 batch_size: 4 seq_len: 32 }
    eval { every_steps: 4 batches: 2 }
    checkpoint { every_steps: 4 keep_last: 0 }
  )");
  absl::StatusOr<JobSpec> spec = ParseJobSpec(text, "train_test.textproto");
  EXPECT_TRUE(spec.ok()) << spec.status();
  fs::remove_all(spec->out_dir());
  return *spec;
}

std::vector<nlohmann::json> ReadMetrics(const std::string& out_dir) {
  std::ifstream in(out_dir + "/metrics.jsonl");
  std::vector<nlohmann::json> rows;
  std::string line;
  while (std::getline(in, line)) rows.push_back(nlohmann::json::parse(line));
  return rows;
}

TEST(Train, WritesMetricsCheckpointsAndLearns) {
  JobSpec spec = TinyJob("learns");
  spec.mutable_training()->set_steps(300);
  spec.mutable_eval()->set_every_steps(150);
  RunOptions opt;
  opt.quiet = true;
  absl::StatusOr<RunResult> r = RunTraining(spec, opt);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->steps_done, 300);
  // Three phrases: far below the 5.55 nats of a uniform byte.
  EXPECT_LT(r->final_val_loss, 1.2);  // measured 0.84
  std::vector<nlohmann::json> rows = ReadMetrics(spec.out_dir());
  ASSERT_EQ(rows.size(), 300u);
  for (const char* key : {"step", "train_loss", "lr", "tokens_per_s", "grad_norm"}) {
    EXPECT_TRUE(rows[0].contains(key)) << key;
  }
  EXPECT_TRUE(rows[149].contains("val_loss"));
  EXPECT_FALSE(rows[148].contains("val_loss"));
  EXPECT_LT(rows[299]["train_loss"].get<double>(), rows[0]["train_loss"].get<double>());
  EXPECT_TRUE(fs::exists(CheckpointPath(spec.out_dir(), 300)));
  EXPECT_TRUE(fs::exists(spec.out_dir() + "/job_spec.textproto"));
}

// Runs `name` straight through and, as a second job, killed after its step-4 checkpoint and
// resumed; both must log identical losses and end with identical weights.
void ExpectResumeBitIdentical(const std::string& name,
                              const std::function<void(JobSpec*)>& configure) {
  JobSpec full = TinyJob(name + "_full");
  configure(&full);
  RunOptions opt;
  opt.quiet = true;
  absl::StatusOr<RunResult> r = RunTraining(full, opt);
  ASSERT_TRUE(r.ok()) << r.status();

  JobSpec part = TinyJob(name + "_part");
  configure(&part);
  ASSERT_TRUE(RunTraining(part, opt).ok());
  fs::remove(CheckpointPath(part.out_dir(), 8));
  opt.resume = "latest";
  r = RunTraining(part, opt);
  ASSERT_TRUE(r.ok()) << r.status();

  std::vector<nlohmann::json> a = ReadMetrics(full.out_dir());
  std::vector<nlohmann::json> b = ReadMetrics(part.out_dir());
  ASSERT_EQ(a.size(), 8u);
  ASSERT_EQ(b.size(), 8u);  // rows 5..8 of the first run were dropped on resume
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(a[i]["step"], b[i]["step"]);
    // Bit-identical: every logged number (losses, norms, statistics, ranks) compared exactly;
    // only timings may differ.
    for (auto it = a[i].begin(); it != a[i].end(); ++it) {
      if (it.key() == "tokens_per_s" || it.key() == "step_ms") continue;
      ASSERT_TRUE(b[i].contains(it.key())) << it.key();
      EXPECT_EQ(it.value(), b[i][it.key()]) << it.key() << " at step " << i + 1;
    }
  }
  // The final weights, optimizer moments and buffers agree exactly too (the metadata differs:
  // the two jobs have different names and out_dirs).
  SafeTensors wa = *ReadSafeTensors(CheckpointPath(full.out_dir(), 8));
  SafeTensors wb = *ReadSafeTensors(CheckpointPath(part.out_dir(), 8));
  ASSERT_EQ(wa.tensors.size(), wb.tensors.size());
  for (const auto& [tensor, t] : wa.tensors) {
    EXPECT_TRUE(t.bytes == wb.tensors.at(tensor).bytes) << tensor << " differs";
  }
}

TEST(Train, ResumeIsBitIdentical) {
  ExpectResumeBitIdentical("plain", [](JobSpec*) {});
}

TEST(Train, QatWithPhiAndTweoResumesBitIdentical) {
  ExpectResumeBitIdentical("qat", [](JobSpec* s) {
    PrecisionSpec* p = s->mutable_precision();
    p->set_linear(QAT);
    p->mutable_qat()->set_weight_bits(4);
    p->mutable_qat()->set_act_bits(4);
    p->mutable_aux_lowrank()->set_enabled(true);
    p->mutable_aux_lowrank()->set_rank(8);
    p->mutable_aux_lowrank()->set_decay_period(2);  // rank 8 -> 4 -> 2 -> 1 over the 8 steps
    p->mutable_tweo()->set_enabled(true);
  });
  std::vector<nlohmann::json> rows = ReadMetrics(TmpDir() + "/qat_full");
  EXPECT_EQ(rows[0]["phi_rank.0"], 8);
  EXPECT_EQ(rows[2]["phi_rank.0"], 4);
  EXPECT_EQ(rows[7]["phi_rank.0"], 1);
  EXPECT_TRUE(rows[0].contains("tweo_loss"));
  EXPECT_TRUE(rows[0].contains("kurtosis.1"));
}

TEST(Train, Fp8DelayedScalingResumesBitIdentical) {
  ExpectResumeBitIdentical("fp8", [](JobSpec* s) {
    s->mutable_precision()->set_linear(FP8);
    s->mutable_precision()->mutable_fp8()->set_amax_history_len(4);
    // Keep the first block in full precision: per-layer overrides.
    LayerOverride* o = s->mutable_precision()->add_overrides();
    o->set_match("block.0.*");
    o->set_precision(FULL);
  });
}

// A sink attached through RunOptions sees what the local sinks see, in the same order, after
// them: every metrics row, every checkpoint (its file already written), then Finish.
class RecordingSink : public RunSink {
 public:
  absl::Status WriteMetrics(int step, const MetricRow& row) override {
    events.push_back(absl::StrCat("metrics ", step, row.back().first == "val_loss" ? " val" : ""));
    return absl::OkStatus();
  }
  absl::Status WriteCheckpoint(const CheckpointData& c) override {
    events.push_back(absl::StrCat("checkpoint ", c.state.step, fs::exists(c.local_path) ? "" : " missing"));
    EXPECT_EQ(c.optimizer.num_params(), c.params.num_elements());
    return absl::OkStatus();
  }
  absl::Status Finish() override {
    events.push_back("finish");
    return absl::OkStatus();
  }
  std::vector<std::string> events;
};

TEST(Train, AttachedSinksSeeEveryRowAndCheckpoint) {
  JobSpec spec = TinyJob("sinks");
  RecordingSink a, b;
  RunOptions opt;
  opt.quiet = true;
  opt.sinks = {&a, &b};
  ASSERT_TRUE(RunTraining(spec, opt).ok());
  const std::vector<std::string> expected = {
      "metrics 1", "metrics 2", "metrics 3", "metrics 4 val", "checkpoint 4",
      "metrics 5", "metrics 6", "metrics 7", "metrics 8 val", "checkpoint 8", "finish"};
  EXPECT_EQ(a.events, expected);
  EXPECT_EQ(b.events, expected);
  EXPECT_EQ(ReadMetrics(spec.out_dir()).size(), 8u);  // the JSONL sink is still there

  // A failing sink stops the run with its error.
  class Failing : public RunSink {
    absl::Status WriteCheckpoint(const CheckpointData&) override {
      return absl::UnavailableError("upload refused");
    }
  } failing;
  JobSpec again = TinyJob("sinks_fail");
  opt.sinks = {&failing};
  absl::StatusOr<RunResult> r = RunTraining(again, opt);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("upload refused"), std::string::npos) << r.status();
}

TEST(Train, ResumeFromCorruptCheckpointFailsClearly) {
  JobSpec spec = TinyJob("corrupt");
  RunOptions opt;
  opt.quiet = true;
  ASSERT_TRUE(RunTraining(spec, opt).ok());
  const std::string path = CheckpointPath(spec.out_dir(), 8);
  std::string bytes = *ReadFile(path);
  ASSERT_TRUE(WriteFileAtomically(path, {absl::string_view(bytes).substr(0, 100)}).ok());
  opt.resume = "latest";
  absl::StatusOr<RunResult> r = RunTraining(spec, opt);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find(path), std::string::npos) << r.status();
}

TEST(Train, MissingDataNamesPattern) {
  JobSpec spec = TinyJob("nodata");
  spec.mutable_data()->set_train_pattern(TmpDir() + "/absent/train_*.bin");
  RunOptions opt;
  opt.quiet = true;
  absl::StatusOr<RunResult> r = RunTraining(spec, opt);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("absent/train_*.bin"), std::string::npos) << r.status();
}

}  // namespace
}  // namespace qtrain

namespace qtrain {
namespace {

// CI machines have the CUDA toolkit but no GPU: a CUDA job must stop with a clear message
// (a GPU machine runs the CUDA path itself in tests/gpu).
TEST(Train, CudaJobWithoutGpuFailsClearly) {
  JobSpec spec = TinyJob("cuda_without_gpu");
  spec.set_device(CUDA);
  RunOptions opt;
  opt.quiet = true;
  absl::StatusOr<RunResult> r = RunTraining(spec, opt);
  if (r.ok()) {
    EXPECT_EQ(r->steps_done, 8);  // a machine with a GPU trains
  } else {
    EXPECT_NE(r.status().message().find("CUDA"), std::string::npos) << r.status();
  }
}

}  // namespace
}  // namespace qtrain

namespace qtrain {
namespace {

// Distillation from a teacher checkpoint (KL on the logits): the term is logged, falls as the
// student learns from the teacher, and resumes bit-identically.
TEST(Train, DistillationFromATeacherCheckpoint) {
  JobSpec teacher = TinyJob("teacher");
  teacher.mutable_training()->set_steps(40);
  RunOptions opt;
  opt.quiet = true;
  ASSERT_TRUE(RunTraining(teacher, opt).ok());
  const std::string ckpt = CheckpointPath(teacher.out_dir(), 40);
  auto with_teacher = [&](JobSpec* s) {
    DistillSpec* d = s->mutable_precision()->mutable_distill();
    d->set_teacher_checkpoint(ckpt);
    d->set_loss(DistillSpec::KL);
    d->set_weight(1.0f);
  };
  ExpectResumeBitIdentical("distill", with_teacher);
  std::vector<nlohmann::json> rows = ReadMetrics(TmpDir() + "/distill_full");
  ASSERT_EQ(rows.size(), 8u);
  ASSERT_TRUE(rows[0].contains("distill_loss"));
  EXPECT_GT(rows[0]["distill_loss"].get<double>(), 0.0);
  EXPECT_LT(rows[7]["distill_loss"].get<double>(), rows[0]["distill_loss"].get<double>());

  // A teacher that does not exist is named.
  JobSpec bad = TinyJob("distill_missing");
  bad.mutable_precision()->mutable_distill()->set_teacher_checkpoint(TmpDir() + "/nope.safetensors");
  bad.mutable_precision()->mutable_distill()->set_weight(1.0f);
  absl::StatusOr<RunResult> r = RunTraining(bad, opt);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("nope.safetensors"), std::string::npos) << r.status();
}

}  // namespace
}  // namespace qtrain

namespace qtrain {
namespace {

std::string ReadText(const std::string& path) { return *ReadFile(path); }

// A fresh run must not destroy another run in its out_dir: it stops naming the directory and
// the two ways on; --overwrite (RunOptions::overwrite) then starts afresh.
TEST(OutDir, NewRunRefusesAnOutDirHoldingAnotherRun) {
  JobSpec spec = TinyJob("taken");
  RunOptions opt;
  opt.quiet = true;
  ASSERT_TRUE(RunTraining(spec, opt).ok());
  const std::string metrics_before = ReadText(spec.out_dir() + "/metrics.jsonl");

  absl::StatusOr<RunResult> r = RunTraining(spec, opt);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  const std::string msg(r.status().message());
  EXPECT_NE(msg.find("out_dir " + spec.out_dir() + " already holds another run"), std::string::npos)
      << msg;
  EXPECT_NE(msg.find("step_00000008.safetensors"), std::string::npos) << msg;
  EXPECT_NE(msg.find("--resume=latest"), std::string::npos) << msg;
  EXPECT_NE(msg.find("--overwrite"), std::string::npos) << msg;
  // Nothing of the first run was touched.
  EXPECT_EQ(ReadText(spec.out_dir() + "/metrics.jsonl"), metrics_before);
  EXPECT_TRUE(fs::exists(CheckpointPath(spec.out_dir(), 4)));
  EXPECT_TRUE(fs::exists(CheckpointPath(spec.out_dir(), 8)));

  // --overwrite would delete the checkpoint the job starts from: refused, nothing deleted.
  JobSpec from_own = spec;
  from_own.mutable_training()->set_init_from(CheckpointPath(spec.out_dir(), 8));
  opt.overwrite = true;
  r = RunTraining(from_own, opt);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("which this job reads (training.init_from"),
            std::string::npos) << r.status();
  EXPECT_TRUE(fs::exists(CheckpointPath(spec.out_dir(), 8)));

  // A shorter run with --overwrite: the old run's later checkpoint is gone, so that
  // --resume=latest cannot pick it up; metrics.jsonl holds the new run only.
  spec.mutable_training()->set_steps(4);
  spec.mutable_checkpoint()->set_every_steps(2);
  ASSERT_TRUE(RunTraining(spec, opt).ok());
  EXPECT_FALSE(fs::exists(CheckpointPath(spec.out_dir(), 8)));
  EXPECT_EQ(*LatestCheckpoint(spec.out_dir()), CheckpointPath(spec.out_dir(), 4));
  EXPECT_EQ(ReadMetrics(spec.out_dir()).size(), 4u);

  // A run that died before its first checkpoint left metrics only: refused as well.
  JobSpec died = TinyJob("died");
  fs::create_directories(died.out_dir());
  ASSERT_TRUE(WriteFileAtomically(died.out_dir() + "/metrics.jsonl", {"{\"step\":1}\n"}).ok());
  opt.overwrite = false;
  r = RunTraining(died, opt);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("its metrics.jsonl"), std::string::npos) << r.status();
}

// Rotation (keep_last) with checkpoints of two runs in one directory (as runs before this
// check could leave them): only the saving run's own older files go. Before, the highest step
// numbers were kept, so the old run's step 20 and 40 survived and the new run's own step-12
// checkpoint was deleted as soon as it was written.
TEST(OutDir, RotationTouchesOnlyTheCurrentRunsCheckpoints) {
  JobSpec old_run = TinyJob("rotation_old");
  old_run.mutable_training()->set_steps(40);
  old_run.mutable_checkpoint()->set_every_steps(20);
  RunOptions opt;
  opt.quiet = true;
  ASSERT_TRUE(RunTraining(old_run, opt).ok());  // checkpoints at steps 20 and 40

  JobSpec new_run = TinyJob("rotation");
  new_run.mutable_training()->set_steps(12);
  ASSERT_TRUE(RunTraining(new_run, opt).ok());  // step 4 (rotated), 8, 12
  fs::remove(CheckpointPath(new_run.out_dir(), 12));
  new_run.mutable_checkpoint()->set_keep_last(1);
  for (int step : {20, 40}) {
    fs::copy_file(CheckpointPath(old_run.out_dir(), step), CheckpointPath(new_run.out_dir(), step));
  }
  opt.resume = CheckpointPath(new_run.out_dir(), 8);
  absl::StatusOr<RunResult> r = RunTraining(new_run, opt);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(fs::exists(CheckpointPath(new_run.out_dir(), 20)));  // the old run's
  EXPECT_TRUE(fs::exists(CheckpointPath(new_run.out_dir(), 40)));
  EXPECT_TRUE(fs::exists(CheckpointPath(new_run.out_dir(), 12)));  // this run's newest
  EXPECT_FALSE(fs::exists(CheckpointPath(new_run.out_dir(), 8)));
}

// A resume that fails (here: a model of another width) leaves job_spec.textproto as the run
// wrote it.
TEST(Resume, FailedResumeLeavesJobSpecFileAlone) {
  JobSpec spec = TinyJob("spec_file");
  RunOptions opt;
  opt.quiet = true;
  ASSERT_TRUE(RunTraining(spec, opt).ok());
  const std::string file = spec.out_dir() + "/job_spec.textproto";
  const std::string before = ReadText(file);
  JobSpec wider = spec;
  wider.mutable_model()->set_n_embd(64);
  opt.resume = "latest";
  for (bool allow : {false, true}) {
    opt.allow_spec_change = allow;
    absl::StatusOr<RunResult> r = RunTraining(wider, opt);
    ASSERT_FALSE(r.ok());
    // Refused by the spec check, or (allowed) by the tensor shapes.
    EXPECT_NE(r.status().message().find(allow ? "has shape" : "model.n_embd: 32 -> 64"),
              std::string::npos) << r.status();
    EXPECT_EQ(ReadText(file), before);
  }
}

// Changes that break a bit-identical resume are listed and refused unless allowed; cadence
// changes (evaluation, logging, checkpoints) resume without the flag and stay bit-identical.
TEST(Resume, ChangedSpecIsListedAndRefusedUnlessAllowed) {
  JobSpec full = TinyJob("change_full");
  RunOptions opt;
  opt.quiet = true;
  ASSERT_TRUE(RunTraining(full, opt).ok());
  JobSpec part = TinyJob("change_part");
  ASSERT_TRUE(RunTraining(part, opt).ok());
  fs::remove(CheckpointPath(part.out_dir(), 8));
  opt.resume = "latest";

  JobSpec changed = part;
  changed.mutable_optimizer()->set_lr(0.02f);
  changed.mutable_training()->set_steps(12);
  absl::StatusOr<RunResult> r = RunTraining(changed, opt);
  ASSERT_FALSE(r.ok());
  const std::string msg(r.status().message());
  EXPECT_NE(msg.find("optimizer.lr: 0.01 -> 0.02"), std::string::npos) << msg;
  EXPECT_NE(msg.find("training.steps: 8 -> 12 (the cosine schedule"), std::string::npos) << msg;
  EXPECT_NE(msg.find("--allow_spec_change"), std::string::npos) << msg;
  EXPECT_EQ(ReadMetrics(part.out_dir()).size(), 8u);  // the log was not truncated either

  JobSpec cadence = part;
  cadence.mutable_eval()->set_every_steps(2);
  cadence.mutable_logging()->set_every_steps(3);
  r = RunTraining(cadence, opt);
  ASSERT_TRUE(r.ok()) << r.status();
  std::vector<nlohmann::json> a = ReadMetrics(full.out_dir()), b = ReadMetrics(part.out_dir());
  ASSERT_EQ(b.size(), 8u);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(a[i]["train_loss"], b[i]["train_loss"]) << i;
  EXPECT_TRUE(b[5].contains("val_loss"));  // step 6: the new eval cadence
  SafeTensors wa = *ReadSafeTensors(CheckpointPath(full.out_dir(), 8));
  SafeTensors wb = *ReadSafeTensors(CheckpointPath(part.out_dir(), 8));
  for (const auto& [tensor, t] : wa.tensors) EXPECT_TRUE(t.bytes == wb.tensors.at(tensor).bytes);

  opt.allow_spec_change = true;
  r = RunTraining(changed, opt);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->steps_done, 12);
}

// Resuming a run that already reached training.steps trains nothing and says so.
TEST(Resume, FinishedRunSaysItIsFinished) {
  JobSpec spec = TinyJob("finished");
  RunOptions opt;
  opt.quiet = true;
  ASSERT_TRUE(RunTraining(spec, opt).ok());
  const std::string metrics = ReadText(spec.out_dir() + "/metrics.jsonl");
  opt.resume = "latest";
  opt.quiet = false;
  testing::internal::CaptureStdout();
  absl::StatusOr<RunResult> r = RunTraining(spec, opt);
  const std::string out = testing::internal::GetCapturedStdout();
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->already_finished);
  EXPECT_EQ(r->steps_done, 8);
  EXPECT_NE(out.find("is already finished"), std::string::npos) << out;
  EXPECT_EQ(out.find("done: "), std::string::npos) << out;
  EXPECT_EQ(ReadText(spec.out_dir() + "/metrics.jsonl"), metrics);
}

}  // namespace
}  // namespace qtrain

namespace qtrain {
namespace {

// More evaluation batches than the val split holds would count batches twice: refused before
// training starts, naming the field and the split.
TEST(Settings, MoreEvalBatchesThanTheValSplitHoldsIsRefused) {
  JobSpec spec = TinyJob("eval_batches");
  spec.mutable_eval()->set_batches(1000);  // the val shard holds 40000 tokens: 312 batches of 4 x 32
  RunOptions opt;
  opt.quiet = true;
  absl::StatusOr<RunResult> r = RunTraining(spec, opt);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(r.status().message().find("eval.batches: 1000 batches of 1 x 4 x 32 tokens, but the "
                                      "val split ("),
            std::string::npos) << r.status();
  EXPECT_NE(r.status().message().find("holds only 312: lower eval.batches to 312"),
            std::string::npos) << r.status();
  EXPECT_FALSE(fs::exists(spec.out_dir() + "/metrics.jsonl"));
}

// A model this machine cannot hold ends with what it needs, before any allocation (not
// std::bad_alloc and SIGABRT).
TEST(Settings, ImpossibleModelSizeNamesTheMemoryItNeeds) {
  JobSpec spec = TinyJob("huge");
  spec.mutable_model()->set_n_embd(1 << 16);
  spec.mutable_model()->set_n_layer(48);
  RunOptions opt;
  opt.quiet = true;
  absl::StatusOr<RunResult> r = RunTraining(spec, opt);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  const std::string msg(r.status().message());
  EXPECT_NE(msg.find("the model of job 'huge' needs about 36.0 TiB of host memory (2.474e+06M "
                     "parameters"), std::string::npos) << msg;
  EXPECT_NE(msg.find("available. Make model.n_embd"), std::string::npos) << msg;
  // The estimate of a model that fits is in the right range: the tiny job's 0.03M parameters.
  HostMemoryEstimate e = EstimateHostMemory(TinyJob("small"));
  EXPECT_GT(e.parameters, 25000);
  EXPECT_LT(e.parameters, 40000);
}

}  // namespace
}  // namespace qtrain
