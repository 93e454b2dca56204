// Training checkpoints: one safetensors file per save holding the weights ("model/<name>"),
// the AdamW moments ("adam_m/<name>", "adam_v/<name>") and, as metadata, the step, data
// position, RNG state, the job spec and the data-parallel shape that wrote it; written
// atomically under <out_dir>/checkpoints/. A checkpoint does not depend on the world size: the
// data position is global and ZeRO-1 moments are gathered before saving.
#ifndef QTRAIN_TRAINER_CHECKPOINT_H_
#define QTRAIN_TRAINER_CHECKPOINT_H_

#include <functional>
#include <map>
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
  // The run this checkpoint belongs to, kept across resumes ("" in checkpoints from before it
  // was recorded). Rotation (keep_last) deletes only checkpoints of the same run.
  std::string run_id;
};

// A fresh run's id: time and randomness, unique enough to tell runs in one out_dir apart.
std::string NewRunId();

std::string CheckpointPath(const std::string& out_dir, int step);

// Saves params, optimizer moments (optimizer may be null: weights only; it must own every
// parameter, so gather ZeRO-1 shards first) and state, then deletes all but the newest
// `keep_last` checkpoints of the same run (state.run_id; 0 keeps all). Files of other runs,
// and files whose header cannot be read, are never deleted.
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

// Every complete checkpoint file in <out_dir>/checkpoints and the temporary files of
// interrupted saves, in no particular order.
std::vector<std::string> CheckpointFiles(const std::string& out_dir);

// The metadata of a checkpoint (step, run_id, job_spec, ...) without reading its tensors.
absl::StatusOr<std::map<std::string, std::string>> ReadCheckpointMetadata(const std::string& path);

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_CHECKPOINT_H_
