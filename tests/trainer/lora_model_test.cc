// LoRA bases: a full-precision checkpoint, a QAT checkpoint (its fake-quantized weights), a
// full-precision checkpoint quantized at load, and a packed low-bit export all load into the
// adapted model; the export and the QAT checkpoint give the same model; the base hash follows
// every bit of the base; mismatches are named.
#include "trainer/lora_model.h"

#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "configs/job_spec_loader.h"
#include "gtest/gtest.h"
#include "ops/quant/pack.h"
#include "trainer/checkpoint.h"
#include "trainer/model_setup.h"
#include "trainer/rng.h"
#include "trainer/safetensors.h"

namespace qtrain {
namespace {

std::string TmpDir() {
  const char* tmp = std::getenv("TEST_TMPDIR");
  return tmp ? tmp : "/tmp";
}

JobSpec Spec(bool qat) {
  JobSpec s;
  s.set_name("lora_base");
  s.set_seed(3);
  s.mutable_model()->set_n_layer(2);
  s.mutable_model()->set_n_embd(16);
  s.mutable_model()->set_n_head(2);
  s.mutable_model()->set_vocab_size(32);
  s.mutable_training()->set_steps(1);
  s.mutable_training()->set_batch_size(2);
  s.mutable_training()->set_seq_len(8);
  s.mutable_optimizer()->set_lr(1e-3f);
  if (qat) {
    s.mutable_precision()->set_linear(QAT);
    s.mutable_precision()->mutable_qat()->set_weight_bits(4);
  }
  ApplyDefaults(&s);
  return s;
}

// A trained-looking base: random weights, quantizers from them; saved as a checkpoint.
std::unique_ptr<Gpt> MakeBase(const JobSpec& spec, const std::string& dir) {
  GptConfig gc = *ModelConfigFromSpec(spec);
  auto m = *Gpt::Create(gc);
  m->InitWeights(21, 0.2f);
  EXPECT_TRUE(m->InitQuantizers().ok());
  TrainState st;
  st.step = 1;
  st.job_spec = JobSpecToText(spec);
  EXPECT_TRUE(SaveCheckpoint(dir, m->params(), nullptr, st, 0).ok());
  return m;
}

JobSpec WithLora(JobSpec spec, const std::string& base) {
  spec.mutable_lora()->set_rank(2);
  spec.mutable_lora()->set_base(base);
  ApplyDefaults(&spec);
  return spec;
}

double Loss(Gpt* m) {
  std::vector<int32_t> x(2 * 8), y(2 * 8);
  Rng rng(5);
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = rng.NextU64() % 32;
    y[i] = rng.NextU64() % 32;
  }
  absl::StatusOr<double> l = m->Forward(x.data(), y.data(), 2, 8);
  EXPECT_TRUE(l.ok()) << l.status();
  return *l;
}

// Writes what //tools:export writes for a QAT model: packed codes, steps, F32 rest.
void WriteExport(Gpt* m, const JobSpec& spec, const std::string& path) {
  std::vector<TensorView> views;
  std::vector<std::vector<uint8_t>> packed;
  packed.reserve(m->linears().size());
  std::vector<bool> done(m->params().size(), false);
  for (Linear* lin : m->linears()) {
    std::vector<int32_t> codes;
    ASSERT_TRUE(lin->WeightCodes(&codes, false).ok());
    const int OC = lin->out_features(), C = lin->in_features();
    const int64_t row = *ops::packed_row_bytes(4, C);
    packed.emplace_back(OC * row);
    ASSERT_TRUE(
        ops::pack_codes(packed.back().data(), codes.data(), OC, C, 4, ops::CodeSign::kSigned).ok());
    views.push_back({lin->name() + ".qweight", "U8", {OC, row}, packed.back().data(),
                     packed.back().size()});
    done[lin->weight_index()] = true;
  }
  const ParamStore& ps = m->params();
  for (int i = 0; i < ps.size(); ++i) {
    if (done[i]) continue;
    views.push_back({ps.info(i).name, "F32", ps.info(i).shape, ps.param(i),
                     static_cast<size_t>(ps.info(i).size) * 4});
  }
  ASSERT_TRUE(WriteSafeTensors(path, views,
                               {{"format", "qtrain-export-v1"}, {"job_spec", JobSpecToText(spec)}})
                  .ok());
}

TEST(LoraModel, FullPrecisionCheckpointIsTheFrozenBase) {
  const JobSpec spec = Spec(false);
  const std::string dir = TmpDir() + "/fp_base";
  auto base = MakeBase(spec, dir);
  absl::StatusOr<std::unique_ptr<Gpt>> m = CreateLoraModel(WithLora(spec, CheckpointPath(dir, 1)));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ((*m)->params().params(), base->params().params());
  EXPECT_EQ(Loss(m->get()), Loss(base.get()));  // B = 0
  EXPECT_FALSE((*m)->params().has_grads());
  EXPECT_GT((*m)->lora_params().num_elements(), 0);
}

TEST(LoraModel, QatCheckpointAndItsExportGiveTheSameLowBitBase) {
  const JobSpec spec = Spec(true);
  const std::string dir = TmpDir() + "/qat_base";
  auto base = MakeBase(spec, dir);
  const std::string export_path = TmpDir() + "/qat_base_export.safetensors";
  WriteExport(base.get(), spec, export_path);
  auto from_ckpt = CreateLoraModel(WithLora(spec, CheckpointPath(dir, 1)));
  auto from_export = CreateLoraModel(WithLora(spec, export_path));
  ASSERT_TRUE(from_ckpt.ok()) << from_ckpt.status();
  ASSERT_TRUE(from_export.ok()) << from_export.status();
  const double want = Loss(base.get());
  EXPECT_EQ(Loss(from_ckpt->get()), want);
  EXPECT_EQ(Loss(from_export->get()), want);  // codes dequantize to what Q(W) gives
  // The export holds dequantized weights, the checkpoint the latent ones: the forward is the
  // same, the weights (and so the hash) are not.
  std::vector<float> q1, q2;
  ASSERT_TRUE((*from_ckpt)->linears()[0]->EffectiveWeight(&q1, false).ok());
  ASSERT_TRUE((*from_export)->linears()[0]->EffectiveWeight(&q2, false).ok());
  EXPECT_EQ(q1, q2);
  EXPECT_NE(BaseHash(**from_ckpt), BaseHash(**from_export));
}

TEST(LoraModel, FullPrecisionCheckpointIsQuantizedAtLoadUnderAQatJob) {
  const std::string dir = TmpDir() + "/fp_base_for_qat";
  auto fp = MakeBase(Spec(false), dir);
  const JobSpec qat = Spec(true);
  auto m = CreateLoraModel(WithLora(qat, CheckpointPath(dir, 1)));
  ASSERT_TRUE(m.ok()) << m.status();
  // The same as a QAT model whose quantizers start from those weights.
  auto want = *Gpt::Create(*ModelConfigFromSpec(qat));
  ASSERT_TRUE(LoadWeights(CheckpointPath(dir, 1), &want->params(), IsQuantizerParam).ok());
  ASSERT_TRUE(want->InitQuantizers().ok());
  EXPECT_EQ((*m)->params().params(), want->params().params());
  EXPECT_EQ(Loss(m->get()), Loss(want.get()));
  EXPECT_NE(Loss(m->get()), Loss(fp.get()));  // 4-bit weights do change the loss
}

TEST(LoraModel, BaseHashIsStableAndFollowsEveryBit) {
  const JobSpec spec = Spec(true);
  const std::string dir = TmpDir() + "/hash_base";
  MakeBase(spec, dir);
  const JobSpec lora = WithLora(spec, CheckpointPath(dir, 1));
  auto a = *CreateLoraModel(lora);
  auto b = *CreateLoraModel(lora);
  EXPECT_EQ(BaseHash(*a), BaseHash(*b));
  EXPECT_EQ(BaseHashHex(BaseHash(*a)).size(), 16u);
  // The adapters are not part of the base.
  b->lora_params().params()[0] += 1;
  EXPECT_EQ(BaseHash(*a), BaseHash(*b));
  b->params().params()[7] = std::nextafter(b->params().params()[7], 1.0f);
  EXPECT_NE(BaseHash(*a), BaseHash(*b));
  auto c = *CreateLoraModel(lora);
  c->params().buffer(0)[0] += 1;  // quantizer state counts too
  EXPECT_NE(BaseHash(*a), BaseHash(*c));
}

TEST(LoraModel, MismatchedBaseIsNamed) {
  const std::string dir = TmpDir() + "/wide_base";
  JobSpec wide = Spec(false);
  wide.mutable_model()->set_n_embd(32);
  MakeBase(wide, dir);
  auto m = CreateLoraModel(WithLora(Spec(false), CheckpointPath(dir, 1)));
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.status().message().find("base tensor 'model/wte' has shape [32,32]"),
            std::string::npos)
      << m.status();
  auto missing = CreateLoraModel(WithLora(Spec(false), TmpDir() + "/no_such.safetensors"));
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("no_such.safetensors"), std::string::npos);
}

}  // namespace
}  // namespace qtrain
