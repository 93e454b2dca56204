// GradientSync: buckets, shards and their staging copies.
#include "distributed/gradient_sync.h"

#include <algorithm>
#include <cstring>

#include "ops/status_macros.h"

namespace qtrain {

GradientSync::GradientSync(Communicator* comm, int64_t n, int64_t bucket_bytes)
    : comm_(comm), n_(n) {
  const int world = comm_->world_size();
  bucket_elems_ = std::max<int64_t>(1, bucket_bytes / static_cast<int64_t>(sizeof(float)));
  shard_ = (n_ + world - 1) / world;
  // A round of reduce-scatter moves world * chunk values: about one bucket.
  chunk_ = std::max<int64_t>(1, std::min<int64_t>(shard_, bucket_elems_ / world));
  rounds_ = shard_ == 0 ? 0 : (shard_ + chunk_ - 1) / chunk_;
}

int64_t GradientSync::ShardBegin(int rank) const { return std::min(n_, rank * shard_); }

int64_t GradientSync::ShardEnd(int rank) const { return std::min(n_, (rank + 1) * shard_); }

int64_t GradientSync::ChunkLen(int rank, int64_t round) const {
  const int64_t start = ShardBegin(rank) + round * chunk_;
  return std::clamp<int64_t>(ShardEnd(rank) - start, 0, chunk_);
}

absl::Status GradientSync::AllReduceMean(float* grads) {
  const int world = comm_->world_size();
  if (world == 1) return absl::OkStatus();
  const float inv = 1.0f / static_cast<float>(world);
  for (int64_t off = 0; off < n_; off += bucket_elems_) {
    const int64_t len = std::min(bucket_elems_, n_ - off);
    RETURN_IF_ERROR(comm_->AllReduceSum(grads + off, len));
    for (int64_t i = off; i < off + len; ++i) grads[i] *= inv;
  }
  return absl::OkStatus();
}

absl::Status GradientSync::AllReduceSum(float* grads) {
  if (comm_->world_size() == 1) return absl::OkStatus();
  for (int64_t off = 0; off < n_; off += bucket_elems_) {
    RETURN_IF_ERROR(comm_->AllReduceSum(grads + off, std::min(bucket_elems_, n_ - off)));
  }
  return absl::OkStatus();
}

absl::Status GradientSync::ReduceScatterMean(float* grads) {
  const int world = comm_->world_size();
  if (world == 1) return absl::OkStatus();
  const int me = comm_->rank();
  const float inv = 1.0f / static_cast<float>(world);
  send_.resize(static_cast<size_t>(world) * chunk_);
  recv_.resize(chunk_);
  for (int64_t k = 0; k < rounds_; ++k) {
    for (int r = 0; r < world; ++r) {
      float* dst = send_.data() + static_cast<size_t>(r) * chunk_;
      const int64_t len = ChunkLen(r, k);
      if (len > 0) std::memcpy(dst, grads + ShardBegin(r) + k * chunk_, len * sizeof(float));
      std::fill(dst + len, dst + chunk_, 0.0f);  // padding past a short or empty shard
    }
    RETURN_IF_ERROR(comm_->ReduceScatterSum(send_.data(), recv_.data(), chunk_));
    const int64_t len = ChunkLen(me, k);
    float* out = grads + ShardBegin(me) + k * chunk_;
    for (int64_t i = 0; i < len; ++i) out[i] = recv_[i] * inv;
  }
  return absl::OkStatus();
}

absl::StatusOr<double> GradientSync::ShardedSumSquares(const float* values) {
  double sum = 0;
  for (int64_t i = begin(); i < end(); ++i) {
    const double v = values[i];
    sum += v * v;
  }
  RETURN_IF_ERROR(comm_->AllReduceSum(&sum, 1));
  return sum;
}

absl::Status GradientSync::AllGatherShards(float* values) {
  if (comm_->world_size() == 1) return absl::OkStatus();
  return AllGatherShards(values + begin(), values);
}

absl::Status GradientSync::AllGatherShards(const float* shard, float* full) {
  const int world = comm_->world_size();
  const int me = comm_->rank();
  if (world == 1) {
    if (full != shard && n_ > 0) std::memmove(full, shard, n_ * sizeof(float));
    return absl::OkStatus();
  }
  std::vector<float> send(chunk_);
  recv_.resize(static_cast<size_t>(world) * chunk_);
  for (int64_t k = 0; k < rounds_; ++k) {
    const int64_t mine = ChunkLen(me, k);
    if (mine > 0) std::memcpy(send.data(), shard + k * chunk_, mine * sizeof(float));
    std::fill(send.begin() + mine, send.end(), 0.0f);
    RETURN_IF_ERROR(comm_->AllGather(send.data(), recv_.data(), chunk_));
    for (int r = 0; r < world; ++r) {
      const int64_t len = ChunkLen(r, k);
      if (len > 0) {
        std::memcpy(full + ShardBegin(r) + k * chunk_,
                    recv_.data() + static_cast<size_t>(r) * chunk_, len * sizeof(float));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace qtrain
