// INT8 tensor-core forward GEMM of QAT Linears (matmul_int8_cuda.h): cuBLASLt IMMA (int8 in,
// int32 accumulation and output, "TN") by row chunks into an L2-sized int32 scratch, each chunk
// followed by our epilogue kernel (weight scale per channel, activation scale per token or per
// tensor, bias, one rounding to BF16).
#include <algorithm>
#include <array>
#include <map>
#include <mutex>

#include <cublasLt.h>
#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "ops/cuda/cuda_status.h"
#include "ops/cuda/cuda_utils.cuh"
#include "ops/cuda/matmul_int8_cuda.h"
#include "ops/status_macros.h"

namespace qtrain::ops {
namespace {

using cu::nv_bf16;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 8192;
// Chunks start at multiples of this many rows, so that every chunk's activation codes keep the
// base pointer's 16-byte alignment.
constexpr int64_t kChunkAlign = 16;

absl::Status CublasToStatus(cublasStatus_t st, const char* file, int line, const char* expr) {
  return absl::InternalError(absl::StrCat("cuBLASLt ", cublasLtGetStatusName(st), ": ",
                                          cublasLtGetStatusString(st), "\n  at ", file, ":",
                                          line, " in ", expr));
}

#define CUBLAS_RETURN_IF_ERROR(expr)                                   \
  do {                                                                 \
    const cublasStatus_t qt_cublas_st_ = (expr);                       \
    if (qt_cublas_st_ != CUBLAS_STATUS_SUCCESS)                        \
      return CublasToStatus(qt_cublas_st_, __FILE__, __LINE__, #expr); \
  } while (0)

uint32_t AlignmentOf(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a == 0) return 256;
  uint32_t align = 1;
  while (align < 256 && a % (2 * align) == 0) align *= 2;
  return align;
}

// out[r, o] = bf16(fl(fl(float(acc) * w_scale[o]) * xs) + bias[o]); four outputs per thread
// (kVec: OC % 4 == 0, out and bias 8-byte aligned, w_scale 16-byte aligned) or one.
template <bool kVec>
__global__ void __launch_bounds__(kThreads)
    int8_epilogue_kernel(nv_bf16* __restrict__ out, const int32_t* __restrict__ acc,
                         const float* __restrict__ x_scale, bool per_token,
                         const float* __restrict__ w_scale, const nv_bf16* __restrict__ bias,
                         int64_t rows, int OC) {
  constexpr int kPer = kVec ? 4 : 1;
  const int64_t units = rows * OC / kPer;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const float xs_tensor = per_token ? 0.f : *x_scale;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; u < units;
       u += stride) {
    const int64_t i0 = u * kPer;
    const int64_t r = i0 / OC;
    const int o = static_cast<int>(i0 - r * OC);
    const float xs = per_token ? x_scale[r] : xs_tensor;
    float a[kPer], ws[kPer], b[kPer];
    if (kVec) {
      const int4 v = __ldcs(reinterpret_cast<const int4*>(acc + i0));
      a[0] = __int2float_rn(v.x), a[1] = __int2float_rn(v.y), a[2] = __int2float_rn(v.z),
      a[3] = __int2float_rn(v.w);
      const float4 w = *reinterpret_cast<const float4*>(w_scale + o);
      ws[0] = w.x, ws[1] = w.y, ws[2] = w.z, ws[3] = w.w;
      if (bias != nullptr) {
        const uint2 bb = *reinterpret_cast<const uint2*>(bias + o);
        b[0] = __uint_as_float(bb.x << 16), b[1] = __uint_as_float(bb.x & 0xffff0000u);
        b[2] = __uint_as_float(bb.y << 16), b[3] = __uint_as_float(bb.y & 0xffff0000u);
      }
    } else {
      a[0] = __int2float_rn(acc[i0]);
      ws[0] = w_scale[o];
      if (bias != nullptr) b[0] = __bfloat162float(bias[o]);
    }
    float y[kPer];
#pragma unroll
    for (int k = 0; k < kPer; ++k) {
      y[k] = __fmul_rn(__fmul_rn(a[k], ws[k]), xs);
      if (bias != nullptr) y[k] = __fadd_rn(y[k], b[k]);
    }
    if (kVec) {
      const __nv_bfloat162 lo = __floats2bfloat162_rn(y[0], y[1]);
      const __nv_bfloat162 hi = __floats2bfloat162_rn(y[2], y[3]);
      uint2 packed;
      packed.x = *reinterpret_cast<const uint32_t*>(&lo);
      packed.y = *reinterpret_cast<const uint32_t*>(&hi);
      *reinterpret_cast<uint2*>(out + i0) = packed;
    } else {
      out[i0] = __float2bfloat16_rn(y[0]);
    }
  }
}

template <typename T, cublasStatus_t (*Destroy)(T)>
class Handle {
 public:
  Handle() = default;
  ~Handle() {
    if (h_ != nullptr) Destroy(h_);
  }
  Handle(const Handle&) = delete;
  Handle& operator=(const Handle&) = delete;
  T* out() { return &h_; }
  T get() const { return h_; }

 private:
  T h_ = nullptr;
};

using MatmulDesc = Handle<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy>;
using LayoutDesc = Handle<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy>;
using PrefDesc = Handle<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy>;

// m, n, k and the alignments of A, B, D.
using Key = std::array<int64_t, 6>;

}  // namespace

struct Int8MatmulContext::Impl {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  int32_t* scratch = nullptr;
  int64_t scratch_bytes = 0;
  std::mutex mu;
  struct Choice {
    bool has_algo = false;
    cublasLtMatmulAlgo_t algo;
  };
  std::map<Key, Choice> cache;

  ~Impl() {
    if (scratch != nullptr) cudaFree(scratch);
    if (workspace != nullptr) cudaFree(workspace);
    if (handle != nullptr) cublasLtDestroy(handle);
  }

  // D (m x n, int32, ld m) = A^T B with A (k x m, int8, ld k) and B (k x n, int8, ld k).
  absl::Status Gemm(int32_t* D, const int8_t* A, const int8_t* B, int64_t m, int64_t n,
                    int64_t k, cudaStream_t stream) {
    MatmulDesc desc;
    CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescCreate(desc.out(), CUBLAS_COMPUTE_32I, CUDA_R_32I));
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    CUBLAS_RETURN_IF_ERROR(
        cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    CUBLAS_RETURN_IF_ERROR(
        cublasLtMatmulDescSetAttribute(desc.get(), CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    LayoutDesc la, lb, ld;
    CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(la.out(), CUDA_R_8I, k, m, k));
    CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(lb.out(), CUDA_R_8I, k, n, k));
    CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(ld.out(), CUDA_R_32I, m, n, m));
    const Key key{m, n, k, AlignmentOf(A), AlignmentOf(B), AlignmentOf(D)};
    auto it = cache.find(key);
    if (it == cache.end()) {
      PrefDesc pref;
      CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceCreate(pref.out()));
      const uint64_t ws = workspace_bytes;
      CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
          pref.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
      const uint32_t aa = AlignmentOf(A), ab = AlignmentOf(B), ad = AlignmentOf(D);
      CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
          pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aa, sizeof(aa)));
      CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
          pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ab, sizeof(ab)));
      CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
          pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ad, sizeof(ad)));
      CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
          pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ad, sizeof(ad)));
      // Integer sums are exact in any order, so every split-K scheme gives the same bits.
      cublasLtMatmulHeuristicResult_t result;
      int returned = 0;
      const cublasStatus_t st =
          cublasLtMatmulAlgoGetHeuristic(handle, desc.get(), la.get(), lb.get(), ld.get(),
                                         ld.get(), pref.get(), 1, &result, &returned);
      Choice c;
      if (st == CUBLAS_STATUS_SUCCESS && returned > 0) {
        c.has_algo = true;
        c.algo = result.algo;
      } else if (st != CUBLAS_STATUS_SUCCESS && st != CUBLAS_STATUS_NOT_SUPPORTED) {
        return CublasToStatus(st, __FILE__, __LINE__, "cublasLtMatmulAlgoGetHeuristic");
      }
      it = cache.emplace(key, c).first;
    }
    if (!it->second.has_algo) {
      return absl::UnimplementedError(absl::StrCat(
          "matmul_int8_forward_cuda: cuBLASLt offers no INT8 algorithm for m=", m, " n=", n,
          " k=", k, " (alignments A ", key[3], ", B ", key[4], ", D ", key[5],
          "); use the BF16 fake-quant GEMM"));
    }
    const int32_t alpha = 1, beta = 0;
    CUBLAS_RETURN_IF_ERROR(cublasLtMatmul(handle, desc.get(), &alpha, A, la.get(), B, lb.get(),
                                          &beta, D, ld.get(), D, ld.get(), &it->second.algo,
                                          workspace, workspace_bytes, stream));
    return absl::OkStatus();
  }
};

Int8MatmulContext::Int8MatmulContext(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Int8MatmulContext::~Int8MatmulContext() = default;

absl::StatusOr<std::unique_ptr<Int8MatmulContext>> Int8MatmulContext::Create(
    int64_t workspace_bytes, int64_t scratch_bytes) {
  QT_CHECK_ARG(workspace_bytes >= 0, "Int8MatmulContext::Create: workspace_bytes = ",
               workspace_bytes, " must be >= 0");
  QT_CHECK_ARG(scratch_bytes >= 4 * 16, "Int8MatmulContext::Create: scratch_bytes = ",
               scratch_bytes, " must hold at least 16 int32 values");
  int devices = 0;
  const cudaError_t err = cudaGetDeviceCount(&devices);
  if (err != cudaSuccess || devices == 0) {
    cudaGetLastError();
    return absl::UnavailableError(absl::StrCat("Int8MatmulContext::Create: no CUDA device (",
                                               cudaGetErrorString(err), ")"));
  }
  auto impl = std::make_unique<Impl>();
  CUBLAS_RETURN_IF_ERROR(cublasLtCreate(&impl->handle));
  if (workspace_bytes > 0) {
    CUDA_RETURN_IF_ERROR(cudaMalloc(&impl->workspace, static_cast<size_t>(workspace_bytes)));
    impl->workspace_bytes = static_cast<size_t>(workspace_bytes);
  }
  CUDA_RETURN_IF_ERROR(cudaMalloc(reinterpret_cast<void**>(&impl->scratch),
                                  static_cast<size_t>(scratch_bytes)));
  impl->scratch_bytes = scratch_bytes;
  return std::unique_ptr<Int8MatmulContext>(new Int8MatmulContext(std::move(impl)));
}

int64_t Int8MatmulContext::scratch_bytes() const { return impl_->scratch_bytes; }

int64_t Int8MatmulContext::chunk_rows(int OC) const {
  if (OC <= 0) return 1;
  const int64_t rows = impl_->scratch_bytes / (4 * static_cast<int64_t>(OC));
  if (rows >= kChunkAlign) return rows / kChunkAlign * kChunkAlign;
  return std::max<int64_t>(rows, 1);
}

absl::Status matmul_int8_forward_cuda(Int8MatmulContext& ctx, bf16* out, const int8_t* x_codes,
                                      const float* x_scale, Int8ActScale x_scale_kind,
                                      const int8_t* w_codes, const float* w_scale,
                                      const bf16* bias, int N, int C, int OC,
                                      cudaStream_t stream) {
  const char* op = "matmul_int8_forward_cuda";
  QT_CHECK_ARG(N > 0 && C > 0 && OC > 0, op, ": N, C, OC must be > 0, got N=", N, " C=", C,
               " OC=", OC);
  QT_CHECK_ARG(C % 4 == 0 && OC % 4 == 0, op,
               ": cuBLASLt's INT8 GEMM needs C (the reduced dimension) and OC multiples of 4, "
               "got C=", C, " OC=", OC);
  QT_CHECK_ARG(C < (1 << 17), op, ": C = ", C,
               " risks int32 overflow of the accumulation (needs C * 128 * 128 < 2^31)");
  QT_CHECK_ARG(out != nullptr && x_codes != nullptr && x_scale != nullptr && w_codes != nullptr &&
                   w_scale != nullptr,
               op, ": null pointer (out=", out != nullptr, " x_codes=", x_codes != nullptr,
               " x_scale=", x_scale != nullptr, " w_codes=", w_codes != nullptr,
               " w_scale=", w_scale != nullptr, ")");
  QT_CHECK_ARG(cu::IsAligned(x_codes, 16) && cu::IsAligned(w_codes, 16), op,
               ": x_codes and w_codes must be 16-byte aligned");
  Int8MatmulContext::Impl& impl = *ctx.impl();
  std::lock_guard<std::mutex> lock(impl.mu);
  const int64_t chunk = ctx.chunk_rows(OC);
  const bool vec = cu::IsAligned(out, 8) && cu::IsAligned(w_scale, 16) &&
                   (bias == nullptr || cu::IsAligned(bias, 8));
  const bool per_token = x_scale_kind == Int8ActScale::kPerToken;
  for (int64_t r0 = 0; r0 < N; r0 += chunk) {
    const int64_t rows = std::min<int64_t>(chunk, N - r0);
    RETURN_IF_ERROR(impl.Gemm(impl.scratch, w_codes, x_codes + r0 * C, OC, rows, C, stream));
    const float* xs = per_token ? x_scale + r0 : x_scale;
    nv_bf16* o = cu::Nv(out) + r0 * OC;
    const nv_bf16* b = bias != nullptr ? cu::Nv(bias) : nullptr;
    const int64_t units = rows * OC / (vec ? 4 : 1);
    const int blocks =
        static_cast<int>(std::clamp<int64_t>((units + kThreads - 1) / kThreads, 1, kMaxBlocks));
    if (vec) {
      int8_epilogue_kernel<true><<<blocks, kThreads, 0, stream>>>(o, impl.scratch, xs, per_token,
                                                                  w_scale, b, rows, OC);
    } else {
      int8_epilogue_kernel<false><<<blocks, kThreads, 0, stream>>>(o, impl.scratch, xs,
                                                                   per_token, w_scale, b, rows,
                                                                   OC);
    }
    CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return absl::OkStatus();
}

}  // namespace qtrain::ops
