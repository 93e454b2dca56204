// Linear layer (GEMM + bias): CPU reference on Eigen, float in the trainer, double in
// gradient checks. Results do not depend on the OpenMP thread count.
#ifndef QTRAIN_OPS_MATMUL_H_
#define QTRAIN_OPS_MATMUL_H_

#include <cstdint>

namespace qtrain::ops {

// ---- linear: out (N,OC) = inp (N,C) @ weight(OC,C)^T + bias(OC); bias may be null ----
template <typename F>
void matmul_forward(F* out, const F* inp, const F* weight, const F* bias, int N, int C, int OC);
// dinp (N,C) +=, dweight (OC,C) +=, dbias (OC) += (dbias may be null). dinp may be null;
// a null dweight skips the weight-gradient GEMM (a frozen weight) and dbias with it.
template <typename F>
void matmul_backward(F* dinp, F* dweight, F* dbias, const F* dout, const F* inp,
                     const F* weight, int N, int C, int OC);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_MATMUL_H_
