// Host API of the CUDA TWEO outlier statistics: one deterministic fp64 pass over a block output
// (the residual stream after a block) that yields the TWEO loss term and the outlier metrics
// (peak |a|, the raw moments behind the kurtosis). The reference is ops/tweo.h. The TWEO
// gradient itself is fused into the layernorm backward that reads the same tensor
// (layernorm_cuda.h, TweoGradTerm). All pointers are device pointers; work is queued on
// `stream`, and nothing here waits for the device.
#ifndef QTRAIN_OPS_CUDA_TWEO_CUDA_H_
#define QTRAIN_OPS_CUDA_TWEO_CUDA_H_

#include <cstdint>

#include "absl/status/status.h"
#include "ops/cuda/bf16.h"

typedef struct CUstream_st* cudaStream_t;

namespace qtrain::ops {

// Doubles written per tensor by block_output_stats_cuda, in this order.
enum BlockOutputStat : int {
  kStatTweoSum = 0,  // sum_i (|a_i| / (tau + eps))^p   (the TWEO term is this / n)
  kStatPeak = 1,     // max_i |a_i|
  kStatSum1 = 2,     // sum_i a_i
  kStatSum2 = 3,     // sum_i a_i^2
  kStatSum3 = 4,     // sum_i a_i^3
  kStatSum4 = 5,     // sum_i a_i^4
  kNumBlockOutputStats = 6,
};

// Workspace bytes of block_output_stats_cuda (fixed partials, independent of n).
int64_t block_output_stats_cuda_workspace_bytes();

// out (kNumBlockOutputStats doubles, device) from a (n, BF16): the sums above, each element's
// terms formed in fp64 (|a|/(tau+eps))^p by pow, except p == 4 and p == 2, which are exact
// products) and summed in a fixed partition and order (a fixed grid of block partials, then
// one block), so the bits do not depend on the device. p >= 1, tau + eps > 0.
absl::Status block_output_stats_cuda(double* out, const bf16* a, int64_t n, double tau,
                                     double p, double eps, void* workspace,
                                     int64_t workspace_bytes, cudaStream_t stream);

// Host side: the TWEO mean term, the peak and the kurtosis (population moments,
// E[(a-mean)^4] / Var^2, 0 when the variance is 0) from one tensor's stats.
struct BlockOutputSummary {
  double tweo = 0, peak = 0, kurtosis = 0;
};
BlockOutputSummary SummarizeBlockOutputStats(const double* stats, int64_t n);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_CUDA_TWEO_CUDA_H_
