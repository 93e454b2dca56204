// CUDA LSQ/LSQ+ quantizers: the weight quantizer (fp32 master -> BF16 copy / int8 codes / fp32
// residual, with Phi's product added) and its straight-through backward with the per-scale
// step/offset sums, the standalone activation pass and its backward, and the first-batch
// activation step init. Every reduction walks fixed 8-element units in a fixed order, so the
// bits depend on the shape alone (not on the pointers' alignment, the path taken, or the GPU).
#include <algorithm>
#include <cmath>
#include <type_traits>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "ops/cuda/cuda_status.h"
#include "ops/cuda/cuda_utils.cuh"
#include "ops/cuda/lsq_common.cuh"
#include "ops/cuda/lsq_cuda.h"
#include "ops/status_macros.h"

namespace qtrain::ops {
namespace {

using cu::nv_bf16;
using lsqd::Quant;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxBlocks = 8192;
using lsqd::kUnit;  // elements per unit: one 16-byte BF16 access, two fp32 float4

int GridFor(int64_t work_items) {
  return static_cast<int>(
      std::clamp<int64_t>((work_items + kThreads - 1) / kThreads, 1, kMaxBlocks));
}

// ---- 8-element unit loads and stores (vector: 16-byte aligned, or element by element for
// the first `len` <= 8 elements).
template <bool kVec>
__device__ __forceinline__ void LoadF(float* x, const float* __restrict__ p, int len) {
  if (kVec) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z,
    x[7] = b.w;
  } else {
#pragma unroll
    for (int j = 0; j < kUnit; ++j) x[j] = j < len ? p[j] : 0.f;
  }
}
template <bool kVec>
__device__ __forceinline__ void StoreF(float* __restrict__ p, const float* x, int len) {
  if (kVec) {
    reinterpret_cast<float4*>(p)[0] = make_float4(x[0], x[1], x[2], x[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(x[4], x[5], x[6], x[7]);
  } else {
#pragma unroll
    for (int j = 0; j < kUnit; ++j)
      if (j < len) p[j] = x[j];
  }
}
// Gradients: fp32 or BF16.
template <bool kVec>
__device__ __forceinline__ void LoadG(float* x, const float* p, int len) { LoadF<kVec>(x, p, len); }
template <bool kVec>
__device__ __forceinline__ void LoadG(float* x, const nv_bf16* p, int len) {
  lsqd::LoadUnit<kVec>(x, p, len);
}
template <bool kVec>
__device__ __forceinline__ void StoreG(float* p, const float* x, int len) {
  StoreF<kVec>(p, x, len);
}
template <bool kVec>
__device__ __forceinline__ void StoreG(nv_bf16* p, const float* x, int len) {
  lsqd::StoreUnit<kVec>(p, x, len);  // exact: every value is a loaded BF16 or zero
}

__host__ __device__ __forceinline__ int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }

bool Aligned16(const void* p) { return p == nullptr || cu::IsAligned(p, 16); }

// ======================= Weights =======================

// Where the scales of a (rows, cols) weight sit (lsq.cc's Layout).
struct WLayout {
  int64_t rows, cols;
  int gran;        // 0 per tensor, 1 per channel, 2 per group
  int64_t group;   // columns per segment (cols unless per group)
  int64_t gpr;     // segments per row
};

__device__ __forceinline__ int64_t ScaleIndex(const WLayout& l, int64_t r, int64_t c) {
  return l.gran == 0 ? 0 : (l.gran == 1 ? r : r * l.gpr + c / l.group);
}

struct WForwardArgs {
  nv_bf16* out;
  int8_t* codes;
  float* residual;
  const float* w;
  float* s;
  const float* beta;
  const float* phi;
  WLayout l;
  Quant q;
};

// One 8-element unit per thread and iteration. Units never straddle a segment: with kVec,
// cols and the group are multiples of 8; otherwise a unit is cut at the segment's end (so the
// scalar path walks segment by segment: unit u of segment... see UnitOf).
template <bool kVec>
__global__ void __launch_bounds__(kThreads) lsq_weight_forward_kernel(WForwardArgs a,
                                                                      int64_t units) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t units_per_seg = (a.l.group + kUnit - 1) / kUnit;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; u < units;
       u += stride) {
    // Unit u: segment u / units_per_seg of the row-major (row, group) order, its
    // (u % units_per_seg)-th 8 columns.
    const int64_t seg = u / units_per_seg;
    const int64_t r = seg / a.l.gpr;
    const int64_t c = (seg % a.l.gpr) * a.l.group + (u % units_per_seg) * kUnit;
    const int64_t seg_end = Min64(a.l.cols, (seg % a.l.gpr + 1) * a.l.group);
    if (c >= seg_end) continue;  // past a short last group
    const int len = static_cast<int>(Min64(kUnit, seg_end - c));
    const int64_t i0 = r * a.l.cols + c;
    const int64_t k = ScaleIndex(a.l, r, c);
    const float s_raw = a.s[k];
    const float sk = lsqd::ClampStep(s_raw);
    // The segment's first unit writes the clamped step back (Linear::ClampSteps); other
    // threads reading it meanwhile see either value, and both clamp to the same step.
    const bool first = a.l.gran == 0 ? i0 == 0 : c % a.l.group == 0;
    if (first && !(s_raw >= kLsqMinStep)) a.s[k] = sk;
    const float bk = a.q.asym ? a.beta[k] : 0.f;
    float v[kUnit], rr[kUnit], qv[kUnit];
    LoadF<kVec>(v, a.w + i0, len);
#pragma unroll
    for (int j = 0; j < kUnit; ++j) {
      rr[j] = lsqd::Level(a.q, lsqd::Scaled(a.q, v[j], sk, bk));
      qv[j] = lsqd::Value(a.q, rr[j], sk, bk);
    }
    if (a.out != nullptr) {
      float o[kUnit];
      if (a.phi != nullptr) {
        float p[kUnit];
        LoadF<kVec>(p, a.phi + i0, len);
#pragma unroll
        for (int j = 0; j < kUnit; ++j) o[j] = __fadd_rn(qv[j], p[j]);
      } else {
#pragma unroll
        for (int j = 0; j < kUnit; ++j) o[j] = qv[j];
      }
      lsqd::StoreUnit<kVec>(a.out + i0, o, len);
    }
    if (a.codes != nullptr) lsqd::StoreCodesUnit<kVec>(a.codes + i0, rr, len);
    if (a.residual != nullptr) {
      float e[kUnit];
#pragma unroll
      for (int j = 0; j < kUnit; ++j) e[j] = __fsub_rn(v[j], qv[j]);
      StoreF<kVec>(a.residual + i0, e, len);
    }
  }
}

struct Prepared {
  WLayout l;
  Quant q;
  QuantRange range;
  int64_t num_scales;
};

absl::StatusOr<Prepared> PrepareWeight(const char* op, int64_t rows, int64_t cols,
                                       const LsqConfig& cfg, const float* w, const float* s,
                                       const void* beta) {
  ASSIGN_OR_RETURN(const int64_t ns, lsq_num_scales(cfg, rows, cols));
  ASSIGN_OR_RETURN(const QuantRange range, quant_range(cfg.bits, cfg.mode));
  QT_CHECK_ARG(w != nullptr && s != nullptr, op, ": null w or s (w=", w != nullptr,
               " s=", s != nullptr, ")");
  if (cfg.mode == LsqMode::kAsymmetric) {
    QT_CHECK_ARG(beta != nullptr, op, ": beta is null but asymmetric (LSQ+) quantization needs ",
                 ns, " offsets");
  } else {
    QT_CHECK_ARG(beta == nullptr, op,
                 ": beta must be null for symmetric quantization (it has no offset)");
  }
  Prepared p;
  p.l.rows = rows;
  p.l.cols = cols;
  switch (cfg.granularity) {
    case QuantGranularity::kPerTensor:
      p.l.gran = 0, p.l.group = cols, p.l.gpr = 1;
      break;
    case QuantGranularity::kPerChannel:
      p.l.gran = 1, p.l.group = cols, p.l.gpr = 1;
      break;
    case QuantGranularity::kPerGroup:
      // A group wider than the row is one group per row, as wide as the row.
      p.l.gran = 2, p.l.group = std::min<int64_t>(cfg.group_size, cols);
      p.l.gpr = (cols + cfg.group_size - 1) / cfg.group_size;
      break;
  }
  p.q = lsqd::MakeQuant(cfg.bits, cfg.mode);
  p.range = range;
  p.num_scales = ns;
  return p;
}

// Whole 8-element units per segment (cols and the group multiples of 8).
bool UnitsAligned(const WLayout& l) { return l.cols % kUnit == 0 && l.group % kUnit == 0; }

int64_t WeightUnits(const WLayout& l) {
  return l.rows * l.gpr * ((l.group + kUnit - 1) / kUnit);
}

// ---- Backward: one warp per segment.
struct WBackwardArgs {
  const float* w;
  const float* s;
  const float* beta;
  WLayout l;
  Quant q;
  int64_t count_override;  // grad_scale_count
  bool lsq_scale;          // kLsq (else g = 1)
  int64_t segments;
  double* partials;        // per tensor: (ds, db) per row; else null
  GradWrite write;
};

// kBlockSeg: one block per segment (long rows: per channel, per tensor), the block's threads
// as its lanes and BlockSum's tree; else one warp per segment (groups, short rows). Which one
// depends on the segment length alone, so the sums' partition is a function of the shape.
template <bool kVec, bool kBlockSeg, typename G>
__global__ void __launch_bounds__(kThreads)
    lsq_weight_backward_kernel(G* __restrict__ dw, G* __restrict__ ds, G* __restrict__ db,
                               WBackwardArgs a) {
  __shared__ double scratch[32];
  constexpr int kLanes = kBlockSeg ? kThreads : 32;
  const int lane = kBlockSeg ? threadIdx.x : threadIdx.x % 32;
  const int64_t warp0 =
      kBlockSeg ? blockIdx.x : static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t warps = kBlockSeg ? gridDim.x : static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t seg = warp0; seg < a.segments; seg += warps) {
    const int64_t r = seg / a.l.gpr;
    const int64_t c0 = (seg % a.l.gpr) * a.l.group;
    const int64_t c1 = Min64(a.l.cols, c0 + a.l.group);
    const int64_t k = ScaleIndex(a.l, r, c0);
    const float sk = lsqd::ClampStep(a.s[k]);  // the forward wrote it back clamped
    const float bk = a.q.asym ? a.beta[k] : 0.f;
    double sum_s = 0.0, sum_b = 0.0;
    for (int64_t c = c0 + static_cast<int64_t>(lane) * kUnit; c < c1; c += kLanes * kUnit) {
      const int len = static_cast<int>(Min64(kUnit, c1 - c));
      const int64_t i0 = r * a.l.cols + c;
      float v[kUnit], g[kUnit];
      LoadF<kVec>(v, a.w + i0, len);
      LoadG<kVec>(g, dw + i0, len);
#pragma unroll
      for (int j = 0; j < kUnit; ++j) {
        if (j < len) {
          const float x = lsqd::Scaled(a.q, v[j], sk, bk);
          if (!lsqd::BackwardTerms(a.q, x, g[j], sum_s, sum_b)) g[j] = 0.f;
        }
      }
      StoreG<kVec>(dw + i0, g, len);
    }
    if (kBlockSeg) {
      sum_s = cu::BlockSum(sum_s, scratch);
      sum_b = cu::BlockSum(sum_b, scratch);
    } else {
      sum_s = cu::WarpSum(sum_s);
      sum_b = cu::WarpSum(sum_b);
    }
    if (lane == 0) {
      if (a.partials != nullptr) {
        a.partials[2 * seg] = sum_s;
        a.partials[2 * seg + 1] = sum_b;
      } else {
        double gs = 1.0;
        if (a.lsq_scale) {
          const int64_t n = a.count_override > 0 ? a.count_override : c1 - c0;
          gs = 1.0 / sqrt(static_cast<double>(n) * static_cast<double>(a.q.hi));
        }
        if (ds != nullptr) cu::WriteGrad(ds + k, static_cast<float>(sum_s * gs), a.write);
        if (db != nullptr) cu::WriteGrad(db + k, static_cast<float>(sum_b * gs), a.write);
      }
    }
  }
}

template <typename G>
absl::Status WeightBackward(G* dw, G* ds, G* dbeta, const float* w, const float* s,
                            const float* beta, int64_t rows, int64_t cols, const LsqConfig& cfg,
                            void* workspace, int64_t workspace_bytes, cudaStream_t stream,
                            GradWrite write) {
  const char* op = "lsq_weight_backward_cuda";
  ASSIGN_OR_RETURN(const Prepared p, PrepareWeight(op, rows, cols, cfg, w, s, beta));
  QT_CHECK_ARG(dw != nullptr, op, ": dw is null");
  QT_CHECK_ARG(cfg.mode == LsqMode::kAsymmetric || dbeta == nullptr, op,
               ": dbeta must be null for symmetric quantization");
  const int64_t need = lsq_weight_backward_cuda_workspace_bytes(rows, cols, cfg);
  QT_CHECK_ARG(need == 0 || (workspace != nullptr && workspace_bytes >= need &&
                             cu::IsAligned(workspace, 8)),
               op, ": workspace of ", workspace_bytes, " bytes (",
               workspace != nullptr ? "non-null" : "null", "), needs ", need,
               " bytes 8-byte aligned for rows=", rows);
  WBackwardArgs a;
  a.w = w;
  a.s = s;
  a.beta = beta;
  a.l = p.l;
  a.q = p.q;
  a.count_override = cfg.grad_scale_count;
  a.lsq_scale = cfg.grad_scale == LsqGradScale::kLsq;
  a.segments = rows * p.l.gpr;
  a.partials = p.l.gran == 0 ? static_cast<double*>(workspace) : nullptr;
  a.write = write;
  const bool vec = UnitsAligned(p.l) && Aligned16(w) && Aligned16(dw);
  // Segments of at least kBlockSegment elements get a block each: a warp per 768- or 3072-wide
  // row would leave GPT-2's 768-row weights with fewer blocks than SMs.
  constexpr int64_t kBlockSegment = 512;
  const bool block_seg = p.l.group >= kBlockSegment;
  const int blocks = static_cast<int>(std::clamp<int64_t>(
      block_seg ? a.segments : (a.segments + kWarps - 1) / kWarps, 1, kMaxBlocks));
  if (vec && block_seg) {
    lsq_weight_backward_kernel<true, true><<<blocks, kThreads, 0, stream>>>(dw, ds, dbeta, a);
  } else if (vec) {
    lsq_weight_backward_kernel<true, false><<<blocks, kThreads, 0, stream>>>(dw, ds, dbeta, a);
  } else if (block_seg) {
    lsq_weight_backward_kernel<false, true><<<blocks, kThreads, 0, stream>>>(dw, ds, dbeta, a);
  } else {
    lsq_weight_backward_kernel<false, false><<<blocks, kThreads, 0, stream>>>(dw, ds, dbeta, a);
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (p.l.gran == 0 && (ds != nullptr || dbeta != nullptr)) {
    double g = 1.0;
    if (cfg.grad_scale == LsqGradScale::kLsq) {
      const int64_t n = cfg.grad_scale_count > 0 ? cfg.grad_scale_count : rows * cols;
      g = 1.0 / std::sqrt(static_cast<double>(n) * static_cast<double>(p.range.qp));
    }
    lsqd::reduce_step_grads_kernel<<<1, lsqd::kReduceThreads, 0, stream>>>(
        ds, dbeta, a.partials, static_cast<int>(rows), g, write);
    CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return absl::OkStatus();
}

// ======================= Activations =======================

using AQ = lsqd::ActQ;

// Per-tensor: units of 8 consecutive elements of the flat tensor, grid-stride.
template <bool kVec>
__global__ void __launch_bounds__(kThreads)
    act_quant_tensor_kernel(nv_bf16* out, const nv_bf16* inp, int64_t n, AQ a) {
  const float s_raw = a.mode == 1 ? *a.step : 1.f;
  const float s = lsqd::ClampStep(s_raw);
  if (a.mode == 1 && blockIdx.x == 0 && threadIdx.x == 0 && !(s_raw >= kLsqMinStep)) {
    *a.step = s;
  }
  const float b = a.mode == 1 && a.q.asym ? *a.offset : 0.f;
  const int64_t units = (n + kUnit - 1) / kUnit;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; u < units;
       u += stride) {
    const int64_t i0 = u * kUnit;
    const int len = static_cast<int>(Min64(kUnit, n - i0));
    // A short last unit always goes element by element.
    float x[kUnit], r[kUnit];
    if (kVec && len == kUnit) lsqd::LoadUnit<true>(x, inp + i0, len);
    else lsqd::LoadUnit<false>(x, inp + i0, len);
    if (a.mode == 1) {
#pragma unroll
      for (int j = 0; j < kUnit; ++j) {
        r[j] = lsqd::Level(a.q, lsqd::Scaled(a.q, x[j], s, b));
        x[j] = lsqd::Value(a.q, r[j], s, b);
      }
    }
    if (kVec && len == kUnit) {
      lsqd::StoreUnit<true>(out + i0, x, len);
      if (a.codes != nullptr) lsqd::StoreCodesUnit<true>(a.codes + i0, r, len);
    } else {
      lsqd::StoreUnit<false>(out + i0, x, len);
      if (a.codes != nullptr) lsqd::StoreCodesUnit<false>(a.codes + i0, r, len);
    }
  }
}

// Per-token: one warp per row; pass 1 the absmax, pass 2 the write.
template <bool kVec>
__global__ void __launch_bounds__(kThreads)
    act_quant_token_kernel(nv_bf16* out, const nv_bf16* inp, int64_t N, int64_t C, AQ a) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= N) return;
  const nv_bf16* x_row = inp + row * C;
  lsqd::AbsMax am;
  for (int64_t c = static_cast<int64_t>(lane) * kUnit; c < C; c += 32 * kUnit) {
    const int len = static_cast<int>(Min64(kUnit, C - c));
    float x[kUnit];
    lsqd::LoadUnit<kVec>(x, x_row + c, len);
#pragma unroll
    for (int j = 0; j < kUnit; ++j)
      if (j < len) am.Add(x[j]);
  }
  am.WarpReduce();
  const float s = lsqd::TokenScale(am.m, am.nan, a.q.hi);
  if (lane == 0 && a.token_scales != nullptr) a.token_scales[row] = s;
  for (int64_t c = static_cast<int64_t>(lane) * kUnit; c < C; c += 32 * kUnit) {
    const int len = static_cast<int>(Min64(kUnit, C - c));
    float x[kUnit], r[kUnit];
    lsqd::LoadUnit<kVec>(x, x_row + c, len);
#pragma unroll
    for (int j = 0; j < kUnit; ++j) {
      r[j] = lsqd::Level(a.q, lsqd::Scaled(a.q, x[j], s, 0.f));
      x[j] = lsqd::Value(a.q, r[j], s, 0.f);
    }
    lsqd::StoreUnit<kVec>(out + row * C + c, x, len);
    if (a.codes != nullptr) lsqd::StoreCodesUnit<kVec>(a.codes + row * C + c, r, len);
  }
}

using lsqd::ActGradBlocks;

// Backward of the standalone pass. Per tensor: units as the forward, (ds, db) per thread in
// unit order, block partials, then the fixed-order reduce. Per token / none: a copy (plus the
// recomputed output).
template <bool kVec, typename G>
__global__ void __launch_bounds__(kThreads)
    act_quant_backward_kernel(nv_bf16* dinp, const nv_bf16* dout, const nv_bf16* inp,
                              nv_bf16* recompute, int64_t n, int64_t C, AQ a, GradWrite dwrite,
                              double* partials) {
  const float s = a.mode == 1 ? lsqd::ClampStep(*a.step) : 1.f;
  const float b = a.mode == 1 && a.q.asym ? *a.offset : 0.f;
  const int64_t units = (n + kUnit - 1) / kUnit;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  double sum_s = 0.0, sum_b = 0.0;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; u < units;
       u += stride) {
    const int64_t i0 = u * kUnit;
    const int len = static_cast<int>(Min64(kUnit, n - i0));
    const bool vec = kVec && len == kUnit;
    float x[kUnit], g[kUnit];
    if (vec) {
      lsqd::LoadUnit<true>(x, inp + i0, len);
      lsqd::LoadUnit<true>(g, dout + i0, len);
    } else {
      lsqd::LoadUnit<false>(x, inp + i0, len);
      lsqd::LoadUnit<false>(g, dout + i0, len);
    }
    float qv[kUnit];
    if (a.mode == 1) {
#pragma unroll
      for (int j = 0; j < kUnit; ++j) {
        const float xs = lsqd::Scaled(a.q, x[j], s, b);
        if (j < len) {
          if (!lsqd::BackwardTerms(a.q, xs, g[j], sum_s, sum_b)) g[j] = 0.f;
        }
        qv[j] = lsqd::Value(a.q, lsqd::Level(a.q, xs), s, b);
      }
    } else if (a.mode == 2) {
      // Per token: the row's scale (all 8 elements of a unit share a row when C % 8 == 0; the
      // scalar path looks each element's row up).
#pragma unroll
      for (int j = 0; j < kUnit; ++j) {
        const float ts = a.token_scales != nullptr ? a.token_scales[(i0 + (j < len ? j : 0)) / C]
                                                   : 1.f;
        qv[j] = lsqd::FakeQuant(a.q, x[j], ts, 0.f);
      }
    } else {
#pragma unroll
      for (int j = 0; j < kUnit; ++j) qv[j] = x[j];
    }
    if (dwrite == GradWrite::kAccumulate) {
      float old[kUnit];
      if (vec) lsqd::LoadUnit<true>(old, dinp + i0, len);
      else lsqd::LoadUnit<false>(old, dinp + i0, len);
#pragma unroll
      for (int j = 0; j < kUnit; ++j) g[j] = __fadd_rn(old[j], g[j]);
    }
    if (vec) {
      lsqd::StoreUnit<true>(dinp + i0, g, len);
      if (recompute != nullptr) lsqd::StoreUnit<true>(recompute + i0, qv, len);
    } else {
      lsqd::StoreUnit<false>(dinp + i0, g, len);
      if (recompute != nullptr) lsqd::StoreUnit<false>(recompute + i0, qv, len);
    }
  }
  if (partials != nullptr) lsqd::WriteBlockPartials(sum_s, sum_b, partials);
}

// ---- Step init.
int InitBlocks(int64_t n) {
  const int64_t units = (n + kUnit - 1) / kUnit;
  return static_cast<int>(std::clamp<int64_t>((units + 4 * kThreads - 1) / (4 * kThreads), 1,
                                              512));
}

// partials per block: sum|x|, min, max (doubles).
__global__ void __launch_bounds__(kThreads)
    act_init_stats_kernel(const nv_bf16* x, int64_t n, double* partials) {
  __shared__ double scratch[32];
  __shared__ float fscratch[2][kWarps];
  const int64_t units = (n + kUnit - 1) / kUnit;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  double sum = 0.0;
  float mn = INFINITY, mx = -INFINITY;
  bool nan = false;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; u < units;
       u += stride) {
    const int64_t i0 = u * kUnit;
    const int len = static_cast<int>(Min64(kUnit, n - i0));
    float v[kUnit];
    lsqd::LoadUnit<false>(v, x + i0, len);
#pragma unroll
    for (int j = 0; j < kUnit; ++j) {
      if (j < len) {
        sum += static_cast<double>(fabsf(v[j]));
        if (v[j] != v[j]) nan = true;
        mn = fminf(mn, v[j]);
        mx = fmaxf(mx, v[j]);
      }
    }
  }
  if (nan) sum = __longlong_as_double(0x7ff8000000000000ll);
  sum = cu::BlockSum(sum, scratch);
  // min/max are order-independent: a plain tree.
  for (int off = 16; off > 0; off >>= 1) {
    mn = fminf(mn, __shfl_xor_sync(0xffffffffu, mn, off));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    fscratch[0][warp] = mn;
    fscratch[1][warp] = mx;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
      mn = fminf(mn, fscratch[0][w]);
      mx = fmaxf(mx, fscratch[1][w]);
    }
    partials[3 * blockIdx.x] = sum;
    partials[3 * blockIdx.x + 1] = mn;
    partials[3 * blockIdx.x + 2] = mx;
  }
}

// One thread: the statistics, then (kLsq) the step, or (kMseSearch) the candidates' spread.
// stats[0..3] = sum, min, max, spread.
__global__ void act_init_finish_stats_kernel(const double* partials, int blocks, double* stats) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  double sum = 0.0, mn = INFINITY, mx = -INFINITY;
  for (int b = 0; b < blocks; ++b) {
    sum += partials[3 * b];
    mn = fmin(mn, partials[3 * b + 1]);
    mx = fmax(mx, partials[3 * b + 2]);
  }
  stats[0] = sum;
  stats[1] = mn;
  stats[2] = mx;
}

__global__ void act_init_lsq_kernel(float* step, float* offset, const double* stats, int64_t n,
                                    Quant q) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  const double qp = q.hi;
  const double sum = stats[0], mn = stats[1], mx = stats[2];
  float s;
  if (!isfinite(sum)) {
    s = __int_as_float(0x7fffffff);  // the forward's clamp makes it kLsqMinStep
  } else if (q.asym) {
    const double range = mx - mn;
    s = range > 0 ? static_cast<float>(range / qp) : 1.f;
    *offset = static_cast<float>(mn);
  } else {
    const double mean_abs = sum / static_cast<double>(n);
    s = mean_abs > 0 ? static_cast<float>(2.0 * mean_abs / sqrt(qp)) : 1.f;
  }
  if (isfinite(sum) && !(s > 0)) s = 1.f;
  *step = s;
}

struct MseGrid {
  int points;
  double alpha_min, alpha_max;
};

__device__ __forceinline__ double Alpha(const MseGrid& g, int a) {
  if (g.points == 1) return g.alpha_max;
  return __dadd_rn(g.alpha_min,
                   __ddiv_rn(__dmul_rn(__dsub_rn(g.alpha_max, g.alpha_min), static_cast<double>(a)),
                             static_cast<double>(g.points - 1)));
}

// Candidate a (blockIdx.y): its step (and offset) from the statistics, as lsq_init computes
// them in double and rounds to float.
__device__ __forceinline__ void Candidate(const Quant& q, const MseGrid& g, const double* stats,
                                          int a, float& s, float& b) {
  const double mn = stats[1], mx = stats[2];
  const double spread = q.asym ? __dsub_rn(mx, mn) : fmax(fabs(mn), mx);
  const double alpha = Alpha(g, a);
  s = static_cast<float>(__ddiv_rn(__dmul_rn(alpha, spread), static_cast<double>(q.hi)));
  b = q.asym ? static_cast<float>(__dadd_rn(
                   mn, __ddiv_rn(__dmul_rn(__dsub_rn(1.0, alpha), spread), 2.0)))
             : 0.f;
}

// Squared error of candidate blockIdx.y over this block's units, one double partial per
// (candidate, block).
__global__ void __launch_bounds__(kThreads)
    act_init_mse_kernel(const nv_bf16* x, int64_t n, Quant q, MseGrid g, const double* stats,
                        double* partials) {
  __shared__ double scratch[32];
  float s, b;
  Candidate(q, g, stats, blockIdx.y, s, b);
  const bool valid = s > 0;
  const int64_t units = (n + kUnit - 1) / kUnit;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  double err = 0.0;
  if (valid) {
    for (int64_t u = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; u < units;
         u += stride) {
      const int64_t i0 = u * kUnit;
      const int len = static_cast<int>(Min64(kUnit, n - i0));
      float v[kUnit];
      lsqd::LoadUnit<false>(v, x + i0, len);
#pragma unroll
      for (int j = 0; j < kUnit; ++j) {
        if (j < len) {
          const double d = __dsub_rn(static_cast<double>(lsqd::FakeQuant(q, v[j], s, b)),
                                     static_cast<double>(v[j]));
          err = __dadd_rn(err, __dmul_rn(d, d));
        }
      }
    }
  }
  err = cu::BlockSum(err, scratch);
  if (threadIdx.x == 0) {
    partials[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = valid ? err : INFINITY;
  }
}

// One thread: each candidate's error in block order; the least, the smallest alpha on ties.
__global__ void act_init_mse_pick_kernel(float* step, float* offset, const double* stats,
                                         const double* partials, int blocks, Quant q,
                                         MseGrid g) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  double best = INFINITY;
  float best_s = 1.f, best_b = static_cast<float>(stats[1]);
  for (int a = 0; a < g.points; ++a) {
    double err = 0.0;
    for (int blk = 0; blk < blocks; ++blk) err += partials[static_cast<int64_t>(a) * blocks + blk];
    float s, b;
    Candidate(q, g, stats, a, s, b);
    if (!(s > 0)) continue;
    if (err < best) {
      best = err;
      best_s = s;
      best_b = b;
    }
  }
  *step = best_s;
  if (q.asym) *offset = best_b;
}

}  // namespace

// ======================= Weights: entry points =======================

absl::Status lsq_weight_forward_cuda(bf16* out, int8_t* codes, float* residual, const float* w,
                                     float* s, const float* beta, const float* phi_add,
                                     int64_t rows, int64_t cols, const LsqConfig& cfg,
                                     cudaStream_t stream) {
  const char* op = "lsq_weight_forward_cuda";
  ASSIGN_OR_RETURN(const Prepared p, PrepareWeight(op, rows, cols, cfg, w, s, beta));
  QT_CHECK_ARG(out != nullptr || codes != nullptr || residual != nullptr, op,
               ": no output given (out, codes and residual are all null)");
  QT_CHECK_ARG(phi_add == nullptr || out != nullptr, op, ": phi_add given without out");
  QT_CHECK_ARG(codes == nullptr || cfg.mode == LsqMode::kSymmetric, op,
               ": int8 codes are for symmetric quantization only (LSQ+ codes carry an offset "
               "the INT8 GEMM cannot apply), got ", cfg.bits, "-bit asymmetric");
  QT_CHECK_ARG(cfg.bits <= 8 || codes == nullptr, op, ": int8 codes need bits <= 8, got ",
               cfg.bits);
  WForwardArgs a;
  a.out = out != nullptr ? cu::Nv(out) : nullptr;
  a.codes = codes;
  a.residual = residual;
  a.w = w;
  a.s = s;
  a.beta = beta;
  a.phi = phi_add;
  a.l = p.l;
  a.q = p.q;
  const int64_t units = WeightUnits(p.l);
  const bool vec = UnitsAligned(p.l) && Aligned16(out) && Aligned16(codes) &&
                   Aligned16(residual) && Aligned16(w) && Aligned16(phi_add);
  if (vec) {
    lsq_weight_forward_kernel<true><<<GridFor(units), kThreads, 0, stream>>>(a, units);
  } else {
    lsq_weight_forward_kernel<false><<<GridFor(units), kThreads, 0, stream>>>(a, units);
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

int64_t lsq_weight_backward_cuda_workspace_bytes(int64_t rows, int64_t cols,
                                                 const LsqConfig& cfg) {
  if (rows <= 0 || cols <= 0 || cfg.granularity != QuantGranularity::kPerTensor) return 0;
  return rows * 2 * static_cast<int64_t>(sizeof(double));
}

absl::Status lsq_weight_backward_cuda(float* dw, float* ds, float* dbeta, const float* w,
                                      const float* s, const float* beta, int64_t rows,
                                      int64_t cols, const LsqConfig& cfg, void* workspace,
                                      int64_t workspace_bytes, cudaStream_t stream,
                                      GradWrite ds_write) {
  return WeightBackward(dw, ds, dbeta, w, s, beta, rows, cols, cfg, workspace, workspace_bytes,
                        stream, ds_write);
}

absl::Status lsq_weight_backward_cuda(bf16* dw, bf16* ds, bf16* dbeta, const float* w,
                                      const float* s, const float* beta, int64_t rows,
                                      int64_t cols, const LsqConfig& cfg, void* workspace,
                                      int64_t workspace_bytes, cudaStream_t stream,
                                      GradWrite ds_write) {
  return WeightBackward(dw != nullptr ? cu::Nv(dw) : nullptr, ds != nullptr ? cu::Nv(ds) : nullptr,
                        dbeta != nullptr ? cu::Nv(dbeta) : nullptr, w, s, beta, rows, cols, cfg,
                        workspace, workspace_bytes, stream, ds_write);
}

namespace {

__global__ void fp16_steps_kernel(float* __restrict__ s16, float* __restrict__ z16,
                                  float* __restrict__ s, const float* __restrict__ z, int64_t n) {
  constexpr float kMax = 65504.0f, kMinSub = 5.9604644775390625e-8f;  // 2^-24
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float raw = s[i];
    const float c = lsqd::ClampStep(raw);
    if (!(raw >= kLsqMinStep)) s[i] = c;
    s16[i] = fmaxf(__half2float(__float2half_rn(fminf(c, kMax))), kMinSub);
    if (z16 != nullptr) {
      z16[i] = __half2float(__float2half_rn(fminf(fmaxf(z[i], -kMax), kMax)));
    }
  }
}

}  // namespace

absl::Status lsq_fp16_steps_cuda(float* s16, float* z16, float* s, const float* z, int64_t n,
                                 cudaStream_t stream) {
  const char* op = "lsq_fp16_steps_cuda";
  QT_CHECK_ARG(n >= 1, op, ": n = ", n, " must be >= 1");
  QT_CHECK_ARG(s16 != nullptr && s != nullptr, op, ": null s16 or s");
  QT_CHECK_ARG((z16 == nullptr) == (z == nullptr), op,
               ": z16 and z must both be given (LSQ+) or both be null");
  fp16_steps_kernel<<<GridFor(n), kThreads, 0, stream>>>(s16, z16, s, z, n);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

// ======================= Activations: entry points =======================

absl::Status ValidateActQuantGrads(const char* op, const ActQuant& q, const void* dstep,
                                   const void* doffset, const void* workspace,
                                   int64_t workspace_bytes, int64_t need) {
  QT_CHECK_ARG(q.mode == ActQuantMode::kPerTensor || (dstep == nullptr && doffset == nullptr),
               op, ": dstep/doffset are for per-tensor activation quantization only");
  QT_CHECK_ARG(doffset == nullptr || q.lsq_mode == LsqMode::kAsymmetric, op,
               ": doffset must be null for symmetric quantization");
  QT_CHECK_ARG(need == 0 || (workspace != nullptr && workspace_bytes >= need &&
                             cu::IsAligned(workspace, 8)),
               op, ": workspace of ", workspace_bytes, " bytes (",
               workspace != nullptr ? "non-null" : "null", "), needs ", need,
               " bytes 8-byte aligned");
  return absl::OkStatus();
}

absl::Status ValidateActQuant(const char* op, const ActQuant& q, int64_t N, int64_t C,
                              bool need_token_scales) {
  QT_CHECK_ARG(N >= 1 && C >= 1, op, ": shape (N = ", N, ", C = ", C,
               ") must have N >= 1 and C >= 1");
  if (q.mode == ActQuantMode::kNone) {
    QT_CHECK_ARG(q.codes == nullptr, op, ": int8 codes requested without quantization (kNone)");
    return absl::OkStatus();
  }
  QT_CHECK_ARG(q.bits >= 2 && q.bits <= 8, op, ": activation bits = ", q.bits,
               " must be in [2, 8]");
  QT_CHECK_ARG(q.grad_scale_count >= 0, op, ": grad_scale_count = ", q.grad_scale_count,
               " must be >= 0");
  if (q.mode == ActQuantMode::kPerTensor) {
    QT_CHECK_ARG(q.step != nullptr, op, ": per-tensor activation quantization needs the step");
    if (q.lsq_mode == LsqMode::kAsymmetric) {
      QT_CHECK_ARG(q.offset != nullptr, op,
                   ": per-tensor asymmetric (LSQ+) activation quantization needs the offset");
      QT_CHECK_ARG(q.codes == nullptr, op,
                   ": int8 codes are for symmetric quantization only (LSQ+ codes carry an "
                   "offset the INT8 GEMM cannot apply)");
    } else {
      QT_CHECK_ARG(q.offset == nullptr, op,
                   ": offset must be null for symmetric activation quantization");
    }
  } else if (q.mode == ActQuantMode::kPerToken) {
    QT_CHECK_ARG(q.lsq_mode == LsqMode::kSymmetric, op,
                 ": per-token activation quantization is symmetric (dynamic absmax), got "
                 "asymmetric");
    QT_CHECK_ARG(q.step == nullptr && q.offset == nullptr, op,
                 ": per-token activation quantization learns no step/offset (pass null)");
    QT_CHECK_ARG(!need_token_scales || q.token_scales != nullptr, op,
                 ": per-token activation quantization needs token_scales here");
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": unknown activation quantization mode ", static_cast<int>(q.mode)));
  }
  return absl::OkStatus();
}

int64_t act_quant_backward_cuda_workspace_bytes(int64_t N, int64_t C, const ActQuant& q) {
  if (N <= 0 || C <= 0 || q.mode != ActQuantMode::kPerTensor) return 0;
  return static_cast<int64_t>(ActGradBlocks(N * C)) * 2 * static_cast<int64_t>(sizeof(double));
}

absl::Status act_quant_forward_cuda(bf16* out, const bf16* inp, int64_t N, int64_t C,
                                    const ActQuant& q, cudaStream_t stream) {
  const char* op = "act_quant_forward_cuda";
  RETURN_IF_ERROR(ValidateActQuant(op, q, N, C, q.codes != nullptr));
  QT_CHECK_ARG(out != nullptr && inp != nullptr, op, ": null out or inp");
  const AQ a = lsqd::MakeActQ(q);
  const int64_t n = N * C;
  if (q.mode == ActQuantMode::kPerToken) {
    const bool vec = C % kUnit == 0 && Aligned16(out) && Aligned16(inp) && Aligned16(q.codes);
    const int blocks = static_cast<int>((N + kWarps - 1) / kWarps);
    if (vec) {
      act_quant_token_kernel<true><<<blocks, kThreads, 0, stream>>>(cu::Nv(out), cu::Nv(inp),
                                                                    N, C, a);
    } else {
      act_quant_token_kernel<false><<<blocks, kThreads, 0, stream>>>(cu::Nv(out), cu::Nv(inp),
                                                                     N, C, a);
    }
  } else {
    const bool vec = Aligned16(out) && Aligned16(inp) && Aligned16(q.codes);
    const int blocks = GridFor((n + kUnit - 1) / kUnit);
    if (vec) {
      act_quant_tensor_kernel<true><<<blocks, kThreads, 0, stream>>>(cu::Nv(out), cu::Nv(inp),
                                                                     n, a);
    } else {
      act_quant_tensor_kernel<false><<<blocks, kThreads, 0, stream>>>(cu::Nv(out), cu::Nv(inp),
                                                                      n, a);
    }
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

namespace {

template <typename G>
absl::Status ActQuantBackward(bf16* dinp, G* dstep, G* doffset, const bf16* dout,
                              const bf16* inp, int64_t N, int64_t C, const ActQuant& q,
                              void* workspace, int64_t workspace_bytes, cudaStream_t stream,
                              GradWrite dinp_write, GradWrite dparams, bf16* out_recompute) {
  const char* op = "act_quant_backward_cuda";
  RETURN_IF_ERROR(ValidateActQuant(op, q, N, C, out_recompute != nullptr));
  QT_CHECK_ARG(dinp != nullptr && dout != nullptr && inp != nullptr, op,
               ": null dinp, dout or inp");
  QT_CHECK_ARG(dinp != dout || dinp_write == GradWrite::kOverwrite, op,
               ": dinp may equal dout only with dinp_write = kOverwrite");
  RETURN_IF_ERROR(ValidateActQuantGrads(op, q, dstep, doffset, workspace, workspace_bytes,
                                        act_quant_backward_cuda_workspace_bytes(N, C, q)));
  const AQ a = lsqd::MakeActQ(q);
  const int64_t n = N * C;
  const bool per_tensor = q.mode == ActQuantMode::kPerTensor;
  double* partials = per_tensor ? static_cast<double*>(workspace) : nullptr;
  const int blocks = per_tensor ? ActGradBlocks(n) : GridFor((n + kUnit - 1) / kUnit);
  // Per token, a vector unit must stay inside a row.
  const bool vec = Aligned16(dinp) && Aligned16(dout) && Aligned16(inp) &&
                   Aligned16(out_recompute) &&
                   (q.mode != ActQuantMode::kPerToken || C % kUnit == 0);
  nv_bf16* rec = out_recompute != nullptr ? cu::Nv(out_recompute) : nullptr;
  if (vec) {
    act_quant_backward_kernel<true, G><<<blocks, kThreads, 0, stream>>>(
        cu::Nv(dinp), cu::Nv(dout), cu::Nv(inp), rec, n, C, a, dinp_write, partials);
  } else {
    act_quant_backward_kernel<false, G><<<blocks, kThreads, 0, stream>>>(
        cu::Nv(dinp), cu::Nv(dout), cu::Nv(inp), rec, n, C, a, dinp_write, partials);
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (per_tensor && (dstep != nullptr || doffset != nullptr)) {
    lsqd::reduce_step_grads_kernel<<<1, lsqd::kReduceThreads, 0, stream>>>(
        dstep, doffset, partials, blocks, lsqd::ActGradScale(q, C, a.q.hi), dparams);
    CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status act_quant_backward_cuda(bf16* dinp, float* dstep, float* doffset, const bf16* dout,
                                     const bf16* inp, int64_t N, int64_t C, const ActQuant& q,
                                     void* workspace, int64_t workspace_bytes,
                                     cudaStream_t stream, GradWrite dinp_write,
                                     GradWrite dparams, bf16* out_recompute) {
  return ActQuantBackward(dinp, dstep, doffset, dout, inp, N, C, q, workspace, workspace_bytes,
                          stream, dinp_write, dparams, out_recompute);
}

absl::Status act_quant_backward_cuda(bf16* dinp, bf16* dstep, bf16* doffset, const bf16* dout,
                                     const bf16* inp, int64_t N, int64_t C, const ActQuant& q,
                                     void* workspace, int64_t workspace_bytes,
                                     cudaStream_t stream, GradWrite dinp_write,
                                     GradWrite dparams, bf16* out_recompute) {
  return ActQuantBackward(dinp, dstep != nullptr ? cu::Nv(dstep) : nullptr,
                          doffset != nullptr ? cu::Nv(doffset) : nullptr, dout, inp, N, C, q,
                          workspace, workspace_bytes, stream, dinp_write, dparams,
                          out_recompute);
}

// ======================= Step init =======================

namespace {

// Workspace layout of lsq_act_init_cuda (doubles): [stats 4][stat partials 3B][mse partials
// points * B].
struct InitLayout {
  int blocks;
  int points;
  int64_t stats, stat_partials, mse_partials, total;
};

InitLayout MakeInitLayout(int64_t n, const LsqInitOptions& o) {
  InitLayout l;
  l.blocks = InitBlocks(n);
  l.points = o.method == LsqInit::kMseSearch ? std::max(o.grid_points, 0) : 0;
  l.stats = 0;
  l.stat_partials = 4;
  l.mse_partials = l.stat_partials + 3 * static_cast<int64_t>(l.blocks);
  l.total = l.mse_partials + static_cast<int64_t>(l.points) * l.blocks;
  return l;
}

}  // namespace

int64_t lsq_act_init_cuda_workspace_bytes(int64_t n, const LsqInitOptions& options) {
  if (n <= 0) return 0;
  return MakeInitLayout(n, options).total * static_cast<int64_t>(sizeof(double));
}

absl::Status lsq_act_init_cuda(float* step, float* offset, const bf16* x, int64_t n, int bits,
                               LsqMode mode, const LsqInitOptions& options, void* workspace,
                               int64_t workspace_bytes, cudaStream_t stream) {
  const char* op = "lsq_act_init_cuda";
  RETURN_IF_ERROR(quant_range(bits, mode).status());
  QT_CHECK_ARG(bits <= 8, op, ": activation bits = ", bits, " must be <= 8");
  QT_CHECK_ARG(n >= 1, op, ": n = ", n, " must be >= 1");
  QT_CHECK_ARG(step != nullptr && x != nullptr, op, ": null step or x");
  if (mode == LsqMode::kAsymmetric) {
    QT_CHECK_ARG(offset != nullptr, op, ": asymmetric (LSQ+) init needs the offset");
  } else {
    QT_CHECK_ARG(offset == nullptr, op, ": offset must be null for symmetric quantization");
  }
  if (options.method == LsqInit::kMseSearch) {
    QT_CHECK_ARG(options.grid_points >= 1, op, ": grid_points = ", options.grid_points,
                 " must be >= 1");
    QT_CHECK_ARG(options.alpha_min > 0 && options.alpha_min <= options.alpha_max, op,
                 ": alpha range [", options.alpha_min, ", ", options.alpha_max,
                 "] must satisfy 0 < alpha_min <= alpha_max");
    QT_CHECK_ARG(options.grid_points <= 65535, op, ": grid_points = ", options.grid_points,
                 " exceeds the grid's y limit");
  } else {
    QT_CHECK_ARG(options.method == LsqInit::kLsq, op, ": unknown method ",
                 static_cast<int>(options.method));
  }
  const InitLayout l = MakeInitLayout(n, options);
  const int64_t need = l.total * static_cast<int64_t>(sizeof(double));
  QT_CHECK_ARG(workspace != nullptr && workspace_bytes >= need && cu::IsAligned(workspace, 8),
               op, ": workspace of ", workspace_bytes, " bytes (",
               workspace != nullptr ? "non-null" : "null", "), needs ", need,
               " bytes 8-byte aligned");
  double* ws = static_cast<double*>(workspace);
  const Quant q = lsqd::MakeQuant(bits, mode);
  act_init_stats_kernel<<<l.blocks, kThreads, 0, stream>>>(cu::Nv(x), n, ws + l.stat_partials);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  act_init_finish_stats_kernel<<<1, 32, 0, stream>>>(ws + l.stat_partials, l.blocks,
                                                     ws + l.stats);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (options.method == LsqInit::kLsq) {
    act_init_lsq_kernel<<<1, 32, 0, stream>>>(step, offset, ws + l.stats, n, q);
    CUDA_RETURN_IF_ERROR(cudaGetLastError());
    return absl::OkStatus();
  }
  const MseGrid g{options.grid_points, options.alpha_min, options.alpha_max};
  act_init_mse_kernel<<<dim3(l.blocks, l.points), kThreads, 0, stream>>>(
      cu::Nv(x), n, q, g, ws + l.stats, ws + l.mse_partials);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  act_init_mse_pick_kernel<<<1, 32, 0, stream>>>(step, offset, ws + l.stats, ws + l.mse_partials,
                                                 l.blocks, q, g);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace qtrain::ops
