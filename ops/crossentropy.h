// Tied LM head fused with softmax cross-entropy: CPU reference (float in the trainer, double
// in gradient checks).
#ifndef QTRAIN_OPS_CROSSENTROPY_H_
#define QTRAIN_OPS_CROSSENTROPY_H_

#include <cstdint>

namespace qtrain::ops {

// logits = x (N,C) @ wte (V,C)^T; losses (N) = -log softmax(logits)[targets]; returns the mean
// loss. probs (N,V) saved for backward. targets in [0, V).
template <typename F>
double lm_head_crossentropy_forward(F* losses, F* probs, const F* x, const F* wte,
                                    const int32_t* targets, int N, int C, int V);
// Gradient of dloss * mean(losses): dx (N,C) +=, dwte (V,C) += (null: a frozen wte). probs is
// overwritten with dlogits (no second copy of the logits).
template <typename F>
void lm_head_crossentropy_backward(F* dx, F* dwte, F* probs, const F* x, const F* wte,
                                   const int32_t* targets, int N, int C, int V, F dloss);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_CROSSENTROPY_H_
