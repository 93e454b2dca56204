// Helpers for the parameter-service tests: an in-process qtrain_ps on a free loopback port with
// its own storage and token, clients for it, and raw calls (any bytes, any method) for the
// auth, limits and fuzz tests.
#ifndef QTRAIN_TESTS_PS_PS_TEST_UTIL_H_
#define QTRAIN_TESTS_PS_PS_TEST_UTIL_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "distributed/proto/server_config.pb.h"
#include "distributed/ps/client.h"
#include "distributed/ps/server.h"
#include "grpcpp/channel.h"
#include "grpcpp/support/status.h"

namespace qtrain::ps::testing {

std::string TmpDir();
// A fresh directory under TmpDir().
std::string FreshDir(const std::string& name);
// Writes a random token file in `dir`; returns the token.
std::string WriteToken(const std::string& dir);

struct TestServer {
  std::unique_ptr<PsServer> server;
  ServerConfig config;
  std::string token;
  std::string address;  // 127.0.0.1:port
};

// Storage under FreshDir(name); `edit` may change the config before the start.
std::unique_ptr<TestServer> StartServer(const std::string& name,
                                        const std::function<void(ServerConfig*)>& edit = nullptr);

std::unique_ptr<PsClient> ClientFor(const TestServer& s,
                                    const std::function<void(ClientOptions*)>& edit = nullptr);

struct RawResult {
  grpc::Status status;
  std::vector<std::string> responses;
};

// Sends `requests` (raw bytes) to `method` on a bidi call, half-closes, reads every response.
// `token` empty: no authorization metadata; `authorization` non-empty overrides the value.
RawResult RawCall(const std::shared_ptr<grpc::Channel>& channel, const std::string& method,
                  const std::vector<std::string>& requests, const std::string& authorization,
                  double deadline_s = 10);

std::shared_ptr<grpc::Channel> PlainChannel(const std::string& address);

// "/pkg.Service/Method" of every method of the given services.
std::vector<std::string> AllMethods(const std::vector<std::string>& services);

}  // namespace qtrain::ps::testing

#endif  // QTRAIN_TESTS_PS_PS_TEST_UTIL_H_
