// Helpers for the multi-process tests: a synthetic corpus, job files, runfiles, running the
// launch scripts and mpirun as child processes with deadlines, reading checkpoints back.
#ifndef QTRAIN_TESTS_DISTRIBUTED_TEST_UTIL_H_
#define QTRAIN_TESTS_DISTRIBUTED_TEST_UTIL_H_

#include <sys/types.h>

#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qtrain::testing {

// $TEST_TMPDIR (or /tmp).
std::string TmpDir();
// A file of this workspace in the test's runfiles ("trainer/qtrain", "launch/mpirun.sh").
std::string Runfile(const std::string& path);

// train_a.bin / val_a.bin in `dir`: repeated phrases with noise, ~40k tokens each (the
// trainer test's corpus).
absl::Status WriteCorpus(const std::string& dir);

// A tiny job (2 layers, d=32, T=32) on the corpus in `corpus_dir`, `steps` steps, a checkpoint
// every `ckpt_every`, with `extra` text-format lines appended (e.g. "optimizer { zero1: true }"
// must not repeat a message already set: use the setters below instead).
struct TinyJob {
  std::string name;
  std::string out_dir;
  std::string corpus_dir;
  int steps = 10;
  int batch_size = 4;
  int ckpt_every = 5;
  bool zero1 = false;
  int timeout_s = 60;
  int grad_accum = 1;
  std::string precision;  // body of a `precision { }` section; empty: none
  std::string Text() const;
  // Writes Text() to <TmpDir>/<name>.textproto and returns the path.
  std::string Write() const;
};

struct ProcessResult {
  int exit_code = -1;    // exit status, or 128 + signal
  double seconds = 0;    // wall time
  std::string output;    // stdout and stderr together
  bool timed_out = false;
};

// Runs `command` with bash, stdout+stderr to `log`, killing it (and its process group) after
// `deadline_s`. Extra environment entries in `env` ("NAME=value").
ProcessResult RunCommand(const std::string& command, double deadline_s,
                         const std::vector<std::string>& env = {});

// A child started in the background (its own process group), output to a file.
class Child {
 public:
  Child(const std::string& command, const std::string& log,
        const std::vector<std::string>& env = {});
  ~Child();  // kills the process group if still running
  pid_t pid() const { return pid_; }
  // Waits up to `deadline_s` for the child to exit.
  ProcessResult Wait(double deadline_s);
  std::string Output() const;
  // Waits until the output contains `text`; false after `deadline_s` or if the child exited.
  bool WaitForOutput(const std::string& text, double deadline_s);

 private:
  pid_t pid_ = -1;
  std::string log_;
  double start_ = 0;
  bool reaped_ = false;
  ProcessResult result_;
};

// Pids of the processes whose parent is `parent`.
std::vector<pid_t> ChildrenOf(pid_t parent);
// Value of variable `name` in the environment of process `pid` ("" when absent).
std::string EnvOf(pid_t pid, const std::string& name);
// The pid of MPI rank `rank` among the descendants of `launcher_pid` (mpirun, or a script
// around it); -1 when not found.
pid_t FindRank(pid_t launcher_pid, int rank);

// The "model/..." tensors of a checkpoint as float vectors.
absl::StatusOr<std::map<std::string, std::vector<float>>> ReadWeights(const std::string& path);
// Largest |a - b| over all tensors (both must have the same names and sizes).
double MaxAbsDiff(const std::map<std::string, std::vector<float>>& a,
                  const std::map<std::string, std::vector<float>>& b);

// The train_loss / val_loss columns of <out_dir>/metrics.jsonl, by step (val: 0 when absent).
struct MetricsRows {
  std::vector<double> train_loss, val_loss;
};
MetricsRows ReadMetricsRows(const std::string& out_dir);

double NowSeconds();

}  // namespace qtrain::testing

#endif  // QTRAIN_TESTS_DISTRIBUTED_TEST_UTIL_H_
