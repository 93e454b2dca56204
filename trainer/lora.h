// LoRA adapters on block Linears of a frozen base: y = base(x) + (alpha / r) (x A^T) B^T with
// A (r, in) and B (out, r) tensors of their own ParamStore (the adapter store), so optimizers,
// checkpoints and federated aggregation see only the adapters. The same low-rank op as QVGen's
// Phi (ops/lowrank.h, L = B, R = A, gamma = alpha / r), plus per-sample gradients for DP-SGD.
#ifndef QTRAIN_TRAINER_LORA_H_
#define QTRAIN_TRAINER_LORA_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "trainer/param_store.h"
#include "trainer/rng.h"

namespace qtrain {

struct LoraOptions {
  int rank = 0;       // r; 0: no adapters
  float alpha = 0;    // the update is scaled by alpha / r
  // Linear suffixes within each block: "attn.qkv", "attn.proj", "mlp.fc", "mlp.proj".
  std::vector<std::string> targets;
  // A is trained too (FedAvg-LoRA); otherwise A stays as initialised (FFA-LoRA) or as the
  // server re-factorises it (FedSVD) and only B has gradients.
  bool train_a = false;

  bool enabled() const { return rank > 0; }
  // True when the block Linear `linear_name` ("block.3.mlp.fc") carries an adapter.
  bool Targets(const std::string& linear_name) const;
};

// Where per-sample gradients go: the gradient share of sample s (rows [s*T, (s+1)*T) of the
// batch) of adapter tensor i is added at data + s * stride + info(i).offset, stride being the
// adapter store's size. Only the trainable factors (B; A with train_a) are written.
struct PerSampleGrads {
  float* data = nullptr;
  int samples = 0;
  int rows_per_sample = 0;
  int64_t stride = 0;
};

// One adapter: A and B are tensors `a_index`, `b_index` of `store`.
class LoraModule {
 public:
  LoraModule(ParamStore* store, int a_index, int b_index, int in_features, int out_features,
             int rank, float scale, bool train_a);

  int a_index() const { return a_; }
  int b_index() const { return b_; }
  int rank() const { return rank_; }
  int in_features() const { return in_; }
  int out_features() const { return out_; }
  float scale() const { return gamma_.empty() ? 0.0f : gamma_[0]; }

  // out (N, out) += scale * (inp A^T) B^T; keeps inp A^T for Backward.
  void Forward(float* out, const float* inp, int N);
  // dinp (N, in) += (may be null), dB +=, and dA += with train_a, from dout (N, out) of the last
  // Forward on `inp`. With per_sample, each sample's share of dB (and dA) goes there too.
  void Backward(float* dinp, const float* dout, const float* inp, int N,
                const PerSampleGrads* per_sample);

  // A with orthonormal rows (the QR of a Gaussian (in, r) matrix, transposed), B = 0: the
  // adapted model starts as the base, and A A^T = I as FFA-LoRA and FedSVD want.
  void Init(Rng* rng);

 private:
  ParamStore* store_;
  int a_, b_, in_, out_, rank_;
  bool train_a_;
  std::vector<float> gamma_;   // rank entries of alpha / r: the op's diagonal
  std::vector<float> hidden_;  // (N, rank) = inp A^T of the last Forward
};

// A (rows, cols) := rows orthonormal rows (rows <= cols) from Gaussian draws of `rng`.
absl::Status OrthonormalRows(float* a, int rows, int cols, Rng* rng);

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_LORA_H_
