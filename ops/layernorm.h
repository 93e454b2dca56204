// Layernorm over the last dim: CPU reference (float in the trainer, double in gradient checks).
#ifndef QTRAIN_OPS_LAYERNORM_H_
#define QTRAIN_OPS_LAYERNORM_H_

#include <cstdint>

namespace qtrain::ops {

// out, inp (N,C); weight, bias (C); mean, rstd (N) saved for backward. eps = 1e-5.
template <typename F>
void layernorm_forward(F* out, F* mean, F* rstd, const F* inp, const F* weight, const F* bias,
                       int N, int C);
// dinp (N,C) +=, dweight (C) +=, dbias (C) +=; mean, rstd as saved by the forward.
template <typename F>
void layernorm_backward(F* dinp, F* dweight, F* dbias, const F* dout, const F* inp,
                        const F* weight, const F* mean, const F* rstd, int N, int C);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_LAYERNORM_H_
