// Reading a //tools:export file (qtrain-export-v1: packed low-bit codes, steps, zero points and
// F32 tensors) back into a model built from its job spec: the QAT Linears get the dequantized
// codes (so Q(W) reproduces them bit for bit), everything else its F32 tensor.
#ifndef QTRAIN_TRAINER_EXPORT_READER_H_
#define QTRAIN_TRAINER_EXPORT_READER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "configs/job_spec.pb.h"
#include "trainer/gpt.h"
#include "trainer/safetensors.h"

namespace qtrain {

inline constexpr char kExportFormat[] = "qtrain-export-v1";

// Loads the export `st` (read from `path`, named in errors) into `model`, whose Linears must
// have the precision the export was written with.
absl::Status LoadExportWeights(const SafeTensors& st, const std::string& path, Gpt* model);

// The export's job spec (metadata "job_spec") and a model built from it with its weights.
absl::StatusOr<std::unique_ptr<Gpt>> LoadExportedModel(const std::string& path, JobSpec* spec);

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_EXPORT_READER_H_
