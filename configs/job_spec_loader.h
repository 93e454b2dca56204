// Loading, defaulting and validation of qtrain job specs (configs/job_spec.proto, text format).
// LoadJobSpec is the one way a job enters the system: parse -> ApplyDefaults -> ValidateJobSpec.
#ifndef QTRAIN_CONFIGS_JOB_SPEC_LOADER_H_
#define QTRAIN_CONFIGS_JOB_SPEC_LOADER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "configs/job_spec.pb.h"

namespace qtrain {

// Reads `path` and returns the parsed, defaulted and validated spec.
// Errors: NotFound (no such file, message names the path); InvalidArgument for syntax errors
// and unknown fields ("path:line:col: message", 1-based) and for bad values ("path: field:
// ..."); FailedPrecondition for settings of features that are not implemented yet.
// `overrides` ("training.steps=100", see SetJobSpecField) apply after parsing and before the
// defaults and validation, as if the file said so. A file that is not text (NUL bytes, invalid
// UTF-8) is InvalidArgument "path: not a text protobuf ...".
absl::StatusOr<JobSpec> LoadJobSpec(const std::string& path,
                                    const std::vector<std::string>& overrides = {});

// As LoadJobSpec, from text already in memory; `filename` only labels the messages.
absl::StatusOr<JobSpec> ParseJobSpec(const std::string& text, const std::string& filename,
                                     const std::vector<std::string>& overrides = {});

// One command-line override "FIELD=VALUE": FIELD a dotted path ("schedule.warmup_steps"),
// VALUE in text format for numbers, bools and enum names, as typed for strings, a text-format
// block for a message field (which it replaces). Lists cannot be set. InvalidArgument naming
// the field (and the fields there are) otherwise.
absl::Status SetJobSpecField(JobSpec* spec, absl::string_view assignment);

// Fills every zero / unset value that has a documented default (docs/job_spec.md). Idempotent;
// values that are set, even to something invalid, are left for ValidateJobSpec to judge.
void ApplyDefaults(JobSpec* spec);

// Checks every field of a spec with defaults applied; an unset value is judged as the zero it
// holds. Range errors come back together as one InvalidArgument, one line per field, each
// naming the field path and the bad value. A spec whose values are all legal then goes
// through RejectUnimplemented.
absl::Status ValidateJobSpec(const JobSpec& spec);

// FailedPrecondition "<field>: <feature> is not implemented yet" for every setting of a
// feature the trainer does not have yet. Called by ValidateJobSpec.
absl::Status RejectUnimplemented(const JobSpec& spec);

// Text format of `spec` (what LoadJobSpec reads back), saved beside checkpoints.
std::string JobSpecToText(const JobSpec& spec);

// 64-bit FNV-1a of the deterministic binary serialization: equal for equal specs across
// processes and machines built from the same schema; used to check ranks run the same job.
uint64_t JobSpecHash(const JobSpec& spec);

}  // namespace qtrain

#endif  // QTRAIN_CONFIGS_JOB_SPEC_LOADER_H_
