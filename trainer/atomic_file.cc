// WriteFileAtomically and ReadFile over POSIX calls, with errno text in every error.
#include "trainer/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace qtrain {
namespace {

absl::Status Errno(const std::string& what, const std::string& path) {
  return absl::InternalError(absl::StrCat(what, " ", path, ": ", std::strerror(errno)));
}

std::string DirName(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

}  // namespace

absl::Status WriteFileAtomically(const std::string& path,
                                 const std::vector<absl::string_view>& pieces,
                                 const WriteProgressHook& hook) {
  const std::string tmp = absl::StrCat(path, ".tmp.", getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("cannot create", tmp);
  size_t written = 0;
  constexpr size_t kChunk = 8 << 20;
  for (absl::string_view piece : pieces) {
    while (!piece.empty()) {
      const size_t want = std::min(piece.size(), kChunk);
      const ssize_t n = ::write(fd, piece.data(), want);
      if (n < 0) {
        if (errno == EINTR) continue;
        absl::Status s = Errno("write failed for", tmp);
        ::close(fd);
        ::unlink(tmp.c_str());
        return s;
      }
      piece.remove_prefix(n);
      written += n;
      if (hook) hook(written);
    }
  }
  if (::fsync(fd) != 0) {
    absl::Status s = Errno("fsync failed for", tmp);
    ::close(fd);
    ::unlink(tmp.c_str());
    return s;
  }
  if (::close(fd) != 0) {
    ::unlink(tmp.c_str());
    return Errno("close failed for", tmp);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    absl::Status s = Errno(absl::StrCat("cannot rename ", tmp, " to"), path);
    ::unlink(tmp.c_str());
    return s;
  }
  // The rename is durable only once the directory entry is.
  const std::string dir = DirName(path);
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat("'", path, "' is a directory, not a file"));
  }
  errno = 0;
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    if (errno == ENOENT) return absl::NotFoundError(absl::StrCat("no such file: ", path));
    return Errno("cannot open", path);
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return Errno("read failed for", path);
  return ss.str();
}

bool SameFile(const std::string& a, const std::string& b) {
  struct stat sa, sb;
  if (::stat(a.c_str(), &sa) != 0 || ::stat(b.c_str(), &sb) != 0) return false;
  return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

absl::Status CheckNotOverwritingInput(const std::string& output, const std::string& output_flag,
                                      const std::string& input, const std::string& input_flag) {
  if (!SameFile(output, input)) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      output_flag, " ", output, " is the input ", input_flag, " ", input,
      output == input ? "" : " (the same file through a link)",
      "; writing it would replace the input: choose another ", output_flag));
}

}  // namespace qtrain
