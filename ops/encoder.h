// Token + position embedding (the first op of the GPT): CPU reference, templated on the scalar
// type (float in the trainer, double in gradient checks).
#ifndef QTRAIN_OPS_ENCODER_H_
#define QTRAIN_OPS_ENCODER_H_

#include <cstdint>

namespace qtrain::ops {

// out (B,T,C) = wte[inp[b,t]] + wpe[t]. inp (B,T), wte (V,C), wpe (maxT,C).
template <typename F>
void encoder_forward(F* out, const int32_t* inp, const F* wte, const F* wpe, int B, int T,
                     int C);
// dwte (V,C) += scatter of dout; dwpe (maxT,C) += sum over b.
template <typename F>
void encoder_backward(F* dwte, F* dwpe, const F* dout, const int32_t* inp, int B, int T,
                      int C);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_ENCODER_H_
