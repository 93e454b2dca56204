// logits: the model's logits for one token sequence, from a qtrain checkpoint, a Hugging Face
// GPT-2 folder (config.json + model.safetensors) or a GGUF file, written as a safetensors file
// ("logits": F32 [T, vocab_size], "tokens": I32 [T]). The GPU-machine interop check
// (tools/reference/hf_interop_check.sh) compares them with transformers'.

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "ops/status_macros.h"
#include "tools/gguf_gpt2.h"
#include "trainer/cli.h"
#include "trainer/gguf.h"
#include "trainer/hf_gpt2.h"
#include "trainer/model_setup.h"
#include "trainer/safetensors.h"

ABSL_FLAG(std::string, model, "",
          "a qtrain checkpoint, a Hugging Face GPT-2 folder (or its model.safetensors), or GGUF");
ABSL_FLAG(std::vector<std::string>, tokens, {}, "comma-separated token ids");
ABSL_FLAG(std::string, out, "", "safetensors file for the logits");

namespace qtrain {
namespace {

absl::StatusOr<std::unique_ptr<Gpt>> LoadAnyModel(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  if (in.read(magic, 4) && std::string(magic, 4) == "GGUF") {
    ASSIGN_OR_RETURN(GgufFile f, ReadGguf(path));
    return LoadGgufGpt2(f, path);
  }
  if (IsHfGpt2Checkpoint(path)) {
    const std::string dir =
        std::filesystem::is_directory(path) ? path : std::filesystem::path(path).parent_path().string();
    ASSIGN_OR_RETURN(HfGpt2Config hf, ReadHfGpt2Config(dir + "/config.json"));
    GptConfig c;
    c.n_layer = hf.n_layer;
    c.n_embd = hf.n_embd;
    c.n_head = hf.n_head;
    c.vocab_size = hf.vocab_size;
    c.max_seq_len = hf.n_positions;
    ASSIGN_OR_RETURN(std::unique_ptr<Gpt> m, Gpt::Create(c));
    ASSIGN_OR_RETURN(int loaded, LoadHfGpt2(path, c, &m->params()));
    (void)loaded;
    return m;
  }
  ASSIGN_OR_RETURN(JobSpec spec, JobSpecFromCheckpoint(path));
  return LoadModelForEval(spec, path);
}

absl::Status Run() {
  std::vector<int32_t> ids;
  for (const std::string& s : absl::GetFlag(FLAGS_tokens)) {
    int32_t v;
    if (!absl::SimpleAtoi(s, &v)) {
      return absl::InvalidArgumentError(absl::StrCat("--tokens: '", s, "' is not an integer"));
    }
    ids.push_back(v);
  }
  if (ids.empty() || absl::GetFlag(FLAGS_model).empty() || absl::GetFlag(FLAGS_out).empty()) {
    return absl::InvalidArgumentError("--model, --tokens and --out are required");
  }
  ASSIGN_OR_RETURN(std::unique_ptr<Gpt> model, LoadAnyModel(absl::GetFlag(FLAGS_model)));
  const int T = static_cast<int>(ids.size());
  ASSIGN_OR_RETURN(double unused, model->Forward(ids.data(), nullptr, 1, T));
  (void)unused;
  std::vector<float> logits;
  model->Logits(&logits);
  const int64_t V = model->config().vocab_size;
  RETURN_IF_ERROR(WriteSafeTensors(
      absl::GetFlag(FLAGS_out),
      {{"logits", "F32", {T, V}, logits.data(), logits.size() * sizeof(float)},
       {"tokens", "I32", {T}, ids.data(), ids.size() * sizeof(int32_t)}},
      {{"model", absl::GetFlag(FLAGS_model)}}));
  std::printf("wrote logits [%d, %lld] of %s to %s\n", T, static_cast<long long>(V),
              absl::GetFlag(FLAGS_model).c_str(), absl::GetFlag(FLAGS_out).c_str());
  return absl::OkStatus();
}

}  // namespace
}  // namespace qtrain

int main(int argc, char** argv) {
  std::vector<char*> rest = qtrain::InitCommandLine(
      argc, argv,
      "logits --model=PATH --tokens=15496,995 --out=logits.safetensors",
      __FILE__);
  if (rest.size() > 1) {
    std::fprintf(stderr, "logits: error: unexpected argument '%s'\n", rest[1]);
    return 2;
  }
  absl::Status s = qtrain::Run();
  if (!s.ok()) {
    std::fprintf(stderr, "logits: error: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
