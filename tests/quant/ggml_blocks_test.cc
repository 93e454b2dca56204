// ggml block formats: hand-worked bytes of one block of each type, the nibble order, and that
// blocks built from LSQ codes and fp16 steps dequantize to exactly what lsq_dequantize gives
// (so a GGUF export of an fp16-scaled QAT model is the trained model bit for bit).
#include "ops/quant/ggml_blocks.h"

#include <cstring>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "ops/quant/fp16.h"
#include "ops/quant/lsq.h"

namespace qtrain::ops {
namespace {

using ::testing::HasSubstr;

TEST(GgmlBlocks, RowBytes) {
  EXPECT_EQ(*ggml_row_bytes(GgmlType::kQ4_0, 64), 36);
  EXPECT_EQ(*ggml_row_bytes(GgmlType::kQ4_1, 64), 40);
  EXPECT_EQ(*ggml_row_bytes(GgmlType::kQ8_0, 64), 68);
  EXPECT_EQ(*ggml_row_bytes(GgmlType::kF16, 3), 6);
  EXPECT_EQ(*ggml_row_bytes(GgmlType::kF32, 3), 12);
  absl::StatusOr<int64_t> bad = ggml_row_bytes(GgmlType::kQ4_0, 48);
  ASSERT_FALSE(bad.ok());
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("48 elements per row"));
}

TEST(GgmlBlocks, HandWorkedQ4_0) {
  std::vector<int32_t> codes(32, 0);
  codes[0] = -8;  // stored 0
  codes[1] = 7;   // stored 15
  codes[16] = 1;  // stored 9, high nibble of byte 0
  codes[31] = -1; // stored 7, high nibble of byte 15
  const uint16_t d = fp32_to_fp16(0.5f);  // 0x3800
  uint8_t out[18];
  ASSERT_TRUE(ggml_pack_q4_0(out, codes.data(), &d, 32).ok());
  EXPECT_EQ(out[0], 0x00);
  EXPECT_EQ(out[1], 0x38);
  EXPECT_EQ(out[2], 0x90);  // element 0 low (0), element 16 high (9)
  EXPECT_EQ(out[3], 0x8F);  // element 1 low (15), element 17 high (8 = code 0)
  EXPECT_EQ(out[17], 0x78); // element 15 low (8), element 31 high (7)
  float w[32];
  ASSERT_TRUE(ggml_dequantize(GgmlType::kQ4_0, out, w, 32).ok());
  EXPECT_EQ(w[0], -4.0f);
  EXPECT_EQ(w[1], 3.5f);
  EXPECT_EQ(w[16], 0.5f);
  EXPECT_EQ(w[31], -0.5f);
  EXPECT_EQ(w[5], 0.0f);
}

TEST(GgmlBlocks, HandWorkedQ4_1AndQ8_0) {
  std::vector<int32_t> codes(32);
  for (int i = 0; i < 32; ++i) codes[i] = i % 16;
  const uint16_t d = fp32_to_fp16(0.25f), m = fp32_to_fp16(-1.0f);
  uint8_t q41[20];
  ASSERT_TRUE(ggml_pack_q4_1(q41, codes.data(), &d, &m, 32).ok());
  EXPECT_EQ(q41[0] | q41[1] << 8, 0x3400);  // d = 0.25
  EXPECT_EQ(q41[2] | q41[3] << 8, 0xBC00);  // m = -1
  EXPECT_EQ(q41[4], 0x00);                  // elements 0 and 16: codes 0, 0
  EXPECT_EQ(q41[5], 0x11);
  float w[32];
  ASSERT_TRUE(ggml_dequantize(GgmlType::kQ4_1, q41, w, 32).ok());
  EXPECT_EQ(w[0], -1.0f);
  EXPECT_EQ(w[15], 2.75f);
  for (int i = 0; i < 32; ++i) codes[i] = i * 8 - 128;  // -128 .. 120
  uint8_t q8[34];
  ASSERT_TRUE(ggml_pack_q8_0(q8, codes.data(), &d, 32).ok());
  EXPECT_EQ(q8[2], 0x80);
  EXPECT_EQ(static_cast<int8_t>(q8[33]), 120);
  ASSERT_TRUE(ggml_dequantize(GgmlType::kQ8_0, q8, w, 32).ok());
  EXPECT_EQ(w[0], -32.0f);
  EXPECT_EQ(w[31], 30.0f);
}

TEST(GgmlBlocks, CodesOutsideTheRangeAreNamed) {
  std::vector<int32_t> codes(64, 0);
  std::vector<uint16_t> d(2, 0x3C00), m(2, 0);
  std::vector<uint8_t> out(80);
  codes[40] = 8;
  absl::Status s = ggml_pack_q4_0(out.data(), codes.data(), d.data(), 64);
  EXPECT_THAT(std::string(s.message()), HasSubstr("Q4_0: code 8 at 40 is outside [-8, 7]"));
  codes[40] = -1;
  s = ggml_pack_q4_1(out.data(), codes.data(), d.data(), m.data(), 64);
  EXPECT_THAT(std::string(s.message()), HasSubstr("Q4_1: code -1 at 40"));
  codes[40] = 128;
  s = ggml_pack_q8_0(out.data(), codes.data(), d.data(), 64);
  EXPECT_THAT(std::string(s.message()), HasSubstr("Q8_0: code 128 at 40"));
  s = ggml_pack_q8_0(out.data(), codes.data(), d.data(), 40);
  EXPECT_THAT(std::string(s.message()), HasSubstr("not a multiple of the block size"));
}

// Random LSQ codes with fp16 steps per group of 32: the blocks' dequantization equals
// lsq_dequantize's, bit for bit, for every block type.
TEST(GgmlBlocks, BlocksFromCodesDequantizeAsLsq) {
  const int rows = 3, cols = 96, n = rows * cols, ns = n / 32;
  uint32_t state = 12345;
  auto next = [&]() { return state = state * 1664525u + 1013904223u; };
  std::vector<float> steps(ns), zeros(ns);
  std::vector<uint16_t> d(ns), m(ns);
  for (int i = 0; i < ns; ++i) {
    steps[i] = round_to_fp16(1e-3f + (next() % 10000) * 1e-5f);
    zeros[i] = round_to_fp16(-0.05f + (next() % 1000) * 1e-4f);
    d[i] = fp32_to_fp16(steps[i]);
    m[i] = fp32_to_fp16(zeros[i]);
  }
  LsqConfig cfg;
  cfg.granularity = QuantGranularity::kPerGroup;
  cfg.group_size = 32;
  struct Case {
    GgmlType type;
    int bits;
    LsqMode mode;
    int lo, hi;
  };
  for (const Case& c : {Case{GgmlType::kQ4_0, 4, LsqMode::kSymmetric, -8, 7},
                        Case{GgmlType::kQ8_0, 8, LsqMode::kSymmetric, -128, 127},
                        Case{GgmlType::kQ4_1, 4, LsqMode::kAsymmetric, 0, 15}}) {
    SCOPED_TRACE(ggml_type_name(static_cast<uint32_t>(c.type)));
    cfg.bits = c.bits;
    cfg.mode = c.mode;
    const bool asym = c.mode == LsqMode::kAsymmetric;
    std::vector<int32_t> codes(n);
    for (int32_t& q : codes) q = c.lo + static_cast<int32_t>(next() % (c.hi - c.lo + 1));
    std::vector<float> want(n), got(n);
    ASSERT_TRUE(lsq_dequantize(want.data(), codes.data(), steps.data(),
                               asym ? zeros.data() : nullptr, rows, cols, cfg)
                    .ok());
    std::vector<uint8_t> blocks(*ggml_row_bytes(c.type, cols) * rows);
    absl::Status s = c.type == GgmlType::kQ4_0 ? ggml_pack_q4_0(blocks.data(), codes.data(), d.data(), n)
                     : c.type == GgmlType::kQ8_0
                         ? ggml_pack_q8_0(blocks.data(), codes.data(), d.data(), n)
                         : ggml_pack_q4_1(blocks.data(), codes.data(), d.data(), m.data(), n);
    ASSERT_TRUE(s.ok()) << s;
    ASSERT_TRUE(ggml_dequantize(c.type, blocks.data(), got.data(), n).ok());
    for (int i = 0; i < n; ++i) ASSERT_EQ(std::memcmp(&got[i], &want[i], 4), 0) << i;
  }
}

}  // namespace
}  // namespace qtrain::ops
