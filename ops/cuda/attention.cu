// CUDA causal flash attention: BF16 tensor-core kernels (mma.sync m16n8k16 fed by ldmatrix from
// cp.async-filled shared memory) for forward, dq and dk/dv, a plain warp-per-row kernel of the
// same algorithm for other head sizes, and validating launchers.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16): lane = 4 g + t. A (16x16, row-major):
// a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..). B (16x8, "col"):
// b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g). C (16x8): c0,c1 = (g, 2t..2t+1), c2,c3 =
// (g+8, 2t..). Two adjacent C tiles are therefore one A fragment, which lets the probabilities
// P computed in registers feed P.V without a trip through shared memory.
#include <algorithm>
#include <cmath>

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"

#include "ops/cuda/attention_cuda.h"
#include "ops/cuda/attention_cudnn.h"
#include "ops/cuda/cuda_status.h"
#include "ops/cuda/cuda_utils.cuh"
#include "ops/status_macros.h"

namespace qtrain::ops {
namespace {

using cu::nv_bf16;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kTcThreads = 128;  // 4 warps, 16 rows of the block's 64 each
constexpr int kTcRows = 64;      // query rows (forward, dq) or key rows (dk/dv) per block

// ---------------------------------------------------------------- PTX wrappers

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; zero-fills instead of reading when !valid.
__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, bool valid) {
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SmemAddr(smem)),
               "l"(gmem), "r"(src_size));
}

__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(p)));
}

__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(p)));
}

// d += a (16x16) * b (16x8), fp32 accumulate.
__device__ __forceinline__ void Mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// ---------------------------------------------------------------- fragments from shared memory
// Tiles are row-major with kStride = kD + 8 elements per row: the 16-byte pad puts the 8 rows
// that one ldmatrix phase reads in 8 different bank groups for every supported kD.

// A fragment of rows row0..row0+15, columns k0..k0+15.
template <int kStride>
__device__ __forceinline__ void LoadA(uint32_t (&a)[4], const nv_bf16* tile, int row0, int k0,
                                      int lane) {
  LdMatrixX4(a, tile + (row0 + (lane % 16)) * kStride + k0 + (lane / 16) * 8);
}

// B fragments of two n-tiles from a tile stored n-major (row = n, column = k): b[0], b[1] for
// n0..n0+7, b[2], b[3] for n0+8..n0+15; k0..k0+15.
template <int kStride>
__device__ __forceinline__ void LoadBPair(uint32_t (&b)[4], const nv_bf16* tile, int n0, int k0,
                                          int lane) {
  LdMatrixX4(b, tile + (n0 + (lane % 8) + (lane / 16) * 8) * kStride + k0 + ((lane / 8) % 2) * 8);
}

// The same from a tile stored k-major (row = k, column = n): the transposing load.
template <int kStride>
__device__ __forceinline__ void LoadBPairTrans(uint32_t (&b)[4], const nv_bf16* tile, int k0,
                                               int n0, int lane) {
  LdMatrixX4Trans(b, tile + (k0 + (lane % 16)) * kStride + n0 + (lane / 16) * 8);
}

// A fragment for k-step kk from fp32 accumulators of n-tiles 2kk and 2kk+1, rounded to BF16.
template <int kNT>
__device__ __forceinline__ void AccToA(uint32_t (&a)[4], const float (&acc)[kNT][4], int kk) {
  a[0] = PackBf16(acc[2 * kk][0], acc[2 * kk][1]);
  a[1] = PackBf16(acc[2 * kk][2], acc[2 * kk][3]);
  a[2] = PackBf16(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
  a[3] = PackBf16(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

// Rows [t0, t0 + kRows) of one head's slice (kD columns at `base`, rows `row_stride` apart)
// into shared memory; rows at or past T are zero-filled.
template <int kD, int kRows>
__device__ __forceinline__ void LoadTile(nv_bf16* smem, const nv_bf16* base, int64_t row_stride,
                                         int t0, int T) {
  constexpr int kChunks = kD / 8;
  constexpr int kStride = kD + 8;
  for (int c = threadIdx.x; c < kRows * kChunks; c += kTcThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const int t = t0 + r;
    const bool valid = t < T;
    CpAsync16(smem + r * kStride + col, base + (valid ? t * row_stride + col : 0), valid);
  }
}

// Adds scale * acc into BF16 rows of dst (row stride `row_stride`), rows < T only; each
// element read, summed in fp32 and rounded once.
template <int kDT>
__device__ __forceinline__ void AddRows(nv_bf16* dst, int64_t row_stride, const int (&rows)[2],
                                        int T, const float (&acc)[kDT][4], float scale, int tq) {
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    if (rows[hf] >= T) continue;
    nv_bf16* row = dst + rows[hf] * row_stride;
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
      __nv_bfloat162* p = reinterpret_cast<__nv_bfloat162*>(row + dt * 8 + 2 * tq);
      const float2 old = __bfloat1622float2(*p);
      *p = __floats2bfloat162_rn(old.x + scale * acc[dt][2 * hf],
                                 old.y + scale * acc[dt][2 * hf + 1]);
    }
  }
}

// ---------------------------------------------------------------- tensor-core forward

template <int kD, int kBn>
__global__ void __launch_bounds__(kTcThreads)
    flash_forward_kernel(nv_bf16* __restrict__ out, float* __restrict__ lse,
                         const nv_bf16* __restrict__ inp, int B, int T, int C, int NH,
                         float scale_log2) {
  constexpr int kStride = kD + 8, kNT = kBn / 8, kDT = kD / 8, kKS = kD / 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  nv_bf16* sQ = reinterpret_cast<nv_bf16*>(smem_raw);
  nv_bf16* sK = sQ + kTcRows * kStride;  // 2 stages
  nv_bf16* sV = sK + 2 * kBn * kStride;  // 2 stages

  const int BH = B * NH;
  const int num_q_tiles = (T + kTcRows - 1) / kTcRows;
  const int q_tile = num_q_tiles - 1 - static_cast<int>(blockIdx.x / BH);  // longest first
  const int bh = blockIdx.x % BH;
  const int b = bh / NH, h = bh % NH;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, tq = lane % 4;
  const int64_t C3 = 3LL * C;
  const nv_bf16* q_base = inp + static_cast<int64_t>(b) * T * C3 + h * kD;
  const nv_bf16* k_base = q_base + C;
  const nv_bf16* v_base = q_base + 2 * C;
  const int q0 = q_tile * kTcRows;
  const int q_end = min(q0 + kTcRows, T);
  const int num_k_tiles = (q_end + kBn - 1) / kBn;  // causal: keys < q_end
  const int rows[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};

  LoadTile<kD, kTcRows>(sQ, q_base, C3, q0, T);
  LoadTile<kD, kBn>(sK, k_base, C3, 0, T);
  LoadTile<kD, kBn>(sV, v_base, C3, 0, T);
  CpAsyncCommit();

  float o[kDT][4];
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  uint32_t qf[kKS][4];

  for (int j = 0; j < num_k_tiles; ++j) {
    const int stage = j & 1;
    if (j + 1 < num_k_tiles) {
      LoadTile<kD, kBn>(sK + (stage ^ 1) * kBn * kStride, k_base, C3, (j + 1) * kBn, T);
      LoadTile<kD, kBn>(sV + (stage ^ 1) * kBn * kStride, v_base, C3, (j + 1) * kBn, T);
      CpAsyncCommit();
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < kKS; ++kk) LoadA<kStride>(qf[kk], sQ, warp * 16, kk * 16, lane);
    }
    const nv_bf16* k_s = sK + stage * kBn * kStride;
    const nv_bf16* v_s = sV + stage * kBn * kStride;

    float s[kNT][4];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kKS; ++kk) {
#pragma unroll
      for (int np = 0; np < kBn / 16; ++np) {
        uint32_t bf[4];
        LoadBPair<kStride>(bf, k_s, np * 16, kk * 16, lane);
        Mma(s[2 * np], qf[kk], bf[0], bf[1]);
        Mma(s[2 * np + 1], qf[kk], bf[2], bf[3]);
      }
    }

    const int k0 = j * kBn;
    float mloc[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int hf = e / 2;
        const int key = k0 + nt * 8 + 2 * tq + (e % 2);
        float x = s[nt][e] * scale_log2;
        if (key > rows[hf] || key >= T) x = -INFINITY;
        s[nt][e] = x;
        mloc[hf] = fmaxf(mloc[hf], x);
      }
    }
    float m_use[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      mloc[hf] = fmaxf(mloc[hf], __shfl_xor_sync(0xffffffffu, mloc[hf], 1));
      mloc[hf] = fmaxf(mloc[hf], __shfl_xor_sync(0xffffffffu, mloc[hf], 2));
      const float m_new = fmaxf(m[hf], mloc[hf]);
      // A row with nothing unmasked yet keeps m = -inf; use 0 so that exp2 gives 0, not NaN.
      m_use[hf] = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m[hf] - m_use[hf]);
      m[hf] = m_new;
      l[hf] *= alpha;
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        o[dt][2 * hf] *= alpha;
        o[dt][2 * hf + 1] *= alpha;
      }
    }
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = exp2f(s[nt][e] - m_use[e / 2]);
        s[nt][e] = p;
        l[e / 2] += p;
      }
    }
#pragma unroll
    for (int kk = 0; kk < kBn / 16; ++kk) {
      uint32_t pa[4];
      AccToA<kNT>(pa, s, kk);
#pragma unroll
      for (int dp = 0; dp < kD / 16; ++dp) {
        uint32_t bf[4];
        LoadBPairTrans<kStride>(bf, v_s, kk * 16, dp * 16, lane);
        Mma(o[2 * dp], pa, bf[0], bf[1]);
        Mma(o[2 * dp + 1], pa, bf[2], bf[3]);
      }
    }
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  }

#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    l[hf] += __shfl_xor_sync(0xffffffffu, l[hf], 1);
    l[hf] += __shfl_xor_sync(0xffffffffu, l[hf], 2);
    if (rows[hf] >= T) continue;
    const float inv = 1.f / l[hf];
    nv_bf16* o_row = out + (static_cast<int64_t>(b) * T + rows[hf]) * C + h * kD;
#pragma unroll
    for (int dt = 0; dt < kDT; ++dt) {
      *reinterpret_cast<__nv_bfloat162*>(o_row + dt * 8 + 2 * tq) =
          __floats2bfloat162_rn(o[dt][2 * hf] * inv, o[dt][2 * hf + 1] * inv);
    }
    if (tq == 0) lse[static_cast<int64_t>(bh) * T + rows[hf]] = (m[hf] + log2f(l[hf])) * kLn2;
  }
}

// ---------------------------------------------------------------- backward: D = rowsum(dO * O)

__global__ void attention_backward_dot_kernel(float* __restrict__ dvec,
                                              const nv_bf16* __restrict__ dout,
                                              const nv_bf16* __restrict__ out, int B, int T,
                                              int C, int NH) {
  const int hs = C / NH;
  const int64_t rows = static_cast<int64_t>(B) * NH * T;
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (r >= rows) return;
  const int t = static_cast<int>(r % T);
  const int64_t bh = r / T;
  const int b = static_cast<int>(bh / NH), h = static_cast<int>(bh % NH);
  const int64_t off = (static_cast<int64_t>(b) * T + t) * C + static_cast<int64_t>(h) * hs;
  float acc = 0.f;
  for (int d = lane; d < hs; d += 32) {
    acc += __bfloat162float(dout[off + d]) * __bfloat162float(out[off + d]);
  }
  acc = cu::WarpSum(acc);
  if (lane == 0) dvec[r] = acc;
}

// ---------------------------------------------------------------- tensor-core dq

template <int kD, int kBn>
__global__ void __launch_bounds__(kTcThreads)
    flash_backward_dq_kernel(nv_bf16* __restrict__ dinp, const nv_bf16* __restrict__ dout,
                             const nv_bf16* __restrict__ inp, const float* __restrict__ lse,
                             const float* __restrict__ dvec, int B, int T, int C, int NH,
                             float scale_log2, float scale) {
  constexpr int kStride = kD + 8, kNT = kBn / 8, kDT = kD / 8, kKS = kD / 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  nv_bf16* sQ = reinterpret_cast<nv_bf16*>(smem_raw);
  nv_bf16* sdO = sQ + kTcRows * kStride;
  nv_bf16* sK = sdO + kTcRows * kStride;  // 2 stages
  nv_bf16* sV = sK + 2 * kBn * kStride;   // 2 stages

  const int BH = B * NH;
  const int num_q_tiles = (T + kTcRows - 1) / kTcRows;
  const int q_tile = num_q_tiles - 1 - static_cast<int>(blockIdx.x / BH);
  const int bh = blockIdx.x % BH;
  const int b = bh / NH, h = bh % NH;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, tq = lane % 4;
  const int64_t C3 = 3LL * C;
  const nv_bf16* q_base = inp + static_cast<int64_t>(b) * T * C3 + h * kD;
  const nv_bf16* k_base = q_base + C;
  const nv_bf16* v_base = q_base + 2 * C;
  const nv_bf16* do_base = dout + static_cast<int64_t>(b) * T * C + h * kD;
  const int q0 = q_tile * kTcRows;
  const int q_end = min(q0 + kTcRows, T);
  const int num_k_tiles = (q_end + kBn - 1) / kBn;
  const int rows[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};

  LoadTile<kD, kTcRows>(sQ, q_base, C3, q0, T);
  LoadTile<kD, kTcRows>(sdO, do_base, C, q0, T);
  LoadTile<kD, kBn>(sK, k_base, C3, 0, T);
  LoadTile<kD, kBn>(sV, v_base, C3, 0, T);
  CpAsyncCommit();

  float lse2[2], drow[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const bool valid = rows[hf] < T;
    lse2[hf] = valid ? lse[static_cast<int64_t>(bh) * T + rows[hf]] * kLog2e : 0.f;
    drow[hf] = valid ? dvec[static_cast<int64_t>(bh) * T + rows[hf]] : 0.f;
  }
  float dq[kDT][4];
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.f;

  for (int j = 0; j < num_k_tiles; ++j) {
    const int stage = j & 1;
    if (j + 1 < num_k_tiles) {
      LoadTile<kD, kBn>(sK + (stage ^ 1) * kBn * kStride, k_base, C3, (j + 1) * kBn, T);
      LoadTile<kD, kBn>(sV + (stage ^ 1) * kBn * kStride, v_base, C3, (j + 1) * kBn, T);
      CpAsyncCommit();
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();
    const nv_bf16* k_s = sK + stage * kBn * kStride;
    const nv_bf16* v_s = sV + stage * kBn * kStride;

    float s[kNT][4], dp[kNT][4];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < kKS; ++kk) {
      uint32_t qa[4], da[4];
      LoadA<kStride>(qa, sQ, warp * 16, kk * 16, lane);
      LoadA<kStride>(da, sdO, warp * 16, kk * 16, lane);
#pragma unroll
      for (int np = 0; np < kBn / 16; ++np) {
        uint32_t bf[4];
        LoadBPair<kStride>(bf, k_s, np * 16, kk * 16, lane);
        Mma(s[2 * np], qa, bf[0], bf[1]);
        Mma(s[2 * np + 1], qa, bf[2], bf[3]);
        LoadBPair<kStride>(bf, v_s, np * 16, kk * 16, lane);
        Mma(dp[2 * np], da, bf[0], bf[1]);
        Mma(dp[2 * np + 1], da, bf[2], bf[3]);
      }
    }
    const int k0 = j * kBn;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int hf = e / 2;
        const int key = k0 + nt * 8 + 2 * tq + (e % 2);
        const bool masked = key > rows[hf] || key >= T;
        const float p = masked ? 0.f : exp2f(s[nt][e] * scale_log2 - lse2[hf]);
        s[nt][e] = p * (dp[nt][e] - drow[hf]);  // dS
      }
    }
#pragma unroll
    for (int kk = 0; kk < kBn / 16; ++kk) {
      uint32_t sa[4];
      AccToA<kNT>(sa, s, kk);
#pragma unroll
      for (int dpair = 0; dpair < kD / 16; ++dpair) {
        uint32_t bf[4];
        LoadBPairTrans<kStride>(bf, k_s, kk * 16, dpair * 16, lane);
        Mma(dq[2 * dpair], sa, bf[0], bf[1]);
        Mma(dq[2 * dpair + 1], sa, bf[2], bf[3]);
      }
    }
    __syncthreads();
  }
  AddRows<kDT>(dinp + static_cast<int64_t>(b) * T * C3 + h * kD, C3, rows, T, dq, scale, tq);
}

// ---------------------------------------------------------------- tensor-core dk, dv

template <int kD, int kBn>
__global__ void __launch_bounds__(kTcThreads)
    flash_backward_dkdv_kernel(nv_bf16* __restrict__ dinp, const nv_bf16* __restrict__ dout,
                               const nv_bf16* __restrict__ inp, const float* __restrict__ lse,
                               const float* __restrict__ dvec, int B, int T, int C, int NH,
                               float scale_log2, float scale) {
  constexpr int kStride = kD + 8, kNT = kBn / 8, kDT = kD / 8, kKS = kD / 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  nv_bf16* sK = reinterpret_cast<nv_bf16*>(smem_raw);
  nv_bf16* sV = sK + kTcRows * kStride;
  nv_bf16* sQ = sV + kTcRows * kStride;   // 2 stages
  nv_bf16* sdO = sQ + 2 * kBn * kStride;  // 2 stages
  float* s_lse = reinterpret_cast<float*>(sdO + 2 * kBn * kStride);  // 2 stages of kBn
  float* s_d = s_lse + 2 * kBn;                                        // 2 stages of kBn

  const int BH = B * NH;
  const int k_tile = static_cast<int>(blockIdx.x / BH);  // the first tiles see the most queries
  const int bh = blockIdx.x % BH;
  const int b = bh / NH, h = bh % NH;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, tq = lane % 4;
  const int64_t C3 = 3LL * C;
  const nv_bf16* q_base = inp + static_cast<int64_t>(b) * T * C3 + h * kD;
  const nv_bf16* k_base = q_base + C;
  const nv_bf16* v_base = q_base + 2 * C;
  const nv_bf16* do_base = dout + static_cast<int64_t>(b) * T * C + h * kD;
  const float* lse_bh = lse + static_cast<int64_t>(bh) * T;
  const float* d_bh = dvec + static_cast<int64_t>(bh) * T;
  const int k0 = k_tile * kTcRows;
  const int i_begin = k0 / kBn;  // queries before k0 see none of these keys
  const int num_q_tiles = (T + kBn - 1) / kBn;
  const int keys[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};

  LoadTile<kD, kTcRows>(sK, k_base, C3, k0, T);
  LoadTile<kD, kTcRows>(sV, v_base, C3, k0, T);
  LoadTile<kD, kBn>(sQ, q_base, C3, i_begin * kBn, T);
  LoadTile<kD, kBn>(sdO, do_base, C, i_begin * kBn, T);
  CpAsyncCommit();
  for (int r = threadIdx.x; r < kBn; r += kTcThreads) {
    const int q = i_begin * kBn + r;
    s_lse[r] = q < T ? lse_bh[q] * kLog2e : INFINITY;  // padding queries get p = 0
    s_d[r] = q < T ? d_bh[q] : 0.f;
  }

  float dk[kDT][4], dv[kDT][4];
#pragma unroll
  for (int dt = 0; dt < kDT; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.f;
  }

  for (int i = i_begin; i < num_q_tiles; ++i) {
    const int stage = (i - i_begin) & 1;
    if (i + 1 < num_q_tiles) {
      const int nstage = stage ^ 1;
      LoadTile<kD, kBn>(sQ + nstage * kBn * kStride, q_base, C3, (i + 1) * kBn, T);
      LoadTile<kD, kBn>(sdO + nstage * kBn * kStride, do_base, C, (i + 1) * kBn, T);
      CpAsyncCommit();
      for (int r = threadIdx.x; r < kBn; r += kTcThreads) {
        const int q = (i + 1) * kBn + r;
        s_lse[nstage * kBn + r] = q < T ? lse_bh[q] * kLog2e : INFINITY;
        s_d[nstage * kBn + r] = q < T ? d_bh[q] : 0.f;
      }
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();
    const nv_bf16* q_s = sQ + stage * kBn * kStride;
    const nv_bf16* do_s = sdO + stage * kBn * kStride;
    const float* lse_s = s_lse + stage * kBn;
    const float* d_s = s_d + stage * kBn;

    // S^T = K Q^T and dP^T = V dO^T (rows: this warp's 16 keys; columns: kBn queries).
    float st[kNT][4], dpt[kNT][4];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < kKS; ++kk) {
      uint32_t ka[4], va[4];
      LoadA<kStride>(ka, sK, warp * 16, kk * 16, lane);
      LoadA<kStride>(va, sV, warp * 16, kk * 16, lane);
#pragma unroll
      for (int np = 0; np < kBn / 16; ++np) {
        uint32_t bf[4];
        LoadBPair<kStride>(bf, q_s, np * 16, kk * 16, lane);
        Mma(st[2 * np], ka, bf[0], bf[1]);
        Mma(st[2 * np + 1], ka, bf[2], bf[3]);
        LoadBPair<kStride>(bf, do_s, np * 16, kk * 16, lane);
        Mma(dpt[2 * np], va, bf[0], bf[1]);
        Mma(dpt[2 * np + 1], va, bf[2], bf[3]);
      }
    }
    // P^T, then dS^T = P^T (dP^T - D) in dpt.
    const int q0 = i * kBn;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int hf = e / 2;
        const int qi = nt * 8 + 2 * tq + (e % 2);
        const bool masked = q0 + qi < keys[hf];  // queries past T have lse = inf: p = 0
        const float p = masked ? 0.f : exp2f(st[nt][e] * scale_log2 - lse_s[qi]);
        st[nt][e] = p;
        dpt[nt][e] = p * (dpt[nt][e] - d_s[qi]);
      }
    }
    // dV += P^T dO, dK += dS^T Q.
#pragma unroll
    for (int kk = 0; kk < kBn / 16; ++kk) {
      uint32_t pa[4], sa[4];
      AccToA<kNT>(pa, st, kk);
      AccToA<kNT>(sa, dpt, kk);
#pragma unroll
      for (int dpair = 0; dpair < kD / 16; ++dpair) {
        uint32_t bf[4];
        LoadBPairTrans<kStride>(bf, do_s, kk * 16, dpair * 16, lane);
        Mma(dv[2 * dpair], pa, bf[0], bf[1]);
        Mma(dv[2 * dpair + 1], pa, bf[2], bf[3]);
        LoadBPairTrans<kStride>(bf, q_s, kk * 16, dpair * 16, lane);
        Mma(dk[2 * dpair], sa, bf[0], bf[1]);
        Mma(dk[2 * dpair + 1], sa, bf[2], bf[3]);
      }
    }
    __syncthreads();
  }
  nv_bf16* dbase = dinp + static_cast<int64_t>(b) * T * C3 + h * kD;
  AddRows<kDT>(dbase + C, C3, keys, T, dk, scale, tq);
  AddRows<kDT>(dbase + 2 * C, C3, keys, T, dv, 1.f, tq);
}

// ---------------------------------------------------------------- plain kernels (any hs <= 256)
// One warp per row; lane owns dims lane, lane + 32, ...; fp32 throughout (P is not rounded).

template <int kPer>
__device__ __forceinline__ void LoadHead(float (&x)[kPer], const nv_bf16* p, int hs, int lane) {
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + 32 * i;
    x[i] = d < hs ? __bfloat162float(p[d]) : 0.f;
  }
}

template <int kPer>
__device__ __forceinline__ float Dot(const float (&a)[kPer], const float (&b)[kPer]) {
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < kPer; ++i) s += a[i] * b[i];
  return cu::WarpSum(s);
}

template <int kPer>
__device__ __forceinline__ void AddHead(nv_bf16* p, const float (&x)[kPer], float scale, int hs,
                                        int lane) {
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + 32 * i;
    if (d < hs) p[d] = __float2bfloat16_rn(__bfloat162float(p[d]) + scale * x[i]);
  }
}

template <int kPer>
__global__ void simple_forward_kernel(nv_bf16* __restrict__ out, float* __restrict__ lse,
                                      const nv_bf16* __restrict__ inp, int B, int T, int C,
                                      int NH, float scale_log2) {
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (r >= static_cast<int64_t>(B) * NH * T) return;
  const int hs = C / NH;
  const int t = static_cast<int>(r % T);
  const int bh = static_cast<int>(r / T);
  const int b = bh / NH, h = bh % NH;
  const int64_t C3 = 3LL * C;
  const nv_bf16* base = inp + static_cast<int64_t>(b) * T * C3 + static_cast<int64_t>(h) * hs;
  float q[kPer], k[kPer], v[kPer], o[kPer];
  LoadHead(q, base + t * C3, hs, lane);
#pragma unroll
  for (int i = 0; i < kPer; ++i) o[i] = 0.f;
  float m = -INFINITY, l = 0.f;
  for (int t2 = 0; t2 <= t; ++t2) {
    LoadHead(k, base + t2 * C3 + C, hs, lane);
    LoadHead(v, base + t2 * C3 + 2 * C, hs, lane);
    const float x = Dot(q, k) * scale_log2;
    const float m_new = fmaxf(m, x);
    const float alpha = exp2f(m - m_new);
    const float p = exp2f(x - m_new);
    l = l * alpha + p;
#pragma unroll
    for (int i = 0; i < kPer; ++i) o[i] = o[i] * alpha + p * v[i];
    m = m_new;
  }
  nv_bf16* o_row = out + (static_cast<int64_t>(b) * T + t) * C + static_cast<int64_t>(h) * hs;
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int d = lane + 32 * i;
    if (d < hs) o_row[d] = __float2bfloat16_rn(o[i] / l);
  }
  if (lane == 0) lse[r] = (m + log2f(l)) * kLn2;
}

template <int kPer>
__global__ void simple_backward_dq_kernel(nv_bf16* __restrict__ dinp,
                                          const nv_bf16* __restrict__ dout,
                                          const nv_bf16* __restrict__ inp,
                                          const float* __restrict__ lse,
                                          const float* __restrict__ dvec, int B, int T, int C,
                                          int NH, float scale_log2, float scale) {
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (r >= static_cast<int64_t>(B) * NH * T) return;
  const int hs = C / NH;
  const int t = static_cast<int>(r % T);
  const int bh = static_cast<int>(r / T);
  const int b = bh / NH, h = bh % NH;
  const int64_t C3 = 3LL * C;
  const int64_t head = static_cast<int64_t>(h) * hs;
  const nv_bf16* base = inp + static_cast<int64_t>(b) * T * C3 + head;
  float q[kPer], dy[kPer], k[kPer], v[kPer], dq[kPer];
  LoadHead(q, base + t * C3, hs, lane);
  LoadHead(dy, dout + (static_cast<int64_t>(b) * T + t) * C + head, hs, lane);
#pragma unroll
  for (int i = 0; i < kPer; ++i) dq[i] = 0.f;
  const float lse2 = lse[r] * kLog2e, d = dvec[r];
  for (int t2 = 0; t2 <= t; ++t2) {
    LoadHead(k, base + t2 * C3 + C, hs, lane);
    LoadHead(v, base + t2 * C3 + 2 * C, hs, lane);
    const float p = exp2f(Dot(q, k) * scale_log2 - lse2);
    const float ds = p * (Dot(dy, v) - d);
#pragma unroll
    for (int i = 0; i < kPer; ++i) dq[i] += ds * k[i];
  }
  AddHead(dinp + static_cast<int64_t>(b) * T * C3 + head + t * C3, dq, scale, hs, lane);
}

template <int kPer>
__global__ void simple_backward_dkdv_kernel(nv_bf16* __restrict__ dinp,
                                            const nv_bf16* __restrict__ dout,
                                            const nv_bf16* __restrict__ inp,
                                            const float* __restrict__ lse,
                                            const float* __restrict__ dvec, int B, int T, int C,
                                            int NH, float scale_log2, float scale) {
  const int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (r >= static_cast<int64_t>(B) * NH * T) return;
  const int hs = C / NH;
  const int t2 = static_cast<int>(r % T);  // the key row
  const int bh = static_cast<int>(r / T);
  const int b = bh / NH, h = bh % NH;
  const int64_t C3 = 3LL * C;
  const int64_t head = static_cast<int64_t>(h) * hs;
  const nv_bf16* base = inp + static_cast<int64_t>(b) * T * C3 + head;
  const float* lse_bh = lse + static_cast<int64_t>(bh) * T;
  const float* d_bh = dvec + static_cast<int64_t>(bh) * T;
  float k[kPer], v[kPer], q[kPer], dy[kPer], dk[kPer], dv[kPer];
  LoadHead(k, base + t2 * C3 + C, hs, lane);
  LoadHead(v, base + t2 * C3 + 2 * C, hs, lane);
#pragma unroll
  for (int i = 0; i < kPer; ++i) dk[i] = dv[i] = 0.f;
  for (int t = t2; t < T; ++t) {
    LoadHead(q, base + t * C3, hs, lane);
    LoadHead(dy, dout + (static_cast<int64_t>(b) * T + t) * C + head, hs, lane);
    const float p = exp2f(Dot(q, k) * scale_log2 - lse_bh[t] * kLog2e);
    const float ds = p * (Dot(dy, v) - d_bh[t]);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      dv[i] += p * dy[i];
      dk[i] += ds * q[i];
    }
  }
  nv_bf16* drow = dinp + static_cast<int64_t>(b) * T * C3 + head + t2 * C3;
  AddHead(drow + C, dk, scale, hs, lane);
  AddHead(drow + 2 * C, dv, 1.f, hs, lane);
}

// ---------------------------------------------------------------- dispatch

bool TensorCoreHeadSize(int hs) {
  return hs == 32 || hs == 64 || hs == 80 || hs == 96 || hs == 128;
}

constexpr int kSimpleThreads = 128;

int SimpleBlocks(int B, int T, int NH) {
  const int64_t warps = static_cast<int64_t>(B) * NH * T;
  return static_cast<int>((warps * 32 + kSimpleThreads - 1) / kSimpleThreads);
}

// kBn of the dk/dv kernel: 32 for the large heads keeps its accumulators in registers.
template <int kD>
constexpr int DkdvBn() {
  return kD > 96 ? 32 : 64;
}

template <int kD>
constexpr int FwdSmem() {
  return (kTcRows + 4 * 64) * (kD + 8) * 2;
}
template <int kD>
constexpr int DqSmem() {
  return (2 * kTcRows + 4 * 64) * (kD + 8) * 2;
}
template <int kD>
constexpr int DkdvSmem() {
  return (2 * kTcRows + 4 * DkdvBn<kD>()) * (kD + 8) * 2 + 4 * DkdvBn<kD>() * 4;
}

template <int kD>
absl::Status LaunchTcForward(nv_bf16* out, float* lse, const nv_bf16* inp, int B, int T, int C,
                             int NH, float scale_log2, cudaStream_t stream) {
  auto kernel = flash_forward_kernel<kD, 64>;
  constexpr int smem = FwdSmem<kD>();
  CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const int64_t blocks = static_cast<int64_t>((T + kTcRows - 1) / kTcRows) * B * NH;
  kernel<<<static_cast<unsigned>(blocks), kTcThreads, smem, stream>>>(out, lse, inp, B, T, C,
                                                                      NH, scale_log2);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

template <int kD>
absl::Status LaunchTcBackward(nv_bf16* dinp, const nv_bf16* dout, const nv_bf16* inp,
                              const float* lse, const float* dvec, int B, int T, int C, int NH,
                              float scale_log2, float scale, cudaStream_t stream) {
  const int64_t tiles = (T + kTcRows - 1) / kTcRows;
  const unsigned blocks = static_cast<unsigned>(tiles * B * NH);
  auto dq = flash_backward_dq_kernel<kD, 64>;
  constexpr int dq_smem = DqSmem<kD>();
  CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(dq, cudaFuncAttributeMaxDynamicSharedMemorySize, dq_smem));
  dq<<<blocks, kTcThreads, dq_smem, stream>>>(dinp, dout, inp, lse, dvec, B, T, C, NH,
                                              scale_log2, scale);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  auto dkdv = flash_backward_dkdv_kernel<kD, DkdvBn<kD>()>;
  constexpr int dkdv_smem = DkdvSmem<kD>();
  CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(dkdv, cudaFuncAttributeMaxDynamicSharedMemorySize, dkdv_smem));
  dkdv<<<blocks, kTcThreads, dkdv_smem, stream>>>(dinp, dout, inp, lse, dvec, B, T, C, NH,
                                                  scale_log2, scale);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

template <int kPer>
absl::Status LaunchSimpleForward(nv_bf16* out, float* lse, const nv_bf16* inp, int B, int T,
                                 int C, int NH, float scale_log2, cudaStream_t stream) {
  simple_forward_kernel<kPer><<<SimpleBlocks(B, T, NH), kSimpleThreads, 0, stream>>>(
      out, lse, inp, B, T, C, NH, scale_log2);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

template <int kPer>
absl::Status LaunchSimpleBackward(nv_bf16* dinp, const nv_bf16* dout, const nv_bf16* inp,
                                  const float* lse, const float* dvec, int B, int T, int C,
                                  int NH, float scale_log2, float scale, cudaStream_t stream) {
  simple_backward_dq_kernel<kPer><<<SimpleBlocks(B, T, NH), kSimpleThreads, 0, stream>>>(
      dinp, dout, inp, lse, dvec, B, T, C, NH, scale_log2, scale);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  simple_backward_dkdv_kernel<kPer><<<SimpleBlocks(B, T, NH), kSimpleThreads, 0, stream>>>(
      dinp, dout, inp, lse, dvec, B, T, C, NH, scale_log2, scale);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

// Validates shapes and picks the kernel; sets *tensor_cores.
absl::Status Plan(const char* op, int B, int T, int C, int NH, const void* inp,
                  AttentionKernel kernel, bool* tensor_cores) {
  QT_CHECK_ARG(B > 0 && T > 0 && C > 0 && NH > 0, op, ": B, T, C, NH must be > 0, got B=", B,
               " T=", T, " C=", C, " NH=", NH);
  QT_CHECK_ARG(C % NH == 0, op, ": NH=", NH, " must divide C=", C);
  const int hs = C / NH;
  QT_CHECK_ARG(static_cast<int64_t>(B) * NH * T * 32 < (int64_t{1} << 31), op,
               ": B*NH*T too large for the grid (B=", B, " NH=", NH, " T=", T, ")");
  const bool tc_ok = TensorCoreHeadSize(hs) && cu::IsAligned(inp, 16);
  if (kernel == AttentionKernel::kCudnn) kernel = AttentionKernel::kAuto;  // our fallback
  if (kernel == AttentionKernel::kTensorCore) {
    QT_CHECK_ARG(tc_ok, op, ": the tensor-core kernel needs head size 32, 64, 80, 96 or 128 and "
                 "a 16-byte aligned inp; got head size ", hs);
  }
  *tensor_cores = kernel != AttentionKernel::kSimple && tc_ok;
  QT_CHECK_ARG(*tensor_cores || hs <= 256, op, ": head size ", hs,
               " > 256 is not supported by the plain kernel");
  return absl::OkStatus();
}

}  // namespace

bool attention_cuda_uses_tensor_cores(int head_size) { return TensorCoreHeadSize(head_size); }

bool attention_cuda_cudnn_available(int head_size, const void* inp) {
  return cudnn_attention::Supported(head_size, &inp, 1);
}

namespace {

// Whether to run cuDNN: kCudnn demands it (errors where it cannot), kAuto takes it where it
// applies. `ptrs` are the tensors cuDNN reads or writes.
absl::Status WantCudnn(const char* op, AttentionKernel kernel, bool deterministic, bool overwrite,
                       int T, int C, int NH, const void* const* ptrs, int n, bool* use) {
  *use = false;
  if (kernel != AttentionKernel::kAuto && kernel != AttentionKernel::kCudnn) return absl::OkStatus();
  // T >= 16: at T = 1 (H100, cuDNN 9.14) the backward left half of dq and dk unwritten.
  const bool ok = !deterministic && overwrite && NH > 0 && C % NH == 0 && T >= 16 &&
                  cudnn_attention::Supported(C / NH, ptrs, n);
  if (kernel == AttentionKernel::kCudnn) {
    QT_CHECK_ARG(!deterministic, op, ": kCudnn is not deterministic (dq is summed with atomics)");
    QT_CHECK_ARG(overwrite, op, ": kCudnn overwrites dinp; pass GradWrite::kOverwrite");
    if (!ok) {
      return absl::FailedPreconditionError(absl::StrCat(
          op, ": cuDNN attention does not apply (needs head size a multiple of 8 up to 128, got ",
          NH > 0 ? C / NH : 0, ", T=", T, "; T >= 16; 16-byte aligned pointers; a Hopper GPU; "
          "cuDNN >= 9)"));
    }
  }
  *use = ok;
  return absl::OkStatus();
}

}  // namespace

absl::Status attention_forward_cuda(bf16* out, float* lse, const bf16* inp, int B, int T, int C,
                                    int NH, cudaStream_t stream, AttentionKernel kernel,
                                    bool deterministic) {
  QT_CHECK_ARG(out != nullptr && lse != nullptr && inp != nullptr,
               "attention_forward_cuda: null pointer (out=", out != nullptr,
               " lse=", lse != nullptr, " inp=", inp != nullptr, ")");
  bool tc = false;
  RETURN_IF_ERROR(Plan("attention_forward_cuda", B, T, C, NH, inp, kernel, &tc));
  {
    const void* ptrs[] = {inp, out, lse};
    bool use = false;
    RETURN_IF_ERROR(WantCudnn("attention_forward_cuda", kernel, deterministic, true, T, C, NH, ptrs,
                              3, &use));
    if (use) {
      absl::Status s = cudnn_attention::Forward(out, lse, inp, B, T, C, NH, stream);
      if (s.ok() || kernel == AttentionKernel::kCudnn) return s;
    }
  }
  const int hs = C / NH;
  const float scale_log2 = kLog2e / std::sqrt(static_cast<float>(hs));
  nv_bf16* o = cu::Nv(out);
  const nv_bf16* x = cu::Nv(inp);
  if (tc) {
    switch (hs) {
      case 32: return LaunchTcForward<32>(o, lse, x, B, T, C, NH, scale_log2, stream);
      case 64: return LaunchTcForward<64>(o, lse, x, B, T, C, NH, scale_log2, stream);
      case 80: return LaunchTcForward<80>(o, lse, x, B, T, C, NH, scale_log2, stream);
      case 96: return LaunchTcForward<96>(o, lse, x, B, T, C, NH, scale_log2, stream);
      default: return LaunchTcForward<128>(o, lse, x, B, T, C, NH, scale_log2, stream);
    }
  }
  if (hs <= 32) return LaunchSimpleForward<1>(o, lse, x, B, T, C, NH, scale_log2, stream);
  if (hs <= 64) return LaunchSimpleForward<2>(o, lse, x, B, T, C, NH, scale_log2, stream);
  if (hs <= 128) return LaunchSimpleForward<4>(o, lse, x, B, T, C, NH, scale_log2, stream);
  return LaunchSimpleForward<8>(o, lse, x, B, T, C, NH, scale_log2, stream);
}

int64_t attention_backward_cuda_workspace_bytes(int B, int T, int NH) {
  if (B <= 0 || T <= 0 || NH <= 0) return 0;
  return static_cast<int64_t>(B) * NH * T * static_cast<int64_t>(sizeof(float));
}

absl::Status attention_backward_cuda(bf16* dinp, const bf16* dout, const bf16* inp,
                                     const bf16* out, const float* lse, int B, int T, int C,
                                     int NH, void* workspace, int64_t workspace_bytes,
                                     cudaStream_t stream, AttentionKernel kernel, GradWrite write,
                                     bool deterministic) {
  QT_CHECK_ARG(dinp != nullptr && dout != nullptr && inp != nullptr && out != nullptr &&
                   lse != nullptr,
               "attention_backward_cuda: null pointer (dinp=", dinp != nullptr,
               " dout=", dout != nullptr, " inp=", inp != nullptr, " out=", out != nullptr,
               " lse=", lse != nullptr, ")");
  bool tc = false;
  RETURN_IF_ERROR(Plan("attention_backward_cuda", B, T, C, NH, inp, kernel, &tc));
  {
    const void* ptrs[] = {dinp, dout, inp, out, lse};
    bool use = false;
    RETURN_IF_ERROR(WantCudnn("attention_backward_cuda", kernel, deterministic,
                              write == GradWrite::kOverwrite, T, C, NH, ptrs, 5, &use));
    if (use) {
      absl::Status s = cudnn_attention::Backward(dinp, dout, inp, out, lse, B, T, C, NH, stream);
      if (s.ok() || kernel == AttentionKernel::kCudnn) return s;
    }
  }
  if (write == GradWrite::kOverwrite) {
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dinp, 0, static_cast<size_t>(B) * T * 3 * C * 2, stream));
  }
  if (tc) {
    QT_CHECK_ARG(cu::IsAligned(dinp, 16) && cu::IsAligned(dout, 16),
                 "attention_backward_cuda: the tensor-core kernel needs 16-byte aligned dinp "
                 "and dout");
  }
  const int64_t need = attention_backward_cuda_workspace_bytes(B, T, NH);
  QT_CHECK_ARG(workspace != nullptr && workspace_bytes >= need,
               "attention_backward_cuda: workspace of ", workspace_bytes, " bytes (",
               workspace != nullptr ? "non-null" : "null", "), needs ", need);
  QT_CHECK_ARG(cu::IsAligned(workspace, 4), "attention_backward_cuda: workspace misaligned");
  const int hs = C / NH;
  const float scale = 1.f / std::sqrt(static_cast<float>(hs));
  const float scale_log2 = kLog2e * scale;
  float* dvec = static_cast<float*>(workspace);
  const int64_t rows = static_cast<int64_t>(B) * NH * T;
  attention_backward_dot_kernel<<<static_cast<unsigned>((rows * 32 + 255) / 256), 256, 0,
                                  stream>>>(dvec, cu::Nv(dout), cu::Nv(out), B, T, C, NH);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  nv_bf16* dx = cu::Nv(dinp);
  const nv_bf16* dy = cu::Nv(dout);
  const nv_bf16* x = cu::Nv(inp);
  if (tc) {
    switch (hs) {
      case 32:
        return LaunchTcBackward<32>(dx, dy, x, lse, dvec, B, T, C, NH, scale_log2, scale, stream);
      case 64:
        return LaunchTcBackward<64>(dx, dy, x, lse, dvec, B, T, C, NH, scale_log2, scale, stream);
      case 80:
        return LaunchTcBackward<80>(dx, dy, x, lse, dvec, B, T, C, NH, scale_log2, scale, stream);
      case 96:
        return LaunchTcBackward<96>(dx, dy, x, lse, dvec, B, T, C, NH, scale_log2, scale, stream);
      default:
        return LaunchTcBackward<128>(dx, dy, x, lse, dvec, B, T, C, NH, scale_log2, scale,
                                     stream);
    }
  }
  if (hs <= 32)
    return LaunchSimpleBackward<1>(dx, dy, x, lse, dvec, B, T, C, NH, scale_log2, scale, stream);
  if (hs <= 64)
    return LaunchSimpleBackward<2>(dx, dy, x, lse, dvec, B, T, C, NH, scale_log2, scale, stream);
  if (hs <= 128)
    return LaunchSimpleBackward<4>(dx, dy, x, lse, dvec, B, T, C, NH, scale_log2, scale, stream);
  return LaunchSimpleBackward<8>(dx, dy, x, lse, dvec, B, T, C, NH, scale_log2, scale, stream);
}

}  // namespace qtrain::ops
