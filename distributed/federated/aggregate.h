// Server-side aggregation of federated LoRA updates (Eigen, float64 arithmetic), one call per
// round over the clients that answered:
//   FedAvg-LoRA: A and B averaged separately (weights p_k by sample count); the known
//     discrepancy ||mean(B) mean(A) - mean(B A)|| / ||mean(B A)|| is measured.
//   FFA-LoRA:    A frozen, B averaged: the average of the products, exactly.
//   FedSVD:      B' = B + sum_k p_k dB_k, then B' A = U S V^T and A = V^T[:r], B = U[:, :r] S[:r]
//                (B A unchanged, A A^T = I), computed from the QR of A^T and the SVD of the
//                (out x r) matrix B' R^T instead of the full (out x in) product.
// The adapter is the flat buffer of a model's lora_params(): every B, then every A.
#ifndef QTRAIN_DISTRIBUTED_FEDERATED_AGGREGATE_H_
#define QTRAIN_DISTRIBUTED_FEDERATED_AGGREGATE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "trainer/param_store.h"

namespace qtrain::federated {

enum class Aggregation { kFedSvd, kFedAvgLora, kFfaLora };

const char* AggregationName(Aggregation a);

// Where each adapted Linear's A (rank, in) and B (out, rank) live in the flat adapter.
struct AdapterLayout {
  struct Module {
    std::string name;  // the Linear, e.g. "block.0.attn.qkv"
    int in = 0, out = 0, rank = 0;
    int64_t a_offset = 0, b_offset = 0;
  };
  std::vector<Module> modules;
  int64_t size = 0;    // floats of the whole adapter
  int64_t b_size = 0;  // floats of the leading B range: what a client with frozen A sends

  // From a model's adapter store ("<linear>.lora_b" tensors, then "<linear>.lora_a").
  static absl::StatusOr<AdapterLayout> FromStore(const ParamStore& lora);
  // Floats a client sends under `a`: B only, or A and B under FedAvg-LoRA.
  int64_t update_size(Aggregation a) const {
    return a == Aggregation::kFedAvgLora ? size : b_size;
  }
};

struct ClientUpdate {
  std::string client;          // named in errors
  std::vector<float> delta;    // trained minus received: update_size() floats
  int64_t samples = 0;         // > 0; p_k = samples / total
};

struct AggregateOptions {
  // FedAvg-LoRA: measure the discrepancy (from r x r Gram matrices: cheap).
  bool measure_discrepancy = true;
  // FedSVD: measure product_change from the stored float factors (two (out x in) products per
  // module; the rule does not need them).
  bool verify_refactor = false;
};

struct AggregateStats {
  int clients = 0;
  int64_t samples = 0;
  // FedAvg-LoRA: sqrt(sum_m ||B A - sum_k p_k B_k A_k||^2) / sqrt(sum_m ||sum_k p_k B_k A_k||^2)
  // over modules m, with B, A the averages; 0 under the other rules.
  double discrepancy = 0;
  // FedSVD: the largest |A A^T - I| after the re-factorisation and, with verify_refactor, the
  // largest relative change of B A it made (float rounding only).
  double product_change = 0;
  double orthonormality_error = 0;
  double seconds = 0;
};

// One round: folds `updates` into `adapter` (layout.size floats) by rule `a`. Every update is
// checked (size, finite values, samples > 0) before anything changes; an error names the client.
absl::StatusOr<AggregateStats> Aggregate(Aggregation a, const AdapterLayout& layout,
                                         const std::vector<ClientUpdate>& updates,
                                         std::vector<float>* adapter,
                                         const AggregateOptions& options = {});

// FedSVD's re-factorisation of one module in place: A (rank, in), B (out, rank) row-major
// become A' with orthonormal rows and B' = U S (columns by descending singular value) with
// B' A' = B A (in exact arithmetic; A need not be orthonormal before, only of full rank).
void RefactorBySvd(float* a, float* b, int in, int out, int rank);

// |A A^T - I|_max of A (rank, in).
double OrthonormalityError(const float* a, int in, int rank);
// |B' A' - B A|_F / |B A|_F (0 when B A = 0) of two factorisations of one module.
double RelativeProductChange(const float* a_new, const float* b_new, const float* a_old,
                             const float* b_old, int in, int out, int rank);

}  // namespace qtrain::federated

#endif  // QTRAIN_DISTRIBUTED_FEDERATED_AGGREGATE_H_
