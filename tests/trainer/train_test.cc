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
