// `kvq calibrate`: per-layer key ranges, value outlier thresholds and nuq
// codebooks from K/V activations of the calibration text, weighted by the
// diagonal Fisher information (squared loss gradients) or uniformly.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "calib/calibration_file.h"

namespace kvq {

struct LlamaConfig;
struct LlamaWeights;

struct CalibrateOptions {
  int samples = 16;
  int ctx = 2048;                                       // tokens per sample, BOS included when the model wants one
  std::vector<int> bits = {2, 3, 4};
  std::vector<double> outliers = {0, 0.005, 0.01, 0.02};
  bool fisher = true;                                   // --sensitivity fisher|none
  uint64_t seed = 0;                                    // picks the samples' start positions
  int sinks = 1;                                        // first tokens of each sample, kept fp16 at inference: left out
  int32_t bos_id = -1;                                  // prepended to each sample when >= 0
};

// Metadata to record (model name and fingerprint, text path, threads, version) goes in `metadata`.
// progress(stage, done, total) reports "samples" then "layers".
CalibrationFile calibrate(const LlamaConfig& config, const LlamaWeights& weights, const std::vector<int32_t>& text_tokens,
                          const CalibrateOptions& options, std::map<std::string, std::string> metadata,
                          const std::function<void(const std::string&, int64_t, int64_t)>& progress = {});

}  // namespace kvq
