// Brown tag stripping, paragraph handling, and the per-genre split (in process; the
// prepare_data binary has its own end-to-end test).
#include "tools/corpus.h"

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "trainer/shard.h"

namespace qtrain {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST(StripBrownTagsTest, StripsOnlyTheLastSlashPart) {
  EXPECT_EQ(StripBrownTags("The/at Fulton/np-tl County/nn-tl Grand/jj-tl Jury/nn-tl ./."),
            "The Fulton County Grand Jury .");
  // Words holding '/': fractions, and/or, a lone slash, a slash-delimited word.
  EXPECT_EQ(StripBrownTags("1-1/2/cd and/or/cc 2/4/cd //in /l//nn"), "1-1/2 and/or 2/4 / /l/");
  // Punctuation tokens whose word and tag are the same characters.
  EXPECT_EQ(StripBrownTags("``/`` no/at evidence/nn ''/'' ,/, (/( 1/cd )/) :/: --/--"),
            "`` no evidence '' , ( 1 ) : --");
  // Tags with '$', '+', '*' and '-' suffixes.
  EXPECT_EQ(StripBrownTags("Georgia's/np$ that's/dt+bez not/* hard-fought/jj Merger/nn-hl"),
            "Georgia's that's not hard-fought Merger");
}

TEST(StripBrownTagsTest, NormalizesWhitespaceAndKeepsUntaggedTokens) {
  EXPECT_EQ(StripBrownTags("\tThe/at   jury/nn \t said/vbd ./.\r"), "The jury said .");
  EXPECT_EQ(StripBrownTags("word /x a/"), "word /x a");
  EXPECT_EQ(StripBrownTags(""), "");
  EXPECT_EQ(StripBrownTags(" \t \r"), "");
}

TEST(BrownFileToTextTest, ParagraphsBecomeLinesOfWords) {
  const std::string raw =
      "\n\n\tThe/at jury/nn said/vbd ./.\n\n\n"
      "Merger/nn-hl proposed/vbn-hl \n"
      "However/wrb ,/, it/pps believes/vbz ./.\n"
      "It/pps urged/vbd ./.\n\n\n"
      "\tLast/ap one/cd ./.";  // no final newline
  EXPECT_EQ(BrownFileToText(raw),
            "The jury said .\n"
            "Merger proposed However , it believes . It urged .\n"
            "Last one .\n");
  EXPECT_EQ(BrownFileToText("\n\n \n"), "");
}

TEST(IsBrownFileNameTest, MatchesCorpusFilesOnly) {
  EXPECT_TRUE(IsBrownFileName("ca01"));
  EXPECT_TRUE(IsBrownFileName("cr09"));
  EXPECT_FALSE(IsBrownFileName("README"));
  EXPECT_FALSE(IsBrownFileName("cats.txt"));
  EXPECT_FALSE(IsBrownFileName("ca1"));
  EXPECT_FALSE(IsBrownFileName("ca011"));
  EXPECT_FALSE(IsBrownFileName("cA01"));
  EXPECT_FALSE(IsBrownFileName("da01"));
}

std::string FreshDir(const std::string& name) {
  const std::string dir = testing::TempDir() + "/corpus_test_" + name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

std::vector<SourceDocument> Docs(const std::vector<std::pair<std::string, std::string>>& v) {
  std::vector<SourceDocument> docs;
  for (const auto& [name, genre] : v) docs.push_back({name, genre, name + " text\n"});
  return docs;
}

TEST(WriteSplitShardsTest, SplitsByIndexWithinGenre) {
  const std::string dir = FreshDir("split");
  // Genre a: indices 0..4 -> val, train, val, train, val with val_every = 2. Genre b: 0 val,
  // 1 train. Genre c has one file: train, so training covers every genre.
  auto docs = Docs({{"a0", "a"}, {"a1", "a"}, {"a2", "a"}, {"a3", "a"}, {"a4", "a"},
                    {"b0", "b"}, {"b1", "b"}, {"c0", "c"}});
  absl::StatusOr<PrepareSummary> s = WriteSplitShards(docs, dir, 2);
  ASSERT_TRUE(s.ok()) << s.status();
  std::vector<std::string> splits;
  for (const IndexEntry& e : s->index) splits.push_back(e.file + ":" + e.split);
  EXPECT_THAT(splits, ElementsAre("a0:val", "a1:train", "a2:val", "a3:train", "a4:val",
                                  "b0:val", "b1:train", "c0:train"));
  EXPECT_THAT(s->shards_written, ElementsAre("train_a.bin", "train_b.bin", "train_c.bin",
                                             "val_a.bin", "val_b.bin", "mixed_train.bin",
                                             "mixed_val.bin"));
  EXPECT_EQ(s->genres["a"].val_files, 3);
  EXPECT_EQ(s->genres["a"].train_files, 2);
  // Each document: the end-of-text byte + "aN text\n" (8 bytes).
  EXPECT_EQ(s->genres["a"].val_tokens, 27);
  absl::StatusOr<std::vector<uint16_t>> val_a = ReadShard(dir + "/val_a.bin", 256);
  ASSERT_TRUE(val_a.ok()) << val_a.status();
  std::string expected = "\x03" "a0 text\n" "\x03" "a2 text\n" "\x03" "a4 text\n";
  EXPECT_EQ(std::string(val_a->begin(), val_a->end()), expected);
  // The mixed shards interleave genres document by document: a1 b1 c0 a3 / a0 b0 a2 a4.
  absl::StatusOr<std::vector<uint16_t>> mixed = ReadShard(dir + "/mixed_train.bin", 256);
  ASSERT_TRUE(mixed.ok()) << mixed.status();
  EXPECT_EQ(std::string(mixed->begin(), mixed->end()),
            "\x03" "a1 text\n" "\x03" "b1 text\n" "\x03" "c0 text\n" "\x03" "a3 text\n");
  mixed = ReadShard(dir + "/mixed_val.bin", 256);
  ASSERT_TRUE(mixed.ok()) << mixed.status();
  EXPECT_EQ(std::string(mixed->begin(), mixed->end()),
            "\x03" "a0 text\n" "\x03" "b0 text\n" "\x03" "a2 text\n" "\x03" "a4 text\n");
}

TEST(WriteSplitShardsTest, ValEveryZeroMeansNoValidation) {
  const std::string dir = FreshDir("noval");
  absl::StatusOr<PrepareSummary> s =
      WriteSplitShards(Docs({{"a0", "a"}, {"a1", "a"}}), dir, 0);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_THAT(s->shards_written, ElementsAre("train_a.bin", "mixed_train.bin"));
}

TEST(WriteSplitShardsTest, RemovesStaleShardsButNothingElse) {
  const std::string dir = FreshDir("stale");
  std::ofstream(dir + "/train_z.bin") << "old";
  std::ofstream(dir + "/val_q.bin") << "old";
  std::ofstream(dir + "/notes.txt") << "keep";
  absl::StatusOr<PrepareSummary> s = WriteSplitShards(Docs({{"a0", "a"}}), dir, 10);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_THAT(s->stale_removed, testing::UnorderedElementsAre("train_z.bin", "val_q.bin"));
  EXPECT_FALSE(std::filesystem::exists(dir + "/train_z.bin"));
  EXPECT_TRUE(std::filesystem::exists(dir + "/notes.txt"));
  EXPECT_TRUE(std::filesystem::exists(dir + "/train_a.bin"));
}

TEST(WriteSplitShardsTest, RejectsBadArguments) {
  const std::string dir = FreshDir("bad");
  EXPECT_EQ(WriteSplitShards(Docs({{"a0", "a"}}), dir, -1).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(WriteSplitShards({}, dir, 10).ok());
  absl::Status s = WriteSplitShards(Docs({{"x", "a/b"}}), dir, 10).status();
  EXPECT_THAT(std::string(s.message()), HasSubstr("'a/b'"));
}

TEST(LoadTest, ReportsMissingAndEmptyInputs) {
  absl::Status s = LoadBrownCorpus("/no/such/brown").status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()), HasSubstr("/no/such/brown"));
  const std::string empty = FreshDir("empty");
  std::ofstream(empty + "/README") << "not a corpus file";
  s = LoadBrownCorpus(empty).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()), HasSubstr(empty));
  s = LoadTextFiles({"/no/such/file.txt"}).status();
  EXPECT_THAT(std::string(s.message()), HasSubstr("/no/such/file.txt"));
}

}  // namespace
}  // namespace qtrain
