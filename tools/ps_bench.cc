// ps_bench: load figures of the parameter service on this machine (not a test; numbers in
// docs/benchmarks.md). It starts its own qtrain_ps (a child process, stopped by its pid at the
// end) and measures, over loopback:
//   --mode=heartbeat  N simulated workers (each its own gRPC connection) heartbeating at R Hz,
//                     spread evenly over the second; p50/p99/max latency of the heartbeat call
//   --mode=upload     one checkpoint of --upload_bytes streamed in 1 MiB chunks (CRC32C each,
//                     SHA-256 of the whole) until the server's commit (fsync, rename); MB/s and
//                     the server's peak RSS, which must not grow with the file
#include <malloc.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "distributed/proto/param_service.grpc.pb.h"
#include "distributed/ps/auth.h"
#include "distributed/ps/client.h"
#include "distributed/ps/digest.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/support/channel_arguments.h"

ABSL_FLAG(std::string, mode, "heartbeat", "heartbeat or upload");
ABSL_FLAG(int, workers, 1000, "heartbeat: simulated workers");
ABSL_FLAG(double, rate_hz, 1.0, "heartbeat: heartbeats per worker per second");
ABSL_FLAG(double, seconds, 30, "heartbeat: measured duration (after 3 s of warm-up)");
ABSL_FLAG(double, warmup_s, 5, "heartbeat: seconds before measuring (connections set up)");
ABSL_FLAG(int, channels, 0, "heartbeat: gRPC connections (0: one per worker)");
ABSL_FLAG(int64_t, upload_bytes, 6000000000, "upload: checkpoint size (1.5B fp32 parameters)");
ABSL_FLAG(std::string, storage_dir, "/dev/shm/qtrain_ps_bench",
          "the server's storage (removed at the end); /dev/shm measures the service, a disk "
          "path adds the disk's fsync speed");
ABSL_FLAG(std::string, qtrain_ps, "", "the qtrain_ps binary (default: beside this one)");

namespace qtrain::ps {
namespace {

std::string FindServer(const char* argv0) {
  if (!absl::GetFlag(FLAGS_qtrain_ps).empty()) return absl::GetFlag(FLAGS_qtrain_ps);
  for (const std::string& c :
       {absl::StrCat(argv0, ".runfiles/qtrain/distributed/ps/qtrain_ps"),
        std::string("bazel-bin/distributed/ps/qtrain_ps")}) {
    if (access(c.c_str(), X_OK) == 0) return c;
  }
  return "bazel-bin/distributed/ps/qtrain_ps";
}

int64_t ProcField(pid_t pid, const char* key) {  // kB from /proc/pid/status
  std::ifstream in(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key, 0) == 0) return std::stoll(line.substr(strlen(key)));
  }
  return -1;
}

double CpuSeconds(pid_t pid) {  // utime + stime
  std::ifstream in(absl::StrCat("/proc/", pid, "/stat"));
  std::string s((std::istreambuf_iterator<char>(in)), {});
  std::istringstream f(s.substr(s.rfind(')') + 2));
  std::string x;
  long long ut = 0, st = 0;
  for (int i = 1; i <= 13; ++i) {
    f >> x;
    if (i == 12) ut = std::stoll(x);
    if (i == 13) st = std::stoll(x);
  }
  return static_cast<double>(ut + st) / sysconf(_SC_CLK_TCK);
}

struct Server {
  pid_t pid = -1;
  std::string address, token, dir;
  ~Server() {
    if (pid > 0) {
      kill(pid, SIGTERM);
      waitpid(pid, nullptr, 0);
    }
    std::filesystem::remove_all(dir);
  }
};

std::unique_ptr<Server> StartServer(const std::string& binary) {
  auto s = std::make_unique<Server>();
  s->dir = absl::GetFlag(FLAGS_storage_dir);
  std::filesystem::remove_all(s->dir);
  std::filesystem::create_directories(s->dir);
  s->token = ToHex(RandomBytes(24));
  std::ofstream(s->dir + "/token") << s->token << "\n";
  std::filesystem::permissions(s->dir + "/token", std::filesystem::perms::owner_read);
  std::ofstream(s->dir + "/ps.textproto")
      << "address: \"127.0.0.1:0\"\nstorage_dir: \"" << s->dir << "/storage\"\ntoken_file: \""
      << s->dir << "/token\"\nport_file: \"" << s->dir << "/port\"\n"
      << "timeouts { heartbeat_timeout_ms: 60000 }\n";
  s->pid = fork();
  if (s->pid == 0) {
    const std::string config = "--config=" + s->dir + "/ps.textproto";
    execl(binary.c_str(), binary.c_str(), config.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  for (int i = 0; i < 200; ++i) {
    std::ifstream in(s->dir + "/port");
    int port = 0;
    if (in >> port && port > 0) {
      s->address = absl::StrCat("127.0.0.1:", port);
      return s;
    }
    absl::SleepFor(absl::Milliseconds(25));
  }
  std::fprintf(stderr, "ps_bench: %s did not start\n", binary.c_str());
  return nullptr;
}

double Percentile(std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  const size_t k = std::min(v.size() - 1, static_cast<size_t>(p * v.size()));
  std::nth_element(v.begin(), v.begin() + k, v.end());
  return v[k];
}

int Heartbeats(const Server& s, PsClient& client) {
  const int n = absl::GetFlag(FLAGS_workers);
  const int nch = absl::GetFlag(FLAGS_channels) > 0 ? absl::GetFlag(FLAGS_channels) : n;
  std::vector<std::unique_ptr<ParameterService::Stub>> stubs;
  for (int i = 0; i < nch; ++i) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // a connection of its own
    args.SetInt("qtrain.bench.channel", i);
    stubs.push_back(ParameterService::NewStub(
        grpc::CreateCustomChannel(s.address, grpc::InsecureChannelCredentials(), args)));
  }
  std::vector<std::string> ids(n);
  for (int i = 0; i < n; ++i) {
    RegisterWorkerRequest r;
    r.set_job_id("bench");
    r.set_rank(i);
    r.set_world_size(n);
    r.set_host(absl::StrCat("sim", i));
    r.set_pid(i);
    absl::StatusOr<RegisterWorkerResponse> reg = client.RegisterWorker(r);
    if (!reg.ok()) {
      std::fprintf(stderr, "ps_bench: %s\n", std::string(reg.status().message()).c_str());
      return 1;
    }
    ids[i] = reg->worker_id();
  }
  const std::string auth = absl::StrCat(kBearerPrefix, s.token);
  absl::Mutex mu;
  std::vector<double> lat_ms;
  std::atomic<int64_t> errors{0};
  const absl::Duration period = absl::Seconds(1.0 / absl::GetFlag(FLAGS_rate_hz));
  const absl::Duration warmup = absl::Seconds(absl::GetFlag(FLAGS_warmup_s));
  const absl::Duration total = warmup + absl::Seconds(absl::GetFlag(FLAGS_seconds));
  const absl::Time t0 = absl::Now() + absl::Milliseconds(100);
  const absl::Time measure_from = t0 + warmup;
  // Worker i beats at t0 + i * period / n + k * period. One sender thread and gRPC's callback
  // API carry all the workers; latency is measured from the send to the answer.
  struct Call {
    grpc::ClientContext ctx;
    HeartbeatRequest req;
    HeartbeatResponse resp;
    absl::Time start;
    bool measured;
  };
  std::atomic<int64_t> pending{0};
  int64_t slip_us_max = 0;
  double cpu0 = 0, client_cpu0 = 0;
  bool cpu_started = false;
  for (int64_t k = 0;; ++k) {
    const absl::Time round = t0 + k * period;
    if (round - t0 >= total) break;
    if (!cpu_started && round >= measure_from) {
      cpu0 = CpuSeconds(s.pid);
      client_cpu0 = CpuSeconds(getpid());
      cpu_started = true;
    }
    for (int i = 0; i < n; ++i) {
      const absl::Time at = round + period * i / n;
      const absl::Duration wait = at - absl::Now();
      if (wait > absl::ZeroDuration()) {
        absl::SleepFor(wait);
      } else if (at >= measure_from) {
        slip_us_max = std::max(slip_us_max, absl::ToInt64Microseconds(-wait));
      }
      auto* call = new Call;
      call->ctx.AddMetadata(kAuthorizationKey, auth);
      call->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
      call->req.set_job_id("bench");
      call->req.set_worker_id(ids[i]);
      call->req.set_step(k);
      call->measured = at >= measure_from;
      pending.fetch_add(1);
      call->start = absl::Now();
      stubs[i % nch]->async()->Heartbeat(
          &call->ctx, &call->req, &call->resp,
          [call, &mu, &lat_ms, &errors, &pending](grpc::Status st) {
            const double ms = absl::ToDoubleMilliseconds(absl::Now() - call->start);
            if (!st.ok() || call->resp.action() != HeartbeatResponse::CONTINUE) {
              errors.fetch_add(1);
            } else if (call->measured) {
              absl::MutexLock lock(&mu);
              lat_ms.push_back(ms);
            }
            delete call;
            pending.fetch_sub(1);
          });
    }
  }
  while (pending.load() > 0) absl::SleepFor(absl::Milliseconds(10));
  const double cpu = CpuSeconds(s.pid) - cpu0;
  const double client_cpu = CpuSeconds(getpid()) - client_cpu0;
  absl::MutexLock lock(&mu);
  const size_t count = lat_ms.size();
  const double p50 = Percentile(lat_ms, 0.50), p90 = Percentile(lat_ms, 0.90),
               p99 = Percentile(lat_ms, 0.99), p999 = Percentile(lat_ms, 0.999);
  const double mx = *std::max_element(lat_ms.begin(), lat_ms.end());
  std::printf(
      "heartbeat: %d workers x %.1f Hz over %d connections, %.0f s measured: %zu calls, %lld "
      "errors\n  latency p50 %.3f ms  p90 %.3f ms  p99 %.3f ms  p99.9 %.3f ms  max %.3f ms\n"
      "  server: %.1f%% of one core, peak RSS %lld MiB; the simulated workers: %.1f%% of one core, "
      "schedule slip at most %.1f ms\n",
      n, absl::GetFlag(FLAGS_rate_hz), nch, absl::GetFlag(FLAGS_seconds), count,
      static_cast<long long>(errors.load()), p50, p90, p99, p999, mx,
      100 * cpu / absl::GetFlag(FLAGS_seconds),
      static_cast<long long>(ProcField(s.pid, "VmHWM:") / 1024),
      100 * client_cpu / absl::GetFlag(FLAGS_seconds), slip_us_max / 1e3);
  return errors.load() == 0 ? 0 : 1;
}

int Upload(const Server& s, PsClient& client) {
  const int64_t size = absl::GetFlag(FLAGS_upload_bytes);
  const int64_t chunk = 1 << 20;
  // 64 MiB of random bytes, cycled, each chunk stamped with its index: no two chunks alike.
  std::string pattern(64 << 20, '\0');
  std::mt19937_64 rng(1);
  for (size_t i = 0; i < pattern.size(); i += 8) {
    const uint64_t v = rng();
    std::memcpy(&pattern[i], &v, 8);
  }
  const int64_t rss_before = ProcField(s.pid, "VmRSS:");
  const double server_cpu0 = CpuSeconds(s.pid), client_cpu0 = CpuSeconds(getpid());
  auto stub = ParameterService::NewStub(client.channel());
  grpc::ClientContext ctx;
  client.Prepare(&ctx, absl::Now() + absl::Hours(1));
  UploadCheckpointResponse resp;
  const absl::Time t0 = absl::Now();
  auto writer = stub->UploadCheckpoint(&ctx, &resp);
  UploadCheckpointRequest msg;
  msg.mutable_header()->set_job_id("bench");
  msg.mutable_header()->set_step(1);
  msg.mutable_header()->set_size(size);
  bool ok = writer->Write(msg);
  Sha256 sha;
  int64_t peak_rss = 0;
  msg.Clear();
  Chunk* c = msg.mutable_chunk();  // reused: its buffer keeps its capacity
  for (int64_t off = 0; ok && off < size; off += chunk) {
    const int64_t n = std::min(chunk, size - off);
    std::string* data = c->mutable_data();
    data->assign(pattern, static_cast<size_t>(off % pattern.size()), static_cast<size_t>(n));
    std::memcpy(data->data(), &off, std::min<int64_t>(8, n));
    c->set_offset(off);
    c->set_crc32c(Crc32c(*data));
    sha.Update(*data);
    ok = writer->Write(msg);
    if ((off / chunk) % 256 == 0) peak_rss = std::max(peak_rss, ProcField(s.pid, "VmRSS:"));
  }
  const absl::Time sent = absl::Now();
  if (ok) {
    msg.Clear();
    msg.mutable_trailer()->set_sha256(sha.HexDigest());
    ok = writer->Write(msg);
  }
  if (ok) writer->WritesDone();
  const grpc::Status st = writer->Finish();
  const absl::Time done = absl::Now();
  if (!st.ok()) {
    std::fprintf(stderr, "ps_bench: upload failed: %s\n", st.error_message().c_str());
    return 1;
  }
  const double secs = absl::ToDoubleSeconds(done - t0);
  const double server_cpu = CpuSeconds(s.pid) - server_cpu0;
  const double client_cpu = CpuSeconds(getpid()) - client_cpu0;
  std::printf(
      "upload: %.2f GB in 1 MiB chunks to %s: %.2f s until committed = %.0f MB/s (streaming "
      "%.2f s, commit with fsync %.2f s)\n  server RSS %lld MiB before, %lld MiB at most during, "
      "peak RSS of its life %lld MiB; sha256 %s\n"
      "  CPU per GB: server %.2f s, client %.2f s (the rate two idle cores allow: %.0f MB/s)\n",
      size / 1e9, absl::GetFlag(FLAGS_storage_dir).c_str(), secs, size / 1e6 / secs,
      absl::ToDoubleSeconds(sent - t0), absl::ToDoubleSeconds(done - sent),
      static_cast<long long>(rss_before / 1024), static_cast<long long>(peak_rss / 1024),
      static_cast<long long>(ProcField(s.pid, "VmHWM:") / 1024),
      resp.checkpoint().sha256().c_str(), server_cpu / (size / 1e9), client_cpu / (size / 1e9),
      size / 1e6 / std::max(server_cpu, client_cpu));
  return resp.checkpoint().size() == size ? 0 : 1;
}

}  // namespace
}  // namespace qtrain::ps

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  signal(SIGPIPE, SIG_IGN);
  mallopt(M_MMAP_THRESHOLD, 64 << 20);  // as qtrain_ps does: 1 MiB buffers from the heap
  std::unique_ptr<qtrain::ps::Server> s = qtrain::ps::StartServer(qtrain::ps::FindServer(argv[0]));
  if (!s) return 1;
  // gRPC 1.51's callback client leaves the sockets of channels without a call in flight to its
  // backup poller (every 5 s by default); a real worker's blocking calls poll their own
  // connection. Set after the server's fork, so only this client (all simulated workers in one
  // process) polls every 10 ms.
  setenv("GRPC_CLIENT_CHANNEL_BACKUP_POLL_INTERVAL_MS", "10", 0);
  qtrain::ps::ClientOptions o;
  o.address = s->address;
  o.token = s->token;
  absl::StatusOr<std::unique_ptr<qtrain::ps::PsClient>> client = qtrain::ps::PsClient::Create(o);
  if (!client.ok()) return 1;
  const std::string mode = absl::GetFlag(FLAGS_mode);
  if (mode == "heartbeat") return qtrain::ps::Heartbeats(*s, **client);
  if (mode == "upload") return qtrain::ps::Upload(*s, **client);
  std::fprintf(stderr, "ps_bench: --mode must be heartbeat or upload\n");
  return 2;
}
