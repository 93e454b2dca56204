// CUDA fused softmax cross-entropy over the tied LM head: one block per row reads the BF16
// logits (online max/sum), then writes softmax - onehot in place; rows up to 64K entries stay
// in registers between the two, so they are read once.
#include <algorithm>
#include <cmath>

#include <cuda_runtime.h>

#include "ops/cuda/crossentropy_cuda.h"
#include "ops/cuda/cuda_status.h"
#include "ops/cuda/cuda_utils.cuh"
#include "ops/status_macros.h"

namespace qtrain::ops {
namespace {

using cu::Bf16x8;
using cu::nv_bf16;

constexpr int kThreads = 512;

enum class Access { kScalar, kVec8 };

// Online (max, sum of exp) merge.
__device__ __forceinline__ void Merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  if (mn == -INFINITY) return;  // both empty
  s = s * __expf(m - mn) + s2 * __expf(m2 - mn);
  m = mn;
}

template <Access kAccess>
__global__ void crossentropy_softmax_kernel(float* __restrict__ losses,
                                            nv_bf16* __restrict__ logits,
                                            const int32_t* __restrict__ targets, int V, int ld,
                                            float grad_scale) {
  __shared__ float s_m[32], s_s[32];
  const int64_t row = blockIdx.x;
  nv_bf16* x = logits + row * ld;
  const int32_t target = targets[row];
  constexpr int kPer = kAccess == Access::kVec8 ? 8 : 1;

  float m = -INFINITY, s = 0.f;
  for (int c = threadIdx.x * kPer; c < V; c += blockDim.x * kPer) {
    if (kAccess == Access::kVec8) {
      const Bf16x8 v = cu::Load8(x + c);
      float vals[8];
      float vm = -INFINITY;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        vals[k] = c + k < V ? __bfloat162float(v.v[k]) : -INFINITY;  // padded columns
        vm = fmaxf(vm, vals[k]);
      }
      float vs = 0.f;
#pragma unroll
      for (int k = 0; k < 8; ++k) vs += __expf(vals[k] - vm);
      Merge(m, s, vm, vs);
    } else {
      Merge(m, s, __bfloat162float(x[c]), 1.f);
    }
  }
  // Warp then block merge, in a fixed order.
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
    Merge(m, s, m2, s2);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    s_m[warp] = m;
    s_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / 32;
    m = lane < warps ? s_m[lane] : -INFINITY;
    s = lane < warps ? s_s[lane] : 0.f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
      const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
      Merge(m, s, m2, s2);
    }
    if (lane == 0) {
      s_m[0] = m;
      s_s[0] = s;
    }
  }
  __syncthreads();
  const float maxv = s_m[0];
  const float inv_sum = 1.f / s_s[0];
  const bool valid = target >= 0 && target < V;
  if (threadIdx.x == 0) {
    // Read before the in-place overwrite below (the barrier orders it).
    losses[row] = valid ? logf(s_s[0]) - (__bfloat162float(x[target]) - maxv) : NAN;
  }
  __syncthreads();
  for (int c = threadIdx.x * kPer; c < ld; c += blockDim.x * kPer) {
    if (kAccess == Access::kVec8) {
      Bf16x8 v = cu::Load8(x + c);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float p = c + k < V ? __expf(__bfloat162float(v.v[k]) - maxv) * inv_sum : 0.f;
        v.v[k] = __float2bfloat16_rn(grad_scale * (p - (c + k == target ? 1.f : 0.f)));
      }
      cu::Store8(x + c, v);
    } else {
      const float p = c < V ? __expf(__bfloat162float(x[c]) - maxv) * inv_sum : 0.f;
      x[c] = __float2bfloat16_rn(grad_scale * (p - (c == target ? 1.f : 0.f)));
    }
  }
}

// As crossentropy_softmax_kernel<kVec8>, but each of kRegThreads threads keeps its kChunks
// 16-byte pieces of the row in registers between the two passes, so the logits are read from
// memory once instead of twice. For V <= kRegThreads * 8 * kMaxRegChunks.
constexpr int kRegThreads = 1024;
constexpr int kMaxRegChunks = 8;

template <int kChunks>
__global__ void __launch_bounds__(kRegThreads)
    crossentropy_softmax_reg_kernel(float* __restrict__ losses, nv_bf16* __restrict__ logits,
                                    const int32_t* __restrict__ targets, int V, int ld,
                                    float grad_scale) {
  __shared__ float s_m[32], s_s[32];
  const int64_t row = blockIdx.x;
  nv_bf16* x = logits + row * ld;
  const int32_t target = targets[row];
  Bf16x8 v[kChunks];
#pragma unroll
  for (int j = 0; j < kChunks; ++j) {
    const int c = (j * kRegThreads + static_cast<int>(threadIdx.x)) * 8;
    if (c < ld) v[j] = cu::Load8(x + c);
  }
  float m = -INFINITY, s = 0.f;
#pragma unroll
  for (int j = 0; j < kChunks; ++j) {
    const int c = (j * kRegThreads + static_cast<int>(threadIdx.x)) * 8;
    if (c < V) {
      float vm = -INFINITY;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        if (c + k < V) vm = fmaxf(vm, __bfloat162float(v[j].v[k]));  // padded columns aside
      }
      float vs = 0.f;
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        if (c + k < V) vs += __expf(__bfloat162float(v[j].v[k]) - vm);
      }
      Merge(m, s, vm, vs);
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
    Merge(m, s, m2, s2);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) {
    s_m[warp] = m;
    s_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = s_m[lane];  // kRegThreads / 32 == 32 warps
    s = s_s[lane];
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      const float m2 = __shfl_xor_sync(0xffffffffu, m, off);
      const float s2 = __shfl_xor_sync(0xffffffffu, s, off);
      Merge(m, s, m2, s2);
    }
    if (lane == 0) {
      const bool valid = target >= 0 && target < V;
      // Read before the overwrite below (the barrier orders it).
      losses[row] = valid ? logf(s) - (__bfloat162float(x[target]) - m) : NAN;
      s_m[0] = m;
      s_s[0] = s;
    }
  }
  __syncthreads();
  const float maxv = s_m[0];
  const float inv_sum = 1.f / s_s[0];
#pragma unroll
  for (int j = 0; j < kChunks; ++j) {
    const int c = (j * kRegThreads + static_cast<int>(threadIdx.x)) * 8;
    if (c < ld) {
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const float p = c + k < V ? __expf(__bfloat162float(v[j].v[k]) - maxv) * inv_sum : 0.f;
        v[j].v[k] = __float2bfloat16_rn(grad_scale * (p - (c + k == target ? 1.f : 0.f)));
      }
      cu::Store8(x + c, v[j]);
    }
  }
}

template <int kChunks>
void LaunchReg(int chunks, int N, float* losses, nv_bf16* logits, const int32_t* targets, int V,
               int ld, float grad_scale, cudaStream_t stream) {
  if constexpr (kChunks <= kMaxRegChunks) {
    if (chunks == kChunks) {
      crossentropy_softmax_reg_kernel<kChunks>
          <<<N, kRegThreads, 0, stream>>>(losses, logits, targets, V, ld, grad_scale);
    } else {
      LaunchReg<kChunks + 1>(chunks, N, losses, logits, targets, V, ld, grad_scale, stream);
    }
  }
}

// One block: mean of losses with a fixed thread-to-element map and tree (deterministic).
__global__ void mean_loss_kernel(double* __restrict__ out, const float* __restrict__ losses,
                                 int N) {
  __shared__ double scratch[32];
  double acc = 0.0;
  for (int i = threadIdx.x; i < N; i += blockDim.x) acc += static_cast<double>(losses[i]);
  acc = cu::BlockSum(acc, scratch);
  if (threadIdx.x == 0) *out = acc / N;
}


// kPer (8 or 1) consecutive logits of the student (s) and the teacher (t) as floats.
template <Access kAccess>
__device__ __forceinline__ void LoadPair(const nv_bf16* s, const nv_bf16* t, float* sv,
                                         float* tv) {
  if constexpr (kAccess == Access::kVec8) {
    const Bf16x8 a = cu::Load8(s), b = cu::Load8(t);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      sv[k] = __bfloat162float(a.v[k]);
      tv[k] = __bfloat162float(b.v[k]);
    }
  } else {
    sv[0] = __bfloat162float(*s);
    tv[0] = __bfloat162float(*t);
  }
}

// Cross-entropy and distillation in one pass pair per row: the student's logits s (in place,
// becoming dlogits) against the target and a frozen teacher's logits t (same layout). Pass 1:
// the online (max, sum of exp) of s and of t, and for MSE the sum of (s - t)^2; pass 2: the
// KL terms and dlogits = ce_scale (p_s - onehot) + distill_scale d distill / d s with
// KL: p_s - p_t, MSE: 2 (s - t) / V (ops/distill.h's math per row, fp32 on BF16 logits).
template <Access kAccess>
__global__ void distill_crossentropy_kernel(float* __restrict__ losses,
                                            float* __restrict__ distill_losses,
                                            nv_bf16* __restrict__ logits,
                                            const nv_bf16* __restrict__ teacher,
                                            const int32_t* __restrict__ targets, int V, int ld,
                                            float ce_scale, float distill_scale, bool kl) {
  __shared__ float s_m[32], s_s[32], t_m[32], t_s[32];
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  nv_bf16* x = logits + row * ld;
  const nv_bf16* tx = teacher + row * ld;
  const int32_t target = targets[row];
  constexpr int kPer = kAccess == Access::kVec8 ? 8 : 1;
  float sm = -INFINITY, ss = 0.f, tm = -INFINITY, ts = 0.f, sq = 0.f;
  for (int c = threadIdx.x * kPer; c < V; c += blockDim.x * kPer) {
    float sv[kPer], tv[kPer];
    LoadPair<kAccess>(x + c, tx + c, sv, tv);
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      if (c + k >= V) continue;  // padded columns
      Merge(sm, ss, sv[k], 1.f);
      Merge(tm, ts, tv[k], 1.f);
      if (!kl) {
        const float d = sv[k] - tv[k];
        sq += d * d;
      }
    }
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    Merge(sm, ss, __shfl_xor_sync(0xffffffffu, sm, off), __shfl_xor_sync(0xffffffffu, ss, off));
    Merge(tm, ts, __shfl_xor_sync(0xffffffffu, tm, off), __shfl_xor_sync(0xffffffffu, ts, off));
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (lane == 0) {
    s_m[warp] = sm;
    s_s[warp] = ss;
    t_m[warp] = tm;
    t_s[warp] = ts;
  }
  __syncthreads();
  if (warp == 0) {
    sm = lane < warps ? s_m[lane] : -INFINITY;
    ss = lane < warps ? s_s[lane] : 0.f;
    tm = lane < warps ? t_m[lane] : -INFINITY;
    ts = lane < warps ? t_s[lane] : 0.f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      Merge(sm, ss, __shfl_xor_sync(0xffffffffu, sm, off), __shfl_xor_sync(0xffffffffu, ss, off));
      Merge(tm, ts, __shfl_xor_sync(0xffffffffu, tm, off), __shfl_xor_sync(0xffffffffu, ts, off));
    }
    if (lane == 0) {
      s_m[0] = sm;
      s_s[0] = ss;
      t_m[0] = tm;
      t_s[0] = ts;
    }
  }
  // kl is the same for the whole block, so the barriers inside BlockSum are reached by all.
  if (!kl) sq = cu::BlockSum(sq, red);  // every thread returns the row's sum (fixed tree)
  __syncthreads();
  sm = s_m[0];
  tm = t_m[0];
  const float log_ss = logf(s_s[0]), log_ts = logf(t_s[0]);
  const float inv_ss = 1.f / s_s[0], inv_ts = 1.f / t_s[0];
  const bool valid = target >= 0 && target < V;
  if (threadIdx.x == 0) {
    // Read before the in-place overwrite below (the barrier orders it).
    losses[row] = valid ? log_ss - (__bfloat162float(x[target]) - sm) : NAN;
  }
  __syncthreads();
  float kl_sum = 0.f;
  const float mse_g = 2.f / static_cast<float>(V);
  for (int c = threadIdx.x * kPer; c < ld; c += blockDim.x * kPer) {
    float sv[kPer], tv[kPer];
    LoadPair<kAccess>(x + c, tx + c, sv, tv);
    float g[kPer];
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      if (c + k >= V) {
        g[k] = 0.f;
        continue;
      }
      const float ls = sv[k] - sm - log_ss, lt = tv[k] - tm - log_ts;
      const float ps = __expf(sv[k] - sm) * inv_ss, pt = __expf(tv[k] - tm) * inv_ts;
      float gd;
      if (kl) {
        kl_sum += pt * (lt - ls);
        gd = ps - pt;
      } else {
        gd = mse_g * (sv[k] - tv[k]);
      }
      g[k] = ce_scale * (ps - (c + k == target ? 1.f : 0.f)) + distill_scale * gd;
    }
    if constexpr (kAccess == Access::kVec8) {
      Bf16x8 a;
#pragma unroll
      for (int k = 0; k < 8; ++k) a.v[k] = __float2bfloat16_rn(g[k]);
      cu::Store8(x + c, a);
    } else {
      x[c] = __float2bfloat16_rn(g[0]);
    }
  }
  if (kl) {
    kl_sum = cu::BlockSum(kl_sum, red);
    if (threadIdx.x == 0) distill_losses[row] = kl_sum;
  } else if (threadIdx.x == 0) {
    distill_losses[row] = sq / static_cast<float>(V);
  }
}

absl::Status LaunchDistill(float* losses, float* distill_losses, bf16* logits,
                           const bf16* teacher, const int32_t* targets, int N, int V, int ld,
                           float ce_scale, float distill_scale, DistillLoss kind,
                           cudaStream_t stream) {
  const bool kl = kind == DistillLoss::kKl;
  if (ld % 8 == 0 && cu::IsAligned(logits, 16) && cu::IsAligned(teacher, 16)) {
    distill_crossentropy_kernel<Access::kVec8><<<N, kThreads, 0, stream>>>(
        losses, distill_losses, cu::Nv(logits), cu::Nv(teacher), targets, V, ld, ce_scale,
        distill_scale, kl);
  } else {
    distill_crossentropy_kernel<Access::kScalar><<<N, kThreads, 0, stream>>>(
        losses, distill_losses, cu::Nv(logits), cu::Nv(teacher), targets, V, ld, ce_scale,
        distill_scale, kl);
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

// The softmax kernels over N rows of ld >= V logits (columns from V on are the padded
// vocabulary's: no part of the softmax, dlogits 0) with dlogits = grad_scale * (softmax - onehot).
absl::Status LaunchSoftmax(float* losses, bf16* logits, const int32_t* targets, int N, int V,
                           int ld, float grad_scale, cudaStream_t stream) {
  const int reg_chunks = (ld / 8 + kRegThreads - 1) / kRegThreads;
  if (ld % 8 == 0 && cu::IsAligned(logits, 16) && reg_chunks <= kMaxRegChunks) {
    LaunchReg<1>(reg_chunks, N, losses, cu::Nv(logits), targets, V, ld, grad_scale, stream);
  } else if (ld % 8 == 0 && cu::IsAligned(logits, 16)) {
    crossentropy_softmax_kernel<Access::kVec8>
        <<<N, kThreads, 0, stream>>>(losses, cu::Nv(logits), targets, V, ld, grad_scale);
  } else {
    crossentropy_softmax_kernel<Access::kScalar>
        <<<N, kThreads, 0, stream>>>(losses, cu::Nv(logits), targets, V, ld, grad_scale);
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::Status LaunchMeanLoss(double* mean_loss, const float* losses, int N, cudaStream_t stream) {
  mean_loss_kernel<<<1, 1024, 0, stream>>>(mean_loss, losses, N);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

template <typename G>
absl::Status LmHeadChunked(MatmulContext& ctx, float* losses, double* mean_loss, bf16* logits,
                           int chunk_rows, bf16* dx, G* dwte, const bf16* x, const bf16* wte,
                           const int32_t* targets, int N, int C, int V, float dloss,
                           cudaStream_t stream, GradWrite dwte_write, GradWrite dx_write,
                           const LmHeadExtras& extras) {
  QT_CHECK_ARG(N > 0 && C > 0 && V > 0, "lm_head_crossentropy_chunked_cuda: N, C, V must be > 0, got N=",
               N, " C=", C, " V=", V);
  QT_CHECK_ARG(chunk_rows > 0, "lm_head_crossentropy_chunked_cuda: chunk_rows must be > 0, got ",
               chunk_rows);
  QT_CHECK_ARG(losses != nullptr && logits != nullptr && x != nullptr && wte != nullptr &&
                   targets != nullptr,
               "lm_head_crossentropy_chunked_cuda: null pointer (losses=", losses != nullptr,
               " logits=", logits != nullptr, " x=", x != nullptr, " wte=", wte != nullptr,
               " targets=", targets != nullptr, ")");
  const int Vt = extras.table_rows > 0 ? extras.table_rows : V;
  QT_CHECK_ARG(Vt >= V, "lm_head_crossentropy_chunked_cuda: table_rows ", Vt, " < V ", V);
  const bool distill = extras.teacher_x != nullptr;
  QT_CHECK_ARG(!distill || (extras.teacher_wte != nullptr && extras.teacher_logits != nullptr &&
                            extras.distill_losses != nullptr),
               "lm_head_crossentropy_chunked_cuda: distillation needs teacher_wte, "
               "teacher_logits and distill_losses");
  // The same scale for every chunk: the gradient of the mean over all N rows.
  const float grad_scale = dloss / static_cast<float>(N);
  for (int r0 = 0; r0 < N; r0 += chunk_rows) {
    const int rows = std::min(chunk_rows, N - r0);
    const int64_t off = static_cast<int64_t>(r0) * C;
    RETURN_IF_ERROR(matmul_forward_cuda(ctx, logits, x + off, wte, nullptr, rows, C, Vt, stream));
    if (distill) {
      // The teacher's logits of the same rows, only this chunk's at a time.
      RETURN_IF_ERROR(matmul_forward_cuda(ctx, extras.teacher_logits, extras.teacher_x + off,
                                          extras.teacher_wte, nullptr, rows, C, Vt, stream));
      RETURN_IF_ERROR(LaunchDistill(losses + r0, extras.distill_losses + r0, logits,
                                    extras.teacher_logits, targets + r0, rows, V, Vt, grad_scale,
                                    grad_scale * extras.distill_weight, extras.distill, stream));
    } else {
      RETURN_IF_ERROR(
          LaunchSoftmax(losses + r0, logits, targets + r0, rows, V, Vt, grad_scale, stream));
    }
    if (dx == nullptr && dwte == nullptr) continue;
    // The first chunk writes dwte as asked, later chunks add to it; dx rows are the chunk's own.
    const GradWrite w = r0 == 0 ? dwte_write : GradWrite::kAccumulate;
    RETURN_IF_ERROR(matmul_backward_cuda(ctx, dx != nullptr ? dx + off : nullptr, dwte,
                                         static_cast<G*>(nullptr), logits, x + off, wte, rows, C,
                                         Vt, nullptr, 0, stream, nullptr, w, dx_write));
  }
  if (mean_loss != nullptr) RETURN_IF_ERROR(LaunchMeanLoss(mean_loss, losses, N, stream));
  if (distill && extras.mean_distill != nullptr) {
    RETURN_IF_ERROR(LaunchMeanLoss(extras.mean_distill, extras.distill_losses, N, stream));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status crossentropy_softmax_cuda(float* losses, double* mean_loss, bf16* logits,
                                       const int32_t* targets, int N, int V, float dloss,
                                       cudaStream_t stream) {
  QT_CHECK_ARG(N > 0 && V > 0, "crossentropy_softmax_cuda: N and V must be > 0, got N=", N,
               " V=", V);
  QT_CHECK_ARG(losses != nullptr && logits != nullptr && targets != nullptr,
               "crossentropy_softmax_cuda: null pointer (losses=", losses != nullptr,
               " logits=", logits != nullptr, " targets=", targets != nullptr, ")");
  RETURN_IF_ERROR(
      LaunchSoftmax(losses, logits, targets, N, V, V, dloss / static_cast<float>(N), stream));
  if (mean_loss != nullptr) RETURN_IF_ERROR(LaunchMeanLoss(mean_loss, losses, N, stream));
  return absl::OkStatus();
}

absl::Status lm_head_crossentropy_chunked_cuda(MatmulContext& ctx, float* losses,
                                               double* mean_loss, bf16* logits, int chunk_rows,
                                               bf16* dx, float* dwte, const bf16* x,
                                               const bf16* wte, const int32_t* targets, int N,
                                               int C, int V, float dloss, cudaStream_t stream,
                                               GradWrite dwte_write, GradWrite dx_write,
                                               const LmHeadExtras& extras) {
  return LmHeadChunked(ctx, losses, mean_loss, logits, chunk_rows, dx, dwte, x, wte, targets, N,
                       C, V, dloss, stream, dwte_write, dx_write, extras);
}

absl::Status lm_head_crossentropy_chunked_cuda(MatmulContext& ctx, float* losses,
                                               double* mean_loss, bf16* logits, int chunk_rows,
                                               bf16* dx, bf16* dwte, const bf16* x,
                                               const bf16* wte, const int32_t* targets, int N,
                                               int C, int V, float dloss, cudaStream_t stream,
                                               GradWrite dwte_write, GradWrite dx_write,
                                               const LmHeadExtras& extras) {
  return LmHeadChunked(ctx, losses, mean_loss, logits, chunk_rows, dx, dwte, x, wte, targets, N,
                       C, V, dloss, stream, dwte_write, dx_write, extras);
}

absl::Status lm_head_crossentropy_forward_cuda(MatmulContext& ctx, float* losses,
                                               double* mean_loss, bf16* logits, const bf16* x,
                                               const bf16* wte, const int32_t* targets, int N,
                                               int C, int V, float dloss, cudaStream_t stream) {
  QT_CHECK_ARG(losses != nullptr && targets != nullptr,
               "lm_head_crossentropy_forward_cuda: null pointer (losses=", losses != nullptr,
               " targets=", targets != nullptr, ")");
  RETURN_IF_ERROR(matmul_forward_cuda(ctx, logits, x, wte, nullptr, N, C, V, stream));
  RETURN_IF_ERROR(crossentropy_softmax_cuda(losses, mean_loss, logits, targets, N, V, dloss,
                                            stream));
  return absl::OkStatus();
}

absl::Status lm_head_crossentropy_backward_cuda(MatmulContext& ctx, bf16* dx, float* dwte,
                                                const bf16* dlogits, const bf16* x,
                                                const bf16* wte, int N, int C, int V,
                                                cudaStream_t stream, GradWrite dwte_write,
                                                GradWrite dx_write) {
  RETURN_IF_ERROR(matmul_backward_cuda(ctx, dx, dwte, nullptr, dlogits, x, wte, N, C, V,
                                       nullptr, 0, stream, nullptr, dwte_write, dx_write));
  return absl::OkStatus();
}

}  // namespace qtrain::ops
