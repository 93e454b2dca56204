// FP8 GEMMs: cuBLASLt FP8 (per-tensor and block-scaled) on a MatmulContext's handle, and our
// own tensor-core fallback kernel with per-128-K-chunk promotion of partial sums.
#include <mutex>

#include <cuda_runtime.h>

#include "absl/strings/str_cat.h"
#include "ops/cuda/cuda_status.h"
#include "ops/cuda/matmul_fp8_cuda.h"
#include "ops/status_macros.h"

namespace qtrain::ops {

struct Fp8MatmulContext::Impl {
  MatmulContext* base = nullptr;
};

Fp8MatmulContext::Fp8MatmulContext(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Fp8MatmulContext::~Fp8MatmulContext() = default;

absl::StatusOr<std::unique_ptr<Fp8MatmulContext>> Fp8MatmulContext::Create(MatmulContext* base) {
  QT_CHECK_ARG(base != nullptr, "Fp8MatmulContext::Create: base is null");
  auto impl = std::make_unique<Impl>();
  impl->base = base;
  return std::unique_ptr<Fp8MatmulContext>(new Fp8MatmulContext(std::move(impl)));
}

int64_t Fp8MatmulContext::cublaslt_calls() const { return 0; }
int64_t Fp8MatmulContext::own_kernel_calls() const { return 0; }
std::vector<Fp8GemmRecord> Fp8MatmulContext::report() const { return {}; }

absl::Status fp8_matmul_cuda(Fp8MatmulContext& ctx, const Fp8MatmulOutput& out,
                             const Fp8Operand& x, const Fp8Operand& w, int N, int K, int OC,
                             const Fp8MatmulOptions& options, cudaStream_t stream) {
  return absl::UnimplementedError("fp8_matmul_cuda: not implemented yet");
}

}  // namespace qtrain::ops
