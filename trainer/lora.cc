// LoRA adapters over ops/lowrank: forward, backward with frozen or trained A, per-sample
// gradients, orthonormal initialisation.
#include "trainer/lora.h"

#include <algorithm>

#include <Eigen/Core>
#include <Eigen/QR>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "ops/lowrank.h"

namespace qtrain {

bool LoraOptions::Targets(const std::string& linear_name) const {
  if (!enabled()) return false;
  for (const std::string& t : targets) {
    if (absl::EndsWith(linear_name, "." + t)) return true;
  }
  return false;
}

LoraModule::LoraModule(ParamStore* store, int a_index, int b_index, int in_features,
                       int out_features, int rank, float scale, bool train_a)
    : store_(store),
      a_(a_index),
      b_(b_index),
      in_(in_features),
      out_(out_features),
      rank_(rank),
      train_a_(train_a),
      gamma_(rank, scale) {}

void LoraModule::Forward(float* out, const float* inp, int N) {
  hidden_.resize(static_cast<size_t>(N) * rank_);
  ops::lowrank_forward(out, hidden_.data(), inp, store_->param(b_), store_->param(a_),
                       gamma_.data(), N, in_, out_, rank_, rank_);
}

void LoraModule::Backward(float* dinp, const float* dout, const float* inp, int N,
                          const PerSampleGrads* ps) {
  float* da = train_a_ ? store_->grad(a_) : nullptr;
  ops::lowrank_backward(dinp, store_->grad(b_), da, dout, inp, hidden_.data(), store_->param(b_),
                        store_->param(a_), gamma_.data(), N, in_, out_, rank_, rank_);
  if (ps != nullptr && ps->data != nullptr) {
    const int64_t b_off = store_->info(b_).offset, a_off = store_->info(a_).offset;
    ops::lowrank_backward_per_sample(ps->data + b_off, train_a_ ? ps->data + a_off : nullptr,
                                     ps->stride, dout, inp, hidden_.data(), store_->param(b_),
                                     gamma_.data(), ps->samples, ps->rows_per_sample, in_, out_,
                                     rank_, rank_);
  }
}

void LoraModule::Init(Rng* rng) {
  // rank <= in_features is checked where the adapters are made (Gpt::Create).
  (void)OrthonormalRows(store_->param(a_), rank_, in_, rng);
  std::fill(store_->param(b_), store_->param(b_) + store_->info(b_).size, 0.0f);
}

absl::Status OrthonormalRows(float* a, int rows, int cols, Rng* rng) {
  if (rows <= 0 || rows > cols) {
    return absl::InvalidArgumentError(
        absl::StrCat("orthonormal rows: need 0 < rows <= cols, got ", rows, " x ", cols));
  }
  Eigen::MatrixXd g(cols, rows);
  for (int j = 0; j < rows; ++j) {
    for (int i = 0; i < cols; ++i) g(i, j) = rng->Normal();
  }
  const Eigen::HouseholderQR<Eigen::MatrixXd> qr(g);
  const Eigen::MatrixXd q = qr.householderQ() * Eigen::MatrixXd::Identity(cols, rows);
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < cols; ++c) a[static_cast<int64_t>(r) * cols + c] = static_cast<float>(q(c, r));
  }
  return absl::OkStatus();
}

}  // namespace qtrain
