// The TWEO outlier loss's gradient at one input value (TweoGradTerm, layernorm_cuda.h), shared by
// the layernorm backwards that add it to dinp (plain and quantizing). Included by nvcc only.
#ifndef QTRAIN_OPS_CUDA_TWEO_GRAD_CUH_
#define QTRAIN_OPS_CUDA_TWEO_GRAD_CUH_

#include "ops/cuda/layernorm_cuda.h"

namespace qtrain::ops::cu {

// a * (|x| inv)^(p-1) sign(x), in fp32 (x^3 exactly for p = 4).
__device__ __forceinline__ float TweoGrad(float x, const TweoGradTerm& t) {
  const float u = __fmul_rn(fabsf(x), t.inv);
  const float g = t.p == 4.f ? __fmul_rn(__fmul_rn(u, u), u) : powf(u, t.p - 1.f);
  return x > 0.f ? __fmul_rn(t.a, g) : (x < 0.f ? -__fmul_rn(t.a, g) : 0.f);
}

}  // namespace qtrain::ops::cu

#endif  // QTRAIN_OPS_CUDA_TWEO_GRAD_CUH_
