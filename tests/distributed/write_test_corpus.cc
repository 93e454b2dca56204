// write_test_corpus DIR: the synthetic corpus of the distributed tests (train_a.bin, val_a.bin),
// for shell tests.
#include <cstdio>

#include "tests/distributed/test_util.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: write_test_corpus DIR\n");
    return 2;
  }
  absl::Status s = qtrain::testing::WriteCorpus(argv[1]);
  if (!s.ok()) {
    std::fprintf(stderr, "write_test_corpus: %s\n", std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}
