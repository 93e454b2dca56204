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

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_ATOMIC_FILE_H_
