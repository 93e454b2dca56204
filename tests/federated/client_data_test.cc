// Client data: sequences never cross shard ends, Poisson draws at rate q, uniform batches of
// distinct sequences; the genre split keeps whole documents, conserves every token, gives every
// client data, is deterministic per seed, and one-genre-per-client is exactly the genre shards.
#include "distributed/federated/client_data.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "trainer/shard.h"

namespace qtrain::federated {
namespace {

std::string TmpDir() {
  const char* tmp = std::getenv("TEST_TMPDIR");
  return tmp ? tmp : "/tmp";
}

// Three genres of documents (each an end-of-text byte then `len` tokens of its own value),
// shards and index.tsv as tools/prepare_data writes them.
std::string WriteCorpus() {
  const std::string dir = TmpDir() + "/corpus";
  std::filesystem::create_directories(dir);
  std::ofstream index(dir + "/index.tsv");
  index << "file\tgenre\tsplit\tshard\toffset\tlength\n";
  const char* genres[] = {"a", "b", "c"};
  for (int g = 0; g < 3; ++g) {
    std::vector<uint16_t> train, val;
    for (int d = 0; d < 10 + 5 * g; ++d) {
      std::vector<uint16_t>& out = d % 7 == 0 ? val : train;
      const int len = 50 + 13 * d;
      out.push_back(kEndOfTextToken);
      const int64_t offset = static_cast<int64_t>(out.size());
      for (int i = 0; i < len; ++i) out.push_back(static_cast<uint16_t>(10 + g * 20 + d));
      index << "c" << genres[g] << d << "\t" << genres[g] << "\t" << (d % 7 == 0 ? "val" : "train")
            << "\t" << (d % 7 == 0 ? "val_" : "train_") << genres[g] << ".bin\t" << offset << "\t"
            << len << "\n";
    }
    EXPECT_TRUE(WriteShard(absl::StrCat(dir, "/train_", genres[g], ".bin"), train).ok());
    EXPECT_TRUE(WriteShard(absl::StrCat(dir, "/val_", genres[g], ".bin"), val).ok());
  }
  return dir;
}

TEST(ClientData, SequencesStayInsideEachShard) {
  const std::string dir = TmpDir() + "/seq";
  std::filesystem::create_directories(dir);
  std::vector<uint16_t> a(25), b(12);
  for (int i = 0; i < 25; ++i) a[i] = i;
  for (int i = 0; i < 12; ++i) b[i] = 100 + i;
  ASSERT_TRUE(WriteShard(dir + "/x_0.bin", a).ok());
  ASSERT_TRUE(WriteShard(dir + "/x_1.bin", b).ok());
  absl::StatusOr<ClientData> d = ClientData::Open(dir + "/x_*.bin", 5, 256);
  ASSERT_TRUE(d.ok()) << d.status();
  // Shard 0: starts 0, 5, 10, 15 (15 + 6 <= 25); shard 1: 0, 5 (5 + 6 <= 12).
  ASSERT_EQ(d->sequences(), 6);
  std::vector<int32_t> x(5), y(5);
  d->Sequence(3, x.data(), y.data());
  EXPECT_EQ(x, (std::vector<int32_t>{15, 16, 17, 18, 19}));
  EXPECT_EQ(y, (std::vector<int32_t>{16, 17, 18, 19, 20}));
  d->Sequence(5, x.data(), y.data());
  EXPECT_EQ(x[0], 105);
  EXPECT_EQ(y[4], 110);
  EXPECT_FALSE(ClientData::Open(dir + "/none_*.bin", 5, 256).ok());
  EXPECT_FALSE(ClientData::Open(dir + "/x_1.bin", 20, 256).ok());  // shorter than a sequence
}

TEST(ClientData, PoissonAndUniformDraws) {
  const std::string dir = TmpDir() + "/draws";
  std::filesystem::create_directories(dir);
  ASSERT_TRUE(WriteShard(dir + "/d.bin", std::vector<uint16_t>(2001, 7)).ok());
  ClientData d = *ClientData::Open(dir + "/d.bin", 2, 256);
  ASSERT_EQ(d.sequences(), 1000);
  Rng rng(4);
  double total = 0;
  for (int i = 0; i < 200; ++i) total += d.Poisson(0.05, &rng).size();
  EXPECT_NEAR(total / 200, 50.0, 2.0);  // sd of the mean ~0.5
  const std::vector<int64_t> u = d.Uniform(300, &rng);
  ASSERT_EQ(u.size(), 300u);
  EXPECT_EQ(std::set<int64_t>(u.begin(), u.end()).size(), 300u);
  for (int64_t i : u) ASSERT_TRUE(i >= 0 && i < 1000);
}

TEST(ClientData, PatternNamesClientAndGenre) {
  EXPECT_EQ(*ClientPattern("d/client_{client}_train.bin", 3, {}), "d/client_3_train.bin");
  EXPECT_EQ(*ClientPattern("d/train_{genre}.bin", 5, {"h", "j", "k"}), "d/train_k.bin");
  EXPECT_FALSE(ClientPattern("d/train_{genre}.bin", 0, {}).ok());
}

int64_t Tokens(const std::string& path) { return static_cast<int64_t>(ReadShard(path)->size()); }

TEST(SplitByGenre, OneGenrePerClientIsTheGenreShard) {
  const std::string corpus = WriteCorpus();
  SplitOptions o{corpus, {"c", "a"}, 2, 0, 1, TmpDir() + "/split1"};
  absl::StatusOr<std::vector<ClientShare>> s = SplitByGenre(o);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(*ReadShard(o.out_dir + "/client_0_train.bin"), *ReadShard(corpus + "/train_c.bin"));
  EXPECT_EQ(*ReadShard(o.out_dir + "/client_1_train.bin"), *ReadShard(corpus + "/train_a.bin"));
  EXPECT_EQ((*s)[1].genre_tokens[0], 0);
  EXPECT_EQ((*s)[1].genre_tokens[1], Tokens(corpus + "/train_a.bin"));
  EXPECT_TRUE(std::filesystem::exists(o.out_dir + "/clients.tsv"));
  o.clients = 3;
  EXPECT_FALSE(SplitByGenre(o).ok());  // one genre per client needs clients == genres
}

TEST(SplitByGenre, DirichletKeepsDocumentsWholeAndEveryToken) {
  const std::string corpus = WriteCorpus();
  SplitOptions o{corpus, {"a", "b", "c"}, 4, 0.5, 7, TmpDir() + "/split2"};
  absl::StatusOr<std::vector<ClientShare>> s = SplitByGenre(o);
  ASSERT_TRUE(s.ok()) << s.status();
  int64_t total = 0, want = 0;
  for (const char* g : {"a", "b", "c"}) want += Tokens(absl::StrCat(corpus, "/train_", g, ".bin"));
  std::vector<std::vector<uint16_t>> first;
  for (int k = 0; k < 4; ++k) {
    const std::vector<uint16_t> t = *ReadShard(absl::StrCat(o.out_dir, "/client_", k, "_train.bin"));
    ASSERT_FALSE(t.empty()) << "client " << k;
    total += static_cast<int64_t>(t.size());
    EXPECT_EQ((*s)[k].tokens, static_cast<int64_t>(t.size()));
    // Whole documents: each starts with end-of-text and holds one value throughout.
    ASSERT_EQ(t[0], kEndOfTextToken);
    for (size_t i = 1; i < t.size(); ++i) {
      if (t[i] == kEndOfTextToken) continue;
      if (t[i - 1] != kEndOfTextToken) ASSERT_EQ(t[i], t[i - 1]) << "client " << k << " at " << i;
    }
    first.push_back(t);
  }
  EXPECT_EQ(total, want);
  // Same seed, same split; another seed, another split.
  o.out_dir = TmpDir() + "/split3";
  ASSERT_TRUE(SplitByGenre(o).ok());
  for (int k = 0; k < 4; ++k) {
    EXPECT_EQ(*ReadShard(absl::StrCat(o.out_dir, "/client_", k, "_train.bin")), first[k]);
  }
  o.seed = 8;
  o.out_dir = TmpDir() + "/split4";
  ASSERT_TRUE(SplitByGenre(o).ok());
  bool differs = false;
  for (int k = 0; k < 4; ++k) {
    differs |= *ReadShard(absl::StrCat(o.out_dir, "/client_", k, "_train.bin")) != first[k];
  }
  EXPECT_TRUE(differs);
}

}  // namespace
}  // namespace qtrain::federated
