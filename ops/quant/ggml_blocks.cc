// ggml block packing and dequantization (see ggml_blocks.h for the layouts).
#include "ops/quant/ggml_blocks.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "ops/quant/fp16.h"

namespace qtrain::ops {
namespace {

absl::Status CheckCodes(const int32_t* codes, int64_t n, int lo, int hi, const char* what) {
  if (n % kGgmlBlock != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": ", n, " elements is not a multiple of the block size 32"));
  }
  for (int64_t i = 0; i < n; ++i) {
    if (codes[i] < lo || codes[i] > hi) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": code ", codes[i], " at ", i,
                                                     " is outside [", lo, ", ", hi, "]"));
    }
  }
  return absl::OkStatus();
}

void PutHalf(uint8_t* p, uint16_t h) { std::memcpy(p, &h, 2); }
float GetHalf(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return fp16_to_fp32(h);
}

// qs[j] = q[j] | q[j + 16] << 4 for the 32 codes of one block (already offset to [0, 15]).
void PackNibbles(uint8_t* qs, const int32_t* codes, int offset) {
  for (int j = 0; j < kGgmlBlock / 2; ++j) {
    qs[j] = static_cast<uint8_t>((codes[j] + offset) | ((codes[j + kGgmlBlock / 2] + offset) << 4));
  }
}

}  // namespace

const char* ggml_type_name(uint32_t type) {
  switch (type) {
    case 0: return "F32";
    case 1: return "F16";
    case 2: return "Q4_0";
    case 3: return "Q4_1";
    case 8: return "Q8_0";
    default: return "an unsupported ggml type";
  }
}

bool ggml_type_supported(uint32_t t) { return t == 0 || t == 1 || t == 2 || t == 3 || t == 8; }

absl::StatusOr<int64_t> ggml_row_bytes(GgmlType type, int64_t n) {
  switch (type) {
    case GgmlType::kF32: return n * 4;
    case GgmlType::kF16: return n * 2;
    default: break;
  }
  if (n % kGgmlBlock != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        ggml_type_name(static_cast<uint32_t>(type)), " rows hold blocks of 32; ", n,
        " elements per row is not a multiple of 32"));
  }
  const int64_t blocks = n / kGgmlBlock;
  switch (type) {
    case GgmlType::kQ4_0: return blocks * 18;
    case GgmlType::kQ4_1: return blocks * 20;
    case GgmlType::kQ8_0: return blocks * 34;
    default: return absl::InvalidArgumentError("unsupported ggml type");
  }
}

absl::Status ggml_pack_q4_0(uint8_t* out, const int32_t* codes, const uint16_t* d, int64_t n) {
  if (absl::Status s = CheckCodes(codes, n, -8, 7, "Q4_0"); !s.ok()) return s;
  for (int64_t b = 0; b < n / kGgmlBlock; ++b, out += 18, codes += kGgmlBlock) {
    PutHalf(out, d[b]);
    PackNibbles(out + 2, codes, 8);
  }
  return absl::OkStatus();
}

absl::Status ggml_pack_q4_1(uint8_t* out, const int32_t* codes, const uint16_t* d,
                            const uint16_t* m, int64_t n) {
  if (absl::Status s = CheckCodes(codes, n, 0, 15, "Q4_1"); !s.ok()) return s;
  for (int64_t b = 0; b < n / kGgmlBlock; ++b, out += 20, codes += kGgmlBlock) {
    PutHalf(out, d[b]);
    PutHalf(out + 2, m[b]);
    PackNibbles(out + 4, codes, 0);
  }
  return absl::OkStatus();
}

absl::Status ggml_pack_q8_0(uint8_t* out, const int32_t* codes, const uint16_t* d, int64_t n) {
  if (absl::Status s = CheckCodes(codes, n, -128, 127, "Q8_0"); !s.ok()) return s;
  for (int64_t b = 0; b < n / kGgmlBlock; ++b, out += 34, codes += kGgmlBlock) {
    PutHalf(out, d[b]);
    for (int j = 0; j < kGgmlBlock; ++j) {
      out[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(codes[j]));
    }
  }
  return absl::OkStatus();
}

absl::Status ggml_dequantize(GgmlType type, const uint8_t* in, float* out, int64_t n) {
  if (type != GgmlType::kF32 && type != GgmlType::kF16 && n % kGgmlBlock != 0) {
    return absl::InvalidArgumentError(absl::StrCat(n, " elements is not a multiple of 32"));
  }
  switch (type) {
    case GgmlType::kF32:
      std::memcpy(out, in, n * 4);
      return absl::OkStatus();
    case GgmlType::kF16:
      for (int64_t i = 0; i < n; ++i) out[i] = GetHalf(in + 2 * i);
      return absl::OkStatus();
    case GgmlType::kQ4_0:
      for (int64_t b = 0; b < n / kGgmlBlock; ++b, in += 18, out += kGgmlBlock) {
        const float d = GetHalf(in);
        for (int j = 0; j < kGgmlBlock / 2; ++j) {
          out[j] = static_cast<float>((in[2 + j] & 0x0F) - 8) * d;
          out[j + 16] = static_cast<float>((in[2 + j] >> 4) - 8) * d;
        }
      }
      return absl::OkStatus();
    case GgmlType::kQ4_1:
      for (int64_t b = 0; b < n / kGgmlBlock; ++b, in += 20, out += kGgmlBlock) {
        const float d = GetHalf(in), m = GetHalf(in + 2);
        for (int j = 0; j < kGgmlBlock / 2; ++j) {
          out[j] = static_cast<float>(in[4 + j] & 0x0F) * d + m;
          out[j + 16] = static_cast<float>(in[4 + j] >> 4) * d + m;
        }
      }
      return absl::OkStatus();
    case GgmlType::kQ8_0:
      for (int64_t b = 0; b < n / kGgmlBlock; ++b, in += 34, out += kGgmlBlock) {
        const float d = GetHalf(in);
        for (int j = 0; j < kGgmlBlock; ++j) {
          out[j] = static_cast<float>(static_cast<int8_t>(in[2 + j])) * d;
        }
      }
      return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat("ggml type ", static_cast<uint32_t>(type), " is not supported"));
}

}  // namespace qtrain::ops
