// Next-token choice from one row of logits: greedy, or temperature + top-p.
#pragma once

#include <cstdint>
#include <random>
#include <span>

namespace kvq {

struct SamplerOptions {
  float temperature = 0.0f;  // <= 0: greedy (argmax, lowest id on ties)
  float top_p = 1.0f;        // nucleus mass kept, in (0, 1]
  uint64_t seed = 0;
};

// The greedy choice: index of the largest logit, the lowest one on ties.
int32_t greedy_token(std::span<const float> logits);

class Sampler {
 public:
  explicit Sampler(SamplerOptions options);
  int32_t sample(std::span<const float> logits);  // (vocab)
  bool greedy() const { return options_.temperature <= 0.0f; }

 private:
  SamplerOptions options_;
  std::mt19937_64 rng_;
};

}  // namespace kvq
