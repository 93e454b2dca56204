// TrainingSession: one process or data-parallel ranks (distributed/): gradients are averaged
// over ranks (bucketed all-reduce, or ZeRO-1 reduce-scatter / sharded update / all-gather);
// rank 0 alone prints and feeds the sinks (metrics, checkpoints).
#include "trainer/session.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "configs/job_spec_loader.h"
#include "ops/status_macros.h"
#include "trainer/atomic_file.h"
#include "trainer/checkpoint.h"
#include "trainer/hf_gpt2.h"
#include "trainer/out_dir.h"
#include "trainer/resume_check.h"

// Errors that every rank holds alike (DistributedContext marks them) go back untouched: their
// message is already the one each rank prints, without a trail of file:line annotations.
// The session's own parts annotate their errors where they arise; RETURN_AS_IS passes those on.
#define RETURN_IF_AGREED_ERROR(expr)         \
  do {                                       \
    absl::Status qt_agreed_ = (expr);        \
    if (!qt_agreed_.ok()) return qt_agreed_; \
  } while (0)
#define RETURN_AS_IS(expr) RETURN_IF_AGREED_ERROR(expr)

namespace qtrain {
namespace {

using Clock = std::chrono::steady_clock;

std::string FormatDuration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const int s = static_cast<int>(seconds + 0.5);
  if (s >= 3600) return absl::StrFormat("%dh%02dm", s / 3600, (s / 60) % 60);
  if (s >= 60) return absl::StrFormat("%dm%02ds", s / 60, s % 60);
  return absl::StrFormat("%ds", s);
}

std::string FormatRate(double tokens_per_s) {
  if (tokens_per_s >= 1e6) return absl::StrFormat("%.2fM", tokens_per_s / 1e6);
  if (tokens_per_s >= 1e3) return absl::StrFormat("%.1fk", tokens_per_s / 1e3);
  return absl::StrFormat("%.0f", tokens_per_s);
}

// Every rank takes rank 0's parameters and buffers (non-trainable state).
absl::Status SyncReplicasFromRoot(DistributedContext* dist, Gpt* model) {
  if (dist->world_size() == 1) return absl::OkStatus();
  ParamStore& ps = model->params();
  RETURN_IF_ERROR(dist->comm().Broadcast(ps.params().data(), ps.num_elements() * 4, 0));
  for (int i = 0; i < ps.num_buffers(); ++i) {
    RETURN_IF_ERROR(dist->comm().Broadcast(ps.buffer(i).data(), ps.buffer(i).size() * 4, 0));
  }
  return absl::OkStatus();
}

// Rank 0 read a checkpoint into `model` (and `full_opt`); the others get the same state.
absl::Status BroadcastResumeState(DistributedContext* dist, Gpt* model, AdamW* full_opt,
                                  TrainState* state) {
  if (dist->world_size() == 1) return absl::OkStatus();
  RETURN_IF_ERROR(SyncReplicasFromRoot(dist, model));
  RETURN_IF_ERROR(dist->comm().Broadcast(full_opt->m().data(), full_opt->m().size() * 4, 0));
  RETURN_IF_ERROR(dist->comm().Broadcast(full_opt->v().data(), full_opt->v().size() * 4, 0));
  int64_t fixed[7] = {state->step, state->data.shard, state->data.offset, state->data.epoch,
                      full_opt->step(), state->world_size, state->global_batch};
  RETURN_IF_ERROR(dist->comm().Broadcast(fixed, sizeof(fixed), 0));
  state->step = static_cast<int>(fixed[0]);
  state->data = {fixed[1], fixed[2], fixed[3]};
  full_opt->set_step(static_cast<int>(fixed[4]));
  state->world_size = static_cast<int>(fixed[5]);
  state->global_batch = fixed[6];
  return dist->BroadcastString(&state->rng, 0);
}

}  // namespace

TrainingSession::TrainingSession(const JobSpec& spec, const RunOptions& options)
    : spec_(spec), options_(options) {}

absl::StatusOr<std::unique_ptr<TrainingSession>> TrainingSession::Create(
    const JobSpec& spec, const RunOptions& options) {
  RETURN_IF_ERROR(ValidateJobSpec(spec));
  std::unique_ptr<TrainingSession> s(new TrainingSession(spec, options));
  s->dist_ = options.dist;
  if (s->dist_ == nullptr) {
    s->own_dist_ = DistributedContext::SingleProcess(spec.distributed());
    s->dist_ = s->own_dist_.get();
  }
  s->world_ = s->dist_->world_size();
  s->rank_ = s->dist_->rank();
  s->root_ = s->dist_->is_root();
  s->quiet_ = options.quiet || !s->root_;  // only rank 0 prints progress
  RETURN_IF_AGREED_ERROR(s->dist_->VerifySameJob(JobSpecHash(spec)));

  // Each part annotates its own errors (or returns one every rank holds): passed on as they are.
  RETURN_AS_IS(s->PrepareOutDir());
  RETURN_AS_IS(s->BuildModel());
  s->BuildOptimizer();
  RETURN_AS_IS(s->OpenData());
  RETURN_AS_IS(options.resume.empty() ? s->InitFresh() : s->Resume());
  RETURN_AS_IS(s->WriteJobSpecFile());
  RETURN_AS_IS(s->CreateDeviceModel());
  RETURN_AS_IS(s->OpenSinks());
  s->PrintBanner();
  return s;
}

// Rank 0 alone touches out_dir; every rank learns whether that worked. A fresh run needs an
// out_dir without another run in it (--overwrite deletes that run first).
absl::Status TrainingSession::PrepareOutDir() {
  out_dir_ = spec_.out_dir();
  spec_text_ = JobSpecToText(spec_);
  absl::Status dir_ok;
  if (root_) {
    std::error_code ec;
    std::filesystem::create_directories(out_dir_, ec);
    if (ec) {
      dir_ok = absl::InternalError(
          absl::StrCat("cannot create out_dir ", out_dir_, ": ", ec.message()));
    } else if (options_.resume.empty()) {
      dir_ok = ClaimOutDir(
          out_dir_, options_.overwrite,
          {{"training.init_from", spec_.training().init_from()},
           {"precision.distill.teacher_checkpoint", spec_.precision().distill().teacher_checkpoint()}});
    }
  }
  return dist_->AllOk(dir_ok, "preparing out_dir");
}

// After the resume state loaded and was checked: a failed resume leaves the file as it was.
absl::Status TrainingSession::WriteJobSpecFile() {
  absl::Status written;
  if (root_) written = WriteFileAtomically(out_dir_ + "/job_spec.textproto", {spec_text_});
  return dist_->AllOk(written, "writing job_spec.textproto");
}

// The host model (init, init_from) and the distillation teacher.
absl::Status TrainingSession::BuildModel() {
  const TrainingSpec& ts = spec_.training();
  B_ = ts.batch_size();
  T_ = ts.seq_len();
  accum_ = ts.grad_accum();
  ASSIGN_OR_RETURN(gc_, ModelConfigFromSpec(spec_));
  // Refused with what the model needs, before std::bad_alloc would end the process.
  RETURN_IF_AGREED_ERROR(dist_->AllOk(CheckHostMemory(spec_), "checking host memory"));
  ASSIGN_OR_RETURN(model_, Gpt::Create(gc_));
  model_->InitWeights(spec_.seed(), spec_.model().init_std());
  if (!ts.init_from().empty() && options_.resume.empty()) {
    // A qtrain checkpoint or a Hugging Face GPT-2 folder / model.safetensors.
    ASSIGN_OR_RETURN(int loaded, LoadInitialWeights(ts.init_from(), gc_, &model_->params(),
                                                    IsQuantizerParam));
    if (!quiet_) {
      std::printf("initialised %d weight tensors from %s\n", loaded, ts.init_from().c_str());
    }
  }
  if (!spec_.precision().distill().teacher_checkpoint().empty()) {
    ASSIGN_OR_RETURN(teacher_, Teacher::Load(spec_));
  }
  return absl::OkStatus();
}

// AdamW (under ZeRO-1 this rank keeps the moments of its shard only) and the lr schedule.
void TrainingSession::BuildOptimizer() {
  const OptimizerSpec& os = spec_.optimizer();
  adam_config_ = {os.beta1(), os.beta2(), os.eps(), os.weight_decay(), os.grad_clip()};
  zero1_ = os.zero1();
  const int64_t n = model_->num_parameters();
  sync_.emplace(&dist_->comm(), n, dist_->bucket_bytes());
  if (zero1_) {
    optimizer_.emplace(adam_config_, n, sync_->begin(), sync_->end());
  } else {
    optimizer_.emplace(adam_config_, n);
  }
  schedule_ = {os.lr(), spec_.schedule().warmup_steps(), spec_.training().steps(),
               spec_.schedule().min_lr_ratio()};
  global_batch_ = int64_t{world_} * B_ * accum_;
}

// Each rank reads its own B rows of every step; see DataLoader for the layout.
absl::Status TrainingSession::OpenData() {
  const int V = spec_.model().vocab_size();
  absl::StatusOr<std::unique_ptr<DataLoader>> train =
      DataLoader::Open(spec_.data().train_pattern(), B_, T_, rank_, world_, V);
  RETURN_IF_AGREED_ERROR(dist_->AllOk(train.status(), "opening training data"));
  absl::StatusOr<std::unique_ptr<DataLoader>> val =
      DataLoader::Open(spec_.data().val_pattern(), B_, T_, rank_, world_, V);
  RETURN_IF_AGREED_ERROR(dist_->AllOk(val.status(), "opening validation data"));
  train_ = *std::move(train);
  val_ = *std::move(val);
  // Every rank has the same shards and counts: one agreed error.
  RETURN_IF_AGREED_ERROR(dist_->AllOk(CheckEvalBatches(*val_, spec_.eval().batches(), "eval.batches"),
                                      "checking the val split"));
  rng_ = Rng(spec_.seed() ^ 0x5eedull);
  x_.resize(static_cast<size_t>(B_) * T_);
  y_.resize(static_cast<size_t>(B_) * T_);
  return absl::OkStatus();
}

// Rank 0 reads the checkpoint (out_dir need only be visible to it), after comparing the job
// it was written with to this one, and sends the state.
absl::Status TrainingSession::Resume() {
  std::optional<AdamW> full_opt;
  if (zero1_) full_opt.emplace(adam_config_, model_->num_parameters());
  AdamW* load_opt = zero1_ ? &*full_opt : &*optimizer_;
  std::string path = options_.resume;
  absl::StatusOr<TrainState> loaded = absl::UnknownError("not loaded");
  if (root_) {
    absl::StatusOr<std::string> found =
        path == "latest" ? LatestCheckpoint(out_dir_) : absl::StatusOr<std::string>(path);
    if (found.ok()) path = *found;
    absl::Status checked = found.ok() ? CheckSpecAgainstCheckpoint(path) : found.status();
    loaded = checked.ok() ? LoadCheckpoint(path, &model_->params(), load_opt) : checked;
  }
  RETURN_IF_AGREED_ERROR(dist_->AllOk(root_ ? loaded.status() : absl::OkStatus(), "resuming"));
  TrainState state = root_ ? *loaded : TrainState();
  RETURN_IF_ERROR(BroadcastResumeState(dist_, model_.get(), load_opt, &state));
  if (state.global_batch != 0 && state.global_batch != global_batch_) {
    // Every rank holds the same state: one agreed error.
    return dist_->AllOk(absl::FailedPreconditionError(absl::StrFormat(
        "%s was written with a global batch of %d sequences (%d ranks); this run has %d (%d "
        "ranks x batch_size %d x grad_accum %d). Resume with the same global batch: e.g. "
        "--global_batch=%d sets training.batch_size from the number of ranks",
        path, state.global_batch, state.world_size, global_batch_, world_, B_, accum_,
        state.global_batch)), "resuming");
  }
  if (zero1_) {
    std::copy(full_opt->m().begin() + sync_->begin(), full_opt->m().begin() + sync_->end(),
              optimizer_->m().begin());
    std::copy(full_opt->v().begin() + sync_->begin(), full_opt->v().begin() + sync_->end(),
              optimizer_->v().begin());
    optimizer_->set_step(full_opt->step());
  }
  RETURN_IF_ERROR(model_->RestoreStateFromBuffers());
  RETURN_IF_ERROR(train_->Seek(state.data));
  ASSIGN_OR_RETURN(rng_, Rng::Deserialize(state.rng));
  start_step_ = state.step;
  // Checkpoints from before runs had ids: this run's own checkpoints get a new one.
  run_id_ = state.run_id.empty() ? NewRunId() : state.run_id;
  resumed_from_ = path;
  if (!quiet_) {
    std::printf("resumed from %s at step %d (written by %d rank%s)\n", path.c_str(), start_step_,
                state.world_size, state.world_size == 1 ? "" : "s");
  }
  return absl::OkStatus();
}

// Rank 0: the differences between the checkpoint's job and this one are printed; those that
// break a bit-identical resume need RunOptions::allow_spec_change.
absl::Status TrainingSession::CheckSpecAgainstCheckpoint(const std::string& path) {
  ASSIGN_OR_RETURN(const auto meta, ReadCheckpointMetadata(path));
  const auto text = meta.find("job_spec");
  if (text == meta.end()) {
    return absl::DataLossError(absl::StrCat(path, ": no job_spec in its metadata"));
  }
  absl::StatusOr<std::vector<SpecChange>> changes = CompareSpecsForResume(text->second, spec_);
  if (!changes.ok()) {
    if (options_.allow_spec_change) return absl::OkStatus();
    return absl::FailedPreconditionError(absl::StrCat(
        path, ": ", changes.status().message(), "; pass --allow_spec_change to resume anyway"));
  }
  std::vector<SpecChange> breaking;
  for (const SpecChange& c : *changes) {
    if (!c.resume_safe) breaking.push_back(c);
  }
  if (!breaking.empty() && !options_.allow_spec_change) {
    return absl::FailedPreconditionError(absl::StrCat(
        "resuming ", path, ": the job differs from the one that wrote the checkpoint in a way "
        "that breaks a bit-identical resume:\n", FormatSpecChanges(breaking),
        "\nresume with the checkpoint's job (--job=", out_dir_,
        "/job_spec.textproto), or pass --allow_spec_change to resume with these changes"));
  }
  if (!changes->empty() && !quiet_) {
    std::printf("resuming with a job that differs from the checkpoint's:\n%s\n",
                FormatSpecChanges(*changes).c_str());
  }
  return absl::OkStatus();
}

absl::Status TrainingSession::InitFresh() {
  run_id_ = NewRunId();
  // Quantizer steps and Phi start from the final initial weights (random or init_from). On a
  // device Phi's SVD runs there (DeviceModel::InitPhi, after the upload).
  RETURN_IF_ERROR(model_->InitQuantizers(spec_.device() == CUDA ? PhiInit::kSkip : PhiInit::kHere));
  // Replicas start identical even where initialisation could differ between machines (libm).
  RETURN_IF_ERROR(dist_->comm().Broadcast(model_->params().params().data(),
                                          model_->num_parameters() * 4, 0));
  return absl::OkStatus();
}

absl::Status TrainingSession::CreateDeviceModel() {
  if (spec_.device() != CUDA) return absl::OkStatus();
  if (world_ > 1) {
    absl::StatusOr<std::unique_ptr<NcclCommunicator>> made_nccl =
        NcclCommunicator::Create(&dist_->comm(), dist_->local_rank(), dist_->timeout());
    RETURN_IF_AGREED_ERROR(dist_->AllOk(made_nccl.status(), "joining NCCL"));
    nccl_ = *std::move(made_nccl);
  }
  const TrainingSpec& ts = spec_.training();
  absl::StatusOr<std::unique_ptr<DeviceModel>> made =
      CreateCudaModel(gc_, model_->params(), GradDtypeFromSpec(ts));
  RETURN_IF_AGREED_ERROR(dist_->AllOk(made.status(), "creating the CUDA model"));
  dev_ = *std::move(made);
  RETURN_IF_ERROR(ConfigureDeviceModel(ts, dev_.get()));
  RETURN_IF_ERROR(dev_->Upload(model_->params(), &*optimizer_));
  if (teacher_) {
    // The frozen teacher on the device beside the student (its host copy stays the loader).
    absl::StatusOr<std::unique_ptr<DeviceModel>> teacher =
        CreateCudaModelForwardOnly(teacher_->config(), teacher_->params());
    RETURN_IF_AGREED_ERROR(dist_->AllOk(teacher.status(), "creating the CUDA teacher"));
    RETURN_IF_ERROR((*teacher)->Upload(teacher_->params(), nullptr));
    RETURN_IF_ERROR(dev_->SetTeacher(*std::move(teacher), teacher_->loss(), teacher_->weight()));
  }
  if (options_.resume.empty()) RETURN_IF_ERROR(dev_->InitPhi());
  if (nccl_) {
    // The gradient buffer stays where it is for the model's life (no ZeroGrads is pending yet,
    // so asking for it clears nothing).
    grad_sum_.emplace(nccl_.get(), dev_->device_grads(), dev_->grad_dtype(),
                      dev_->num_parameters(), dist_->bucket_bytes());
  }
  return absl::OkStatus();
}

// Rank 0: metrics.jsonl (rows after the resumed step dropped), the checkpoint directory, then
// the caller's sinks. The checkpoint directory goes first: later sinks may read its file.
absl::Status TrainingSession::OpenSinks() {
  absl::Status opened;
  if (root_) {
    absl::StatusOr<std::unique_ptr<JsonlMetricsSink>> jsonl = JsonlMetricsSink::Open(
        out_dir_ + "/metrics.jsonl", options_.resume.empty() ? 0 : start_step_);
    opened = jsonl.status();
    if (jsonl.ok()) {
      sinks_.Add(*std::move(jsonl));
      sinks_.Add(std::make_unique<LocalCheckpointSink>(out_dir_, spec_.checkpoint().keep_last()));
      for (RunSink* sink : options_.sinks) sinks_.Add(sink);
    }
  }
  return dist_->AllOk(opened, "opening metrics.jsonl");
}

void TrainingSession::PrintBanner() const {
  if (quiet_) return;
  const ModelSpec& ms = spec_.model();
  std::printf("qtrain: job '%s', %.2fM parameters, %d layers, d=%d, B=%d T=%d accum=%d, "
              "%d steps, out_dir %s\n",
              spec_.name().c_str(), model_->num_parameters() / 1e6, ms.n_layer(), ms.n_embd(), B_,
              T_, accum_, spec_.training().steps(), AbsolutePath(out_dir_).c_str());
  if (world_ > 1) {
    std::printf("data parallel: %d ranks (%s%s), global batch %lld sequences, %s, "
                "buckets of %lld MiB, timeout %s\n",
                world_, dist_->comm().backend().c_str(),
                dist_->launcher().empty() ? "" : (" via " + dist_->launcher()).c_str(),
                static_cast<long long>(global_batch_),
                zero1_ ? "ZeRO-1 optimizer shards" : "replicated optimizer",
                static_cast<long long>(dist_->bucket_bytes() >> 20),
                absl::FormatDuration(dist_->timeout()).c_str());
  }
  std::fflush(stdout);
}

absl::StatusOr<RunResult> TrainingSession::Run() {
  const int steps = spec_.training().steps();
  if (start_step_ >= steps) {
    RunResult finished;
    finished.steps_done = start_step_;
    finished.already_finished = true;
    if (!quiet_) {
      std::printf("the run in %s is already finished: %s holds step %d of training.steps %d, "
                  "nothing to train. To train longer, resume with a larger --steps and "
                  "--allow_spec_change (the cosine schedule then stretches)\n",
                  AbsolutePath(out_dir_).c_str(), resumed_from_.c_str(), start_step_, steps);
    }
    return finished;
  }
  const int eval_every = spec_.eval().every_steps();
  const int ckpt_every = spec_.checkpoint().every_steps();
  const double tokens_per_step = static_cast<double>(global_batch_) * T_;
  RunResult result;
  double timed_seconds = 0;
  int timed_steps = 0;
  double ema_step = 0;  // recent step time, for the ETA
  for (int step = start_step_; step < steps; ++step) {
    const auto t0 = Clock::now();
    absl::StatusOr<StepStats> stepped = Step(step);
    RETURN_AS_IS(stepped.status());
    const StepStats& s = *stepped;
    const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    // The first step of a process warms caches and allocations: keep it out of the mean.
    if (step > start_step_) {
      timed_seconds += seconds;
      ++timed_steps;
    }
    ema_step = ema_step == 0 || step == start_step_ + 1 ? seconds : 0.9 * ema_step + 0.1 * seconds;
    const int done = step + 1;
    const bool last = done == steps;
    MetricRow row = {{"train_loss", s.loss}, {"lr", s.lr}, {"grad_norm", s.grad_norm},
                     {"tokens_per_s", tokens_per_step / seconds}, {"step_ms", seconds * 1e3}};
    if (dev_) {
      // The device computes block statistics on the steps it logs (IsLogStep).
      if (IsLogStep(step)) RETURN_IF_ERROR(AddDeviceMetrics(&row));
      if (teacher_) row.push_back({"distill_loss", s.distill});
    } else {
      AddModelMetrics(*model_, spec_, s.tweo, s.distill, teacher_ != nullptr, &row);
    }
    if ((eval_every > 0 && done % eval_every == 0) || last) {
      ASSIGN_OR_RETURN(const double val_loss, Evaluate());
      row.push_back({"val_loss", val_loss});
      result.final_val_loss = val_loss;
      if (!quiet_) std::printf("step %5d/%d | val loss %.4f\n", done, steps, val_loss);
    }
    if (root_) RETURN_IF_ERROR(sinks_.WriteMetrics(done, row));
    if (!quiet_ && IsLogStep(step)) PrintStep(done, s, seconds, ema_step);
    if ((ckpt_every > 0 && done % ckpt_every == 0) || last) RETURN_AS_IS(Checkpoint(done));
    result.steps_done = done;
    result.final_train_loss = s.loss;
  }
  if (root_) RETURN_IF_ERROR(sinks_.Finish());
  result.tokens_per_s = timed_steps > 0 ? tokens_per_step * timed_steps / timed_seconds : 0;
  if (!quiet_) {
    std::printf("done: %d steps, final train loss %.4f, final val loss %.4f, %s tok/s\n",
                result.steps_done, result.final_train_loss, result.final_val_loss,
                FormatRate(result.tokens_per_s).c_str());
  }
  return result;
}

// One optimizer step: rank-decay hook, then per micro-step forward, loss terms and backward,
// then the losses over ranks, gradient sync and update.
absl::StatusOr<TrainingSession::StepStats> TrainingSession::Step(int step) {
  StepStats s;
  s.lr = schedule_.LrAt(step);
  if (world_ > 1) dist_->comm().SetActivity(absl::StrCat("step ", step + 1));
  RETURN_IF_ERROR(ApplyRankDecay(step));
  if (dev_) dev_->set_block_stats(IsLogStep(step));
  RETURN_IF_ERROR(ZeroGrads());
  for (int micro = 0; micro < accum_; ++micro) {
    RETURN_IF_ERROR(train_->Next(x_.data(), y_.data()));
    if (dev_) {
      RETURN_AS_IS(DeviceMicroStep(micro == accum_ - 1, &s));
    } else {
      RETURN_AS_IS(HostMicroStep(&s));
    }
  }
  RETURN_IF_AGREED_ERROR(AverageLossesOverRanks(step, &s));
  absl::StatusOr<double> grad_norm = SyncGradientsAndUpdate(s.lr);
  RETURN_AS_IS(grad_norm.status());
  s.grad_norm = *grad_norm;
  if (step == start_step_ && options_.resume.empty()) {
    // Quantizers that initialise on the first training batch (QAT activation steps) did so
    // from each rank's own slice of it; rank 0's values win, so the replicas stay identical.
    RETURN_IF_ERROR(SyncReplicasFromRoot(dist_, model_.get()));
  }
  return s;
}

// QVGen rank decay; re-factorised Phi tensors start their optimizer state afresh (on the device
// the model holds the moments and does both).
absl::Status TrainingSession::ApplyRankDecay(int step) {
  if (dev_) return dev_->ApplyRankSchedule(step);
  for (int idx : model_->ApplyRankSchedule(step)) {
    const ParamInfo& info = model_->params().info(idx);
    optimizer_->ResetMoments(info.offset, info.size);
  }
  return absl::OkStatus();
}

bool TrainingSession::IsLogStep(int step) const {
  const int done = step + 1;
  return done % spec_.logging().every_steps() == 0 || done == spec_.training().steps() ||
         step == start_step_;
}

// The device model's block-output statistics of this step (TWEO term, peaks, kurtoses) and
// Phi's ranks, under the names AddModelMetrics gives the host model's.
absl::Status TrainingSession::AddDeviceMetrics(MetricRow* row) const {
  ASSIGN_OR_RETURN(const DeviceModel::OutputStats st, dev_->output_stats());
  const PrecisionSpec& p = spec_.precision();
  if (p.tweo().enabled()) row->push_back({"tweo_loss", st.tweo_loss});
  for (size_t l = 0; l < st.blocks.size(); ++l) {
    row->push_back({absl::StrCat("peak_act.", l), st.blocks[l].peak});
    row->push_back({absl::StrCat("kurtosis.", l), st.blocks[l].kurtosis});
  }
  if (p.aux_lowrank().enabled()) {
    const std::vector<int> ranks = dev_->phi_ranks();
    for (size_t l = 0; l < ranks.size(); ++l) {
      row->push_back({absl::StrCat("phi_rank.", l), static_cast<double>(ranks[l])});
    }
  }
  return absl::OkStatus();
}

absl::Status TrainingSession::ZeroGrads() {
  if (dev_) return dev_->ZeroGrads();
  model_->params().ZeroGrads();
  return absl::OkStatus();
}

// Forward, the loss terms (task loss, TWEO inside the model, distillation) and backward of one
// micro-batch (x_, y_) on the host model.
absl::Status TrainingSession::HostMicroStep(StepStats* s) {
  ASSIGN_OR_RETURN(double l, model_->Forward(x_.data(), y_.data(), B_, T_, /*training=*/true));
  const float* dlogits = nullptr;
  if (teacher_) {
    ASSIGN_OR_RETURN(double d, teacher_->Loss(model_.get(), x_.data(), B_, T_, 1.0f / accum_));
    s->distill += d / accum_;
    dlogits = teacher_->dlogits();
  }
  RETURN_IF_ERROR(model_->Backward(1.0f / accum_, dlogits));
  s->loss += l / accum_;
  s->tweo += model_->tweo_loss() / accum_;
  return absl::OkStatus();
}

// The same on the device model. Several GPUs: the last micro-step's backward hands each range
// of finished gradients to NCCL as it goes (earlier micro-steps only add to the gradients).
absl::Status TrainingSession::DeviceMicroStep(bool last_micro, StepStats* s) {
  // The 1/world of the mean over ranks rides in the loss scale: NCCL then only sums.
  const float loss_scale = 1.0f / (accum_ * world_);
  ASSIGN_OR_RETURN(double l, dev_->Forward(x_.data(), y_.data(), B_, T_, loss_scale));
  const bool overlap = grad_sum_ && last_micro;
  if (overlap) {
    dev_->SetGradientReadyHook([this](int64_t begin, int64_t end, void* ready) {
      return grad_sum_->Ready(begin, end, ready);
    });
  }
  const absl::Status backward = dev_->Backward(loss_scale);
  if (overlap) dev_->SetGradientReadyHook(nullptr);
  RETURN_IF_ERROR(backward);
  if (overlap) {
    // The sums end before the model's stream touches the gradients again.
    RETURN_IF_ERROR(grad_sum_->Finish());
    RETURN_IF_ERROR(nccl_->Synchronize());
  }
  s->loss += l / accum_;
  if (teacher_) s->distill += dev_->distill_loss() / accum_;
  return absl::OkStatus();
}

// Every logged loss is the mean over ranks (each rank's is the mean over its tokens).
absl::Status TrainingSession::AverageLossesOverRanks(int step, StepStats* s) {
  double losses[3] = {s->loss, s->tweo, s->distill};
  RETURN_IF_ERROR(dist_->comm().AllReduceSum(losses, 3));
  s->loss = losses[0] / world_;
  s->tweo = losses[1] / world_;
  s->distill = losses[2] / world_;
  if (!std::isfinite(s->loss)) {
    // The loss is global: every rank gets here together.
    return dist_->AllOk(absl::InternalError(absl::StrCat("train loss became ", s->loss,
                                                         " at step ", step + 1,
                                                         "; lower optimizer.lr or check the data")),
                        "training");
  }
  return absl::OkStatus();
}

// Gradient sync and the AdamW update (with the global-norm clip); returns the gradient norm.
absl::StatusOr<double> TrainingSession::SyncGradientsAndUpdate(float lr) {
  float* grads = model_->params().grads().data();
  if (dev_) {
    ASSIGN_OR_RETURN(const double sum_squares, dev_->GradSumSquares());
    const double grad_norm = std::sqrt(sum_squares);
    int64_t amax_count = 0;
    float* amax = dev_->device_fp8_amax(&amax_count);
    if (nccl_ && amax != nullptr) {
      // FP8 delayed scaling: every replica rolls the same amaxes into its histories (the
      // model's stream is idle after GradSumSquares).
      RETURN_IF_ERROR(nccl_->AllReduceMaxAsync(amax, amax_count));
      RETURN_IF_ERROR(nccl_->Synchronize());
    }
    optimizer_->set_step(optimizer_->step() + 1);
    // The update may still run while the next step's forward starts (CudaGpt overlaps them);
    // the step times are the host's, bounded by each Forward's wait for its loss.
    RETURN_IF_ERROR(dev_->Update(lr, grad_norm, adam_config_, optimizer_->step()));
    return grad_norm;
  }
  if (zero1_) {
    // Reduce-scatter: this rank's shard of the mean gradient; the clip needs the norm of the
    // whole gradient, summed over shards; then each rank updates its shard and the updated
    // parameters are gathered back into every replica.
    RETURN_IF_ERROR(sync_->ReduceScatterMean(grads));
    ASSIGN_OR_RETURN(const double sum_squares, sync_->ShardedSumSquares(grads));
    const double grad_norm = std::sqrt(sum_squares);
    optimizer_->Update(&model_->params(), lr, grad_norm);
    RETURN_IF_ERROR(sync_->AllGatherShards(model_->params().params().data()));
    return grad_norm;
  }
  RETURN_IF_ERROR(sync_->AllReduceMean(grads));
  return optimizer_->Step(&model_->params(), lr);
}

// Mean loss over eval.batches batches from the start of the val split (same batches every
// time). Each rank evaluates its own slice of every batch (the val loader is rank-aware) and the
// result is the mean over ranks: world W with batch B sees the same tokens as one process with
// W*B.
absl::StatusOr<double> TrainingSession::Evaluate() {
  ASSIGN_OR_RETURN(double mean, EvaluateLoss(
                                    [this](const int32_t* x, const int32_t* y, int B, int T) {
                                      return dev_ ? dev_->Forward(x, y, B, T, 0.f)
                                                  : model_->Forward(x, y, B, T);
                                    },
                                    val_.get(), spec_.eval().batches()));
  RETURN_IF_ERROR(dist_->comm().AllReduceSum(&mean, 1));
  return mean / dist_->world_size();
}

// Host state for the sinks: buffers from the model's state, a device run's parameters and
// moments downloaded, ZeRO-1 moments gathered (checkpoints hold whole moments whatever the
// world size). Then the replicas are checked to be identical.
absl::Status TrainingSession::Checkpoint(int done) {
  model_->SaveStateToBuffers();
  if (dev_) RETURN_IF_ERROR(dev_->Download(&model_->params(), &*optimizer_));
  std::optional<AdamW> full_opt;
  if (zero1_) {
    full_opt.emplace(adam_config_, model_->num_parameters());
    RETURN_IF_ERROR(sync_->AllGatherShards(optimizer_->m().data(), full_opt->m().data()));
    RETURN_IF_ERROR(sync_->AllGatherShards(optimizer_->v().data(), full_opt->v().data()));
    full_opt->set_step(optimizer_->step());
  }
  absl::Status saved;
  if (root_) {
    const TrainState state{done,   train_->position(), rng_.Serialize(), spec_text_,
                           world_, global_batch_,      run_id_};
    saved = sinks_.WriteCheckpoint(CheckpointData{model_->params(), zero1_ ? *full_opt : *optimizer_,
                                                  state, CheckpointPath(out_dir_, done)});
  }
  RETURN_IF_AGREED_ERROR(
      dist_->AllOk(saved, absl::StrCat("saving the step-", done, " checkpoint")));
  // Cheap insurance that data parallelism kept the replicas identical.
  RETURN_IF_AGREED_ERROR(dist_->VerifyIdentical(model_->params().params().data(),
                                                model_->num_parameters(),
                                                absl::StrCat("by step ", done)));
  return absl::OkStatus();
}

void TrainingSession::PrintStep(int done, const StepStats& s, double seconds,
                                double ema_step) const {
  const int steps = spec_.training().steps();
  const double tok_s = static_cast<double>(global_batch_) * T_ / seconds;
  std::printf("step %5d/%d | loss %.4f | lr %.2e | norm %.2f | %s tok/s | %.0f ms | ETA %s\n",
              done, steps, s.loss, s.lr, s.grad_norm, FormatRate(tok_s).c_str(), seconds * 1e3,
              FormatDuration(ema_step * (steps - done)).c_str());
  std::fflush(stdout);
}

}  // namespace qtrain
