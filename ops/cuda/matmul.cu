// CUDA linear layer: cuBLASLt GEMMs (row-major problems mapped onto its column-major API) with
// fused bias/GELU epilogues, fallback epilogue kernels, and a deterministic bias gradient.
#include <algorithm>
#include <array>
#include <atomic>
#include <map>
#include <mutex>

#include <cublasLt.h>
#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "ops/cuda/cuda_status.h"
#include "ops/cuda/cuda_utils.cuh"
#include "ops/cuda/matmul_cuda.h"
#include "ops/status_macros.h"

namespace qtrain::ops {
namespace {

using cu::nv_bf16;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 8192;
constexpr int kDbiasRows = 128;  // rows per partial sum of the bias gradient

absl::Status CublasToStatus(cublasStatus_t st, const char* file, int line, const char* expr) {
  return absl::InternalError(absl::StrCat("cuBLASLt ", cublasLtGetStatusName(st), ": ",
                                          cublasLtGetStatusString(st), "\n  at ", file, ":",
                                          line, " in ", expr));
}

#define CUBLAS_RETURN_IF_ERROR(expr)                                      \
  do {                                                                    \
    const cublasStatus_t qt_cublas_st_ = (expr);                          \
    if (qt_cublas_st_ != CUBLAS_STATUS_SUCCESS)                           \
      return CublasToStatus(qt_cublas_st_, __FILE__, __LINE__, #expr);    \
  } while (0)

// Largest power of two (<= 256) dividing the address: what cuBLASLt may assume of a pointer.
uint32_t AlignmentOf(const void* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a == 0) return 256;
  uint32_t align = 1;
  while (align < 256 && a % (2 * align) == 0) align *= 2;
  return align;
}

// One cuBLASLt problem in its own column-major terms: D (m x n) = op(A) op(B) + beta * D.
struct Gemm {
  cublasOperation_t transa = CUBLAS_OP_N, transb = CUBLAS_OP_N;
  int64_t m = 0, n = 0, k = 0;
  const void* A = nullptr;
  int64_t lda = 0;
  const void* B = nullptr;
  int64_t ldb = 0;
  void* D = nullptr;
  int64_t ldd = 0;
  cudaDataType_t dtype = CUDA_R_16BF;  // of D (A and B are always BF16)
  float beta = 0.f;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;
  const void* aux = nullptr;
  int64_t aux_ld = 0;
};

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

using CacheKey = std::array<int64_t, 18>;

}  // namespace

struct MatmulContext::Impl {
  cublasLtHandle_t handle = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  EpilogueFusion fusion = EpilogueFusion::kAuto;
  std::mutex mu;
  // Heuristic choice per problem; a missing algorithm is cached too (has_algo false).
  struct Choice {
    bool has_algo = false;
    cublasLtMatmulAlgo_t algo;
  };
  std::map<CacheKey, Choice> cache;
  std::atomic<int64_t> fused{0}, unfused{0};

  ~Impl() {
    if (workspace != nullptr) cudaFree(workspace);
    if (handle != nullptr) cublasLtDestroy(handle);
  }

  // NotFound when cuBLASLt offers no algorithm for the problem (the caller may fall back).
  absl::Status Run(const Gemm& g, cudaStream_t stream);
};

namespace {

absl::Status SetAttr(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr,
                     const void* value, size_t size) {
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescSetAttribute(desc, attr, value, size));
  return absl::OkStatus();
}

}  // namespace

absl::Status MatmulContext::Impl::Run(const Gemm& g, cudaStream_t stream) {
  MatmulDesc desc;
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmulDescCreate(desc.out(), CUBLAS_COMPUTE_32F, CUDA_R_32F));
  RETURN_IF_ERROR(SetAttr(desc.get(), CUBLASLT_MATMUL_DESC_TRANSA, &g.transa, sizeof(g.transa)));
  RETURN_IF_ERROR(SetAttr(desc.get(), CUBLASLT_MATMUL_DESC_TRANSB, &g.transb, sizeof(g.transb)));
  RETURN_IF_ERROR(
      SetAttr(desc.get(), CUBLASLT_MATMUL_DESC_EPILOGUE, &g.epilogue, sizeof(g.epilogue)));
  const cudaDataType_t bf16_type = CUDA_R_16BF;
  if (g.bias != nullptr) {
    RETURN_IF_ERROR(
        SetAttr(desc.get(), CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.bias, sizeof(g.bias)));
    RETURN_IF_ERROR(SetAttr(desc.get(), CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &bf16_type,
                            sizeof(bf16_type)));
  }
  if (g.aux != nullptr) {
    RETURN_IF_ERROR(
        SetAttr(desc.get(), CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, &g.aux, sizeof(g.aux)));
    RETURN_IF_ERROR(
        SetAttr(desc.get(), CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &g.aux_ld, sizeof(g.aux_ld)));
    RETURN_IF_ERROR(SetAttr(desc.get(), CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE, &bf16_type,
                            sizeof(bf16_type)));
  }
  // Stored shapes: op(A) is m x k, so A is k x m when transposed.
  const bool ta = g.transa == CUBLAS_OP_T, tb = g.transb == CUBLAS_OP_T;
  LayoutDesc a_desc, b_desc, d_desc;
  CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(a_desc.out(), CUDA_R_16BF, ta ? g.k : g.m,
                                                    ta ? g.m : g.k, g.lda));
  CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(b_desc.out(), CUDA_R_16BF, tb ? g.n : g.k,
                                                    tb ? g.k : g.n, g.ldb));
  CUBLAS_RETURN_IF_ERROR(cublasLtMatrixLayoutCreate(d_desc.out(), g.dtype, g.m, g.n, g.ldd));

  const uint32_t align_a = AlignmentOf(g.A), align_b = AlignmentOf(g.B),
                 align_d = AlignmentOf(g.D);
  const CacheKey key = {g.transa,     g.transb,         g.m,         g.n,
                        g.k,          g.lda,            g.ldb,       g.ldd,
                        g.dtype,      g.beta != 0.f,    g.epilogue,  g.aux_ld,
                        align_a,      align_b,          align_d,     AlignmentOf(g.bias),
                        AlignmentOf(g.aux), static_cast<int64_t>(workspace_bytes)};
  auto it = cache.find(key);
  if (it == cache.end()) {
    PrefDesc pref;
    CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceCreate(pref.out()));
    const uint64_t ws = workspace_bytes;
    CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
        pref.get(), CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
    CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
        pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof(align_a)));
    CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
        pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof(align_b)));
    CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
        pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_d, sizeof(align_d)));
    CUBLAS_RETURN_IF_ERROR(cublasLtMatmulPreferenceSetAttribute(
        pref.get(), CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d, sizeof(align_d)));
    cublasLtMatmulHeuristicResult_t result = {};
    int returned = 0;
    const cublasStatus_t st =
        cublasLtMatmulAlgoGetHeuristic(handle, desc.get(), a_desc.get(), b_desc.get(),
                                       d_desc.get(), d_desc.get(), pref.get(), 1, &result,
                                       &returned);
    Choice choice;
    if (st == CUBLAS_STATUS_SUCCESS && returned > 0) {
      choice.has_algo = true;
      choice.algo = result.algo;
    } else if (st != CUBLAS_STATUS_SUCCESS && st != CUBLAS_STATUS_NOT_SUPPORTED) {
      return CublasToStatus(st, __FILE__, __LINE__, "cublasLtMatmulAlgoGetHeuristic");
    }
    it = cache.emplace(key, choice).first;
  }
  if (!it->second.has_algo) {
    return absl::NotFoundError(absl::StrCat("cuBLASLt has no algorithm for m=", g.m, " n=", g.n,
                                            " k=", g.k, " epilogue=", g.epilogue));
  }
  const float alpha = 1.f;
  CUBLAS_RETURN_IF_ERROR(cublasLtMatmul(handle, desc.get(), &alpha, g.A, a_desc.get(), g.B,
                                        b_desc.get(), &g.beta, g.D, d_desc.get(), g.D,
                                        d_desc.get(), &it->second.algo, workspace,
                                        workspace_bytes, stream));
  return absl::OkStatus();
}

namespace {

int Blocks(int64_t n) {
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks)));
}

// Unfused epilogue. kNone: out += bias (in place). kGelu: pre was written by the GEMM;
// pre += bias (rounded), out = gelu(pre).
template <Activation kAct>
__global__ void bias_act_kernel(nv_bf16* __restrict__ out, nv_bf16* __restrict__ pre,
                                const nv_bf16* __restrict__ bias, int64_t N, int OC) {
  const int64_t total = N * OC;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    const float b = bias != nullptr ? __bfloat162float(bias[i % OC]) : 0.f;
    if (kAct == Activation::kGelu) {
      float x = __bfloat162float(pre[i]);
      if (bias != nullptr) {
        const nv_bf16 r = __float2bfloat16_rn(x + b);
        pre[i] = r;
        x = __bfloat162float(r);
      }
      out[i] = __float2bfloat16_rn(cu::Gelu(x));
    } else {
      out[i] = __float2bfloat16_rn(__bfloat162float(out[i]) + b);
    }
  }
}

__global__ void dgelu_kernel(nv_bf16* __restrict__ dinp, const nv_bf16* __restrict__ pre,
                             int64_t total) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    dinp[i] = __float2bfloat16_rn(__bfloat162float(dinp[i]) *
                                  cu::GeluGrad(__bfloat162float(pre[i])));
  }
}

// Block (x: columns, y: chunk of kDbiasRows rows): column sums of the chunk in row order.
__global__ void dbias_partial_kernel(float* __restrict__ partial, const nv_bf16* __restrict__ dout,
                                     int N, int OC) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= OC) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kDbiasRows;
  const int64_t r1 = r0 + kDbiasRows < N ? r0 + kDbiasRows : N;
  float acc = 0.f;
  for (int64_t r = r0; r < r1; ++r) acc += __bfloat162float(dout[r * OC + c]);
  partial[static_cast<int64_t>(blockIdx.y) * OC + c] = acc;
}

__global__ void dbias_final_kernel(float* __restrict__ dbias, const float* __restrict__ partial,
                                   int chunks, int OC, GradWrite write) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= OC) return;
  float acc = 0.f;
#pragma unroll 8
  for (int j = 0; j < chunks; ++j) acc += partial[static_cast<int64_t>(j) * OC + c];
  dbias[c] = write == GradWrite::kOverwrite ? acc : dbias[c] + acc;
}

int DbiasChunks(int N) { return (N + kDbiasRows - 1) / kDbiasRows; }

absl::Status CheckShape(const char* op, int N, int C, int OC) {
  QT_CHECK_ARG(N > 0 && C > 0 && OC > 0, op, ": N, C, OC must be > 0, got N=", N, " C=", C,
               " OC=", OC);
  return absl::OkStatus();
}

}  // namespace

MatmulContext::MatmulContext(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
MatmulContext::~MatmulContext() = default;

absl::StatusOr<std::unique_ptr<MatmulContext>> MatmulContext::Create(EpilogueFusion fusion,
                                                                    int64_t workspace_bytes) {
  QT_CHECK_ARG(workspace_bytes >= 0, "MatmulContext::Create: workspace_bytes must be >= 0, got ",
               workspace_bytes);
  int devices = 0;
  const cudaError_t err = cudaGetDeviceCount(&devices);
  if (err != cudaSuccess || devices == 0) {
    cudaGetLastError();
    return absl::UnavailableError(
        absl::StrCat("MatmulContext::Create: no CUDA device (", cudaGetErrorString(err), ")"));
  }
  auto impl = std::make_unique<Impl>();
  impl->fusion = fusion;
  CUBLAS_RETURN_IF_ERROR(cublasLtCreate(&impl->handle));
  if (workspace_bytes > 0) {
    CUDA_RETURN_IF_ERROR(cudaMalloc(&impl->workspace, static_cast<size_t>(workspace_bytes)));
    impl->workspace_bytes = static_cast<size_t>(workspace_bytes);
  }
  return std::unique_ptr<MatmulContext>(new MatmulContext(std::move(impl)));
}

EpilogueFusion MatmulContext::fusion() const { return impl_->fusion; }
int64_t MatmulContext::fused_epilogues() const { return impl_->fused.load(); }
int64_t MatmulContext::unfused_epilogues() const { return impl_->unfused.load(); }

absl::Status matmul_forward_cuda(MatmulContext& ctx, bf16* out, const bf16* inp,
                                 const bf16* weight, const bf16* bias, int N, int C, int OC,
                                 cudaStream_t stream, Activation act, bf16* pre_act) {
  RETURN_IF_ERROR(CheckShape("matmul_forward_cuda", N, C, OC));
  QT_CHECK_ARG(out != nullptr && inp != nullptr && weight != nullptr,
               "matmul_forward_cuda: null pointer (out=", out != nullptr,
               " inp=", inp != nullptr, " weight=", weight != nullptr, ")");
  QT_CHECK_ARG((act == Activation::kGelu) == (pre_act != nullptr),
               "matmul_forward_cuda: pre_act must be given exactly when act is kGelu (act=",
               act == Activation::kGelu ? "gelu" : "none", ", pre_act ",
               pre_act != nullptr ? "set" : "null", ")");
  MatmulContext::Impl& impl = *ctx.impl();
  std::lock_guard<std::mutex> lock(impl.mu);
  Gemm g;
  g.transa = CUBLAS_OP_T;
  g.transb = CUBLAS_OP_N;
  g.m = OC;
  g.n = N;
  g.k = C;
  g.A = weight;
  g.lda = C;
  g.B = inp;
  g.ldb = C;
  g.D = out;
  g.ldd = OC;
  const bool gelu = act == Activation::kGelu;
  const bool epilogue = bias != nullptr || gelu;
  // cuBLASLt wants the GELU input's leading dimension divisible by 8.
  if (epilogue && impl.fusion == EpilogueFusion::kAuto && (!gelu || OC % 8 == 0)) {
    Gemm f = g;
    f.bias = bias;
    if (gelu) {
      f.epilogue = bias != nullptr ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
      f.aux = pre_act;
      f.aux_ld = OC;
    } else {
      f.epilogue = CUBLASLT_EPILOGUE_BIAS;
    }
    const absl::Status s = impl.Run(f, stream);
    if (s.ok()) {
      ++impl.fused;
      return absl::OkStatus();
    }
    if (!absl::IsNotFound(s)) return s;
  }
  if (gelu) g.D = pre_act;
  const absl::Status s = impl.Run(g, stream);
  if (absl::IsNotFound(s)) return absl::InternalError(s.message());
  RETURN_IF_ERROR(s);
  if (epilogue) {
    const int64_t total = static_cast<int64_t>(N) * OC;
    if (gelu) {
      bias_act_kernel<Activation::kGelu><<<Blocks(total), kThreads, 0, stream>>>(
          cu::Nv(out), cu::Nv(pre_act), bias != nullptr ? cu::Nv(bias) : nullptr, N, OC);
    } else {
      bias_act_kernel<Activation::kNone><<<Blocks(total), kThreads, 0, stream>>>(
          cu::Nv(out), nullptr, cu::Nv(bias), N, OC);
    }
    CUDA_RETURN_IF_ERROR(cudaGetLastError());
    ++impl.unfused;
  }
  return absl::OkStatus();
}

int64_t matmul_backward_cuda_workspace_bytes(int N, int OC) {
  if (N <= 0 || OC <= 0) return 0;
  return static_cast<int64_t>(DbiasChunks(N)) * OC * static_cast<int64_t>(sizeof(float));
}

absl::Status matmul_backward_cuda(MatmulContext& ctx, bf16* dinp, float* dweight, float* dbias,
                                  const bf16* dout, const bf16* inp, const bf16* weight, int N,
                                  int C, int OC, void* workspace, int64_t workspace_bytes,
                                  cudaStream_t stream, const bf16* dinp_gelu_pre,
                                  GradWrite dparams, GradWrite dinp_write) {
  RETURN_IF_ERROR(CheckShape("matmul_backward_cuda", N, C, OC));
  QT_CHECK_ARG(dout != nullptr, "matmul_backward_cuda: dout is null");
  QT_CHECK_ARG(dinp == nullptr || weight != nullptr,
               "matmul_backward_cuda: dinp needs weight, which is null");
  QT_CHECK_ARG(dweight == nullptr || inp != nullptr,
               "matmul_backward_cuda: dweight needs inp, which is null");
  QT_CHECK_ARG(dinp_gelu_pre == nullptr || dinp != nullptr,
               "matmul_backward_cuda: dinp_gelu_pre given without dinp");
  if (dbias != nullptr) {
    const int64_t need = matmul_backward_cuda_workspace_bytes(N, OC);
    QT_CHECK_ARG(workspace != nullptr && workspace_bytes >= need,
                 "matmul_backward_cuda: workspace of ", workspace_bytes, " bytes (",
                 workspace != nullptr ? "non-null" : "null", "), needs ", need, " for N=", N,
                 " OC=", OC);
    QT_CHECK_ARG(cu::IsAligned(workspace, 4), "matmul_backward_cuda: workspace misaligned");
  }
  MatmulContext::Impl& impl = *ctx.impl();
  std::lock_guard<std::mutex> lock(impl.mu);
  if (dinp != nullptr) {
    Gemm g;  // dinp^T (C x N) = weight^T (C x OC, stored as is) . dout^T (OC x N)
    g.transa = CUBLAS_OP_N;
    g.transb = CUBLAS_OP_N;
    g.m = C;
    g.n = N;
    g.k = OC;
    g.A = weight;
    g.lda = C;
    g.B = dout;
    g.ldb = OC;
    g.D = dinp;
    g.ldd = C;
    g.beta = dinp_gelu_pre != nullptr || dinp_write == GradWrite::kOverwrite ? 0.f : 1.f;
    bool done = false;
    if (dinp_gelu_pre != nullptr && impl.fusion == EpilogueFusion::kAuto && C % 8 == 0) {
      Gemm f = g;
      f.epilogue = CUBLASLT_EPILOGUE_DGELU;
      f.aux = dinp_gelu_pre;
      f.aux_ld = C;
      const absl::Status s = impl.Run(f, stream);
      if (s.ok()) {
        ++impl.fused;
        done = true;
      } else if (!absl::IsNotFound(s)) {
        return s;
      }
    }
    if (!done) {
      const absl::Status s = impl.Run(g, stream);
      if (absl::IsNotFound(s)) return absl::InternalError(s.message());
      RETURN_IF_ERROR(s);
      if (dinp_gelu_pre != nullptr) {
        const int64_t total = static_cast<int64_t>(N) * C;
        dgelu_kernel<<<Blocks(total), kThreads, 0, stream>>>(cu::Nv(dinp),
                                                             cu::Nv(dinp_gelu_pre), total);
        CUDA_RETURN_IF_ERROR(cudaGetLastError());
        ++impl.unfused;
      }
    }
  }
  if (dweight != nullptr) {
    Gemm g;  // dweight^T (C x OC) += inp^T (C x N) . dout (N x OC)
    g.transa = CUBLAS_OP_N;
    g.transb = CUBLAS_OP_T;
    g.m = C;
    g.n = OC;
    g.k = N;
    g.A = inp;
    g.lda = C;
    g.B = dout;
    g.ldb = OC;
    g.D = dweight;
    g.ldd = C;
    g.dtype = CUDA_R_32F;
    g.beta = dparams == GradWrite::kOverwrite ? 0.f : 1.f;
    const absl::Status s = impl.Run(g, stream);
    if (absl::IsNotFound(s)) return absl::InternalError(s.message());
    RETURN_IF_ERROR(s);
  }
  if (dbias != nullptr) {
    float* partial = static_cast<float*>(workspace);
    const int chunks = DbiasChunks(N);
    const dim3 grid((OC + kThreads - 1) / kThreads, chunks);
    dbias_partial_kernel<<<grid, kThreads, 0, stream>>>(partial, cu::Nv(dout), N, OC);
    CUDA_RETURN_IF_ERROR(cudaGetLastError());
    dbias_final_kernel<<<(OC + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        dbias, partial, chunks, OC, dparams);
    CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return absl::OkStatus();
}

}  // namespace qtrain::ops
