// Training checkpoints: one safetensors file per save holding the weights ("model/<name>"),
// the AdamW moments ("adam_m/<name>", "adam_v/<name>") and, as metadata, the step, data
// position, RNG state, the job spec and the data-parallel shape that wrote it; written
// atomically under <out_dir>/checkpoints/. A checkpoint does not depend on the world size: the
// data position is global and ZeRO-1 moments are gathered before saving.
#ifndef QTRAIN_TRAINER_CHECKPOINT_H_
#define QTRAIN_TRAINER_CHECKPOINT_H_

#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "trainer/atomic_file.h"
#include "trainer/data_loader.h"
#include "trainer/optimizer.h"
#include "trainer/param_store.h"
#include "trainer/rng.h"

namespace qtrain {

struct TrainState {
  int step = 0;  // optimizer steps completed
  DataPosition data;
  std::string rng;       // Rng::Serialize()
  std::string job_spec;  // text format
  // Data-parallel ranks of the writer and sequences per optimizer step over all of them
  // (world * batch_size * grad_accum); 0 when unknown (checkpoints from before they were
  // recorded). Resuming needs the same global batch, not the same world size.
  int world_size = 1;
  int64_t global_batch = 0;
};

std::string CheckpointPath(const std::string& out_dir, int step);

// Saves params, optimizer moments (optimizer may be null: weights only; it must own every
// parameter, so gather ZeRO-1 shards first) and state, then deletes all but the newest
// `keep_last` checkpoints (0 keeps all).
absl::Status SaveCheckpoint(const std::string& out_dir, const ParamStore& params,
                            const AdamW* optimizer, const TrainState& state, int keep_last,
                            const WriteProgressHook& hook = nullptr);

// Restores into `params` (and `optimizer` when non-null, owning every parameter); tensor names
// and shapes must match the model exactly, and a mismatch is named.
absl::StatusOr<TrainState> LoadCheckpoint(const std::string& path, ParamStore* params,
                                          AdamW* optimizer);

// Loads only the weights ("model/<name>") of a checkpoint into `params`, e.g. a full-precision
// checkpoint into a QAT model. Tensors of the model that the file lacks are allowed only when
// `may_be_missing(name)` says so (quantizer steps, Phi factors: initialised afterwards); they
// are left as they are. Returns the number of tensors loaded.
absl::StatusOr<int> LoadWeights(const std::string& path, ParamStore* params,
                                const std::function<bool(const std::string&)>& may_be_missing);

// The newest complete checkpoint in <out_dir>/checkpoints (temporary files of an interrupted
// save are ignored); NotFound when there is none.
absl::StatusOr<std::string> LatestCheckpoint(const std::string& out_dir);

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_CHECKPOINT_H_
