// Digests of the parameter service: SHA-256 of whole files (OpenSSL's libcrypto, incremental),
// CRC32C of each chunk on the wire (the SSE4.2 instruction), and hex spelling.
#ifndef QTRAIN_DISTRIBUTED_PS_DIGEST_H_
#define QTRAIN_DISTRIBUTED_PS_DIGEST_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace qtrain::ps {

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(Sha256&&) noexcept;
  Sha256& operator=(Sha256&&) noexcept;
  void Update(const void* data, size_t n);
  void Update(absl::string_view s) { Update(s.data(), s.size()); }
  // Lower-case hex of the digest; the object cannot be updated afterwards.
  std::string HexDigest();
  // 32 raw bytes.
  std::string Digest();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

std::string Sha256Hex(absl::string_view data);

// SHA-256 of a file's bytes, read in 1 MiB blocks.
absl::StatusOr<std::string> Sha256OfFile(const std::string& path);

// CRC32C (Castagnoli, as iSCSI), `seed` chains calls.
uint32_t Crc32c(const void* data, size_t n, uint32_t seed = 0);
inline uint32_t Crc32c(absl::string_view s) { return Crc32c(s.data(), s.size()); }

std::string ToHex(absl::string_view bytes);
// Random bytes from the kernel (getrandom).
std::string RandomBytes(size_t n);
// 128 random bits as 32 hex digits: upload and worker ids.
std::string RandomId();

}  // namespace qtrain::ps

#endif  // QTRAIN_DISTRIBUTED_PS_DIGEST_H_
