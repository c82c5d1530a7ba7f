// The random source of the long-context task generators: xoshiro256** seeded
// through splitmix64, with its own uniform integers, shuffles and samples, so
// the same seed gives the same prompts with every compiler and standard library
// (std::uniform_int_distribution and std::shuffle are implementation-defined).
#pragma once

#include <cstdint>
#include <numeric>
#include <string_view>
#include <utility>
#include <vector>

namespace kvq {

class TaskRng {
 public:
  explicit TaskRng(uint64_t seed) {
    for (uint64_t& s : state_) {
      seed += 0x9e3779b97f4a7c15ull;  // splitmix64's sequence
      s = mix(seed);
    }
  }

  uint64_t next() {
    const uint64_t result = rotl(state_[1] * 5, 7) * 9;
    const uint64_t t = state_[1] << 17;
    state_[2] ^= state_[0];
    state_[3] ^= state_[1];
    state_[1] ^= state_[2];
    state_[0] ^= state_[3];
    state_[2] ^= t;
    state_[3] = rotl(state_[3], 45);
    return result;
  }

  // Uniform in [lo, hi], both included; rejection keeps it unbiased.
  int64_t uniform(int64_t lo, int64_t hi) {
    const uint64_t span = static_cast<uint64_t>(hi - lo) + 1;
    if (span == 0) return static_cast<int64_t>(next());  // the whole 64-bit range
    const uint64_t limit = UINT64_MAX - UINT64_MAX % span;
    uint64_t draw = next();
    while (draw >= limit) draw = next();
    return lo + static_cast<int64_t>(draw % span);
  }

  // Fisher-Yates.
  template <typename T>
  void shuffle(std::vector<T>& items) {
    for (size_t i = items.size(); i > 1; --i) {
      std::swap(items[i - 1], items[static_cast<size_t>(uniform(0, static_cast<int64_t>(i) - 1))]);
    }
  }

  // k distinct values of 0..n-1 in the order drawn (a partial Fisher-Yates), k <= n.
  std::vector<int64_t> sample(int64_t n, int64_t k) {
    std::vector<int64_t> pool(static_cast<size_t>(n));
    std::iota(pool.begin(), pool.end(), int64_t{0});
    for (int64_t i = 0; i < k; ++i) std::swap(pool[static_cast<size_t>(i)], pool[static_cast<size_t>(uniform(i, n - 1))]);
    pool.resize(static_cast<size_t>(k));
    return pool;
  }

  // The seed of one generated item: the run's seed mixed with a task name and two indices.
  static uint64_t derive(uint64_t seed, std::string_view tag, int64_t a, int64_t b) {
    uint64_t h = 0xcbf29ce484222325ull;  // FNV-1a of the tag
    for (const char c : tag) h = (h ^ static_cast<uint8_t>(c)) * 0x100000001b3ull;
    uint64_t mixed = seed;
    for (const uint64_t part : {h, static_cast<uint64_t>(a), static_cast<uint64_t>(b)}) {
      mixed = mix(mixed ^ (part + 0x9e3779b97f4a7c15ull + (mixed << 6) + (mixed >> 2)));
    }
    return mixed;
  }

 private:
  static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  // splitmix64's output function.
  static uint64_t mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }

  uint64_t state_[4];
};

}  // namespace kvq
