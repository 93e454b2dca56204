// PsClient: channel set-up, the retry loop, and the streaming calls.
#include "distributed/ps/client.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "distributed/ps/auth.h"
#include "distributed/ps/digest.h"
#include "distributed/ps/dtype.h"
#include "distributed/ps/storage.h"
#include "grpcpp/create_channel.h"
#include "grpcpp/support/channel_arguments.h"

namespace qtrain::ps {
namespace {

absl::Status FromGrpcStatus(const grpc::Status& s) {
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

std::string Dirname(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

}  // namespace

absl::StatusOr<std::unique_ptr<PsClient>> PsClient::Create(ClientOptions options) {
  if (options.address.empty()) return absl::InvalidArgumentError("PsClient: no address");
  if (options.token.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("PsClient for ", options.address, ": no bearer token"));
  }
  if (options.chunk_bytes <= 0 || options.chunk_bytes > (4 << 20)) {
    return absl::InvalidArgumentError("PsClient: chunk_bytes must be in (0, 4 MiB]");
  }
  absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> creds = MakeChannelCredentials(
      options.tls_ca_file, options.tls_cert_file, options.tls_key_file);
  if (!creds.ok()) return creds.status();
  grpc::ChannelArguments args;
  // Reconnect quickly once a restarted server is back (gRPC's default waits up to 2 minutes).
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 20000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  args.SetMaxReceiveMessageSize(16 << 20);
  args.SetMaxSendMessageSize(16 << 20);
  if (!options.tls_server_name.empty()) {
    args.SetSslTargetNameOverride(options.tls_server_name);
  }
  std::unique_ptr<PsClient> c(new PsClient(std::move(options)));
  c->channel_ = grpc::CreateCustomChannel(c->options_.address, *creds, args);
  c->stub_ = ParameterService::NewStub(c->channel_);
  return c;
}

void PsClient::Prepare(grpc::ClientContext* ctx, absl::Time deadline) const {
  ctx->AddMetadata(kAuthorizationKey, absl::StrCat(kBearerPrefix, options_.token));
  if (deadline != absl::InfiniteFuture()) ctx->set_deadline(absl::ToChronoTime(deadline));
}

absl::Duration PsClient::TransferBudget(int64_t bytes) const {
  return options_.deadline + absl::Seconds(static_cast<double>(bytes) /
                                           std::max(1.0, options_.min_transfer_bytes_per_s));
}

absl::Status PsClient::Call(const std::string& what, bool idempotent, absl::Duration budget,
                            const std::function<grpc::Status(grpc::ClientContext*)>& attempt) const {
  const absl::Time start = absl::Now();
  const absl::Time end = start + budget;
  absl::Duration backoff = options_.initial_backoff;
  thread_local std::mt19937_64 rng(std::random_device{}());
  for (int n = 1;; ++n) {
    grpc::ClientContext ctx;
    Prepare(&ctx, end);
    const grpc::Status s = attempt(&ctx);
    if (s.ok()) return absl::OkStatus();
    const bool retry = idempotent && s.error_code() == grpc::StatusCode::UNAVAILABLE &&
                       n < options_.max_attempts;
    // Full jitter: many workers retrying after one restart do not come back in lockstep.
    const absl::Duration wait =
        backoff * std::uniform_real_distribution<double>(0.5, 1.0)(rng);
    if (!retry || absl::Now() + wait >= end) {
      return absl::Status(
          static_cast<absl::StatusCode>(s.error_code()),
          absl::StrFormat("parameter service at %s: %s: %s (%d attempt%s in %.1f s)",
                          options_.address, what, s.error_message(), n, n == 1 ? "" : "s",
                          absl::ToDoubleSeconds(absl::Now() - start)));
    }
    absl::SleepFor(wait);
    backoff = std::min(2 * backoff, options_.max_backoff);
  }
}

#define QT_PS_UNARY(Method, idempotent, request, response)                                  \
  Call(#Method, idempotent, options_.deadline, [&](grpc::ClientContext* ctx) {              \
    return stub_->Method(ctx, request, response);                                           \
  })

absl::StatusOr<StatusResponse> PsClient::Status(const std::string& job_id) {
  StatusRequest req;
  req.set_job_id(job_id);
  StatusResponse resp;
  if (absl::Status s = QT_PS_UNARY(Status, true, req, &resp); !s.ok()) return s;
  return resp;
}

absl::StatusOr<RegisterJobResponse> PsClient::RegisterJob(const std::string& job_id,
                                                          const std::string& spec_text,
                                                          bool replace) {
  RegisterJobRequest req;
  req.set_job_id(job_id);
  req.set_spec_text(spec_text);
  req.set_replace(replace);
  RegisterJobResponse resp;
  // Idempotent: the same spec registered twice is one registration.
  if (absl::Status s = QT_PS_UNARY(RegisterJob, true, req, &resp); !s.ok()) return s;
  return resp;
}

absl::StatusOr<GetJobSpecResponse> PsClient::GetJobSpec(const std::string& job_id) {
  GetJobSpecRequest req;
  req.set_job_id(job_id);
  GetJobSpecResponse resp;
  if (absl::Status s = QT_PS_UNARY(GetJobSpec, true, req, &resp); !s.ok()) return s;
  const std::string sha = Sha256Hex(resp.spec_text());
  if (sha != resp.spec_sha256()) {
    return absl::DataLossError(absl::StrCat("parameter service at ", options_.address,
                                            ": the spec of job ", job_id, " hashes to ", sha,
                                            ", the service says ", resp.spec_sha256()));
  }
  return resp;
}

absl::StatusOr<RegisterWorkerResponse> PsClient::RegisterWorker(
    const RegisterWorkerRequest& request) {
  RegisterWorkerResponse resp;
  // Idempotent through instance_id.
  if (absl::Status s = QT_PS_UNARY(RegisterWorker, !request.instance_id().empty(), request, &resp);
      !s.ok()) {
    return s;
  }
  return resp;
}

absl::StatusOr<HeartbeatResponse> PsClient::Heartbeat(const HeartbeatRequest& request,
                                                      absl::Duration deadline) {
  HeartbeatResponse resp;
  absl::Status s = Call("Heartbeat", false, deadline, [&](grpc::ClientContext* ctx) {
    return stub_->Heartbeat(ctx, request, &resp);
  });
  if (!s.ok()) return s;
  return resp;
}

absl::Status PsClient::Leave(const LeaveRequest& request) {
  LeaveResponse resp;
  return QT_PS_UNARY(Leave, true, request, &resp);
}

absl::StatusOr<ListWorkersResponse> PsClient::ListWorkers(const std::string& job_id) {
  ListWorkersRequest req;
  req.set_job_id(job_id);
  ListWorkersResponse resp;
  if (absl::Status s = QT_PS_UNARY(ListWorkers, true, req, &resp); !s.ok()) return s;
  return resp;
}

absl::StatusOr<RendezvousResponse> PsClient::Rendezvous(const RendezvousRequest& request,
                                                        absl::Duration timeout) {
  RendezvousResponse resp;
  absl::Status s = Call("Rendezvous", true, timeout, [&](grpc::ClientContext* ctx) {
    return stub_->Rendezvous(ctx, request, &resp);
  });
  if (!s.ok()) return s;
  return resp;
}

absl::StatusOr<AppendMetricsResponse> PsClient::AppendMetrics(const AppendMetricsRequest& request) {
  AppendMetricsResponse resp;
  if (absl::Status s = QT_PS_UNARY(AppendMetrics, true, request, &resp); !s.ok()) return s;
  return resp;
}

absl::Status PsClient::WatchMetrics(
    const std::string& job_id, int64_t after_step, bool follow,
    const std::function<bool(const WatchMetricsResponse&)>& on_rows) {
  int64_t after = after_step;
  bool stopped = false;
  // A follow has no overall deadline: each reconnection gets the usual retry budget.
  for (;;) {
    absl::Status s = Call("WatchMetrics", true, follow ? absl::InfiniteDuration() : options_.deadline,
                          [&](grpc::ClientContext* ctx) {
                            WatchMetricsRequest req;
                            req.set_job_id(job_id);
                            req.set_after_step(after);
                            req.set_follow(follow);
                            auto reader = stub_->WatchMetrics(ctx, req);
                            WatchMetricsResponse msg;
                            while (reader->Read(&msg)) {
                              if (msg.rows_size() > 0) after = msg.rows(msg.rows_size() - 1).step();
                              if (!on_rows(msg)) {
                                stopped = true;
                                ctx->TryCancel();
                                break;
                              }
                            }
                            const grpc::Status st = reader->Finish();
                            return stopped ? grpc::Status::OK : st;
                          });
    if (!s.ok() || stopped || !follow) return s;
    // The server ends a follow when the job ends or after its follow_timeout: on the latter,
    // come back for more.
    absl::StatusOr<ListWorkersResponse> w = ListWorkers(job_id);
    if (!w.ok()) return w.status();
    if (w->state() == FAILED || w->state() == FINISHED) return absl::OkStatus();
  }
}

absl::StatusOr<CheckpointInfo> PsClient::UploadCheckpoint(const std::string& job_id,
                                                          int64_t step, const std::string& path,
                                                          int keep_last) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return absl::NotFoundError(absl::StrCat("cannot open checkpoint ", path));
  const int64_t size = ::lseek(fd, 0, SEEK_END);
  UploadCheckpointResponse resp;
  std::string local_error;
  absl::Status s = Call(
      absl::StrCat("UploadCheckpoint of ", path), true, TransferBudget(size),
      [&](grpc::ClientContext* ctx) {
        auto writer = stub_->UploadCheckpoint(ctx, &resp);
        UploadCheckpointRequest msg;
        UploadCheckpointRequest::Header* h = msg.mutable_header();
        h->set_job_id(job_id);
        h->set_step(step);
        h->set_size(size);
        h->set_keep_last(keep_last);
        bool ok = writer->Write(msg);
        Sha256 sha;
        int64_t offset = 0;
        msg.Clear();
        Chunk* c = msg.mutable_chunk();  // reused: its buffer keeps its capacity
        while (ok && offset < size) {
          const int64_t n = std::min(options_.chunk_bytes, size - offset);
          std::string* data = c->mutable_data();
          data->resize(n);
          int64_t got = 0;
          while (got < n) {
            const ssize_t r = ::pread(fd, data->data() + got, n - got, offset + got);
            if (r <= 0) break;
            got += r;
          }
          if (got != n) {
            local_error = absl::StrCat(path, " shrank while being uploaded (read ", offset + got,
                                       " of ", size, " bytes)");
            ctx->TryCancel();
            ok = false;
            break;
          }
          c->set_offset(offset);
          c->set_crc32c(Crc32c(*data));
          sha.Update(*data);
          ok = writer->Write(msg);
          offset += n;
        }
        if (ok) {
          msg.Clear();
          msg.mutable_trailer()->set_sha256(sha.HexDigest());
          ok = writer->Write(msg);
        }
        if (ok) writer->WritesDone();
        grpc::Status st = writer->Finish();
        if (!local_error.empty()) return grpc::Status(grpc::StatusCode::DATA_LOSS, local_error);
        return st;
      });
  ::close(fd);
  if (!s.ok()) return s;
  return resp.checkpoint();
}

absl::StatusOr<std::vector<CheckpointInfo>> PsClient::ListCheckpoints(const std::string& job_id) {
  ListCheckpointsRequest req;
  req.set_job_id(job_id);
  ListCheckpointsResponse resp;
  if (absl::Status s = QT_PS_UNARY(ListCheckpoints, true, req, &resp); !s.ok()) return s;
  return std::vector<CheckpointInfo>(resp.checkpoints().begin(), resp.checkpoints().end());
}

absl::StatusOr<CheckpointInfo> PsClient::DownloadCheckpoint(const std::string& job_id,
                                                            int64_t step,
                                                            const std::string& dest_path) {
  if (absl::Status s = MakeDirs(Dirname(dest_path)); !s.ok()) return s;
  std::unique_ptr<PartialFile> file;
  std::unique_ptr<Sha256> sha;
  CheckpointInfo info;
  int64_t offset = 0;
  std::string local_error;
  // The size is unknown until the first message: budget for a large one, the server's
  // stream is bounded anyway.
  absl::Status s = Call(
      absl::StrCat("DownloadCheckpoint of job ", job_id), true, TransferBudget(int64_t{64} << 30),
      [&](grpc::ClientContext* ctx) {
        DownloadCheckpointRequest req;
        req.set_job_id(job_id);
        // After the first attempt, stay with the checkpoint it chose.
        req.set_step(file ? info.step() : step);
        req.set_offset(offset);
        auto reader = stub_->DownloadCheckpoint(ctx, req);
        DownloadCheckpointResponse msg;
        while (reader->Read(&msg)) {
          if (msg.has_info()) {
            if (file && msg.info().sha256() != info.sha256()) {
              local_error = "the checkpoint was replaced on the server during the download";
              break;
            }
            if (!file) {
              info = msg.info();
              absl::StatusOr<std::unique_ptr<PartialFile>> f = PartialFile::Create(Dirname(dest_path));
              if (!f.ok()) {
                local_error = std::string(f.status().message());
                break;
              }
              file = *std::move(f);
              sha = std::make_unique<Sha256>();
            }
            continue;
          }
          const Chunk& c = msg.chunk();
          if (!file || c.offset() != offset || Crc32c(c.data()) != c.crc32c()) {
            local_error = absl::StrCat("chunk at offset ", c.offset(),
                                       " is out of order or corrupted (CRC32C)");
            break;
          }
          if (absl::Status w = file->Write(c.data()); !w.ok()) {
            local_error = std::string(w.message());
            break;
          }
          sha->Update(c.data());
          offset += static_cast<int64_t>(c.data().size());
        }
        if (!local_error.empty()) {
          ctx->TryCancel();
          reader->Finish();
          return grpc::Status(grpc::StatusCode::DATA_LOSS, local_error);
        }
        return reader->Finish();
      });
  if (!s.ok()) return s;
  if (!file || offset != info.size()) {
    return absl::DataLossError(absl::StrCat("download of job ", job_id, "'s checkpoint from ",
                                            options_.address, " ended after ", offset, " of ",
                                            info.size(), " bytes"));
  }
  const std::string got = sha->HexDigest();
  if (got != info.sha256()) {
    return absl::DataLossError(absl::StrCat("download of job ", job_id, "'s checkpoint step ",
                                            info.step(), ": SHA-256 ", got, ", the service says ",
                                            info.sha256()));
  }
  if (absl::Status c = file->Commit(dest_path); !c.ok()) return c;
  return info;
}

absl::StatusOr<int64_t> PsClient::PushTensors(const std::string& name,
                                              const std::vector<TensorIn>& tensors,
                                              const std::map<std::string, std::string>& metadata,
                                              std::optional<int64_t> expected_version) {
  int64_t total = 0;
  for (const TensorIn& t : tensors) total += static_cast<int64_t>(t.data.size());
  const std::string key = RandomId();
  PushTensorsResponse resp;
  absl::Status s = Call(
      absl::StrCat("PushTensors of set ", name), true, TransferBudget(total),
      [&](grpc::ClientContext* ctx) {
        auto writer = stub_->PushTensors(ctx, &resp);
        PushTensorsRequest msg;
        PushTensorsRequest::Header* h = msg.mutable_header();
        h->set_name(name);
        for (const TensorIn& t : tensors) *h->add_tensors() = t.spec;
        for (const auto& [k, v] : metadata) (*h->mutable_metadata())[k] = v;
        if (expected_version) h->set_expected_version(*expected_version);
        h->set_idempotency_key(key);
        bool ok = writer->Write(msg);
        for (size_t i = 0; ok && i < tensors.size(); ++i) {
          for (int64_t off = 0; ok && off < static_cast<int64_t>(tensors[i].data.size());
               off += options_.chunk_bytes) {
            msg.Clear();
            TensorData* d = msg.mutable_data();
            d->set_tensor(static_cast<int>(i));
            d->set_offset(off);
            d->set_data(std::string(tensors[i].data.substr(off, options_.chunk_bytes)));
            d->set_crc32c(Crc32c(d->data()));
            ok = writer->Write(msg);
          }
        }
        if (ok) writer->WritesDone();
        return writer->Finish();
      });
  if (!s.ok()) return s;
  return resp.version();
}

absl::StatusOr<std::optional<TensorSetData>> PsClient::PullTensors(const std::string& name,
                                                                   int64_t version,
                                                                   int64_t if_newer_than) {
  TensorSetData out;
  bool unchanged = false;
  std::string local_error;
  absl::Status s = Call(
      absl::StrCat("PullTensors of set ", name), true, TransferBudget(int64_t{16} << 30),
      [&](grpc::ClientContext* ctx) {
        out = TensorSetData();
        PullTensorsRequest req;
        req.set_name(name);
        req.set_version(version);
        req.set_if_newer_than(if_newer_than);
        auto reader = stub_->PullTensors(ctx, req);
        PullTensorsResponse msg;
        while (reader->Read(&msg)) {
          if (msg.has_info()) {
            out.info = msg.info();
            unchanged = out.info.unchanged();
            out.data.resize(out.info.tensors_size());
            continue;
          }
          const TensorData& d = msg.data();
          if (d.tensor() < 0 || d.tensor() >= static_cast<int>(out.data.size()) ||
              d.offset() != static_cast<int64_t>(out.data[d.tensor()].size()) ||
              Crc32c(d.data()) != d.crc32c()) {
            local_error = "tensor data out of order or corrupted (CRC32C)";
            ctx->TryCancel();
            break;
          }
          out.data[d.tensor()] += d.data();
        }
        grpc::Status st = reader->Finish();
        if (!local_error.empty()) return grpc::Status(grpc::StatusCode::DATA_LOSS, local_error);
        return st;
      });
  if (!s.ok()) return s;
  if (unchanged) return std::optional<TensorSetData>();
  for (int i = 0; i < out.info.tensors_size(); ++i) {
    const TensorSpec& t = out.info.tensors(i);
    int64_t bytes = TensorDtypeBytes(t.dtype());
    for (int64_t d : t.shape()) bytes *= d;
    if (static_cast<int64_t>(out.data[i].size()) != bytes) {
      return absl::DataLossError(absl::StrCat("pull of set ", name, " from ", options_.address,
                                              ": tensor '", t.name(), "' arrived with ",
                                              out.data[i].size(), " of ", bytes, " bytes"));
    }
  }
  return std::optional<TensorSetData>(std::move(out));
}

absl::StatusOr<std::vector<TensorSetInfo>> PsClient::ListTensorSets() {
  ListTensorSetsRequest req;
  ListTensorSetsResponse resp;
  if (absl::Status s = QT_PS_UNARY(ListTensorSets, true, req, &resp); !s.ok()) return s;
  return std::vector<TensorSetInfo>(resp.sets().begin(), resp.sets().end());
}

}  // namespace qtrain::ps
