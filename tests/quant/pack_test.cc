// Code packing: exact round trips at every bit width and odd lengths, the byte layout against
// hand-worked bytes and an independent bit reader, row alignment, and argument validation.
#include "ops/quant/pack.h"

#include <random>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ops/quant/lsq.h"

namespace qtrain::ops {
namespace {

using ::testing::HasSubstr;

constexpr int kBits[] = {2, 3, 4, 8};
constexpr CodeSign kSigns[] = {CodeSign::kSigned, CodeSign::kUnsigned};

int32_t Lo(int bits, CodeSign s) { return s == CodeSign::kSigned ? -(1 << (bits - 1)) : 0; }
int32_t Hi(int bits, CodeSign s) {
  return s == CodeSign::kSigned ? (1 << (bits - 1)) - 1 : (1 << bits) - 1;
}

std::vector<uint8_t> Pack(const std::vector<int32_t>& codes, int64_t rows, int64_t cols, int bits,
                          CodeSign sign) {
  std::vector<uint8_t> out(rows * packed_row_bytes(bits, cols).value(), 0xAA);
  const absl::Status st = pack_codes(out.data(), codes.data(), rows, cols, bits, sign);
  EXPECT_TRUE(st.ok()) << st;
  return out;
}

// Reads code j of a row bit by bit, as the documented layout says, without the library.
int32_t ReadBitwise(const uint8_t* row, int64_t j, int bits, CodeSign sign) {
  uint32_t u = 0;
  for (int b = 0; b < bits; ++b) {
    const int64_t i = j * bits + b;
    u |= static_cast<uint32_t>((row[i / 8] >> (i % 8)) & 1) << b;
  }
  if (sign == CodeSign::kSigned && (u >> (bits - 1)) & 1)
    return static_cast<int32_t>(u) - (1 << bits);
  return static_cast<int32_t>(u);
}

TEST(Pack, RowBytes) {
  EXPECT_EQ(packed_row_bytes(2, 0).value(), 0);
  EXPECT_EQ(packed_row_bytes(2, 5).value(), 2);
  EXPECT_EQ(packed_row_bytes(3, 8).value(), 3);
  EXPECT_EQ(packed_row_bytes(3, 9).value(), 4);
  EXPECT_EQ(packed_row_bytes(4, 7).value(), 4);
  EXPECT_EQ(packed_row_bytes(8, 7).value(), 7);
  EXPECT_FALSE(packed_row_bytes(4, -1).ok());
}

TEST(Pack, RandomRoundTripOddLengths) {
  std::mt19937 rng(5);
  for (int bits : kBits) {
    for (CodeSign sign : kSigns) {
      std::uniform_int_distribution<int32_t> dist(Lo(bits, sign), Hi(bits, sign));
      for (int64_t cols : {1, 3, 5, 7, 11, 13, 31, 33, 127}) {
        const int64_t rows = 3;
        std::vector<int32_t> codes(rows * cols);
        for (auto& c : codes) c = dist(rng);
        const auto packed = Pack(codes, rows, cols, bits, sign);
        const int64_t rb = packed_row_bytes(bits, cols).value();
        std::vector<int32_t> back(rows * cols, 12345);
        ASSERT_TRUE(unpack_codes(back.data(), packed.data(), rows, cols, bits, sign).ok());
        ASSERT_EQ(back, codes) << bits << " bits, cols " << cols;
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t j = 0; j < cols; ++j) {
            ASSERT_EQ(ReadBitwise(packed.data() + r * rb, j, bits, sign), codes[r * cols + j]);
          }
          // Padding bits at the end of each row are zero.
          const int used = static_cast<int>((cols * bits) % 8);
          if (used != 0) {
            EXPECT_EQ(packed[r * rb + rb - 1] >> used, 0);
          }
        }
      }
    }
  }
}

TEST(Pack, EveryCodeValue) {
  for (int bits : kBits) {
    for (CodeSign sign : kSigns) {
      std::vector<int32_t> codes;
      for (int32_t c = Lo(bits, sign); c <= Hi(bits, sign); ++c) codes.push_back(c);
      codes.push_back(Lo(bits, sign));  // an odd length for every width
      const int64_t n = static_cast<int64_t>(codes.size());
      const auto packed = Pack(codes, 1, n, bits, sign);
      std::vector<int32_t> back(n);
      ASSERT_TRUE(unpack_codes(back.data(), packed.data(), 1, n, bits, sign).ok());
      EXPECT_EQ(back, codes) << bits;
    }
  }
}

TEST(Pack, HandWorkedBytes) {
  // 4-bit unsigned 1, 2, 3: first code in the low nibble.
  EXPECT_EQ(Pack({1, 2, 3}, 1, 3, 4, CodeSign::kUnsigned), (std::vector<uint8_t>{0x21, 0x03}));
  // 2-bit: 1 | 2<<2 | 3<<4 | 0<<6 = 0x39, then 1.
  EXPECT_EQ(Pack({1, 2, 3, 0, 1}, 1, 5, 2, CodeSign::kUnsigned),
            (std::vector<uint8_t>{0x39, 0x01}));
  // 3-bit 7, 0, 5 = 111 000 101 (LSB first): byte 0 = 0b01000111, byte 1 = 0b1.
  EXPECT_EQ(Pack({7, 0, 5}, 1, 3, 3, CodeSign::kUnsigned), (std::vector<uint8_t>{0x47, 0x01}));
  // Two's complement: 4-bit -1 = 0xF, -8 = 0x8, 7 = 0x7.
  EXPECT_EQ(Pack({-1, -8, 7}, 1, 3, 4, CodeSign::kSigned), (std::vector<uint8_t>{0x8F, 0x07}));
  // 3-bit signed -4, 3, -1 = 100, 011, 111: byte 0 = 11 011 100 = 0xDC, byte 1 = 0b1.
  EXPECT_EQ(Pack({-4, 3, -1}, 1, 3, 3, CodeSign::kSigned), (std::vector<uint8_t>{0xDC, 0x01}));
  EXPECT_EQ(Pack({-128, 127, -1}, 1, 3, 8, CodeSign::kSigned),
            (std::vector<uint8_t>{0x80, 0x7F, 0xFF}));
  // Rows start on byte boundaries: 3 codes of 3 bits take 2 bytes per row.
  EXPECT_EQ(Pack({7, 0, 5, 1, 1, 1}, 2, 3, 3, CodeSign::kUnsigned),
            (std::vector<uint8_t>{0x47, 0x01, 0x49, 0x00}));
}

TEST(Pack, RejectsBadBitWidth) {
  int32_t code = 0;
  uint8_t byte = 0;
  for (int bad : {0, 1, 5, 6, 7, 9, 16, -2}) {
    const absl::Status st = pack_codes(&byte, &code, 1, 1, bad, CodeSign::kSigned);
    ASSERT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(st.message()), HasSubstr("bits = " + std::to_string(bad)));
    EXPECT_FALSE(unpack_codes(&code, &byte, 1, 1, bad, CodeSign::kSigned).ok());
    EXPECT_FALSE(packed_row_bytes(bad, 4).ok());
    EXPECT_FALSE(check_pack_bits(bad).ok());
  }
}

TEST(Pack, RejectsOutOfRangeCodes) {
  struct Case {
    int bits;
    CodeSign sign;
    int32_t bad;
    const char* range;
  };
  const Case cases[] = {
      {4, CodeSign::kSigned, 8, "[-8, 7]"},    {4, CodeSign::kSigned, -9, "[-8, 7]"},
      {4, CodeSign::kUnsigned, 16, "[0, 15]"}, {2, CodeSign::kUnsigned, -1, "[0, 3]"},
      {3, CodeSign::kSigned, 4, "[-4, 3]"},    {8, CodeSign::kSigned, 128, "[-128, 127]"}};
  for (const Case& c : cases) {
    std::vector<int32_t> codes(6, 0);
    codes[4] = c.bad;  // row 1, column 1 of a (2, 3) tensor
    std::vector<uint8_t> out(2 * packed_row_bytes(c.bits, 3).value(), 0x5A);
    const absl::Status st = pack_codes(out.data(), codes.data(), 2, 3, c.bits, c.sign);
    ASSERT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(st.message()),
                HasSubstr("code[1, 1] = " + std::to_string(c.bad) + " outside " + c.range));
    // Nothing is written when a code is bad.
    EXPECT_EQ(out, std::vector<uint8_t>(out.size(), 0x5A));
  }
}

// LSQ codes go through packing unchanged: symmetric as signed, asymmetric as unsigned.
TEST(Pack, LsqCodesRoundTrip) {
  std::mt19937 rng(9);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t rows = 5, cols = 19;
  std::vector<float> w(rows * cols);
  for (auto& x : w) x = nd(rng);
  for (int bits : kBits) {
    for (LsqMode mode : {LsqMode::kSymmetric, LsqMode::kAsymmetric}) {
      LsqConfig cfg;
      cfg.bits = bits;
      cfg.mode = mode;
      cfg.granularity = QuantGranularity::kPerGroup;
      cfg.group_size = 8;
      const int64_t S = lsq_num_scales(cfg, rows, cols).value();
      std::vector<float> s(S), beta(S);
      const bool asym = mode == LsqMode::kAsymmetric;
      ASSERT_TRUE(lsq_init(s.data(), asym ? beta.data() : nullptr, w.data(), rows, cols, cfg).ok());
      std::vector<int32_t> codes(rows * cols), back(rows * cols);
      ASSERT_TRUE(lsq_quantize_codes(codes.data(), w.data(), s.data(), asym ? beta.data() : nullptr,
                                     rows, cols, cfg)
                      .ok());
      const CodeSign sign = asym ? CodeSign::kUnsigned : CodeSign::kSigned;
      const auto packed = Pack(codes, rows, cols, bits, sign);
      ASSERT_TRUE(unpack_codes(back.data(), packed.data(), rows, cols, bits, sign).ok());
      EXPECT_EQ(back, codes);
    }
  }
}

}  // namespace
}  // namespace qtrain::ops
