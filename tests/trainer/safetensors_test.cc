// safetensors writer/reader: round trip and rejection of truncated or corrupted files.
#include "trainer/safetensors.h"

#include <cstdlib>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "trainer/atomic_file.h"

namespace qtrain {
namespace {

std::string TmpPath(const std::string& name) {
  const char* dir = std::getenv("TEST_TMPDIR");
  return std::string(dir ? dir : "/tmp") + "/" + name;
}

std::string WriteSample(const std::string& name) {
  const std::string path = TmpPath(name);
  std::vector<float> a = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, -1e-3f};
  std::vector<int32_t> b = {1, 2, 3};
  EXPECT_TRUE(WriteSafeTensors(path,
                               {{"a", "F32", {2, 3}, a.data(), a.size() * 4},
                                {"b", "I32", {3}, b.data(), b.size() * 4}},
                               {{"k", "v"}})
                  .ok());
  return path;
}

TEST(SafeTensors, RoundTrip) {
  const std::string path = WriteSample("rt.safetensors");
  absl::StatusOr<SafeTensors> st = ReadSafeTensors(path);
  ASSERT_TRUE(st.ok()) << st.status();
  ASSERT_EQ(st->tensors.size(), 2u);
  const Tensor& a = st->tensors.at("a");
  EXPECT_EQ(a.dtype, "F32");
  EXPECT_EQ(a.shape, (std::vector<int64_t>{2, 3}));
  std::vector<float> out(6);
  ASSERT_TRUE(a.CopyTo(out.data(), 6, "a").ok());
  EXPECT_EQ(out[2], 3.25f);
  EXPECT_EQ(out[5], -1e-3f);
  EXPECT_EQ(st->metadata.at("k"), "v");
  EXPECT_EQ(st->metadata.count("qtrain.checksum"), 0u);  // verified and consumed
  EXPECT_FALSE(a.CopyTo(out.data(), 5, "a").ok());
  EXPECT_FALSE(st->tensors.at("b").CopyTo(out.data(), 3, "b").ok());  // I32, not F32
}

TEST(SafeTensors, HeaderIsEightByteAligned) {
  std::string bytes = *ReadFile(WriteSample("align.safetensors"));
  uint64_t len = 0;
  for (int i = 0; i < 8; ++i) len |= uint64_t(uint8_t(bytes[i])) << (8 * i);
  EXPECT_EQ((len + 8) % 8, 0u);
  EXPECT_EQ(bytes[8], '{');
}

TEST(SafeTensors, RejectsTruncated) {
  const std::string path = WriteSample("trunc.safetensors");
  std::string bytes = *ReadFile(path);
  for (size_t keep : {size_t(0), size_t(5), size_t(20), bytes.size() - 1}) {
    const std::string p = TmpPath("trunc_cut.safetensors");
    ASSERT_TRUE(WriteFileAtomically(p, {absl::string_view(bytes).substr(0, keep)}).ok());
    absl::StatusOr<SafeTensors> st = ReadSafeTensors(p);
    ASSERT_FALSE(st.ok()) << "kept " << keep;
    EXPECT_EQ(st.status().code(), absl::StatusCode::kDataLoss);
    EXPECT_NE(st.status().message().find(p), std::string::npos) << st.status();
  }
}

TEST(SafeTensors, RejectsFlippedDataByte) {
  const std::string path = WriteSample("flip.safetensors");
  std::string bytes = *ReadFile(path);
  bytes[bytes.size() - 3] ^= 0x10;
  ASSERT_TRUE(WriteFileAtomically(path, {bytes}).ok());
  absl::StatusOr<SafeTensors> st = ReadSafeTensors(path);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.status().message().find("checksum"), std::string::npos) << st.status();
}

TEST(SafeTensors, RejectsBadHeader) {
  const std::string path = TmpPath("badjson.safetensors");
  std::string json = "{\"a\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 12]}}";
  std::string len(8, '\0');
  len[0] = static_cast<char>(json.size());
  ASSERT_TRUE(WriteFileAtomically(path, {len, json, std::string(12, '\0')}).ok());
  absl::StatusOr<SafeTensors> st = ReadSafeTensors(path);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.status().message().find("disagrees"), std::string::npos) << st.status();

  json = "{not json";
  len[0] = static_cast<char>(json.size());
  ASSERT_TRUE(WriteFileAtomically(path, {len, json}).ok());
  st = ReadSafeTensors(path);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.status().message().find("JSON"), std::string::npos) << st.status();
}

TEST(SafeTensors, MissingFileIsNotFound) {
  absl::StatusOr<SafeTensors> st = ReadSafeTensors(TmpPath("nope.safetensors"));
  ASSERT_FALSE(st.ok());
  EXPECT_EQ(st.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(st.status().message().find("nope.safetensors"), std::string::npos);
}

}  // namespace
}  // namespace qtrain
