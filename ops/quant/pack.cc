// Packing loops for pack.h: codes go into a little-endian bit stream per row, at most two
// bytes touched per code since bits <= 8.
#include "ops/quant/pack.h"

#include <cstring>

#include "ops/status_macros.h"

namespace qtrain::ops {
namespace {

absl::Status CheckShape(const char* op, const void* a, const void* b, int64_t rows, int64_t cols) {
  QT_CHECK_ARG(rows >= 0 && cols >= 0, op, ": shape (rows = ", rows, ", cols = ", cols,
               ") must be non-negative");
  QT_CHECK_ARG(rows * cols == 0 || (a != nullptr && b != nullptr), op,
               ": null buffer for a non-empty (", rows, ", ", cols, ") tensor");
  return absl::OkStatus();
}

}  // namespace

absl::Status check_pack_bits(int bits) {
  QT_CHECK_ARG(bits == 2 || bits == 3 || bits == 4 || bits == 8, "packing: bits = ", bits,
               " is not supported (supported: 2, 3, 4, 8)");
  return absl::OkStatus();
}

absl::StatusOr<int64_t> packed_row_bytes(int bits, int64_t cols) {
  RETURN_IF_ERROR(check_pack_bits(bits));
  QT_CHECK_ARG(cols >= 0, "packed_row_bytes: cols = ", cols, " must be >= 0");
  return (cols * bits + 7) / 8;
}

absl::Status pack_codes(uint8_t* out, const int32_t* codes, int64_t rows, int64_t cols, int bits,
                        CodeSign sign) {
  ASSIGN_OR_RETURN(const int64_t row_bytes, packed_row_bytes(bits, cols));
  RETURN_IF_ERROR(CheckShape("pack_codes", out, codes, rows, cols));
  const int32_t lo = sign == CodeSign::kSigned ? -(1 << (bits - 1)) : 0;
  const int32_t hi = sign == CodeSign::kSigned ? (1 << (bits - 1)) - 1 : (1 << bits) - 1;
  for (int64_t i = 0; i < rows * cols; ++i) {
    QT_CHECK_ARG(codes[i] >= lo && codes[i] <= hi, "pack_codes: code[", i / cols, ", ", i % cols,
                 "] = ", codes[i], " outside [", lo, ", ", hi, "] for ", bits, "-bit ",
                 sign == CodeSign::kSigned ? "signed" : "unsigned", " codes");
  }
  const uint32_t mask = (1u << bits) - 1;
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* row = out + r * row_bytes;
    std::memset(row, 0, static_cast<size_t>(row_bytes));
    const int32_t* c = codes + r * cols;
    for (int64_t j = 0; j < cols; ++j) {
      // Two's complement falls out of taking the low bits of the int32.
      const uint32_t u = static_cast<uint32_t>(c[j]) & mask;
      const int64_t bit = j * bits;
      const int off = static_cast<int>(bit & 7);
      row[bit >> 3] |= static_cast<uint8_t>(u << off);
      if (off + bits > 8) row[(bit >> 3) + 1] |= static_cast<uint8_t>(u >> (8 - off));
    }
  }
  return absl::OkStatus();
}

absl::Status unpack_codes(int32_t* codes, const uint8_t* in, int64_t rows, int64_t cols, int bits,
                          CodeSign sign) {
  ASSIGN_OR_RETURN(const int64_t row_bytes, packed_row_bytes(bits, cols));
  RETURN_IF_ERROR(CheckShape("unpack_codes", codes, in, rows, cols));
  const uint32_t mask = (1u << bits) - 1;
  const uint32_t sign_bit = 1u << (bits - 1);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = in + r * row_bytes;
    int32_t* c = codes + r * cols;
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t bit = j * bits;
      const int64_t byte = bit >> 3;
      const int off = static_cast<int>(bit & 7);
      uint32_t window = row[byte];
      if (off + bits > 8) window |= static_cast<uint32_t>(row[byte + 1]) << 8;
      const uint32_t u = (window >> off) & mask;
      c[j] = (sign == CodeSign::kSigned && (u & sign_bit))
                 ? static_cast<int32_t>(u) - static_cast<int32_t>(1u << bits)
                 : static_cast<int32_t>(u);
    }
  }
  return absl::OkStatus();
}

}  // namespace qtrain::ops
