// CUDA AdamW: one fused pass that updates fp32 params and moments and writes the BF16 copy.
#include <algorithm>
#include <cmath>

#include <cuda_runtime.h>

#include "ops/cuda/adamw_cuda.h"
#include "ops/cuda/cuda_status.h"
#include "ops/cuda/cuda_utils.cuh"
#include "ops/status_macros.h"

namespace qtrain::ops {
namespace {

using cu::nv_bf16;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 8192;

struct AdamParams {
  float lr, beta1, beta2, eps, weight_decay, bc1, bc2;
};

// Same operation order as the CPU reference, so the two differ only where the compilers
// contract multiply-adds differently (a few ulp).
__device__ __forceinline__ void AdamStep(float& p, float& mi, float& vi, float g,
                                         const AdamParams& a) {
  mi = a.beta1 * mi + (1.0f - a.beta1) * g;
  vi = a.beta2 * vi + (1.0f - a.beta2) * g * g;
  const float mhat = mi / a.bc1;
  const float vhat = vi / a.bc2;
  p -= a.lr * (mhat / (sqrtf(vhat) + a.eps) + a.weight_decay * p);
}

// kVec4: float4 accesses over the first n/4*4 elements (aligned pointers), then the tail.
enum class Access { kScalar, kVec4 };

template <Access kAccess>
__global__ void adamw_kernel(float* __restrict__ params, nv_bf16* __restrict__ params_bf16,
                             const float* __restrict__ grads, float* __restrict__ m,
                             float* __restrict__ v, int64_t n, AdamParams a,
                             const float* __restrict__ grad_scale) {
  const float scale = grad_scale != nullptr ? *grad_scale : 1.0f;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (kAccess == Access::kVec4) {
    const int64_t nvec = n / 4;
    for (int64_t i = first; i < nvec; i += stride) {
      float4 p = reinterpret_cast<float4*>(params)[i];
      const float4 g = reinterpret_cast<const float4*>(grads)[i];
      float4 mm = reinterpret_cast<float4*>(m)[i];
      float4 vv = reinterpret_cast<float4*>(v)[i];
      AdamStep(p.x, mm.x, vv.x, grad_scale != nullptr ? g.x * scale : g.x, a);
      AdamStep(p.y, mm.y, vv.y, grad_scale != nullptr ? g.y * scale : g.y, a);
      AdamStep(p.z, mm.z, vv.z, grad_scale != nullptr ? g.z * scale : g.z, a);
      AdamStep(p.w, mm.w, vv.w, grad_scale != nullptr ? g.w * scale : g.w, a);
      reinterpret_cast<float4*>(params)[i] = p;
      reinterpret_cast<float4*>(m)[i] = mm;
      reinterpret_cast<float4*>(v)[i] = vv;
      if (params_bf16 != nullptr) {
        __nv_bfloat162 lo = __floats2bfloat162_rn(p.x, p.y);
        __nv_bfloat162 hi = __floats2bfloat162_rn(p.z, p.w);
        uint2 packed;
        packed.x = *reinterpret_cast<uint32_t*>(&lo);
        packed.y = *reinterpret_cast<uint32_t*>(&hi);
        reinterpret_cast<uint2*>(params_bf16)[i] = packed;
      }
    }
    done = nvec * 4;
  }
  for (int64_t i = done + first; i < n; i += stride) {
    float p = params[i], mi = m[i], vi = v[i];
    AdamStep(p, mi, vi, grad_scale != nullptr ? grads[i] * scale : grads[i], a);
    params[i] = p;
    m[i] = mi;
    v[i] = vi;
    if (params_bf16 != nullptr) params_bf16[i] = __float2bfloat16_rn(p);
  }
}

int Blocks(int64_t n) {
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)));
}

}  // namespace

absl::Status adamw_update_cuda(float* params, bf16* params_bf16, const float* grads, float* m,
                               float* v, int64_t n, float lr, float beta1, float beta2,
                               float eps, float weight_decay, int t, const float* grad_scale,
                               cudaStream_t stream) {
  QT_CHECK_ARG(n >= 0, "adamw_update_cuda: n must be >= 0, got ", n);
  QT_CHECK_ARG(t >= 1, "adamw_update_cuda: step t must be >= 1, got ", t);
  QT_CHECK_ARG(beta1 >= 0.f && beta1 < 1.f && beta2 >= 0.f && beta2 < 1.f,
               "adamw_update_cuda: betas must be in [0, 1), got beta1=", beta1,
               " beta2=", beta2);
  QT_CHECK_ARG(params != nullptr && grads != nullptr && m != nullptr && v != nullptr,
               "adamw_update_cuda: null pointer (params=", params != nullptr,
               " grads=", grads != nullptr, " m=", m != nullptr, " v=", v != nullptr, ")");
  if (n == 0) return absl::OkStatus();
  AdamParams a;
  a.lr = lr;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.eps = eps;
  a.weight_decay = weight_decay;
  a.bc1 = 1.0f - std::pow(beta1, static_cast<float>(t));
  a.bc2 = 1.0f - std::pow(beta2, static_cast<float>(t));
  const bool vec = cu::IsAligned(params, 16) && cu::IsAligned(grads, 16) &&
                   cu::IsAligned(m, 16) && cu::IsAligned(v, 16) &&
                   (params_bf16 == nullptr || cu::IsAligned(params_bf16, 8));
  nv_bf16* pb = params_bf16 != nullptr ? cu::Nv(params_bf16) : nullptr;
  if (vec) {
    adamw_kernel<Access::kVec4><<<Blocks((n + 3) / 4), kThreads, 0, stream>>>(
        params, pb, grads, m, v, n, a, grad_scale);
  } else {
    adamw_kernel<Access::kScalar><<<Blocks(n), kThreads, 0, stream>>>(params, pb, grads, m, v,
                                                                      n, a, grad_scale);
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace qtrain::ops
