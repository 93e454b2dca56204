// Hugging Face GPT-2 import/export: the name and layout mapping, config.json checks.
#include "trainer/hf_gpt2.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "ops/quant/fp16.h"
#include "ops/status_macros.h"
#include "trainer/atomic_file.h"
#include "trainer/checkpoint.h"
#include "trainer/model_setup.h"
#include "trainer/safetensors.h"

namespace qtrain {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr char kPrefix[] = "transformer.";
constexpr double kLayerNormEps = 1e-5;  // ops/layernorm.cc

// One qtrain tensor and its Hugging Face counterpart.
struct Mapped {
  std::string hf;   // without the "transformer." prefix
  bool transpose;   // Conv1D [in, out] <-> qtrain Linear [out, in]
};

// The Hugging Face name of a qtrain tensor; NotFound for tensors GPT-2 does not have.
absl::StatusOr<Mapped> MapName(const std::string& q) {
  if (q == "wte") return Mapped{"wte.weight", false};
  if (q == "wpe") return Mapped{"wpe.weight", false};
  if (q == "lnf.weight") return Mapped{"ln_f.weight", false};
  if (q == "lnf.bias") return Mapped{"ln_f.bias", false};
  static const std::pair<const char*, const char*> kBlock[] = {
      {"ln1.", "ln_1."},          {"ln2.", "ln_2."},           {"attn.qkv.", "attn.c_attn."},
      {"attn.proj.", "attn.c_proj."}, {"mlp.fc.", "mlp.c_fc."}, {"mlp.proj.", "mlp.c_proj."}};
  if (absl::StartsWith(q, "block.")) {
    const size_t dot = q.find('.', 6);
    if (dot != std::string::npos) {
      const std::string layer = q.substr(6, dot - 6);
      const std::string rest = q.substr(dot + 1);
      for (const auto& [ours, theirs] : kBlock) {
        if (absl::StartsWith(rest, ours)) {
          const std::string leaf = rest.substr(std::strlen(ours));
          const bool linear = !absl::StartsWith(rest, "ln");
          return Mapped{absl::StrCat("h.", layer, ".", theirs, leaf), linear && leaf == "weight"};
        }
      }
    }
  }
  return absl::NotFoundError(absl::StrCat("qtrain tensor '", q, "' has no GPT-2 counterpart"));
}

std::string Shape(const std::vector<int64_t>& s) { return absl::StrCat("[", absl::StrJoin(s, ","), "]"); }

// Floats of an F32, F16 or BF16 tensor.
absl::Status ToFloats(const Tensor& t, const std::string& what, std::vector<float>* out) {
  const int64_t n = t.num_elements();
  out->resize(n);
  const char* b = t.bytes.data();
  if (t.dtype == "F32") {
    std::memcpy(out->data(), b, n * 4);
  } else if (t.dtype == "F16" || t.dtype == "BF16") {
    for (int64_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, b + 2 * i, 2);
      if (t.dtype == "F16") {
        (*out)[i] = ops::fp16_to_fp32(h);
      } else {
        const uint32_t u = static_cast<uint32_t>(h) << 16;
        std::memcpy(&(*out)[i], &u, 4);
      }
    }
  } else {
    return absl::FailedPreconditionError(
        absl::StrCat(what, " is ", t.dtype, "; qtrain reads F32, F16 and BF16 weights"));
  }
  return absl::OkStatus();
}

absl::Status Check(bool ok, const std::string& path, const std::string& msg) {
  return ok ? absl::OkStatus() : absl::FailedPreconditionError(absl::StrCat(path, ": ", msg));
}

// config.json properties that tensor shapes cannot show.
absl::Status CheckConfig(const HfGpt2Config& hf, const GptConfig& c, const std::string& path) {
  RETURN_IF_ERROR(Check(hf.n_layer == c.n_layer, path,
                        absl::StrCat("n_layer ", hf.n_layer, ", the job's model.n_layer is ", c.n_layer)));
  RETURN_IF_ERROR(Check(hf.n_head == c.n_head, path,
                        absl::StrCat("n_head ", hf.n_head, ", the job's model.n_head is ", c.n_head)));
  RETURN_IF_ERROR(Check(hf.activation_function == "gelu_new" ||
                            hf.activation_function == "gelu_pytorch_tanh" ||
                            hf.activation_function == "gelu_fast",
                        path,
                        absl::StrCat("activation_function '", hf.activation_function,
                                     "': qtrain's GELU is the tanh approximation (gelu_new, "
                                     "gelu_pytorch_tanh)")));
  RETURN_IF_ERROR(Check(std::abs(hf.layer_norm_epsilon - kLayerNormEps) <= 1e-12, path,
                        absl::StrCat("layer_norm_epsilon ", hf.layer_norm_epsilon,
                                     ", qtrain's layer norm uses 1e-05")));
  RETURN_IF_ERROR(Check(hf.tie_word_embeddings, path,
                        "tie_word_embeddings false: qtrain ties the LM head to wte"));
  RETURN_IF_ERROR(Check(hf.scale_attn_weights && !hf.scale_attn_by_inverse_layer_idx, path,
                        "attention scaling other than 1/sqrt(head size) "
                        "(scale_attn_weights false or scale_attn_by_inverse_layer_idx true)"));
  RETURN_IF_ERROR(Check(hf.n_inner == 0 || hf.n_inner == 4 * hf.n_embd, path,
                        absl::StrCat("n_inner ", hf.n_inner, ": qtrain's MLP is 4 * n_embd = ",
                                     4 * hf.n_embd)));
  return absl::OkStatus();
}

struct HfPaths {
  std::string safetensors, config;
};

HfPaths ResolvePaths(const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) return {path + "/model.safetensors", path + "/config.json"};
  return {path, (fs::path(path).parent_path() / "config.json").string()};
}

}  // namespace

absl::StatusOr<HfGpt2Config> ReadHfGpt2Config(const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return absl::DataLossError(absl::StrCat(path, ": not a JSON object"));
  HfGpt2Config c;
  if (j.contains("model_type") && j["model_type"] != "gpt2") {
    return absl::FailedPreconditionError(absl::StrCat(
        path, ": model_type '", j["model_type"].dump(), "', qtrain imports GPT-2 ('gpt2')"));
  }
  auto get_int = [&](const char* key, int* out, bool required) -> absl::Status {
    if (!j.contains(key) || j[key].is_null()) {
      return required ? absl::DataLossError(absl::StrCat(path, ": no '", key, "'"))
                      : absl::OkStatus();
    }
    if (!j[key].is_number_integer()) {
      return absl::DataLossError(absl::StrCat(path, ": '", key, "' is not an integer"));
    }
    *out = j[key].get<int>();
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(get_int("n_layer", &c.n_layer, true));
  RETURN_IF_ERROR(get_int("n_embd", &c.n_embd, true));
  RETURN_IF_ERROR(get_int("n_head", &c.n_head, true));
  RETURN_IF_ERROR(get_int("n_positions", &c.n_positions, true));
  RETURN_IF_ERROR(get_int("vocab_size", &c.vocab_size, true));
  RETURN_IF_ERROR(get_int("n_inner", &c.n_inner, false));
  if (j.contains("layer_norm_epsilon")) {
    if (!j["layer_norm_epsilon"].is_number()) {
      return absl::DataLossError(absl::StrCat(path, ": 'layer_norm_epsilon' is not a number"));
    }
    c.layer_norm_epsilon = j["layer_norm_epsilon"].get<double>();
  }
  auto get_bool = [&](const char* key, bool* out) {
    if (j.contains(key) && j[key].is_boolean()) *out = j[key].get<bool>();
  };
  get_bool("tie_word_embeddings", &c.tie_word_embeddings);
  get_bool("scale_attn_weights", &c.scale_attn_weights);
  get_bool("scale_attn_by_inverse_layer_idx", &c.scale_attn_by_inverse_layer_idx);
  if (j.contains("activation_function") && j["activation_function"].is_string()) {
    c.activation_function = j["activation_function"].get<std::string>();
  }
  return c;
}

bool IsHfGpt2Checkpoint(const std::string& path) {
  std::error_code ec;
  if (fs::is_directory(path, ec)) return fs::exists(fs::path(path) / "config.json", ec);
  if (!fs::exists(fs::path(path).parent_path() / "config.json", ec)) return false;
  // Only the header: the 8-byte length, then the JSON with "__metadata__".
  std::ifstream in(path, std::ios::binary);
  uint64_t n = 0;
  if (!in.read(reinterpret_cast<char*>(&n), 8) || n == 0 || n > (100u << 20)) return false;
  std::string header(n, '\0');
  if (!in.read(header.data(), static_cast<std::streamsize>(n))) return false;
  json j = json::parse(header, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) return false;
  if (!j.contains("__metadata__") || !j["__metadata__"].contains("format")) return true;
  const json& f = j["__metadata__"]["format"];
  return !f.is_string() || !absl::StartsWith(f.get<std::string>(), "qtrain-");
}

absl::StatusOr<int> LoadHfGpt2(const std::string& path, const GptConfig& config,
                               ParamStore* params) {
  const HfPaths p = ResolvePaths(path);
  ASSIGN_OR_RETURN(HfGpt2Config hf, ReadHfGpt2Config(p.config));
  ASSIGN_OR_RETURN(SafeTensors st, ReadSafeTensors(p.safetensors));
  // Names without the prefix (GPT2Model files have none, GPT2LMHeadModel files have it).
  std::map<std::string, const Tensor*> by_name;
  std::map<std::string, std::string> full_name;
  for (const auto& [name, t] : st.tensors) {
    std::string key = absl::StartsWith(name, kPrefix) ? name.substr(std::strlen(kPrefix)) : name;
    if (!by_name.emplace(key, &t).second) {
      return absl::DataLossError(absl::StrCat(p.safetensors, ": tensor '", key,
                                              "' is there with and without 'transformer.'"));
    }
    full_name[key] = name;
  }
  const std::string hint =
      absl::StrCat(" (", p.config, ": n_layer ", hf.n_layer, ", n_embd ", hf.n_embd,
                   ", n_positions ", hf.n_positions, ", vocab_size ", hf.vocab_size,
                   "; the job's model: n_layer ", config.n_layer, ", n_embd ", config.n_embd,
                   ", max_seq_len ", config.max_seq_len, ", vocab_size ", config.vocab_size, ")");
  std::set<std::string> used;
  std::vector<float> vals;
  int loaded = 0;
  for (int i = 0; i < params->size(); ++i) {
    const ParamInfo& info = params->info(i);
    if (IsQuantizerParam(info.name)) continue;
    ASSIGN_OR_RETURN(Mapped m, MapName(info.name));
    auto it = by_name.find(m.hf);
    if (it == by_name.end()) {
      return absl::FailedPreconditionError(absl::StrCat(
          p.safetensors, ": no tensor '", kPrefix, m.hf, "' (or '", m.hf, "') for qtrain's '",
          info.name, "'", hint));
    }
    const Tensor& t = *it->second;
    const std::string what = absl::StrCat(p.safetensors, ": tensor '", full_name[m.hf], "'");
    // The shape the file must have for this model.
    std::vector<int64_t> want = info.shape;
    if (m.transpose) std::swap(want[0], want[1]);
    if (info.name == "wte") want[0] = config.vocab_size;
    bool fits = t.shape == want;
    if (info.name == "wpe") fits = t.shape.size() == 2 && t.shape[1] == want[1] && t.shape[0] >= want[0];
    if (!fits) {
      std::string need = Shape(want);
      if (info.name == "wpe") need = absl::StrCat("[>=", want[0], ",", want[1], "]");
      return absl::FailedPreconditionError(absl::StrCat(
          what, " has shape ", Shape(t.shape), ", the job's model needs ", need,
          m.transpose ? absl::StrCat(" (Hugging Face's Conv1D stores [in, out]; qtrain's '",
                                     info.name, "' is its transpose ", Shape(info.shape), ")")
                      : std::string(),
          hint));
    }
    RETURN_IF_ERROR(ToFloats(t, what, &vals));
    float* dst = params->param(i);
    if (m.transpose) {
      const int64_t rows = info.shape[0], cols = info.shape[1];  // qtrain [out, in]
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = vals[c * rows + r];
    } else {
      // wte: the file's rows are the real vocabulary; wpe: its first max_seq_len rows.
      const int64_t n = info.name == "wte"
                            ? static_cast<int64_t>(config.vocab_size) * info.shape[1]
                            : info.size;
      std::copy(vals.begin(), vals.begin() + n, dst);
      std::fill(dst + n, dst + info.size, 0.0f);  // wte's padded rows
    }
    used.insert(m.hf);
    ++loaded;
  }
  // What the file holds beyond qtrain's tensors must be GPT-2's leftovers.
  for (const auto& [key, t] : by_name) {
    if (used.count(key)) continue;
    const bool mask_buffer = absl::StartsWith(key, "h.") &&
                             (absl::EndsWith(key, ".attn.bias") || absl::EndsWith(key, ".attn.masked_bias"));
    if (mask_buffer) continue;
    if (key == "lm_head.weight") {
      // Saved untied by some writers; it must then be wte itself.
      const std::string what = absl::StrCat(p.safetensors, ": tensor '", full_name[key], "'");
      RETURN_IF_ERROR(ToFloats(*t, what, &vals));
      ASSIGN_OR_RETURN(int wte, params->Find("wte"));
      const int64_t n = static_cast<int64_t>(config.vocab_size) * config.n_embd;
      if (static_cast<int64_t>(vals.size()) != n ||
          !std::equal(vals.begin(), vals.end(), params->param(wte))) {
        return absl::FailedPreconditionError(absl::StrCat(
            what, " differs from wte: an untied LM head; qtrain ties the head to wte"));
      }
      continue;
    }
    return absl::FailedPreconditionError(
        absl::StrCat(p.safetensors, ": tensor '", full_name[key],
                     "' is not part of a GPT-2 model of this shape", hint));
  }
  RETURN_IF_ERROR(CheckConfig(hf, config, p.config));
  return loaded;
}

absl::StatusOr<int> LoadInitialWeights(
    const std::string& path, const GptConfig& config, ParamStore* params,
    const std::function<bool(const std::string&)>& may_be_missing) {
  if (IsHfGpt2Checkpoint(path)) return LoadHfGpt2(path, config, params);
  return LoadWeights(path, params, may_be_missing);
}

absl::Status WriteHfGpt2(const std::string& dir, Gpt* model,
                         const std::map<std::string, std::string>& metadata) {
  const GptConfig& c = model->config();
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
  ParamStore& ps = model->params();
  // The weights the forward uses, by parameter index (QAT: Q(W) with Phi folded in).
  std::map<int, std::vector<float>> effective;
  for (Linear* lin : model->linears()) {
    RETURN_IF_ERROR(lin->EffectiveWeight(&effective[lin->weight_index()], /*fold_phi=*/true));
  }
  std::vector<std::vector<float>> storage;
  storage.reserve(ps.size());
  std::vector<TensorView> views;
  for (int i = 0; i < ps.size(); ++i) {
    const ParamInfo& info = ps.info(i);
    if (IsQuantizerParam(info.name)) continue;
    ASSIGN_OR_RETURN(Mapped m, MapName(info.name));
    const float* src = effective.count(i) ? effective[i].data() : ps.param(i);
    std::vector<int64_t> shape = info.shape;
    std::vector<float> out;
    if (m.transpose) {
      const int64_t rows = shape[0], cols = shape[1];
      out.resize(info.size);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t col = 0; col < cols; ++col) out[col * rows + r] = src[r * cols + col];
      std::swap(shape[0], shape[1]);
    } else if (info.name == "wte") {
      shape[0] = c.vocab_size;  // the padded rows stay behind
      out.assign(src, src + static_cast<int64_t>(c.vocab_size) * c.n_embd);
    } else {
      out.assign(src, src + info.size);
    }
    storage.push_back(std::move(out));
    views.push_back({kPrefix + m.hf, "F32", shape, storage.back().data(),
                     storage.back().size() * sizeof(float)});
  }
  std::map<std::string, std::string> meta = metadata;
  meta["format"] = "pt";
  RETURN_IF_ERROR(WriteSafeTensors(dir + "/model.safetensors", views, meta));

  json cfg = {
      {"architectures", {"GPT2LMHeadModel"}},
      {"model_type", "gpt2"},
      {"activation_function", "gelu_new"},
      {"attn_pdrop", 0.0},
      {"embd_pdrop", 0.0},
      {"resid_pdrop", 0.0},
      {"initializer_range", 0.02},
      {"layer_norm_epsilon", kLayerNormEps},
      {"n_ctx", c.max_seq_len},
      {"n_positions", c.max_seq_len},
      {"n_embd", c.n_embd},
      {"n_head", c.n_head},
      {"n_inner", nullptr},
      {"n_layer", c.n_layer},
      {"scale_attn_weights", true},
      {"scale_attn_by_inverse_layer_idx", false},
      {"reorder_and_upcast_attn", false},
      {"tie_word_embeddings", true},
      {"torch_dtype", "float32"},
      {"use_cache", true},
      {"vocab_size", c.vocab_size},
  };
  if (c.vocab_size == 50257) {  // GPT-2's BPE: <|endoftext|> begins and ends texts
    cfg["bos_token_id"] = 50256;
    cfg["eos_token_id"] = 50256;
  }
  return WriteFileAtomically(dir + "/config.json", {cfg.dump(2) + "\n"});
}

}  // namespace qtrain
