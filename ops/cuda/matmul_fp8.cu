// FP8 GEMMs: cuBLASLt FP8 (per-tensor scales, or the 1x128 / 128x128 block scales of cuBLAS
// 12.9+ on sm_90) on a MatmulContext's handle and workspace, and our own tensor-core fallback
// kernel (mma.sync m16n8k32 FP8, sm_89+) that keeps a fresh fp32 partial sum per 128-wide K
// chunk and promotes it into the fp32 total with the chunk's scales (DeepSeek-V3's scheme), for
// shapes, alignments and scale combinations cuBLASLt declines.
#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include <cublasLt.h>
#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "ops/cuda/cuda_status.h"
#include "ops/cuda/cuda_utils.cuh"
#include "ops/cuda/fp8_utils.cuh"
#include "ops/cuda/matmul_fp8_cuda.h"
#include "ops/status_macros.h"

namespace qtrain::ops {
namespace {

using cu::nv_bf16;

const char* FormatName(Fp8Format f) { return f == Fp8Format::kE4M3 ? "e4m3" : "e5m2"; }
const char* LayoutName(Fp8ScaleLayout s) {
  switch (s) {
    case Fp8ScaleLayout::kPerTensor: return "tensor";
    case Fp8ScaleLayout::kTile1x128: return "1x128";
    case Fp8ScaleLayout::kBlock128x128: return "128x128";
  }
  return "?";
}
const char* OutName(const Fp8MatmulOutput& o) {
  switch (o.type) {
    case Fp8OutType::kBf16: return "bf16";
    case Fp8OutType::kFp32: return "fp32";
    case Fp8OutType::kFp8: return o.fp8_format == Fp8Format::kE4M3 ? "e4m3" : "e5m2";
  }
  return "?";
}

// The scale grid row stride an operand uses (kBlock128x128).
int64_t BlockLd(const Fp8Operand& op, int K) {
  return op.scale_ld > 0 ? op.scale_ld : fp8_block_scale_ld(K);
}

// ---------------------------------------------------------------------------------------------
// Our kernel. Block tile 64 (rows of X) x 64 (rows of W) x 64 (K), 4 warps as 2 x 2, each warp
// 32 x 32 = 2 x 4 mma tiles of 16 x 8. Shared rows of 64 + 16 bytes: the fragment loads (8 rows x
// 4 bytes per quarter of k) fall in distinct banks, and rows stay 16-byte aligned for the
// vector fills. The next K tile is loaded into registers while the current one is multiplied.
constexpr int kBM = 64, kBN = 64, kBK = 64;
constexpr int kLd = kBK + 16;
constexpr int kGemmThreads = 128;

// Where an operand's scale for (row, K chunk b) lives.
struct ScaleView {
  const float* p;
  int layout;  // 0 per tensor (applied at the end), 1 tile 1x128, 2 block 128x128
  int64_t rows;
  int64_t ld;
  __device__ __forceinline__ float At(int64_t row, int64_t b) const {
    return layout == 1 ? p[b * rows + row] : p[(row >> 7) * ld + b];
  }
};

struct GemmArgs {
  const uint8_t* x;  // (N, K)
  const uint8_t* w;  // (OC, K)
  ScaleView sx, sw;
  int N, K, OC;
  // Output
  void* out;
  int out_type;  // 0 bf16, 1 fp32, 2 fp8
  bool accumulate;
  bool out_e5m2;
  const float* out_scale;
  float* out_amax;
  const nv_bf16* bias;
  bool gelu;
  nv_bf16* pre_act;
};

template <Fp8Format kA, Fp8Format kB>
__device__ __forceinline__ void Mma(float* c, const uint32_t* a, const uint32_t* b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  constexpr bool a4 = kA == Fp8Format::kE4M3, b4 = kB == Fp8Format::kE4M3;
  if constexpr (a4 && b4) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else if constexpr (a4 && !b4) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e5m2.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else if constexpr (!a4 && b4) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e5m2.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    static_assert(a4 || b4, "E5M2 x E5M2 is not offered");
  }
#else
  __trap();  // the host refuses to launch below compute capability 8.9
#endif
}

// Loads this thread's 2 x 16 bytes of a 64 x 64 tile of src (rows x K) into regs: chunk
// t + 128 j is row (t + 128 j) / 4, bytes 16 ((t + 128 j) % 4) .. + 15. Out-of-range bytes are
// zeros (code 0 is +0 in both formats).
template <bool kVec>
__device__ __forceinline__ void LoadTile(uint4 (&regs)[2], const uint8_t* __restrict__ src,
                                         int64_t rows, int K, int64_t row0, int k0) {
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int id = threadIdx.x + kGemmThreads * j;
    const int64_t r = row0 + id / 4;
    const int k = k0 + (id % 4) * 16;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < rows) {
      const uint8_t* p = src + r * K + k;
      if (kVec) {
        if (k < K) v = *reinterpret_cast<const uint4*>(p);  // K % 16 == 0: whole chunk
      } else {
        uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
        for (int b = 0; b < 16; ++b) {
          if (k + b < K) w[b / 4] |= static_cast<uint32_t>(p[b]) << (8 * (b % 4));
        }
        v = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
    regs[j] = v;
  }
}

__device__ __forceinline__ void StoreTile(uint8_t* tile, const uint4 (&regs)[2]) {
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int id = threadIdx.x + kGemmThreads * j;
    *reinterpret_cast<uint4*>(tile + (id / 4) * kLd + (id % 4) * 16) = regs[j];
  }
}

__device__ __forceinline__ float GeluF(float x) { return cu::Gelu(x); }

template <Fp8Format kA, Fp8Format kB, bool kVec>
__global__ void __launch_bounds__(kGemmThreads) fp8_gemm_kernel(const GemmArgs g) {
  __shared__ __align__(16) uint8_t As[kBM * kLd];
  __shared__ __align__(16) uint8_t Bs[kBN * kLd];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int gid = lane / 4, tig = lane % 4;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM;  // rows of X (out rows)
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;  // rows of W (out cols)
  float total[2][4][4], part[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) total[i][j][q] = part[i][j][q] = 0.f;

  const bool blocked = g.sx.layout != 0 || g.sw.layout != 0;
  uint4 ra[2], rb[2];
  LoadTile<kVec>(ra, g.x, g.N, g.K, m0, 0);
  LoadTile<kVec>(rb, g.w, g.OC, g.K, n0, 0);
  const int ktiles = (g.K + kBK - 1) / kBK;
  for (int kt = 0; kt < ktiles; ++kt) {
    __syncthreads();  // the previous tile's fragments have been read
    StoreTile(As, ra);
    StoreTile(Bs, rb);
    __syncthreads();
    if (kt + 1 < ktiles) {
      LoadTile<kVec>(ra, g.x, g.N, g.K, m0, (kt + 1) * kBK);
      LoadTile<kVec>(rb, g.w, g.OC, g.K, n0, (kt + 1) * kBK);
    }
#pragma unroll
    for (int ks = 0; ks < kBK; ks += 32) {
      uint32_t a[2][4], b[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const uint8_t* r0 = As + (wm + mi * 16 + gid) * kLd + ks + 4 * tig;
        a[mi][0] = *reinterpret_cast<const uint32_t*>(r0);
        a[mi][1] = *reinterpret_cast<const uint32_t*>(r0 + 8 * kLd);
        a[mi][2] = *reinterpret_cast<const uint32_t*>(r0 + 16);
        a[mi][3] = *reinterpret_cast<const uint32_t*>(r0 + 8 * kLd + 16);
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const uint8_t* r0 = Bs + (wn + ni * 8 + gid) * kLd + ks + 4 * tig;
        b[ni][0] = *reinterpret_cast<const uint32_t*>(r0);
        b[ni][1] = *reinterpret_cast<const uint32_t*>(r0 + 16);
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) Mma<kA, kB>(part[mi][ni], a[mi], b[ni]);
    }
    // Promote at the end of each 128-wide K chunk (two K tiles) and at the end of K.
    if (kt % 2 == 1 || kt + 1 == ktiles) {
      const int64_t chunk = kt / 2;
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            float f = 1.f;
            if (blocked) {
              const int64_t r = m0 + wm + mi * 16 + gid + (q >= 2 ? 8 : 0);
              const int64_t c = n0 + wn + ni * 8 + 2 * tig + (q & 1);
              const float fx = g.sx.layout != 0 && r < g.N ? g.sx.At(r, chunk) : 1.f;
              const float fw = g.sw.layout != 0 && c < g.OC ? g.sw.At(c, chunk) : 1.f;
              f = __fmul_rn(fx, fw);
            }
            total[mi][ni][q] = __fmaf_rn(part[mi][ni][q], f, total[mi][ni][q]);
            part[mi][ni][q] = 0.f;
          }
    }
  }
  // Per-tensor scales apply once at the end.
  const float tensor_factor = __fmul_rn(g.sx.layout == 0 ? *g.sx.p : 1.f,
                                        g.sw.layout == 0 ? *g.sw.p : 1.f);
  const float out_scale = g.out_type == 2 ? *g.out_scale : 1.f;
  uint32_t amax_bits = 0;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t r = m0 + wm + mi * 16 + gid + (q >= 2 ? 8 : 0);
        const int64_t c = n0 + wn + ni * 8 + 2 * tig + (q & 1);
        if (r >= g.N || c >= g.OC) continue;
        float v = __fmul_rn(total[mi][ni][q], tensor_factor);
        if (g.bias != nullptr) v = __fadd_rn(v, __bfloat162float(g.bias[c]));
        const int64_t i = r * g.OC + c;
        if (g.gelu) {
          const nv_bf16 pre = __float2bfloat16_rn(v);
          g.pre_act[i] = pre;
          v = GeluF(__bfloat162float(pre));
        }
        if (g.out_type == 0) {
          nv_bf16* o = static_cast<nv_bf16*>(g.out) + i;
          *o = __float2bfloat16_rn(g.accumulate ? __fadd_rn(__bfloat162float(*o), v) : v);
        } else if (g.out_type == 1) {
          float* o = static_cast<float*>(g.out) + i;
          *o = g.accumulate ? __fadd_rn(*o, v) : v;
        } else {
          amax_bits = max(amax_bits, cu::AbsBits(v));
          static_cast<uint8_t*>(g.out)[i] = g.out_e5m2 ? cu::Encode<Fp8Format::kE5M2>(v, out_scale)
                                                       : cu::Encode<Fp8Format::kE4M3>(v, out_scale);
        }
      }
  if (g.out_type == 2 && g.out_amax != nullptr) cu::WarpAtomicMax(g.out_amax, amax_bits);
}

// After a cuBLASLt GEMM that wrote the BF16 pre-activation (bias included): out = gelu(pre) as
// BF16, or its FP8 codes with *scale and the amax of gelu(pre).
__global__ void gelu_out_kernel(void* __restrict__ out, int out_type, bool e5m2,
                                const float* __restrict__ scale, float* __restrict__ amax,
                                const nv_bf16* __restrict__ pre, int64_t n) {
  const float s = out_type == 2 ? *scale : 1.f;
  uint32_t bits = 0;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const float v = GeluF(__bfloat162float(pre[i]));
    if (out_type == 0) {
      static_cast<nv_bf16*>(out)[i] = __float2bfloat16_rn(v);
    } else if (out_type == 1) {
      static_cast<float*>(out)[i] = v;
    } else {
      bits = max(bits, cu::AbsBits(v));
      static_cast<uint8_t*>(out)[i] =
          e5m2 ? cu::Encode<Fp8Format::kE5M2>(v, s) : cu::Encode<Fp8Format::kE4M3>(v, s);
    }
  }
  if (out_type == 2 && amax != nullptr) cu::WarpAtomicMax(amax, bits);
}

// *amax = max(*amax, *src): cuBLASLt sets its amax_D output, the API maxes into the caller's.
__global__ void max_into_kernel(float* __restrict__ amax, const float* __restrict__ src) {
  cu::AtomicMaxBits(amax, cu::AbsBits(*src));
}

// dst (bf16) = bf16(float(dst) + src): the BF16 accumulation of the fp32 product, rounded once.
__global__ void add_bf16_kernel(nv_bf16* __restrict__ dst, const float* __restrict__ src,
                                int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    dst[i] = __float2bfloat16_rn(__fadd_rn(__bfloat162float(dst[i]), src[i]));
  }
}

int ElementwiseBlocks(int64_t n) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, 4096)));
}

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

cudaDataType_t CudaFp8(Fp8Format f) {
  return f == Fp8Format::kE4M3 ? CUDA_R_8F_E4M3 : CUDA_R_8F_E5M2;
}

int32_t ScaleMode(Fp8ScaleLayout s) {
  switch (s) {
    case Fp8ScaleLayout::kPerTensor: return CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F;
    case Fp8ScaleLayout::kTile1x128: return CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F;
    case Fp8ScaleLayout::kBlock128x128: return CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
  }
  return CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F;
}

// One cuBLASLt problem (what the algorithm choice depends on). Pointers are all 16-byte aligned
// when cuBLASLt is tried, and the heuristic is told so, so they are not part of the key.
struct LtKey {
  int64_t m, n, k;
  int a_type, b_type, d_type, a_mode, b_mode;
  int fast, epilogue, has_bias, beta;
  auto tie() const {
    return std::tie(m, n, k, a_type, b_type, d_type, a_mode, b_mode, fast, epilogue, has_bias,
                    beta);
  }
  bool operator<(const LtKey& o) const { return tie() < o.tie(); }
};

struct LtChoice {
  bool ok = false;
  cublasLtMatmulAlgo_t algo;
  std::string why_not;  // cuBLASLt's status when it declined
};

// Everything one cuBLASLt call needs (column-major: D (OC x N) = W^T-as-stored . X).
struct LtCall {
  LtKey key;
  const void* A;  // w codes
  const void* B;  // x codes
  const float* a_scale;
  const float* b_scale;
  void* D;
  cudaDataType_t d_type;
  cudaDataType_t c_type;
  const void* C;  // null unless beta != 0 (then C = D)
  float beta;
  const float* d_scale;  // FP8 D
  float* d_amax;
  cublasLtEpilogue_t epilogue;
  const void* bias;
  void* aux;
  int64_t aux_ld;
  int8_t fast;
};

}  // namespace

struct Fp8MatmulContext::Impl {
  MatmulContext* base = nullptr;
  bool own_kernel_ok = false;  // compute capability >= 8.9
  std::mutex mu;               // the cache, report and scratch (the base's mutex guards cuBLASLt)
  std::map<LtKey, LtChoice> cache;
  std::map<std::string, size_t> seen;  // problem -> index in report
  std::vector<Fp8GemmRecord> report;
  std::atomic<int64_t> lt_calls{0}, own_calls{0};
  void* scratch = nullptr;  // fp32 product of a BF16 accumulation
  size_t scratch_bytes = 0;
  float* lt_amax = nullptr;  // cuBLASLt's amax_D, maxed into the caller's afterwards
  // 16-byte aligned copies of per-tensor scales (A, B, D at 0, 16, 32 bytes) for callers whose
  // scales sit at any float of an array (Fp8ScalingState): cuBLASLt declined every per-tensor
  // FP8 GEMM whose scale pointers were only 4-byte aligned (H200, cuBLAS 13.1).
  float* lt_scales = nullptr;

  ~Impl() {
    if (scratch != nullptr) cudaFree(scratch);
    if (lt_amax != nullptr) cudaFree(lt_amax);
    if (lt_scales != nullptr) cudaFree(lt_scales);
  }
  absl::StatusOr<void*> Scratch(size_t bytes) {
    if (bytes > scratch_bytes) {
      if (scratch != nullptr) {
        CUDA_RETURN_IF_ERROR(cudaFree(scratch));
        scratch = nullptr;
        scratch_bytes = 0;
      }
      CUDA_RETURN_IF_ERROR(cudaMalloc(&scratch, bytes));
      scratch_bytes = bytes;
    }
    return scratch;
  }
  void Record(const std::string& problem, bool lt, const std::string& why) {
    if (seen.count(problem) != 0) return;
    seen[problem] = report.size();
    report.push_back({problem, lt, why});
  }
  // Runs the call through cuBLASLt. NotFound (with cuBLASLt's status in the message) when it
  // declines the problem; the choice, or the refusal, is cached.
  absl::Status RunLt(const LtCall& c, cudaStream_t stream);
};

namespace {

absl::Status SetAttr(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr,
                     const void* value, size_t size) {
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(desc, attr, value, size));
  return absl::OkStatus();
}

// Statuses that mean "not this problem" rather than a broken call.
bool Declined(cublasStatus_t st) {
  return st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE ||
         st == CUBLAS_STATUS_ARCH_MISMATCH;
}

std::string StatusName(cublasStatus_t st) {
  return absl::StrCat(cublasLtGetStatusName(st), " (", cublasLtGetStatusString(st), ")");
}

}  // namespace

absl::Status Fp8MatmulContext::Impl::RunLt(const LtCall& call, cudaStream_t stream) {
  LtCall c = call;
  // Scalar scales that are not 16-byte aligned go through this context's aligned slots (a
  // stream-ordered 4-byte device copy each; the GEMM after it reads the copy).
  auto aligned = [&](const float*& p, int slot) -> absl::Status {
    if (p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0) return absl::OkStatus();
    float* dst = lt_scales + 4 * slot;
    CUDA_RETURN_IF_ERROR(
        cudaMemcpyAsync(dst, p, sizeof(float), cudaMemcpyDeviceToDevice, stream));
    p = dst;
    return absl::OkStatus();
  };
  if (c.key.a_mode == CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F) {
    RETURN_IF_ERROR(aligned(c.a_scale, 0));
  }
  if (c.key.b_mode == CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F) {
    RETURN_IF_ERROR(aligned(c.b_scale, 1));
  }
  RETURN_IF_ERROR(aligned(c.d_scale, 2));
  MatmulContext::Shared sh = base->shared();
  std::lock_guard<std::mutex> lock(*sh.mutex);
  cublasLtHandle_t handle = static_cast<cublasLtHandle_t>(sh.handle);
  MatmulDesc desc;
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescCreate(desc.out(), CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  RETURN_IF_ERROR(SetAttr(desc.get(), CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  RETURN_IF_ERROR(SetAttr(desc.get(), CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  RETURN_IF_ERROR(SetAttr(desc.get(), CUBLASLT_MATMUL_DESC_FAST_ACCUM, &c.fast, sizeof(c.fast)));
  RETURN_IF_ERROR(
      SetAttr(desc.get(), CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &c.a_scale, sizeof(c.a_scale)));
  RETURN_IF_ERROR(
      SetAttr(desc.get(), CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &c.b_scale, sizeof(c.b_scale)));
  const int32_t a_mode = c.key.a_mode, b_mode = c.key.b_mode;
  if (a_mode != CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F ||
      b_mode != CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F) {
    RETURN_IF_ERROR(SetAttr(desc.get(), CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &a_mode, sizeof(a_mode)));
    RETURN_IF_ERROR(SetAttr(desc.get(), CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &b_mode, sizeof(b_mode)));
  }
  if (c.d_scale != nullptr) {
    RETURN_IF_ERROR(
        SetAttr(desc.get(), CUBLASLT_MATMUL_DESC_D_SCALE_POINTER, &c.d_scale, sizeof(c.d_scale)));
  }
  if (c.d_amax != nullptr) {
    RETURN_IF_ERROR(
        SetAttr(desc.get(), CUBLASLT_MATMUL_DESC_AMAX_D_POINTER, &c.d_amax, sizeof(c.d_amax)));
  }
  RETURN_IF_ERROR(
      SetAttr(desc.get(), CUBLASLT_MATMUL_DESC_EPILOGUE, &c.epilogue, sizeof(c.epilogue)));
  if (c.bias != nullptr) {
    const cudaDataType_t bias_type = CUDA_R_16BF;
    RETURN_IF_ERROR(SetAttr(desc.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER, &c.bias, sizeof(c.bias)));
    RETURN_IF_ERROR(
        SetAttr(desc.get(), CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bias_type, sizeof(bias_type)));
  }
  if (c.aux != nullptr) {
    const cudaDataType_t aux_type = CUDA_R_16BF;
    RETURN_IF_ERROR(
        SetAttr(desc.get(), CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &c.aux, sizeof(c.aux)));
    RETURN_IF_ERROR(
        SetAttr(desc.get(), CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &c.aux_ld, sizeof(c.aux_ld)));
    RETURN_IF_ERROR(SetAttr(desc.get(), CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, &aux_type,
                            sizeof(aux_type)));
  }
  const LtKey& k = c.key;
  LayoutDesc a, b, cl, d;
  CUBLAS_RETURN_IF_ERROR(
      cublasLtMatrixLayoutCreate(a.out(), static_cast<cudaDataType_t>(k.a_type), k.k, k.m, k.k));
  CUBLAS_RETURN_IF_ERROR(
      cublasLtMatrixLayoutCreate(b.out(), static_cast<cudaDataType_t>(k.b_type), k.k, k.n, k.k));
  CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(cl.out(), c.c_type, k.m, k.n, k.m));
  CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(d.out(), c.d_type, k.m, k.n, k.m));

  LtChoice* choice;
  {
    std::lock_guard<std::mutex> cache_lock(mu);
    auto it = cache.find(k);
    if (it == cache.end()) {
      LtChoice fresh;
      PrefDesc pref;
      CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceCreate(pref.out()));
      const uint64_t ws = sh.workspace_bytes;
      CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
          pref.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
      const uint32_t align = 16;
      for (auto attr : {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES}) {
        CUBLAS_RETURN_IF_ERROR(
            cublasLtMatmulPreferenceSetAttribute(pref.get(), attr, &align, sizeof(align)));
      }
      cublasLtMatmulHeuristicResult_t result;
      int returned = 0;
      const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(
          handle, desc.get(), a.get(), b.get(), c.c_type == c.d_type ? d.get() : cl.get(),
          d.get(), pref.get(), 1, &result, &returned);
      if (st == CUBLAS_STATUS_SUCCESS && returned > 0) {
        fresh.ok = true;
        fresh.algo = result.algo;
      } else if (st == CUBLAS_STATUS_SUCCESS || Declined(st)) {
        fresh.why_not = st == CUBLAS_STATUS_SUCCESS ? std::string("no algorithm")
                                                    : StatusName(st);
      } else {
        return CublasToStatus(st, __FILE__, __LINE__, "cublasLtMatmulAlgoGetHeuristic");
      }
      it = cache.emplace(k, fresh).first;
    }
    choice = &it->second;
  }
  if (!choice->ok) {
    return absl::NotFoundError(absl::StrCat("cuBLASLt declined: ", choice->why_not));
  }
  const float alpha = 1.f;
  // C is D (same layout, read only with beta = 1) except for an FP8 D, whose C is absent.
  const bool c_is_d = c.c_type == c.d_type;
  const cublasStatus_t st = cublasLtMatmul(
      handle, desc.get(), &alpha, c.A, a.get(), c.B, b.get(), &c.beta, c_is_d ? c.D : nullptr,
      c_is_d ? d.get() : cl.get(), c.D, d.get(), &choice->algo, sh.workspace,
      sh.workspace_bytes, stream);
  if (st != CUBLAS_STATUS_SUCCESS) {
    if (Declined(st)) {
      std::lock_guard<std::mutex> cache_lock(mu);
      choice->ok = false;
      choice->why_not = absl::StrCat(StatusName(st), " from cublasLtMatmul");
      return absl::NotFoundError(absl::StrCat("cuBLASLt declined: ", choice->why_not));
    }
    return CublasToStatus(st, __FILE__, __LINE__, "cublasLtMatmul");
  }
  return absl::OkStatus();
}

Fp8MatmulContext::Fp8MatmulContext(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Fp8MatmulContext::~Fp8MatmulContext() = default;

absl::StatusOr<std::unique_ptr<Fp8MatmulContext>> Fp8MatmulContext::Create(MatmulContext* base) {
  QT_CHECK_ARG(base != nullptr, "Fp8MatmulContext::Create: base is null");
  int device = 0, major = 0, minor = 0;
  CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  auto impl = std::make_unique<Impl>();
  impl->base = base;
  impl->own_kernel_ok = major * 10 + minor >= 89;
  CUDA_RETURN_IF_ERROR(cudaMalloc(&impl->lt_amax, 256));
  CUDA_RETURN_IF_ERROR(cudaMalloc(&impl->lt_scales, 256));
  return std::unique_ptr<Fp8MatmulContext>(new Fp8MatmulContext(std::move(impl)));
}

int64_t Fp8MatmulContext::cublaslt_calls() const { return impl_->lt_calls.load(); }
int64_t Fp8MatmulContext::own_kernel_calls() const { return impl_->own_calls.load(); }
std::vector<Fp8GemmRecord> Fp8MatmulContext::report() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  return impl_->report;
}

namespace {

absl::Status CheckOperand(const char* which, const Fp8Operand& op, int rows, int K) {
  QT_CHECK_ARG(op.codes != nullptr && op.scale_inv != nullptr, "fp8_matmul_cuda: operand ",
               which, " has null codes or scale_inv");
  if (op.scaling == Fp8ScaleLayout::kBlock128x128) {
    QT_CHECK_ARG(op.scale_ld == 0 || op.scale_ld >= fp8_num_blocks(K), "fp8_matmul_cuda: operand ",
                 which, " scale_ld = ", op.scale_ld, " < ceil(K/128) = ", fp8_num_blocks(K));
  }
  (void)rows;
  return absl::OkStatus();
}

template <Fp8Format kA, Fp8Format kB>
absl::Status LaunchOwnTyped(const GemmArgs& g, bool vec, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((g.OC + kBN - 1) / kBN),
                  static_cast<unsigned>((g.N + kBM - 1) / kBM));
  if (vec) {
    fp8_gemm_kernel<kA, kB, true><<<grid, kGemmThreads, 0, stream>>>(g);
  } else {
    fp8_gemm_kernel<kA, kB, false><<<grid, kGemmThreads, 0, stream>>>(g);
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

ScaleView ViewOf(const Fp8Operand& op, int rows, int K) {
  ScaleView v;
  v.p = op.scale_inv;
  v.rows = rows;
  v.layout = op.scaling == Fp8ScaleLayout::kPerTensor ? 0
             : op.scaling == Fp8ScaleLayout::kTile1x128 ? 1
                                                          : 2;
  v.ld = op.scaling == Fp8ScaleLayout::kBlock128x128 ? BlockLd(op, K) : 0;
  return v;
}

absl::Status RunOwn(const Fp8MatmulOutput& out, const Fp8Operand& x, const Fp8Operand& w, int N,
                    int K, int OC, const Fp8MatmulOptions& opt, cudaStream_t stream) {
  GemmArgs g;
  g.x = x.codes;
  g.w = w.codes;
  g.sx = ViewOf(x, N, K);
  g.sw = ViewOf(w, OC, K);
  g.N = N;
  g.K = K;
  g.OC = OC;
  g.out = out.data;
  g.out_type = out.type == Fp8OutType::kBf16 ? 0 : out.type == Fp8OutType::kFp32 ? 1 : 2;
  g.accumulate = out.write == GradWrite::kAccumulate && out.type != Fp8OutType::kFp8;
  g.out_e5m2 = out.fp8_format == Fp8Format::kE5M2;
  g.out_scale = out.fp8_scale;
  g.out_amax = out.fp8_amax;
  g.bias = opt.bias != nullptr ? cu::Nv(opt.bias) : nullptr;
  g.gelu = opt.act == Activation::kGelu;
  g.pre_act = opt.pre_act != nullptr ? cu::Nv(opt.pre_act) : nullptr;
  const bool vec = K % 16 == 0 && cu::IsAligned(x.codes, 16) && cu::IsAligned(w.codes, 16);
  const bool xa = x.format == Fp8Format::kE4M3, wa = w.format == Fp8Format::kE4M3;
  if (xa && wa) return LaunchOwnTyped<Fp8Format::kE4M3, Fp8Format::kE4M3>(g, vec, stream);
  if (xa && !wa) return LaunchOwnTyped<Fp8Format::kE4M3, Fp8Format::kE5M2>(g, vec, stream);
  if (!xa && wa) return LaunchOwnTyped<Fp8Format::kE5M2, Fp8Format::kE4M3>(g, vec, stream);
  return absl::InternalError("fp8_matmul_cuda: E5M2 x E5M2 reached the kernel");
}

std::string Describe(const Fp8MatmulOutput& out, const Fp8Operand& x, const Fp8Operand& w,
                     int N, int K, int OC, const Fp8MatmulOptions& opt) {
  return absl::StrCat("N=", N, " K=", K, " OC=", OC, " X=", FormatName(x.format), "/",
                      LayoutName(x.scaling), " W=", FormatName(w.format), "/",
                      LayoutName(w.scaling), " out=", OutName(out),
                      out.write == GradWrite::kAccumulate ? "+=" : "",
                      opt.bias != nullptr ? " bias" : "",
                      opt.act == Activation::kGelu ? " gelu" : "",
                      opt.accumulation == Fp8Accumulation::kFast ? " fast" : " split");
}

}  // namespace

absl::Status fp8_matmul_cuda(Fp8MatmulContext& ctx, const Fp8MatmulOutput& out,
                             const Fp8Operand& x, const Fp8Operand& w, int N, int K, int OC,
                             const Fp8MatmulOptions& opt, cudaStream_t stream) {
  QT_CHECK_ARG(N > 0 && K > 0 && OC > 0, "fp8_matmul_cuda: N, K, OC must be > 0, got N=", N,
               " K=", K, " OC=", OC);
  RETURN_IF_ERROR(CheckOperand("x", x, N, K));
  RETURN_IF_ERROR(CheckOperand("w", w, OC, K));
  QT_CHECK_ARG(!(x.format == Fp8Format::kE5M2 && w.format == Fp8Format::kE5M2),
               "fp8_matmul_cuda: E5M2 x E5M2 is not an FP8 GEMM Hopper offers (use E4M3 for "
               "one operand)");
  QT_CHECK_ARG(out.data != nullptr, "fp8_matmul_cuda: out.data is null");
  const bool fp8_out = out.type == Fp8OutType::kFp8;
  const bool blocked = x.scaling != Fp8ScaleLayout::kPerTensor ||
                       w.scaling != Fp8ScaleLayout::kPerTensor;
  if (fp8_out) {
    QT_CHECK_ARG(out.fp8_scale != nullptr, "fp8_matmul_cuda: FP8 output needs fp8_scale");
    QT_CHECK_ARG(out.write == GradWrite::kOverwrite,
                 "fp8_matmul_cuda: FP8 output cannot accumulate (write must be kOverwrite)");
    QT_CHECK_ARG(!blocked, "fp8_matmul_cuda: FP8 output needs per-tensor operands, got X ",
                 LayoutName(x.scaling), " and W ", LayoutName(w.scaling));
  }
  const bool gelu = opt.act == Activation::kGelu;
  QT_CHECK_ARG(gelu == (opt.pre_act != nullptr),
               "fp8_matmul_cuda: pre_act must be given exactly when act is kGelu");
  QT_CHECK_ARG(!gelu || out.write == GradWrite::kOverwrite,
               "fp8_matmul_cuda: the GELU epilogue writes its output (write must be kOverwrite)");
  Fp8MatmulContext::Impl& impl = *ctx.impl();
  const std::string problem = Describe(out, x, w, N, K, OC, opt);
  const int64_t total = static_cast<int64_t>(N) * OC;

  // cuBLASLt: FP8 needs multiples of 16 and 16-byte aligned pointers; block scales also
  // 16-byte aligned scale arrays and, for 128x128 grids, the stride it derives.
  const auto aligned = [](const void* p) { return p == nullptr || cu::IsAligned(p, 16); };
  bool lt_shape = N % 16 == 0 && K % 16 == 0 && OC % 16 == 0 && aligned(x.codes) &&
                  aligned(w.codes) && aligned(out.data) && aligned(opt.bias) &&
                  aligned(opt.pre_act);
  if (blocked) {
    lt_shape = lt_shape && aligned(x.scale_inv) && aligned(w.scale_inv) &&
               (x.scaling != Fp8ScaleLayout::kBlock128x128 ||
                BlockLd(x, K) == fp8_block_scale_ld(K)) &&
               (w.scaling != Fp8ScaleLayout::kBlock128x128 ||
                BlockLd(w, K) == fp8_block_scale_ld(K));
  }
  std::string why_not;
  if (opt.backend != Fp8GemmBackend::kOwnKernel) {
    if (!lt_shape) {
      why_not = "shape or alignment: cuBLASLt FP8 needs N, K, OC multiples of 16 and 16-byte "
                "aligned pointers";
    } else {
      LtCall c;
      c.key.m = OC;
      c.key.n = N;
      c.key.k = K;
      c.key.a_type = CudaFp8(w.format);
      c.key.b_type = CudaFp8(x.format);
      c.key.a_mode = ScaleMode(w.scaling);
      c.key.b_mode = ScaleMode(x.scaling);
      c.key.fast = opt.accumulation == Fp8Accumulation::kFast && !blocked ? 1 : 0;
      c.key.has_bias = opt.bias != nullptr;
      c.A = w.codes;
      c.B = x.codes;
      c.a_scale = w.scale_inv;
      c.b_scale = x.scale_inv;
      c.fast = static_cast<int8_t>(c.key.fast);
      c.bias = opt.bias;
      c.aux = nullptr;
      c.aux_ld = 0;
      c.d_scale = nullptr;
      c.d_amax = nullptr;
      c.C = nullptr;
      c.beta = 0.f;
      c.D = out.data;
      const bool bf16_acc = out.type == Fp8OutType::kBf16 && out.write == GradWrite::kAccumulate;
      std::string last;  // cuBLASLt's refusal of the last call tried
      if (bf16_acc) {
        // fp32 product into the scratch, then one rounding of old + product.
        std::lock_guard<std::mutex> lock(impl.mu);
        ASSIGN_OR_RETURN(c.D, impl.Scratch(static_cast<size_t>(total) * sizeof(float)));
      }
      switch (out.type) {
        case Fp8OutType::kBf16:
          c.d_type = bf16_acc ? CUDA_R_32F : CUDA_R_16BF;
          break;
        case Fp8OutType::kFp32:
          c.d_type = CUDA_R_32F;
          if (out.write == GradWrite::kAccumulate) {
            c.beta = 1.f;
            c.C = out.data;
          }
          break;
        case Fp8OutType::kFp8:
          c.d_type = CudaFp8(out.fp8_format);
          c.d_scale = out.fp8_scale;
          c.d_amax = out.fp8_amax != nullptr ? impl.lt_amax : nullptr;
          break;
      }
      // C's type: D's, except BF16 for an FP8 D (cuBLASLt's rule: C like the bias, BF16).
      c.c_type = fp8_out ? CUDA_R_16BF : c.d_type;
      c.key.d_type = c.d_type;
      c.key.beta = c.beta != 0.f;
      // Fused GELU first; if declined, the pre-activation GEMM (+ bias) and our GELU kernel.
      bool done = false;
      bool lt_wrote_amax = false;  // cuBLASLt set impl.lt_amax (FP8 D with an amax)
      if (gelu) {
        LtCall f = c;
        f.epilogue = opt.bias != nullptr ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS
                                         : CUBLASLT_EPILOGUE_GELU_AUX;
        f.aux = opt.pre_act;
        f.aux_ld = OC;
        f.key.epilogue = f.epilogue;
        const absl::Status sf = impl.RunLt(f, stream);
        if (sf.ok()) {
          done = true;
          lt_wrote_amax = f.d_amax != nullptr;
        } else if (!absl::IsNotFound(sf)) {
          return sf;
        } else {
          why_not = absl::StrCat("GELU epilogue: ", sf.message(), "; ");
          LtCall p = c;
          p.D = opt.pre_act;
          p.d_type = CUDA_R_16BF;
          p.c_type = CUDA_R_16BF;
          p.d_scale = nullptr;
          p.d_amax = nullptr;
          p.epilogue = opt.bias != nullptr ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
          p.key.d_type = CUDA_R_16BF;
          p.key.epilogue = p.epilogue;
          const absl::Status sp = impl.RunLt(p, stream);
          if (sp.ok()) {
            const int type = out.type == Fp8OutType::kBf16 ? 0 : out.type == Fp8OutType::kFp32 ? 1 : 2;
            gelu_out_kernel<<<ElementwiseBlocks(total), 256, 0, stream>>>(
                out.data, type, out.fp8_format == Fp8Format::kE5M2, out.fp8_scale, out.fp8_amax,
                cu::Nv(opt.pre_act), total);
            CUDA_RETURN_IF_ERROR(cudaGetLastError());
            done = true;
          } else if (!absl::IsNotFound(sp)) {
            return sp;
          } else {
            last = std::string(sp.message());
          }
        }
      } else {
        c.epilogue = opt.bias != nullptr ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
        c.key.epilogue = c.epilogue;
        const absl::Status sc = impl.RunLt(c, stream);
        if (sc.ok()) {
          done = true;
          lt_wrote_amax = c.d_amax != nullptr;
        } else if (!absl::IsNotFound(sc)) {
          return sc;
        } else {
          last = std::string(sc.message());
        }
      }
      if (done) {
        if (lt_wrote_amax) {
          max_into_kernel<<<1, 1, 0, stream>>>(out.fp8_amax, impl.lt_amax);
          CUDA_RETURN_IF_ERROR(cudaGetLastError());
        }
        if (bf16_acc) {
          add_bf16_kernel<<<ElementwiseBlocks(total), 256, 0, stream>>>(
              static_cast<nv_bf16*>(out.data), static_cast<const float*>(c.D), total);
          CUDA_RETURN_IF_ERROR(cudaGetLastError());
        }
        ++impl.lt_calls;
        std::lock_guard<std::mutex> lock(impl.mu);
        impl.Record(problem, true, why_not);
        return absl::OkStatus();
      }
      why_not += last;
    }
    if (opt.backend == Fp8GemmBackend::kCublasLt) {
      return absl::UnimplementedError(
          absl::StrCat("fp8_matmul_cuda: cuBLASLt does not run ", problem, ": ", why_not));
    }
  }
  if (!impl.own_kernel_ok) {
    return absl::UnimplementedError(absl::StrCat(
        "fp8_matmul_cuda: our FP8 kernel needs compute capability 8.9+ (FP8 mma); cuBLASLt: ",
        why_not.empty() ? "not tried" : why_not, " for ", problem));
  }
  RETURN_IF_ERROR(RunOwn(out, x, w, N, K, OC, opt, stream));
  ++impl.own_calls;
  std::lock_guard<std::mutex> lock(impl.mu);
  impl.Record(problem, false, why_not);
  return absl::OkStatus();
}

}  // namespace qtrain::ops
