// Adapters and updates as tensor sets of the parameter store: one F32 tensor per LoRA factor
// (its name and shape from the model's adapter store), so a round's adapter opens in Python as
// the model's <linear>.lora_b / .lora_a tensors; updates carry the leading factors only.
#ifndef QTRAIN_DISTRIBUTED_FEDERATED_ADAPTER_IO_H_
#define QTRAIN_DISTRIBUTED_FEDERATED_ADAPTER_IO_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "distributed/proto/param_service.pb.h"
#include "trainer/param_store.h"

namespace qtrain::federated {

// The specs of the adapter tensors that lie in floats [0, n) of `lora` (n on a tensor edge).
absl::StatusOr<std::vector<ps::TensorSpec>> AdapterTensorSpecs(const ParamStore& lora, int64_t n);

// Views of floats [0, n) of `flat`, one per spec (the bytes AdapterTensorSpecs describes).
std::vector<absl::string_view> AdapterTensorData(const std::vector<float>& flat, int64_t n,
                                                 const ParamStore& lora);

// The floats of a set's tensors, checked against the specs `lora` gives for [0, n): names,
// dtype, shapes, byte counts, finiteness. Errors start with `what` (the set and version).
absl::StatusOr<std::vector<float>> FlattenAdapterTensors(
    const std::vector<ps::TensorSpec>& specs, const std::vector<absl::string_view>& data,
    const ParamStore& lora, int64_t n, const std::string& what);

}  // namespace qtrain::federated

#endif  // QTRAIN_DISTRIBUTED_FEDERATED_ADAPTER_IO_H_
