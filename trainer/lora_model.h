// The model of a LoRA job: the frozen base named by lora.base (a qtrain checkpoint, full
// precision or QAT, or a packed low-bit export) with adapters on the chosen Linears, and the
// base's hash, which federated clients and the server compare before exchanging adapters.
#ifndef QTRAIN_TRAINER_LORA_MODEL_H_
#define QTRAIN_TRAINER_LORA_MODEL_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "configs/job_spec.pb.h"
#include "trainer/gpt.h"
#include "trainer/lora.h"

namespace qtrain {

// lora.* of a validated spec; A is trained only under FedAvg-LoRA aggregation.
LoraOptions LoraOptionsFromSpec(const JobSpec& spec);

// Builds the job's model with adapters, loads the base from spec.lora().base() and
// initialises the adapters from the job's seed (orthonormal A, B = 0).
absl::StatusOr<std::unique_ptr<Gpt>> CreateLoraModel(const JobSpec& spec);

// Loads base weights into `model` (whose shape and precision are the job's) from a qtrain
// checkpoint or export. A checkpoint without quantizer steps (a full-precision one under a
// QAT job) is quantized at load: steps (and Phi) from its weights, as training.init_from does.
absl::Status LoadBase(const std::string& path, Gpt* model);

// 64-bit FNV-1a over the base's tensor names, shapes, parameter bits and buffers (quantizer
// state): equal exactly when two processes hold the same frozen base. Hex: 16 digits.
uint64_t BaseHash(const Gpt& model);
std::string BaseHashHex(uint64_t hash);

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_LORA_MODEL_H_
