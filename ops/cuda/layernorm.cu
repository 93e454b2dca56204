// CUDA layernorm: fused residual-add + layernorm forward (one warp per row) and a deterministic
// backward (dinp one warp per row; weight/bias partials per chunk of rows, then reduced in
// order), with validating launchers.
#include <algorithm>

#include <cuda_runtime.h>

#include "ops/cuda/cuda_status.h"
#include "ops/cuda/cuda_utils.cuh"
#include "ops/cuda/layernorm_cuda.h"
#include "ops/status_macros.h"

namespace qtrain::ops {
namespace {

using cu::Bf16x8;
using cu::nv_bf16;

constexpr float kEps = 1e-5f;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBwdRowsPerBlock = 64;  // rows per partial sum of the weight/bias gradients

// kVec8: lanes take 8 consecutive channels per 16-byte access (C % 8 == 0, aligned pointers);
// kScalar: one channel per access. Each lane visits the same channels in every pass, so it
// re-reads only what it wrote itself.
enum class Access { kScalar, kVec8 };
enum class Residual { kNone, kAdd };

template <Access kAccess>
struct Row {
  static constexpr int kPer = kAccess == Access::kVec8 ? 8 : 1;
  __device__ static void Load(float* x, const nv_bf16* p) {
    if (kAccess == Access::kVec8) {
      const Bf16x8 v = cu::Load8(p);
#pragma unroll
      for (int k = 0; k < 8; ++k) x[k] = __bfloat162float(v.v[k]);
    } else {
      x[0] = __bfloat162float(*p);
    }
  }
  // Rounds x to BF16, stores it, and leaves the rounded values in x.
  __device__ static void StoreRounded(nv_bf16* p, float* x) {
    if (kAccess == Access::kVec8) {
      Bf16x8 v;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        v.v[k] = __float2bfloat16_rn(x[k]);
        x[k] = __bfloat162float(v.v[k]);
      }
      cu::Store8(p, v);
    } else {
      const nv_bf16 v = __float2bfloat16_rn(x[0]);
      *p = v;
      x[0] = __bfloat162float(v);
    }
  }
};

template <Access kAccess, Residual kResidual>
__global__ void layernorm_forward_kernel(nv_bf16* __restrict__ residual, nv_bf16* __restrict__ out,
                                         float* __restrict__ mean, float* __restrict__ rstd,
                                         const nv_bf16* __restrict__ a,
                                         const nv_bf16* __restrict__ b,
                                         const nv_bf16* __restrict__ weight,
                                         const nv_bf16* __restrict__ bias, int N, int C) {
  using R = Row<kAccess>;
  constexpr int kPer = R::kPer;
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= N) return;
  const int64_t off = row * C;
  // The normalized input: the rounded residual when adding, else a itself.
  const nv_bf16* x_src = kResidual == Residual::kAdd ? residual + off : a + off;

  float sum = 0.f;
  for (int c = lane * kPer; c < C; c += 32 * kPer) {
    float x[kPer];
    R::Load(x, a + off + c);
    if (kResidual == Residual::kAdd) {
      float y[kPer];
      R::Load(y, b + off + c);
#pragma unroll
      for (int k = 0; k < kPer; ++k) x[k] += y[k];
      R::StoreRounded(residual + off + c, x);
    }
#pragma unroll
    for (int k = 0; k < kPer; ++k) sum += x[k];
  }
  const float m = cu::WarpSum(sum) / C;
  float var = 0.f;
  for (int c = lane * kPer; c < C; c += 32 * kPer) {
    float x[kPer];
    R::Load(x, x_src + c);
#pragma unroll
    for (int k = 0; k < kPer; ++k) var += (x[k] - m) * (x[k] - m);
  }
  const float s = 1.0f / sqrtf(cu::WarpSum(var) / C + kEps);
  for (int c = lane * kPer; c < C; c += 32 * kPer) {
    float x[kPer], w[kPer], bb[kPer];
    R::Load(x, x_src + c);
    R::Load(w, weight + c);
    R::Load(bb, bias + c);
#pragma unroll
    for (int k = 0; k < kPer; ++k) x[k] = (s * (x[k] - m)) * w[k] + bb[k];
    R::StoreRounded(out + off + c, x);
  }
  if (lane == 0) {
    mean[row] = m;
    rstd[row] = s;
  }
}

// dinp, one warp per row (as the forward): dinp += (w dy - mean(w dy) - norm mean(w dy norm))
// rstd, formed in fp32 and rounded once.
template <Access kAccess>
__global__ void layernorm_backward_dinp_kernel(nv_bf16* __restrict__ dinp,
                                               const nv_bf16* __restrict__ dout,
                                               const nv_bf16* __restrict__ inp,
                                               const nv_bf16* __restrict__ weight,
                                               const float* __restrict__ mean,
                                               const float* __restrict__ rstd, int N, int C) {
  using R = Row<kAccess>;
  constexpr int kPer = R::kPer;
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= N) return;
  const int64_t off = row * C;
  const float m = mean[row], s = rstd[row];
  float dnorm_sum = 0.f, dnorm_norm_sum = 0.f;
  for (int c = lane * kPer; c < C; c += 32 * kPer) {
    float x[kPer], dy[kPer], w[kPer];
    R::Load(x, inp + off + c);
    R::Load(dy, dout + off + c);
    R::Load(w, weight + c);
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const float dnorm = w[k] * dy[k];
      dnorm_sum += dnorm;
      dnorm_norm_sum += dnorm * ((x[k] - m) * s);
    }
  }
  const float dnorm_mean = cu::WarpSum(dnorm_sum) / C;
  const float dnorm_norm_mean = cu::WarpSum(dnorm_norm_sum) / C;
  for (int c = lane * kPer; c < C; c += 32 * kPer) {
    float x[kPer], dy[kPer], w[kPer], dx[kPer];
    R::Load(x, inp + off + c);
    R::Load(dy, dout + off + c);
    R::Load(w, weight + c);
    R::Load(dx, dinp + off + c);
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      const float norm = (x[k] - m) * s;
      dx[k] += (w[k] * dy[k] - dnorm_mean - norm * dnorm_norm_mean) * s;
    }
    R::StoreRounded(dinp + off + c, dx);
  }
}

// dweight/dbias partial sums over one chunk of kBwdRowsPerBlock rows (blockIdx.y) for 32*kPer
// columns (blockIdx.x): lane l owns kPer consecutive columns, warp w sums rows w, w + kWarps,
// ... in order, then the warps' sums are added in warp order. A fixed partition and order, so
// the result is deterministic; many blocks, so the GPU is full even for small N.
template <Access kAccess>
__global__ void layernorm_backward_partial_kernel(float* __restrict__ partial,
                                                  const nv_bf16* __restrict__ dout,
                                                  const nv_bf16* __restrict__ inp,
                                                  const float* __restrict__ mean,
                                                  const float* __restrict__ rstd, int N, int C) {
  using R = Row<kAccess>;
  constexpr int kPer = R::kPer;
  __shared__ float s_dw[kWarps][32 * kPer], s_db[kWarps][32 * kPer];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int c = (blockIdx.x * 32 + lane) * kPer;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kBwdRowsPerBlock;
  const int64_t row1 = row0 + kBwdRowsPerBlock < N ? row0 + kBwdRowsPerBlock : N;
  float dw[kPer], db[kPer];
#pragma unroll
  for (int k = 0; k < kPer; ++k) dw[k] = db[k] = 0.f;
  if (c < C) {
    for (int64_t r = row0 + warp; r < row1; r += kWarps) {
      float x[kPer], dy[kPer];
      R::Load(x, inp + r * C + c);
      R::Load(dy, dout + r * C + c);
      const float m = mean[r], s = rstd[r];
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        dw[k] += (x[k] - m) * s * dy[k];
        db[k] += dy[k];
      }
    }
  }
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    s_dw[warp][lane * kPer + k] = dw[k];
    s_db[warp][lane * kPer + k] = db[k];
  }
  __syncthreads();
  float* dw_part = partial + static_cast<int64_t>(blockIdx.y) * 2 * C;
  float* db_part = dw_part + C;
  for (int i = threadIdx.x; i < 32 * kPer; i += blockDim.x) {
    const int col = blockIdx.x * 32 * kPer + i;
    if (col >= C) continue;
    float a = 0.f, b = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      a += s_dw[w][i];
      b += s_db[w][i];
    }
    dw_part[col] = a;
    db_part[col] = b;
  }
}

// One thread per column of [dweight | dbias]: blocks' partials summed in block order.
__global__ void layernorm_backward_reduce_kernel(float* __restrict__ dweight,
                                                 float* __restrict__ dbias,
                                                 const float* __restrict__ partial, int blocks,
                                                 int C, GradWrite write) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= 2 * C) return;
  float acc = 0.f;
  // Unrolled so that several loads are in flight; the adds stay in block order.
#pragma unroll 8
  for (int blk = 0; blk < blocks; ++blk) acc += partial[static_cast<int64_t>(blk) * 2 * C + col];
  float* dst = col < C ? dweight + col : dbias + (col - C);
  *dst = write == GradWrite::kOverwrite ? acc : *dst + acc;
}

absl::Status CheckShape(const char* op, int N, int C) {
  QT_CHECK_ARG(N > 0 && C > 0, op, ": N and C must be > 0, got N=", N, " C=", C);
  return absl::OkStatus();
}

int BwdBlocks(int N) { return (N + kBwdRowsPerBlock - 1) / kBwdRowsPerBlock; }

template <Residual kResidual>
absl::Status LaunchForward(nv_bf16* residual, nv_bf16* out, float* mean, float* rstd,
                           const nv_bf16* a, const nv_bf16* b, const nv_bf16* weight,
                           const nv_bf16* bias, int N, int C, cudaStream_t stream) {
  const int blocks = (N + kWarps - 1) / kWarps;
  const bool vec = C % 8 == 0 && cu::IsAligned(out, 16) && cu::IsAligned(a, 16) &&
                   cu::IsAligned(weight, 16) && cu::IsAligned(bias, 16) &&
                   (kResidual == Residual::kNone ||
                    (cu::IsAligned(b, 16) && cu::IsAligned(residual, 16)));
  if (vec) {
    layernorm_forward_kernel<Access::kVec8, kResidual><<<blocks, kThreads, 0, stream>>>(
        residual, out, mean, rstd, a, b, weight, bias, N, C);
  } else {
    layernorm_forward_kernel<Access::kScalar, kResidual><<<blocks, kThreads, 0, stream>>>(
        residual, out, mean, rstd, a, b, weight, bias, N, C);
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace

absl::Status residual_layernorm_forward_cuda(bf16* residual, bf16* out, float* mean, float* rstd,
                                             const bf16* a, const bf16* b, const bf16* weight,
                                             const bf16* bias, int N, int C,
                                             cudaStream_t stream) {
  RETURN_IF_ERROR(CheckShape("residual_layernorm_forward_cuda", N, C));
  QT_CHECK_ARG(residual != nullptr && out != nullptr && mean != nullptr && rstd != nullptr &&
                   a != nullptr && b != nullptr && weight != nullptr && bias != nullptr,
               "residual_layernorm_forward_cuda: null pointer (residual=", residual != nullptr,
               " out=", out != nullptr, " mean=", mean != nullptr, " rstd=", rstd != nullptr,
               " a=", a != nullptr, " b=", b != nullptr, " weight=", weight != nullptr,
               " bias=", bias != nullptr, ")");
  return LaunchForward<Residual::kAdd>(cu::Nv(residual), cu::Nv(out), mean, rstd, cu::Nv(a),
                                       cu::Nv(b), cu::Nv(weight), cu::Nv(bias), N, C, stream);
}

absl::Status layernorm_forward_cuda(bf16* out, float* mean, float* rstd, const bf16* inp,
                                    const bf16* weight, const bf16* bias, int N, int C,
                                    cudaStream_t stream) {
  RETURN_IF_ERROR(CheckShape("layernorm_forward_cuda", N, C));
  QT_CHECK_ARG(out != nullptr && mean != nullptr && rstd != nullptr && inp != nullptr &&
                   weight != nullptr && bias != nullptr,
               "layernorm_forward_cuda: null pointer (out=", out != nullptr,
               " mean=", mean != nullptr, " rstd=", rstd != nullptr, " inp=", inp != nullptr,
               " weight=", weight != nullptr, " bias=", bias != nullptr, ")");
  return LaunchForward<Residual::kNone>(nullptr, cu::Nv(out), mean, rstd, cu::Nv(inp), nullptr,
                                        cu::Nv(weight), cu::Nv(bias), N, C, stream);
}

int64_t layernorm_backward_cuda_workspace_bytes(int N, int C) {
  if (N <= 0 || C <= 0) return 0;
  return static_cast<int64_t>(BwdBlocks(N)) * 2 * C * static_cast<int64_t>(sizeof(float));
}

absl::Status layernorm_backward_cuda(bf16* dinp, float* dweight, float* dbias, const bf16* dout,
                                     const bf16* inp, const bf16* weight, const float* mean,
                                     const float* rstd, int N, int C, void* workspace,
                                     int64_t workspace_bytes, cudaStream_t stream,
                                     GradWrite dparams) {
  RETURN_IF_ERROR(CheckShape("layernorm_backward_cuda", N, C));
  QT_CHECK_ARG(dinp != nullptr && dweight != nullptr && dbias != nullptr && dout != nullptr &&
                   inp != nullptr && weight != nullptr && mean != nullptr && rstd != nullptr,
               "layernorm_backward_cuda: null pointer (dinp=", dinp != nullptr,
               " dweight=", dweight != nullptr, " dbias=", dbias != nullptr,
               " dout=", dout != nullptr, " inp=", inp != nullptr, " weight=", weight != nullptr,
               " mean=", mean != nullptr, " rstd=", rstd != nullptr, ")");
  const int64_t need = layernorm_backward_cuda_workspace_bytes(N, C);
  QT_CHECK_ARG(workspace != nullptr && workspace_bytes >= need,
               "layernorm_backward_cuda: workspace of ", workspace_bytes, " bytes (",
               workspace != nullptr ? "non-null" : "null", "), needs ", need, " for N=", N,
               " C=", C);
  QT_CHECK_ARG(cu::IsAligned(workspace, 4), "layernorm_backward_cuda: workspace misaligned");
  float* partial = static_cast<float*>(workspace);
  const int blocks = BwdBlocks(N);
  const bool vec = C % 8 == 0 && cu::IsAligned(dinp, 16) && cu::IsAligned(dout, 16) &&
                   cu::IsAligned(inp, 16) && cu::IsAligned(weight, 16);
  const dim3 grid_rows((N + kWarps - 1) / kWarps);
  if (vec) {
    layernorm_backward_dinp_kernel<Access::kVec8><<<grid_rows, kThreads, 0, stream>>>(
        cu::Nv(dinp), cu::Nv(dout), cu::Nv(inp), cu::Nv(weight), mean, rstd, N, C);
    CUDA_RETURN_IF_ERROR(cudaGetLastError());
    layernorm_backward_partial_kernel<Access::kVec8>
        <<<dim3((C + 255) / 256, blocks), kThreads, 0, stream>>>(partial, cu::Nv(dout),
                                                                 cu::Nv(inp), mean, rstd, N, C);
  } else {
    layernorm_backward_dinp_kernel<Access::kScalar><<<grid_rows, kThreads, 0, stream>>>(
        cu::Nv(dinp), cu::Nv(dout), cu::Nv(inp), cu::Nv(weight), mean, rstd, N, C);
    CUDA_RETURN_IF_ERROR(cudaGetLastError());
    layernorm_backward_partial_kernel<Access::kScalar>
        <<<dim3((C + 31) / 32, blocks), kThreads, 0, stream>>>(partial, cu::Nv(dout),
                                                               cu::Nv(inp), mean, rstd, N, C);
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  layernorm_backward_reduce_kernel<<<(2 * C + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      dweight, dbias, partial, blocks, C, dparams);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace qtrain::ops
