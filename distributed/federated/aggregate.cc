// FedSVD, FFA-LoRA and FedAvg-LoRA aggregation over a flat adapter buffer.
#include "distributed/federated/aggregate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>

#include <Eigen/Core>
#include <Eigen/QR>
#include <Eigen/SVD>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace qtrain::federated {
namespace {

using RowMatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowMatF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MapF = Eigen::Map<RowMatF>;
using ConstMapF = Eigen::Map<const RowMatF>;

RowMatD ToDouble(const float* p, int rows, int cols) {
  return ConstMapF(p, rows, cols).cast<double>();
}

absl::Status CheckUpdates(Aggregation a, const AdapterLayout& layout,
                          const std::vector<ClientUpdate>& updates, size_t adapter_size) {
  if (adapter_size != static_cast<size_t>(layout.size)) {
    return absl::InvalidArgumentError(absl::StrCat("aggregate: the adapter has ", adapter_size,
                                                   " floats, its layout ", layout.size));
  }
  if (updates.empty()) {
    return absl::FailedPreconditionError("aggregate: no client updates this round");
  }
  const int64_t want = layout.update_size(a);
  for (const ClientUpdate& u : updates) {
    if (static_cast<int64_t>(u.delta.size()) != want) {
      return absl::InvalidArgumentError(
          absl::StrCat("aggregate: client '", u.client, "' sent ", u.delta.size(), " floats, ",
                       AggregationName(a), " expects ", want));
    }
    if (u.samples <= 0) {
      return absl::InvalidArgumentError(absl::StrCat("aggregate: client '", u.client,
                                                     "' reports ", u.samples, " samples"));
    }
    for (size_t i = 0; i < u.delta.size(); ++i) {
      if (!std::isfinite(u.delta[i])) {
        return absl::InvalidArgumentError(absl::StrCat(
            "aggregate: client '", u.client, "' sent a non-finite value at ", i));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

const char* AggregationName(Aggregation a) {
  switch (a) {
    case Aggregation::kFedSvd:
      return "FedSVD";
    case Aggregation::kFedAvgLora:
      return "FedAvg-LoRA";
    case Aggregation::kFfaLora:
      return "FFA-LoRA";
  }
  return "?";
}

absl::StatusOr<AdapterLayout> AdapterLayout::FromStore(const ParamStore& lora) {
  AdapterLayout l;
  std::map<std::string, int> index;  // module name -> position in l.modules
  int64_t first_a = lora.num_elements();
  for (const ParamInfo& info : lora.infos()) {
    const bool is_b = absl::EndsWith(info.name, ".lora_b");
    const bool is_a = absl::EndsWith(info.name, ".lora_a");
    if ((!is_a && !is_b) || info.shape.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat("adapter layout: tensor '", info.name,
                                                     "' is not a LoRA factor"));
    }
    const std::string name = info.name.substr(0, info.name.size() - 7);
    if (is_b) {
      if (info.offset > first_a) {
        return absl::InvalidArgumentError(
            absl::StrCat("adapter layout: '", info.name, "' comes after an A tensor"));
      }
      AdapterLayout::Module m;
      m.name = name;
      m.out = static_cast<int>(info.shape[0]);
      m.rank = static_cast<int>(info.shape[1]);
      m.b_offset = info.offset;
      index[name] = static_cast<int>(l.modules.size());
      l.modules.push_back(m);
    } else {
      first_a = std::min(first_a, info.offset);
      auto it = index.find(name);
      if (it == index.end() || l.modules[it->second].rank != info.shape[0]) {
        return absl::InvalidArgumentError(
            absl::StrCat("adapter layout: '", info.name, "' has no matching B of rank ",
                         info.shape[0]));
      }
      l.modules[it->second].in = static_cast<int>(info.shape[1]);
      l.modules[it->second].a_offset = info.offset;
    }
  }
  for (const Module& m : l.modules) {
    if (m.in == 0) {
      return absl::InvalidArgumentError(absl::StrCat("adapter layout: '", m.name,
                                                     ".lora_b' has no A"));
    }
  }
  l.size = lora.num_elements();
  l.b_size = first_a;
  return l;
}

void RefactorBySvd(float* a, float* b, int in, int out, int rank) {
  const RowMatD ad = ToDouble(a, rank, in);
  const RowMatD bd = ToDouble(b, out, rank);
  // A^T = Q R, so B A = (B R^T) Q^T; with B R^T = U S W^T, B A = U S (Q W)^T: the SVD of the
  // (out x in) product from an (in x r) QR and an (out x r) SVD.
  const Eigen::HouseholderQR<Eigen::MatrixXd> qr(ad.transpose());
  const Eigen::MatrixXd q = qr.householderQ() * Eigen::MatrixXd::Identity(in, rank);
  const Eigen::MatrixXd r = qr.matrixQR().topRows(rank).triangularView<Eigen::Upper>();
  const Eigen::MatrixXd p = bd * r.transpose();
  const Eigen::JacobiSVD<Eigen::MatrixXd> svd(p, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const Eigen::MatrixXd a_new = (q * svd.matrixV()).transpose();              // (rank, in)
  const Eigen::MatrixXd b_new = svd.matrixU() * svd.singularValues().asDiagonal();  // (out, rank)
  MapF(a, rank, in) = a_new.cast<float>();
  MapF(b, out, rank) = b_new.cast<float>();
}

double OrthonormalityError(const float* a, int in, int rank) {
  const RowMatD ad = ToDouble(a, rank, in);
  return (ad * ad.transpose() - Eigen::MatrixXd::Identity(rank, rank)).cwiseAbs().maxCoeff();
}

double RelativeProductChange(const float* a_new, const float* b_new, const float* a_old,
                             const float* b_old, int in, int out, int rank) {
  const RowMatD before = ToDouble(b_old, out, rank) * ToDouble(a_old, rank, in);
  const RowMatD after = ToDouble(b_new, out, rank) * ToDouble(a_new, rank, in);
  const double norm = before.norm();
  return norm > 0 ? (after - before).norm() / norm : 0.0;
}

absl::StatusOr<AggregateStats> Aggregate(Aggregation a, const AdapterLayout& layout,
                                         const std::vector<ClientUpdate>& updates,
                                         std::vector<float>* adapter,
                                         const AggregateOptions& options) {
  const auto t0 = std::chrono::steady_clock::now();
  if (auto s = CheckUpdates(a, layout, updates, adapter->size()); !s.ok()) return s;
  AggregateStats stats;
  stats.clients = static_cast<int>(updates.size());
  for (const ClientUpdate& u : updates) stats.samples += u.samples;
  std::vector<double> p;
  for (const ClientUpdate& u : updates) {
    p.push_back(static_cast<double>(u.samples) / static_cast<double>(stats.samples));
  }

  // FedAvg-LoRA's reference, the weighted mean of the clients' products sum_k p_k B_k A_k, is
  // never formed: with the average's factors as term 0 (coefficient 1) and the clients as terms
  // k (coefficient -p_k), ||sum_j c_j B_j A_j||^2 = sum_ij c_i c_j tr((B_i^T B_j)(A_j A_i^T)),
  // r x r products only. The clients' factors are kept here; the average's come after it.
  struct Factors {
    RowMatD b, a;
  };
  std::vector<std::vector<Factors>> clients_factors;  // [module][client]
  const bool discrepancy = a == Aggregation::kFedAvgLora && options.measure_discrepancy;
  if (discrepancy) {
    for (const AdapterLayout::Module& m : layout.modules) {
      const RowMatD b0 = ToDouble(adapter->data() + m.b_offset, m.out, m.rank);
      const RowMatD a0 = ToDouble(adapter->data() + m.a_offset, m.rank, m.in);
      std::vector<Factors> f;
      for (const ClientUpdate& u : updates) {
        f.push_back({b0 + ToDouble(u.delta.data() + m.b_offset, m.out, m.rank),
                     a0 + ToDouble(u.delta.data() + m.a_offset, m.rank, m.in)});
      }
      clients_factors.push_back(std::move(f));
    }
  }

  // The weighted mean of the deltas, summed in double in client order.
  const int64_t n = layout.update_size(a);
  std::vector<double> mean(n, 0.0);
  for (size_t k = 0; k < updates.size(); ++k) {
    const float* d = updates[k].delta.data();
    for (int64_t i = 0; i < n; ++i) mean[i] += p[k] * d[i];
  }
  float* w = adapter->data();
  for (int64_t i = 0; i < n; ++i) w[i] = static_cast<float>(w[i] + mean[i]);

  if (discrepancy) {
    double diff2 = 0, ref2 = 0;
    const size_t K = updates.size();
    for (size_t mi = 0; mi < layout.modules.size(); ++mi) {
      const AdapterLayout::Module& m = layout.modules[mi];
      std::vector<const RowMatD*> bs, as;
      std::vector<double> c;
      const RowMatD b_avg = ToDouble(w + m.b_offset, m.out, m.rank);
      const RowMatD a_avg = ToDouble(w + m.a_offset, m.rank, m.in);
      bs.push_back(&b_avg);
      as.push_back(&a_avg);
      c.push_back(1.0);
      for (size_t k = 0; k < K; ++k) {
        bs.push_back(&clients_factors[mi][k].b);
        as.push_back(&clients_factors[mi][k].a);
        c.push_back(-p[k]);
      }
      for (size_t i = 0; i <= K; ++i) {
        for (size_t j = 0; j <= K; ++j) {
          const double t = ((*bs[i]).transpose() * (*bs[j]) * ((*as[j]) * (*as[i]).transpose()))
                               .trace();
          diff2 += c[i] * c[j] * t;
          if (i > 0 && j > 0) ref2 += c[i] * c[j] * t;
        }
      }
    }
    stats.discrepancy = ref2 > 0 ? std::sqrt(std::max(0.0, diff2) / ref2) : 0.0;
  }
  if (a == Aggregation::kFedSvd) {
    for (const AdapterLayout::Module& m : layout.modules) {
      float* am = w + m.a_offset;
      float* bm = w + m.b_offset;
      std::vector<float> a_old, b_old;
      if (options.verify_refactor) {
        a_old.assign(am, am + static_cast<int64_t>(m.rank) * m.in);
        b_old.assign(bm, bm + static_cast<int64_t>(m.out) * m.rank);
      }
      RefactorBySvd(am, bm, m.in, m.out, m.rank);
      stats.orthonormality_error =
          std::max(stats.orthonormality_error, OrthonormalityError(am, m.in, m.rank));
      if (options.verify_refactor) {
        stats.product_change = std::max(
            stats.product_change, RelativeProductChange(am, bm, a_old.data(), b_old.data(), m.in,
                                                        m.out, m.rank));
      }
    }
  }
  stats.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return stats;
}

}  // namespace qtrain::federated
