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

int UsageError(absl::string_view program, absl::string_view problem) {
  std::fprintf(stderr, "%.*s: %.*s\n\nusage: %.*s\n(--help lists every flag)\n",
               static_cast<int>(program.size()), program.data(), static_cast<int>(problem.size()),
               problem.data(), static_cast<int>(absl::ProgramUsageMessage().size()),
               absl::ProgramUsageMessage().data());
  return 2;
}

}  // namespace qtrain
