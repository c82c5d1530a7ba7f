// Sampling. Probabilities are computed in fp32 relative to the largest logit
// (no overflow); ties break toward the lower id so runs are reproducible.
#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "core/error.h"

namespace kvq {

int32_t greedy_token(std::span<const float> logits) {
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

Sampler::Sampler(SamplerOptions options) : options_(options), rng_(options.seed) {
  if (!(options.top_p > 0.0f && options.top_p <= 1.0f)) fail("--top-p must be in (0, 1], got {}", options.top_p);
  if (!std::isfinite(options.temperature)) fail("--temp must be finite");
}

int32_t Sampler::sample(std::span<const float> logits) {
  const int32_t n = static_cast<int32_t>(logits.size());
  const int32_t argmax = greedy_token(logits);
  if (greedy()) return argmax;

  std::vector<float> probs(n);
  const float max_logit = logits[argmax];
  double total = 0;
  for (int32_t k = 0; k < n; ++k) {
    probs[k] = std::exp((logits[k] - max_logit) / options_.temperature);
    total += probs[k];
  }
  std::vector<int32_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return probs[a] > probs[b] || (probs[a] == probs[b] && a < b); });
  int32_t kept = 0;
  double mass = 0;
  while (kept < n && (kept == 0 || mass < options_.top_p * total)) mass += probs[order[kept++]];
  std::uniform_real_distribution<double> uniform(0.0, mass);
  double u = uniform(rng_);
  for (int32_t k = 0; k < kept; ++k) {
    u -= probs[order[k]];
    if (u <= 0) return order[k];
  }
  return order[kept - 1];
}

}  // namespace kvq
