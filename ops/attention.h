// Causal multi-head self-attention: CPU reference that materializes the T x T probabilities
// (float in the trainer, double in gradient checks).
#ifndef QTRAIN_OPS_ATTENTION_H_
#define QTRAIN_OPS_ATTENTION_H_

#include <cstdint>

namespace qtrain::ops {

// inp (B,T,3C) holds q,k,v; out (B,T,C); att (B,NH,T,T) softmax probs saved for backward
// (the CPU reference materializes T x T; the GPU path never does). scale = 1/sqrt(C/NH).
// Head h of q uses columns h*hs .. h*hs+hs-1 of the q third (hs = C/NH; NH must divide C);
// att is zero above the diagonal.
template <typename F>
void attention_forward(F* out, F* att, const F* inp, int B, int T, int C, int NH);
// dinp (B,T,3C) +=. scratch: (B,NH,T,T) workspace, contents undefined on return.
template <typename F>
void attention_backward(F* dinp, F* scratch, const F* dout, const F* inp, const F* att, int B,
                        int T, int C, int NH);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_ATTENTION_H_
