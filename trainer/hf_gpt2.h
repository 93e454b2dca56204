// Hugging Face GPT-2 checkpoints (transformers' GPT2LMHeadModel / GPT2Model: config.json +
// model.safetensors) in and out of qtrain's parameters: transformer.h.N.* names, Conv1D's
// [in, out] weights transposed onto qtrain's [out, in] Linears, the LM head tied to wte, the
// vocabulary padding added (import) or dropped (export). docs/ecosystem.md shows the workflow.
#ifndef QTRAIN_TRAINER_HF_GPT2_H_
#define QTRAIN_TRAINER_HF_GPT2_H_

#include <functional>
#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "trainer/gpt.h"
#include "trainer/param_store.h"

namespace qtrain {

// The fields of a GPT-2 config.json that decide whether qtrain can run the model.
struct HfGpt2Config {
  int n_layer = 0, n_embd = 0, n_head = 0, n_positions = 0, vocab_size = 0;
  int n_inner = 0;  // 0: null (4 * n_embd)
  double layer_norm_epsilon = 1e-5;
  std::string activation_function = "gelu_new";
  bool tie_word_embeddings = true;
  bool scale_attn_weights = true;
  bool scale_attn_by_inverse_layer_idx = false;
};

// Parses config.json; errors name the file and the key.
absl::StatusOr<HfGpt2Config> ReadHfGpt2Config(const std::string& path);

// True when `path` is a Hugging Face GPT-2 checkpoint rather than a qtrain one: a folder with
// config.json, or a .safetensors file with config.json beside it and no qtrain "format"
// metadata.
bool IsHfGpt2Checkpoint(const std::string& path);

// Loads a Hugging Face GPT-2 checkpoint (folder or model.safetensors with config.json beside
// it) into the parameters of a model of shape `config`: names with or without the
// "transformer." prefix, F32/F16/BF16 data, Conv1D weights transposed, wpe's first
// max_seq_len rows, padded wte rows zeroed, "lm_head.weight" (if present) checked to equal
// wte, the attention mask buffers of old checkpoints ignored. Quantizer parameters and Phi
// (IsQuantizerParam) are left to InitQuantizers. Errors name the first tensor that does not
// fit (missing, unknown, wrong shape with the shape the model needs) or the config.json key
// qtrain cannot run (activation, layer norm epsilon, untied head, ...). Returns the number of
// qtrain tensors loaded.
absl::StatusOr<int> LoadHfGpt2(const std::string& path, const GptConfig& config,
                               ParamStore* params);

// training.init_from and teacher checkpoints: a Hugging Face GPT-2 checkpoint through
// LoadHfGpt2, else a qtrain checkpoint through LoadWeights (trainer/checkpoint.h).
absl::StatusOr<int> LoadInitialWeights(const std::string& path, const GptConfig& config,
                                       ParamStore* params,
                                       const std::function<bool(const std::string&)>& may_be_missing);

// Writes `dir`/config.json and `dir`/model.safetensors (transformer.* names, F32, metadata
// "format": "pt" plus `metadata`), each atomically, from `model`'s weights as its forward uses
// them: QAT Linears as Q(W) (+ Phi folded), wte without its padded rows, wpe's max_seq_len rows
// as n_positions. Creates `dir`.
absl::Status WriteHfGpt2(const std::string& dir, Gpt* model,
                         const std::map<std::string, std::string>& metadata = {});

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_HF_GPT2_H_
