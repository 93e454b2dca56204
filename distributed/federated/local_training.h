// A client's local round: from the adapter the server sent, `steps` optimizer steps on the
// client's own data (AdamW or SGD; with DP-SGD: Poisson batches, per-sample clipping and
// Gaussian noise), and the update to send back (trained minus received, over the factors the
// aggregation rule trains: B, or A and B under FedAvg-LoRA).
#ifndef QTRAIN_DISTRIBUTED_FEDERATED_LOCAL_TRAINING_H_
#define QTRAIN_DISTRIBUTED_FEDERATED_LOCAL_TRAINING_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "configs/job_spec.pb.h"
#include "distributed/federated/aggregate.h"
#include "distributed/federated/client_data.h"
#include "distributed/federated/dp_sgd.h"
#include "trainer/gpt.h"
#include "trainer/optimizer.h"

namespace qtrain::federated {

struct LocalConfig {
  int steps = 1;
  int batch = 1;       // sequences per step (DP: the expected Poisson batch)
  float lr = 1e-3f;
  bool sgd = false;    // plain SGD instead of AdamW
  AdamWConfig adam;    // beta1/2, eps, weight decay; grad_clip also clips SGD (0: off)
  float dp_clip = 0;   // > 0: DP-SGD with per-sample clip C (grad_clip is then not applied)
  double dp_noise = 0; // sigma
  uint64_t seed = 0;   // batches and noise
};

struct LocalResult {
  std::vector<float> delta;  // layout.update_size(aggregation) floats
  double mean_loss = 0;      // over the steps (each the mean over its batch's tokens)
  int64_t sequences = 0;     // drawn over the round
  ClipStats clip;            // DP only
  double seconds = 0;
};

// The local config of a job: training.batch_size, optimizer.*, federated.local_steps and
// local_optimizer, dp_clip; lr, sigma and seed come from the task.
LocalConfig LocalConfigFromSpec(const JobSpec& spec);

// Sample rate of DP-SGD's Poisson batches on `data`: batch / sequences (at most 1).
double DpSampleRate(const LocalConfig& config, const ClientData& data);

// Runs the round on `model` (a LoRA model of the job: lora_params() has `layout`), starting
// from `adapter` (layout.size floats).
absl::StatusOr<LocalResult> TrainLocally(Gpt* model, const AdapterLayout& layout,
                                         Aggregation aggregation,
                                         const std::vector<float>& adapter,
                                         const ClientData& data, const LocalConfig& config);

}  // namespace qtrain::federated

#endif  // QTRAIN_DISTRIBUTED_FEDERATED_LOCAL_TRAINING_H_
