// DistributedContext: the one object that knows the ranks of a job (no globals). It starts MPI
// when the job asks for it, checks the launcher's view against MPI's, verifies at start that all
// ranks run the same job spec and binary, and turns per-rank failures into errors every rank sees.
#ifndef QTRAIN_DISTRIBUTED_DISTRIBUTED_CONTEXT_H_
#define QTRAIN_DISTRIBUTED_DISTRIBUTED_CONTEXT_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "configs/job_spec.pb.h"
#include "distributed/communicator.h"

namespace qtrain {

// Defaults of distributed.bucket_mb and distributed.timeout_s when the job leaves them 0.
constexpr int kDefaultBucketMb = 25;
constexpr int kDefaultTimeoutS = 300;

class DistributedContext {
 public:
  // A rank's membership in a job held elsewhere (the parameter service's worker session when
  // the job has distributed.coordinator): lives as long as the context, and learns how the run
  // ended so the other ranks can be told.
  class Membership {
   public:
    virtual ~Membership() = default;
    virtual void Finish(const absl::Status& status) = 0;
  };

  // distributed.backend unset: one process, no MPI; an error when a launcher started several
  // (they would all train alone and overwrite each other's checkpoints). MPI (and NCCL, whose
  // bootstrap is MPI): initialises MPI with MPI_THREAD_MULTIPLE (the watchdog thread may call
  // MPI_Abort) and checks MPI's world against the launcher's environment, which catches `srun`
  // without `--mpi=pmix` (every task a world of one). Collective under MPI.
  static absl::StatusOr<std::unique_ptr<DistributedContext>> Create(const DistributedSpec& spec);
  // One process, no MPI (tests, library callers).
  static std::unique_ptr<DistributedContext> SingleProcess(const DistributedSpec& spec = {});
  // Over a communicator set up elsewhere (tests; MPI stays the caller's). Collective.
  static absl::StatusOr<std::unique_ptr<DistributedContext>> Wrap(
      std::unique_ptr<Communicator> comm, const DistributedSpec& spec);
  // Frees the communicator, then finalises MPI if Create initialised it.
  ~DistributedContext();
  DistributedContext(const DistributedContext&) = delete;
  DistributedContext& operator=(const DistributedContext&) = delete;

  Communicator& comm() { return *comm_; }
  int rank() const { return comm_->rank(); }
  int world_size() const { return comm_->world_size(); }
  int local_rank() const { return local_rank_; }
  bool is_root() const { return rank() == 0; }
  // "mpirun", "srun", "pmi" or "" (started by hand).
  const std::string& launcher() const { return launcher_; }
  int64_t bucket_bytes() const { return bucket_bytes_; }
  absl::Duration timeout() const { return timeout_; }
  // "rank 1 (host node7)".
  std::string Who(int rank) const;

  // Collective. Every rank passes the hash of the job spec it runs (JobSpecHash, after every
  // command-line override); the hash of the running binary is added here. A difference is
  // FailedPrecondition on every rank, naming the first rank that differs from rank 0.
  absl::Status VerifySameJob(uint64_t spec_hash);

  // Collective. OK when `local` is OK on every rank. Otherwise every rank returns the error of
  // the lowest failing rank ("rank 2 (host h): <what>: <message>" on the others) marked as
  // agreed: see IsAgreedError.
  absl::Status AllOk(const absl::Status& local, absl::string_view what);

  // Collective: `s` on every rank <- root's.
  absl::Status BroadcastString(std::string* s, int root);

  // Collective: all ranks must hold bit-identical `data` (n floats), e.g. the parameters of
  // data-parallel replicas; a difference is Internal naming the rank and `when`.
  absl::Status VerifyIdentical(const float* data, int64_t n, absl::string_view when);

  // Stops every rank of an MPI job (MPI_Abort with `exit_code`). Returns only when there is
  // no MPI job (one process, or ranks that met through the parameter service: their peers see
  // the connection close); the caller then exits itself.
  void AbortJob(int exit_code);

  // Kept until the context goes (released before the communicator).
  void SetMembership(std::unique_ptr<Membership> membership);
  // The run ended with `status` (OK: cleanly); a no-op without a membership.
  void Finish(const absl::Status& status);

 private:
  DistributedContext() = default;
  absl::Status GatherHosts();

  std::unique_ptr<Communicator> comm_;
  std::unique_ptr<Membership> membership_;  // declared after comm_: destroyed first
  bool owns_mpi_ = false;
  std::string launcher_;
  int local_rank_ = 0;
  int64_t bucket_bytes_ = int64_t{kDefaultBucketMb} << 20;
  absl::Duration timeout_ = absl::Seconds(kDefaultTimeoutS);
  std::vector<std::string> hosts_;
};

// True for errors from DistributedContext::AllOk / VerifySameJob: every rank holds the same
// error, so the ranks can exit normally (only rank 0 printing it) instead of aborting the job.
bool IsAgreedError(const absl::Status& status);

// 64-bit FNV-1a over bytes, 8 at a time; `seed` chains calls.
uint64_t HashBytes(const void* data, size_t n, uint64_t seed = 14695981039346656037ull);

// Hash of the running executable's bytes (/proc/self/exe): equal binaries on every rank mean the
// same code version, whatever path or node they were started from.
absl::StatusOr<uint64_t> ExecutableHash();

}  // namespace qtrain

#endif  // QTRAIN_DISTRIBUTED_DISTRIBUTED_CONTEXT_H_
