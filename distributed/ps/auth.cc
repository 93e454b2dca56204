// Token loading and checking, TLS credentials from PEM files.
#include "distributed/ps/auth.h"

#include <sys/stat.h>

#include <cstdlib>
#include <cstdio>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "distributed/ps/digest.h"
#include "trainer/atomic_file.h"

namespace qtrain::ps {
namespace {

absl::Status CheckToken(const std::string& token, const std::string& source) {
  if (token.size() < kMinTokenBytes) {
    return absl::InvalidArgumentError(absl::StrCat("the token in ", source, " has ", token.size(),
                                                   " characters; use at least ", kMinTokenBytes,
                                                   " (e.g. openssl rand -hex 32)"));
  }
  for (char c : token) {
    if (c < 0x21 || c > 0x7e) {
      return absl::InvalidArgumentError(absl::StrCat(
          "the token in ", source, " holds a character outside printable ASCII (no spaces)"));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> ReadPem(const std::string& path, const char* what) {
  absl::StatusOr<std::string> text = ReadFile(path);
  if (!text.ok()) {
    return absl::Status(text.status().code(),
                        absl::StrCat("cannot read the ", what, ": ", text.status().message()));
  }
  if (text->find("-----BEGIN") == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("the ", what, " ", path, " is not PEM"));
  }
  return text;
}

}  // namespace

absl::StatusOr<std::string> LoadToken(const std::string& token_file,
                                      const std::string& token_env) {
  if (!token_file.empty()) {
    absl::StatusOr<std::string> text = ReadFile(token_file);
    if (!text.ok()) {
      return absl::Status(text.status().code(),
                          absl::StrCat("cannot read the token file: ", text.status().message()));
    }
    struct stat st;
    if (::stat(token_file.c_str(), &st) == 0 && (st.st_mode & 0077) != 0) {
      std::fprintf(stderr, "qtrain_ps: warning: token file %s is readable by others (chmod 600)\n",
                   token_file.c_str());
    }
    const size_t eol = text->find('\n');
    std::string token(absl::StripAsciiWhitespace(text->substr(0, eol)));
    if (absl::Status s = CheckToken(token, token_file); !s.ok()) return s;
    return token;
  }
  if (!token_env.empty()) {
    const char* value = std::getenv(token_env.c_str());
    if (value == nullptr || *value == '\0') {
      return absl::NotFoundError(
          absl::StrCat("environment variable ", token_env, " (the token) is not set"));
    }
    std::string token(absl::StripAsciiWhitespace(value));
    if (absl::Status s = CheckToken(token, "$" + token_env); !s.ok()) return s;
    return token;
  }
  return absl::InvalidArgumentError("no token: set token_file or token_env");
}

absl::StatusOr<std::string> ResolveClientToken(const std::string& token_file) {
  if (!token_file.empty()) return LoadToken(token_file, "");
  if (const char* f = std::getenv(kTokenFileEnv); f != nullptr && *f != '\0') {
    return LoadToken(f, "");
  }
  if (const char* t = std::getenv(kTokenEnv); t != nullptr && *t != '\0') {
    return LoadToken("", kTokenEnv);
  }
  return absl::NotFoundError(absl::StrCat(
      "no token for the parameter service: set parameter_service.token_file in the job, or $",
      kTokenFileEnv, " (a file) or $", kTokenEnv));
}

TokenChecker::TokenChecker(const std::string& token)
    : expected_digest_([&] {
        Sha256 h;
        h.Update(kBearerPrefix);
        h.Update(token);
        return h.Digest();
      }()) {}

bool TokenChecker::Matches(absl::string_view authorization_value) const {
  Sha256 h;
  h.Update(authorization_value);
  const std::string got = h.Digest();
  unsigned char diff = got.size() == expected_digest_.size() ? 0 : 1;
  for (size_t i = 0; i < got.size() && i < expected_digest_.size(); ++i) {
    diff |= static_cast<unsigned char>(got[i] ^ expected_digest_[i]);
  }
  return diff == 0;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsConfig& tls) {
  if (tls.cert_file().empty() && tls.key_file().empty()) {
    if (!tls.client_ca_file().empty() || tls.require_client_cert()) {
      return absl::InvalidArgumentError(
          "tls.client_ca_file / tls.require_client_cert need tls.cert_file and tls.key_file");
    }
    return grpc::InsecureServerCredentials();
  }
  if (tls.cert_file().empty() || tls.key_file().empty()) {
    return absl::InvalidArgumentError("TLS needs both tls.cert_file and tls.key_file");
  }
  grpc::SslServerCredentialsOptions options;
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  absl::StatusOr<std::string> cert = ReadPem(tls.cert_file(), "server certificate");
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadPem(tls.key_file(), "server key");
  if (!key.ok()) return key.status();
  pair.cert_chain = *cert;
  pair.private_key = *key;
  options.pem_key_cert_pairs.push_back(pair);
  if (!tls.client_ca_file().empty()) {
    absl::StatusOr<std::string> ca = ReadPem(tls.client_ca_file(), "client CA");
    if (!ca.ok()) return ca.status();
    options.pem_root_certs = *ca;
    options.client_certificate_request =
        tls.require_client_cert() ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                                  : GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY;
  } else if (tls.require_client_cert()) {
    return absl::InvalidArgumentError("tls.require_client_cert needs tls.client_ca_file");
  }
  return grpc::SslServerCredentials(options);
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> MakeChannelCredentials(
    const std::string& ca_file, const std::string& cert_file, const std::string& key_file) {
  if (ca_file.empty()) {
    if (!cert_file.empty() || !key_file.empty()) {
      return absl::InvalidArgumentError("a client certificate needs the CA file (TLS) as well");
    }
    return grpc::InsecureChannelCredentials();
  }
  grpc::SslCredentialsOptions options;
  absl::StatusOr<std::string> ca = ReadPem(ca_file, "CA certificate");
  if (!ca.ok()) return ca.status();
  options.pem_root_certs = *ca;
  if (!cert_file.empty() || !key_file.empty()) {
    if (cert_file.empty() || key_file.empty()) {
      return absl::InvalidArgumentError("a client certificate needs both the cert and key files");
    }
    absl::StatusOr<std::string> cert = ReadPem(cert_file, "client certificate");
    if (!cert.ok()) return cert.status();
    absl::StatusOr<std::string> key = ReadPem(key_file, "client key");
    if (!key.ok()) return key.status();
    options.pem_cert_chain = *cert;
    options.pem_private_key = *key;
  }
  return grpc::SslCredentials(options);
}

}  // namespace qtrain::ps
