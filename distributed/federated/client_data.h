// A federated client's data: its own token shard(s), cut into non-overlapping sequences of T + 1
// tokens (sequence i: tokens [i T, i T + T], inputs and next-token targets), drawn per step by
// Poisson sampling (DP-SGD's accounting assumes it) or as a uniform batch. Also the non-IID
// split of the Brown genres into client shards (one genre per client, or Dirichlet(alpha)
// proportions of every genre's documents), written from data/brown's index.tsv.
#ifndef QTRAIN_DISTRIBUTED_FEDERATED_CLIENT_DATA_H_
#define QTRAIN_DISTRIBUTED_FEDERATED_CLIENT_DATA_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "trainer/rng.h"

namespace qtrain::federated {

class ClientData {
 public:
  // Every shard matching `pattern` (a glob, name order); tokens must be < vocab.
  static absl::StatusOr<ClientData> Open(const std::string& pattern, int T, int vocab);

  int64_t sequences() const { return static_cast<int64_t>(starts_.size()); }
  int64_t tokens() const { return static_cast<int64_t>(tokens_.size()); }
  int T() const { return T_; }
  // x, y (T each): sequence i's inputs and targets.
  void Sequence(int64_t i, int32_t* x, int32_t* y) const;
  // Each sequence independently with probability q, in index order.
  std::vector<int64_t> Poisson(double q, Rng* rng) const;
  // B distinct sequences uniformly at random (B <= sequences()).
  std::vector<int64_t> Uniform(int B, Rng* rng) const;

 private:
  int T_ = 0;
  std::vector<uint16_t> tokens_;  // the shards, concatenated
  std::vector<int64_t> starts_;   // first token of each sequence (never crossing a shard end)
};

// The data pattern of logical client k: "{client}" becomes k, "{genre}" becomes
// genres[k % genres.size()]. InvalidArgument when "{genre}" appears without genres.
absl::StatusOr<std::string> ClientPattern(const std::string& pattern, int client,
                                          const std::vector<std::string>& genres);

struct SplitOptions {
  std::string data_dir;              // holds index.tsv and the genre shards
  std::vector<std::string> genres;   // the genres to deal out (their train documents)
  int clients = 0;
  // 0: one genre per client (clients == genres.size()); > 0: every genre's documents go to
  // the clients in Dirichlet(alpha) proportions (small alpha: each genre at few clients).
  double alpha = 0;
  uint64_t seed = 0;
  std::string out_dir;               // client_<k>_train.bin and clients.tsv
};

struct ClientShare {
  int64_t tokens = 0;
  std::vector<int64_t> genre_tokens;  // by SplitOptions::genres
};

// Writes client_<k>_train.bin (k = 0..clients-1) atomically, whole documents each, and
// clients.tsv (client, tokens, then tokens per genre). Every client gets at least one document.
absl::StatusOr<std::vector<ClientShare>> SplitByGenre(const SplitOptions& options);

}  // namespace qtrain::federated

#endif  // QTRAIN_DISTRIBUTED_FEDERATED_CLIENT_DATA_H_
