// INT8 forward GEMM (matmul_int8_cuda.h).
// (Stub: the implementation lands next; every entry point returns Unimplemented.)
#include "ops/cuda/matmul_int8_cuda.h"

namespace qtrain::ops {

absl::Status matmul_int8_forward_cuda(Int8MatmulContext& ctx, bf16* out, const int8_t* x_codes,
                                      const float* x_scale, Int8ActScale x_scale_kind,
                                      const int8_t* w_codes, const float* w_scale,
                                      const bf16* bias, int N, int C, int OC,
                                      cudaStream_t stream) {
  return absl::UnimplementedError("matmul_int8_forward_cuda: not implemented yet");
}

}  // namespace qtrain::ops
namespace qtrain::ops {
struct Int8MatmulContext::Impl {};
Int8MatmulContext::Int8MatmulContext(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Int8MatmulContext::~Int8MatmulContext() = default;
absl::StatusOr<std::unique_ptr<Int8MatmulContext>> Int8MatmulContext::Create(int64_t, int64_t) {
  return absl::UnimplementedError("Int8MatmulContext: not implemented yet");
}
int64_t Int8MatmulContext::scratch_bytes() const { return 0; }
int64_t Int8MatmulContext::chunk_rows(int) const { return 1; }
}  // namespace qtrain::ops
