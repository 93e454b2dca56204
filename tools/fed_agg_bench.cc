// fed_agg_bench: the federated server's aggregation time per round and the bytes each client
// downloads and uploads per round, for LoRA of rank r on every block Linear of a GPT-2 shape
// (random adapters and updates: the arithmetic does not depend on the values). JSON on stdout.
#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "distributed/federated/aggregate.h"
#include "trainer/param_store.h"

ABSL_FLAG(int, n_layer, 12, "blocks");
ABSL_FLAG(int, n_embd, 768, "width C");
ABSL_FLAG(int, rank, 8, "LoRA rank");
ABSL_FLAG(int, clients, 4, "updates per round");
ABSL_FLAG(int, repeats, 5, "timed rounds per rule (the median is reported)");

using qtrain::ParamStore;
using namespace qtrain::federated;

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const int L = absl::GetFlag(FLAGS_n_layer), C = absl::GetFlag(FLAGS_n_embd);
  const int r = absl::GetFlag(FLAGS_rank), K = absl::GetFlag(FLAGS_clients);
  const int repeats = absl::GetFlag(FLAGS_repeats);
  // (out, in) of qkv, attn.proj, mlp.fc, mlp.proj: the order Gpt::Create registers them.
  const int shapes[4][2] = {{3 * C, C}, {C, C}, {4 * C, C}, {C, 4 * C}};
  const char* names[4] = {"attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"};
  ParamStore s;
  for (int l = 0; l < L; ++l) {
    for (int i = 0; i < 4; ++i) {
      s.Add(absl::StrCat("block.", l, ".", names[i], ".lora_b"), {shapes[i][0], r}, false);
    }
  }
  for (int l = 0; l < L; ++l) {
    for (int i = 0; i < 4; ++i) {
      s.Add(absl::StrCat("block.", l, ".", names[i], ".lora_a"), {r, shapes[i][1]}, false);
    }
  }
  s.Finalize();
  const AdapterLayout layout = *AdapterLayout::FromStore(s);
  std::mt19937 gen(1);
  std::normal_distribution<float> n01;
  std::vector<float> adapter(layout.size);
  for (float& v : adapter) v = 0.02f * n01(gen);
  for (const AdapterLayout::Module& m : layout.modules) {
    RefactorBySvd(adapter.data() + m.a_offset, adapter.data() + m.b_offset, m.in, m.out, m.rank);
  }
  std::printf("{\"n_layer\": %d, \"n_embd\": %d, \"rank\": %d, \"clients\": %d, "
              "\"adapter_floats\": %lld, \"b_floats\": %lld, \"rules\": {",
              L, C, r, K, static_cast<long long>(layout.size),
              static_cast<long long>(layout.b_size));
  const Aggregation rules[] = {Aggregation::kFedSvd, Aggregation::kFfaLora,
                               Aggregation::kFedAvgLora};
  for (int ri = 0; ri < 3; ++ri) {
    const Aggregation a = rules[ri];
    std::vector<ClientUpdate> updates;
    for (int k = 0; k < K; ++k) {
      ClientUpdate u{absl::StrCat("c", k), std::vector<float>(layout.update_size(a)), 100 + k};
      for (float& v : u.delta) v = 1e-3f * n01(gen);
      updates.push_back(std::move(u));
    }
    for (bool measure : {false, true}) {
      if (measure && a != Aggregation::kFedAvgLora) continue;
      std::vector<double> ms;
      AggregateOptions o;
      o.measure_discrepancy = measure;
      double extra = 0;
      for (int i = 0; i < repeats; ++i) {
        std::vector<float> w = adapter;
        absl::StatusOr<AggregateStats> st = Aggregate(a, layout, updates, &w, o);
        if (!st.ok()) {
          std::fprintf(stderr, "fed_agg_bench: %s\n", std::string(st.status().message()).c_str());
          return 1;
        }
        ms.push_back(st->seconds * 1e3);
        extra = a == Aggregation::kFedSvd ? st->orthonormality_error : st->discrepancy;
      }
      std::sort(ms.begin(), ms.end());
      const std::string key =
          absl::StrCat(AggregationName(a), measure ? " (with discrepancy)" : "");
      std::printf("%s\"%s\": {\"aggregate_ms_median\": %.3f, \"aggregate_ms_min\": %.3f, "
                  "\"bytes_down_per_client\": %lld, \"bytes_up_per_client\": %lld, "
                  "\"%s\": %.3g}",
                  ri == 0 && !measure ? "" : ", ", key.c_str(), ms[ms.size() / 2], ms[0],
                  static_cast<long long>(layout.size * 4),
                  static_cast<long long>(layout.update_size(a) * 4),
                  a == Aggregation::kFedSvd ? "orthonormality_error" : "discrepancy", extra);
    }
  }
  std::printf("}}\n");
  return 0;
}
