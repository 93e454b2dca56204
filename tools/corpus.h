// Corpus preparation behind //tools:prepare_data: Brown corpus tag stripping, loading source
// documents, and writing per-genre train/val shards plus an index.
#ifndef QTRAIN_TOOLS_CORPUS_H_
#define QTRAIN_TOOLS_CORPUS_H_

#include <cstdint>
#include <functional>
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
  int64_t offset = 0;  // token offset of the document's first text token in the shard
  int64_t length = 0;  // text tokens (the end-of-text token before it not counted)
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

// How documents become tokens: the ids of every document's text (in order) and the
// end-of-text token that starts each document in a shard.
struct ShardTokenizer {
  std::string name;  // "bytes", "gpt2"
  uint16_t end_of_text = 0;
  std::function<absl::StatusOr<std::vector<std::vector<uint16_t>>>(
      const std::vector<SourceDocument>&)>
      encode;
};
// Bytes as tokens (vocab 256), end of text 0x03 (which the corpus never contains).
ShardTokenizer ByteShardTokenizer();
// GPT-2 BPE (vocab 50257) from <gpt2_dir>/encoder.json and vocab.bpe, <|endoftext|> 50256;
// documents are encoded on `threads` threads (0: all cores).
absl::StatusOr<ShardTokenizer> Gpt2ShardTokenizer(const std::string& gpt2_dir, int threads);

// Splits documents by their index within their genre: index % val_every == 0 goes to val
// (val_every = 0: no val split); a genre with a single document goes to train, so training
// always sees every genre. Writes <split>_<genre>.bin (each document = the end-of-text
// token, then its tokens) and index.tsv into out_dir, which is created if needed.
absl::StatusOr<PrepareSummary> WriteSplitShards(const std::vector<SourceDocument>& docs,
                                                const std::string& out_dir, int val_every,
                                                const ShardTokenizer& tokenizer =
                                                    ByteShardTokenizer());

}  // namespace qtrain

#endif  // QTRAIN_TOOLS_CORPUS_H_
