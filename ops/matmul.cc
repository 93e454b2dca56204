// Linear layer on Eigen, CPU reference (see matmul.h).
//
// Every product is cut into fixed-size blocks of output rows, one Eigen GEMM per block inside
// an OpenMP loop. Eigen then runs each GEMM single-threaded (it does not nest inside a
// parallel region) with blocking that depends only on the block's shape, so the bits of the
// result do not depend on the thread count; Eigen's own threading would re-block by thread
// count and break bit-identical resume.
#include "ops/matmul.h"

#include <algorithm>

#include <Eigen/Core>

namespace qtrain::ops {
namespace {

template <typename F>
using RowMat = Eigen::Matrix<F, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename F>
using MapMat = Eigen::Map<RowMat<F>>;
template <typename F>
using ConstMapMat = Eigen::Map<const RowMat<F>>;

constexpr int kRowBlock = 64;  // rows of out / dinp per task
constexpr int kOcBlock = 32;   // rows of dweight (output channels) per task

int NumBlocks(int n, int block) { return (n + block - 1) / block; }

}  // namespace

template <typename F>
void matmul_forward(F* out, const F* inp, const F* weight, const F* bias, int N, int C,
                    int OC) {
  const ConstMapMat<F> w(weight, OC, C);
  const int blocks = NumBlocks(N, kRowBlock);
#pragma omp parallel for schedule(static)
  for (int blk = 0; blk < blocks; ++blk) {
    const int r0 = blk * kRowBlock;
    const int rows = std::min(N - r0, kRowBlock);
    const ConstMapMat<F> x(inp + static_cast<int64_t>(r0) * C, rows, C);
    MapMat<F> y(out + static_cast<int64_t>(r0) * OC, rows, OC);
    y.noalias() = x * w.transpose();
    if (bias != nullptr) {
      for (int r = 0; r < rows; ++r) {
        F* yr = out + (static_cast<int64_t>(r0) + r) * OC;
        for (int o = 0; o < OC; ++o) yr[o] += bias[o];
      }
    }
  }
}

template <typename F>
void matmul_backward(F* dinp, F* dweight, F* dbias, const F* dout, const F* inp,
                     const F* weight, int N, int C, int OC) {
  const ConstMapMat<F> dy(dout, N, OC);
  const ConstMapMat<F> x(inp, N, C);
  if (dinp != nullptr) {
    const ConstMapMat<F> w(weight, OC, C);
    const int blocks = NumBlocks(N, kRowBlock);
#pragma omp parallel for schedule(static)
    for (int blk = 0; blk < blocks; ++blk) {
      const int r0 = blk * kRowBlock;
      const int rows = std::min(N - r0, kRowBlock);
      MapMat<F> dx(dinp + static_cast<int64_t>(r0) * C, rows, C);
      dx.noalias() += dy.middleRows(r0, rows) * w;
    }
  }
  if (dweight == nullptr) return;
  const int blocks = NumBlocks(OC, kOcBlock);
#pragma omp parallel for schedule(static)
  for (int blk = 0; blk < blocks; ++blk) {
    const int o0 = blk * kOcBlock;
    const int ocs = std::min(OC - o0, kOcBlock);
    MapMat<F> dw(dweight + static_cast<int64_t>(o0) * C, ocs, C);
    dw.noalias() += dy.middleCols(o0, ocs).transpose() * x;
    if (dbias != nullptr) {
      for (int n = 0; n < N; ++n) {
        const F* dyn = dout + static_cast<int64_t>(n) * OC;
        for (int o = o0; o < o0 + ocs; ++o) dbias[o] += dyn[o];
      }
    }
  }
}

template void matmul_forward<float>(float*, const float*, const float*, const float*, int, int,
                                    int);
template void matmul_forward<double>(double*, const double*, const double*, const double*, int,
                                     int, int);
template void matmul_backward<float>(float*, float*, float*, const float*, const float*,
                                     const float*, int, int, int);
template void matmul_backward<double>(double*, double*, double*, const double*, const double*,
                                      const double*, int, int, int);

}  // namespace qtrain::ops
