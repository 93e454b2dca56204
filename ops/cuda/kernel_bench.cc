// Times each CUDA kernel at GPT-2 shapes (124M: B=16, T=1024, C=768, 12 heads, V=50304; the
// 1.5B attention: 25 heads of 64, B=4) and prints one table row per kernel: median time per
// call and the achieved TFLOP/s or GB/s. A benchmark for the GPU machine, not a test.
//
// The "fp8" rows time the FP8 op layer: casts, layernorm -> FP8, block quantization, AdamW with
// FP8 weight copies (GB/s against the ~4.3 TB/s copy ceiling of an H200), and the FP8 GEMMs at
// GPT-2 124M (N = 16384) and 1.5B (N = 4096, C = 1600) shapes against the BF16 GEMM (TFLOP/s),
// per-tensor (fast and split accumulation) and block-scaled, through cuBLASLt (automatic
// fallback) and our own kernel; the backend that ran each GEMM is listed at the end.
//
// Usage: kernel_bench [--only=SUBSTRING] [--reps=N]     (--only=fp8 for the FP8 rows alone)
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "ops/cuda/adamw_cuda.h"
#include "ops/cuda/attention_cuda.h"
#include "ops/cuda/bf16.h"
#include "ops/cuda/crossentropy_cuda.h"
#include "ops/cuda/device.h"
#include "ops/cuda/encoder_cuda.h"
#include "ops/cuda/fp8_cuda.h"
#include "ops/cuda/gelu_cuda.h"
#include "ops/cuda/grad_norm_cuda.h"
#include "ops/cuda/layernorm_cuda.h"
#include "ops/cuda/matmul_cuda.h"
#include "ops/cuda/matmul_fp8_cuda.h"
#include "ops/status_macros.h"

namespace qtrain::ops {
namespace {

// Device buffers freed at exit; filled from a 16 MiB random host pattern (never zeros, which
// can run faster than real data).
class Arena {
 public:
  ~Arena() {
    for (void* p : ptrs_) (void)DeviceFree(p);
  }
  absl::StatusOr<void*> Alloc(int64_t bytes, float lo = -1.f, float hi = 1.f, bool as_bf16 = true) {
    ASSIGN_OR_RETURN(void* p, DeviceMalloc(bytes));
    ptrs_.push_back(p);
    RETURN_IF_ERROR(Fill(p, bytes, lo, hi, as_bf16));
    return p;
  }

 private:
  absl::Status Fill(void* p, int64_t bytes, float lo, float hi, bool as_bf16) {
    constexpr int64_t kChunk = 16 << 20;
    std::vector<unsigned char> host(kChunk);
    std::mt19937 gen(static_cast<uint32_t>(ptrs_.size()));
    std::uniform_real_distribution<float> dist(lo, hi);
    if (as_bf16) {
      bf16* h = reinterpret_cast<bf16*>(host.data());
      for (int64_t i = 0; i < kChunk / 2; ++i) h[i] = FloatToBf16(dist(gen));
    } else {
      float* h = reinterpret_cast<float*>(host.data());
      for (int64_t i = 0; i < kChunk / 4; ++i) h[i] = dist(gen);
    }
    for (int64_t off = 0; off < bytes; off += kChunk) {
      RETURN_IF_ERROR(CopyHostToDevice(static_cast<char*>(p) + off, host.data(),
                                       std::min(kChunk, bytes - off)));
    }
    return absl::OkStatus();
  }
  std::vector<void*> ptrs_;
};

struct Options {
  std::string only;
  int reps = 20;
};

// Median over 5 trials of `reps` back-to-back calls, after 3 warm-up calls.
absl::StatusOr<double> TimeMs(const std::function<absl::Status()>& fn, cudaStream_t stream,
                              int reps) {
  for (int i = 0; i < 3; ++i) RETURN_IF_ERROR(fn());
  ASSIGN_OR_RETURN(cudaEvent_t start, CreateEvent());
  ASSIGN_OR_RETURN(cudaEvent_t end, CreateEvent());
  std::vector<double> trials;
  for (int trial = 0; trial < 5; ++trial) {
    RETURN_IF_ERROR(RecordEvent(start, stream));
    for (int i = 0; i < reps; ++i) RETURN_IF_ERROR(fn());
    RETURN_IF_ERROR(RecordEvent(end, stream));
    ASSIGN_OR_RETURN(const float ms, ElapsedMs(start, end));
    trials.push_back(ms / reps);
  }
  RETURN_IF_ERROR(DestroyEvent(start));
  RETURN_IF_ERROR(DestroyEvent(end));
  std::sort(trials.begin(), trials.end());
  return trials[trials.size() / 2];
}

class Bench {
 public:
  Bench(const Options& opt, cudaStream_t stream) : opt_(opt), stream_(stream) {}

  // flops or bytes may be 0; the rate column shows whichever is given.
  void Run(const std::string& name, double flops, double bytes,
           const std::function<absl::Status()>& fn) {
    if (!opt_.only.empty() && name.find(opt_.only) == std::string::npos) return;
    absl::StatusOr<double> ms = TimeMs(fn, stream_, opt_.reps);
    if (!ms.ok()) {
      std::printf("%-44s ERROR %s\n", name.c_str(), std::string(ms.status().message()).c_str());
      ++errors_;
      return;
    }
    std::string rate;
    if (flops > 0) rate = absl::StrCat(std::round(flops / (*ms * 1e-3) / 1e10) / 100, " TFLOP/s");
    if (bytes > 0) {
      if (!rate.empty()) rate += ", ";
      rate += absl::StrCat(std::round(bytes / (*ms * 1e-3) / 1e7) / 100, " GB/s");
    }
    std::printf("%-44s %9.3f ms  %s\n", name.c_str(), *ms, rate.c_str());
    std::fflush(stdout);
  }
  int errors() const { return errors_; }

 private:
  Options opt_;
  cudaStream_t stream_;
  int errors_ = 0;
};

// The FP8 op layer's rows (names start with "fp8 ").
absl::Status Fp8Rows(Bench& bench, MatmulContext& ctx, Arena& arena, cudaStream_t stream) {
  ASSIGN_OR_RETURN(std::unique_ptr<Fp8MatmulContext> fctx, Fp8MatmulContext::Create(&ctx));
  auto bf = [&](int64_t n, float lo = -1.f, float hi = 1.f) -> absl::StatusOr<bf16*> {
    ASSIGN_OR_RETURN(void* p, arena.Alloc(n * 2, lo, hi, true));
    return static_cast<bf16*>(p);
  };
  auto fp = [&](int64_t n, float lo = -1.f, float hi = 1.f) -> absl::StatusOr<float*> {
    ASSIGN_OR_RETURN(void* p, arena.Alloc(n * 4, lo, hi, false));
    return static_cast<float*>(p);
  };
  auto u8 = [&](int64_t n) -> absl::StatusOr<uint8_t*> {
    ASSIGN_OR_RETURN(void* p, arena.Alloc(std::max<int64_t>(n, 256), 0.f, 0.f, false));
    return static_cast<uint8_t*>(p);
  };
  const std::vector<Fp8TensorSpec> specs(64, Fp8TensorSpec{Fp8Format::kE4M3, 0});
  ASSIGN_OR_RETURN(std::unique_ptr<Fp8ScalingState> state, Fp8ScalingState::Create(specs, 16));
  ASSIGN_OR_RETURN(float* one, fp(64, 1.f, 1.f));
  const int C = 768;
  const int64_t N = 16384;
  const Fp8Format e4 = Fp8Format::kE4M3;
  // ---- memory-bound kernels at 124M shapes
  {
    ASSIGN_OR_RETURN(bf16* x, bf(N * 4 * C));
    ASSIGN_OR_RETURN(bf16* a, bf(N * C));
    ASSIGN_OR_RETURN(bf16* b, bf(N * C));
    ASSIGN_OR_RETURN(bf16* res, bf(N * C));
    ASSIGN_OR_RETURN(bf16* w, bf(C, 0.5f, 1.5f));
    ASSIGN_OR_RETURN(bf16* bias, bf(C));
    ASSIGN_OR_RETURN(float* mean, fp(N));
    ASSIGN_OR_RETURN(float* rstd, fp(N));
    ASSIGN_OR_RETURN(uint8_t* q, u8(N * 4 * C));
    ASSIGN_OR_RETURN(uint8_t* qt, u8(N * 4 * C));
    ASSIGN_OR_RETURN(float* sx, fp(N * 4 * C / 128 + 256));
    ASSIGN_OR_RETURN(float* sxt, fp(N * 4 * C / 128 + 256));
    float* amax = state->amax();
    const float* scale = state->scale();
    const double e = static_cast<double>(N) * C;
    bench.Run("fp8 cast bf16->e4m3 16384x768", 0, e * 3,
              [&] { return fp8_cast_cuda(q, nullptr, amax, a, N, C, e4, scale, stream); });
    bench.Run("fp8 cast+transpose+amax 16384x768", 0, e * 4,
              [&] { return fp8_cast_cuda(q, qt, amax, a, N, C, e4, scale, stream); });
    bench.Run("fp8 cast+transpose+amax 16384x3072 (dy fc)", 0, 4 * e * 4, [&] {
      return fp8_cast_cuda(q, qt, amax, x, N, 4 * C, Fp8Format::kE5M2, scale, stream);
    });
    bench.Run("fp8 amax bf16 16384x768", 0, e * 2,
              [&] { return fp8_amax_cuda(amax, a, N * C, stream); });
    bench.Run("fp8 transpose 16384x768", 0, e * 2,
              [&] { return fp8_transpose_cuda(qt, q, N, C, stream); });
    bench.Run("fp8 residual_layernorm->e4m3 16384x768", 0, e * 7, [&] {
      return residual_layernorm_forward_fp8_cuda(res, q, mean, rstd, amax, a, b, w, bias,
                                                 static_cast<int>(N), C, e4, scale, stream);
    });
    bench.Run("fp8 residual_layernorm+amax (bf16) 16384x768", 0, e * 8, [&] {
      return residual_layernorm_forward_amax_cuda(res, b, mean, rstd, amax, a, b, w, bias,
                                                  static_cast<int>(N), C, stream);
    });
    bench.Run("fp8 block quantize act 1x128+128x1 16384x768", 0, e * 4, [&] {
      return fp8_block_quantize_act_cuda(q, sx, qt, sxt, a, N, C, e4, stream);
    });
    ASSIGN_OR_RETURN(float* wf, fp(int64_t{4} * C * C, -0.05f, 0.05f));
    ASSIGN_OR_RETURN(float* sw, fp(int64_t{4} * C * C / 128 + 256));
    ASSIGN_OR_RETURN(float* swt, fp(int64_t{4} * C * C / 128 + 256));
    bench.Run("fp8 block quantize weight 3072x768 (+W^T)", 0, 4.0 * C * C * 6, [&] {
      return fp8_block_quantize_weight_cuda(q, sw, qt, swt, wf, 4 * C, C, e4, stream);
    });
    bench.Run("fp8 delayed update 64 tensors, history 16", 0, 0,
              [&] { return fp8_delayed_update_cuda(*state, 0, -1, stream); });
  }
  // ---- AdamW over 124M parameters, 85M of them (the block Linears) with E4M3 copies
  {
    const int64_t P = 124 * 1000 * 1000, W = 85 * 1000 * 1000;
    ASSIGN_OR_RETURN(float* p, fp(P, -0.05f, 0.05f));
    ASSIGN_OR_RETURN(float* g, fp(P, -0.01f, 0.01f));
    ASSIGN_OR_RETURN(float* m, fp(P, 0.f, 0.f));
    ASSIGN_OR_RETURN(float* v, fp(P, 0.f, 0.f));
    ASSIGN_OR_RETURN(bf16* pb, bf(P));
    ASSIGN_OR_RETURN(uint8_t* codes, u8(W));
    const std::vector<AdamwSegment> segs = {{0, P, true}};
    std::vector<AdamwFp8Segment> f8;
    const int64_t per = W / 48;  // 48 weight matrices
    for (int i = 0; i < 48; ++i) {
      f8.push_back({P - W + i * per, per, i, codes + i * per, e4, /*write_bf16=*/false});
    }
    ASSIGN_OR_RETURN(std::unique_ptr<AdamwPlan> plan, AdamwPlan::Create(segs, P));
    ASSIGN_OR_RETURN(std::unique_ptr<AdamwPlan> plan8, AdamwPlan::Create(segs, P, f8));
    int t = 0;
    bench.Run("fp8 adamw 124M (+bf16 copy), reference", 0, P * (4.0 * 7 + 2), [&] {
      return adamw_update_multi_cuda(*plan, p, pb, g, m, v, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, ++t,
                                     nullptr, stream);
    });
    bench.Run("fp8 adamw 124M, 85M as e4m3 copies (no bf16)", 0,
              P * 4.0 * 7 + (P - W) * 2.0 + W * 1.0, [&] {
                return adamw_update_multi_fp8_cuda(*plan8, p, pb, g, m, v, 1e-4f, 0.9f, 0.95f,
                                                   1e-8f, 0.1f, ++t, nullptr, state->scale(),
                                                   state->amax(), stream);
              });
  }
  // ---- GEMMs: out (N, OC) = X (N, K) W (OC, K)^T
  struct GemmShape {
    const char* name;
    int N, K, OC;
  };
  const GemmShape shapes[] = {
      {"124M qkv 16384x768->2304", 16384, 768, 2304},   {"124M proj 16384x768->768", 16384, 768, 768},
      {"124M fc 16384x768->3072", 16384, 768, 3072},    {"124M fcproj 16384x3072->768", 16384, 3072, 768},
      {"124M wgrad qkv 2304x16384->768", 2304, 16384, 768},
      {"1.5B qkv 4096x1600->4800", 4096, 1600, 4800},   {"1.5B proj 4096x1600->1600", 4096, 1600, 1600},
      {"1.5B fc 4096x1600->6400", 4096, 1600, 6400},    {"1.5B fcproj 4096x6400->1600", 4096, 6400, 1600},
  };
  for (const GemmShape& sh : shapes) {
    const int64_t nx = int64_t{sh.N} * sh.K, nw = int64_t{sh.OC} * sh.K, no = int64_t{sh.N} * sh.OC;
    ASSIGN_OR_RETURN(bf16* xb, bf(nx));
    ASSIGN_OR_RETURN(bf16* wb, bf(nw, -0.05f, 0.05f));
    ASSIGN_OR_RETURN(bf16* ob, bf(no));
    ASSIGN_OR_RETURN(uint8_t* xq, u8(nx));
    ASSIGN_OR_RETURN(uint8_t* wq, u8(nw));
    ASSIGN_OR_RETURN(float* of, fp(no, 0.f, 0.f));
    ASSIGN_OR_RETURN(float* xs, fp(nx / 128 + sh.N + 256, 1.f, 1.f));
    ASSIGN_OR_RETURN(float* ws, fp(nw / 128 + sh.OC + 256, 1.f, 1.f));
    RETURN_IF_ERROR(fp8_cast_cuda(xq, nullptr, nullptr, xb, sh.N, sh.K, e4, one, stream));
    RETURN_IF_ERROR(fp8_cast_cuda(wq, nullptr, nullptr, wb, sh.OC, sh.K, e4, one, stream));
    const double flops = 2.0 * sh.N * sh.K * sh.OC;
    const bool wgrad = std::string(sh.name).find("wgrad") != std::string::npos;
    bench.Run(absl::StrCat("fp8 gemm bf16 reference ", sh.name), flops, 0, [&] {
      return matmul_forward_cuda(ctx, ob, xb, wb, nullptr, sh.N, sh.K, sh.OC, stream);
    });
    struct Variant {
      const char* name;
      Fp8ScaleLayout xl, wl;
      Fp8Accumulation acc;
      Fp8GemmBackend backend;
    };
    const Variant variants[] = {
        {"tensor fast", Fp8ScaleLayout::kPerTensor, Fp8ScaleLayout::kPerTensor,
         Fp8Accumulation::kFast, Fp8GemmBackend::kAuto},
        {"tensor split", Fp8ScaleLayout::kPerTensor, Fp8ScaleLayout::kPerTensor,
         Fp8Accumulation::kSplit, Fp8GemmBackend::kAuto},
        {"block 1x128.128x128", Fp8ScaleLayout::kTile1x128, Fp8ScaleLayout::kBlock128x128,
         Fp8Accumulation::kSplit, Fp8GemmBackend::kAuto},
        {"block 1x128.1x128", Fp8ScaleLayout::kTile1x128, Fp8ScaleLayout::kTile1x128,
         Fp8Accumulation::kSplit, Fp8GemmBackend::kAuto},
        {"own kernel tensor", Fp8ScaleLayout::kPerTensor, Fp8ScaleLayout::kPerTensor,
         Fp8Accumulation::kSplit, Fp8GemmBackend::kOwnKernel},
        {"own kernel block 1x128.128x128", Fp8ScaleLayout::kTile1x128,
         Fp8ScaleLayout::kBlock128x128, Fp8Accumulation::kSplit, Fp8GemmBackend::kOwnKernel},
    };
    for (const Variant& v : variants) {
      Fp8Operand x{xq, e4, v.xl, v.xl == Fp8ScaleLayout::kPerTensor ? one : xs, 0};
      Fp8Operand w{wq, e4, v.wl, v.wl == Fp8ScaleLayout::kPerTensor ? one : ws, 0};
      Fp8MatmulOutput out;
      out.data = wgrad ? static_cast<void*>(of) : static_cast<void*>(ob);
      out.type = wgrad ? Fp8OutType::kFp32 : Fp8OutType::kBf16;
      out.write = wgrad ? GradWrite::kAccumulate : GradWrite::kOverwrite;
      Fp8MatmulOptions opt;
      opt.accumulation = v.acc;
      opt.backend = v.backend;
      bench.Run(absl::StrCat("fp8 gemm ", v.name, " ", sh.name), flops, 0, [&] {
        return fp8_matmul_cuda(*fctx, out, x, w, sh.N, sh.K, sh.OC, opt, stream);
      });
    }
  }
  RETURN_IF_ERROR(SynchronizeStream(stream));
  for (const Fp8GemmRecord& r : fctx->report()) {
    std::printf("  fp8 gemm %s: %s%s%s\n", r.problem.c_str(), r.cublaslt ? "cuBLASLt" : "own kernel",
                r.why_not.empty() ? "" : " (cuBLASLt: ", r.why_not.empty() ? "" : (r.why_not + ")").c_str());
  }
  return absl::OkStatus();
}

absl::Status Main(const Options& opt) {
  ASSIGN_OR_RETURN(const std::string device, DeviceDescription());
  std::printf("kernel_bench on %s\n", device.c_str());
  ASSIGN_OR_RETURN(cudaStream_t stream, CreateStream());
  ASSIGN_OR_RETURN(std::unique_ptr<MatmulContext> ctx, MatmulContext::Create());
  Arena arena;
  Bench bench(opt, stream);
  const int B = 16, T = 1024, C = 768, V = 50304;
  const int64_t N = static_cast<int64_t>(B) * T;
  const int64_t P = 124 * 1000 * 1000;  // ~parameters of GPT-2 124M
  auto bf = [&](int64_t n, float lo = -1.f, float hi = 1.f) -> absl::StatusOr<bf16*> {
    ASSIGN_OR_RETURN(void* p, arena.Alloc(n * 2, lo, hi, true));
    return static_cast<bf16*>(p);
  };
  auto fp = [&](int64_t n, float lo = -1.f, float hi = 1.f) -> absl::StatusOr<float*> {
    ASSIGN_OR_RETURN(void* p, arena.Alloc(n * 4, lo, hi, false));
    return static_cast<float*>(p);
  };
  auto raw = [&](int64_t bytes) -> absl::StatusOr<void*> {
    return arena.Alloc(std::max<int64_t>(bytes, 256), 0.f, 0.f, false);
  };

  // ---- encoder
  {
    std::vector<int32_t> tokens(N);
    std::mt19937 gen(1);
    for (auto& t : tokens) t = static_cast<int32_t>(gen() % V);
    ASSIGN_OR_RETURN(void* tok, raw(N * 4));
    RETURN_IF_ERROR(CopyHostToDevice(tok, tokens.data(), N * 4));
    const int32_t* d_tok = static_cast<int32_t*>(tok);
    ASSIGN_OR_RETURN(bf16* wte, bf(static_cast<int64_t>(V) * C));
    ASSIGN_OR_RETURN(bf16* wpe, bf(static_cast<int64_t>(T) * C));
    ASSIGN_OR_RETURN(bf16* out, bf(N * C));
    ASSIGN_OR_RETURN(float* dwte, fp(static_cast<int64_t>(V) * C, 0.f, 0.f));
    ASSIGN_OR_RETURN(float* dwpe, fp(static_cast<int64_t>(T) * C, 0.f, 0.f));
    ASSIGN_OR_RETURN(const int64_t ws_bytes, encoder_backward_cuda_workspace_bytes(B, T, V));
    ASSIGN_OR_RETURN(void* ws, raw(ws_bytes));
    bench.Run("encoder_forward 16x1024x768", 0, 3.0 * N * C * 2, [&] {
      return encoder_forward_cuda(out, d_tok, wte, wpe, B, T, C, V, stream);
    });
    bench.Run("encoder_backward 16x1024x768", 0, N * C * 2 + 2.0 * N * C * 4, [&] {
      return encoder_backward_cuda(dwte, dwpe, out, d_tok, B, T, C, V, ws, ws_bytes, stream);
    });
  }
  // ---- layernorm, GELU
  {
    ASSIGN_OR_RETURN(bf16* a, bf(N * C));
    ASSIGN_OR_RETURN(bf16* b, bf(N * C));
    ASSIGN_OR_RETURN(bf16* res, bf(N * C));
    ASSIGN_OR_RETURN(bf16* out, bf(N * C));
    ASSIGN_OR_RETURN(bf16* w, bf(C, 0.5f, 1.5f));
    ASSIGN_OR_RETURN(bf16* bias, bf(C));
    ASSIGN_OR_RETURN(float* mean, fp(N));
    ASSIGN_OR_RETURN(float* rstd, fp(N));
    ASSIGN_OR_RETURN(float* dw, fp(C, 0.f, 0.f));
    ASSIGN_OR_RETURN(float* db, fp(C, 0.f, 0.f));
    const int64_t ws_bytes = layernorm_backward_cuda_workspace_bytes(static_cast<int>(N), C);
    ASSIGN_OR_RETURN(void* ws, raw(ws_bytes));
    bench.Run("residual_layernorm_forward 16384x768", 0, 4.0 * N * C * 2, [&] {
      return residual_layernorm_forward_cuda(res, out, mean, rstd, a, b, w, bias,
                                             static_cast<int>(N), C, stream);
    });
    bench.Run("layernorm_backward 16384x768", 0, 4.0 * N * C * 2, [&] {
      return layernorm_backward_cuda(a, dw, db, b, res, w, mean, rstd, static_cast<int>(N), C,
                                     ws, ws_bytes, stream);
    });
    ASSIGN_OR_RETURN(bf16* x4, bf(N * 4 * C));
    ASSIGN_OR_RETURN(bf16* y4, bf(N * 4 * C));
    bench.Run("gelu_forward bf16 16384x3072", 0, 2.0 * N * 4 * C * 2,
              [&] { return gelu_forward_cuda(y4, x4, N * 4 * C, stream); });
  }
  // ---- matmuls of one GPT-2 block
  {
    ASSIGN_OR_RETURN(bf16* x, bf(N * 4 * C));
    ASSIGN_OR_RETURN(bf16* w, bf(static_cast<int64_t>(4) * C * C, -0.05f, 0.05f));
    ASSIGN_OR_RETURN(bf16* bias, bf(4 * C));
    ASSIGN_OR_RETURN(bf16* out, bf(N * 4 * C));
    ASSIGN_OR_RETURN(bf16* pre, bf(N * 4 * C));
    ASSIGN_OR_RETURN(bf16* dinp, bf(N * 4 * C, 0.f, 0.f));
    ASSIGN_OR_RETURN(float* dw, fp(static_cast<int64_t>(4) * C * C, 0.f, 0.f));
    ASSIGN_OR_RETURN(float* db, fp(4 * C, 0.f, 0.f));
    const int n = static_cast<int>(N);
    const int64_t ws_bytes = matmul_backward_cuda_workspace_bytes(n, 4 * C);
    ASSIGN_OR_RETURN(void* ws, raw(ws_bytes));
    const double f_qkv = 2.0 * N * C * 3 * C, f_fc = 2.0 * N * C * 4 * C;
    bench.Run("matmul_forward qkv 16384x768->2304 +bias", f_qkv, 0, [&] {
      return matmul_forward_cuda(*ctx, out, x, w, bias, n, C, 3 * C, stream);
    });
    bench.Run("matmul_forward fc 16384x768->3072 +bias+gelu", f_fc, 0, [&] {
      return matmul_forward_cuda(*ctx, out, x, w, bias, n, C, 4 * C, stream, Activation::kGelu,
                                 pre);
    });
    bench.Run("matmul_forward proj 16384x3072->768 +bias", f_fc, 0, [&] {
      return matmul_forward_cuda(*ctx, out, x, w, bias, n, 4 * C, C, stream);
    });
    bench.Run("matmul_backward fc (dinp,dweight,dbias)", 2 * f_fc, 0, [&] {
      return matmul_backward_cuda(*ctx, dinp, dw, db, out, x, w, n, C, 4 * C, ws, ws_bytes,
                                  stream);
    });
    bench.Run("matmul_backward proj +dgelu (dinp,dweight,dbias)", 2 * f_fc, 0, [&] {
      return matmul_backward_cuda(*ctx, dinp, dw, db, out, x, w, n, 4 * C, C, ws, ws_bytes,
                                  stream, pre);
    });
  }
  // ---- attention (causal FLOPs: forward 2 GEMMs over half the T x T square, backward 2.5x)
  struct AttnShape {
    const char* name;
    int B, NH, hs;
  };
  for (const AttnShape& s : {AttnShape{"124M 16x12x64", 16, 12, 64},
                             AttnShape{"1.5B 4x25x64", 4, 25, 64},
                             AttnShape{"hs128 8x8x128", 8, 8, 128}}) {
    const int Ca = s.NH * s.hs;
    const int64_t Na = static_cast<int64_t>(s.B) * T;
    ASSIGN_OR_RETURN(bf16* qkv, bf(Na * 3 * Ca, -2.f, 2.f));
    ASSIGN_OR_RETURN(bf16* out, bf(Na * Ca));
    ASSIGN_OR_RETURN(bf16* dout, bf(Na * Ca));
    ASSIGN_OR_RETURN(bf16* dqkv, bf(Na * 3 * Ca, 0.f, 0.f));
    ASSIGN_OR_RETURN(float* lse, fp(static_cast<int64_t>(s.B) * s.NH * T));
    const int64_t ws_bytes = attention_backward_cuda_workspace_bytes(s.B, T, s.NH);
    ASSIGN_OR_RETURN(void* ws, raw(ws_bytes));
    const double f_fwd = 4.0 * s.B * s.NH * static_cast<double>(T) * T * s.hs / 2;
    RETURN_IF_ERROR(attention_forward_cuda(out, lse, qkv, s.B, T, Ca, s.NH, stream));
    bench.Run(absl::StrCat("attention_forward ", s.name), f_fwd, 0, [&] {
      return attention_forward_cuda(out, lse, qkv, s.B, T, Ca, s.NH, stream);
    });
    bench.Run(absl::StrCat("attention_backward ", s.name), 2.5 * f_fwd, 0, [&] {
      return attention_backward_cuda(dqkv, dout, qkv, out, lse, s.B, T, Ca, s.NH, ws, ws_bytes,
                                     stream);
    });
  }
  // ---- LM head + cross-entropy
  {
    const int n = static_cast<int>(N);
    ASSIGN_OR_RETURN(bf16* x, bf(N * C));
    ASSIGN_OR_RETURN(bf16* wte, bf(static_cast<int64_t>(V) * C, -0.05f, 0.05f));
    ASSIGN_OR_RETURN(bf16* logits, bf(N * V));
    ASSIGN_OR_RETURN(bf16* dx, bf(N * C, 0.f, 0.f));
    ASSIGN_OR_RETURN(float* dwte, fp(static_cast<int64_t>(V) * C, 0.f, 0.f));
    ASSIGN_OR_RETURN(float* losses, fp(N));
    ASSIGN_OR_RETURN(void* mean, raw(8));
    std::vector<int32_t> tokens(N);
    std::mt19937 gen(2);
    for (auto& t : tokens) t = static_cast<int32_t>(gen() % V);
    ASSIGN_OR_RETURN(void* tok, raw(N * 4));
    RETURN_IF_ERROR(CopyHostToDevice(tok, tokens.data(), N * 4));
    const int32_t* d_tok = static_cast<int32_t*>(tok);
    const double f_head = 2.0 * N * C * V;
    bench.Run("crossentropy_softmax 16384x50304", 0, 3.0 * N * V * 2, [&] {
      return crossentropy_softmax_cuda(losses, static_cast<double*>(mean), logits, d_tok, n, V,
                                       1.f, stream);
    });
    bench.Run("lm_head forward (GEMM + softmax)", f_head, 0, [&] {
      return lm_head_crossentropy_forward_cuda(*ctx, losses, static_cast<double*>(mean), logits,
                                               x, wte, d_tok, n, C, V, 1.f, stream);
    });
    bench.Run("lm_head backward (2 GEMMs)", 2 * f_head, 0, [&] {
      return lm_head_crossentropy_backward_cuda(*ctx, dx, dwte, logits, x, wte, n, C, V, stream);
    });
  }
  // ---- optimizer over 124M parameters
  {
    ASSIGN_OR_RETURN(float* p, fp(P));
    ASSIGN_OR_RETURN(float* g, fp(P, -0.01f, 0.01f));
    ASSIGN_OR_RETURN(float* m, fp(P, 0.f, 0.f));
    ASSIGN_OR_RETURN(float* v, fp(P, 0.f, 0.f));
    ASSIGN_OR_RETURN(bf16* pb, bf(P));
    ASSIGN_OR_RETURN(void* sum, raw(8));
    ASSIGN_OR_RETURN(void* ws, raw(sum_squares_cuda_workspace_bytes()));
    int t = 0;
    bench.Run("adamw 124M params (+bf16 copy)", 0, P * (4.0 * 7 + 2), [&] {
      return adamw_update_cuda(p, pb, g, m, v, P, 1e-4f, 0.9f, 0.95f, 1e-8f, 0.1f, ++t, nullptr,
                               stream);
    });
    bench.Run("sum_squares 124M grads", 0, P * 4.0, [&] {
      return sum_squares_cuda(static_cast<double*>(sum), g, P, ws,
                              sum_squares_cuda_workspace_bytes(), stream);
    });
  }
  RETURN_IF_ERROR(Fp8Rows(bench, *ctx, arena, stream));
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
    } else {
      std::fprintf(stderr, "usage: kernel_bench [--only=SUBSTRING] [--reps=N]\n");
      return 2;
    }
  }
  const absl::Status s = qtrain::ops::Main(opt);
  if (!s.ok()) {
    std::fprintf(stderr, "kernel_bench: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
