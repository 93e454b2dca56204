// GPT-2 <-> GGUF: names, metadata, tokenizer, block Linears from codes, and the reader.
#include "tools/gguf_gpt2.h"

#include <cmath>
#include <cstring>
#include <map>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "ops/quant/fp16.h"
#include "ops/status_macros.h"
#include "trainer/model_setup.h"

namespace qtrain {
namespace {

constexpr double kLayerNormEps = 1e-5;  // ops/layernorm.cc
constexpr int32_t kTokenNormal = 1, kTokenControl = 3;  // llama.cpp's token types

// qtrain tensor name -> GGUF tensor name (llama.cpp's GPT-2 names); "" when it has none.
std::string GgufName(const std::string& q) {
  if (q == "wte") return "token_embd.weight";
  if (q == "wpe") return "position_embd.weight";
  if (q == "lnf.weight") return "output_norm.weight";
  if (q == "lnf.bias") return "output_norm.bias";
  static const std::pair<const char*, const char*> kParts[] = {
      {"ln1.", "attn_norm."},      {"ln2.", "ffn_norm."},   {"attn.qkv.", "attn_qkv."},
      {"attn.proj.", "attn_output."}, {"mlp.fc.", "ffn_up."}, {"mlp.proj.", "ffn_down."}};
  if (!absl::StartsWith(q, "block.")) return "";
  const size_t dot = q.find('.', 6);
  if (dot == std::string::npos) return "";
  const std::string rest = q.substr(dot + 1);
  for (const auto& [ours, theirs] : kParts) {
    if (absl::StartsWith(rest, ours)) {
      return absl::StrCat("blk.", q.substr(6, dot - 6), ".", theirs, rest.substr(std::strlen(ours)));
    }
  }
  return "";
}

// GGUF dims of a qtrain row-major tensor: the fastest-varying first.
std::vector<int64_t> Ne(std::vector<int64_t> shape) { return {shape.rbegin(), shape.rend()}; }

absl::StatusOr<std::string> FloatBytes(const float* v, int64_t n, ops::GgmlType type) {
  std::string out;
  if (type == ops::GgmlType::kF32) {
    out.assign(reinterpret_cast<const char*>(v), n * sizeof(float));
  } else if (type == ops::GgmlType::kF16) {
    out.resize(n * 2);
    for (int64_t i = 0; i < n; ++i) {
      const uint16_t h = ops::fp32_to_fp16(v[i]);
      std::memcpy(&out[2 * i], &h, 2);
    }
  } else {
    return absl::InvalidArgumentError("float tensors are F32 or F16");
  }
  return out;
}

std::string SchemeName(const LinearOptions& o) {
  const QatOptions& q = o.qat;
  const std::string gran =
      q.weight_granularity == ops::QuantGranularity::kPerGroup
          ? absl::StrCat("per group of ", q.group_size)
          : q.weight_granularity == ops::QuantGranularity::kPerChannel ? "per channel" : "per tensor";
  return absl::StrCat(q.weight_bits, "-bit ", q.weight_asymmetric ? "asymmetric (LSQ+)" : "symmetric",
                      " ", gran);
}

// The block Linear's tensor from its codes and steps: d (and m) as fp16 bits per block.
absl::StatusOr<std::string> BlocksFromCodes(Linear* lin, ops::GgmlType type,
                                            GgufLinearReport* report) {
  std::vector<int32_t> codes;
  RETURN_IF_ERROR(lin->WeightCodes(&codes, /*fold_phi=*/lin->phi_rank() > 0));
  std::vector<float> steps, zeros;
  RETURN_IF_ERROR(lin->WeightSteps(&steps, &zeros));
  const int64_t OC = lin->out_features(), C = lin->in_features();
  if (static_cast<int64_t>(steps.size()) != OC * C / ops::kGgmlBlock) {
    return absl::InternalError(absl::StrCat(lin->name(), ": ", steps.size(), " steps for ", OC,
                                            "x", C, " weights in blocks of 32"));
  }
  std::vector<uint16_t> d(steps.size()), m(zeros.size());
  auto to_half = [&](float x, uint16_t* h) {
    *h = ops::fp32_to_fp16(x);
    const float back = ops::fp16_to_fp32(*h);
    if (back != x) {
      ++report->steps_rounded;
      report->max_step_rel_change =
          std::max(report->max_step_rel_change,
                   static_cast<double>(std::abs(back - x) / std::max(std::abs(x), 1e-30f)));
    }
  };
  for (size_t i = 0; i < steps.size(); ++i) to_half(steps[i], &d[i]);
  for (size_t i = 0; i < zeros.size(); ++i) to_half(zeros[i], &m[i]);
  ASSIGN_OR_RETURN(int64_t row_bytes, ops::ggml_row_bytes(type, C));
  std::string out(OC * row_bytes, '\0');
  uint8_t* p = reinterpret_cast<uint8_t*>(out.data());
  const int64_t n = OC * C;
  switch (type) {
    case ops::GgmlType::kQ4_0:
      RETURN_IF_ERROR(ops::ggml_pack_q4_0(p, codes.data(), d.data(), n));
      break;
    case ops::GgmlType::kQ8_0:
      RETURN_IF_ERROR(ops::ggml_pack_q8_0(p, codes.data(), d.data(), n));
      break;
    case ops::GgmlType::kQ4_1:
      RETURN_IF_ERROR(ops::ggml_pack_q4_1(p, codes.data(), d.data(), m.data(), n));
      break;
    default:
      return absl::InternalError("not a block type");
  }
  return out;
}

}  // namespace

bool GgufBlockTypeOf(const LinearOptions& o, ops::GgmlType* type, std::string* why) {
  if (o.mode != LinearMode::kQat) {
    *why = "a full-precision Linear";
    return false;
  }
  const QatOptions& q = o.qat;
  const bool g32 = q.weight_granularity == ops::QuantGranularity::kPerGroup && q.group_size == 32;
  if (g32 && !q.weight_asymmetric && q.weight_bits == 4) {
    *type = ops::GgmlType::kQ4_0;
    return true;
  }
  if (g32 && !q.weight_asymmetric && q.weight_bits == 8) {
    *type = ops::GgmlType::kQ8_0;
    return true;
  }
  if (g32 && q.weight_asymmetric && q.weight_bits == 4) {
    *type = ops::GgmlType::kQ4_1;
    return true;
  }
  // Which QAT scheme would map exactly.
  std::string hint;
  if (q.weight_bits == 8 && q.weight_asymmetric) {
    hint = "no GGUF block holds 8-bit codes with a zero point; 8-bit symmetric (Q8_0) or LSQ+ "
           "4-bit (Q4_1) per group of 32 would map exactly";
  } else if (q.weight_bits == 4 || q.weight_bits == 8) {
    hint = absl::StrCat("weight_granularity: PER_GROUP group_size: 32 would map exactly (",
                        q.weight_bits == 8 ? "Q8_0" : q.weight_asymmetric ? "Q4_1" : "Q4_0", ")");
  } else {
    hint = absl::StrCat("GGUF has no ", q.weight_bits,
                        "-bit block with one fp16 scale per 32 weights (its K-quants quantize "
                        "their scales too); 4-bit symmetric per group of 32 would map exactly "
                        "(Q4_0), as would LSQ+ 4-bit (Q4_1) and 8-bit symmetric (Q8_0)");
  }
  *why = absl::StrCat(SchemeName(o), " has no GGUF block type; ", hint);
  return false;
}

absl::StatusOr<GgufExportReport> WriteGgufGpt2(const std::string& path, Gpt* model,
                                               const GgufExportOptions& opt) {
  const GptConfig& c = model->config();
  QT_CHECK_ARG(opt.tokenizer != nullptr, "GGUF export needs GPT-2's tokenizer files");
  if (c.vocab_size != Gpt2Tokenizer::kVocabSize) {
    return absl::FailedPreconditionError(absl::StrCat(
        "GGUF export writes GPT-2's BPE tokenizer; the model's vocab_size is ", c.vocab_size,
        ", GPT-2's is ", Gpt2Tokenizer::kVocabSize, " (prepare data with --tokenizer=gpt2)"));
  }
  GgufExportReport report;
  GgufWriter w;
  w.Add("general.architecture", GgufValue::String("gpt2"));
  w.Add("general.name", GgufValue::String(opt.name.empty() ? "qtrain-gpt2" : opt.name));
  w.Add("gpt2.context_length", GgufValue::U32(c.max_seq_len));
  w.Add("gpt2.embedding_length", GgufValue::U32(c.n_embd));
  w.Add("gpt2.feed_forward_length", GgufValue::U32(4 * c.n_embd));
  w.Add("gpt2.block_count", GgufValue::U32(c.n_layer));
  w.Add("gpt2.attention.head_count", GgufValue::U32(c.n_head));
  w.Add("gpt2.attention.layer_norm_epsilon", GgufValue::F32(static_cast<float>(kLayerNormEps)));

  // Block Linears first, to know the file type.
  std::map<int, std::pair<ops::GgmlType, std::string>> linear_data;  // by weight index
  std::map<ops::GgmlType, int> counts;
  for (Linear* lin : model->linears()) {
    GgufLinearReport r;
    r.name = lin->name();
    r.tensor = GgufName(lin->name() + ".weight");
    ops::GgmlType type;
    std::string why;
    std::string bytes;
    if (GgufBlockTypeOf(lin->options(), &type, &why)) {
      r.type = type;
      r.from_codes = true;
      ASSIGN_OR_RETURN(bytes, BlocksFromCodes(lin, type, &r));
      if (lin->phi_rank() > 0) {
        r.note = "Phi (rank > 0) folded in and re-quantized with the learned steps";
      }
    } else {
      r.type = opt.float_type;
      r.note = why;
      std::vector<float> wq;
      RETURN_IF_ERROR(lin->EffectiveWeight(&wq, /*fold_phi=*/true));
      ASSIGN_OR_RETURN(bytes, FloatBytes(wq.data(), static_cast<int64_t>(wq.size()), r.type));
    }
    ++counts[r.type];
    linear_data[lin->weight_index()] = {r.type, std::move(bytes)};
    report.linears.push_back(r);
  }
  // general.file_type: llama.cpp's "mostly <type>" of the Linears.
  ops::GgmlType major = opt.float_type;
  int best = -1;
  for (const auto& [t, n] : counts) {
    if (n > best) {
      best = n;
      major = t;
    }
  }
  switch (major) {
    case ops::GgmlType::kF32: report.file_type = 0; break;
    case ops::GgmlType::kF16: report.file_type = 1; break;
    case ops::GgmlType::kQ4_0: report.file_type = 2; break;
    case ops::GgmlType::kQ4_1: report.file_type = 3; break;
    case ops::GgmlType::kQ8_0: report.file_type = 7; break;
  }
  w.Add("general.file_type", GgufValue::U32(report.file_type));
  if (report.file_type >= 2) w.Add("general.quantization_version", GgufValue::U32(2));

  const Gpt2Tokenizer& tok = *opt.tokenizer;
  std::vector<int32_t> types(Gpt2Tokenizer::kVocabSize, kTokenNormal);
  types[Gpt2Tokenizer::kEndOfText] = kTokenControl;
  w.Add("tokenizer.ggml.model", GgufValue::String("gpt2"));
  w.Add("tokenizer.ggml.pre", GgufValue::String("gpt-2"));
  w.Add("tokenizer.ggml.tokens", GgufValue::Strings(tok.token_strings()));
  w.Add("tokenizer.ggml.token_type", GgufValue::I32s(types));
  w.Add("tokenizer.ggml.merges", GgufValue::Strings(tok.merges()));
  w.Add("tokenizer.ggml.bos_token_id", GgufValue::U32(Gpt2Tokenizer::kEndOfText));
  w.Add("tokenizer.ggml.eos_token_id", GgufValue::U32(Gpt2Tokenizer::kEndOfText));
  // Training documents start with <|endoftext|>: a prompt should too.
  w.Add("tokenizer.ggml.add_bos_token", GgufValue::Bool(true));
  if (!opt.job_spec.empty()) w.Add("qtrain.job_spec", GgufValue::String(opt.job_spec));
  if (!opt.source_checkpoint.empty()) {
    w.Add("qtrain.source_checkpoint", GgufValue::String(opt.source_checkpoint));
  }

  ParamStore& ps = model->params();
  const int64_t vc = static_cast<int64_t>(c.vocab_size) * c.n_embd;
  for (int i = 0; i < ps.size(); ++i) {
    const ParamInfo& info = ps.info(i);
    if (IsQuantizerParam(info.name)) continue;
    const std::string name = GgufName(info.name);
    if (name.empty()) {
      return absl::InternalError(absl::StrCat("no GGUF name for qtrain tensor '", info.name, "'"));
    }
    if (auto it = linear_data.find(i); it != linear_data.end()) {
      RETURN_IF_ERROR(w.AddTensor(name, Ne(info.shape), it->second.first,
                                  std::move(it->second.second)));
      continue;
    }
    if (info.name == "wte") {
      // Without the padded rows; llama.cpp's GPT-2 wants output.weight too: the tied head.
      ASSIGN_OR_RETURN(std::string bytes, FloatBytes(ps.param(i), vc, opt.embedding_type));
      RETURN_IF_ERROR(w.AddTensor(name, {c.n_embd, c.vocab_size}, opt.embedding_type, bytes));
      RETURN_IF_ERROR(w.AddTensor("output.weight", {c.n_embd, c.vocab_size}, opt.embedding_type,
                                  std::move(bytes)));
      continue;
    }
    const ops::GgmlType type = info.name == "wpe" ? opt.embedding_type : ops::GgmlType::kF32;
    ASSIGN_OR_RETURN(std::string bytes, FloatBytes(ps.param(i), info.size, type));
    RETURN_IF_ERROR(w.AddTensor(name, Ne(info.shape), type, std::move(bytes)));
  }
  RETURN_IF_ERROR(w.Write(path));
  return report;
}

absl::StatusOr<std::unique_ptr<Gpt>> LoadGgufGpt2(const GgufFile& f, const std::string& path) {
  ASSIGN_OR_RETURN(std::string arch, f.GetString("general.architecture", path));
  if (arch != "gpt2") {
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": general.architecture '", arch, "', qtrain reads 'gpt2'"));
  }
  GptConfig c;
  ASSIGN_OR_RETURN(int64_t layers, f.GetInt("gpt2.block_count", path));
  ASSIGN_OR_RETURN(int64_t embd, f.GetInt("gpt2.embedding_length", path));
  ASSIGN_OR_RETURN(int64_t heads, f.GetInt("gpt2.attention.head_count", path));
  ASSIGN_OR_RETURN(int64_t ctx, f.GetInt("gpt2.context_length", path));
  c.n_layer = static_cast<int>(layers);
  c.n_embd = static_cast<int>(embd);
  c.n_head = static_cast<int>(heads);
  c.max_seq_len = static_cast<int>(ctx);
  if (f.Find("gpt2.feed_forward_length")) {
    ASSIGN_OR_RETURN(int64_t ff, f.GetInt("gpt2.feed_forward_length", path));
    if (ff != 4 * embd) {
      return absl::FailedPreconditionError(absl::StrCat(
          path, ": gpt2.feed_forward_length ", ff, ", qtrain's MLP is 4 * n_embd = ", 4 * embd));
    }
  }
  ASSIGN_OR_RETURN(double eps, f.GetFloat("gpt2.attention.layer_norm_epsilon", path));
  if (std::abs(eps - kLayerNormEps) > 1e-9) {
    return absl::FailedPreconditionError(absl::StrCat(
        path, ": gpt2.attention.layer_norm_epsilon ", eps, ", qtrain's layer norm uses 1e-05"));
  }
  const GgufTensorInfo* te = f.FindTensor("token_embd.weight");
  if (te == nullptr || te->ne.size() != 2 || te->ne[0] != embd) {
    return absl::DataLossError(absl::StrCat(path, ": no 2-D tensor 'token_embd.weight' with ",
                                            embd, " columns"));
  }
  c.vocab_size = static_cast<int>(te->ne[1]);
  ASSIGN_OR_RETURN(std::unique_ptr<Gpt> model, Gpt::Create(c));
  ParamStore& ps = model->params();
  std::set<std::string> used;
  for (int i = 0; i < ps.size(); ++i) {
    const ParamInfo& info = ps.info(i);
    const std::string name = GgufName(info.name);
    const GgufTensorInfo* t = f.FindTensor(name);
    if (t == nullptr) {
      return absl::DataLossError(absl::StrCat(path, ": no tensor '", name, "' (qtrain's '",
                                              info.name, "')"));
    }
    if (t->ne != Ne(info.shape)) {
      return absl::DataLossError(absl::StrCat(path, ": tensor '", name, "' has dims [",
                                              absl::StrJoin(t->ne, ","), "], expected [",
                                              absl::StrJoin(Ne(info.shape), ","), "]"));
    }
    RETURN_IF_ERROR(ops::ggml_dequantize(static_cast<ops::GgmlType>(t->type),
                                         reinterpret_cast<const uint8_t*>(f.TensorData(*t)),
                                         ps.param(i), info.size));
    used.insert(name);
  }
  if (const GgufTensorInfo* out = f.FindTensor("output.weight")) {
    std::vector<float> head(te->ne[0] * te->ne[1]);
    if (out->ne != te->ne) {
      return absl::DataLossError(absl::StrCat(path, ": output.weight dims differ from token_embd's"));
    }
    RETURN_IF_ERROR(ops::ggml_dequantize(static_cast<ops::GgmlType>(out->type),
                                         reinterpret_cast<const uint8_t*>(f.TensorData(*out)),
                                         head.data(), static_cast<int64_t>(head.size())));
    ASSIGN_OR_RETURN(int wte, ps.Find("wte"));
    if (!std::equal(head.begin(), head.end(), ps.param(wte))) {
      return absl::FailedPreconditionError(absl::StrCat(
          path, ": output.weight differs from token_embd.weight; qtrain ties the LM head to "
                "the token embedding"));
    }
    used.insert("output.weight");
  }
  for (const GgufTensorInfo& t : f.tensors) {
    if (!used.count(t.name)) {
      return absl::DataLossError(absl::StrCat(path, ": tensor '", t.name,
                                              "' is not part of qtrain's GPT-2"));
    }
  }
  return model;
}

}  // namespace qtrain
