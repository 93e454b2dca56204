// TrainLocally: a client's round of AdamW / SGD steps on its adapter, optionally DP-SGD.
#include "distributed/federated/local_training.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "ops/cpu_ops.h"
#include "ops/status_macros.h"

namespace qtrain::federated {
namespace {

// Sequences per forward when a Poisson batch comes out larger than usual.
int ChunkOf(const LocalConfig& c) { return std::max(1, c.batch); }

void Gather(const ClientData& data, const std::vector<int64_t>& idx, size_t begin, size_t n,
            std::vector<int32_t>* x, std::vector<int32_t>* y) {
  const int T = data.T();
  x->resize(n * T);
  y->resize(n * T);
  for (size_t i = 0; i < n; ++i) data.Sequence(idx[begin + i], x->data() + i * T, y->data() + i * T);
}

}  // namespace

LocalConfig LocalConfigFromSpec(const JobSpec& spec) {
  LocalConfig c;
  const OptimizerSpec& o = spec.optimizer();
  c.steps = spec.federated().local_steps();
  c.batch = spec.training().batch_size();
  c.lr = o.lr();
  c.sgd = spec.federated().local_optimizer() == FederatedSpec::SGD;
  c.adam = AdamWConfig{o.beta1(), o.beta2(), o.eps(), o.weight_decay(), o.grad_clip()};
  c.dp_clip = spec.federated().dp_clip();
  c.dp_noise = spec.federated().dp_noise();
  c.seed = spec.seed();
  return c;
}

double DpSampleRate(const LocalConfig& config, const ClientData& data) {
  return std::min(1.0, static_cast<double>(config.batch) / static_cast<double>(data.sequences()));
}

absl::StatusOr<LocalResult> TrainLocally(Gpt* model, const AdapterLayout& layout,
                                         Aggregation aggregation,
                                         const std::vector<float>& adapter,
                                         const ClientData& data, const LocalConfig& config) {
  const auto t0 = std::chrono::steady_clock::now();
  ParamStore& ls = model->lora_params();
  if (static_cast<int64_t>(adapter.size()) != layout.size || ls.num_elements() != layout.size) {
    return absl::InvalidArgumentError(absl::StrCat("local round: the adapter has ", adapter.size(),
                                                   " floats, the model's ", ls.num_elements()));
  }
  if (data.T() > model->config().max_seq_len) {
    return absl::InvalidArgumentError(absl::StrCat("local round: sequences of ", data.T(),
                                                   " exceed the model's max_seq_len"));
  }
  std::copy(adapter.begin(), adapter.end(), ls.params().begin());
  const int64_t n = layout.update_size(aggregation);
  const bool dp = config.dp_clip > 0;
  AdamWConfig ac = config.adam;
  if (dp) ac.grad_clip = 0;  // the clipping that matters is per sample
  // Only the trained factors have optimizer state: B (the leading range), or A and B.
  AdamW adam(ac, ls.num_elements(), 0, n);
  Rng rng(config.seed);
  LocalResult r;
  std::vector<int32_t> x, y;
  std::vector<float> per_sample;
  std::vector<double> sum;
  const int T = data.T();
  const double q = DpSampleRate(config, data);
  double loss_sum = 0;
  for (int step = 0; step < config.steps; ++step) {
    ls.ZeroGrads();
    double step_loss = 0;
    if (!dp) {
      const std::vector<int64_t> idx = data.Uniform(config.batch, &rng);
      Gather(data, idx, 0, idx.size(), &x, &y);
      ASSIGN_OR_RETURN(step_loss, model->Forward(x.data(), y.data(), static_cast<int>(idx.size()),
                                                 T, /*training=*/true));
      RETURN_IF_ERROR(model->Backward(1.0f));
      r.sequences += static_cast<int64_t>(idx.size());
    } else {
      // Poisson batch; per-sample gradients chunk by chunk, each clipped before it is summed.
      const std::vector<int64_t> idx = data.Poisson(q, &rng);
      sum.assign(n, 0.0);
      const int chunk = ChunkOf(config);
      for (size_t b = 0; b < idx.size(); b += chunk) {
        const int m = static_cast<int>(std::min<size_t>(chunk, idx.size() - b));
        Gather(data, idx, b, m, &x, &y);
        per_sample.assign(static_cast<size_t>(m) * ls.num_elements(), 0.0f);
        model->SetLoraPerSampleGrads(per_sample.data());
        absl::StatusOr<double> l = model->Forward(x.data(), y.data(), m, T, /*training=*/true);
        absl::Status back = l.ok() ? model->Backward(static_cast<float>(m)) : l.status();
        model->SetLoraPerSampleGrads(nullptr);
        RETURN_IF_ERROR(back);
        step_loss += *l * m;
        ClipAndAccumulate(per_sample.data(), m, ls.num_elements(), n, config.dp_clip, &sum, &r.clip);
      }
      if (!idx.empty()) step_loss /= static_cast<double>(idx.size());
      r.sequences += static_cast<int64_t>(idx.size());
      // The private gradient replaces what Backward accumulated.
      std::fill(ls.grads().begin(), ls.grads().end(), 0.0f);
      sum.resize(n, 0.0);
      NoisyMean(sum, config.dp_noise, config.dp_clip, q * data.sequences(), &rng,
                ls.grads().data());
    }
    loss_sum += step_loss;
    if (!std::isfinite(step_loss)) {
      return absl::InternalError(absl::StrCat("local round: loss became ", step_loss,
                                              " at step ", step + 1));
    }
    if (config.sgd) {
      float* g = ls.grads().data();
      if (ac.grad_clip > 0) {
        const double norm = std::sqrt(ops::sum_squares(g, n));
        ops::clip_by_global_norm(g, n, norm, ac.grad_clip);
      }
      float* p = ls.params().data();
      for (int64_t i = 0; i < n; ++i) p[i] -= config.lr * g[i];
    } else {
      adam.Step(&ls, config.lr);
    }
  }
  r.mean_loss = loss_sum / std::max(1, config.steps);
  r.delta.resize(n);
  for (int64_t i = 0; i < n; ++i) r.delta[i] = ls.params()[i] - adapter[i];
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace qtrain::federated
