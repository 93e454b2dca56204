// GGUF container: what the writer puts in comes back from the reader (metadata of each type,
// tensors aligned to 32 bytes, dims fastest-first), and damaged files are refused naming the
// file and what is wrong.
#include "trainer/gguf.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace qtrain {
namespace {

using ::testing::HasSubstr;

std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string WriteSample(const std::string& name) {
  const std::string path = testing::TempDir() + "/" + name;
  GgufWriter w;
  w.Add("general.architecture", GgufValue::String("gpt2"));
  w.Add("gpt2.block_count", GgufValue::U32(2));
  w.Add("x.i32", GgufValue::I32(-7));
  w.Add("x.f32", GgufValue::F32(1e-5f));
  w.Add("x.bool", GgufValue::Bool(true));
  w.Add("x.strings", GgufValue::Strings({"a", "", "Ġthe"}));
  w.Add("x.ints", GgufValue::I32s({1, 3, -2}));
  std::vector<float> a = {1, 2, 3, 4, 5, 6};
  EXPECT_TRUE(w.AddTensor("a", {3, 2}, ops::GgmlType::kF32,
                          std::string(reinterpret_cast<char*>(a.data()), 24))
                  .ok());
  EXPECT_TRUE(w.AddTensor("b", {32}, ops::GgmlType::kQ8_0, std::string(34, '\x01')).ok());
  EXPECT_TRUE(w.Write(path).ok());
  return path;
}

TEST(Gguf, WhatIsWrittenComesBack) {
  const std::string path = WriteSample("sample.gguf");
  absl::StatusOr<GgufFile> f = ReadGguf(path);
  ASSERT_TRUE(f.ok()) << f.status();
  EXPECT_EQ(f->version, 3u);
  ASSERT_EQ(f->kv.size(), 7u);
  EXPECT_EQ(f->kv[0].first, "general.architecture");
  EXPECT_EQ(*f->GetString("general.architecture", path), "gpt2");
  EXPECT_EQ(*f->GetInt("gpt2.block_count", path), 2);
  EXPECT_EQ(*f->GetInt("x.i32", path), -7);
  EXPECT_FLOAT_EQ(static_cast<float>(*f->GetFloat("x.f32", path)), 1e-5f);
  const GgufValue* s = f->Find("x.strings");
  ASSERT_NE(s, nullptr);
  ASSERT_EQ(s->array.size(), 3u);
  EXPECT_EQ(std::get<std::string>(s->array[2]), "Ġthe");
  EXPECT_EQ(std::get<int64_t>(f->Find("x.ints")->array[2]), -2);
  ASSERT_EQ(f->tensors.size(), 2u);
  EXPECT_EQ(f->tensors[0].ne, (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(f->tensors[0].offset, 0u);
  EXPECT_EQ(f->tensors[1].offset, 32u);  // 24 bytes padded to the alignment
  EXPECT_EQ(f->tensors[1].nbytes, 34u);
  const float* a = reinterpret_cast<const float*>(f->TensorData(f->tensors[0]));
  EXPECT_EQ(a[5], 6.0f);
  // The data section starts aligned.
  const std::string bytes = Slurp(path);
  EXPECT_EQ((bytes.size() - f->data.size()) % 32, 0u);
  EXPECT_THAT(std::string(f->GetString("gpt2.block_count", path).status().message()),
              HasSubstr("'gpt2.block_count' is u32, expected string"));
  EXPECT_THAT(std::string(f->GetInt("missing", path).status().message()),
              HasSubstr("no metadata key 'missing'"));
}

TEST(Gguf, DamagedFilesAreNamed) {
  const std::string path = WriteSample("damaged.gguf");
  const std::string bytes = Slurp(path);
  const std::string cut = testing::TempDir() + "/cut.gguf";
  std::ofstream(cut, std::ios::binary) << bytes.substr(0, bytes.size() - 40);
  absl::StatusOr<GgufFile> f = ReadGguf(cut);
  ASSERT_FALSE(f.ok());
  EXPECT_THAT(std::string(f.status().message()), HasSubstr(cut));
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("truncated"));
  std::ofstream(cut, std::ios::binary) << bytes.substr(0, 60);
  f = ReadGguf(cut);
  ASSERT_FALSE(f.ok());
  EXPECT_THAT(std::string(f.status().message()), HasSubstr("truncated or corrupt"));
  std::ofstream(cut, std::ios::binary) << "GGML" + bytes.substr(4);
  EXPECT_THAT(std::string(ReadGguf(cut).status().message()), HasSubstr("no 'GGUF' magic"));
  // A tensor type qtrain does not read (Q6_K = 14) is named with its tensor.
  std::string k = bytes;
  // name "b" (u64 length 1), n_dims u32 1, ne i64 32, then the type u32 8: patch the type.
  const size_t at = k.find(std::string("\x01\0\0\0\0\0\0\0b\x01\0\0\0", 13));
  ASSERT_NE(at, std::string::npos);
  const size_t type_at = at + 13 + 8;
  ASSERT_EQ(k[type_at], 8);
  k[type_at] = 14;
  std::ofstream(cut, std::ios::binary) << k;
  EXPECT_THAT(std::string(ReadGguf(cut).status().message()),
              HasSubstr("tensor 'b' has ggml type 14"));
}

TEST(Gguf, WriterRefusesBadInput) {
  GgufWriter w;
  EXPECT_FALSE(w.AddTensor("q", {48}, ops::GgmlType::kQ4_0, std::string(27, '\0')).ok());
  EXPECT_THAT(std::string(w.AddTensor("f", {4}, ops::GgmlType::kF32, "abc").message()),
              HasSubstr("3 bytes, its shape and type need 16"));
  w.Add("k", GgufValue::U32(1));
  w.Add("k", GgufValue::U32(2));
  EXPECT_THAT(std::string(w.Write(testing::TempDir() + "/dup.gguf").message()),
              HasSubstr("'k' given twice"));
}

}  // namespace
}  // namespace qtrain
