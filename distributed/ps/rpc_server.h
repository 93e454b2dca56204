// RpcServer: the gRPC server under qtrain_ps and every service module on it.
//
// Design. All methods go through one gRPC CallbackGenericService (the callback API on raw
// bytes) instead of the generated per-service classes, so that one place, before any handler:
//   - checks the bearer token of EVERY call (health, status and unknown methods included),
//   - enforces the per-method request size (RESOURCE_EXHAUSTED) and parses the request itself,
//     so undecodable bytes get INVALID_ARGUMENT (the generated code would answer INTERNAL),
//   - bounds the calls in flight and drops client streams that go silent,
//   - moves handlers that touch the disk off gRPC's threads (WorkerPool), so heartbeats stay
//     fast while a checkpoint is being fsynced.
// Modules register typed handlers for the methods of their own proto services (MethodRegistry
// checks each against the service descriptor); clients use the ordinary generated stubs, the
// wire format being the same. Four handler shapes cover the services: unary, deferred unary
// (long polls such as Rendezvous), client streams (uploads) and server streams (downloads,
// watches).
#ifndef QTRAIN_DISTRIBUTED_PS_RPC_SERVER_H_
#define QTRAIN_DISTRIBUTED_PS_RPC_SERVER_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/generic/async_generic_service.h"
#include "grpcpp/security/server_credentials.h"
#include "grpcpp/server.h"
#include "grpcpp/support/byte_buffer.h"
#include "grpcpp/support/proto_buffer_reader.h"
#include "grpcpp/support/status.h"

namespace qtrain::ps {

class TokenChecker;

// Threads for handler work that may block (disk, fsync).
class WorkerPool {
 public:
  explicit WorkerPool(int threads);
  ~WorkerPool();  // runs what is queued, then joins
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;
  void Post(std::function<void()> fn);

 private:
  absl::Mutex mu_;
  std::deque<std::function<void()>> queue_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
};

// What a handler knows about its call.
struct CallInfo {
  std::string method;   // "/qtrain.ps.ParameterService/Heartbeat"
  std::string peer;     // "ipv4:127.0.0.1:41234"
  absl::Time deadline;  // absl::InfiniteFuture() when the client set none
};

enum class Blocking {
  kNo,   // quick, in memory: runs on gRPC's thread
  kYes,  // may wait for the disk: runs on the WorkerPool
};

struct MethodOptions {
  int64_t max_request_bytes = 0;  // 0: the server's control-message limit
  Blocking blocking = Blocking::kNo;
};

grpc::Status ToGrpc(const absl::Status& s);
absl::Status FromGrpc(const grpc::Status& s);

// Parses `bytes` (at most max_bytes, else RESOURCE_EXHAUSTED) into `msg`; INVALID_ARGUMENT
// when they are not a valid encoding.
grpc::Status ParseMessage(grpc::ByteBuffer* bytes, int64_t max_bytes,
                          google::protobuf::Message* msg);
grpc::ByteBuffer SerializeMessage(const google::protobuf::Message& msg);

namespace internal {

// What a call does next; the call's driver applies it.
struct Step {
  enum Kind { kRead, kWrite, kWriteAndFinish, kFinish, kWait };
  Kind kind = kFinish;
  grpc::ByteBuffer bytes;
  grpc::Status status;
  static Step Read() { return {kRead, {}, {}}; }
  static Step Wait() { return {kWait, {}, {}}; }
  static Step Finish(grpc::Status s) { return {kFinish, {}, std::move(s)}; }
  static Step Write(const google::protobuf::Message& m) { return {kWrite, SerializeMessage(m), {}}; }
  static Step WriteAndFinish(const google::protobuf::Message& m) {
    return {kWriteAndFinish, SerializeMessage(m), grpc::Status::OK};
  }
};

// One call's behaviour, made per call by a registered method. Never called concurrently.
class CallLogic {
 public:
  virtual ~CallLogic() = default;
  virtual Step OnMessage(grpc::ByteBuffer* message) = 0;
  virtual Step OnHalfClose() = 0;
  virtual Step OnWritten() { return Step::Finish(grpc::Status(grpc::StatusCode::INTERNAL, "")); }
  virtual Step OnWake() { return Step::Finish(grpc::Status(grpc::StatusCode::INTERNAL, "")); }
  virtual void OnCancel() {}
  // Set by the call before the first message: resumes a call that returned Step::Wait. Safe
  // from any thread, any number of times (extra calls before the next Wait are remembered once).
  std::function<void()> wake;
};

struct MethodEntry {
  std::string name;
  MethodOptions options;
  bool client_stream = false;
  std::function<std::unique_ptr<CallLogic>(const CallInfo&, int64_t max_request_bytes)> make;
};

}  // namespace internal

// A late answer to a unary call. Finish is thread-safe, counts once, and does nothing when
// the client has gone (deadline, cancel).
template <class Resp>
class Responder {
 public:
  void Finish(const grpc::Status& status, const Resp& response = Resp()) {
    {
      absl::MutexLock lock(&mu_);
      if (finished_) return;
      finished_ = true;
      status_ = status;
      response_ = response;
    }
    wake_();
  }
  bool finished() const {
    absl::MutexLock lock(&mu_);
    return finished_;
  }

 private:
  template <class, class>
  friend class DeferredLogic;
  explicit Responder(std::function<void()> wake) : wake_(std::move(wake)) {}
  mutable absl::Mutex mu_;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status status_ ABSL_GUARDED_BY(mu_);
  Resp response_ ABSL_GUARDED_BY(mu_);
  std::function<void()> wake_;
};

template <class Req, class Resp>
class ClientStreamHandler {
 public:
  virtual ~ClientStreamHandler() = default;
  // A non-OK status ends the call with it.
  virtual grpc::Status OnMessage(const Req& request) = 0;
  // The client finished sending.
  virtual grpc::Status OnEnd(Resp* response) = 0;
  // The client went away; nothing else is called.
  virtual void OnCancel() {}
};

enum class StreamStep { kMessage, kEnd, kWait };

template <class Resp>
class ServerStreamSource {
 public:
  virtual ~ServerStreamSource() = default;
  // kMessage: *out is sent, then Next again. kEnd: the call ends with *end. kWait: nothing yet;
  // call `wake` (any thread, once) when Next should be asked again.
  virtual StreamStep Next(Resp* out, grpc::Status* end, const std::function<void()>& wake) = 0;
  virtual void OnCancel() {}
};

template <class Req, class Resp>
using UnaryFn = std::function<grpc::Status(const CallInfo&, const Req&, Resp*)>;
template <class Req, class Resp>
using DeferredFn =
    std::function<void(const CallInfo&, const Req&, std::shared_ptr<Responder<Resp>>)>;
template <class Req, class Resp>
using ClientStreamFactory = std::function<grpc::Status(
    const CallInfo&, std::unique_ptr<ClientStreamHandler<Req, Resp>>*)>;
template <class Req, class Resp>
using ServerStreamFactory = std::function<grpc::Status(
    const CallInfo&, const Req&, std::unique_ptr<ServerStreamSource<Resp>>*)>;

// ---- typed call logic ----------------------------------------------------------------------

template <class Req, class Resp>
class UnaryLogic : public internal::CallLogic {
 public:
  UnaryLogic(CallInfo info, int64_t max_bytes, const UnaryFn<Req, Resp>* fn)
      : info_(std::move(info)), max_bytes_(max_bytes), fn_(fn) {}
  internal::Step OnMessage(grpc::ByteBuffer* message) override {
    Req req;
    grpc::Status s = ParseMessage(message, max_bytes_, &req);
    if (!s.ok()) return internal::Step::Finish(s);
    Resp resp;
    s = (*fn_)(info_, req, &resp);
    if (!s.ok()) return internal::Step::Finish(s);
    return internal::Step::WriteAndFinish(resp);
  }
  internal::Step OnHalfClose() override {
    return internal::Step::Finish(
        grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "no request message"));
  }

 private:
  CallInfo info_;
  int64_t max_bytes_;
  const UnaryFn<Req, Resp>* fn_;
};

template <class Req, class Resp>
class DeferredLogic : public internal::CallLogic {
 public:
  DeferredLogic(CallInfo info, int64_t max_bytes, const DeferredFn<Req, Resp>* fn)
      : info_(std::move(info)), max_bytes_(max_bytes), fn_(fn) {}
  internal::Step OnMessage(grpc::ByteBuffer* message) override {
    Req req;
    grpc::Status s = ParseMessage(message, max_bytes_, &req);
    if (!s.ok()) return internal::Step::Finish(s);
    responder_.reset(new Responder<Resp>(wake));
    (*fn_)(info_, req, responder_);
    return internal::Step::Wait();
  }
  internal::Step OnHalfClose() override {
    return internal::Step::Finish(
        grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "no request message"));
  }
  internal::Step OnWake() override {
    absl::MutexLock lock(&responder_->mu_);
    if (!responder_->status_.ok()) return internal::Step::Finish(responder_->status_);
    return internal::Step::WriteAndFinish(responder_->response_);
  }
  void OnCancel() override {
    // The handler may still hold the responder; its Finish then does nothing.
    if (responder_) responder_->Finish(grpc::Status(grpc::StatusCode::CANCELLED, ""));
  }

 private:
  CallInfo info_;
  int64_t max_bytes_;
  const DeferredFn<Req, Resp>* fn_;
  std::shared_ptr<Responder<Resp>> responder_;
};

template <class Req, class Resp>
class ClientStreamLogic : public internal::CallLogic {
 public:
  ClientStreamLogic(CallInfo info, int64_t max_bytes, const ClientStreamFactory<Req, Resp>* make)
      : info_(std::move(info)), max_bytes_(max_bytes), make_(make) {}
  internal::Step OnMessage(grpc::ByteBuffer* message) override {
    if (!handler_) {
      grpc::Status s = (*make_)(info_, &handler_);
      if (!s.ok()) return internal::Step::Finish(s);
    }
    Req req;
    grpc::Status s = ParseMessage(message, max_bytes_, &req);
    if (s.ok()) s = handler_->OnMessage(req);
    if (!s.ok()) {
      handler_->OnCancel();
      return internal::Step::Finish(s);
    }
    return internal::Step::Read();
  }
  internal::Step OnHalfClose() override {
    if (!handler_) {
      grpc::Status s = (*make_)(info_, &handler_);
      if (!s.ok()) return internal::Step::Finish(s);
    }
    Resp resp;
    grpc::Status s = handler_->OnEnd(&resp);
    if (!s.ok()) return internal::Step::Finish(s);
    return internal::Step::WriteAndFinish(resp);
  }
  void OnCancel() override {
    if (handler_) handler_->OnCancel();
  }

 private:
  CallInfo info_;
  int64_t max_bytes_;
  const ClientStreamFactory<Req, Resp>* make_;
  std::unique_ptr<ClientStreamHandler<Req, Resp>> handler_;
};

template <class Req, class Resp>
class ServerStreamLogic : public internal::CallLogic {
 public:
  ServerStreamLogic(CallInfo info, int64_t max_bytes, const ServerStreamFactory<Req, Resp>* make)
      : info_(std::move(info)), max_bytes_(max_bytes), make_(make) {}
  internal::Step OnMessage(grpc::ByteBuffer* message) override {
    Req req;
    grpc::Status s = ParseMessage(message, max_bytes_, &req);
    if (!s.ok()) return internal::Step::Finish(s);
    s = (*make_)(info_, req, &source_);
    if (!s.ok()) return internal::Step::Finish(s);
    return Pull();
  }
  internal::Step OnHalfClose() override {
    return internal::Step::Finish(
        grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "no request message"));
  }
  internal::Step OnWritten() override { return Pull(); }
  internal::Step OnWake() override { return Pull(); }
  void OnCancel() override {
    if (source_) source_->OnCancel();
  }

 private:
  internal::Step Pull() {
    Resp out;
    grpc::Status end;
    switch (source_->Next(&out, &end, wake)) {
      case StreamStep::kMessage:
        return internal::Step::Write(out);
      case StreamStep::kWait:
        return internal::Step::Wait();
      case StreamStep::kEnd:
        break;
    }
    return internal::Step::Finish(end);
  }
  CallInfo info_;
  int64_t max_bytes_;
  const ServerStreamFactory<Req, Resp>* make_;
  std::unique_ptr<ServerStreamSource<Resp>> source_;
};

// ---- registration --------------------------------------------------------------------------

class MethodRegistry {
 public:
  // `service` is the proto service's full name ("qtrain.ps.ParameterService"), `method` its
  // method's name; both must exist in the generated descriptor pool with these request and
  // response types and this streaming shape, else Start() fails naming the mismatch.
  template <class Req, class Resp>
  void Unary(const std::string& service, const std::string& method, UnaryFn<Req, Resp> fn,
             MethodOptions options = {}) {
    auto* f = Keep(std::move(fn));
    Add(service, method, Req::descriptor(), Resp::descriptor(), false, false, options,
        [f](const CallInfo& info, int64_t max) {
          return std::make_unique<UnaryLogic<Req, Resp>>(info, max, f);
        });
  }
  template <class Req, class Resp>
  void Deferred(const std::string& service, const std::string& method, DeferredFn<Req, Resp> fn,
                MethodOptions options = {}) {
    auto* f = Keep(std::move(fn));
    Add(service, method, Req::descriptor(), Resp::descriptor(), false, false, options,
        [f](const CallInfo& info, int64_t max) {
          return std::make_unique<DeferredLogic<Req, Resp>>(info, max, f);
        });
  }
  template <class Req, class Resp>
  void ClientStream(const std::string& service, const std::string& method,
                    ClientStreamFactory<Req, Resp> make, MethodOptions options = {}) {
    auto* f = Keep(std::move(make));
    Add(service, method, Req::descriptor(), Resp::descriptor(), true, false, options,
        [f](const CallInfo& info, int64_t max) {
          return std::make_unique<ClientStreamLogic<Req, Resp>>(info, max, f);
        });
  }
  template <class Req, class Resp>
  void ServerStream(const std::string& service, const std::string& method,
                    ServerStreamFactory<Req, Resp> make, MethodOptions options = {}) {
    auto* f = Keep(std::move(make));
    Add(service, method, Req::descriptor(), Resp::descriptor(), false, true, options,
        [f](const CallInfo& info, int64_t max) {
          return std::make_unique<ServerStreamLogic<Req, Resp>>(info, max, f);
        });
  }

  // "/pkg.Service/Method" of every registered method.
  std::vector<std::string> MethodNames() const;
  // Full names of the services with registered methods.
  std::vector<std::string> ServiceNames() const;
  // Registration mistakes so far, and methods of registered services left without a handler.
  absl::Status Check() const;
  const internal::MethodEntry* Find(const std::string& name) const;

 private:
  template <class F>
  F* Keep(F fn) {
    auto holder = std::make_shared<F>(std::move(fn));
    keep_.push_back(holder);
    return holder.get();
  }
  void Add(const std::string& service, const std::string& method,
           const google::protobuf::Descriptor* req, const google::protobuf::Descriptor* resp,
           bool client_stream, bool server_stream, MethodOptions options,
           std::function<std::unique_ptr<internal::CallLogic>(const CallInfo&, int64_t)> make);

  std::map<std::string, internal::MethodEntry> methods_;
  std::vector<std::string> services_;
  std::vector<std::string> errors_;
  std::vector<std::shared_ptr<void>> keep_;
};

class Call;
struct CallHandle;

class RpcServer {
 public:
  struct Options {
    std::string address;  // host:port; port 0 picks one
    std::shared_ptr<grpc::ServerCredentials> credentials;
    std::string token;
    int64_t max_message_bytes = 4 << 20;
    int64_t max_control_message_bytes = 64 << 10;
    int max_pending_calls = 4096;
    absl::Duration stream_idle_timeout = absl::Minutes(2);
    int worker_threads = 4;
  };
  explicit RpcServer(Options options);
  ~RpcServer();  // Shutdown if running

  MethodRegistry* registry() { return &registry_; }
  WorkerPool* pool() { return pool_.get(); }

  // Checks the registry, binds and starts serving. FailedPrecondition naming the address
  // when it cannot bind.
  absl::Status Start();
  int port() const { return port_; }
  // Stops accepting, cancels what is still running after `grace`, waits for the handlers.
  void Shutdown(absl::Duration grace = absl::Seconds(2));

  int64_t calls_in_flight() const { return in_flight_.load(); }

 private:
  friend class Call;
  class Generic;
  void Track(const std::shared_ptr<CallHandle>& handle, bool add);
  void SweepLoop();

  Options options_;
  std::unique_ptr<TokenChecker> tokens_;
  MethodRegistry registry_;
  std::unique_ptr<WorkerPool> pool_;
  std::unique_ptr<Generic> generic_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::atomic<int64_t> in_flight_{0};

  absl::Mutex mu_;
  std::vector<std::shared_ptr<CallHandle>> streams_ ABSL_GUARDED_BY(mu_);  // for the idle sweep
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  absl::CondVar stop_cv_;
  std::thread sweeper_;
};

}  // namespace qtrain::ps

#endif  // QTRAIN_DISTRIBUTED_PS_RPC_SERVER_H_
