// A run's out_dir: who may start a run in it (a fresh run never writes over another run's
// checkpoints or metrics unless told to) and its absolute path for messages.
#ifndef QTRAIN_TRAINER_OUT_DIR_H_
#define QTRAIN_TRAINER_OUT_DIR_H_

#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"

namespace qtrain {

// For a fresh run into `out_dir`: OK when it holds no checkpoint and no non-empty
// metrics.jsonl. Otherwise FailedPrecondition naming the directory and suggesting
// --resume=latest or --overwrite; with `overwrite` those files are deleted instead, unless one of
// them is a file the job reads (`inputs`: field name and path, e.g. training.init_from).
absl::Status ClaimOutDir(const std::string& out_dir, bool overwrite,
                         const std::vector<std::pair<std::string, std::string>>& inputs);

// `path` made absolute against the working directory (lexically normalised), for messages.
std::string AbsolutePath(const std::string& path);

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_OUT_DIR_H_
