// Corpus preparation behind //tools:prepare_data: Brown corpus tag stripping, loading source
// documents, and writing per-genre train/val shards plus an index.
#ifndef QTRAIN_TOOLS_CORPUS_H_
#define QTRAIN_TOOLS_CORPUS_H_

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qtrain {

// One line of Brown text ("The/at jury/nn ./.") -> "The jury ." : every whitespace-separated
// token loses its last "/tag" part (the word itself may hold '/', as in "1/2/cd" or "//in"),
// and words are joined by single spaces. A token without '/' (or whose word part would be
// empty) is kept whole.
std::string StripBrownTags(std::string_view line);

// A whole Brown file -> plain text: paragraphs (runs of non-blank lines) become one line of
// stripped words each, ended by '\n'.
std::string BrownFileToText(std::string_view contents);

// True for the corpus files' names: 'c', the genre letter, two digits (ca01 .. cr09).
bool IsBrownFileName(std::string_view name);

struct SourceDocument {
  std::string name;   // the file name (Brown) or path as given (text files)
  std::string genre;  // Brown: the genre letter; text files: "text"
  std::string text;
};

// The Brown files of `dir`, sorted by name, tags stripped.
absl::StatusOr<std::vector<SourceDocument>> LoadBrownCorpus(const std::string& dir);
// Plain text files, used as is, all of genre "text".
absl::StatusOr<std::vector<SourceDocument>> LoadTextFiles(const std::vector<std::string>& paths);

struct IndexEntry {
  std::string file, genre, split, shard;
  int64_t offset = 0;  // token offset of the document's first text byte in the shard
  int64_t length = 0;  // text tokens (the end-of-text byte before it not counted)
};

struct GenreCounts {
  int64_t train_files = 0, val_files = 0, train_tokens = 0, val_tokens = 0;
};

struct PrepareSummary {
  std::vector<IndexEntry> index;
  std::map<std::string, GenreCounts> genres;
  std::vector<std::string> shards_written;  // file names in out_dir
  std::vector<std::string> stale_removed;   // old train_*/val_* shards deleted from out_dir
};

// Splits documents by their index within their genre: index % val_every == 0 goes to val
// (val_every = 0: no val split); a genre with a single document goes to train, so training
// always sees every genre. Writes <split>_<genre>.bin (each document = the end-of-text
// byte, then its bytes) and index.tsv into out_dir, which is created if needed.
absl::StatusOr<PrepareSummary> WriteSplitShards(const std::vector<SourceDocument>& docs,
                                                const std::string& out_dir, int val_every);

}  // namespace qtrain

#endif  // QTRAIN_TOOLS_CORPUS_H_
