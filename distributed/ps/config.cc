// ServerConfig parsing, defaults and validation.
#include "distributed/ps/config.h"

#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/numbers.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/text_format.h"
#include "trainer/atomic_file.h"

namespace qtrain::ps {
namespace {

namespace pb = google::protobuf;

class Collector : public pb::io::ErrorCollector {
 public:
  explicit Collector(std::string file) : file_(std::move(file)) {}
  void AddError(int line, pb::io::ColumnNumber col, const std::string& message) override {
    lines_.push_back(absl::StrCat(file_, ":", line + 1, ":", col + 1, ": ", message));
  }
  std::string Joined() const { return absl::StrJoin(lines_, "\n"); }
  bool empty() const { return lines_.empty(); }

 private:
  std::string file_;
  std::vector<std::string> lines_;
};

}  // namespace

void ApplyServerDefaults(ServerConfig* c) {
  if (c->address().empty()) c->set_address("127.0.0.1:7070");
  if (c->worker_threads() == 0) c->set_worker_threads(4);
  Limits* l = c->mutable_limits();
  auto def64 = [](int64_t v, int64_t d) { return v == 0 ? d : v; };
  l->set_max_message_bytes(def64(l->max_message_bytes(), (4 << 20) + (64 << 10)));
  l->set_max_control_message_bytes(def64(l->max_control_message_bytes(), 64 << 10));
  l->set_max_chunk_bytes(def64(l->max_chunk_bytes(), 4 << 20));
  l->set_max_job_spec_bytes(def64(l->max_job_spec_bytes(), 1 << 20));
  l->set_max_checkpoint_bytes(def64(l->max_checkpoint_bytes(), int64_t{256} << 30));
  l->set_max_tensor_set_bytes(def64(l->max_tensor_set_bytes(), int64_t{64} << 30));
  l->set_max_tensors_per_set(def64(l->max_tensors_per_set(), 100000));
  l->set_max_jobs(def64(l->max_jobs(), 10000));
  l->set_max_world_size(def64(l->max_world_size(), 65536));
  l->set_max_concurrent_uploads(def64(l->max_concurrent_uploads(), 16));
  l->set_max_rows_per_append(def64(l->max_rows_per_append(), 10000));
  l->set_max_metrics_per_row(def64(l->max_metrics_per_row(), 512));
  l->set_max_name_bytes(def64(l->max_name_bytes(), 256));
  l->set_max_metadata_entries(def64(l->max_metadata_entries(), 1024));
  l->set_max_metadata_value_bytes(def64(l->max_metadata_value_bytes(), 64 << 10));
  l->set_max_tensor_sets(def64(l->max_tensor_sets(), 100000));
  l->set_max_pending_calls(def64(l->max_pending_calls(), 4096));
  Timeouts* t = c->mutable_timeouts();
  t->set_heartbeat_interval_ms(def64(t->heartbeat_interval_ms(), 1000));
  t->set_heartbeat_timeout_ms(def64(t->heartbeat_timeout_ms(), 10000));
  t->set_min_heartbeat_timeout_ms(def64(t->min_heartbeat_timeout_ms(), 200));
  t->set_max_heartbeat_timeout_ms(def64(t->max_heartbeat_timeout_ms(), 600000));
  t->set_rendezvous_timeout_ms(def64(t->rendezvous_timeout_ms(), 600000));
  t->set_stream_idle_timeout_ms(def64(t->stream_idle_timeout_ms(), 120000));
  t->set_follow_timeout_ms(def64(t->follow_timeout_ms(), 3600000));
  Retention* r = c->mutable_retention();
  if (r->keep_tensor_versions() == 0) r->set_keep_tensor_versions(8);
}

absl::Status ValidateServerConfig(const ServerConfig& c) {
  std::vector<std::string> bad;
  auto add = [&bad](auto&&... parts) { bad.push_back(absl::StrCat(parts...)); };
  {
    const size_t colon = c.address().rfind(':');
    int port = -1;
    if (colon == std::string::npos || colon == 0 ||
        !absl::SimpleAtoi(c.address().substr(colon + 1), &port) || port < 0 || port > 65535) {
      add("address: must be host:port with port in [0, 65535], got \"", c.address(), "\"");
    }
  }
  if (c.storage_dir().empty()) add("storage_dir: required (where jobs, metrics and checkpoints live)");
  if (c.token_file().empty() == c.token_env().empty()) {
    add("token_file / token_env: set exactly one (the bearer token every client must present)");
  }
  if (c.worker_threads() < 1 || c.worker_threads() > 256) {
    add("worker_threads: must be in [1, 256], got ", c.worker_threads());
  }
  const Limits& l = c.limits();
  auto positive = [&](const char* name, int64_t v) {
    if (v <= 0) add("limits.", name, ": must be > 0, got ", v);
  };
  positive("max_message_bytes", l.max_message_bytes());
  positive("max_control_message_bytes", l.max_control_message_bytes());
  positive("max_chunk_bytes", l.max_chunk_bytes());
  positive("max_job_spec_bytes", l.max_job_spec_bytes());
  positive("max_checkpoint_bytes", l.max_checkpoint_bytes());
  positive("max_tensor_set_bytes", l.max_tensor_set_bytes());
  positive("max_tensors_per_set", l.max_tensors_per_set());
  positive("max_jobs", l.max_jobs());
  positive("max_world_size", l.max_world_size());
  positive("max_concurrent_uploads", l.max_concurrent_uploads());
  positive("max_rows_per_append", l.max_rows_per_append());
  positive("max_metrics_per_row", l.max_metrics_per_row());
  positive("max_name_bytes", l.max_name_bytes());
  positive("max_metadata_entries", l.max_metadata_entries());
  positive("max_metadata_value_bytes", l.max_metadata_value_bytes());
  positive("max_tensor_sets", l.max_tensor_sets());
  positive("max_pending_calls", l.max_pending_calls());
  if (l.max_message_bytes() > (int64_t{1} << 30)) {
    add("limits.max_message_bytes: at most 1 GiB, got ", l.max_message_bytes());
  }
  if (l.max_chunk_bytes() + 4096 > l.max_message_bytes()) {
    add("limits.max_chunk_bytes: ", l.max_chunk_bytes(),
        " plus 4 KiB of framing exceeds limits.max_message_bytes ", l.max_message_bytes());
  }
  if (l.max_job_spec_bytes() + 4096 > l.max_message_bytes()) {
    add("limits.max_job_spec_bytes: ", l.max_job_spec_bytes(),
        " plus 4 KiB exceeds limits.max_message_bytes ", l.max_message_bytes());
  }
  const Timeouts& t = c.timeouts();
  auto positive_t = [&](const char* name, int64_t v) {
    if (v <= 0) add("timeouts.", name, ": must be > 0, got ", v);
  };
  positive_t("heartbeat_interval_ms", t.heartbeat_interval_ms());
  positive_t("heartbeat_timeout_ms", t.heartbeat_timeout_ms());
  positive_t("min_heartbeat_timeout_ms", t.min_heartbeat_timeout_ms());
  positive_t("max_heartbeat_timeout_ms", t.max_heartbeat_timeout_ms());
  positive_t("rendezvous_timeout_ms", t.rendezvous_timeout_ms());
  positive_t("stream_idle_timeout_ms", t.stream_idle_timeout_ms());
  positive_t("follow_timeout_ms", t.follow_timeout_ms());
  if (t.heartbeat_timeout_ms() <= t.heartbeat_interval_ms()) {
    add("timeouts.heartbeat_timeout_ms: ", t.heartbeat_timeout_ms(),
        " must exceed timeouts.heartbeat_interval_ms ", t.heartbeat_interval_ms());
  }
  if (t.min_heartbeat_timeout_ms() > t.max_heartbeat_timeout_ms() ||
      t.heartbeat_timeout_ms() < t.min_heartbeat_timeout_ms() ||
      t.heartbeat_timeout_ms() > t.max_heartbeat_timeout_ms()) {
    add("timeouts: need min_heartbeat_timeout_ms <= heartbeat_timeout_ms <= "
        "max_heartbeat_timeout_ms, got ", t.min_heartbeat_timeout_ms(), " / ",
        t.heartbeat_timeout_ms(), " / ", t.max_heartbeat_timeout_ms());
  }
  if (c.retention().keep_checkpoints() < 0) {
    add("retention.keep_checkpoints: must be >= 0, got ", c.retention().keep_checkpoints());
  }
  if (c.retention().keep_tensor_versions() < 1) {
    add("retention.keep_tensor_versions: must be >= 1, got ",
        c.retention().keep_tensor_versions());
  }
  if (c.tls().require_client_cert() && c.tls().client_ca_file().empty()) {
    add("tls.require_client_cert: needs tls.client_ca_file");
  }
  if (c.tls().cert_file().empty() != c.tls().key_file().empty()) {
    add("tls: cert_file and key_file go together");
  }
  if (!bad.empty()) return absl::InvalidArgumentError(absl::StrJoin(bad, "\n"));
  return absl::OkStatus();
}

absl::StatusOr<ServerConfig> ParseServerConfig(const std::string& text,
                                               const std::string& filename) {
  ServerConfig config;
  pb::TextFormat::Parser parser;
  Collector errors(filename);
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(text, &config)) {
    return absl::InvalidArgumentError(
        errors.empty() ? absl::StrCat(filename, ": not a valid server config") : errors.Joined());
  }
  ApplyServerDefaults(&config);
  if (absl::Status s = ValidateServerConfig(config); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(filename, ": ", s.message()));
  }
  return config;
}

absl::StatusOr<ServerConfig> LoadServerConfig(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFile(path);
  if (!text.ok()) return text.status();
  return ParseServerConfig(*text, path);
}

}  // namespace qtrain::ps
