// Host API of the CUDA FP8 kernels: per-tensor scaling state for many tensors at once (amax,
// scale, scale_inv, amax history on the device; delayed and current scaling updates), casts
// BF16/fp32 -> E4M3/E5M2 that also write the transposed copy and the amax from one read, an
// amax-only reduction, an FP8 transpose, and DeepSeek-style block quantization (1x128 tiles for
// activations and gradients with their 128x1-tiled transpose, 128x128 blocks for weights).
// The reference is ops/quant/fp8.h (bit for bit: codes, scales and amaxes are exact). All
// pointers are device pointers, row-major; work is queued on `stream`; nothing synchronizes
// with the host (except Fp8ScalingState's Create/Upload/Download, meant for setup and
// checkpoints).
#ifndef QTRAIN_OPS_CUDA_FP8_CUDA_H_
#define QTRAIN_OPS_CUDA_FP8_CUDA_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "ops/cuda/bf16.h"
#include "ops/quant/fp8.h"

typedef struct CUstream_st* cudaStream_t;

namespace qtrain::ops {

// ---------------------------------------------------------------------------------------------
// Per-tensor scaling state.
//
// One device allocation for K tensors (the CUDA model's FP8 tensors: per FP8 Linear its x, W and
// dy): amax[K], scale[K], scale_inv[K] (fp32) and history[K][H] (fp32, each tensor's window
// oldest first, exactly DelayedScaler::history()), plus a per-tensor table of format and margin.
// A fresh state is what a fresh DelayedScaler is: history 0, scale 1 (scale_inv 1), amax 0.
//
// Usage per training step (delayed scaling):
//   kernels that quantize tensor k read scale() + k and max their input's |x| into amax() + k
//   (fp8_cast_cuda, layernorm_forward_fp8_cuda, adamw_update_multi_cuda's FP8 copies, ...);
//   (data parallel: max-reduce amax() over the ranks, K floats, one NCCL call);
//   fp8_delayed_update_cuda(state, ...) once: every history rolls, scales are recomputed, amax
//   is cleared for the next step.
// The CPU Linear quantizes W_t with the scale from the history before W_t's amax; the GPU
// matches that when the update runs after the backward and before AdamW, and AdamW writes
// W_{t+1}'s FP8 copy with the fresh scale and W_{t+1}'s amax into the cleared slot (consumed by
// the next step's update). W_0's copy and amax come from fp8_cast_cuda after Upload.
// Current scaling per tensor: fp8_amax_cuda (or a fused amax) into amax() + k, then
// fp8_current_scale_cuda for k, then the cast with the new scale.
struct Fp8TensorSpec {
  Fp8Format format = Fp8Format::kE4M3;
  int margin = 0;  // [0, 64], as DelayedScaler
};

class Fp8ScalingState {
 public:
  // K = specs.size() >= 1 tensors, history_len >= 1 (DelayedScaler::kDefaultHistoryLen is 16).
  // Allocates and initialises synchronously (InvalidArgument for bad specs naming the index,
  // Unavailable without a device, ResourceExhausted without memory).
  static absl::StatusOr<std::unique_ptr<Fp8ScalingState>> Create(
      absl::Span<const Fp8TensorSpec> specs, int history_len);
  ~Fp8ScalingState();  // frees the allocation (cudaFree: waits for the device)
  Fp8ScalingState(const Fp8ScalingState&) = delete;
  Fp8ScalingState& operator=(const Fp8ScalingState&) = delete;

  int num_tensors() const { return num_tensors_; }
  int history_len() const { return history_len_; }
  const Fp8TensorSpec& spec(int k) const { return specs_[k]; }

  // Device arrays (fp32): amax[K], scale[K], scale_inv[K], history[K * H] (tensor k's window is
  // history[k * H .. k * H + H), oldest first). Contiguous in this order, so amax() alone is
  // the K floats to all-reduce.
  float* amax() const { return amax_; }
  float* scale() const { return scale_; }
  float* scale_inv() const { return scale_inv_; }
  float* history() const { return history_; }
  // The per-tensor table the kernels read (internal layout).
  const void* device_specs() const { return device_specs_; }

  // Checkpoints (synchronous, on the default stream after a device synchronize): history (K*H,
  // oldest first per tensor) and scale (K) as DelayedScaler::Restore takes them. Upload checks
  // the sizes and values as Restore does (history >= 0 or +inf, scale finite > 0; InvalidArgument
  // naming the tensor), sets scale_inv = 1 / scale and clears amax.
  absl::Status Download(std::vector<float>* history, std::vector<float>* scale) const;
  absl::Status Upload(const std::vector<float>& history, const std::vector<float>& scale);

 private:
  Fp8ScalingState(std::vector<Fp8TensorSpec> specs, int history_len, void* block, void* table);
  std::vector<Fp8TensorSpec> specs_;
  int num_tensors_, history_len_;
  void* block_;  // one allocation: amax, scale, scale_inv, history
  void* device_specs_;
  float *amax_, *scale_, *scale_inv_, *history_;
};

// Delayed scaling, one launch for tensors [first, first + count) of `state` (count = -1: to the
// last): per tensor exactly DelayedScaler::update(amax[k]) (|amax| appended to the window, the
// oldest entry dropped; NaN/inf stored as +inf; scale = fp8_scale_from_amax(window max, format,
// margin, previous scale), i.e. a window max of 0 or inf keeps the previous scale), then
// scale_inv[k] = 1 / scale[k] and amax[k] = 0. Scales are bit-identical to the CPU's.
absl::Status fp8_delayed_update_cuda(const Fp8ScalingState& state, int first, int count,
                                     cudaStream_t stream);

// Current scaling for tensors [first, first + count): scale[k] = fp8_current_scale(amax[k],
// format, margin) (fallback 1 for amax 0, inf or NaN), scale_inv[k] = 1 / scale[k], then
// amax[k] = 0 (ready for the next reduction into it). The history is not touched.
absl::Status fp8_current_scale_cuda(const Fp8ScalingState& state, int first, int count,
                                    cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Casts. codes = satfinite round-to-nearest-even encode(float(in) * *scale) — the float
// multiply rounded once, then cvt.rn.satfinite — exactly fp8_encode_array(in, *scale) on the
// widened values. `scale` is a device pointer to one float (state.scale() + k), finite > 0.
//
// in (rows, cols) -> out (rows, cols) and/or out_t (cols, rows) = the same codes transposed
// (what Hopper's TN-only FP8 GEMMs need as the other operand layout), and amax (one float,
// may be null): *amax = max(*amax, max |in|) by atomicMax on the float's bits (exact and
// order-independent; NaN inputs make it NaN, which the scaling updates treat as inf). out or
// out_t may be null (not both). One read of the input for all outputs. 16-byte accesses and a
// shared-memory transpose where rows and cols are multiples of 16 and the pointers 16-byte
// aligned; else a scalar kernel (same results).
absl::Status fp8_cast_cuda(uint8_t* out, uint8_t* out_t, float* amax, const bf16* in,
                           int64_t rows, int64_t cols, Fp8Format format, const float* scale,
                           cudaStream_t stream);
// fp32 input (master weights at upload, current-scaled weights).
absl::Status fp8_cast_cuda(uint8_t* out, uint8_t* out_t, float* amax, const float* in,
                           int64_t rows, int64_t cols, Fp8Format format, const float* scale,
                           cudaStream_t stream);

// *amax = max(*amax, max |in[i]|) over n elements (the current-scaling pass before a cast);
// *amax is not cleared first (fp8_current_scale_cuda / fp8_delayed_update_cuda clear it).
absl::Status fp8_amax_cuda(float* amax, const bf16* in, int64_t n, cudaStream_t stream);
absl::Status fp8_amax_cuda(float* amax, const float* in, int64_t n, cudaStream_t stream);

// out (cols, rows) = in (rows, cols) transposed, FP8 codes (bytes) unchanged.
absl::Status fp8_transpose_cuda(uint8_t* out, const uint8_t* in, int64_t rows, int64_t cols,
                                cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Block quantization (DeepSeek-V3: E4M3 everywhere; scales as ops/quant/fp8.h's
// fp8_block_scale: s = fp8_max / block amax, 1 for an all-zero or non-finite block; the arrays
// hold scale_inv = 1 / s, what cuBLASLt's block-scaled GEMMs multiply by).

// Activations and gradients, in (R, K) BF16, one read:
//   out (R, K) and scale_inv (ceil(K/128), R): 1x128 tiles along K, exactly
//     fp8_quantize_1x128(in) (scale_inv[b * R + r], R contiguous: cuBLASLt's VEC128 layout);
//   out_t (K, R) and scale_inv_t (ceil(R/128), K): the transpose quantized in 1x128 tiles along
//     its rows (128x1 tiles of in), exactly fp8_quantize_1x128(in^T) — the wgrad operands.
// Either pair may be null (not both). Any R, K >= 1; the GEMMs want R and K multiples of 16.
absl::Status fp8_block_quantize_act_cuda(uint8_t* out, float* scale_inv, uint8_t* out_t,
                                         float* scale_inv_t, const bf16* in, int64_t R,
                                         int64_t K, Fp8Format format, cudaStream_t stream);

// Weights, w (OC, K) fp32 master, 128x128 blocks, one read:
//   out (OC, K) and scale_inv (ceil(OC/128), fp8_block_scale_ld(K)): exactly
//     fp8_quantize_128x128(w, scale_ld = fp8_block_scale_ld(K)) (padding entries 0);
//   out_t (K, OC) and scale_inv_t (ceil(K/128), fp8_block_scale_ld(OC)): the same codes
//     transposed and the grid transposed (for dgrad's W^T operand), which equals
//     fp8_quantize_128x128(w^T).
// out_t/scale_inv_t may be null. Both grids are K-major as cuBLASLt's BLK128x128 wants.
absl::Status fp8_block_quantize_weight_cuda(uint8_t* out, float* scale_inv, uint8_t* out_t,
                                            float* scale_inv_t, const float* w, int64_t OC,
                                            int64_t K, Fp8Format format, cudaStream_t stream);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_CUDA_FP8_CUDA_H_
