// Device helpers of the CUDA GPT: stream-ordered copies, BF16 conversion and scaling.
#include "trainer/cuda/gpt_cuda_kernels.h"

#include <algorithm>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "ops/cuda/cuda_status.h"
#include "ops/status_macros.h"

namespace qtrain::gpu {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 8192;

int Blocks(int64_t n) {
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)));
}

__global__ void fp32_to_bf16_kernel(__nv_bfloat16* __restrict__ out, const float* __restrict__ in,
                                    int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    out[i] = __float2bfloat16_rn(in[i]);
  }
}

}  // namespace

absl::Status CopyToDeviceAsync(void* dst, const void* src, int64_t bytes, cudaStream_t stream) {
  QT_CHECK_ARG(bytes >= 0, "CopyToDeviceAsync: bytes must be >= 0, got ", bytes);
  if (bytes == 0) return absl::OkStatus();
  CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), cudaMemcpyHostToDevice, stream));
  return absl::OkStatus();
}

absl::Status CopyToHostAsync(void* dst, const void* src, int64_t bytes, cudaStream_t stream) {
  QT_CHECK_ARG(bytes >= 0, "CopyToHostAsync: bytes must be >= 0, got ", bytes);
  if (bytes == 0) return absl::OkStatus();
  CUDA_RETURN_IF_ERROR(
      cudaMemcpyAsync(dst, src, static_cast<size_t>(bytes), cudaMemcpyDeviceToHost, stream));
  return absl::OkStatus();
}

absl::Status MemsetAsync(void* ptr, int value, int64_t bytes, cudaStream_t stream) {
  QT_CHECK_ARG(bytes >= 0, "MemsetAsync: bytes must be >= 0, got ", bytes);
  if (bytes == 0) return absl::OkStatus();
  CUDA_RETURN_IF_ERROR(cudaMemsetAsync(ptr, value, static_cast<size_t>(bytes), stream));
  return absl::OkStatus();
}

absl::Status Fp32ToBf16(ops::bf16* out, const float* in, int64_t n, cudaStream_t stream) {
  QT_CHECK_ARG(n >= 0, "Fp32ToBf16: n must be >= 0, got ", n);
  if (n == 0) return absl::OkStatus();
  fp32_to_bf16_kernel<<<Blocks(n), kThreads, 0, stream>>>(
      reinterpret_cast<__nv_bfloat16*>(out), in, n);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status GetDeviceMemory(DeviceMemory* out) {
  size_t free_bytes = 0, total_bytes = 0;
  CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total_bytes));
  out->free_bytes = static_cast<int64_t>(free_bytes);
  out->total_bytes = static_cast<int64_t>(total_bytes);
  return absl::OkStatus();
}

}  // namespace qtrain::gpu
