// Shard reading and writing (llm.c format); see shard.h.
#include "trainer/shard.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "trainer/atomic_file.h"

namespace qtrain {
namespace {

static_assert(sizeof(uint16_t) == 2 && sizeof(int32_t) == 4, "shard layout");

absl::Status ErrnoError(int err, const std::string& what, const std::string& path) {
  return absl::ErrnoToStatus(err, absl::StrCat(what, " '", path, "'"));
}

absl::Status ReadAll(int fd, void* data, size_t size, const std::string& path) {
  char* p = static_cast<char*>(data);
  while (size > 0) {
    ssize_t n = ::read(fd, p, size);
    if (n < 0) {
      if (errno == EINTR) continue;
      return ErrnoError(errno, "reading shard", path);
    }
    if (n == 0) {
      return absl::DataLossError(absl::StrCat("shard '", path, "' shrank while being read"));
    }
    p += n;
    size -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

// Closes the descriptor on every path out of a function.
struct FdCloser {
  int fd;
  ~FdCloser() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

absl::Status WriteShard(const std::string& path, absl::Span<const uint16_t> tokens) {
  if (tokens.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max())) {
    return absl::InvalidArgumentError(
        absl::StrCat("shard '", path, "': ", tokens.size(),
                     " tokens do not fit the int32 token count of the header"));
  }
  int32_t header[kShardHeaderInts] = {0};
  header[0] = kShardMagic;
  header[1] = kShardVersion;
  header[2] = static_cast<int32_t>(tokens.size());

  return WriteFileAtomically(
      path, {absl::string_view(reinterpret_cast<const char*>(header), sizeof(header)),
             absl::string_view(reinterpret_cast<const char*>(tokens.data()),
                               tokens.size() * sizeof(uint16_t))});
}

absl::StatusOr<std::vector<uint16_t>> ReadShard(const std::string& path,
                                                std::optional<int> vocab_size) {
  if (vocab_size.has_value() && (*vocab_size <= 0 || *vocab_size > 65536)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "reading shard '", path, "': vocab_size must be in [1, 65536], got ", *vocab_size));
  }
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) {
    if (errno == ENOENT) {
      return absl::NotFoundError(absl::StrCat("shard '", path, "' does not exist"));
    }
    return ErrnoError(errno, "opening shard", path);
  }
  FdCloser closer{fd};
  struct stat st;
  if (::fstat(fd, &st) != 0) return ErrnoError(errno, "stat of shard", path);
  if (!S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat("shard '", path, "' is not a regular file"));
  }
  const int64_t file_size = st.st_size;
  if (file_size < kShardHeaderBytes) {
    return absl::DataLossError(absl::StrCat("shard '", path, "' has ", file_size,
                                            " bytes, shorter than the ", kShardHeaderBytes,
                                            "-byte header"));
  }
  int32_t header[kShardHeaderInts];
  absl::Status s = ReadAll(fd, header, sizeof(header), path);
  if (!s.ok()) return s;
  if (header[0] != kShardMagic) {
    return absl::DataLossError(absl::StrCat("shard '", path, "': bad magic number: expected ",
                                            kShardMagic, ", got ", header[0]));
  }
  if (header[1] != kShardVersion) {
    return absl::DataLossError(absl::StrCat("shard '", path, "': unsupported version ",
                                            header[1], " (expected ", kShardVersion,
                                            ", uint16 tokens)"));
  }
  const int64_t count = header[2];
  const int64_t payload = file_size - kShardHeaderBytes;
  const int64_t expected = count * static_cast<int64_t>(sizeof(uint16_t));
  if (count < 0 || payload != expected) {
    const char* what = count < 0 ? "negative token count"
                       : payload < expected ? "truncated"
                                            : "trailing bytes";
    return absl::DataLossError(absl::StrCat("shard '", path, "' (", what, "): header says ",
                                            count, " tokens (", expected,
                                            " bytes) but the file holds ", payload,
                                            " bytes after the header"));
  }
  std::vector<uint16_t> tokens(static_cast<size_t>(count));
  s = ReadAll(fd, tokens.data(), tokens.size() * sizeof(uint16_t), path);
  if (!s.ok()) return s;
  if (vocab_size.has_value()) {
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (tokens[i] >= *vocab_size) {
        return absl::OutOfRangeError(absl::StrCat("shard '", path, "': token ", tokens[i],
                                                  " at offset ", i, " is outside the vocab (",
                                                  "vocab_size ", *vocab_size, ")"));
      }
    }
  }
  return tokens;
}

}  // namespace qtrain
