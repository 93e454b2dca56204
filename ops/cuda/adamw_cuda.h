// Host API of the CUDA AdamW step over fp32 master weights that also writes their BF16 copy
// (the weights the BF16 kernels read). The reference is ops/adamw.h. All pointers are device
// pointers; work is queued on `stream`.
//
// Two forms of one kernel (same math, same operation order, so the same bits):
//  - adamw_update_cuda: one contiguous range with one weight decay;
//  - adamw_update_multi_cuda: a whole flat parameter buffer in ONE launch, described once by
//    an AdamwPlan (segments with their own weight-decay flag), which spares the ~100 launches
//    of a model with many small bias and layernorm tensors.
// Gradients come in fp32 or BF16 (the model's BF16-gradient option); a BF16 gradient is
// widened to fp32 exactly, so the bf16 overloads give the bits the fp32 ones give for the
// same (bf16-valued) gradients.
#ifndef QTRAIN_OPS_CUDA_ADAMW_CUDA_H_
#define QTRAIN_OPS_CUDA_ADAMW_CUDA_H_

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "ops/cuda/bf16.h"
#include "ops/quant/fp8.h"

typedef struct CUstream_st* cudaStream_t;

namespace qtrain::ops {

// params, grads, m, v (n) fp32, as adamw_update: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// p -= lr * (m/(1-b1^t) / (sqrt(v/(1-b2^t)) + eps) + weight_decay * p), t >= 1.
// params_bf16 (n) (may be null): receives the updated params rounded to nearest even, exactly
// FloatToBf16(params[i]). grad_scale (device, one float, may be null): g = grads[i] *
// *grad_scale, e.g. the clip factor of clip_by_global_norm_cuda, which spares a pass over the
// gradients. The bias corrections are computed on the host in float with std::pow, like the
// CPU op, so both see the same constants.
absl::Status adamw_update_cuda(float* params, bf16* params_bf16, const float* grads, float* m,
                               float* v, int64_t n, float lr, float beta1, float beta2,
                               float eps, float weight_decay, int t, const float* grad_scale,
                               cudaStream_t stream);
// The same with BF16 gradients: g = float(grads[i]) (exact), then as above.
absl::Status adamw_update_cuda(float* params, bf16* params_bf16, const bf16* grads, float* m,
                               float* v, int64_t n, float lr, float beta1, float beta2,
                               float eps, float weight_decay, int t, const float* grad_scale,
                               cudaStream_t stream);

// One tensor (or run of tensors) of a flat parameter buffer: elements [offset, offset + size),
// updated with the call's weight_decay when `decay`, with 0 otherwise.
struct AdamwSegment {
  int64_t offset = 0;
  int64_t size = 0;
  bool decay = false;
};

// The FP8 copy of one weight of an FP8 Linear (ops/cuda/fp8_cuda.h): elements [offset, offset +
// size) of the flat buffer (the weight (OC, C) row-major) also go out as codes[i - offset] =
// encode(p_new[i] * scale[scale_index]) in `format` (satfinite, exactly fp8_encode_array of
// the new fp32 weights), and amax[scale_index] = max(amax[scale_index], max |p_new|)
// (atomicMax on the bits), where scale/amax are the device arrays passed to the update
// (Fp8ScalingState::scale()/amax()). write_bf16 = false skips the BF16 copy of these elements
// (an FP8 Linear reads only its codes). The transposed copy (dgrad's W^T) is fp8_transpose_cuda
// of codes afterwards (1 byte read and written per weight, against AdamW's 16 to 18).
struct AdamwFp8Segment {
  int64_t offset = 0;
  int64_t size = 0;
  int scale_index = 0;
  uint8_t* codes = nullptr;  // device, `size` bytes
  Fp8Format format = Fp8Format::kE4M3;
  bool write_bf16 = true;
};

// The segments of a flat buffer of n elements cut into chunks of at most kChunkElements (one
// thread block each), as a table in device memory that the plan owns. Build it once (it
// allocates and copies synchronously) and reuse it every step.
class AdamwPlan {
 public:
  // One sweep of a block (256 threads x 2 float4): measured on an H100 against 4K-64K chunks
  // and deeper unrolling, small chunks keep the last wave short and gave the most bandwidth.
  // Chunk boundaries fall on multiples of kChunkElements of the flat index (and at segment
  // ends), so that with 16-byte aligned buffers only a segment's ends need scalar access.
  static constexpr int64_t kChunkElements = 2048;

  // Checks on the host, before any CUDA call, that n >= 0 and every segment has offset >= 0,
  // size >= 0 and offset + size <= n, and that no two non-empty segments overlap
  // (InvalidArgument naming the segment index and values); then uploads the chunk table
  // (Unavailable without a device, ResourceExhausted without memory). Elements in no segment
  // are left untouched by the update; segments may come in any order.
  static absl::StatusOr<std::unique_ptr<AdamwPlan>> Create(absl::Span<const AdamwSegment> segments,
                                                           int64_t n);
  // The same, plus FP8 weight copies: every FP8 segment must lie inside one of `segments`
  // (InvalidArgument naming it otherwise), FP8 segments must not overlap, codes non-null,
  // scale_index >= 0. Chunks are also cut at the FP8 segments' ends (the update's bits do not
  // depend on the cut). Without FP8 segments this is the form above.
  static absl::StatusOr<std::unique_ptr<AdamwPlan>> Create(
      absl::Span<const AdamwSegment> segments, int64_t n,
      absl::Span<const AdamwFp8Segment> fp8_segments);
  ~AdamwPlan();  // frees the table (cudaFree: waits for the device)
  AdamwPlan(const AdamwPlan&) = delete;
  AdamwPlan& operator=(const AdamwPlan&) = delete;

  int64_t size() const { return n_; }             // n: elements of the flat buffers
  int64_t num_chunks() const { return num_chunks_; }  // thread blocks of one update
  int64_t num_elements() const { return covered_; }   // elements in the segments
  const void* device_chunks() const { return chunks_; }  // for the launcher
  // Per chunk: its FP8 output (null table when the plan has no FP8 segments).
  const void* device_fp8_chunks() const { return fp8_chunks_; }
  int num_fp8_segments() const { return num_fp8_; }
  int max_scale_index() const { return max_scale_index_; }  // -1 without FP8 segments

 private:
  AdamwPlan(int64_t n, int64_t num_chunks, int64_t covered, void* chunks)
      : n_(n), num_chunks_(num_chunks), covered_(covered), chunks_(chunks) {}
  int64_t n_, num_chunks_, covered_;
  void* chunks_;  // device array of num_chunks_ chunk records
  void* fp8_chunks_ = nullptr;  // device array of num_chunks_ FP8 records, or null
  int num_fp8_ = 0;
  int max_scale_index_ = -1;
};

// AdamW as adamw_update_cuda over every segment of `plan` in one launch: params, grads, m, v
// and params_bf16 (may be null) are the flat buffers of plan.size() elements, and segment s
// is updated with weight decay `s.decay ? weight_decay : 0`, bit for bit what
// adamw_update_cuda(params + s.offset, ..., s.size, ..., s.decay ? weight_decay : 0, ...)
// gives. The vector path needs all buffers at the same offset from 16-byte alignment (8 bytes
// for BF16 arrays), as cudaMalloc'd buffers are; otherwise every element is accessed singly.
absl::Status adamw_update_multi_cuda(const AdamwPlan& plan, float* params, bf16* params_bf16,
                                     const float* grads, float* m, float* v, float lr,
                                     float beta1, float beta2, float eps, float weight_decay,
                                     int t, const float* grad_scale, cudaStream_t stream);
absl::Status adamw_update_multi_cuda(const AdamwPlan& plan, float* params, bf16* params_bf16,
                                     const bf16* grads, float* m, float* v, float lr,
                                     float beta1, float beta2, float eps, float weight_decay,
                                     int t, const float* grad_scale, cudaStream_t stream);

// The same update writing the plan's FP8 weight copies (AdamwFp8Segment) with fp8_scale[k] and
// recording their amax into fp8_amax[k] (both device arrays of at least
// plan.max_scale_index() + 1 floats: Fp8ScalingState::scale() and amax()); fp8_scale may be null
// to record only the amax (current scaling: fp8_current_scale_cuda, then fp8_cast_cuda of the
// fp32 weights, since the codes need this step's amax before they can be written). params,
// m, v and the BF16 copy get exactly the bits adamw_update_multi_cuda gives.
absl::Status adamw_update_multi_fp8_cuda(const AdamwPlan& plan, float* params, bf16* params_bf16,
                                         const float* grads, float* m, float* v, float lr,
                                         float beta1, float beta2, float eps, float weight_decay,
                                         int t, const float* grad_scale, const float* fp8_scale,
                                         float* fp8_amax, cudaStream_t stream);
absl::Status adamw_update_multi_fp8_cuda(const AdamwPlan& plan, float* params, bf16* params_bf16,
                                         const bf16* grads, float* m, float* v, float lr,
                                         float beta1, float beta2, float eps, float weight_decay,
                                         int t, const float* grad_scale, const float* fp8_scale,
                                         float* fp8_amax, cudaStream_t stream);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_CUDA_ADAMW_CUDA_H_
