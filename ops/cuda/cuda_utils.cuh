// Device-side helpers shared by the .cu files: BF16 views of the host API's bf16 type, warp
// reductions, 16-byte vector access, alignment checks. Included by nvcc only.
#ifndef QTRAIN_OPS_CUDA_CUDA_UTILS_CUH_
#define QTRAIN_OPS_CUDA_CUDA_UTILS_CUH_

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "ops/cuda/bf16.h"
#include "ops/cuda/grad_write.h"

namespace qtrain::ops::cu {

using nv_bf16 = __nv_bfloat16;

// The host API's bf16 has the bits and layout of __nv_bfloat16 (static_assert in bf16.h).
inline nv_bf16* Nv(bf16* p) { return reinterpret_cast<nv_bf16*>(p); }
inline const nv_bf16* Nv(const bf16* p) { return reinterpret_cast<const nv_bf16*>(p); }

inline bool IsAligned(const void* p, int bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ double WarpSum(double v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Sum over the block in a fixed tree order (deterministic); every thread gets the result.
// `scratch` holds at least 32 values; blockDim.x must be a multiple of 32.
template <typename T>
__device__ __forceinline__ T BlockSum(T v, T* scratch) {
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int warps = blockDim.x / 32;
  v = WarpSum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : T(0);
  return WarpSum(v);
}

// GELU, tanh approximation (ops/gelu.h), and its derivative, in fp32.
__device__ __forceinline__ float Gelu(float x) {
  constexpr float kSqrt2OverPi = 0.79788456080286535588f, kCubic = 0.044715f;
  return 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + kCubic * x * x * x)));
}

__device__ __forceinline__ float GeluGrad(float x) {
  constexpr float kSqrt2OverPi = 0.79788456080286535588f, kCubic = 0.044715f;
  const float th = tanhf(kSqrt2OverPi * (x + kCubic * x * x * x));
  const float sech2 = 1.0f - th * th;  // finite where coshf would overflow
  return 0.5f * (1.0f + th) + 0.5f * x * sech2 * kSqrt2OverPi * (1.0f + 3.0f * kCubic * x * x);
}

// 8 bf16 in one 16-byte access.
struct alignas(16) Bf16x8 {
  nv_bf16 v[8];
};

__device__ __forceinline__ Bf16x8 Load8(const nv_bf16* p) {
  Bf16x8 r;
  *reinterpret_cast<uint4*>(&r) = *reinterpret_cast<const uint4*>(p);
  return r;
}

__device__ __forceinline__ void Store8(nv_bf16* p, const Bf16x8& r) {
  *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(&r);
}

// Parameter gradients are fp32 or BF16 (training.grad_dtype); GradWrite semantics for both:
// the new value is formed in fp32 and rounded once. Grad() is the device view of a host API
// gradient pointer.
inline float* Grad(float* p) { return p; }
inline nv_bf16* Grad(bf16* p) { return Nv(p); }
__device__ __forceinline__ float GradToFloat(float g) { return g; }
__device__ __forceinline__ float GradToFloat(nv_bf16 g) { return __bfloat162float(g); }
__device__ __forceinline__ void GradStore(float* p, float v) { *p = v; }
__device__ __forceinline__ void GradStore(nv_bf16* p, float v) { *p = __float2bfloat16_rn(v); }
// *p = v (kOverwrite) or *p = round(float(*p) + v) (kAccumulate).
template <typename G>
__device__ __forceinline__ void WriteGrad(G* p, float v, GradWrite write) {
  GradStore(p, write == GradWrite::kOverwrite ? v : __fadd_rn(GradToFloat(*p), v));
}

}  // namespace qtrain::ops::cu

#endif  // QTRAIN_OPS_CUDA_CUDA_UTILS_CUH_
