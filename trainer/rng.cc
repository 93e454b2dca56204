// Rng state as text: four hex words.
#include "trainer/rng.h"

#include <cstdio>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace qtrain {

std::string Rng::Serialize() const {
  return absl::StrCat(absl::Hex(s_[0], absl::kZeroPad16), ",", absl::Hex(s_[1], absl::kZeroPad16),
                      ",", absl::Hex(s_[2], absl::kZeroPad16), ",",
                      absl::Hex(s_[3], absl::kZeroPad16));
}

absl::StatusOr<Rng> Rng::Deserialize(const std::string& text) {
  std::vector<std::string> parts = absl::StrSplit(text, ',');
  if (parts.size() != 4) {
    return absl::InvalidArgumentError(
        absl::StrCat("rng state: expected 4 comma-separated hex words, got '", text, "'"));
  }
  Rng rng;
  for (int i = 0; i < 4; ++i) {
    if (!absl::SimpleHexAtoi(parts[i], &rng.s_[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("rng state: word ", i, " is not hex: '", parts[i], "'"));
    }
  }
  return rng;
}

}  // namespace qtrain
