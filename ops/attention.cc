// Causal multi-head self-attention, CPU reference (see attention.h).
//
// Parallel over (b, h) pairs only: in backward every query row t adds into the k and v
// gradients of all rows t2 <= t of the same head, so a (b, h) pair is the smallest unit whose
// writes are private; within it the order is fixed, hence results independent of thread count.
// The `omp simd` loops over the head dim (2-3x faster) fix their summation order at compile
// time, so they keep that property.
#include "ops/attention.h"

#include <cassert>
#include <cmath>
#include <limits>

namespace qtrain::ops {

template <typename F>
void attention_forward(F* out, F* att, const F* inp, int B, int T, int C, int NH) {
  assert(NH > 0 && C % NH == 0);
  const int hs = C / NH;
  const int64_t C3 = 3 * static_cast<int64_t>(C);
  const F scale = F(1) / std::sqrt(static_cast<F>(hs));
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < NH; ++h) {
      const F* base = inp + static_cast<int64_t>(b) * T * C3 + static_cast<int64_t>(h) * hs;
      for (int t = 0; t < T; ++t) {
        const F* q = base + t * C3;
        F* att_row = att + ((static_cast<int64_t>(b) * NH + h) * T + t) * T;
        F maxv = -std::numeric_limits<F>::infinity();
        for (int t2 = 0; t2 <= t; ++t2) {
          const F* k = base + t2 * C3 + C;
          F dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int i = 0; i < hs; ++i) dot += q[i] * k[i];
          dot *= scale;
          att_row[t2] = dot;
          if (dot > maxv) maxv = dot;
        }
        F sum = 0;
        for (int t2 = 0; t2 <= t; ++t2) {
          const F e = std::exp(att_row[t2] - maxv);
          att_row[t2] = e;
          sum += e;
        }
        const F inv = F(1) / sum;
        for (int t2 = 0; t2 <= t; ++t2) att_row[t2] *= inv;
        for (int t2 = t + 1; t2 < T; ++t2) att_row[t2] = 0;

        F* o = out + (static_cast<int64_t>(b) * T + t) * C + static_cast<int64_t>(h) * hs;
        for (int i = 0; i < hs; ++i) o[i] = 0;
        for (int t2 = 0; t2 <= t; ++t2) {
          const F* v = base + t2 * C3 + 2 * C;
          const F a = att_row[t2];
#pragma omp simd
          for (int i = 0; i < hs; ++i) o[i] += a * v[i];
        }
      }
    }
  }
}

template <typename F>
void attention_backward(F* dinp, F* scratch, const F* dout, const F* inp, const F* att, int B,
                        int T, int C, int NH) {
  assert(NH > 0 && C % NH == 0);
  const int hs = C / NH;
  const int64_t C3 = 3 * static_cast<int64_t>(C);
  const F scale = F(1) / std::sqrt(static_cast<F>(hs));
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < NH; ++h) {
      const int64_t head_off = static_cast<int64_t>(b) * T * C3 + static_cast<int64_t>(h) * hs;
      const F* base = inp + head_off;
      F* dbase = dinp + head_off;
      for (int t = 0; t < T; ++t) {
        const int64_t row = ((static_cast<int64_t>(b) * NH + h) * T + t) * T;
        const F* att_row = att + row;
        F* datt = scratch + row;  // becomes dpreatt in place
        const F* dy = dout + (static_cast<int64_t>(b) * T + t) * C + static_cast<int64_t>(h) * hs;

        // out_t = sum_t2 att[t2] v_t2
        for (int t2 = 0; t2 <= t; ++t2) {
          const F* v = base + t2 * C3 + 2 * C;
          F* dv = dbase + t2 * C3 + 2 * C;
          const F a = att_row[t2];
          F d = 0;
#pragma omp simd reduction(+ : d)
          for (int i = 0; i < hs; ++i) d += v[i] * dy[i];
#pragma omp simd
          for (int i = 0; i < hs; ++i) dv[i] += a * dy[i];
          datt[t2] = d;
        }
        // softmax: dpre[t2] = att[t2] * (datt[t2] - sum_t3 att[t3] datt[t3])
        F dot = 0;
        for (int t2 = 0; t2 <= t; ++t2) dot += att_row[t2] * datt[t2];
        for (int t2 = 0; t2 <= t; ++t2) datt[t2] = att_row[t2] * (datt[t2] - dot);
        // pre[t2] = scale * q . k_t2
        const F* q = base + t * C3;
        F* dq = dbase + t * C3;
        for (int t2 = 0; t2 <= t; ++t2) {
          const F* k = base + t2 * C3 + C;
          F* dk = dbase + t2 * C3 + C;
          const F g = datt[t2] * scale;
#pragma omp simd
          for (int i = 0; i < hs; ++i) {
            dq[i] += g * k[i];
            dk[i] += g * q[i];
          }
        }
      }
    }
  }
}

template void attention_forward<float>(float*, float*, const float*, int, int, int, int);
template void attention_forward<double>(double*, double*, const double*, int, int, int, int);
template void attention_backward<float>(float*, float*, const float*, const float*,
                                        const float*, int, int, int, int);
template void attention_backward<double>(double*, double*, const double*, const double*,
                                         const double*, int, int, int, int);

}  // namespace qtrain::ops
