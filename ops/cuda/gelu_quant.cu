// Quantizing GELU (gelu_quant_cuda.h): v = bf16(gelu(pre)) as the plain BF16 GELU kernels
// compute it (cu::Gelu), then the LSQ/LSQ+ or per-token quantizer; the backward recomputes v,
// masks the gradient, sums the per-tensor step/offset terms in fixed 8-element units (the
// partition of act_quant_backward_cuda: bits independent of alignment and GPU) and applies
// GELU' in one pass.
#include <algorithm>

#include <cuda_runtime.h>

#include "ops/cuda/cuda_status.h"
#include "ops/cuda/cuda_utils.cuh"
#include "ops/cuda/gelu_quant_cuda.h"
#include "ops/cuda/lsq_common.cuh"
#include "ops/status_macros.h"

namespace qtrain::ops {
namespace {

using cu::nv_bf16;
using lsqd::Quant;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
using lsqd::kUnit;
constexpr int64_t kMaxBlocks = 8192;

__host__ __device__ __forceinline__ int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }

int GridFor(int64_t work_items) {
  return static_cast<int>(
      std::clamp<int64_t>((work_items + kThreads - 1) / kThreads, 1, kMaxBlocks));
}

__device__ __forceinline__ float GeluBf16(float pre) {
  return __bfloat162float(__float2bfloat16_rn(cu::Gelu(pre)));
}

using AQ = lsqd::ActQ;

// Per tensor (or none): 8-element units of the flat tensor, grid-stride.
template <bool kVec>
__global__ void __launch_bounds__(kThreads)
    gelu_quant_tensor_kernel(nv_bf16* __restrict__ out, const nv_bf16* __restrict__ pre,
                             int64_t n, AQ a) {
  float s = 1.f, b = 0.f;
  if (a.mode == 1) {
    const float raw = *a.step;
    s = lsqd::ClampStep(raw);
    if (blockIdx.x == 0 && threadIdx.x == 0 && !(raw >= kLsqMinStep)) *a.step = s;
    if (a.q.asym) b = *a.offset;
  }
  const int64_t units = (n + kUnit - 1) / kUnit;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; u < units;
       u += stride) {
    const int64_t i0 = u * kUnit;
    const int len = static_cast<int>(Min64(kUnit, n - i0));
    float x[kUnit], r[kUnit];
    lsqd::LoadUnit<kVec>(x, pre + i0, len);
#pragma unroll
    for (int j = 0; j < kUnit; ++j) {
      x[j] = GeluBf16(x[j]);
      if (a.mode == 1) {
        r[j] = lsqd::Level(a.q, lsqd::Scaled(a.q, x[j], s, b));
        x[j] = lsqd::Value(a.q, r[j], s, b);
      }
    }
    lsqd::StoreUnit<kVec>(out + i0, x, len);
    if (a.mode == 1 && a.codes != nullptr) lsqd::StoreCodesUnit<kVec>(a.codes + i0, r, len);
  }
}

// Per token: one warp per row, an absmax pass computing the GELU, then the write.
template <bool kVec>
__global__ void __launch_bounds__(kThreads)
    gelu_quant_token_kernel(nv_bf16* __restrict__ out, const nv_bf16* __restrict__ pre,
                            int64_t N, int64_t C, AQ a) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= N) return;
  const nv_bf16* p = pre + row * C;
  lsqd::AbsMax am;
  for (int64_t c = static_cast<int64_t>(lane) * kUnit; c < C; c += 32 * kUnit) {
    const int len = static_cast<int>(Min64(kUnit, C - c));
    float x[kUnit];
    lsqd::LoadUnit<kVec>(x, p + c, len);
#pragma unroll
    for (int j = 0; j < kUnit; ++j)
      if (j < len) am.Add(GeluBf16(x[j]));
  }
  am.WarpReduce();
  const float s = lsqd::TokenScale(am.m, am.nan, a.q.hi);
  if (lane == 0 && a.token_scales != nullptr) a.token_scales[row] = s;
  for (int64_t c = static_cast<int64_t>(lane) * kUnit; c < C; c += 32 * kUnit) {
    const int len = static_cast<int>(Min64(kUnit, C - c));
    float x[kUnit], r[kUnit];
    lsqd::LoadUnit<kVec>(x, p + c, len);
#pragma unroll
    for (int j = 0; j < kUnit; ++j) {
      r[j] = lsqd::Level(a.q, lsqd::Scaled(a.q, GeluBf16(x[j]), s, 0.f));
      x[j] = lsqd::Value(a.q, r[j], s, 0.f);
    }
    lsqd::StoreUnit<kVec>(out + row * C + c, x, len);
    if (a.codes != nullptr) lsqd::StoreCodesUnit<kVec>(a.codes + row * C + c, r, len);
  }
}

// dpre and dout may be the same buffer (each unit is read, then written, by one thread).
template <bool kVec>
__global__ void __launch_bounds__(kThreads)
    gelu_quant_backward_kernel(nv_bf16* dpre, const nv_bf16* dout,
                               const nv_bf16* __restrict__ pre, nv_bf16* __restrict__ rec,
                               int64_t n, int64_t C, AQ a, double* __restrict__ partials) {
  const float s = a.mode == 1 ? lsqd::ClampStep(*a.step) : 1.f;
  const float b = a.mode == 1 && a.q.asym ? *a.offset : 0.f;
  const int64_t units = (n + kUnit - 1) / kUnit;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  double sum_s = 0.0, sum_b = 0.0;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; u < units;
       u += stride) {
    const int64_t i0 = u * kUnit;
    const int len = static_cast<int>(Min64(kUnit, n - i0));
    float h[kUnit], g[kUnit], y[kUnit];
    lsqd::LoadUnit<kVec>(h, pre + i0, len);
    lsqd::LoadUnit<kVec>(g, dout + i0, len);
#pragma unroll
    for (int j = 0; j < kUnit; ++j) {
      const float v = GeluBf16(h[j]);
      float dv = g[j];
      if (a.mode == 1) {
        const float xs = lsqd::Scaled(a.q, v, s, b);
        if (j < len && !lsqd::BackwardTerms(a.q, xs, g[j], sum_s, sum_b)) dv = 0.f;
        y[j] = lsqd::Value(a.q, lsqd::Level(a.q, xs), s, b);
      } else if (a.mode == 2) {
        if (rec != nullptr) {
          const float ts = a.token_scales[(i0 + (j < len ? j : 0)) / C];
          y[j] = lsqd::FakeQuant(a.q, v, ts, 0.f);
        }
      } else {
        y[j] = v;
      }
      g[j] = __fmul_rn(dv, cu::GeluGrad(h[j]));
    }
    lsqd::StoreUnit<kVec>(dpre + i0, g, len);
    if (rec != nullptr) lsqd::StoreUnit<kVec>(rec + i0, y, len);
  }
  if (partials != nullptr) lsqd::WriteBlockPartials(sum_s, sum_b, partials);
}

template <typename G>
absl::Status GeluBackwardQuant(bf16* dpre, G* dstep, G* doffset, const bf16* dout,
                               const bf16* pre, int64_t N, int64_t C, const ActQuant& q,
                               void* workspace, int64_t workspace_bytes, cudaStream_t stream,
                               GradWrite dparams, bf16* out_recompute) {
  const char* op = "gelu_backward_quant_cuda";
  RETURN_IF_ERROR(ValidateActQuant(op, q, N, C, out_recompute != nullptr));
  QT_CHECK_ARG(dpre != nullptr && dout != nullptr && pre != nullptr, op,
               ": null dpre, dout or pre");
  QT_CHECK_ARG(out_recompute == nullptr || (out_recompute != dpre && out_recompute != dout), op,
               ": out_recompute must not alias dpre or dout");
  RETURN_IF_ERROR(ValidateActQuantGrads(op, q, dstep, doffset, workspace, workspace_bytes,
                                        act_quant_backward_cuda_workspace_bytes(N, C, q)));
  const AQ a = lsqd::MakeActQ(q);
  const int64_t n = N * C;
  const bool per_tensor = q.mode == ActQuantMode::kPerTensor;
  double* partials = per_tensor ? static_cast<double*>(workspace) : nullptr;
  const int blocks = per_tensor ? lsqd::ActGradBlocks(n) : GridFor((n + kUnit - 1) / kUnit);
  const bool vec = cu::IsAligned(dpre, 16) && cu::IsAligned(dout, 16) &&
                   cu::IsAligned(pre, 16) &&
                   (out_recompute == nullptr || cu::IsAligned(out_recompute, 16)) &&
                   (q.mode != ActQuantMode::kPerToken || C % kUnit == 0);
  nv_bf16* rec = out_recompute != nullptr ? cu::Nv(out_recompute) : nullptr;
  if (vec) {
    gelu_quant_backward_kernel<true><<<blocks, kThreads, 0, stream>>>(
        cu::Nv(dpre), cu::Nv(dout), cu::Nv(pre), rec, n, C, a, partials);
  } else {
    gelu_quant_backward_kernel<false><<<blocks, kThreads, 0, stream>>>(
        cu::Nv(dpre), cu::Nv(dout), cu::Nv(pre), rec, n, C, a, partials);
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

absl::Status gelu_forward_quant_cuda(bf16* out, const bf16* pre, int64_t N, int64_t C,
                                     const ActQuant& q, cudaStream_t stream) {
  const char* op = "gelu_forward_quant_cuda";
  RETURN_IF_ERROR(ValidateActQuant(op, q, N, C, false));
  QT_CHECK_ARG(out != nullptr && pre != nullptr, op, ": null out or pre");
  const AQ a = lsqd::MakeActQ(q);
  if (q.mode == ActQuantMode::kPerToken) {
    const bool vec = C % kUnit == 0 && cu::IsAligned(out, 16) && cu::IsAligned(pre, 16) &&
                     (q.codes == nullptr || cu::IsAligned(q.codes, 16));
    const int blocks = static_cast<int>((N + kWarps - 1) / kWarps);
    if (vec) {
      gelu_quant_token_kernel<true><<<blocks, kThreads, 0, stream>>>(cu::Nv(out), cu::Nv(pre),
                                                                     N, C, a);
    } else {
      gelu_quant_token_kernel<false><<<blocks, kThreads, 0, stream>>>(cu::Nv(out), cu::Nv(pre),
                                                                      N, C, a);
    }
  } else {
    const int64_t n = N * C;
    const bool vec = cu::IsAligned(out, 16) && cu::IsAligned(pre, 16) &&
                     (q.codes == nullptr || cu::IsAligned(q.codes, 16));
    const int blocks = GridFor((n + kUnit - 1) / kUnit);
    if (vec) {
      gelu_quant_tensor_kernel<true><<<blocks, kThreads, 0, stream>>>(cu::Nv(out), cu::Nv(pre),
                                                                      n, a);
    } else {
      gelu_quant_tensor_kernel<false><<<blocks, kThreads, 0, stream>>>(cu::Nv(out), cu::Nv(pre),
                                                                       n, a);
    }
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status gelu_backward_quant_cuda(bf16* dpre, float* dstep, float* doffset,
                                      const bf16* dout, const bf16* pre, int64_t N, int64_t C,
                                      const ActQuant& q, void* workspace,
                                      int64_t workspace_bytes, cudaStream_t stream,
                                      GradWrite dparams, bf16* out_recompute) {
  return GeluBackwardQuant(dpre, dstep, doffset, dout, pre, N, C, q, workspace, workspace_bytes,
                           stream, dparams, out_recompute);
}

absl::Status gelu_backward_quant_cuda(bf16* dpre, bf16* dstep, bf16* doffset, const bf16* dout,
                                      const bf16* pre, int64_t N, int64_t C, const ActQuant& q,
                                      void* workspace, int64_t workspace_bytes,
                                      cudaStream_t stream, GradWrite dparams,
                                      bf16* out_recompute) {
  return GeluBackwardQuant(dpre, dstep != nullptr ? cu::Nv(dstep) : nullptr,
                           doffset != nullptr ? cu::Nv(doffset) : nullptr, dout, pre, N, C, q,
                           workspace, workspace_bytes, stream, dparams, out_recompute);
}

}  // namespace qtrain::ops
