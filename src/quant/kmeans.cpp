#include "quant/kmeans.h"

#include <algorithm>
#include <cmath>

namespace kvq {

void WeightedHistogram::add(float x, float weight) {
  const float clamped = std::clamp(x, -1.0f, 1.0f);
  const int bin = std::min(kBins - 1, static_cast<int>((clamped + 1.0f) * 0.5f * kBins));
  weight_[bin] += weight;
  weighted_sum_[bin] += static_cast<double>(weight) * clamped;
}

void WeightedHistogram::merge(const WeightedHistogram& other) {
  for (int b = 0; b < kBins; ++b) {
    weight_[b] += other.weight_[b];
    weighted_sum_[b] += other.weighted_sum_[b];
  }
}

double WeightedHistogram::total_weight() const {
  double total = 0;
  for (double w : weight_) total += w;
  return total;
}

std::vector<float> WeightedHistogram::codebook(int bits, bool pin_ends) const {
  const int k = 1 << bits;
  auto bin_mean = [&](int b) { return weight_[b] > 0 ? weighted_sum_[b] / weight_[b] : -1.0 + (b + 0.5) * 2.0 / kBins; };
  const double total = total_weight();
  std::vector<double> centres(k);
  if (total <= 0) {  // no data: evenly spaced
    for (int j = 0; j < k; ++j) centres[j] = -1.0 + (2.0 * j + 1.0) / k;
  } else {
    // Start at the weighted quantiles (j + 0.5) / k.
    double cumulative = 0;
    int j = 0;
    for (int b = 0; b < kBins && j < k; ++b) {
      cumulative += weight_[b];
      while (j < k && cumulative >= (j + 0.5) / k * total) centres[j++] = bin_mean(b);
    }
    for (; j < k; ++j) centres[j] = 1.0;
  }
  if (pin_ends) centres.front() = -1.0, centres.back() = 1.0;
  // Lloyd: each bin goes to its nearest centre (by its mean); centres move to the weighted means.
  for (int iteration = 0; iteration < 1000; ++iteration) {
    std::sort(centres.begin(), centres.end());
    std::vector<double> weight(k, 0.0), sum(k, 0.0);
    int owner = 0;
    for (int b = 0; b < kBins; ++b) {
      if (weight_[b] <= 0) continue;
      const double x = bin_mean(b);
      while (owner + 1 < k && x > 0.5 * (centres[owner] + centres[owner + 1])) ++owner;
      weight[owner] += weight_[b];
      sum[owner] += weighted_sum_[b];
    }
    double moved = 0;
    for (int c = 0; c < k; ++c) {
      if (weight[c] <= 0) continue;  // an empty centre stays where it is
      if (pin_ends && (c == 0 || c == k - 1)) continue;
      const double updated = sum[c] / weight[c];
      moved = std::max(moved, std::fabs(updated - centres[c]));
      centres[c] = updated;
    }
    if (moved < 1e-9) break;
  }
  std::sort(centres.begin(), centres.end());
  return std::vector<float>(centres.begin(), centres.end());
}

}  // namespace kvq
