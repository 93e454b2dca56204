// Quantizing layernorm (layernorm_quant_cuda.h): the forward of layernorm.cu (one warp per row,
// the same loops and rounding, so kNone reproduces it bit for bit) with the LSQ/LSQ+ or
// per-token quantizer applied to its BF16 output, and a layernorm backward that recomputes the
// output, masks the incoming gradient by the quantizer's `inside`, sums the per-tensor step /
// offset terms and the weight/bias gradients in fixed orders, and can write the quantized
// output again for the weight-gradient GEMM.
#include <algorithm>

#include <cuda_runtime.h>

#include "ops/cuda/cuda_status.h"
#include "ops/cuda/cuda_utils.cuh"
#include "ops/cuda/layernorm_quant_cuda.h"
#include "ops/cuda/lsq_common.cuh"
#include "ops/cuda/tweo_grad.cuh"
#include "ops/status_macros.h"

namespace qtrain::ops {
namespace {

using cu::nv_bf16;
using lsqd::Quant;

constexpr float kEps = 1e-5f;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

enum QMode : int { kQNone = 0, kQTensor = 1, kQToken = 2 };

// Loads / stores of kPer consecutive channels (8 with 16-byte accesses, else 1).
template <bool kVec>
struct Row {
  static constexpr int kPer = kVec ? 8 : 1;
  __device__ static void Load(float* x, const nv_bf16* p) {
    if (kVec) {
      const cu::Bf16x8 v = cu::Load8(p);
#pragma unroll
      for (int k = 0; k < 8; ++k) x[k] = __bfloat162float(v.v[k]);
    } else {
      x[0] = __bfloat162float(*p);
    }
  }
  __device__ static void Store(nv_bf16* p, const float* x) {
    if (kVec) {
      cu::Bf16x8 v;
#pragma unroll
      for (int k = 0; k < 8; ++k) v.v[k] = __float2bfloat16_rn(x[k]);
      cu::Store8(p, v);
    } else {
      *p = __float2bfloat16_rn(x[0]);
    }
  }
  // Rounds x to BF16, stores it and leaves the rounded values in x.
  __device__ static void StoreRounded(nv_bf16* p, float* x) {
#pragma unroll
    for (int k = 0; k < kPer; ++k) x[k] = __bfloat162float(__float2bfloat16_rn(x[k]));
    Store(p, x);
  }
  __device__ static void StoreCodes(int8_t* p, const float* r) {
    if (kVec) {
      uint32_t lo = 0, hi = 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        lo |= static_cast<uint32_t>(static_cast<uint8_t>(lsqd::Code(r[j]))) << (8 * j);
        hi |= static_cast<uint32_t>(static_cast<uint8_t>(lsqd::Code(r[4 + j]))) << (8 * j);
      }
      *reinterpret_cast<uint2*>(p) = make_uint2(lo, hi);
    } else {
      *p = lsqd::Code(r[0]);
    }
  }
};

// layernorm.cu's output expression (LnNormalize / LnAffine there), spelled identically: the
// recomputation in backward and the plain kernel's output must round alike.
__device__ __forceinline__ float LnNormalize(float x, float mean, float rstd) {
  return __fmul_rn(__fsub_rn(x, mean), rstd);
}
__device__ __forceinline__ float LnAffine(float xhat, float w, float b) {
  return __fmaf_rn(xhat, w, b);
}
__device__ __forceinline__ float RoundBf16(float y) {
  return __bfloat162float(__float2bfloat16_rn(y));
}

// The quantizer's per-call constants (its mode travels as a template argument, ModeOf).
using AQ = lsqd::ActQ;

int ModeOf(const ActQuant& a) {
  return a.mode == ActQuantMode::kNone ? kQNone
                                       : (a.mode == ActQuantMode::kPerTensor ? kQTensor : kQToken);
}

template <bool kVec, bool kResidual, int kQ>
__global__ void __launch_bounds__(kThreads)
    layernorm_forward_quant_kernel(nv_bf16* __restrict__ residual, nv_bf16* __restrict__ out,
                                   float* __restrict__ mean, float* __restrict__ rstd,
                                   const nv_bf16* __restrict__ a, const nv_bf16* __restrict__ b,
                                   const nv_bf16* __restrict__ weight,
                                   const nv_bf16* __restrict__ bias, int N, int C, AQ aq) {
  using R = Row<kVec>;
  constexpr int kPer = R::kPer;
  float qs = 1.f, qb = 0.f;
  if (kQ == kQTensor) {
    const float raw = *aq.step;
    qs = lsqd::ClampStep(raw);
    // Linear::ClampSteps: write the clamped step back once; other blocks reading it meanwhile
    // clamp the old value to the same step.
    if (blockIdx.x == 0 && threadIdx.x == 0 && !(raw >= kLsqMinStep)) *aq.step = qs;
    if (aq.q.asym) qb = *aq.offset;
  }
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= N) return;
  const int64_t off = row * C;
  const nv_bf16* x_src = kResidual ? residual + off : a + off;

  // Statistics exactly as layernorm.cu's forward.
  float sum = 0.f;
  for (int c = lane * kPer; c < C; c += 32 * kPer) {
    float x[kPer];
    R::Load(x, a + off + c);
    if (kResidual) {
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

  if (kQ == kQToken) {
    // The absmax of the BF16 output, then its scale.
    lsqd::AbsMax am;
    for (int c = lane * kPer; c < C; c += 32 * kPer) {
      float x[kPer], w[kPer], bb[kPer];
      R::Load(x, x_src + c);
      R::Load(w, weight + c);
      R::Load(bb, bias + c);
#pragma unroll
      for (int k = 0; k < kPer; ++k) am.Add(RoundBf16(LnAffine(LnNormalize(x[k], m, s), w[k], bb[k])));
    }
    am.WarpReduce();
    qs = lsqd::TokenScale(am.m, am.nan, aq.q.hi);
  }
  for (int c = lane * kPer; c < C; c += 32 * kPer) {
    float x[kPer], w[kPer], bb[kPer], r[kPer];
    R::Load(x, x_src + c);
    R::Load(w, weight + c);
    R::Load(bb, bias + c);
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      x[k] = LnAffine(LnNormalize(x[k], m, s), w[k], bb[k]);
      if (kQ != kQNone) {
        r[k] = lsqd::Level(aq.q, lsqd::Scaled(aq.q, RoundBf16(x[k]), qs, qb));
        x[k] = lsqd::Value(aq.q, r[k], qs, qb);
      }
    }
    R::Store(out + off + c, x);
    if (kQ != kQNone && aq.codes != nullptr) R::StoreCodes(aq.codes + off + c, r);
  }
  if (lane == 0) {
    mean[row] = m;
    rstd[row] = s;
    if (kQ == kQToken && aq.token_scales != nullptr) aq.token_scales[row] = qs;
  }
}

template <bool kResidual>
absl::Status LaunchForward(nv_bf16* residual, nv_bf16* out, float* mean, float* rstd,
                           const nv_bf16* a, const nv_bf16* b, const nv_bf16* weight,
                           const nv_bf16* bias, int N, int C, const ActQuant& q,
                           cudaStream_t stream) {
  const int blocks = (N + kWarps - 1) / kWarps;
  const bool vec = C % 8 == 0 && cu::IsAligned(out, 16) && cu::IsAligned(a, 16) &&
                   cu::IsAligned(weight, 16) && cu::IsAligned(bias, 16) &&
                   (q.codes == nullptr || cu::IsAligned(q.codes, 16)) &&
                   (!kResidual || (cu::IsAligned(b, 16) && cu::IsAligned(residual, 16)));
  const AQ aq = lsqd::MakeActQ(q);
  const int mode = ModeOf(q);
#define QT_LN_FWD(V, Q)                                                              \
  layernorm_forward_quant_kernel<V, kResidual, Q><<<blocks, kThreads, 0, stream>>>( \
      residual, out, mean, rstd, a, b, weight, bias, N, C, aq)
  if (vec) {
    if (mode == kQNone) QT_LN_FWD(true, kQNone);
    else if (mode == kQTensor) QT_LN_FWD(true, kQTensor);
    else QT_LN_FWD(true, kQToken);
  } else {
    if (mode == kQNone) QT_LN_FWD(false, kQNone);
    else if (mode == kQTensor) QT_LN_FWD(false, kQTensor);
    else QT_LN_FWD(false, kQToken);
  }
#undef QT_LN_FWD
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

// ---- Backward.
//
// Plan (a function of N and C alone): blocks of W warps, W as large as 96 KiB of shared
// accumulators (2 C floats per warp) allows, at most 8; at most kBwdBlocks blocks (two waves on
// an H100/H200's 132 SMs); warp w of block b takes rows (i * blocks + b) * W + w in order.
constexpr int kBwdSmemBudget = 96 * 1024;
constexpr int kBwdBlocks = 264;

struct BwdPlan {
  int warps, blocks, smem_bytes;
};

BwdPlan PlanBackward(int N, int C) {
  BwdPlan p;
  p.warps = std::clamp(kBwdSmemBudget / (8 * C), 1, 8);
  p.blocks = static_cast<int>(std::min<int64_t>(kBwdBlocks, (N + p.warps - 1) / p.warps));
  p.smem_bytes = p.warps * 8 * C;
  return p;
}

// Workspace: [ds/db partials: 2 doubles per block][dweight|dbias partial rows: 2 C floats per
// block].
int64_t StepPartialsBytes(const BwdPlan& p) { return static_cast<int64_t>(p.blocks) * 16; }

// Where column j sits in a warp's accumulator array of C floats. kVec: a lane's 8 columns
// (j = 8 q .. 8 q + 7) as two float-quads, the first halves of all quads before the second
// halves, so that the lanes of a warp touch consecutive 16-byte words (no bank conflicts);
// scalar: in place.
template <bool kVec>
__device__ __forceinline__ int AccIndex(int j, int C) {
  if (!kVec) return j;
  const int q = j / 8, k = j % 8;
  return k < 4 ? q * 4 + k : C / 2 + q * 4 + (k - 4);
}

// acc[columns c .. c + kPer) += v (c a multiple of kPer); float4 accesses for kVec.
template <bool kVec>
__device__ __forceinline__ void AccAdd(float* acc, int c, int C, const float* v) {
  if (kVec) {
    float4* lo = reinterpret_cast<float4*>(acc + AccIndex<true>(c, C));
    float4* hi = reinterpret_cast<float4*>(acc + AccIndex<true>(c + 4, C));
    float4 a = *lo, b = *hi;
    a.x = __fadd_rn(a.x, v[0]), a.y = __fadd_rn(a.y, v[1]);
    a.z = __fadd_rn(a.z, v[2]), a.w = __fadd_rn(a.w, v[3]);
    b.x = __fadd_rn(b.x, v[4]), b.y = __fadd_rn(b.y, v[5]);
    b.z = __fadd_rn(b.z, v[6]), b.w = __fadd_rn(b.w, v[7]);
    *lo = a;
    *hi = b;
  } else {
    acc[c] = __fadd_rn(acc[c], v[0]);
  }
}

template <bool kVec, int kQ, bool kOut>
__global__ void __launch_bounds__(kThreads)
    layernorm_backward_quant_kernel(double* __restrict__ step_partials,
                                    float* __restrict__ partial, nv_bf16* __restrict__ dinp,
                                    nv_bf16* __restrict__ out, const nv_bf16* __restrict__ dout,
                                    const nv_bf16* __restrict__ inp,
                                    const nv_bf16* __restrict__ weight,
                                    const nv_bf16* __restrict__ bias,
                                    const float* __restrict__ mean,
                                    const float* __restrict__ rstd, int N, int C, AQ aq,
                                    TweoGradTerm tweo) {
  using R = Row<kVec>;
  constexpr int kPer = R::kPer;
  extern __shared__ float smem[];  // per warp: dweight[C], dbias[C]
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int warps = blockDim.x / 32;
  float* acc_w = smem + static_cast<int64_t>(warp) * 2 * C;
  float* acc_b = acc_w + C;
  for (int c = lane * kPer; c < C; c += 32 * kPer) {
#pragma unroll
    for (int k = 0; k < kPer; ++k) acc_w[AccIndex<kVec>(c + k, C)] = acc_b[AccIndex<kVec>(c + k, C)] = 0.f;
  }
  const float qs = kQ == kQTensor ? lsqd::ClampStep(*aq.step) : 1.f;
  const float qb = kQ == kQTensor && aq.q.asym ? *aq.offset : 0.f;
  double sum_s = 0.0, sum_b = 0.0;
  const int64_t step = static_cast<int64_t>(gridDim.x) * warps;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * warps + warp; r < N; r += step) {
    const int64_t off = r * C;
    const float m = mean[r], s = rstd[r];
    const float ts = kQ == kQToken && kOut ? aq.token_scales[r] : 1.f;
    // Pass 1: the masked gradient's statistics (and, once per element, the step terms).
    float dnorm_sum = 0.f, dnorm_norm_sum = 0.f;
    for (int c = lane * kPer; c < C; c += 32 * kPer) {
      float x[kPer], g[kPer], w[kPer], bb[kPer];
      R::Load(x, inp + off + c);
      R::Load(g, dout + off + c);
      R::Load(w, weight + c);
      if (kQ == kQTensor) R::Load(bb, bias + c);
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const float xhat = LnNormalize(x[k], m, s);
        float dy = g[k];
        if (kQ == kQTensor) {
          const float xs = lsqd::Scaled(aq.q, RoundBf16(LnAffine(xhat, w[k], bb[k])), qs, qb);
          if (!lsqd::BackwardTerms(aq.q, xs, g[k], sum_s, sum_b)) dy = 0.f;
        }
        const float dnorm = __fmul_rn(w[k], dy);
        dnorm_sum = __fadd_rn(dnorm_sum, dnorm);
        dnorm_norm_sum = __fmaf_rn(dnorm, xhat, dnorm_norm_sum);
      }
    }
    const float dnorm_mean = cu::WarpSum(dnorm_sum) / C;
    const float dnorm_norm_mean = cu::WarpSum(dnorm_norm_sum) / C;
    // Pass 2: dinp, the weight/bias terms, the recomputed output.
    for (int c = lane * kPer; c < C; c += 32 * kPer) {
      float x[kPer], g[kPer], w[kPer], bb[kPer], dx[kPer], y[kPer], tw[kPer], tb[kPer];
      R::Load(x, inp + off + c);
      R::Load(g, dout + off + c);
      R::Load(w, weight + c);
      R::Load(dx, dinp + off + c);
      if (kQ == kQTensor || kOut) R::Load(bb, bias + c);
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const float xhat = LnNormalize(x[k], m, s);
        float dy = g[k];
        float v = 0.f;
        if (kQ == kQTensor || kOut) v = RoundBf16(LnAffine(xhat, w[k], bb[k]));
        float xs = 0.f;
        if (kQ == kQTensor) {
          xs = lsqd::Scaled(aq.q, v, qs, qb);
          // The classification of lsq_backward (NaN counts as inside).
          if (xs <= aq.q.lo || xs >= aq.q.hi) dy = 0.f;
        }
        const float centered = __fsub_rn(__fmul_rn(w[k], dy), dnorm_mean);
        dx[k] = __fmaf_rn(__fmaf_rn(-xhat, dnorm_norm_mean, centered), s, dx[k]);
        if (tweo.a != 0.f) dx[k] = __fadd_rn(dx[k], cu::TweoGrad(x[k], tweo));
        tw[k] = __fmul_rn(xhat, dy);
        tb[k] = dy;
        if (kOut) {
          if (kQ == kQTensor) y[k] = lsqd::Value(aq.q, lsqd::Level(aq.q, xs), qs, qb);
          else if (kQ == kQToken) y[k] = lsqd::FakeQuant(aq.q, v, ts, 0.f);
          else y[k] = v;
        }
      }
      AccAdd<kVec>(acc_w, c, C, tw);
      AccAdd<kVec>(acc_b, c, C, tb);
      R::Store(dinp + off + c, dx);
      if (kOut) R::Store(out + off + c, y);
    }
  }
  __syncthreads();
  // The block's partial row: each column's warp accumulators in warp order.
  float* part = partial + static_cast<int64_t>(blockIdx.x) * 2 * C;
  for (int i = threadIdx.x; i < 2 * C; i += blockDim.x) {
    const int which = i < C ? 0 : 1;
    const int j = i - which * C;
    float sum = 0.f;
    const int ai = AccIndex<kVec>(j, C);
    for (int w = 0; w < warps; ++w) {
      sum = __fadd_rn(sum, smem[static_cast<int64_t>(w) * 2 * C + which * C + ai]);
    }
    part[i] = sum;
  }
  if (kQ == kQTensor) lsqd::WriteBlockPartials(sum_s, sum_b, step_partials);
}

// Column sums of the blocks' partial rows in block order, one thread per column.
template <typename G>
__global__ void __launch_bounds__(kThreads)
    layernorm_backward_quant_reduce_kernel(G* __restrict__ dweight, G* __restrict__ dbias,
                                           const float* __restrict__ partial, int blocks, int C,
                                           GradWrite write) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= 2 * C) return;
  float total = 0.f;
  for (int b = 0; b < blocks; ++b) total = __fadd_rn(total, partial[static_cast<int64_t>(b) * 2 * C + col]);
  cu::WriteGrad(col < C ? dweight + col : dbias + (col - C), total, write);
}

template <typename G>
absl::Status LayernormBackwardQuant(bf16* dinp, G* dweight, G* dbias, G* dstep, G* doffset,
                                    const bf16* dout, const bf16* inp, const bf16* weight,
                                    const bf16* bias, const float* mean, const float* rstd,
                                    int N, int C, const ActQuant& q, void* workspace,
                                    int64_t workspace_bytes, cudaStream_t stream,
                                    GradWrite dparams, bf16* out_recompute,
                                    const TweoGradTerm& tweo) {
  const char* op = "layernorm_backward_quant_cuda";
  RETURN_IF_ERROR(ValidateActQuant(op, q, N, C, out_recompute != nullptr));
  QT_CHECK_ARG(dinp != nullptr && dweight != nullptr && dbias != nullptr && dout != nullptr &&
                   inp != nullptr && weight != nullptr && bias != nullptr && mean != nullptr &&
                   rstd != nullptr,
               op, ": null pointer (dinp=", dinp != nullptr, " dweight=", dweight != nullptr,
               " dbias=", dbias != nullptr, " dout=", dout != nullptr, " inp=", inp != nullptr,
               " weight=", weight != nullptr, " bias=", bias != nullptr,
               " mean=", mean != nullptr, " rstd=", rstd != nullptr, ")");
  RETURN_IF_ERROR(ValidateActQuantGrads(op, q, dstep, doffset, nullptr, 0, 0));
  QT_CHECK_ARG(8 * static_cast<int64_t>(C) <= kBwdSmemBudget, op, ": C = ", C,
               " exceeds the ", kBwdSmemBudget / 8, " columns one warp's shared accumulators hold");
  const int64_t need = layernorm_backward_quant_cuda_workspace_bytes(N, C, q);
  QT_CHECK_ARG(workspace != nullptr && workspace_bytes >= need && cu::IsAligned(workspace, 8), op,
               ": workspace of ", workspace_bytes, " bytes (",
               workspace != nullptr ? "non-null" : "null", "), needs ", need,
               " bytes 8-byte aligned for N=", N, " C=", C);
  const BwdPlan plan = PlanBackward(N, C);
  double* step_partials = static_cast<double*>(workspace);
  float* partial = reinterpret_cast<float*>(static_cast<char*>(workspace) + StepPartialsBytes(plan));
  const bool vec = C % 8 == 0 && cu::IsAligned(dinp, 16) && cu::IsAligned(dout, 16) &&
                   cu::IsAligned(inp, 16) && cu::IsAligned(weight, 16) &&
                   cu::IsAligned(bias, 16) &&
                   (out_recompute == nullptr || cu::IsAligned(out_recompute, 16));
  const AQ aq = lsqd::MakeActQ(q);
  const int mode = ModeOf(q);
  const bool rec = out_recompute != nullptr;
  nv_bf16* o = rec ? cu::Nv(out_recompute) : nullptr;
  auto launch = [&](auto kernel) -> absl::Status {
    // The kernel's static shared memory counts against the same 48 KiB default as the dynamic
    // part (at C = 768 the dynamic part alone is exactly 48 KiB): raise the limit whenever the
    // sum could pass it.
    if (plan.smem_bytes + 1024 > 48 * 1024) {
      CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, plan.smem_bytes));
    }
    kernel<<<plan.blocks, plan.warps * 32, plan.smem_bytes, stream>>>(
        step_partials, partial, cu::Nv(dinp), o, cu::Nv(dout), cu::Nv(inp), cu::Nv(weight),
        cu::Nv(bias), mean, rstd, N, C, aq, tweo);
    CUDA_RETURN_IF_ERROR(cudaGetLastError());
    return absl::OkStatus();
  };
  // One instantiation per (access width, quantizer, recompute).
  const int which = (vec ? 6 : 0) + mode * 2 + (rec ? 1 : 0);
  const auto dispatch = [&]() -> absl::Status {
  switch (which) {
    case 0: return launch(layernorm_backward_quant_kernel<false, kQNone, false>);
    case 1: return launch(layernorm_backward_quant_kernel<false, kQNone, true>);
    case 2: return launch(layernorm_backward_quant_kernel<false, kQTensor, false>);
    case 3: return launch(layernorm_backward_quant_kernel<false, kQTensor, true>);
    case 4: return launch(layernorm_backward_quant_kernel<false, kQToken, false>);
    case 5: return launch(layernorm_backward_quant_kernel<false, kQToken, true>);
    case 6: return launch(layernorm_backward_quant_kernel<true, kQNone, false>);
    case 7: return launch(layernorm_backward_quant_kernel<true, kQNone, true>);
    case 8: return launch(layernorm_backward_quant_kernel<true, kQTensor, false>);
    case 9: return launch(layernorm_backward_quant_kernel<true, kQTensor, true>);
    case 10: return launch(layernorm_backward_quant_kernel<true, kQToken, false>);
    default: return launch(layernorm_backward_quant_kernel<true, kQToken, true>);
  }
  };
  RETURN_IF_ERROR(dispatch());
  layernorm_backward_quant_reduce_kernel<<<(2 * C + kThreads - 1) / kThreads, kThreads, 0,
                                           stream>>>(dweight, dbias, partial, plan.blocks, C,
                                                     dparams);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (mode == kQTensor && (dstep != nullptr || doffset != nullptr)) {
    lsqd::reduce_step_grads_kernel<<<1, lsqd::kReduceThreads, 0, stream>>>(
        dstep, doffset, step_partials, plan.blocks, lsqd::ActGradScale(q, C, aq.q.hi), dparams);
    CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return absl::OkStatus();
}

absl::Status CheckForward(const char* op, const void* out, const float* mean, const float* rstd,
                          const void* inp, const void* weight, const void* bias, int N, int C,
                          const ActQuant& q) {
  RETURN_IF_ERROR(ValidateActQuant(op, q, N, C, false));
  QT_CHECK_ARG(out != nullptr && mean != nullptr && rstd != nullptr && inp != nullptr &&
                   weight != nullptr && bias != nullptr,
               op, ": null pointer (out=", out != nullptr, " mean=", mean != nullptr,
               " rstd=", rstd != nullptr, " inp=", inp != nullptr, " weight=", weight != nullptr,
               " bias=", bias != nullptr, ")");
  return absl::OkStatus();
}

}  // namespace

absl::Status layernorm_forward_quant_cuda(bf16* out, float* mean, float* rstd, const bf16* inp,
                                          const bf16* weight, const bf16* bias, int N, int C,
                                          const ActQuant& q, cudaStream_t stream) {
  RETURN_IF_ERROR(CheckForward("layernorm_forward_quant_cuda", out, mean, rstd, inp, weight, bias,
                               N, C, q));
  return LaunchForward<false>(nullptr, cu::Nv(out), mean, rstd, cu::Nv(inp), nullptr,
                              cu::Nv(weight), cu::Nv(bias), N, C, q, stream);
}

absl::Status residual_layernorm_forward_quant_cuda(bf16* residual, bf16* out, float* mean,
                                                   float* rstd, const bf16* a, const bf16* b,
                                                   const bf16* weight, const bf16* bias, int N,
                                                   int C, const ActQuant& q,
                                                   cudaStream_t stream) {
  const char* op = "residual_layernorm_forward_quant_cuda";
  RETURN_IF_ERROR(CheckForward(op, out, mean, rstd, a, weight, bias, N, C, q));
  QT_CHECK_ARG(residual != nullptr && b != nullptr, op, ": null residual or b");
  return LaunchForward<true>(cu::Nv(residual), cu::Nv(out), mean, rstd, cu::Nv(a), cu::Nv(b),
                             cu::Nv(weight), cu::Nv(bias), N, C, q, stream);
}

int64_t layernorm_backward_quant_cuda_workspace_bytes(int N, int C, const ActQuant& q) {
  (void)q;
  if (N <= 0 || C <= 0) return 0;
  const BwdPlan p = PlanBackward(N, C);
  return StepPartialsBytes(p) + static_cast<int64_t>(p.blocks) * 2 * C * 4;
}

absl::Status layernorm_backward_quant_cuda(bf16* dinp, float* dweight, float* dbias,
                                           float* dstep, float* doffset, const bf16* dout,
                                           const bf16* inp, const bf16* weight,
                                           const bf16* bias, const float* mean,
                                           const float* rstd, int N, int C, const ActQuant& q,
                                           void* workspace, int64_t workspace_bytes,
                                           cudaStream_t stream, GradWrite dparams,
                                           bf16* out_recompute, const TweoGradTerm& tweo) {
  return LayernormBackwardQuant(dinp, dweight, dbias, dstep, doffset, dout, inp, weight, bias,
                                mean, rstd, N, C, q, workspace, workspace_bytes, stream, dparams,
                                out_recompute, tweo);
}

absl::Status layernorm_backward_quant_cuda(bf16* dinp, bf16* dweight, bf16* dbias, bf16* dstep,
                                           bf16* doffset, const bf16* dout, const bf16* inp,
                                           const bf16* weight, const bf16* bias,
                                           const float* mean, const float* rstd, int N, int C,
                                           const ActQuant& q, void* workspace,
                                           int64_t workspace_bytes, cudaStream_t stream,
                                           GradWrite dparams, bf16* out_recompute,
                                           const TweoGradTerm& tweo) {
  auto nv = [](bf16* p) { return p != nullptr ? cu::Nv(p) : nullptr; };
  return LayernormBackwardQuant(dinp, nv(dweight), nv(dbias), nv(dstep), nv(doffset), dout, inp,
                                weight, bias, mean, rstd, N, C, q, workspace, workspace_bytes,
                                stream, dparams, out_recompute, tweo);
}

}  // namespace qtrain::ops
