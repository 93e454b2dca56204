// Phi (QVGen) on the GPU (lowrank_cuda.h): the rank-k product L diag(gamma) R (fp32 SGEMM), the
// gradients of L and R from the weight gradient (two GEMMs with fp32 accumulation plus a gamma /
// write kernel), the rank-decay gamma, and the fp64 factorisations on cuBLAS and cuSOLVER: the
// dense init through the Gram matrix of the smaller side and its top eigenpairs (syevdx), the
// period-end re-factorisation through two thin QRs and a k x k SVD.
#include <algorithm>
#include <cmath>
#include <vector>

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include "absl/strings/str_cat.h"
#include "ops/cuda/cuda_status.h"
#include "ops/cuda/cuda_utils.cuh"
#include "ops/cuda/lowrank_cuda.h"
#include "ops/status_macros.h"

namespace qtrain::ops {
namespace {

using cu::nv_bf16;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 8192;
// Components whose singular value is below this fraction of the largest get L, R = 0: their
// share of the product is negligible, and dividing by sqrt(sigma) would amplify noise.
constexpr double kRelativeCutoff = 1e-10;

int GridFor(int64_t n) {
  return static_cast<int>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, kMaxBlocks));
}

absl::Status BlasStatus(cublasStatus_t st, const char* file, int line, const char* expr) {
  return absl::InternalError(absl::StrCat("cuBLAS ", cublasGetStatusName(st), ": ",
                                          cublasGetStatusString(st), "\n  at ", file, ":", line,
                                          " in ", expr));
}

absl::Status SolverStatus(cusolverStatus_t st, const char* file, int line, const char* expr) {
  return absl::InternalError(absl::StrCat("cuSOLVER status ", static_cast<int>(st), "\n  at ",
                                          file, ":", line, " in ", expr));
}

#define BLAS_RETURN_IF_ERROR(expr)                                           \
  do {                                                                       \
    const cublasStatus_t qt_blas_st_ = (expr);                               \
    if (qt_blas_st_ != CUBLAS_STATUS_SUCCESS)                                \
      return BlasStatus(qt_blas_st_, __FILE__, __LINE__, #expr);             \
  } while (0)

#define SOLVER_RETURN_IF_ERROR(expr)                                         \
  do {                                                                       \
    const cusolverStatus_t qt_solver_st_ = (expr);                           \
    if (qt_solver_st_ != CUSOLVER_STATUS_SUCCESS)                            \
      return SolverStatus(qt_solver_st_, __FILE__, __LINE__, #expr);         \
  } while (0)

// ---- Small kernels.

__global__ void gamma_kernel(float* gamma, int rmax, int k, float u) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j < rmax) gamma[j] = j < k / 2 ? 1.f : (j < k ? u : 0.f);
}

// LG (OC x k, row-major) = L[:, :k] diag(gamma), each product rounded in fp32.
__global__ void fold_gamma_kernel(float* __restrict__ lg, const float* __restrict__ L,
                                  const float* __restrict__ gamma, int OC, int rmax, int k) {
  const int64_t n = static_cast<int64_t>(OC) * k;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = i / k;
    const int j = static_cast<int>(i - o * k);
    lg[i] = __fmul_rn(L[o * rmax + j], gamma[j]);
  }
}

// dL (OC x rmax) from S1 (k x OC col-major: S1[j + o k] = (dW R^T)[o, j]) and dR (rmax x C)
// from S2 (C x k col-major: S2[c + j C] = (L^T dW)[j, c]), times gamma[j]; the inactive part
// zeroed under kOverwrite.
template <typename G>
__global__ void phi_grad_write_kernel(G* __restrict__ dL, G* __restrict__ dR,
                                      const float* __restrict__ s1, const float* __restrict__ s2,
                                      const float* __restrict__ gamma, int OC, int C, int rmax,
                                      int k, GradWrite write) {
  const int64_t nl = static_cast<int64_t>(OC) * rmax;
  const int64_t nr = static_cast<int64_t>(rmax) * C;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nl + nr;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < nl) {
      const int64_t o = i / rmax;
      const int j = static_cast<int>(i - o * rmax);
      if (j < k) {
        cu::WriteGrad(dL + i, __fmul_rn(gamma[j], s1[j + o * k]), write);
      } else if (write == GradWrite::kOverwrite) {
        cu::GradStore(dL + i, 0.f);
      }
    } else {
      const int64_t t = i - nl;
      const int j = static_cast<int>(t / C);
      const int64_t c = t - static_cast<int64_t>(j) * C;
      if (j < k) {
        cu::WriteGrad(dR + t, __fmul_rn(gamma[j], s2[c + static_cast<int64_t>(j) * C]), write);
      } else if (write == GradWrite::kOverwrite) {
        cu::GradStore(dR + t, 0.f);
      }
    }
  }
}

__global__ void widen_kernel(double* __restrict__ out, const float* __restrict__ in, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<double>(in[i]);
  }
}

// Column-major fp64 copies of the active factors: A1 (OC x k) = L[:, :k], B1 (C x k) =
// R[:k, :]^T.
__global__ void gather_factors_kernel(double* __restrict__ a1, double* __restrict__ b1,
                                      const float* __restrict__ L, const float* __restrict__ R,
                                      int OC, int C, int rmax, int k) {
  const int64_t na = static_cast<int64_t>(OC) * k, nb = static_cast<int64_t>(C) * k;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < na + nb;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < na) {
      const int j = static_cast<int>(i / OC);
      const int64_t o = i - static_cast<int64_t>(j) * OC;
      a1[i] = static_cast<double>(L[o * rmax + j]);
    } else {
      const int64_t t = i - na;
      const int j = static_cast<int>(t / C);
      const int64_t c = t - static_cast<int64_t>(j) * C;
      b1[t] = static_cast<double>(R[static_cast<int64_t>(j) * C + c]);
    }
  }
}

// The upper triangle of the leading k x k block of a (lda) into t (k x k, col-major).
__global__ void upper_kernel(double* __restrict__ t, const double* __restrict__ a, int64_t lda,
                             int k) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= k * k) return;
  const int col = i / k, row = i % k;
  t[i] = row <= col ? a[row + col * lda] : 0.0;
}

// Writes the factors: L[o, j] = lcol(j)[o] * lscale[j], R[j, c] = rcol(j)[c] * rscale[j] for
// j < k (lcol(j) = lbase + lcol_index(j) * ld_l, likewise r), zero elsewhere. Column index
// col_of(j) = reverse ? k - 1 - j : j (syevdx's ascending order).
__global__ void write_factors_kernel(float* __restrict__ L, float* __restrict__ R,
                                     const double* __restrict__ lbase, int64_t ld_l,
                                     const double* __restrict__ rbase, int64_t ld_r,
                                     const double* __restrict__ lscale,
                                     const double* __restrict__ rscale, int OC, int C, int rmax,
                                     int k, bool reverse) {
  const int64_t nl = static_cast<int64_t>(OC) * rmax, nr = static_cast<int64_t>(rmax) * C;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < nl + nr;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (i < nl) {
      const int64_t o = i / rmax;
      const int j = static_cast<int>(i - o * rmax);
      float v = 0.f;
      if (j < k) {
        const int col = reverse ? k - 1 - j : j;
        v = static_cast<float>(lbase[o + col * ld_l] * lscale[j]);
      }
      L[i] = v;
    } else {
      const int64_t t = i - nl;
      const int j = static_cast<int>(t / C);
      const int64_t c = t - static_cast<int64_t>(j) * C;
      float v = 0.f;
      if (j < k) {
        const int col = reverse ? k - 1 - j : j;
        v = static_cast<float>(rbase[c + col * ld_r] * rscale[j]);
      }
      R[t] = v;
    }
  }
}

// From the ascending eigenvalues w (k, of the Gram matrix) or the descending singular values
// (k): sigma_j descending, the scales of the two sides (sqrt(sigma) and 1 / sqrt(sigma), 0 for
// components under the cutoff) and sigma itself.
__global__ void scales_kernel(double* __restrict__ sigma, double* __restrict__ sqrt_s,
                              double* __restrict__ inv_sqrt_s, const double* __restrict__ w,
                              int k, bool from_eigen) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double smax = 0;
  for (int j = 0; j < k; ++j) {
    const double v = from_eigen ? w[k - 1 - j] : w[j];
    sigma[j] = from_eigen ? sqrt(fmax(v, 0.0)) : v;
    smax = fmax(smax, sigma[j]);
  }
  for (int j = 0; j < k; ++j) {
    const bool keep = sigma[j] > kRelativeCutoff * smax && sigma[j] > 0;
    sqrt_s[j] = keep ? sqrt(sigma[j]) : 0.0;
    inv_sqrt_s[j] = keep ? 1.0 / sqrt(sigma[j]) : 0.0;
  }
}

// A bump allocator over the context's scratch (256-byte pieces).
class Carver {
 public:
  explicit Carver(char* base) : base_(base) {}
  template <typename T>
  T* Take(int64_t n) {
    T* p = reinterpret_cast<T*>(base_ + used_);
    used_ += (n * static_cast<int64_t>(sizeof(T)) + 255) / 256 * 256;
    return p;
  }

 private:
  char* base_;
  int64_t used_ = 0;
};

}  // namespace

struct PhiContext::Impl {
  cublasHandle_t blas = nullptr;
  cusolverDnHandle_t solver = nullptr;
  void* scratch = nullptr;
  int64_t scratch_bytes = 0;

  ~Impl() {
    if (scratch != nullptr) cudaFree(scratch);
    if (solver != nullptr) cusolverDnDestroy(solver);
    if (blas != nullptr) cublasDestroy(blas);
  }

  absl::Status SetStream(cudaStream_t stream) {
    BLAS_RETURN_IF_ERROR(cublasSetStream(blas, stream));
    SOLVER_RETURN_IF_ERROR(cusolverDnSetStream(solver, stream));
    return absl::OkStatus();
  }

  // At least `bytes` of scratch (waits for the device when it grows).
  absl::StatusOr<char*> Scratch(int64_t bytes) {
    if (bytes > scratch_bytes) {
      if (scratch != nullptr) {
        CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
        CUDA_RETURN_IF_ERROR(cudaFree(scratch));
        scratch = nullptr;
        scratch_bytes = 0;
      }
      CUDA_RETURN_IF_ERROR(cudaMalloc(&scratch, static_cast<size_t>(bytes)));
      scratch_bytes = bytes;
    }
    return static_cast<char*>(scratch);
  }
};

PhiContext::PhiContext(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
PhiContext::~PhiContext() = default;

absl::StatusOr<std::unique_ptr<PhiContext>> PhiContext::Create() {
  int devices = 0;
  const cudaError_t err = cudaGetDeviceCount(&devices);
  if (err != cudaSuccess || devices == 0) {
    cudaGetLastError();
    return absl::UnavailableError(
        absl::StrCat("PhiContext::Create: no CUDA device (", cudaGetErrorString(err), ")"));
  }
  auto impl = std::make_unique<Impl>();
  BLAS_RETURN_IF_ERROR(cublasCreate(&impl->blas));
  // CUBLAS_COMPUTE_32F without a TF32 math mode: plain fp32 products and sums, as the CPU's
  // float loops (TF32 would round the SGEMM's inputs to 10 mantissa bits).
  BLAS_RETURN_IF_ERROR(cublasSetMathMode(impl->blas, CUBLAS_DEFAULT_MATH));
  SOLVER_RETURN_IF_ERROR(cusolverDnCreate(&impl->solver));
  return std::unique_ptr<PhiContext>(new PhiContext(std::move(impl)));
}

absl::Status PhiContext::ReleaseScratch() {
  if (impl_->scratch != nullptr) {
    CUDA_RETURN_IF_ERROR(cudaDeviceSynchronize());
    CUDA_RETURN_IF_ERROR(cudaFree(impl_->scratch));
    impl_->scratch = nullptr;
    impl_->scratch_bytes = 0;
  }
  return absl::OkStatus();
}

int64_t PhiContext::scratch_bytes() const { return impl_->scratch_bytes; }

absl::Status phi_gamma_cuda(float* gamma, int rmax, int k, float u, cudaStream_t stream) {
  QT_CHECK_ARG(rmax >= 1 && k >= 0 && k <= rmax, "phi_gamma_cuda: need 0 <= k <= rmax, rmax >= 1; "
               "got k=", k, " rmax=", rmax);
  QT_CHECK_ARG(gamma != nullptr, "phi_gamma_cuda: gamma is null");
  gamma_kernel<<<(rmax + 127) / 128, 128, 0, stream>>>(gamma, rmax, k, u);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

namespace {

absl::Status CheckFactorShape(const char* op, int OC, int C, int rmax, int k) {
  QT_CHECK_ARG(OC >= 1 && C >= 1 && rmax >= 1, op, ": shape OC=", OC, " C=", C, " rmax=", rmax,
               " must be >= 1");
  QT_CHECK_ARG(k >= 0 && k <= rmax, op, ": rank k=", k, " must be in [0, rmax=", rmax, "]");
  return absl::OkStatus();
}

}  // namespace

int64_t phi_product_cuda_workspace_bytes(int OC, int k) {
  if (OC <= 0 || k <= 0) return 0;
  return static_cast<int64_t>(OC) * k * 4;
}

absl::Status phi_product_cuda(PhiContext& ctx, float* P, const float* L, const float* R,
                              const float* gamma, int OC, int C, int rmax, int k,
                              void* workspace, int64_t workspace_bytes, cudaStream_t stream) {
  const char* op = "phi_product_cuda";
  RETURN_IF_ERROR(CheckFactorShape(op, OC, C, rmax, k));
  QT_CHECK_ARG(P != nullptr, op, ": P is null");
  if (k == 0) {
    CUDA_RETURN_IF_ERROR(
        cudaMemsetAsync(P, 0, static_cast<size_t>(OC) * C * sizeof(float), stream));
    return absl::OkStatus();
  }
  QT_CHECK_ARG(L != nullptr && R != nullptr && gamma != nullptr, op, ": null L, R or gamma");
  const int64_t need = phi_product_cuda_workspace_bytes(OC, k);
  QT_CHECK_ARG(workspace != nullptr && workspace_bytes >= need && cu::IsAligned(workspace, 16),
               op, ": workspace of ", workspace_bytes, " bytes (",
               workspace != nullptr ? "non-null" : "null", "), needs ", need,
               " bytes 16-byte aligned");
  PhiContext::Impl& impl = *ctx.impl();
  RETURN_IF_ERROR(impl.SetStream(stream));
  float* lg = static_cast<float*>(workspace);
  fold_gamma_kernel<<<GridFor(static_cast<int64_t>(OC) * k), kThreads, 0, stream>>>(lg, L, gamma,
                                                                                    OC, rmax, k);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  // Column-major: P^T (C x OC) = R[:k]^T (C x k, ld C) * LG^T (k x OC, ld k).
  const float one = 1.f, zero = 0.f;
  BLAS_RETURN_IF_ERROR(cublasSgemm(impl.blas, CUBLAS_OP_N, CUBLAS_OP_N, C, OC, k, &one, R, C, lg,
                                   k, &zero, P, C));
  return absl::OkStatus();
}

int64_t phi_backward_cuda_workspace_bytes(int OC, int C, int k) {
  if (OC <= 0 || C <= 0 || k <= 0) return 0;
  // S1 (k x OC) then S2 (C x k), each in 256-byte pieces.
  const int64_t s1 = (static_cast<int64_t>(k) * OC * 4 + 255) / 256 * 256;
  return s1 + static_cast<int64_t>(C) * k * 4;
}

namespace {

template <typename G, typename In>
absl::Status PhiBackward(PhiContext& ctx, G* dL, G* dR, const In* dW, const In* L, const In* R,
                         const float* gamma, int OC, int C, int rmax, int k, void* workspace,
                         int64_t workspace_bytes, cudaStream_t stream, GradWrite write,
                         cudaDataType_t in_type) {
  const char* op = "phi_backward_cuda";
  RETURN_IF_ERROR(CheckFactorShape(op, OC, C, rmax, k));
  QT_CHECK_ARG(dL != nullptr && dR != nullptr, op, ": null dL or dR");
  if (k == 0) {
    if (write == GradWrite::kOverwrite) {
      CUDA_RETURN_IF_ERROR(
          cudaMemsetAsync(dL, 0, static_cast<size_t>(OC) * rmax * sizeof(G), stream));
      CUDA_RETURN_IF_ERROR(
          cudaMemsetAsync(dR, 0, static_cast<size_t>(rmax) * C * sizeof(G), stream));
    }
    return absl::OkStatus();
  }
  QT_CHECK_ARG(dW != nullptr && L != nullptr && R != nullptr && gamma != nullptr, op,
               ": null dW_eff, L, R or gamma");
  const int64_t need = phi_backward_cuda_workspace_bytes(OC, C, k);
  QT_CHECK_ARG(workspace != nullptr && workspace_bytes >= need && cu::IsAligned(workspace, 256),
               op, ": workspace of ", workspace_bytes, " bytes (",
               workspace != nullptr ? "non-null" : "null", "), needs ", need,
               " bytes 256-byte aligned");
  PhiContext::Impl& impl = *ctx.impl();
  RETURN_IF_ERROR(impl.SetStream(stream));
  float* s1 = static_cast<float*>(workspace);
  float* s2 = reinterpret_cast<float*>(static_cast<char*>(workspace) +
                                       (static_cast<int64_t>(k) * OC * 4 + 255) / 256 * 256);
  const float one = 1.f, zero = 0.f;
  // S1 (k x OC) = R[:k] (k x C) dW^T: op(A) = A^T with A = R as (C x k, ld C); B = dW as
  // (C x OC, ld C).
  BLAS_RETURN_IF_ERROR(cublasGemmEx(impl.blas, CUBLAS_OP_T, CUBLAS_OP_N, k, OC, C, &one, R,
                                    in_type, C, dW, in_type, C, &zero, s1, CUDA_R_32F, k,
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  // S2 (C x k) = dW^T (C x OC) L[:, :k] (OC x k): A = dW (C x OC, ld C); op(B) = B^T with B =
  // L as (k x OC, ld rmax).
  BLAS_RETURN_IF_ERROR(cublasGemmEx(impl.blas, CUBLAS_OP_N, CUBLAS_OP_T, C, k, OC, &one, dW,
                                    in_type, C, L, in_type, rmax, &zero, s2, CUDA_R_32F, C,
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  const int64_t total = static_cast<int64_t>(OC) * rmax + static_cast<int64_t>(rmax) * C;
  phi_grad_write_kernel<<<GridFor(total), kThreads, 0, stream>>>(dL, dR, s1, s2, gamma, OC, C,
                                                                 rmax, k, write);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  return absl::OkStatus();
}

}  // namespace

absl::Status phi_backward_cuda(PhiContext& ctx, float* dL, float* dR, const float* dW_eff,
                               const float* L, const float* R, const float* gamma, int OC,
                               int C, int rmax, int k, void* workspace, int64_t workspace_bytes,
                               cudaStream_t stream, GradWrite write) {
  return PhiBackward(ctx, dL, dR, dW_eff, L, R, gamma, OC, C, rmax, k, workspace,
                     workspace_bytes, stream, write, CUDA_R_32F);
}

absl::Status phi_backward_cuda(PhiContext& ctx, bf16* dL, bf16* dR, const bf16* dW_eff,
                               const bf16* L, const bf16* R, const float* gamma, int OC, int C,
                               int rmax, int k, void* workspace, int64_t workspace_bytes,
                               cudaStream_t stream, GradWrite write) {
  return PhiBackward(ctx, dL != nullptr ? cu::Nv(dL) : nullptr,
                     dR != nullptr ? cu::Nv(dR) : nullptr, dW_eff, L, R, gamma, OC, C, rmax, k,
                     workspace, workspace_bytes, stream, write, CUDA_R_16BF);
}

namespace {

// Copies the solver's info flags to the host (waiting for the stream) and fails on any.
absl::Status CheckInfo(const char* op, const int* dev_info, int count, cudaStream_t stream,
                       const char* const* names) {
  std::vector<int> info(count, 0);
  CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(info.data(), dev_info, count * sizeof(int),
                                       cudaMemcpyDeviceToHost, stream));
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  for (int i = 0; i < count; ++i) {
    if (info[i] != 0) {
      return absl::InternalError(absl::StrCat(op, ": ", names[i], " reported info = ", info[i],
                                              info[i] < 0 ? " (an invalid argument)"
                                                          : " (did not converge)"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status phi_factorize_cuda(PhiContext& ctx, float* L, float* R, const float* M, int OC,
                                int C, int rmax, int k, cudaStream_t stream,
                                std::vector<double>* top_singular_values) {
  const char* op = "phi_factorize_cuda";
  RETURN_IF_ERROR(CheckFactorShape(op, OC, C, rmax, k));
  const int ns = std::min(OC, C);
  QT_CHECK_ARG(k <= ns, op, ": rank k=", k, " exceeds min(OC, C) = ", ns);
  QT_CHECK_ARG(L != nullptr && R != nullptr && M != nullptr, op, ": null L, R or M");
  PhiContext::Impl& impl = *ctx.impl();
  RETURN_IF_ERROR(impl.SetStream(stream));
  if (top_singular_values != nullptr) top_singular_values->clear();
  const int64_t total = static_cast<int64_t>(OC) * rmax + static_cast<int64_t>(rmax) * C;
  if (k == 0) {
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(L, 0, static_cast<size_t>(OC) * rmax * 4, stream));
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(R, 0, static_cast<size_t>(rmax) * C * 4, stream));
    return absl::OkStatus();
  }
  const int64_t nm = static_cast<int64_t>(OC) * C;
  const bool gram_right = C <= OC;  // G = M^T M (C x C); else G = M M^T (OC x OC)
  const int other = gram_right ? OC : C;
  int lwork = 0, meig = 0;
  const int il = ns - k + 1, iu = ns;
  auto bytes = [](int64_t n, int64_t size) { return (n * size + 255) / 256 * 256; };
  // The fixed part first, then the eigensolver's workspace (queried with the real pointers)
  // after it; growing the scratch keeps the layout, so the pieces are carved again.
  const int64_t fixed = bytes(nm, 8) + bytes(static_cast<int64_t>(ns) * ns, 8) + bytes(ns, 8) +
                        bytes(static_cast<int64_t>(other) * k, 8) + 3 * bytes(k, 8) +
                        bytes(1, 4);
  double *md, *gram, *w, *mv, *sigma, *sqrt_s, *inv_sqrt_s, *work;
  int* info;
  auto carve_all = [&](char* base) {
    Carver carve(base);
    md = carve.Take<double>(nm);
    gram = carve.Take<double>(static_cast<int64_t>(ns) * ns);
    w = carve.Take<double>(ns);
    mv = carve.Take<double>(static_cast<int64_t>(other) * k);
    sigma = carve.Take<double>(k);
    sqrt_s = carve.Take<double>(k);
    inv_sqrt_s = carve.Take<double>(k);
    info = carve.Take<int>(1);
    work = carve.Take<double>(0);  // the rest
  };
  {
    ASSIGN_OR_RETURN(char* base, impl.Scratch(fixed));
    carve_all(base);
  }
  SOLVER_RETURN_IF_ERROR(cusolverDnDsyevdx_bufferSize(
      impl.solver, CUSOLVER_EIG_MODE_VECTOR, CUSOLVER_EIG_RANGE_I, CUBLAS_FILL_MODE_LOWER, ns,
      gram, ns, 0.0, 0.0, il, iu, &meig, w, &lwork));
  {
    ASSIGN_OR_RETURN(char* base, impl.Scratch(fixed + bytes(std::max(lwork, 1), 8)));
    carve_all(base);
  }

  widen_kernel<<<GridFor(nm), kThreads, 0, stream>>>(md, M, nm);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  // md is M^T as a column-major C x OC matrix (ld C).
  const double one = 1.0, zero = 0.0;
  if (gram_right) {
    BLAS_RETURN_IF_ERROR(cublasDsyrk(impl.blas, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, C, OC, &one,
                                     md, C, &zero, gram, ns));
  } else {
    BLAS_RETURN_IF_ERROR(cublasDsyrk(impl.blas, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_T, OC, C, &one,
                                     md, C, &zero, gram, ns));
  }
  SOLVER_RETURN_IF_ERROR(cusolverDnDsyevdx(impl.solver, CUSOLVER_EIG_MODE_VECTOR,
                                           CUSOLVER_EIG_RANGE_I, CUBLAS_FILL_MODE_LOWER, ns, gram,
                                           ns, 0.0, 0.0, il, iu, &meig, w, work, lwork, info));
  {
    const char* names[] = {"cusolverDnDsyevdx"};
    RETURN_IF_ERROR(CheckInfo(op, info, 1, stream, names));
  }
  QT_CHECK_ARG(meig == k, op, ": the eigensolver returned ", meig, " eigenpairs, asked for ", k);
  // The eigenvectors E (ns x k, ascending) are gram's first k columns. The other side:
  // M E (OC x k) = md^T E, or M^T E (C x k) = md E.
  if (gram_right) {
    BLAS_RETURN_IF_ERROR(cublasDgemm(impl.blas, CUBLAS_OP_T, CUBLAS_OP_N, OC, k, C, &one, md, C,
                                     gram, ns, &zero, mv, OC));
  } else {
    BLAS_RETURN_IF_ERROR(cublasDgemm(impl.blas, CUBLAS_OP_N, CUBLAS_OP_N, C, k, OC, &one, md, C,
                                     gram, ns, &zero, mv, C));
  }
  scales_kernel<<<1, 1, 0, stream>>>(sigma, sqrt_s, inv_sqrt_s, w, k, /*from_eigen=*/true);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  // gram_right: L_j = (M v_j) / sqrt(sigma_j), R_j = sqrt(sigma_j) v_j^T;
  // else:       L_j = sqrt(sigma_j) u_j,      R_j = (M^T u_j)^T / sqrt(sigma_j).
  if (gram_right) {
    write_factors_kernel<<<GridFor(total), kThreads, 0, stream>>>(
        L, R, mv, OC, gram, ns, inv_sqrt_s, sqrt_s, OC, C, rmax, k, /*reverse=*/true);
  } else {
    write_factors_kernel<<<GridFor(total), kThreads, 0, stream>>>(
        L, R, gram, ns, mv, C, sqrt_s, inv_sqrt_s, OC, C, rmax, k, /*reverse=*/true);
  }
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (top_singular_values != nullptr) {
    top_singular_values->resize(k);
    CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(top_singular_values->data(), sigma, k * sizeof(double),
                                         cudaMemcpyDeviceToHost, stream));
  }
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  return absl::OkStatus();
}

absl::Status phi_refactorize_cuda(PhiContext& ctx, float* L, float* R, int OC, int C, int rmax,
                                  int k_in, int k_out, cudaStream_t stream) {
  const char* op = "phi_refactorize_cuda";
  RETURN_IF_ERROR(CheckFactorShape(op, OC, C, rmax, k_in));
  QT_CHECK_ARG(k_out >= 0 && k_out <= k_in, op, ": k_out=", k_out, " must be in [0, k_in=", k_in,
               "]");
  QT_CHECK_ARG(k_in <= std::min(OC, C), op, ": k_in=", k_in, " exceeds min(OC, C) = ",
               std::min(OC, C));
  QT_CHECK_ARG(L != nullptr && R != nullptr, op, ": null L or R");
  PhiContext::Impl& impl = *ctx.impl();
  RETURN_IF_ERROR(impl.SetStream(stream));
  if (k_out == 0) {
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(L, 0, static_cast<size_t>(OC) * rmax * 4, stream));
    CUDA_RETURN_IF_ERROR(cudaMemsetAsync(R, 0, static_cast<size_t>(rmax) * C * 4, stream));
    return absl::OkStatus();
  }
  const int k = k_in;
  auto bytes = [](int64_t n, int64_t size) { return (n * size + 255) / 256 * 256; };
  const int64_t kk = static_cast<int64_t>(k) * k;
  const int64_t fixed = 2 * bytes(static_cast<int64_t>(OC) * k, 8) +
                        2 * bytes(static_cast<int64_t>(C) * k, 8) + 5 * bytes(kk, 8) +
                        7 * bytes(k, 8) + bytes(5, 4);
  double *a1, *b1, *u, *v, *t1, *t2, *km, *us, *vt, *tau_a, *tau_b, *s, *rwork, *sigma, *sqrt_s,
      *inv_sqrt_s, *work;
  int* info;
  auto carve_all = [&](char* base) {
    Carver carve(base);
    a1 = carve.Take<double>(static_cast<int64_t>(OC) * k);
    b1 = carve.Take<double>(static_cast<int64_t>(C) * k);
    u = carve.Take<double>(static_cast<int64_t>(OC) * k);
    v = carve.Take<double>(static_cast<int64_t>(C) * k);
    t1 = carve.Take<double>(kk);
    t2 = carve.Take<double>(kk);
    km = carve.Take<double>(kk);
    us = carve.Take<double>(kk);
    vt = carve.Take<double>(kk);
    tau_a = carve.Take<double>(k);
    tau_b = carve.Take<double>(k);
    s = carve.Take<double>(k);
    rwork = carve.Take<double>(k);
    sigma = carve.Take<double>(k);
    sqrt_s = carve.Take<double>(k);
    inv_sqrt_s = carve.Take<double>(k);
    info = carve.Take<int>(5);
    work = carve.Take<double>(0);  // the rest
  };
  {
    ASSIGN_OR_RETURN(char* base, impl.Scratch(fixed));
    carve_all(base);
  }
  int lw_qa = 0, lw_qb = 0, lw_oa = 0, lw_ob = 0, lw_svd = 0;
  SOLVER_RETURN_IF_ERROR(cusolverDnDgeqrf_bufferSize(impl.solver, OC, k, a1, OC, &lw_qa));
  SOLVER_RETURN_IF_ERROR(cusolverDnDgeqrf_bufferSize(impl.solver, C, k, b1, C, &lw_qb));
  SOLVER_RETURN_IF_ERROR(
      cusolverDnDorgqr_bufferSize(impl.solver, OC, k, k, a1, OC, tau_a, &lw_oa));
  SOLVER_RETURN_IF_ERROR(cusolverDnDorgqr_bufferSize(impl.solver, C, k, k, b1, C, tau_b, &lw_ob));
  SOLVER_RETURN_IF_ERROR(cusolverDnDgesvd_bufferSize(impl.solver, k, k, &lw_svd));
  const int lwork = std::max({lw_qa, lw_qb, lw_oa, lw_ob, lw_svd, 1});
  {
    ASSIGN_OR_RETURN(char* base, impl.Scratch(fixed + bytes(lwork, 8)));
    carve_all(base);
  }

  const int64_t ng = (static_cast<int64_t>(OC) + C) * k;
  gather_factors_kernel<<<GridFor(ng), kThreads, 0, stream>>>(a1, b1, L, R, OC, C, rmax, k);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  SOLVER_RETURN_IF_ERROR(cusolverDnDgeqrf(impl.solver, OC, k, a1, OC, tau_a, work, lwork, info));
  SOLVER_RETURN_IF_ERROR(
      cusolverDnDgeqrf(impl.solver, C, k, b1, C, tau_b, work, lwork, info + 1));
  upper_kernel<<<(k * k + 255) / 256, 256, 0, stream>>>(t1, a1, OC, k);
  upper_kernel<<<(k * k + 255) / 256, 256, 0, stream>>>(t2, b1, C, k);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  SOLVER_RETURN_IF_ERROR(
      cusolverDnDorgqr(impl.solver, OC, k, k, a1, OC, tau_a, work, lwork, info + 2));
  SOLVER_RETURN_IF_ERROR(
      cusolverDnDorgqr(impl.solver, C, k, k, b1, C, tau_b, work, lwork, info + 3));
  // L_k R_k = Q1 T1 (Q2 T2)^T = Q1 (T1 T2^T) Q2^T; the SVD of the small middle factor.
  const double one = 1.0, zero = 0.0;
  BLAS_RETURN_IF_ERROR(cublasDgemm(impl.blas, CUBLAS_OP_N, CUBLAS_OP_T, k, k, k, &one, t1, k, t2,
                                   k, &zero, km, k));
  signed char jobu = 'A', jobvt = 'A';
  SOLVER_RETURN_IF_ERROR(cusolverDnDgesvd(impl.solver, jobu, jobvt, k, k, km, k, s, us, k, vt, k,
                                          work, lwork, rwork, info + 4));
  {
    const char* names[] = {"cusolverDnDgeqrf(L)", "cusolverDnDgeqrf(R^T)", "cusolverDnDorgqr(L)",
                           "cusolverDnDorgqr(R^T)", "cusolverDnDgesvd"};
    RETURN_IF_ERROR(CheckInfo(op, info, 5, stream, names));
  }
  // U = Q1 U' (OC x k), V = Q2 V' = Q2 (V'^T)^T (C x k).
  BLAS_RETURN_IF_ERROR(cublasDgemm(impl.blas, CUBLAS_OP_N, CUBLAS_OP_N, OC, k, k, &one, a1, OC,
                                   us, k, &zero, u, OC));
  BLAS_RETURN_IF_ERROR(cublasDgemm(impl.blas, CUBLAS_OP_N, CUBLAS_OP_T, C, k, k, &one, b1, C, vt,
                                   k, &zero, v, C));
  // sqrt(S) on both sides (S descending from gesvd); components past k_out dropped.
  scales_kernel<<<1, 1, 0, stream>>>(sigma, sqrt_s, inv_sqrt_s, s, k, /*from_eigen=*/false);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  const int64_t total = static_cast<int64_t>(OC) * rmax + static_cast<int64_t>(rmax) * C;
  write_factors_kernel<<<GridFor(total), kThreads, 0, stream>>>(
      L, R, u, OC, v, C, sqrt_s, sqrt_s, OC, C, rmax, k_out, /*reverse=*/false);
  CUDA_RETURN_IF_ERROR(cudaGetLastError());
  CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(stream));
  return absl::OkStatus();
}

}  // namespace qtrain::ops
