// Distillation loss of the student's logits against a frozen teacher's (MSE or KL): CPU
// reference, float in the trainer, double in gradient checks. Math in double per row; the row
// sum does not depend on the OpenMP thread count.
#ifndef QTRAIN_OPS_DISTILL_H_
#define QTRAIN_OPS_DISTILL_H_

namespace qtrain::ops {

enum class DistillLoss { kMse, kKl };

// logits (N, V) row-major. kMse: mean over rows of (1/V) sum_v (s - t)^2.
// kKl: mean over rows of KL(softmax(t) || softmax(s)) = sum_v pt (log pt - log ps), stable
// log-softmax (subtract the max).
template <typename F>
double distill_forward(const F* student_logits, const F* teacher_logits, int N, int V,
                       DistillLoss loss);
// dstudent (N, V) += scale * d(value above)/d student_logits.
template <typename F>
void distill_backward(F* dstudent, const F* student_logits, const F* teacher_logits, int N,
                      int V, DistillLoss loss, F scale);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_DISTILL_H_
