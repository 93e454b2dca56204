// Device memory, copies, streams and device count behind absl::Status, for host code built by
// g++ without the CUDA include path (Bazel rejects /usr/local/cuda/include in copts): the
// trainer's GPU path and the GPU parity tests use these instead of the runtime API.
#ifndef QTRAIN_OPS_CUDA_DEVICE_H_
#define QTRAIN_OPS_CUDA_DEVICE_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

// The runtime's own typedef (driver_types.h); a repeated identical typedef is legal C++.
typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;

namespace qtrain::ops {

// Number of CUDA devices; 0 (not an error) when there is no device or no driver.
absl::StatusOr<int> DeviceCount();
// ResourceExhausted when the device is out of memory. bytes == 0 gives nullptr.
absl::StatusOr<void*> DeviceMalloc(int64_t bytes);
absl::Status DeviceFree(void* ptr);  // null is a no-op
// Synchronous copies (the default stream), bytes >= 0.
absl::Status CopyHostToDevice(void* dst, const void* src, int64_t bytes);
absl::Status CopyDeviceToHost(void* dst, const void* src, int64_t bytes);
absl::StatusOr<cudaStream_t> CreateStream();
absl::Status DestroyStream(cudaStream_t stream);
// Waits for the work queued so far; asynchronous kernel faults surface here.
absl::Status SynchronizeStream(cudaStream_t stream);
absl::Status SynchronizeDevice();
// Sets bytes (>= 0) to the byte `value`, synchronously.
absl::Status DeviceMemset(void* ptr, int value, int64_t bytes);
// "NVIDIA H100 80GB HBM3, sm_90, 132 SMs" for logs and benchmark tables.
absl::StatusOr<std::string> DeviceDescription();
// Events for timing device work (benchmarks): elapsed milliseconds between two recorded events.
absl::StatusOr<cudaEvent_t> CreateEvent();
absl::Status DestroyEvent(cudaEvent_t event);
absl::Status RecordEvent(cudaEvent_t event, cudaStream_t stream);
absl::StatusOr<float> ElapsedMs(cudaEvent_t start, cudaEvent_t end);  // waits for `end`
// Work queued on `stream` after this call waits for the work recorded in `event` (the host
// does not wait).
absl::Status StreamWaitEvent(cudaStream_t stream, cudaEvent_t event);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_CUDA_DEVICE_H_
