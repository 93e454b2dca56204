// CUDA's host FP8 conversion behind a plain C symbol, compiled by a genrule with g++ against
// the toolkit headers (Bazel refuses include paths outside the workspace in copts).
#include <cuda_fp8.h>

#include <cstdint>

extern "C" uint8_t qt_test_cuda_fp8_encode(float x, int e5m2, int nosat) {
  return __nv_cvt_float_to_fp8(x, nosat ? __NV_NOSAT : __NV_SATFINITE,
                               e5m2 ? __NV_E5M2 : __NV_E4M3);
}
