// ClientData, ClientPattern, SplitByGenre.
#include "distributed/federated/client_data.h"

#include <glob.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "ops/status_macros.h"
#include "trainer/atomic_file.h"
#include "trainer/shard.h"

namespace qtrain::federated {
namespace {

absl::StatusOr<std::vector<std::string>> Glob(const std::string& pattern) {
  glob_t g;
  const int rc = ::glob(pattern.c_str(), 0, nullptr, &g);
  std::vector<std::string> paths;
  if (rc == 0) {
    for (size_t i = 0; i < g.gl_pathc; ++i) paths.emplace_back(g.gl_pathv[i]);
  }
  ::globfree(&g);
  if (paths.empty()) {
    return absl::NotFoundError(absl::StrCat("no client data shards match '", pattern, "'"));
  }
  std::sort(paths.begin(), paths.end());
  return paths;
}

// Gamma(shape, 1) by Marsaglia and Tsang (2000), boosted for shape < 1; from our own Rng so the
// split is the same on every platform.
double Gamma(double shape, Rng* rng) {
  if (shape < 1) return Gamma(shape + 1, rng) * std::pow(rng->Uniform() + 1e-300, 1 / shape);
  const double d = shape - 1.0 / 3, c = 1 / std::sqrt(9 * d);
  while (true) {
    double x, v;
    do {
      x = rng->Normal();
      v = 1 + c * x;
    } while (v <= 0);
    v = v * v * v;
    const double u = rng->Uniform();
    if (std::log(u + 1e-300) < 0.5 * x * x + d - d * v + d * std::log(v)) return d * v;
  }
}

struct Doc {
  std::string shard;
  int64_t offset = 0, length = 0;
};

}  // namespace

absl::StatusOr<ClientData> ClientData::Open(const std::string& pattern, int T, int vocab) {
  if (T <= 0) return absl::InvalidArgumentError(absl::StrCat("sequence length ", T));
  ASSIGN_OR_RETURN(std::vector<std::string> paths, Glob(pattern));
  ClientData d;
  d.T_ = T;
  for (const std::string& p : paths) {
    ASSIGN_OR_RETURN(std::vector<uint16_t> t, ReadShard(p, vocab));
    const int64_t base = d.tokens();
    for (int64_t s = 0; s + T + 1 <= static_cast<int64_t>(t.size()); s += T) {
      d.starts_.push_back(base + s);
    }
    d.tokens_.insert(d.tokens_.end(), t.begin(), t.end());
  }
  if (d.starts_.empty()) {
    return absl::FailedPreconditionError(absl::StrCat("client data '", pattern, "' has ",
                                                      d.tokens(), " tokens, fewer than one "
                                                      "sequence of ", T + 1));
  }
  return d;
}

void ClientData::Sequence(int64_t i, int32_t* x, int32_t* y) const {
  const uint16_t* t = tokens_.data() + starts_[i];
  for (int j = 0; j < T_; ++j) {
    x[j] = t[j];
    y[j] = t[j + 1];
  }
}

std::vector<int64_t> ClientData::Poisson(double q, Rng* rng) const {
  std::vector<int64_t> out;
  for (int64_t i = 0; i < sequences(); ++i) {
    if (rng->Uniform() < q) out.push_back(i);
  }
  return out;
}

std::vector<int64_t> ClientData::Uniform(int B, Rng* rng) const {
  // Partial Fisher-Yates over an index map: B distinct draws without touching all N.
  std::map<int64_t, int64_t> swapped;
  std::vector<int64_t> out;
  const int64_t n = sequences();
  for (int i = 0; i < B && i < n; ++i) {
    const int64_t j = i + static_cast<int64_t>(rng->Uniform() * (n - i));
    auto at = [&](int64_t k) {
      auto it = swapped.find(k);
      return it == swapped.end() ? k : it->second;
    };
    const int64_t vj = at(j), vi = at(i);
    swapped[j] = vi;
    out.push_back(vj);
  }
  return out;
}

absl::StatusOr<std::string> ClientPattern(const std::string& pattern, int client,
                                          const std::vector<std::string>& genres) {
  if (pattern.find("{genre}") != std::string::npos && genres.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("client data pattern '", pattern, "' names {genre} but data.genres is empty"));
  }
  std::string out = absl::StrReplaceAll(pattern, {{"{client}", absl::StrCat(client)}});
  if (!genres.empty()) {
    out = absl::StrReplaceAll(out, {{"{genre}", genres[client % genres.size()]}});
  }
  return out;
}

absl::StatusOr<std::vector<ClientShare>> SplitByGenre(const SplitOptions& o) {
  const int G = static_cast<int>(o.genres.size());
  if (o.clients <= 0 || G == 0) {
    return absl::InvalidArgumentError("federated split: needs clients > 0 and some genres");
  }
  if (o.alpha <= 0 && o.clients != G) {
    return absl::InvalidArgumentError(absl::StrCat(
        "federated split: one genre per client needs clients == genres (", G, "), got ",
        o.clients, "; or give a Dirichlet alpha > 0"));
  }
  // The train documents of each genre, from index.tsv.
  const std::string index_path = o.data_dir + "/index.tsv";
  std::ifstream in(index_path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", index_path));
  std::map<std::string, int> genre_index;
  for (int g = 0; g < G; ++g) genre_index[o.genres[g]] = g;
  std::vector<std::vector<Doc>> docs(G);
  std::string line;
  std::getline(in, line);  // header
  int line_no = 1;
  while (std::getline(in, line)) {
    ++line_no;
    const std::vector<std::string> f = absl::StrSplit(line, '\t');
    Doc d;
    if (f.size() != 6 || !absl::SimpleAtoi(f[4], &d.offset) || !absl::SimpleAtoi(f[5], &d.length)) {
      return absl::DataLossError(absl::StrCat(index_path, ":", line_no, ": malformed row"));
    }
    auto it = genre_index.find(f[1]);
    if (it == genre_index.end() || f[2] != "train") continue;
    d.shard = o.data_dir + "/" + f[3];
    docs[it->second].push_back(d);
  }
  for (int g = 0; g < G; ++g) {
    if (docs[g].empty()) {
      return absl::NotFoundError(
          absl::StrCat(index_path, " lists no train documents of genre '", o.genres[g], "'"));
    }
  }
  // Which client gets each document.
  Rng rng(o.seed ^ 0xd1c1e7ull);
  std::vector<std::vector<std::pair<int, const Doc*>>> assigned(o.clients);
  for (int attempt = 0;; ++attempt) {
    for (auto& a : assigned) a.clear();
    for (int g = 0; g < G; ++g) {
      if (o.alpha <= 0) {
        for (const Doc& d : docs[g]) assigned[g].push_back({g, &d});
        continue;
      }
      std::vector<double> p(o.clients);
      double sum = 0;
      for (double& v : p) sum += (v = Gamma(o.alpha, &rng));
      // Shuffle the genre's documents, then cut them at the cumulative proportions.
      std::vector<const Doc*> order;
      for (const Doc& d : docs[g]) order.push_back(&d);
      for (size_t i = order.size(); i > 1; --i) {
        std::swap(order[i - 1], order[static_cast<size_t>(rng.Uniform() * i)]);
      }
      double cum = 0;
      size_t next = 0;
      for (int k = 0; k < o.clients; ++k) {
        cum += p[k] / sum;
        const size_t end = k + 1 == o.clients ? order.size()
                                              : static_cast<size_t>(std::round(cum * order.size()));
        for (; next < end && next < order.size(); ++next) assigned[k].push_back({g, order[next]});
      }
    }
    const bool all = std::all_of(assigned.begin(), assigned.end(),
                                 [](const auto& a) { return !a.empty(); });
    if (all) break;
    if (attempt >= 100) {
      return absl::FailedPreconditionError(absl::StrCat(
          "federated split: some client gets no document in 100 draws of Dirichlet(", o.alpha,
          "); use fewer clients or a larger alpha"));
    }
  }
  // Write each client's documents (tokens from the genre shards, in index order of the draw).
  std::map<std::string, std::vector<uint16_t>> shards;
  std::error_code ec;
  std::filesystem::create_directories(o.out_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", o.out_dir, ": ", ec.message()));
  std::vector<ClientShare> shares(o.clients);
  std::ostringstream tsv;
  tsv << "client\ttokens";
  for (const std::string& g : o.genres) tsv << "\t" << g;
  tsv << "\n";
  for (int k = 0; k < o.clients; ++k) {
    std::vector<uint16_t> out;
    shares[k].genre_tokens.assign(G, 0);
    for (const auto& [g, d] : assigned[k]) {
      auto it = shards.find(d->shard);
      if (it == shards.end()) {
        ASSIGN_OR_RETURN(std::vector<uint16_t> t, ReadShard(d->shard));
        it = shards.emplace(d->shard, std::move(t)).first;
      }
      // The index's offset points past the document's end-of-text marker; keep the marker.
      const int64_t begin = d->offset - 1, end = d->offset + d->length;
      if (begin < 0 || end > static_cast<int64_t>(it->second.size())) {
        return absl::DataLossError(absl::StrCat(d->shard, ": document at ", d->offset,
                                                " runs past the shard's end"));
      }
      out.insert(out.end(), it->second.begin() + begin, it->second.begin() + end);
      shares[k].genre_tokens[g] += end - begin;
    }
    shares[k].tokens = static_cast<int64_t>(out.size());
    RETURN_IF_ERROR(WriteShard(absl::StrCat(o.out_dir, "/client_", k, "_train.bin"), out));
    tsv << k << "\t" << shares[k].tokens;
    for (int64_t t : shares[k].genre_tokens) tsv << "\t" << t;
    tsv << "\n";
  }
  RETURN_IF_ERROR(WriteFileAtomically(o.out_dir + "/clients.tsv", {tsv.str()}));
  return shares;
}

}  // namespace qtrain::federated
