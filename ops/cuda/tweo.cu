// CUDA TWEO statistics over a block output (see tweo_cuda.h): a fixed grid of partial sums in
// fp64, then one block adds them in a fixed order.
#include <cmath>

#include <cuda_runtime.h>

#include "ops/cuda/cuda_status.h"
#include "ops/cuda/cuda_utils.cuh"
#include "ops/cuda/tweo_cuda.h"
#include "ops/status_macros.h"

namespace qtrain::ops {
namespace {

constexpr int kThreads = 256;
// Fixed so that the partition of every sum, hence its rounding, does not depend on the GPU.
constexpr int kPartials = 528;
constexpr int kStats = kNumBlockOutputStats;

struct Acc {
  double v[kStats];
};

__device__ __forceinline__ void AddElement(Acc& acc, float x, double inv_t, double p, int pmode) {
  const double a = x;
  const double u = fabs(a) * inv_t;
  double t;
  if (pmode == 4) {
    const double u2 = u * u;
    t = u2 * u2;
  } else if (pmode == 2) {
    t = u * u;
  } else {
    t = pow(u, p);
  }
  acc.v[kStatTweoSum] += t;
  acc.v[kStatPeak] = fmax(acc.v[kStatPeak], fabs(a));
  const double a2 = a * a;
  acc.v[kStatSum1] += a;
  acc.v[kStatSum2] += a2;
  acc.v[kStatSum3] += a2 * a;
  acc.v[kStatSum4] += a2 * a2;
}

__device__ __forceinline__ double BlockMax(double v, double* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, off));
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.0;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}

// Thread `first` of the fixed grid takes units first, first + stride, ... (8 elements per unit
// with 16-byte access, else 1).
template <bool kVec8>
__global__ void __launch_bounds__(kThreads)
    stats_partial_kernel(double* __restrict__ partial, const cu::nv_bf16* __restrict__ a,
                         int64_t n, double inv_t, double p, int pmode) {
  __shared__ double scratch[32];
  Acc acc;
#pragma unroll
  for (int k = 0; k < kStats; ++k) acc.v[k] = 0.0;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (kVec8) {
    const int64_t nvec = n / 8;
    for (int64_t i = first; i < nvec; i += stride) {
      const cu::Bf16x8 v = cu::Load8(a + 8 * i);
#pragma unroll
      for (int k = 0; k < 8; ++k) AddElement(acc, __bfloat162float(v.v[k]), inv_t, p, pmode);
    }
    done = nvec * 8;
  }
  for (int64_t i = done + first; i < n; i += stride) {
    AddElement(acc, __bfloat162float(a[i]), inv_t, p, pmode);
  }
  double* out = partial + static_cast<int64_t>(blockIdx.x) * kStats;
#pragma unroll
  for (int k = 0; k < kStats; ++k) {
    const double r = k == kStatPeak ? BlockMax(acc.v[k], scratch) : cu::BlockSum(acc.v[k], scratch);
    if (threadIdx.x == 0) out[k] = r;
  }
}

__global__ void __launch_bounds__(kThreads)
    stats_final_kernel(double* __restrict__ out, const double* __restrict__ partial) {
  __shared__ double scratch[32];
#pragma unroll
  for (int k = 0; k < kStats; ++k) {
    double acc = 0.0;
    for (int i = threadIdx.x; i < kPartials; i += blockDim.x) {
      const double v = partial[i * kStats + k];
      acc = k == kStatPeak ? fmax(acc, v) : acc + v;
    }
    const double r = k == kStatPeak ? BlockMax(acc, scratch) : cu::BlockSum(acc, scratch);
    if (threadIdx.x == 0) out[k] = r;
  }
}

}  // namespace

int64_t block_output_stats_cuda_workspace_bytes() {
  return static_cast<int64_t>(kPartials) * kStats * sizeof(double);
}

absl::Status block_output_stats_cuda(double* out, const bf16* a, int64_t n, double tau,
                                     double p, double eps, void* workspace,
                                     int64_t workspace_bytes, cudaStream_t stream) {
  QT_CHECK_ARG(out != nullptr, "block_output_stats_cuda: out is null");
  QT_CHECK_ARG(n >= 0, "block_output_stats_cuda: n must be >= 0, got ", n);
  QT_CHECK_ARG(n == 0 || a != nullptr, "block_output_stats_cuda: a is null (n=", n, ")");
  QT_CHECK_ARG(p >= 1 && std::isfinite(p), "block_output_stats_cuda: p must be >= 1, got ", p);
  QT_CHECK_ARG(tau + eps > 0 && std::isfinite(tau + eps),
               "block_output_stats_cuda: tau + eps must be > 0, got ", tau + eps);
  QT_CHECK_ARG(workspace != nullptr && workspace_bytes >= block_output_stats_cuda_workspace_bytes(),
               "block_output_stats_cuda: workspace of ", workspace_bytes, " bytes, needs ",
               block_output_stats_cuda_workspace_bytes());
  QT_CHECK_ARG(cu::IsAligned(workspace, 8), "block_output_stats_cuda: workspace misaligned");
  double* partial = static_cast<double*>(workspace);
  const double inv_t = 1.0 / (tau + eps);
  const int pmode = p == 4.0 ? 4 : (p == 2.0 ? 2 : 0);
  const cu::nv_bf16* in = a != nullptr ? cu::Nv(a) : nullptr;
  if (n > 0 && cu::IsAligned(a, 16)) {
    stats_partial_kernel<true><<<kPartials, kThreads, 0, stream>>>(partial, in, n, inv_t, p, pmode);
  } else {
    stats_partial_kernel<false><<<kPartials, kThreads, 0, stream>>>(partial, in, n, inv_t, p, pmode);
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  stats_final_kernel<<<1, kThreads, 0, stream>>>(out, partial);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

BlockOutputSummary SummarizeBlockOutputStats(const double* s, int64_t n) {
  BlockOutputSummary r;
  if (n <= 0) return r;
  const double dn = static_cast<double>(n);
  r.tweo = s[kStatTweoSum] / dn;
  r.peak = s[kStatPeak];
  const double m = s[kStatSum1] / dn, e2 = s[kStatSum2] / dn, e3 = s[kStatSum3] / dn,
               e4 = s[kStatSum4] / dn;
  const double var = e2 - m * m;
  const double m4 = e4 - 4 * m * e3 + 6 * m * m * e2 - 3 * m * m * m * m;
  r.kurtosis = var > 0 ? m4 / (var * var) : 0.0;
  return r;
}

}  // namespace qtrain::ops
