// federated_split: deals the Brown genres' train documents out to federated clients, one
// shard per client (client_<k>_train.bin) plus clients.tsv: one genre per client, or every
// genre split over the clients in Dirichlet(alpha) proportions (non-IID by degree).
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/str_format.h"
#include "distributed/federated/client_data.h"
#include "trainer/cli.h"

ABSL_FLAG(std::string, data_dir, "data/brown", "folder with index.tsv and the genre shards");
ABSL_FLAG(std::vector<std::string>, genres, {}, "genre letters to deal out, e.g. h,j,k,l");
ABSL_FLAG(int, clients, 0, "clients (default: one per genre)");
ABSL_FLAG(double, alpha, 0, "Dirichlet concentration; 0: one genre per client");
ABSL_FLAG(uint64_t, seed, 0, "seed of the Dirichlet draws and document shuffles");
ABSL_FLAG(std::string, out_dir, "", "where client_<k>_train.bin and clients.tsv go");

int main(int argc, char** argv) {
  qtrain::InitCommandLine(argc, argv,
                          "federated_split --genres=h,j,k,l --out_dir=DIR [--data_dir=data/brown] "
                          "[--clients=N] [--alpha=A] [--seed=S]",
                          __FILE__);
  qtrain::federated::SplitOptions o;
  o.data_dir = absl::GetFlag(FLAGS_data_dir);
  o.genres = absl::GetFlag(FLAGS_genres);
  o.clients = absl::GetFlag(FLAGS_clients);
  if (o.clients == 0) o.clients = static_cast<int>(o.genres.size());
  o.alpha = absl::GetFlag(FLAGS_alpha);
  o.seed = absl::GetFlag(FLAGS_seed);
  o.out_dir = absl::GetFlag(FLAGS_out_dir);
  if (o.out_dir.empty() || o.genres.empty()) {
    std::fprintf(stderr, "federated_split: --genres and --out_dir are required\n");
    return 2;
  }
  absl::StatusOr<std::vector<qtrain::federated::ClientShare>> shares =
      qtrain::federated::SplitByGenre(o);
  if (!shares.ok()) {
    std::fprintf(stderr, "federated_split: %s\n", std::string(shares.status().message()).c_str());
    return 1;
  }
  for (size_t k = 0; k < shares->size(); ++k) {
    absl::PrintF("client %d: %d tokens\n", k, (*shares)[k].tokens);
  }
  absl::PrintF("wrote %d client shards and clients.tsv to %s\n", shares->size(), o.out_dir);
  return 0;
}
