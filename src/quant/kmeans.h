// Weighted k-means in one dimension over [-1, 1], for the nuq codebooks.
#pragma once

#include <cstdint>
#include <vector>

namespace kvq {

// Accumulates weighted samples in fine bins (2 / kBins wide): each bin keeps its
// total weight and weighted sum, so centres are exact weighted means of the bins
// they own and the cost does not grow with the sample count.
class WeightedHistogram {
 public:
  static constexpr int kBins = 1 << 16;
  WeightedHistogram() : weight_(kBins, 0.0), weighted_sum_(kBins, 0.0) {}
  void add(float x, float weight);  // x clamped to [-1, 1]
  void merge(const WeightedHistogram& other);
  double total_weight() const;
  // 2^bits ascending centres minimizing sum w (x - centre)^2: Lloyd iterations
  // from the weighted quantiles, run to convergence. Deterministic. With
  // pin_ends the outer centres stay at -1 and 1: data normalized by its own
  // min and max always has values there, and those extremes matter most.
  std::vector<float> codebook(int bits, bool pin_ends = false) const;

 private:
  std::vector<double> weight_;        // (kBins)
  std::vector<double> weighted_sum_;  // (kBins)
};

}  // namespace kvq
