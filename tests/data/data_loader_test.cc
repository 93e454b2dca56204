// DataLoader: batch layout, rank partitioning, shard/epoch wrap-around, Seek/position.
#include "trainer/data_loader.h"

#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "trainer/shard.h"

namespace qtrain {

// Readable failure messages for positions.
void PrintTo(const DataPosition& p, std::ostream* os) {
  *os << "{shard " << p.shard << ", offset " << p.offset << ", epoch " << p.epoch << "}";
}

namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;

constexpr int kVocab = 65536;  // lets every token be unique, so tests can tell them apart

std::string FreshDir(const std::string& name) {
  const std::string dir = testing::TempDir() + "/data_loader_test_" + name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

// Token i of shard s is s*10000 + i.
std::vector<uint16_t> ShardTokens(int s, int n) {
  std::vector<uint16_t> t(n);
  for (int i = 0; i < n; ++i) t[i] = static_cast<uint16_t>(s * 10000 + i);
  return t;
}

void MakeShard(const std::string& path, int s, int n) {
  ASSERT_TRUE(WriteShard(path, ShardTokens(s, n)).ok());
}

struct Batch {
  std::vector<int32_t> inputs, targets;
};

Batch Step(DataLoader& loader) {
  const int n = loader.B() * loader.T();
  Batch b{std::vector<int32_t>(n), std::vector<int32_t>(n)};
  absl::Status s = loader.Next(b.inputs.data(), b.targets.data());
  EXPECT_TRUE(s.ok()) << s;
  return b;
}

std::vector<int32_t> Range(int32_t from, int n) {
  std::vector<int32_t> v(n);
  for (int i = 0; i < n; ++i) v[i] = from + i;
  return v;
}

std::unique_ptr<DataLoader> MustOpen(const std::string& pattern, int B, int T, int rank = 0,
                                     int world = 1) {
  absl::StatusOr<std::unique_ptr<DataLoader>> l =
      DataLoader::Open(pattern, B, T, rank, world, kVocab);
  EXPECT_TRUE(l.ok()) << l.status();
  return l.ok() ? std::move(*l) : nullptr;
}

TEST(DataLoaderTest, TargetsAreInputsShiftedByOne) {
  const std::string dir = FreshDir("shift");
  MakeShard(dir + "/s.bin", 0, 100);
  auto loader = MustOpen(dir + "/*.bin", 2, 3);
  ASSERT_NE(loader, nullptr);
  Batch b = Step(*loader);
  // Row-major (B,T): row 0 = tokens 0..2, row 1 = tokens 3..5; targets one ahead.
  EXPECT_THAT(b.inputs, ElementsAreArray(Range(0, 6)));
  EXPECT_THAT(b.targets, ElementsAreArray(Range(1, 6)));
  b = Step(*loader);
  EXPECT_THAT(b.inputs, ElementsAreArray(Range(6, 6)));
  EXPECT_THAT(b.targets, ElementsAreArray(Range(7, 6)));
  EXPECT_EQ(loader->position(), (DataPosition{0, 12, 0}));
}

// Two ranks, B*T = 8 each: at step k (from offset 16k) rank 0 reads tokens [16k, 16k+8) and
// rank 1 [16k+8, 16k+16): disjoint inputs, which together are exactly what a single rank
// (world 1) reads in its steps 2k and 2k+1; targets likewise. Positions agree after every
// world-2 step and every second world-1 step, through a shard change and an epoch wrap
// (shards of 2*16+1 and 16+1 tokens, so both worlds switch shards at the same token).
TEST(DataLoaderTest, TwoRanksSplitWhatOneRankReadsInTwoSteps) {
  const std::string dir = FreshDir("ranks");
  const int B = 2, T = 4;
  MakeShard(dir + "/a.bin", 0, 2 * 16 + 1);
  MakeShard(dir + "/b.bin", 1, 16 + 1);
  const std::string pattern = dir + "/*.bin";
  auto single = MustOpen(pattern, B, T, 0, 1);
  auto rank0 = MustOpen(pattern, B, T, 0, 2);
  auto rank1 = MustOpen(pattern, B, T, 1, 2);
  ASSERT_TRUE(single && rank0 && rank1);
  EXPECT_EQ(rank0->steps_per_epoch(), 3);
  EXPECT_EQ(single->steps_per_epoch(), 6);
  std::set<int32_t> seen_this_epoch;
  for (int k = 0; k < 5; ++k) {
    SCOPED_TRACE("world-2 step " + std::to_string(k));
    Batch s0 = Step(*single), s1 = Step(*single);
    Batch r0 = Step(*rank0), r1 = Step(*rank1);
    EXPECT_EQ(r0.inputs, s0.inputs);
    EXPECT_EQ(r0.targets, s0.targets);
    EXPECT_EQ(r1.inputs, s1.inputs);
    EXPECT_EQ(r1.targets, s1.targets);
    for (int32_t t : r0.inputs) EXPECT_TRUE(seen_this_epoch.insert(t).second) << t;
    for (int32_t t : r1.inputs) EXPECT_TRUE(seen_this_epoch.insert(t).second) << t;
    EXPECT_EQ(rank0->position(), single->position());
    EXPECT_EQ(rank1->position(), single->position());
    if (k == 2) {
      // One epoch: every input token of both shards except each shard's last one.
      EXPECT_EQ(seen_this_epoch.size(), 48u);
      seen_this_epoch.clear();
    }
  }
  EXPECT_EQ(rank0->position(), (DataPosition{1, 0, 1}));
}

TEST(DataLoaderTest, MovesToNextShardSkipsSmallOnesAndWrapsEpoch) {
  const std::string dir = FreshDir("wrap");
  const int B = 1, T = 4;  // a step needs 5 tokens
  MakeShard(dir + "/s0.bin", 0, 3 * 4 + 1 + 2);  // 3 steps; the last 2 tokens are never read
  MakeShard(dir + "/s1.bin", 1, 4);              // too small: skipped
  MakeShard(dir + "/s2.bin", 2, 5);              // exactly one step
  auto loader = MustOpen(dir + "/s*.bin", B, T);
  ASSERT_NE(loader, nullptr);
  EXPECT_THAT(loader->shard_paths(), testing::ElementsAre(dir + "/s0.bin", dir + "/s2.bin"));
  EXPECT_THAT(loader->skipped_shard_paths(), testing::ElementsAre(dir + "/s1.bin"));
  EXPECT_EQ(loader->total_tokens(), 15 + 5);
  EXPECT_EQ(loader->steps_per_epoch(), 4);

  const std::vector<std::pair<int32_t, DataPosition>> expected = {
      {0, {0, 4, 0}},     {4, {0, 8, 0}}, {8, {1, 0, 0}},  // shard 0, then on to shard 1
      {20000, {0, 0, 1}},                                   // the used shard 1 is s2.bin
      {0, {0, 4, 1}},                                       // epoch 1 starts over
  };
  EXPECT_EQ(loader->position(), (DataPosition{0, 0, 0}));
  for (const auto& [first, pos] : expected) {
    Batch b = Step(*loader);
    EXPECT_THAT(b.inputs, ElementsAreArray(Range(first, 4)));
    EXPECT_THAT(b.targets, ElementsAreArray(Range(first + 1, 4)));
    EXPECT_EQ(loader->position(), pos) << "after the step starting at token " << first;
  }
}

TEST(DataLoaderTest, ShardsAreReadInNameOrder) {
  const std::string dir = FreshDir("order");
  MakeShard(dir + "/train_c.bin", 2, 10);
  MakeShard(dir + "/train_a.bin", 0, 10);
  MakeShard(dir + "/train_b.bin", 1, 10);
  MakeShard(dir + "/val_a.bin", 9, 10);
  auto loader = MustOpen(dir + "/train_*.bin", 1, 8);
  ASSERT_NE(loader, nullptr);
  EXPECT_THAT(loader->shard_paths(),
              testing::ElementsAre(dir + "/train_a.bin", dir + "/train_b.bin",
                                   dir + "/train_c.bin"));
  EXPECT_EQ(Step(*loader).inputs[0], 0);
  EXPECT_EQ(Step(*loader).inputs[0], 10000);
  EXPECT_EQ(Step(*loader).inputs[0], 20000);
}

TEST(DataLoaderTest, SeekPositionRoundTrip) {
  const std::string dir = FreshDir("seek");
  MakeShard(dir + "/a.bin", 0, 50);
  MakeShard(dir + "/b.bin", 1, 37);
  const std::string pattern = dir + "/*.bin";
  auto loader = MustOpen(pattern, 2, 3, 1, 2);  // rank 1 of 2: a step spans 13 tokens
  ASSERT_NE(loader, nullptr);
  for (int i = 0; i < 4; ++i) Step(*loader);
  const DataPosition saved = loader->position();
  std::vector<Batch> after;
  for (int i = 0; i < 7; ++i) after.push_back(Step(*loader));

  auto resumed = MustOpen(pattern, 2, 3, 1, 2);
  ASSERT_NE(resumed, nullptr);
  ASSERT_TRUE(resumed->Seek(saved).ok());
  EXPECT_EQ(resumed->position(), saved);
  for (int i = 0; i < 7; ++i) {
    Batch b = Step(*resumed);
    EXPECT_EQ(b.inputs, after[i].inputs) << "step " << i;
    EXPECT_EQ(b.targets, after[i].targets) << "step " << i;
  }
  EXPECT_EQ(resumed->position(), loader->position());
  EXPECT_GT(loader->position().epoch, 0);  // the replay crossed an epoch boundary

  // Reset goes back to the very first batch.
  auto fresh = MustOpen(pattern, 2, 3, 1, 2);
  Batch first = Step(*fresh);
  loader->Reset();
  EXPECT_EQ(loader->position(), DataPosition{});
  EXPECT_EQ(Step(*loader).inputs, first.inputs);
}

TEST(DataLoaderTest, BadSeekRejectedAndPositionKept) {
  const std::string dir = FreshDir("badseek");
  MakeShard(dir + "/a.bin", 0, 20);
  MakeShard(dir + "/b.bin", 1, 30);
  auto loader = MustOpen(dir + "/*.bin", 1, 4);  // a step needs 5 tokens
  ASSERT_NE(loader, nullptr);
  Step(*loader);
  const DataPosition before = loader->position();
  const std::vector<DataPosition> bad = {
      {-1, 0, 0}, {2, 0, 0}, {0, -1, 0}, {0, 16, 0}, {1, 26, 0}, {0, 0, -1}};
  for (const DataPosition& p : bad) {
    absl::Status s = loader->Seek(p);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument)
        << p.shard << "/" << p.offset << "/" << p.epoch;
    EXPECT_EQ(loader->position(), before);
  }
  EXPECT_THAT(std::string(loader->Seek({0, 16, 0}).message()),
              testing::AllOf(HasSubstr("offset 16"), HasSubstr(dir + "/a.bin")));
  // The last offsets where a step still fits are accepted.
  EXPECT_TRUE(loader->Seek({0, 15, 3}).ok());
  EXPECT_TRUE(loader->Seek({1, 25, 0}).ok());
  EXPECT_THAT(Step(*loader).inputs, ElementsAreArray(Range(10025, 4)));
  EXPECT_EQ(loader->position(), (DataPosition{0, 0, 1}));
}

TEST(DataLoaderTest, OpenErrors) {
  const std::string dir = FreshDir("errors");
  // Nothing matches.
  absl::StatusOr<std::unique_ptr<DataLoader>> r =
      DataLoader::Open(dir + "/none_*.bin", 1, 4, 0, 1, 256);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(dir + "/none_*.bin"));

  // Every shard too small: the message says how many tokens a step needs.
  MakeShard(dir + "/small_a.bin", 0, 10);
  MakeShard(dir + "/small_b.bin", 0, 16);
  r = DataLoader::Open(dir + "/small_*.bin", 2, 4, 0, 2, kVocab);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()),
              testing::AllOf(HasSubstr("17 tokens are needed"), HasSubstr("largest has 16")));
  EXPECT_TRUE(DataLoader::Open(dir + "/small_*.bin", 1, 5, 0, 3, kVocab).ok());  // 16 fits

  // Tokens outside the vocab and damaged shards name the file.
  MakeShard(dir + "/vocab.bin", 0, 300);
  r = DataLoader::Open(dir + "/vocab.bin", 1, 4, 0, 1, 256);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()),
              testing::AllOf(HasSubstr(dir + "/vocab.bin"), HasSubstr("offset 256")));
  std::ofstream(dir + "/junk.bin") << "not a shard";
  r = DataLoader::Open(dir + "/junk.bin", 1, 4, 0, 1, 256);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr(dir + "/junk.bin"));

  // Bad shapes and ranks.
  const std::string ok = dir + "/vocab.bin";
  EXPECT_EQ(DataLoader::Open(ok, 0, 4, 0, 1, kVocab).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DataLoader::Open(ok, 1, 0, 0, 1, kVocab).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DataLoader::Open(ok, 1, 4, 2, 2, kVocab).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DataLoader::Open(ok, 1, 4, -1, 2, kVocab).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DataLoader::Open(ok, 1, 4, 0, 1, 0).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(DataLoaderTest, NextRejectsNullBuffers) {
  const std::string dir = FreshDir("null");
  MakeShard(dir + "/a.bin", 0, 20);
  auto loader = MustOpen(dir + "/a.bin", 1, 4);
  ASSERT_NE(loader, nullptr);
  int32_t buf[4];
  EXPECT_FALSE(loader->Next(nullptr, buf).ok());
  EXPECT_FALSE(loader->Next(buf, nullptr).ok());
  EXPECT_EQ(loader->position(), DataPosition{});
}

}  // namespace
}  // namespace qtrain
