// Token + position embedding, CPU reference (see encoder.h).
#include "ops/encoder.h"

namespace qtrain::ops {

template <typename F>
void encoder_forward(F* out, const int32_t* inp, const F* wte, const F* wpe, int B, int T,
                     int C) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < B; ++b) {
    for (int t = 0; t < T; ++t) {
      F* out_bt = out + (static_cast<int64_t>(b) * T + t) * C;
      const F* wte_ix = wte + static_cast<int64_t>(inp[b * T + t]) * C;
      const F* wpe_t = wpe + static_cast<int64_t>(t) * C;
      for (int c = 0; c < C; ++c) out_bt[c] = wte_ix[c] + wpe_t[c];
    }
  }
}

// Serial on purpose: several (b,t) may hit the same token row of dwte, and a fixed visiting
// order keeps the sums bit-identical across runs; the op is O(B*T*C) and cheap.
template <typename F>
void encoder_backward(F* dwte, F* dwpe, const F* dout, const int32_t* inp, int B, int T,
                      int C) {
  for (int b = 0; b < B; ++b) {
    for (int t = 0; t < T; ++t) {
      const F* dout_bt = dout + (static_cast<int64_t>(b) * T + t) * C;
      F* dwte_ix = dwte + static_cast<int64_t>(inp[b * T + t]) * C;
      F* dwpe_t = dwpe + static_cast<int64_t>(t) * C;
      for (int c = 0; c < C; ++c) {
        dwte_ix[c] += dout_bt[c];
        dwpe_t[c] += dout_bt[c];
      }
    }
  }
}

template void encoder_forward<float>(float*, const int32_t*, const float*, const float*, int,
                                     int, int);
template void encoder_forward<double>(double*, const int32_t*, const double*, const double*,
                                      int, int, int);
template void encoder_backward<float>(float*, float*, const float*, const int32_t*, int, int,
                                      int);
template void encoder_backward<double>(double*, double*, const double*, const int32_t*, int,
                                       int, int);

}  // namespace qtrain::ops
