// InitCommandLine: abseil's flag parsing with the project's usage and working-directory rules.
#include "trainer/cli.h"

#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace qtrain {

std::vector<char*> InitCommandLine(int argc, char** argv, absl::string_view usage,
                                   absl::string_view main_file) {
  absl::SetProgramUsageMessage(usage);
  // Abseil's --help shows the flags of files named like the program (tools/export.cc for
  // export); qtrain's are in trainer/main.cc. Name the main file outright for every binary.
  const std::string file(main_file);
  absl::FlagsUsageConfig config;
  config.contains_help_flags = [file](absl::string_view f) { return absl::EndsWith(file, f) ||
                                                                    absl::EndsWith(f, file); };
  config.contains_helpshort_flags = config.contains_help_flags;
  absl::SetFlagsUsageConfig(config);
  std::vector<char*> rest = absl::ParseCommandLine(argc, argv);
  if (const char* wd = std::getenv("BUILD_WORKING_DIRECTORY"); wd != nullptr && *wd != '\0') {
    if (::chdir(wd) != 0) {
      std::fprintf(stderr, "%s: cannot change to the working directory %s (from "
                   "BUILD_WORKING_DIRECTORY): %s\n", argv[0], wd, std::strerror(errno));
      std::exit(1);
    }
  }
  return rest;
}

namespace {

// Splits at commas outside quotes and brackets; empty pieces are dropped.
void SplitTopLevel(absl::string_view v, std::vector<std::string>* out) {
  int depth = 0;
  char quote = 0;
  std::string piece;
  for (size_t i = 0; i < v.size(); ++i) {
    const char c = v[i];
    if (quote != 0) {
      if (c == '\\' && i + 1 < v.size()) {
        piece += c;
        piece += v[++i];
        continue;
      }
      if (c == quote) quote = 0;
    } else if (c == '"' || c == '\'') {
      quote = c;
    } else if (c == '{' || c == '[' || c == '<') {
      ++depth;
    } else if ((c == '}' || c == ']' || c == '>') && depth > 0) {
      --depth;
    } else if (c == ',' && depth == 0) {
      if (!piece.empty()) out->push_back(piece);
      piece.clear();
      continue;
    }
    piece += c;
  }
  if (!piece.empty()) out->push_back(piece);
}

}  // namespace

std::vector<std::string> RepeatedFlagValues(int argc, char** argv, absl::string_view name) {
  std::vector<std::string> values;
  const std::string dashes1 = absl::StrCat("-", name), dashes2 = absl::StrCat("--", name);
  for (int i = 1; i < argc; ++i) {
    const absl::string_view a = argv[i];
    if (a == "--") break;
    if (a == dashes1 || a == dashes2) {
      if (i + 1 < argc) SplitTopLevel(argv[++i], &values);
      continue;
    }
    for (const std::string& prefix : {dashes2 + "=", dashes1 + "="}) {
      if (absl::StartsWith(a, prefix)) {
        SplitTopLevel(a.substr(prefix.size()), &values);
        break;
      }
    }
  }
  return values;
}

int UsageError(absl::string_view program, absl::string_view problem) {
  std::fprintf(stderr, "%.*s: %.*s\n\nusage: %.*s\n(--help lists every flag)\n",
               static_cast<int>(program.size()), program.data(), static_cast<int>(problem.size()),
               problem.data(), static_cast<int>(absl::ProgramUsageMessage().size()),
               absl::ProgramUsageMessage().data());
  return 2;
}

}  // namespace qtrain
