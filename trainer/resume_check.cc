// CompareSpecsForResume: a reflection walk over both specs.
#include "trainer/resume_check.h"

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "configs/job_spec_loader.h"
#include "google/protobuf/descriptor.h"
#include "google/protobuf/text_format.h"

namespace qtrain {
namespace {

namespace pb = google::protobuf;

// Fields whose change leaves the computation of every remaining step as it was. Prefixes end
// in '.' for a whole message.
constexpr const char* kResumeSafe[] = {
    "name",          "out_dir",     "data.train_pattern", "data.val_pattern", "eval.",
    "checkpoint.",   "logging.",    "distributed.",       "parameter_service.",
    // Ignored on resume (the checkpoint's weights win).
    "training.init_from",
    // The global batch (ranks x batch_size x grad_accum) is checked on its own; its split over
    // ranks and micro-steps may change, as resuming on another number of ranks needs.
    "training.batch_size", "training.grad_accum",
};

bool IsResumeSafe(const std::string& field) {
  for (const char* safe : kResumeSafe) {
    const absl::string_view s(safe);
    if (absl::EndsWith(s, ".") ? absl::StartsWith(field, s) : field == s) return true;
  }
  return false;
}

std::string Note(const std::string& field) {
  if (field == "training.steps")
    return "the cosine schedule spans training.steps: the learning rate of every remaining step "
           "changes";
  if (absl::StartsWith(field, "schedule.") || absl::StartsWith(field, "optimizer."))
    return "changes every remaining update";
  if (absl::StartsWith(field, "model.")) return "the checkpoint's tensors have the other shape";
  if (absl::StartsWith(field, "precision.")) return "changes what every step computes";
  if (field == "seed") return "the checkpoint's RNG state continues the old seed's stream";
  if (absl::StartsWith(field, "data."))
    return "the data position of the checkpoint must point at the same tokens";
  return "";
}

std::string ValueText(const pb::Message& m, const pb::FieldDescriptor* f) {
  const pb::Reflection* r = m.GetReflection();
  if (f->is_repeated()) {
    std::vector<std::string> items;
    for (int i = 0; i < r->FieldSize(m, f); ++i) {
      std::string v;
      pb::TextFormat::PrintFieldValueToString(m, f, i, &v);
      items.push_back(f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE
                          ? absl::StrCat("{ ", v, "}")
                          : v);
    }
    return absl::StrCat("[", absl::StrJoin(items, ", "), "]");
  }
  if (f->has_presence() && !r->HasField(m, f)) return "(unset)";
  std::string v;
  pb::TextFormat::PrintFieldValueToString(m, f, -1, &v);
  return v;
}

void Compare(const pb::Message& a, const pb::Message& b, const std::string& prefix,
             std::vector<SpecChange>* out) {
  const pb::Descriptor* d = a.GetDescriptor();
  const pb::Reflection* ra = a.GetReflection();
  const pb::Reflection* rb = b.GetReflection();
  for (int i = 0; i < d->field_count(); ++i) {
    const pb::FieldDescriptor* f = d->field(i);
    const std::string path = prefix.empty() ? f->name() : absl::StrCat(prefix, ".", f->name());
    if (!f->is_repeated() && f->cpp_type() == pb::FieldDescriptor::CPPTYPE_MESSAGE) {
      Compare(ra->GetMessage(a, f), rb->GetMessage(b, f), path, out);
      continue;
    }
    const std::string before = ValueText(a, f), after = ValueText(b, f);
    if (before == after) continue;
    out->push_back({path, before, after, IsResumeSafe(path), Note(path)});
  }
}

}  // namespace

absl::StatusOr<std::vector<SpecChange>> CompareSpecsForResume(const std::string& checkpoint_spec,
                                                              const JobSpec& now) {
  JobSpec then;
  if (!pb::TextFormat::ParseFromString(checkpoint_spec, &then)) {
    return absl::InvalidArgumentError(
        "the checkpoint's job_spec metadata does not parse as a JobSpec of this version");
  }
  ApplyDefaults(&then);
  JobSpec current = now;
  ApplyDefaults(&current);
  std::vector<SpecChange> changes;
  Compare(then, current, "", &changes);
  return changes;
}

std::string FormatSpecChanges(const std::vector<SpecChange>& changes) {
  std::vector<std::string> lines;
  for (const SpecChange& c : changes) {
    lines.push_back(absl::StrCat("  ", c.field, ": ", c.before, " -> ", c.after,
                                 c.note.empty() ? "" : absl::StrCat(" (", c.note, ")")));
  }
  return absl::StrJoin(lines, "\n");
}

}  // namespace qtrain
