// Federation: the server side of one federated job, independent of gRPC. A round thread
// samples clients, hands each a task (its round's adapter version in the parameter store),
// collects the updates that arrive, aggregates (distributed/federated/aggregate.h), evaluates,
// and commits the new adapter as the next version of the job's tensor set: that version is
// the round checkpoint (its metadata holds the round and the clients' participation), so a
// restarted server resumes after the last committed round. Faults: a round waits at most
// round_timeout_s; a worker silent for client_timeout_s is dead and its clients are given up
// for the round; with fewer than min_clients answers the round is re-sampled; every dropout is
// logged by client.
#ifndef QTRAIN_DISTRIBUTED_FEDERATED_FEDERATION_H_
#define QTRAIN_DISTRIBUTED_FEDERATED_FEDERATION_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "configs/job_spec.pb.h"
#include "distributed/federated/aggregate.h"
#include "distributed/federated/federated.pb.h"
#include "distributed/ps/tensor_store.h"
#include "trainer/data_loader.h"
#include "trainer/gpt.h"
#include "trainer/metrics.h"
#include "trainer/sinks.h"

namespace qtrain::federated {

Aggregation AggregationOf(const JobSpec& spec);

// Tensor set names in the parameter store.
std::string AdapterSetName(const std::string& job_id);
std::string UpdateSetName(const std::string& job_id, int client);

struct FederationOptions {
  ps::TensorStore* tensors = nullptr;  // the round checkpoints and the clients' updates
  // Where each round's metrics row goes besides <out_dir>/rounds.jsonl (e.g. the service's
  // metrics store); may be null.
  RunSink* extra_sink = nullptr;
  bool quiet = false;  // no log lines on stdout
};

class Federation {
 public:
  // Loads the base, resumes from the latest committed round (or commits round 0: the initial
  // adapter), and opens the metrics; Run() then drives the rounds.
  static absl::StatusOr<std::unique_ptr<Federation>> Create(const std::string& job_id,
                                                            const JobSpec& spec,
                                                            FederationOptions options);
  ~Federation();  // Stop()

  // The round thread: starts once; Stop() ends it at the next check (a round in progress is
  // abandoned, as by a crash: its clients get it again from the checkpoint).
  void Run();
  void Stop();

  StartResponse Info() const;
  absl::StatusOr<JoinResponse> Join(const JoinRequest& request);
  absl::StatusOr<GetTaskResponse> GetTask(const GetTaskRequest& request);
  // Reads the update from the tensor store (blocking) and adds it to the round.
  absl::StatusOr<SubmitUpdateResponse> Submit(const SubmitUpdateRequest& request);
  absl::StatusOr<HeartbeatResponse> Heartbeat(const HeartbeatRequest& request);
  FederationStatusResponse Status() const;

  bool finished() const;
  const std::string& base_hash() const { return base_hash_; }
  // For tests: the committed adapter of the last completed round.
  std::vector<float> adapter() const;

 private:
  struct Worker {
    std::string instance;
    std::set<int> clients;
    std::string host;
    int64_t pid = 0;
    absl::Time last_seen;
    bool replaced = false;  // a newer process took its clients over
  };

  Federation(std::string job_id, JobSpec spec, FederationOptions options);
  absl::Status Init();
  absl::Status Commit(int64_t round, const std::vector<float>& adapter) ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<double> Evaluate(const std::vector<float>& adapter);
  bool Alive(const Worker& w, absl::Time now) const;
  // The logical clients served by live workers, ascending.
  std::vector<int> AvailableClients(absl::Time now) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RunRounds();
  void Log(const std::string& line) const;

  const std::string job_id_;
  const JobSpec spec_;
  const FederationOptions options_;
  const Aggregation aggregation_;
  const std::string adapter_set_;

  // Only the round thread touches these after Init.
  std::unique_ptr<Gpt> model_;  // the base with adapters, for evaluation
  std::unique_ptr<DataLoader> val_;
  AdapterLayout layout_;
  std::string base_hash_;
  std::unique_ptr<RunSink> rounds_log_;
  SinkFanOut sinks_;

  mutable absl::Mutex mu_;
  absl::CondVar changed_;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
  int64_t round_ ABSL_GUARDED_BY(mu_) = 0;  // rounds completed
  int attempt_ ABSL_GUARDED_BY(mu_) = 0;
  // Whether this server has sampled a round yet: before its first, it waits for every logical
  // client (client processes join one by one), so that round is sampled from all of them.
  bool sampled_ ABSL_GUARDED_BY(mu_) = false;
  bool open_ ABSL_GUARDED_BY(mu_) = false;  // a round is collecting updates
  std::vector<float> adapter_ ABSL_GUARDED_BY(mu_);
  int64_t adapter_version_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<int64_t> participations_ ABSL_GUARDED_BY(mu_);  // rounds each client was sent
  std::vector<int> selected_ ABSL_GUARDED_BY(mu_);
  std::map<int, std::string> assigned_ ABSL_GUARDED_BY(mu_);  // client -> worker training it
  std::map<int, ClientUpdate> answered_ ABSL_GUARDED_BY(mu_);
  std::map<int, double> epsilon_ ABSL_GUARDED_BY(mu_), train_loss_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, Worker> workers_ ABSL_GUARDED_BY(mu_);
  int next_worker_ ABSL_GUARDED_BY(mu_) = 0;
  double last_val_loss_ ABSL_GUARDED_BY(mu_) = 0;
  std::thread thread_;
};

}  // namespace qtrain::federated

#endif  // QTRAIN_DISTRIBUTED_FEDERATED_FEDERATION_H_
