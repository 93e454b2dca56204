// Storage primitives over POSIX calls; every error names the path and errno's text.
#include "distributed/ps/storage.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "distributed/ps/digest.h"

namespace qtrain::ps {
namespace {

absl::Status Errno(absl::string_view what, const std::string& path) {
  return absl::InternalError(absl::StrCat(what, " ", path, ": ", std::strerror(errno)));
}

absl::Status WriteAll(int fd, const char* p, size_t n, const std::string& path) {
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return Errno("write failed for", path);
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CheckName(absl::string_view what, absl::string_view name, size_t max_bytes) {
  if (name.empty()) return absl::InvalidArgumentError(absl::StrCat(what, ": must not be empty"));
  if (name.size() > max_bytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": ", name.size(), " bytes, more than the limit of ", max_bytes));
  }
  if (name[0] == '.') {
    return absl::InvalidArgumentError(absl::StrCat(what, ": must not start with '.'"));
  }
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-' || c == ':';
    if (!ok) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": only letters, digits and . _ - : are allowed, got byte 0x",
          ToHex(absl::string_view(&c, 1))));
    }
  }
  return absl::OkStatus();
}

absl::Status MakeDirs(const std::string& path) {
  std::error_code ec;
  std::filesystem::create_directories(path, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", path, ": ", ec.message()));
  return absl::OkStatus();
}

absl::Status FsyncDir(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Errno("cannot open directory", path);
  const int r = ::fsync(fd);
  ::close(fd);
  if (r != 0) return Errno("fsync failed for directory", path);
  return absl::OkStatus();
}

std::vector<std::string> ListDir(const std::string& dir) {
  std::vector<std::string> out;
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return out;
  while (dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (name != "." && name != "..") out.push_back(name);
  }
  ::closedir(d);
  return out;
}

absl::StatusOr<std::unique_ptr<AppendFile>> AppendFile::Open(const std::string& path,
                                                             bool line_oriented) {
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("cannot open", path);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    absl::Status s = Errno("cannot stat", path);
    ::close(fd);
    return s;
  }
  int64_t size = st.st_size;
  if (line_oriented && size > 0) {
    // Find the last newline; anything after it was never acknowledged.
    int64_t keep = size;
    char buf[4096];
    while (keep > 0) {
      const int64_t start = std::max<int64_t>(0, keep - static_cast<int64_t>(sizeof(buf)));
      const ssize_t n = ::pread(fd, buf, static_cast<size_t>(keep - start), start);
      if (n <= 0) break;
      int64_t i = n - 1;
      while (i >= 0 && buf[i] != '\n') --i;
      if (i >= 0) {
        keep = start + i + 1;
        break;
      }
      keep = start;
    }
    if (keep != size) {
      if (::ftruncate(fd, keep) != 0 || ::fsync(fd) != 0) {
        absl::Status s = Errno("cannot cut the torn tail of", path);
        ::close(fd);
        return s;
      }
      size = keep;
    }
  }
  if (::lseek(fd, 0, SEEK_END) < 0) {
    absl::Status s = Errno("cannot seek", path);
    ::close(fd);
    return s;
  }
  return std::unique_ptr<AppendFile>(new AppendFile(fd, path, size));
}

AppendFile::~AppendFile() { ::close(fd_); }

absl::Status AppendFile::Append(absl::string_view data) {
  if (absl::Status s = WriteAll(fd_, data.data(), data.size(), path_); !s.ok()) {
    // Leave no half row behind for the next append to glue onto.
    if (::ftruncate(fd_, size_) == 0) ::lseek(fd_, 0, SEEK_END);
    return s;
  }
  if (::fdatasync(fd_) != 0) return Errno("fdatasync failed for", path_);
  size_ += static_cast<int64_t>(data.size());
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<PartialFile>> PartialFile::Create(const std::string& dir) {
  const std::string partial_dir = dir + "/.partial";
  if (absl::Status s = MakeDirs(partial_dir); !s.ok()) return s;
  const std::string path = absl::StrCat(partial_dir, "/", RandomId());
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("cannot create", path);
  return std::unique_ptr<PartialFile>(new PartialFile(fd, dir, path));
}

PartialFile::~PartialFile() { Abort(); }

absl::Status PartialFile::Write(const void* data, size_t n) {
  if (done_) return absl::FailedPreconditionError("write to a finished partial file");
  absl::Status s = WriteAll(fd_, static_cast<const char*>(data), n, path_);
  if (s.ok()) size_ += static_cast<int64_t>(n);
  return s;
}

absl::Status PartialFile::Sync() {
  if (done_) return absl::FailedPreconditionError("sync of a finished partial file");
  if (::fsync(fd_) != 0) return Errno("fsync failed for", path_);
  return absl::OkStatus();
}

absl::Status PartialFile::Commit(const std::string& final_path) {
  if (done_) return absl::FailedPreconditionError("commit of a finished partial file");
  if (::fsync(fd_) != 0) return Errno("fsync failed for", path_);
  if (::close(fd_) != 0) {
    fd_ = -1;
    return Errno("close failed for", path_);
  }
  fd_ = -1;
  if (::rename(path_.c_str(), final_path.c_str()) != 0) {
    return Errno(absl::StrCat("cannot rename ", path_, " to"), final_path);
  }
  done_ = true;
  return FsyncDir(dir_);
}

void PartialFile::Abort() {
  if (done_) return;
  done_ = true;
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  ::unlink(path_.c_str());
}

void RemovePartials(const std::string& dir) {
  const std::string partial_dir = dir + "/.partial";
  for (const std::string& name : ListDir(partial_dir)) {
    ::unlink((partial_dir + "/" + name).c_str());
  }
}

absl::StatusOr<std::unique_ptr<DirLock>> DirLock::Acquire(const std::string& dir) {
  if (absl::Status s = MakeDirs(dir); !s.ok()) return s;
  const std::string path = dir + "/LOCK";
  const int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("cannot open", path);
  if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
    ::close(fd);
    return absl::FailedPreconditionError(
        absl::StrCat("storage directory ", dir, " is in use by another qtrain_ps (", path,
                     " is locked)"));
  }
  return std::unique_ptr<DirLock>(new DirLock(fd));
}

DirLock::~DirLock() { ::close(fd_); }

}  // namespace qtrain::ps
