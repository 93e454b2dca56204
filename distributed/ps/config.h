// qtrain_ps's configuration: loading the text-format ServerConfig (file:line:col on syntax
// errors), its documented defaults, and validation naming the bad field.
#ifndef QTRAIN_DISTRIBUTED_PS_CONFIG_H_
#define QTRAIN_DISTRIBUTED_PS_CONFIG_H_

#include <string>

#include "absl/status/statusor.h"
#include "distributed/proto/server_config.pb.h"

namespace qtrain::ps {

// Parse, ApplyServerDefaults, ValidateServerConfig.
absl::StatusOr<ServerConfig> LoadServerConfig(const std::string& path);
absl::StatusOr<ServerConfig> ParseServerConfig(const std::string& text,
                                               const std::string& filename);

// Every zero / empty value with a default gets it (server_config.proto states them).
void ApplyServerDefaults(ServerConfig* config);

// Needs defaults applied. One line per bad field.
absl::Status ValidateServerConfig(const ServerConfig& config);

}  // namespace qtrain::ps

#endif  // QTRAIN_DISTRIBUTED_PS_CONFIG_H_
