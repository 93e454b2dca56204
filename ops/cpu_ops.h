// CPU reference ops (fp32 in the trainer, fp64 in gradient checks): the oracle of every
// CUDA kernel. llm.c conventions: row-major, N = B*T rows, backward ops ACCUMULATE (+=)
// into their gradient outputs so shared inputs (tied embeddings, residuals) just add up.
// Umbrella header: each op lives in its own header/library pair; include this for all.
#ifndef QTRAIN_OPS_CPU_OPS_H_
#define QTRAIN_OPS_CPU_OPS_H_

#include "ops/adamw.h"
#include "ops/attention.h"
#include "ops/crossentropy.h"
#include "ops/distill.h"
#include "ops/encoder.h"
#include "ops/gelu.h"
#include "ops/grad_norm.h"
#include "ops/layernorm.h"
#include "ops/lowrank.h"
#include "ops/matmul.h"
#include "ops/residual.h"
#include "ops/tweo.h"

#endif  // QTRAIN_OPS_CPU_OPS_H_
