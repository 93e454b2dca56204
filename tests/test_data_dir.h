// TestDataDir(): the Brown shard folder of the tests, QTRAIN_DATA_DIR (tools/test.sh passes it)
// or, under a plain `bazel test`, the source tree's data/brown that tools/setup.sh prepared.
#ifndef QTRAIN_TESTS_TEST_DATA_DIR_H_
#define QTRAIN_TESTS_TEST_DATA_DIR_H_

#include <cstdlib>
#include <filesystem>
#include <string>
#include <system_error>

namespace qtrain {

// "" when neither is there. The source tree is found through the runfiles link of
// tests/data_dir.sh (a data dependency of //tests:test_data_dir), which points into it.
inline std::string TestDataDir() {
  if (const char* d = std::getenv("QTRAIN_DATA_DIR"); d != nullptr && *d != '\0') return d;
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* ws = std::getenv("TEST_WORKSPACE");
  if (srcdir == nullptr) return "";
  std::error_code ec;
  const std::filesystem::path real = std::filesystem::canonical(
      std::filesystem::path(srcdir) / (ws != nullptr ? ws : "qtrain") / "tests/data_dir.sh", ec);
  if (ec) return "";
  return (real.parent_path().parent_path() / "data" / "brown").string();
}

}  // namespace qtrain

#endif  // QTRAIN_TESTS_TEST_DATA_DIR_H_
