// CUDA FP8 kernels: the per-tensor scaling state and its delayed/current updates, casts that
// write codes, transposed codes and the amax from one read, the amax reduction, the FP8
// transpose, and block quantization (1x128 tiles with the 128x1-tiled transpose; 128x128
// weight blocks with the transposed codes and grid).
//
// Transposes go through shared memory in tiles: a tile is read with coalesced 16-byte loads
// along its rows, its codes are stored row-wise into shared memory, and each thread then
// gathers 16 codes down a column (one byte per row, consecutive threads on consecutive
// columns, so a warp's reads fall in distinct banks) and writes them as one 16-byte store to
// the transposed output. Kernels loop over tiles (grid-stride) and reduce their amax in the
// block before one atomicMax, so a whole tensor costs a few hundred atomics, not millions.
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "ops/cuda/cuda_status.h"
#include "ops/cuda/cuda_utils.cuh"
#include "ops/cuda/fp8_cuda.h"
#include "ops/cuda/fp8_utils.cuh"
#include "ops/status_macros.h"

namespace qtrain::ops {
namespace {

using cu::nv_bf16;

constexpr int kThreads = 256;
// Grid cap of the grid-stride kernels: 8 blocks of 256 threads per SM on a 132-SM H200 fill it;
// more blocks only add atomics.
constexpr int64_t kMaxBlocks = 1056;

// The per-tensor table Fp8ScalingState keeps on the device.
struct DevSpec {
  float fp8_max;
  int margin;
};

const char* FormatName(Fp8Format f) { return f == Fp8Format::kE4M3 ? "E4M3" : "E5M2"; }

// fp8_scale_from_amax in device arithmetic: the IEEE division, then an exact multiply by
// 2^-margin (the same rounding as std::ldexp, also for subnormal results).
__device__ __forceinline__ float ScaleFromAmax(float amax, float fp8_max, int margin,
                                               float fallback) {
  if (!(amax > 0.0f) || isinf(amax)) return fallback;
  const float q = __fdiv_rn(fp8_max, amax);
  const float s = __fmul_rn(q, __int_as_float((127 - margin) << 23));
  if (!(s > 0.0f) || isinf(s)) return fallback;
  return s;
}

// fp8_block_scale from an amax held as ordered bits (NaN bits above inf).
__device__ __forceinline__ float BlockScale(uint32_t amax_bits, float fp8_max) {
  return ScaleFromAmax(__uint_as_float(amax_bits), fp8_max, 0, 1.0f);
}

__device__ __forceinline__ uint32_t BlockMaxBits(uint32_t v, uint32_t* scratch) {
  v = cu::WarpMaxBits(v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x / 32) ? scratch[lane] : 0u;
  return cu::WarpMaxBits(v);
}

// One atomicMax per block; every thread of the block must call.
__device__ __forceinline__ void BlockAtomicMax(float* amax, uint32_t bits, uint32_t* scratch) {
  bits = BlockMaxBits(bits, scratch);
  if (threadIdx.x == 0 && amax != nullptr) cu::AtomicMaxBits(amax, bits);
}

// ---- Scaling state updates: one thread per tensor.

__global__ void delayed_update_kernel(float* __restrict__ amax, float* __restrict__ scale,
                                      float* __restrict__ scale_inv, float* __restrict__ history,
                                      const DevSpec* __restrict__ specs, int first, int count,
                                      int H) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const int k = first + i;
  float a = fabsf(amax[k]);
  if (!isfinite(a)) a = INFINITY;  // NaN or inf: the window max is inf until it rolls out
  float* h = history + static_cast<int64_t>(k) * H;
  float m = a;
  for (int j = 0; j + 1 < H; ++j) {
    const float v = h[j + 1];
    h[j] = v;
    m = v > m ? v : m;
  }
  h[H - 1] = a;
  const DevSpec sp = specs[k];
  const float s = ScaleFromAmax(m, sp.fp8_max, sp.margin, scale[k]);
  scale[k] = s;
  scale_inv[k] = __fdiv_rn(1.0f, s);
  amax[k] = 0.0f;
}

__global__ void current_scale_kernel(float* __restrict__ amax, float* __restrict__ scale,
                                     float* __restrict__ scale_inv,
                                     const DevSpec* __restrict__ specs, int first, int count) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const int k = first + i;
  const DevSpec sp = specs[k];
  const float s = ScaleFromAmax(amax[k], sp.fp8_max, sp.margin, 1.0f);
  scale[k] = s;
  scale_inv[k] = __fdiv_rn(1.0f, s);
  amax[k] = 0.0f;
}

// ---- Loads of 16 consecutive input values as floats (exact widening for BF16).

__device__ __forceinline__ void Load16(const nv_bf16* p, float* x) {
  const uint4 u0 = *reinterpret_cast<const uint4*>(p);
  const uint4 u1 = *reinterpret_cast<const uint4*>(p + 8);
  const uint32_t w[8] = {u0.x, u0.y, u0.z, u0.w, u1.x, u1.y, u1.z, u1.w};
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    x[2 * i] = __uint_as_float(w[i] << 16);
    x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ void Load16(const float* p, float* x) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float4 v = reinterpret_cast<const float4*>(p)[i];
    x[4 * i] = v.x;
    x[4 * i + 1] = v.y;
    x[4 * i + 2] = v.z;
    x[4 * i + 3] = v.w;
  }
}

__device__ __forceinline__ float ToFloat(nv_bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToFloat(float v) { return v; }

template <Fp8Format kF>
__device__ __forceinline__ uint4 Encode16(const float* x, float s) {
  return make_uint4(cu::Encode4<kF>(x, s), cu::Encode4<kF>(x + 4, s), cu::Encode4<kF>(x + 8, s),
                    cu::Encode4<kF>(x + 12, s));
}

// 16 bytes gathered down column c of a shared-memory byte tile (rows r0 .. r0 + 15, row stride
// `ld` bytes), packed first row lowest.
__device__ __forceinline__ uint4 GatherColumn16(const uint8_t* tile, int ld, int r0, int c) {
  uint32_t w[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    uint32_t v = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      v |= static_cast<uint32_t>(tile[(r0 + 4 * q + b) * ld + c]) << (8 * b);
    }
    w[q] = v;
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Swizzled shared byte tiles for the transposes, W bytes per row (64 or 128), no padding: row
// r keeps its 16-byte column chunk j at chunk j ^ ((r / 16) mod (W / 16)). A transposed gather
// reads one column down 16 rows of each of eight 16-row groups; the swizzle puts the groups in
// different banks, while a row's chunks stay a permutation (16-byte stores without conflicts).
template <int W>
__device__ __forceinline__ void StoreSwizzled16(uint8_t* tile, int r, int c, uint4 v) {
  *reinterpret_cast<uint4*>(tile + r * W + ((((c >> 4) ^ (r >> 4)) & (W / 16 - 1)) << 4)) = v;
}

// Rows 16 g .. 16 g + 15 of column c of a swizzled tile, packed first row lowest.
template <int W>
__device__ __forceinline__ uint4 GatherSwizzled16(const uint8_t* tile, int g, int c) {
  const uint8_t* p = tile + g * 16 * W + ((((c >> 4) ^ g) & (W / 16 - 1)) << 4) + (c & 15);
  uint32_t w[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    uint32_t v = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) v |= static_cast<uint32_t>(p[(4 * q + b) * W]) << (8 * b);
    w[q] = v;
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// ---- Cast (+ transpose + amax), vector path: tiles of 128 rows x 64 columns, rows and cols
// multiples of 16, 16-byte aligned pointers. Thread t loads rows t / 4 and t / 4 + 64, columns
// 16 (t % 4) .. + 15 of the tile (both loads in flight before either is encoded). For the
// transpose, the 8 lanes of a quarter-warp write one 128-byte run of an output row (16 input
// rows each) and a warp four such rows, so every store instruction fills whole lines (a thread
// per output row wrote 16 bytes to each of 32 rows: 2.2 TB/s with the cast on the H200).
constexpr int kTile = 64;                // columns per tile
constexpr int kTileR = 128;              // rows per tile
constexpr int kRowPasses = kTileR / 64;  // rows each thread loads (256 threads, 4 per row)

template <typename T, Fp8Format kF>
__global__ void __launch_bounds__(kThreads)
    cast_vec_kernel(uint8_t* __restrict__ out, uint8_t* __restrict__ out_t,
                    float* __restrict__ amax, const T* __restrict__ in, int64_t R, int64_t C,
                    const float* __restrict__ scale) {
  __shared__ __align__(16) uint8_t tile[kTileR * kTile];
  __shared__ uint32_t red[32];
  const float s = *scale;
  const int64_t tiles_c = (C + kTile - 1) / kTile;
  const int64_t tiles = ((R + kTileR - 1) / kTileR) * tiles_c;
  const int t = threadIdx.x;
  const int lr = t / 4, lc = (t % 4) * 16;  // load position in the tile
  const int g = t % 8;                      // transposed store: input rows 16 g .. + 15
  uint32_t m = 0;
  for (int64_t tile_id = blockIdx.x; tile_id < tiles; tile_id += gridDim.x) {
    const int64_t r0 = (tile_id / tiles_c) * kTileR, c0 = (tile_id % tiles_c) * kTile;
    const int64_t c = c0 + lc;
    float x[kRowPasses][16];
#pragma unroll
    for (int k = 0; k < kRowPasses; ++k) {
      const int64_t r = r0 + lr + 64 * k;
      if (r < R && c < C) Load16(in + r * C + c, x[k]);
    }
#pragma unroll
    for (int k = 0; k < kRowPasses; ++k) {
      const int64_t r = r0 + lr + 64 * k;
      if (r < R && c < C) {
#pragma unroll
        for (int i = 0; i < 16; ++i) m = max(m, cu::AbsBits(x[k][i]));
        const uint4 codes = Encode16<kF>(x[k], s);
        if (out != nullptr) *reinterpret_cast<uint4*>(out + r * C + c) = codes;
        if (out_t != nullptr) StoreSwizzled16<kTile>(tile, lr + 64 * k, lc, codes);
      }
    }
    if (out_t != nullptr) {
      __syncthreads();
      const int64_t orow = r0 + 16 * g;
#pragma unroll
      for (int k = 0; k < kTile / 32; ++k) {
        const int col = (t / 32) * (kTile / 8) + 4 * k + (t % 32) / 8;  // out_t row in the tile
        const int64_t oc = c0 + col;
        if (oc < C && orow < R) {
          *reinterpret_cast<uint4*>(out_t + oc * R + orow) = GatherSwizzled16<kTile>(tile, g, col);
        }
      }
      __syncthreads();  // the tile is refilled next iteration
    }
  }
  BlockAtomicMax(amax, m, red);
}

// Scalar path: 32 x 32 tiles, any sizes and alignment. Thread (x, y) of 32 x 8 handles column x
// of rows y, y + 8, y + 16, y + 24.
template <typename T, Fp8Format kF>
__global__ void __launch_bounds__(kThreads)
    cast_scalar_kernel(uint8_t* __restrict__ out, uint8_t* __restrict__ out_t,
                       float* __restrict__ amax, const T* __restrict__ in, int64_t R, int64_t C,
                       const float* __restrict__ scale) {
  __shared__ uint32_t tile[32][33];
  __shared__ uint32_t red[32];
  const float s = *scale;
  const int64_t tiles_c = (C + 31) / 32;
  const int64_t tiles = ((R + 31) / 32) * tiles_c;
  const int x = threadIdx.x % 32, y = threadIdx.x / 32;
  uint32_t m = 0;
  for (int64_t tile_id = blockIdx.x; tile_id < tiles; tile_id += gridDim.x) {
    const int64_t r0 = (tile_id / tiles_c) * 32, c0 = (tile_id % tiles_c) * 32;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t r = r0 + y + 8 * j, c = c0 + x;
      if (r < R && c < C) {
        const float v = ToFloat(in[r * C + c]);
        m = max(m, cu::AbsBits(v));
        const uint8_t code = cu::Encode<kF>(v, s);
        if (out != nullptr) out[r * C + c] = code;
        tile[y + 8 * j][x] = code;
      }
    }
    if (out_t != nullptr) {
      __syncthreads();
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t oc = c0 + y + 8 * j, orow = r0 + x;
        if (oc < C && orow < R) out_t[oc * R + orow] = static_cast<uint8_t>(tile[x][y + 8 * j]);
      }
      __syncthreads();
    }
  }
  BlockAtomicMax(amax, m, red);
}

int GridFor(int64_t tiles) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(tiles, kMaxBlocks)));
}

template <typename T, Fp8Format kF>
absl::Status LaunchCast(uint8_t* out, uint8_t* out_t, float* amax, const T* in, int64_t R,
                        int64_t C, const float* scale, cudaStream_t stream) {
  const bool vec = R % 16 == 0 && C % 16 == 0 && cu::IsAligned(in, 16) &&
                   (out == nullptr || cu::IsAligned(out, 16)) &&
                   (out_t == nullptr || cu::IsAligned(out_t, 16));
  if (vec) {
    const int64_t tiles = ((R + kTileR - 1) / kTileR) * ((C + kTile - 1) / kTile);
    cast_vec_kernel<T, kF><<<GridFor(tiles), kThreads, 0, stream>>>(out, out_t, amax, in, R, C,
                                                                     scale);
  } else {
    const int64_t tiles = ((R + 31) / 32) * ((C + 31) / 32);
    cast_scalar_kernel<T, kF><<<GridFor(tiles), kThreads, 0, stream>>>(out, out_t, amax, in, R,
                                                                        C, scale);
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

template <typename T>
absl::Status Cast(const char* fn, uint8_t* out, uint8_t* out_t, float* amax, const T* in,
                  int64_t rows, int64_t cols, Fp8Format format, const float* scale,
                  cudaStream_t stream) {
  QT_CHECK_ARG(rows >= 0 && cols >= 0, fn, ": rows = ", rows, ", cols = ", cols,
               " must be >= 0");
  QT_CHECK_ARG(out != nullptr || out_t != nullptr, fn, ": out and out_t are both null");
  QT_CHECK_ARG(in != nullptr && scale != nullptr, fn, ": null pointer (in=", in != nullptr,
               " scale=", scale != nullptr, ")");
  if (rows == 0 || cols == 0) return absl::OkStatus();
  return format == Fp8Format::kE4M3
             ? LaunchCast<T, Fp8Format::kE4M3>(out, out_t, amax, in, rows, cols, scale, stream)
             : LaunchCast<T, Fp8Format::kE5M2>(out, out_t, amax, in, rows, cols, scale, stream);
}

// ---- amax: grid-stride over 16-byte vectors where aligned, else elements.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    amax_kernel(float* __restrict__ amax, const T* __restrict__ in, int64_t n, bool vec) {
  __shared__ uint32_t red[32];
  uint32_t m = 0;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  constexpr int kPer = 16 / sizeof(T);
  if (vec) {
    const int64_t nv = n / kPer;
    for (int64_t i = tid; i < nv; i += stride) {
      const uint4 u = reinterpret_cast<const uint4*>(in)[i];
      const T* v = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int k = 0; k < kPer; ++k) m = max(m, cu::AbsBits(ToFloat(v[k])));
    }
    for (int64_t i = nv * kPer + tid; i < n; i += stride) m = max(m, cu::AbsBits(ToFloat(in[i])));
  } else {
    for (int64_t i = tid; i < n; i += stride) m = max(m, cu::AbsBits(ToFloat(in[i])));
  }
  BlockAtomicMax(amax, m, red);
}

template <typename T>
absl::Status Amax(float* amax, const T* in, int64_t n, cudaStream_t stream) {
  QT_CHECK_ARG(n >= 0, "fp8_amax_cuda: n = ", n, " must be >= 0");
  QT_CHECK_ARG(amax != nullptr && (n == 0 || in != nullptr), "fp8_amax_cuda: null pointer (amax=",
               amax != nullptr, " in=", in != nullptr, ")");
  if (n == 0) return absl::OkStatus();
  const int64_t per = 16 / sizeof(T);
  amax_kernel<T><<<GridFor((n / per + kThreads - 1) / kThreads + 1), kThreads, 0, stream>>>(
      amax, in, n, cu::IsAligned(in, 16));
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

// ---- FP8 transpose, vector path: 128 x 128 byte tiles, rows and cols multiples of 16, 16-byte
// aligned pointers. Thread t loads rows t / 8 + 32 k (k < 4), bytes 16 (t % 8) .. + 15 of the
// tile (four 16-byte loads in flight); the stores are the cast kernel's: a quarter-warp writes
// one 128-byte run of an output row, a warp four rows per instruction.
constexpr int kTT = 128;             // transpose tile, bytes per side
constexpr int kTTPasses = kTT / 32;  // 16-byte loads and stores per thread

__global__ void __launch_bounds__(kThreads)
    transpose_vec_kernel(uint8_t* __restrict__ out, const uint8_t* __restrict__ in, int64_t R,
                         int64_t C) {
  __shared__ __align__(16) uint8_t tile[kTT * kTT];
  const int64_t tiles_c = (C + kTT - 1) / kTT;
  const int64_t tiles = ((R + kTT - 1) / kTT) * tiles_c;
  const int t = threadIdx.x;
  const int lr = t / 8, lc = (t % 8) * 16;
  const int g = t % 8;
  for (int64_t tile_id = blockIdx.x; tile_id < tiles; tile_id += gridDim.x) {
    const int64_t r0 = (tile_id / tiles_c) * kTT, c0 = (tile_id % tiles_c) * kTT;
    const int64_t c = c0 + lc;
    uint4 v[kTTPasses];
#pragma unroll
    for (int k = 0; k < kTTPasses; ++k) {
      const int64_t r = r0 + lr + 32 * k;
      if (r < R && c < C) v[k] = *reinterpret_cast<const uint4*>(in + r * C + c);
    }
#pragma unroll
    for (int k = 0; k < kTTPasses; ++k) {
      if (r0 + lr + 32 * k < R && c < C) StoreSwizzled16<kTT>(tile, lr + 32 * k, lc, v[k]);
    }
    __syncthreads();
    const int64_t orow = r0 + 16 * g;
#pragma unroll
    for (int k = 0; k < kTTPasses; ++k) {
      const int col = (t / 32) * (kTT / 8) + 4 * k + (t % 32) / 8;
      const int64_t oc = c0 + col;
      if (oc < C && orow < R) {
        *reinterpret_cast<uint4*>(out + oc * R + orow) = GatherSwizzled16<kTT>(tile, g, col);
      }
    }
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kThreads)
    transpose_scalar_kernel(uint8_t* __restrict__ out, const uint8_t* __restrict__ in, int64_t R,
                            int64_t C) {
  __shared__ uint32_t tile[32][33];
  const int64_t tiles_c = (C + 31) / 32;
  const int64_t tiles = ((R + 31) / 32) * tiles_c;
  const int x = threadIdx.x % 32, y = threadIdx.x / 32;
  for (int64_t tile_id = blockIdx.x; tile_id < tiles; tile_id += gridDim.x) {
    const int64_t r0 = (tile_id / tiles_c) * 32, c0 = (tile_id % tiles_c) * 32;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t r = r0 + y + 8 * j, c = c0 + x;
      if (r < R && c < C) tile[y + 8 * j][x] = in[r * C + c];
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t oc = c0 + y + 8 * j, orow = r0 + x;
      if (oc < C && orow < R) out[oc * R + orow] = static_cast<uint8_t>(tile[x][y + 8 * j]);
    }
    __syncthreads();
  }
}

// ---- Block quantization of activations: one block per 128 x 128 tile of in (R, K). The tile
// is staged in shared memory as BF16; row amaxes (1x128 tiles) and column amaxes (the
// transpose's 1x128 tiles, i.e. 128x1 tiles of in) both come from it.
constexpr int kBlk = kFp8BlockSize;  // 128
constexpr int kActLd = kBlk + 8;     // BF16 elements per shared row (16-byte padding)

template <Fp8Format kF>
__global__ void __launch_bounds__(kThreads)
    block_quantize_act_kernel(uint8_t* __restrict__ out, float* __restrict__ scale_inv,
                              uint8_t* __restrict__ out_t, float* __restrict__ scale_inv_t,
                              const nv_bf16* __restrict__ in, int64_t R, int64_t K,
                              bool vec_in, bool vec_out, bool vec_out_t) {
  __shared__ __align__(16) nv_bf16 tile[kBlk * kActLd];
  __shared__ uint32_t part[2][kBlk];  // column amax halves
  __shared__ float row_scale[kBlk], col_scale[kBlk];
  constexpr float kMax = kF == Fp8Format::kE4M3 ? 448.0f : 57344.0f;
  const int t = threadIdx.x;
  const int64_t b = blockIdx.x;  // tile index along K
  const int64_t p = blockIdx.y;  // tile index along R
  const int64_t r0 = p * kBlk, c0 = b * kBlk;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kBlk), R - r0));
  const int cols = static_cast<int>(min(static_cast<int64_t>(kBlk), K - c0));
  // Stage: 16 chunks of 8 BF16 per row; out-of-range elements are zeros (they change no amax
  // and are never written).
  for (int idx = t; idx < kBlk * 16; idx += kThreads) {
    const int lr = idx / 16, lc = (idx % 16) * 8;
    uint4 u = make_uint4(0, 0, 0, 0);
    if (lr < rows) {
      const nv_bf16* src = in + (r0 + lr) * K + c0 + lc;
      if (vec_in && lc < cols) {
        u = *reinterpret_cast<const uint4*>(src);  // K % 8 == 0: the chunk is whole
      } else {
        nv_bf16 v[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = lc + k < cols ? src[k] : __float2bfloat16_rn(0.0f);
        u = *reinterpret_cast<const uint4*>(v);
      }
    }
    *reinterpret_cast<uint4*>(tile + lr * kActLd + lc) = u;
  }
  __syncthreads();
  // Row amax: two threads per row (64 columns each, adjacent lanes), then their max.
  {
    const int lr = t / 2, half = t % 2;
    uint32_t m = 0;
#pragma unroll
    for (int q = 0; q < 8; ++q) {
      const uint4 u = *reinterpret_cast<const uint4*>(tile + lr * kActLd + half * 64 + q * 8);
      const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        m = max(m, (w[k] << 16) & 0x7fffffffu);
        m = max(m, w[k] & 0x7fff0000u);
      }
    }
    m = max(m, __shfl_xor_sync(0xffffffffu, m, 1));
    if (half == 0) row_scale[lr] = BlockScale(m, kMax);
  }
  // Column amax: thread t covers column t % 128 over rows 64 (t / 128) .. + 63.
  {
    const int lc = t % kBlk, half = t / kBlk;
    uint32_t m = 0;
    for (int r = half * 64; r < half * 64 + 64; ++r) {
      m = max(m, cu::AbsBits(__bfloat162float(tile[r * kActLd + lc])));
    }
    part[half][lc] = m;
  }
  __syncthreads();
  if (t < kBlk) col_scale[t] = BlockScale(max(part[0][t], part[1][t]), kMax);
  __syncthreads();
  if (out != nullptr) {
    if (t < rows) scale_inv[b * R + r0 + t] = __fdiv_rn(1.0f, row_scale[t]);
    // Codes row-major: 8 chunks of 16 per row.
    for (int idx = t; idx < kBlk * 8; idx += kThreads) {
      const int lr = idx / 8, lc = (idx % 8) * 16;
      if (lr >= rows || lc >= cols) continue;
      float x[16];
      const nv_bf16* src = tile + lr * kActLd + lc;
#pragma unroll
      for (int k = 0; k < 16; ++k) x[k] = __bfloat162float(src[k]);
      const float s = row_scale[lr];
      uint8_t* dst = out + (r0 + lr) * K + c0 + lc;
      if (vec_out && lc + 16 <= cols) {
        *reinterpret_cast<uint4*>(dst) = Encode16<kF>(x, s);
      } else {
        for (int k = 0; k < 16 && lc + k < cols; ++k) dst[k] = cu::Encode<kF>(x[k], s);
      }
    }
  }
  if (out_t != nullptr) {
    if (t < cols) scale_inv_t[p * K + c0 + t] = __fdiv_rn(1.0f, col_scale[t]);
    // Transposed codes: out_t row = column lc of the tile, 16 rows per thread step.
    for (int idx = t; idx < kBlk * 8; idx += kThreads) {
      const int lc = idx % kBlk, lg = (idx / kBlk) * 16;
      if (lc >= cols || lg >= rows) continue;
      float x[16];
#pragma unroll
      for (int k = 0; k < 16; ++k) x[k] = __bfloat162float(tile[(lg + k) * kActLd + lc]);
      const float s = col_scale[lc];
      uint8_t* dst = out_t + (c0 + lc) * R + r0 + lg;
      if (vec_out_t && lg + 16 <= rows) {
        *reinterpret_cast<uint4*>(dst) = Encode16<kF>(x, s);
      } else {
        for (int k = 0; k < 16 && lg + k < rows; ++k) dst[k] = cu::Encode<kF>(x[k], s);
      }
    }
  }
}

// ---- Block quantization of fp32 weights: one block per 128 x 128 block of w (OC, K), held in
// registers (thread t: rows (t + 256 j) / 32, columns 4 ((t + 256 j) % 32) .. + 3, j < 16).
constexpr int kWtLd = kBlk + 16;  // bytes per shared row of the code tile

template <Fp8Format kF>
__global__ void __launch_bounds__(kThreads, 2)
    block_quantize_weight_kernel(uint8_t* __restrict__ out, float* __restrict__ scale_inv,
                                 uint8_t* __restrict__ out_t, float* __restrict__ scale_inv_t,
                                 const float* __restrict__ w, int64_t OC, int64_t K,
                                 int64_t ld, int64_t ld_t, bool vec_in, bool vec_out,
                                 bool vec_out_t) {
  __shared__ __align__(16) uint8_t codes[kBlk * kWtLd];
  __shared__ uint32_t red[32];
  constexpr float kMax = kF == Fp8Format::kE4M3 ? 448.0f : 57344.0f;
  const int t = threadIdx.x;
  const int64_t b = blockIdx.x, p = blockIdx.y;
  const int64_t r0 = p * kBlk, c0 = b * kBlk;
  const int rows = static_cast<int>(min(static_cast<int64_t>(kBlk), OC - r0));
  const int cols = static_cast<int>(min(static_cast<int64_t>(kBlk), K - c0));
  float x[16][4];
  uint32_t m = 0;
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const int idx = t + kThreads * j;
    const int lr = idx / 32, lc = (idx % 32) * 4;
    const float* src = w + (r0 + lr) * K + c0 + lc;
    if (lr < rows && vec_in && lc < cols) {
      const float4 v = *reinterpret_cast<const float4*>(src);  // K % 4 == 0
      x[j][0] = v.x, x[j][1] = v.y, x[j][2] = v.z, x[j][3] = v.w;
    } else {
#pragma unroll
      for (int k = 0; k < 4; ++k) x[j][k] = lr < rows && lc + k < cols ? src[k] : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) m = max(m, cu::AbsBits(x[j][k]));
  }
  const float s = BlockScale(BlockMaxBits(m, red), kMax);
  const float si = __fdiv_rn(1.0f, s);
  if (t == 0) {
    const int64_t nb = (K + kBlk - 1) / kBlk, np = (OC + kBlk - 1) / kBlk;
    if (scale_inv != nullptr) {
      scale_inv[p * ld + b] = si;
      if (b == nb - 1) {
        for (int64_t q = nb; q < ld; ++q) scale_inv[p * ld + q] = 0.0f;
      }
    }
    if (scale_inv_t != nullptr) {
      scale_inv_t[b * ld_t + p] = si;
      if (p == np - 1) {
        for (int64_t q = np; q < ld_t; ++q) scale_inv_t[b * ld_t + q] = 0.0f;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const int idx = t + kThreads * j;
    const int lr = idx / 32, lc = (idx % 32) * 4;
    const uint32_t c4 = cu::Encode4<kF>(x[j], s);
    if (out != nullptr && lr < rows && lc < cols) {
      uint8_t* dst = out + (r0 + lr) * K + c0 + lc;
      if (vec_out && lc + 4 <= cols) {
        *reinterpret_cast<uint32_t*>(dst) = c4;
      } else {
        for (int k = 0; k < 4 && lc + k < cols; ++k) dst[k] = static_cast<uint8_t>(c4 >> (8 * k));
      }
    }
    if (out_t != nullptr) *reinterpret_cast<uint32_t*>(codes + lr * kWtLd + lc) = c4;
  }
  if (out_t == nullptr) return;
  __syncthreads();
  for (int idx = t; idx < kBlk * 8; idx += kThreads) {
    const int lc = idx % kBlk, lg = (idx / kBlk) * 16;
    if (lc >= cols || lg >= rows) continue;
    uint8_t* dst = out_t + (c0 + lc) * OC + r0 + lg;
    const uint4 v = GatherColumn16(codes, kWtLd, lg, lc);
    if (vec_out_t && lg + 16 <= rows) {
      *reinterpret_cast<uint4*>(dst) = v;
    } else {
      const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&v);
      for (int k = 0; k < 16 && lg + k < rows; ++k) dst[k] = bytes[k];
    }
  }
}

absl::Status CheckRange(const char* fn, const Fp8ScalingState& state, int first, int* count) {
  const int K = state.num_tensors();
  QT_CHECK_ARG(first >= 0 && first <= K, fn, ": first = ", first, " outside [0, ", K, "]");
  if (*count < 0) *count = K - first;
  QT_CHECK_ARG(*count <= K - first, fn, ": first = ", first, " + count = ", *count,
               " exceeds the ", K, " tensors");
  return absl::OkStatus();
}

}  // namespace

// ---- Fp8ScalingState

Fp8ScalingState::Fp8ScalingState(std::vector<Fp8TensorSpec> specs, int history_len, void* block,
                                 void* table)
    : specs_(std::move(specs)),
      num_tensors_(static_cast<int>(specs_.size())),
      history_len_(history_len),
      block_(block),
      device_specs_(table) {
  float* f = static_cast<float*>(block_);
  amax_ = f;
  scale_ = f + num_tensors_;
  scale_inv_ = f + 2 * num_tensors_;
  history_ = f + 3 * num_tensors_;
}

Fp8ScalingState::~Fp8ScalingState() {
  if (block_ != nullptr) cudaFree(block_);
  if (device_specs_ != nullptr) cudaFree(device_specs_);
}

absl::StatusOr<std::unique_ptr<Fp8ScalingState>> Fp8ScalingState::Create(
    absl::Span<const Fp8TensorSpec> specs, int history_len) {
  QT_CHECK_ARG(!specs.empty(), "Fp8ScalingState::Create: no tensors");
  QT_CHECK_ARG(specs.size() <= (1u << 24), "Fp8ScalingState::Create: ", specs.size(),
               " tensors are too many");
  QT_CHECK_ARG(history_len >= 1 && history_len <= (1 << 16),
               "Fp8ScalingState::Create: history_len = ", history_len,
               " must be in [1, 65536]");
  std::vector<DevSpec> table(specs.size());
  for (size_t k = 0; k < specs.size(); ++k) {
    QT_CHECK_ARG(specs[k].margin >= 0 && specs[k].margin <= 64, "Fp8ScalingState::Create: tensor ",
                 k, " (", FormatName(specs[k].format), "): margin = ", specs[k].margin,
                 " must be in [0, 64]");
    table[k] = DevSpec{fp8_max(specs[k].format), specs[k].margin};
  }
  const int K = static_cast<int>(specs.size());
  std::vector<float> init(static_cast<size_t>(3 + history_len) * K, 0.0f);
  std::fill(init.begin() + K, init.begin() + 3 * K, 1.0f);  // scale and scale_inv
  void* block = nullptr;
  void* dev_table = nullptr;
  CUDA_RETURN_IF_ERROR(cudaMalloc(&block, init.size() * sizeof(float)));
  auto state = std::unique_ptr<Fp8ScalingState>(new Fp8ScalingState(
      std::vector<Fp8TensorSpec>(specs.begin(), specs.end()), history_len, block, nullptr));
  CUDA_RETURN_IF_ERROR(cudaMalloc(&dev_table, table.size() * sizeof(DevSpec)));
  state->device_specs_ = dev_table;
  CUDA_RETURN_IF_ERROR(
      cudaMemcpy(block, init.data(), init.size() * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_RETURN_IF_ERROR(cudaMemcpy(dev_table, table.data(), table.size() * sizeof(DevSpec),
                                  cudaMemcpyHostToDevice));
  return state;
}

absl::Status Fp8ScalingState::Download(std::vector<float>* history,
                                       std::vector<float>* scale) const {
  QT_CHECK_ARG(history != nullptr && scale != nullptr, "Fp8ScalingState::Download: null output");
  CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  history->resize(static_cast<size_t>(num_tensors_) * history_len_);
  scale->resize(num_tensors_);
  CUDA_RETURN_IF_ERROR(cudaMemcpy(history->data(), history_, history->size() * sizeof(float),
                                  cudaMemcpyDeviceToHost));
  CUDA_RETURN_IF_ERROR(
      cudaMemcpy(scale->data(), scale_, scale->size() * sizeof(float), cudaMemcpyDeviceToHost));
  return absl::OkStatus();
}

absl::Status Fp8ScalingState::Upload(const std::vector<float>& history,
                                     const std::vector<float>& scale) {
  const size_t K = num_tensors_, H = history_len_;
  QT_CHECK_ARG(history.size() == K * H && scale.size() == K, "Fp8ScalingState::Upload: got ",
               history.size(), " history and ", scale.size(), " scale values for ", K,
               " tensors of history ", H);
  for (size_t k = 0; k < K; ++k) {
    for (size_t j = 0; j < H; ++j) {
      const float a = history[k * H + j];
      QT_CHECK_ARG(a >= 0.0f, "Fp8ScalingState::Upload: tensor ", k, " history[", j, "] = ", a,
                   " must be >= 0 (or +inf)");
    }
    QT_CHECK_ARG(std::isfinite(scale[k]) && scale[k] > 0.0f, "Fp8ScalingState::Upload: tensor ",
                 k, " scale = ", scale[k], " must be finite and > 0");
  }
  std::vector<float> head(3 * K);
  for (size_t k = 0; k < K; ++k) {
    head[k] = 0.0f;
    head[K + k] = scale[k];
    head[2 * K + k] = 1.0f / scale[k];
  }
  CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
  CUDA_RETURN_IF_ERROR(
      cudaMemcpy(amax_, head.data(), head.size() * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_RETURN_IF_ERROR(
      cudaMemcpy(history_, history.data(), K * H * sizeof(float), cudaMemcpyHostToDevice));
  return absl::OkStatus();
}

absl::Status fp8_delayed_update_cuda(const Fp8ScalingState& state, int first, int count,
                                     cudaStream_t stream) {
  RETURN_IF_ERROR(CheckRange("fp8_delayed_update_cuda", state, first, &count));
  if (count == 0) return absl::OkStatus();
  delayed_update_kernel<<<(count + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      state.amax(), state.scale(), state.scale_inv(), state.history(),
      static_cast<const DevSpec*>(state.device_specs()), first, count, state.history_len());
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status fp8_current_scale_cuda(const Fp8ScalingState& state, int first, int count,
                                    cudaStream_t stream) {
  RETURN_IF_ERROR(CheckRange("fp8_current_scale_cuda", state, first, &count));
  if (count == 0) return absl::OkStatus();
  current_scale_kernel<<<(count + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      state.amax(), state.scale(), state.scale_inv(),
      static_cast<const DevSpec*>(state.device_specs()), first, count);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

// ---- Casts, amax, transpose

absl::Status fp8_cast_cuda(uint8_t* out, uint8_t* out_t, float* amax, const bf16* in,
                           int64_t rows, int64_t cols, Fp8Format format, const float* scale,
                           cudaStream_t stream) {
  return Cast("fp8_cast_cuda", out, out_t, amax, cu::Nv(in), rows, cols, format, scale, stream);
}

absl::Status fp8_cast_cuda(uint8_t* out, uint8_t* out_t, float* amax, const float* in,
                           int64_t rows, int64_t cols, Fp8Format format, const float* scale,
                           cudaStream_t stream) {
  return Cast("fp8_cast_cuda", out, out_t, amax, in, rows, cols, format, scale, stream);
}

absl::Status fp8_amax_cuda(float* amax, const bf16* in, int64_t n, cudaStream_t stream) {
  return Amax(amax, cu::Nv(in), n, stream);
}

absl::Status fp8_amax_cuda(float* amax, const float* in, int64_t n, cudaStream_t stream) {
  return Amax(amax, in, n, stream);
}

absl::Status fp8_transpose_cuda(uint8_t* out, const uint8_t* in, int64_t rows, int64_t cols,
                                cudaStream_t stream) {
  QT_CHECK_ARG(rows >= 0 && cols >= 0, "fp8_transpose_cuda: rows = ", rows, ", cols = ", cols,
               " must be >= 0");
  QT_CHECK_ARG(out != nullptr && in != nullptr, "fp8_transpose_cuda: null pointer (out=",
               out != nullptr, " in=", in != nullptr, ")");
  if (rows == 0 || cols == 0) return absl::OkStatus();
  if (rows % 16 == 0 && cols % 16 == 0 && cu::IsAligned(in, 16) && cu::IsAligned(out, 16)) {
    const int64_t tiles = ((rows + kTT - 1) / kTT) * ((cols + kTT - 1) / kTT);
    transpose_vec_kernel<<<GridFor(tiles), kThreads, 0, stream>>>(out, in, rows, cols);
  } else {
    const int64_t tiles = ((rows + 31) / 32) * ((cols + 31) / 32);
    transpose_scalar_kernel<<<GridFor(tiles), kThreads, 0, stream>>>(out, in, rows, cols);
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

// ---- Block quantization

absl::Status fp8_block_quantize_act_cuda(uint8_t* out, float* scale_inv, uint8_t* out_t,
                                         float* scale_inv_t, const bf16* in, int64_t R,
                                         int64_t K, Fp8Format format, cudaStream_t stream) {
  constexpr const char* fn = "fp8_block_quantize_act_cuda";
  QT_CHECK_ARG(R >= 1 && K >= 1, fn, ": R = ", R, ", K = ", K, " must be >= 1");
  QT_CHECK_ARG(in != nullptr, fn, ": in is null");
  QT_CHECK_ARG((out == nullptr) == (scale_inv == nullptr), fn,
               ": out and scale_inv must be given together");
  QT_CHECK_ARG((out_t == nullptr) == (scale_inv_t == nullptr), fn,
               ": out_t and scale_inv_t must be given together");
  QT_CHECK_ARG(out != nullptr || out_t != nullptr, fn, ": no output");
  const int64_t nb = fp8_num_blocks(K), np = fp8_num_blocks(R);
  QT_CHECK_ARG(np <= 65535, fn, ": R = ", R, " exceeds the grid (", np, " row tiles > 65535)");
  const bool vec_in = K % 8 == 0 && cu::IsAligned(in, 16);
  const bool vec_out = K % 16 == 0 && cu::IsAligned(out, 16);
  const bool vec_out_t = R % 16 == 0 && cu::IsAligned(out_t, 16);
  const dim3 grid(static_cast<unsigned>(nb), static_cast<unsigned>(np));
  if (format == Fp8Format::kE4M3) {
    block_quantize_act_kernel<Fp8Format::kE4M3><<<grid, kThreads, 0, stream>>>(
        out, scale_inv, out_t, scale_inv_t, cu::Nv(in), R, K, vec_in, vec_out, vec_out_t);
  } else {
    block_quantize_act_kernel<Fp8Format::kE5M2><<<grid, kThreads, 0, stream>>>(
        out, scale_inv, out_t, scale_inv_t, cu::Nv(in), R, K, vec_in, vec_out, vec_out_t);
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status fp8_block_quantize_weight_cuda(uint8_t* out, float* scale_inv, uint8_t* out_t,
                                            float* scale_inv_t, const float* w, int64_t OC,
                                            int64_t K, Fp8Format format, cudaStream_t stream) {
  constexpr const char* fn = "fp8_block_quantize_weight_cuda";
  QT_CHECK_ARG(OC >= 1 && K >= 1, fn, ": OC = ", OC, ", K = ", K, " must be >= 1");
  QT_CHECK_ARG(w != nullptr, fn, ": w is null");
  QT_CHECK_ARG((out == nullptr) == (scale_inv == nullptr), fn,
               ": out and scale_inv must be given together");
  QT_CHECK_ARG((out_t == nullptr) == (scale_inv_t == nullptr), fn,
               ": out_t and scale_inv_t must be given together");
  QT_CHECK_ARG(out != nullptr || out_t != nullptr, fn, ": no output");
  const int64_t nb = fp8_num_blocks(K), np = fp8_num_blocks(OC);
  QT_CHECK_ARG(np <= 65535, fn, ": OC = ", OC, " exceeds the grid (", np,
               " row blocks > 65535)");
  const bool vec_in = K % 4 == 0 && cu::IsAligned(w, 16);
  const bool vec_out = K % 4 == 0 && cu::IsAligned(out, 4);
  const bool vec_out_t = OC % 16 == 0 && cu::IsAligned(out_t, 16);
  const dim3 grid(static_cast<unsigned>(nb), static_cast<unsigned>(np));
  const int64_t ld = fp8_block_scale_ld(K), ld_t = fp8_block_scale_ld(OC);
  if (format == Fp8Format::kE4M3) {
    block_quantize_weight_kernel<Fp8Format::kE4M3><<<grid, kThreads, 0, stream>>>(
        out, scale_inv, out_t, scale_inv_t, w, OC, K, ld, ld_t, vec_in, vec_out, vec_out_t);
  } else {
    block_quantize_weight_kernel<Fp8Format::kE5M2><<<grid, kThreads, 0, stream>>>(
        out, scale_inv, out_t, scale_inv_t, w, OC, K, ld, ld_t, vec_in, vec_out, vec_out_t);
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace qtrain::ops
