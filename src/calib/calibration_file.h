// The calibration file (DESIGN.md, "Calibration file"): safetensors with F32
// tensors per layer, bit width and outlier fraction, plus string metadata.
// Tensor names, with o the outlier label ("0%", "1%") and b the bits:
//   blk.{i}.k.lo.{o}, blk.{i}.k.hi.{o}   (kv_dim) per-channel pre-RoPE key range, outliers removed
//   blk.{i}.k.codebook.{b}.{o}           (2^b) ascending centres in [-1, 1]
//   blk.{i}.v.codebook.{b}.{o}           (2^b)
//   blk.{i}.v.threshold.{o}              (1) value outlier when |v| > threshold * rms(token's v)
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace kvq {

struct LlamaConfig;
struct KvFormat;

class CalibrationFile {
 public:
  std::map<std::string, std::string> metadata;
  std::map<std::string, std::vector<float>> tensors;  // all 1-D F32

  static CalibrationFile load(const std::string& path);
  // Byte-identical output for identical contents (sorted keys, fixed formatting).
  void save(const std::string& path) const;

  // The tensor, checked to hold `size` values; a clear error names it when missing.
  const std::vector<float>& tensor(const std::string& name, size_t size) const;
};

std::string outlier_label(double fraction);  // 0.01 -> "1%", 0.005 -> "0.5%", 0 -> "0%"

// One layer's parameters for one format (bits and outlier fraction), viewed from a file.
struct LayerCalibration {
  const float* key_lo = nullptr;          // (kv_dim)
  const float* key_hi = nullptr;          // (kv_dim)
  const float* key_codebook = nullptr;    // (2^bits), nonuniform formats only
  const float* value_codebook = nullptr;  // (2^bits), nonuniform formats only
  float value_threshold = 0;              // used when the format keeps outliers
};

// Checks the file belongs to the model (fingerprint) and holds every tensor the
// format needs, naming what is missing; returns one view per layer.
std::vector<LayerCalibration> calibration_for_format(const CalibrationFile& file, const std::string& file_path,
                                                     const LlamaConfig& config, const std::string& model_fingerprint,
                                                     const KvFormat& format);

// --dummy presets: what calibrating their random weights would give, so quantized speed is representative:
// Gaussian codebooks, key ranges and value threshold at the normal quantile of the format's outlier fraction;
// metadata "synthetic": "true". Its tensors live in `calibration`, which must outlive the views.
std::vector<LayerCalibration> synthetic_calibration(const LlamaConfig& config, const KvFormat& format,
                                                    CalibrationFile& calibration);

}  // namespace kvq
