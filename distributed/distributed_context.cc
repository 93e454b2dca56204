// DistributedContext: MPI start-up, launcher cross-checks, job agreement, error agreement.
#include "distributed/distributed_context.h"

#include <mpi.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "distributed/launch_env.h"
#include "distributed/mpi_communicator.h"
#include "distributed/mpi_status.h"
#include "ops/status_macros.h"

namespace qtrain {
namespace {

constexpr char kAgreedPayload[] = "type.qtrain/agreed";
constexpr int kHostBytes = 64;

absl::Status MarkAgreed(absl::Status s) {
  s.SetPayload(kAgreedPayload, absl::Cord("1"));
  return s;
}

std::string LocalHostName() {
  char host[256] = {0};
  if (gethostname(host, sizeof(host) - 1) != 0) return "?";
  return host;
}

// The one piece of process-wide state: a signal handler cannot reach the context. Written once
// before the handler is installed, read only by it.
char g_term_message[256];
size_t g_term_message_len = 0;

extern "C" void OnTerminate(int sig) {
  // mpirun and slurmstepd stop the surviving ranks with SIGTERM when one rank fails; say so
  // instead of vanishing, then die of the signal as before.
  (void)!write(STDERR_FILENO, g_term_message, g_term_message_len);
  signal(sig, SIG_DFL);
  raise(sig);
}

void InstallTerminateMessage(const std::string& who) {
  const std::string msg = absl::StrCat(
      "qtrain: ", who,
      ": stopped by SIGTERM from the launcher (another rank failed, or the job was cancelled)\n");
  g_term_message_len = std::min(msg.size(), sizeof(g_term_message));
  std::memcpy(g_term_message, msg.data(), g_term_message_len);
  struct sigaction sa;
  std::memset(&sa, 0, sizeof(sa));
  sa.sa_handler = OnTerminate;
  sigaction(SIGTERM, &sa, nullptr);
}

}  // namespace

bool IsAgreedError(const absl::Status& status) {
  return !status.ok() && status.GetPayload(kAgreedPayload).has_value();
}

uint64_t HashBytes(const void* data, size_t n, uint64_t seed) {
  constexpr uint64_t kPrime = 1099511628211ull;
  const unsigned char* p = static_cast<const unsigned char*>(data);
  uint64_t h = seed;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    h = (h ^ w) * kPrime;
  }
  for (; i < n; ++i) h = (h ^ p[i]) * kPrime;
  return h;
}

absl::StatusOr<uint64_t> ExecutableHash() {
  std::ifstream in("/proc/self/exe", std::ios::binary);
  if (!in) return absl::InternalError("cannot open /proc/self/exe to hash this binary");
  std::vector<char> buf(1 << 20);
  uint64_t h = HashBytes(nullptr, 0);
  while (in) {
    in.read(buf.data(), buf.size());
    h = HashBytes(buf.data(), static_cast<size_t>(in.gcount()), h);
  }
  if (in.bad()) return absl::InternalError("read error on /proc/self/exe");
  return h;
}

absl::StatusOr<std::unique_ptr<DistributedContext>> DistributedContext::Create(
    const DistributedSpec& spec) {
  const LaunchEnv env = DetectLaunchEnv();
  if (spec.backend() == DistributedSpec::BACKEND_UNSPECIFIED) {
    if (env.world_size > 1) {
      return absl::FailedPreconditionError(absl::StrCat(
          "this process is rank ", env.rank, " of ", env.world_size, " started by ", env.launcher,
          ", but the job sets no distributed.backend: add `distributed { backend: MPI }` to the "
          "job (or start a single process)"));
    }
    return SingleProcess(spec);
  }
  int initialized = 0;
  MPI_RETURN_IF_ERROR(MPI_Initialized(&initialized));
  bool owns = false;
  if (!initialized) {
    int provided = 0;
    MPI_RETURN_IF_ERROR(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided));
    owns = true;
    if (provided < MPI_THREAD_MULTIPLE) {
      std::fprintf(stderr,
                   "qtrain: warning: this MPI gives thread level %d, not MPI_THREAD_MULTIPLE; "
                   "the timeout watchdog may not be able to abort a hung collective\n",
                   provided);
    }
  }
  const int timeout_s = spec.timeout_s() > 0 ? spec.timeout_s() : kDefaultTimeoutS;
  absl::StatusOr<std::unique_ptr<MpiCommunicator>> mpi =
      MpiCommunicator::Create(absl::Seconds(timeout_s));
  if (!mpi.ok()) {
    if (owns) MPI_Finalize();
    return mpi.status();
  }
  const int rank = (*mpi)->rank(), world = (*mpi)->world_size();
  const std::string who = (*mpi)->who();
  absl::StatusOr<std::unique_ptr<DistributedContext>> ctx = Wrap(*std::move(mpi), spec);
  if (!ctx.ok()) {
    if (owns) MPI_Finalize();
    return ctx.status();
  }
  (*ctx)->owns_mpi_ = owns;
  (*ctx)->launcher_ = env.launcher;
  if (env.local_rank >= 0) (*ctx)->local_rank_ = env.local_rank;

  // The launcher and MPI must agree. The classic miss: `srun` without `--mpi=pmix` starts N
  // singleton MPI processes that each train alone.
  absl::Status agree;
  if (!env.launcher.empty() && (env.world_size != world || env.rank != rank)) {
    agree = absl::FailedPreconditionError(absl::StrCat(
        env.launcher, " started this process as rank ", env.rank, " of ", env.world_size,
        ", but MPI sees rank ", rank, " of ", world, ".",
        env.launcher == "srun"
            ? " Launch with `srun --mpi=pmix` (OpenMPI needs PMIx under srun) or use mpirun."
            : " Check that qtrain and mpirun come from the same MPI installation."));
  }
  if (!agree.ok()) return agree;  // every task sees the same mismatch: no collective needed
  if (world > 1) InstallTerminateMessage(who);
  return ctx;
}

std::unique_ptr<DistributedContext> DistributedContext::SingleProcess(
    const DistributedSpec& spec) {
  std::unique_ptr<DistributedContext> ctx(new DistributedContext());
  ctx->comm_ = std::make_unique<SingleProcessCommunicator>();
  if (spec.bucket_mb() > 0) ctx->bucket_bytes_ = int64_t{spec.bucket_mb()} << 20;
  if (spec.timeout_s() > 0) ctx->timeout_ = absl::Seconds(spec.timeout_s());
  ctx->hosts_ = {LocalHostName()};
  return ctx;
}

absl::StatusOr<std::unique_ptr<DistributedContext>> DistributedContext::Wrap(
    std::unique_ptr<Communicator> comm, const DistributedSpec& spec) {
  QT_CHECK_ARG(comm != nullptr, "DistributedContext::Wrap: null communicator");
  std::unique_ptr<DistributedContext> ctx(new DistributedContext());
  ctx->comm_ = std::move(comm);
  ctx->local_rank_ = ctx->comm_->local_rank();
  if (spec.bucket_mb() > 0) ctx->bucket_bytes_ = int64_t{spec.bucket_mb()} << 20;
  if (spec.timeout_s() > 0) ctx->timeout_ = absl::Seconds(spec.timeout_s());
  RETURN_IF_ERROR(ctx->GatherHosts());
  return ctx;
}

DistributedContext::~DistributedContext() {
  // The membership's thread may still act on the communicator: it goes first.
  membership_.reset();
  comm_.reset();
  if (owns_mpi_) {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Finalize();
  }
}

absl::Status DistributedContext::GatherHosts() {
  char mine[kHostBytes] = {0};
  const std::string host = LocalHostName();
  std::memcpy(mine, host.data(), std::min<size_t>(host.size(), kHostBytes - 1));
  std::vector<char> all(static_cast<size_t>(kHostBytes) * world_size());
  RETURN_IF_ERROR(comm_->AllGatherBytes(mine, all.data(), kHostBytes));
  hosts_.clear();
  for (int r = 0; r < world_size(); ++r) {
    const char* p = all.data() + static_cast<size_t>(r) * kHostBytes;
    hosts_.emplace_back(p, strnlen(p, kHostBytes));
  }
  return absl::OkStatus();
}

std::string DistributedContext::Who(int rank) const {
  const std::string host = rank >= 0 && rank < static_cast<int>(hosts_.size()) ? hosts_[rank] : "?";
  return absl::StrCat("rank ", rank, " (host ", host, ")");
}

absl::Status DistributedContext::VerifySameJob(uint64_t spec_hash) {
  if (world_size() == 1) return absl::OkStatus();
  absl::StatusOr<uint64_t> code = ExecutableHash();
  // A rank that cannot hash its binary says so through AllOk rather than leaving the others
  // waiting in the gather below.
  RETURN_IF_ERROR(AllOk(code.status(), "hashing the qtrain binary"));
  const uint64_t mine[2] = {spec_hash, *code};
  std::vector<uint64_t> all(2 * static_cast<size_t>(world_size()));
  RETURN_IF_ERROR(comm_->AllGatherBytes(mine, all.data(), sizeof(mine)));
  for (int r = 1; r < world_size(); ++r) {
    if (all[2 * r] != all[0]) {
      return MarkAgreed(absl::FailedPreconditionError(absl::StrFormat(
          "job spec mismatch: %s runs a job spec with hash %016x, %s one with hash %016x; every "
          "rank must load the same job file with the same command-line overrides",
          Who(r), all[2 * r], Who(0), all[0])));
    }
    if (all[2 * r + 1] != all[1]) {
      return MarkAgreed(absl::FailedPreconditionError(absl::StrFormat(
          "code version mismatch: %s runs a qtrain binary with hash %016x, %s one with hash "
          "%016x; build once and start the same binary on every node",
          Who(r), all[2 * r + 1], Who(0), all[1])));
    }
  }
  return absl::OkStatus();
}

absl::Status DistributedContext::AllOk(const absl::Status& local, absl::string_view what) {
  if (world_size() == 1) {
    if (local.ok()) return local;
    return MarkAgreed(absl::Status(local.code(), absl::StrCat(what, ": ", local.message())));
  }
  ASSIGN_OR_RETURN(std::vector<uint64_t> failed, comm_->AllGatherU64(local.ok() ? 0 : 1));
  const auto it = std::find(failed.begin(), failed.end(), 1u);
  if (it == failed.end()) return absl::OkStatus();
  const int first = static_cast<int>(it - failed.begin());
  std::string message = local.ok() ? "" : std::string(local.message());
  int32_t code = static_cast<int32_t>(local.code());
  RETURN_IF_ERROR(comm_->Broadcast(&code, sizeof(code), first));
  RETURN_IF_ERROR(BroadcastString(&message, first));
  if (first == rank()) {
    return MarkAgreed(absl::Status(local.code(), absl::StrCat(what, ": ", local.message())));
  }
  return MarkAgreed(absl::Status(static_cast<absl::StatusCode>(code),
                                 absl::StrCat(Who(first), ": ", what, ": ", message)));
}

absl::Status DistributedContext::BroadcastString(std::string* s, int root) {
  uint64_t size = s->size();
  RETURN_IF_ERROR(comm_->Broadcast(&size, sizeof(size), root));
  s->resize(size);
  return comm_->Broadcast(s->data(), static_cast<int64_t>(size), root);
}

absl::Status DistributedContext::VerifyIdentical(const float* data, int64_t n,
                                                 absl::string_view when) {
  if (world_size() == 1) return absl::OkStatus();
  ASSIGN_OR_RETURN(std::vector<uint64_t> hashes,
                   comm_->AllGatherU64(HashBytes(data, static_cast<size_t>(n) * sizeof(float))));
  for (int r = 1; r < world_size(); ++r) {
    if (hashes[r] != hashes[0]) {
      return MarkAgreed(absl::InternalError(absl::StrCat(
          "data-parallel replicas diverged ", when, ": the ", n, " values on ", Who(r),
          " differ from those on ", Who(0))));
    }
  }
  return absl::OkStatus();
}

void DistributedContext::SetMembership(std::unique_ptr<Membership> membership) {
  membership_ = std::move(membership);
}

void DistributedContext::Finish(const absl::Status& status) {
  if (membership_) membership_->Finish(status);
}

void DistributedContext::AbortJob(int exit_code) {
  if (world_size() == 1) return;
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) return;
  std::fflush(stdout);
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, exit_code);
}

}  // namespace qtrain
