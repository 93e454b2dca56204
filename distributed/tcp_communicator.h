// TcpCommunicator: the Communicator of CPU ranks that met through the parameter service
// instead of MPI. The ranks form a ring over TCP (each sends to rank+1 and receives from
// rank-1): all-reduce is a ring reduce-scatter then a ring all-gather (each element summed in a
// fixed order, so runs are reproducible; with 2 ranks the sums equal MPI's bit for bit),
// broadcast is a pipeline along the ring. Peers prove they belong to the job with the
// rendezvous's session key. A peer that dies is an error at once (its connection closes); one
// that hangs is an error after `timeout` without progress; Abort (the service telling this rank
// to stop) fails the current and every later call with the service's reason.
#ifndef QTRAIN_DISTRIBUTED_TCP_COMMUNICATOR_H_
#define QTRAIN_DISTRIBUTED_TCP_COMMUNICATOR_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "distributed/communicator.h"

namespace qtrain {

// A listening socket bound before the rendezvous, so its address can be announced.
class TcpListener {
 public:
  // `host`: an address of this machine to listen on (an IP or a name); the port is picked.
  static absl::StatusOr<std::unique_ptr<TcpListener>> Bind(const std::string& host);
  ~TcpListener();
  std::string address() const;  // host:port
  int fd() const { return fd_; }

 private:
  TcpListener(int fd, std::string host, int port) : fd_(fd), host_(std::move(host)), port_(port) {}
  int fd_;
  std::string host_;
  int port_;
};

struct TcpPeer {
  int rank = 0;
  std::string host;     // the machine's name (for messages and local ranks)
  std::string address;  // host:port of its listener
  int64_t pid = 0;
};

class TcpCommunicator : public Communicator {
 public:
  // Collective: connects to rank+1 and accepts rank-1 (refusing connections without the
  // session key), within `timeout`. `peers` are indexed by rank.
  static absl::StatusOr<std::unique_ptr<TcpCommunicator>> Connect(
      std::unique_ptr<TcpListener> listener, int rank, std::vector<TcpPeer> peers,
      const std::string& session_key, absl::Duration timeout);
  ~TcpCommunicator() override;

  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  int local_rank() const override { return local_rank_; }
  int local_size() const override { return local_size_; }
  std::string backend() const override { return "TCP"; }

  absl::Status AllReduceSum(float* data, int64_t n) override;
  absl::Status AllReduceSum(double* data, int64_t n) override;
  absl::Status ReduceScatterSum(const float* send, float* recv, int64_t count) override;
  absl::Status AllGather(const float* send, float* recv, int64_t count) override;
  absl::Status AllGatherBytes(const void* send, void* recv, int64_t bytes) override;
  absl::Status Broadcast(void* data, int64_t bytes, int root) override;
  absl::Status Barrier() override;
  void SetActivity(const std::string& activity) override;

  // Any thread: the current and every later collective fails with `reason`.
  void Abort(const std::string& reason);
  // Called with each SetActivity (e.g. to report the step in heartbeats).
  void SetActivityListener(std::function<void(const std::string&)> listener);

 private:
  TcpCommunicator() = default;
  // Sends `send_n` bytes to the next rank while receiving `recv_n` from the previous one.
  absl::Status Exchange(const void* send, size_t send_n, void* recv, size_t recv_n,
                        const std::string& what);
  absl::Status Failure(const std::string& what, const std::string& detail, int peer) const;
  std::string Who(int rank) const;
  template <typename T>
  absl::Status ReduceScatterInPlace(T* data, const std::vector<int64_t>& begin,
                                    const std::string& what);
  absl::Status AllGatherInPlace(char* data, const std::vector<int64_t>& begin,
                                const std::string& what);
  template <typename T>
  absl::Status AllReduceSumImpl(T* data, int64_t n, const char* type);

  int rank_ = 0, world_ = 1, local_rank_ = 0, local_size_ = 1;
  std::vector<TcpPeer> peers_;
  int send_fd_ = -1, recv_fd_ = -1, abort_fd_ = -1;
  absl::Duration timeout_;
  std::vector<char> scratch_;
  mutable absl::Mutex mu_;
  std::string activity_ ABSL_GUARDED_BY(mu_);
  std::string abort_reason_ ABSL_GUARDED_BY(mu_);
  std::function<void(const std::string&)> activity_listener_;
};

}  // namespace qtrain

#endif  // QTRAIN_DISTRIBUTED_TCP_COMMUNICATOR_H_
