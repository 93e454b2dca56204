// Job spec loading: text-format parsing with positioned errors, documented defaults, a
// validator that names every bad field, and the list of features not implemented yet.
#include "configs/job_spec_loader.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <set>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/tokenizer.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "google/protobuf/text_format.h"

namespace qtrain {
namespace {

namespace pb = google::protobuf;

// Defaults (docs/job_spec.md and the proto comments state the same numbers).
constexpr int kDefaultVocabSize = 256;
constexpr float kDefaultInitStd = 0.02f;
constexpr float kDefaultBeta1 = 0.9f;
constexpr float kDefaultBeta2 = 0.95f;
constexpr float kDefaultAdamEps = 1e-8f;
constexpr float kDefaultWeightDecay = 0.1f;
constexpr float kDefaultGradClip = 1.0f;
constexpr float kDefaultMinLrRatio = 0.1f;
constexpr int kDefaultGradAccum = 1;
constexpr int kDefaultEvalBatches = 8;
constexpr int kDefaultKeepLast = 2;
constexpr int kDefaultLogEvery = 1;
constexpr char kDefaultTrainPattern[] = "data/brown/mixed_train.bin";
constexpr char kDefaultValPattern[] = "data/brown/mixed_val.bin";
constexpr int kDefaultAmaxHistoryLen = 16;
constexpr int kDefaultAuxRank = 32;
constexpr float kDefaultTweoLambda = 0.01f;
constexpr float kDefaultTweoTau = 3.0f;
constexpr float kDefaultTweoP = 4.0f;
constexpr float kDefaultTweoEps = 1e-6f;

constexpr int kMaxVocabSize = 65536;  // token shards hold uint16
constexpr int kMaxAmaxHistoryLen = 1024;

// ---------------------------------------------------------------------------------------------
// Defaults, one function per message so RejectUnimplemented can compare a sub-message with
// its defaulted form ("set" means "differs from what the defaults make of an empty one").

void FillDefaults(Fp8Spec* f) {
  if (f->scaling() == FP8_SCALING_UNSPECIFIED) f->set_scaling(DELAYED);
  if (f->amax_history_len() == 0) f->set_amax_history_len(kDefaultAmaxHistoryLen);
}

void FillDefaults(QatSpec* q) {
  if (q->weight_granularity() == GRANULARITY_UNSPECIFIED) q->set_weight_granularity(PER_CHANNEL);
  if (q->act_granularity() == GRANULARITY_UNSPECIFIED) q->set_act_granularity(PER_TENSOR);
  if (q->scale_init() == SCALE_INIT_UNSPECIFIED) q->set_scale_init(LSQ_MEAN);
}

void FillDefaults(AuxLowRankSpec* a) {
  if (a->rank() == 0) a->set_rank(kDefaultAuxRank);
}

void FillDefaults(TweoSpec* t) {
  if (!t->has_lambda()) t->set_lambda(kDefaultTweoLambda);
  if (!t->has_tau()) t->set_tau(kDefaultTweoTau);
  if (!t->has_p()) t->set_p(kDefaultTweoP);
  if (!t->has_eps()) t->set_eps(kDefaultTweoEps);
}

void FillDefaults(DistillSpec* d) {
  // The loss only means something once there is a teacher; an empty spec stays empty.
  if (!d->teacher_checkpoint().empty() && d->loss() == DistillSpec::LOSS_UNSPECIFIED)
    d->set_loss(DistillSpec::MSE);
}

// Sub-messages without defaults of their own (distributed, parameter_service).
void FillDefaults(pb::Message*) {}

constexpr float kDefaultClientFraction = 0.5f;
constexpr float kDefaultRoundTimeoutS = 600;
constexpr float kDefaultClientTimeoutS = 30;
constexpr float kDefaultDpDelta = 1e-5f;

// A federation's defaults appear only once it is on (aggregation set).
void FillDefaults(FederatedSpec* f) {
  if (f->aggregation() == FederatedSpec::AGGREGATION_UNSPECIFIED) return;
  if (!f->has_client_fraction()) f->set_client_fraction(kDefaultClientFraction);
  if (f->min_clients() == 0) f->set_min_clients(1);
  if (!f->has_round_timeout_s()) f->set_round_timeout_s(kDefaultRoundTimeoutS);
  if (!f->has_client_timeout_s()) f->set_client_timeout_s(kDefaultClientTimeoutS);
  if (!f->has_dp_delta()) f->set_dp_delta(kDefaultDpDelta);
  if (f->local_optimizer() == FederatedSpec::LOCAL_OPTIMIZER_UNSPECIFIED)
    f->set_local_optimizer(FederatedSpec::ADAMW);
}

const char* const kLoraTargets[] = {"attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"};

// An adapter spec only gets defaults once it is on (rank > 0).
void FillDefaults(LoraSpec* l) {
  if (l->rank() <= 0) return;
  if (!l->has_alpha()) l->set_alpha(static_cast<float>(l->rank()));
  if (l->targets_size() == 0)
    for (const char* t : kLoraTargets) l->add_targets(t);
}

// ---------------------------------------------------------------------------------------------
// Reflection helpers.

bool SameValue(const pb::Message& a, const pb::Message& b, const pb::FieldDescriptor* f,
               int index) {
  const pb::Reflection* ra = a.GetReflection();
  const pb::Reflection* rb = b.GetReflection();
  const bool rep = f->is_repeated();
#define QT_SAME_(Getter)                                                                    \
  return rep ? ra->GetRepeated##Getter(a, f, index) == rb->GetRepeated##Getter(b, f, index) \
             : ra->Get##Getter(a, f) == rb->Get##Getter(b, f)
  switch (f->cpp_type()) {
    case pb::FieldDescriptor::CPPTYPE_INT32:
      QT_SAME_(Int32);
    case pb::FieldDescriptor::CPPTYPE_INT64:
      QT_SAME_(Int64);
    case pb::FieldDescriptor::CPPTYPE_UINT32:
      QT_SAME_(UInt32);
    case pb::FieldDescriptor::CPPTYPE_UINT64:
      QT_SAME_(UInt64);
    case pb::FieldDescriptor::CPPTYPE_FLOAT:
      QT_SAME_(Float);
    case pb::FieldDescriptor::CPPTYPE_DOUBLE:
      QT_SAME_(Double);
    case pb::FieldDescriptor::CPPTYPE_BOOL:
      QT_SAME_(Bool);
    case pb::FieldDescriptor::CPPTYPE_ENUM:
      QT_SAME_(EnumValue);
    case pb::FieldDescriptor::CPPTYPE_STRING:
      QT_SAME_(String);
    case pb::FieldDescriptor::CPPTYPE_MESSAGE:
      // Elements of a repeated message field (the schema has no maps, so equal messages
      // serialize to equal bytes).
      return (rep ? ra->GetRepeatedMessage(a, f, index) : ra->GetMessage(a, f))
                 .SerializeAsString() ==
             (rep ? rb->GetRepeatedMessage(b, f, index) : rb->GetMessage(b, f)).SerializeAsString();
  }
#undef QT_SAME_
  return false;
}

// Path of the first field (in declaration order) where `a` differs from `b`, or "" if none.
std::string FirstDifference(const pb::Message& a, const pb::Message& b, const std::string& prefix) {
  const pb::Descriptor* d = a.GetDescriptor();
  const pb::Reflection* ra = a.GetReflection();
  const pb::Reflection* rb = b.GetReflection();
  for (int i = 0; i < d->field_count(); ++i) {
    const pb::FieldDescriptor* f = d->field(i);
    const std::string path = absl::StrCat(prefix, ".", f->name());
    if (f->is_repeated()) {
      const int n = ra->FieldSize(a, f);
      if (n != rb->FieldSize(b, f)) return path;
      for (int j = 0; j < n; ++j)
        if (!SameValue(a, b, f, j)) return absl::StrCat(path, "[", j, "]");
      continue;
    }
    if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
      std::string sub = FirstDifference(ra->GetMessage(a, f), rb->GetMessage(b, f), path);
      if (!sub.empty()) return sub;
      continue;
    }
    if (f->has_presence() && ra->HasField(a, f) != rb->HasField(b, f)) return path;
    if (!SameValue(a, b, f, -1)) return path;
  }
  return "";
}

// The first field of `m` that differs from what the defaults make of an empty M ("" if none),
// so that spelling out a default value does not count as using a feature.
template <typename M>
std::string ChangedField(const M& m, const std::string& prefix) {
  M filled = m;
  FillDefaults(&filled);
  M reference;
  FillDefaults(&reference);
  return FirstDifference(filled, reference, prefix);
}

// An enum value's name, or its number when the schema does not know it.
std::string EnumName(const pb::EnumDescriptor* e, int value) {
  const pb::EnumValueDescriptor* v = e->FindValueByNumber(value);
  return v != nullptr ? v->name() : absl::StrCat(value);
}

// ---------------------------------------------------------------------------------------------
// Validation.

// Collects one line per error; every line starts with the field path.
class Errors {
 public:
  template <typename... Args>
  void Add(absl::string_view field, const Args&... args) {
    lines_.push_back(absl::StrCat(field, ": ", args...));
  }

  void Positive(absl::string_view field, int64_t v) {
    if (v <= 0) Add(field, "must be > 0, got ", v);
  }
  void NonNegative(absl::string_view field, int64_t v) {
    if (v < 0) Add(field, "must be >= 0, got ", v);
  }
  void PositiveFinite(absl::string_view field, float v) {
    if (!(std::isfinite(v) && v > 0)) Add(field, "must be > 0 and finite, got ", v);
  }
  void NonNegativeFinite(absl::string_view field, float v) {
    if (!(std::isfinite(v) && v >= 0)) Add(field, "must be >= 0 and finite, got ", v);
  }
  // [lo, hi) when hi_open, else [lo, hi]; NaN fails both.
  void FloatRange(absl::string_view field, float v, float lo, float hi, bool hi_open) {
    const bool ok = v >= lo && (hi_open ? v < hi : v <= hi);
    if (!ok) Add(field, "must be in [", lo, ", ", hi, hi_open ? ")" : "]", ", got ", v);
  }

  bool empty() const { return lines_.empty(); }
  std::string Joined() const { return absl::StrJoin(lines_, "\n"); }

 private:
  std::vector<std::string> lines_;
};

bool IsPowerOfTwo(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// Every enum field anywhere in the spec must hold a value the schema names (proto3 enums are
// open, so a number in the text would otherwise pass through).
void CheckEnums(const pb::Message& m, const std::string& prefix, Errors* errors) {
  const pb::Descriptor* d = m.GetDescriptor();
  const pb::Reflection* r = m.GetReflection();
  for (int i = 0; i < d->field_count(); ++i) {
    const pb::FieldDescriptor* f = d->field(i);
    const std::string path = prefix.empty() ? f->name() : absl::StrCat(prefix, ".", f->name());
    if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
      if (f->is_repeated()) {
        for (int j = 0; j < r->FieldSize(m, f); ++j)
          CheckEnums(r->GetRepeatedMessage(m, f, j), absl::StrCat(path, "[", j, "]"), errors);
      } else {
        CheckEnums(r->GetMessage(m, f), path, errors);
      }
    } else if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_ENUM) {
      const int n = f->is_repeated() ? r->FieldSize(m, f) : 1;
      for (int j = 0; j < n; ++j) {
        const int v = f->is_repeated() ? r->GetRepeatedEnumValue(m, f, j) : r->GetEnumValue(m, f);
        if (f->enum_type()->FindValueByNumber(v) == nullptr)
          errors->Add(path, "unknown ", f->enum_type()->name(), " value ", v);
      }
    }
  }
}

bool UsesPrecision(const PrecisionSpec& p, LinearPrecision which) {
  if (p.linear() == which) return true;
  for (const LayerOverride& o : p.overrides())
    if (o.precision() == which) return true;
  return false;
}

// "*" or "block.<i>.<part>"; returns the problem, or "" when `match` is legal.
std::string CheckOverrideMatch(const std::string& match, int n_layer) {
  if (match == "*") return "";
  static const std::set<std::string> kParts = {"*", "attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"};
  const std::string legal =
      "must be \"*\" or \"block.<i>.\" followed by one of *, attn.qkv, attn.proj, mlp.fc, "
      "mlp.proj";
  if (!absl::StartsWith(match, "block.")) return absl::StrCat(legal, ", got \"", match, "\"");
  const absl::string_view rest = absl::string_view(match).substr(6);
  const size_t dot = rest.find('.');
  int block = -1;
  if (dot == absl::string_view::npos || dot == 0 ||
      !std::all_of(rest.begin(), rest.begin() + dot, absl::ascii_isdigit) ||
      !absl::SimpleAtoi(rest.substr(0, dot), &block) ||
      kParts.count(std::string(rest.substr(dot + 1))) == 0) {
    return absl::StrCat(legal, ", got \"", match, "\"");
  }
  if (block >= n_layer)
    return absl::StrCat("block ", block, " in \"", match, "\" does not exist (model.n_layer ",
                        n_layer, ")");
  return "";
}

void CheckName(const JobSpec& spec, Errors* e) {
  const std::string& name = spec.name();
  if (name.empty()) {
    e->Add("name", "must not be empty");
  } else if (name == "." || name == ".." || !std::all_of(name.begin(), name.end(), [](char c) {
               return absl::ascii_isalnum(c) || c == '_' || c == '-' || c == '.';
             })) {
    // The name becomes a directory (out/<name>) and a metrics label.
    e->Add("name", "\"", name, "\" must be letters, digits, '_', '-' and '.' only");
  }
  if (spec.out_dir().empty()) e->Add("out_dir", "must not be empty");
}

void CheckModel(const JobSpec& spec, Errors* e) {
  const ModelSpec& m = spec.model();
  e->Positive("model.n_layer", m.n_layer());
  e->Positive("model.n_embd", m.n_embd());
  e->Positive("model.n_head", m.n_head());
  if (m.n_embd() > 0 && m.n_head() > 0 && m.n_embd() % m.n_head() != 0)
    e->Add("model.n_head", m.n_head(), " does not divide model.n_embd ", m.n_embd());
  if (m.vocab_size() < 2 || m.vocab_size() > kMaxVocabSize)
    e->Add("model.vocab_size", "must be in [2, ", kMaxVocabSize, "] (tokens are uint16), got ",
           m.vocab_size());
  if (m.padded_vocab_size() != 0 &&
      (m.padded_vocab_size() < m.vocab_size() || m.padded_vocab_size() > kMaxVocabSize))
    e->Add("model.padded_vocab_size", "must be in [model.vocab_size ", m.vocab_size(), ", ",
           kMaxVocabSize, "], got ", m.padded_vocab_size());
  e->Positive("model.max_seq_len", m.max_seq_len());
  if (m.max_seq_len() > 0 && m.max_seq_len() < spec.training().seq_len())
    e->Add("model.max_seq_len", m.max_seq_len(), " is less than training.seq_len ",
           spec.training().seq_len());
  e->PositiveFinite("model.init_std", m.init_std());
}

void CheckData(const JobSpec& spec, Errors* e) {
  const DataSpec& d = spec.data();
  if (d.train_pattern().empty()) e->Add("data.train_pattern", "must not be empty");
  if (d.val_pattern().empty()) e->Add("data.val_pattern", "must not be empty");
  // The Brown corpus's 15 genres (file names ca..cr; there is no i, o or q).
  static const std::set<std::string> kGenres = {"a", "b", "c", "d", "e", "f", "g", "h",
                                                "j", "k", "l", "m", "n", "p", "r"};
  std::set<std::string> seen;
  for (int i = 0; i < d.genres_size(); ++i) {
    const std::string field = absl::StrCat("data.genres[", i, "]");
    const std::string& g = d.genres(i);
    if (kGenres.count(g) == 0)
      e->Add(field, "must be a Brown genre letter (a-h, j-n, p, r), got \"", g, "\"");
    else if (!seen.insert(g).second)
      e->Add(field, "genre \"", g, "\" is listed twice");
  }
  if (d.genres_size() > 0 &&
      spec.federated().aggregation() == FederatedSpec::AGGREGATION_UNSPECIFIED)
    e->Add("data.genres", "only for federated jobs (federated.aggregation is unset)");
}

bool IsFederated(const JobSpec& spec) {
  return spec.federated().aggregation() != FederatedSpec::AGGREGATION_UNSPECIFIED;
}

void CheckFederated(const JobSpec& spec, Errors* e) {
  const FederatedSpec& f = spec.federated();
  const bool federated = IsFederated(spec);
  const std::pair<const char*, int> counts[] = {{"federated.rounds", f.rounds()},
                                                {"federated.clients", f.clients()},
                                                {"federated.local_steps", f.local_steps()}};
  for (const auto& [field, v] : counts) {
    if (federated)
      e->Positive(field, v);
    else if (v != 0)
      e->Add(field, "set to ", v, " without federated.aggregation");
  }
  e->NonNegativeFinite("federated.dp_clip", f.dp_clip());
  e->NonNegativeFinite("federated.dp_noise", f.dp_noise());
  e->NonNegativeFinite("federated.dp_epsilon", f.dp_epsilon());
  if (f.dp_noise() > 0 && !(f.dp_clip() > 0))
    e->Add("federated.dp_noise", "DP-SGD noise needs federated.dp_clip > 0, got dp_clip ",
           f.dp_clip());
  if (f.dp_epsilon() > 0 && !(f.dp_clip() > 0))
    e->Add("federated.dp_epsilon", "a DP target needs federated.dp_clip > 0, got dp_clip ",
           f.dp_clip());
  if (f.dp_epsilon() > 0 && f.dp_noise() > 0)
    e->Add("federated.dp_noise", "give dp_noise or dp_epsilon (which derives the noise), not both");
  if (!federated) {
    if (f.dp_clip() != 0 || f.dp_noise() != 0 || f.dp_epsilon() != 0)
      e->Add("federated.dp_clip", "DP settings given without federated.aggregation");
    return;
  }
  e->FloatRange("federated.client_fraction", f.client_fraction(), 0, 1, /*hi_open=*/false);
  if (f.client_fraction() == 0) e->Add("federated.client_fraction", "must be > 0, got 0");
  if (f.min_clients() < 1 || (f.clients() > 0 && f.min_clients() > f.clients()))
    e->Add("federated.min_clients", "must be in [1, federated.clients ", f.clients(), "], got ",
           f.min_clients());
  e->PositiveFinite("federated.round_timeout_s", f.round_timeout_s());
  e->PositiveFinite("federated.client_timeout_s", f.client_timeout_s());
  if (!(f.dp_delta() > 0 && f.dp_delta() < 1))
    e->Add("federated.dp_delta", "must be in (0, 1), got ", f.dp_delta());
  e->NonNegative("federated.eval_every_rounds", f.eval_every_rounds());
  if (f.client_train_pattern().empty())
    e->Add("federated.client_train_pattern", "must name each client's shards ({client}, {genre})");
  else if (f.client_train_pattern().find("{genre}") != std::string::npos &&
           spec.data().genres_size() == 0)
    e->Add("federated.client_train_pattern", "uses {genre} but data.genres is empty");
  if (spec.lora().rank() <= 0)
    e->Add("lora.rank", "a federated job trains LoRA adapters: set lora.rank and lora.base");
  if (spec.device() == CUDA)
    e->Add("device", "federated clients run on the CPU (device CPU), got CUDA");
  // The round loop replaces the step loop: its step-based settings do not apply.
  if (spec.training().steps() != 0)
    e->Add("training.steps", "must be 0 in a federated job (federated.rounds x "
           "federated.local_steps), got ", spec.training().steps());
  if (spec.eval().every_steps() != 0)
    e->Add("eval.every_steps", "must be 0 in a federated job (federated.eval_every_rounds), got ",
           spec.eval().every_steps());
  if (spec.checkpoint().every_steps() != 0)
    e->Add("checkpoint.every_steps", "must be 0 in a federated job (the server checkpoints "
           "every round), got ", spec.checkpoint().every_steps());
  if (spec.schedule().warmup_steps() > 0 && f.rounds() > 0 &&
      spec.schedule().warmup_steps() >= f.rounds())
    e->Add("schedule.warmup_steps", "counts rounds in a federated job: must be < federated.rounds ",
           f.rounds(), ", got ", spec.schedule().warmup_steps());
}

void CheckLora(const JobSpec& spec, Errors* e) {
  const LoraSpec& l = spec.lora();
  e->NonNegative("lora.rank", l.rank());
  if (l.rank() == 0) {
    if (l.has_alpha()) e->Add("lora.alpha", "set without lora.rank");
    if (l.targets_size() > 0) e->Add("lora.targets", "set without lora.rank");
    if (!l.base().empty()) e->Add("lora.base", "set without lora.rank");
    return;
  }
  if (l.rank() > spec.model().n_embd() && spec.model().n_embd() > 0)
    e->Add("lora.rank", "must be <= model.n_embd ", spec.model().n_embd(), ", got ", l.rank());
  e->PositiveFinite("lora.alpha", l.alpha());
  std::set<std::string> seen;
  for (int i = 0; i < l.targets_size(); ++i) {
    const std::string field = absl::StrCat("lora.targets[", i, "]");
    const std::string& t = l.targets(i);
    if (std::find(std::begin(kLoraTargets), std::end(kLoraTargets), t) == std::end(kLoraTargets))
      e->Add(field, "must be one of attn.qkv, attn.proj, mlp.fc, mlp.proj, got \"", t, "\"");
    else if (!seen.insert(t).second)
      e->Add(field, "\"", t, "\" is listed twice");
  }
  if (l.base().empty()) e->Add("lora.base", "must name the frozen base (checkpoint or export)");
}

void CheckPrecision(const JobSpec& spec, Errors* e) {
  const PrecisionSpec& p = spec.precision();
  const int n_embd = spec.model().n_embd();

  for (int i = 0; i < p.overrides_size(); ++i) {
    const LayerOverride& o = p.overrides(i);
    const std::string field = absl::StrCat("precision.overrides[", i, "]");
    const std::string problem = CheckOverrideMatch(o.match(), spec.model().n_layer());
    if (!problem.empty()) e->Add(field + ".match", problem);
    if (o.precision() == PRECISION_UNSPECIFIED)
      e->Add(field + ".precision", "must be FULL, FP8 or QAT, got PRECISION_UNSPECIFIED");
  }

  const int keep = p.keep_first_last_blocks();
  if (keep < 0 || 2 * keep > spec.model().n_layer())
    e->Add("precision.keep_first_last_blocks", "must be in [0, model.n_layer / 2] = [0, ",
           spec.model().n_layer() / 2, "], got ", keep);

  const Fp8Spec& f = p.fp8();
  if (f.amax_history_len() < 1 || f.amax_history_len() > kMaxAmaxHistoryLen)
    e->Add("precision.fp8.amax_history_len", "must be in [1, ", kMaxAmaxHistoryLen, "], got ",
           f.amax_history_len());
  e->NonNegative("precision.fp8.margin", f.margin());
  if (spec.device() != CUDA) {
    if (f.fprop_accumulation() != FP8_ACCUMULATION_UNSPECIFIED)
      e->Add("precision.fp8.fprop_accumulation", "chooses the GPU's FP8 GEMM accumulation; the "
             "CPU emulation sums exactly (device CPU)");
    if (f.backward_accumulation() != FP8_ACCUMULATION_UNSPECIFIED)
      e->Add("precision.fp8.backward_accumulation", "chooses the GPU's FP8 GEMM accumulation; "
             "the CPU emulation sums exactly (device CPU)");
  }

  const QatSpec& q = p.qat();
  const bool uses_qat = UsesPrecision(p, QAT);
  const int wb = q.weight_bits();
  if (wb != 0 && wb != 2 && wb != 3 && wb != 4 && wb != 8)
    e->Add("precision.qat.weight_bits", "must be one of 2, 3, 4, 8, got ", wb);
  else if (wb == 0 && uses_qat)
    e->Add("precision.qat.weight_bits", "must be one of 2, 3, 4, 8 when a Linear uses QAT, got 0");
  const QuantGranularity wg = q.weight_granularity();
  if (wg != GRANULARITY_UNSPECIFIED && wg != PER_CHANNEL && wg != PER_GROUP)
    e->Add("precision.qat.weight_granularity",
           "weights are quantized PER_CHANNEL or PER_GROUP, got ", QuantGranularity_Name(wg));
  if (wg == PER_GROUP) {
    if (!IsPowerOfTwo(q.group_size()))
      e->Add("precision.qat.group_size", "must be a power of two > 0 for PER_GROUP, got ",
             q.group_size());
    else if (n_embd > 0 && n_embd % q.group_size() != 0)
      e->Add("precision.qat.group_size", q.group_size(), " does not divide model.n_embd ", n_embd);
  } else if (q.group_size() != 0) {
    e->Add("precision.qat.group_size", "only used with weight_granularity PER_GROUP, got ",
           q.group_size());
  }
  if (q.act_bits() != 0 && q.act_bits() != 4 && q.act_bits() != 8)
    e->Add("precision.qat.act_bits", "must be 0 (full precision), 4 or 8, got ", q.act_bits());
  const QuantGranularity ag = q.act_granularity();
  if (ag != GRANULARITY_UNSPECIFIED && ag != PER_TENSOR && ag != PER_TOKEN)
    e->Add("precision.qat.act_granularity",
           "activations are quantized PER_TENSOR or PER_TOKEN, got ", QuantGranularity_Name(ag));
  if (q.act_asymmetric() && q.act_bits() == 0)
    e->Add("precision.qat.act_asymmetric", "needs act_bits 4 or 8, got act_bits 0");
  if (q.int8_forward()) {
    // The INT8 GEMM multiplies integer codes: symmetric codes with one scale per output channel
    // and per token (or tensor) are the only ones whose product it can rescale exactly.
    if (spec.device() != CUDA)
      e->Add("precision.qat.int8_forward", "runs on device CUDA only, got device ",
             Device_Name(spec.device() == DEVICE_UNSPECIFIED ? CPU : spec.device()));
    if (wg == PER_GROUP)
      e->Add("precision.qat.int8_forward", "needs weight_granularity PER_CHANNEL, got PER_GROUP");
    if (q.weight_asymmetric())
      e->Add("precision.qat.int8_forward", "needs symmetric weights, got weight_asymmetric");
    if (q.act_bits() == 0)
      e->Add("precision.qat.int8_forward", "needs quantized activations (act_bits 4 or 8), got 0");
    if (q.act_asymmetric())
      e->Add("precision.qat.int8_forward", "needs symmetric activations, got act_asymmetric");
  }

  const AuxLowRankSpec& a = p.aux_lowrank();
  if (!IsPowerOfTwo(a.rank())) {
    e->Add("precision.aux_lowrank.rank", "must be a power of two >= 1, got ", a.rank());
  } else if (a.enabled() && n_embd > 0 && a.rank() > n_embd) {
    // Only an enabled module must fit: the default 32 exceeds tiny models that do not use it.
    e->Add("precision.aux_lowrank.rank", a.rank(), " exceeds model.n_embd ", n_embd);
  }
  e->NonNegative("precision.aux_lowrank.decay_period", a.decay_period());
  if (a.enabled() && a.decay_period() == 0)
    e->Add("precision.aux_lowrank.decay_period", "must be > 0 when enabled, got 0");
  e->NonNegative("precision.aux_lowrank.start_step", a.start_step());
  if (a.enabled() && !uses_qat)
    e->Add("precision.aux_lowrank.enabled", "needs a Linear with precision QAT");

  const TweoSpec& t = p.tweo();
  e->NonNegativeFinite("precision.tweo.lambda", t.lambda());
  e->PositiveFinite("precision.tweo.tau", t.tau());
  if (!(std::isfinite(t.p()) && t.p() >= 2))
    e->Add("precision.tweo.p", "must be >= 2 and finite, got ", t.p());
  e->PositiveFinite("precision.tweo.eps", t.eps());

  const DistillSpec& d = p.distill();
  e->NonNegativeFinite("precision.distill.weight", d.weight());
  if (d.teacher_checkpoint().empty()) {
    if (d.weight() != 0)
      e->Add("precision.distill.weight", "set to ", d.weight(),
             " without precision.distill.teacher_checkpoint");
    if (d.loss() != DistillSpec::LOSS_UNSPECIFIED)
      e->Add("precision.distill.loss", "set to ",
             EnumName(DistillSpec::Loss_descriptor(), d.loss()),
             " without precision.distill.teacher_checkpoint");
  } else if (d.weight() == 0) {
    e->Add("precision.distill.weight", "must be > 0 with a teacher_checkpoint, got 0");
  }
}

void CheckOptimizer(const JobSpec& spec, Errors* e) {
  const OptimizerSpec& o = spec.optimizer();
  e->PositiveFinite("optimizer.lr", o.lr());
  e->FloatRange("optimizer.beta1", o.beta1(), 0, 1, /*hi_open=*/true);
  e->FloatRange("optimizer.beta2", o.beta2(), 0, 1, /*hi_open=*/true);
  e->PositiveFinite("optimizer.eps", o.eps());
  e->NonNegativeFinite("optimizer.weight_decay", o.weight_decay());
  e->NonNegativeFinite("optimizer.grad_clip", o.grad_clip());
  if (o.zero1() && spec.distributed().backend() == DistributedSpec::BACKEND_UNSPECIFIED)
    e->Add("optimizer.zero1", "shards state across ranks; needs distributed.backend MPI or NCCL");
}

void CheckTraining(const JobSpec& spec, Errors* e) {
  const TrainingSpec& t = spec.training();
  if (!IsFederated(spec)) e->Positive("training.steps", t.steps());  // else CheckFederated
  e->Positive("training.batch_size", t.batch_size());
  e->Positive("training.seq_len", t.seq_len());
  e->Positive("training.grad_accum", t.grad_accum());
  e->NonNegative("training.lm_head_chunks", t.lm_head_chunks());
  if (t.lm_head_chunks() > 0 && t.batch_size() > 0 && t.seq_len() > 0 &&
      t.lm_head_chunks() > static_cast<int64_t>(t.batch_size()) * t.seq_len())
    e->Add("training.lm_head_chunks", "must be <= batch_size * seq_len ",
           static_cast<int64_t>(t.batch_size()) * t.seq_len(), ", got ", t.lm_head_chunks());

  const ScheduleSpec& s = spec.schedule();
  e->NonNegative("schedule.warmup_steps", s.warmup_steps());
  if (s.warmup_steps() >= 0 && t.steps() > 0 && s.warmup_steps() >= t.steps())
    e->Add("schedule.warmup_steps", "must be < training.steps ", t.steps(), ", got ",
           s.warmup_steps());
  e->FloatRange("schedule.min_lr_ratio", s.min_lr_ratio(), 0, 1, /*hi_open=*/false);

  e->NonNegative("eval.every_steps", spec.eval().every_steps());
  e->Positive("eval.batches", spec.eval().batches());
  e->NonNegative("checkpoint.every_steps", spec.checkpoint().every_steps());
  e->Positive("checkpoint.keep_last", spec.checkpoint().keep_last());
  e->Positive("logging.every_steps", spec.logging().every_steps());
}

void CheckDistributed(const JobSpec& spec, Errors* e) {
  const DistributedSpec& d = spec.distributed();
  e->NonNegative("distributed.bucket_mb", d.bucket_mb());
  e->NonNegative("distributed.timeout_s", d.timeout_s());
  if (d.backend() == DistributedSpec::NCCL && spec.device() != CUDA)
    e->Add("distributed.backend", "NCCL needs device CUDA, got device ",
           EnumName(Device_descriptor(), spec.device()));

  const ParameterServiceSpec& ps = spec.parameter_service();
  // host:port, the host possibly a bracketed IPv6 address.
  auto check_address = [e](const char* field, const std::string& address) {
    const size_t colon = address.rfind(':');
    int port = 0;
    if (colon == std::string::npos || colon == 0 ||
        !absl::SimpleAtoi(absl::string_view(address).substr(colon + 1), &port) || port < 1 ||
        port > 65535)
      e->Add(field, "must be host:port with port in [1, 65535], got \"", address, "\"");
  };
  if (!ps.address().empty()) check_address("parameter_service.address", ps.address());
  if (!d.coordinator().empty()) {
    check_address("distributed.coordinator", d.coordinator());
    if (d.backend() == DistributedSpec::MPI)
      e->Add("distributed.coordinator", "replaces MPI's start-up: leave distributed.backend unset "
             "(CPU ranks reduce over TCP) or NCCL, got backend MPI");
  }
  // The connection settings serve the service wherever it is named.
  if (ps.address().empty() && d.coordinator().empty()) {
    const std::pair<const char*, bool> unused[] = {
        {"parameter_service.token_file", !ps.token_file().empty()},
        {"parameter_service.deadline_ms", ps.deadline_ms() != 0},
        {"parameter_service.heartbeat_ms", ps.heartbeat_ms() != 0},
        {"parameter_service.job_id", !ps.job_id().empty()},
        {"parameter_service.tls_ca_file", !ps.tls_ca_file().empty()},
        {"parameter_service.tls_cert_file", !ps.tls_cert_file().empty()},
        {"parameter_service.tls_key_file", !ps.tls_key_file().empty()},
        {"parameter_service.heartbeat_timeout_ms", ps.heartbeat_timeout_ms() != 0}};
    for (const auto& [field, set] : unused)
      if (set) e->Add(field, "set without parameter_service.address or distributed.coordinator");
  }
  e->NonNegative("parameter_service.deadline_ms", ps.deadline_ms());
  e->NonNegative("parameter_service.heartbeat_ms", ps.heartbeat_ms());
  e->NonNegative("parameter_service.heartbeat_timeout_ms", ps.heartbeat_timeout_ms());
  if (ps.heartbeat_ms() > 0 && ps.heartbeat_timeout_ms() > 0 &&
      ps.heartbeat_timeout_ms() <= ps.heartbeat_ms())
    e->Add("parameter_service.heartbeat_timeout_ms", "must exceed heartbeat_ms (",
           ps.heartbeat_ms(), "), got ", ps.heartbeat_timeout_ms());
  if (!ps.job_id().empty()) {
    bool ok = ps.job_id().size() <= 128 && ps.job_id()[0] != '.';
    for (char c : ps.job_id())
      ok = ok && (absl::ascii_isalnum(c) || c == '.' || c == '_' || c == '-' || c == ':');
    if (!ok)
      e->Add("parameter_service.job_id", "up to 128 of [A-Za-z0-9._:-], not starting with '.', "
             "got \"", ps.job_id(), "\"");
  }
  if (ps.tls_cert_file().empty() != ps.tls_key_file().empty())
    e->Add("parameter_service.tls_cert_file", "goes together with tls_key_file");
  if (!ps.tls_cert_file().empty() && ps.tls_ca_file().empty())
    e->Add("parameter_service.tls_cert_file", "a client certificate needs tls_ca_file (TLS)");
}

std::string PrefixLines(const std::string& prefix, absl::string_view text) {
  std::vector<std::string> lines;
  for (absl::string_view line : absl::StrSplit(text, '\n'))
    lines.push_back(absl::StrCat(prefix, ": ", line));
  return absl::StrJoin(lines, "\n");
}

class IgnoreErrors : public pb::io::ErrorCollector {
 public:
  void AddError(int, pb::io::ColumnNumber, const std::string&) override {}
};

// Protobuf 3.21's text parser reports an unknown field, an unknown enum value or a repeated
// singular field at the token *after* the culprit (it has consumed the name by then). For those
// messages, moves (line, column) back onto the named token so the user lands on the typo.
void PointAtCulprit(const std::string& text, const std::string& message, int* line, int* column) {
  static constexpr absl::string_view kNamedCulprit[] = {
      "has no field named \"", "Unknown enumeration value of \"", "Non-repeated field \""};
  std::string name;
  for (absl::string_view pattern : kNamedCulprit) {
    const size_t at = message.find(std::string(pattern));
    if (at == std::string::npos) continue;
    const size_t begin = at + pattern.size();
    const size_t end = message.find('"', begin);
    if (end != std::string::npos) name = message.substr(begin, end - begin);
    break;
  }
  if (name.empty()) return;
  // Re-tokenize as the text parser does and take the last token before the reported spot.
  pb::io::ArrayInputStream input(text.data(), static_cast<int>(text.size()));
  IgnoreErrors ignore;
  pb::io::Tokenizer tokenizer(&input, &ignore);
  tokenizer.set_comment_style(pb::io::Tokenizer::SH_COMMENT_STYLE);
  tokenizer.set_allow_f_after_float(true);
  tokenizer.set_require_space_after_number(false);
  tokenizer.set_allow_multiline_strings(true);
  int prev_line = -1, prev_column = -1;
  std::string prev_text;
  while (tokenizer.Next()) {
    const pb::io::Tokenizer::Token& t = tokenizer.current();
    if (t.line > *line || (t.line == *line && t.column >= *column)) break;
    prev_line = t.line;
    prev_column = t.column;
    prev_text = t.text;
  }
  if (prev_text == name) {
    *line = prev_line;
    *column = prev_column;
  }
}

// The tokenizer advances its column to the next multiple of 8 at a tab; compilers and editors
// count bytes. Converts the former into the latter for 0-based `line`.
int ByteColumn(const std::string& text, int line, int column) {
  size_t pos = 0;
  for (int l = 0; l < line && pos < text.size(); ++l) {
    pos = text.find('\n', pos);
    pos = pos == std::string::npos ? text.size() : pos + 1;
  }
  int tab_column = 0, bytes = 0;
  while (tab_column < column && pos + bytes < text.size() && text[pos + bytes] != '\n') {
    tab_column += text[pos + bytes] == '\t' ? 8 - tab_column % 8 : 1;
    ++bytes;
  }
  return bytes + (column - tab_column);  // past the line's end: keep the parser's overshoot
}

// Turns the parser's 0-based positions into "file:line:col: message" (1-based, col in bytes).
class PositionedErrors : public pb::io::ErrorCollector {
 public:
  PositionedErrors(const std::string& text, std::string filename)
      : text_(text), filename_(std::move(filename)) {}

  void AddError(int line, pb::io::ColumnNumber column, const std::string& message) override {
    if (line < 0) {
      lines_.push_back(absl::StrCat(filename_, ": ", message));
      return;
    }
    PointAtCulprit(text_, message, &line, &column);
    lines_.push_back(absl::StrCat(filename_, ":", line + 1, ":",
                                  ByteColumn(text_, line, column) + 1, ": ", message));
  }

  std::string Joined() const { return absl::StrJoin(lines_, "\n"); }
  bool empty() const { return lines_.empty(); }

 private:
  const std::string& text_;
  std::string filename_;
  std::vector<std::string> lines_;
};

// Offset of the first byte that cannot be in a text-format file (a NUL, a control character
// other than whitespace, or invalid UTF-8), or -1.
int64_t FirstBinaryByte(const std::string& text) {
  const size_t n = text.size();
  for (size_t i = 0; i < n;) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if (c < 0x80) {
      if ((c < 0x20 && c != '\t' && c != '\n' && c != '\r' && c != '\f' && c != '\v') ||
          c == 0x7f)
        return static_cast<int64_t>(i);
      ++i;
      continue;
    }
    const int len = c >= 0xf0 && c <= 0xf4 ? 4 : c >= 0xe0 ? 3 : c >= 0xc2 && c < 0xe0 ? 2 : 0;
    if (len == 0 || (c >= 0xf5) || i + len > n) return static_cast<int64_t>(i);
    for (int k = 1; k < len; ++k) {
      if ((static_cast<unsigned char>(text[i + k]) & 0xc0) != 0x80) return static_cast<int64_t>(i);
    }
    i += len;
  }
  return -1;
}

}  // namespace

void ApplyDefaults(JobSpec* spec) {
  if (spec->device() == DEVICE_UNSPECIFIED) spec->set_device(CPU);
  if (spec->out_dir().empty()) spec->set_out_dir(absl::StrCat("out/", spec->name()));

  ModelSpec* m = spec->mutable_model();
  if (m->arch() == ARCH_UNSPECIFIED) m->set_arch(GPT2);
  if (m->vocab_size() == 0) m->set_vocab_size(kDefaultVocabSize);
  if (m->max_seq_len() == 0) m->set_max_seq_len(spec->training().seq_len());
  if (!m->has_init_std()) m->set_init_std(kDefaultInitStd);

  DataSpec* d = spec->mutable_data();
  if (d->train_pattern().empty()) d->set_train_pattern(kDefaultTrainPattern);
  if (d->val_pattern().empty()) d->set_val_pattern(kDefaultValPattern);

  PrecisionSpec* p = spec->mutable_precision();
  if (p->linear() == PRECISION_UNSPECIFIED) p->set_linear(FULL);
  FillDefaults(p->mutable_fp8());
  FillDefaults(p->mutable_qat());
  FillDefaults(p->mutable_aux_lowrank());
  FillDefaults(p->mutable_tweo());
  if (p->has_distill()) FillDefaults(p->mutable_distill());

  OptimizerSpec* o = spec->mutable_optimizer();
  if (!o->has_beta1()) o->set_beta1(kDefaultBeta1);
  if (!o->has_beta2()) o->set_beta2(kDefaultBeta2);
  if (!o->has_eps()) o->set_eps(kDefaultAdamEps);
  if (!o->has_weight_decay()) o->set_weight_decay(kDefaultWeightDecay);
  if (!o->has_grad_clip()) o->set_grad_clip(kDefaultGradClip);

  ScheduleSpec* s = spec->mutable_schedule();
  if (!s->has_min_lr_ratio()) s->set_min_lr_ratio(kDefaultMinLrRatio);

  TrainingSpec* t = spec->mutable_training();
  if (t->grad_accum() == 0) t->set_grad_accum(kDefaultGradAccum);

  if (spec->eval().batches() == 0) spec->mutable_eval()->set_batches(kDefaultEvalBatches);
  if (spec->checkpoint().keep_last() == 0)
    spec->mutable_checkpoint()->set_keep_last(kDefaultKeepLast);
  if (spec->logging().every_steps() == 0)
    spec->mutable_logging()->set_every_steps(kDefaultLogEvery);
  if (spec->has_lora()) FillDefaults(spec->mutable_lora());
  if (spec->has_federated()) FillDefaults(spec->mutable_federated());
}

// Settings that nothing would read: a block of a precision no Linear uses, parameters of a
// module that is off. Each is an error naming the first such field (never ignored silently).
void CheckUnusedSettings(const JobSpec& spec, Errors* e) {
  const PrecisionSpec& p = spec.precision();
  const std::string linear = absl::StrCat(
      "precision.linear is ", EnumName(LinearPrecision_descriptor(), p.linear()));
  if (const std::string f = ChangedField(p.qat(), "precision.qat");
      !f.empty() && !UsesPrecision(p, QAT))
    e->Add(f, "is set but no Linear uses QAT (", linear,
           " and no override chooses QAT), so it would be ignored: remove it or use QAT");
  if (const std::string f = ChangedField(p.fp8(), "precision.fp8");
      !f.empty() && !UsesPrecision(p, FP8))
    e->Add(f, "is set but no Linear uses FP8 (", linear,
           " and no override chooses FP8), so it would be ignored: remove it or use FP8");
  if (!p.aux_lowrank().enabled()) {
    if (const std::string f = ChangedField(p.aux_lowrank(), "precision.aux_lowrank"); !f.empty())
      e->Add(f, "is set but precision.aux_lowrank.enabled is false (Phi is off), so it would be "
                "ignored: add enabled: true or remove it");
  }
  if (!p.tweo().enabled()) {
    if (const std::string f = ChangedField(p.tweo(), "precision.tweo"); !f.empty())
      e->Add(f, "is set but precision.tweo.enabled is false (the TWEO loss is off), so it would "
                "be ignored: add enabled: true or remove it");
  }
}

absl::Status ValidateJobSpec(const JobSpec& spec) {
  Errors errors;
  CheckEnums(spec, "", &errors);
  CheckName(spec, &errors);
  CheckModel(spec, &errors);
  CheckData(spec, &errors);
  CheckPrecision(spec, &errors);
  CheckOptimizer(spec, &errors);
  CheckTraining(spec, &errors);
  CheckDistributed(spec, &errors);
  CheckFederated(spec, &errors);
  CheckLora(spec, &errors);
  CheckUnusedSettings(spec, &errors);
  if (!errors.empty()) return absl::InvalidArgumentError(errors.Joined());
  return RejectUnimplemented(spec);
}

// =============================================================================================
// FEATURES NOT IMPLEMENTED YET. One line per feature: delete the line when the feature lands
// (and make sure CheckPrecision & co. already validate its fields).
// =============================================================================================
absl::Status RejectUnimplemented(const JobSpec& spec) {
  std::vector<std::string> lines;
  // `field` "" means the feature is not used.
  auto reject = [&lines](const std::string& field, absl::string_view feature) {
    if (!field.empty())
      lines.push_back(absl::StrCat(field, ": ", feature, " is not implemented yet"));
  };
  // clang-format off
  if (spec.device() == CUDA) {
    if (spec.optimizer().zero1()) reject("optimizer.zero1", "ZeRO-1 on CUDA");
  } else {
    if (spec.training().grad_dtype() == GRAD_BF16)
      reject("training.grad_dtype", "BF16 gradients on the CPU trainer (device CPU)");
    if (spec.training().lm_head_chunks() > 1)
      reject("training.lm_head_chunks", "a chunked LM head on the CPU trainer (device CPU)");
  }
  if (spec.lora().rank() > 0 && !IsFederated(spec))
    reject("lora.rank", "LoRA fine-tuning outside federated jobs");
  // clang-format on
  if (lines.empty()) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrJoin(lines, "\n"));
}

absl::StatusOr<JobSpec> ParseJobSpec(const std::string& text, const std::string& filename,
                                     const std::vector<std::string>& overrides) {
  if (const int64_t at = FirstBinaryByte(text); at >= 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        filename, ": not a text protobuf (byte ", at, " is 0x",
        absl::Hex(static_cast<unsigned char>(text[at]), absl::kZeroPad2),
        ", binary data); a job spec is a text-format JobSpec such as configs/tiny_cpu.textproto"));
  }
  JobSpec spec;
  pb::TextFormat::Parser parser;
  PositionedErrors errors(text, filename);
  parser.RecordErrorsTo(&errors);
  if (!parser.ParseFromString(text, &spec)) {
    if (errors.empty())
      return absl::InvalidArgumentError(absl::StrCat(filename, ": not a valid job spec"));
    return absl::InvalidArgumentError(errors.Joined());
  }
  // Before the defaults, as if the file said so: a default derived from an overridden field
  // (model.max_seq_len from training.seq_len, out_dir from name) follows it.
  for (const std::string& assignment : overrides) {
    absl::Status set = SetJobSpecField(&spec, assignment);
    if (!set.ok()) return set;
  }
  ApplyDefaults(&spec);
  absl::Status status = ValidateJobSpec(spec);
  if (!status.ok()) {
    std::string message = PrefixLines(filename, status.message());
    if (!overrides.empty()) {
      absl::StrAppend(&message, "\n", filename, ": (values after the command line's overrides ",
                      absl::StrJoin(overrides, ", "),
                      "; --set=FIELD=VALUE changes any field, e.g. --set=schedule.warmup_steps=2)");
    }
    return absl::Status(status.code(), message);
  }
  return spec;
}

absl::Status SetJobSpecField(JobSpec* spec, absl::string_view assignment) {
  const size_t eq = assignment.find('=');
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(absl::StrCat("--set ", assignment, ": ", why));
  };
  if (eq == absl::string_view::npos || eq == 0) return bad("expected FIELD=VALUE, e.g. training.steps=100");
  const std::string path(assignment.substr(0, eq));
  const std::string value(assignment.substr(eq + 1));
  pb::Message* m = spec;
  const pb::FieldDescriptor* f = nullptr;
  std::string walked;
  for (absl::string_view part : absl::StrSplit(path, '.')) {
    if (f != nullptr) {
      if (f->cpp_type() != pb::FieldDescriptor::CPPTYPE_MESSAGE || f->is_repeated())
        return bad(absl::StrCat(walked, " is not a message"));
      m = m->GetReflection()->MutableMessage(m, f);
    }
    f = m->GetDescriptor()->FindFieldByName(std::string(part));
    if (f == nullptr) {
      std::vector<std::string> names;
      for (int i = 0; i < m->GetDescriptor()->field_count(); ++i)
        names.push_back(m->GetDescriptor()->field(i)->name());
      return bad(absl::StrCat(walked.empty() ? "the job" : walked, " has no field '", part,
                              "' (fields: ", absl::StrJoin(names, ", "), ")"));
    }
    walked = walked.empty() ? std::string(part) : absl::StrCat(walked, ".", part);
  }
  const pb::Reflection* r = m->GetReflection();
  if (f->is_repeated()) return bad(absl::StrCat(path, " is a list; set it in the job file"));
  if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
    // A whole block in text format replaces the block: --set='precision={linear: QAT ...}'.
    pb::Message* sub = r->MutableMessage(m, f);
    sub->Clear();
    absl::string_view body = absl::StripAsciiWhitespace(value);
    if (absl::StartsWith(body, "{") && absl::EndsWith(body, "}")) {
      body = body.substr(1, body.size() - 2);  // --set='precision.qat={weight_bits: 4}'
    }
    if (!pb::TextFormat::ParseFromString(std::string(body), sub))
      return bad(absl::StrCat("'", value, "' is not a text-format ", f->message_type()->name()));
    return absl::OkStatus();
  }
  if (f->cpp_type() == pb::FieldDescriptor::CPPTYPE_STRING) {
    r->SetString(m, f, value);  // as typed, without text-format quotes
    return absl::OkStatus();
  }
  if (!pb::TextFormat::ParseFieldValueFromString(value, f, m)) {
    return bad(absl::StrCat("'", value, "' is not a ",
                            f->cpp_type() == pb::FieldDescriptor::CPPTYPE_ENUM
                                ? f->enum_type()->name() + " value"
                                : absl::StrCat(f->cpp_type_name(), " value"),
                            " for ", path));
  }
  return absl::OkStatus();
}

absl::StatusOr<JobSpec> LoadJobSpec(const std::string& path,
                                    const std::vector<std::string>& overrides) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    const std::string msg = absl::StrCat("cannot open job spec ", path, ": ", std::strerror(err));
    if (err == ENOENT || err == ENOTDIR) return absl::NotFoundError(msg);
    if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(msg);
    return absl::UnavailableError(msg);
  }
  struct stat st;
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat("job spec ", path, " is not a regular file"));
  }
  std::string text;
  char buf[1 << 16];
  for (;;) {
    const ssize_t n = read(fd, buf, sizeof(buf));
    if (n == 0) break;
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      close(fd);
      return absl::UnavailableError(
          absl::StrCat("cannot read job spec ", path, ": ", std::strerror(err)));
    }
    text.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  return ParseJobSpec(text, path, overrides);
}

std::string JobSpecToText(const JobSpec& spec) {
  std::string text;
  pb::TextFormat::Printer printer;
  printer.PrintToString(spec, &text);
  return text;
}

uint64_t JobSpecHash(const JobSpec& spec) {
  std::string bytes;
  {
    pb::io::StringOutputStream stream(&bytes);
    pb::io::CodedOutputStream coded(&stream);
    coded.SetSerializationDeterministic(true);
    spec.SerializeToCodedStream(&coded);
  }                                      // the coded stream flushes into `bytes` when it goes
  uint64_t h = 14695981039346656037ull;  // FNV-1a 64 offset basis
  for (unsigned char c : bytes) {
    h ^= c;
    h *= 1099511628211ull;  // FNV-1a 64 prime
  }
  return h;
}

}  // namespace qtrain
