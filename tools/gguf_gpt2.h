// GPT-2 models as GGUF files for llama.cpp: the architecture metadata, GPT-2's tokenizer, and
// the block Linears of a QAT model written from their learned codes and steps where the QAT
// scheme is a GGUF block type (4-bit symmetric per group of 32 -> Q4_0, 8-bit symmetric -> Q8_0,
// LSQ+ 4-bit -> Q4_1), never re-quantized; and qtrain's own reader, which dequantizes the
// blocks into a model to evaluate the file. docs/quantization.md, docs/ecosystem.md.
#ifndef QTRAIN_TOOLS_GGUF_GPT2_H_
#define QTRAIN_TOOLS_GGUF_GPT2_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "ops/quant/ggml_blocks.h"
#include "tools/gpt2_tokenizer.h"
#include "trainer/gguf.h"
#include "trainer/gpt.h"

namespace qtrain {

struct GgufExportOptions {
  const Gpt2Tokenizer* tokenizer = nullptr;  // required: the model's vocabulary is GPT-2's
  // Block Linears whose scheme has no GGUF block type (and full-precision ones): F16 or F32.
  ops::GgmlType float_type = ops::GgmlType::kF16;
  // token_embd, position_embd and output (the tied head): F32 (exact) or F16.
  ops::GgmlType embedding_type = ops::GgmlType::kF32;
  std::string name;              // general.name
  std::string job_spec;          // stored as qtrain.job_spec (text format)
  std::string source_checkpoint; // stored as qtrain.source_checkpoint
};

// How one block Linear went into the file.
struct GgufLinearReport {
  std::string name;         // qtrain's, e.g. "block.0.attn.qkv"
  std::string tensor;       // GGUF's, e.g. "blk.0.attn_qkv.weight"
  ops::GgmlType type;
  bool from_codes = false;  // written from the learned codes and steps
  int64_t steps_rounded = 0;     // steps (or zero points) that fp16 could not hold exactly
  double max_step_rel_change = 0;
  std::string note;         // why it is F16/F32 and which scheme would map exactly
};

struct GgufExportReport {
  std::vector<GgufLinearReport> linears;
  uint32_t file_type = 0;  // general.file_type
};

// The GGUF block type of a QAT scheme, or nullopt-like false with `why` (which scheme would
// map exactly) for schemes GGUF has no block type for.
bool GgufBlockTypeOf(const LinearOptions& o, ops::GgmlType* type, std::string* why);

// Writes `model` (a GPT-2 BPE model: vocab_size 50257; n_embd a multiple of 32 for block types)
// to `path`. Padded vocabulary rows are dropped; Phi, when not decayed yet, is folded into the
// weight, whose codes then come from re-quantizing with the same steps (noted).
absl::StatusOr<GgufExportReport> WriteGgufGpt2(const std::string& path, Gpt* model,
                                               const GgufExportOptions& options);

// Builds a full-precision model from a GPT-2 GGUF file (general.architecture "gpt2") and loads
// its tensors dequantized (F32, F16, Q4_0, Q4_1, Q8_0). output.weight, when present, must equal
// token_embd (qtrain ties the head). Errors name the file and the key or tensor.
absl::StatusOr<std::unique_ptr<Gpt>> LoadGgufGpt2(const GgufFile& file, const std::string& path);

}  // namespace qtrain

#endif  // QTRAIN_TOOLS_GGUF_GPT2_H_
