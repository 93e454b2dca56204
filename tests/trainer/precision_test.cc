// PrecisionConfig: the job spec's precision block resolved per Linear (default, overrides,
// the full-precision first and last blocks), and the validation of those fields.
#include "trainer/precision.h"

#include "gtest/gtest.h"
#include "configs/job_spec.pb.h"
#include "configs/job_spec_loader.h"

namespace qtrain {
namespace {

TEST(PrecisionConfig, FirstAndLastBlocksKeepFullPrecision) {
  PrecisionSpec spec;
  spec.set_linear(FP8);
  spec.set_keep_first_last_blocks(1);
  LayerOverride* o = spec.add_overrides();
  o->set_match("block.0.*");
  o->set_precision(QAT);  // the ends win over overrides too
  absl::StatusOr<PrecisionConfig> pc = PrecisionConfig::FromSpec(spec, 4);
  ASSERT_TRUE(pc.ok()) << pc.status();
  for (const char* name : {"block.0.attn.qkv", "block.0.mlp.proj", "block.3.attn.proj",
                           "block.3.mlp.fc"}) {
    EXPECT_EQ(pc->For(name).mode, LinearMode::kFull) << name;
  }
  for (const char* name : {"block.1.attn.qkv", "block.2.mlp.proj"}) {
    EXPECT_EQ(pc->For(name).mode, LinearMode::kFp8) << name;
  }
  // Without the model's depth the ends are unknown: refused, naming the field.
  absl::StatusOr<PrecisionConfig> unknown = PrecisionConfig::FromSpec(spec);
  ASSERT_FALSE(unknown.ok());
  EXPECT_NE(unknown.status().message().find("keep_first_last_blocks"), std::string::npos);
}

TEST(PrecisionConfig, KeepFirstLastBlocksIsValidated) {
  absl::StatusOr<JobSpec> base = ParseJobSpec(R"pb(
    name: "t" out_dir: "/tmp/x"
    model { n_layer: 4 n_embd: 64 n_head: 4 vocab_size: 256 max_seq_len: 64 }
    data { train_pattern: "a*" val_pattern: "b*" }
    optimizer { lr: 1e-3 }
    training { steps: 10 batch_size: 2 seq_len: 32 }
    precision { linear: FP8 keep_first_last_blocks: 2 }
  )pb", "t.textproto");
  ASSERT_TRUE(base.ok()) << base.status();
  JobSpec bad = *base;
  bad.mutable_precision()->set_keep_first_last_blocks(3);
  const absl::Status s = ValidateJobSpec(bad);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("precision.keep_first_last_blocks"), std::string::npos) << s;
  EXPECT_NE(s.message().find("got 3"), std::string::npos) << s;
}

JobSpec BaseSpec() {
  absl::StatusOr<JobSpec> base = ParseJobSpec(R"pb(
    name: "t" out_dir: "/tmp/x"
    model { n_layer: 4 n_embd: 64 n_head: 4 vocab_size: 256 max_seq_len: 64 }
    data { train_pattern: "a*" val_pattern: "b*" }
    optimizer { lr: 1e-3 }
    training { steps: 10 batch_size: 2 seq_len: 32 }
  )pb", "t.textproto");
  EXPECT_TRUE(base.ok()) << base.status();
  return *base;
}

// Each refusal names the field and says what was wrong.
void ExpectRefused(const JobSpec& spec, const std::string& field, const std::string& what) {
  const absl::Status s = ValidateJobSpec(spec);
  ASSERT_FALSE(s.ok()) << "accepted a spec with a bad " << field;
  EXPECT_NE(s.message().find(field), std::string::npos) << s;
  EXPECT_NE(s.message().find(what), std::string::npos) << s;
}

TEST(PrecisionConfig, Fp8RecipeAndAccumulationFromSpec) {
  PrecisionSpec spec;
  spec.set_linear(FP8);
  spec.mutable_fp8()->set_scaling(BLOCK);
  spec.mutable_fp8()->set_backward_accumulation(FAST);
  absl::StatusOr<PrecisionConfig> pc = PrecisionConfig::FromSpec(spec, 2);
  ASSERT_TRUE(pc.ok()) << pc.status();
  const LinearOptions o = pc->For("block.0.attn.qkv");
  EXPECT_EQ(o.fp8.recipe, Fp8Recipe::kBlock);
  EXPECT_TRUE(o.fp8.fast_accum_fprop);
  EXPECT_TRUE(o.fp8.fast_accum_backward);
  spec.mutable_fp8()->set_scaling(CURRENT);
  spec.mutable_fp8()->set_fprop_accumulation(SPLIT);
  spec.mutable_fp8()->clear_backward_accumulation();
  pc = PrecisionConfig::FromSpec(spec, 2);
  ASSERT_TRUE(pc.ok());
  EXPECT_EQ(pc->For("block.1.mlp.fc").fp8.recipe, Fp8Recipe::kCurrent);
  EXPECT_FALSE(pc->For("block.1.mlp.fc").fp8.fast_accum_fprop);
  EXPECT_FALSE(pc->For("block.1.mlp.fc").fp8.fast_accum_backward);
}

TEST(PrecisionConfig, GpuOnlySettingsAreRefusedOnCpu) {
  JobSpec s = BaseSpec();
  s.mutable_precision()->set_linear(FP8);
  s.mutable_precision()->mutable_fp8()->set_fprop_accumulation(SPLIT);
  ExpectRefused(s, "precision.fp8.fprop_accumulation", "device CPU");
  s = BaseSpec();
  s.mutable_precision()->set_linear(FP8);
  s.mutable_precision()->mutable_fp8()->set_backward_accumulation(FAST);
  ExpectRefused(s, "precision.fp8.backward_accumulation", "device CPU");
  s = BaseSpec();
  s.mutable_precision()->set_linear(QAT);
  s.mutable_precision()->mutable_qat()->set_weight_bits(8);
  s.mutable_precision()->mutable_qat()->set_act_bits(8);
  s.mutable_precision()->mutable_qat()->set_int8_forward(true);
  ExpectRefused(s, "precision.qat.int8_forward", "device CUDA only");
}

TEST(PrecisionConfig, Int8ForwardNeedsSymmetricPerChannelCodes) {
  JobSpec s = BaseSpec();
  s.set_device(CUDA);
  QatSpec* q = s.mutable_precision()->mutable_qat();
  s.mutable_precision()->set_linear(QAT);
  q->set_weight_bits(4);
  q->set_act_bits(8);
  q->set_int8_forward(true);
  // Valid (whatever the list of not-yet-implemented features says).
  EXPECT_NE(ValidateJobSpec(s).code(), absl::StatusCode::kInvalidArgument) << ValidateJobSpec(s);
  q->set_weight_granularity(PER_GROUP);
  q->set_group_size(32);
  ExpectRefused(s, "precision.qat.int8_forward", "PER_CHANNEL");
  q->clear_weight_granularity();
  q->clear_group_size();
  q->set_weight_asymmetric(true);
  ExpectRefused(s, "precision.qat.int8_forward", "symmetric weights");
  q->set_weight_asymmetric(false);
  q->set_act_bits(0);
  ExpectRefused(s, "precision.qat.int8_forward", "act_bits");
}

}  // namespace
}  // namespace qtrain
