// qtrain_ps: the parameter service. `qtrain_ps --config=ps.textproto` serves until SIGTERM or
// SIGINT, then finishes in-flight calls (2 s) and exits 0. docs/parameter_service.md.
#include <malloc.h>
#include <signal.h>

#include <cstdio>
#include <string>

#include "absl/flags/flag.h"
#include "distributed/federated/federated_module.h"
#include "distributed/ps/config.h"
#include "distributed/ps/server.h"
#include "trainer/cli.h"

ABSL_FLAG(std::string, config, "", "server configuration (text ServerConfig), required");
ABSL_FLAG(std::string, address, "", "override the config's address (host:port; port 0: any)");
ABSL_FLAG(std::string, storage_dir, "", "override the config's storage_dir");
ABSL_FLAG(std::string, port_file, "", "override the config's port_file");

int main(int argc, char** argv) {
  // Usage, --help with these flags, and `bazel run`'s working directory for relative paths.
  qtrain::InitCommandLine(argc, argv,
                          "qtrain_ps --config=PATH [--address=host:port] [--storage_dir=DIR]",
                          __FILE__);
  // Chunks of 1 MiB come and go all the time: keep them on the heap instead of glibc's mmap
  // per allocation, which costs a page fault and a zeroed page for every 4 KiB received.
  mallopt(M_MMAP_THRESHOLD, 64 << 20);
  mallopt(M_TRIM_THRESHOLD, 256 << 20);
  if (absl::GetFlag(FLAGS_config).empty()) {
    std::fprintf(stderr, "qtrain_ps: --config is required (see docs/parameter_service.md)\n");
    return 2;
  }
  // Block the stop signals before any thread starts, so that only sigwait below sees them.
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGTERM);
  sigaddset(&stop, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop, nullptr);
  signal(SIGPIPE, SIG_IGN);

  absl::StatusOr<qtrain::ps::ServerConfig> config =
      qtrain::ps::LoadServerConfig(absl::GetFlag(FLAGS_config));
  if (!config.ok()) {
    std::fprintf(stderr, "qtrain_ps: %s\n", std::string(config.status().message()).c_str());
    return 1;
  }
  if (!absl::GetFlag(FLAGS_address).empty()) config->set_address(absl::GetFlag(FLAGS_address));
  if (!absl::GetFlag(FLAGS_storage_dir).empty()) {
    config->set_storage_dir(absl::GetFlag(FLAGS_storage_dir));
  }
  if (!absl::GetFlag(FLAGS_port_file).empty()) config->set_port_file(absl::GetFlag(FLAGS_port_file));
  absl::StatusOr<std::unique_ptr<qtrain::ps::PsServer>> server =
      qtrain::ps::PsServer::Start(*config, {qtrain::federated::FederatedModuleFactory()});
  if (!server.ok()) {
    std::fprintf(stderr, "qtrain_ps: %s\n", std::string(server.status().message()).c_str());
    return 1;
  }
  std::printf("qtrain_ps: serving on %s (%s), storage %s\n", (*server)->address().c_str(),
              config->tls().cert_file().empty() ? "plaintext" : "TLS",
              config->storage_dir().c_str());
  std::fflush(stdout);
  int sig = 0;
  sigwait(&stop, &sig);
  std::printf("qtrain_ps: %s, stopping\n", sig == SIGTERM ? "SIGTERM" : "SIGINT");
  std::fflush(stdout);
  (*server)->Shutdown(absl::Seconds(2));
  return 0;
}
