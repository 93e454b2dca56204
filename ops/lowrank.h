// Auxiliary low-rank module Phi of QVGen (y += L diag(gamma) R x) with an active rank k <= rmax,
// and its SVD (re-)initialisation: CPU reference on Eigen, float in the trainer, double in
// gradient checks. Results do not depend on the OpenMP thread count.
#ifndef QTRAIN_OPS_LOWRANK_H_
#define QTRAIN_OPS_LOWRANK_H_

#include <cstdint>
#include <vector>

namespace qtrain::ops {

// L (OC, rmax) row-major, R (rmax, C) row-major, gamma (rmax); only the first k components
// (columns 0..k-1 of L, rows 0..k-1 of R, gamma[0..k-1]) take part. k == 0: no-op.
// Storage stays (.., rmax) while the rank decays so buffers need not be reallocated.
// hidden (N, rmax): hidden[:, j] = inp @ R[j]^T for j < k (saved for backward; columns >= k
// untouched).
// out (N, OC) += sum_{j<k} hidden[:, j] * gamma[j] * L[:, j]^T   (ACCUMULATES into out)
template <typename F>
void lowrank_forward(F* out, F* hidden, const F* inp, const F* L, const F* R, const F* gamma,
                     int N, int C, int OC, int rmax, int k);
// Accumulates dinp (N,C) +=, dL (OC, rmax) += (first k columns only), dR (rmax, C) += (first k
// rows only), from dout (N, OC). dinp, dL and dR may each be null (a frozen factor is not
// differentiated). gamma is a constant (no gradient).
// hidden as saved by the forward.
template <typename F>
void lowrank_backward(F* dinp, F* dL, F* dR, const F* dout, const F* inp, const F* hidden,
                      const F* L, const F* R, const F* gamma, int N, int C, int OC, int rmax,
                      int k);
// Per-sample gradients of the same module for DP-SGD: rows are S samples of T rows each
// (N = S*T); sample s's share of dL (its rows' contribution) is added into dL + s * stride and of
// dR into dR + s * stride, so the shares summed over s are lowrank_backward's dL, dR. Either
// output may be null (a frozen factor). gamma, hidden as for lowrank_backward.
template <typename F>
void lowrank_backward_per_sample(F* dL, F* dR, int64_t stride, const F* dout, const F* inp,
                                 const F* hidden, const F* L, const F* gamma, int S, int T, int C,
                                 int OC, int rmax, int k);
// Best rank-k factorisation of M (OC, C) by SVD (Eigen BDCSVD, computed in double):
// L[:, :k] = U_k sqrt(S_k), R[:k, :] = sqrt(S_k) V_k^T; the remaining columns of L and rows of R
// are set to 0. k <= min(OC, C, rmax). When singular_values is non-null it receives all
// min(OC, C) singular values, descending.
template <typename F>
void lowrank_factorize(F* L, F* R, const F* M, int OC, int C, int rmax, int k,
                       std::vector<double>* singular_values = nullptr);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_LOWRANK_H_
