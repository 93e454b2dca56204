// Code point classes of GPT-2's pre-tokenizer regex: \p{L}, \p{N}, whitespace (Unicode's
// White_Space property, as Python's `regex` module and tiktoken read \s) and everything else.
// The table is generated from ICU at build time (tools/unicode_class_gen.cc).
#ifndef QTRAIN_TOOLS_UNICODE_CLASS_H_
#define QTRAIN_TOOLS_UNICODE_CLASS_H_

#include <cstdint>

namespace qtrain {

enum class CharClass : uint8_t { kOther = 0, kLetter = 1, kNumber = 2, kSpace = 3 };

inline constexpr int kUnicodeBlockSize = 128;

namespace unicode_internal {
extern const char kUnicodeVersion[];  // of the ICU the table came from, e.g. "15.0.0"
extern const uint16_t kStage1[0x110000 / kUnicodeBlockSize];
extern const uint8_t kStage2[][kUnicodeBlockSize];
}  // namespace unicode_internal

// cp must be a Unicode scalar value (< 0x110000).
inline CharClass ClassOf(char32_t cp) {
  using namespace unicode_internal;
  return static_cast<CharClass>(kStage2[kStage1[cp / kUnicodeBlockSize]][cp % kUnicodeBlockSize]);
}

inline const char* UnicodeTableVersion() { return unicode_internal::kUnicodeVersion; }

}  // namespace qtrain

#endif  // QTRAIN_TOOLS_UNICODE_CLASS_H_
