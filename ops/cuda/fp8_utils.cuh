// Device-side FP8 helpers shared by the FP8 kernels (casts, layernorm, AdamW, GEMM epilogues):
// the scaled satfinite encode of ops/quant/fp8.h in CUDA's conversion instructions, packed
// stores, and the order-independent amax (atomicMax on a float's bits). Included by nvcc only.
#ifndef QTRAIN_OPS_CUDA_FP8_UTILS_CUH_
#define QTRAIN_OPS_CUDA_FP8_UTILS_CUH_

#include <cstdint>

#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "ops/quant/fp8.h"

namespace qtrain::ops::cu {

__host__ __device__ constexpr __nv_fp8_interpretation_t Interp(Fp8Format f) {
  return f == Fp8Format::kE4M3 ? __NV_E4M3 : __NV_E5M2;
}

// code = encode(x * scale): the product rounded once (never contracted: there is nothing to
// fuse it with, and __fmul_rn says so), then round-to-nearest-even with satfinite, exactly
// fp8_encode(double(x * scale)) (checked for all 2^32 floats on an H100, docs/quantization.md).
template <Fp8Format kFormat>
__device__ __forceinline__ uint8_t Encode(float x, float scale) {
  return static_cast<uint8_t>(
      __nv_cvt_float_to_fp8(__fmul_rn(x, scale), __NV_SATFINITE, Interp(kFormat)));
}

// Two codes in one cvt (lo = the first element, in the low byte, as memory order wants).
template <Fp8Format kFormat>
__device__ __forceinline__ uint16_t Encode2(float lo, float hi, float scale) {
  return static_cast<uint16_t>(__nv_cvt_float2_to_fp8x2(
      make_float2(__fmul_rn(lo, scale), __fmul_rn(hi, scale)), __NV_SATFINITE,
      Interp(kFormat)));
}

// Four codes, first element in the lowest byte.
template <Fp8Format kFormat>
__device__ __forceinline__ uint32_t Encode4(const float* x, float scale) {
  return static_cast<uint32_t>(Encode2<kFormat>(x[0], x[1], scale)) |
         (static_cast<uint32_t>(Encode2<kFormat>(x[2], x[3], scale)) << 16);
}

// |x| as ordered bits: for non-negative floats (and +NaN above +inf) the unsigned order of the
// bits is the numeric order, so max over these bits is the amax, NaN winning as the CPU's
// amax() says (fmaxf would drop NaN).
__device__ __forceinline__ uint32_t AbsBits(float x) { return __float_as_uint(x) & 0x7fffffffu; }

__device__ __forceinline__ uint32_t WarpMaxBits(uint32_t v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// *amax = max(*amax, value with bits `bits`), atomically. *amax must hold a non-negative float
// (or +NaN): zero or a previous amax.
__device__ __forceinline__ void AtomicMaxBits(float* amax, uint32_t bits) {
  if (bits != 0) atomicMax(reinterpret_cast<unsigned int*>(amax), bits);
}

__device__ __forceinline__ int LaneId() {
  int lane;
  asm("mov.u32 %0, %%laneid;" : "=r"(lane));
  return lane;
}

// Warp-reduces `bits` and lets lane 0 of each warp update *amax (all 32 lanes must call).
__device__ __forceinline__ void WarpAtomicMax(float* amax, uint32_t bits) {
  bits = WarpMaxBits(bits);
  if (LaneId() == 0 && amax != nullptr) AtomicMaxBits(amax, bits);
}

}  // namespace qtrain::ops::cu

#endif  // QTRAIN_OPS_CUDA_FP8_UTILS_CUH_
