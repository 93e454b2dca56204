// Authentication of the parameter service: every method of every service (health and status
// included, and methods that do not exist) refuses calls without the bearer token or with a
// wrong one; TLS with a test CA (made with openssl here) works, a plaintext client is refused,
// and client certificates are enforced when the server requires them.
#include <cstdlib>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "distributed/proto/health.grpc.pb.h"
#include "distributed/ps/auth.h"
#include "distributed/ps/param_service.h"
#include "gmock/gmock.h"
#include "grpcpp/create_channel.h"
#include "gtest/gtest.h"
#include "tests/ps/ps_test_util.h"

namespace qtrain::ps::testing {
namespace {

using ::testing::HasSubstr;

std::vector<std::string> ServedMethods() {
  return AllMethods({kParameterService, kHealthService});
}

TEST(AuthTest, EveryMethodRefusesAMissingOrWrongToken) {
  std::unique_ptr<TestServer> s = StartServer("auth_every");
  ASSERT_NE(s, nullptr);
  auto channel = PlainChannel(s->address);
  std::vector<std::string> methods = ServedMethods();
  ASSERT_GE(methods.size(), 18u);
  methods.push_back("/qtrain.ps.ParameterService/NoSuchMethod");
  methods.push_back("/no.such.Service/Anything");
  const std::string right = absl::StrCat(kBearerPrefix, s->token);
  std::string wrong_same_length = right;
  wrong_same_length.back() = wrong_same_length.back() == 'a' ? 'b' : 'a';
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"no token", ""},
      {"wrong token", absl::StrCat(kBearerPrefix, "0123456789abcdef0123456789abcdef")},
      {"one character off", wrong_same_length},
      {"token without the Bearer scheme", s->token},
      {"a prefix of the token", right.substr(0, right.size() - 1)},
  };
  for (const std::string& method : methods) {
    for (const auto& [what, auth] : bad) {
      RawResult r = RawCall(channel, method, {""}, auth);
      EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAUTHENTICATED)
          << method << " with " << what << ": " << r.status.error_message();
      EXPECT_TRUE(r.responses.empty()) << method << " answered data to " << what;
    }
  }
  // With the right token nothing is UNAUTHENTICATED; unknown methods are UNIMPLEMENTED.
  for (const std::string& method : ServedMethods()) {
    if (method.find("Watch") != std::string::npos) continue;  // would wait: checked below
    RawResult r = RawCall(channel, method, {""}, right, 5);
    EXPECT_NE(r.status.error_code(), grpc::StatusCode::UNAUTHENTICATED) << method;
  }
  EXPECT_EQ(RawCall(channel, "/no.such.Service/Anything", {""}, right).status.error_code(),
            grpc::StatusCode::UNIMPLEMENTED);
}

TEST(AuthTest, HealthAnswersBehindTheToken) {
  std::unique_ptr<TestServer> s = StartServer("auth_health");
  ASSERT_NE(s, nullptr);
  auto stub = grpc::health::v1::Health::NewStub(PlainChannel(s->address));
  grpc::health::v1::HealthCheckRequest req;
  grpc::health::v1::HealthCheckResponse resp;
  {
    grpc::ClientContext ctx;
    EXPECT_EQ(stub->Check(&ctx, req, &resp).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  for (const std::string service : {"", kParameterService, kHealthService}) {
    grpc::ClientContext ctx;
    ctx.AddMetadata(kAuthorizationKey, absl::StrCat(kBearerPrefix, s->token));
    req.set_service(service);
    ASSERT_TRUE(stub->Check(&ctx, req, &resp).ok()) << service;
    EXPECT_EQ(resp.status(), grpc::health::v1::HealthCheckResponse::SERVING) << service;
  }
  grpc::ClientContext ctx;
  ctx.AddMetadata(kAuthorizationKey, absl::StrCat(kBearerPrefix, s->token));
  req.set_service("no.such.Service");
  EXPECT_EQ(stub->Check(&ctx, req, &resp).error_code(), grpc::StatusCode::NOT_FOUND);
  // Watch sends SERVING and holds the stream open.
  grpc::ClientContext wctx;
  wctx.AddMetadata(kAuthorizationKey, absl::StrCat(kBearerPrefix, s->token));
  wctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
  req.set_service("");
  auto reader = stub->Watch(&wctx, req);
  ASSERT_TRUE(reader->Read(&resp));
  EXPECT_EQ(resp.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  EXPECT_FALSE(reader->Read(&resp));
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
}

TEST(AuthTest, TokensFromFileAndEnvironment) {
  const std::string dir = FreshDir("auth_tokens");
  const std::string token = WriteToken(dir);
  absl::StatusOr<std::string> from_file = LoadToken(dir + "/token", "");
  ASSERT_TRUE(from_file.ok()) << from_file.status();
  EXPECT_EQ(*from_file, token);
  setenv("QTRAIN_TEST_TOKEN_VAR", token.c_str(), 1);
  absl::StatusOr<std::string> from_env = LoadToken("", "QTRAIN_TEST_TOKEN_VAR");
  ASSERT_TRUE(from_env.ok()) << from_env.status();
  EXPECT_EQ(*from_env, token);
  setenv("QTRAIN_TEST_TOKEN_VAR", "short", 1);
  EXPECT_THAT(std::string(LoadToken("", "QTRAIN_TEST_TOKEN_VAR").status().message()),
              HasSubstr("at least 16"));
  EXPECT_THAT(std::string(LoadToken(dir + "/missing", "").status().message()),
              HasSubstr(dir + "/missing"));
  unsetenv("QTRAIN_TEST_TOKEN_VAR");
  EXPECT_THAT(std::string(LoadToken("", "QTRAIN_TEST_TOKEN_VAR").status().message()),
              HasSubstr("QTRAIN_TEST_TOKEN_VAR"));
}

// A CA, a server certificate for localhost/127.0.0.1 and a client certificate, made by openssl.
struct Pki {
  std::string dir;
  bool ok = false;
  std::string ca() const { return dir + "/ca.pem"; }
};

Pki MakePki() {
  Pki p;
  p.dir = FreshDir("auth_pki");
  const std::string d = p.dir;
  const std::string key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
  const std::string cmd = absl::StrCat(
      "set -e; cd ", d, "; exec >openssl.log 2>&1; ",
      "openssl req -x509 ", key, " -keyout ca.key -out ca.pem -days 2 -subj '/CN=qtrain test CA';",
      "printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\n' > server.ext;",
      "openssl req ", key, " -keyout server.key -out server.csr -subj '/CN=localhost';",
      "openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 ",
      "-extfile server.ext -out server.pem;",
      "openssl req ", key, " -keyout client.key -out client.csr -subj '/CN=qtrain-client';",
      "openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 ",
      "-out client.pem;");
  p.ok = std::system(cmd.c_str()) == 0;
  return p;
}

TEST(AuthTest, TlsWorksAndPlaintextIsRefused) {
  Pki pki = MakePki();
  ASSERT_TRUE(pki.ok) << "openssl failed; see " << pki.dir << "/openssl.log";
  std::unique_ptr<TestServer> s = StartServer("auth_tls", [&](ServerConfig* c) {
    c->mutable_tls()->set_cert_file(pki.dir + "/server.pem");
    c->mutable_tls()->set_key_file(pki.dir + "/server.key");
  });
  ASSERT_NE(s, nullptr);
  auto tls = ClientFor(*s, [&](ClientOptions* o) { o->tls_ca_file = pki.ca(); });
  absl::StatusOr<StatusResponse> st = tls->Status();
  ASSERT_TRUE(st.ok()) << st.status();
  EXPECT_THAT(st->server(), HasSubstr("qtrain_ps"));
  // TLS without the token is still refused.
  auto no_token = RawCall(
      grpc::CreateChannel(s->address, *MakeChannelCredentials(pki.ca(), "", "")),
      "/qtrain.ps.ParameterService/Status", {""}, "");
  EXPECT_EQ(no_token.status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
  // A plaintext client (even with the right token) never gets through the handshake.
  auto plain = ClientFor(*s, [](ClientOptions* o) {
    o->deadline = absl::Seconds(2);
    o->max_attempts = 2;
  });
  absl::StatusOr<StatusResponse> refused = plain->Status();
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable) << refused.status();
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr(s->address));
  // A client that trusts another CA refuses the server.
  const std::string other_ca = pki.dir + "/other_ca.pem";
  ASSERT_EQ(std::system(absl::StrCat("cd ", pki.dir, " && openssl req -x509 -newkey ec -pkeyopt "
                                     "ec_paramgen_curve:prime256v1 -nodes -keyout other.key -out ",
                                     other_ca, " -days 2 -subj '/CN=other CA' >/dev/null 2>&1")
                            .c_str()),
            0);
  auto distrusting = ClientFor(*s, [&](ClientOptions* o) {
    o->tls_ca_file = other_ca;
    o->deadline = absl::Seconds(2);
    o->max_attempts = 2;
  });
  EXPECT_EQ(distrusting->Status().status().code(), absl::StatusCode::kUnavailable);
}

TEST(AuthTest, RequiredClientCertificates) {
  Pki pki = MakePki();
  ASSERT_TRUE(pki.ok) << "openssl failed; see " << pki.dir << "/openssl.log";
  std::unique_ptr<TestServer> s = StartServer("auth_mtls", [&](ServerConfig* c) {
    c->mutable_tls()->set_cert_file(pki.dir + "/server.pem");
    c->mutable_tls()->set_key_file(pki.dir + "/server.key");
    c->mutable_tls()->set_client_ca_file(pki.ca());
    c->mutable_tls()->set_require_client_cert(true);
  });
  ASSERT_NE(s, nullptr);
  auto with_cert = ClientFor(*s, [&](ClientOptions* o) {
    o->tls_ca_file = pki.ca();
    o->tls_cert_file = pki.dir + "/client.pem";
    o->tls_key_file = pki.dir + "/client.key";
  });
  EXPECT_TRUE(with_cert->Status().ok());
  auto without = ClientFor(*s, [&](ClientOptions* o) {
    o->tls_ca_file = pki.ca();
    o->deadline = absl::Seconds(2);
    o->max_attempts = 2;
  });
  absl::StatusOr<StatusResponse> refused = without->Status();
  EXPECT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable) << refused.status();
}

}  // namespace
}  // namespace qtrain::ps::testing
