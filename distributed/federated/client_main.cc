// qtrain_fed_client: a federated client process serving one or more logical clients
// (docs/federated.md). `qtrain_fed_client --job=JOB --server=host:port --clients=0,1,2`.
#include <signal.h>

#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "distributed/federated/fed_client.h"
#include "distributed/ps/auth.h"
#include "trainer/cli.h"

ABSL_FLAG(std::string, job, "", "the federated job spec (text), required");
ABSL_FLAG(std::string, server, "", "qtrain_ps address host:port, required");
ABSL_FLAG(std::string, token_file, "",
          "bearer token file (default: $QTRAIN_PS_TOKEN_FILE, else $QTRAIN_PS_TOKEN)");
ABSL_FLAG(std::string, ca_file, "", "TLS: verify the server against this CA bundle");
ABSL_FLAG(std::vector<std::string>, clients, {}, "logical clients to serve, e.g. 0,1,2");
ABSL_FLAG(std::string, client_range, "", "or a range BEGIN:END (END exclusive)");
ABSL_FLAG(double, deadline_s, 30, "budget of one call to the server, retries included");
ABSL_FLAG(double, server_wait_s, 120, "how long to wait for an absent (restarting) server");
ABSL_FLAG(bool, quiet, false, "no progress lines");
ABSL_FLAG(std::string, fault, "", "tests: 'die' or 'stall' on receiving a task of --fault_round");
ABSL_FLAG(int, fault_round, -1, "tests: 0-based round of the injected fault");
ABSL_FLAG(int, fault_client, -1, "tests: only for this logical client (-1: any)");

int main(int argc, char** argv) {
  // Usage, --help with these flags, and `bazel run`'s working directory for relative paths.
  qtrain::InitCommandLine(
      argc, argv,
      "qtrain_fed_client --job=PATH --server=host:port (--clients=0,1 | --client_range=0:4)",
      __FILE__);
  signal(SIGPIPE, SIG_IGN);
  qtrain::federated::FedClientOptions o;
  o.job_path = absl::GetFlag(FLAGS_job);
  o.service.address = absl::GetFlag(FLAGS_server);
  if (o.job_path.empty() || o.service.address.empty()) {
    std::fprintf(stderr, "qtrain_fed_client: --job and --server are required\n");
    return 2;
  }
  for (const std::string& c : absl::GetFlag(FLAGS_clients)) {
    int v = 0;
    if (!absl::SimpleAtoi(c, &v)) {
      std::fprintf(stderr, "qtrain_fed_client: --clients: '%s' is not a number\n", c.c_str());
      return 2;
    }
    o.clients.push_back(v);
  }
  const std::string range = absl::GetFlag(FLAGS_client_range);
  if (!range.empty()) {
    std::vector<std::string> p = absl::StrSplit(range, ':');
    int a = 0, b = 0;
    if (p.size() != 2 || !absl::SimpleAtoi(p[0], &a) || !absl::SimpleAtoi(p[1], &b) || a >= b) {
      std::fprintf(stderr, "qtrain_fed_client: --client_range must be BEGIN:END, got '%s'\n",
                   range.c_str());
      return 2;
    }
    for (int c = a; c < b; ++c) o.clients.push_back(c);
  }
  absl::StatusOr<std::string> token =
      qtrain::ps::ResolveClientToken(absl::GetFlag(FLAGS_token_file));
  if (!token.ok()) {
    std::fprintf(stderr, "qtrain_fed_client: %s\n", std::string(token.status().message()).c_str());
    return 1;
  }
  o.service.token = *token;
  o.service.tls_ca_file = absl::GetFlag(FLAGS_ca_file);
  o.service.deadline = absl::Seconds(absl::GetFlag(FLAGS_deadline_s));
  o.server_wait = absl::Seconds(absl::GetFlag(FLAGS_server_wait_s));
  o.quiet = absl::GetFlag(FLAGS_quiet);
  o.fault = absl::GetFlag(FLAGS_fault);
  o.fault_round = absl::GetFlag(FLAGS_fault_round);
  o.fault_client = absl::GetFlag(FLAGS_fault_client);
  absl::Status s = qtrain::federated::RunFedClient(o);
  if (!s.ok()) {
    std::fprintf(stderr, "qtrain_fed_client: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
