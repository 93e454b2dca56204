// Test helpers: corpus, jobs, child processes, checkpoints.
#include "tests/distributed/test_util.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"
#include "ops/status_macros.h"
#include "trainer/rng.h"
#include "trainer/safetensors.h"
#include "trainer/shard.h"

namespace qtrain::testing {

namespace fs = std::filesystem;

double NowSeconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::string TmpDir() {
  const char* tmp = std::getenv("TEST_TMPDIR");
  return tmp ? tmp : "/tmp";
}

std::string Runfile(const std::string& path) {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* ws = std::getenv("TEST_WORKSPACE");
  if (srcdir == nullptr) return path;
  return absl::StrCat(srcdir, "/", ws ? ws : "qtrain", "/", path);
}

absl::Status WriteCorpus(const std::string& dir) {
  fs::create_directories(dir);
  Rng rng(11);
  const std::string phrases[] = {"the cat sat on the mat. ", "a dog ran in the park. ",
                                 "we like to read books. "};
  for (const std::string split : {"train", "val"}) {
    std::vector<uint16_t> tokens;
    while (tokens.size() < 40000) {
      const std::string& p = phrases[rng.NextU64() % 3];
      for (char c : p) tokens.push_back(static_cast<uint8_t>(c));
    }
    RETURN_IF_ERROR(WriteShard(absl::StrCat(dir, "/", split, "_a.bin"), tokens));
  }
  return absl::OkStatus();
}

std::string TinyJob::Text() const {
  return absl::StrCat(
      "name: \"", name, "\"\nseed: 7\nout_dir: \"", out_dir, "\"\n",
      "model { n_layer: 2 n_embd: 32 n_head: 4 max_seq_len: 32 }\n",
      "data { train_pattern: \"", corpus_dir, "/train_*.bin\" val_pattern: \"", corpus_dir,
      "/val_*.bin\" }\n",
      "optimizer { lr: 0.01", zero1 ? " zero1: true" : "", " }\n",
      precision.empty() ? "" : absl::StrCat("precision { ", precision, " }\n"),
      "schedule { warmup_steps: 2 }\n",
      "training { steps: ", steps, " batch_size: ", batch_size, " seq_len: 32 grad_accum: ",
      grad_accum, " }\n",
      "eval { every_steps: 5 batches: 2 }\n",
      "checkpoint { every_steps: ", ckpt_every, " keep_last: 0 }\n",
      "distributed { backend: MPI timeout_s: ", timeout_s, " }\n");
}

std::string TinyJob::Write() const {
  const std::string path = absl::StrCat(TmpDir(), "/", name, ".textproto");
  std::ofstream(path) << Text();
  return path;
}

namespace {

pid_t Spawn(const std::string& command, const std::string& log,
            const std::vector<std::string>& env) {
  const pid_t pid = fork();
  if (pid != 0) return pid;
  setpgid(0, 0);
  const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd >= 0) {
    dup2(fd, STDOUT_FILENO);
    dup2(fd, STDERR_FILENO);
    close(fd);
  }
  for (const std::string& e : env) putenv(strdup(e.c_str()));
  execl("/bin/bash", "bash", "-c", command.c_str(), static_cast<char*>(nullptr));
  _exit(127);
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

int DecodeStatus(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

}  // namespace

Child::Child(const std::string& command, const std::string& log,
             const std::vector<std::string>& env)
    : log_(log), start_(NowSeconds()) {
  pid_ = Spawn(command, log, env);
  setpgid(pid_, pid_);  // also from the parent: no race with the child's own call
}

Child::~Child() {
  if (!reaped_ && pid_ > 0) {
    kill(-pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
  }
}

ProcessResult Child::Wait(double deadline_s) {
  if (reaped_) return result_;
  const double end = NowSeconds() + deadline_s;
  int status = 0;
  for (;;) {
    const pid_t r = waitpid(pid_, &status, WNOHANG);
    if (r == pid_) break;
    if (NowSeconds() > end) {
      result_.timed_out = true;
      kill(-pid_, SIGKILL);
      waitpid(pid_, &status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  reaped_ = true;
  result_.exit_code = DecodeStatus(status);
  result_.seconds = NowSeconds() - start_;
  result_.output = ReadAll(log_);
  return result_;
}

std::string Child::Output() const { return ReadAll(log_); }

bool Child::WaitForOutput(const std::string& text, double deadline_s) {
  const double end = NowSeconds() + deadline_s;
  while (NowSeconds() < end) {
    if (Output().find(text) != std::string::npos) return true;
    int status = 0;
    if (!reaped_ && waitpid(pid_, &status, WNOHANG) == pid_) {
      reaped_ = true;
      result_.exit_code = DecodeStatus(status);
      result_.seconds = NowSeconds() - start_;
      result_.output = ReadAll(log_);
      return result_.output.find(text) != std::string::npos;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return false;
}

ProcessResult RunCommand(const std::string& command, double deadline_s,
                         const std::vector<std::string>& env) {
  static int counter = 0;
  const std::string log = absl::StrCat(TmpDir(), "/cmd_", getpid(), "_", ++counter, ".log");
  Child child(command, log, env);
  return child.Wait(deadline_s);
}

std::vector<pid_t> ChildrenOf(pid_t parent) {
  std::vector<pid_t> out;
  DIR* d = opendir("/proc");
  if (d == nullptr) return out;
  while (dirent* e = readdir(d)) {
    int pid = 0;
    if (!absl::SimpleAtoi(e->d_name, &pid)) continue;
    const std::string stat = ReadAll(absl::StrCat("/proc/", pid, "/stat"));
    // pid (comm) state ppid ...: comm may hold spaces, so parse after the last ')'.
    const size_t close = stat.rfind(')');
    if (close == std::string::npos) continue;
    std::vector<std::string> fields =
        absl::StrSplit(stat.substr(close + 2), ' ', absl::SkipEmpty());
    int ppid = 0;
    if (fields.size() > 1 && absl::SimpleAtoi(fields[1], &ppid) && ppid == parent) {
      out.push_back(pid);
    }
  }
  closedir(d);
  return out;
}

std::string EnvOf(pid_t pid, const std::string& name) {
  const std::string env = ReadAll(absl::StrCat("/proc/", pid, "/environ"));
  const std::string key = name + "=";
  for (absl::string_view entry : absl::StrSplit(env, '\0')) {
    if (absl::StartsWith(entry, key)) return std::string(entry.substr(key.size()));
  }
  return "";
}

pid_t FindRank(pid_t launcher_pid, int rank) {
  // Breadth-first over the descendants: the launcher may be a shell around mpirun.
  std::vector<pid_t> todo = {launcher_pid};
  for (size_t i = 0; i < todo.size() && i < 1000; ++i) {
    for (pid_t child : ChildrenOf(todo[i])) {
      if (EnvOf(child, "OMPI_COMM_WORLD_RANK") == absl::StrCat(rank)) return child;
      todo.push_back(child);
    }
  }
  return -1;
}

absl::StatusOr<std::map<std::string, std::vector<float>>> ReadWeights(const std::string& path) {
  ASSIGN_OR_RETURN(SafeTensors st, ReadSafeTensors(path));
  std::map<std::string, std::vector<float>> out;
  for (const auto& [name, t] : st.tensors) {
    if (!absl::StartsWith(name, "model/")) continue;
    std::vector<float> v(t.bytes.size() / sizeof(float));
    std::memcpy(v.data(), t.bytes.data(), v.size() * sizeof(float));
    out[name] = std::move(v);
  }
  if (out.empty()) return absl::NotFoundError(absl::StrCat(path, ": no model/ tensors"));
  return out;
}

double MaxAbsDiff(const std::map<std::string, std::vector<float>>& a,
                  const std::map<std::string, std::vector<float>>& b) {
  double worst = 0;
  for (const auto& [name, va] : a) {
    auto it = b.find(name);
    if (it == b.end() || it->second.size() != va.size()) return INFINITY;
    for (size_t i = 0; i < va.size(); ++i) {
      worst = std::max(worst, std::fabs(static_cast<double>(va[i]) - it->second[i]));
    }
  }
  return a.size() == b.size() ? worst : INFINITY;
}

MetricsRows ReadMetricsRows(const std::string& out_dir) {
  MetricsRows rows;
  std::ifstream in(out_dir + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    nlohmann::json j = nlohmann::json::parse(line);
    rows.train_loss.push_back(j.value("train_loss", 0.0));
    rows.val_loss.push_back(j.value("val_loss", 0.0));
  }
  return rows;
}

}  // namespace qtrain::testing
