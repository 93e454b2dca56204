// RunTraining: the step loop.
#include "trainer/trainer.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "configs/job_spec_loader.h"
#include "ops/status_macros.h"
#include "trainer/atomic_file.h"
#include "trainer/checkpoint.h"
#include "trainer/data_loader.h"
#include "trainer/gpt.h"
#include "trainer/model_setup.h"
#include "trainer/metrics.h"
#include "trainer/optimizer.h"
#include "trainer/rng.h"
#include "trainer/schedule.h"

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
absl::StatusOr<double> Evaluate(Gpt* model, DataLoader* val, int batches, int B, int T) {
  val->Reset();
  std::vector<int32_t> x(static_cast<size_t>(B) * T), y(static_cast<size_t>(B) * T);
  double sum = 0;
  for (int i = 0; i < batches; ++i) {
    RETURN_IF_ERROR(val->Next(x.data(), y.data()));
    ASSIGN_OR_RETURN(double loss, model->Forward(x.data(), y.data(), B, T));
    sum += loss;
  }
  return sum / batches;
}

}  // namespace

absl::StatusOr<RunResult> RunTraining(const JobSpec& spec, const RunOptions& options) {
  RETURN_IF_ERROR(ValidateJobSpec(spec));
  const std::string out_dir = spec.out_dir();
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create out_dir ", out_dir, ": ", ec.message()));
  const std::string spec_text = JobSpecToText(spec);
  RETURN_IF_ERROR(WriteFileAtomically(out_dir + "/job_spec.textproto", {spec_text}));

  const ModelSpec& ms = spec.model();
  const TrainingSpec& ts = spec.training();
  const int B = ts.batch_size(), T = ts.seq_len(), accum = ts.grad_accum();
  ASSIGN_OR_RETURN(GptConfig gc, ModelConfigFromSpec(spec));
  ASSIGN_OR_RETURN(std::unique_ptr<Gpt> model, Gpt::Create(gc));
  model->InitWeights(spec.seed(), ms.init_std());
  if (!ts.init_from().empty() && options.resume.empty()) {
    ASSIGN_OR_RETURN(int loaded, LoadWeights(ts.init_from(), &model->params(), IsQuantizerParam));
    if (!options.quiet) {
      std::printf("initialised %d weight tensors from %s\n", loaded, ts.init_from().c_str());
    }
  }
  std::unique_ptr<Teacher> teacher;
  if (!spec.precision().distill().teacher_checkpoint().empty()) {
    ASSIGN_OR_RETURN(teacher, Teacher::Load(spec));
  }

  const OptimizerSpec& os = spec.optimizer();
  AdamWConfig ac{os.beta1(), os.beta2(), os.eps(), os.weight_decay(), os.grad_clip()};
  AdamW optimizer(ac, model->num_parameters());
  CosineSchedule schedule{os.lr(), spec.schedule().warmup_steps(), ts.steps(),
                          spec.schedule().min_lr_ratio()};

  ASSIGN_OR_RETURN(std::unique_ptr<DataLoader> train,
                   DataLoader::Open(spec.data().train_pattern(), B, T, 0, 1, ms.vocab_size()));
  ASSIGN_OR_RETURN(std::unique_ptr<DataLoader> val,
                   DataLoader::Open(spec.data().val_pattern(), B, T, 0, 1, ms.vocab_size()));
  Rng rng(spec.seed() ^ 0x5eedull);

  int start_step = 0;
  if (!options.resume.empty()) {
    std::string path = options.resume;
    if (path == "latest") {
      ASSIGN_OR_RETURN(path, LatestCheckpoint(out_dir));
    }
    ASSIGN_OR_RETURN(TrainState state, LoadCheckpoint(path, &model->params(), &optimizer));
    RETURN_IF_ERROR(model->RestoreStateFromBuffers());
    RETURN_IF_ERROR(train->Seek(state.data));
    ASSIGN_OR_RETURN(rng, Rng::Deserialize(state.rng));
    start_step = state.step;
    if (!options.quiet) std::printf("resumed from %s at step %d\n", path.c_str(), start_step);
  } else {
    // Quantizer steps and Phi start from the final initial weights (random or init_from).
    RETURN_IF_ERROR(model->InitQuantizers());
  }
  ASSIGN_OR_RETURN(MetricsLog metrics,
                   MetricsLog::Open(out_dir + "/metrics.jsonl",
                                    options.resume.empty() ? 0 : start_step));

  const int steps = ts.steps();
  const int eval_every = spec.eval().every_steps();
  const int ckpt_every = spec.checkpoint().every_steps();
  const int log_every = spec.logging().every_steps();
  const double tokens_per_step = static_cast<double>(B) * T * accum;
  if (!options.quiet) {
    std::printf("qtrain: job '%s', %.2fM parameters, %d layers, d=%d, B=%d T=%d accum=%d, "
                "%d steps, out_dir %s\n",
                spec.name().c_str(), model->num_parameters() / 1e6, ms.n_layer(), ms.n_embd(),
                B, T, accum, steps, out_dir.c_str());
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
    // QVGen rank decay; re-factorised Phi tensors start their optimizer state afresh.
    for (int idx : model->ApplyRankSchedule(step)) {
      const ParamInfo& info = model->params().info(idx);
      std::fill_n(optimizer.m().begin() + info.offset, info.size, 0.0f);
      std::fill_n(optimizer.v().begin() + info.offset, info.size, 0.0f);
    }
    model->params().ZeroGrads();
    double loss = 0, tweo = 0, distill = 0;
    for (int micro = 0; micro < accum; ++micro) {
      RETURN_IF_ERROR(train->Next(x.data(), y.data()));
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
    if (!std::isfinite(loss)) {
      return absl::InternalError(absl::StrCat("train loss became ", loss, " at step ", step + 1,
                                              "; lower optimizer.lr or check the data"));
    }
    const double grad_norm = optimizer.Step(&model->params(), lr);
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
    AddModelMetrics(*model, spec, tweo, distill, teacher != nullptr, &row);
    const bool last = done == steps;
    if ((eval_every > 0 && done % eval_every == 0) || last) {
      ASSIGN_OR_RETURN(double vl, Evaluate(model.get(), val.get(), spec.eval().batches(), B, T));
      row.push_back({"val_loss", vl});
      result.final_val_loss = vl;
      if (!options.quiet) {
        std::printf("step %5d/%d | val loss %.4f\n", done, steps, vl);
      }
    }
    RETURN_IF_ERROR(metrics.Write(done, row));
    if (!options.quiet && (done % log_every == 0 || last || step == start_step)) {
      std::printf("step %5d/%d | loss %.4f | lr %.2e | norm %.2f | %s tok/s | %.0f ms | ETA %s\n",
                  done, steps, loss, lr, grad_norm, FormatRate(tok_s).c_str(), seconds * 1e3,
                  FormatDuration(ema_step * (steps - done)).c_str());
      std::fflush(stdout);
    }
    if ((ckpt_every > 0 && done % ckpt_every == 0) || last) {
      model->SaveStateToBuffers();
      TrainState state{done, train->position(), rng.Serialize(), spec_text};
      RETURN_IF_ERROR(SaveCheckpoint(out_dir, model->params(), &optimizer, state,
                                     spec.checkpoint().keep_last()));
    }
    result.steps_done = done;
    result.final_train_loss = loss;
  }
  result.tokens_per_s = timed_steps > 0 ? tokens_per_step * timed_steps / timed_seconds : 0;
  if (!options.quiet) {
    std::printf("done: %d steps, final train loss %.4f, final val loss %.4f, %s tok/s\n",
                result.steps_done, result.final_train_loss, result.final_val_loss,
                FormatRate(result.tokens_per_s).c_str());
  }
  return result;
}

}  // namespace qtrain
