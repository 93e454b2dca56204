// Training-step benchmark of the CUDA model for a job spec: random init and random tokens (no
// data needed), warm-up, then timed steps of ZeroGrads/Forward/Backward/GradSumSquares/Update;
// prints tokens/s, step time, MFU, device memory and a per-op table of one profiled pass.
//
// Usage: bench --job=configs/gpt2_124m.textproto [--steps=30 --warmup=5 --profile_steps=3]
//              [--batch_size=B] [--seq_len=T] [--precision='linear: FP8 fp8 { scaling: BLOCK }']
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "configs/job_spec_loader.h"
#include "google/protobuf/text_format.h"
#include "ops/cuda/device.h"
#include "ops/status_macros.h"
#include "trainer/cli.h"
#include "trainer/cuda/gpt_cuda.h"
#include "trainer/cuda/gpt_cuda_kernels.h"
#include "trainer/gpt.h"
#include "trainer/model_setup.h"
#include "trainer/optimizer.h"

ABSL_FLAG(std::string, job, "", "job spec (text proto), e.g. configs/gpt2_124m.textproto");
ABSL_FLAG(int, steps, 30, "timed optimizer steps");
ABSL_FLAG(int, warmup, 5, "untimed steps first (allocation, cuBLASLt heuristics, clocks)");
ABSL_FLAG(int, profile_steps, 3, "steps of the per-op profile after the timed ones (0: none)");
ABSL_FLAG(int, batch_size, 0, "sequences per step (0: the job's training.batch_size)");
ABSL_FLAG(int, seq_len, 0, "tokens per sequence (0: the job's training.seq_len)");
ABSL_FLAG(double, peak_tflops, 989.0, "dense BF16 peak for MFU (H100 SXM: 989)");
ABSL_FLAG(bool, gelu_fusion, true,
          "GELU and its gradient in cuBLASLt's GEMM epilogues (false: our kernels after a plain "
          "GEMM)");
ABSL_FLAG(std::string, precision, "",
          "a PrecisionSpec in text format that replaces the job's precision block, e.g. "
          "'linear: QAT qat { weight_bits: 4 act_bits: 4 }'");
ABSL_FLAG(bool, autotune, false,
          "time cuBLASLt's candidate algorithms per GEMM on first use and keep the fastest "
          "(prints what it chose)");

namespace qtrain {
namespace {

using Clock = std::chrono::steady_clock;

// GPT-2 style init without the host Rng's cost at 1.5B parameters: per tensor the same scheme
// as Gpt::InitWeights (N(0, 0.02), residual projections 0.02/sqrt(2L), ones and zeros), the
// normals from a fast generator (a benchmark needs realistic magnitudes, not those exact draws).
void FastInit(ParamStore* store, int n_layer) {
  const float std_ = 0.02f, proj_std = std_ / std::sqrt(2.0f * n_layer);
  for (int i = 0; i < store->size(); ++i) {
    const ParamInfo& info = store->info(i);
    float* p = store->param(i);
    const std::string& n = info.name;
    auto ends = [&](const char* s) {
      const std::string t(s);
      return n.size() >= t.size() && n.compare(n.size() - t.size(), t.size(), t) == 0;
    };
    if (ends(".bias")) {
      std::fill(p, p + info.size, 0.0f);
    } else if (ends("ln1.weight") || ends("ln2.weight") || ends("lnf.weight")) {
      std::fill(p, p + info.size, 1.0f);
    } else {
      const float sd = (ends("attn.proj.weight") || ends("mlp.proj.weight")) ? proj_std : std_;
#pragma omp parallel for schedule(static)
      for (int64_t c = 0; c < (info.size + 65535) / 65536; ++c) {
        std::mt19937_64 gen(static_cast<uint64_t>(i) * 1000003u + c);
        std::normal_distribution<float> dist(0.0f, sd);
        const int64_t end = std::min<int64_t>(info.size, (c + 1) * 65536);
        for (int64_t k = c * 65536; k < end; ++k) p[k] = dist(gen);
      }
    }
  }
}

absl::Status Main() {
  const std::string job = absl::GetFlag(FLAGS_job);
  if (job.empty()) return absl::InvalidArgumentError("--job is required");
  ASSIGN_OR_RETURN(JobSpec spec, LoadJobSpec(job));
  if (!absl::GetFlag(FLAGS_precision).empty()) {
    PrecisionSpec p;
    if (!google::protobuf::TextFormat::ParseFromString(absl::GetFlag(FLAGS_precision), &p)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--precision: not a PrecisionSpec in text format: ",
                       absl::GetFlag(FLAGS_precision)));
    }
    *spec.mutable_precision() = p;
    ApplyDefaults(&spec);
    RETURN_IF_ERROR(ValidateJobSpec(spec));
  }
  ASSIGN_OR_RETURN(const GptConfig config, ModelConfigFromSpec(spec));
  const int B = absl::GetFlag(FLAGS_batch_size) > 0 ? absl::GetFlag(FLAGS_batch_size)
                                                    : spec.training().batch_size();
  const int T = absl::GetFlag(FLAGS_seq_len) > 0 ? absl::GetFlag(FLAGS_seq_len)
                                                 : spec.training().seq_len();
  const int steps = std::max(1, absl::GetFlag(FLAGS_steps));
  const int warmup = std::max(0, absl::GetFlag(FLAGS_warmup));
  ASSIGN_OR_RETURN(const std::string device, ops::DeviceDescription());

  ASSIGN_OR_RETURN(std::unique_ptr<Gpt> host, Gpt::Create(config));
  FastInit(&host->params(), config.n_layer);
  // QAT steps from the weights (Phi's SVD follows on the device).
  RETURN_IF_ERROR(host->InitQuantizers(PhiInit::kSkip));
  gpu::DeviceMemory mem0;
  RETURN_IF_ERROR(gpu::GetDeviceMemory(&mem0));
  const GradDtype grad_dtype = GradDtypeFromSpec(spec.training());
  ASSIGN_OR_RETURN(std::unique_ptr<CudaGpt> model,
                   CudaGpt::Create(config, host->params(), grad_dtype));
  RETURN_IF_ERROR(ConfigureDeviceModel(spec.training(), model.get()));
  model->set_autotune(absl::GetFlag(FLAGS_autotune));
  model->matmul().set_gelu_fusion(absl::GetFlag(FLAGS_gelu_fusion));
  RETURN_IF_ERROR(model->Upload(host->params(), nullptr));
  RETURN_IF_ERROR(model->InitPhi());
  const double flops_per_token = host->flops_per_token(T);
  const int64_t n_params = host->num_parameters();
  host.reset();  // the host copy is not needed any more

  // Four batches of random tokens, cycled (like the PyTorch anchor).
  std::vector<std::vector<int32_t>> xs(4), ys(4);
  std::mt19937 gen(1);
  for (int i = 0; i < 4; ++i) {
    xs[i].resize(static_cast<size_t>(B) * T);
    ys[i].resize(xs[i].size());
    for (size_t k = 0; k < xs[i].size(); ++k) {
      xs[i][k] = static_cast<int32_t>(gen() % config.vocab_size);
      ys[i][k] = static_cast<int32_t>(gen() % config.vocab_size);
    }
  }
  AdamWConfig adam;
  adam.beta1 = spec.optimizer().beta1();
  adam.beta2 = spec.optimizer().beta2();
  adam.weight_decay = spec.optimizer().weight_decay();
  adam.grad_clip = spec.optimizer().grad_clip();
  const float lr = spec.optimizer().lr();
  int t = 0;
  double last_loss = 0, last_norm = 0;
  const bool phi = spec.precision().aux_lowrank().enabled();
  auto step = [&](int i) -> absl::Status {
    // As the trainer drives it: the rank schedule forms Phi's W_eff for the step.
    if (phi) RETURN_IF_ERROR(model->ApplyRankSchedule(t));
    RETURN_IF_ERROR(model->ZeroGrads());
    ASSIGN_OR_RETURN(last_loss,
                     model->Forward(xs[i % 4].data(), ys[i % 4].data(), B, T, 1.0f));
    RETURN_IF_ERROR(model->Backward(1.0f));
    ASSIGN_OR_RETURN(const double ss, model->GradSumSquares());
    last_norm = std::sqrt(ss);
    return model->Update(lr, last_norm, adam, ++t);
  };

  std::printf("bench: %s on %s\n", spec.name().c_str(), device.c_str());
  {
    std::string prec;
    google::protobuf::TextFormat::Printer printer;
    printer.SetSingleLineMode(true);
    printer.PrintToString(spec.precision(), &prec);
    std::printf("precision: %s\n", prec.empty() ? "FULL (BF16)" : prec.c_str());
  }
  std::printf("model: %.1fM parameters, %d layers, d=%d, %d heads, V=%d; B=%d T=%d (%d tokens "
              "per step); %.3g FLOPs per token; %s gradients%s%s%s\n",
              n_params / 1e6, config.n_layer, config.n_embd, config.n_head, config.vocab_size, B,
              T, B * T, flops_per_token, grad_dtype == GradDtype::kBf16 ? "BF16" : "FP32",
              spec.training().deterministic() ? "; deterministic" : "",
              absl::GetFlag(FLAGS_gelu_fusion) ? "" : "; GELU after the GEMMs (not fused)",
              absl::GetFlag(FLAGS_autotune) ? "; GEMM autotuning" : "");
  std::fflush(stdout);
  const auto w0 = Clock::now();
  for (int i = 0; i < warmup; ++i) RETURN_IF_ERROR(step(i));
  RETURN_IF_ERROR(model->Synchronize());
  const double warm_s = std::chrono::duration<double>(Clock::now() - w0).count();
  std::printf("warm-up: %d steps in %.2f s, loss %.4f\n", warmup, warm_s, last_loss);

  std::vector<double> step_ms;
  const auto t0 = Clock::now();
  // No wait between steps: the model overlaps a step's AdamW update with the next forward, as
  // in training. Per-step times are the host's, which each Forward's wait for its loss ties to
  // the device; the mean comes from the total after one final wait.
  for (int i = 0; i < steps; ++i) {
    const auto s0 = Clock::now();
    RETURN_IF_ERROR(step(warmup + i));
    step_ms.push_back(std::chrono::duration<double, std::milli>(Clock::now() - s0).count());
  }
  RETURN_IF_ERROR(model->Synchronize());
  const double total_s = std::chrono::duration<double>(Clock::now() - t0).count();
  gpu::DeviceMemory mem1;
  RETURN_IF_ERROR(gpu::GetDeviceMemory(&mem1));
  std::vector<double> sorted = step_ms;
  std::sort(sorted.begin(), sorted.end());
  const double mean_ms = total_s * 1e3 / steps, median_ms = sorted[sorted.size() / 2];
  const double tok_s = static_cast<double>(B) * T / (mean_ms * 1e-3);
  const double mfu = tok_s * flops_per_token / (absl::GetFlag(FLAGS_peak_tflops) * 1e12);
  const double model_gib = model->allocated_bytes() / double(1 << 30);
  const double used_gib = (mem1.total_bytes - mem1.free_bytes) / double(1 << 30);
  const double before_gib = (mem0.total_bytes - mem0.free_bytes) / double(1 << 30);
  std::printf("timed: %d steps, mean %.2f ms, median %.2f ms, min %.2f ms; loss %.4f, grad norm "
              "%.3f\n",
              steps, mean_ms, median_ms, sorted.front(), last_loss, last_norm);
  std::printf("throughput: %.0f tokens/s, MFU %.1f%% of %.0f TFLOP/s (%.1f TFLOP/s achieved)\n",
              tok_s, 100 * mfu, absl::GetFlag(FLAGS_peak_tflops), tok_s * flops_per_token / 1e12);
  if (model->fp8_matmul() != nullptr) {
    int cublaslt = 0, own = 0;
    for (const ops::Fp8GemmRecord& r : model->fp8_matmul()->report()) {
      (r.cublaslt ? cublaslt : own) += 1;
      if (!r.cublaslt) std::printf("fp8 gemm (own kernel): %s (%s)\n", r.problem.c_str(),
                                   r.why_not.c_str());
    }
    std::printf("fp8 gemms: %d problems on cuBLASLt, %d on our kernel\n", cublaslt, own);
  }
  std::printf("memory: model buffers %.2f GiB; device in use %.2f GiB (%.2f GiB before the "
              "model: CUDA context and others)\n",
              model_gib, used_gib, before_gib);

  if (absl::GetFlag(FLAGS_autotune)) {
    std::printf("GEMM autotuning (heuristic #0 vs chosen, ms):\n");
    for (const ops::MatmulTuneRecord& r : model->matmul().autotune_report()) {
      std::printf("  %-70s %d cand., #%d: %.4f -> %.4f\n", r.problem.c_str(), r.candidates,
                  r.chosen, r.default_ms, r.chosen_ms);
    }
  }
  const int profile_steps = absl::GetFlag(FLAGS_profile_steps);
  if (profile_steps > 0) {
    model->set_profiling(true);
    model->ResetProfile();
    for (int i = 0; i < profile_steps; ++i) RETURN_IF_ERROR(step(i));
    ASSIGN_OR_RETURN(const auto prof, model->Profile());
    model->set_profiling(false);
    double total = 0;
    for (const auto& [op, ms] : prof) total += ms;
    std::vector<std::pair<double, std::string>> rows;
    for (const auto& [op, ms] : prof) rows.push_back({ms / profile_steps, op});
    std::sort(rows.rbegin(), rows.rend());
    std::printf("per-op device time (mean of %d profiled steps; events around every op, "
                "'(host)' = device idle waiting for the host):\n",
                profile_steps);
    std::map<std::string, double> phase;
    for (const auto& [ms, op] : rows) {
      std::printf("  %-30s %8.3f ms  %5.1f%%\n", op.c_str(), ms,
                  100.0 * ms * profile_steps / total);
      const std::string p = op.rfind("fwd", 0) == 0 ? "forward" : op.rfind("bwd", 0) == 0 ? "backward"
                            : op == "(host)" ? "idle (host)" : "optimizer+other";
      phase[p] += ms;
    }
    std::printf("phases:");
    for (const auto& [p, ms] : phase) std::printf("  %s %.2f ms", p.c_str(), ms);
    std::printf("  (profiled step %.2f ms)\n", total / profile_steps);
  }
  std::printf("{\"job\": \"%s\", \"device\": \"%s\", \"params_M\": %.1f, \"B\": %d, \"T\": %d, "
              "\"step_ms\": %.2f, \"tok_per_s\": %.0f, \"mfu\": %.3f, \"model_GiB\": %.2f, "
              "\"device_used_GiB\": %.2f, \"loss\": %.4f}\n",
              spec.name().c_str(), device.c_str(), n_params / 1e6, B, T, mean_ms, tok_s, mfu,
              model_gib, used_gib, last_loss);
  return absl::OkStatus();
}

}  // namespace
}  // namespace qtrain

int main(int argc, char** argv) {
  qtrain::InitCommandLine(argc, argv,
                          "bench --job=configs/gpt2_124m.textproto [--steps=30] [--warmup=5] "
                          "[--batch_size=N] [--seq_len=N] [--autotune]",
                          __FILE__);
  const absl::Status s = qtrain::Main();
  if (!s.ok()) {
    std::fprintf(stderr, "bench: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
