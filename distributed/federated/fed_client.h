// A federated client process (qtrain_fed_client): serves one or more logical clients (Flower's
// simulation engine pools clients the same way: K processes for N clients). It registers the
// job with the parameter service, starts or finds the federation, joins with its base's hash,
// then loops: take a task, pull the round's adapter, train locally (local_training.h), push the
// update as a tensor set and submit it. A heartbeat thread keeps the process alive in the
// server's eyes; a restarted server is rejoined (its round checkpoint has the adapter).
#ifndef QTRAIN_DISTRIBUTED_FEDERATED_FED_CLIENT_H_
#define QTRAIN_DISTRIBUTED_FEDERATED_FED_CLIENT_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "distributed/ps/client.h"

namespace qtrain::federated {

struct FedClientOptions {
  std::string job_path;       // the job spec (text); its name is the job id
  ps::ClientOptions service;  // address, token, TLS, deadlines
  std::vector<int> clients;   // the logical clients this process serves
  // How long to keep retrying while the server is away (restarting), per outage.
  absl::Duration server_wait = absl::Seconds(120);
  bool quiet = false;
  // Fault injection for tests: on receiving a task of round `fault_round` (0-based) for
  // `fault_client` (-1: any), "die" exits at once (no heartbeats, no answer) and "stall" never
  // answers while heartbeats go on.
  std::string fault;
  int fault_round = -1;
  int fault_client = -1;
};

// Runs until the federation finishes (OK) or an error that retrying cannot fix: a refused
// token, spec or base, a broken update, the server away longer than server_wait.
absl::Status RunFedClient(const FedClientOptions& options);

}  // namespace qtrain::federated

#endif  // QTRAIN_DISTRIBUTED_FEDERATED_FED_CLIENT_H_
