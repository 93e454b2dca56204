// Device arithmetic of the LSQ/LSQ+ quantizers shared by lsq.cu and the fused layernorm / GELU
// kernels: the exact forward of ops/quant/lsq.cc (true division, rintf, unfused multiply-add),
// the straight-through classification and step/offset gradient terms, per-token scales, and
// the fixed-order double reductions of the per-tensor gradients. Included by nvcc only.
#ifndef QTRAIN_OPS_CUDA_LSQ_COMMON_CUH_
#define QTRAIN_OPS_CUDA_LSQ_COMMON_CUH_

#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "ops/cuda/cuda_utils.cuh"
#include "ops/cuda/lsq_cuda.h"

namespace qtrain::ops::lsqd {

using cu::nv_bf16;

// A quantizer's constants as kernel arguments (by value).
struct Quant {
  float lo;    // -Qn
  float hi;    // Qp
  bool asym;   // LSQ+: offset, unsigned codes
};

// The host side: Qn, Qp of `bits` / `mode` (ops::quant_range's values; validated there).
inline Quant MakeQuant(int bits, LsqMode mode) {
  Quant q;
  if (mode == LsqMode::kSymmetric) {
    q.lo = -static_cast<float>(1 << (bits - 1));
    q.hi = static_cast<float>((1 << (bits - 1)) - 1);
    q.asym = false;
  } else {
    q.lo = 0.f;
    q.hi = static_cast<float>((1 << bits) - 1);
    q.asym = true;
  }
  return q;
}

// Linear::ClampSteps: s < kLsqMinStep or NaN -> kLsqMinStep.
__device__ __forceinline__ float ClampStep(float s) { return s >= kLsqMinStep ? s : kLsqMinStep; }

// x = v / s or (v - b) / s, IEEE, as lsq.cc's Quantizer::Scaled.
__device__ __forceinline__ float Scaled(const Quant& q, float v, float s, float b) {
  return q.asym ? __fdiv_rn(__fsub_rn(v, b), s) : __fdiv_rn(v, s);
}
// clamp(rint(x)): half to even; NaN passes through both comparisons (Quantizer::Level).
__device__ __forceinline__ float Level(const Quant& q, float x) {
  float r = rintf(x);
  if (r < q.lo) r = q.lo;
  if (r > q.hi) r = q.hi;
  return r;
}
// q = r * s (+ b), never contracted (Quantizer::Value).
__device__ __forceinline__ float Value(const Quant& q, float r, float s, float b) {
  return q.asym ? __fadd_rn(__fmul_rn(r, s), b) : __fmul_rn(r, s);
}
__device__ __forceinline__ float FakeQuant(const Quant& q, float v, float s, float b) {
  return Value(q, Level(q, Scaled(q, v, s, b)), s, b);
}
// The int8 code of a level (0 for NaN, as lsq_quantize_codes writes for rejected elements).
__device__ __forceinline__ int8_t Code(float r) {
  return r == r ? static_cast<int8_t>(static_cast<int>(r)) : int8_t{0};
}

// lsq_backward's terms of one element with incoming gradient g: returns whether it is inside
// (the straight-through gradient passes); adds its ds / dbeta terms in double (g * (rint(x) -
// x) formed as double(g) * double(float difference), the CPU's exact term).
__device__ __forceinline__ bool BackwardTerms(const Quant& q, float x, float g, double& ds,
                                              double& db) {
  const double gd = static_cast<double>(g);
  if (x <= q.lo) {
    ds += gd * static_cast<double>(q.lo);
    db += gd;
    return false;
  }
  if (x >= q.hi) {
    ds += gd * static_cast<double>(q.hi);
    db += gd;
    return false;
  }
  ds += gd * static_cast<double>(__fsub_rn(rintf(x), x));
  return true;
}

// Per-token scale from a row's max |v| and whether it held a NaN (lsq.cc's RowScale: NaN
// anywhere -> NaN; 0 -> 1; else amax / Qp in float).
__device__ __forceinline__ float TokenScale(float amax, bool any_nan, float qp) {
  if (any_nan) return __int_as_float(0x7fffffff);
  return amax == 0.f ? 1.f : __fdiv_rn(amax, qp);
}

// NaN-aware running max of |v| (fmaxf drops NaNs, so they are flagged separately).
struct AbsMax {
  float m = 0.f;
  bool nan = false;
  __device__ __forceinline__ void Add(float v) {
    const float a = fabsf(v);
    if (a != a) nan = true;
    else m = fmaxf(m, a);
  }
  // Warp-wide result in every lane.
  __device__ __forceinline__ void WarpReduce() {
    m = cu::WarpMax(m);
    nan = __any_sync(0xffffffffu, nan);
  }
};

// ---- Fixed-order reductions of the per-tensor step/offset gradient ----
// A kernel's blocks each write one (ds, db) pair of double partials; one block then sums them
// in a fixed order (thread t: partials t, t + 256, ... in order; then BlockSum's tree) and
// writes g * sum with WriteGrad. The number of partials is a function of the shape alone.
constexpr int kReduceThreads = 256;

template <typename G>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_step_grads_kernel(G* __restrict__ ds, G* __restrict__ db,
                             const double* __restrict__ partials, int count, double g,
                             GradWrite write) {
  __shared__ double scratch[32];
  double a = 0.0, b = 0.0;
  for (int i = threadIdx.x; i < count; i += kReduceThreads) {
    a += partials[2 * i];
    b += partials[2 * i + 1];
  }
  a = cu::BlockSum(a, scratch);
  b = cu::BlockSum(b, scratch);
  if (threadIdx.x == 0) {
    if (ds != nullptr) cu::WriteGrad(ds, static_cast<float>(a * g), write);
    if (db != nullptr) cu::WriteGrad(db, static_cast<float>(b * g), write);
  }
}

// Block-wide (ds, db) of a kernel's threads into partials[2 blockIdx.x .. +1] (all threads
// must call it; blockDim.x a multiple of 32).
__device__ __forceinline__ void WriteBlockPartials(double ds, double db,
                                                   double* __restrict__ partials) {
  __shared__ double scratch[32];
  ds = cu::BlockSum(ds, scratch);
  db = cu::BlockSum(db, scratch);
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = ds;
    partials[2 * blockIdx.x + 1] = db;
  }
}

// Blocks of the per-tensor activation gradient kernels over n elements in 8-element units (so
// their number of (ds, db) partials, act_quant_backward_cuda_workspace_bytes): a function of n
// alone, at most 1024, each thread taking about four units.
inline int ActGradBlocks(int64_t n) {
  const int64_t units = (n + 7) / 8;
  const int64_t b = (units + 4 * 256 - 1) / (4 * 256);
  return static_cast<int>(b < 1 ? 1 : (b > 1024 ? 1024 : b));
}

// g of a per-tensor activation step: 1 / sqrt(count * Qp), count = grad_scale_count or C.
inline double ActGradScale(const ActQuant& a, int64_t C, float qp) {
  if (a.grad_scale == LsqGradScale::kNone) return 1.0;
  const int64_t n = a.grad_scale_count > 0 ? a.grad_scale_count : C;
  return 1.0 / std::sqrt(static_cast<double>(n) * static_cast<double>(qp));
}

// ---- 8-element units of BF16 tensors, the activation kernels' work item: 16-byte accesses
// when kVec and the unit is whole, else element by element for the first `len` (<= kUnit).
constexpr int kUnit = 8;

template <bool kVec>
__device__ __forceinline__ void LoadUnit(float* x, const nv_bf16* p, int len) {
  if (kVec && len == kUnit) {
    const cu::Bf16x8 v = cu::Load8(p);
#pragma unroll
    for (int j = 0; j < kUnit; ++j) x[j] = __bfloat162float(v.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kUnit; ++j) x[j] = j < len ? __bfloat162float(p[j]) : 0.f;
  }
}
template <bool kVec>
__device__ __forceinline__ void StoreUnit(nv_bf16* p, const float* x, int len) {
  if (kVec && len == kUnit) {
    cu::Bf16x8 v;
#pragma unroll
    for (int j = 0; j < kUnit; ++j) v.v[j] = __float2bfloat16_rn(x[j]);
    cu::Store8(p, v);
  } else {
#pragma unroll
    for (int j = 0; j < kUnit; ++j)
      if (j < len) p[j] = __float2bfloat16_rn(x[j]);
  }
}
// The integer codes of levels r (an 8-byte store when whole).
template <bool kVec>
__device__ __forceinline__ void StoreCodesUnit(int8_t* p, const float* r, int len) {
  if (kVec && len == kUnit) {
    uint32_t lo = 0, hi = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      lo |= static_cast<uint32_t>(static_cast<uint8_t>(Code(r[j]))) << (8 * j);
      hi |= static_cast<uint32_t>(static_cast<uint8_t>(Code(r[4 + j]))) << (8 * j);
    }
    *reinterpret_cast<uint2*>(p) = make_uint2(lo, hi);
  } else {
#pragma unroll
    for (int j = 0; j < kUnit; ++j)
      if (j < len) p[j] = Code(r[j]);
  }
}

// An activation quantizer (ActQuant) as kernel arguments.
struct ActQ {
  Quant q;
  int mode;             // 0 none, 1 per tensor, 2 per token
  float* step;          // per tensor
  const float* offset;  // per tensor, LSQ+
  float* token_scales;  // per token
  int8_t* codes;        // optional: the integer codes
};

inline ActQ MakeActQ(const ActQuant& a) {
  ActQ r;
  r.q = MakeQuant(a.bits, a.mode == ActQuantMode::kPerToken ? LsqMode::kSymmetric : a.lsq_mode);
  r.mode = a.mode == ActQuantMode::kNone ? 0 : (a.mode == ActQuantMode::kPerTensor ? 1 : 2);
  r.step = a.step;
  r.offset = a.offset;
  r.token_scales = a.token_scales;
  r.codes = a.codes;
  return r;
}

}  // namespace qtrain::ops::lsqd

#endif  // QTRAIN_OPS_CUDA_LSQ_COMMON_CUH_
