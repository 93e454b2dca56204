// Small deterministic RNG (xoshiro256**) whose whole state fits in a checkpoint and gives the
// same stream on every platform (std::normal_distribution does not promise that).
#ifndef QTRAIN_TRAINER_RNG_H_
#define QTRAIN_TRAINER_RNG_H_

#include <cmath>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace qtrain {

class Rng {
 public:
  explicit Rng(uint64_t seed = 0) { Seed(seed); }

  void Seed(uint64_t seed) {
    // splitmix64 expands the seed so nearby seeds give unrelated streams.
    for (auto& s : s_) {
      seed += 0x9E3779B97F4A7C15ull;
      uint64_t z = seed;
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      s = z ^ (z >> 31);
    }
  }

  uint64_t NextU64() {
    const uint64_t result = Rotl(s_[1] * 5, 7) * 9;
    const uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = Rotl(s_[3], 45);
    return result;
  }

  // Uniform in [0, 1) with 53 random bits.
  double Uniform() { return (NextU64() >> 11) * 0x1.0p-53; }

  // Standard normal by Box-Muller (no cached second value: the state stays 4 words).
  double Normal() {
    double u1 = Uniform();
    double u2 = Uniform();
    if (u1 < 1e-300) u1 = 1e-300;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }

  std::string Serialize() const;
  static absl::StatusOr<Rng> Deserialize(const std::string& text);

 private:
  static uint64_t Rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  uint64_t s_[4];
};

}  // namespace qtrain

#endif  // QTRAIN_TRAINER_RNG_H_
