// CUDA token + position embedding: forward gather-add and a deterministic backward (stable
// radix sort of positions by token, then per-token ordered sums), with validating launchers.
#include <algorithm>
#include <cmath>

#include <cub/device/device_radix_sort.cuh>
#include <cuda_runtime.h>

#include "ops/cuda/cuda_status.h"
#include "ops/cuda/cuda_utils.cuh"
#include "ops/cuda/encoder_cuda.h"
#include "ops/status_macros.h"

namespace qtrain::ops {
namespace {

using cu::Bf16x8;
using cu::nv_bf16;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 8192;
constexpr int64_t kAlign = 256;  // each workspace region starts on a 256-byte boundary

enum class Access { kScalar, kVec8 };

int64_t RoundUp(int64_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

// One thread per 8 channels (kVec8) or per channel.
template <Access kAccess>
__global__ void encoder_forward_kernel(nv_bf16* __restrict__ out, const int32_t* __restrict__ inp,
                                       const nv_bf16* __restrict__ wte,
                                       const nv_bf16* __restrict__ wpe, int64_t N, int T, int C,
                                       int V) {
  const int per = kAccess == Access::kVec8 ? 8 : 1;
  const int64_t groups = C / per;
  const int64_t total = N * groups;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const int64_t n = i / groups;
    const int64_t c = (i % groups) * per;
    const int t = static_cast<int>(n % T);
    const int32_t tok = inp[n];
    nv_bf16* o = out + n * C + c;
    if (tok < 0 || tok >= V) {
      for (int k = 0; k < per; ++k) o[k] = __float2bfloat16_rn(NAN);
      continue;
    }
    const nv_bf16* e = wte + static_cast<int64_t>(tok) * C + c;
    const nv_bf16* p = wpe + static_cast<int64_t>(t) * C + c;
    if (kAccess == Access::kVec8) {
      const Bf16x8 a = cu::Load8(e), b = cu::Load8(p);
      Bf16x8 r;
#pragma unroll
      for (int k = 0; k < 8; ++k)
        r.v[k] = __float2bfloat16_rn(__bfloat162float(a.v[k]) + __bfloat162float(b.v[k]));
      cu::Store8(o, r);
    } else {
      o[0] = __float2bfloat16_rn(__bfloat162float(e[0]) + __bfloat162float(p[0]));
    }
  }
}

// Keys for the sort: the token, or V for tokens out of range (sorted last, then skipped).
__global__ void encoder_keys_kernel(int32_t* __restrict__ keys, int32_t* __restrict__ vals,
                                    const int32_t* __restrict__ inp, int64_t N, int V) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < N;
       i += stride) {
    const int32_t tok = inp[i];
    keys[i] = (tok >= 0 && tok < V) ? tok : V;
    vals[i] = static_cast<int32_t>(i);
  }
}

// Block (p, chunk): if sorted position p starts a run of equal tokens, its threads sum the
// run's rows in (b,t) order (the sort is stable), one channel each, and add into dwte.
template <typename G>
__global__ void encoder_dwte_kernel(G* __restrict__ dwte, const nv_bf16* __restrict__ dout,
                                    const int32_t* __restrict__ keys,
                                    const int32_t* __restrict__ rows, int64_t N, int C, int V) {
  const int64_t p = blockIdx.x;
  const int32_t key = keys[p];
  if (key >= V || (p > 0 && keys[p - 1] == key)) return;
  const int c = blockIdx.y * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float acc = 0.f;
  int64_t q = p;
  // Four rows in flight at a time; the sum stays in run order.
  for (; q + 3 < N && keys[q + 3] == key; q += 4) {
    const float d0 = __bfloat162float(dout[static_cast<int64_t>(rows[q]) * C + c]);
    const float d1 = __bfloat162float(dout[static_cast<int64_t>(rows[q + 1]) * C + c]);
    const float d2 = __bfloat162float(dout[static_cast<int64_t>(rows[q + 2]) * C + c]);
    const float d3 = __bfloat162float(dout[static_cast<int64_t>(rows[q + 3]) * C + c]);
    acc += d0;
    acc += d1;
    acc += d2;
    acc += d3;
  }
  for (; q < N && keys[q] == key; ++q) {
    acc += __bfloat162float(dout[static_cast<int64_t>(rows[q]) * C + c]);
  }
  cu::WriteGrad(dwte + static_cast<int64_t>(key) * C + c, acc, GradWrite::kAccumulate);
}

// One thread per (t, c): sum over b in order.
template <typename G>
__global__ void encoder_dwpe_kernel(G* __restrict__ dwpe, const nv_bf16* __restrict__ dout,
                                    int B, int T, int C) {
  const int64_t total = static_cast<int64_t>(T) * C;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    float acc = 0.f;
    for (int b = 0; b < B; ++b) acc += __bfloat162float(dout[static_cast<int64_t>(b) * total + i]);
    cu::WriteGrad(dwpe + i, acc, GradWrite::kAccumulate);
  }
}

int Blocks(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads,
                                                                 kMaxBlocks)));
}

int EndBit(int V) {  // bits that hold every key in [0, V]
  int bits = 1;
  while ((int64_t{1} << bits) <= V) ++bits;
  return bits;
}

struct Workspace {
  int32_t* keys_in;
  int32_t* keys_out;
  int32_t* vals_in;
  int32_t* vals_out;
  void* temp;
  size_t temp_bytes;
};

absl::StatusOr<size_t> SortTempBytes(int64_t N, int V) {
  size_t temp_bytes = 0;
  CUDA_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(
      nullptr, temp_bytes, static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), N, 0, EndBit(V)));
  return temp_bytes;
}

absl::Status CheckShapes(const char* op, int B, int T, int C, int V) {
  QT_CHECK_ARG(B > 0 && T > 0 && C > 0 && V > 0, op, ": B, T, C, V must be > 0, got B=", B,
               " T=", T, " C=", C, " V=", V);
  QT_CHECK_ARG(static_cast<int64_t>(B) * T < (int64_t{1} << 31), op,
               ": B*T must fit in int32, got B=", B, " T=", T);
  return absl::OkStatus();
}

}  // namespace

absl::Status encoder_forward_cuda(bf16* out, const int32_t* inp, const bf16* wte,
                                  const bf16* wpe, int B, int T, int C, int V,
                                  cudaStream_t stream) {
  RETURN_IF_ERROR(CheckShapes("encoder_forward_cuda", B, T, C, V));
  QT_CHECK_ARG(out != nullptr && inp != nullptr && wte != nullptr && wpe != nullptr,
               "encoder_forward_cuda: null pointer (out=", out != nullptr, " inp=",
               inp != nullptr, " wte=", wte != nullptr, " wpe=", wpe != nullptr, ")");
  const int64_t N = static_cast<int64_t>(B) * T;
  if (C % 8 == 0 && cu::IsAligned(out, 16) && cu::IsAligned(wte, 16) && cu::IsAligned(wpe, 16)) {
    encoder_forward_kernel<Access::kVec8><<<Blocks(N * C / 8), kThreads, 0, stream>>>(
        cu::Nv(out), inp, cu::Nv(wte), cu::Nv(wpe), N, T, C, V);
  } else {
    encoder_forward_kernel<Access::kScalar><<<Blocks(N * C), kThreads, 0, stream>>>(
        cu::Nv(out), inp, cu::Nv(wte), cu::Nv(wpe), N, T, C, V);
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

absl::StatusOr<int64_t> encoder_backward_cuda_workspace_bytes(int B, int T, int V) {
  RETURN_IF_ERROR(CheckShapes("encoder_backward_cuda_workspace_bytes", B, T, 1, V));
  const int64_t N = static_cast<int64_t>(B) * T;
  ASSIGN_OR_RETURN(const size_t temp, SortTempBytes(N, V));
  return 4 * RoundUp(N * static_cast<int64_t>(sizeof(int32_t))) +
         RoundUp(static_cast<int64_t>(temp));
}

namespace {

template <typename G>
absl::Status EncoderBackward(G* dwte, G* dwpe, const bf16* dout, const int32_t* inp, int B, int T,
                             int C, int V, void* workspace, int64_t workspace_bytes,
                             cudaStream_t stream) {
  RETURN_IF_ERROR(CheckShapes("encoder_backward_cuda", B, T, C, V));
  QT_CHECK_ARG(dwte != nullptr && dwpe != nullptr && dout != nullptr && inp != nullptr,
               "encoder_backward_cuda: null pointer (dwte=", dwte != nullptr, " dwpe=",
               dwpe != nullptr, " dout=", dout != nullptr, " inp=", inp != nullptr, ")");
  QT_CHECK_ARG(workspace != nullptr, "encoder_backward_cuda: workspace is null");
  QT_CHECK_ARG(cu::IsAligned(workspace, 256),
               "encoder_backward_cuda: workspace must be 256-byte aligned");
  ASSIGN_OR_RETURN(const int64_t need, encoder_backward_cuda_workspace_bytes(B, T, V));
  QT_CHECK_ARG(workspace_bytes >= need, "encoder_backward_cuda: workspace has ",
               workspace_bytes, " bytes, needs ", need, " for B=", B, " T=", T, " V=", V);
  const int64_t N = static_cast<int64_t>(B) * T;
  const int64_t region = RoundUp(N * static_cast<int64_t>(sizeof(int32_t)));
  char* base = static_cast<char*>(workspace);
  Workspace ws;
  ws.keys_in = reinterpret_cast<int32_t*>(base);
  ws.keys_out = reinterpret_cast<int32_t*>(base + region);
  ws.vals_in = reinterpret_cast<int32_t*>(base + 2 * region);
  ws.vals_out = reinterpret_cast<int32_t*>(base + 3 * region);
  ws.temp = base + 4 * region;
  ws.temp_bytes = static_cast<size_t>(need - 4 * region);

  encoder_keys_kernel<<<Blocks(N), kThreads, 0, stream>>>(ws.keys_in, ws.vals_in, inp, N, V);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  CUDA_RETURN_IF_ERROR(cub::DeviceRadixSort::SortPairs(ws.temp, ws.temp_bytes, ws.keys_in,
                                                       ws.keys_out, ws.vals_in, ws.vals_out,
                                                       N, 0, EndBit(V), stream));
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>((C + kThreads - 1) / kThreads));
  encoder_dwte_kernel<<<grid, kThreads, 0, stream>>>(cu::Grad(dwte), cu::Nv(dout), ws.keys_out,
                                                     ws.vals_out, N, C, V);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  encoder_dwpe_kernel<<<Blocks(static_cast<int64_t>(T) * C), kThreads, 0, stream>>>(
      cu::Grad(dwpe), cu::Nv(dout), B, T, C);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace

absl::Status encoder_backward_cuda(float* dwte, float* dwpe, const bf16* dout,
                                   const int32_t* inp, int B, int T, int C, int V,
                                   void* workspace, int64_t workspace_bytes,
                                   cudaStream_t stream) {
  return EncoderBackward(dwte, dwpe, dout, inp, B, T, C, V, workspace, workspace_bytes, stream);
}

absl::Status encoder_backward_cuda(bf16* dwte, bf16* dwpe, const bf16* dout,
                                   const int32_t* inp, int B, int T, int C, int V,
                                   void* workspace, int64_t workspace_bytes,
                                   cudaStream_t stream) {
  return EncoderBackward(dwte, dwpe, dout, inp, B, T, C, V, workspace, workspace_bytes, stream);
}

}  // namespace qtrain::ops
