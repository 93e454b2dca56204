// TcpCommunicator: ring set-up with a keyed handshake, a poll loop that sends and receives at
// once (with the timeout and the abort descriptor), and the ring collectives.
#include "distributed/tcp_communicator.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "ops/status_macros.h"

namespace qtrain {
namespace {

constexpr uint32_t kMagic = 0x4e525451;  // "QTRN"
constexpr size_t kKeyBytes = 32;
constexpr int64_t kPipelineChunk = 1 << 20;

struct Hello {
  uint32_t magic;
  int32_t rank;
  char key[kKeyBytes];
};

bool SplitHostPort(const std::string& address, std::string* host, int* port) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0) return false;
  *host = address.substr(0, colon);
  if (host->size() > 2 && host->front() == '[' && host->back() == ']') {
    *host = host->substr(1, host->size() - 2);
  }
  return absl::SimpleAtoi(address.substr(colon + 1), port) && *port > 0 && *port < 65536;
}

int MsLeft(absl::Time deadline) {
  const int64_t ms = absl::ToInt64Milliseconds(deadline - absl::Now());
  return static_cast<int>(std::clamp<int64_t>(ms, 0, 1000));
}

void Tune(int fd) {
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
  fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

// Non-blocking connect, retried while refused (the peer may be slow to start), until deadline.
int ConnectTo(const std::string& address, absl::Time deadline, std::string* error) {
  std::string host;
  int port = 0;
  if (!SplitHostPort(address, &host, &port)) {
    *error = absl::StrCat("bad address '", address, "'");
    return -1;
  }
  for (;;) {
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    addrinfo* res = nullptr;
    const int gai = getaddrinfo(host.c_str(), absl::StrCat(port).c_str(), &hints, &res);
    if (gai != 0) {
      *error = absl::StrCat("cannot resolve ", host, ": ", gai_strerror(gai));
    } else {
      for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
        const int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0) continue;
        int r = connect(fd, a->ai_addr, a->ai_addrlen);
        if (r != 0 && errno == EINPROGRESS) {
          pollfd p{fd, POLLOUT, 0};
          while ((r = poll(&p, 1, MsLeft(deadline))) == 0 && absl::Now() < deadline) {
          }
          int err = 0;
          socklen_t len = sizeof(err);
          if (r > 0 && getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) == 0 && err == 0) {
            r = 0;
          } else {
            errno = r > 0 ? err : ETIMEDOUT;
            r = -1;
          }
        }
        if (r == 0) {
          freeaddrinfo(res);
          Tune(fd);
          return fd;
        }
        *error = std::strerror(errno);
        close(fd);
      }
      freeaddrinfo(res);
    }
    if (absl::Now() + absl::Milliseconds(50) >= deadline) return -1;
    absl::SleepFor(absl::Milliseconds(50));
  }
}

// Blocking-with-deadline full transfers for the handshake.
bool Transfer(int fd, char* p, size_t n, bool write_side, absl::Time deadline) {
  size_t done = 0;
  while (done < n) {
    pollfd pf{fd, static_cast<short>(write_side ? POLLOUT : POLLIN), 0};
    const int r = poll(&pf, 1, MsLeft(deadline));
    if (r < 0 && errno != EINTR) return false;
    if (r <= 0) {
      if (absl::Now() >= deadline) return false;
      continue;
    }
    const ssize_t k = write_side ? send(fd, p + done, n - done, MSG_NOSIGNAL)
                                 : recv(fd, p + done, n - done, 0);
    if (k == 0) return false;
    if (k < 0) {
      if (errno == EAGAIN || errno == EINTR) continue;
      return false;
    }
    done += static_cast<size_t>(k);
  }
  return true;
}

bool SameKey(const char* a, const std::string& b) {
  unsigned char diff = 0;
  for (size_t i = 0; i < kKeyBytes; ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

int Mod(int a, int w) { return ((a % w) + w) % w; }

}  // namespace

// ---- TcpListener -----------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<TcpListener>> TcpListener::Bind(const std::string& host) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE;
  addrinfo* res = nullptr;
  const int gai = getaddrinfo(host.c_str(), "0", &hints, &res);
  if (gai != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cannot resolve the peer host '", host, "': ", gai_strerror(gai)));
  }
  std::string error = "no address";
  for (addrinfo* a = res; a != nullptr; a = a->ai_next) {
    const int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) continue;
    if (bind(fd, a->ai_addr, a->ai_addrlen) == 0 && listen(fd, 64) == 0) {
      sockaddr_storage ss{};
      socklen_t len = sizeof(ss);
      getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len);
      const int port = ss.ss_family == AF_INET6
                           ? ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port)
                           : ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
      freeaddrinfo(res);
      const std::string shown =
          host.find(':') != std::string::npos ? absl::StrCat("[", host, "]") : host;
      return std::unique_ptr<TcpListener>(new TcpListener(fd, shown, port));
    }
    error = std::strerror(errno);
    close(fd);
  }
  freeaddrinfo(res);
  return absl::UnavailableError(absl::StrCat("cannot listen on ", host, ": ", error));
}

TcpListener::~TcpListener() { close(fd_); }

std::string TcpListener::address() const { return absl::StrCat(host_, ":", port_); }

// ---- set-up ----------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<TcpCommunicator>> TcpCommunicator::Connect(
    std::unique_ptr<TcpListener> listener, int rank, std::vector<TcpPeer> peers,
    const std::string& session_key, absl::Duration timeout) {
  const int world = static_cast<int>(peers.size());
  QT_CHECK_ARG(world >= 1, "TcpCommunicator: no peers");
  QT_CHECK_ARG(rank >= 0 && rank < world, "TcpCommunicator: rank ", rank, " outside [0, ", world,
               ")");
  QT_CHECK_ARG(session_key.size() == kKeyBytes, "TcpCommunicator: the session key has ",
               session_key.size(), " bytes, not ", kKeyBytes);
  QT_CHECK_ARG(timeout > absl::ZeroDuration(), "TcpCommunicator: timeout must be > 0");
  std::unique_ptr<TcpCommunicator> c(new TcpCommunicator());
  c->rank_ = rank;
  c->world_ = world;
  c->peers_ = std::move(peers);
  c->timeout_ = timeout;
  c->abort_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  for (int r = 0; r < world; ++r) {
    if (c->peers_[r].host == c->peers_[rank].host) {
      if (r < rank) ++c->local_rank_;
      ++c->local_size_;
    }
  }
  --c->local_size_;  // counted itself once above as well
  if (world == 1) return c;

  const absl::Time deadline = absl::Now() + timeout;
  const int next = (rank + 1) % world, prev = Mod(rank - 1, world);
  std::string error;
  c->send_fd_ = ConnectTo(c->peers_[next].address, deadline, &error);
  if (c->send_fd_ < 0) {
    return absl::UnavailableError(absl::StrCat("rank ", rank, ": cannot connect to ", c->Who(next),
                                               " within ", absl::FormatDuration(timeout), ": ",
                                               error));
  }
  Hello hello{kMagic, rank, {}};
  std::memcpy(hello.key, session_key.data(), kKeyBytes);
  if (!Transfer(c->send_fd_, reinterpret_cast<char*>(&hello), sizeof(hello), true, deadline)) {
    return absl::UnavailableError(
        absl::StrCat("rank ", rank, ": the handshake with ", c->Who(next), " failed"));
  }
  // Accept the previous rank; anything else (a stale rank of another attempt, a scanner) is
  // dropped.
  while (c->recv_fd_ < 0) {
    pollfd p{listener->fd(), POLLIN, 0};
    const int r = poll(&p, 1, MsLeft(deadline));
    if (r < 0 && errno != EINTR) return absl::InternalError(std::strerror(errno));
    if (r <= 0) {
      if (absl::Now() >= deadline) {
        return absl::DeadlineExceededError(absl::StrCat(
            "rank ", rank, ": ", c->Who(prev), " did not connect within ",
            absl::FormatDuration(timeout)));
      }
      continue;
    }
    const int fd = accept4(listener->fd(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) continue;
    Hello got{};
    const absl::Time hello_deadline = std::min(deadline, absl::Now() + absl::Seconds(5));
    if (Transfer(fd, reinterpret_cast<char*>(&got), sizeof(got), false, hello_deadline) &&
        got.magic == kMagic && got.rank == prev && SameKey(got.key, session_key)) {
      Tune(fd);
      c->recv_fd_ = fd;
    } else {
      close(fd);
    }
  }
  return c;
}

TcpCommunicator::~TcpCommunicator() {
  if (send_fd_ >= 0) close(send_fd_);
  if (recv_fd_ >= 0) close(recv_fd_);
  if (abort_fd_ >= 0) close(abort_fd_);
}

std::string TcpCommunicator::Who(int r) const {
  const TcpPeer& p = peers_[r];
  return absl::StrCat("rank ", r, " (host ", p.host, ", pid ", p.pid, ", ", p.address, ")");
}

void TcpCommunicator::SetActivity(const std::string& activity) {
  {
    absl::MutexLock lock(&mu_);
    activity_ = activity;
  }
  if (activity_listener_) activity_listener_(activity);
}

void TcpCommunicator::SetActivityListener(std::function<void(const std::string&)> listener) {
  activity_listener_ = std::move(listener);
}

void TcpCommunicator::Abort(const std::string& reason) {
  {
    absl::MutexLock lock(&mu_);
    if (!abort_reason_.empty()) return;
    abort_reason_ = reason;
  }
  const uint64_t one = 1;
  (void)!write(abort_fd_, &one, sizeof(one));
}

absl::Status TcpCommunicator::Failure(const std::string& what, const std::string& detail,
                                      int peer) const {
  absl::MutexLock lock(&mu_);
  return absl::UnavailableError(absl::StrCat(
      what, activity_.empty() ? "" : absl::StrCat(" (", activity_, ")"),
      ": ", Who(peer), " ", detail));
}

// ---- the transfer loop -----------------------------------------------------------------------

absl::Status TcpCommunicator::Exchange(const void* send, size_t send_n, void* recv,
                                       size_t recv_n, const std::string& what) {
  {
    absl::MutexLock lock(&mu_);
    if (!abort_reason_.empty()) return absl::AbortedError(abort_reason_);
  }
  const char* sp = static_cast<const char*>(send);
  char* rp = static_cast<char*>(recv);
  size_t sent = 0, got = 0;
  absl::Time progress = absl::Now();
  const int next = (rank_ + 1) % world_, prev = Mod(rank_ - 1, world_);
  while (sent < send_n || got < recv_n) {
    pollfd fds[3];
    int k = 0, si = -1, ri = -1;
    if (sent < send_n) {
      si = k;
      fds[k++] = {send_fd_, POLLOUT, 0};
    }
    if (got < recv_n) {
      ri = k;
      fds[k++] = {recv_fd_, POLLIN, 0};
    }
    const int ai = k;
    fds[k++] = {abort_fd_, POLLIN, 0};
    const int r = poll(fds, k, MsLeft(progress + timeout_));
    if (r < 0) {
      if (errno == EINTR) continue;
      return absl::InternalError(absl::StrCat("poll: ", std::strerror(errno)));
    }
    if (fds[ai].revents & POLLIN) {
      absl::MutexLock lock(&mu_);
      return absl::AbortedError(abort_reason_);
    }
    if (r == 0) {
      if (absl::Now() - progress >= timeout_) {
        absl::Status s = Failure(what, absl::StrCat("made no progress within distributed.timeout_s = ",
                                                    absl::FormatDuration(timeout_),
                                                    ": it has died or hangs; stopping the job"),
                                 got < recv_n ? prev : next);
        return absl::DeadlineExceededError(s.message());
      }
      continue;
    }
    if (si >= 0 && fds[si].revents) {
      const ssize_t n = ::send(send_fd_, sp + sent, std::min<size_t>(send_n - sent, 4 << 20),
                               MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        sent += static_cast<size_t>(n);
        progress = absl::Now();
      } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
        return Failure(what, absl::StrCat("is unreachable (", std::strerror(errno),
                                          "): it has died or stopped"),
                       next);
      }
    }
    if (ri >= 0 && fds[ri].revents) {
      const ssize_t n = ::recv(recv_fd_, rp + got, recv_n - got, MSG_DONTWAIT);
      if (n > 0) {
        got += static_cast<size_t>(n);
        progress = absl::Now();
      } else if (n == 0) {
        return Failure(what, "closed its connection: it has died or stopped", prev);
      } else if (errno != EAGAIN && errno != EINTR) {
        return Failure(what, absl::StrCat("is unreachable (", std::strerror(errno),
                                          "): it has died or stopped"),
                       prev);
      }
    }
  }
  return absl::OkStatus();
}

// ---- collectives -----------------------------------------------------------------------------

template <typename T>
absl::Status TcpCommunicator::ReduceScatterInPlace(T* data, const std::vector<int64_t>& begin,
                                                   const std::string& what) {
  int64_t largest = 0;
  for (int i = 0; i < world_; ++i) largest = std::max(largest, begin[i + 1] - begin[i]);
  scratch_.resize(static_cast<size_t>(largest) * sizeof(T));
  T* in = reinterpret_cast<T*>(scratch_.data());
  for (int s = 0; s + 1 < world_; ++s) {
    const int si = Mod(rank_ - s - 1, world_), ri = Mod(rank_ - s - 2, world_);
    const int64_t rn = begin[ri + 1] - begin[ri];
    RETURN_IF_ERROR(Exchange(data + begin[si], (begin[si + 1] - begin[si]) * sizeof(T), in,
                             rn * sizeof(T), what));
    T* dst = data + begin[ri];
    for (int64_t i = 0; i < rn; ++i) dst[i] = dst[i] + in[i];
  }
  return absl::OkStatus();
}

absl::Status TcpCommunicator::AllGatherInPlace(char* data, const std::vector<int64_t>& begin,
                                               const std::string& what) {
  for (int s = 0; s + 1 < world_; ++s) {
    const int si = Mod(rank_ - s, world_), ri = Mod(rank_ - s - 1, world_);
    RETURN_IF_ERROR(Exchange(data + begin[si], begin[si + 1] - begin[si], data + begin[ri],
                             begin[ri + 1] - begin[ri], what));
  }
  return absl::OkStatus();
}

template <typename T>
absl::Status TcpCommunicator::AllReduceSumImpl(T* data, int64_t n, const char* type) {
  QT_CHECK_ARG(n >= 0 && (n == 0 || data != nullptr), "AllReduceSum: bad buffer (n=", n, ")");
  if (world_ == 1 || n == 0) return absl::OkStatus();
  const std::string what = absl::StrCat("TCP all-reduce of ", n, " ", type);
  std::vector<int64_t> begin(world_ + 1), bytes(world_ + 1);
  for (int i = 0; i <= world_; ++i) {
    begin[i] = n * i / world_;
    bytes[i] = begin[i] * static_cast<int64_t>(sizeof(T));
  }
  RETURN_IF_ERROR(ReduceScatterInPlace(data, begin, what));
  return AllGatherInPlace(reinterpret_cast<char*>(data), bytes, what);
}

absl::Status TcpCommunicator::AllReduceSum(float* data, int64_t n) {
  return AllReduceSumImpl(data, n, "floats");
}

absl::Status TcpCommunicator::AllReduceSum(double* data, int64_t n) {
  return AllReduceSumImpl(data, n, "doubles");
}

absl::Status TcpCommunicator::ReduceScatterSum(const float* send, float* recv, int64_t count) {
  QT_CHECK_ARG(count >= 0, "ReduceScatterSum: negative count ", count);
  QT_CHECK_ARG(send != recv || count == 0, "ReduceScatterSum: send and recv must differ");
  if (world_ == 1) {
    if (count > 0) std::memmove(recv, send, count * sizeof(float));
    return absl::OkStatus();
  }
  std::vector<float> work(send, send + count * world_);
  std::vector<int64_t> begin(world_ + 1);
  for (int i = 0; i <= world_; ++i) begin[i] = count * i;
  RETURN_IF_ERROR(ReduceScatterInPlace(
      work.data(), begin, absl::StrCat("TCP reduce-scatter of ", count, " floats per rank")));
  std::memcpy(recv, work.data() + count * rank_, count * sizeof(float));
  return absl::OkStatus();
}

absl::Status TcpCommunicator::AllGather(const float* send, float* recv, int64_t count) {
  QT_CHECK_ARG(count >= 0, "AllGather: negative count ", count);
  return AllGatherBytes(send, recv, count * static_cast<int64_t>(sizeof(float)));
}

absl::Status TcpCommunicator::AllGatherBytes(const void* send, void* recv, int64_t bytes) {
  QT_CHECK_ARG(bytes >= 0, "AllGatherBytes: negative size ", bytes);
  char* out = static_cast<char*>(recv);
  if (bytes > 0 && send != out + bytes * rank_) std::memmove(out + bytes * rank_, send, bytes);
  if (world_ == 1) return absl::OkStatus();
  std::vector<int64_t> begin(world_ + 1);
  for (int i = 0; i <= world_; ++i) begin[i] = bytes * i;
  return AllGatherInPlace(out, begin, absl::StrCat("TCP all-gather of ", bytes, " bytes per rank"));
}

absl::Status TcpCommunicator::Broadcast(void* data, int64_t bytes, int root) {
  QT_CHECK_ARG(root >= 0 && root < world_, "Broadcast: root ", root, " outside [0, ", world_, ")");
  QT_CHECK_ARG(bytes >= 0 && (bytes == 0 || data != nullptr), "Broadcast: bad buffer");
  if (world_ == 1 || bytes == 0) return absl::OkStatus();
  char* p = static_cast<char*>(data);
  const std::string what = absl::StrCat("TCP broadcast of ", bytes, " bytes from rank ", root);
  const bool forwards = (rank_ + 1) % world_ != root;
  auto len = [&](int64_t off) { return std::min(kPipelineChunk, bytes - off); };
  if (rank_ == root) return Exchange(p, bytes, nullptr, 0, what);
  // Receive chunk k+1 while forwarding chunk k.
  RETURN_IF_ERROR(Exchange(nullptr, 0, p, len(0), what));
  for (int64_t off = 0; off < bytes; off += kPipelineChunk) {
    const int64_t next_off = off + kPipelineChunk;
    const int64_t next_len = next_off < bytes ? len(next_off) : 0;
    RETURN_IF_ERROR(Exchange(p + off, forwards ? len(off) : 0, p + next_off, next_len, what));
  }
  return absl::OkStatus();
}

absl::Status TcpCommunicator::Barrier() {
  char mine = 1;
  std::vector<char> all(world_);
  return AllGatherBytes(&mine, all.data(), 1);
}

}  // namespace qtrain
