// PsClient: the parameter service from a trainer, a CLI or another server. Every call has a
// deadline; idempotent calls are retried with exponential backoff (and jitter) while the
// server is unavailable, within that deadline; errors name the server's address, the method,
// and the attempts made, so a down server is a clear message, never a hang.
#ifndef QTRAIN_DISTRIBUTED_PS_CLIENT_H_
#define QTRAIN_DISTRIBUTED_PS_CLIENT_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "distributed/proto/param_service.grpc.pb.h"
#include "grpcpp/channel.h"
#include "grpcpp/client_context.h"

namespace qtrain::ps {

struct ClientOptions {
  std::string address;  // host:port
  std::string token;    // the bearer token itself (see LoadToken / ResolveClientToken)
  // TLS: verify the server against ca_file (empty: plaintext); present a client certificate
  // when cert_file/key_file are set; tls_server_name overrides the name checked.
  std::string tls_ca_file, tls_cert_file, tls_key_file, tls_server_name;
  // The whole budget of one unary call, retries included.
  absl::Duration deadline = absl::Seconds(10);
  int max_attempts = 5;
  absl::Duration initial_backoff = absl::Milliseconds(50);
  absl::Duration max_backoff = absl::Seconds(2);
  // Bulk transfers get deadline + bytes / this rate.
  double min_transfer_bytes_per_s = 10e6;
  int64_t chunk_bytes = 1 << 20;
};

// A tensor to push: its spec and bytes (caller-owned for the duration of the call).
struct TensorIn {
  TensorSpec spec;
  absl::string_view data;
};

// A tensor set pulled whole.
struct TensorSetData {
  TensorSetInfo info;
  std::vector<std::string> data;  // bytes of info.tensors(i)
};

class PsClient {
 public:
  static absl::StatusOr<std::unique_ptr<PsClient>> Create(ClientOptions options);

  const std::string& address() const { return options_.address; }
  const ClientOptions& options() const { return options_; }

  absl::StatusOr<StatusResponse> Status(const std::string& job_id = "");
  absl::StatusOr<RegisterJobResponse> RegisterJob(const std::string& job_id,
                                                  const std::string& spec_text,
                                                  bool replace = false);
  // Checks the text against its SHA-256 (DataLoss on a mismatch).
  absl::StatusOr<GetJobSpecResponse> GetJobSpec(const std::string& job_id);

  absl::StatusOr<RegisterWorkerResponse> RegisterWorker(const RegisterWorkerRequest& request);
  // One attempt within `deadline` (the caller heartbeats again soon anyway).
  absl::StatusOr<HeartbeatResponse> Heartbeat(const HeartbeatRequest& request,
                                              absl::Duration deadline);
  absl::Status Leave(const LeaveRequest& request);
  absl::StatusOr<ListWorkersResponse> ListWorkers(const std::string& job_id);
  // Waits up to `timeout` for every rank.
  absl::StatusOr<RendezvousResponse> Rendezvous(const RendezvousRequest& request,
                                                absl::Duration timeout);

  absl::StatusOr<AppendMetricsResponse> AppendMetrics(const AppendMetricsRequest& request);
  // Calls on_rows for each batch with step > after_step; with follow, until the job ends (or
  // on_rows returns false); a server restart in between is ridden out by resuming after the
  // last row seen.
  absl::Status WatchMetrics(const std::string& job_id, int64_t after_step, bool follow,
                            const std::function<bool(const WatchMetricsResponse&)>& on_rows);

  // Streams the file in chunks (CRC32C each, SHA-256 of the whole in the trailer); returns
  // once the server has committed it. Retried whole while the server is unavailable.
  absl::StatusOr<CheckpointInfo> UploadCheckpoint(const std::string& job_id, int64_t step,
                                                  const std::string& path, int keep_last = 0);
  absl::StatusOr<std::vector<CheckpointInfo>> ListCheckpoints(const std::string& job_id);
  // step -1: the latest. Writes dest_path atomically after checking every chunk and the
  // whole file's SHA-256; a broken stream resumes at the offset reached.
  absl::StatusOr<CheckpointInfo> DownloadCheckpoint(const std::string& job_id, int64_t step,
                                                    const std::string& dest_path);

  // A new version of the set (retried with the same idempotency key: stored once).
  // expected_version: Aborted unless the set is at that version (0: the set must not exist).
  absl::StatusOr<int64_t> PushTensors(const std::string& name, const std::vector<TensorIn>& tensors,
                                      const std::map<std::string, std::string>& metadata = {},
                                      std::optional<int64_t> expected_version = std::nullopt);
  // version 0: the latest; if_newer_than > 0 with version 0: nullopt when the latest is not
  // newer (pull-if-newer).
  absl::StatusOr<std::optional<TensorSetData>> PullTensors(const std::string& name,
                                                           int64_t version = 0,
                                                           int64_t if_newer_than = 0);
  absl::StatusOr<std::vector<TensorSetInfo>> ListTensorSets();

  // For other services on the same server (their own generated stubs on this channel):
  // the channel, and a context with the token and a deadline.
  std::shared_ptr<grpc::Channel> channel() const { return channel_; }
  void Prepare(grpc::ClientContext* ctx, absl::Time deadline) const;
  // Runs `attempt` until it succeeds, fails with a code that is not retryable, or the budget
  // is spent; each attempt gets a fresh context. Errors: "<what> at <address>: ...".
  absl::Status Call(const std::string& what, bool idempotent, absl::Duration budget,
                    const std::function<grpc::Status(grpc::ClientContext*)>& attempt) const;

 private:
  explicit PsClient(ClientOptions options) : options_(std::move(options)) {}
  absl::Duration TransferBudget(int64_t bytes) const;

  ClientOptions options_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<ParameterService::Stub> stub_;
};

}  // namespace qtrain::ps

#endif  // QTRAIN_DISTRIBUTED_PS_CLIENT_H_
