// Training through the parameter service, end to end with real processes: 2 CPU ranks that meet
// through the service (launch/ps_local.sh, no MPI) match the mpirun run bit for bit; a killed
// rank and a hung rank are detected by the service and named to the survivor within the
// heartbeat timeout; a job whose node dies resumes from ps://JOB/latest on a fresh out_dir
// bit-identically; and a qtrain_ps SIGKILLed in the middle of a checkpoint upload comes back
// with every accepted checkpoint and metric row bit-identical, the partial upload invisible, and
// the next upload accepted.
#include <signal.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <regex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "absl/time/clock.h"
#include "distributed/ps/digest.h"
#include "distributed/ps/storage.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/distributed/test_util.h"
#include "tests/ps/ps_test_util.h"
#include "trainer/checkpoint.h"

namespace qtrain::ps::testing {
namespace {

namespace fs = std::filesystem;
using ::qtrain::testing::Child;
using ::qtrain::testing::MaxAbsDiff;
using ::qtrain::testing::MetricsRows;
using ::qtrain::testing::ProcessResult;
using ::qtrain::testing::ReadMetricsRows;
using ::qtrain::testing::ReadWeights;
using ::qtrain::testing::RunCommand;
using ::qtrain::testing::Runfile;
using ::qtrain::testing::TinyJob;
using ::testing::HasSubstr;

class TrainingTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    corpus_ = TmpDir() + "/ps_corpus";
    ASSERT_TRUE(::qtrain::testing::WriteCorpus(corpus_).ok());
  }

  TinyJob Job(const std::string& name) {
    TinyJob job;
    job.name = name;
    job.out_dir = TmpDir() + "/" + name;
    job.corpus_dir = corpus_;
    fs::remove_all(job.out_dir);
    return job;
  }

  // The job file without MPI (the service replaces it) plus `extra` lines.
  static std::string WriteServiceJob(const TinyJob& job, const std::string& extra = "") {
    std::string text = absl::StrReplaceAll(job.Text(), {{"backend: MPI ", ""}});
    const std::string path = absl::StrCat(TmpDir(), "/", job.name, ".textproto");
    std::ofstream(path) << text << extra;
    return path;
  }

  static std::vector<std::string> Env(const TestServer* s) {
    std::vector<std::string> env = {"QTRAIN_BIN=" + Runfile("trainer/qtrain"),
                                    "QTRAIN_PS_BIN=" + Runfile("distributed/ps/qtrain_ps"),
                                    "THREADS_PER_RANK=1", "NP=2"};
    if (s != nullptr) {
      env.push_back("PS_ADDRESS=" + s->address);
      env.push_back("QTRAIN_PS_TOKEN_FILE=" + s->config.token_file());
    }
    return env;
  }

  static std::map<std::string, std::vector<float>> Weights(const TinyJob& job, int step) {
    absl::StatusOr<std::map<std::string, std::vector<float>>> w =
        ReadWeights(CheckpointPath(job.out_dir, step));
    EXPECT_TRUE(w.ok()) << w.status();
    return w.ok() ? *w : std::map<std::string, std::vector<float>>();
  }

  static pid_t RankPid(const std::string& output, int rank) {
    std::smatch m;
    const std::regex re(absl::StrCat("rank ", rank, " pid ([0-9]+)"));
    return std::regex_search(output, m, re) ? std::stoi(m[1]) : -1;
  }

  static std::string corpus_;
};

std::string TrainingTest::corpus_;

TEST_F(TrainingTest, TwoRanksThroughTheServiceMatchMpirun) {
  TinyJob mpi = Job("via_mpirun");
  ProcessResult a = RunCommand(Runfile("launch/mpirun.sh") + " --quiet", 120,
                               {"NP=2", "JOB=" + mpi.Write(), "QTRAIN_BIN=" + Runfile("trainer/qtrain"),
                                "THREADS_PER_RANK=1"});
  ASSERT_EQ(a.exit_code, 0) << a.output;
  TinyJob svc = Job("via_service");
  // A private qtrain_ps started by the script: no MPI anywhere in this run.
  ProcessResult b = RunCommand(Runfile("launch/ps_local.sh") + " --quiet", 120,
                               [&] {
                                 auto env = Env(nullptr);
                                 env.push_back("JOB=" + WriteServiceJob(svc));
                                 env.push_back("PS_STREAM=1");
                                 return env;
                               }());
  ASSERT_EQ(b.exit_code, 0) << b.output;
  EXPECT_THAT(b.output, HasSubstr("private qtrain_ps at 127.0.0.1:"));
  const MetricsRows ma = ReadMetricsRows(mpi.out_dir), mb = ReadMetricsRows(svc.out_dir);
  ASSERT_EQ(ma.train_loss.size(), 10u);
  EXPECT_EQ(ma.train_loss, mb.train_loss);
  EXPECT_EQ(ma.val_loss, mb.val_loss);
  EXPECT_EQ(MaxAbsDiff(Weights(mpi, 10), Weights(svc, 10)), 0.0);
}

TEST_F(TrainingTest, KilledRankIsDetectedAndNamedWithinTheTimeout) {
  std::unique_ptr<TestServer> s = StartServer("killed_rank_ps", [](ServerConfig* c) {
    c->mutable_timeouts()->set_heartbeat_interval_ms(200);
    c->mutable_timeouts()->set_heartbeat_timeout_ms(1500);
  });
  ASSERT_NE(s, nullptr);
  auto client = ClientFor(*s);
  TinyJob job = Job("killed_rank");
  job.steps = 1000000;
  job.ckpt_every = 0;
  job.timeout_s = 60;  // far beyond the heartbeat timeout: the service must be what stops it
  std::vector<std::string> env = Env(s.get());
  env.push_back("JOB=" + WriteServiceJob(job));
  env.push_back("STOP_GRACE_S=2");
  for (const int signal : {SIGKILL, SIGSTOP}) {
    SCOPED_TRACE(signal == SIGKILL ? "killed" : "hung");
    fs::remove_all(job.out_dir);  // a fresh run each time
    Child launch(Runfile("launch/ps_local.sh"),
                 absl::StrCat(TmpDir(), "/killed_rank_", signal, ".log"), env);
    ASSERT_TRUE(launch.WaitForOutput("step     3/", 60)) << launch.Output();
    const pid_t rank1 = RankPid(launch.Output(), 1);
    ASSERT_GT(rank1, 0) << launch.Output();
    const absl::Time t0 = absl::Now();
    ASSERT_EQ(kill(rank1, signal), 0);
    // The survivor names the dead rank: for the killed one its connection closed at once, for
    // the hung one only the service can tell, after the heartbeat timeout (1.5 s).
    const std::string verdict = signal == SIGKILL ? "rank 1 (host " : "is dead: no heartbeat for";
    EXPECT_TRUE(launch.WaitForOutput(verdict, 10)) << launch.Output();
    const absl::Duration took = absl::Now() - t0;
    ProcessResult r = launch.Wait(30);
    if (signal == SIGSTOP) kill(rank1, SIGKILL);
    ASSERT_FALSE(r.timed_out) << r.output;
    EXPECT_NE(r.exit_code, 0) << r.output;
    // Within the heartbeat timeout, one sweep and one heartbeat interval, with slack.
    EXPECT_LT(took, absl::Seconds(4)) << r.output;
    EXPECT_THAT(r.output, HasSubstr("qtrain: rank 0: ")) << r.output;
    if (signal == SIGSTOP) {
      EXPECT_GE(took, absl::Milliseconds(1400));
      EXPECT_THAT(r.output, HasSubstr(absl::StrCat("stopped job killed_rank: rank 1 (host ")))
          << r.output;
    }
    // The service itself holds the verdict.
    absl::StatusOr<ListWorkersResponse> w = client->ListWorkers("killed_rank");
    ASSERT_TRUE(w.ok()) << w.status();
    EXPECT_EQ(w->state(), FAILED);
    ASSERT_EQ(w->workers_size(), 2);
    if (signal == SIGSTOP) {
      EXPECT_EQ(w->workers(1).state(), WorkerStatus::DEAD);
      EXPECT_THAT(w->failure(), HasSubstr(absl::StrCat("pid ", rank1, ") is dead")));
    } else {
      // The survivor saw the connection close at once and reported it before the timeout.
      EXPECT_THAT(w->failure(), HasSubstr("rank 1")) << w->failure();
    }
  }
}

TEST_F(TrainingTest, ResumeFromTheServiceOnAFreshOutDirIsBitIdentical) {
  std::unique_ptr<TestServer> s = StartServer("resume_ps");
  ASSERT_NE(s, nullptr);
  auto client = ClientFor(*s);
  const std::string qtrain = Runfile("trainer/qtrain");
  const std::vector<std::string> env = {"QTRAIN_PS_TOKEN_FILE=" + s->config.token_file(),
                                        "OMP_NUM_THREADS=1"};
  auto single = [](TinyJob job) {
    job.steps = 40;
    job.ckpt_every = 10;
    return absl::StrReplaceAll(job.Text(), {{"backend: MPI ", ""}});
  };
  // The reference: 40 steps without interruption, no service.
  TinyJob ref = Job("resume_ref");
  const std::string ref_file = TmpDir() + "/resume_ref.textproto";
  std::ofstream(ref_file) << single(ref);
  ProcessResult r0 = RunCommand(absl::StrCat(qtrain, " --quiet --job=", ref_file), 120, env);
  ASSERT_EQ(r0.exit_code, 0) << r0.output;
  // The same job on "node A", streaming to the service; the node dies after a checkpoint.
  TinyJob a = Job("resume_node_a");
  const std::string a_file = TmpDir() + "/resume_a.textproto";
  std::ofstream(a_file) << single(a) << "parameter_service { address: \"" << s->address
                        << "\" job_id: \"resumed\" }\n";
  Child node_a(absl::StrCat(qtrain, " --quiet --job=", a_file), TmpDir() + "/resume_a.log", env);
  int64_t latest = -1;
  for (int i = 0; i < 3000 && latest < 10; ++i) {
    absl::StatusOr<std::vector<CheckpointInfo>> l = client->ListCheckpoints("resumed");
    if (l.ok() && !l->empty()) latest = l->back().step();
    absl::SleepFor(absl::Milliseconds(10));
  }
  kill(node_a.pid(), SIGKILL);
  node_a.Wait(10);
  ASSERT_GE(latest, 10) << node_a.Output();
  // "Node B": a fresh out_dir, nothing but the service.
  TinyJob b = Job("resume_node_b");
  const std::string b_file = TmpDir() + "/resume_b.textproto";
  std::ofstream(b_file) << single(b) << "parameter_service { address: \"" << s->address
                        << "\" job_id: \"resumed\" }\n";
  ProcessResult rb = RunCommand(
      absl::StrCat(qtrain, " --job=", b_file, " --resume=ps://resumed/latest"), 120, env);
  ASSERT_EQ(rb.exit_code, 0) << rb.output;
  EXPECT_THAT(rb.output, HasSubstr("downloaded " + b.out_dir + "/checkpoints/step_"));
  EXPECT_EQ(MaxAbsDiff(Weights(ref, 40), Weights(b, 40)), 0.0);
  // The service's metrics are the uninterrupted run's, row for row, bit for bit.
  std::vector<MetricRow> rows;
  ASSERT_TRUE(client
                  ->WatchMetrics("resumed", -1, false,
                                 [&](const WatchMetricsResponse& m) {
                                   rows.insert(rows.end(), m.rows().begin(), m.rows().end());
                                   return true;
                                 })
                  .ok());
  const MetricsRows want = ReadMetricsRows(ref.out_dir);
  ASSERT_EQ(rows.size(), want.train_loss.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    EXPECT_EQ(rows[i].step(), static_cast<int64_t>(i + 1));
    for (const Metric& m : rows[i].metrics()) {
      if (m.name() == "train_loss") EXPECT_EQ(m.value(), want.train_loss[i]) << "step " << i + 1;
    }
  }
  // The service has the final checkpoint, bit-identical to node B's file.
  const std::string back = TmpDir() + "/resume_back.safetensors";
  ASSERT_TRUE(client->DownloadCheckpoint("resumed", 40, back).ok());
  std::ifstream f1(back, std::ios::binary), f2(CheckpointPath(b.out_dir, 40), std::ios::binary);
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(f1), {}),
            std::string(std::istreambuf_iterator<char>(f2), {}));
}

std::string RandomFile(const std::string& path, size_t n, uint64_t seed) {
  std::string data(n, '\0');
  uint64_t x = seed + 0x9E3779B97F4A7C15ull;
  for (char& c : data) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    c = static_cast<char>(x);
  }
  std::ofstream(path, std::ios::binary) << data;
  return data;
}

TEST_F(TrainingTest, ServerKilledMidUploadComesBackWithEverythingItAccepted) {
  const std::string dir = FreshDir("sigkill");
  const std::string token = WriteToken(dir);
  const std::string config = dir + "/ps.textproto";
  std::ofstream(config) << "address: \"127.0.0.1:0\"\nstorage_dir: \"" << dir
                        << "/storage\"\ntoken_file: \"" << dir << "/token\"\nport_file: \"" << dir
                        << "/port\"\n";
  const std::string ps = Runfile("distributed/ps/qtrain_ps");
  auto port = [&] {
    std::ifstream in(dir + "/port");
    int p = 0;
    in >> p;
    return p;
  };
  auto server = std::make_unique<Child>(absl::StrCat(ps, " --config=", config), dir + "/ps1.log");
  ASSERT_TRUE(server->WaitForOutput("serving on", 20)) << server->Output();
  const int first_port = port();
  TestServer target;  // only for ClientFor
  target.address = absl::StrCat("127.0.0.1:", first_port);
  target.token = token;
  auto client = ClientFor(target, [](ClientOptions* o) { o->deadline = absl::Seconds(15); });
  // Accepted before the kill: three checkpoints and 60 metric rows.
  std::vector<std::string> files;
  for (int i = 0; i < 3; ++i) {
    files.push_back(RandomFile(absl::StrCat(dir, "/c", i), (1 << 20) * (i + 1) + 11, i));
    ASSERT_TRUE(client->UploadCheckpoint("job", 10 * (i + 1), absl::StrCat(dir, "/c", i)).ok());
  }
  AppendMetricsRequest rows;
  rows.set_job_id("job");
  for (int st = 1; st <= 60; ++st) {
    MetricRow* r = rows.add_rows();
    r->set_step(st);
    Metric* m = r->add_metrics();
    m->set_name("train_loss");
    m->set_value(1.0 / (st * 3.0));
  }
  ASSERT_TRUE(client->AppendMetrics(rows).ok());
  // An upload of 8 MiB stops half way; the server dies while the stream is open.
  {
    auto stub = ParameterService::NewStub(client->channel());
    grpc::ClientContext ctx;
    client->Prepare(&ctx, absl::Now() + absl::Seconds(20));
    UploadCheckpointResponse resp;
    auto w = stub->UploadCheckpoint(&ctx, &resp);
    UploadCheckpointRequest m;
    m.mutable_header()->set_job_id("job");
    m.mutable_header()->set_step(40);
    m.mutable_header()->set_size(8 << 20);
    ASSERT_TRUE(w->Write(m));
    for (int i = 0; i < 4; ++i) {
      m.Clear();
      m.mutable_chunk()->set_offset(int64_t{i} << 20);
      m.mutable_chunk()->set_data(std::string(1 << 20, 'p'));
      m.mutable_chunk()->set_crc32c(Crc32c(m.chunk().data()));
      ASSERT_TRUE(w->Write(m));
    }
    // The partial exists on disk now.
    bool partial = false;
    for (int i = 0; i < 200 && !partial; ++i) {
      partial = !ListDir(dir + "/storage/jobs/job/checkpoints/.partial").empty();
      absl::SleepFor(absl::Milliseconds(10));
    }
    ASSERT_TRUE(partial);
    ASSERT_EQ(kill(server->pid(), SIGKILL), 0);
    server->Wait(10);
    ctx.TryCancel();
    w->Finish();
  }
  // Restart on the same storage and port.
  std::ofstream(config) << "address: \"127.0.0.1:" << first_port << "\"\nstorage_dir: \"" << dir
                        << "/storage\"\ntoken_file: \"" << dir << "/token\"\n";
  server = std::make_unique<Child>(absl::StrCat(ps, " --config=", config), dir + "/ps2.log");
  ASSERT_TRUE(server->WaitForOutput("serving on", 20)) << server->Output();
  absl::StatusOr<std::vector<CheckpointInfo>> list = client->ListCheckpoints("job");
  ASSERT_TRUE(list.ok()) << list.status();
  ASSERT_EQ(list->size(), 3u);  // step 40 is not visible
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ((*list)[i].step(), 10 * (i + 1));
    EXPECT_EQ((*list)[i].sha256(), Sha256Hex(files[i]));
    const std::string back = absl::StrCat(dir, "/back", i);
    ASSERT_TRUE(client->DownloadCheckpoint("job", 10 * (i + 1), back).ok());
    std::ifstream in(back, std::ios::binary);
    EXPECT_EQ(std::string(std::istreambuf_iterator<char>(in), {}), files[i]);
  }
  EXPECT_TRUE(ListDir(dir + "/storage/jobs/job/checkpoints/.partial").empty());
  std::vector<MetricRow> got;
  ASSERT_TRUE(client
                  ->WatchMetrics("job", -1, false,
                                 [&](const WatchMetricsResponse& m) {
                                   got.insert(got.end(), m.rows().begin(), m.rows().end());
                                   return true;
                                 })
                  .ok());
  ASSERT_EQ(got.size(), 60u);
  for (int st = 1; st <= 60; ++st) {
    EXPECT_EQ(got[st - 1].metrics(0).value(), 1.0 / (st * 3.0)) << st;  // bit for bit
  }
  // The next upload (the same client: its channel reconnected) is accepted.
  const std::string next = RandomFile(dir + "/c40", 3 << 20, 40);
  absl::StatusOr<CheckpointInfo> up = client->UploadCheckpoint("job", 40, dir + "/c40");
  ASSERT_TRUE(up.ok()) << up.status();
  EXPECT_EQ(up->sha256(), Sha256Hex(next));
  EXPECT_EQ(client->ListCheckpoints("job")->size(), 4u);
  kill(server->pid(), SIGTERM);
  EXPECT_EQ(server->Wait(10).exit_code, 0);
}

}  // namespace
}  // namespace qtrain::ps::testing
