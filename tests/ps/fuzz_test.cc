// Limits and hostile input: oversize messages get RESOURCE_EXHAUSTED (the server's overall limit
// and each method's own), undecodable bytes INVALID_ARGUMENT, and a fuzz-style pass feeds every
// method of every service random bytes and random but well-formed hostile messages (extreme
// numbers, traversal and oversize names, random nesting, streams of several messages). Every
// call must end with a status from the expected set, the server must keep serving, and its
// storage must hold nothing it did not acknowledge.
#include <fstream>
#include <random>
#include <set>

#include "absl/strings/str_cat.h"
#include "distributed/ps/auth.h"
#include "distributed/ps/digest.h"
#include "distributed/ps/param_service.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/message.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/ps/ps_test_util.h"

namespace qtrain::ps::testing {
namespace {

namespace pb = google::protobuf;
using grpc::StatusCode;

std::unique_ptr<TestServer> SmallLimitsServer(const std::string& name) {
  return StartServer(name, [](ServerConfig* c) {
    c->mutable_limits()->set_max_message_bytes(256 << 10);
    c->mutable_limits()->set_max_control_message_bytes(8 << 10);
    c->mutable_limits()->set_max_chunk_bytes(64 << 10);
    c->mutable_limits()->set_max_job_spec_bytes(32 << 10);
    c->mutable_limits()->set_max_checkpoint_bytes(1 << 20);
    c->mutable_limits()->set_max_tensor_set_bytes(1 << 20);
    c->mutable_limits()->set_max_jobs(50);
    c->mutable_limits()->set_max_tensor_sets(20);
    c->mutable_timeouts()->set_heartbeat_timeout_ms(5000);
  });
}

std::string Auth(const TestServer& s) { return absl::StrCat(kBearerPrefix, s.token); }

const pb::MethodDescriptor* Method(const std::string& full) {
  const size_t slash = full.rfind('/');
  const pb::ServiceDescriptor* sd = pb::DescriptorPool::generated_pool()->FindServiceByName(
      full.substr(1, slash - 1));
  return sd ? sd->FindMethodByName(full.substr(slash + 1)) : nullptr;
}

TEST(LimitsTest, OversizeAndMalformedRequests) {
  std::unique_ptr<TestServer> s = SmallLimitsServer("limits");
  ASSERT_NE(s, nullptr);
  auto ch = PlainChannel(s->address);
  // Over the server-wide limit: gRPC itself refuses it.
  HeartbeatRequest huge;
  huge.set_job_id("j");
  huge.set_worker_id(std::string(300 << 10, 'x'));
  EXPECT_EQ(RawCall(ch, "/qtrain.ps.ParameterService/Heartbeat", {huge.SerializeAsString()},
                    Auth(*s))
                .status.error_code(),
            StatusCode::RESOURCE_EXHAUSTED);
  // Over the control-message limit of a small RPC.
  huge.set_worker_id(std::string(10 << 10, 'x'));
  RawResult r =
      RawCall(ch, "/qtrain.ps.ParameterService/Heartbeat", {huge.SerializeAsString()}, Auth(*s));
  EXPECT_EQ(r.status.error_code(), StatusCode::RESOURCE_EXHAUSTED) << r.status.error_message();
  EXPECT_THAT(r.status.error_message(), ::testing::HasSubstr("limit of 8192"));
  // A chunk over max_chunk_bytes inside an upload that is otherwise fine.
  UploadCheckpointRequest h;
  h.mutable_header()->set_job_id("j");
  h.mutable_header()->set_size(100 << 10);
  UploadCheckpointRequest c;
  c.mutable_chunk()->set_data(std::string(80 << 10, 'a'));
  c.mutable_chunk()->set_crc32c(Crc32c(c.chunk().data()));
  EXPECT_EQ(RawCall(ch, "/qtrain.ps.ParameterService/UploadCheckpoint",
                    {h.SerializeAsString(), c.SerializeAsString()}, Auth(*s))
                .status.error_code(),
            StatusCode::RESOURCE_EXHAUSTED);
  // A checkpoint announced larger than allowed.
  h.mutable_header()->set_size(2 << 20);
  EXPECT_EQ(RawCall(ch, "/qtrain.ps.ParameterService/UploadCheckpoint", {h.SerializeAsString()},
                    Auth(*s))
                .status.error_code(),
            StatusCode::RESOURCE_EXHAUSTED);
  // Bytes that are no protobuf: a length-delimited field claiming 2 GB, a truncated varint.
  for (const std::string& garbage :
       {std::string("\x0a\xff\xff\xff\xff\x07", 6), std::string("\x08\xff\xff", 3),
        std::string("\xff\xff\xff\xff", 4)}) {
    for (const std::string& m : AllMethods({kParameterService, kHealthService})) {
      RawResult g = RawCall(ch, m, {garbage}, Auth(*s), 2);
      EXPECT_EQ(g.status.error_code(), StatusCode::INVALID_ARGUMENT)
          << m << ": " << g.status.error_message();
    }
  }
  // A unary call without its request message.
  EXPECT_EQ(RawCall(ch, "/qtrain.ps.ParameterService/Status", {}, Auth(*s)).status.error_code(),
            StatusCode::INVALID_ARGUMENT);
}

// ---- fuzz --------------------------------------------------------------------------------------

class Fuzzer {
 public:
  explicit Fuzzer(uint64_t seed, std::vector<std::string> names)
      : rng_(seed), names_(std::move(names)) {}

  std::string RandomBytes() {
    std::string s(Pick(0, 300), '\0');
    for (char& c : s) c = static_cast<char>(rng_());
    return s;
  }

  void Fill(pb::Message* m, int depth) {
    const pb::Descriptor* d = m->GetDescriptor();
    const pb::Reflection* r = m->GetReflection();
    for (int i = 0; i < d->field_count(); ++i) {
      const pb::FieldDescriptor* f = d->field(i);
      if (f->containing_oneof() && Pick(0, 2) != 0) continue;
      if (Pick(0, 4) == 0) continue;
      const int n = f->is_repeated() ? Pick(0, 4) : 1;
      for (int k = 0; k < n; ++k) SetOne(m, r, f, depth);
    }
  }

 private:
  int Pick(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng_); }

  int64_t Int() {
    static const int64_t kValues[] = {0, 1, -1, 2, 7, 1000, int64_t{1} << 31, -(int64_t{1} << 31),
                                      INT64_MAX, INT64_MIN, int64_t{1} << 50, 1 << 20};
    return Pick(0, 3) == 0 ? static_cast<int64_t>(rng_()) : kValues[Pick(0, 11)];
  }

  std::string Str() {
    switch (Pick(0, 7)) {
      case 0: return "";
      case 1: return "../../etc/passwd";
      case 2: return std::string(Pick(200, 400), 'z');
      case 3: return ".hidden";
      case 4: return "a/b";
      case 5: return std::string("n\0ul", 4);
      default: return names_[Pick(0, static_cast<int>(names_.size()) - 1)];
    }
  }

  void SetOne(pb::Message* m, const pb::Reflection* r, const pb::FieldDescriptor* f, int depth) {
    using T = pb::FieldDescriptor;
    const bool rep = f->is_repeated();
    switch (f->cpp_type()) {
      case T::CPPTYPE_INT32:
        rep ? r->AddInt32(m, f, static_cast<int32_t>(Int())) : r->SetInt32(m, f, static_cast<int32_t>(Int()));
        break;
      case T::CPPTYPE_INT64:
        rep ? r->AddInt64(m, f, Int()) : r->SetInt64(m, f, Int());
        break;
      case T::CPPTYPE_UINT32:
        rep ? r->AddUInt32(m, f, static_cast<uint32_t>(rng_())) : r->SetUInt32(m, f, static_cast<uint32_t>(rng_()));
        break;
      case T::CPPTYPE_UINT64:
        rep ? r->AddUInt64(m, f, rng_()) : r->SetUInt64(m, f, rng_());
        break;
      case T::CPPTYPE_DOUBLE: {
        const double v[] = {0, -1, 1e308, NAN, INFINITY, 0.5};
        rep ? r->AddDouble(m, f, v[Pick(0, 5)]) : r->SetDouble(m, f, v[Pick(0, 5)]);
        break;
      }
      case T::CPPTYPE_FLOAT:
        rep ? r->AddFloat(m, f, 1.5f) : r->SetFloat(m, f, 1.5f);
        break;
      case T::CPPTYPE_BOOL:
        rep ? r->AddBool(m, f, Pick(0, 1)) : r->SetBool(m, f, Pick(0, 1));
        break;
      case T::CPPTYPE_ENUM:
        rep ? r->AddEnumValue(m, f, Pick(-1, 6)) : r->SetEnumValue(m, f, Pick(-1, 6));
        break;
      case T::CPPTYPE_STRING: {
        const std::string v = f->type() == T::TYPE_BYTES && Pick(0, 1) ? RandomBytes() : Str();
        rep ? r->AddString(m, f, v) : r->SetString(m, f, v);
        break;
      }
      case T::CPPTYPE_MESSAGE:
        if (depth < 4) Fill(rep ? r->AddMessage(m, f) : r->MutableMessage(m, f), depth + 1);
        break;
    }
  }

  std::mt19937_64 rng_;
  std::vector<std::string> names_;
};

TEST(FuzzTest, EveryHandlerSurvivesRandomAndHostileInput) {
  std::unique_ptr<TestServer> s = SmallLimitsServer("fuzz");
  ASSERT_NE(s, nullptr);
  auto client = ClientFor(*s);
  // Some state for the hostile messages to hit: a job with a worker, metrics, a checkpoint and
  // a tensor set.
  RegisterWorkerRequest w;
  w.set_job_id("j");
  w.set_world_size(2);
  w.set_rank(0);
  w.set_host("h");
  absl::StatusOr<RegisterWorkerResponse> reg = client->RegisterWorker(w);
  ASSERT_TRUE(reg.ok()) << reg.status();
  const std::string file = FreshDir("fuzz_files") + "/ck";
  { std::ofstream(file) << "checkpoint bytes"; }
  ASSERT_TRUE(client->UploadCheckpoint("j", 5, file).ok());
  std::vector<TensorIn> t(1);
  t[0].spec.set_name("w");
  t[0].spec.set_dtype("U8");
  t[0].spec.add_shape(4);
  t[0].data = "abcd";
  ASSERT_TRUE(client->PushTensors("set", t).ok());

  const std::set<StatusCode> allowed = {
      StatusCode::OK,          StatusCode::INVALID_ARGUMENT,   StatusCode::RESOURCE_EXHAUSTED,
      StatusCode::NOT_FOUND,   StatusCode::FAILED_PRECONDITION, StatusCode::ALREADY_EXISTS,
      StatusCode::ABORTED,     StatusCode::DATA_LOSS,          StatusCode::DEADLINE_EXCEEDED};
  auto ch = PlainChannel(s->address);
  Fuzzer fuzz(42, {"j", "set", "w", reg->worker_id(), "job2"});
  int calls = 0;
  for (const std::string& method : AllMethods({kParameterService, kHealthService})) {
    const pb::MethodDescriptor* md = Method(method);
    ASSERT_NE(md, nullptr) << method;
    const bool may_wait = md->server_streaming() || md->name() == "Rendezvous";
    const int rounds = may_wait ? 15 : 80;
    const pb::Message* proto =
        pb::MessageFactory::generated_factory()->GetPrototype(md->input_type());
    for (int i = 0; i < rounds; ++i) {
      std::vector<std::string> msgs;
      const int n = md->client_streaming() ? 1 + i % 5 : 1;
      for (int k = 0; k < n; ++k) {
        if (i % 3 == 0) {
          msgs.push_back(fuzz.RandomBytes());
        } else {
          std::unique_ptr<pb::Message> m(proto->New());
          fuzz.Fill(m.get(), 0);
          msgs.push_back(m->SerializePartialAsString());
        }
      }
      RawResult r = RawCall(ch, method, msgs, Auth(*s), may_wait ? 0.3 : 5);
      ++calls;
      EXPECT_TRUE(allowed.count(r.status.error_code()))
          << method << " round " << i << ": code " << r.status.error_code() << " "
          << r.status.error_message();
    }
  }
  EXPECT_GT(calls, 500);
  // Still serving, still correct.
  absl::StatusOr<StatusResponse> st = client->Status();
  ASSERT_TRUE(st.ok()) << st.status();
  absl::StatusOr<std::vector<CheckpointInfo>> cks = client->ListCheckpoints("j");
  ASSERT_TRUE(cks.ok());
  for (const CheckpointInfo& c : *cks) {
    // Whatever got stored passed the size and SHA-256 checks.
    const std::string back = FreshDir("fuzz_back") + "/x";
    ASSERT_TRUE(client->DownloadCheckpoint("j", c.step(), back).ok()) << c.step();
  }
  EXPECT_EQ(s->server->env().uploads->Acquire().ok(), true);  // every upload slot came back
  absl::StatusOr<std::optional<TensorSetData>> set = client->PullTensors("set");
  ASSERT_TRUE(set.ok() && set->has_value()) << set.status();
}

}  // namespace
}  // namespace qtrain::ps::testing
