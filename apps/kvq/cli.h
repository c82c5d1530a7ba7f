// What the subcommands of the kvq binary share: the common flags (DESIGN.md,
// "Command line"), the runtime (a KV pool in one --kv format on the chosen
// device, its page tables and a backend), small helpers, and the registration
// hook every cmd_*.cpp provides.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "calib/calibration_file.h"
#include "core/run_report.h"
#include "cpu/cpu_backend.h"
#include "engine/loaded_model.h"
#include "engine/step_batch.h"
#include "kv/page_tables.h"

namespace kvq {

constexpr const char* kDefaultModel = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
constexpr double kGib = 1024.0 * 1024.0 * 1024.0;

// Flags every subcommand shares (DESIGN.md).
struct CommonOptions {
  std::string model = kDefaultModel;
  std::string calib;  // default: beside the model, <stem>.calib.safetensors
  std::string device = "auto";  // resolve_device(): cuda when a GPU is present
  int sinks = 1;
  bool tail = true;  // measured: the exact newest page halves nuq3-1%'s PPL loss (docs/RESULTS.md)
  std::string kscale = "calib";
  bool exact_chunk = false;
  int32_t page = 64;
  int32_t chunk = 2048;
  double pool_gib = 0;  // 0: the device default
  int threads = 0;      // 0: all cores
  std::string json_path;
  std::string csv_path;
};

// A registered subcommand and what runs it once the command line is parsed.
struct Command {
  CLI::App* app;
  std::function<int(RunReport&)> run;
};

// One per cmd_*.cpp: adds the subcommand and its flags to `app`; `common` is filled by parsing.
Command add_info_command(CLI::App& app, CommonOptions& common);
Command add_tokenize_command(CLI::App& app, CommonOptions& common);
Command add_run_command(CLI::App& app, CommonOptions& common);
Command add_ppl_command(CLI::App& app, CommonOptions& common);
Command add_calibrate_command(CLI::App& app, CommonOptions& common);
Command add_bench_command(CLI::App& app, CommonOptions& common);
Command add_eval_command(CLI::App& app, CommonOptions& common);

void add_common(CLI::App& cmd, CommonOptions& o);
// The names of a comma-separated --kv list, each checked.
std::vector<std::string> parse_kv_formats(const std::string& list);
// The items of a comma-separated option value, empty ones included (each parser says what an empty item means).
std::vector<std::string> split_commas(const std::string& list);
void apply_threads(const CommonOptions& o);
// "cpu" or "cuda": --device, or cuda when this build has CUDA and sees a GPU.
std::string resolve_device(const CommonOptions& o);
void require_cpu(const CommonOptions& o, const char* command);
std::string read_file(const std::string& path);
std::string format_bytes(double bytes);
std::string model_fingerprint(const LoadedModel& model);
std::string default_calibration_path(const std::string& model_path);
double median(std::vector<double> v);
// Writes the results' scalar fields as CSV, one row per result (nothing when path is empty).
void write_csv(const std::string& path, const nlohmann::json& results);

// The --kv format with the shared options; a calibrated format loads and checks
// its calibration into `calibration`, which must outlive the result;
// with synthetic_calibration (--dummy presets): a synthetic calibration (Gaussian codebooks, key ranges and value
// threshold at the outlier fraction's normal quantile, marked "synthetic": "true" in its metadata) instead, valid
// for speed only.
KvCacheOptions kv_cache_options(const LlamaConfig& config, const std::string& fingerprint, const CommonOptions& o,
                                const std::string& kv, CalibrationFile& calibration, bool synthetic_calibration = false);

// The pool in one --kv format on the chosen device, its page tables and a backend over it.
class Runtime {
 public:
  // weights == nullptr: random weights generated on the GPU (--dummy, CUDA only).
  Runtime(const LlamaConfig& config, const LlamaWeights* weights, const std::string& fingerprint, const CommonOptions& o,
          const std::string& kv);

  Backend& backend() { return *backend_; }
  PageTables& tables() { return tables_; }
  int32_t n_pages() const { return backend_->n_pages(); }

 private:
  std::unique_ptr<Backend> make_backend(const LlamaConfig& config, const LlamaWeights* weights, const CommonOptions& o);

  CalibrationFile calibration_;
  KvCacheOptions kv_options_;
  std::unique_ptr<Backend> backend_;
  PageTables tables_;
};

// Effective bits per stored K/V element, from the bytes allocated for `sequences`
// sequences of `tokens` tokens in all: their pages and their state outside pages.
double kv_bits_per_element(const LlamaConfig& config, const Backend& backend, int64_t pages, int64_t sequences,
                           int64_t tokens);

}  // namespace kvq
