// Aggregation rules: a 3-client round by hand for each of FedSVD, FFA-LoRA and FedAvg-LoRA
// (with the discrepancy), FedSVD's invariants on random updates (B A unchanged, A A^T = I, the
// spectrum of the full product), FFA-LoRA's exact average, and updates refused by name.
#include "distributed/federated/aggregate.h"

#include <cmath>
#include <random>
#include <vector>

#include <Eigen/Core>
#include <Eigen/SVD>

#include "gtest/gtest.h"

namespace qtrain::federated {
namespace {

// One adapted Linear with out = 2, in = 3, rank = 2: B (2x2) at 0, A (2x3) at 4.
AdapterLayout TinyLayout() {
  ParamStore s;
  s.Add("l.lora_b", {2, 2}, false);
  s.Add("l.lora_a", {2, 3}, false);
  s.Finalize();
  return *AdapterLayout::FromStore(s);
}

// B = I, A = the first two unit rows: the adapter before the round.
std::vector<float> TinyAdapter() { return {1, 0, 0, 1, /*A*/ 1, 0, 0, 0, 1, 0}; }

// B updates of three clients with 1, 2 and 3 samples (p = 1/6, 2/6, 3/6), chosen so that
// sum_k p_k dB_k = diag(2, 3) and B' = B + that = diag(3, 4).
std::vector<ClientUpdate> TinyBUpdates() {
  return {{"c1", {6, 0, 0, 0}, 1}, {"c2", {0, 0, 0, 9}, 2}, {"c3", {2, 0, 0, 0}, 3}};
}

TEST(AdapterLayout, FromAModelsAdapterStore) {
  ParamStore s;
  s.Add("block.0.attn.qkv.lora_b", {12, 2}, false);
  s.Add("block.0.mlp.fc.lora_b", {16, 2}, false);
  s.Add("block.0.attn.qkv.lora_a", {2, 4}, false);
  s.Add("block.0.mlp.fc.lora_a", {2, 4}, false);
  s.Finalize();
  absl::StatusOr<AdapterLayout> l = AdapterLayout::FromStore(s);
  ASSERT_TRUE(l.ok()) << l.status();
  ASSERT_EQ(l->modules.size(), 2u);
  EXPECT_EQ(l->modules[1].name, "block.0.mlp.fc");
  EXPECT_EQ(l->modules[1].out, 16);
  EXPECT_EQ(l->modules[1].in, 4);
  EXPECT_EQ(l->modules[1].b_offset, 24);
  EXPECT_EQ(l->modules[1].a_offset, 64);
  EXPECT_EQ(l->b_size, 56);
  EXPECT_EQ(l->size, 72);
  EXPECT_EQ(l->update_size(Aggregation::kFfaLora), 56);
  EXPECT_EQ(l->update_size(Aggregation::kFedAvgLora), 72);
  ParamStore bad;
  bad.Add("x.lora_b", {4, 2}, false);
  bad.Finalize();
  EXPECT_FALSE(AdapterLayout::FromStore(bad).ok());  // B without A
}

TEST(Aggregate, FfaLoraByHand) {
  std::vector<float> w = TinyAdapter();
  absl::StatusOr<AggregateStats> st =
      Aggregate(Aggregation::kFfaLora, TinyLayout(), TinyBUpdates(), &w);
  ASSERT_TRUE(st.ok()) << st.status();
  // B' = diag(3, 4), A untouched.
  EXPECT_EQ(w, (std::vector<float>{3, 0, 0, 4, 1, 0, 0, 0, 1, 0}));
  EXPECT_EQ(st->clients, 3);
  EXPECT_EQ(st->samples, 6);
  EXPECT_EQ(st->discrepancy, 0.0);
}

TEST(Aggregate, FedSvdByHand) {
  std::vector<float> w = TinyAdapter();
  AggregateOptions o;
  o.verify_refactor = true;
  absl::StatusOr<AggregateStats> st =
      Aggregate(Aggregation::kFedSvd, TinyLayout(), TinyBUpdates(), &w, o);
  ASSERT_TRUE(st.ok()) << st.status();
  // B' A = [[3, 0, 0], [0, 4, 0]]: singular values 4 then 3, so the components swap:
  // A' = (±e2, ±e1), B' = U S = [[0, ±3], [±4, 0]], signs paired so that B' A' is unchanged.
  const float* b = w.data();
  const float* a = w.data() + 4;
  EXPECT_NEAR(std::fabs(a[1]), 1.0f, 1e-6);  // A'[0] = ±e2
  EXPECT_NEAR(a[0], 0.0f, 1e-6);
  EXPECT_NEAR(a[2], 0.0f, 1e-6);
  EXPECT_NEAR(std::fabs(a[3]), 1.0f, 1e-6);  // A'[1] = ±e1
  EXPECT_NEAR(a[4], 0.0f, 1e-6);
  EXPECT_NEAR(std::fabs(b[2]), 4.0f, 1e-5);  // B'[1][0]
  EXPECT_NEAR(std::fabs(b[1]), 3.0f, 1e-5);  // B'[0][1]
  EXPECT_NEAR(b[0], 0.0f, 1e-5);
  EXPECT_NEAR(b[3], 0.0f, 1e-5);
  // The product, entry by entry.
  const float want[2][3] = {{3, 0, 0}, {0, 4, 0}};
  for (int o2 = 0; o2 < 2; ++o2) {
    for (int c = 0; c < 3; ++c) {
      const float got = b[o2 * 2 + 0] * a[0 * 3 + c] + b[o2 * 2 + 1] * a[1 * 3 + c];
      EXPECT_NEAR(got, want[o2][c], 1e-5) << o2 << "," << c;
    }
  }
  EXPECT_LT(st->orthonormality_error, 1e-6);
  EXPECT_LT(st->product_change, 1e-6);
}

TEST(Aggregate, FedAvgLoraByHandWithItsDiscrepancy) {
  // Client 1 also moved A: dA_1 = 6 at A[0][2], so mean(A) = [[1, 0, 1], [0, 1, 0]].
  std::vector<ClientUpdate> u = TinyBUpdates();
  for (ClientUpdate& c : u) c.delta.resize(10, 0.0f);
  u[0].delta[4 + 2] = 6;
  std::vector<float> w = TinyAdapter();
  absl::StatusOr<AggregateStats> st = Aggregate(Aggregation::kFedAvgLora, TinyLayout(), u, &w);
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_EQ(w, (std::vector<float>{3, 0, 0, 4, 1, 0, 1, 0, 1, 0}));
  // mean(B) mean(A) = [[3, 0, 3], [0, 4, 0]]; mean(B_k A_k) = 1/6 [[7, 0, 42], [0, 1, 0]]
  // + 2/6 [[1, 0, 0], [0, 10, 0]] + 3/6 [[3, 0, 0], [0, 1, 0]] = [[3, 0, 7], [0, 4, 0]];
  // their difference has norm 4, the reference sqrt(9 + 49 + 16).
  EXPECT_NEAR(st->discrepancy, 4.0 / std::sqrt(74.0), 1e-12);
}

// Random modules and clients, with layouts of several Linears.
struct Random {
  AdapterLayout layout;
  std::vector<float> adapter;
  std::vector<ClientUpdate> updates;
};

Random MakeRandom(Aggregation a, int clients, uint32_t seed, bool orthonormal_a) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  ParamStore s;
  const int dims[3][2] = {{48, 16}, {16, 16}, {64, 16}};  // (out, in), as qkv / proj / fc
  const int r = 8;
  for (const auto& d : dims) s.Add("m" + std::to_string(d[0]) + ".lora_b", {d[0], r}, false);
  for (const auto& d : dims) s.Add("m" + std::to_string(d[0]) + ".lora_a", {r, d[1]}, false);
  s.Finalize();
  Random out{*AdapterLayout::FromStore(s), std::vector<float>(s.num_elements()), {}};
  for (float& v : out.adapter) v = n01(gen);
  if (orthonormal_a) {
    for (const AdapterLayout::Module& m : out.layout.modules) {
      // An orthonormal A as the clients get it: re-factorise B A once.
      RefactorBySvd(out.adapter.data() + m.a_offset, out.adapter.data() + m.b_offset, m.in,
                    m.out, m.rank);
    }
  }
  for (int k = 0; k < clients; ++k) {
    ClientUpdate u{"client" + std::to_string(k),
                   std::vector<float>(out.layout.update_size(a)), 10 + 7 * k};
    for (float& v : u.delta) v = 0.1f * n01(gen);
    out.updates.push_back(std::move(u));
  }
  return out;
}

TEST(Aggregate, FedSvdKeepsTheProductAndMakesAOrthonormal) {
  Random r = MakeRandom(Aggregation::kFedSvd, 5, 1, /*orthonormal_a=*/true);
  // What the re-factorisation must preserve: (B + sum p dB) A_prev.
  std::vector<float> ffa = r.adapter;
  ASSERT_TRUE(Aggregate(Aggregation::kFfaLora, r.layout, r.updates, &ffa).ok());
  AggregateOptions o;
  o.verify_refactor = true;
  absl::StatusOr<AggregateStats> st =
      Aggregate(Aggregation::kFedSvd, r.layout, r.updates, &r.adapter, o);
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_LT(st->orthonormality_error, 1e-5);
  EXPECT_LT(st->product_change, 1e-5);
  for (const AdapterLayout::Module& m : r.layout.modules) {
    SCOPED_TRACE(m.name);
    const float* a = r.adapter.data() + m.a_offset;
    const float* b = r.adapter.data() + m.b_offset;
    EXPECT_LT(OrthonormalityError(a, m.in, m.rank), 1e-5);
    EXPECT_LT(RelativeProductChange(a, b, ffa.data() + m.a_offset, ffa.data() + m.b_offset, m.in,
                                    m.out, m.rank),
              1e-5);
    // B's columns are U S: orthogonal, with norms the singular values of the full product in
    // descending order (checked against a full SVD of it).
    using Mat = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    const Mat bm = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic,
                                                  Eigen::RowMajor>>(b, m.out, m.rank)
                       .cast<double>();
    const Mat prod =
        Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(
            ffa.data() + m.b_offset, m.out, m.rank)
            .cast<double>() *
        Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>(
            ffa.data() + m.a_offset, m.rank, m.in)
            .cast<double>();
    const Eigen::BDCSVD<Mat> full(prod);
    const Mat gram = bm.transpose() * bm;
    for (int i = 0; i < m.rank; ++i) {
      const double sv = full.singularValues()(i);
      EXPECT_NEAR(std::sqrt(gram(i, i)), sv, 1e-5 * full.singularValues()(0)) << i;
      for (int j = 0; j < m.rank; ++j) {
        if (i != j) EXPECT_NEAR(gram(i, j), 0.0, 1e-5 * gram(0, 0)) << i << "," << j;
      }
    }
  }
}

TEST(Aggregate, FedSvdOnANonOrthonormalAStillFactorsTheProduct) {
  Random r = MakeRandom(Aggregation::kFedSvd, 3, 2, /*orthonormal_a=*/false);
  std::vector<float> ffa = r.adapter;
  ASSERT_TRUE(Aggregate(Aggregation::kFfaLora, r.layout, r.updates, &ffa).ok());
  AggregateOptions o;
  o.verify_refactor = true;
  absl::StatusOr<AggregateStats> st =
      Aggregate(Aggregation::kFedSvd, r.layout, r.updates, &r.adapter, o);
  ASSERT_TRUE(st.ok());
  EXPECT_LT(st->orthonormality_error, 1e-5);
  EXPECT_LT(st->product_change, 1e-5);
}

TEST(Aggregate, FfaLoraIsTheExactAverageOfTheProducts) {
  Random r = MakeRandom(Aggregation::kFfaLora, 4, 3, true);
  const std::vector<float> before = r.adapter;
  absl::StatusOr<AggregateStats> st =
      Aggregate(Aggregation::kFfaLora, r.layout, r.updates, &r.adapter);
  ASSERT_TRUE(st.ok());
  double total = 0;
  for (const ClientUpdate& u : r.updates) total += u.samples;
  for (const AdapterLayout::Module& m : r.layout.modules) {
    // A is untouched, bit for bit.
    for (int64_t i = 0; i < int64_t{m.rank} * m.in; ++i) {
      ASSERT_EQ(r.adapter[m.a_offset + i], before[m.a_offset + i]);
    }
    const float* a = before.data() + m.a_offset;
    for (int o = 0; o < m.out; ++o) {
      for (int c = 0; c < m.in; ++c) {
        double want = 0, got = 0;
        for (const ClientUpdate& u : r.updates) {
          double bk_a = 0;
          for (int j = 0; j < m.rank; ++j) {
            const int64_t bi = m.b_offset + o * m.rank + j;
            bk_a += (double(before[bi]) + u.delta[bi]) * a[j * m.in + c];
          }
          want += u.samples / total * bk_a;
        }
        for (int j = 0; j < m.rank; ++j) {
          got += double(r.adapter[m.b_offset + o * m.rank + j]) * a[j * m.in + c];
        }
        ASSERT_NEAR(got, want, 1e-5 * (1 + std::fabs(want)));
      }
    }
  }
}

TEST(Aggregate, FedAvgLoraDiscrepancyIsZeroOnlyWhenAStaysPut) {
  Random r = MakeRandom(Aggregation::kFedAvgLora, 3, 4, true);
  std::vector<float> w = r.adapter;
  absl::StatusOr<AggregateStats> moved = Aggregate(Aggregation::kFedAvgLora, r.layout, r.updates, &w);
  ASSERT_TRUE(moved.ok());
  EXPECT_GT(moved->discrepancy, 1e-3);
  for (ClientUpdate& u : r.updates) {
    std::fill(u.delta.begin() + r.layout.b_size, u.delta.end(), 0.0f);
  }
  w = r.adapter;
  absl::StatusOr<AggregateStats> still = Aggregate(Aggregation::kFedAvgLora, r.layout, r.updates, &w);
  ASSERT_TRUE(still.ok());
  EXPECT_LT(still->discrepancy, 1e-6);
}

TEST(Aggregate, BadUpdatesAreRefusedByClientAndNothingChanges) {
  const AdapterLayout l = TinyLayout();
  const std::vector<float> before = TinyAdapter();
  auto expect_error = [&](Aggregation a, std::vector<ClientUpdate> u, const std::string& text) {
    std::vector<float> w = before;
    absl::StatusOr<AggregateStats> st = Aggregate(a, l, u, &w);
    ASSERT_FALSE(st.ok()) << text;
    EXPECT_NE(st.status().message().find(text), std::string::npos) << st.status();
    EXPECT_EQ(w, before);
  };
  std::vector<ClientUpdate> u = TinyBUpdates();
  u[1].delta.push_back(0);
  expect_error(Aggregation::kFedSvd, u, "client 'c2' sent 5 floats, FedSVD expects 4");
  expect_error(Aggregation::kFedAvgLora, TinyBUpdates(), "client 'c1' sent 4 floats");
  u = TinyBUpdates();
  u[2].delta[3] = std::nanf("");
  expect_error(Aggregation::kFfaLora, u, "client 'c3' sent a non-finite value at 3");
  u = TinyBUpdates();
  u[0].samples = 0;
  expect_error(Aggregation::kFfaLora, u, "client 'c1' reports 0 samples");
  expect_error(Aggregation::kFfaLora, {}, "no client updates");
}

}  // namespace
}  // namespace qtrain::federated
