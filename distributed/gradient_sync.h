// GradientSync: data-parallel reductions over one flat fp32 buffer (ParamStore's layout):
// bucketed all-reduce of gradients for plain data parallelism, and for ZeRO-1 the shard layout,
// bucketed reduce-scatter of gradients, the global norm over shards and the all-gather of
// updated parameters. Buckets go in a fixed order (from offset 0 up), so a run with the same
// world size and bucket size reduces the same way every time.
#ifndef QTRAIN_DISTRIBUTED_GRADIENT_SYNC_H_
#define QTRAIN_DISTRIBUTED_GRADIENT_SYNC_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "distributed/communicator.h"

namespace qtrain {

class GradientSync {
 public:
  // `n` values per buffer; buckets of `bucket_bytes` (at least one float).
  GradientSync(Communicator* comm, int64_t n, int64_t bucket_bytes);

  int64_t size() const { return n_; }
  int64_t bucket_elems() const { return bucket_elems_; }

  // Plain data parallelism: grads[i] <- mean over ranks of grads[i], bucket by bucket. Host
  // memory (the division runs on the CPU); for device buffers use AllReduceSum.
  absl::Status AllReduceMean(float* grads);
  // grads[i] <- sum over ranks, bucket by bucket in the same fixed order, nothing else: works on
  // whatever memory the communicator does (device memory for NCCL). The caller divides by the
  // world size, e.g. in the loss scale of backward or the optimizer's gradient scale.
  absl::Status AllReduceSum(float* grads);

  // ZeRO-1 layout: rank r owns [ShardBegin(r), ShardEnd(r)), contiguous shards of
  // ceil(n / world) values (the last ones shorter or empty).
  int64_t shard_size() const { return shard_; }
  int64_t ShardBegin(int rank) const;
  int64_t ShardEnd(int rank) const;
  int64_t begin() const { return ShardBegin(comm_->rank()); }
  int64_t end() const { return ShardEnd(comm_->rank()); }

  // grads[begin(), end()) <- mean over ranks; the rest of `grads` is left as it was (local).
  absl::Status ReduceScatterMean(float* grads);
  // Sum over ranks of the squares of values[begin(), end()): the squared global norm of a
  // sharded buffer. Identical on every rank.
  absl::StatusOr<double> ShardedSumSquares(const float* values);
  // values[ShardBegin(r), ShardEnd(r)) <- rank r's, for every r (the updated parameters).
  absl::Status AllGatherShards(float* values);
  // Like AllGatherShards from a shard-only buffer: `shard` holds end() - begin() values, `full`
  // (n values) receives every rank's shard. For gathering ZeRO-1 moments before a checkpoint.
  absl::Status AllGatherShards(const float* shard, float* full);

 private:
  // Per round of a bucketed reduce-scatter / all-gather, each rank moves `chunk_` values of its
  // shard: chunk k of rank r covers [ShardBegin(r) + k*chunk_, ... + chunk_) clipped to the shard.
  int64_t ChunkLen(int rank, int64_t round) const;

  Communicator* comm_;
  int64_t n_;
  int64_t bucket_elems_;
  int64_t shard_;
  int64_t chunk_;
  int64_t rounds_;
  std::vector<float> send_, recv_;  // staging, world * chunk_ and chunk_ (or world * chunk_)
};

}  // namespace qtrain

#endif  // QTRAIN_DISTRIBUTED_GRADIENT_SYNC_H_
