// JoinThroughService: launcher view, peer address, worker session, rendezvous, TCP ring.
#include "distributed/service_context.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "distributed/launch_env.h"
#include "distributed/ps/auth.h"
#include "distributed/ps/worker_session.h"
#include "distributed/tcp_communicator.h"
#include "ops/status_macros.h"

namespace qtrain {
namespace {

int EnvInt(const char* name, int fallback) {
  const char* v = std::getenv(name);
  int out = 0;
  return v != nullptr && absl::SimpleAtoi(v, &out) ? out : fallback;
}

std::string HostName() {
  char host[256] = {0};
  if (gethostname(host, sizeof(host) - 1) != 0) return "?";
  return host;
}

// This machine's address on the route to `address` (connecting a UDP socket sends nothing):
// the interface the peers can reach us on, in the usual case that they reach the service too.
std::string RouteAddressTo(const std::string& address) {
  const size_t colon = address.rfind(':');
  std::string host = address.substr(0, colon);
  if (host.size() > 2 && host.front() == '[') host = host.substr(1, host.size() - 2);
  addrinfo hints{};
  hints.ai_socktype = SOCK_DGRAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), address.substr(colon + 1).c_str(), &hints, &res) != 0) {
    return "127.0.0.1";
  }
  std::string out = "127.0.0.1";
  const int fd = socket(res->ai_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd >= 0 && connect(fd, res->ai_addr, res->ai_addrlen) == 0) {
    sockaddr_storage ss{};
    socklen_t len = sizeof(ss);
    char text[INET6_ADDRSTRLEN] = {0};
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) == 0) {
      const void* a = ss.ss_family == AF_INET6
                          ? static_cast<const void*>(&reinterpret_cast<sockaddr_in6*>(&ss)->sin6_addr)
                          : static_cast<const void*>(&reinterpret_cast<sockaddr_in*>(&ss)->sin_addr);
      if (inet_ntop(ss.ss_family, a, text, sizeof(text)) != nullptr) out = text;
    }
  }
  if (fd >= 0) close(fd);
  freeaddrinfo(res);
  return out;
}

// Where a stop order from the service goes: the ring, once it exists.
class StopTarget {
 public:
  void Stop(const std::string& reason) {
    absl::MutexLock lock(&mu_);
    if (comm_ != nullptr) {
      comm_->Abort(reason);
    } else {
      pending_ = reason;
    }
  }
  void Set(TcpCommunicator* comm) {
    absl::MutexLock lock(&mu_);
    comm_ = comm;
    if (comm_ != nullptr && !pending_.empty()) comm_->Abort(pending_);
  }

 private:
  absl::Mutex mu_;
  TcpCommunicator* comm_ ABSL_GUARDED_BY(mu_) = nullptr;
  std::string pending_ ABSL_GUARDED_BY(mu_);
};

class SessionMembership : public DistributedContext::Membership {
 public:
  SessionMembership(std::unique_ptr<ps::WorkerSession> session, std::shared_ptr<StopTarget> target)
      : session_(std::move(session)), target_(std::move(target)) {}
  ~SessionMembership() override {
    session_.reset();  // joins the heartbeat thread: no stop order can follow
    target_->Set(nullptr);
  }
  void Finish(const absl::Status& status) override { session_->Finish(status); }

 private:
  std::unique_ptr<ps::WorkerSession> session_;
  std::shared_ptr<StopTarget> target_;
};

}  // namespace

std::string ServiceJobId(const JobSpec& spec) {
  return spec.parameter_service().job_id().empty() ? spec.name() : spec.parameter_service().job_id();
}

absl::StatusOr<ps::ClientOptions> ServiceClientOptions(const JobSpec& spec,
                                                       const std::string& address) {
  const ParameterServiceSpec& p = spec.parameter_service();
  ps::ClientOptions o;
  o.address = address;
  absl::StatusOr<std::string> token = ps::ResolveClientToken(p.token_file());
  if (!token.ok()) {
    return absl::Status(token.status().code(),
                        absl::StrCat("parameter service at ", address, ": ",
                                     token.status().message()));
  }
  o.token = *token;
  o.tls_ca_file = p.tls_ca_file();
  o.tls_cert_file = p.tls_cert_file();
  o.tls_key_file = p.tls_key_file();
  if (p.deadline_ms() > 0) o.deadline = absl::Milliseconds(p.deadline_ms());
  return o;
}

absl::StatusOr<std::unique_ptr<DistributedContext>> JoinThroughService(
    const JobSpec& spec, const ServiceLaunch& launch) {
  const DistributedSpec& d = spec.distributed();
  const std::string& coordinator = d.coordinator();
  QT_CHECK_ARG(!coordinator.empty(), "JoinThroughService: the job has no distributed.coordinator");
  ASSIGN_OR_RETURN(ps::ClientOptions options, ServiceClientOptions(spec, coordinator));
  ASSIGN_OR_RETURN(std::unique_ptr<ps::PsClient> made, ps::PsClient::Create(options));
  std::shared_ptr<ps::PsClient> client = std::move(made);

  const LaunchEnv env = DetectLaunchEnv();
  const int rank =
      launch.rank >= 0 ? launch.rank : EnvInt("QTRAIN_RANK", env.launcher.empty() ? -1 : env.rank);
  const int world = launch.world_size > 0
                        ? launch.world_size
                        : EnvInt("QTRAIN_WORLD_SIZE", env.launcher.empty() ? 0 : env.world_size);
  if (world <= 0) {
    return absl::InvalidArgumentError(
        "distributed.coordinator: how many ranks the job has is unknown: start each rank with "
        "--world_size=N (or QTRAIN_WORLD_SIZE=N, or under srun / mpirun, which say it)");
  }
  const char* peer_env = std::getenv("QTRAIN_PEER_HOST");
  const std::string peer_host =
      peer_env != nullptr && *peer_env ? peer_env : RouteAddressTo(coordinator);
  ASSIGN_OR_RETURN(std::unique_ptr<TcpListener> listener, TcpListener::Bind(peer_host));
  ASSIGN_OR_RETURN(uint64_t binary, ExecutableHash());

  ps::WorkerOptions w;
  w.job_id = ServiceJobId(spec);
  w.rank = rank;
  w.world_size = world;
  w.host = HostName();
  w.peer_address = listener->address();
  w.binary_hash = absl::StrFormat("%016x", binary);
  w.spec_hash = absl::StrFormat("%016x", launch.spec_hash);
  w.heartbeat_timeout = absl::Milliseconds(spec.parameter_service().heartbeat_timeout_ms());
  w.heartbeat_interval = absl::Milliseconds(spec.parameter_service().heartbeat_ms());
  auto target = std::make_shared<StopTarget>();
  absl::StatusOr<std::unique_ptr<ps::WorkerSession>> session = ps::WorkerSession::Join(
      client, w, [target](const std::string& reason) { target->Stop(reason); });
  if (!session.ok()) {
    return absl::Status(session.status().code(),
                        absl::StrCat("joining job ", w.job_id, ": ", session.status().message()));
  }
  auto fail = [&](const absl::Status& s) {
    (*session)->Finish(s);
    return s;
  };
  const absl::Duration timeout = absl::Seconds(d.timeout_s() > 0 ? d.timeout_s() : kDefaultTimeoutS);
  absl::StatusOr<ps::RendezvousResponse> rdv = (*session)->Rendezvous("", timeout);
  if (!rdv.ok()) {
    return fail(absl::Status(rdv.status().code(),
                             absl::StrCat("rank ", (*session)->rank(), " of job ", w.job_id,
                                          ": rendezvous: ", rdv.status().message())));
  }
  std::vector<TcpPeer> peers(rdv->world_size());
  for (const ps::Peer& p : rdv->peers()) {
    if (p.rank() < 0 || p.rank() >= rdv->world_size()) {
      return fail(absl::InternalError("the rendezvous named a rank outside the world"));
    }
    peers[p.rank()] = {p.rank(), p.host(), p.address(), p.pid()};
  }
  absl::StatusOr<std::unique_ptr<TcpCommunicator>> comm = TcpCommunicator::Connect(
      std::move(listener), rdv->rank(), std::move(peers), rdv->session_key(), timeout);
  if (!comm.ok()) return fail(comm.status());
  TcpCommunicator* raw = comm->get();
  ps::WorkerSession* s = session->get();
  raw->SetActivityListener([s](const std::string& activity) {
    int64_t step = 0;
    if (absl::StartsWith(activity, "step ") && absl::SimpleAtoi(activity.substr(5), &step)) {
      s->SetStep(step);
    }
  });
  absl::StatusOr<std::unique_ptr<DistributedContext>> ctx =
      DistributedContext::Wrap(*std::move(comm), d);
  if (!ctx.ok()) return fail(ctx.status());
  target->Set(raw);
  (*ctx)->SetMembership(std::make_unique<SessionMembership>(*std::move(session), target));
  return ctx;
}

}  // namespace qtrain
