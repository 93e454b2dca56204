// Bit packing of integer quantization codes (2, 3, 4 or 8 bits) for exported weights; the
// layout is specified in docs/quantization.md.
#ifndef QTRAIN_OPS_QUANT_PACK_H_
#define QTRAIN_OPS_QUANT_PACK_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace qtrain::ops {

// kSigned: codes in [-2^(b-1), 2^(b-1) - 1], stored as b-bit two's complement (the low b bits
//   of the int32; unpacking sign-extends). LSQ's symmetric codes.
// kUnsigned: codes in [0, 2^b - 1], stored as is. LSQ+'s asymmetric codes (zero point apart).
enum class CodeSign { kSigned, kUnsigned };

// Layout: each row of `cols` codes is one little-endian bit stream: code j of the row occupies
// stream bits [j*b, (j+1)*b), bit i of the stream is bit (i % 8) of byte i / 8, and each code's
// least significant bit comes first. So the first code sits in the lowest bits of byte 0 and a
// 3-bit code can straddle two bytes. Each row is padded with zero bits to a whole number of
// bytes (packed_row_bytes), so every output channel starts on a byte boundary.

// OK for bits in {2, 3, 4, 8}; InvalidArgument naming the value otherwise.
absl::Status check_pack_bits(int bits);

// ceil(cols * bits / 8). cols >= 0.
absl::StatusOr<int64_t> packed_row_bytes(int bits, int64_t cols);

// out (rows, packed_row_bytes(bits, cols)) from codes (rows, cols). Every code is checked
// before anything is written: InvalidArgument naming the first bad code's row, column, value
// and the allowed range.
absl::Status pack_codes(uint8_t* out, const int32_t* codes, int64_t rows, int64_t cols, int bits,
                        CodeSign sign);

// codes (rows, cols) from in (rows, packed_row_bytes(bits, cols)); padding bits are ignored.
absl::Status unpack_codes(int32_t* codes, const uint8_t* in, int64_t rows, int64_t cols, int bits,
                          CodeSign sign);

}  // namespace qtrain::ops

#endif  // QTRAIN_OPS_QUANT_PACK_H_
