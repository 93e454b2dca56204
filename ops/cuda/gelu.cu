// CUDA GELU kernels (fp32 in, fp32 math, fp32 out) and their validating launchers.
#include <algorithm>

#include <cuda_runtime.h>

#include "ops/cuda/cuda_status.h"
#include "ops/cuda/gelu_cuda.h"
#include "ops/status_macros.h"

namespace qtrain::ops {
namespace {

constexpr float kSqrt2OverPi = 0.79788456080286535588f;
constexpr float kCubic = 0.044715f;
constexpr int kThreads = 256;
// Enough blocks to fill an H100/H200 several times over; larger n is covered by the
// grid-stride loop.
constexpr int64_t kMaxBlocks = 4096;

__global__ void gelu_forward_kernel(float* __restrict__ out, const float* __restrict__ inp,
                                    int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const float x = inp[i];
    out[i] = 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + kCubic * x * x * x)));
  }
}

__global__ void gelu_backward_kernel(float* __restrict__ dinp, const float* __restrict__ inp,
                                     const float* __restrict__ dout, int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const float x = inp[i];
    const float th = tanhf(kSqrt2OverPi * (x + kCubic * x * x * x));
    const float sech2 = 1.0f - th * th;  // finite where coshf would overflow
    const float grad =
        0.5f * (1.0f + th) + 0.5f * x * sech2 * kSqrt2OverPi * (1.0f + 3.0f * kCubic * x * x);
    dinp[i] += grad * dout[i];
  }
}

int Blocks(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

}  // namespace

absl::Status gelu_forward_cuda(float* out, const float* inp, int64_t n, cudaStream_t stream) {
  QT_CHECK_ARG(n >= 0, "gelu_forward_cuda: n must be >= 0, got ", n);
  QT_CHECK_ARG(out != nullptr, "gelu_forward_cuda: out is null (n=", n, ")");
  QT_CHECK_ARG(inp != nullptr, "gelu_forward_cuda: inp is null (n=", n, ")");
  if (n == 0) return absl::OkStatus();
  gelu_forward_kernel<<<Blocks(n), kThreads, 0, stream>>>(out, inp, n);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status gelu_backward_cuda(float* dinp, const float* inp, const float* dout, int64_t n,
                                cudaStream_t stream) {
  QT_CHECK_ARG(n >= 0, "gelu_backward_cuda: n must be >= 0, got ", n);
  QT_CHECK_ARG(dinp != nullptr, "gelu_backward_cuda: dinp is null (n=", n, ")");
  QT_CHECK_ARG(inp != nullptr, "gelu_backward_cuda: inp is null (n=", n, ")");
  QT_CHECK_ARG(dout != nullptr, "gelu_backward_cuda: dout is null (n=", n, ")");
  if (n == 0) return absl::OkStatus();
  gelu_backward_kernel<<<Blocks(n), kThreads, 0, stream>>>(dinp, inp, dout, n);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace qtrain::ops
