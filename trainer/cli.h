// Command-line plumbing shared by qtrain and the tools: a usage message (no abseil warning),
// --help that lists the binary's own flags, and `bazel run`'s working directory, so that
// relative paths (job, data patterns, out_dir, checkpoints) mean the caller's directory.
#ifndef QTRAIN_TRAINER_CLI_H_
#define QTRAIN_TRAINER_CLI_H_

#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace qtrain {

// Sets the usage message, makes --help list the flags defined in `main_file` (pass __FILE__),
// parses the flags, then changes to $BUILD_WORKING_DIRECTORY when `bazel run` set it (the
// process starts in the runfiles tree). Leftover arguments come back (argv[0] first). Exits
// with status 2 (after saying why) only where abseil itself would: bad flags, --help, or a
// working directory that cannot be entered (status 1).
std::vector<char*> InitCommandLine(int argc, char** argv, absl::string_view usage,
                                   absl::string_view main_file);

// Every value of a flag that may be given several times (`--set=a=1 --set=b=2`), in order:
// abseil keeps only the last occurrence, so the values are read from argv (before
// InitCommandLine). Forms: --name=V, -name=V, --name V, -name V; stops at "--". Each value is
// split at its top-level commas (outside quotes and {}/[]/<> blocks), so `--set=a=1,b=2` is two
// values and a text-format block such as `precision={linear: QAT, qat {weight_bits: 4}}` one.
std::vector<std::string> RepeatedFlagValues(int argc, char** argv, absl::string_view name);

// "<program>: <problem>" and the usage message on stderr; returns 2 for main to exit with.
int UsageError(absl::string_view program, absl::string_view problem);

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_CLI_H_
