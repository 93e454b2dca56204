// CUDA layernorm: fused residual-add + layernorm forward (one warp per row) and a fused
// deterministic backward (one pass over dout and inp computes dinp, the optional recomputed
// forward output and per-block weight/bias gradient partials; a second kernel sums the
// partials in a fixed order), with validating launchers.
#include <algorithm>
#include <cmath>

#include <cuda_runtime.h>

#include "ops/cuda/cuda_status.h"
#include "ops/cuda/cuda_utils.cuh"
#include "ops/cuda/fp8_utils.cuh"
#include "ops/cuda/layernorm_cuda.h"
#include "ops/cuda/tweo_grad.cuh"
#include "ops/status_macros.h"

namespace qtrain::ops {
namespace {

using cu::nv_bf16;

constexpr float kEps = 1e-5f;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// kVec8: lanes take 8 consecutive channels per 16-byte access (C % 8 == 0, aligned pointers);
// kScalar: one channel per access. Each lane visits the same channels in every pass, so it
// re-reads only what it wrote itself.
enum class Access { kScalar, kVec8 };
enum class Residual { kNone, kAdd };

// BF16 <-> fp32 on packed words: a 32-bit word holds two BF16 values, the lower-addressed one
// in the low half. Widening is exact (the BF16 bits become the high half of the float);
// narrowing rounds to nearest even, two values per instruction.
__device__ __forceinline__ float Bf16Lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float Bf16Hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ void Unpack8(const uint4& u, float* x) {
  x[0] = Bf16Lo(u.x), x[1] = Bf16Hi(u.x), x[2] = Bf16Lo(u.y), x[3] = Bf16Hi(u.y);
  x[4] = Bf16Lo(u.z), x[5] = Bf16Hi(u.z), x[6] = Bf16Lo(u.w), x[7] = Bf16Hi(u.w);
}
__device__ __forceinline__ uint32_t PackRn(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ uint4 Pack8Rn(const float* x) {
  return make_uint4(PackRn(x[0], x[1]), PackRn(x[2], x[3]), PackRn(x[4], x[5]),
                    PackRn(x[6], x[7]));
}
__device__ __forceinline__ uint4 LoadU4(const nv_bf16* p) {
  return *reinterpret_cast<const uint4*>(p);
}
__device__ __forceinline__ void StoreU4(nv_bf16* p, const uint4& u) {
  *reinterpret_cast<uint4*>(p) = u;
}

template <Access kAccess>
struct Row {
  static constexpr int kPer = kAccess == Access::kVec8 ? 8 : 1;
  __device__ static void Load(float* x, const nv_bf16* p) {
    if (kAccess == Access::kVec8) {
      Unpack8(LoadU4(p), x);
    } else {
      x[0] = __bfloat162float(*p);
    }
  }
  // Rounds x to BF16 and stores it.
  __device__ static void Store(nv_bf16* p, const float* x) {
    if (kAccess == Access::kVec8) {
      StoreU4(p, Pack8Rn(x));
    } else {
      *p = __float2bfloat16_rn(x[0]);
    }
  }
  // Rounds x to BF16, stores it, and leaves the rounded values in x.
  __device__ static void StoreRounded(nv_bf16* p, float* x) {
    if (kAccess == Access::kVec8) {
      const uint4 u = Pack8Rn(x);
      StoreU4(p, u);
      Unpack8(u, x);
    } else {
      const nv_bf16 v = __float2bfloat16_rn(x[0]);
      *p = v;
      x[0] = __bfloat162float(v);
    }
  }
};

// The layernorm output y = xhat * w + b, xhat = (x - mean) * rstd, as the forward writes it and
// the backward recomputes it. Explicit intrinsics leave the compiler no contraction choice, so
// both kernels round every step identically and the recomputed BF16 output is bit-identical.
__device__ __forceinline__ float LnNormalize(float x, float mean, float rstd) {
  return __fmul_rn(__fsub_rn(x, mean), rstd);
}
__device__ __forceinline__ float LnAffine(float xhat, float w, float b) {
  return __fmaf_rn(xhat, w, b);
}

// What the forward writes besides mean/rstd (and the residual): the BF16 output; the BF16 output
// and its amax; or FP8 codes of the BF16-rounded output with a given scale, and their amax.
enum class LnOut { kBf16, kBf16Amax, kFp8 };

template <Access kAccess, Residual kResidual, LnOut kOut = LnOut::kBf16,
          Fp8Format kFormat = Fp8Format::kE4M3>
__global__ void layernorm_forward_kernel(nv_bf16* __restrict__ residual, nv_bf16* __restrict__ out,
                                         float* __restrict__ mean, float* __restrict__ rstd,
                                         const nv_bf16* __restrict__ a,
                                         const nv_bf16* __restrict__ b,
                                         const nv_bf16* __restrict__ weight,
                                         const nv_bf16* __restrict__ bias, int N, int C,
                                         uint8_t* __restrict__ out_fp8, float* __restrict__ amax,
                                         const float* __restrict__ scale) {
  using R = Row<kAccess>;
  constexpr int kPer = R::kPer;
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  uint32_t amax_bits = 0;  // of this lane's outputs (kBf16Amax, kFp8)
  if (row < N) {
    const int64_t off = row * C;
    // The normalized input: the rounded residual when adding, else a itself.
    const nv_bf16* x_src = kResidual == Residual::kAdd ? residual + off : a + off;

    float sum = 0.f;
    for (int c = lane * kPer; c < C; c += 32 * kPer) {
      float x[kPer];
      R::Load(x, a + off + c);
      if (kResidual == Residual::kAdd) {
        float y[kPer];
        R::Load(y, b + off + c);
#pragma unroll
        for (int k = 0; k < kPer; ++k) x[k] += y[k];
        R::StoreRounded(residual + off + c, x);
      }
#pragma unroll
      for (int k = 0; k < kPer; ++k) sum += x[k];
    }
    const float m = cu::WarpSum(sum) / C;
    float var = 0.f;
    for (int c = lane * kPer; c < C; c += 32 * kPer) {
      float x[kPer];
      R::Load(x, x_src + c);
#pragma unroll
      for (int k = 0; k < kPer; ++k) var += (x[k] - m) * (x[k] - m);
    }
    const float s = 1.0f / sqrtf(cu::WarpSum(var) / C + kEps);
    const float fp8_scale = kOut == LnOut::kFp8 ? *scale : 1.0f;
    for (int c = lane * kPer; c < C; c += 32 * kPer) {
      float x[kPer], w[kPer], bb[kPer];
      R::Load(x, x_src + c);
      R::Load(w, weight + c);
      R::Load(bb, bias + c);
#pragma unroll
      for (int k = 0; k < kPer; ++k) x[k] = LnAffine(LnNormalize(x[k], m, s), w[k], bb[k]);
      if constexpr (kOut == LnOut::kBf16) {
        R::Store(out + off + c, x);
      } else if constexpr (kOut == LnOut::kBf16Amax) {
        R::StoreRounded(out + off + c, x);
#pragma unroll
        for (int k = 0; k < kPer; ++k) amax_bits = max(amax_bits, cu::AbsBits(x[k]));
      } else {
        // The BF16 value the BF16 forms write, then its code.
#pragma unroll
        for (int k = 0; k < kPer; ++k) {
          x[k] = __bfloat162float(__float2bfloat16_rn(x[k]));
          amax_bits = max(amax_bits, cu::AbsBits(x[k]));
        }
        if constexpr (kAccess == Access::kVec8) {
          *reinterpret_cast<uint2*>(out_fp8 + off + c) =
              make_uint2(cu::Encode4<kFormat>(x, fp8_scale), cu::Encode4<kFormat>(x + 4, fp8_scale));
        } else {
          out_fp8[off + c] = cu::Encode<kFormat>(x[0], fp8_scale);
        }
      }
    }
    if (lane == 0) {
      mean[row] = m;
      rstd[row] = s;
    }
  }
  if constexpr (kOut != LnOut::kBf16) {
    // One atomic per block: the warps' maxima through shared memory.
    __shared__ uint32_t warp_max[kWarps];
    amax_bits = cu::WarpMaxBits(amax_bits);
    if (lane == 0) warp_max[threadIdx.x / 32] = amax_bits;
    __syncthreads();
    if (threadIdx.x == 0 && amax != nullptr) {
      uint32_t mm = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) mm = max(mm, warp_max[w]);
      cu::AtomicMaxBits(amax, mm);
    }
  }
}

// ---- Backward.
//
// One kernel reads dout and inp once: each warp owns whole rows (as the forward) and writes
// dinp, the recomputed forward output if asked for, and adds its rows' dweight/dbias terms, in
// row order, to accumulators of its own in shared memory. The block then sums its warps'
// accumulators in warp order into its partial row [dweight | dbias] (2C floats) of the
// workspace, and a second kernel sums the blocks' partial rows in a fixed order. Every sum has
// a fixed partition and order: the result is bit-identical from run to run.
//
// The partition (PlanBackward) is a function of N and C alone, sized for an H100/H200 (132 SMs):
// one wave of blocks fills every SM; warp w of block b takes rows (i * blocks + b) * warps + w,
// i = 0, 1, ..., so that all warps get the same number of rows (to one) and the GPU works on one
// band of neighbouring rows at a time; for few rows, blocks get fewer warps so that the rows
// still spread over the SMs.

constexpr int kBwdMaxWarps = 8;
// Shared memory of one block: 8 fp32 bytes (dweight and dbias) per column and warp; 100 KiB
// holds 8 warps at C = 1600 (GPT-2 1.5B). Wider rows get fewer warps, and beyond one warp's
// kBwdMaxSlab columns the columns are split into slabs (blockIdx.y) whose blocks each re-read
// the whole row for its statistics.
constexpr int kBwdSmemBudget = 100 * 1024;
constexpr int kBwdMaxSlab = kBwdSmemBudget / 8;  // 12800, a multiple of 8
// The model of the GPU the partition is sized for (fixed, so that the bits of dweight/dbias do
// not depend on the device): SMs, shared memory per SM and the 1 KiB the runtime reserves per
// block, warps per SM.
constexpr int kPlanSms = 132;
constexpr int kPlanSmemPerSm = 228 * 1024;
constexpr int kPlanSmemPerBlock = 1024;
constexpr int kPlanMaxWarpsPerSm = 32;
// Rows of up to 8 * 256 columns (kVec8) are held in registers between the statistics pass and
// the output pass instead of being read again.
constexpr int kBwdMaxRegIters = 8;

// Blocks of 256 threads per SM the kernel is compiled for (__launch_bounds__): 4 (64 registers)
// for the scalar reload path, 3 (80) for the kVec8 reload path, 2 (128) where rows are held in
// registers.
__host__ __device__ constexpr int BwdMinBlocksPerSm(bool vec, int iters) {
  return !vec ? 4 : (iters == 0 ? 3 : 2);
}

// Register chunks per lane of the kVec8 register path for C columns (0: the reload path).
int BwdRegIters(int C) {
  const int iters = (C + 255) / 256;
  return C % 8 == 0 && iters <= kBwdMaxRegIters ? iters : 0;
}

// One warp's dweight (or dbias) accumulators for the `slab` columns of its block, as seen by
// one lane: chunk t of the lane holds columns c0 + (lane + 32 t) kPer .. + kPer. A lane only
// ever touches its own chunks, so a warp needs no synchronisation until the block sums its
// warps. kVec8 keeps the 8 columns of a chunk as two float4, the first halves of all chunks
// before the second halves, so that a warp's float4 accesses fall in distinct banks.
template <Access kAccess>
struct LaneAcc {
  static constexpr bool kVec = kAccess == Access::kVec8;
  // Index in a warp's accumulator array of the column at slab offset j.
  __device__ static int Index(int j, int slab) {
    if (!kVec) return j;
    const int q = j / 8, k = j % 8;
    return k < 4 ? q * 4 + k : slab / 2 + q * 4 + (k - 4);
  }
  __device__ LaneAcc(float* warp_acc, int slab, int lane)
      : lo(warp_acc + lane * (kVec ? 4 : 1)), half(slab / 2) {}
  // Chunk t += v.
  __device__ void Add(int t, const float* v) const {
    if (kVec) {
      float4* l = reinterpret_cast<float4*>(lo + t * 128);
      float4* h = reinterpret_cast<float4*>(lo + half + t * 128);
      float4 a = *l, b = *h;
      a.x = __fadd_rn(a.x, v[0]), a.y = __fadd_rn(a.y, v[1]);
      a.z = __fadd_rn(a.z, v[2]), a.w = __fadd_rn(a.w, v[3]);
      b.x = __fadd_rn(b.x, v[4]), b.y = __fadd_rn(b.y, v[5]);
      b.z = __fadd_rn(b.z, v[6]), b.w = __fadd_rn(b.w, v[7]);
      *l = a;
      *h = b;
    } else {
      lo[t * 32] = __fadd_rn(lo[t * 32], v[0]);
    }
  }
  // Chunk t = 0.
  __device__ void Zero(int t) const {
    if (kVec) {
      reinterpret_cast<float4*>(lo + t * 128)[0] = make_float4(0.f, 0.f, 0.f, 0.f);
      reinterpret_cast<float4*>(lo + half + t * 128)[0] = make_float4(0.f, 0.f, 0.f, 0.f);
    } else {
      lo[t * 32] = 0.f;
    }
  }
  float* lo;
  int half;
};

// An empty asm that claims to change u: the compiler can neither look through it nor reuse
// values computed from u before it.
__device__ __forceinline__ void OpaqueRegisters(uint4& u) {
  asm volatile("" : "+r"(u.x), "+r"(u.y), "+r"(u.z), "+r"(u.w));
}

// The backward's per-element arithmetic is spelled with explicit intrinsics as well, so that
// every instantiation (access width, register or reload path, with or without the recomputed
// output) rounds alike; the sums' partition and order are fixed by the kernel.
//
// Statistics pass over one chunk of kPer columns: sum(w dy) and sum(w dy xhat).
template <int kPer>
__device__ __forceinline__ void BwdStats(float& dnorm_sum, float& dnorm_norm_sum, const float* x,
                                         const float* dy, const float* w, float m, float s) {
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const float dnorm = __fmul_rn(w[k], dy[k]);
    dnorm_sum = __fadd_rn(dnorm_sum, dnorm);
    dnorm_norm_sum = __fmaf_rn(dnorm, LnNormalize(x[k], m, s), dnorm_norm_sum);
  }
}

// Output pass over one chunk: dx += (w dy - mean(w dy) - xhat mean(w dy xhat)) rstd (fp32, the
// caller rounds once), the dweight/dbias terms xhat dy and dy, and (kOut) the forward output.
using cu::TweoGrad;

template <int kPer, bool kOut>
__device__ __forceinline__ void BwdChunk(float* dx, float* dw, float* db, float* y, const float* x,
                                         const float* dy, const float* w, const float* b, float m,
                                         float s, float dnorm_mean, float dnorm_norm_mean,
                                         const TweoGradTerm& tweo) {
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const float xhat = LnNormalize(x[k], m, s);
    const float centered = __fsub_rn(__fmul_rn(w[k], dy[k]), dnorm_mean);
    dx[k] = __fmaf_rn(__fmaf_rn(-xhat, dnorm_norm_mean, centered), s, dx[k]);
    if (tweo.a != 0.f) dx[k] = __fadd_rn(dx[k], TweoGrad(x[k], tweo));
    dw[k] = __fmul_rn(xhat, dy[k]);
    db[k] = dy[k];
    if (kOut) y[k] = LnAffine(xhat, w[k], b[k]);
  }
}

// Register path (kVec8, C <= kIters * 256, one slab): a lane keeps its kIters chunks of x and dy
// in registers between the two passes (and, for rows of up to 3 chunks, of dinp: its load then
// overlaps the statistics pass).
template <int kIters, bool kOut>
__device__ __forceinline__ void BackwardRowInRegisters(
    int64_t r, int lane, const LaneAcc<Access::kVec8>& acc_dw,
    const LaneAcc<Access::kVec8>& acc_db, nv_bf16* __restrict__ dinp, nv_bf16* __restrict__ out,
    const nv_bf16* __restrict__ dout, const nv_bf16* __restrict__ inp,
    const nv_bf16* __restrict__ weight, const nv_bf16* __restrict__ bias,
    const float* __restrict__ mean, const float* __restrict__ rstd, int C,
    const TweoGradTerm& tweo) {
  constexpr bool kPrefetch = kIters <= 3;
  const int c_lane = lane * 8;
  const int64_t off = r * C + c_lane;  // chunk i of the lane at off + 256 i
  uint4 xv[kIters], dyv[kIters], dxv[kPrefetch ? kIters : 1];
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    if (c_lane + i * 256 < C) {
      xv[i] = LoadU4(inp + off + i * 256);
      dyv[i] = LoadU4(dout + off + i * 256);
      if (kPrefetch) dxv[i] = LoadU4(dinp + off + i * 256);
    }
  }
  const float m = mean[r], s = rstd[r];
  float dnorm_sum = 0.f, dnorm_norm_sum = 0.f;
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    if (c_lane + i * 256 < C) {
      float x[8], dy[8], w[8];
      Unpack8(LoadU4(weight + c_lane + i * 256), w);
      Unpack8(xv[i], x);
      Unpack8(dyv[i], dy);
      BwdStats<8>(dnorm_sum, dnorm_norm_sum, x, dy, w, m, s);
    }
  }
  const float dnorm_mean = cu::WarpSum(dnorm_sum) / C;
  const float dnorm_norm_mean = cu::WarpSum(dnorm_norm_sum) / C;
  // Keep the row as BF16 (4 registers per 8 values) between the passes: without this barrier
  // the compiler keeps the statistics pass's fp32 conversions alive instead, and spills.
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    OpaqueRegisters(xv[i]);
    OpaqueRegisters(dyv[i]);
  }
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const int c = c_lane + i * 256;
    if (c < C) {
      float x[8], dy[8], w[8], b[8], dx[8], dw[8], db[8], y[8];
      Unpack8(LoadU4(weight + c), w);
      if (kOut) Unpack8(LoadU4(bias + c), b);
      Unpack8(xv[i], x);
      Unpack8(dyv[i], dy);
      if constexpr (kPrefetch) {
        Unpack8(dxv[i], dx);
      } else {
        Unpack8(LoadU4(dinp + off + i * 256), dx);
      }
      BwdChunk<8, kOut>(dx, dw, db, y, x, dy, w, b, m, s, dnorm_mean, dnorm_norm_mean, tweo);
      StoreU4(dinp + off + i * 256, Pack8Rn(dx));
      if (kOut) StoreU4(out + off + i * 256, Pack8Rn(y));
      acc_dw.Add(i, dw);
      acc_db.Add(i, db);
    }
  }
}

// Reload path (any C, any access width, slabs): the statistics pass reads the whole row, the
// output pass the block's slab [c0, c1) again (from L1/L2).
template <Access kAccess, bool kOut>
__device__ __forceinline__ void BackwardRowReloaded(
    int64_t r, int lane, int c0, int c1, const LaneAcc<kAccess>& acc_dw,
    const LaneAcc<kAccess>& acc_db, nv_bf16* __restrict__ dinp, nv_bf16* __restrict__ out,
    const nv_bf16* __restrict__ dout, const nv_bf16* __restrict__ inp,
    const nv_bf16* __restrict__ weight, const nv_bf16* __restrict__ bias,
    const float* __restrict__ mean, const float* __restrict__ rstd, int C,
    const TweoGradTerm& tweo) {
  using R = Row<kAccess>;
  constexpr int kPer = R::kPer;
  constexpr int kStride = 32 * kPer;  // columns between a lane's consecutive chunks
  const int64_t off = r * C;
  const float m = mean[r], s = rstd[r];
  float dnorm_sum = 0.f, dnorm_norm_sum = 0.f;
  for (int c = lane * kPer; c < C; c += kStride) {
    float x[kPer], dy[kPer], w[kPer];
    R::Load(x, inp + off + c);
    R::Load(dy, dout + off + c);
    R::Load(w, weight + c);
    BwdStats<kPer>(dnorm_sum, dnorm_norm_sum, x, dy, w, m, s);
  }
  const float dnorm_mean = cu::WarpSum(dnorm_sum) / C;
  const float dnorm_norm_mean = cu::WarpSum(dnorm_norm_sum) / C;
  int t = 0;
  for (int c = c0 + lane * kPer; c < c1; c += kStride, ++t) {
    float x[kPer], dy[kPer], w[kPer], b[kPer], dx[kPer], dw[kPer], db[kPer], y[kPer];
    R::Load(x, inp + off + c);
    R::Load(dy, dout + off + c);
    R::Load(w, weight + c);
    R::Load(dx, dinp + off + c);
    if (kOut) R::Load(b, bias + c);
    BwdChunk<kPer, kOut>(dx, dw, db, y, x, dy, w, b, m, s, dnorm_mean, dnorm_norm_mean, tweo);
    R::Store(dinp + off + c, dx);
    if (kOut) R::Store(out + off + c, y);
    acc_dw.Add(t, dw);
    acc_db.Add(t, db);
  }
}

// kIters > 0: the register path; 0: the reload path.
template <Access kAccess, int kIters, bool kOut>
__global__ void
__launch_bounds__(kBwdMaxWarps * 32, BwdMinBlocksPerSm(kAccess == Access::kVec8, kIters))
    layernorm_backward_kernel(float* __restrict__ partial, nv_bf16* __restrict__ dinp,
                              nv_bf16* __restrict__ out, const nv_bf16* __restrict__ dout,
                              const nv_bf16* __restrict__ inp,
                              const nv_bf16* __restrict__ weight,
                              const nv_bf16* __restrict__ bias, const float* __restrict__ mean,
                              const float* __restrict__ rstd, int N, int C, int slab,
                              TweoGradTerm tweo) {
  static_assert(kIters == 0 || kAccess == Access::kVec8, "the register path is kVec8 only");
  constexpr int kPer = Row<kAccess>::kPer;
  extern __shared__ float4 bwd_smem[];  // per warp: dweight[slab], dbias[slab]
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int warps = blockDim.x / 32;
  const int c0 = blockIdx.y * slab;
  const int c1 = min(C, c0 + slab);
  float* warp_acc = reinterpret_cast<float*>(bwd_smem) + warp * 2 * slab;
  const LaneAcc<kAccess> acc_dw(warp_acc, slab, lane), acc_db(warp_acc + slab, slab, lane);
  for (int c = c0 + lane * kPer, t = 0; c < c1; c += 32 * kPer, ++t) {
    acc_dw.Zero(t);
    acc_db.Zero(t);
  }
  // Warp w of block b takes rows (i * blocks + b) * warps + w, i = 0, 1, ...: the GPU's warps
  // sweep the arrays together, one band of neighbouring rows at a time.
  const int64_t first = static_cast<int64_t>(blockIdx.x) * warps + warp;
  const int64_t step = static_cast<int64_t>(gridDim.x) * warps;
  if constexpr (kIters > 0) {
    for (int64_t r = first; r < N; r += step) {
      BackwardRowInRegisters<kIters, kOut>(r, lane, acc_dw, acc_db, dinp, out, dout, inp, weight,
                                           bias, mean, rstd, C, tweo);
    }
  } else {
    for (int64_t r = first; r < N; r += step) {
      BackwardRowReloaded<kAccess, kOut>(r, lane, c0, c1, acc_dw, acc_db, dinp, out, dout, inp,
                                         weight, bias, mean, rstd, C, tweo);
    }
  }
  __syncthreads();
  // The block's partial row: each column's warp accumulators summed in warp order.
  float* part = partial + static_cast<int64_t>(blockIdx.x) * 2 * C;
  const float* acc = reinterpret_cast<const float*>(bwd_smem);
  for (int i = threadIdx.x; i < 2 * (c1 - c0); i += blockDim.x) {
    const int which = i < c1 - c0 ? 0 : 1;  // 0: dweight, 1: dbias
    const int j = i - which * (c1 - c0);
    const float* a = acc + which * slab + LaneAcc<kAccess>::Index(j, slab);
    float sum = 0.f;
    for (int w = 0; w < warps; ++w) sum = __fadd_rn(sum, a[w * 2 * slab]);
    part[which * C + c0 + j] = sum;
  }
}

using cu::WriteGrad;  // one parameter gradient: fp32, or BF16 rounded once from the fp32 sum

constexpr int kReduceWarps = 32;

// Sums the row blocks' partial rows for 32 columns of [dweight | dbias] (lane = column): warp w
// adds rows w, w + 32, ... in order, then the 32 warps' sums are added in warp order.
template <typename G>
__global__ void __launch_bounds__(kReduceWarps * 32)
    layernorm_backward_reduce_kernel(G* __restrict__ dweight, G* __restrict__ dbias,
                                     const float* __restrict__ partial, int blocks, int C,
                                     GradWrite write) {
  __shared__ float sums[kReduceWarps][33];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int col = blockIdx.x * 32 + lane;
  float acc = 0.f;
  if (col < 2 * C) {
    // kBatch loads in flight per thread, then their adds in row order.
    constexpr int kBatch = 8;
    for (int base = warp; base < blocks; base += kReduceWarps * kBatch) {
      float v[kBatch];
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int blk = base + k * kReduceWarps;
        v[k] = blk < blocks ? partial[static_cast<int64_t>(blk) * 2 * C + col] : 0.f;
      }
#pragma unroll
      for (int k = 0; k < kBatch; ++k) acc = __fadd_rn(acc, v[k]);
    }
  }
  sums[warp][lane] = acc;
  __syncthreads();
  if (warp == 0 && col < 2 * C) {
    float total = 0.f;
    for (int w = 0; w < kReduceWarps; ++w) total = __fadd_rn(total, sums[w][lane]);
    WriteGrad(col < C ? dweight + col : dbias + (col - C), total, write);
  }
}

// How the backward splits its work; a function of N and C alone (see above).
struct BwdPlan {
  int warps;       // warps per block, each with its own dweight/dbias accumulators
  int slab;        // columns per block (C unless wider than kBwdMaxSlab)
  int slabs;       // slabs (gridDim.y)
  int blocks;      // blocks per slab (gridDim.x), one partial row of 2C floats each
  int smem_bytes;  // dynamic shared memory per block
};

BwdPlan PlanBackward(int N, int C) {
  BwdPlan p;
  p.slab = std::min(C, kBwdMaxSlab);
  p.slabs = (C + p.slab - 1) / p.slab;
  const int max_warps = std::clamp(kBwdSmemBudget / (8 * p.slab), 1, kBwdMaxWarps);
  // Blocks of max_warps warps that fit an SM at once (shared memory, registers).
  const int smem_max = max_warps * 8 * p.slab;
  const int warps_per_sm =
      std::min(kPlanMaxWarpsPerSm, BwdMinBlocksPerSm(C % 8 == 0, BwdRegIters(C)) * kBwdMaxWarps);
  const int per_sm = std::max(1, std::min(kPlanSmemPerSm / (smem_max + kPlanSmemPerBlock),
                                          warps_per_sm / max_warps));
  // One wave of blocks, each warp the same number of rows (to one), so that the SMs finish
  // together; for few rows, fewer warps per block before fewer blocks.
  const int64_t wave = std::max<int64_t>(1, static_cast<int64_t>(kPlanSms) * per_sm / p.slabs);
  p.warps = static_cast<int>(std::min<int64_t>(max_warps, (N + wave - 1) / wave));
  p.blocks = static_cast<int>(std::min<int64_t>(wave, (N + p.warps - 1) / p.warps));
  p.smem_bytes = p.warps * 8 * p.slab;
  return p;
}

template <Access kAccess, int kIters>
absl::Status LaunchBackwardKernel(const BwdPlan& p, float* partial, nv_bf16* dinp, nv_bf16* out,
                                  const nv_bf16* dout, const nv_bf16* inp, const nv_bf16* weight,
                                  const nv_bf16* bias, const float* mean, const float* rstd,
                                  int N, int C, const TweoGradTerm& tweo, cudaStream_t stream) {
  auto kernel = out != nullptr ? layernorm_backward_kernel<kAccess, kIters, true>
                               : layernorm_backward_kernel<kAccess, kIters, false>;
  if (p.smem_bytes > 48 * 1024) {
    CUDA_RETURN_IF_ERROR(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, p.smem_bytes));
  }
  kernel<<<dim3(p.blocks, p.slabs), p.warps * 32, p.smem_bytes, stream>>>(
      partial, dinp, out, dout, inp, weight, bias, mean, rstd, N, C, p.slab, tweo);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status CheckShape(const char* op, int N, int C) {
  QT_CHECK_ARG(N > 0 && C > 0, op, ": N and C must be > 0, got N=", N, " C=", C);
  return absl::OkStatus();
}

// out is the BF16 output (kBf16, kBf16Amax) or null (kFp8, which writes out_fp8).
template <Residual kResidual, LnOut kOut = LnOut::kBf16, Fp8Format kFormat = Fp8Format::kE4M3>
absl::Status LaunchForward(nv_bf16* residual, nv_bf16* out, float* mean, float* rstd,
                           const nv_bf16* a, const nv_bf16* b, const nv_bf16* weight,
                           const nv_bf16* bias, int N, int C, cudaStream_t stream,
                           uint8_t* out_fp8 = nullptr, float* amax = nullptr,
                           const float* scale = nullptr) {
  const int blocks = (N + kWarps - 1) / kWarps;
  const bool out_ok =
      kOut == LnOut::kFp8 ? cu::IsAligned(out_fp8, 8) : cu::IsAligned(out, 16);
  const bool vec = C % 8 == 0 && out_ok && cu::IsAligned(a, 16) && cu::IsAligned(weight, 16) &&
                   cu::IsAligned(bias, 16) &&
                   (kResidual == Residual::kNone ||
                    (cu::IsAligned(b, 16) && cu::IsAligned(residual, 16)));
  if (vec) {
    layernorm_forward_kernel<Access::kVec8, kResidual, kOut, kFormat>
        <<<blocks, kThreads, 0, stream>>>(residual, out, mean, rstd, a, b, weight, bias, N, C,
                                          out_fp8, amax, scale);
  } else {
    layernorm_forward_kernel<Access::kScalar, kResidual, kOut, kFormat>
        <<<blocks, kThreads, 0, stream>>>(residual, out, mean, rstd, a, b, weight, bias, N, C,
                                          out_fp8, amax, scale);
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace

absl::Status residual_layernorm_forward_cuda(bf16* residual, bf16* out, float* mean, float* rstd,
                                             const bf16* a, const bf16* b, const bf16* weight,
                                             const bf16* bias, int N, int C,
                                             cudaStream_t stream) {
  RETURN_IF_ERROR(CheckShape("residual_layernorm_forward_cuda", N, C));
  QT_CHECK_ARG(residual != nullptr && out != nullptr && mean != nullptr && rstd != nullptr &&
                   a != nullptr && b != nullptr && weight != nullptr && bias != nullptr,
               "residual_layernorm_forward_cuda: null pointer (residual=", residual != nullptr,
               " out=", out != nullptr, " mean=", mean != nullptr, " rstd=", rstd != nullptr,
               " a=", a != nullptr, " b=", b != nullptr, " weight=", weight != nullptr,
               " bias=", bias != nullptr, ")");
  return LaunchForward<Residual::kAdd>(cu::Nv(residual), cu::Nv(out), mean, rstd, cu::Nv(a),
                                       cu::Nv(b), cu::Nv(weight), cu::Nv(bias), N, C, stream);
}

absl::Status layernorm_forward_cuda(bf16* out, float* mean, float* rstd, const bf16* inp,
                                    const bf16* weight, const bf16* bias, int N, int C,
                                    cudaStream_t stream) {
  RETURN_IF_ERROR(CheckShape("layernorm_forward_cuda", N, C));
  QT_CHECK_ARG(out != nullptr && mean != nullptr && rstd != nullptr && inp != nullptr &&
                   weight != nullptr && bias != nullptr,
               "layernorm_forward_cuda: null pointer (out=", out != nullptr,
               " mean=", mean != nullptr, " rstd=", rstd != nullptr, " inp=", inp != nullptr,
               " weight=", weight != nullptr, " bias=", bias != nullptr, ")");
  return LaunchForward<Residual::kNone>(nullptr, cu::Nv(out), mean, rstd, cu::Nv(inp), nullptr,
                                        cu::Nv(weight), cu::Nv(bias), N, C, stream);
}

TweoGradTerm TweoGradTerm::Make(double scale, double tau, double p, double eps, int64_t n) {
  TweoGradTerm t;
  if (scale == 0.0 || n <= 0) return t;
  const double inv = 1.0 / (tau + eps);
  t.a = static_cast<float>(scale * p / static_cast<double>(n) * inv);
  t.inv = static_cast<float>(inv);
  t.p = static_cast<float>(p);
  return t;
}

int64_t layernorm_backward_cuda_workspace_bytes(int N, int C) {
  if (N <= 0 || C <= 0) return 0;
  return static_cast<int64_t>(PlanBackward(N, C).blocks) * 2 * C *
         static_cast<int64_t>(sizeof(float));
}

namespace {

// Both gradient types: G is float or nv_bf16 (the host API's bf16).
template <typename G>
absl::Status LayernormBackward(bf16* dinp, G* dweight, G* dbias, const bf16* dout,
                               const bf16* inp, const bf16* weight, const bf16* bias,
                               const float* mean, const float* rstd, int N, int C,
                               void* workspace, int64_t workspace_bytes, cudaStream_t stream,
                               GradWrite dparams, bf16* out_recompute,
                               const TweoGradTerm& tweo) {
  RETURN_IF_ERROR(CheckShape("layernorm_backward_cuda", N, C));
  QT_CHECK_ARG(tweo.a == 0.f || (std::isfinite(tweo.a) && tweo.inv > 0.f && tweo.p >= 1.f),
               "layernorm_backward_cuda: bad TWEO term a=", tweo.a, " inv=", tweo.inv,
               " p=", tweo.p);
  QT_CHECK_ARG(dinp != nullptr && dweight != nullptr && dbias != nullptr && dout != nullptr &&
                   inp != nullptr && weight != nullptr && mean != nullptr && rstd != nullptr,
               "layernorm_backward_cuda: null pointer (dinp=", dinp != nullptr,
               " dweight=", dweight != nullptr, " dbias=", dbias != nullptr,
               " dout=", dout != nullptr, " inp=", inp != nullptr, " weight=", weight != nullptr,
               " mean=", mean != nullptr, " rstd=", rstd != nullptr, ")");
  QT_CHECK_ARG(out_recompute == nullptr || bias != nullptr,
               "layernorm_backward_cuda: out_recompute needs the forward's bias, got bias=null");
  const int64_t need = layernorm_backward_cuda_workspace_bytes(N, C);
  QT_CHECK_ARG(workspace != nullptr && workspace_bytes >= need,
               "layernorm_backward_cuda: workspace of ", workspace_bytes, " bytes (",
               workspace != nullptr ? "non-null" : "null", "), needs ", need, " for N=", N,
               " C=", C);
  QT_CHECK_ARG(cu::IsAligned(workspace, 4), "layernorm_backward_cuda: workspace misaligned");
  float* partial = static_cast<float*>(workspace);
  const BwdPlan plan = PlanBackward(N, C);
  const bool vec = C % 8 == 0 && cu::IsAligned(dinp, 16) && cu::IsAligned(dout, 16) &&
                   cu::IsAligned(inp, 16) && cu::IsAligned(weight, 16) &&
                   (out_recompute == nullptr ||
                    (cu::IsAligned(out_recompute, 16) && cu::IsAligned(bias, 16)));
  nv_bf16* out = out_recompute != nullptr ? cu::Nv(out_recompute) : nullptr;
  const nv_bf16* b = out_recompute != nullptr ? cu::Nv(bias) : nullptr;
  const auto launch = [&](auto kernel_launcher) {
    return kernel_launcher(plan, partial, cu::Nv(dinp), out, cu::Nv(dout), cu::Nv(inp),
                           cu::Nv(weight), b, mean, rstd, N, C, tweo, stream);
  };
  // kVec8 rows of up to 8 * 256 columns take the register path, one instantiation per number
  // of 256-column chunks.
  const auto dispatch = [&]() -> absl::Status {
    switch (vec && plan.slabs == 1 ? BwdRegIters(C) : 0) {
      case 1: return launch(LaunchBackwardKernel<Access::kVec8, 1>);
      case 2: return launch(LaunchBackwardKernel<Access::kVec8, 2>);
      case 3: return launch(LaunchBackwardKernel<Access::kVec8, 3>);
      case 4: return launch(LaunchBackwardKernel<Access::kVec8, 4>);
      case 5: return launch(LaunchBackwardKernel<Access::kVec8, 5>);
      case 6: return launch(LaunchBackwardKernel<Access::kVec8, 6>);
      case 7: return launch(LaunchBackwardKernel<Access::kVec8, 7>);
      case 8: return launch(LaunchBackwardKernel<Access::kVec8, 8>);
      default:
        return vec ? launch(LaunchBackwardKernel<Access::kVec8, 0>)
                   : launch(LaunchBackwardKernel<Access::kScalar, 0>);
    }
  };
  RETURN_IF_ERROR(dispatch());
  const int cols = 2 * C;
  layernorm_backward_reduce_kernel<<<(cols + 31) / 32, kReduceWarps * 32, 0, stream>>>(
      dweight, dbias, partial, plan.blocks, C, dparams);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace

absl::Status layernorm_backward_cuda(bf16* dinp, float* dweight, float* dbias, const bf16* dout,
                                     const bf16* inp, const bf16* weight, const bf16* bias,
                                     const float* mean, const float* rstd, int N, int C,
                                     void* workspace, int64_t workspace_bytes, cudaStream_t stream,
                                     GradWrite dparams, bf16* out_recompute,
                                     const TweoGradTerm& tweo) {
  return LayernormBackward(dinp, dweight, dbias, dout, inp, weight, bias, mean, rstd, N, C,
                           workspace, workspace_bytes, stream, dparams, out_recompute, tweo);
}

absl::Status layernorm_backward_cuda(bf16* dinp, bf16* dweight, bf16* dbias, const bf16* dout,
                                     const bf16* inp, const bf16* weight, const bf16* bias,
                                     const float* mean, const float* rstd, int N, int C,
                                     void* workspace, int64_t workspace_bytes, cudaStream_t stream,
                                     GradWrite dparams, bf16* out_recompute,
                                     const TweoGradTerm& tweo) {
  return LayernormBackward(dinp, cu::Nv(dweight), cu::Nv(dbias), dout, inp, weight, bias, mean,
                           rstd, N, C, workspace, workspace_bytes, stream, dparams,
                           out_recompute, tweo);
}

namespace {

absl::Status CheckForwardPointers(const char* fn, const void* residual, bool need_residual,
                                  const void* out, const float* mean, const float* rstd,
                                  const bf16* a, const bf16* b, const bf16* weight,
                                  const bf16* bias) {
  QT_CHECK_ARG((!need_residual || (residual != nullptr && b != nullptr)) && out != nullptr &&
                   mean != nullptr && rstd != nullptr && a != nullptr && weight != nullptr &&
                   bias != nullptr,
               fn, ": null pointer (residual=", residual != nullptr, " out=", out != nullptr,
               " mean=", mean != nullptr, " rstd=", rstd != nullptr, " inp/a=", a != nullptr,
               " b=", b != nullptr, " weight=", weight != nullptr, " bias=", bias != nullptr,
               ")");
  return absl::OkStatus();
}

template <Residual kResidual>
absl::Status ForwardFp8(const char* fn, bf16* residual, uint8_t* out_fp8, float* mean,
                        float* rstd, float* amax, const bf16* a, const bf16* b,
                        const bf16* weight, const bf16* bias, int N, int C, Fp8Format format,
                        const float* scale, cudaStream_t stream) {
  RETURN_IF_ERROR(CheckShape(fn, N, C));
  RETURN_IF_ERROR(CheckForwardPointers(fn, residual, kResidual == Residual::kAdd, out_fp8, mean,
                                       rstd, a, b, weight, bias));
  QT_CHECK_ARG(scale != nullptr, fn, ": scale is null");
  nv_bf16* res = residual != nullptr ? cu::Nv(residual) : nullptr;
  const nv_bf16* bb = b != nullptr ? cu::Nv(b) : nullptr;
  if (format == Fp8Format::kE4M3) {
    return LaunchForward<kResidual, LnOut::kFp8, Fp8Format::kE4M3>(
        res, nullptr, mean, rstd, cu::Nv(a), bb, cu::Nv(weight), cu::Nv(bias), N, C, stream,
        out_fp8, amax, scale);
  }
  return LaunchForward<kResidual, LnOut::kFp8, Fp8Format::kE5M2>(
      res, nullptr, mean, rstd, cu::Nv(a), bb, cu::Nv(weight), cu::Nv(bias), N, C, stream,
      out_fp8, amax, scale);
}

template <Residual kResidual>
absl::Status ForwardAmax(const char* fn, bf16* residual, bf16* out, float* mean, float* rstd,
                         float* amax, const bf16* a, const bf16* b, const bf16* weight,
                         const bf16* bias, int N, int C, cudaStream_t stream) {
  RETURN_IF_ERROR(CheckShape(fn, N, C));
  RETURN_IF_ERROR(CheckForwardPointers(fn, residual, kResidual == Residual::kAdd, out, mean,
                                       rstd, a, b, weight, bias));
  QT_CHECK_ARG(amax != nullptr, fn, ": amax is null");
  return LaunchForward<kResidual, LnOut::kBf16Amax>(
      residual != nullptr ? cu::Nv(residual) : nullptr, cu::Nv(out), mean, rstd, cu::Nv(a),
      b != nullptr ? cu::Nv(b) : nullptr, cu::Nv(weight), cu::Nv(bias), N, C, stream, nullptr,
      amax, nullptr);
}

}  // namespace

absl::Status layernorm_forward_fp8_cuda(uint8_t* out_fp8, float* mean, float* rstd, float* amax,
                                        const bf16* inp, const bf16* weight, const bf16* bias,
                                        int N, int C, Fp8Format format, const float* scale,
                                        cudaStream_t stream) {
  return ForwardFp8<Residual::kNone>("layernorm_forward_fp8_cuda", nullptr, out_fp8, mean, rstd,
                                     amax, inp, nullptr, weight, bias, N, C, format, scale,
                                     stream);
}

absl::Status residual_layernorm_forward_fp8_cuda(bf16* residual, uint8_t* out_fp8, float* mean,
                                                 float* rstd, float* amax, const bf16* a,
                                                 const bf16* b, const bf16* weight,
                                                 const bf16* bias, int N, int C,
                                                 Fp8Format format, const float* scale,
                                                 cudaStream_t stream) {
  return ForwardFp8<Residual::kAdd>("residual_layernorm_forward_fp8_cuda", residual, out_fp8,
                                    mean, rstd, amax, a, b, weight, bias, N, C, format, scale,
                                    stream);
}

absl::Status layernorm_forward_amax_cuda(bf16* out, float* mean, float* rstd, float* amax,
                                         const bf16* inp, const bf16* weight, const bf16* bias,
                                         int N, int C, cudaStream_t stream) {
  return ForwardAmax<Residual::kNone>("layernorm_forward_amax_cuda", nullptr, out, mean, rstd,
                                      amax, inp, nullptr, weight, bias, N, C, stream);
}

absl::Status residual_layernorm_forward_amax_cuda(bf16* residual, bf16* out, float* mean,
                                                  float* rstd, float* amax, const bf16* a,
                                                  const bf16* b, const bf16* weight,
                                                  const bf16* bias, int N, int C,
                                                  cudaStream_t stream) {
  return ForwardAmax<Residual::kAdd>("residual_layernorm_forward_amax_cuda", residual, out, mean,
                                     rstd, amax, a, b, weight, bias, N, C, stream);
}

}  // namespace qtrain::ops
