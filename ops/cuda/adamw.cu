// CUDA AdamW: one fused pass that updates fp32 params and moments and writes the BF16 copy,
// over one range or, in one launch, over the segments of a flat buffer (AdamwPlan).
//
// Both forms run one kernel template: a block updates one chunk of at most
// AdamwPlan::kChunkElements elements, taken from the plan's table or, for a single range,
// computed from the block index. Inside a chunk, a few leading and trailing elements go
// element by element up to 16-byte boundaries and the body goes in float4 units, kUnroll of
// them per thread loaded before any math so that enough bytes are in flight to saturate HBM.
// The data is touched once per step and is larger than L2, hence the streaming (evict-first)
// loads and stores. On an H100 the multi form moves 2.98 TB/s at 124M and 1.5B parameters
// (fp32 or BF16 gradients), against 2.3 / 2.7 TB/s for one single-range call per tensor run.
#include <algorithm>
#include <climits>
#include <cmath>
#include <vector>

#include <cuda_runtime.h>

#include "ops/cuda/adamw_cuda.h"
#include "ops/cuda/cuda_status.h"
#include "ops/cuda/cuda_utils.cuh"
#include "ops/cuda/fp8_utils.cuh"
#include "ops/status_macros.h"

namespace qtrain::ops {
namespace {

using cu::nv_bf16;

constexpr int kThreads = 256;
constexpr int kUnroll = 2;  // float4 units per thread loaded ahead of the math
constexpr int64_t kChunk = AdamwPlan::kChunkElements;
static_assert(kChunk % (4 * kThreads * kUnroll) == 0, "a full chunk is whole unrolled sweeps");
static_assert(kChunk <= INT_MAX, "chunk-local indices are int");

// One entry of a plan's table: elements [begin, begin + size) of the flat buffers.
struct alignas(16) Chunk {
  int64_t begin;
  int32_t size;
  int32_t decay;  // 1: the call's weight_decay applies, 0: none
};

// The FP8 copy of a chunk (plans with FP8 segments; same index as the Chunk): codes of the
// chunk's first element (null: the chunk has no FP8 copy), the tensor's index in the scale and
// amax arrays, and flags.
struct alignas(16) Fp8Chunk {
  uint8_t* codes;
  int32_t scale_index;
  int32_t flags;  // kFp8E5M2 | kFp8SkipBf16
};
constexpr int32_t kFp8E5M2 = 1;
constexpr int32_t kFp8SkipBf16 = 2;

struct AdamParams {
  float lr, beta1, beta2, eps, weight_decay, bc1, bc2;
};

// The CPU reference's operation order with every rounding spelled out: __f*_rn are never
// contracted, so the compiler cannot fuse differently in the vector body and the scalar ends
// (which would make an element's bits depend on where a chunk boundary falls). The three FMAs
// are those the compilers form from ops/adamw.cc's expressions (g++ -march=x86-64-v3 and nvcc
// alike): m = fma(b1, m, (1-b1) g), v = fma(b2, v, ((1-b2) g) g), p = fma(-lr, u, p) with
// u = fma(wd, p, mhat / (sqrt(vhat) + eps)); division and square root are IEEE on both.
__device__ __forceinline__ void AdamStep(float& p, float& mi, float& vi, float g,
                                         const AdamParams& a) {
  mi = __fmaf_rn(a.beta1, mi, __fmul_rn(__fsub_rn(1.0f, a.beta1), g));
  vi = __fmaf_rn(a.beta2, vi, __fmul_rn(__fmul_rn(__fsub_rn(1.0f, a.beta2), g), g));
  const float mhat = __fdiv_rn(mi, a.bc1);
  const float vhat = __fdiv_rn(vi, a.bc2);
  const float u =
      __fmaf_rn(a.weight_decay, p, __fdiv_rn(mhat, __fadd_rn(__fsqrt_rn(vhat), a.eps)));
  p = __fmaf_rn(-a.lr, u, p);
}

// Gradient loads, widened to fp32 (exact for BF16: its bits are the high half of a float).
__device__ __forceinline__ float LoadGrad(const float* g) { return __ldcs(g); }
__device__ __forceinline__ float LoadGrad(const nv_bf16* g) {
  return __bfloat162float(__ldcs(g));
}
// Four consecutive gradients at a 16-byte (fp32) or 8-byte (BF16) boundary.
__device__ __forceinline__ float4 LoadGrad4(const float* g) {
  return __ldcs(reinterpret_cast<const float4*>(g));
}
__device__ __forceinline__ float4 LoadGrad4(const nv_bf16* g) {
  const uint2 u = __ldcs(reinterpret_cast<const uint2*>(g));
  // Little-endian: element 2k is the low half of word k.
  return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u),
                     __uint_as_float(u.y << 16), __uint_as_float(u.y & 0xffff0000u));
}

// The flat buffers, the step's constants and the gradient scale (device pointer or null).
template <typename G>
struct AdamwArgs {
  float* __restrict__ params;
  nv_bf16* __restrict__ params_bf16;
  const G* __restrict__ grads;
  float* __restrict__ m;
  float* __restrict__ v;
  const float* __restrict__ grad_scale;
  AdamParams a;
  float weight_decay;  // of decaying chunks (a.weight_decay is set per chunk)
  int64_t n;           // single range: its length (unused with a table)
  int phase;           // (address / 4) % 4 of params: the element index offset of 16 B alignment
  // FP8 copies (adamw_update_multi_fp8_cuda): per-chunk records, the scales (null: amax only)
  // and the amaxes.
  const Fp8Chunk* __restrict__ fp8_chunks = nullptr;
  const float* __restrict__ fp8_scale = nullptr;
  float* __restrict__ fp8_amax = nullptr;
};

// One chunk's FP8 output as the kernel sees it.
struct Fp8Out {
  uint8_t* codes = nullptr;  // codes of element `begin`; null: no FP8 copy
  int64_t begin = 0;
  float scale = 0.f;
  bool write_codes = false;  // false: amax only
  bool e5m2 = false;
};

__device__ __forceinline__ uint8_t EncodeAs(bool e5m2, float x, float scale) {
  return e5m2 ? cu::Encode<Fp8Format::kE5M2>(x, scale) : cu::Encode<Fp8Format::kE4M3>(x, scale);
}

// One element, singly: its loads (issued early, so that they overlap the vector body's), then
// the update and its stores.
struct One {
  float p, m, v, g;
};

template <typename G>
__device__ __forceinline__ One LoadOne(const AdamwArgs<G>& x, int64_t i) {
  return One{x.params[i], x.m[i], x.v[i], LoadGrad(x.grads + i)};
}

template <typename G>
__device__ __forceinline__ void UpdateOne(const AdamwArgs<G>& x, const AdamParams& a,
                                          float scale, int64_t i, One e, nv_bf16* params_bf16,
                                          const Fp8Out& f, uint32_t& amax_bits) {
  AdamStep(e.p, e.m, e.v, x.grad_scale != nullptr ? __fmul_rn(e.g, scale) : e.g, a);
  x.params[i] = e.p;
  x.m[i] = e.m;
  x.v[i] = e.v;
  if (params_bf16 != nullptr) params_bf16[i] = __float2bfloat16_rn(e.p);
  if (f.codes != nullptr) {
    amax_bits = max(amax_bits, cu::AbsBits(e.p));
    if (f.write_codes) f.codes[i - f.begin] = EncodeAs(f.e5m2, e.p, f.scale);
  }
}

// The chunk's amax into amax[index], one atomic per block; every thread calls (f is uniform).
__device__ __forceinline__ void ReduceAmax(const Fp8Out& f, float* amax, int index,
                                           uint32_t bits) {
  if (f.codes == nullptr) return;
  __shared__ uint32_t warp_max[kThreads / 32];
  bits = cu::WarpMaxBits(bits);
  if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = bits;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t m = 0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) m = max(m, warp_max[w]);
    cu::AtomicMaxBits(amax + index, m);
  }
}

// kVec: all buffers share params' alignment phase, so the chunk's body can go in float4 units.
// kTable: chunks come from the plan's table; else block b covers the b-th kChunk-sized
// piece of the single range [0, n), cut where params is 16-byte aligned (shifted by the phase).
// kFp8 (table form only): chunks with an FP8 record also write the FP8 codes of the new params
// and reduce their amax (one atomicMax per chunk).
template <typename G, bool kVec, bool kTable, bool kFp8 = false>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const AdamwArgs<G> x, const Chunk* __restrict__ chunks) {
  int64_t begin, end;
  AdamParams a = x.a;
  nv_bf16* params_bf16 = x.params_bf16;
  Fp8Out f;
  int fp8_index = 0;
  if (kTable) {
    const Chunk c = chunks[blockIdx.x];
    begin = c.begin;
    end = c.begin + c.size;
    a.weight_decay = c.decay ? x.weight_decay : 0.0f;
    if (kFp8) {
      const Fp8Chunk fc = x.fp8_chunks[blockIdx.x];
      if (fc.codes != nullptr) {
        f.codes = fc.codes;
        f.begin = begin;
        f.e5m2 = (fc.flags & kFp8E5M2) != 0;
        f.write_codes = x.fp8_scale != nullptr;
        f.scale = f.write_codes ? x.fp8_scale[fc.scale_index] : 0.f;
        fp8_index = fc.scale_index;
        if (fc.flags & kFp8SkipBf16) params_bf16 = nullptr;
      }
    }
  } else {
    const int64_t shift = kVec ? x.phase : 0;
    const int64_t first = static_cast<int64_t>(blockIdx.x) * kChunk - shift;
    begin = first > 0 ? first : 0;
    end = first + kChunk < x.n ? first + kChunk : x.n;
    a.weight_decay = x.weight_decay;
  }
  const float scale = x.grad_scale != nullptr ? *x.grad_scale : 1.0f;
  const int tid = threadIdx.x;
  uint32_t amax_bits = 0;
  if (!kVec) {
    for (int64_t i = begin + tid; i < end; i += kThreads) {
      UpdateOne(x, a, scale, i, LoadOne(x, i), params_bf16, f, amax_bits);
    }
    if (kFp8) ReduceAmax(f, x.fp8_amax, fp8_index, amax_bits);
    return;
  }
  // [begin, body) and [body + 4 * nvec, end): at most 3 elements each, singly, by the first
  // threads; their loads go out with the body's, their update after it (a chunk is about one
  // sweep, so a scalar round trip before the body would lengthen the whole block's time).
  const int64_t to_boundary = (4 - (begin + x.phase) % 4) % 4;
  const int head = static_cast<int>(to_boundary < end - begin ? to_boundary : end - begin);
  const int64_t body = begin + head;
  const int nvec = static_cast<int>((end - body) / 4);
  const int tail = static_cast<int>(end - body) - 4 * nvec;
  const bool single = tid < head + tail;
  const int64_t single_i = tid < head ? begin + tid : body + 4 * nvec + (tid - head);
  One e{};
  if (single) e = LoadOne(x, single_i);
  float4* __restrict__ p4 = reinterpret_cast<float4*>(x.params + body);
  float4* __restrict__ m4 = reinterpret_cast<float4*>(x.m + body);
  float4* __restrict__ v4 = reinterpret_cast<float4*>(x.v + body);
  const G* __restrict__ g4 = x.grads + body;
  uint2* __restrict__ b4 =
      params_bf16 != nullptr ? reinterpret_cast<uint2*>(params_bf16 + body) : nullptr;
  // The body's codes: one 4-byte store per float4 where the codes are 4-byte aligned there
  // (the same for the whole chunk), else 4 single bytes.
  uint8_t* const codes_body = kFp8 && f.codes != nullptr ? f.codes + (body - begin) : nullptr;
  const bool codes_aligned = reinterpret_cast<uintptr_t>(codes_body) % 4 == 0;
  for (int k0 = tid; k0 < nvec; k0 += kUnroll * kThreads) {
    float4 p[kUnroll], g[kUnroll], mm[kUnroll], vv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int k = k0 + u * kThreads;
      if (k < nvec) {
        p[u] = __ldcs(p4 + k);
        g[u] = LoadGrad4(g4 + 4 * k);
        mm[u] = __ldcs(m4 + k);
        vv[u] = __ldcs(v4 + k);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int k = k0 + u * kThreads;
      if (k >= nvec) break;
      if (x.grad_scale != nullptr) {
        g[u].x = __fmul_rn(g[u].x, scale);
        g[u].y = __fmul_rn(g[u].y, scale);
        g[u].z = __fmul_rn(g[u].z, scale);
        g[u].w = __fmul_rn(g[u].w, scale);
      }
      AdamStep(p[u].x, mm[u].x, vv[u].x, g[u].x, a);
      AdamStep(p[u].y, mm[u].y, vv[u].y, g[u].y, a);
      AdamStep(p[u].z, mm[u].z, vv[u].z, g[u].z, a);
      AdamStep(p[u].w, mm[u].w, vv[u].w, g[u].w, a);
      __stcs(p4 + k, p[u]);
      __stcs(m4 + k, mm[u]);
      __stcs(v4 + k, vv[u]);
      if (b4 != nullptr) {
        const __nv_bfloat162 lo = __floats2bfloat162_rn(p[u].x, p[u].y);
        const __nv_bfloat162 hi = __floats2bfloat162_rn(p[u].z, p[u].w);
        uint2 packed;
        packed.x = *reinterpret_cast<const uint32_t*>(&lo);
        packed.y = *reinterpret_cast<const uint32_t*>(&hi);
        __stcs(b4 + k, packed);
      }
      if (kFp8 && codes_body != nullptr) {
        const float q[4] = {p[u].x, p[u].y, p[u].z, p[u].w};
#pragma unroll
        for (int j = 0; j < 4; ++j) amax_bits = max(amax_bits, cu::AbsBits(q[j]));
        if (f.write_codes) {
          const uint32_t c4 = f.e5m2 ? cu::Encode4<Fp8Format::kE5M2>(q, f.scale)
                                     : cu::Encode4<Fp8Format::kE4M3>(q, f.scale);
          uint8_t* dst = codes_body + 4 * static_cast<int64_t>(k);
          if (codes_aligned) {
            *reinterpret_cast<uint32_t*>(dst) = c4;
          } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) dst[j] = static_cast<uint8_t>(c4 >> (8 * j));
          }
        }
      }
    }
  }
  if (single) UpdateOne(x, a, scale, single_i, e, params_bf16, f, amax_bits);
  if (kFp8) ReduceAmax(f, x.fp8_amax, fp8_index, amax_bits);
}

// Element index offset of the next 16-byte boundary of an fp32 array (4 floats) or 8-byte
// boundary of a BF16 array (4 bf16s); -1 where the array is not element-aligned.
int Phase(const void* p, int elem_bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a % elem_bytes != 0) return -1;
  return static_cast<int>((a / elem_bytes) % 4);
}

absl::Status CheckCommon(const char* fn, const float* params, const void* grads, const float* m,
                         const float* v, float beta1, float beta2, int t) {
  QT_CHECK_ARG(t >= 1, fn, ": step t must be >= 1, got ", t);
  QT_CHECK_ARG(beta1 >= 0.f && beta1 < 1.f && beta2 >= 0.f && beta2 < 1.f, fn,
               ": betas must be in [0, 1), got beta1=", beta1, " beta2=", beta2);
  QT_CHECK_ARG(params != nullptr && grads != nullptr && m != nullptr && v != nullptr, fn,
               ": null pointer (params=", params != nullptr, " grads=", grads != nullptr,
               " m=", m != nullptr, " v=", v != nullptr, ")");
  return absl::OkStatus();
}

template <typename G>
AdamwArgs<G> MakeArgs(float* params, bf16* params_bf16, const G* grads, float* m, float* v,
                      float lr, float beta1, float beta2, float eps, float weight_decay, int t,
                      const float* grad_scale, int64_t n) {
  AdamwArgs<G> x;
  x.params = params;
  x.params_bf16 = params_bf16 != nullptr ? cu::Nv(params_bf16) : nullptr;
  x.grads = grads;
  x.m = m;
  x.v = v;
  x.grad_scale = grad_scale;
  x.a.lr = lr;
  x.a.beta1 = beta1;
  x.a.beta2 = beta2;
  x.a.eps = eps;
  x.a.weight_decay = weight_decay;
  x.a.bc1 = 1.0f - std::pow(beta1, static_cast<float>(t));
  x.a.bc2 = 1.0f - std::pow(beta2, static_cast<float>(t));
  x.weight_decay = weight_decay;
  x.n = n;
  x.phase = Phase(params, 4);
  return x;
}

// True when every buffer is at params' phase: then a float4 of params at element i lines up
// with float4s of m, v (and grads), a uint2 of BF16 grads and of the BF16 copy.
template <typename G>
bool SamePhase(const AdamwArgs<G>& x) {
  const int ph = x.phase;
  return ph >= 0 && Phase(x.m, 4) == ph && Phase(x.v, 4) == ph &&
         Phase(x.grads, sizeof(G)) == ph &&
         (x.params_bf16 == nullptr || Phase(x.params_bf16, 2) == ph);
}

template <typename G, bool kTable, bool kFp8 = false>
absl::Status Launch(const AdamwArgs<G>& x, const Chunk* chunks, int64_t blocks,
                    cudaStream_t stream) {
  if (blocks == 0) return absl::OkStatus();
  QT_CHECK_ARG(blocks <= INT_MAX, "adamw: ", blocks, " blocks exceed the grid limit");
  if (SamePhase(x)) {
    adamw_kernel<G, true, kTable, kFp8><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        x, chunks);
  } else {
    adamw_kernel<G, false, kTable, kFp8><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        x, chunks);
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

template <typename G>
absl::Status AdamwSingle(float* params, bf16* params_bf16, const G* grads, float* m, float* v,
                         int64_t n, float lr, float beta1, float beta2, float eps,
                         float weight_decay, int t, const float* grad_scale,
                         cudaStream_t stream) {
  QT_CHECK_ARG(n >= 0, "adamw_update_cuda: n must be >= 0, got ", n);
  RETURN_IF_ERROR(CheckCommon("adamw_update_cuda", params, grads, m, v, beta1, beta2, t));
  if (n == 0) return absl::OkStatus();
  const AdamwArgs<G> x = MakeArgs(params, params_bf16, grads, m, v, lr, beta1, beta2, eps,
                                  weight_decay, t, grad_scale, n);
  // Chunks cut where params is 16-byte aligned: the first one is shorter by the phase.
  const int64_t shift = SamePhase(x) ? x.phase : 0;
  return Launch<G, false>(x, nullptr, (n + shift + kChunk - 1) / kChunk, stream);
}

template <typename G>
absl::Status AdamwMulti(const AdamwPlan& plan, float* params, bf16* params_bf16, const G* grads,
                        float* m, float* v, float lr, float beta1, float beta2, float eps,
                        float weight_decay, int t, const float* grad_scale,
                        cudaStream_t stream) {
  RETURN_IF_ERROR(
      CheckCommon("adamw_update_multi_cuda", params, grads, m, v, beta1, beta2, t));
  const AdamwArgs<G> x = MakeArgs(params, params_bf16, grads, m, v, lr, beta1, beta2, eps,
                                  weight_decay, t, grad_scale, plan.size());
  return Launch<G, true>(x, static_cast<const Chunk*>(plan.device_chunks()), plan.num_chunks(),
                         stream);
}

template <typename G>
absl::Status AdamwMultiFp8(const AdamwPlan& plan, float* params, bf16* params_bf16,
                           const G* grads, float* m, float* v, float lr, float beta1,
                           float beta2, float eps, float weight_decay, int t,
                           const float* grad_scale, const float* fp8_scale, float* fp8_amax,
                           cudaStream_t stream) {
  constexpr const char* fn = "adamw_update_multi_fp8_cuda";
  RETURN_IF_ERROR(CheckCommon(fn, params, grads, m, v, beta1, beta2, t));
  if (plan.num_fp8_segments() == 0) {
    return AdamwMulti(plan, params, params_bf16, grads, m, v, lr, beta1, beta2, eps,
                      weight_decay, t, grad_scale, stream);
  }
  QT_CHECK_ARG(fp8_amax != nullptr, fn, ": fp8_amax is null (the plan has ",
               plan.num_fp8_segments(), " FP8 segments)");
  AdamwArgs<G> x = MakeArgs(params, params_bf16, grads, m, v, lr, beta1, beta2, eps,
                            weight_decay, t, grad_scale, plan.size());
  x.fp8_chunks = static_cast<const Fp8Chunk*>(plan.device_fp8_chunks());
  x.fp8_scale = fp8_scale;
  x.fp8_amax = fp8_amax;
  return Launch<G, true, true>(x, static_cast<const Chunk*>(plan.device_chunks()),
                               plan.num_chunks(), stream);
}

}  // namespace

absl::Status adamw_update_cuda(float* params, bf16* params_bf16, const float* grads, float* m,
                               float* v, int64_t n, float lr, float beta1, float beta2,
                               float eps, float weight_decay, int t, const float* grad_scale,
                               cudaStream_t stream) {
  return AdamwSingle(params, params_bf16, grads, m, v, n, lr, beta1, beta2, eps, weight_decay,
                     t, grad_scale, stream);
}

absl::Status adamw_update_cuda(float* params, bf16* params_bf16, const bf16* grads, float* m,
                               float* v, int64_t n, float lr, float beta1, float beta2,
                               float eps, float weight_decay, int t, const float* grad_scale,
                               cudaStream_t stream) {
  return AdamwSingle(params, params_bf16, grads != nullptr ? cu::Nv(grads) : nullptr, m, v, n,
                     lr, beta1, beta2, eps, weight_decay, t, grad_scale, stream);
}

absl::Status adamw_update_multi_cuda(const AdamwPlan& plan, float* params, bf16* params_bf16,
                                     const float* grads, float* m, float* v, float lr,
                                     float beta1, float beta2, float eps, float weight_decay,
                                     int t, const float* grad_scale, cudaStream_t stream) {
  return AdamwMulti(plan, params, params_bf16, grads, m, v, lr, beta1, beta2, eps,
                    weight_decay, t, grad_scale, stream);
}

absl::Status adamw_update_multi_cuda(const AdamwPlan& plan, float* params, bf16* params_bf16,
                                     const bf16* grads, float* m, float* v, float lr,
                                     float beta1, float beta2, float eps, float weight_decay,
                                     int t, const float* grad_scale, cudaStream_t stream) {
  return AdamwMulti(plan, params, params_bf16, grads != nullptr ? cu::Nv(grads) : nullptr, m,
                    v, lr, beta1, beta2, eps, weight_decay, t, grad_scale, stream);
}

absl::StatusOr<std::unique_ptr<AdamwPlan>> AdamwPlan::Create(
    absl::Span<const AdamwSegment> segments, int64_t n) {
  return Create(segments, n, {});
}

absl::StatusOr<std::unique_ptr<AdamwPlan>> AdamwPlan::Create(
    absl::Span<const AdamwSegment> segments, int64_t n,
    absl::Span<const AdamwFp8Segment> fp8_segments) {
  QT_CHECK_ARG(n >= 0, "AdamwPlan::Create: n must be >= 0, got ", n);
  for (size_t i = 0; i < segments.size(); ++i) {
    const AdamwSegment& s = segments[i];
    QT_CHECK_ARG(s.offset >= 0 && s.size >= 0 && s.offset <= n && s.size <= n - s.offset,
                 "AdamwPlan::Create: segment ", i, " (offset=", s.offset, " size=", s.size,
                 ") is not inside [0, ", n, ")");
  }
  // Non-empty segments by offset (ties by index, for a stable message); neighbours must not
  // overlap. The chunks follow this order, so consecutive blocks walk memory forwards.
  std::vector<size_t> order;
  for (size_t i = 0; i < segments.size(); ++i) {
    if (segments[i].size > 0) order.push_back(i);
  }
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return segments[a].offset < segments[b].offset;
  });
  for (size_t j = 1; j < order.size(); ++j) {
    const AdamwSegment& p = segments[order[j - 1]];
    const AdamwSegment& s = segments[order[j]];
    QT_CHECK_ARG(p.offset + p.size <= s.offset, "AdamwPlan::Create: segment ", order[j - 1],
                 " (offset=", p.offset, " size=", p.size, ") overlaps segment ", order[j],
                 " (offset=", s.offset, " size=", s.size, ")");
  }
  // FP8 segments: each inside one segment, no two overlapping; sorted by offset.
  std::vector<size_t> fp8_order;
  int max_index = -1;
  for (size_t i = 0; i < fp8_segments.size(); ++i) {
    const AdamwFp8Segment& f = fp8_segments[i];
    QT_CHECK_ARG(f.offset >= 0 && f.size >= 0 && f.scale_index >= 0 &&
                     (f.size == 0 || f.codes != nullptr),
                 "AdamwPlan::Create: FP8 segment ", i, " (offset=", f.offset, " size=", f.size,
                 " scale_index=", f.scale_index, " codes=", f.codes != nullptr ? "set" : "null",
                 ") needs offset, size, scale_index >= 0 and codes");
    if (f.size == 0) continue;
    bool inside = false;
    for (size_t j : order) {
      const AdamwSegment& s = segments[j];
      inside |= s.offset <= f.offset && f.offset + f.size <= s.offset + s.size;
    }
    QT_CHECK_ARG(inside, "AdamwPlan::Create: FP8 segment ", i, " (offset=", f.offset,
                 " size=", f.size, ") is not inside one of the segments");
    fp8_order.push_back(i);
    max_index = std::max(max_index, f.scale_index);
  }
  std::stable_sort(fp8_order.begin(), fp8_order.end(), [&](size_t a, size_t b) {
    return fp8_segments[a].offset < fp8_segments[b].offset;
  });
  for (size_t j = 1; j < fp8_order.size(); ++j) {
    const AdamwFp8Segment& p = fp8_segments[fp8_order[j - 1]];
    const AdamwFp8Segment& s = fp8_segments[fp8_order[j]];
    QT_CHECK_ARG(p.offset + p.size <= s.offset, "AdamwPlan::Create: FP8 segment ",
                 fp8_order[j - 1], " (offset=", p.offset, " size=", p.size,
                 ") overlaps FP8 segment ", fp8_order[j], " (offset=", s.offset,
                 " size=", s.size, ")");
  }
  // Cut at multiples of kChunk of the flat index, so that interior chunks start 16-byte aligned
  // in cudaMalloc'd buffers, and at the FP8 segments' ends, so that a chunk lies inside one FP8
  // segment or outside all.
  std::vector<Chunk> chunks;
  std::vector<Fp8Chunk> fp8_chunks;
  int64_t covered = 0;
  size_t next_fp8 = 0;  // first FP8 segment (in offset order) not ending before the cursor
  for (size_t i : order) {
    const AdamwSegment& s = segments[i];
    covered += s.size;
    for (int64_t b = s.offset; b < s.offset + s.size;) {
      while (next_fp8 < fp8_order.size() &&
             fp8_segments[fp8_order[next_fp8]].offset + fp8_segments[fp8_order[next_fp8]].size <=
                 b) {
        ++next_fp8;
      }
      int64_t e = std::min(s.offset + s.size, (b / kChunk + 1) * kChunk);
      Fp8Chunk fc{nullptr, 0, 0};
      if (next_fp8 < fp8_order.size()) {
        const AdamwFp8Segment& f = fp8_segments[fp8_order[next_fp8]];
        if (f.offset <= b) {  // inside f: stop at its end
          e = std::min(e, f.offset + f.size);
          fc.codes = f.codes + (b - f.offset);
          fc.scale_index = f.scale_index;
          fc.flags = (f.format == Fp8Format::kE5M2 ? kFp8E5M2 : 0) |
                     (f.write_bf16 ? 0 : kFp8SkipBf16);
        } else {  // before f: stop at its start
          e = std::min(e, f.offset);
        }
      }
      chunks.push_back(Chunk{b, static_cast<int32_t>(e - b), s.decay ? 1 : 0});
      fp8_chunks.push_back(fc);
      b = e;
    }
  }
  QT_CHECK_ARG(chunks.size() <= static_cast<size_t>(INT_MAX), "AdamwPlan::Create: ",
               chunks.size(), " chunks exceed the grid limit");
  void* table = nullptr;
  if (!chunks.empty()) {
    const size_t bytes = chunks.size() * sizeof(Chunk);
    CUDA_RETURN_IF_ERROR(cudaMalloc(&table, bytes));
    const cudaError_t err = cudaMemcpy(table, chunks.data(), bytes, cudaMemcpyHostToDevice);
    if (err != cudaSuccess) {
      cudaFree(table);
      CUDA_RETURN_IF_ERROR(err);
    }
  }
  auto plan = std::unique_ptr<AdamwPlan>(
      new AdamwPlan(n, static_cast<int64_t>(chunks.size()), covered, table));
  if (!fp8_order.empty()) {
    const size_t bytes = fp8_chunks.size() * sizeof(Fp8Chunk);
    CUDA_RETURN_IF_ERROR(cudaMalloc(&plan->fp8_chunks_, bytes));
    CUDA_RETURN_IF_ERROR(
        cudaMemcpy(plan->fp8_chunks_, fp8_chunks.data(), bytes, cudaMemcpyHostToDevice));
    plan->num_fp8_ = static_cast<int>(fp8_order.size());
    plan->max_scale_index_ = max_index;
  }
  return plan;
}

AdamwPlan::~AdamwPlan() {
  if (chunks_ != nullptr) cudaFree(chunks_);
  if (fp8_chunks_ != nullptr) cudaFree(fp8_chunks_);
}

absl::Status adamw_update_multi_fp8_cuda(const AdamwPlan& plan, float* params, bf16* params_bf16,
                                         const float* grads, float* m, float* v, float lr,
                                         float beta1, float beta2, float eps, float weight_decay,
                                         int t, const float* grad_scale, const float* fp8_scale,
                                         float* fp8_amax, cudaStream_t stream) {
  return AdamwMultiFp8(plan, params, params_bf16, grads, m, v, lr, beta1, beta2, eps,
                       weight_decay, t, grad_scale, fp8_scale, fp8_amax, stream);
}

absl::Status adamw_update_multi_fp8_cuda(const AdamwPlan& plan, float* params, bf16* params_bf16,
                                         const bf16* grads, float* m, float* v, float lr,
                                         float beta1, float beta2, float eps, float weight_decay,
                                         int t, const float* grad_scale, const float* fp8_scale,
                                         float* fp8_amax, cudaStream_t stream) {
  return AdamwMultiFp8(plan, params, params_bf16, grads != nullptr ? cu::Nv(grads) : nullptr,
                       m, v, lr, beta1, beta2, eps, weight_decay, t, grad_scale, fp8_scale,
                       fp8_amax, stream);
}

}  // namespace qtrain::ops
