// How a CUDA op's gradient output receives its value (shared by the launchers that write
// gradients: matmul, LM head, layernorm).
#ifndef QTRAIN_OPS_CUDA_GRAD_WRITE_H_
#define QTRAIN_OPS_CUDA_GRAD_WRITE_H_

namespace qtrain::ops {

// kAccumulate: added to what the buffer holds (parameter gradients over micro-batches, an
// activation gradient with several consumers). kOverwrite: written over it (the first backward
// after the gradients were reset, or an activation gradient with one consumer), which spares
// clearing the buffer and, for GEMMs, reading it back.
enum class GradWrite { kAccumulate, kOverwrite };

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_CUDA_GRAD_WRITE_H_
