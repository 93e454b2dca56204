// DataLoader implementation; see data_loader.h for the reading order.
#include "trainer/data_loader.h"

#include <glob.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "ops/status_macros.h"
#include "trainer/shard.h"

namespace qtrain {
namespace {

absl::StatusOr<std::vector<std::string>> GlobSorted(const std::string& pattern) {
  glob_t g;
  int rc = ::glob(pattern.c_str(), 0, nullptr, &g);
  std::vector<std::string> paths;
  if (rc == 0) {
    for (size_t i = 0; i < g.gl_pathc; ++i) paths.emplace_back(g.gl_pathv[i]);
  }
  ::globfree(&g);
  if (rc == GLOB_NOMATCH || (rc == 0 && paths.empty())) {
    return absl::NotFoundError(absl::StrCat("no data shards match '", pattern, "'"));
  }
  if (rc != 0) {
    return absl::InternalError(absl::StrCat("glob of data shard pattern '", pattern,
                                            "' failed (", rc == GLOB_ABORTED ? "read error"
                                                          : "out of memory", ")"));
  }
  // glob sorts by the locale's collation; name order must not depend on the locale.
  std::sort(paths.begin(), paths.end());
  return paths;
}

}  // namespace

absl::StatusOr<std::unique_ptr<DataLoader>> DataLoader::Open(const std::string& pattern,
                                                             int B, int T, int rank,
                                                             int world_size, int vocab_size) {
  QT_CHECK_ARG(B > 0, "data loader: batch size B must be > 0, got ", B);
  QT_CHECK_ARG(T > 0, "data loader: sequence length T must be > 0, got ", T);
  QT_CHECK_ARG(world_size > 0, "data loader: world_size must be > 0, got ", world_size);
  QT_CHECK_ARG(rank >= 0 && rank < world_size, "data loader: rank ", rank,
               " outside [0, world_size=", world_size, ")");
  QT_CHECK_ARG(vocab_size > 0 && vocab_size <= 65536,
               "data loader: vocab_size must be in [1, 65536] (uint16 tokens), got ",
               vocab_size);
  std::unique_ptr<DataLoader> loader(new DataLoader(B, T, rank, world_size));
  ASSIGN_OR_RETURN(std::vector<std::string> paths, GlobSorted(pattern));
  const int64_t span = loader->StepSpan();
  int64_t largest = 0;
  for (const std::string& path : paths) {
    ASSIGN_OR_RETURN(std::vector<uint16_t> tokens, ReadShard(path, vocab_size));
    const int64_t n = static_cast<int64_t>(tokens.size());
    largest = std::max(largest, n);
    if (n < span) {
      loader->skipped_paths_.push_back(path);
      continue;
    }
    loader->total_tokens_ += n;
    loader->steps_per_epoch_ += (n - 1) / (span - 1);
    loader->paths_.push_back(path);
    loader->shards_.push_back(std::move(tokens));
  }
  if (loader->shards_.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "data loader: none of the ", paths.size(), " shards matching '", pattern,
        "' holds one step: world_size*B*T+1 = ", world_size, "*", B, "*", T, "+1 = ", span,
        " tokens are needed, the largest has ", largest));
  }
  return loader;
}

absl::Status DataLoader::Next(int32_t* inputs, int32_t* targets) {
  QT_CHECK_ARG(inputs != nullptr && targets != nullptr,
               "data loader: Next needs non-null inputs and targets");
  const std::vector<uint16_t>& shard = shards_[pos_.shard];
  const int64_t n = int64_t{B_} * T_;
  const uint16_t* src = shard.data() + pos_.offset + rank_ * n;
  for (int64_t i = 0; i < n; ++i) {
    inputs[i] = src[i];
    targets[i] = src[i + 1];
  }
  const int64_t stride = StepSpan() - 1;
  pos_.offset += stride;
  if (pos_.offset + stride + 1 > static_cast<int64_t>(shard.size())) {
    pos_.offset = 0;
    if (++pos_.shard == static_cast<int64_t>(shards_.size())) {
      pos_.shard = 0;
      ++pos_.epoch;
    }
  }
  return absl::OkStatus();
}

absl::Status DataLoader::Seek(const DataPosition& pos) {
  const int64_t num = static_cast<int64_t>(shards_.size());
  QT_CHECK_ARG(pos.shard >= 0 && pos.shard < num, "data loader: Seek to shard ", pos.shard,
               " outside [0, ", num, ") (the used shards)");
  QT_CHECK_ARG(pos.epoch >= 0, "data loader: Seek to negative epoch ", pos.epoch);
  const int64_t size = static_cast<int64_t>(shards_[pos.shard].size());
  QT_CHECK_ARG(pos.offset >= 0 && pos.offset + StepSpan() <= size, "data loader: Seek to offset ",
               pos.offset, " in shard ", pos.shard, " ('", paths_[pos.shard], "', ", size,
               " tokens): a step needs ", StepSpan(), " tokens from the offset");
  pos_ = pos;
  return absl::OkStatus();
}

}  // namespace qtrain
