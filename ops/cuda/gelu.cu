// CUDA GELU kernels (fp32 or BF16 storage, fp32 math) and their validating launchers.
#include <algorithm>

#include <cuda_runtime.h>

#include "ops/cuda/cuda_status.h"
#include "ops/cuda/cuda_utils.cuh"
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

using cu::Gelu;
using cu::GeluGrad;
using cu::Bf16x8;
using cu::nv_bf16;

// kVec8: 8 elements per 16-byte access for the first n/8*8 elements (all pointers aligned),
// the tail element-wise; otherwise element-wise throughout.
enum class Access { kScalar, kVec8 };

template <Access kAccess>
__global__ void gelu_forward_bf16_kernel(nv_bf16* __restrict__ out,
                                         const nv_bf16* __restrict__ inp, int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (kAccess == Access::kVec8) {
    const int64_t nvec = n / 8;
    for (int64_t v = first; v < nvec; v += stride) {
      const Bf16x8 x = cu::Load8(inp + 8 * v);
      Bf16x8 y;
#pragma unroll
      for (int k = 0; k < 8; ++k) y.v[k] = __float2bfloat16_rn(Gelu(__bfloat162float(x.v[k])));
      cu::Store8(out + 8 * v, y);
    }
    done = nvec * 8;
  }
  for (int64_t i = done + first; i < n; i += stride) {
    out[i] = __float2bfloat16_rn(Gelu(__bfloat162float(inp[i])));
  }
}

template <Access kAccess>
__global__ void gelu_backward_bf16_kernel(nv_bf16* __restrict__ dinp,
                                          const nv_bf16* __restrict__ inp,
                                          const nv_bf16* __restrict__ dout, int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (kAccess == Access::kVec8) {
    const int64_t nvec = n / 8;
    for (int64_t v = first; v < nvec; v += stride) {
      const Bf16x8 x = cu::Load8(inp + 8 * v);
      const Bf16x8 dy = cu::Load8(dout + 8 * v);
      Bf16x8 dx = cu::Load8(dinp + 8 * v);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float g = GeluGrad(__bfloat162float(x.v[k])) * __bfloat162float(dy.v[k]);
        dx.v[k] = __float2bfloat16_rn(__bfloat162float(dx.v[k]) + g);
      }
      cu::Store8(dinp + 8 * v, dx);
    }
    done = nvec * 8;
  }
  for (int64_t i = done + first; i < n; i += stride) {
    const float g = GeluGrad(__bfloat162float(inp[i])) * __bfloat162float(dout[i]);
    dinp[i] = __float2bfloat16_rn(__bfloat162float(dinp[i]) + g);
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

absl::Status gelu_forward_cuda(bf16* out, const bf16* inp, int64_t n, cudaStream_t stream) {
  QT_CHECK_ARG(n >= 0, "gelu_forward_cuda(bf16): n must be >= 0, got ", n);
  QT_CHECK_ARG(out != nullptr, "gelu_forward_cuda(bf16): out is null (n=", n, ")");
  QT_CHECK_ARG(inp != nullptr, "gelu_forward_cuda(bf16): inp is null (n=", n, ")");
  if (n == 0) return absl::OkStatus();
  if (cu::IsAligned(out, 16) && cu::IsAligned(inp, 16)) {
    gelu_forward_bf16_kernel<Access::kVec8>
        <<<Blocks((n + 7) / 8), kThreads, 0, stream>>>(cu::Nv(out), cu::Nv(inp), n);
  } else {
    gelu_forward_bf16_kernel<Access::kScalar>
        <<<Blocks(n), kThreads, 0, stream>>>(cu::Nv(out), cu::Nv(inp), n);
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status gelu_backward_cuda(bf16* dinp, const bf16* inp, const bf16* dout, int64_t n,
                                cudaStream_t stream) {
  QT_CHECK_ARG(n >= 0, "gelu_backward_cuda(bf16): n must be >= 0, got ", n);
  QT_CHECK_ARG(dinp != nullptr, "gelu_backward_cuda(bf16): dinp is null (n=", n, ")");
  QT_CHECK_ARG(inp != nullptr, "gelu_backward_cuda(bf16): inp is null (n=", n, ")");
  QT_CHECK_ARG(dout != nullptr, "gelu_backward_cuda(bf16): dout is null (n=", n, ")");
  if (n == 0) return absl::OkStatus();
  if (cu::IsAligned(dinp, 16) && cu::IsAligned(inp, 16) && cu::IsAligned(dout, 16)) {
    gelu_backward_bf16_kernel<Access::kVec8><<<Blocks((n + 7) / 8), kThreads, 0, stream>>>(
        cu::Nv(dinp), cu::Nv(inp), cu::Nv(dout), n);
  } else {
    gelu_backward_bf16_kernel<Access::kScalar><<<Blocks(n), kThreads, 0, stream>>>(
        cu::Nv(dinp), cu::Nv(inp), cu::Nv(dout), n);
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace qtrain::ops
