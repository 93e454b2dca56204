// CPU reference ops (fp32 in the trainer, fp64 in gradient checks): the oracle of every
// CUDA kernel. llm.c conventions: row-major, N = B*T rows, backward ops ACCUMULATE (+=)
// into their gradient outputs so shared inputs (tied embeddings, residuals) just add up.
#ifndef QTRAIN_OPS_CPU_OPS_H_
#define QTRAIN_OPS_CPU_OPS_H_

#include <cstdint>

namespace qtrain::ops {

// ---- token + position embedding ----
// out (B,T,C) = wte[inp[b,t]] + wpe[t]. inp (B,T), wte (V,C), wpe (maxT,C).
template <typename F>
void encoder_forward(F* out, const int32_t* inp, const F* wte, const F* wpe, int B, int T,
                     int C);
// dwte (V,C) += scatter of dout; dwpe (maxT,C) += sum over b.
template <typename F>
void encoder_backward(F* dwte, F* dwpe, const F* dout, const int32_t* inp, int B, int T,
                      int C);

// ---- layernorm over the last dim ----
// out, inp (N,C); weight, bias (C); mean, rstd (N) saved for backward. eps = 1e-5.
template <typename F>
void layernorm_forward(F* out, F* mean, F* rstd, const F* inp, const F* weight, const F* bias,
                       int N, int C);
template <typename F>
void layernorm_backward(F* dinp, F* dweight, F* dbias, const F* dout, const F* inp,
                        const F* weight, const F* mean, const F* rstd, int N, int C);

// ---- linear: out (N,OC) = inp (N,C) @ weight(OC,C)^T + bias(OC); bias may be null ----
template <typename F>
void matmul_forward(F* out, const F* inp, const F* weight, const F* bias, int N, int C, int OC);
// dinp (N,C) +=, dweight (OC,C) +=, dbias (OC) += (dbias may be null). dinp may be null.
template <typename F>
void matmul_backward(F* dinp, F* dweight, F* dbias, const F* dout, const F* inp,
                     const F* weight, int N, int C, int OC);

// ---- causal multi-head self-attention ----
// inp (B,T,3C) holds q,k,v; out (B,T,C); att (B,NH,T,T) softmax probs saved for backward
// (the CPU reference materializes T x T; the GPU path never does). scale = 1/sqrt(C/NH).
template <typename F>
void attention_forward(F* out, F* att, const F* inp, int B, int T, int C, int NH);
// dinp (B,T,3C) +=. scratch: (B,NH,T,T) workspace, contents undefined on return.
template <typename F>
void attention_backward(F* dinp, F* scratch, const F* dout, const F* inp, const F* att, int B,
                        int T, int C, int NH);

// ---- GELU, tanh approximation ----
template <typename F>
void gelu_forward(F* out, const F* inp, int64_t n);
template <typename F>
void gelu_backward(F* dinp, const F* inp, const F* dout, int64_t n);  // dinp +=

// ---- residual add ----
template <typename F>
void residual_forward(F* out, const F* inp1, const F* inp2, int64_t n);
template <typename F>
void residual_backward(F* dinp1, F* dinp2, const F* dout, int64_t n);  // both +=

// ---- tied LM head + softmax cross-entropy, fused ----
// logits = x (N,C) @ wte (V,C)^T; losses (N) = -log softmax(logits)[targets]; returns the mean
// loss. probs (N,V) saved for backward. targets in [0, V).
template <typename F>
double lm_head_crossentropy_forward(F* losses, F* probs, const F* x, const F* wte,
                                    const int32_t* targets, int N, int C, int V);
// Gradient of dloss * mean(losses): dx (N,C) +=, dwte (V,C) +=. probs is overwritten with
// dlogits (no second copy of the logits).
template <typename F>
void lm_head_crossentropy_backward(F* dx, F* dwte, F* probs, const F* x, const F* wte,
                                   const int32_t* targets, int N, int C, int V, F dloss);

// ---- optimizer ----
// AdamW with decoupled weight decay, bias-corrected; t is the 1-based step.
// p -= lr * (mhat / (sqrt(vhat) + eps) + weight_decay * p)
template <typename F>
void adamw_update(F* params, const F* grads, F* m, F* v, int64_t n, float lr, float beta1,
                  float beta2, float eps, float weight_decay, int t);

// Sum of squares of grads (double accumulation, fixed order).
template <typename F>
double sum_squares(const F* grads, int64_t n);
// grads *= min(1, max_norm / (norm + 1e-6)); returns the factor applied.
template <typename F>
F clip_by_global_norm(F* grads, int64_t n, double norm, double max_norm);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_CPU_OPS_H_
