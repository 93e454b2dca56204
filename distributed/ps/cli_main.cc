// qtrain_ps_cli: a terminal view of a qtrain_ps. Jobs and their state, a job's workers, its
// metrics (with --follow, the live stream until the job ends), checkpoints, tensor sets, and
// the few writes a user needs (register a job spec, upload or download a checkpoint).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "distributed/ps/auth.h"
#include "distributed/ps/client.h"
#include "distributed/ps/metrics_store.h"
#include "trainer/atomic_file.h"
#include "trainer/cli.h"

ABSL_FLAG(std::string, address, "", "host:port of the qtrain_ps (default $QTRAIN_PS_ADDRESS, "
          "else 127.0.0.1:7070)");
ABSL_FLAG(std::string, token_file, "", "the bearer token's file (default $QTRAIN_PS_TOKEN_FILE, "
          "else $QTRAIN_PS_TOKEN)");
ABSL_FLAG(std::string, tls_ca_file, "", "PEM CA of the server's certificate: TLS");
ABSL_FLAG(std::string, tls_cert_file, "", "PEM client certificate");
ABSL_FLAG(std::string, tls_key_file, "", "PEM client key");
ABSL_FLAG(double, deadline_s, 10, "deadline of each call, retries included");
ABSL_FLAG(bool, follow, false, "metrics: keep printing new rows until the job ends");
ABSL_FLAG(int64_t, after, -1, "metrics: only rows after this step");
ABSL_FLAG(bool, json, false, "metrics: print the stored JSON lines");
ABSL_FLAG(bool, replace, false, "register: replace a different registered spec");

namespace qtrain::ps {
namespace {

constexpr char kUsage[] =
    "qtrain_ps_cli [--address=host:port] COMMAND\n"
    "  status [JOB]                 jobs: state, attempt, workers, last step, checkpoints\n"
    "  workers JOB                  the job's ranks: host, pid, state, heartbeat age, step\n"
    "  metrics JOB [--follow] [--after=STEP] [--json]\n"
    "  checkpoints JOB              stored checkpoints (step, size, SHA-256)\n"
    "  download JOB STEP|latest FILE\n"
    "  upload JOB STEP FILE\n"
    "  register JOB SPEC_FILE [--replace]\n"
    "  spec JOB                     the registered job spec\n"
    "  tensors                      tensor sets of the parameter store\n";

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "qtrain_ps_cli: %s\n", std::string(s.message()).c_str());
  return 1;
}

const char* StateName(JobState s) {
  switch (s) {
    case REGISTERED: return "registered";
    case WAITING: return "waiting";
    case RUNNING: return "running";
    case FAILED: return "FAILED";
    case FINISHED: return "finished";
    default: return "?";
  }
}

std::string FormatValue(double v) {
  if (std::isnan(v)) return "null";
  const double a = std::fabs(v);
  if (a != 0 && (a < 1e-3 || a >= 1e6)) return absl::StrFormat("%.3e", v);
  return absl::StrFormat("%.4f", v);
}

void PrintRow(const MetricRow& row, bool json) {
  if (json) {
    std::printf("%s\n", MetricsStore::RowToJson(row).c_str());
    return;
  }
  // The trainer's main columns first, in its order, then the rest.
  const char* first[] = {"train_loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "step_ms"};
  std::vector<std::string> parts = {absl::StrFormat("step %6d", row.step())};
  for (const char* name : first) {
    for (const Metric& m : row.metrics()) {
      if (m.name() == name) parts.push_back(absl::StrCat(name, " ", FormatValue(m.value())));
    }
  }
  for (const Metric& m : row.metrics()) {
    bool known = false;
    for (const char* name : first) known = known || m.name() == name;
    if (!known) parts.push_back(absl::StrCat(m.name(), " ", FormatValue(m.value())));
  }
  std::printf("%s\n", absl::StrJoin(parts, " | ").c_str());
}

int Run(const std::vector<std::string>& args) {
  if (args.empty()) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  ClientOptions o;
  o.address = absl::GetFlag(FLAGS_address);
  if (o.address.empty()) {
    const char* a = std::getenv("QTRAIN_PS_ADDRESS");
    o.address = a != nullptr && *a ? a : "127.0.0.1:7070";
  }
  absl::StatusOr<std::string> token = ResolveClientToken(absl::GetFlag(FLAGS_token_file));
  if (!token.ok()) return Fail(token.status());
  o.token = *token;
  o.tls_ca_file = absl::GetFlag(FLAGS_tls_ca_file);
  o.tls_cert_file = absl::GetFlag(FLAGS_tls_cert_file);
  o.tls_key_file = absl::GetFlag(FLAGS_tls_key_file);
  o.deadline = absl::Seconds(absl::GetFlag(FLAGS_deadline_s));
  absl::StatusOr<std::unique_ptr<PsClient>> made = PsClient::Create(o);
  if (!made.ok()) return Fail(made.status());
  PsClient& c = **made;
  const std::string& cmd = args[0];
  auto need = [&](size_t n) {
    if (args.size() != n + 1) {
      std::fprintf(stderr, "qtrain_ps_cli %s: expected %zu argument%s\n%s", cmd.c_str(), n,
                   n == 1 ? "" : "s", kUsage);
      return false;
    }
    return true;
  };

  if (cmd == "status") {
    absl::StatusOr<StatusResponse> s = c.Status(args.size() > 1 ? args[1] : "");
    if (!s.ok()) return Fail(s.status());
    std::printf("%s at %s, up %s, %d job%s, %d tensor set%s\n", s->server().c_str(),
                c.address().c_str(),
                absl::FormatDuration(absl::Seconds(s->uptime_ms() / 1000)).c_str(),
                s->jobs_size(), s->jobs_size() == 1 ? "" : "s", s->tensor_sets(),
                s->tensor_sets() == 1 ? "" : "s");
    if (s->jobs_size() > 0) {
      std::printf("%-24s %-10s %7s %9s %9s %11s  %s\n", "JOB", "STATE", "ATTEMPT", "WORKERS",
                  "LAST STEP", "CHECKPOINTS", "FAILURE");
    }
    for (const JobSummary& j : s->jobs()) {
      std::printf("%-24s %-10s %7lld %4d/%-4d %9lld %5d (%lld)  %s\n", j.job_id().c_str(),
                  StateName(j.state()), static_cast<long long>(j.attempt()), j.live_workers(),
                  j.world_size(), static_cast<long long>(j.last_metric_step()), j.checkpoints(),
                  static_cast<long long>(j.latest_checkpoint_step()), j.failure().c_str());
    }
    return 0;
  }
  if (cmd == "workers") {
    if (!need(1)) return 2;
    absl::StatusOr<ListWorkersResponse> w = c.ListWorkers(args[1]);
    if (!w.ok()) return Fail(w.status());
    std::printf("job %s: %s, attempt %lld, %d ranks\n", args[1].c_str(), StateName(w->state()),
                static_cast<long long>(w->attempt()), w->world_size());
    if (!w->failure().empty()) std::printf("stopped: %s\n", w->failure().c_str());
    std::printf("%4s %-20s %8s %-7s %9s %8s  %s\n", "RANK", "HOST", "PID", "STATE", "HEARTBEAT",
                "STEP", "DETAIL");
    for (const WorkerStatus& s : w->workers()) {
      std::string state = WorkerStatus::State_Name(s.state());
      std::printf("%4d %-20s %8lld %-7s %7.1fs %8lld  %s\n", s.rank(), s.host().c_str(),
                  static_cast<long long>(s.pid()), state.c_str(), s.last_heartbeat_age_ms() / 1e3,
                  static_cast<long long>(s.step()), s.detail().c_str());
    }
    return 0;
  }
  if (cmd == "metrics") {
    if (!need(1)) return 2;
    const bool json = absl::GetFlag(FLAGS_json);
    absl::Status s = c.WatchMetrics(args[1], absl::GetFlag(FLAGS_after), absl::GetFlag(FLAGS_follow),
                                    [json](const WatchMetricsResponse& m) {
                                      for (const MetricRow& r : m.rows()) PrintRow(r, json);
                                      std::fflush(stdout);
                                      return true;
                                    });
    return s.ok() ? 0 : Fail(s);
  }
  if (cmd == "checkpoints") {
    if (!need(1)) return 2;
    absl::StatusOr<std::vector<CheckpointInfo>> l = c.ListCheckpoints(args[1]);
    if (!l.ok()) return Fail(l.status());
    for (const CheckpointInfo& i : *l) {
      std::printf("step %8lld  %12lld bytes  sha256 %s\n", static_cast<long long>(i.step()),
                  static_cast<long long>(i.size()), i.sha256().c_str());
    }
    return 0;
  }
  if (cmd == "download") {
    if (!need(3)) return 2;
    int64_t step = -1;
    if (args[2] != "latest" && !absl::SimpleAtoi(args[2], &step)) {
      return Fail(absl::InvalidArgumentError("STEP must be a number or 'latest'"));
    }
    absl::StatusOr<CheckpointInfo> i = c.DownloadCheckpoint(args[1], step, args[3]);
    if (!i.ok()) return Fail(i.status());
    std::printf("step %lld: %lld bytes to %s (sha256 %s)\n", static_cast<long long>(i->step()),
                static_cast<long long>(i->size()), args[3].c_str(), i->sha256().c_str());
    return 0;
  }
  if (cmd == "upload") {
    if (!need(3)) return 2;
    int64_t step = 0;
    if (!absl::SimpleAtoi(args[2], &step)) return Fail(absl::InvalidArgumentError("bad STEP"));
    const absl::Time t0 = absl::Now();
    absl::StatusOr<CheckpointInfo> i = c.UploadCheckpoint(args[1], step, args[3]);
    if (!i.ok()) return Fail(i.status());
    const double s = absl::ToDoubleSeconds(absl::Now() - t0);
    std::printf("step %lld: %lld bytes committed in %.2f s (%.0f MB/s), sha256 %s\n",
                static_cast<long long>(i->step()), static_cast<long long>(i->size()), s,
                i->size() / 1e6 / std::max(s, 1e-9), i->sha256().c_str());
    return 0;
  }
  if (cmd == "register") {
    if (!need(2)) return 2;
    absl::StatusOr<std::string> text = ReadFile(args[2]);
    if (!text.ok()) return Fail(text.status());
    absl::StatusOr<RegisterJobResponse> r =
        c.RegisterJob(args[1], *text, absl::GetFlag(FLAGS_replace));
    if (!r.ok()) return Fail(r.status());
    std::printf("job %s %s (sha256 %s)\n", args[1].c_str(),
                r->created() ? "registered" : "already registered with this spec",
                r->spec_sha256().c_str());
    return 0;
  }
  if (cmd == "spec") {
    if (!need(1)) return 2;
    absl::StatusOr<GetJobSpecResponse> r = c.GetJobSpec(args[1]);
    if (!r.ok()) return Fail(r.status());
    std::fputs(r->spec_text().c_str(), stdout);
    return 0;
  }
  if (cmd == "tensors") {
    absl::StatusOr<std::vector<TensorSetInfo>> l = c.ListTensorSets();
    if (!l.ok()) return Fail(l.status());
    for (const TensorSetInfo& i : *l) {
      std::printf("%-32s version %6lld  %12lld bytes\n", i.name().c_str(),
                  static_cast<long long>(i.version()), static_cast<long long>(i.data_bytes()));
    }
    return 0;
  }
  std::fprintf(stderr, "qtrain_ps_cli: unknown command '%s'\n%s", cmd.c_str(), kUsage);
  return 2;
}

}  // namespace
}  // namespace qtrain::ps

int main(int argc, char** argv) {
  // Usage, --help with these flags, and `bazel run`'s working directory for relative paths.
  std::vector<char*> rest = qtrain::InitCommandLine(argc, argv, qtrain::ps::kUsage, __FILE__);
  std::vector<std::string> args(rest.begin() + 1, rest.end());
  return qtrain::ps::Run(args);
}
