#include "calib/calibration_file.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "kv/kv_format.h"
#include "model/llama.h"

namespace kvq {

using nlohmann::json;

CalibrationFile CalibrationFile::load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    fail("calibration file {}: cannot open (scripts/setup.sh puts the default model's beside it; `kvq calibrate` makes one)",
         path);
  }
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.size() < 8) fail("calibration file {}: too short for a safetensors header", path);
  uint64_t header_len = 0;
  std::memcpy(&header_len, bytes.data(), 8);
  if (header_len > bytes.size() - 8) fail("calibration file {}: header length {} exceeds the file", path, header_len);
  json header;
  try {
    header = json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(header_len));
  } catch (const json::exception& e) {
    fail("calibration file {}: bad JSON header: {}", path, e.what());
  }
  const size_t data_start = 8 + header_len;
  const size_t data_size = bytes.size() - data_start;
  CalibrationFile file;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      for (const auto& [key, value] : entry.items()) file.metadata[key] = value.get<std::string>();
      continue;
    }
    if (!entry.is_object() || entry.value("dtype", "") != "F32" || !entry.contains("data_offsets")) {
      fail("calibration file {}: tensor {} is not an F32 tensor", path, name);
    }
    const auto begin = entry["data_offsets"][0].get<uint64_t>();
    const auto end = entry["data_offsets"][1].get<uint64_t>();
    if (begin > end || end > data_size || (end - begin) % 4 != 0) {
      fail("calibration file {}: tensor {} has offsets [{}, {}) outside the data of {} bytes", path, name, begin, end,
           data_size);
    }
    std::vector<float> values((end - begin) / 4);
    std::memcpy(values.data(), bytes.data() + data_start + begin, end - begin);
    file.tensors[name] = std::move(values);
  }
  return file;
}

void CalibrationFile::save(const std::string& path) const {
  json header = json::object();  // nlohmann's default object sorts keys: deterministic
  header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& [name, values] : tensors) {
    const uint64_t size = values.size() * 4;
    header[name] = {{"dtype", "F32"}, {"shape", {values.size()}}, {"data_offsets", {offset, offset + size}}};
    offset += size;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // data starts 8-byte aligned
  const uint64_t header_len = text.size();
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) fail("cannot write calibration file {}", path);
  out.write(reinterpret_cast<const char*>(&header_len), 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const auto& [name, values] : tensors) {
    out.write(reinterpret_cast<const char*>(values.data()), static_cast<std::streamsize>(values.size() * 4));
  }
  if (!out) fail("cannot write calibration file {}", path);
}

const std::vector<float>& CalibrationFile::tensor(const std::string& name, size_t size) const {
  auto it = tensors.find(name);
  if (it == tensors.end()) fail("calibration has no tensor {}", name);
  if (it->second.size() != size) fail("calibration tensor {} holds {} values, expected {}", name, it->second.size(), size);
  return it->second;
}

std::string outlier_label(double fraction) { return fmt::format("{:g}%", fraction * 100); }

std::vector<LayerCalibration> calibration_for_format(const CalibrationFile& file, const std::string& file_path,
                                                     const LlamaConfig& config, const std::string& model_fingerprint,
                                                     const KvFormat& format) {
  auto fingerprint = file.metadata.find("model_fingerprint");
  if (fingerprint == file.metadata.end() || fingerprint->second != model_fingerprint) {
    auto model = file.metadata.find("model");
    fail("calibration file {} was made for another model ({}); run `kvq calibrate` for this one", file_path,
         model == file.metadata.end() ? "unknown" : model->second);
  }
  const std::string& o = format.outlier_label;
  const size_t centres = size_t{1} << format.bits;
  std::vector<LayerCalibration> layers(config.n_layers);
  try {
    for (int i = 0; i < config.n_layers; ++i) {
      LayerCalibration& layer = layers[i];
      layer.key_lo = file.tensor(fmt::format("blk.{}.k.lo.{}", i, o), config.kv_dim()).data();
      layer.key_hi = file.tensor(fmt::format("blk.{}.k.hi.{}", i, o), config.kv_dim()).data();
      if (format.scheme == KvScheme::nonuniform) {
        layer.key_codebook = file.tensor(fmt::format("blk.{}.k.codebook.{}.{}", i, format.bits, o), centres).data();
        layer.value_codebook = file.tensor(fmt::format("blk.{}.v.codebook.{}.{}", i, format.bits, o), centres).data();
      }
      if (format.outlier_fraction > 0) layer.value_threshold = file.tensor(fmt::format("blk.{}.v.threshold.{}", i, o), 1)[0];
    }
  } catch (const Error& e) {
    fail("--kv {}: {} in {} (calibrate with --bits {} --outliers {})", format.name, e.what(), file_path, format.bits,
         format.outlier_fraction);
  }
  return layers;
}

namespace {

// The standard normal's p-quantile, by bisection on its CDF (plenty for a few constants).
double normal_quantile(double p) {
  double lo = -10, hi = 10;
  for (int k = 0; k < 100; ++k) {
    const double mid = 0.5 * (lo + hi);
    (0.5 * std::erfc(-mid / std::sqrt(2.0)) < p ? lo : hi) = mid;
  }
  return 0.5 * (lo + hi);
}

// Centres of a Gaussian's 2^bits equal-probability bins, scaled so the outer ones are -1 and 1.
std::vector<float> gaussian_codebook(int bits) {
  const int n = 1 << bits;
  std::vector<float> centres(n);
  const double outer = normal_quantile((n - 0.5) / n);
  for (int i = 0; i < n; ++i) centres[i] = static_cast<float>(normal_quantile((i + 0.5) / n) / outer);
  return centres;
}

}  // namespace

// The --dummy weights' keys and values are close to N(0, 1) (unit-RMS inputs times weights of variance 1 / fan_in),
// so the key ranges and the value threshold (x RMS) are the normal's two-sided quantile of the format's outlier
// fraction: about that fraction of elements are outlier candidates, as with a real calibration (unit ranges made a
// third of them candidates, and quantize-on-write several times slower). Values compare against each row's own RMS,
// whose spread makes their fraction a little lower (about 0.9% for 1% at head_dim 64). Without outliers, the range
// of the extremes of a calibration set (a two-sided 1e-5).
std::vector<LayerCalibration> synthetic_calibration(const LlamaConfig& config, const KvFormat& format,
                                                    CalibrationFile& calibration) {
  calibration.metadata["synthetic"] = "true";
  const std::string o = format.outlier_label;
  const std::string bits = std::to_string(format.bits);
  const std::vector<float> codebook = gaussian_codebook(format.bits);
  const auto range = static_cast<float>(normal_quantile(1.0 - std::max(format.outlier_fraction, 1e-5) / 2));
  std::vector<LayerCalibration> layers;
  for (int i = 0; i < config.n_layers; ++i) {
    const std::string blk = fmt::format("blk.{}.", i);
    calibration.tensors[blk + "k.lo." + o] = std::vector<float>(config.kv_dim(), -range);
    calibration.tensors[blk + "k.hi." + o] = std::vector<float>(config.kv_dim(), range);
    calibration.tensors[blk + "k.codebook." + bits + "." + o] = codebook;
    calibration.tensors[blk + "v.codebook." + bits + "." + o] = codebook;
  }
  for (int i = 0; i < config.n_layers; ++i) {  // views taken once the map stops growing
    const std::string blk = fmt::format("blk.{}.", i);
    layers.push_back({calibration.tensors.at(blk + "k.lo." + o).data(), calibration.tensors.at(blk + "k.hi." + o).data(),
                      calibration.tensors.at(blk + "k.codebook." + bits + "." + o).data(),
                      calibration.tensors.at(blk + "v.codebook." + bits + "." + o).data(), range});
  }
  return layers;
}

}  // namespace kvq
