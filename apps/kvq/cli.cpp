// The shared pieces of the kvq subcommands (cli.h).
#include "cli.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "core/error.h"
#include "cuda/cuda_backend.h"
#include "kv/kv_format.h"
#ifdef KVQ_HAS_CUDA
#include "cuda/device.h"
#endif

namespace kvq {
namespace {

constexpr double kDefaultCpuPoolGib = 4.0;  // host memory is committed only as pages are written

// RFC 4180: a cell holding a comma, quote or line break is quoted, its quotes doubled.
std::string csv_cell(const std::string& text) {
  if (text.find_first_of(",\"\r\n") == std::string::npos) return text;
  std::string quoted = "\"";
  for (char ch : text) quoted += ch == '"' ? std::string("\"\"") : std::string(1, ch);
  return quoted + "\"";
}

bool has_cuda_device() {
#ifdef KVQ_HAS_CUDA
  return !list_cuda_devices().empty();
#else
  return false;
#endif
}

}  // namespace

void add_common(CLI::App& cmd, CommonOptions& o) {
  cmd.add_option("-m,--model", o.model, "GGUF model file")->capture_default_str();
  cmd.add_option("--device", o.device, "cpu or cuda (default: cuda when a GPU is present)")
      ->check(CLI::IsMember({"auto", "cpu", "cuda"}));
  cmd.add_option("--calib", o.calib, "calibration file (default: beside the model)");
  cmd.add_option("--sinks", o.sinks, "first tokens of each sequence kept fp16 (int/nuq formats)")
      ->check(CLI::Range(0, 1 << 20))->capture_default_str();
  cmd.add_flag("--tail,!--no-tail", o.tail, "read the newest partial page exactly until it is sealed (int/nuq; default on)");
  cmd.add_option("--kscale", o.kscale, "key ranges: calib (calibrated, per channel) or page (per sealed page)")
      ->check(CLI::IsMember({"calib", "page"}))->capture_default_str();
  cmd.add_flag("--exact-chunk", o.exact_chunk, "a chunk attends to its own keys and values unquantized");
  cmd.add_option("--page", o.page, "tokens per KV page")->check(CLI::Range(1, 1 << 16))->capture_default_str();
  cmd.add_option("--chunk", o.chunk, "most tokens per forward step")->check(CLI::Range(1, 1 << 20))->capture_default_str();
  cmd.add_option("--pool-gib", o.pool_gib, "KV pool size in GiB (default: 4 on cpu)")->check(CLI::Range(0.0, 1e6));
  cmd.add_option("--threads", o.threads, "CPU threads (default: all cores)")->check(CLI::Range(0, 4096));
  cmd.add_option("--json", o.json_path, "write results as JSON");
  cmd.add_option("--csv", o.csv_path, "write results as CSV");
}

std::vector<std::string> split_commas(const std::string& list) {
  std::vector<std::string> items;
  std::stringstream stream(list);
  for (std::string item; std::getline(stream, item, ',');) items.push_back(item);
  return items;
}

std::vector<std::string> parse_kv_formats(const std::string& list) {
  std::vector<std::string> formats;
  for (const std::string& name : split_commas(list)) {
    parse_kv_format(name);  // refuses unknown names, the empty one too, before any work starts
    formats.push_back(name);
  }
  if (formats.empty()) throw UsageError("--kv needs at least one format");
  return formats;
}

void apply_threads(const CommonOptions& o) {
  if (o.threads > 0) {
    omp_set_num_threads(o.threads);
    openblas_set_num_threads(o.threads);
  }
}

std::string resolve_device(const CommonOptions& o) {
  if (o.device == "auto") return has_cuda_device() ? "cuda" : "cpu";
#ifndef KVQ_HAS_CUDA
  if (o.device == "cuda") fail("--device cuda: this kvq was built without CUDA (no nvcc at build time); use --device cpu");
#endif
  return o.device;
}

void require_cpu(const CommonOptions& o, const char* command) {
  if (o.device == "cuda") fail("kvq {} runs on the CPU only; use --device cpu", command);
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("cannot read '{}'", path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::string format_bytes(double bytes) {
  if (bytes >= kGib) return fmt::format("{:.2f} GiB", bytes / kGib);
  if (bytes >= 1024.0 * 1024.0) return fmt::format("{:.1f} MiB", bytes / (1024.0 * 1024.0));
  return fmt::format("{:.1f} KiB", bytes / 1024.0);
}

std::string model_fingerprint(const LoadedModel& model) { return fmt::format("{:016x}", model.file.fingerprint()); }

std::string default_calibration_path(const std::string& model_path) {
  const std::filesystem::path path(model_path);
  return (path.parent_path() / (path.stem().string() + ".calib.safetensors")).string();
}

KvCacheOptions kv_cache_options(const LlamaConfig& config, const std::string& fingerprint, const CommonOptions& o,
                                const std::string& kv, CalibrationFile& calibration, bool synthetic_calibration) {
  KvCacheOptions options;
  options.format = parse_kv_format(kv);
  options.sinks = o.sinks;
  options.tail = o.tail;
  options.per_page_key_ranges = o.kscale == "page";
  options.exact_chunk = o.exact_chunk;
  if (options.format.calibrated() && synthetic_calibration) {
    options.calibration = kvq::synthetic_calibration(config, options.format, calibration);
  } else if (options.format.calibrated()) {
    const std::string path = o.calib.empty() ? default_calibration_path(o.model) : o.calib;
    calibration = CalibrationFile::load(path);
    options.calibration = calibration_for_format(calibration, path, config, fingerprint, options.format);
  }
  return options;
}

Runtime::Runtime(const LlamaConfig& config, const LlamaWeights* weights, const std::string& fingerprint,
                 const CommonOptions& o, const std::string& kv)
    : kv_options_(kv_cache_options(config, fingerprint, o, kv, calibration_, weights == nullptr)),
      backend_(make_backend(config, weights, o)),
      tables_(backend_->n_pages(), o.page) {}

std::unique_ptr<Backend> Runtime::make_backend(const LlamaConfig& config, const LlamaWeights* weights,
                                               const CommonOptions& o) {
  if (resolve_device(o) == "cuda") {
#ifdef KVQ_HAS_CUDA
    CudaBackendOptions cuda;
    cuda.kv = kv_options_;
    cuda.page_size = o.page;
    cuda.pool_bytes = static_cast<int64_t>(o.pool_gib * kGib);
    cuda.max_step_tokens = o.chunk;
    return make_cuda_backend(config, weights, cuda);
#endif
  }
  if (weights == nullptr) fail("--dummy weights are generated on the GPU: use --device cuda");
  const double gib = o.pool_gib > 0 ? o.pool_gib : kDefaultCpuPoolGib;
  const double pages = gib * kGib / static_cast<double>(CpuKvPages::bytes_per_page(config, o.page, kv_options_));
  if (pages < 1) fail("--pool-gib {} holds no page of {} tokens", gib, o.page);
  return std::make_unique<CpuBackend>(config, *weights, static_cast<int32_t>(std::min(pages, 2.0e9)), o.page,
                                      kv_options_);
}

double kv_bits_per_element(const LlamaConfig& config, const Backend& backend, int64_t pages, int64_t sequences,
                           int64_t tokens) {
  const double elements = static_cast<double>(tokens) * config.n_layers * 2 * config.kv_dim();
  const double bytes = static_cast<double>(backend.kv_bytes_per_page()) * pages +
                       static_cast<double>(backend.kv_bytes_per_sequence()) * sequences;
  return elements > 0 ? bytes * 8.0 / elements : 0.0;
}

void write_csv(const std::string& path, const nlohmann::json& results) {
  if (path.empty()) return;
  std::vector<std::string> columns;
  for (const auto& row : results) {
    for (const auto& [key, value] : row.items()) {
      if (!value.is_structured() && std::find(columns.begin(), columns.end(), key) == columns.end()) {
        columns.push_back(key);
      }
    }
  }
  std::ofstream out(path);
  if (!out) fail("--csv: cannot write '{}'", path);
  out << fmt::format("{}\n", fmt::join(columns, ","));
  for (const auto& row : results) {
    std::vector<std::string> cells;
    for (const std::string& key : columns) {
      if (!row.contains(key)) {
        cells.emplace_back();
      } else if (row[key].is_string()) {
        cells.push_back(csv_cell(row[key].get<std::string>()));
      } else {
        cells.push_back(row[key].dump());
      }
    }
    out << fmt::format("{}\n", fmt::join(cells, ","));
  }
}

double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

}  // namespace kvq
