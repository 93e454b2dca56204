// Thin status-returning wrappers over the CUDA runtime (see device.h).
#include "ops/cuda/device.h"

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"

#include "ops/cuda/cuda_status.h"
#include "ops/status_macros.h"

namespace qtrain::ops {

absl::StatusOr<int> DeviceCount() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
    cudaGetLastError();  // clear it: "no GPU" is an answer here, not a failure
    return 0;
  }
  CUDA_RETURN_IF_ERROR(err);
  return count;
}

absl::StatusOr<void*> DeviceMalloc(int64_t bytes) {
  QT_CHECK_ARG(bytes >= 0, "DeviceMalloc: bytes must be >= 0, got ", bytes);
  if (bytes == 0) return nullptr;
  void* ptr = nullptr;
  CUDA_RETURN_IF_ERROR(cudaMalloc(&ptr, static_cast<size_t>(bytes)));
  return ptr;
}

absl::Status DeviceFree(void* ptr) {
  if (ptr != nullptr) CUDA_RETURN_IF_ERROR(cudaFree(ptr));
  return absl::OkStatus();
}

absl::Status CopyHostToDevice(void* dst, const void* src, int64_t bytes) {
  QT_CHECK_ARG(bytes >= 0, "CopyHostToDevice: bytes must be >= 0, got ", bytes);
  if (bytes == 0) return absl::OkStatus();
  CUDA_RETURN_IF_ERROR(cudaMemcpy(dst, src, static_cast<size_t>(bytes), cudaMemcpyHostToDevice));
  return absl::OkStatus();
}

absl::Status CopyDeviceToHost(void* dst, const void* src, int64_t bytes) {
  QT_CHECK_ARG(bytes >= 0, "CopyDeviceToHost: bytes must be >= 0, got ", bytes);
  if (bytes == 0) return absl::OkStatus();
  CUDA_RETURN_IF_ERROR(cudaMemcpy(dst, src, static_cast<size_t>(bytes), cudaMemcpyDeviceToHost));
  return absl::OkStatus();
}

absl::StatusOr<cudaStream_t> CreateStream() {
  cudaStream_t stream = nullptr;
  CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  return stream;
}

absl::Status DestroyStream(cudaStream_t stream) {
  CUDA_RETURN_IF_ERROR(cudaStreamDestroy(stream));
  return absl::OkStatus();
}

absl::Status SynchronizeStream(cudaStream_t stream) {
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  return absl::OkStatus();
}

absl::Status SynchronizeDevice() {
  CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  return absl::OkStatus();
}

absl::Status DeviceMemset(void* ptr, int value, int64_t bytes) {
  QT_CHECK_ARG(bytes >= 0, "DeviceMemset: bytes must be >= 0, got ", bytes);
  if (bytes == 0) return absl::OkStatus();
  CUDA_RETURN_IF_ERROR(cudaMemset(ptr, value, static_cast<size_t>(bytes)));
  return absl::OkStatus();
}

absl::StatusOr<std::string> DeviceDescription() {
  int device = 0;
  CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  cudaDeviceProp prop;
  CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device));
  return absl::StrCat(prop.name, ", sm_", prop.major, prop.minor, ", ", prop.multiProcessorCount,
                      " SMs");
}

absl::StatusOr<cudaEvent_t> CreateEvent() {
  cudaEvent_t event = nullptr;
  CUDA_RETURN_IF_ERROR(cudaEventCreate(&event));
  return event;
}

absl::Status DestroyEvent(cudaEvent_t event) {
  CUDA_RETURN_IF_ERROR(cudaEventDestroy(event));
  return absl::OkStatus();
}

absl::Status RecordEvent(cudaEvent_t event, cudaStream_t stream) {
  CUDA_RETURN_IF_ERROR(cudaEventRecord(event, stream));
  return absl::OkStatus();
}

absl::Status StreamWaitEvent(cudaStream_t stream, cudaEvent_t event) {
  CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(stream, event, 0));
  return absl::OkStatus();
}

absl::StatusOr<float> ElapsedMs(cudaEvent_t start, cudaEvent_t end) {
  CUDA_RETURN_IF_ERROR(cudaEventSynchronize(end));
  float ms = 0;
  CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, start, end));
  return ms;
}

}  // namespace qtrain::ops
