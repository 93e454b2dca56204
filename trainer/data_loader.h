// DataLoader: reads (inputs, targets) batches from token shards, each data-parallel rank a
// disjoint slice of every step, with a position that checkpoints can save and restore.
#ifndef QTRAIN_TRAINER_DATA_LOADER_H_
#define QTRAIN_TRAINER_DATA_LOADER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qtrain {

// Where the next step of all ranks starts. The same on every rank, so one copy goes into a
// checkpoint.
struct DataPosition {
  int64_t shard = 0;   // index into shard_paths()
  int64_t offset = 0;  // token offset in that shard
  int64_t epoch = 0;   // completed passes over all shards
};

inline bool operator==(const DataPosition& a, const DataPosition& b) {
  return a.shard == b.shard && a.offset == b.offset && a.epoch == b.epoch;
}
inline bool operator!=(const DataPosition& a, const DataPosition& b) { return !(a == b); }

// A step consumes world*B*T tokens of one shard: rank r reads the B*T+1 tokens starting at
// offset + r*B*T (the extra token supplies the last target), then the offset advances by
// world*B*T. When the following step would not fit in the shard, the loader moves to the
// next shard (after the last: shard 0, epoch + 1). Shards shorter than one step
// (world*B*T + 1 tokens) are skipped. All shards are loaded at Open.
class DataLoader {
 public:
  // `pattern` is a glob(3) pattern; matches are used in name order. Every token is checked
  // against `vocab_size`.
  static absl::StatusOr<std::unique_ptr<DataLoader>> Open(const std::string& pattern, int B,
                                                          int T, int rank, int world_size,
                                                          int vocab_size);

  // Fills inputs and targets, each (B,T) row-major; targets[i] = the token after inputs[i].
  absl::Status Next(int32_t* inputs, int32_t* targets);

  DataPosition position() const { return pos_; }
  // Moves to `pos`, which must name a used shard and an offset where a whole step fits.
  absl::Status Seek(const DataPosition& pos);
  // Back to the first shard, offset 0, epoch 0 (repeatable evaluation passes).
  void Reset() { pos_ = DataPosition(); }

  // Tokens in the used shards.
  int64_t total_tokens() const { return total_tokens_; }
  // Steps in one pass over the used shards (an evaluation pass is this many Next calls).
  int64_t steps_per_epoch() const { return steps_per_epoch_; }
  // The used shards in read order; skipped_shard_paths() lists those too small for a step.
  const std::vector<std::string>& shard_paths() const { return paths_; }
  const std::vector<std::string>& skipped_shard_paths() const { return skipped_paths_; }

  int B() const { return B_; }
  int T() const { return T_; }
  int rank() const { return rank_; }
  int world_size() const { return world_size_; }

 private:
  DataLoader(int B, int T, int rank, int world_size)
      : B_(B), T_(T), rank_(rank), world_size_(world_size) {}
  // Tokens one step of all ranks needs to fit in a shard.
  int64_t StepSpan() const { return int64_t{world_size_} * B_ * T_ + 1; }

  int B_, T_, rank_, world_size_;
  std::vector<std::string> paths_;
  std::vector<std::string> skipped_paths_;
  std::vector<std::vector<uint16_t>> shards_;
  int64_t total_tokens_ = 0;
  int64_t steps_per_epoch_ = 0;
  DataPosition pos_;
};

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_DATA_LOADER_H_
