// RpcServer: the generic callback service, the per-call reactor that drives CallLogic, the
// worker pool and the idle sweep.
#include "distributed/ps/rpc_server.h"

#include <algorithm>
#include <deque>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "distributed/ps/auth.h"
#include "google/protobuf/descriptor.h"
#include "grpcpp/server_builder.h"
#include "grpcpp/impl/codegen/proto_utils.h"
#include "grpcpp/support/proto_buffer_writer.h"

namespace qtrain::ps {

// ---- helpers -------------------------------------------------------------------------------

grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

grpc::Status ParseMessage(grpc::ByteBuffer* bytes, int64_t max_bytes,
                          google::protobuf::Message* msg) {
  const int64_t size = static_cast<int64_t>(bytes->Length());
  if (size > max_bytes) {
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        absl::StrCat(msg->GetDescriptor()->name(), " of ", size,
                                     " bytes exceeds this method's limit of ", max_bytes));
  }
  if (size == 0) {
    msg->Clear();
    return grpc::Status::OK;
  }
  grpc::ProtoBufferReader reader(bytes);
  if (!reader.status().ok() || !msg->ParseFromZeroCopyStream(&reader) ||
      !reader.status().ok()) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("the request is not a valid ",
                                     msg->GetDescriptor()->full_name(), " message"));
  }
  return grpc::Status::OK;
}

grpc::ByteBuffer SerializeMessage(const google::protobuf::Message& msg) {
  grpc::ByteBuffer bb;
  bool own = false;
  grpc::GenericSerialize<grpc::ProtoBufferWriter, google::protobuf::Message>(msg, &bb, &own);
  return bb;
}

// ---- WorkerPool ----------------------------------------------------------------------------

WorkerPool::WorkerPool(int threads) {
  for (int i = 0; i < std::max(1, threads); ++i) {
    threads_.emplace_back([this] {
      for (;;) {
        std::function<void()> fn;
        {
          absl::MutexLock lock(&mu_);
          mu_.Await(absl::Condition(
              +[](WorkerPool* p) ABSL_EXCLUSIVE_LOCKS_REQUIRED(p->mu_) {
                return p->stop_ || !p->queue_.empty();
              },
              this));
          if (queue_.empty()) return;  // stop_ and drained
          fn = std::move(queue_.front());
          queue_.pop_front();
        }
        fn();
      }
    });
  }
}

WorkerPool::~WorkerPool() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  for (std::thread& t : threads_) t.join();
}

void WorkerPool::Post(std::function<void()> fn) {
  absl::MutexLock lock(&mu_);
  queue_.push_back(std::move(fn));
}

// ---- MethodRegistry ------------------------------------------------------------------------

void MethodRegistry::Add(
    const std::string& service, const std::string& method,
    const google::protobuf::Descriptor* req, const google::protobuf::Descriptor* resp,
    bool client_stream, bool server_stream, MethodOptions options,
    std::function<std::unique_ptr<internal::CallLogic>(const CallInfo&, int64_t)> make) {
  const std::string name = absl::StrCat("/", service, "/", method);
  const google::protobuf::ServiceDescriptor* sd =
      google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(service);
  if (sd == nullptr) {
    errors_.push_back(absl::StrCat(name, ": no service ", service, " in the linked protos"));
    return;
  }
  const google::protobuf::MethodDescriptor* md = sd->FindMethodByName(method);
  if (md == nullptr) {
    errors_.push_back(absl::StrCat(name, ": ", service, " has no method ", method));
    return;
  }
  if (md->input_type() != req || md->output_type() != resp) {
    errors_.push_back(absl::StrCat(name, ": registered as ", req->full_name(), " -> ",
                                   resp->full_name(), ", the proto says ",
                                   md->input_type()->full_name(), " -> ",
                                   md->output_type()->full_name()));
    return;
  }
  if (md->client_streaming() != client_stream || md->server_streaming() != server_stream) {
    errors_.push_back(absl::StrCat(name, ": registered with the wrong streaming shape"));
    return;
  }
  if (methods_.count(name)) {
    errors_.push_back(absl::StrCat(name, ": registered twice"));
    return;
  }
  if (std::find(services_.begin(), services_.end(), service) == services_.end()) {
    services_.push_back(service);
  }
  internal::MethodEntry& e = methods_[name];
  e.name = name;
  e.options = options;
  e.client_stream = client_stream;
  e.make = std::move(make);
}

std::vector<std::string> MethodRegistry::MethodNames() const {
  std::vector<std::string> out;
  for (const auto& [name, e] : methods_) out.push_back(name);
  return out;
}

std::vector<std::string> MethodRegistry::ServiceNames() const { return services_; }

absl::Status MethodRegistry::Check() const {
  std::vector<std::string> problems = errors_;
  for (const std::string& service : services_) {
    const google::protobuf::ServiceDescriptor* sd =
        google::protobuf::DescriptorPool::generated_pool()->FindServiceByName(service);
    for (int i = 0; sd != nullptr && i < sd->method_count(); ++i) {
      const std::string name = absl::StrCat("/", service, "/", sd->method(i)->name());
      if (!methods_.count(name)) problems.push_back(absl::StrCat(name, ": no handler"));
    }
  }
  if (problems.empty()) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("service registration: ", absl::StrJoin(problems, "; ")));
}

const internal::MethodEntry* MethodRegistry::Find(const std::string& name) const {
  auto it = methods_.find(name);
  return it == methods_.end() ? nullptr : &it->second;
}

// ---- the per-call reactor ------------------------------------------------------------------

// What the idle sweep may touch of a call: the context, while the call lives.
struct CallHandle {
  std::recursive_mutex mu;  // recursive: TryCancel may run the call's OnDone inline
  grpc::CallbackServerContext* ctx = nullptr;
  absl::Time last_activity = absl::Now();
  bool reading = false;
};

namespace {

absl::Time DeadlineOf(const grpc::CallbackServerContext* ctx) {
  const std::chrono::system_clock::time_point d = ctx->deadline();
  if (d >= std::chrono::system_clock::time_point::max() - std::chrono::hours(24 * 365)) {
    return absl::InfiniteFuture();
  }
  return absl::FromChrono(d);
}

}  // namespace

// Drives one call. Exactly one party acts on the call at a time (the "driver"): the completion
// of the outstanding gRPC operation, the pool task running the logic, or, while the logic
// waits, whoever wakes it (or cancels it) first. OnCancel never calls into gRPC itself.
class Call : public grpc::ServerGenericBidiReactor {
 public:
  Call(RpcServer* server, grpc::GenericCallbackServerContext* ctx)
      : server_(server), ctx_(ctx), handle_(std::make_shared<CallHandle>()) {
    server_->in_flight_.fetch_add(1);
    handle_->ctx = ctx;
    grpc::Status refused = Admit();
    if (!refused.ok()) {
      Finish(refused);
      return;
    }
    if (entry_->client_stream) server_->Track(handle_, true);
    CallInfo info{ctx->method(), ctx->peer(), DeadlineOf(ctx)};
    const int64_t max = entry_->options.max_request_bytes > 0
                            ? entry_->options.max_request_bytes
                            : server_->options_.max_control_message_bytes;
    logic_ = entry_->make(info, max);
    std::weak_ptr<WakeState> weak = wake_state_;
    logic_->wake = [weak] {
      if (std::shared_ptr<WakeState> w = weak.lock()) w->Wake();
    };
    wake_state_->call = this;
    if (entry_->client_stream) {
      absl::MutexLock lock(&stream_mu_);
      reading_ = true;
    }
    Read();
  }

  void OnReadDone(bool ok) override {
    MarkActivity(false);
    if (entry_->client_stream) return StreamReadDone(ok);
    if (!ok) {
      if (ctx_->IsCancelled()) return Cancelled();
      return Run([this] { return logic_->OnHalfClose(); });
    }
    Run([this] { return logic_->OnMessage(&read_buf_); });
  }

  void OnWriteDone(bool ok) override {
    if (!ok) return Cancelled();
    Run([this] { return logic_->OnWritten(); });
  }

  void OnCancel() override {
    cancelled_.store(true);
    if (wake_state_ == nullptr) return;
    bool drive = false;
    {
      absl::MutexLock lock(&wake_state_->mu);
      if (wake_state_->waiting) {
        wake_state_->waiting = false;
        drive = true;
      }
    }
    // Waiting: nobody else will act, so finish the call, but from the pool (see above).
    if (drive) server_->pool()->Post([this] { Cancelled(); });
  }

  void OnDone() override {
    {
      std::lock_guard<std::recursive_mutex> lock(handle_->mu);
      handle_->ctx = nullptr;
    }
    if (entry_ != nullptr && entry_->client_stream) server_->Track(handle_, false);
    if (wake_state_) {
      absl::MutexLock lock(&wake_state_->mu);
      wake_state_->call = nullptr;
    }
    server_->in_flight_.fetch_sub(1);
    delete this;
  }

 private:
  struct WakeState {
    absl::Mutex mu;
    Call* call ABSL_GUARDED_BY(mu) = nullptr;
    bool waiting ABSL_GUARDED_BY(mu) = false;
    bool pending ABSL_GUARDED_BY(mu) = false;  // woken before it started waiting
    void Wake() {
      Call* c = nullptr;
      {
        absl::MutexLock lock(&mu);
        if (call == nullptr) return;
        if (!waiting) {
          pending = true;
          return;
        }
        waiting = false;
        c = call;
      }
      // Never run the logic on the waker's thread: it may hold its own locks.
      c->server_->pool()->Post([c] { c->Run([c] { return c->logic_->OnWake(); }, true); });
    }
  };

  grpc::Status Admit() {
    if (server_->in_flight_.load() > server_->options_.max_pending_calls) {
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                          "too many calls in flight on this server; retry later");
    }
    const auto& md = ctx_->client_metadata();
    auto it = md.find(kAuthorizationKey);
    if (it == md.end() ||
        !server_->tokens_->Matches(absl::string_view(it->second.data(), it->second.size()))) {
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                          "missing or invalid bearer token (metadata \"authorization: Bearer "
                          "<token>\")");
    }
    entry_ = server_->registry_.Find(ctx_->method());
    if (entry_ == nullptr) {
      return grpc::Status(grpc::StatusCode::UNIMPLEMENTED,
                          absl::StrCat("no method ", ctx_->method(), " on this server"));
    }
    return grpc::Status::OK;
  }

  void Read() {
    MarkActivity(true);
    StartRead(&read_buf_);
  }

  void MarkActivity(bool reading) {
    std::lock_guard<std::recursive_mutex> lock(handle_->mu);
    handle_->last_activity = absl::Now();
    handle_->reading = reading;
  }

  // Runs one logic step here or on the pool, then applies what it returned.
  void Run(std::function<internal::Step()> fn, bool on_pool_already = false) {
    if (entry_->options.blocking == Blocking::kYes && !on_pool_already) {
      server_->pool()->Post([this, fn = std::move(fn)] { Apply(fn()); });
      return;
    }
    Apply(fn());
  }

  void Cancelled() {
    logic_->OnCancel();
    finished_.store(true);
    Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the call was cancelled"));
  }

  // Client streams read ahead: while the logic works on one message (on the pool: hashing,
  // writing), up to kReadAhead more are received, so the transfer is not a ping-pong of one
  // chunk at a time. Memory stays bounded by kReadAhead messages per stream.
  static constexpr size_t kReadAhead = 4;

  void StreamReadDone(bool ok) {
    bool read_more = false, work = false;
    {
      absl::MutexLock lock(&stream_mu_);
      if (finished_.load()) return;
      reading_ = false;
      if (ok) {
        inbox_.push_back(std::move(read_buf_));
        read_buf_ = grpc::ByteBuffer();
        if (inbox_.size() < kReadAhead) read_more = reading_ = true;
      } else {
        eof_ = true;
      }
      if (!working_) work = working_ = true;
    }
    if (read_more) Read();
    if (!work) return;
    if (entry_->options.blocking == Blocking::kYes) {
      server_->pool()->Post([this] { Work(); });
    } else {
      Work();
    }
  }

  void Work() {
    for (;;) {
      grpc::ByteBuffer msg;
      bool have = false, eof = false, read_more = false;
      {
        absl::MutexLock lock(&stream_mu_);
        if (!inbox_.empty()) {
          msg = std::move(inbox_.front());
          inbox_.pop_front();
          have = true;
          if (!reading_ && !eof_ && inbox_.size() < kReadAhead) read_more = reading_ = true;
        } else if (eof_) {
          eof = true;
        } else {
          working_ = false;
          return;
        }
      }
      if (read_more) Read();
      if (cancelled_.load() || (eof && ctx_->IsCancelled())) {
        if (finished_.exchange(true)) return;
        logic_->OnCancel();
        Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the call was cancelled"));
        return;
      }
      internal::Step step = have ? logic_->OnMessage(&msg) : logic_->OnHalfClose();
      if (have && step.kind == internal::Step::kRead) continue;
      // An error, or the end: a read may still be outstanding; it completes (not ok) after
      // the Finish and is ignored.
      finished_.store(true);
      if (step.kind == internal::Step::kWriteAndFinish) {
        write_buf_ = std::move(step.bytes);
        StartWriteAndFinish(&write_buf_, grpc::WriteOptions(), step.status);
      } else {
        Finish(step.kind == internal::Step::kFinish
                   ? step.status
                   : grpc::Status(grpc::StatusCode::INTERNAL, "unexpected step"));
      }
      return;
    }
  }

  void Apply(internal::Step step) {
    if (cancelled_.load() && step.kind != internal::Step::kFinish) return Cancelled();
    switch (step.kind) {
      case internal::Step::kRead:
        return Read();
      case internal::Step::kWrite:
        write_buf_ = std::move(step.bytes);
        return StartWrite(&write_buf_);
      case internal::Step::kWriteAndFinish:
        write_buf_ = std::move(step.bytes);
        return StartWriteAndFinish(&write_buf_, grpc::WriteOptions(), step.status);
      case internal::Step::kFinish:
        return Finish(step.status);
      case internal::Step::kWait: {
        bool resume = false;
        {
          absl::MutexLock lock(&wake_state_->mu);
          if (wake_state_->pending) {
            wake_state_->pending = false;
            resume = true;
          } else {
            wake_state_->waiting = true;
          }
        }
        if (resume) {
          server_->pool()->Post([this] { Run([this] { return logic_->OnWake(); }, true); });
          return;
        }
        // Cancelled while the logic ran: OnCancel saw no waiting call and left it to us.
        if (cancelled_.load()) {
          bool drive = false;
          {
            absl::MutexLock lock(&wake_state_->mu);
            if (wake_state_->waiting) {
              wake_state_->waiting = false;
              drive = true;
            }
          }
          if (drive) Cancelled();
        }
        return;
      }
    }
  }

  RpcServer* server_;
  grpc::GenericCallbackServerContext* ctx_;
  std::shared_ptr<CallHandle> handle_;
  const internal::MethodEntry* entry_ = nullptr;
  std::unique_ptr<internal::CallLogic> logic_;
  std::shared_ptr<WakeState> wake_state_ = std::make_shared<WakeState>();
  std::atomic<bool> cancelled_{false};
  grpc::ByteBuffer read_buf_, write_buf_;
  // Client streams only (read-ahead).
  absl::Mutex stream_mu_;
  std::deque<grpc::ByteBuffer> inbox_ ABSL_GUARDED_BY(stream_mu_);
  bool reading_ ABSL_GUARDED_BY(stream_mu_) = false;
  bool working_ ABSL_GUARDED_BY(stream_mu_) = false;
  bool eof_ ABSL_GUARDED_BY(stream_mu_) = false;
  std::atomic<bool> finished_{false};
};

class RpcServer::Generic : public grpc::CallbackGenericService {
 public:
  explicit Generic(RpcServer* server) : server_(server) {}
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override {
    return new Call(server_, ctx);
  }

 private:
  RpcServer* server_;
};

// ---- RpcServer -----------------------------------------------------------------------------

RpcServer::RpcServer(Options options)
    : options_(std::move(options)),
      tokens_(std::make_unique<TokenChecker>(options_.token)),
      pool_(std::make_unique<WorkerPool>(options_.worker_threads)) {}

RpcServer::~RpcServer() { Shutdown(absl::ZeroDuration()); }

absl::Status RpcServer::Start() {
  if (absl::Status s = registry_.Check(); !s.ok()) return s;
  if (options_.token.size() < kMinTokenBytes) {
    return absl::InvalidArgumentError("RpcServer: the token is too short");
  }
  generic_ = std::make_unique<Generic>(this);
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options_.address,
                           options_.credentials ? options_.credentials
                                                : grpc::InsecureServerCredentials(),
                           &port_);
  builder.RegisterCallbackGenericService(generic_.get());
  builder.SetMaxReceiveMessageSize(static_cast<int>(options_.max_message_bytes));
  builder.SetMaxSendMessageSize(static_cast<int>(options_.max_message_bytes));
  // Dead clients' connections go within a minute; clients may ping every 10 s.
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 30000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 5000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  // Bulk streams: let a client have several 1 MiB chunks in flight before the window update.
  builder.AddChannelArgument(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 8 << 20);
  server_ = builder.BuildAndStart();
  if (server_ == nullptr || port_ == 0) {
    server_.reset();
    return absl::FailedPreconditionError(absl::StrCat(
        "cannot listen on ", options_.address,
        " (address in use, not an address of this machine, or a bad TLS key/certificate)"));
  }
  {
    absl::MutexLock lock(&mu_);
    stopping_ = false;
  }
  sweeper_ = std::thread([this] { SweepLoop(); });
  return absl::OkStatus();
}

void RpcServer::Shutdown(absl::Duration grace) {
  if (server_ == nullptr) return;
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    stop_cv_.SignalAll();
  }
  if (sweeper_.joinable()) sweeper_.join();
  server_->Shutdown(std::chrono::system_clock::now() + absl::ToChronoMilliseconds(grace));
  server_->Wait();
  server_.reset();
}

void RpcServer::Track(const std::shared_ptr<CallHandle>& handle, bool add) {
  absl::MutexLock lock(&mu_);
  if (add) {
    streams_.push_back(handle);
  } else {
    streams_.erase(std::remove(streams_.begin(), streams_.end(), handle), streams_.end());
  }
}

void RpcServer::SweepLoop() {
  for (;;) {
    std::vector<std::shared_ptr<CallHandle>> handles;
    {
      absl::MutexLock lock(&mu_);
      stop_cv_.WaitWithTimeout(&mu_, absl::Seconds(1));
      if (stopping_) return;
      handles = streams_;
    }
    const absl::Time now = absl::Now();
    for (const std::shared_ptr<CallHandle>& h : handles) {
      std::lock_guard<std::recursive_mutex> lock(h->mu);
      if (h->ctx != nullptr && h->reading &&
          now - h->last_activity > options_.stream_idle_timeout) {
        h->ctx->TryCancel();
      }
    }
  }
}

}  // namespace qtrain::ps
