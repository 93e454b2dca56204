// Test helpers: servers, clients, raw bidi calls through the generic client API.
#include "tests/ps/ps_test_util.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"
#include "distributed/ps/auth.h"
#include "distributed/ps/digest.h"
#include "google/protobuf/descriptor.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/support/client_callback.h"
#include "gtest/gtest.h"

namespace qtrain::ps::testing {

std::string TmpDir() {
  const char* t = std::getenv("TEST_TMPDIR");
  return t ? t : "/tmp";
}

std::string FreshDir(const std::string& name) {
  const std::string dir = absl::StrCat(TmpDir(), "/", name);
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

std::string WriteToken(const std::string& dir) {
  const std::string token = ToHex(RandomBytes(24));
  const std::string path = dir + "/token";
  std::ofstream(path) << token << "\n";
  std::filesystem::permissions(path, std::filesystem::perms::owner_read |
                                         std::filesystem::perms::owner_write);
  return token;
}

std::unique_ptr<TestServer> StartServer(const std::string& name,
                                        const std::function<void(ServerConfig*)>& edit) {
  auto s = std::make_unique<TestServer>();
  const std::string dir = FreshDir(name);
  s->token = WriteToken(dir);
  s->config.set_address("127.0.0.1:0");
  s->config.set_storage_dir(dir + "/storage");
  s->config.set_token_file(dir + "/token");
  if (edit) edit(&s->config);
  absl::StatusOr<std::unique_ptr<PsServer>> server = PsServer::Start(s->config);
  EXPECT_TRUE(server.ok()) << server.status();
  if (!server.ok()) return nullptr;
  s->server = *std::move(server);
  s->address = s->server->address();
  return s;
}

std::unique_ptr<PsClient> ClientFor(const TestServer& s,
                                    const std::function<void(ClientOptions*)>& edit) {
  ClientOptions o;
  o.address = s.address;
  o.token = s.token;
  o.deadline = absl::Seconds(10);
  if (edit) edit(&o);
  absl::StatusOr<std::unique_ptr<PsClient>> c = PsClient::Create(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *std::move(c) : nullptr;
}

std::shared_ptr<grpc::Channel> PlainChannel(const std::string& address) {
  grpc::ChannelArguments args;
  args.SetMaxSendMessageSize(64 << 20);
  args.SetMaxReceiveMessageSize(64 << 20);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

namespace {

class RawReactor : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  RawReactor(const std::vector<std::string>& requests) {
    for (const std::string& r : requests) {
      grpc::Slice slice(r);
      out_.emplace_back(&slice, 1);
    }
  }
  void Start() {
    StartRead(&in_);
    WriteNext();
    StartCall();
  }
  void OnWriteDone(bool ok) override {
    if (!ok) return;  // the server ended the call; the read side reports
    WriteNext();
  }
  void OnReadDone(bool ok) override {
    if (!ok) return;
    std::vector<grpc::Slice> slices;
    in_.Dump(&slices);
    std::string s;
    for (const grpc::Slice& sl : slices) s.append(reinterpret_cast<const char*>(sl.begin()), sl.size());
    result_.responses.push_back(std::move(s));
    StartRead(&in_);
  }
  void OnDone(const grpc::Status& s) override {
    result_.status = s;
    done_.Notify();
  }
  RawResult Wait() {
    done_.WaitForNotification();
    return result_;
  }

 private:
  void WriteNext() {
    if (next_ < out_.size()) {
      StartWrite(&out_[next_++]);
    } else if (!closed_) {
      closed_ = true;
      StartWritesDone();
    }
  }
  std::vector<grpc::ByteBuffer> out_;
  size_t next_ = 0;
  bool closed_ = false;
  grpc::ByteBuffer in_;
  RawResult result_;
  absl::Notification done_;
};

}  // namespace

RawResult RawCall(const std::shared_ptr<grpc::Channel>& channel, const std::string& method,
                  const std::vector<std::string>& requests, const std::string& authorization,
                  double deadline_s) {
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  if (!authorization.empty()) ctx.AddMetadata(kAuthorizationKey, authorization);
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(static_cast<int64_t>(deadline_s * 1000)));
  RawReactor reactor(requests);
  stub.PrepareBidiStreamingCall(&ctx, method, grpc::StubOptions(), &reactor);
  reactor.Start();
  return reactor.Wait();
}

std::vector<std::string> AllMethods(const std::vector<std::string>& services) {
  std::vector<std::string> out;
  for (const std::string& name : services) {
    const google::protobuf::ServiceDescriptor* sd =
        google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(name);
    EXPECT_NE(sd, nullptr) << name;
    for (int i = 0; sd != nullptr && i < sd->method_count(); ++i) {
      out.push_back(absl::StrCat("/", name, "/", sd->method(i)->name()));
    }
  }
  return out;
}

}  // namespace qtrain::ps::testing
