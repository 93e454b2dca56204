// Hugging Face GPT-2 checkpoints: export -> import round-trips bit-exactly (padded vocabulary
// included), the layout transformers writes (prefix, dtypes, mask buffers, a tied lm_head) is
// read, and every tensor or config.json key that does not fit is named.
#include "trainer/hf_gpt2.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "ops/quant/fp16.h"
#include "trainer/model_setup.h"
#include "trainer/safetensors.h"

namespace qtrain {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

GptConfig Small() {
  GptConfig c{2, 16, 2, 40, 8};
  c.padded_vocab_size = 48;
  return c;
}

std::string Fresh(const std::string& name) {
  const std::string d = testing::TempDir() + "/hf_" + name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::unique_ptr<Gpt> RandomModel(const GptConfig& c, uint64_t seed) {
  auto m = *Gpt::Create(c);
  m->InitWeights(seed, 0.2f);
  return m;
}

// Rewrites dir's model.safetensors through `edit` (tensors by name, as F32 floats).
void EditFile(const std::string& dir,
              const std::function<void(std::map<std::string, Tensor>*)>& edit) {
  SafeTensors st = *ReadSafeTensors(dir + "/model.safetensors");
  edit(&st.tensors);
  std::vector<TensorView> views;
  for (const auto& [name, t] : st.tensors) {
    views.push_back({name, t.dtype, t.shape, t.bytes.data(), t.bytes.size()});
  }
  ASSERT_TRUE(WriteSafeTensors(dir + "/model.safetensors", views, st.metadata).ok());
}

void EditConfig(const std::string& dir, const std::function<void(nlohmann::json*)>& edit) {
  nlohmann::json j = nlohmann::json::parse(Slurp(dir + "/config.json"));
  edit(&j);
  std::ofstream(dir + "/config.json") << j.dump();
}

std::string LoadError(const std::string& path, const GptConfig& c) {
  auto m = *Gpt::Create(c);
  absl::StatusOr<int> n = LoadHfGpt2(path, c, &m->params());
  EXPECT_FALSE(n.ok());
  return n.ok() ? "" : std::string(n.status().message());
}

TEST(HfGpt2, ExportImportRoundTripsBitExactly) {
  const GptConfig c = Small();
  auto a = RandomModel(c, 7);
  const std::string dir = Fresh("roundtrip");
  ASSERT_TRUE(WriteHfGpt2(dir, a.get()).ok());
  EXPECT_TRUE(IsHfGpt2Checkpoint(dir));
  EXPECT_TRUE(IsHfGpt2Checkpoint(dir + "/model.safetensors"));

  SafeTensors st = *ReadSafeTensors(dir + "/model.safetensors");
  EXPECT_EQ(st.metadata.at("format"), "pt");
  // transformers' layout: Conv1D [in, out], wte without the padding.
  EXPECT_EQ(st.tensors.at("transformer.h.1.attn.c_attn.weight").shape,
            (std::vector<int64_t>{16, 48}));
  EXPECT_EQ(st.tensors.at("transformer.h.0.mlp.c_proj.weight").shape,
            (std::vector<int64_t>{64, 16}));
  EXPECT_EQ(st.tensors.at("transformer.wte.weight").shape, (std::vector<int64_t>{40, 16}));
  EXPECT_EQ(st.tensors.size(), 4u + 2 * 12u);
  nlohmann::json cfg = nlohmann::json::parse(Slurp(dir + "/config.json"));
  EXPECT_EQ(cfg["n_layer"], 2);
  EXPECT_EQ(cfg["vocab_size"], 40);
  EXPECT_EQ(cfg["n_positions"], 8);
  EXPECT_EQ(cfg["activation_function"], "gelu_new");

  auto b = *Gpt::Create(c);
  std::fill(b->params().params().begin(), b->params().params().end(), 9.0f);
  absl::StatusOr<int> n = LoadHfGpt2(dir, c, &b->params());
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(*n, b->params().size());
  EXPECT_TRUE(a->params().params() == b->params().params());  // bit for bit, padding zeros too
  const std::string dir2 = Fresh("roundtrip2");
  ASSERT_TRUE(WriteHfGpt2(dir2, b.get()).ok());
  EXPECT_TRUE(Slurp(dir + "/model.safetensors") == Slurp(dir2 + "/model.safetensors"));
  EXPECT_EQ(Slurp(dir + "/config.json"), Slurp(dir2 + "/config.json"));
}

TEST(HfGpt2, ReadsWhatTransformersWrites) {
  const GptConfig c = Small();
  auto a = RandomModel(c, 3);
  const std::string dir = Fresh("transformers_layout");
  ASSERT_TRUE(WriteHfGpt2(dir, a.get()).ok());
  // GPT2Model names (no prefix), an F16 tensor, old mask buffers, a tied lm_head copy, more
  // positions than the job uses.
  std::vector<float> ln;
  EditFile(dir, [&](std::map<std::string, Tensor>* t) {
    std::map<std::string, Tensor> out;
    for (auto& [name, tensor] : *t) out[name.substr(std::strlen("transformer."))] = tensor;
    Tensor& w = out.at("h.0.ln_1.weight");
    std::vector<uint16_t> h(w.num_elements());
    const float* f = reinterpret_cast<const float*>(w.bytes.data());
    for (size_t i = 0; i < h.size(); ++i) {
      h[i] = ops::fp32_to_fp16(f[i]);
      ln.push_back(ops::fp16_to_fp32(h[i]));
    }
    w.dtype = "F16";
    w.bytes.assign(reinterpret_cast<const char*>(h.data()), h.size() * 2);
    out["h.0.attn.bias"] = Tensor{"F32", {1, 1, 8, 8}, std::string(256, '\0')};
    out["lm_head.weight"] = out.at("wte.weight");
    Tensor& wpe = out.at("wpe.weight");
    wpe.shape = {12, 16};
    wpe.bytes += std::string(4 * 16 * 4, '\x01');
    *t = out;
  });
  auto b = *Gpt::Create(c);
  absl::StatusOr<int> n = LoadHfGpt2(dir + "/model.safetensors", c, &b->params());
  ASSERT_TRUE(n.ok()) << n.status();
  const int ln1 = *b->params().Find("block.0.ln1.weight");
  EXPECT_EQ(std::vector<float>(b->params().param(ln1), b->params().param(ln1) + 16), ln);
  const int wpe = *b->params().Find("wpe");
  EXPECT_TRUE(std::equal(b->params().param(wpe), b->params().param(wpe) + 8 * 16,
                         a->params().param(wpe)));
}

TEST(HfGpt2, WrongShapeIsNamed) {
  const GptConfig c = Small();
  auto a = RandomModel(c, 1);
  const std::string dir = Fresh("wrong_shape");
  ASSERT_TRUE(WriteHfGpt2(dir, a.get()).ok());
  EditFile(dir, [](std::map<std::string, Tensor>* t) {
    // As if the file had qtrain's [out, in] layout for this one Linear.
    t->at("transformer.h.1.mlp.c_fc.weight").shape = {64, 16};
  });
  const std::string msg = LoadError(dir, c);
  EXPECT_THAT(msg, HasSubstr("tensor 'transformer.h.1.mlp.c_fc.weight' has shape [64,16], the "
                             "job's model needs [16,64]"));
  EXPECT_THAT(msg, HasSubstr("Conv1D stores [in, out]"));

  // A model wider than the file: the first tensor (wte) is named.
  GptConfig wide = c;
  wide.n_embd = 32;
  EXPECT_THAT(LoadError(dir, wide), HasSubstr("'transformer.wte.weight' has shape [40,16], the "
                                              "job's model needs [40,32]"));
  GptConfig vocab = c;
  vocab.vocab_size = 41;
  EXPECT_THAT(LoadError(dir, vocab), HasSubstr("'transformer.wte.weight' has shape [40,16]"));
  GptConfig longer = c;
  longer.max_seq_len = 9;
  EXPECT_THAT(LoadError(dir, longer), HasSubstr("'transformer.wpe.weight' has shape [8,16], the "
                                                "job's model needs [>=9,16]"));
}

TEST(HfGpt2, MissingUnknownAndUntiedTensorsAreNamed) {
  const GptConfig c = Small();
  auto a = RandomModel(c, 2);
  const std::string dir = Fresh("missing");
  ASSERT_TRUE(WriteHfGpt2(dir, a.get()).ok());
  EditFile(dir, [](std::map<std::string, Tensor>* t) { t->erase("transformer.h.1.ln_2.bias"); });
  EXPECT_THAT(LoadError(dir, c), HasSubstr("no tensor 'transformer.h.1.ln_2.bias'"));

  ASSERT_TRUE(WriteHfGpt2(dir, a.get()).ok());
  EditFile(dir, [](std::map<std::string, Tensor>* t) {
    (*t)["transformer.h.2.ln_1.weight"] = t->at("transformer.h.1.ln_1.weight");
  });
  EXPECT_THAT(LoadError(dir, c), HasSubstr("'transformer.h.2.ln_1.weight' is not part of a GPT-2 "
                                           "model of this shape"));

  ASSERT_TRUE(WriteHfGpt2(dir, a.get()).ok());
  EditFile(dir, [](std::map<std::string, Tensor>* t) {
    Tensor head = t->at("transformer.wte.weight");
    head.bytes[5] ^= 1;
    (*t)["lm_head.weight"] = head;
  });
  EXPECT_THAT(LoadError(dir, c), HasSubstr("'lm_head.weight' differs from wte"));

  ASSERT_TRUE(WriteHfGpt2(dir, a.get()).ok());
  EditFile(dir, [](std::map<std::string, Tensor>* t) {
    t->at("transformer.wpe.weight").dtype = "I32";
  });
  EXPECT_THAT(LoadError(dir, c), HasSubstr("'transformer.wpe.weight' is I32"));
}

TEST(HfGpt2, ConfigKeysQtrainCannotRunAreNamed) {
  const GptConfig c = Small();
  auto a = RandomModel(c, 2);
  const std::string dir = Fresh("config");
  const std::vector<std::pair<std::function<void(nlohmann::json*)>, std::string>> cases = {
      {[](nlohmann::json* j) { (*j)["activation_function"] = "gelu"; },
       "activation_function 'gelu'"},
      {[](nlohmann::json* j) { (*j)["n_head"] = 4; }, "n_head 4, the job's model.n_head is 2"},
      {[](nlohmann::json* j) { (*j)["layer_norm_epsilon"] = 1e-6; }, "layer_norm_epsilon 1e-06"},
      {[](nlohmann::json* j) { (*j)["tie_word_embeddings"] = false; }, "tie_word_embeddings false"},
      {[](nlohmann::json* j) { (*j)["scale_attn_by_inverse_layer_idx"] = true; },
       "attention scaling"},
      {[](nlohmann::json* j) { (*j)["n_inner"] = 32; }, "n_inner 32"},
      {[](nlohmann::json* j) { (*j)["model_type"] = "llama"; }, "model_type '\"llama\"'"},
      {[](nlohmann::json* j) { j->erase("n_layer"); }, "config.json: no 'n_layer'"},
  };
  for (const auto& [edit, want] : cases) {
    ASSERT_TRUE(WriteHfGpt2(dir, a.get()).ok());
    EditConfig(dir, edit);
    EXPECT_THAT(LoadError(dir, c), HasSubstr(want));
  }
}

TEST(HfGpt2, InitialWeightsTellTheFormatsApart) {
  const GptConfig c = Small();
  auto a = RandomModel(c, 5);
  const std::string dir = Fresh("dispatch");
  ASSERT_TRUE(WriteHfGpt2(dir, a.get()).ok());
  auto b = *Gpt::Create(c);
  absl::StatusOr<int> n = LoadInitialWeights(dir, c, &b->params(), IsQuantizerParam);
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_TRUE(a->params().params() == b->params().params());
  // A qtrain checkpoint is not mistaken for one, even with a config.json beside it.
  EXPECT_FALSE(IsHfGpt2Checkpoint(Fresh("empty")));
  std::vector<float> w(4, 1.0f);
  const std::string q = dir + "/qtrain.safetensors";
  ASSERT_TRUE(WriteSafeTensors(q, {{"model/x", "F32", {4}, w.data(), 16}},
                               {{"format", "qtrain-checkpoint-v1"}})
                  .ok());
  EXPECT_FALSE(IsHfGpt2Checkpoint(q));
}

}  // namespace
}  // namespace qtrain
