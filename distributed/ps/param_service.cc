// ParameterServiceModule handlers (validation, then the stores and the coordinator) and the
// health service.
#include "distributed/ps/param_service.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "configs/job_spec_loader.h"
#include "distributed/proto/health.pb.h"
#include "distributed/proto/param_service.pb.h"
#include "distributed/ps/checkpoint_store.h"
#include "distributed/ps/coordinator.h"
#include "distributed/ps/digest.h"
#include "distributed/ps/job_store.h"
#include "distributed/ps/metrics_store.h"
#include "distributed/ps/storage.h"
#include "distributed/ps/tensor_store.h"

namespace qtrain::ps {
namespace {

using grpc::Status;
using grpc::StatusCode;

Status Invalid(absl::string_view what) {
  return Status(StatusCode::INVALID_ARGUMENT, std::string(what));
}

// Text fields that are not path components (hosts, hashes, messages): bounded, no control
// characters.
absl::Status CheckField(absl::string_view what, absl::string_view s, size_t max, bool required) {
  if (required && s.empty()) return absl::InvalidArgumentError(absl::StrCat(what, ": required"));
  if (s.size() > max) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": ", s.size(), " bytes, more than the limit of ", max));
  }
  for (unsigned char c : s) {
    if (c < 0x20 && c != '\n' && c != '\t') {
      return absl::InvalidArgumentError(absl::StrCat(what, ": holds a control character"));
    }
  }
  return absl::OkStatus();
}

#define QT_PS_CHECK(expr)                       \
  do {                                          \
    absl::Status qt_ps_s_ = (expr);             \
    if (!qt_ps_s_.ok()) return ToGrpc(qt_ps_s_); \
  } while (0)

constexpr int64_t kMaxStep = int64_t{1} << 50;

// ---- WatchMetrics ----------------------------------------------------------------------------

class MetricsSource : public ServerStreamSource<WatchMetricsResponse> {
 public:
  MetricsSource(ServerEnv env, WatchMetricsRequest req, absl::Time until)
      : env_(env), req_(std::move(req)), after_(req_.after_step()), until_(until) {}
  ~MetricsSource() override { Unwatch(); }

  StreamStep Next(WatchMetricsResponse* out, Status* end,
                  const std::function<void()>& wake) override {
    Unwatch();
    absl::StatusOr<std::vector<MetricRow>> rows = env_.metrics->Read(req_.job_id(), after_, 1000);
    if (!rows.ok()) {
      *end = ToGrpc(rows.status());
      return StreamStep::kEnd;
    }
    const std::optional<AttemptView> view = env_.coordinator->View(req_.job_id());
    const JobState state = view ? view->state : REGISTERED;
    if (!rows->empty()) {
      after_ = rows->back().step();
      for (MetricRow& r : *rows) *out->add_rows() = std::move(r);
      out->set_state(state);
      return StreamStep::kMessage;
    }
    // Nothing new: a plain read ends here; a follower waits unless the job is over.
    if (!req_.follow() || state == FAILED || state == FINISHED || absl::Now() >= until_) {
      *end = Status::OK;
      return StreamStep::kEnd;
    }
    handle_ = env_.metrics->Watch(req_.job_id(), after_, wake);
    return StreamStep::kWait;
  }
  void OnCancel() override { Unwatch(); }

 private:
  void Unwatch() {
    if (handle_ != 0) env_.metrics->Unwatch(req_.job_id(), handle_);
    handle_ = 0;
  }
  ServerEnv env_;
  WatchMetricsRequest req_;
  int64_t after_;
  absl::Time until_;
  uint64_t handle_ = 0;
};

// ---- checkpoints -----------------------------------------------------------------------------

class UploadHandler
    : public ClientStreamHandler<UploadCheckpointRequest, UploadCheckpointResponse> {
 public:
  UploadHandler(ServerEnv env, ParameterServiceModule* module) : env_(env), module_(module) {}

  Status OnMessage(const UploadCheckpointRequest& req) override {
    const Limits& l = env_.config->limits();
    if (done_) return Invalid("message after the trailer");
    switch (req.part_case()) {
      case UploadCheckpointRequest::kHeader: {
        if (upload_) return Invalid("a second header");
        const UploadCheckpointRequest::Header& h = req.header();
        QT_PS_CHECK(CheckName("header.job_id", h.job_id(), l.max_name_bytes()));
        if (h.step() < 0 || h.step() > kMaxStep) {
          return Invalid(absl::StrCat("header.step: must be in [0, 2^50], got ", h.step()));
        }
        if (h.size() < 0) return Invalid(absl::StrCat("header.size: negative (", h.size(), ")"));
        if (h.size() > l.max_checkpoint_bytes()) {
          return Status(StatusCode::RESOURCE_EXHAUSTED,
                        absl::StrCat("header.size: ", h.size(), " bytes, more than "
                                     "limits.max_checkpoint_bytes = ",
                                     l.max_checkpoint_bytes()));
        }
        if (h.keep_last() < 0) return Invalid("header.keep_last: negative");
        QT_PS_CHECK(module_->AdmitJob(h.job_id()));
        absl::StatusOr<std::unique_ptr<UploadSlots::Slot>> slot = env_.uploads->Acquire();
        QT_PS_CHECK(slot.status());
        slot_ = *std::move(slot);
        absl::StatusOr<std::unique_ptr<CheckpointStore::Upload>> up = env_.checkpoints->Begin(h);
        QT_PS_CHECK(up.status());
        upload_ = *std::move(up);
        return Status::OK;
      }
      case UploadCheckpointRequest::kChunk:
        if (!upload_) return Invalid("a chunk before the header");
        if (static_cast<int64_t>(req.chunk().data().size()) > l.max_chunk_bytes()) {
          return Status(StatusCode::RESOURCE_EXHAUSTED,
                        absl::StrCat("chunk of ", req.chunk().data().size(),
                                     " bytes, more than limits.max_chunk_bytes = ",
                                     l.max_chunk_bytes()));
        }
        return ToGrpc(upload_->Add(req.chunk()));
      case UploadCheckpointRequest::kTrailer: {
        if (!upload_) return Invalid("a trailer before the header");
        absl::StatusOr<CheckpointInfo> info = upload_->Commit(req.trailer().sha256());
        QT_PS_CHECK(info.status());
        *resp_.mutable_checkpoint() = *info;
        done_ = true;
        upload_.reset();
        slot_.reset();
        return Status::OK;
      }
      case UploadCheckpointRequest::PART_NOT_SET:
        break;
    }
    return Invalid("an empty message (no header, chunk or trailer)");
  }
  Status OnEnd(UploadCheckpointResponse* resp) override {
    if (!done_) return Invalid("the upload ended before its trailer: nothing was stored");
    *resp = resp_;
    return Status::OK;
  }

 private:
  ServerEnv env_;
  ParameterServiceModule* module_;
  std::unique_ptr<UploadSlots::Slot> slot_;
  std::unique_ptr<CheckpointStore::Upload> upload_;
  UploadCheckpointResponse resp_;
  bool done_ = false;
};

// Streams [offset, end) of a file in chunks; the first message is `first`.
template <class Resp>
class FileSource : public ServerStreamSource<Resp> {
 public:
  // `make_chunk(resp, offset, bytes)` fills one data message. fd -1 with offset == end: only
  // `first` is sent.
  FileSource(int fd, Resp first, int64_t offset, int64_t end,
             std::function<void(Resp*, int64_t, std::string)> make_chunk)
      : fd_(fd), first_(std::move(first)), offset_(offset), end_(end),
        make_chunk_(std::move(make_chunk)) {}
  ~FileSource() override {
    if (fd_ >= 0) ::close(fd_);
  }
  StreamStep Next(Resp* out, Status* end, const std::function<void()>&) override {
    if (!sent_first_) {
      sent_first_ = true;
      *out = first_;
      return StreamStep::kMessage;
    }
    if (offset_ >= end_) {
      *end = Status::OK;
      return StreamStep::kEnd;
    }
    const int64_t n = std::min(kChunkBytes, end_ - offset_);
    std::string data(n, '\0');
    int64_t got = 0;
    while (got < n) {
      const ssize_t r = ::pread(fd_, data.data() + got, n - got, offset_ + got);
      if (r <= 0) {
        *end = Status(StatusCode::DATA_LOSS, "the stored file is shorter than its record");
        return StreamStep::kEnd;
      }
      got += r;
    }
    make_chunk_(out, offset_, std::move(data));
    offset_ += n;
    return StreamStep::kMessage;
  }

 private:
  int fd_;
  Resp first_;
  bool sent_first_ = false;
  int64_t offset_, end_;
  std::function<void(Resp*, int64_t, std::string)> make_chunk_;
};

// ---- tensor sets -----------------------------------------------------------------------------

class PushHandler : public ClientStreamHandler<PushTensorsRequest, PushTensorsResponse> {
 public:
  explicit PushHandler(ServerEnv env) : env_(env) {}
  Status OnMessage(const PushTensorsRequest& req) override {
    switch (req.part_case()) {
      case PushTensorsRequest::kHeader: {
        if (writer_) return Invalid("a second header");
        absl::StatusOr<std::unique_ptr<UploadSlots::Slot>> slot = env_.uploads->Acquire();
        QT_PS_CHECK(slot.status());
        slot_ = *std::move(slot);
        absl::StatusOr<std::unique_ptr<TensorStore::Writer>> w = env_.tensors->Begin(req.header());
        QT_PS_CHECK(w.status());
        writer_ = *std::move(w);
        return Status::OK;
      }
      case PushTensorsRequest::kData:
        if (!writer_) return Invalid("data before the header");
        if (static_cast<int64_t>(req.data().data().size()) > env_.config->limits().max_chunk_bytes()) {
          return Status(StatusCode::RESOURCE_EXHAUSTED,
                        "a data message larger than limits.max_chunk_bytes");
        }
        return ToGrpc(writer_->Add(req.data()));
      case PushTensorsRequest::PART_NOT_SET:
        break;
    }
    return Invalid("an empty message (no header or data)");
  }
  Status OnEnd(PushTensorsResponse* resp) override {
    if (!writer_) return Invalid("the push ended before its header");
    absl::StatusOr<int64_t> v = writer_->Commit();
    QT_PS_CHECK(v.status());
    resp->set_version(*v);
    return Status::OK;
  }

 private:
  ServerEnv env_;
  std::unique_ptr<UploadSlots::Slot> slot_;
  std::unique_ptr<TensorStore::Writer> writer_;
};

// Info, then each tensor's bytes in chunks.
class PullSource : public ServerStreamSource<PullTensorsResponse> {
 public:
  PullSource(int fd, TensorSetInfo info, int64_t data_offset)
      : fd_(fd), info_(std::move(info)), offset_(data_offset) {
    for (const TensorSpec& t : info_.tensors()) {
      int64_t bytes = TensorDtypeBytes(t.dtype());
      for (int64_t d : t.shape()) bytes *= d;
      sizes_.push_back(bytes);
    }
  }
  ~PullSource() override {
    if (fd_ >= 0) ::close(fd_);
  }
  StreamStep Next(PullTensorsResponse* out, Status* end, const std::function<void()>&) override {
    if (!sent_info_) {
      sent_info_ = true;
      *out->mutable_info() = info_;
      return StreamStep::kMessage;
    }
    while (tensor_ < sizes_.size() && within_ == sizes_[tensor_]) {
      ++tensor_;
      within_ = 0;
    }
    if (tensor_ >= sizes_.size()) {
      *end = Status::OK;
      return StreamStep::kEnd;
    }
    const int64_t n = std::min(kChunkBytes, sizes_[tensor_] - within_);
    TensorData* d = out->mutable_data();
    d->set_tensor(static_cast<int>(tensor_));
    d->set_offset(within_);
    std::string* data = d->mutable_data();
    data->resize(n);
    if (::pread(fd_, data->data(), n, offset_) != n) {
      *end = Status(StatusCode::DATA_LOSS, "the stored tensor set is shorter than its header");
      return StreamStep::kEnd;
    }
    d->set_crc32c(Crc32c(*data));
    offset_ += n;
    within_ += n;
    return StreamStep::kMessage;
  }

 private:
  int fd_;
  TensorSetInfo info_;
  std::vector<int64_t> sizes_;
  int64_t offset_;
  size_t tensor_ = 0;
  int64_t within_ = 0;
  bool sent_info_ = false;
};

}  // namespace

std::string ServerEnv::ModuleDir(const std::string& module_name) const {
  const std::string dir = absl::StrCat(storage_dir, "/modules/", module_name);
  (void)MakeDirs(dir);
  return dir;
}

ParameterServiceModule::ParameterServiceModule(ServerEnv env) : env_(env) {
  absl::MutexLock lock(&mu_);
  for (const std::string& id : env_.jobs->StoredJobIds()) jobs_.insert(id);
}

absl::Status ParameterServiceModule::AdmitJob(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  if (jobs_.count(job_id)) return absl::OkStatus();
  if (static_cast<int>(jobs_.size()) >= env_.config->limits().max_jobs()) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the service holds its limit of ", env_.config->limits().max_jobs(), " jobs"));
  }
  jobs_.insert(job_id);
  return absl::OkStatus();
}

bool ParameterServiceModule::KnownJob(const std::string& job_id) {
  {
    absl::MutexLock lock(&mu_);
    if (jobs_.count(job_id)) return true;
  }
  return env_.coordinator->View(job_id).has_value();
}

void ParameterServiceModule::Register(MethodRegistry* r) {
  const Limits& l = env_.config->limits();
  const size_t name_max = l.max_name_bytes();
  const MethodOptions disk{0, Blocking::kYes};
  const MethodOptions big_disk{l.max_message_bytes(), Blocking::kYes};
  ServerEnv env = env_;
  const char* svc = kParameterService;

  // -- Status
  r->Unary<StatusRequest, StatusResponse>(
      svc, "Status",
      [this, env, name_max](const CallInfo&, const StatusRequest& req, StatusResponse* resp) {
        std::set<std::string> ids;
        if (!req.job_id().empty()) {
          QT_PS_CHECK(CheckName("job_id", req.job_id(), name_max));
          if (!KnownJob(req.job_id())) {
            return Status(StatusCode::NOT_FOUND, absl::StrCat("no job ", req.job_id()));
          }
          ids.insert(req.job_id());
        } else {
          {
            absl::MutexLock lock(&mu_);
            ids = jobs_;
          }
          for (const std::string& id : env.coordinator->JobIds()) ids.insert(id);
        }
        resp->set_server("qtrain_ps 1");
        resp->set_uptime_ms(absl::ToInt64Milliseconds(absl::Now() - started_));
        for (const std::string& id : ids) {
          JobSummary* j = resp->add_jobs();
          j->set_job_id(id);
          const std::optional<AttemptView> v = env.coordinator->View(id);
          j->set_state(v ? v->state : REGISTERED);
          if (v) {
            j->set_attempt(v->attempt);
            j->set_world_size(v->world_size);
            j->set_live_workers(v->live_workers);
            j->set_failure(v->failure);
          }
          j->set_last_metric_step(env.metrics->LastStep(id));
          const std::vector<CheckpointInfo> cks = env.checkpoints->List(id);
          j->set_checkpoints(static_cast<int>(cks.size()));
          j->set_latest_checkpoint_step(cks.empty() ? -1 : cks.back().step());
          if (std::optional<JobRecord> rec = env.jobs->Get(id)) j->set_spec_sha256(rec->spec_sha256);
        }
        resp->set_tensor_sets(static_cast<int>(env.tensors->List().size()));
        return Status::OK;
      },
      disk);

  // -- RegisterJob / GetJobSpec
  r->Unary<RegisterJobRequest, RegisterJobResponse>(
      svc, "RegisterJob",
      [this, env, name_max](const CallInfo&, const RegisterJobRequest& req,
                            RegisterJobResponse* resp) {
        QT_PS_CHECK(CheckName("job_id", req.job_id(), name_max));
        if (static_cast<int64_t>(req.spec_text().size()) >
            env.config->limits().max_job_spec_bytes()) {
          return Status(StatusCode::RESOURCE_EXHAUSTED,
                        absl::StrCat("spec_text: ", req.spec_text().size(),
                                     " bytes, more than limits.max_job_spec_bytes"));
        }
        // The service refuses what a trainer would refuse, with the loader's own message.
        absl::StatusOr<JobSpec> parsed = ParseJobSpec(req.spec_text(), "job " + req.job_id());
        if (!parsed.ok()) {
          return Status(StatusCode::INVALID_ARGUMENT, std::string(parsed.status().message()));
        }
        QT_PS_CHECK(AdmitJob(req.job_id()));
        absl::StatusOr<bool> created = env.jobs->Register(req.job_id(), req.spec_text(),
                                                          req.replace());
        QT_PS_CHECK(created.status());
        resp->set_created(*created);
        resp->set_spec_sha256(Sha256Hex(req.spec_text()));
        return Status::OK;
      },
      MethodOptions{l.max_job_spec_bytes() + 4096, Blocking::kYes});

  r->Unary<GetJobSpecRequest, GetJobSpecResponse>(
      svc, "GetJobSpec",
      [env, name_max](const CallInfo&, const GetJobSpecRequest& req, GetJobSpecResponse* resp) {
        QT_PS_CHECK(CheckName("job_id", req.job_id(), name_max));
        std::optional<JobRecord> rec = env.jobs->Get(req.job_id());
        if (!rec) {
          return Status(StatusCode::NOT_FOUND,
                        absl::StrCat("no job spec registered for job ", req.job_id()));
        }
        resp->set_spec_text(rec->spec_text);
        resp->set_spec_sha256(rec->spec_sha256);
        return Status::OK;
      });

  // -- workers
  r->Unary<RegisterWorkerRequest, RegisterWorkerResponse>(
      svc, "RegisterWorker",
      [env, name_max](const CallInfo&, const RegisterWorkerRequest& req,
                      RegisterWorkerResponse* resp) {
        QT_PS_CHECK(CheckName("job_id", req.job_id(), name_max));
        QT_PS_CHECK(CheckField("host", req.host(), name_max, true));
        QT_PS_CHECK(CheckField("binary_hash", req.binary_hash(), name_max, false));
        QT_PS_CHECK(CheckField("spec_hash", req.spec_hash(), name_max, false));
        QT_PS_CHECK(CheckField("peer_address", req.peer_address(), name_max, false));
        QT_PS_CHECK(CheckField("instance_id", req.instance_id(), 64, false));
        if (req.pid() < 0) return Invalid("pid: negative");
        absl::StatusOr<RegisterWorkerResponse> r = env.coordinator->Register(req);
        QT_PS_CHECK(r.status());
        *resp = *r;
        return Status::OK;
      });

  r->Unary<HeartbeatRequest, HeartbeatResponse>(
      svc, "Heartbeat",
      [env, name_max](const CallInfo&, const HeartbeatRequest& req, HeartbeatResponse* resp) {
        QT_PS_CHECK(CheckName("job_id", req.job_id(), name_max));
        QT_PS_CHECK(CheckField("worker_id", req.worker_id(), 64, true));
        absl::StatusOr<HeartbeatResponse> r = env.coordinator->Heartbeat(req);
        QT_PS_CHECK(r.status());
        *resp = *r;
        return Status::OK;
      });

  r->Unary<LeaveRequest, LeaveResponse>(
      svc, "Leave",
      [env, name_max](const CallInfo&, const LeaveRequest& req, LeaveResponse*) {
        QT_PS_CHECK(CheckName("job_id", req.job_id(), name_max));
        QT_PS_CHECK(CheckField("worker_id", req.worker_id(), 64, true));
        QT_PS_CHECK(CheckField("message", req.message(), 16 << 10, false));
        return ToGrpc(env.coordinator->Leave(req));
      });

  r->Unary<ListWorkersRequest, ListWorkersResponse>(
      svc, "ListWorkers",
      [this, env, name_max](const CallInfo&, const ListWorkersRequest& req,
                            ListWorkersResponse* resp) {
        QT_PS_CHECK(CheckName("job_id", req.job_id(), name_max));
        if (!KnownJob(req.job_id())) {
          return Status(StatusCode::NOT_FOUND, absl::StrCat("no job ", req.job_id()));
        }
        absl::StatusOr<ListWorkersResponse> r = env.coordinator->ListWorkers(req.job_id());
        QT_PS_CHECK(r.status());
        *resp = *r;
        return Status::OK;
      });

  r->Deferred<RendezvousRequest, RendezvousResponse>(
      svc, "Rendezvous",
      [env, name_max](const CallInfo&, const RendezvousRequest& req,
                      std::shared_ptr<Responder<RendezvousResponse>> responder) {
        absl::Status bad = CheckName("job_id", req.job_id(), name_max);
        if (bad.ok()) bad = CheckField("worker_id", req.worker_id(), 64, true);
        if (bad.ok() && req.bootstrap().size() > 4096) {
          bad = absl::InvalidArgumentError("bootstrap: more than 4096 bytes");
        }
        if (!bad.ok()) {
          responder->Finish(ToGrpc(bad));
          return;
        }
        env.coordinator->Rendezvous(
            req, [responder](const absl::Status& s, const RendezvousResponse& resp) {
              responder->Finish(ToGrpc(s), resp);
            });
      });

  // -- metrics
  r->Unary<AppendMetricsRequest, AppendMetricsResponse>(
      svc, "AppendMetrics",
      [this, env, name_max](const CallInfo&, const AppendMetricsRequest& req,
                            AppendMetricsResponse* resp) {
        const Limits& l = env.config->limits();
        QT_PS_CHECK(CheckName("job_id", req.job_id(), name_max));
        if (req.rows_size() > l.max_rows_per_append()) {
          return Status(StatusCode::RESOURCE_EXHAUSTED,
                        absl::StrCat("rows: ", req.rows_size(), " in one call, the limit is ",
                                     l.max_rows_per_append()));
        }
        if (req.has_truncate_after() && req.truncate_after() < -1) {
          return Invalid("truncate_after: must be >= -1");
        }
        for (const MetricRow& row : req.rows()) {
          if (row.step() > kMaxStep) return Invalid("rows: step beyond 2^50");
          if (row.metrics_size() > l.max_metrics_per_row()) {
            return Status(StatusCode::RESOURCE_EXHAUSTED,
                          absl::StrCat("rows: ", row.metrics_size(),
                                       " metrics in one row, the limit is ",
                                       l.max_metrics_per_row()));
          }
          for (const Metric& m : row.metrics()) {
            QT_PS_CHECK(CheckField("metric name", m.name(), name_max, true));
          }
        }
        QT_PS_CHECK(AdmitJob(req.job_id()));
        absl::StatusOr<AppendMetricsResponse> r = env.metrics->Append(req);
        QT_PS_CHECK(r.status());
        *resp = *r;
        return Status::OK;
      },
      big_disk);

  r->ServerStream<WatchMetricsRequest, WatchMetricsResponse>(
      svc, "WatchMetrics",
      [this, env, name_max](const CallInfo& call, const WatchMetricsRequest& req,
                            std::unique_ptr<ServerStreamSource<WatchMetricsResponse>>* source) {
        QT_PS_CHECK(CheckName("job_id", req.job_id(), name_max));
        if (req.after_step() < -1) return Invalid("after_step: must be >= -1");
        if (!KnownJob(req.job_id())) {
          return Status(StatusCode::NOT_FOUND, absl::StrCat("no job ", req.job_id()));
        }
        const absl::Time until = std::min(
            call.deadline,
            absl::Now() + absl::Milliseconds(env.config->timeouts().follow_timeout_ms()));
        *source = std::make_unique<MetricsSource>(env, req, until);
        return Status::OK;
      },
      disk);

  // -- checkpoints
  r->ClientStream<UploadCheckpointRequest, UploadCheckpointResponse>(
      svc, "UploadCheckpoint",
      [this, env](const CallInfo&,
                  std::unique_ptr<ClientStreamHandler<UploadCheckpointRequest,
                                                      UploadCheckpointResponse>>* handler) {
        *handler = std::make_unique<UploadHandler>(env, this);
        return Status::OK;
      },
      MethodOptions{l.max_chunk_bytes() + 4096, Blocking::kYes});

  r->Unary<ListCheckpointsRequest, ListCheckpointsResponse>(
      svc, "ListCheckpoints",
      [env, name_max](const CallInfo&, const ListCheckpointsRequest& req,
                      ListCheckpointsResponse* resp) {
        QT_PS_CHECK(CheckName("job_id", req.job_id(), name_max));
        for (const CheckpointInfo& c : env.checkpoints->List(req.job_id())) {
          *resp->add_checkpoints() = c;
        }
        return Status::OK;
      });

  r->ServerStream<DownloadCheckpointRequest, DownloadCheckpointResponse>(
      svc, "DownloadCheckpoint",
      [env, name_max](const CallInfo&, const DownloadCheckpointRequest& req,
                      std::unique_ptr<ServerStreamSource<DownloadCheckpointResponse>>* source) {
        QT_PS_CHECK(CheckName("job_id", req.job_id(), name_max));
        if (req.step() < -1) return Invalid("step: must be >= -1 (-1: the latest)");
        absl::StatusOr<CheckpointInfo> info = env.checkpoints->Find(req.job_id(), req.step());
        QT_PS_CHECK(info.status());
        if (req.offset() < 0 || req.offset() > info->size()) {
          return Invalid(absl::StrCat("offset: must be in [0, ", info->size(), "], got ",
                                      req.offset()));
        }
        const std::string path = env.checkpoints->DataPath(req.job_id(), info->step());
        const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
          return Status(StatusCode::NOT_FOUND, "the checkpoint was deleted meanwhile; retry");
        }
        DownloadCheckpointResponse first;
        *first.mutable_info() = *info;
        *source = std::make_unique<FileSource<DownloadCheckpointResponse>>(
            fd, first, req.offset(), info->size(),
            [](DownloadCheckpointResponse* out, int64_t offset, std::string data) {
              Chunk* c = out->mutable_chunk();
              c->set_offset(offset);
              c->set_crc32c(Crc32c(data));
              c->set_data(std::move(data));
            });
        return Status::OK;
      },
      disk);

  // -- tensor sets
  r->ClientStream<PushTensorsRequest, PushTensorsResponse>(
      svc, "PushTensors",
      [env](const CallInfo&,
            std::unique_ptr<ClientStreamHandler<PushTensorsRequest, PushTensorsResponse>>*
                handler) {
        *handler = std::make_unique<PushHandler>(env);
        return Status::OK;
      },
      big_disk);

  r->ServerStream<PullTensorsRequest, PullTensorsResponse>(
      svc, "PullTensors",
      [env, name_max](const CallInfo&, const PullTensorsRequest& req,
                      std::unique_ptr<ServerStreamSource<PullTensorsResponse>>* source) {
        QT_PS_CHECK(CheckName("name", req.name(), name_max));
        if (req.version() < 0) return Invalid("version: must be >= 0 (0: the latest)");
        if (req.if_newer_than() < 0) return Invalid("if_newer_than: must be >= 0");
        absl::StatusOr<TensorSetInfo> info = env.tensors->Info(req.name(), req.version());
        QT_PS_CHECK(info.status());
        if (req.version() == 0 && req.if_newer_than() > 0 &&
            info->version() <= req.if_newer_than()) {
          PullTensorsResponse only;
          TensorSetInfo* i = only.mutable_info();
          i->set_name(info->name());
          i->set_version(info->version());
          i->set_unchanged(true);
          // No data: a stream of one message.
          *source = std::make_unique<FileSource<PullTensorsResponse>>(
              -1, only, 0, 0,
              [](PullTensorsResponse*, int64_t, std::string) {});
          return Status::OK;
        }
        absl::StatusOr<std::pair<std::string, int64_t>> file =
            env.tensors->DataFile(req.name(), info->version());
        QT_PS_CHECK(file.status());
        const int fd = ::open(file->first.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd < 0) return Status(StatusCode::NOT_FOUND, "the version was deleted meanwhile");
        *source = std::make_unique<PullSource>(fd, *info, file->second);
        return Status::OK;
      },
      disk);

  r->Unary<ListTensorSetsRequest, ListTensorSetsResponse>(
      svc, "ListTensorSets",
      [env](const CallInfo&, const ListTensorSetsRequest&, ListTensorSetsResponse* resp) {
        for (TensorSetInfo& s : env.tensors->List()) *resp->add_sets() = std::move(s);
        return Status::OK;
      });
}

// ---- health ----------------------------------------------------------------------------------

namespace {

// Sends the status once, then holds the stream open until the client leaves or the server
// stops (the status of a running server does not change).
class HealthWatchSource : public ServerStreamSource<grpc::health::v1::HealthCheckResponse> {
 public:
  explicit HealthWatchSource(grpc::health::v1::HealthCheckResponse::ServingStatus s) : s_(s) {}
  StreamStep Next(grpc::health::v1::HealthCheckResponse* out, Status*,
                  const std::function<void()>&) override {
    if (sent_) return StreamStep::kWait;
    sent_ = true;
    out->set_status(s_);
    return StreamStep::kMessage;
  }

 private:
  grpc::health::v1::HealthCheckResponse::ServingStatus s_;
  bool sent_ = false;
};

}  // namespace

void HealthModule::Register(MethodRegistry* r) {
  using grpc::health::v1::HealthCheckRequest;
  using grpc::health::v1::HealthCheckResponse;
  r->Unary<HealthCheckRequest, HealthCheckResponse>(
      kHealthService, "Check",
      [this](const CallInfo&, const HealthCheckRequest& req, HealthCheckResponse* resp) {
        if (!req.service().empty() && !services_.count(req.service())) {
          return Status(StatusCode::NOT_FOUND, "unknown service");
        }
        resp->set_status(HealthCheckResponse::SERVING);
        return Status::OK;
      });
  r->ServerStream<HealthCheckRequest, HealthCheckResponse>(
      kHealthService, "Watch",
      [this](const CallInfo&, const HealthCheckRequest& req,
             std::unique_ptr<ServerStreamSource<HealthCheckResponse>>* source) {
        const bool known = req.service().empty() || services_.count(req.service());
        *source = std::make_unique<HealthWatchSource>(known ? HealthCheckResponse::SERVING
                                                            : HealthCheckResponse::SERVICE_UNKNOWN);
        return Status::OK;
      });
}

}  // namespace qtrain::ps
