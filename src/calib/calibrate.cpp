#include "calib/calibrate.h"

#include <algorithm>
#include <cmath>
#include <random>

#include <fmt/format.h>

#include "calib/backward.h"
#include "core/dtypes.h"
#include "core/error.h"
#include "model/llama.h"
#include "quant/kmeans.h"

namespace kvq {
namespace {

// K and V activations of every sample with their sensitivities, sinks left out.
struct Activations {
  int64_t rows = 0;                 // tokens kept over all samples
  std::vector<float> keys, values;  // (n_layers, rows, kv_dim)
  std::vector<float> key_weights, value_weights;  // same shape: squared gradients, or 1
};

// Value at quantile q (0..1) of v (reordered in place).
float quantile(std::vector<float>& v, double q) {
  const size_t k = std::min(v.size() - 1, static_cast<size_t>(std::llround(q * static_cast<double>(v.size() - 1))));
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(k), v.end());
  return v[k];
}

void calibrate_layer(const LlamaConfig& config, const Activations& a, int layer, const CalibrateOptions& options,
                     CalibrationFile& file) {
  const int kv_dim = config.kv_dim();
  const int hd = config.head_dim;
  const float* keys = a.keys.data() + static_cast<size_t>(layer) * a.rows * kv_dim;
  const float* values = a.values.data() + static_cast<size_t>(layer) * a.rows * kv_dim;
  const float* key_weights = a.key_weights.data() + static_cast<size_t>(layer) * a.rows * kv_dim;
  const float* value_weights = a.value_weights.data() + static_cast<size_t>(layer) * a.rows * kv_dim;

  // |v| / rms of its token's KV-head vector, for the value outlier thresholds.
  std::vector<float> value_ratio(static_cast<size_t>(a.rows) * kv_dim);
  for (int64_t r = 0; r < a.rows; ++r) {
    for (int h = 0; h < config.n_kv_heads; ++h) {
      const float* v = values + r * kv_dim + h * hd;
      double sum_sq = 0;
      for (int d = 0; d < hd; ++d) sum_sq += static_cast<double>(v[d]) * v[d];
      const float rms = static_cast<float>(std::sqrt(sum_sq / hd));
      for (int d = 0; d < hd; ++d) value_ratio[r * kv_dim + h * hd + d] = rms > 0 ? std::fabs(v[d]) / rms : 0.0f;
    }
  }

  for (double fraction : options.outliers) {
    const std::string o = outlier_label(fraction);
    // Keys: per-channel range between the fraction/2 and 1 - fraction/2 quantiles.
    std::vector<float> lo(kv_dim), hi(kv_dim), channel(a.rows);
    for (int c = 0; c < kv_dim; ++c) {
      for (int64_t r = 0; r < a.rows; ++r) channel[r] = keys[r * kv_dim + c];
      lo[c] = quantile(channel, fraction / 2);
      hi[c] = quantile(channel, 1 - fraction / 2);
    }
    float threshold = 0;
    if (fraction > 0) {
      std::vector<float> ratios = value_ratio;
      threshold = quantile(ratios, 1 - fraction);
      file.tensors[fmt::format("blk.{}.v.threshold.{}", layer, o)] = {threshold};
    }
    file.tensors[fmt::format("blk.{}.k.lo.{}", layer, o)] = lo;
    file.tensors[fmt::format("blk.{}.k.hi.{}", layer, o)] = hi;

    // Normalized inliers, as the page codec normalizes them, weighted.
    WeightedHistogram key_hist, value_hist;
    for (int64_t r = 0; r < a.rows; ++r) {
      for (int c = 0; c < kv_dim; ++c) {
        const float k = keys[r * kv_dim + c];
        if (k < lo[c] || k > hi[c] || !(hi[c] > lo[c])) continue;
        key_hist.add((k - lo[c]) * (2.0f / (hi[c] - lo[c])) - 1.0f, key_weights[r * kv_dim + c]);
      }
      for (int h = 0; h < config.n_kv_heads; ++h) {
        const size_t base = r * kv_dim + h * hd;
        auto inlier = [&](int d) { return fraction == 0 || value_ratio[base + d] <= threshold; };
        float mn = INFINITY, mx = -INFINITY;
        for (int d = 0; d < hd; ++d) {
          if (inlier(d)) mn = std::min(mn, values[base + d]), mx = std::max(mx, values[base + d]);
        }
        const float vlo = round_to_fp16(mn), vhi = round_to_fp16(mx);
        if (!(vhi > vlo)) continue;
        for (int d = 0; d < hd; ++d) {
          if (inlier(d)) value_hist.add((values[base + d] - vlo) * (2.0f / (vhi - vlo)) - 1.0f, value_weights[base + d]);
        }
      }
    }
    for (int bits : options.bits) {
      file.tensors[fmt::format("blk.{}.k.codebook.{}.{}", layer, bits, o)] = key_hist.codebook(bits);
      // Values are normalized by each token's own min and max: both ends are always hit.
      file.tensors[fmt::format("blk.{}.v.codebook.{}.{}", layer, bits, o)] = value_hist.codebook(bits, true);
    }
  }
}

}  // namespace

CalibrationFile calibrate(const LlamaConfig& config, const LlamaWeights& weights, const std::vector<int32_t>& text_tokens,
                          const CalibrateOptions& options, std::map<std::string, std::string> metadata,
                          const std::function<void(const std::string&, int64_t, int64_t)>& progress) {
  const int with_bos = options.bos_id >= 0 ? 1 : 0;
  const int text_per_sample = options.ctx - with_bos;
  if (options.samples < 1) fail("--samples must be >= 1");
  if (options.ctx < 2 || options.ctx > config.context) fail("--ctx must be in 2..{}, got {}", config.context, options.ctx);
  if (options.sinks < 0 || options.sinks >= options.ctx - 1) fail("--sinks {} leaves no token of --ctx {} to calibrate on", options.sinks, options.ctx);
  if (static_cast<int64_t>(text_tokens.size()) < text_per_sample) {
    fail("the calibration text has {} tokens, fewer than --ctx {}", text_tokens.size(), options.ctx);
  }
  for (int bits : options.bits) {
    if (bits < 2 || bits > 4) fail("--bits must be 2, 3 or 4, got {}", bits);
  }
  for (double fraction : options.outliers) {
    const std::string label = outlier_label(fraction);  // the labels --kv format names use
    if (label != "0%" && label != "0.5%" && label != "1%" && label != "2%") {
      fail("--outliers must be among 0, 0.005, 0.01, 0.02, got {}", fraction);
    }
  }

  std::mt19937_64 rng(options.seed);
  std::uniform_int_distribution<int64_t> start_dist(0, static_cast<int64_t>(text_tokens.size()) - text_per_sample);
  const int kv_dim = config.kv_dim();
  const int kept = options.ctx - options.sinks;
  Activations a;
  a.rows = int64_t{options.samples} * kept;
  const size_t size = static_cast<size_t>(config.n_layers) * a.rows * kv_dim;
  a.keys.resize(size);
  a.values.resize(size);
  a.key_weights.resize(size);
  a.value_weights.resize(size);
  std::vector<int64_t> starts;
  KvSensitivityPass pass(config, weights);
  for (int s = 0; s < options.samples; ++s) {
    const int64_t start = start_dist(rng);
    starts.push_back(start);
    std::vector<int32_t> sample(text_tokens.begin() + start, text_tokens.begin() + start + text_per_sample);
    if (with_bos) sample.insert(sample.begin(), options.bos_id);
    KvSensitivityOptions sensitivity_options;
    sensitivity_options.round_kv_to_fp16 = true;
    const KvSensitivity sens = pass.run(sample, sensitivity_options);
    for (int layer = 0; layer < config.n_layers; ++layer) {
      const size_t src = (static_cast<size_t>(layer) * options.ctx + options.sinks) * kv_dim;
      const size_t dst = (static_cast<size_t>(layer) * a.rows + int64_t{s} * kept) * kv_dim;
      const size_t n = static_cast<size_t>(kept) * kv_dim;
      std::copy_n(sens.keys.begin() + src, n, a.keys.begin() + dst);
      std::copy_n(sens.values.begin() + src, n, a.values.begin() + dst);
      for (size_t i = 0; i < n; ++i) {
        const float gk = sens.key_grads[src + i], gv = sens.value_grads[src + i];
        a.key_weights[dst + i] = options.fisher ? gk * gk : 1.0f;
        a.value_weights[dst + i] = options.fisher ? gv * gv : 1.0f;
      }
    }
    if (progress) progress("samples", s + 1, options.samples);
  }

  std::vector<CalibrationFile> per_layer(config.n_layers);
  int64_t done = 0;
#pragma omp parallel for schedule(dynamic, 1)
  for (int layer = 0; layer < config.n_layers; ++layer) {
    calibrate_layer(config, a, layer, options, per_layer[layer]);
#pragma omp critical
    if (progress) progress("layers", ++done, config.n_layers);
  }

  CalibrationFile file;
  for (CalibrationFile& layer : per_layer) file.tensors.merge(layer.tensors);
  metadata["samples"] = std::to_string(options.samples);
  metadata["ctx"] = std::to_string(options.ctx);
  metadata["sample_starts"] = fmt::format("{}", fmt::join(starts, ","));
  metadata["bits"] = fmt::format("{}", fmt::join(options.bits, ","));
  metadata["outliers"] = fmt::format("{}", fmt::join(options.outliers, ","));
  metadata["sensitivity"] = options.fisher ? "fisher" : "none";
  metadata["seed"] = std::to_string(options.seed);
  metadata["sinks_left_out"] = std::to_string(options.sinks);
  file.metadata = std::move(metadata);
  return file;
}

}  // namespace kvq
