// Durable-file primitives of the parameter service's storage directory: names that are safe as
// path components, fsynced appends (the metrics write-ahead log), partial files committed by
// fsync + atomic rename + directory fsync, and the lock that keeps one server per directory.
#ifndef QTRAIN_DISTRIBUTED_PS_STORAGE_H_
#define QTRAIN_DISTRIBUTED_PS_STORAGE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace qtrain::ps {

// InvalidArgument unless `name` is 1..max_bytes characters of [A-Za-z0-9._:-], not starting
// with '.' (so it is one harmless path component). `what` labels the message ("job_id").
absl::Status CheckName(absl::string_view what, absl::string_view name, size_t max_bytes);

absl::Status MakeDirs(const std::string& path);
// fsync of a directory, making renames and creations in it durable.
absl::Status FsyncDir(const std::string& path);
// Names (not paths) of the entries of `dir`; an absent directory has none.
std::vector<std::string> ListDir(const std::string& dir);

// A file that only grows, each Append durable (write + fdatasync) before it returns.
class AppendFile {
 public:
  // Opens or creates `path`; a trailing partial line (a write torn by a crash, never
  // acknowledged) is cut off first when `line_oriented`.
  static absl::StatusOr<std::unique_ptr<AppendFile>> Open(const std::string& path,
                                                          bool line_oriented);
  ~AppendFile();
  absl::Status Append(absl::string_view data);
  int64_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  AppendFile(int fd, std::string path, int64_t size)
      : fd_(fd), path_(std::move(path)), size_(size) {}
  int fd_;
  std::string path_;
  int64_t size_;
};

// A file written under <dir>/.partial/ and made visible under its final name only by
// Commit (fsync, rename, directory fsync). Destroyed uncommitted, it is removed.
class PartialFile {
 public:
  static absl::StatusOr<std::unique_ptr<PartialFile>> Create(const std::string& dir);
  ~PartialFile();
  // Appends at the end.
  absl::Status Write(const void* data, size_t n);
  absl::Status Write(absl::string_view s) { return Write(s.data(), s.size()); }
  // fsync of the data so far (the slow part of Commit, which may then hold a lock).
  absl::Status Sync();
  // Moves the file to `final_path` (in `dir`) durably.
  absl::Status Commit(const std::string& final_path);
  void Abort();
  int64_t size() const { return size_; }

 private:
  PartialFile(int fd, std::string dir, std::string path)
      : fd_(fd), dir_(std::move(dir)), path_(std::move(path)) {}
  int fd_;
  std::string dir_, path_;
  int64_t size_ = 0;
  bool done_ = false;
};

// Removes <dir>/.partial/* (files of uploads a crash interrupted).
void RemovePartials(const std::string& dir);

// An exclusive flock on <dir>/LOCK for the process's lifetime: a second server on the same
// storage would corrupt it.
class DirLock {
 public:
  static absl::StatusOr<std::unique_ptr<DirLock>> Acquire(const std::string& dir);
  ~DirLock();

 private:
  explicit DirLock(int fd) : fd_(fd) {}
  int fd_;
};

}  // namespace qtrain::ps

#endif  // QTRAIN_DISTRIBUTED_PS_STORAGE_H_
