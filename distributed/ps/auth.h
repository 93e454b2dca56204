// Authentication of the parameter service: the shared bearer token (read from a file or an
// environment variable, never from a job spec), its constant-time check, and the TLS
// credentials of server and clients, read from PEM files.
#ifndef QTRAIN_DISTRIBUTED_PS_AUTH_H_
#define QTRAIN_DISTRIBUTED_PS_AUTH_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "distributed/proto/server_config.pb.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/security/server_credentials.h"

namespace qtrain::ps {

// gRPC metadata key and the value's scheme: "authorization: Bearer <token>".
inline constexpr char kAuthorizationKey[] = "authorization";
inline constexpr char kBearerPrefix[] = "Bearer ";
// Tokens shorter than this are refused: they can be guessed.
inline constexpr size_t kMinTokenBytes = 16;

// Environment variables clients read when no token file is given.
inline constexpr char kTokenFileEnv[] = "QTRAIN_PS_TOKEN_FILE";
inline constexpr char kTokenEnv[] = "QTRAIN_PS_TOKEN";

// The token: the first line of `token_file` (surrounding white space removed), or else the
// value of the environment variable named `token_env`. Errors name the file or variable; a
// token shorter than kMinTokenBytes or with characters outside printable ASCII is refused.
absl::StatusOr<std::string> LoadToken(const std::string& token_file, const std::string& token_env);

// A client's token: `token_file` if set, else $QTRAIN_PS_TOKEN_FILE, else $QTRAIN_PS_TOKEN.
absl::StatusOr<std::string> ResolveClientToken(const std::string& token_file);

// Compares presented "authorization" values against the token in constant time (both sides
// are hashed first, so neither the length nor a common prefix shows in the timing).
class TokenChecker {
 public:
  explicit TokenChecker(const std::string& token);
  bool Matches(absl::string_view authorization_value) const;

 private:
  std::string expected_digest_;  // SHA-256 of "Bearer <token>"
};

// Plaintext unless tls.cert_file is set; with client_ca_file, client certificates are
// requested (and required with require_client_cert). Errors name the file.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsConfig& tls);

// Plaintext when ca_file is empty, else TLS verified against ca_file, presenting
// cert_file/key_file when given.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const std::string& ca_file, const std::string& cert_file, const std::string& key_file);

}  // namespace qtrain::ps

#endif  // QTRAIN_DISTRIBUTED_PS_AUTH_H_
