// ClaimOutDir: the fresh-run check of out_dir and --overwrite.
#include "trainer/out_dir.h"

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "trainer/atomic_file.h"
#include "trainer/checkpoint.h"

namespace qtrain {

namespace fs = std::filesystem;

std::string AbsolutePath(const std::string& path) {
  std::error_code ec;
  const fs::path abs = fs::absolute(path, ec);
  return ec ? path : abs.lexically_normal().string();
}

absl::Status ClaimOutDir(const std::string& out_dir, bool overwrite,
                         const std::vector<std::pair<std::string, std::string>>& inputs) {
  const std::vector<std::string> checkpoints = CheckpointFiles(out_dir);
  const std::string metrics = out_dir + "/metrics.jsonl";
  std::error_code ec;
  const bool has_metrics = fs::is_regular_file(metrics, ec) && fs::file_size(metrics, ec) > 0;
  if (checkpoints.empty() && !has_metrics) return absl::OkStatus();
  if (!overwrite) {
    const absl::StatusOr<std::string> latest = LatestCheckpoint(out_dir);
    if (latest.ok()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "out_dir ", AbsolutePath(out_dir), " already holds another run (newest checkpoint ",
          fs::path(*latest).filename().string(), "). Continue that run with --resume=latest, "
          "or pass --overwrite to delete its checkpoints and metrics.jsonl and start afresh, or "
          "choose another --out_dir"));
    }
    return absl::FailedPreconditionError(absl::StrCat(
        "out_dir ", AbsolutePath(out_dir), " already holds another run (",
        has_metrics ? "its metrics.jsonl" : "an unfinished checkpoint",
        ", no complete checkpoint to resume). Pass --overwrite to delete it and start afresh, "
        "or choose another --out_dir"));
  }
  for (const auto& [field, path] : inputs) {
    if (path.empty()) continue;
    for (const std::string& f : checkpoints) {
      if (SameFile(path, f)) {
        return absl::FailedPreconditionError(absl::StrCat(
            "--overwrite would delete ", f, ", which this job reads (", field, " ", path,
            "); copy it out of ", out_dir, " or choose another --out_dir"));
      }
    }
  }
  for (const std::string& f : checkpoints) {
    if (!fs::remove(f, ec) && ec) {
      return absl::InternalError(absl::StrCat("--overwrite: cannot delete ", f, ": ", ec.message()));
    }
  }
  if (fs::exists(metrics, ec) && !fs::remove(metrics, ec) && ec) {
    return absl::InternalError(
        absl::StrCat("--overwrite: cannot delete ", metrics, ": ", ec.message()));
  }
  return absl::OkStatus();
}

}  // namespace qtrain
