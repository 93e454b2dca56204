// Low-rank module Phi of QVGen on Eigen, CPU reference (see lowrank.h).
//
// As in matmul.cc, every product is cut into fixed-size blocks, one Eigen GEMM per block inside
// an OpenMP loop: Eigen then runs each GEMM single-threaded with blocking that depends only on
// the block's shape, so the bits do not depend on the thread count.
#include "ops/lowrank.h"

#include <algorithm>
#include <cassert>
#include <cmath>

#include <Eigen/Core>
#include <Eigen/SVD>

namespace qtrain::ops {
namespace {

template <typename F>
using RowMat = Eigen::Matrix<F, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename F>
using MapMat = Eigen::Map<RowMat<F>>;
template <typename F>
using ConstMapMat = Eigen::Map<const RowMat<F>>;
template <typename F>
using ConstMapVec = Eigen::Map<const Eigen::Matrix<F, Eigen::Dynamic, 1>>;

constexpr int kRowBlock = 64;  // rows of out / hidden / dinp per task
constexpr int kOcBlock = 32;   // rows of dL per task
constexpr int kColBlock = 64;  // columns of dR per task

int NumBlocks(int n, int block) { return (n + block - 1) / block; }

}  // namespace

template <typename F>
void lowrank_forward(F* out, F* hidden, const F* inp, const F* L, const F* R, const F* gamma,
                     int N, int C, int OC, int rmax, int k) {
  assert(k >= 0 && k <= rmax);
  if (k <= 0) return;
  const ConstMapMat<F> l(L, OC, rmax);
  const ConstMapMat<F> r(R, rmax, C);
  // L_k diag(gamma_k), (OC, k): gamma folded into L once instead of into every hidden row.
  const RowMat<F> lg = l.leftCols(k) * ConstMapVec<F>(gamma, k).asDiagonal();
  const int blocks = NumBlocks(N, kRowBlock);
#pragma omp parallel for schedule(static)
  for (int blk = 0; blk < blocks; ++blk) {
    const int r0 = blk * kRowBlock;
    const int rows = std::min(N - r0, kRowBlock);
    const ConstMapMat<F> x(inp + static_cast<int64_t>(r0) * C, rows, C);
    MapMat<F> h(hidden + static_cast<int64_t>(r0) * rmax, rows, rmax);
    MapMat<F> y(out + static_cast<int64_t>(r0) * OC, rows, OC);
    h.leftCols(k).noalias() = x * r.topRows(k).transpose();
    y.noalias() += h.leftCols(k) * lg.transpose();
  }
}

template <typename F>
void lowrank_backward(F* dinp, F* dL, F* dR, const F* dout, const F* inp, const F* hidden,
                      const F* L, const F* R, const F* gamma, int N, int C, int OC, int rmax,
                      int k) {
  assert(k >= 0 && k <= rmax);
  if (k <= 0) return;
  // out = H_k G L_k^T with H_k = X R_k^T, G = diag(gamma_k):
  //   dH = dout L_k G, dinp += dH R_k, dL_k += dout^T (H_k G), dR_k += dH^T X.
  const ConstMapMat<F> dy(dout, N, OC);
  const ConstMapMat<F> x(inp, N, C);
  const ConstMapMat<F> h(hidden, N, rmax);
  const ConstMapMat<F> l(L, OC, rmax);
  const ConstMapMat<F> r(R, rmax, C);
  const ConstMapVec<F> g(gamma, k);
  const RowMat<F> lg = l.leftCols(k) * g.asDiagonal();

  RowMat<F> dh(N, k);
  RowMat<F> hg(N, k);
  const int row_blocks = NumBlocks(N, kRowBlock);
#pragma omp parallel for schedule(static)
  for (int blk = 0; blk < row_blocks; ++blk) {
    const int r0 = blk * kRowBlock;
    const int rows = std::min(N - r0, kRowBlock);
    dh.middleRows(r0, rows).noalias() = dy.middleRows(r0, rows) * lg;
    hg.middleRows(r0, rows).noalias() = h.block(r0, 0, rows, k) * g.asDiagonal();
    if (dinp != nullptr) {
      MapMat<F> dx(dinp + static_cast<int64_t>(r0) * C, rows, C);
      dx.noalias() += dh.middleRows(r0, rows) * r.topRows(k);
    }
  }

  if (dL != nullptr) {
    MapMat<F> dl(dL, OC, rmax);
    const int oc_blocks = NumBlocks(OC, kOcBlock);
#pragma omp parallel for schedule(static)
    for (int blk = 0; blk < oc_blocks; ++blk) {
      const int o0 = blk * kOcBlock;
      const int ocs = std::min(OC - o0, kOcBlock);
      dl.block(o0, 0, ocs, k).noalias() += dy.middleCols(o0, ocs).transpose() * hg;
    }
  }

  if (dR != nullptr) {
    MapMat<F> dr(dR, rmax, C);
    const int col_blocks = NumBlocks(C, kColBlock);
#pragma omp parallel for schedule(static)
    for (int blk = 0; blk < col_blocks; ++blk) {
      const int c0 = blk * kColBlock;
      const int cs = std::min(C - c0, kColBlock);
      dr.block(0, c0, k, cs).noalias() += dh.transpose() * x.middleCols(c0, cs);
    }
  }
}

template <typename F>
void lowrank_backward_per_sample(F* dL, F* dR, int64_t stride, const F* dout, const F* inp,
                                 const F* hidden, const F* L, const F* gamma, int S, int T, int C,
                                 int OC, int rmax, int k) {
  assert(k >= 0 && k <= rmax);
  if (k <= 0 || (dL == nullptr && dR == nullptr)) return;
  const ConstMapMat<F> l(L, OC, rmax);
  const ConstMapVec<F> g(gamma, k);
  const RowMat<F> lg = l.leftCols(k) * g.asDiagonal();
  // One sample per task: each writes only its own slices, so the result is the same for any
  // thread count.
#pragma omp parallel for schedule(static)
  for (int s = 0; s < S; ++s) {
    const int64_t r0 = static_cast<int64_t>(s) * T;
    const ConstMapMat<F> dy(dout + r0 * OC, T, OC);
    if (dL != nullptr) {
      const ConstMapMat<F> h(hidden + r0 * rmax, T, rmax);
      MapMat<F> dl(dL + s * stride, OC, rmax);
      dl.leftCols(k).noalias() += dy.transpose() * (h.leftCols(k) * g.asDiagonal());
    }
    if (dR != nullptr) {
      const ConstMapMat<F> x(inp + r0 * C, T, C);
      MapMat<F> dr(dR + s * stride, rmax, C);
      dr.topRows(k).noalias() += (dy * lg).transpose() * x;
    }
  }
}

template <typename F>
void lowrank_factorize(F* L, F* R, const F* M, int OC, int C, int rmax, int k,
                       std::vector<double>* singular_values) {
  assert(k >= 0 && k <= std::min(std::min(OC, C), rmax));
  MapMat<F> l(L, OC, rmax);
  MapMat<F> r(R, rmax, C);
  l.setZero();
  r.setZero();
  if (k <= 0 && singular_values == nullptr) return;

  const Eigen::MatrixXd m = ConstMapMat<F>(M, OC, C).template cast<double>();
  const unsigned int options = k > 0 ? (Eigen::ComputeThinU | Eigen::ComputeThinV) : 0u;
  Eigen::BDCSVD<Eigen::MatrixXd> svd;
  // Run inside a parallel region so Eigen's GEMMs in the SVD see omp_get_num_threads() > 1 and
  // stay single-threaded: its own threading re-blocks by thread count and would make the factors
  // (and so a resumed run) depend on OMP_NUM_THREADS.
#pragma omp parallel
  {
#pragma omp single
    svd.compute(m, options);
  }

  const Eigen::VectorXd& s = svd.singularValues();  // descending
  if (singular_values != nullptr) singular_values->assign(s.data(), s.data() + s.size());
  if (k <= 0) return;
  // Balanced split sqrt(S) on both sides: L^T L = R R^T = S_k, so neither factor dominates the
  // gradient scale when they are trained afterwards.
  const Eigen::VectorXd sq = s.head(k).cwiseSqrt();
  l.leftCols(k) = (svd.matrixU().leftCols(k) * sq.asDiagonal()).template cast<F>();
  r.topRows(k) = (sq.asDiagonal() * svd.matrixV().leftCols(k).transpose()).template cast<F>();
}

template void lowrank_forward<float>(float*, float*, const float*, const float*, const float*,
                                     const float*, int, int, int, int, int);
template void lowrank_forward<double>(double*, double*, const double*, const double*,
                                      const double*, const double*, int, int, int, int, int);
template void lowrank_backward<float>(float*, float*, float*, const float*, const float*,
                                      const float*, const float*, const float*, const float*,
                                      int, int, int, int, int);
template void lowrank_backward<double>(double*, double*, double*, const double*, const double*,
                                       const double*, const double*, const double*,
                                       const double*, int, int, int, int, int);
template void lowrank_backward_per_sample<float>(float*, float*, int64_t, const float*,
                                                 const float*, const float*, const float*,
                                                 const float*, int, int, int, int, int, int);
template void lowrank_backward_per_sample<double>(double*, double*, int64_t, const double*,
                                                  const double*, const double*, const double*,
                                                  const double*, int, int, int, int, int, int);
template void lowrank_factorize<float>(float*, float*, const float*, int, int, int, int,
                                       std::vector<double>*);
template void lowrank_factorize<double>(double*, double*, const double*, int, int, int, int,
                                        std::vector<double>*);

}  // namespace qtrain::ops
