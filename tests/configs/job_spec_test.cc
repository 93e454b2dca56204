// Tests of the job spec loader: the shipped jobs, parse errors with positions, defaults, every
// range check of the validator, the not-implemented list, text round trip and the hash.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "configs/job_spec_loader.h"
#include "gmock/gmock.h"
#include "google/protobuf/text_format.h"
#include "google/protobuf/util/message_differencer.h"
#include "gtest/gtest.h"
#include "trainer/atomic_file.h"

namespace qtrain {
namespace {

using ::google::protobuf::util::MessageDifferencer;
using ::testing::HasSubstr;

constexpr char kBase[] = R"pb(
  name: "base"
  model { n_layer: 2 n_embd: 128 n_head: 4 }
  optimizer { lr: 1e-3 }
  training { steps: 100 batch_size: 4 seq_len: 64 }
)pb";

JobSpec Base() {
  absl::StatusOr<JobSpec> spec = ParseJobSpec(kBase, "base.textproto");
  EXPECT_TRUE(spec.ok()) << spec.status();
  return spec.ok() ? *spec : JobSpec();
}

// Number of lines in a status message: one per reported field.
int Lines(const absl::Status& s) {
  return static_cast<int>(std::vector<std::string>(absl::StrSplit(s.message(), '\n')).size());
}

// ---------------------------------------------------------------------------------------------
// Shipped jobs (runfiles; the test runs in the workspace's runfiles root).

TEST(ShippedJobs, TinyCpuLoadsAndValidates) {
  absl::StatusOr<JobSpec> spec = LoadJobSpec("configs/tiny_cpu.textproto");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->name(), "tiny_cpu");
  EXPECT_EQ(spec->device(), CPU);
  EXPECT_EQ(spec->seed(), 1337u);
  EXPECT_EQ(spec->out_dir(), "out/tiny_cpu");
  EXPECT_EQ(spec->model().n_layer(), 4);
  EXPECT_EQ(spec->model().n_embd(), 128);
  EXPECT_EQ(spec->model().n_head(), 4);
  EXPECT_EQ(spec->model().vocab_size(), 256);
  EXPECT_EQ(spec->training().seq_len(), 128);
  EXPECT_EQ(spec->training().batch_size(), 16);
  EXPECT_EQ(spec->training().steps(), 600);
  EXPECT_FLOAT_EQ(spec->optimizer().lr(), 3e-3f);
  EXPECT_EQ(spec->schedule().warmup_steps(), 50);
  EXPECT_EQ(spec->eval().every_steps(), 100);
  EXPECT_EQ(spec->eval().batches(), 8);
  EXPECT_EQ(spec->checkpoint().every_steps(), 200);
  EXPECT_TRUE(ValidateJobSpec(*spec).ok());
}

struct GpuJob {
  const char* path;
  int n_layer, n_embd, n_head, batch_size;
};

TEST(ShippedJobs, GpuJobsLoadWithTheirShapes) {
  const GpuJob jobs[] = {{"configs/gpt2_124m.textproto", 12, 768, 12, 16},
                         {"configs/gpt2_124m_fp8.textproto", 12, 768, 12, 16},
                         {"configs/gpt2_124m_w4a4_phi.textproto", 12, 768, 12, 16},
                         {"configs/gpt2_350m.textproto", 24, 1024, 16, 8},
                         {"configs/gpt2_1558m.textproto", 48, 1600, 25, 4}};
  for (const GpuJob& job : jobs) {
    SCOPED_TRACE(job.path);
    absl::StatusOr<JobSpec> spec = LoadJobSpec(job.path);
    ASSERT_TRUE(spec.ok()) << spec.status();
    EXPECT_EQ(spec->device(), CUDA);
    EXPECT_EQ(spec->model().n_layer(), job.n_layer);
    EXPECT_EQ(spec->model().n_embd(), job.n_embd);
    EXPECT_EQ(spec->model().n_head(), job.n_head);
    EXPECT_EQ(spec->model().vocab_size(), 50304);
    EXPECT_EQ(spec->training().seq_len(), 1024);
    EXPECT_EQ(spec->training().batch_size(), job.batch_size);
  }
}

// The workflow jobs (README): each loads, validates and sets what its name promises.
TEST(ShippedJobs, WorkflowJobsLoadAndSetWhatTheirNamesSay) {
  absl::StatusOr<JobSpec> tiny = LoadJobSpec("configs/tiny_cpu.textproto");
  ASSERT_TRUE(tiny.ok()) << tiny.status();

  absl::StatusOr<JobSpec> fp8 = LoadJobSpec("configs/fp8_cpu.textproto");
  ASSERT_TRUE(fp8.ok()) << fp8.status();
  EXPECT_EQ(fp8->device(), CPU);
  EXPECT_EQ(fp8->precision().linear(), FP8);
  EXPECT_EQ(fp8->precision().fp8().scaling(), DELAYED);
  EXPECT_EQ(fp8->model().SerializeAsString(), tiny->model().SerializeAsString());

  absl::StatusOr<JobSpec> qat = LoadJobSpec("configs/qat_w4a4_phi_tweo.textproto");
  ASSERT_TRUE(qat.ok()) << qat.status();
  EXPECT_EQ(qat->device(), CPU);
  EXPECT_EQ(qat->precision().linear(), QAT);
  EXPECT_EQ(qat->precision().qat().weight_bits(), 4);
  EXPECT_EQ(qat->precision().qat().act_bits(), 4);
  EXPECT_TRUE(qat->precision().aux_lowrank().enabled());
  EXPECT_EQ(qat->precision().aux_lowrank().rank(), 32);
  // Phi reaches rank 0 (log2(32) + 1 halvings) before the run ends, so the export is exact.
  EXPECT_LE(6 * qat->precision().aux_lowrank().decay_period(), qat->training().steps());
  EXPECT_TRUE(qat->precision().tweo().enabled());
  EXPECT_EQ(qat->model().SerializeAsString(), tiny->model().SerializeAsString());
  // Starts from the default job's last checkpoint.
  EXPECT_EQ(qat->training().init_from(),
            absl::StrCat(tiny->out_dir(), "/checkpoints/step_",
                         absl::StrFormat("%08d", tiny->training().steps()), ".safetensors"));

  absl::StatusOr<JobSpec> gpu_fp8 = LoadJobSpec("configs/gpt2_124m_fp8.textproto");
  ASSERT_TRUE(gpu_fp8.ok()) << gpu_fp8.status();
  EXPECT_EQ(gpu_fp8->device(), CUDA);
  EXPECT_EQ(gpu_fp8->precision().linear(), FP8);
  EXPECT_EQ(gpu_fp8->precision().fp8().scaling(), DELAYED);
  EXPECT_TRUE(gpu_fp8->precision().tweo().enabled());

  absl::StatusOr<JobSpec> bf16 = LoadJobSpec("configs/gpt2_124m.textproto");
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  absl::StatusOr<JobSpec> gpu_qat = LoadJobSpec("configs/gpt2_124m_w4a4_phi.textproto");
  ASSERT_TRUE(gpu_qat.ok()) << gpu_qat.status();
  EXPECT_EQ(gpu_qat->device(), CUDA);
  EXPECT_EQ(gpu_qat->precision().linear(), QAT);
  EXPECT_EQ(gpu_qat->precision().qat().weight_bits(), 4);
  EXPECT_EQ(gpu_qat->precision().qat().act_bits(), 4);
  EXPECT_TRUE(gpu_qat->precision().aux_lowrank().enabled());
  EXPECT_EQ(gpu_qat->precision().aux_lowrank().rank(), 32);
  EXPECT_LE(6 * gpu_qat->precision().aux_lowrank().decay_period(), gpu_qat->training().steps());
  EXPECT_EQ(gpu_qat->training().init_from(),
            absl::StrCat(bf16->out_dir(), "/checkpoints/step_",
                         absl::StrFormat("%08d", bf16->training().steps()), ".safetensors"));
  for (const JobSpec* gpu : {&*gpu_fp8, &*gpu_qat})
    EXPECT_EQ(gpu->model().SerializeAsString(), bf16->model().SerializeAsString());
}

TEST(ShippedJobs, FederatedJobsLoad) {
  absl::StatusOr<JobSpec> base = LoadJobSpec("configs/federated_base.textproto");
  ASSERT_TRUE(base.ok()) << base.status();
  absl::StatusOr<JobSpec> fed = LoadJobSpec("configs/federated_brown.textproto");
  ASSERT_TRUE(fed.ok()) << fed.status();
  EXPECT_EQ(fed->federated().clients(), fed->data().genres_size());
  EXPECT_EQ(fed->lora().base(), absl::StrCat("out/federated_base/checkpoints/step_",
                                             absl::StrFormat("%08d", base->training().steps()),
                                             ".safetensors"));
  EXPECT_EQ(fed->model().n_embd(), base->model().n_embd());
}

TEST(ShippedJobs, TestdataMinimalLoads) {
  absl::StatusOr<JobSpec> spec = LoadJobSpec("tests/configs/testdata/minimal.textproto");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->name(), "minimal");
}

// ---------------------------------------------------------------------------------------------
// Reading and parsing.

TEST(Load, MissingFileIsNotFoundNamingThePath) {
  const std::string path = absl::StrCat(
      std::getenv("TEST_TMPDIR") ? std::getenv("TEST_TMPDIR") : "/tmp", "/no_such_job.textproto");
  absl::StatusOr<JobSpec> spec = LoadJobSpec(path);
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(spec.status().message()), HasSubstr(path));
}

TEST(Load, DirectoryIsRejected) {
  absl::StatusOr<JobSpec> spec = LoadJobSpec("configs");
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(spec.status().message()), HasSubstr("configs"));
}

TEST(Load, MalformedFileGivesFileLineColumn) {
  const std::string path = "tests/configs/testdata/malformed.textproto";
  absl::StatusOr<JobSpec> spec = LoadJobSpec(path);
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  // n_head: "four" -- the string value starts on line 6, column 11.
  EXPECT_THAT(std::string(spec.status().message()), HasSubstr(path + ":6:11: "));
  EXPECT_THAT(std::string(spec.status().message()), HasSubstr("\"four\""));
}

TEST(Parse, SyntaxErrorPositionIsOneBased) {
  // Line 3 lacks the ':' or '{' after "training"; the parser stops at the '5' (column 12).
  const std::string text = "name: \"x\"\nmodel { n_layer: 1 }\ntraining 5\n";
  absl::StatusOr<JobSpec> spec = ParseJobSpec(text, "mem.textproto");
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(spec.status().message()), HasSubstr("mem.textproto:3:10: "));
}

TEST(Parse, UnclosedBlockReportsEndOfInput) {
  absl::StatusOr<JobSpec> spec = ParseJobSpec("name: \"x\"\nmodel {\n  n_layer: 1\n", "m.tp");
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(spec.status().message()), HasSubstr("m.tp:4:1: "));
}

TEST(Parse, UnknownFieldIsRejectedNamingIt) {
  const std::string path = "tests/configs/testdata/unknown_field.textproto";
  absl::StatusOr<JobSpec> spec = LoadJobSpec(path);
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(spec.status().message()), HasSubstr(path + ":4:3: "));
  EXPECT_THAT(std::string(spec.status().message()), HasSubstr("n_layers"));

  absl::StatusOr<JobSpec> top = ParseJobSpec("name: \"x\"\nlearning_rate: 3\n", "t.tp");
  EXPECT_EQ(top.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(top.status().message()), HasSubstr("t.tp:2:1: "));
  EXPECT_THAT(std::string(top.status().message()), HasSubstr("learning_rate"));
}

TEST(Parse, CulpritPositionSurvivesTabsAndComments) {
  // Columns count bytes (a tab is one), as compilers and editors do.
  absl::StatusOr<JobSpec> tab = ParseJobSpec("name: \"x\"\nmodel {\n\tn_layers: 3\n}\n", "tab.tp");
  EXPECT_THAT(std::string(tab.status().message()), HasSubstr("tab.tp:3:2: "));
  // The bad enum value sits after a comment on the next line.
  absl::StatusOr<JobSpec> enum_value = ParseJobSpec("device: # where\n  GPU\n", "c.tp");
  EXPECT_THAT(std::string(enum_value.status().message()), HasSubstr("c.tp:2:3: "));
  EXPECT_THAT(std::string(enum_value.status().message()), HasSubstr("GPU"));
  // A value error after a tab: the parser's own position, converted to bytes.
  absl::StatusOr<JobSpec> value = ParseJobSpec("model {\n\tn_layer:\t\"four\"\n}\n", "v.tp");
  EXPECT_THAT(std::string(value.status().message()), HasSubstr("v.tp:2:11: "));
}

TEST(Parse, UnknownEnumNameAndRepeatedScalarAreRejected) {
  absl::StatusOr<JobSpec> bad_enum = ParseJobSpec("device: TPU\n", "e.tp");
  EXPECT_EQ(bad_enum.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad_enum.status().message()), HasSubstr("e.tp:1:9: "));
  EXPECT_THAT(std::string(bad_enum.status().message()), HasSubstr("TPU"));

  absl::StatusOr<JobSpec> twice = ParseJobSpec("name: \"a\"\nname: \"b\"\n", "d.tp");
  EXPECT_EQ(twice.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(twice.status().message()), HasSubstr("d.tp:2:1: "));
  EXPECT_THAT(std::string(twice.status().message()), HasSubstr("name"));
}

TEST(Parse, ValidationErrorsArePrefixedWithTheFilename) {
  absl::StatusOr<JobSpec> spec = ParseJobSpec(
      "name: \"x\" model { n_layer: 1 n_embd: 128 n_head: 5 } optimizer { lr: 1e-3 } "
      "training { steps: 10 batch_size: 1 seq_len: 8 }",
      "v.tp");
  EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(spec.status().message(), "v.tp: model.n_head: 5 does not divide model.n_embd 128");
}

TEST(Parse, AllRangeErrorsAreReportedTogether) {
  JobSpec spec = Base();
  spec.mutable_training()->set_batch_size(-3);
  spec.mutable_model()->set_n_head(5);
  spec.mutable_optimizer()->set_lr(0);
  absl::Status s = ValidateJobSpec(spec);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Lines(s), 3) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("training.batch_size: must be > 0, got -3"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("model.n_head: 5"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("optimizer.lr"));
}

// ---------------------------------------------------------------------------------------------
// Defaults.

TEST(Defaults, EmptyFieldsGetTheDocumentedValues) {
  JobSpec spec = Base();
  EXPECT_EQ(spec.device(), CPU);
  EXPECT_EQ(spec.out_dir(), "out/base");
  EXPECT_EQ(spec.model().vocab_size(), 256);
  EXPECT_EQ(spec.model().max_seq_len(), 64);
  EXPECT_FLOAT_EQ(spec.model().init_std(), 0.02f);
  EXPECT_EQ(spec.data().train_pattern(), "data/brown/mixed_train.bin");
  EXPECT_EQ(spec.data().val_pattern(), "data/brown/mixed_val.bin");
  EXPECT_EQ(spec.precision().linear(), FULL);
  EXPECT_EQ(spec.precision().fp8().scaling(), DELAYED);
  EXPECT_EQ(spec.precision().fp8().amax_history_len(), 16);
  EXPECT_EQ(spec.precision().qat().weight_granularity(), PER_CHANNEL);
  EXPECT_EQ(spec.precision().qat().act_granularity(), PER_TENSOR);
  EXPECT_EQ(spec.precision().qat().scale_init(), LSQ_MEAN);
  EXPECT_EQ(spec.precision().aux_lowrank().rank(), 32);
  EXPECT_FLOAT_EQ(spec.precision().tweo().lambda(), 0.01f);
  EXPECT_FLOAT_EQ(spec.precision().tweo().tau(), 3.0f);
  EXPECT_FLOAT_EQ(spec.precision().tweo().p(), 4.0f);
  EXPECT_FLOAT_EQ(spec.precision().tweo().eps(), 1e-6f);
  EXPECT_FLOAT_EQ(spec.optimizer().beta1(), 0.9f);
  EXPECT_FLOAT_EQ(spec.optimizer().beta2(), 0.95f);
  EXPECT_FLOAT_EQ(spec.optimizer().eps(), 1e-8f);
  EXPECT_FLOAT_EQ(spec.optimizer().weight_decay(), 0.1f);
  EXPECT_FLOAT_EQ(spec.optimizer().grad_clip(), 1.0f);
  EXPECT_FLOAT_EQ(spec.schedule().min_lr_ratio(), 0.1f);
  EXPECT_EQ(spec.training().grad_accum(), 1);
  EXPECT_EQ(spec.eval().batches(), 8);
  EXPECT_EQ(spec.checkpoint().keep_last(), 2);
  EXPECT_EQ(spec.logging().every_steps(), 1);
  // Nothing that has no default is invented.
  EXPECT_EQ(spec.distributed().backend(), DistributedSpec::BACKEND_UNSPECIFIED);
  EXPECT_EQ(spec.precision().distill().loss(), DistillSpec::LOSS_UNSPECIFIED);
  EXPECT_EQ(spec.seed(), 0u);
}

TEST(Defaults, ExplicitZerosOfOptionalFieldsAreKept) {
  // grad_clip 0 disables clipping; weight_decay 0 and min_lr_ratio 0 are legal choices too.
  absl::StatusOr<JobSpec> spec = ParseJobSpec(
      "name: \"z\" model { n_layer: 1 n_embd: 8 n_head: 2 }\n"
      "optimizer { lr: 1e-3 grad_clip: 0 weight_decay: 0 beta1: 0 }\n"
      "schedule { min_lr_ratio: 0 }\n"
      "training { steps: 10 batch_size: 1 seq_len: 8 }\n",
      "zeros.tp");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->optimizer().grad_clip(), 0.0f);
  EXPECT_EQ(spec->optimizer().weight_decay(), 0.0f);
  EXPECT_EQ(spec->optimizer().beta1(), 0.0f);
  EXPECT_EQ(spec->schedule().min_lr_ratio(), 0.0f);
  EXPECT_FLOAT_EQ(spec->optimizer().beta2(), 0.95f);
}

TEST(Defaults, PaddedVocabularyDefaultsToTheVocabulary) {
  absl::StatusOr<JobSpec> spec = ParseJobSpec(
      "name: \"p\" model { n_layer: 1 n_embd: 8 n_head: 1 vocab_size: 50257 }\n"
      "optimizer { lr: 1e-3 } training { steps: 1 batch_size: 1 seq_len: 8 }\n",
      "p.tp");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->model().padded_vocab_size(), 0);  // no padding
  spec = ParseJobSpec(
      "name: \"p\" model { n_layer: 1 n_embd: 8 n_head: 1 vocab_size: 50257 "
      "padded_vocab_size: 50304 }\n"
      "optimizer { lr: 1e-3 } training { steps: 1 batch_size: 1 seq_len: 8 }\n",
      "p.tp");
  ASSERT_TRUE(spec.ok()) << spec.status();
  EXPECT_EQ(spec->model().padded_vocab_size(), 50304);
  spec = ParseJobSpec(
      "name: \"p\" device: CUDA model { n_layer: 1 n_embd: 8 n_head: 1 vocab_size: 50257 "
      "padded_vocab_size: 50304 }\n"
      "optimizer { lr: 1e-3 } training { steps: 1 batch_size: 1 seq_len: 8 }\n",
      "p.tp");
  ASSERT_TRUE(spec.ok()) << spec.status();  // CUDA pads too (the LM head's GEMMs over 50304)
  EXPECT_EQ(spec->model().padded_vocab_size(), 50304);
}

TEST(Defaults, SetValuesWinAndApplyingTwiceChangesNothing) {
  JobSpec spec;
  spec.set_name("n");
  spec.set_out_dir("/scratch/run1");
  spec.mutable_model()->set_vocab_size(512);
  spec.mutable_model()->set_max_seq_len(256);
  spec.mutable_training()->set_seq_len(64);
  spec.mutable_training()->set_grad_accum(-2);  // invalid stays invalid, for the validator
  spec.mutable_precision()->mutable_tweo()->set_tau(5);
  ApplyDefaults(&spec);
  EXPECT_EQ(spec.out_dir(), "/scratch/run1");
  EXPECT_EQ(spec.model().vocab_size(), 512);
  EXPECT_EQ(spec.model().max_seq_len(), 256);
  EXPECT_EQ(spec.training().grad_accum(), -2);
  EXPECT_FLOAT_EQ(spec.precision().tweo().tau(), 5.0f);
  JobSpec again = spec;
  ApplyDefaults(&again);
  EXPECT_TRUE(MessageDifferencer::Equals(spec, again));
}

TEST(Defaults, LoraGetsAlphaAndAllTargetsOnlyWhenOn) {
  JobSpec off;
  off.mutable_lora();
  ApplyDefaults(&off);
  EXPECT_FALSE(off.lora().has_alpha());
  EXPECT_EQ(off.lora().targets_size(), 0);
  JobSpec on;
  on.mutable_lora()->set_rank(8);
  ApplyDefaults(&on);
  EXPECT_EQ(on.lora().alpha(), 8.0f);
  ASSERT_EQ(on.lora().targets_size(), 4);
  EXPECT_EQ(on.lora().targets(0), "attn.qkv");
  EXPECT_EQ(on.lora().targets(3), "mlp.proj");
  JobSpec set;
  set.mutable_lora()->set_rank(8);
  set.mutable_lora()->set_alpha(16);
  set.mutable_lora()->add_targets("mlp.fc");
  ApplyDefaults(&set);
  EXPECT_EQ(set.lora().alpha(), 16.0f);
  EXPECT_EQ(set.lora().targets_size(), 1);
}

TEST(Defaults, DistillLossDefaultsToMseOnlyWithATeacher) {
  JobSpec spec;
  ApplyDefaults(&spec);
  EXPECT_EQ(spec.precision().distill().loss(), DistillSpec::LOSS_UNSPECIFIED);
  spec.mutable_precision()->mutable_distill()->set_teacher_checkpoint("t.safetensors");
  spec.mutable_precision()->mutable_distill()->set_weight(1.0f);
  ApplyDefaults(&spec);
  EXPECT_EQ(spec.precision().distill().loss(), DistillSpec::MSE);
}

// ---------------------------------------------------------------------------------------------
// Range checks: one row per check; each bad value must come back naming its field.

struct BadCase {
  const char* what;
  std::function<void(JobSpec*)> mutate;
  const char* expect;  // substring of the message; starts with the field path
};

const float kNaN = std::numeric_limits<float>::quiet_NaN();
const float kInf = std::numeric_limits<float>::infinity();

// A valid federated job built on Base(), for rows that then break one thing: Base()'s training
// steps give way to rounds, and the job gets adapters and client data.
FederatedSpec* Federate(JobSpec* s) {
  s->mutable_training()->set_steps(0);
  for (const char* g : {"h", "j", "k", "l"}) s->mutable_data()->add_genres(g);
  s->mutable_lora()->set_rank(4);
  s->mutable_lora()->set_base("base.safetensors");
  FederatedSpec* f = s->mutable_federated();
  f->set_aggregation(FederatedSpec::FEDSVD);
  f->set_rounds(10);
  f->set_clients(8);
  f->set_local_steps(5);
  f->set_client_train_pattern("data/brown/train_{genre}.bin");
  ApplyDefaults(s);
  return f;
}

std::vector<BadCase> BadCases() {
  return {
      // Enums hold only named values (proto3 enums are open).
      {"device enum", [](JobSpec* s) { s->set_device(static_cast<Device>(7)); },
       "device: unknown Device value 7"},
      {"nested enum",
       [](JobSpec* s) {
         s->mutable_precision()->mutable_qat()->set_act_granularity(
             static_cast<QuantGranularity>(9));
       },
       "precision.qat.act_granularity: unknown QuantGranularity value 9"},
      {"override enum",
       [](JobSpec* s) {
         auto* o = s->mutable_precision()->add_overrides();
         o->set_match("*");
         o->set_precision(static_cast<LinearPrecision>(42));
       },
       "precision.overrides[0].precision: unknown LinearPrecision value 42"},
      // Name and output.
      {"empty name", [](JobSpec* s) { s->set_name(""); }, "name: must not be empty"},
      {"name with space", [](JobSpec* s) { s->set_name("a b"); }, "name: \"a b\""},
      {"name ..", [](JobSpec* s) { s->set_name(".."); }, "name: \"..\""},
      {"empty out_dir", [](JobSpec* s) { s->set_out_dir(""); }, "out_dir: must not be empty"},
      // Model.
      {"n_layer", [](JobSpec* s) { s->mutable_model()->set_n_layer(0); },
       "model.n_layer: must be > 0, got 0"},
      {"n_embd", [](JobSpec* s) { s->mutable_model()->set_n_embd(-1); },
       "model.n_embd: must be > 0, got -1"},
      {"n_head", [](JobSpec* s) { s->mutable_model()->set_n_head(0); },
       "model.n_head: must be > 0, got 0"},
      {"n_head divides", [](JobSpec* s) { s->mutable_model()->set_n_head(5); },
       "model.n_head: 5 does not divide model.n_embd 128"},
      {"vocab low", [](JobSpec* s) { s->mutable_model()->set_vocab_size(1); },
       "model.vocab_size: must be in [2, 65536] (tokens are uint16), got 1"},
      {"vocab high", [](JobSpec* s) { s->mutable_model()->set_vocab_size(65537); },
       "model.vocab_size: must be in [2, 65536] (tokens are uint16), got 65537"},
      {"padded vocab below vocab",
       [](JobSpec* s) {
         s->mutable_model()->set_vocab_size(50257);
         s->mutable_model()->set_padded_vocab_size(50000);
       },
       "model.padded_vocab_size: must be in [model.vocab_size 50257, 65536], got 50000"},
      {"max_seq_len", [](JobSpec* s) { s->mutable_model()->set_max_seq_len(0); },
       "model.max_seq_len: must be > 0, got 0"},
      {"max_seq_len < seq_len", [](JobSpec* s) { s->mutable_model()->set_max_seq_len(32); },
       "model.max_seq_len: 32 is less than training.seq_len 64"},
      {"init_std 0", [](JobSpec* s) { s->mutable_model()->set_init_std(0); },
       "model.init_std: must be > 0 and finite, got 0"},
      {"init_std nan", [](JobSpec* s) { s->mutable_model()->set_init_std(kNaN); },
       "model.init_std: must be > 0 and finite, got nan"},
      // Data.
      {"train_pattern", [](JobSpec* s) { s->mutable_data()->set_train_pattern(""); },
       "data.train_pattern: must not be empty"},
      {"val_pattern", [](JobSpec* s) { s->mutable_data()->set_val_pattern(""); },
       "data.val_pattern: must not be empty"},
      {"genre letter",
       [](JobSpec* s) {
         s->mutable_federated()->set_aggregation(FederatedSpec::FEDSVD);
         s->mutable_data()->add_genres("q");
       },
       "data.genres[0]: must be a Brown genre letter (a-h, j-n, p, r), got \"q\""},
      {"genre twice",
       [](JobSpec* s) {
         s->mutable_data()->add_genres("a");
         s->mutable_data()->add_genres("a");
       },
       "data.genres[1]: genre \"a\" is listed twice"},
      {"genres without federated", [](JobSpec* s) { s->mutable_data()->add_genres("a"); },
       "data.genres: only for federated jobs"},
      // Precision: overrides.
      {"override match prefix",
       [](JobSpec* s) {
         auto* o = s->mutable_precision()->add_overrides();
         o->set_match("blocks.0.*");
         o->set_precision(FULL);
       },
       "precision.overrides[0].match: must be \"*\" or \"block.<i>.\""},
      {"override match index",
       [](JobSpec* s) {
         auto* o = s->mutable_precision()->add_overrides();
         o->set_match("block.x.mlp.fc");
         o->set_precision(FULL);
       },
       "precision.overrides[0].match: must be"},
      {"override match part",
       [](JobSpec* s) {
         auto* o = s->mutable_precision()->add_overrides();
         o->set_match("block.1.attn");
         o->set_precision(FULL);
       },
       "precision.overrides[0].match: must be"},
      {"override block range",
       [](JobSpec* s) {
         s->mutable_precision()->add_overrides()->set_match("*");
         s->mutable_precision()->mutable_overrides(0)->set_precision(FULL);
         auto* o = s->mutable_precision()->add_overrides();
         o->set_match("block.2.attn.qkv");
         o->set_precision(FULL);
       },
       "precision.overrides[1].match: block 2 in \"block.2.attn.qkv\" does not exist"},
      {"override precision",
       [](JobSpec* s) { s->mutable_precision()->add_overrides()->set_match("block.0.*"); },
       "precision.overrides[0].precision: must be FULL, FP8 or QAT"},
      // Precision: fp8.
      {"amax history 0",
       [](JobSpec* s) { s->mutable_precision()->mutable_fp8()->set_amax_history_len(0); },
       "precision.fp8.amax_history_len: must be in [1, 1024], got 0"},
      {"amax history big",
       [](JobSpec* s) { s->mutable_precision()->mutable_fp8()->set_amax_history_len(2000); },
       "precision.fp8.amax_history_len: must be in [1, 1024], got 2000"},
      {"fp8 margin", [](JobSpec* s) { s->mutable_precision()->mutable_fp8()->set_margin(-1); },
       "precision.fp8.margin: must be >= 0, got -1"},
      // Precision: qat.
      {"weight bits", [](JobSpec* s) { s->mutable_precision()->mutable_qat()->set_weight_bits(5); },
       "precision.qat.weight_bits: must be one of 2, 3, 4, 8, got 5"},
      {"weight bits needed", [](JobSpec* s) { s->mutable_precision()->set_linear(QAT); },
       "precision.qat.weight_bits: must be one of 2, 3, 4, 8 when a Linear uses QAT, got 0"},
      {"weight bits needed by override",
       [](JobSpec* s) {
         auto* o = s->mutable_precision()->add_overrides();
         o->set_match("block.1.mlp.proj");
         o->set_precision(QAT);
       },
       "precision.qat.weight_bits: must be one of 2, 3, 4, 8 when a Linear uses QAT"},
      {"weight granularity token",
       [](JobSpec* s) { s->mutable_precision()->mutable_qat()->set_weight_granularity(PER_TOKEN); },
       "precision.qat.weight_granularity: weights are quantized PER_CHANNEL or PER_GROUP, got "
       "PER_TOKEN"},
      {"weight granularity tensor",
       [](JobSpec* s) {
         s->mutable_precision()->mutable_qat()->set_weight_granularity(PER_TENSOR);
       },
       "precision.qat.weight_granularity: weights are quantized PER_CHANNEL or PER_GROUP, got "
       "PER_TENSOR"},
      {"group size 0",
       [](JobSpec* s) { s->mutable_precision()->mutable_qat()->set_weight_granularity(PER_GROUP); },
       "precision.qat.group_size: must be a power of two > 0 for PER_GROUP, got 0"},
      {"group size not pow2",
       [](JobSpec* s) {
         s->mutable_precision()->mutable_qat()->set_weight_granularity(PER_GROUP);
         s->mutable_precision()->mutable_qat()->set_group_size(48);
       },
       "precision.qat.group_size: must be a power of two > 0 for PER_GROUP, got 48"},
      {"group size divides",
       [](JobSpec* s) {
         s->mutable_precision()->mutable_qat()->set_weight_granularity(PER_GROUP);
         s->mutable_precision()->mutable_qat()->set_group_size(256);
       },
       "precision.qat.group_size: 256 does not divide model.n_embd 128"},
      {"group size unused",
       [](JobSpec* s) { s->mutable_precision()->mutable_qat()->set_group_size(64); },
       "precision.qat.group_size: only used with weight_granularity PER_GROUP, got 64"},
      {"act bits", [](JobSpec* s) { s->mutable_precision()->mutable_qat()->set_act_bits(2); },
       "precision.qat.act_bits: must be 0 (full precision), 4 or 8, got 2"},
      {"act granularity",
       [](JobSpec* s) { s->mutable_precision()->mutable_qat()->set_act_granularity(PER_CHANNEL); },
       "precision.qat.act_granularity: activations are quantized PER_TENSOR or PER_TOKEN, got "
       "PER_CHANNEL"},
      {"act asymmetric",
       [](JobSpec* s) { s->mutable_precision()->mutable_qat()->set_act_asymmetric(true); },
       "precision.qat.act_asymmetric: needs act_bits 4 or 8"},
      // Precision: auxiliary low-rank module.
      {"aux rank 0", [](JobSpec* s) { s->mutable_precision()->mutable_aux_lowrank()->set_rank(0); },
       "precision.aux_lowrank.rank: must be a power of two >= 1, got 0"},
      {"aux rank 24",
       [](JobSpec* s) { s->mutable_precision()->mutable_aux_lowrank()->set_rank(24); },
       "precision.aux_lowrank.rank: must be a power of two >= 1, got 24"},
      {"aux rank > n_embd",
       [](JobSpec* s) {
         s->mutable_precision()->mutable_aux_lowrank()->set_rank(256);
         s->mutable_precision()->mutable_aux_lowrank()->set_enabled(true);
       },
       "precision.aux_lowrank.rank: 256 exceeds model.n_embd 128"},
      {"aux decay period",
       [](JobSpec* s) { s->mutable_precision()->mutable_aux_lowrank()->set_decay_period(-1); },
       "precision.aux_lowrank.decay_period: must be >= 0, got -1"},
      {"aux decay period when enabled",
       [](JobSpec* s) { s->mutable_precision()->mutable_aux_lowrank()->set_enabled(true); },
       "precision.aux_lowrank.decay_period: must be > 0 when enabled, got 0"},
      {"aux start step",
       [](JobSpec* s) { s->mutable_precision()->mutable_aux_lowrank()->set_start_step(-5); },
       "precision.aux_lowrank.start_step: must be >= 0, got -5"},
      {"aux needs qat",
       [](JobSpec* s) {
         s->mutable_precision()->mutable_aux_lowrank()->set_enabled(true);
         s->mutable_precision()->mutable_aux_lowrank()->set_decay_period(100);
       },
       "precision.aux_lowrank.enabled: needs a Linear with precision QAT"},
      // Precision: TWEO.
      {"tweo lambda", [](JobSpec* s) { s->mutable_precision()->mutable_tweo()->set_lambda(-0.5f); },
       "precision.tweo.lambda: must be >= 0 and finite, got -0.5"},
      {"tweo tau", [](JobSpec* s) { s->mutable_precision()->mutable_tweo()->set_tau(0); },
       "precision.tweo.tau: must be > 0 and finite, got 0"},
      {"tweo p", [](JobSpec* s) { s->mutable_precision()->mutable_tweo()->set_p(1.5f); },
       "precision.tweo.p: must be >= 2 and finite, got 1.5"},
      {"tweo p inf", [](JobSpec* s) { s->mutable_precision()->mutable_tweo()->set_p(kInf); },
       "precision.tweo.p: must be >= 2 and finite, got inf"},
      {"tweo eps", [](JobSpec* s) { s->mutable_precision()->mutable_tweo()->set_eps(-1e-6f); },
       "precision.tweo.eps: must be > 0 and finite, got -1e-06"},
      // Precision: distillation.
      {"distill weight negative",
       [](JobSpec* s) {
         s->mutable_precision()->mutable_distill()->set_teacher_checkpoint("t");
         s->mutable_precision()->mutable_distill()->set_weight(-1);
       },
       "precision.distill.weight: must be >= 0 and finite, got -1"},
      {"distill weight without teacher",
       [](JobSpec* s) { s->mutable_precision()->mutable_distill()->set_weight(0.5f); },
       "precision.distill.weight: set to 0.5 without precision.distill.teacher_checkpoint"},
      {"distill loss without teacher",
       [](JobSpec* s) { s->mutable_precision()->mutable_distill()->set_loss(DistillSpec::KL); },
       "precision.distill.loss: set to KL without precision.distill.teacher_checkpoint"},
      {"distill weight zero",
       [](JobSpec* s) { s->mutable_precision()->mutable_distill()->set_teacher_checkpoint("t"); },
       "precision.distill.weight: must be > 0 with a teacher_checkpoint, got 0"},
      // Optimizer.
      {"lr 0", [](JobSpec* s) { s->mutable_optimizer()->set_lr(0); },
       "optimizer.lr: must be > 0 and finite, got 0"},
      {"lr inf", [](JobSpec* s) { s->mutable_optimizer()->set_lr(kInf); },
       "optimizer.lr: must be > 0 and finite, got inf"},
      {"beta1 1", [](JobSpec* s) { s->mutable_optimizer()->set_beta1(1.0f); },
       "optimizer.beta1: must be in [0, 1), got 1"},
      {"beta1 negative", [](JobSpec* s) { s->mutable_optimizer()->set_beta1(-0.1f); },
       "optimizer.beta1: must be in [0, 1), got -0.1"},
      {"beta2 1", [](JobSpec* s) { s->mutable_optimizer()->set_beta2(1.0f); },
       "optimizer.beta2: must be in [0, 1), got 1"},
      {"beta2 nan", [](JobSpec* s) { s->mutable_optimizer()->set_beta2(kNaN); },
       "optimizer.beta2: must be in [0, 1), got nan"},
      {"adam eps", [](JobSpec* s) { s->mutable_optimizer()->set_eps(0); },
       "optimizer.eps: must be > 0 and finite, got 0"},
      {"weight decay", [](JobSpec* s) { s->mutable_optimizer()->set_weight_decay(-0.1f); },
       "optimizer.weight_decay: must be >= 0 and finite, got -0.1"},
      {"grad clip", [](JobSpec* s) { s->mutable_optimizer()->set_grad_clip(-1); },
       "optimizer.grad_clip: must be >= 0 and finite, got -1"},
      {"grad clip nan", [](JobSpec* s) { s->mutable_optimizer()->set_grad_clip(kNaN); },
       "optimizer.grad_clip: must be >= 0 and finite, got nan"},
      {"lm head chunks negative",
       [](JobSpec* s) { s->mutable_training()->set_lm_head_chunks(-1); },
       "training.lm_head_chunks: must be >= 0, got -1"},
      {"lm head chunks over rows",
       [](JobSpec* s) { s->mutable_training()->set_lm_head_chunks(1 << 30); },
       "training.lm_head_chunks: must be <= batch_size * seq_len"},
      {"zero1 alone", [](JobSpec* s) { s->mutable_optimizer()->set_zero1(true); },
       "optimizer.zero1: shards state across ranks; needs distributed.backend MPI or NCCL"},
      // Training, schedule, eval, checkpoint, logging.
      {"steps", [](JobSpec* s) { s->mutable_training()->set_steps(0); },
       "training.steps: must be > 0, got 0"},
      {"batch size", [](JobSpec* s) { s->mutable_training()->set_batch_size(-3); },
       "training.batch_size: must be > 0, got -3"},
      {"seq len", [](JobSpec* s) { s->mutable_training()->set_seq_len(0); },
       "training.seq_len: must be > 0, got 0"},
      {"grad accum", [](JobSpec* s) { s->mutable_training()->set_grad_accum(-1); },
       "training.grad_accum: must be > 0, got -1"},
      {"warmup negative", [](JobSpec* s) { s->mutable_schedule()->set_warmup_steps(-1); },
       "schedule.warmup_steps: must be >= 0, got -1"},
      {"warmup >= steps", [](JobSpec* s) { s->mutable_schedule()->set_warmup_steps(100); },
       "schedule.warmup_steps: must be < training.steps 100, got 100"},
      {"min lr ratio high", [](JobSpec* s) { s->mutable_schedule()->set_min_lr_ratio(1.5f); },
       "schedule.min_lr_ratio: must be in [0, 1], got 1.5"},
      {"min lr ratio low", [](JobSpec* s) { s->mutable_schedule()->set_min_lr_ratio(-0.1f); },
       "schedule.min_lr_ratio: must be in [0, 1], got -0.1"},
      {"eval every", [](JobSpec* s) { s->mutable_eval()->set_every_steps(-1); },
       "eval.every_steps: must be >= 0, got -1"},
      {"eval batches", [](JobSpec* s) { s->mutable_eval()->set_batches(0); },
       "eval.batches: must be > 0, got 0"},
      {"checkpoint every", [](JobSpec* s) { s->mutable_checkpoint()->set_every_steps(-10); },
       "checkpoint.every_steps: must be >= 0, got -10"},
      {"keep last", [](JobSpec* s) { s->mutable_checkpoint()->set_keep_last(-1); },
       "checkpoint.keep_last: must be > 0, got -1"},
      {"log every", [](JobSpec* s) { s->mutable_logging()->set_every_steps(-1); },
       "logging.every_steps: must be > 0, got -1"},
      // Distributed.
      {"bucket mb", [](JobSpec* s) { s->mutable_distributed()->set_bucket_mb(-1); },
       "distributed.bucket_mb: must be >= 0, got -1"},
      {"timeout", [](JobSpec* s) { s->mutable_distributed()->set_timeout_s(-1); },
       "distributed.timeout_s: must be >= 0, got -1"},
      {"nccl on cpu",
       [](JobSpec* s) { s->mutable_distributed()->set_backend(DistributedSpec::NCCL); },
       "distributed.backend: NCCL needs device CUDA, got device CPU"},
      // Parameter service.
      {"address no port",
       [](JobSpec* s) { s->mutable_parameter_service()->set_address("localhost"); },
       "parameter_service.address: must be host:port with port in [1, 65535], got \"localhost\""},
      {"address port 0",
       [](JobSpec* s) { s->mutable_parameter_service()->set_address("localhost:0"); },
       "parameter_service.address: must be host:port"},
      {"address no host", [](JobSpec* s) { s->mutable_parameter_service()->set_address(":50051"); },
       "parameter_service.address: must be host:port"},
      {"token without address",
       [](JobSpec* s) { s->mutable_parameter_service()->set_token_file("/run/token"); },
       "parameter_service.token_file: set without parameter_service.address"},
      {"deadline without address",
       [](JobSpec* s) { s->mutable_parameter_service()->set_deadline_ms(100); },
       "parameter_service.deadline_ms: set without parameter_service.address"},
      {"heartbeat without address",
       [](JobSpec* s) { s->mutable_parameter_service()->set_heartbeat_ms(100); },
       "parameter_service.heartbeat_ms: set without parameter_service.address"},
      {"deadline negative",
       [](JobSpec* s) {
         s->mutable_parameter_service()->set_address("[::1]:50051");
         s->mutable_parameter_service()->set_deadline_ms(-1);
       },
       "parameter_service.deadline_ms: must be >= 0, got -1"},
      {"heartbeat negative",
       [](JobSpec* s) {
         s->mutable_parameter_service()->set_address("host:50051");
         s->mutable_parameter_service()->set_heartbeat_ms(-1);
       },
       "parameter_service.heartbeat_ms: must be >= 0, got -1"},
      {"coordinator no port",
       [](JobSpec* s) { s->mutable_distributed()->set_coordinator("node1"); },
       "distributed.coordinator: must be host:port with port in [1, 65535], got \"node1\""},
      {"coordinator with MPI",
       [](JobSpec* s) {
         s->mutable_distributed()->set_coordinator("node1:7070");
         s->mutable_distributed()->set_backend(DistributedSpec::MPI);
       },
       "distributed.coordinator: replaces MPI's start-up"},
      {"job id without service",
       [](JobSpec* s) { s->mutable_parameter_service()->set_job_id("j"); },
       "parameter_service.job_id: set without parameter_service.address or "
       "distributed.coordinator"},
      {"job id characters",
       [](JobSpec* s) {
         s->mutable_parameter_service()->set_address("h:1");
         s->mutable_parameter_service()->set_job_id("../x");
       },
       "parameter_service.job_id: up to 128 of [A-Za-z0-9._:-]"},
      {"client cert without CA",
       [](JobSpec* s) {
         s->mutable_distributed()->set_coordinator("h:1");
         s->mutable_parameter_service()->set_tls_cert_file("c.pem");
         s->mutable_parameter_service()->set_tls_key_file("k.pem");
       },
       "parameter_service.tls_cert_file: a client certificate needs tls_ca_file"},
      {"heartbeat timeout below interval",
       [](JobSpec* s) {
         s->mutable_parameter_service()->set_address("h:1");
         s->mutable_parameter_service()->set_heartbeat_ms(500);
         s->mutable_parameter_service()->set_heartbeat_timeout_ms(400);
       },
       "parameter_service.heartbeat_timeout_ms: must exceed heartbeat_ms (500), got 400"},
      // Federated.
      {"rounds", [](JobSpec* s) { s->mutable_federated()->set_aggregation(FederatedSpec::FEDSVD); },
       "federated.rounds: must be > 0, got 0"},
      {"clients",
       [](JobSpec* s) { s->mutable_federated()->set_aggregation(FederatedSpec::FFA_LORA); },
       "federated.clients: must be > 0, got 0"},
      {"local steps",
       [](JobSpec* s) { s->mutable_federated()->set_aggregation(FederatedSpec::FEDAVG_LORA); },
       "federated.local_steps: must be > 0, got 0"},
      {"federated without lora",
       [](JobSpec* s) { s->mutable_federated()->set_aggregation(FederatedSpec::FEDSVD); },
       "lora.rank: a federated job trains LoRA adapters"},
      {"rounds without aggregation", [](JobSpec* s) { s->mutable_federated()->set_rounds(3); },
       "federated.rounds: set to 3 without federated.aggregation"},
      {"dp clip", [](JobSpec* s) { s->mutable_federated()->set_dp_clip(-1); },
       "federated.dp_clip: must be >= 0 and finite, got -1"},
      {"dp noise", [](JobSpec* s) { s->mutable_federated()->set_dp_noise(kNaN); },
       "federated.dp_noise: must be >= 0 and finite, got nan"},
      {"dp noise without clip", [](JobSpec* s) { s->mutable_federated()->set_dp_noise(1.0f); },
       "federated.dp_noise: DP-SGD noise needs federated.dp_clip > 0, got dp_clip 0"},
      {"dp without aggregation", [](JobSpec* s) { s->mutable_federated()->set_dp_clip(1.0f); },
       "federated.dp_clip: DP settings given without federated.aggregation"},
      {"federated fraction", [](JobSpec* s) { Federate(s)->set_client_fraction(1.5f); },
       "federated.client_fraction: must be in [0, 1], got 1.5"},
      {"federated min clients", [](JobSpec* s) { Federate(s)->set_min_clients(9); },
       "federated.min_clients: must be in [1, federated.clients 8], got 9"},
      {"federated timeout", [](JobSpec* s) { Federate(s)->set_round_timeout_s(0); },
       "federated.round_timeout_s: must be > 0 and finite, got 0"},
      {"federated delta", [](JobSpec* s) { Federate(s)->set_dp_delta(1); },
       "federated.dp_delta: must be in (0, 1), got 1"},
      {"federated epsilon without clip", [](JobSpec* s) { Federate(s)->set_dp_epsilon(6); },
       "federated.dp_epsilon: a DP target needs federated.dp_clip > 0"},
      {"federated noise and epsilon",
       [](JobSpec* s) {
         FederatedSpec* f = Federate(s);
         f->set_dp_clip(1);
         f->set_dp_noise(1);
         f->set_dp_epsilon(6);
       },
       "federated.dp_noise: give dp_noise or dp_epsilon"},
      {"federated pattern", [](JobSpec* s) { Federate(s)->set_client_train_pattern(""); },
       "federated.client_train_pattern: must name each client's shards"},
      {"federated genre pattern",
       [](JobSpec* s) {
         Federate(s);
         s->mutable_data()->clear_genres();
       },
       "federated.client_train_pattern: uses {genre} but data.genres is empty"},
      {"federated steps",
       [](JobSpec* s) {
         Federate(s);
         s->mutable_training()->set_steps(5);
       },
       "training.steps: must be 0 in a federated job"},
      {"federated eval steps",
       [](JobSpec* s) {
         Federate(s);
         s->mutable_eval()->set_every_steps(5);
       },
       "eval.every_steps: must be 0 in a federated job"},
      {"federated warmup",
       [](JobSpec* s) {
         Federate(s);
         s->mutable_schedule()->set_warmup_steps(10);
       },
       "schedule.warmup_steps: counts rounds in a federated job: must be < federated.rounds 10"},
      {"federated on cuda",
       [](JobSpec* s) {
         Federate(s);
         s->set_device(CUDA);
       },
       "device: federated clients run on the CPU"},
      // LoRA.
      {"lora rank negative", [](JobSpec* s) { s->mutable_lora()->set_rank(-1); },
       "lora.rank: must be >= 0, got -1"},
      {"lora rank above width",
       [](JobSpec* s) {
         s->mutable_lora()->set_rank(129);
         s->mutable_lora()->set_base("base.safetensors");
       },
       "lora.rank: must be <= model.n_embd 128, got 129"},
      {"lora alpha",
       [](JobSpec* s) {
         s->mutable_lora()->set_rank(8);
         s->mutable_lora()->set_alpha(0);
         s->mutable_lora()->set_base("base.safetensors");
       },
       "lora.alpha: must be > 0 and finite, got 0"},
      {"lora target",
       [](JobSpec* s) {
         s->mutable_lora()->set_rank(8);
         s->mutable_lora()->add_targets("attn.q");
         s->mutable_lora()->set_base("base.safetensors");
       },
       "lora.targets[0]: must be one of attn.qkv, attn.proj, mlp.fc, mlp.proj, got \"attn.q\""},
      {"lora target twice",
       [](JobSpec* s) {
         s->mutable_lora()->set_rank(8);
         s->mutable_lora()->add_targets("mlp.fc");
         s->mutable_lora()->add_targets("mlp.fc");
         s->mutable_lora()->set_base("base.safetensors");
       },
       "lora.targets[1]: \"mlp.fc\" is listed twice"},
      {"lora base", [](JobSpec* s) { s->mutable_lora()->set_rank(8); },
       "lora.base: must name the frozen base"},
      {"lora alpha without rank", [](JobSpec* s) { s->mutable_lora()->set_alpha(16); },
       "lora.alpha: set without lora.rank"},
      {"lora base without rank", [](JobSpec* s) { s->mutable_lora()->set_base("b"); },
       "lora.base: set without lora.rank"},
  };
}

TEST(Validate, BaseIsValid) { EXPECT_TRUE(ValidateJobSpec(Base()).ok()); }

TEST(Validate, FederatedJobLoadsWithItsDefaults) {
  absl::StatusOr<JobSpec> spec = ParseJobSpec(
      R"pb(
        name: "fed"
        model { n_layer: 2 n_embd: 128 n_head: 4 }
        data { genres: "h" genres: "j" }
        optimizer { lr: 1e-3 }
        training { batch_size: 4 seq_len: 64 }
        lora { rank: 8 base: "out/base.safetensors" }
        federated {
          aggregation: FEDSVD rounds: 20 clients: 8 local_steps: 10
          client_train_pattern: "data/brown/train_{genre}.bin"
          dp_clip: 1 dp_epsilon: 6
        }
      )pb",
      "fed.tp");
  ASSERT_TRUE(spec.ok()) << spec.status();
  const FederatedSpec& f = spec->federated();
  EXPECT_EQ(f.client_fraction(), 0.5f);
  EXPECT_EQ(f.min_clients(), 1);
  EXPECT_EQ(f.round_timeout_s(), 600.0f);
  EXPECT_EQ(f.client_timeout_s(), 30.0f);
  EXPECT_EQ(f.dp_delta(), 1e-5f);
  EXPECT_EQ(f.local_optimizer(), FederatedSpec::ADAMW);
  EXPECT_EQ(spec->lora().alpha(), 8.0f);
  JobSpec s = Base();
  Federate(&s);
  EXPECT_TRUE(ValidateJobSpec(s).ok()) << ValidateJobSpec(s);
}

TEST(Validate, EveryRangeCheckNamesItsFieldAndValue) {
  for (const BadCase& c : BadCases()) {
    SCOPED_TRACE(c.what);
    JobSpec spec = Base();
    c.mutate(&spec);
    absl::Status s = ValidateJobSpec(spec);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(c.expect));
    // Every line of the message starts with a field path that exists in the schema.
    for (absl::string_view line : absl::StrSplit(s.message(), '\n')) {
      const std::string field(line.substr(0, line.find(':')));
      std::string top(field.substr(0, field.find_first_of(".[")));
      EXPECT_NE(JobSpec::descriptor()->FindFieldByName(top), nullptr) << line;
    }
  }
}

TEST(Validate, LegalCornerValuesPass) {
  JobSpec spec = Base();
  spec.mutable_model()->set_vocab_size(65536);
  spec.mutable_schedule()->set_warmup_steps(99);
  spec.mutable_schedule()->set_min_lr_ratio(1.0f);
  spec.mutable_eval()->set_every_steps(0);
  spec.mutable_checkpoint()->set_every_steps(0);
  spec.mutable_precision()->mutable_tweo()->set_lambda(0.01f);
  spec.mutable_parameter_service();
  EXPECT_TRUE(ValidateJobSpec(spec).ok()) << ValidateJobSpec(spec);
  spec.mutable_model()->set_vocab_size(2);
  EXPECT_TRUE(ValidateJobSpec(spec).ok()) << ValidateJobSpec(spec);
  // Phi's rank corners, with Phi on (a rank without it would be an unused setting).
  spec.mutable_precision()->set_linear(QAT);
  spec.mutable_precision()->mutable_qat()->set_weight_bits(4);
  spec.mutable_precision()->mutable_aux_lowrank()->set_enabled(true);
  spec.mutable_precision()->mutable_aux_lowrank()->set_decay_period(1);
  spec.mutable_precision()->mutable_aux_lowrank()->set_rank(1);
  EXPECT_TRUE(ValidateJobSpec(spec).ok()) << ValidateJobSpec(spec);
  spec.mutable_precision()->mutable_aux_lowrank()->set_rank(128);
  EXPECT_TRUE(ValidateJobSpec(spec).ok()) << ValidateJobSpec(spec);
}

TEST(Validate, DisabledAuxModuleDefaultRankDoesNotConstrainTinyModels) {
  JobSpec spec = Base();
  spec.mutable_model()->set_n_embd(16);  // smaller than the default rank 32
  EXPECT_TRUE(ValidateJobSpec(spec).ok()) << ValidateJobSpec(spec);
}

// ---------------------------------------------------------------------------------------------
// Features not implemented yet: rejected with FailedPrecondition naming the field.

struct UnimplementedCase {
  const char* what;
  std::function<void(JobSpec*)> mutate;
  const char* field;
};

std::vector<UnimplementedCase> UnimplementedCases() {
  return {
      {"cpu bf16 gradients",
       [](JobSpec* s) {
         s->set_device(CPU);
         s->mutable_training()->set_grad_dtype(GRAD_BF16);
       },
       "training.grad_dtype"},
      {"cpu lm head chunks",
       [](JobSpec* s) {
         s->set_device(CPU);
         s->mutable_training()->set_lm_head_chunks(2);
       },
       "training.lm_head_chunks"},
      {"lora outside federated",
       [](JobSpec* s) {
         s->mutable_lora()->set_rank(8);
         s->mutable_lora()->set_base("base.safetensors");
         ApplyDefaults(s);
       },
       "lora.rank"},
  };
}

TEST(Unimplemented, EachFeatureIsRejectedNamingItsField) {
  for (const UnimplementedCase& c : UnimplementedCases()) {
    SCOPED_TRACE(c.what);
    JobSpec spec = Base();
    c.mutate(&spec);
    absl::Status s = ValidateJobSpec(spec);
    EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr(absl::StrCat(c.field, ": ")));
    EXPECT_THAT(std::string(s.message()), HasSubstr("is not implemented yet"));
    EXPECT_EQ(RejectUnimplemented(spec).code(), absl::StatusCode::kFailedPrecondition);
  }
}

TEST(Unimplemented, DefaultsAndExplicitDefaultValuesAreAccepted) {
  // Writing a default out explicitly is not "setting a feature".
  absl::StatusOr<JobSpec> spec = ParseJobSpec(
      absl::StrCat(kBase,
                   "device: CPU\n"
                   "precision { linear: FULL fp8 { scaling: DELAYED amax_history_len: 16 }\n"
                   "  qat { weight_granularity: PER_CHANNEL act_granularity: PER_TENSOR }\n"
                   "  aux_lowrank { rank: 32 } tweo { lambda: 0.01 tau: 3 p: 4 } }\n"),
      "explicit.tp");
  EXPECT_TRUE(spec.ok()) << spec.status();
  JobSpec raw;  // without defaults: nothing is set, so nothing is rejected
  EXPECT_TRUE(RejectUnimplemented(raw).ok());
  JobSpec cuda_bf16 = Base();  // BF16 gradients are a CUDA feature
  cuda_bf16.set_device(CUDA);
  cuda_bf16.mutable_training()->set_grad_dtype(GRAD_BF16);
  EXPECT_TRUE(RejectUnimplemented(cuda_bf16).ok());
}

TEST(Unimplemented, SeveralFeaturesAreListedTogether) {
  JobSpec spec = Base();
  spec.set_device(CPU);
  spec.mutable_training()->set_grad_dtype(GRAD_BF16);
  spec.mutable_training()->set_lm_head_chunks(2);
  ApplyDefaults(&spec);
  absl::Status s = ValidateJobSpec(spec);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(s.message(),
            "training.grad_dtype: BF16 gradients on the CPU trainer (device CPU) is not "
            "implemented yet\n"
            "training.lm_head_chunks: a chunked LM head on the CPU trainer (device CPU) is not "
            "implemented yet");
}

// Distillation, a padded vocabulary and fp16 weight steps run on CUDA (the GPU tests check them
// against the CPU trainer): the job spec takes them.
TEST(Unimplemented, CudaTakesDistillationPaddedVocabAndFp16Steps) {
  JobSpec spec = Base();
  spec.set_device(CUDA);
  spec.mutable_model()->set_padded_vocab_size(spec.model().vocab_size() + 64);
  spec.mutable_precision()->mutable_distill()->set_teacher_checkpoint("t.safetensors");
  spec.mutable_precision()->mutable_distill()->set_weight(1.0f);
  spec.mutable_precision()->set_linear(QAT);
  spec.mutable_precision()->mutable_qat()->set_weight_bits(4);
  spec.mutable_precision()->mutable_qat()->set_weight_granularity(PER_GROUP);
  spec.mutable_precision()->mutable_qat()->set_group_size(32);
  spec.mutable_precision()->mutable_qat()->set_fp16_scales(true);
  ApplyDefaults(&spec);
  EXPECT_TRUE(RejectUnimplemented(spec).ok()) << RejectUnimplemented(spec);
}

// docs/job_spec.md's "CPU and CUDA" section says what a CUDA job runs and lists, with its
// message, every setting a CUDA job is still refused: both must stay what the code does.
TEST(Unimplemented, DocsListExactlyWhatCudaRefuses) {
  std::ifstream in("docs/job_spec.md");
  ASSERT_TRUE(in.good()) << "docs/job_spec.md is not in the runfiles";
  std::vector<std::string> documented;
  bool in_table = false;
  for (std::string line; std::getline(in, line);) {
    if (absl::StartsWith(line, "| Setting | Message on CUDA |")) {
      in_table = true;
    } else if (in_table && absl::StartsWith(line, "| `")) {
      // | `field...` | `message` |: the message is the last backquoted cell.
      const size_t end = line.rfind('`'), begin = line.rfind('`', end - 1);
      documented.push_back(line.substr(begin + 1, end - begin - 1));
    } else if (in_table && !absl::StartsWith(line, "|---")) {
      in_table = false;
    }
  }
  ASSERT_FALSE(documented.empty()) << "no \"| Setting | Message on CUDA |\" table";

  // Everything the section says runs on CUDA, in one job: nothing is refused.
  JobSpec runs = Base();
  runs.set_device(CUDA);
  PrecisionSpec* p = runs.mutable_precision();
  p->set_linear(QAT);
  p->mutable_qat()->set_weight_bits(4);
  p->mutable_qat()->set_act_bits(8);
  p->mutable_qat()->set_int8_forward(true);
  p->mutable_qat()->set_fp16_scales(true);
  p->mutable_aux_lowrank()->set_enabled(true);
  p->mutable_aux_lowrank()->set_rank(4);
  p->mutable_aux_lowrank()->set_decay_period(10);
  p->mutable_tweo()->set_enabled(true);
  p->mutable_distill()->set_teacher_checkpoint("t.safetensors");
  p->mutable_distill()->set_weight(1.0f);
  p->set_keep_first_last_blocks(1);
  LayerOverride* o = p->add_overrides();
  o->set_match("block.1.mlp.fc");
  o->set_precision(FP8);
  runs.mutable_model()->set_padded_vocab_size(runs.model().vocab_size() + 64);
  ApplyDefaults(&runs);
  EXPECT_TRUE(RejectUnimplemented(runs).ok()) << RejectUnimplemented(runs);
  for (Fp8Scaling scaling : {DELAYED, CURRENT, BLOCK}) {
    JobSpec fp8 = Base();
    fp8.set_device(CUDA);
    fp8.mutable_precision()->set_linear(FP8);
    fp8.mutable_precision()->mutable_fp8()->set_scaling(scaling);
    ApplyDefaults(&fp8);
    EXPECT_TRUE(RejectUnimplemented(fp8).ok()) << Fp8Scaling_Name(scaling);
  }

  // Everything the code refuses on CUDA, in one job: exactly the documented messages.
  JobSpec refused = Base();
  refused.set_device(CUDA);
  refused.mutable_optimizer()->set_zero1(true);
  refused.mutable_distributed()->set_backend(DistributedSpec::NCCL);
  ApplyDefaults(&refused);
  const absl::Status s = RejectUnimplemented(refused);
  EXPECT_EQ(std::string(s.message()), absl::StrJoin(documented, "\n"))
      << "update docs/job_spec.md's CPU and CUDA table (and this job) together with "
         "RejectUnimplemented";
}

// ---------------------------------------------------------------------------------------------
// Text round trip and hash.

TEST(Text, RoundTripsThroughTheParser) {
  for (const char* path :
       {"configs/tiny_cpu.textproto", "tests/configs/testdata/minimal.textproto"}) {
    SCOPED_TRACE(path);
    absl::StatusOr<JobSpec> spec = LoadJobSpec(path);
    ASSERT_TRUE(spec.ok()) << spec.status();
    const std::string text = JobSpecToText(*spec);
    absl::StatusOr<JobSpec> back = ParseJobSpec(text, "saved.textproto");
    ASSERT_TRUE(back.ok()) << back.status() << "\n" << text;
    EXPECT_TRUE(MessageDifferencer::Equals(*spec, *back)) << text;
    EXPECT_EQ(JobSpecHash(*spec), JobSpecHash(*back));
  }
}

TEST(Text, RoundTripKeepsEveryKindOfField) {
  // Values the shipped jobs do not use: odd floats, repeated fields, nested enums, uint64.
  JobSpec spec = Base();
  spec.set_seed(18446744073709551615ull);
  spec.mutable_optimizer()->set_lr(3.0000001e-4f);
  spec.mutable_optimizer()->set_grad_clip(0);
  spec.mutable_model()->set_init_std(0.0123456789f);
  spec.mutable_precision()->mutable_qat()->set_weight_bits(3);
  spec.mutable_precision()->mutable_tweo()->set_eps(1e-30f);
  spec.mutable_data()->add_genres("a");
  spec.mutable_data()->add_genres("r");
  auto* o = spec.mutable_precision()->add_overrides();
  o->set_match("block.1.*");
  o->set_precision(FP8);
  spec.mutable_federated()->set_aggregation(FederatedSpec::FFA_LORA);
  JobSpec back;
  ASSERT_TRUE(google::protobuf::TextFormat::ParseFromString(JobSpecToText(spec), &back));
  EXPECT_TRUE(MessageDifferencer::Equals(spec, back)) << JobSpecToText(spec);
}

TEST(Hash, IsFnv1aOfTheDeterministicSerialization) {
  // name "x" (field 1) and seed 1 (field 3): bytes 0a 01 78 18 01.
  JobSpec spec;
  spec.set_name("x");
  spec.set_seed(1);
  uint64_t h = 14695981039346656037ull;
  for (unsigned char c : {0x0a, 0x01, 0x78, 0x18, 0x01}) {
    h ^= c;
    h *= 1099511628211ull;
  }
  EXPECT_EQ(JobSpecHash(spec), h);
  EXPECT_EQ(JobSpecHash(JobSpec()), 14695981039346656037ull);
}

TEST(Hash, StableAndSensitiveToEveryChange) {
  const JobSpec base = Base();
  const uint64_t h = JobSpecHash(base);
  EXPECT_EQ(JobSpecHash(base), h);
  JobSpec copy = base;
  EXPECT_EQ(JobSpecHash(copy), h);

  const std::vector<std::function<void(JobSpec*)>> changes = {
      [](JobSpec* s) { s->set_seed(s->seed() + 1); },
      [](JobSpec* s) { s->set_name("other"); },
      [](JobSpec* s) { s->mutable_model()->set_n_layer(3); },
      [](JobSpec* s) { s->mutable_optimizer()->set_lr(1.0001e-3f); },
      [](JobSpec* s) { s->mutable_training()->set_deterministic(true); },
      [](JobSpec* s) { s->mutable_precision()->mutable_tweo()->set_p(6); },
      [](JobSpec* s) { s->mutable_data()->add_genres("a"); },
      // An optional field set to zero differs from one left unset.
      [](JobSpec* s) { s->mutable_optimizer()->clear_grad_clip(); },
  };
  for (size_t i = 0; i < changes.size(); ++i) {
    JobSpec changed = base;
    changes[i](&changed);
    EXPECT_NE(JobSpecHash(changed), h) << "change " << i;
  }
}

}  // namespace
}  // namespace qtrain

namespace qtrain {
namespace {

using ::testing::HasSubstr;

// Settings nothing would read are errors naming the field; writing out a default is not a
// setting.
TEST(Strict, UnusedSettingsAreRejectedNamingTheField) {
  struct Case {
    const char* precision;
    const char* expect;  // "" = loads
  } cases[] = {
      {"linear: FP8 qat { weight_bits: 4 }",
       "precision.qat.weight_bits: is set but no Linear uses QAT (precision.linear is FP8"},
      {"qat { act_bits: 8 }", "precision.qat.act_bits: is set but no Linear uses QAT"},
      {"linear: QAT qat { weight_bits: 4 } fp8 { margin: 1 }",
       "precision.fp8.margin: is set but no Linear uses FP8 (precision.linear is QAT"},
      {"tweo { lambda: 0.1 }", "precision.tweo.lambda: is set but precision.tweo.enabled is false"},
      {"aux_lowrank { rank: 8 decay_period: 4 }",
       "precision.aux_lowrank.rank: is set but precision.aux_lowrank.enabled is false"},
      // Spelled-out defaults, and settings that are used.
      {"fp8 { amax_history_len: 16 } tweo { tau: 3 } aux_lowrank { rank: 32 }", ""},
      {"linear: FULL overrides { match: \"block.0.*\" precision: QAT } qat { weight_bits: 4 }", ""},
      {"tweo { enabled: true lambda: 0.1 }", ""},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.precision);
    absl::StatusOr<JobSpec> spec =
        ParseJobSpec(absl::StrCat(kBase, "precision { ", c.precision, " }"), "j.textproto");
    if (*c.expect == '\0') {
      EXPECT_TRUE(spec.ok()) << spec.status();
    } else {
      ASSERT_FALSE(spec.ok());
      EXPECT_EQ(spec.status().code(), absl::StatusCode::kInvalidArgument);
      EXPECT_THAT(std::string(spec.status().message()),
                  HasSubstr(absl::StrCat("j.textproto: ", c.expect)));
    }
  }
}

TEST(Strict, BinaryFileIsNotATextProtobuf) {
  const char* tmp = std::getenv("TEST_TMPDIR");
  const std::string path = absl::StrCat(tmp ? tmp : "/tmp", "/binary.textproto");
  JobSpec spec = Base();
  ASSERT_TRUE(WriteFileAtomically(path, {spec.SerializeAsString()}).ok());
  absl::StatusOr<JobSpec> loaded = LoadJobSpec(path);
  ASSERT_FALSE(loaded.ok());
  const std::string msg(loaded.status().message());
  EXPECT_THAT(msg, HasSubstr(path + ": not a text protobuf (byte 1 is 0x04, binary data)"));
  for (char c : msg) EXPECT_TRUE(c == '\n' || (c >= 0x20 && c < 0x7f)) << "raw byte in: " << msg;
  // Invalid UTF-8 after valid text, and a NUL.
  for (const std::string& text : {std::string("name: \"x\"\n\xff\xfe"), std::string("na\0me", 5)}) {
    absl::StatusOr<JobSpec> s = ParseJobSpec(text, "t.textproto");
    ASSERT_FALSE(s.ok());
    EXPECT_THAT(std::string(s.status().message()), HasSubstr("t.textproto: not a text protobuf"));
  }
}

// --set FIELD=VALUE (and qtrain's --steps) apply before defaults and validation.
TEST(Overrides, SetFieldIsSeenByValidation) {
  absl::StatusOr<JobSpec> s = LoadJobSpec("configs/tiny_cpu.textproto", {"training.steps=10"});
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.status().message()),
              HasSubstr("schedule.warmup_steps: must be < training.steps 10, got 50"));
  EXPECT_THAT(std::string(s.status().message()),
              HasSubstr("overrides training.steps=10; --set=FIELD=VALUE changes any field"));
  s = LoadJobSpec("configs/tiny_cpu.textproto",
                  {"training.steps=10", "schedule.warmup_steps=2", "data.val_pattern=v/*.bin",
                   "precision.linear=QAT", "precision.qat={weight_bits: 4}", "name=renamed"});
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->training().steps(), 10);
  EXPECT_EQ(s->schedule().warmup_steps(), 2);
  EXPECT_EQ(s->data().val_pattern(), "v/*.bin");
  EXPECT_EQ(s->precision().qat().weight_bits(), 4);
  EXPECT_EQ(s->out_dir(), "out/renamed");  // the default follows the overridden name
  s = LoadJobSpec("configs/tiny_cpu.textproto", {"training.steps=-3"});
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("training.steps: must be > 0, got -3"));

  JobSpec spec;
  absl::Status e = SetJobSpecField(&spec, "training.stepz=5");
  EXPECT_THAT(std::string(e.message()),
              HasSubstr("--set training.stepz=5: training has no field 'stepz' (fields: steps,"));
  EXPECT_THAT(std::string(SetJobSpecField(&spec, "training.steps=abc").message()),
              HasSubstr("'abc' is not a int32 value for training.steps"));
  EXPECT_THAT(std::string(SetJobSpecField(&spec, "precision.linear=FP9").message()),
              HasSubstr("'FP9' is not a LinearPrecision value"));
  EXPECT_THAT(std::string(SetJobSpecField(&spec, "steps").message()), HasSubstr("FIELD=VALUE"));
  EXPECT_THAT(std::string(SetJobSpecField(&spec, "precision.overrides=x").message()),
              HasSubstr("is a list"));
}

TEST(Model, ArchIsTheArchitectureSeam) {
  absl::StatusOr<JobSpec> s = ParseJobSpec(kBase, "a.textproto");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->model().arch(), GPT2);  // the default
  EXPECT_THAT(JobSpecToText(*s), HasSubstr("arch: GPT2"));
  auto with_arch = [](const char* arch) {
    return absl::StrCat("name: \"a\" model { arch: ", arch, " n_layer: 2 n_embd: 128 n_head: 4 } ",
                        "optimizer { lr: 1e-3 } training { steps: 100 batch_size: 4 seq_len: 64 }");
  };
  s = ParseJobSpec(with_arch("GPT2"), "a.textproto");
  EXPECT_TRUE(s.ok()) << s.status();
  s = ParseJobSpec(with_arch("7"), "a.textproto");
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("model.arch: unknown ModelArch value 7"));
  s = ParseJobSpec(with_arch("LLAMA"), "a.textproto");
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("LLAMA"));
}

}  // namespace
}  // namespace qtrain
