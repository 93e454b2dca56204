// SaveCheckpoint / LoadCheckpoint / LatestCheckpoint.
#include "trainer/checkpoint.h"

#include <algorithm>
#include <filesystem>
#include <map>
#include <random>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "ops/status_macros.h"
#include "trainer/safetensors.h"

namespace qtrain {
namespace {

namespace fs = std::filesystem;

constexpr char kFormat[] = "qtrain-checkpoint-v1";

std::string CheckpointDir(const std::string& out_dir) { return out_dir + "/checkpoints"; }

// Step number of "step_00001234.safetensors", or -1.
int StepOf(const std::string& filename) {
  if (!absl::StartsWith(filename, "step_") || !absl::EndsWith(filename, ".safetensors")) return -1;
  const std::string digits = filename.substr(5, filename.size() - 5 - 12);
  int step = -1;
  if (digits.empty() || !absl::SimpleAtoi(digits, &step)) return -1;
  return step;
}

absl::StatusOr<int64_t> MetaInt(const SafeTensors& st, const std::string& key,
                                const std::string& path) {
  ASSIGN_OR_RETURN(std::string text, st.Meta(key, path));
  int64_t v = 0;
  if (!absl::SimpleAtoi(text, &v)) {
    return absl::DataLossError(absl::StrCat(path, ": metadata '", key, "' is not an integer: '",
                                            text, "'"));
  }
  return v;
}

// Copies "<prefix><name>" of every tensor of `params` from `st` into buf (ParamStore layout),
// checking shapes; a tensor the file lacks is an error unless may_be_missing (when given)
// accepts its name. Returns how many were copied.
absl::StatusOr<int> CopyTensors(const SafeTensors& st, const std::string& path,
                                const std::string& prefix, const ParamStore& params, float* buf,
                                const std::function<bool(const std::string&)>& may_be_missing) {
  int copied = 0;
  for (const ParamInfo& info : params.infos()) {
    const std::string name = prefix + info.name;
    if (may_be_missing && !st.tensors.count(name) && may_be_missing(info.name)) continue;
    ASSIGN_OR_RETURN(const Tensor* t, st.Get(name, path));
    if (t->shape != info.shape) {
      return absl::FailedPreconditionError(absl::StrCat(
          path, ": tensor '", name, "' has shape [", absl::StrJoin(t->shape, ","),
          "], the model expects [", absl::StrJoin(info.shape, ","), "]"));
    }
    RETURN_IF_ERROR(
        t->CopyTo(buf + info.offset, info.size, absl::StrCat(path, ": tensor '", name, "'")));
    ++copied;
  }
  return copied;
}

}  // namespace

std::string CheckpointPath(const std::string& out_dir, int step) {
  return absl::StrFormat("%s/step_%08d.safetensors", CheckpointDir(out_dir), step);
}

absl::Status SaveCheckpoint(const std::string& out_dir, const ParamStore& params,
                            const AdamW* optimizer, const TrainState& state, int keep_last,
                            const WriteProgressHook& hook) {
  if (optimizer != nullptr && optimizer->sharded()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "SaveCheckpoint: the optimizer owns parameters [", optimizer->begin(), ", ",
        optimizer->end(), ") of ", optimizer->num_params(),
        "; gather the ZeRO-1 shards into a full optimizer first"));
  }
  std::error_code ec;
  fs::create_directories(CheckpointDir(out_dir), ec);
  if (ec) {
    return absl::InternalError(
        absl::StrCat("cannot create ", CheckpointDir(out_dir), ": ", ec.message()));
  }
  std::vector<TensorView> views;
  auto add = [&](const std::string& prefix, const std::vector<float>& buf) {
    for (const ParamInfo& info : params.infos()) {
      views.push_back({prefix + info.name, "F32", info.shape, buf.data() + info.offset,
                       static_cast<size_t>(info.size) * sizeof(float)});
    }
  };
  add("model/", params.params());
  for (int i = 0; i < params.num_buffers(); ++i) {
    const std::vector<float>& b = params.buffer(i);
    views.push_back({"buffer/" + params.buffer_name(i), "F32", {static_cast<int64_t>(b.size())},
                     b.data(), b.size() * sizeof(float)});
  }
  if (optimizer != nullptr) {
    add("adam_m/", optimizer->m());
    add("adam_v/", optimizer->v());
  }
  std::map<std::string, std::string> meta = {
      {"format", kFormat},
      {"step", absl::StrCat(state.step)},
      {"adam_t", absl::StrCat(optimizer ? optimizer->step() : 0)},
      {"data_shard", absl::StrCat(state.data.shard)},
      {"data_offset", absl::StrCat(state.data.offset)},
      {"data_epoch", absl::StrCat(state.data.epoch)},
      {"rng", state.rng},
      {"job_spec", state.job_spec},
      {"world_size", absl::StrCat(state.world_size)},
      {"global_batch", absl::StrCat(state.global_batch)},
      {"run_id", state.run_id},
  };
  const std::string path = CheckpointPath(out_dir, state.step);
  RETURN_IF_ERROR(WriteSafeTensors(path, views, meta, hook));

  if (keep_last > 0) {
    std::vector<std::pair<int, std::string>> ours;
    for (const auto& e : fs::directory_iterator(CheckpointDir(out_dir), ec)) {
      const int s = StepOf(e.path().filename().string());
      if (s < 0) continue;
      // Another run's checkpoint (a different run_id) is not ours to rotate out.
      absl::StatusOr<std::map<std::string, std::string>> meta =
          ReadSafeTensorsMetadata(e.path().string());
      if (!meta.ok()) continue;
      const auto id = meta->find("run_id");
      if ((id == meta->end() ? std::string() : id->second) != state.run_id) continue;
      ours.emplace_back(s, e.path().string());
    }
    std::sort(ours.rbegin(), ours.rend());
    for (size_t i = keep_last; i < ours.size(); ++i) fs::remove(ours[i].second, ec);
  }
  return absl::OkStatus();
}

absl::StatusOr<TrainState> LoadCheckpoint(const std::string& path, ParamStore* params,
                                          AdamW* optimizer) {
  if (optimizer != nullptr && optimizer->sharded()) {
    return absl::InvalidArgumentError(
        "LoadCheckpoint: load into an optimizer that owns every parameter, then shard it");
  }
  ASSIGN_OR_RETURN(SafeTensors st, ReadSafeTensors(path));
  ASSIGN_OR_RETURN(std::string format, st.Meta("format", path));
  if (format != kFormat) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": format '", format, "', expected '", kFormat, "'"));
  }
  auto load = [&](const std::string& prefix, std::vector<float>& buf) -> absl::Status {
    return CopyTensors(st, path, prefix, *params, buf.data(), nullptr).status();
  };
  RETURN_IF_ERROR(load("model/", params->params()));
  for (int i = 0; i < params->num_buffers(); ++i) {
    const std::string name = "buffer/" + params->buffer_name(i);
    ASSIGN_OR_RETURN(const Tensor* t, st.Get(name, path));
    std::vector<float>& b = params->buffer(i);
    RETURN_IF_ERROR(t->CopyTo(b.data(), static_cast<int64_t>(b.size()),
                              absl::StrCat(path, ": tensor '", name, "'")));
  }
  TrainState state;
  if (optimizer != nullptr) {
    RETURN_IF_ERROR(load("adam_m/", optimizer->m()));
    RETURN_IF_ERROR(load("adam_v/", optimizer->v()));
    ASSIGN_OR_RETURN(int64_t t, MetaInt(st, "adam_t", path));
    optimizer->set_step(static_cast<int>(t));
  }
  ASSIGN_OR_RETURN(int64_t step, MetaInt(st, "step", path));
  ASSIGN_OR_RETURN(state.data.shard, MetaInt(st, "data_shard", path));
  ASSIGN_OR_RETURN(state.data.offset, MetaInt(st, "data_offset", path));
  ASSIGN_OR_RETURN(state.data.epoch, MetaInt(st, "data_epoch", path));
  ASSIGN_OR_RETURN(state.rng, st.Meta("rng", path));
  ASSIGN_OR_RETURN(state.job_spec, st.Meta("job_spec", path));
  state.step = static_cast<int>(step);
  // Written since data-parallel training; absent in older checkpoints.
  if (st.metadata.count("world_size")) {
    ASSIGN_OR_RETURN(int64_t world, MetaInt(st, "world_size", path));
    state.world_size = static_cast<int>(world);
  }
  state.global_batch = 0;
  if (st.metadata.count("global_batch")) {
    ASSIGN_OR_RETURN(state.global_batch, MetaInt(st, "global_batch", path));
  }
  if (st.metadata.count("run_id")) state.run_id = st.metadata.at("run_id");
  return state;
}

absl::StatusOr<int> LoadWeights(const std::string& path, ParamStore* params,
                                const std::function<bool(const std::string&)>& may_be_missing) {
  ASSIGN_OR_RETURN(SafeTensors st, ReadSafeTensors(path));
  return CopyTensors(st, path, "model/", *params, params->params().data(), may_be_missing);
}

absl::StatusOr<std::string> LatestCheckpoint(const std::string& out_dir) {
  const std::string dir = CheckpointDir(out_dir);
  std::error_code ec;
  int best = -1;
  std::string best_path;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const int s = StepOf(e.path().filename().string());
    if (s > best) {
      best = s;
      best_path = e.path().string();
    }
  }
  if (best < 0) return absl::NotFoundError(absl::StrCat("no checkpoint in ", dir));
  return best_path;
}

std::vector<std::string> CheckpointFiles(const std::string& out_dir) {
  std::vector<std::string> files;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(CheckpointDir(out_dir), ec)) {
    const std::string name = e.path().filename().string();
    // "step_N.safetensors" and the "step_N.safetensors.tmp.<pid>" of an interrupted save.
    if (StepOf(name) >= 0 ||
        (absl::StartsWith(name, "step_") && absl::StrContains(name, ".safetensors.tmp."))) {
      files.push_back(e.path().string());
    }
  }
  return files;
}

absl::StatusOr<std::map<std::string, std::string>> ReadCheckpointMetadata(const std::string& path) {
  return ReadSafeTensorsMetadata(path);
}

std::string NewRunId() {
  std::random_device device;
  const uint64_t random = (static_cast<uint64_t>(device()) << 32) ^ device();
  return absl::StrFormat("%s-%016x", absl::FormatTime("%Y%m%dT%H%M%S", absl::Now(),
                                                        absl::UTCTimeZone()),
                         random);
}

}  // namespace qtrain
