// Times the QAT kernels (ops/cuda/lsq_cuda.h, layernorm_quant_cuda.h, gelu_quant_cuda.h,
// lowrank_cuda.h, matmul_int8_cuda.h) at GPT-2 shapes next to their unquantized counterparts,
// and the INT8 forward GEMM against the BF16 GEMM: one row per kernel, median time per call and
// the achieved GB/s (with its share of the H200's ~4.3 TB/s copy ceiling) or TFLOP/s (TOPS for
// INT8). A benchmark for the GPU machine, not a test.
//
// Usage: qat_bench [--only=SUBSTRING] [--reps=N] [--int8_scratch_mb=MB]
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ops/cuda/bf16.h"
#include "ops/cuda/device.h"
#include "ops/cuda/gelu_cuda.h"
#include "ops/cuda/gelu_quant_cuda.h"
#include "ops/cuda/layernorm_cuda.h"
#include "ops/cuda/layernorm_quant_cuda.h"
#include "ops/cuda/lowrank_cuda.h"
#include "ops/cuda/lsq_cuda.h"
#include "ops/cuda/matmul_cuda.h"
#include "ops/cuda/matmul_int8_cuda.h"
#include "ops/status_macros.h"

namespace qtrain::ops {
namespace {

constexpr double kCopyCeilingGBs = 4300.0;  // H200 device copy, measured (ENVIRONMENT.md)

struct Options {
  std::string only;
  int reps = 20;
  int64_t int8_scratch_mb = Int8MatmulContext::kDefaultScratchBytes >> 20;
};

// Device buffers freed at exit, filled with random values (never zeros).
class Arena {
 public:
  ~Arena() {
    for (void* p : ptrs_) (void)DeviceFree(p);
  }
  absl::StatusOr<void*> Alloc(int64_t bytes) {
    ASSIGN_OR_RETURN(void* p, DeviceMalloc(std::max<int64_t>(bytes, 256)));
    ptrs_.push_back(p);
    return p;
  }
  absl::StatusOr<bf16*> Bf16(int64_t n, float lo = -1.f, float hi = 1.f) {
    std::vector<bf16> h(n);
    std::mt19937 gen(static_cast<uint32_t>(ptrs_.size() + 1));
    std::uniform_real_distribution<float> d(lo, hi);
    for (bf16& x : h) x = FloatToBf16(d(gen));
    ASSIGN_OR_RETURN(void* p, Alloc(n * 2));
    RETURN_IF_ERROR(CopyHostToDevice(p, h.data(), n * 2));
    return static_cast<bf16*>(p);
  }
  absl::StatusOr<float*> F32(int64_t n, float lo = -1.f, float hi = 1.f) {
    std::vector<float> h(n);
    std::mt19937 gen(static_cast<uint32_t>(ptrs_.size() + 1));
    std::uniform_real_distribution<float> d(lo, hi);
    for (float& x : h) x = d(gen);
    ASSIGN_OR_RETURN(void* p, Alloc(n * 4));
    RETURN_IF_ERROR(CopyHostToDevice(p, h.data(), n * 4));
    return static_cast<float*>(p);
  }
  absl::StatusOr<int8_t*> I8(int64_t n, int lo, int hi) {
    std::vector<int8_t> h(n);
    std::mt19937 gen(static_cast<uint32_t>(ptrs_.size() + 1));
    std::uniform_int_distribution<int> d(lo, hi);
    for (int8_t& x : h) x = static_cast<int8_t>(d(gen));
    ASSIGN_OR_RETURN(void* p, Alloc(n));
    RETURN_IF_ERROR(CopyHostToDevice(p, h.data(), n));
    return static_cast<int8_t*>(p);
  }

 private:
  std::vector<void*> ptrs_;
};

class Bench {
 public:
  Bench(const Options& opt, cudaStream_t stream) : opt_(opt), stream_(stream) {}
  bool Wanted(const std::string& name) const {
    return opt_.only.empty() || name.find(opt_.only) != std::string::npos;
  }
  // Median over 5 trials of `reps` calls after 3 warm-up calls; returns the ms (or -1).
  double Run(const std::string& name, double flops, double bytes,
             const std::function<absl::Status()>& fn, const char* flop_unit = "TFLOP/s") {
    if (!Wanted(name)) return -1;
    absl::StatusOr<double> ms = Time(fn);
    if (!ms.ok()) {
      std::printf("%-58s ERROR %s\n", name.c_str(), std::string(ms.status().message()).c_str());
      ++errors_;
      return -1;
    }
    std::string rate;
    if (flops > 0) rate = absl::StrCat(std::round(flops / (*ms * 1e-3) / 1e10) / 100, " ", flop_unit);
    if (bytes > 0) {
      const double gbs = bytes / (*ms * 1e-3) / 1e9;
      if (!rate.empty()) rate += ", ";
      rate += absl::StrCat(std::round(gbs), " GB/s (", std::round(100 * gbs / kCopyCeilingGBs),
                           "% of copy)");
    }
    std::printf("%-58s %9.4f ms  %s\n", name.c_str(), *ms, rate.c_str());
    std::fflush(stdout);
    return *ms;
  }
  int errors() const { return errors_; }
  void Error(const std::string& name, const absl::Status& s) {
    std::printf("%-58s ERROR %s\n", name.c_str(), std::string(s.message()).c_str());
    ++errors_;
  }

 private:
  absl::StatusOr<double> Time(const std::function<absl::Status()>& fn) {
    for (int i = 0; i < 3; ++i) RETURN_IF_ERROR(fn());
    ASSIGN_OR_RETURN(cudaEvent_t start, CreateEvent());
    ASSIGN_OR_RETURN(cudaEvent_t end, CreateEvent());
    std::vector<double> trials;
    for (int t = 0; t < 5; ++t) {
      RETURN_IF_ERROR(RecordEvent(start, stream_));
      for (int i = 0; i < opt_.reps; ++i) RETURN_IF_ERROR(fn());
      RETURN_IF_ERROR(RecordEvent(end, stream_));
      ASSIGN_OR_RETURN(const float ms, ElapsedMs(start, end));
      trials.push_back(ms / opt_.reps);
    }
    RETURN_IF_ERROR(DestroyEvent(start));
    RETURN_IF_ERROR(DestroyEvent(end));
    std::sort(trials.begin(), trials.end());
    return trials[trials.size() / 2];
  }
  Options opt_;
  cudaStream_t stream_;
  int errors_ = 0;
};

struct LinearShape {
  const char* model;
  int N, C, OC;
};

// GPT-2 124M (B16 x T1024) and 1.5B (B4 x T1024) Linears: qkv, attn.proj, mlp.fc, mlp.proj.
const LinearShape kLinears[] = {
    {"124M qkv", 16384, 768, 2304},   {"124M proj", 16384, 768, 768},
    {"124M fc", 16384, 768, 3072},    {"124M mproj", 16384, 3072, 768},
    {"1.5B qkv", 4096, 1600, 4800},   {"1.5B proj", 4096, 1600, 1600},
    {"1.5B fc", 4096, 1600, 6400},    {"1.5B mproj", 4096, 6400, 1600},
};

absl::Status WeightBenches(Bench& bench, Arena& arena, cudaStream_t stream) {
  for (const LinearShape& sh : kLinears) {
    const int64_t n = static_cast<int64_t>(sh.OC) * sh.C;
    ASSIGN_OR_RETURN(float* w, arena.F32(n, -0.1f, 0.1f));
    ASSIGN_OR_RETURN(float* s, arena.F32(n / 32 + 1, 0.01f, 0.02f));
    ASSIGN_OR_RETURN(bf16* out, arena.Bf16(n));
    ASSIGN_OR_RETURN(void* codes_p, arena.Alloc(n));
    int8_t* codes = static_cast<int8_t*>(codes_p);
    ASSIGN_OR_RETURN(float* g, arena.F32(n, -1e-3f, 1e-3f));
    ASSIGN_OR_RETURN(float* ds, arena.F32(n / 32 + 1));
    ASSIGN_OR_RETURN(bf16* gb, arena.Bf16(n, -1e-3f, 1e-3f));
    ASSIGN_OR_RETURN(bf16* dsb, arena.Bf16(n / 32 + 1));
    const std::string shape = absl::StrCat(sh.model, " ", sh.OC, "x", sh.C);
    for (QuantGranularity gran : {QuantGranularity::kPerChannel, QuantGranularity::kPerGroup}) {
      LsqConfig cfg;
      cfg.bits = 4;
      cfg.granularity = gran;
      cfg.group_size = 128;
      const std::string what = absl::StrCat(
          gran == QuantGranularity::kPerChannel ? "per-channel " : "per-group128 ", shape);
      bench.Run("lsq_weight_forward W4 bf16 " + what, 0, n * 6.0, [&] {
        return lsq_weight_forward_cuda(out, nullptr, nullptr, w, s, nullptr, nullptr, sh.OC,
                                       sh.C, cfg, stream);
      });
      if (gran == QuantGranularity::kPerChannel) {
        bench.Run("lsq_weight_forward W4 bf16+codes " + what, 0, n * 7.0, [&] {
          return lsq_weight_forward_cuda(out, codes, nullptr, w, s, nullptr, nullptr, sh.OC, sh.C,
                                         cfg, stream);
        });
      }
      bench.Run("lsq_weight_backward fp32 grads " + what, 0, n * 12.0, [&] {
        return lsq_weight_backward_cuda(g, ds, nullptr, w, s, nullptr, sh.OC, sh.C, cfg, nullptr,
                                        0, stream, GradWrite::kOverwrite);
      });
      bench.Run("lsq_weight_backward bf16 grads " + what, 0, n * 8.0, [&] {
        return lsq_weight_backward_cuda(gb, dsb, nullptr, w, s, nullptr, sh.OC, sh.C, cfg,
                                        nullptr, 0, stream, GradWrite::kOverwrite);
      });
    }
  }
  return absl::OkStatus();
}

absl::Status ActivationBenches(Bench& bench, Arena& arena, cudaStream_t stream) {
  struct Act {
    const char* model;
    int N, C;
  };
  for (const Act& a : {Act{"124M", 16384, 768}, Act{"1.5B", 4096, 1600}}) {
    const int64_t n = static_cast<int64_t>(a.N) * a.C;
    const std::string shape = absl::StrCat(a.model, " ", a.N, "x", a.C);
    ASSIGN_OR_RETURN(bf16* x, arena.Bf16(n, -2.f, 2.f));
    ASSIGN_OR_RETURN(bf16* y, arena.Bf16(n));
    ASSIGN_OR_RETURN(bf16* res, arena.Bf16(n));
    ASSIGN_OR_RETURN(bf16* out, arena.Bf16(n));
    ASSIGN_OR_RETURN(bf16* dout, arena.Bf16(n, -1e-2f, 1e-2f));
    ASSIGN_OR_RETURN(bf16* dinp, arena.Bf16(n));
    ASSIGN_OR_RETURN(bf16* rec, arena.Bf16(n));
    ASSIGN_OR_RETURN(bf16* w, arena.Bf16(a.C, 0.5f, 1.5f));
    ASSIGN_OR_RETURN(bf16* b, arena.Bf16(a.C, -0.5f, 0.5f));
    ASSIGN_OR_RETURN(float* mean, arena.F32(a.N));
    ASSIGN_OR_RETURN(float* rstd, arena.F32(a.N));
    ASSIGN_OR_RETURN(float* step, arena.F32(1, 0.1f, 0.1f));
    ASSIGN_OR_RETURN(float* tok, arena.F32(a.N));
    ASSIGN_OR_RETURN(float* dw, arena.F32(a.C));
    ASSIGN_OR_RETURN(float* db, arena.F32(a.C));
    ASSIGN_OR_RETURN(float* dstep, arena.F32(1));
    ASSIGN_OR_RETURN(void* codes_p, arena.Alloc(n));
    int8_t* codes = static_cast<int8_t*>(codes_p);
    ActQuant none;
    ActQuant tensor;
    tensor.mode = ActQuantMode::kPerTensor;
    tensor.bits = 4;
    tensor.step = step;
    ActQuant token;
    token.mode = ActQuantMode::kPerToken;
    token.bits = 8;
    token.token_scales = tok;
    ActQuant token_codes = token;
    token_codes.codes = codes;
    const int64_t ln_ws = layernorm_backward_cuda_workspace_bytes(a.N, a.C);
    const int64_t lnq_ws = layernorm_backward_quant_cuda_workspace_bytes(a.N, a.C, tensor);
    const int64_t act_ws = act_quant_backward_cuda_workspace_bytes(a.N, a.C, tensor);
    ASSIGN_OR_RETURN(void* ws, arena.Alloc(std::max({ln_ws, lnq_ws, act_ws})));

    // Residual + layernorm forward: plain, then each quantizer.
    bench.Run("residual_layernorm_forward plain " + shape, 0, n * 8.0, [&] {
      return residual_layernorm_forward_cuda(res, out, mean, rstd, x, y, w, b, a.N, a.C, stream);
    });
    for (const auto& [name, q, extra] :
         {std::tuple<const char*, const ActQuant*, double>{"A4 per-tensor", &tensor, 0},
          {"A8 per-token", &token, 0}, {"A8 per-token +codes", &token_codes, 1}}) {
      const ActQuant qq = *q;
      bench.Run(absl::StrCat("residual_layernorm_forward_quant ", name, " ", shape), 0,
                n * (8.0 + extra), [&] {
                  return residual_layernorm_forward_quant_cuda(res, out, mean, rstd, x, y, w, b,
                                                               a.N, a.C, qq, stream);
                });
    }
    // Layernorm backward: plain (with the recomputed output), then quantized.
    bench.Run("layernorm_backward plain +recompute " + shape, 0, n * 10.0, [&] {
      return layernorm_backward_cuda(dinp, dw, db, dout, res, w, b, mean, rstd, a.N, a.C, ws,
                                     ln_ws, stream, GradWrite::kOverwrite, rec);
    });
    bench.Run("layernorm_backward_quant A4 per-tensor +recompute " + shape, 0, n * 10.0, [&] {
      return layernorm_backward_quant_cuda(dinp, dw, db, dstep, nullptr, dout, res, w, b, mean,
                                           rstd, a.N, a.C, tensor, ws, lnq_ws, stream,
                                           GradWrite::kOverwrite, rec);
    });
    bench.Run("layernorm_backward_quant A8 per-token +recompute " + shape, 0, n * 10.0, [&] {
      return layernorm_backward_quant_cuda(dinp, dw, db, nullptr, nullptr, dout, res, w, b, mean,
                                           rstd, a.N, a.C, token, ws, lnq_ws, stream,
                                           GradWrite::kOverwrite, rec);
    });
    // The standalone pass (attention output) and its backward.
    bench.Run("act_quant_forward A4 per-tensor " + shape, 0, n * 4.0,
              [&] { return act_quant_forward_cuda(out, x, a.N, a.C, tensor, stream); });
    bench.Run("act_quant_forward A8 per-token +codes " + shape, 0, n * 5.0,
              [&] { return act_quant_forward_cuda(out, x, a.N, a.C, token_codes, stream); });
    bench.Run("act_quant_backward A4 per-tensor +recompute " + shape, 0, n * 8.0, [&] {
      return act_quant_backward_cuda(dinp, dstep, nullptr, dout, x, a.N, a.C, tensor, ws, act_ws,
                                     stream, GradWrite::kOverwrite, GradWrite::kOverwrite, rec);
    });
  }
  // GELU at the MLP's width.
  struct Gel {
    const char* model;
    int N, C;
  };
  for (const Gel& gsh : {Gel{"124M", 16384, 3072}, Gel{"1.5B", 4096, 6400}}) {
    const int64_t n = static_cast<int64_t>(gsh.N) * gsh.C;
    const std::string shape = absl::StrCat(gsh.model, " ", gsh.N, "x", gsh.C);
    ASSIGN_OR_RETURN(bf16* pre, arena.Bf16(n, -3.f, 3.f));
    ASSIGN_OR_RETURN(bf16* out, arena.Bf16(n));
    ASSIGN_OR_RETURN(bf16* dout, arena.Bf16(n, -1e-2f, 1e-2f));
    ASSIGN_OR_RETURN(bf16* rec, arena.Bf16(n));
    ASSIGN_OR_RETURN(float* step, arena.F32(1, 0.1f, 0.1f));
    ASSIGN_OR_RETURN(float* tok, arena.F32(gsh.N));
    ASSIGN_OR_RETURN(float* dstep, arena.F32(1));
    ActQuant tensor;
    tensor.mode = ActQuantMode::kPerTensor;
    tensor.bits = 4;
    tensor.step = step;
    ActQuant token;
    token.mode = ActQuantMode::kPerToken;
    token.bits = 8;
    token.token_scales = tok;
    const int64_t ws_bytes = act_quant_backward_cuda_workspace_bytes(gsh.N, gsh.C, tensor);
    ASSIGN_OR_RETURN(void* ws, arena.Alloc(ws_bytes));
    bench.Run("gelu_forward plain " + shape, 0, n * 4.0,
              [&] { return gelu_forward_cuda(out, pre, n, stream); });
    bench.Run("gelu_forward_quant A4 per-tensor " + shape, 0, n * 4.0,
              [&] { return gelu_forward_quant_cuda(out, pre, gsh.N, gsh.C, tensor, stream); });
    bench.Run("gelu_forward_quant A8 per-token " + shape, 0, n * 4.0,
              [&] { return gelu_forward_quant_cuda(out, pre, gsh.N, gsh.C, token, stream); });
    bench.Run("gelu_backward_quant A4 per-tensor (in place) " + shape, 0, n * 6.0, [&] {
      return gelu_backward_quant_cuda(dout, dstep, nullptr, dout, pre, gsh.N, gsh.C, tensor, ws,
                                      ws_bytes, stream, GradWrite::kOverwrite);
    });
    bench.Run("gelu_backward_quant A4 per-tensor +recompute " + shape, 0, n * 8.0, [&] {
      return gelu_backward_quant_cuda(dout, dstep, nullptr, dout, pre, gsh.N, gsh.C, tensor, ws,
                                      ws_bytes, stream, GradWrite::kOverwrite, rec);
    });
  }
  return absl::OkStatus();
}

absl::Status GemmBenches(Bench& bench, Arena& arena, const Options& opt, cudaStream_t stream) {
  ASSIGN_OR_RETURN(std::unique_ptr<MatmulContext> mm, MatmulContext::Create());
  ASSIGN_OR_RETURN(std::unique_ptr<Int8MatmulContext> i8,
                   Int8MatmulContext::Create(Int8MatmulContext::kDefaultWorkspaceBytes,
                                             opt.int8_scratch_mb << 20));
  std::printf("INT8 scratch %lld MiB\n", static_cast<long long>(opt.int8_scratch_mb));
  for (const LinearShape& sh : kLinears) {
    const int64_t nx = static_cast<int64_t>(sh.N) * sh.C, nw = static_cast<int64_t>(sh.OC) * sh.C;
    const std::string shape = absl::StrCat(sh.model, " ", sh.N, "x", sh.C, "->", sh.OC);
    const double flops = 2.0 * sh.N * sh.C * sh.OC;
    ASSIGN_OR_RETURN(bf16* x, arena.Bf16(nx));
    ASSIGN_OR_RETURN(bf16* w, arena.Bf16(nw, -0.05f, 0.05f));
    ASSIGN_OR_RETURN(bf16* bias, arena.Bf16(sh.OC));
    ASSIGN_OR_RETURN(bf16* out, arena.Bf16(static_cast<int64_t>(sh.N) * sh.OC));
    ASSIGN_OR_RETURN(int8_t* xc, arena.I8(nx, -127, 127));
    ASSIGN_OR_RETURN(int8_t* wc, arena.I8(nw, -8, 7));
    ASSIGN_OR_RETURN(float* xs, arena.F32(sh.N, 0.01f, 0.02f));
    ASSIGN_OR_RETURN(float* ws, arena.F32(sh.OC, 0.001f, 0.002f));
    const double bf = bench.Run("matmul_forward BF16 +bias " + shape, flops, 0, [&] {
      return matmul_forward_cuda(*mm, out, x, w, bias, sh.N, sh.C, sh.OC, stream);
    });
    const double it = bench.Run("matmul_int8_forward per-token +bias " + shape, flops, 0, [&] {
      return matmul_int8_forward_cuda(*i8, out, xc, xs, Int8ActScale::kPerToken, wc, ws, bias,
                                      sh.N, sh.C, sh.OC, stream);
    }, "TOPS");
    bench.Run("matmul_int8_forward per-tensor +bias " + shape, flops, 0, [&] {
      return matmul_int8_forward_cuda(*i8, out, xc, xs, Int8ActScale::kPerTensor, wc, ws, bias,
                                      sh.N, sh.C, sh.OC, stream);
    }, "TOPS");
    if (bf > 0 && it > 0) {
      std::printf("%-58s %9.2fx\n", ("  INT8 speedup over BF16 " + shape).c_str(), bf / it);
    }
  }
  return absl::OkStatus();
}

absl::Status PhiBenches(Bench& bench, Arena& arena, cudaStream_t stream) {
  ASSIGN_OR_RETURN(std::unique_ptr<PhiContext> ctx, PhiContext::Create());
  const int rmax = 32;
  for (const LinearShape& sh : kLinears) {
    const std::string shape = absl::StrCat(sh.model, " ", sh.OC, "x", sh.C, " r", rmax);
    const int64_t n = static_cast<int64_t>(sh.OC) * sh.C;
    ASSIGN_OR_RETURN(float* L, arena.F32(static_cast<int64_t>(sh.OC) * rmax, -0.01f, 0.01f));
    ASSIGN_OR_RETURN(float* R, arena.F32(static_cast<int64_t>(rmax) * sh.C, -0.01f, 0.01f));
    ASSIGN_OR_RETURN(float* gamma, arena.F32(rmax, 0.5f, 1.f));
    ASSIGN_OR_RETURN(float* P, arena.F32(n));
    ASSIGN_OR_RETURN(float* dW, arena.F32(n, -1e-3f, 1e-3f));
    ASSIGN_OR_RETURN(float* dL, arena.F32(static_cast<int64_t>(sh.OC) * rmax));
    ASSIGN_OR_RETURN(float* dR, arena.F32(static_cast<int64_t>(rmax) * sh.C));
    ASSIGN_OR_RETURN(float* M, arena.F32(n, -0.01f, 0.01f));
    const int64_t pws = phi_product_cuda_workspace_bytes(sh.OC, rmax);
    const int64_t bws = phi_backward_cuda_workspace_bytes(sh.OC, sh.C, rmax);
    ASSIGN_OR_RETURN(void* ws, arena.Alloc(std::max(pws, bws)));
    bench.Run("phi_product (fp32 SGEMM, writes P) " + shape, 2.0 * n * rmax, n * 4.0, [&] {
      return phi_product_cuda(*ctx, P, L, R, gamma, sh.OC, sh.C, rmax, rmax, ws, pws, stream);
    });
    bench.Run("phi_backward fp32 " + shape, 4.0 * n * rmax, n * 4.0, [&] {
      return phi_backward_cuda(*ctx, dL, dR, dW, L, R, gamma, sh.OC, sh.C, rmax, rmax, ws, bws,
                               stream, GradWrite::kOverwrite);
    });
    // The synchronizing factorisations: a few calls each.
    {
      for (const bool dense : {true, false}) {
        const std::string name = (dense ? "phi_factorize (init) " : "phi_refactorize r16 ") + shape;
        if (!bench.Wanted(name)) continue;
        ASSIGN_OR_RETURN(cudaEvent_t start, CreateEvent());
        ASSIGN_OR_RETURN(cudaEvent_t end, CreateEvent());
        double best = 1e30;
        for (int i = 0; i < 3; ++i) {
          RETURN_IF_ERROR(RecordEvent(start, stream));
          const absl::Status s =
              dense ? phi_factorize_cuda(*ctx, L, R, M, sh.OC, sh.C, rmax, rmax, stream)
                    : phi_refactorize_cuda(*ctx, L, R, sh.OC, sh.C, rmax, 16, 16, stream);
          if (!s.ok()) {
            bench.Error(name, s);
            break;
          }
          RETURN_IF_ERROR(RecordEvent(end, stream));
          ASSIGN_OR_RETURN(const float ms, ElapsedMs(start, end));
          best = std::min(best, static_cast<double>(ms));
        }
        if (best < 1e30) std::printf("%-58s %9.3f ms  (best of 3, synchronizing)\n", name.c_str(), best);
        RETURN_IF_ERROR(DestroyEvent(start));
        RETURN_IF_ERROR(DestroyEvent(end));
      }
    }
  }
  std::printf("phi scratch after the factorisations: %lld MiB\n",
              static_cast<long long>(ctx->scratch_bytes() >> 20));
  return absl::OkStatus();
}

absl::Status Main(const Options& opt) {
  ASSIGN_OR_RETURN(const std::string device, DeviceDescription());
  std::printf("qat_bench on %s (copy ceiling taken as %.0f GB/s)\n", device.c_str(),
              kCopyCeilingGBs);
  ASSIGN_OR_RETURN(cudaStream_t stream, CreateStream());
  Bench bench(opt, stream);
  {
    Arena arena;
    RETURN_IF_ERROR(WeightBenches(bench, arena, stream));
  }
  {
    Arena arena;
    RETURN_IF_ERROR(ActivationBenches(bench, arena, stream));
  }
  {
    Arena arena;
    RETURN_IF_ERROR(GemmBenches(bench, arena, opt, stream));
  }
  {
    Arena arena;
    RETURN_IF_ERROR(PhiBenches(bench, arena, stream));
  }
  RETURN_IF_ERROR(SynchronizeStream(stream));
  RETURN_IF_ERROR(DestroyStream(stream));
  if (bench.errors() > 0) return absl::InternalError(absl::StrCat(bench.errors(), " errors"));
  return absl::OkStatus();
}

}  // namespace
}  // namespace qtrain::ops

int main(int argc, char** argv) {
  qtrain::ops::Options opt;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--only=", 0) == 0) {
      opt.only = arg.substr(7);
    } else if (arg.rfind("--reps=", 0) == 0) {
      opt.reps = std::max(1, std::atoi(arg.c_str() + 7));
    } else if (arg.rfind("--int8_scratch_mb=", 0) == 0) {
      opt.int8_scratch_mb = std::max(1, std::atoi(arg.c_str() + 18));
    } else {
      std::fprintf(stderr,
                   "usage: qat_bench [--only=SUBSTRING] [--reps=N] [--int8_scratch_mb=MB]\n");
      return 2;
    }
  }
  const absl::Status s = qtrain::ops::Main(opt);
  if (!s.ok()) {
    std::fprintf(stderr, "qat_bench: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
