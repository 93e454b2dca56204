// One Linear layer of the model: y (N,OC) = x (N,C) @ W (OC,C)^T + b. The place where each
// Linear's precision mode (full, fp8, qat + low-rank Phi) lives, so the model code above it
// never changes with precision.
#ifndef QTRAIN_TRAINER_LINEAR_H_
#define QTRAIN_TRAINER_LINEAR_H_

#include <string>

#include "trainer/param_store.h"

namespace qtrain {

class Linear {
 public:
  Linear() = default;
  // Registers weight (OC,C) and bias (OC) in `store` as "<name>.weight" / "<name>.bias".
  Linear(ParamStore* store, const std::string& name, int in_features, int out_features);

  const std::string& name() const { return name_; }
  int in_features() const { return in_; }
  int out_features() const { return out_; }
  int weight_index() const { return w_; }
  int bias_index() const { return b_; }

  // out (N,OC) = inp (N,C) W^T + b.
  void Forward(float* out, const float* inp, int N) const;
  // dinp (N,C) +=, dW +=, db += from dout (N,OC). dinp may be null.
  void Backward(float* dinp, const float* dout, const float* inp, int N) const;

 private:
  ParamStore* store_ = nullptr;
  std::string name_;
  int in_ = 0, out_ = 0;
  int w_ = -1, b_ = -1;
};

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_LINEAR_H_
