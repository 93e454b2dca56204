// Crash-safe file writes: data goes to "<path>.tmp.<pid>", is fsynced, then renamed over
// path and the directory fsynced, so readers see the old file or the whole new one.
#ifndef QTRAIN_TRAINER_ATOMIC_FILE_H_
#define QTRAIN_TRAINER_ATOMIC_FILE_H_

#include <cstddef>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace qtrain {

// Test hook: called after each chunk with the bytes written so far (fault injection).
using WriteProgressHook = std::function<void(size_t bytes_written)>;

// Writes the concatenation of `pieces` atomically to `path`.
absl::Status WriteFileAtomically(const std::string& path,
                                 const std::vector<absl::string_view>& pieces,
                                 const WriteProgressHook& hook = nullptr);

// Reads a whole file; NotFound names the path.
absl::StatusOr<std::string> ReadFile(const std::string& path);

// True when both paths name one existing file: the same path, a symlink to it or a hard link
// (same device and inode).
bool SameFile(const std::string& a, const std::string& b);

// For a tool about to write `output`: FailedPrecondition when that would replace `input` (the
// file it reads, named by its flag `input_flag`), also through a link. Writes are atomic
// renames, so a hard link would keep the old bytes elsewhere but this path would hold the
// output: the input is gone from where the user keeps it.
absl::Status CheckNotOverwritingInput(const std::string& output, const std::string& output_flag,
                                      const std::string& input, const std::string& input_flag);

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_ATOMIC_FILE_H_
