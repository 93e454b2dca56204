// Token shards in llm.c's format: a 256 x int32 header (magic, version, token count) followed
// by the tokens as little-endian uint16. Writes are atomic; reads validate everything.
#ifndef QTRAIN_TRAINER_SHARD_H_
#define QTRAIN_TRAINER_SHARD_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace qtrain {

inline constexpr int32_t kShardMagic = 20240520;
inline constexpr int32_t kShardVersion = 1;  // llm.c: version 1 = uint16 tokens
inline constexpr int kShardHeaderInts = 256;
inline constexpr int64_t kShardHeaderBytes = kShardHeaderInts * sizeof(int32_t);

// Byte-level tokenizer: token = byte value. Every document in a shard starts with the
// end-of-text byte (ASCII ETX), like llm.c's GPT-2 shards start documents with <|endoftext|>;
// it never occurs in the Brown corpus, so it is free to mark document boundaries and to
// seed generation.
inline constexpr int kByteVocabSize = 256;
inline constexpr uint16_t kEndOfTextToken = 0x03;

// Writes `tokens` to `path` through a temporary file in the same directory, fsynced and
// renamed into place, so readers never see a partial shard.
absl::Status WriteShard(const std::string& path, absl::Span<const uint16_t> tokens);

// Reads and validates a shard: header size, magic, version, token count against the file
// size, and (when `vocab_size` is given) every token < vocab_size. Errors name the path.
absl::StatusOr<std::vector<uint16_t>> ReadShard(const std::string& path,
                                                std::optional<int> vocab_size = std::nullopt);

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_SHARD_H_
