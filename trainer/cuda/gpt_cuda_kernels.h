// Small device helpers of the CUDA GPT (trainer/cuda/gpt_cuda.cc) behind absl::Status, for host
// code built by g++ without CUDA headers: copies, memsets and conversions queued on a stream,
// and the device's memory figures.
#ifndef QTRAIN_TRAINER_CUDA_GPT_CUDA_KERNELS_H_
#define QTRAIN_TRAINER_CUDA_GPT_CUDA_KERNELS_H_

#include <cstdint>

#include "absl/status/status.h"
#include "ops/cuda/bf16.h"

typedef struct CUstream_st* cudaStream_t;

namespace qtrain::gpu {

// Stream-ordered copies and memset (the device.h ones use the legacy default stream, which a
// non-blocking stream does not wait for). Host memory may be pageable: the call returns once
// the source has been staged, so the caller may reuse it.
absl::Status CopyToDeviceAsync(void* dst, const void* src, int64_t bytes, cudaStream_t stream);
absl::Status CopyToHostAsync(void* dst, const void* src, int64_t bytes, cudaStream_t stream);
absl::Status MemsetAsync(void* ptr, int value, int64_t bytes, cudaStream_t stream);

// out (n) = in (n) rounded to nearest even, exactly FloatToBf16.
absl::Status Fp32ToBf16(ops::bf16* out, const float* in, int64_t n, cudaStream_t stream);

struct DeviceMemory {
  int64_t free_bytes = 0, total_bytes = 0;
};
absl::Status GetDeviceMemory(DeviceMemory* out);

}  // namespace qtrain::gpu

#endif  // QTRAIN_TRAINER_CUDA_GPT_CUDA_KERNELS_H_
