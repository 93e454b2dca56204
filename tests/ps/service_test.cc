// The parameter service through its client: job specs, workers (registration rules, heartbeats,
// dead-worker detection naming the worker, stop orders), rendezvous, durable metrics and
// following them, checkpoints (upload, list, download bit-identical, integrity checks), the
// versioned tensor store (push, pull, pull-if-newer, optimistic versions, idempotent retries),
// limits, and a down server's error.
#include <unistd.h>

#include <fstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "distributed/ps/digest.h"
#include "distributed/ps/param_service.h"
#include "distributed/ps/storage.h"
#include "distributed/ps/tensor_store.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/ps/ps_test_util.h"

namespace qtrain::ps::testing {
namespace {

using ::testing::HasSubstr;

constexpr char kSpec[] =
    "name: \"svc\"\nmodel { n_layer: 2 n_embd: 64 n_head: 2 }\noptimizer { lr: 1e-3 }\n"
    "training { steps: 10 batch_size: 2 seq_len: 32 }\n";
constexpr char kSpec2[] =
    "name: \"svc\"\nseed: 4\nmodel { n_layer: 2 n_embd: 64 n_head: 2 }\n"
    "optimizer { lr: 1e-3 }\ntraining { steps: 10 batch_size: 2 seq_len: 32 }\n";

RegisterWorkerRequest Worker(const std::string& job, int rank, int world) {
  RegisterWorkerRequest r;
  r.set_job_id(job);
  r.set_rank(rank);
  r.set_world_size(world);
  r.set_host("testhost");
  r.set_pid(1000 + rank);
  r.set_binary_hash("b1");
  r.set_spec_hash("s1");
  r.set_peer_address(absl::StrCat("127.0.0.1:", 2000 + rank));
  r.set_heartbeat_timeout_ms(400);
  return r;
}

std::string WriteBytes(const std::string& path, size_t n, uint64_t seed) {
  std::string data(n, '\0');
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i < n; ++i) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    data[i] = static_cast<char>(x);
  }
  std::ofstream(path, std::ios::binary) << data;
  return data;
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

class ServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    server_ = StartServer(::testing::UnitTest::GetInstance()->current_test_info()->name(),
                          [](ServerConfig* c) {
                            c->mutable_timeouts()->set_heartbeat_interval_ms(100);
                            c->mutable_timeouts()->set_heartbeat_timeout_ms(1000);
                            c->mutable_retention()->set_keep_tensor_versions(3);
                          });
    ASSERT_NE(server_, nullptr);
    client_ = ClientFor(*server_);
  }
  std::unique_ptr<TestServer> server_;
  std::unique_ptr<PsClient> client_;
};

TEST_F(ServiceTest, JobSpecsAreValidatedStoredAndHashChecked) {
  absl::StatusOr<RegisterJobResponse> r = client_->RegisterJob("svc", kSpec);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->created());
  EXPECT_EQ(r->spec_sha256(), Sha256Hex(kSpec));
  EXPECT_FALSE(client_->RegisterJob("svc", kSpec)->created());  // idempotent
  absl::StatusOr<RegisterJobResponse> other = client_->RegisterJob("svc", kSpec2);
  EXPECT_EQ(other.status().code(), absl::StatusCode::kAlreadyExists) << other.status();
  EXPECT_TRUE(client_->RegisterJob("svc", kSpec2, true).ok());
  absl::StatusOr<GetJobSpecResponse> got = client_->GetJobSpec("svc");
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->spec_text(), kSpec2);
  // The loader's own messages come back for a bad spec.
  absl::StatusOr<RegisterJobResponse> bad = client_->RegisterJob("bad", "model { n_layer: -1 }");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("model.n_layer"));
  EXPECT_EQ(client_->RegisterJob("../etc", kSpec).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(client_->GetJobSpec("none").status().code(), absl::StatusCode::kNotFound);
}

TEST_F(ServiceTest, RegistrationRules) {
  ASSERT_TRUE(client_->RegisterWorker(Worker("reg", 0, 2)).ok());
  // The same rank twice, another world size, another spec or binary: refused with names.
  absl::StatusOr<RegisterWorkerResponse> twice = client_->RegisterWorker(Worker("reg", 0, 2));
  EXPECT_EQ(twice.status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(std::string(twice.status().message()), HasSubstr("rank 0 (host testhost, pid 1000)"));
  EXPECT_EQ(client_->RegisterWorker(Worker("reg", 1, 3)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  RegisterWorkerRequest spec = Worker("reg", 1, 2);
  spec.set_spec_hash("s2");
  absl::StatusOr<RegisterWorkerResponse> mismatch = client_->RegisterWorker(spec);
  EXPECT_EQ(mismatch.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(mismatch.status().message()), HasSubstr("job spec mismatch"));
  RegisterWorkerRequest bin = Worker("reg", 1, 2);
  bin.set_binary_hash("b2");
  EXPECT_THAT(std::string(client_->RegisterWorker(bin).status().message()),
              HasSubstr("code version mismatch"));
  // rank -1: the lowest free rank; a retried registration (same instance) is the same worker.
  RegisterWorkerRequest any = Worker("reg", -1, 2);
  any.set_instance_id("abc");
  absl::StatusOr<RegisterWorkerResponse> assigned = client_->RegisterWorker(any);
  ASSERT_TRUE(assigned.ok()) << assigned.status();
  EXPECT_EQ(assigned->rank(), 1);
  absl::StatusOr<RegisterWorkerResponse> again = client_->RegisterWorker(any);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->worker_id(), assigned->worker_id());
  EXPECT_EQ(client_->RegisterWorker(Worker("reg", 5, 2)).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(ServiceTest, RendezvousHandsEveryRankItsPeers) {
  std::vector<RegisterWorkerResponse> regs;
  for (int r = 0; r < 3; ++r) regs.push_back(*client_->RegisterWorker(Worker("rdv", r, 3)));
  std::vector<absl::StatusOr<RendezvousResponse>> got(3, absl::UnknownError(""));
  std::vector<std::thread> threads;
  for (int r = 0; r < 3; ++r) {
    threads.emplace_back([&, r] {
      RendezvousRequest req;
      req.set_job_id("rdv");
      req.set_worker_id(regs[r].worker_id());
      if (r == 0) req.set_bootstrap("nccl-unique-id");
      got[r] = client_->Rendezvous(req, absl::Seconds(10));
    });
    absl::SleepFor(absl::Milliseconds(50));  // rank 0 first, the others later: they all wait
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < 3; ++r) {
    ASSERT_TRUE(got[r].ok()) << got[r].status();
    EXPECT_EQ(got[r]->rank(), r);
    EXPECT_EQ(got[r]->world_size(), 3);
    EXPECT_EQ(got[r]->bootstrap(), "nccl-unique-id");
    EXPECT_EQ(got[r]->session_key(), got[0]->session_key());
    EXPECT_EQ(got[r]->session_key().size(), 32u);
    ASSERT_EQ(got[r]->peers_size(), 3);
    EXPECT_EQ(got[r]->peers(2).address(), "127.0.0.1:2002");
  }
  EXPECT_EQ(client_->ListWorkers("rdv")->state(), RUNNING);
}

TEST_F(ServiceTest, DeadWorkerIsDetectedWithinTheTimeoutAndNamed) {
  std::vector<RegisterWorkerResponse> regs;
  for (int r = 0; r < 2; ++r) regs.push_back(*client_->RegisterWorker(Worker("dead", r, 2)));
  // Rank 0 heartbeats every 100 ms, rank 1 never does (timeout 400 ms).
  const absl::Time start = absl::Now();
  absl::StatusOr<HeartbeatResponse> hb;
  absl::Time stopped_at;
  while (absl::Now() - start < absl::Seconds(5)) {
    HeartbeatRequest req;
    req.set_job_id("dead");
    req.set_worker_id(regs[0].worker_id());
    hb = client_->Heartbeat(req, absl::Seconds(1));
    ASSERT_TRUE(hb.ok()) << hb.status();
    if (hb->action() == HeartbeatResponse::STOP) {
      stopped_at = absl::Now();
      break;
    }
    absl::SleepFor(absl::Milliseconds(100));
  }
  ASSERT_EQ(hb->action(), HeartbeatResponse::STOP);
  EXPECT_THAT(hb->reason(), HasSubstr("rank 1 (host testhost, pid 1001) is dead"));
  EXPECT_THAT(hb->reason(), HasSubstr("heartbeat_timeout 0.4 s"));
  // Declared within the timeout plus the sweep and one heartbeat interval.
  EXPECT_LT(stopped_at - start, absl::Milliseconds(400 + 50 + 100 + 150));
  absl::StatusOr<ListWorkersResponse> w = client_->ListWorkers("dead");
  ASSERT_TRUE(w.ok());
  EXPECT_EQ(w->state(), FAILED);
  EXPECT_EQ(w->workers(1).state(), WorkerStatus::DEAD);
  EXPECT_EQ(w->workers(0).state(), WorkerStatus::ALIVE);
  // A fresh registration starts the next attempt.
  absl::StatusOr<RegisterWorkerResponse> next = client_->RegisterWorker(Worker("dead", 0, 2));
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_EQ(next->attempt(), 2);
}

TEST_F(ServiceTest, FailedLeaveStopsTheOthersAndCleanLeavesFinish) {
  auto a = *client_->RegisterWorker(Worker("leave", 0, 2));
  auto b = *client_->RegisterWorker(Worker("leave", 1, 2));
  LeaveRequest l;
  l.set_job_id("leave");
  l.set_worker_id(b.worker_id());
  l.set_failed(true);
  l.set_message("disk full");
  ASSERT_TRUE(client_->Leave(l).ok());
  HeartbeatRequest hb;
  hb.set_job_id("leave");
  hb.set_worker_id(a.worker_id());
  absl::StatusOr<HeartbeatResponse> r = client_->Heartbeat(hb, absl::Seconds(1));
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->action(), HeartbeatResponse::STOP);
  EXPECT_THAT(r->reason(), HasSubstr("rank 1 (host testhost, pid 1001) failed: disk full"));

  auto c = *client_->RegisterWorker(Worker("clean", 0, 1));
  l.set_job_id("clean");
  l.set_worker_id(c.worker_id());
  l.set_failed(false);
  ASSERT_TRUE(client_->Leave(l).ok());
  EXPECT_EQ(client_->ListWorkers("clean")->state(), FINISHED);
  // Unknown workers get NotFound (they re-register).
  hb.set_worker_id("nobody");
  EXPECT_EQ(client_->Heartbeat(hb, absl::Seconds(1)).status().code(), absl::StatusCode::kNotFound);
}

MetricRow Row(int64_t step, double loss) {
  MetricRow r;
  r.set_step(step);
  Metric* m = r.add_metrics();
  m->set_name("train_loss");
  m->set_value(loss);
  return r;
}

TEST_F(ServiceTest, MetricsAreDurableIdempotentAndFollowable) {
  AppendMetricsRequest req;
  req.set_job_id("met");
  for (int s = 1; s <= 5; ++s) *req.add_rows() = Row(s, 1.0 / s);
  absl::StatusOr<AppendMetricsResponse> r = client_->AppendMetrics(req);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->rows_stored(), 5);
  EXPECT_EQ(client_->AppendMetrics(req)->rows_stored(), 0);  // a retry stores nothing twice
  // The file is the trainer's format.
  const std::string file = server_->config.storage_dir() + "/jobs/met/metrics.jsonl";
  EXPECT_THAT(ReadAll(file), HasSubstr("{\"step\":3,\"train_loss\":0.3333333333333333}\n"));
  // A resumed run from step 3 replaces rows 4..5.
  AppendMetricsRequest resumed;
  resumed.set_job_id("met");
  resumed.set_truncate_after(3);
  *resumed.add_rows() = Row(4, 7.0);
  ASSERT_TRUE(client_->AppendMetrics(resumed).ok());
  std::vector<MetricRow> rows;
  ASSERT_TRUE(client_
                  ->WatchMetrics("met", -1, false,
                                 [&](const WatchMetricsResponse& m) {
                                   rows.insert(rows.end(), m.rows().begin(), m.rows().end());
                                   return true;
                                 })
                  .ok());
  ASSERT_EQ(rows.size(), 4u);
  EXPECT_EQ(rows[3].metrics(0).value(), 7.0);
  EXPECT_EQ(rows[2].metrics(0).value(), 1.0 / 3);  // bit-identical double
  // A follower sees rows as they come and ends when the job ends.
  auto w = *client_->RegisterWorker(Worker("met", 0, 1));
  std::vector<int64_t> seen;
  std::thread follower([&] {
    EXPECT_TRUE(client_
                    ->WatchMetrics("met", 4, true,
                                   [&](const WatchMetricsResponse& m) {
                                     for (const MetricRow& row : m.rows()) seen.push_back(row.step());
                                     return true;
                                   })
                    .ok());
  });
  for (int s = 5; s <= 7; ++s) {
    absl::SleepFor(absl::Milliseconds(50));
    AppendMetricsRequest more;
    more.set_job_id("met");
    *more.add_rows() = Row(s, 0.5);
    ASSERT_TRUE(client_->AppendMetrics(more).ok());
  }
  absl::SleepFor(absl::Milliseconds(100));
  LeaveRequest l;
  l.set_job_id("met");
  l.set_worker_id(w.worker_id());
  ASSERT_TRUE(client_->Leave(l).ok());
  follower.join();
  EXPECT_EQ(seen, (std::vector<int64_t>{5, 6, 7}));
  // Malformed batches are refused whole.
  AppendMetricsRequest bad;
  bad.set_job_id("met");
  *bad.add_rows() = Row(9, 1);
  *bad.add_rows() = Row(8, 1);
  EXPECT_EQ(client_->AppendMetrics(bad).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(client_->AppendMetrics(bad).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ServiceTest, CheckpointsRoundTripBitIdentical) {
  const std::string dir = FreshDir("ckpt_files");
  // Sizes around the 1 MiB chunk: empty, small, exact, one over.
  const std::vector<size_t> sizes = {0, 1000, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 17};
  for (size_t i = 0; i < sizes.size(); ++i) {
    const std::string path = absl::StrCat(dir, "/c", i);
    const std::string data = WriteBytes(path, sizes[i], i + 1);
    absl::StatusOr<CheckpointInfo> info = client_->UploadCheckpoint("ck", 10 * (i + 1), path);
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(info->size(), static_cast<int64_t>(sizes[i]));
    EXPECT_EQ(info->sha256(), Sha256Hex(data));
    const std::string back = absl::StrCat(dir, "/back", i, "/step.safetensors");
    absl::StatusOr<CheckpointInfo> down = client_->DownloadCheckpoint("ck", 10 * (i + 1), back);
    ASSERT_TRUE(down.ok()) << down.status();
    EXPECT_EQ(ReadAll(back), data) << "size " << sizes[i];
  }
  absl::StatusOr<std::vector<CheckpointInfo>> list = client_->ListCheckpoints("ck");
  ASSERT_TRUE(list.ok());
  ASSERT_EQ(list->size(), sizes.size());
  EXPECT_EQ(list->back().step(), 50);
  // -1 is the latest; the stored name is the trainer's.
  const std::string latest = dir + "/latest/x";
  EXPECT_EQ(client_->DownloadCheckpoint("ck", -1, latest)->step(), 50);
  EXPECT_EQ(ReadAll(latest), ReadAll(dir + "/c4"));
  EXPECT_EQ(::access((server_->config.storage_dir() + "/jobs/ck/checkpoints/step_00000050.safetensors")
                         .c_str(),
                     F_OK),
            0);
  // keep_last prunes the oldest.
  ASSERT_TRUE(client_->UploadCheckpoint("ck", 60, dir + "/c1", 2).ok());
  EXPECT_EQ(client_->ListCheckpoints("ck")->size(), 2u);
  EXPECT_EQ(client_->DownloadCheckpoint("ck", 10, dir + "/gone").status().code(),
            absl::StatusCode::kNotFound);
}

TEST_F(ServiceTest, CorruptOrIncompleteUploadsAreRefusedAndInvisible) {
  auto stub = ParameterService::NewStub(client_->channel());
  auto upload = [&](std::vector<UploadCheckpointRequest> msgs) {
    grpc::ClientContext ctx;
    client_->Prepare(&ctx, absl::Now() + absl::Seconds(5));
    UploadCheckpointResponse resp;
    auto w = stub->UploadCheckpoint(&ctx, &resp);
    for (auto& m : msgs) {
      if (!w->Write(m)) break;
    }
    w->WritesDone();
    return w->Finish();
  };
  UploadCheckpointRequest header;
  header.mutable_header()->set_job_id("bad");
  header.mutable_header()->set_step(1);
  header.mutable_header()->set_size(4);
  UploadCheckpointRequest chunk;
  chunk.mutable_chunk()->set_offset(0);
  chunk.mutable_chunk()->set_data("abcd");
  chunk.mutable_chunk()->set_crc32c(Crc32c("abcd"));
  UploadCheckpointRequest trailer;
  trailer.mutable_trailer()->set_sha256(Sha256Hex("abcd"));
  UploadCheckpointRequest bad_crc = chunk;
  bad_crc.mutable_chunk()->set_crc32c(1);
  UploadCheckpointRequest bad_sha = trailer;
  bad_sha.mutable_trailer()->set_sha256(Sha256Hex("abce"));
  UploadCheckpointRequest gap = chunk;
  gap.mutable_chunk()->set_offset(1);
  EXPECT_EQ(upload({header, bad_crc, trailer}).error_code(), grpc::StatusCode::DATA_LOSS);
  EXPECT_EQ(upload({header, chunk, bad_sha}).error_code(), grpc::StatusCode::DATA_LOSS);
  EXPECT_EQ(upload({header, gap, trailer}).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(upload({header, chunk}).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(upload({chunk}).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(client_->ListCheckpoints("bad")->empty());
  EXPECT_TRUE(
      ListDir(server_->config.storage_dir() + "/jobs/bad/checkpoints/.partial").empty());
  EXPECT_TRUE(upload({header, chunk, trailer}).ok());
  EXPECT_EQ(client_->ListCheckpoints("bad")->size(), 1u);
}

TEST_F(ServiceTest, TensorSetsAreVersioned) {
  std::vector<float> a(1000), b(3);
  for (size_t i = 0; i < a.size(); ++i) a[i] = 0.5f * i;
  b = {1, 2, 3};
  TensorIn ta{TensorSpec(), absl::string_view(reinterpret_cast<char*>(a.data()), a.size() * 4)};
  ta.spec.set_name("lora.A");
  ta.spec.set_dtype("F32");
  ta.spec.add_shape(10);
  ta.spec.add_shape(100);
  TensorIn tb{TensorSpec(), absl::string_view(reinterpret_cast<char*>(b.data()), 12)};
  tb.spec.set_name("lora.B");
  tb.spec.set_dtype("F32");
  tb.spec.add_shape(3);
  absl::StatusOr<int64_t> v1 = client_->PushTensors("global", {ta, tb}, {{"round", "1"}}, 0);
  ASSERT_TRUE(v1.ok()) << v1.status();
  EXPECT_EQ(*v1, 1);
  // Optimistic versions: a push that expects version 0 again loses.
  EXPECT_EQ(client_->PushTensors("global", {ta}, {}, 0).status().code(),
            absl::StatusCode::kAborted);
  EXPECT_EQ(*client_->PushTensors("global", {tb, ta}, {{"round", "2"}}, 1), 2);
  absl::StatusOr<std::optional<TensorSetData>> pulled = client_->PullTensors("global", 1);
  ASSERT_TRUE(pulled.ok() && pulled->has_value()) << pulled.status();
  EXPECT_EQ((*pulled)->info.version(), 1);
  EXPECT_EQ((*pulled)->info.metadata().at("round"), "1");
  ASSERT_EQ((*pulled)->data.size(), 2u);
  EXPECT_EQ((*pulled)->data[0], std::string(ta.data));
  EXPECT_EQ((*pulled)->info.tensors(1).name(), "lora.B");
  // Pull-if-newer.
  EXPECT_FALSE(client_->PullTensors("global", 0, 2)->has_value());
  absl::StatusOr<std::optional<TensorSetData>> newer = client_->PullTensors("global", 0, 1);
  ASSERT_TRUE(newer.ok() && newer->has_value());
  EXPECT_EQ((*newer)->info.version(), 2);
  EXPECT_EQ((*newer)->info.tensors(0).name(), "lora.B");
  // The stored file is plain safetensors, readable in-process too.
  absl::StatusOr<StoredTensorSet> in_process = server_->server->env().tensors->Get("global", 2);
  ASSERT_TRUE(in_process.ok()) << in_process.status();
  EXPECT_EQ(in_process->tensors[1].bytes, std::string(ta.data));
  // Retention keeps 3 versions.
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(client_->PushTensors("global", {tb}).ok());
  EXPECT_EQ(client_->PullTensors("global", 1).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(client_->ListTensorSets()->at(0).version(), 5);
  // Hostile headers.
  TensorIn bad = tb;
  bad.spec.set_dtype("F33");
  EXPECT_EQ(client_->PushTensors("global", {bad}).status().code(),
            absl::StatusCode::kInvalidArgument);
  bad = tb;
  bad.spec.add_shape(1LL << 40);
  EXPECT_EQ(client_->PushTensors("global", {bad}).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(client_->PushTensors("global", {tb, tb}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(ServiceDownTest, ADownServerIsAClearErrorWithinTheDeadline) {
  // A port nobody listens on: a fresh server's, after it stopped.
  std::unique_ptr<TestServer> s = StartServer("down");
  ASSERT_NE(s, nullptr);
  const std::string address = s->address;
  s->server->Shutdown();
  s->server.reset();
  auto client = ClientFor(*s, [](ClientOptions* o) { o->deadline = absl::Seconds(2); });
  const absl::Time t0 = absl::Now();
  absl::StatusOr<StatusResponse> r = client->Status();
  const absl::Duration took = absl::Now() - t0;
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("parameter service at " + address));
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("attempts"));
  EXPECT_LT(took, absl::Seconds(2.5));
  const std::string file = FreshDir("down_files") + "/f";
  WriteBytes(file, 10, 1);
  EXPECT_EQ(client->UploadCheckpoint("j", 1, file).status().code(),
            absl::StatusCode::kUnavailable);
}

}  // namespace
}  // namespace qtrain::ps::testing
