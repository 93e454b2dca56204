// Shard format: round trip, and every kind of damaged file rejected with the path named.
#include "trainer/shard.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qtrain {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

std::string TempPath(const std::string& name) {
  const std::string dir = testing::TempDir() + "/shard_test";
  std::filesystem::create_directories(dir);
  return dir + "/" + name;
}

std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

// A well-formed shard's bytes, for tests that then damage them.
std::string GoodShardBytes(const std::string& path, const std::vector<uint16_t>& tokens) {
  EXPECT_TRUE(WriteShard(path, tokens).ok());
  return ReadBytes(path);
}

void SetHeaderInt(std::string* bytes, int index, int32_t value) {
  std::memcpy(bytes->data() + index * sizeof(int32_t), &value, sizeof(value));
}

TEST(ShardTest, RoundTripKeepsTokensAndWritesLlmcHeader) {
  const std::string path = TempPath("round_trip.bin");
  std::vector<uint16_t> tokens = {0, 1, 255, 256, 65535, 3, 42};
  ASSERT_TRUE(WriteShard(path, tokens).ok());

  const std::string bytes = ReadBytes(path);
  ASSERT_EQ(bytes.size(), 1024u + 2 * tokens.size());
  int32_t header[3];
  std::memcpy(header, bytes.data(), sizeof(header));
  EXPECT_EQ(header[0], 20240520);
  EXPECT_EQ(header[1], 1);
  EXPECT_EQ(header[2], 7);
  for (int i = 3; i < 256; ++i) {
    int32_t v;
    std::memcpy(&v, bytes.data() + 4 * i, 4);
    EXPECT_EQ(v, 0) << "header int " << i;
  }

  absl::StatusOr<std::vector<uint16_t>> read = ReadShard(path);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(*read, tokens);
}

TEST(ShardTest, EmptyShardRoundTrips) {
  const std::string path = TempPath("empty.bin");
  ASSERT_TRUE(WriteShard(path, {}).ok());
  absl::StatusOr<std::vector<uint16_t>> read = ReadShard(path, 256);
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_TRUE(read->empty());
}

TEST(ShardTest, OverwriteReplacesAndLeavesNoTemporaryFiles) {
  const std::string dir = testing::TempDir() + "/shard_test_overwrite";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  const std::string path = dir + "/s.bin";
  ASSERT_TRUE(WriteShard(path, std::vector<uint16_t>(1000, 7)).ok());
  ASSERT_TRUE(WriteShard(path, {1, 2, 3}).ok());
  EXPECT_EQ(*ReadShard(path), (std::vector<uint16_t>{1, 2, 3}));
  int files = 0;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    ++files;
    EXPECT_EQ(e.path().filename(), "s.bin");
  }
  EXPECT_EQ(files, 1);
  struct stat st;
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0644u);
}

TEST(ShardTest, WriteIntoMissingDirectoryFailsNamingPath) {
  const std::string path = testing::TempDir() + "/no/such/dir/s.bin";
  absl::Status s = WriteShard(path, {1, 2});
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr(path));
}

TEST(ShardTest, MissingFileIsNotFound) {
  const std::string path = TempPath("does_not_exist.bin");
  absl::StatusOr<std::vector<uint16_t>> r = ReadShard(path);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(path));
}

TEST(ShardTest, FileShorterThanHeaderRejected) {
  const std::string path = TempPath("short.bin");
  std::string bytes = GoodShardBytes(path, {1, 2, 3});
  WriteBytes(path, bytes.substr(0, 100));
  absl::StatusOr<std::vector<uint16_t>> r = ReadShard(path);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()),
              AllOf(HasSubstr(path), HasSubstr("100 bytes"), HasSubstr("header")));
}

TEST(ShardTest, WrongMagicRejectedWithExpectedAndGot) {
  const std::string path = TempPath("magic.bin");
  std::string bytes = GoodShardBytes(path, {1, 2, 3});
  SetHeaderInt(&bytes, 0, 12345);
  WriteBytes(path, bytes);
  absl::StatusOr<std::vector<uint16_t>> r = ReadShard(path);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()),
              AllOf(HasSubstr(path), HasSubstr("magic"), HasSubstr("expected 20240520"),
                    HasSubstr("got 12345")));
}

TEST(ShardTest, WrongVersionRejected) {
  const std::string path = TempPath("version.bin");
  std::string bytes = GoodShardBytes(path, {1, 2, 3});
  SetHeaderInt(&bytes, 1, 2);  // llm.c's version 2 (Llama 3, uint32 tokens)
  WriteBytes(path, bytes);
  absl::StatusOr<std::vector<uint16_t>> r = ReadShard(path);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()),
              AllOf(HasSubstr(path), HasSubstr("version 2")));
}

TEST(ShardTest, TruncatedFileRejected) {
  const std::string path = TempPath("truncated.bin");
  std::string bytes = GoodShardBytes(path, {1, 2, 3, 4});
  WriteBytes(path, bytes.substr(0, bytes.size() - 3));  // 4 tokens claimed, 2.5 present
  absl::StatusOr<std::vector<uint16_t>> r = ReadShard(path);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_THAT(std::string(r.status().message()),
              AllOf(HasSubstr(path), HasSubstr("truncated"), HasSubstr("4 tokens"),
                    HasSubstr("holds 5 bytes")));
}

TEST(ShardTest, TrailingBytesRejected) {
  const std::string path = TempPath("trailing.bin");
  std::string bytes = GoodShardBytes(path, {1, 2, 3});
  WriteBytes(path, bytes + std::string("\x01\x00", 2));
  absl::StatusOr<std::vector<uint16_t>> r = ReadShard(path);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()),
              AllOf(HasSubstr(path), HasSubstr("trailing bytes"), HasSubstr("3 tokens")));
}

TEST(ShardTest, NegativeTokenCountRejected) {
  const std::string path = TempPath("negative.bin");
  std::string bytes = GoodShardBytes(path, {});
  SetHeaderInt(&bytes, 2, -1);
  WriteBytes(path, bytes);
  absl::StatusOr<std::vector<uint16_t>> r = ReadShard(path);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(path));
}

TEST(ShardTest, OutOfVocabTokenRejectedWithOffsetAndValue) {
  const std::string path = TempPath("vocab.bin");
  ASSERT_TRUE(WriteShard(path, {10, 20, 300, 40}).ok());
  EXPECT_TRUE(ReadShard(path).ok());       // no vocab given: not checked
  EXPECT_TRUE(ReadShard(path, 301).ok());  // 300 < 301
  absl::StatusOr<std::vector<uint16_t>> r = ReadShard(path, 256);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_THAT(std::string(r.status().message()),
              AllOf(HasSubstr(path), HasSubstr("token 300"), HasSubstr("offset 2"),
                    HasSubstr("vocab_size 256")));
  // A token equal to the vocab size is out too.
  EXPECT_FALSE(ReadShard(path, 300).ok());
}

TEST(ShardTest, BadVocabSizeArgumentRejected) {
  const std::string path = TempPath("vocab_arg.bin");
  ASSERT_TRUE(WriteShard(path, {1}).ok());
  EXPECT_EQ(ReadShard(path, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ReadShard(path, 70000).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ShardTest, DirectoryIsNotAShard) {
  const std::string path = testing::TempDir();
  absl::StatusOr<std::vector<uint16_t>> r = ReadShard(path);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(path));
}

}  // namespace
}  // namespace qtrain
