// Corpus preparation: Brown tag stripping, document loading, per-genre shards; see corpus.h.
#include "tools/corpus.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "ops/status_macros.h"
#include "trainer/atomic_file.h"
#include "tools/gpt2_tokenizer.h"
#include "trainer/shard.h"

namespace qtrain {
namespace {

namespace fs = std::filesystem;

bool IsBlank(char c) {
  return c == ' ' || c == '\t' || c == '\r' || c == '\n' || c == '\f' || c == '\v';
}


}  // namespace

std::string StripBrownTags(std::string_view line) {
  std::string out;
  out.reserve(line.size());
  size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && IsBlank(line[i])) ++i;
    size_t start = i;
    while (i < line.size() && !IsBlank(line[i])) ++i;
    if (start == i) break;
    std::string_view token = line.substr(start, i - start);
    size_t slash = token.rfind('/');
    std::string_view word = (slash == std::string_view::npos || slash == 0)
                                ? token
                                : token.substr(0, slash);
    if (!out.empty()) out.push_back(' ');
    out.append(word.data(), word.size());
  }
  return out;
}

std::string BrownFileToText(std::string_view contents) {
  std::string text;
  std::string paragraph;
  size_t pos = 0;
  while (pos < contents.size()) {
    size_t eol = contents.find('\n', pos);
    if (eol == std::string_view::npos) eol = contents.size();
    std::string words = StripBrownTags(contents.substr(pos, eol - pos));
    pos = eol + 1;
    if (words.empty()) {  // a blank line ends the paragraph
      if (!paragraph.empty()) absl::StrAppend(&text, paragraph, "\n");
      paragraph.clear();
      continue;
    }
    if (!paragraph.empty()) paragraph.push_back(' ');
    paragraph += words;
  }
  if (!paragraph.empty()) absl::StrAppend(&text, paragraph, "\n");
  return text;
}

bool IsBrownFileName(std::string_view name) {
  return name.size() == 4 && name[0] == 'c' && name[1] >= 'a' && name[1] <= 'z' &&
         absl::ascii_isdigit(name[2]) && absl::ascii_isdigit(name[3]);
}

absl::StatusOr<std::vector<SourceDocument>> LoadBrownCorpus(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat("Brown corpus directory '", dir,
                                            "' does not exist or is not a directory"));
  }
  std::vector<std::string> names;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    std::string name = it->path().filename().string();
    if (IsBrownFileName(name)) names.push_back(name);
  }
  if (ec) {
    return absl::UnavailableError(
        absl::StrCat("cannot list Brown corpus directory '", dir, "': ", ec.message()));
  }
  if (names.empty()) {
    return absl::NotFoundError(absl::StrCat(
        "no Brown corpus files (named like ca01 .. cr09) in '", dir,
        "'; tools/setup.sh fetches the corpus into data/raw/brown"));
  }
  std::sort(names.begin(), names.end());
  std::vector<SourceDocument> docs;
  docs.reserve(names.size());
  for (const std::string& name : names) {
    ASSIGN_OR_RETURN(std::string raw, ReadFile((fs::path(dir) / name).string()));
    docs.push_back({name, std::string(1, name[1]), BrownFileToText(raw)});
  }
  return docs;
}

absl::StatusOr<std::vector<SourceDocument>> LoadTextFiles(const std::vector<std::string>& paths) {
  if (paths.empty()) return absl::InvalidArgumentError("no text files given");
  std::vector<SourceDocument> docs;
  for (const std::string& path : paths) {
    ASSIGN_OR_RETURN(std::string text, ReadFile(path));
    docs.push_back({path, "text", std::move(text)});
  }
  return docs;
}

ShardTokenizer ByteShardTokenizer() {
  ShardTokenizer t;
  t.name = "bytes";
  t.end_of_text = kEndOfTextToken;
  t.encode = [](const std::vector<SourceDocument>& docs)
      -> absl::StatusOr<std::vector<std::vector<uint16_t>>> {
    std::vector<std::vector<uint16_t>> out(docs.size());
    for (size_t i = 0; i < docs.size(); ++i) {
      out[i].reserve(docs[i].text.size());
      for (unsigned char c : docs[i].text) out[i].push_back(c);
    }
    return out;
  };
  return t;
}

absl::StatusOr<ShardTokenizer> Gpt2ShardTokenizer(const std::string& gpt2_dir, int threads) {
  ASSIGN_OR_RETURN(std::unique_ptr<Gpt2Tokenizer> loaded, Gpt2Tokenizer::Load(gpt2_dir));
  std::shared_ptr<const Gpt2Tokenizer> tok(std::move(loaded));
  ShardTokenizer t;
  t.name = "gpt2";
  t.end_of_text = Gpt2Tokenizer::kEndOfText;
  t.encode = [tok, threads](const std::vector<SourceDocument>& docs)
      -> absl::StatusOr<std::vector<std::vector<uint16_t>>> {
    std::vector<std::string_view> texts;
    texts.reserve(docs.size());
    for (const SourceDocument& d : docs) texts.emplace_back(d.text);
    std::vector<std::vector<int32_t>> ids = tok->EncodeBatch(texts, threads);
    std::vector<std::vector<uint16_t>> out(ids.size());
    for (size_t i = 0; i < ids.size(); ++i) out[i].assign(ids[i].begin(), ids[i].end());
    return out;
  };
  return t;
}

namespace {

// The shard naming scheme whose stale files a run removes.
bool IsShardName(const std::string& name) {
  return (absl::StartsWith(name, "train_") || absl::StartsWith(name, "val_") ||
          absl::StartsWith(name, "mixed_")) &&
         absl::EndsWith(name, ".bin");
}

// Nothing this run writes (shards, index.tsv) or removes (stale shards) may be one of its
// inputs, also through a link: the input would be gone from where the user keeps it.
absl::Status CheckInputsSurvive(const std::vector<SourceDocument>& docs, const std::string& out_dir,
                                const std::map<std::string, std::vector<uint16_t>>& shards) {
  std::vector<std::string> touched = {"index.tsv", "mixed_train.bin", "mixed_val.bin"};
  for (const auto& entry : shards) touched.push_back(entry.first);
  std::error_code ec;
  for (fs::directory_iterator it(out_dir, ec), end; !ec && it != end; it.increment(ec)) {
    if (IsShardName(it->path().filename().string())) touched.push_back(it->path().filename().string());
  }
  for (const std::string& name : touched) {
    const std::string path = (fs::path(out_dir) / name).string();
    for (const SourceDocument& d : docs) {
      if (SameFile(path, d.name)) {
        return absl::FailedPreconditionError(absl::StrCat(
            "--out_dir ", out_dir, ": ", path, " is the input '", d.name,
            "', which writing the shards would replace or remove; choose another --out_dir"));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<PrepareSummary> WriteSplitShards(const std::vector<SourceDocument>& docs,
                                                const std::string& out_dir, int val_every,
                                                const ShardTokenizer& tokenizer) {
  QT_CHECK_ARG(val_every >= 0, "val_every must be >= 0 (0: no validation split), got ",
               val_every);
  QT_CHECK_ARG(!docs.empty(), "no documents to write");
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) {
    return absl::PermissionDeniedError(
        absl::StrCat("cannot create output directory '", out_dir, "': ", ec.message()));
  }

  std::map<std::string, int64_t> genre_size;
  for (const SourceDocument& d : docs) {
    QT_CHECK_ARG(!d.genre.empty() && d.genre.find_first_of("/_ \t") == std::string::npos,
                 "document '", d.name, "': genre '", d.genre, "' cannot name a shard");
    ++genre_size[d.genre];
  }
  ASSIGN_OR_RETURN(std::vector<std::vector<uint16_t>> doc_tokens, tokenizer.encode(docs));
  const uint16_t eot = tokenizer.end_of_text;
  for (size_t di = 0; di < docs.size(); ++di) {
    // Its shard entry would be the end-of-text token alone: nothing to learn, and a shard of
    // one token that every loader skips.
    if (doc_tokens[di].empty()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "'", docs[di].name, "' holds no text (",
          docs[di].text.empty() ? "an empty file" : "no tokens after tag stripping",
          "): remove it from the input"));
    }
  }

  PrepareSummary summary;
  // Keyed by shard file name; documents keep their input order inside a shard.
  std::map<std::string, std::vector<uint16_t>> shards;
  std::map<std::string, int64_t> genre_seen;
  for (size_t di = 0; di < docs.size(); ++di) {
    const SourceDocument& d = docs[di];
    const int64_t index_in_genre = genre_seen[d.genre]++;
    const bool val = val_every > 0 && genre_size[d.genre] > 1 && index_in_genre % val_every == 0;
    const std::string split = val ? "val" : "train";
    const std::string shard_name = absl::StrCat(split, "_", d.genre, ".bin");
    std::vector<uint16_t>& tokens = shards[shard_name];
    tokens.push_back(eot);
    IndexEntry e{d.name, d.genre, split, shard_name, static_cast<int64_t>(tokens.size()),
                 static_cast<int64_t>(doc_tokens[di].size())};
    tokens.insert(tokens.end(), doc_tokens[di].begin(), doc_tokens[di].end());
    summary.index.push_back(e);
    GenreCounts& g = summary.genres[d.genre];
    (val ? g.val_files : g.train_files) += 1;
    (val ? g.val_tokens : g.train_tokens) += 1 + e.length;
  }

  RETURN_IF_ERROR(CheckInputsSurvive(docs, out_dir, shards));
  for (const auto& [name, tokens] : shards) {
    RETURN_IF_ERROR(WriteShard((fs::path(out_dir) / name).string(), tokens));
    summary.shards_written.push_back(name);
  }
  // One shard per split with the genres interleaved document by document (round robin over
  // genres in name order), so that a sequential reader sees every genre early: the default
  // jobs train and evaluate on these; per-genre shards serve genre splits.
  for (const std::string split : {"train", "val"}) {
    std::map<std::string, std::vector<const std::vector<uint16_t>*>> by_genre;
    for (size_t i = 0; i < docs.size(); ++i) {
      if (summary.index[i].split == split) by_genre[docs[i].genre].push_back(&doc_tokens[i]);
    }
    if (by_genre.empty()) continue;
    std::vector<uint16_t> tokens;
    for (size_t round = 0;; ++round) {
      bool any = false;
      for (const auto& [genre, list] : by_genre) {
        if (round >= list.size()) continue;
        any = true;
        tokens.push_back(eot);
        tokens.insert(tokens.end(), list[round]->begin(), list[round]->end());
      }
      if (!any) break;
    }
    const std::string name = absl::StrCat("mixed_", split, ".bin");
    RETURN_IF_ERROR(WriteShard((fs::path(out_dir) / name).string(), tokens));
    summary.shards_written.push_back(name);
  }

  std::string tsv = "file\tgenre\tsplit\tshard\toffset\tlength\n";
  for (const IndexEntry& e : summary.index) {
    absl::StrAppend(&tsv, e.file, "\t", e.genre, "\t", e.split, "\t", e.shard, "\t", e.offset,
                    "\t", e.length, "\n");
  }
  RETURN_IF_ERROR(WriteFileAtomically((fs::path(out_dir) / "index.tsv").string(), {tsv}));

  // Shards left from an earlier run with other inputs would be picked up by a glob such as
  // train_*.bin; only files of that naming scheme are touched.
  std::set<std::string> written(summary.shards_written.begin(), summary.shards_written.end());
  std::vector<fs::path> stale;
  for (fs::directory_iterator it(out_dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (IsShardName(name) && !written.count(name)) {
      stale.push_back(it->path());
    }
  }
  for (const fs::path& path : stale) {
    std::error_code rm_ec;
    fs::remove(path, rm_ec);
    if (rm_ec) {
      return absl::PermissionDeniedError(
          absl::StrCat("cannot remove stale shard '", path.string(), "': ", rm_ec.message()));
    }
    summary.stale_removed.push_back(path.filename().string());
  }
  return summary;
}

}  // namespace qtrain
