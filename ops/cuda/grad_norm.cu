// CUDA global gradient norm (deterministic fp64 two-pass reduction over fp32 or BF16 gradients)
// and clipping.
#include <algorithm>

#include <cuda_runtime.h>

#include "ops/cuda/cuda_status.h"
#include "ops/cuda/cuda_utils.cuh"
#include "ops/cuda/grad_norm_cuda.h"
#include "ops/status_macros.h"

namespace qtrain::ops {
namespace {

constexpr int kThreads = 256;
// Fixed on purpose: the partition of the sum, hence its rounding, must not depend on the GPU.
constexpr int kPartials = 1024;
constexpr int64_t kMaxClipBlocks = 8192;

enum class Access { kScalar, kVec4 };

// Gradients widened to fp32 (exact for BF16: its bits are the high half of a float), one at a
// time or four at a 16-byte (fp32) / 8-byte (BF16) boundary.
__device__ __forceinline__ float Widen(float g) { return g; }
__device__ __forceinline__ float Widen(cu::nv_bf16 g) { return __bfloat162float(g); }
__device__ __forceinline__ float4 Load4(const float* g) {
  return __ldcs(reinterpret_cast<const float4*>(g));
}
__device__ __forceinline__ float4 Load4(const cu::nv_bf16* g) {
  const uint2 u = __ldcs(reinterpret_cast<const uint2*>(g));
  // Little-endian: element 2k is the low half of word k.
  return make_float4(__uint_as_float(u.x << 16), __uint_as_float(u.x & 0xffff0000u),
                     __uint_as_float(u.y << 16), __uint_as_float(u.y & 0xffff0000u));
}

// Thread `first` of the fixed grid sums units first, first + stride, ... in that order (units
// of 4 elements with kVec4, of 1 otherwise); fp32 and BF16 gradients share the partition, so
// BF16 gradients give the bits that their widened fp32 values give on the same branch. Two
// units are loaded before they are added, for bytes in flight; the order stays the same.
template <typename G, Access kAccess>
__global__ void sum_squares_partial_kernel(double* __restrict__ partial,
                                           const G* __restrict__ grads, int64_t n) {
  __shared__ double scratch[32];
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  double acc = 0.0;
  int64_t done = 0;
  if (kAccess == Access::kVec4) {
    const int64_t nvec = n / 4;
    for (int64_t i = first; i < nvec; i += 2 * stride) {
      const float4 g0 = Load4(grads + 4 * i);
      const bool two = i + stride < nvec;
      const float4 g1 = two ? Load4(grads + 4 * (i + stride)) : make_float4(0, 0, 0, 0);
      const double x0 = g0.x, y0 = g0.y, z0 = g0.z, w0 = g0.w;
      acc += x0 * x0;
      acc += y0 * y0;
      acc += z0 * z0;
      acc += w0 * w0;
      if (two) {
        const double x1 = g1.x, y1 = g1.y, z1 = g1.z, w1 = g1.w;
        acc += x1 * x1;
        acc += y1 * y1;
        acc += z1 * z1;
        acc += w1 * w1;
      }
    }
    done = nvec * 4;
  }
  for (int64_t i = done + first; i < n; i += stride) {
    const double g = Widen(grads[i]);
    acc += g * g;
  }
  acc = cu::BlockSum(acc, scratch);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

__global__ void sum_squares_final_kernel(double* __restrict__ out,
                                         const double* __restrict__ partial) {
  __shared__ double scratch[32];
  double acc = 0.0;
  for (int i = threadIdx.x; i < kPartials; i += blockDim.x) acc += partial[i];
  acc = cu::BlockSum(acc, scratch);
  if (threadIdx.x == 0) *out = acc;
}

__device__ __forceinline__ float ClipFactor(const double* sum_squares, double max_norm) {
  const double norm = sqrt(*sum_squares);
  return static_cast<float>(fmin(1.0, max_norm / (norm + 1e-6)));
}

__global__ void clip_factor_kernel(float* __restrict__ factor,
                                   const double* __restrict__ sum_squares, double max_norm) {
  *factor = ClipFactor(sum_squares, max_norm);
}

__global__ void clip_kernel(float* __restrict__ grads, int64_t n,
                            const double* __restrict__ sum_squares, double max_norm,
                            float* __restrict__ factor_out) {
  const float factor = ClipFactor(sum_squares, max_norm);
  if (factor_out != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *factor_out = factor;
  if (factor == 1.0f) return;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    grads[i] *= factor;
  }
}

}  // namespace

int64_t sum_squares_cuda_workspace_bytes() { return kPartials * sizeof(double); }

namespace {

template <typename G>
absl::Status SumSquares(double* out, const G* grads, int64_t n, void* workspace,
                        int64_t workspace_bytes, cudaStream_t stream) {
  QT_CHECK_ARG(n >= 0, "sum_squares_cuda: n must be >= 0, got ", n);
  QT_CHECK_ARG(out != nullptr, "sum_squares_cuda: out is null");
  QT_CHECK_ARG(n == 0 || grads != nullptr, "sum_squares_cuda: grads is null (n=", n, ")");
  QT_CHECK_ARG(workspace != nullptr && workspace_bytes >= sum_squares_cuda_workspace_bytes(),
               "sum_squares_cuda: workspace of ", workspace_bytes, " bytes (",
               workspace != nullptr ? "non-null" : "null", "), needs ",
               sum_squares_cuda_workspace_bytes());
  QT_CHECK_ARG(cu::IsAligned(workspace, 8), "sum_squares_cuda: workspace misaligned");
  double* partial = static_cast<double*>(workspace);
  if (n > 0 && cu::IsAligned(grads, 4 * sizeof(G))) {
    sum_squares_partial_kernel<G, Access::kVec4><<<kPartials, kThreads, 0, stream>>>(
        partial, grads, n);
  } else {
    sum_squares_partial_kernel<G, Access::kScalar><<<kPartials, kThreads, 0, stream>>>(
        partial, grads, n);
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  sum_squares_final_kernel<<<1, kThreads, 0, stream>>>(out, partial);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace

absl::Status sum_squares_cuda(double* out, const float* grads, int64_t n, void* workspace,
                              int64_t workspace_bytes, cudaStream_t stream) {
  return SumSquares(out, grads, n, workspace, workspace_bytes, stream);
}

absl::Status sum_squares_cuda(double* out, const bf16* grads, int64_t n, void* workspace,
                              int64_t workspace_bytes, cudaStream_t stream) {
  return SumSquares(out, grads != nullptr ? cu::Nv(grads) : nullptr, n, workspace,
                    workspace_bytes, stream);
}

absl::Status clip_factor_cuda(float* factor, const double* sum_squares, double max_norm,
                              cudaStream_t stream) {
  QT_CHECK_ARG(factor != nullptr && sum_squares != nullptr,
               "clip_factor_cuda: null pointer (factor=", factor != nullptr,
               " sum_squares=", sum_squares != nullptr, ")");
  QT_CHECK_ARG(max_norm > 0, "clip_factor_cuda: max_norm must be > 0, got ", max_norm);
  clip_factor_kernel<<<1, 1, 0, stream>>>(factor, sum_squares, max_norm);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status clip_by_global_norm_cuda(float* grads, int64_t n, const double* sum_squares,
                                      double max_norm, float* factor, cudaStream_t stream) {
  QT_CHECK_ARG(n >= 0, "clip_by_global_norm_cuda: n must be >= 0, got ", n);
  QT_CHECK_ARG((n == 0 || grads != nullptr) && sum_squares != nullptr,
               "clip_by_global_norm_cuda: null pointer (grads=", grads != nullptr,
               " sum_squares=", sum_squares != nullptr, ")");
  QT_CHECK_ARG(max_norm > 0, "clip_by_global_norm_cuda: max_norm must be > 0, got ", max_norm);
  const int blocks = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxClipBlocks)));
  clip_kernel<<<blocks, kThreads, 0, stream>>>(grads, n, sum_squares, max_norm, factor);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace qtrain::ops
