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

}  // namespace
}  // namespace qtrain
