// RunTraining: the step loop, one process or data-parallel ranks (distributed/): gradients are
// averaged over ranks (bucketed all-reduce, or ZeRO-1 reduce-scatter / sharded update /
// all-gather); rank 0 alone prints, writes metrics and checkpoints.
#include "trainer/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "configs/job_spec_loader.h"
#include "distributed/distributed_context.h"
#include "distributed/gradient_sync.h"
#include "distributed/nccl_communicator.h"
#include "ops/status_macros.h"
#include "trainer/atomic_file.h"
#include "trainer/checkpoint.h"
#include "trainer/data_loader.h"
#include "trainer/device_model.h"
#include "trainer/gpt.h"
#include "trainer/model_setup.h"
#include "trainer/metrics.h"
#include "trainer/optimizer.h"
#include "trainer/rng.h"
#include "trainer/schedule.h"

// Errors that every rank holds alike (DistributedContext marks them) go back untouched: their
// message is already the one each rank prints, without a trail of file:line annotations.
#define RETURN_IF_AGREED_ERROR(expr)    \
  do {                                  \
    absl::Status qt_agreed_ = (expr);   \
    if (!qt_agreed_.ok()) return qt_agreed_; \
  } while (0)

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

// Mean loss over `batches` batches from the start of the val split (same batches every time).
// Each rank evaluates its own slice of every batch (the val loader is rank-aware) and the result
// is the mean over ranks: world W with batch B sees the same tokens as one process with W*B.
absl::StatusOr<double> Evaluate(Gpt* model, DeviceModel* dev, DataLoader* val, int batches,
                                DistributedContext* dist) {
  ASSIGN_OR_RETURN(double mean, EvaluateLoss(
                                    [&](const int32_t* x, const int32_t* y, int B, int T) {
                                      return dev ? dev->Forward(x, y, B, T, 0.f)
                                                 : model->Forward(x, y, B, T);
                                    },
                                    val, batches));
  RETURN_IF_ERROR(dist->comm().AllReduceSum(&mean, 1));
  return mean / dist->world_size();
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

// The GPU gradient all-reduce, overlapped with the last micro-step's backward: the model
// reports ranges of final gradients (DeviceModel::SetGradientReadyHook), NCCL's stream waits for
// each range's event and sums it over the ranks while backward goes on with earlier blocks.
// Adjacent ranges are gathered until they hold a bucket (distributed.bucket_mb), so a small model
// does not pay a collective per block; a larger range goes whole. Every rank's model reports the
// same ranges in the same order, so the collectives match and the reduction is the same every
// run.
class OverlappedGradSum {
 public:
  OverlappedGradSum(NcclCommunicator* nccl, void* grads, GradDtype dtype, int64_t n,
                    int64_t bucket_bytes)
      : nccl_(nccl),
        grads_(grads),
        dtype_(dtype),
        n_(n),
        bucket_elems_(std::max<int64_t>(1, bucket_bytes / GradDtypeBytes(dtype))) {}

  // The hook: gradients [begin, end) are final once `ready` (a cudaEvent_t) has passed.
  absl::Status Ready(int64_t begin, int64_t end, void* ready) {
    if (begin < 0 || begin > end || end > n_) {
      return absl::InternalError(absl::StrCat("the model reported gradient range [", begin, ", ",
                                              end, ") outside [0, ", n_, ")"));
    }
    if (begin == end) return absl::OkStatus();
    seen_.push_back({begin, end});
    // NCCL's stream waits at once, whenever the bucket goes: later collectives queue behind it.
    RETURN_IF_ERROR(nccl_->WaitEvent(ready));
    if (pending_end_ > pending_begin_ && (end == pending_begin_ || begin == pending_end_)) {
      pending_begin_ = std::min(pending_begin_, begin);
      pending_end_ = std::max(pending_end_, end);
    } else {
      RETURN_IF_ERROR(Flush());
      pending_begin_ = begin;
      pending_end_ = end;
    }
    return pending_end_ - pending_begin_ >= bucket_elems_ ? Flush() : absl::OkStatus();
  }

  // After Backward: sends what is still gathered and checks that the ranges covered every
  // gradient exactly once (a gap would let the replicas drift apart). The caller then waits
  // with nccl->Synchronize() before anything else touches the gradients.
  absl::Status Finish() {
    RETURN_IF_ERROR(Flush());
    std::sort(seen_.begin(), seen_.end());
    int64_t covered = 0;
    for (const auto& [begin, end] : seen_) {
      if (begin != covered) {
        return absl::InternalError(absl::StrCat(
            "the model's gradient-ready ranges ", begin < covered ? "overlap" : "leave a gap",
            " at element ", std::min(begin, covered), " of ", n_));
      }
      covered = end;
    }
    seen_.clear();
    if (covered != n_) {
      return absl::InternalError(absl::StrCat("the model's gradient-ready ranges end at element ",
                                              covered, " of ", n_));
    }
    return absl::OkStatus();
  }

 private:
  absl::Status Flush() {
    if (pending_end_ <= pending_begin_) return absl::OkStatus();
    const int64_t n = pending_end_ - pending_begin_;
    if (dtype_ == GradDtype::kBf16) {
      RETURN_IF_ERROR(
          nccl_->AllReduceSumAsync(static_cast<ops::bf16*>(grads_) + pending_begin_, n));
    } else {
      RETURN_IF_ERROR(nccl_->AllReduceSumAsync(static_cast<float*>(grads_) + pending_begin_, n));
    }
    pending_begin_ = pending_end_ = 0;
    return absl::OkStatus();
  }

  NcclCommunicator* nccl_;
  void* grads_;
  GradDtype dtype_;
  int64_t n_;
  int64_t bucket_elems_;
  int64_t pending_begin_ = 0, pending_end_ = 0;  // gathered, not yet sent
  std::vector<std::pair<int64_t, int64_t>> seen_;
};

}  // namespace

absl::StatusOr<RunResult> RunTraining(const JobSpec& spec, const RunOptions& options) {
  RETURN_IF_ERROR(ValidateJobSpec(spec));
  std::unique_ptr<DistributedContext> own_dist;
  DistributedContext* dist = options.dist;
  if (dist == nullptr) {
    own_dist = DistributedContext::SingleProcess(spec.distributed());
    dist = own_dist.get();
  }
  const int world = dist->world_size(), rank = dist->rank();
  const bool root = dist->is_root();
  const bool quiet = options.quiet || !root;  // only rank 0 prints progress
  RETURN_IF_AGREED_ERROR(dist->VerifySameJob(JobSpecHash(spec)));

  // Rank 0 alone touches out_dir; every rank learns whether that worked.
  const std::string out_dir = spec.out_dir();
  const std::string spec_text = JobSpecToText(spec);
  absl::Status dir_ok;
  if (root) {
    std::error_code ec;
    std::filesystem::create_directories(out_dir, ec);
    dir_ok = ec ? absl::InternalError(
                      absl::StrCat("cannot create out_dir ", out_dir, ": ", ec.message()))
                : WriteFileAtomically(out_dir + "/job_spec.textproto", {spec_text});
  }
  RETURN_IF_AGREED_ERROR(dist->AllOk(dir_ok, "preparing out_dir"));

  const ModelSpec& ms = spec.model();
  const TrainingSpec& ts = spec.training();
  const int B = ts.batch_size(), T = ts.seq_len(), accum = ts.grad_accum();
  ASSIGN_OR_RETURN(GptConfig gc, ModelConfigFromSpec(spec));
  ASSIGN_OR_RETURN(std::unique_ptr<Gpt> model, Gpt::Create(gc));
  model->InitWeights(spec.seed(), ms.init_std());
  if (!ts.init_from().empty() && options.resume.empty()) {
    ASSIGN_OR_RETURN(int loaded, LoadWeights(ts.init_from(), &model->params(), IsQuantizerParam));
    if (!quiet) {
      std::printf("initialised %d weight tensors from %s\n", loaded, ts.init_from().c_str());
    }
  }
  std::unique_ptr<Teacher> teacher;
  if (!spec.precision().distill().teacher_checkpoint().empty()) {
    ASSIGN_OR_RETURN(teacher, Teacher::Load(spec));
  }

  const OptimizerSpec& os = spec.optimizer();
  AdamWConfig ac{os.beta1(), os.beta2(), os.eps(), os.weight_decay(), os.grad_clip()};
  // ZeRO-1: this rank keeps the Adam moments of its shard only.
  const bool zero1 = os.zero1();
  GradientSync sync(&dist->comm(), model->num_parameters(), dist->bucket_bytes());
  AdamW optimizer = zero1 ? AdamW(ac, model->num_parameters(), sync.begin(), sync.end())
                          : AdamW(ac, model->num_parameters());
  CosineSchedule schedule{os.lr(), spec.schedule().warmup_steps(), ts.steps(),
                          spec.schedule().min_lr_ratio()};
  // Sequences per optimizer step over all ranks; resuming needs the same number.
  const int64_t global_batch = int64_t{world} * B * accum;

  // Each rank reads its own B rows of every step; see DataLoader for the layout.
  absl::StatusOr<std::unique_ptr<DataLoader>> train =
      DataLoader::Open(spec.data().train_pattern(), B, T, rank, world, ms.vocab_size());
  RETURN_IF_AGREED_ERROR(dist->AllOk(train.status(), "opening training data"));
  absl::StatusOr<std::unique_ptr<DataLoader>> val =
      DataLoader::Open(spec.data().val_pattern(), B, T, rank, world, ms.vocab_size());
  RETURN_IF_AGREED_ERROR(dist->AllOk(val.status(), "opening validation data"));
  Rng rng(spec.seed() ^ 0x5eedull);

  int start_step = 0;
  if (!options.resume.empty()) {
    // Rank 0 reads the checkpoint (out_dir need only be visible to it) and sends the state.
    std::optional<AdamW> full_opt;
    if (zero1) full_opt.emplace(ac, model->num_parameters());
    AdamW* load_opt = zero1 ? &*full_opt : &optimizer;
    std::string path = options.resume;
    absl::StatusOr<TrainState> loaded = absl::UnknownError("not loaded");
    if (root) {
      absl::StatusOr<std::string> found =
          path == "latest" ? LatestCheckpoint(out_dir) : absl::StatusOr<std::string>(path);
      loaded = found.ok() ? LoadCheckpoint(*found, &model->params(), load_opt) : found.status();
      if (found.ok()) path = *found;
    }
    RETURN_IF_AGREED_ERROR(dist->AllOk(root ? loaded.status() : absl::OkStatus(), "resuming"));
    TrainState state = root ? *loaded : TrainState();
    RETURN_IF_ERROR(BroadcastResumeState(dist, model.get(), load_opt, &state));
    if (state.global_batch != 0 && state.global_batch != global_batch) {
      // Every rank holds the same state: one agreed error.
      return dist->AllOk(absl::FailedPreconditionError(absl::StrFormat(
          "%s was written with a global batch of %d sequences (%d ranks); this run has %d (%d "
          "ranks x batch_size %d x grad_accum %d). Resume with the same global batch: e.g. "
          "--global_batch=%d sets training.batch_size from the number of ranks",
          path, state.global_batch, state.world_size, global_batch, world, B, accum,
          state.global_batch)), "resuming");
    }
    if (zero1) {
      std::copy(full_opt->m().begin() + sync.begin(), full_opt->m().begin() + sync.end(),
                optimizer.m().begin());
      std::copy(full_opt->v().begin() + sync.begin(), full_opt->v().begin() + sync.end(),
                optimizer.v().begin());
      optimizer.set_step(full_opt->step());
    }
    RETURN_IF_ERROR(model->RestoreStateFromBuffers());
    RETURN_IF_ERROR((*train)->Seek(state.data));
    ASSIGN_OR_RETURN(rng, Rng::Deserialize(state.rng));
    start_step = state.step;
    if (!quiet) {
      std::printf("resumed from %s at step %d (written by %d rank%s)\n", path.c_str(),
                  start_step, state.world_size, state.world_size == 1 ? "" : "s");
    }
  } else {
    // Quantizer steps and Phi start from the final initial weights (random or init_from).
    RETURN_IF_ERROR(model->InitQuantizers());
    // Replicas start identical even where initialisation could differ between machines (libm).
    RETURN_IF_ERROR(dist->comm().Broadcast(model->params().params().data(),
                                           model->num_parameters() * 4, 0));
  }
  // On an accelerator the host model keeps the parameters for checkpoints; the device copy
  // computes every step.
  std::unique_ptr<DeviceModel> dev;
  // Gradients in device memory travel over NCCL (bootstrapped by the job's MPI), whichever of
  // MPI or NCCL the job names: one GPU per rank, picked by the local rank.
  std::unique_ptr<NcclCommunicator> nccl;
  std::optional<OverlappedGradSum> grad_sum;
  if (spec.device() == CUDA) {
    if (world > 1) {
      absl::StatusOr<std::unique_ptr<NcclCommunicator>> made_nccl =
          NcclCommunicator::Create(&dist->comm(), dist->local_rank(), dist->timeout());
      RETURN_IF_AGREED_ERROR(dist->AllOk(made_nccl.status(), "joining NCCL"));
      nccl = *std::move(made_nccl);
    }
    absl::StatusOr<std::unique_ptr<DeviceModel>> made =
        CreateCudaModel(gc, model->params(), GradDtypeFromSpec(ts));
    RETURN_IF_AGREED_ERROR(dist->AllOk(made.status(), "creating the CUDA model"));
    dev = *std::move(made);
    RETURN_IF_ERROR(ConfigureDeviceModel(ts, dev.get()));
    RETURN_IF_ERROR(dev->Upload(model->params(), &optimizer));
    if (nccl) {
      // The gradient buffer stays where it is for the model's life (no ZeroGrads is pending yet,
      // so asking for it clears nothing).
      grad_sum.emplace(nccl.get(), dev->device_grads(), dev->grad_dtype(),
                       dev->num_parameters(), dist->bucket_bytes());
    }
  }
  std::optional<MetricsLog> metrics;
  if (root) {
    absl::StatusOr<MetricsLog> opened = MetricsLog::Open(
        out_dir + "/metrics.jsonl", options.resume.empty() ? 0 : start_step);
    RETURN_IF_AGREED_ERROR(dist->AllOk(opened.status(), "opening metrics.jsonl"));
    metrics.emplace(*std::move(opened));
  } else {
    RETURN_IF_AGREED_ERROR(dist->AllOk(absl::OkStatus(), "opening metrics.jsonl"));
  }

  const int steps = ts.steps();
  const int eval_every = spec.eval().every_steps();
  const int ckpt_every = spec.checkpoint().every_steps();
  const int log_every = spec.logging().every_steps();
  const double tokens_per_step = static_cast<double>(global_batch) * T;
  if (!quiet) {
    std::printf("qtrain: job '%s', %.2fM parameters, %d layers, d=%d, B=%d T=%d accum=%d, "
                "%d steps, out_dir %s\n",
                spec.name().c_str(), model->num_parameters() / 1e6, ms.n_layer(), ms.n_embd(),
                B, T, accum, steps, out_dir.c_str());
    if (world > 1) {
      std::printf("data parallel: %d ranks (%s%s), global batch %lld sequences, %s, "
                  "buckets of %lld MiB, timeout %s\n",
                  world, dist->comm().backend().c_str(),
                  dist->launcher().empty() ? "" : (" via " + dist->launcher()).c_str(),
                  static_cast<long long>(global_batch),
                  zero1 ? "ZeRO-1 optimizer shards" : "replicated optimizer",
                  static_cast<long long>(dist->bucket_bytes() >> 20),
                  absl::FormatDuration(dist->timeout()).c_str());
    }
    std::fflush(stdout);
  }

  std::vector<int32_t> x(static_cast<size_t>(B) * T), y(static_cast<size_t>(B) * T);
  RunResult result;
  double timed_seconds = 0;
  int timed_steps = 0;
  double ema_step = 0;  // recent step time, for the ETA
  for (int step = start_step; step < steps; ++step) {
    const auto t0 = Clock::now();
    const float lr = schedule.LrAt(step);
    if (world > 1) dist->comm().SetActivity(absl::StrCat("step ", step + 1));
    // QVGen rank decay; re-factorised Phi tensors start their optimizer state afresh.
    for (int idx : model->ApplyRankSchedule(step)) {
      const ParamInfo& info = model->params().info(idx);
      optimizer.ResetMoments(info.offset, info.size);
    }
    if (dev) {
      RETURN_IF_ERROR(dev->ZeroGrads());
    } else {
      model->params().ZeroGrads();
    }
    double loss = 0, tweo = 0, distill = 0;
    for (int micro = 0; micro < accum; ++micro) {
      RETURN_IF_ERROR((*train)->Next(x.data(), y.data()));
      if (dev) {
        // The 1/world of the mean over ranks rides in the loss scale: NCCL then only sums.
        const float loss_scale = 1.0f / (accum * world);
        ASSIGN_OR_RETURN(double l, dev->Forward(x.data(), y.data(), B, T, loss_scale));
        // Several GPUs: the last micro-step's backward hands each range of finished gradients
        // to NCCL as it goes (earlier micro-steps only add to the gradients).
        const bool overlap = grad_sum && micro == accum - 1;
        if (overlap) {
          dev->SetGradientReadyHook([&](int64_t begin, int64_t end, void* ready) {
            return grad_sum->Ready(begin, end, ready);
          });
        }
        const absl::Status backward = dev->Backward(loss_scale);
        if (overlap) dev->SetGradientReadyHook(nullptr);
        RETURN_IF_ERROR(backward);
        if (overlap) {
          // The sums end before the model's stream touches the gradients again.
          RETURN_IF_ERROR(grad_sum->Finish());
          RETURN_IF_ERROR(nccl->Synchronize());
        }
        loss += l / accum;
        continue;
      }
      ASSIGN_OR_RETURN(double l, model->Forward(x.data(), y.data(), B, T, /*training=*/true));
      const float* dlogits = nullptr;
      if (teacher) {
        ASSIGN_OR_RETURN(double d, teacher->Loss(model.get(), x.data(), B, T, 1.0f / accum));
        distill += d / accum;
        dlogits = teacher->dlogits();
      }
      RETURN_IF_ERROR(model->Backward(1.0f / accum, dlogits));
      loss += l / accum;
      tweo += model->tweo_loss() / accum;
    }
    // Every logged loss is the mean over ranks (each rank's is the mean over its tokens).
    double losses[3] = {loss, tweo, distill};
    RETURN_IF_ERROR(dist->comm().AllReduceSum(losses, 3));
    loss = losses[0] / world;
    tweo = losses[1] / world;
    distill = losses[2] / world;
    if (!std::isfinite(loss)) {
      // The loss is global: every rank gets here together.
      return dist->AllOk(absl::InternalError(absl::StrCat("train loss became ", loss, " at step ",
                                                          step + 1,
                                                          "; lower optimizer.lr or check the data")),
                         "training");
    }
    double grad_norm = 0;
    float* grads = model->params().grads().data();
    if (dev) {
      ASSIGN_OR_RETURN(const double sum_squares, dev->GradSumSquares());
      grad_norm = std::sqrt(sum_squares);
      optimizer.set_step(optimizer.step() + 1);
      // The update may still run while the next step's forward starts (CudaGpt overlaps them);
      // the step times below are the host's, bounded by each Forward's wait for its loss.
      RETURN_IF_ERROR(dev->Update(lr, grad_norm, ac, optimizer.step()));
    } else if (zero1) {
      // Reduce-scatter: this rank's shard of the mean gradient; the clip needs the norm of the
      // whole gradient, summed over shards; then each rank updates its shard and the updated
      // parameters are gathered back into every replica.
      RETURN_IF_ERROR(sync.ReduceScatterMean(grads));
      ASSIGN_OR_RETURN(const double sum_squares, sync.ShardedSumSquares(grads));
      grad_norm = std::sqrt(sum_squares);
      optimizer.Update(&model->params(), lr, grad_norm);
      RETURN_IF_ERROR(sync.AllGatherShards(model->params().params().data()));
    } else {
      RETURN_IF_ERROR(sync.AllReduceMean(grads));
      grad_norm = optimizer.Step(&model->params(), lr);
    }
    if (step == start_step && options.resume.empty()) {
      // Quantizers that initialise on the first training batch (QAT activation steps) did so
      // from each rank's own slice of it; rank 0's values win, so the replicas stay identical.
      RETURN_IF_ERROR(SyncReplicasFromRoot(dist, model.get()));
    }
    const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    // The first step of a process warms caches and allocations: keep it out of the mean.
    if (step > start_step) {
      timed_seconds += seconds;
      ++timed_steps;
    }
    ema_step = ema_step == 0 || step == start_step + 1 ? seconds : 0.9 * ema_step + 0.1 * seconds;
    const double tok_s = tokens_per_step / seconds;
    const int done = step + 1;
    MetricRow row = {{"train_loss", loss}, {"lr", lr}, {"grad_norm", grad_norm},
                     {"tokens_per_s", tok_s}, {"step_ms", seconds * 1e3}};
    // Block statistics come from the host model's activations, which a device run does not fill.
    if (!dev) AddModelMetrics(*model, spec, tweo, distill, teacher != nullptr, &row);
    const bool last = done == steps;
    if ((eval_every > 0 && done % eval_every == 0) || last) {
      ASSIGN_OR_RETURN(double vl, Evaluate(model.get(), dev.get(), val->get(), spec.eval().batches(),
                                           dist));
      row.push_back({"val_loss", vl});
      result.final_val_loss = vl;
      if (!quiet) {
        std::printf("step %5d/%d | val loss %.4f\n", done, steps, vl);
      }
    }
    if (root) RETURN_IF_ERROR(metrics->Write(done, row));
    if (!quiet && (done % log_every == 0 || last || step == start_step)) {
      std::printf("step %5d/%d | loss %.4f | lr %.2e | norm %.2f | %s tok/s | %.0f ms | ETA %s\n",
                  done, steps, loss, lr, grad_norm, FormatRate(tok_s).c_str(), seconds * 1e3,
                  FormatDuration(ema_step * (steps - done)).c_str());
      std::fflush(stdout);
    }
    if ((ckpt_every > 0 && done % ckpt_every == 0) || last) {
      model->SaveStateToBuffers();
      if (dev) RETURN_IF_ERROR(dev->Download(&model->params(), &optimizer));
      // Checkpoints hold whole moments whatever the world size: gather ZeRO-1 shards first.
      std::optional<AdamW> full_opt;
      if (zero1) {
        full_opt.emplace(ac, model->num_parameters());
        RETURN_IF_ERROR(sync.AllGatherShards(optimizer.m().data(), full_opt->m().data()));
        RETURN_IF_ERROR(sync.AllGatherShards(optimizer.v().data(), full_opt->v().data()));
        full_opt->set_step(optimizer.step());
      }
      absl::Status saved;
      if (root) {
        TrainState state{done, (*train)->position(), rng.Serialize(), spec_text, world,
                         global_batch};
        saved = SaveCheckpoint(out_dir, model->params(), zero1 ? &*full_opt : &optimizer, state,
                               spec.checkpoint().keep_last());
      }
      RETURN_IF_AGREED_ERROR(dist->AllOk(saved, absl::StrCat("saving the step-", done, " checkpoint")));
      // Cheap insurance that data parallelism kept the replicas identical.
      RETURN_IF_AGREED_ERROR(dist->VerifyIdentical(model->params().params().data(),
                                            model->num_parameters(),
                                            absl::StrCat("by step ", done)));
    }
    result.steps_done = done;
    result.final_train_loss = loss;
  }
  result.tokens_per_s = timed_steps > 0 ? tokens_per_step * timed_steps / timed_seconds : 0;
  if (!quiet) {
    std::printf("done: %d steps, final train loss %.4f, final val loss %.4f, %s tok/s\n",
                result.steps_done, result.final_train_loss, result.final_val_loss,
                FormatRate(result.tokens_per_s).c_str());
  }
  return result;
}

}  // namespace qtrain
