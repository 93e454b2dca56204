// Linear layer: full-precision path over the CPU reference matmul.
#include "trainer/linear.h"

#include "ops/cpu_ops.h"

namespace qtrain {

Linear::Linear(ParamStore* store, const std::string& name, int in_features, int out_features)
    : store_(store), name_(name), in_(in_features), out_(out_features) {
  w_ = store->Add(name + ".weight", {out_features, in_features}, /*decay=*/true);
  b_ = store->Add(name + ".bias", {out_features}, /*decay=*/false);
}

void Linear::Forward(float* out, const float* inp, int N) const {
  ops::matmul_forward(out, inp, store_->param(w_), store_->param(b_), N, in_, out_);
}

void Linear::Backward(float* dinp, const float* dout, const float* inp, int N) const {
  ops::matmul_backward(dinp, store_->grad(w_), store_->grad(b_), dout, inp, store_->param(w_), N,
                       in_, out_);
}

}  // namespace qtrain
