// kvq: the single binary. Subcommands parse flags, build the engine pieces and
// turn library errors into "kvq: error: ..." with exit status 1 (usage: 2).
#include <cblas.h>
#include <omp.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <optional>
#include <sstream>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <sys/resource.h>

#include <random>

#include "bench/cpu_gemm_ceiling.h"
#include "calib/calibrate.h"
#include "calib/calibration_file.h"
#include "core/error.h"
#include "cpu/blas_kernels.h"
#include "core/progress.h"
#include "core/run_report.h"
#include "cpu/cpu_backend.h"
#include "engine/generator.h"
#include "engine/loaded_model.h"
#include "eval/perplexity.h"
#include "kv/kv_format.h"
#include "kv/page_tables.h"
#include "cuda/cuda_backend.h"
#include "model/dequant.h"
#include "model/dummy_presets.h"
#ifdef KVQ_HAS_CUDA
#include "cuda/device.h"
#endif

namespace kvq {
namespace {

constexpr const char* kDefaultModel = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
constexpr double kDefaultCpuPoolGib = 4.0;  // host memory is committed only as pages are written
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

std::vector<std::string> parse_kv_formats(const std::string& list) {
  std::vector<std::string> formats;
  std::stringstream stream(list);
  for (std::string name; std::getline(stream, name, ',');) {
    parse_kv_format(name);  // refuses unknown names before any work starts
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

bool has_cuda_device() {
#ifdef KVQ_HAS_CUDA
  return !list_cuda_devices().empty();
#else
  return false;
#endif
}

// "cpu" or "cuda": --device, or cuda when this build has CUDA and sees a GPU.
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

// The --kv format with the shared options; a calibrated format loads and checks
// its calibration into `calibration`, which must outlive the result.
KvCacheOptions kv_cache_options(const LlamaConfig& config, const std::string& fingerprint, const CommonOptions& o,
                                const std::string& kv, CalibrationFile& calibration) {
  KvCacheOptions options;
  options.format = parse_kv_format(kv);
  options.sinks = o.sinks;
  options.tail = o.tail;
  options.per_page_key_ranges = o.kscale == "page";
  options.exact_chunk = o.exact_chunk;
  if (options.format.calibrated()) {
    const std::string path = o.calib.empty() ? default_calibration_path(o.model) : o.calib;
    calibration = CalibrationFile::load(path);
    options.calibration = calibration_for_format(calibration, path, config, fingerprint, options.format);
  }
  return options;
}

// The pool in one --kv format on the chosen device, its page tables and a backend over it.
class Runtime {
 public:
  // weights == nullptr: random weights generated on the GPU (--dummy, CUDA only).
  Runtime(const LlamaConfig& config, const LlamaWeights* weights, const std::string& fingerprint, const CommonOptions& o,
          const std::string& kv)
      : kv_options_(kv_cache_options(config, fingerprint, o, kv, calibration_)),
        backend_(make_backend(config, weights, o)),
        tables_(backend_->n_pages(), o.page) {}

  Backend& backend() { return *backend_; }
  PageTables& tables() { return tables_; }
  int32_t n_pages() const { return backend_->n_pages(); }

 private:
  std::unique_ptr<Backend> make_backend(const LlamaConfig& config, const LlamaWeights* weights, const CommonOptions& o) {
    if (resolve_device(o) == "cuda") {
#ifdef KVQ_HAS_CUDA
      if (kv_options_.format.scheme != KvScheme::fp16) {
        fail("--kv {} on --device cuda: the GPU has fp16 pages only so far; use --device cpu for quantized formats",
             kv_options_.format.name);
      }
      CudaBackendOptions cuda;
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

  CalibrationFile calibration_;
  KvCacheOptions kv_options_;
  std::unique_ptr<Backend> backend_;
  PageTables tables_;
};

// Effective bits per stored K/V element, from the bytes allocated for `sequences`
// sequences of `tokens` tokens in all: their pages and their state outside pages.
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
        cells.push_back(row[key].get<std::string>());
      } else {
        cells.push_back(row[key].dump());
      }
    }
    out << fmt::format("{}\n", fmt::join(cells, ","));
  }
}

// ---- kvq info ----------------------------------------------------------------
int cmd_info(const CommonOptions& o, RunReport& report) {
  LoadedModel model(o.model, false);
  const LlamaConfig& c = model.config;
  report.set_model(o.model);
  fmt::print("model        {}\n", o.model);
  fmt::print("name         {}\n", c.name);
  fmt::print("gguf         version {}, {} metadata keys, {} tensors, alignment {}\n", model.file.version(),
             model.file.metadata().size(), model.file.tensors().size(), model.file.alignment());
  std::vector<std::string> types;
  for (const auto& [name, count] : tensor_type_histogram(model.file)) types.push_back(fmt::format("{} x{}", name, count));
  fmt::print("tensor types {}\n", fmt::join(types, ", "));
  fmt::print("architecture llama: {} layers, hidden {}, ffn {}, heads {}/{} (query/kv), head_dim {}, vocab {}\n",
             c.n_layers, c.hidden, c.ffn, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab);
  fmt::print("             context {}, rope theta {}, rms eps {}, {:.1f}M parameters\n", c.context, c.rope_theta,
             c.rms_eps, c.parameter_count() / 1e6);
  fmt::print("tokenizer    {} tokens, bos {}, eos {}, add_bos {}\n", model.tokenizer.n_vocab(),
             model.tokenizer.bos_id(), model.tokenizer.eos_id(), model.tokenizer.add_bos());
  const int64_t kv_token_bytes = CpuKvPages::bytes_per_page(c, 1, KvCacheOptions{});
  fmt::print("kv cache     fp16: {} bytes per token ({} per page of {} tokens)\n", kv_token_bytes,
             format_bytes(static_cast<double>(kv_token_bytes) * o.page), o.page);
  nlohmann::json gpus = nlohmann::json::array();
#ifdef KVQ_HAS_CUDA
  for (const GpuInfo& g : list_cuda_devices()) {
    fmt::print("gpu          {} (sm_{}{}), {} free of {}\n", g.name, g.compute_major, g.compute_minor,
               format_bytes(static_cast<double>(g.free_bytes)), format_bytes(static_cast<double>(g.total_bytes)));
    gpus.push_back({{"name", g.name}, {"free_bytes", g.free_bytes}, {"total_bytes", g.total_bytes}});
  }
#endif
  fmt::print("fingerprint  {:016x}\n", model.file.fingerprint());
  nlohmann::json types_json = nlohmann::json::object();
  for (const auto& [name, count] : tensor_type_histogram(model.file)) types_json[name] = count;
  report.add_result({{"name", c.name},
                     {"n_layers", c.n_layers},
                     {"hidden", c.hidden},
                     {"ffn", c.ffn},
                     {"n_heads", c.n_heads},
                     {"n_kv_heads", c.n_kv_heads},
                     {"head_dim", c.head_dim},
                     {"vocab", c.vocab},
                     {"context", c.context},
                     {"rope_theta", c.rope_theta},
                     {"parameters", c.parameter_count()},
                     {"tensor_types", types_json},
                     {"kv_bytes_per_token_fp16", kv_token_bytes},
                     {"fingerprint", fmt::format("{:016x}", model.file.fingerprint())},
                     {"gpus", gpus}});
  return 0;
}

// ---- kvq tokenize ------------------------------------------------------------
int cmd_tokenize(const CommonOptions& o, const std::string& prompt, const std::string& file, bool special,
                 RunReport& report) {
  LoadedModel model(o.model, false);
  const std::string text = file.empty() ? prompt : read_file(file);
  std::vector<int32_t> ids = model.tokenizer.encode(text, special);
  fmt::print("{}\n", nlohmann::json(ids).dump());
  report.set_model(o.model);
  report.add_result({{"tokens", ids.size()}, {"ids", ids}});
  return 0;
}

// ---- kvq run -----------------------------------------------------------------
struct RunOptions {
  std::string prompt, prompt_file, batch_file;
  int32_t n = 64;
  std::string kv = "fp16";
  float temperature = 0.0f;
  float top_p = 1.0f;
  uint64_t seed = 0;
  bool chat = false;
};

std::vector<GenerationRequest> build_requests(const LoadedModel& model, const RunOptions& r,
                                              std::vector<std::string>& prompts) {
  if (!r.batch_file.empty()) {
    std::ifstream in(r.batch_file);
    if (!in) fail("cannot read --batch-file '{}'", r.batch_file);
    int line_number = 0;
    std::vector<int32_t> counts;
    for (std::string line; std::getline(in, line);) {
      ++line_number;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      nlohmann::json object;
      try {
        object = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        fail("--batch-file {} line {}: not JSON ({})", r.batch_file, line_number, e.what());
      }
      if (!object.is_object() || !object.contains("prompt") || !object["prompt"].is_string()) {
        fail("--batch-file {} line {}: expected {{\"prompt\": string, \"n\": integer}}", r.batch_file, line_number);
      }
      if (object.contains("n") && !object["n"].is_number_integer()) {
        fail("--batch-file {} line {}: \"n\" must be an integer", r.batch_file, line_number);
      }
      prompts.push_back(object["prompt"].get<std::string>());
      counts.push_back(object.value("n", r.n));
    }
    if (prompts.empty()) fail("--batch-file {} holds no request", r.batch_file);
    std::vector<GenerationRequest> requests;
    for (size_t k = 0; k < prompts.size(); ++k) requests.push_back({{}, counts[k]});
    for (size_t k = 0; k < prompts.size(); ++k) {
      const std::string text = r.chat ? model.tokenizer.apply_chat_template(prompts[k]) : prompts[k];
      requests[k].prompt = model.tokenizer.encode(text, r.chat);
      if (model.tokenizer.add_bos()) requests[k].prompt.insert(requests[k].prompt.begin(), model.tokenizer.bos_id());
    }
    return requests;
  }
  prompts.push_back(r.prompt_file.empty() ? r.prompt : read_file(r.prompt_file));
  const std::string text = r.chat ? model.tokenizer.apply_chat_template(prompts[0]) : prompts[0];
  GenerationRequest request{model.tokenizer.encode(text, r.chat), r.n};
  if (model.tokenizer.add_bos()) request.prompt.insert(request.prompt.begin(), model.tokenizer.bos_id());
  return {request};
}

int cmd_run(const CommonOptions& o, const RunOptions& r, RunReport& report) {
  const int sources = !r.prompt.empty() + !r.prompt_file.empty() + !r.batch_file.empty();
  if (sources != 1) {
    throw UsageError("kvq run needs exactly one of -p TEXT, -f FILE or --batch-file JSONL");
  }
  parse_kv_formats(r.kv);
  apply_threads(o);
  LoadedModel model(o.model, true);
  std::vector<std::string> prompts;
  std::vector<GenerationRequest> requests = build_requests(model, r, prompts);
  Runtime runtime(model.config, &model.weights, model_fingerprint(model), o, r.kv);
  GeneratorOptions options{o.chunk, {r.temperature, r.top_p, r.seed}};
  Generator generator(model.config, runtime.backend(), runtime.tables(), options,
                      [&](int32_t id) { return model.tokenizer.is_end_of_generation(id); });
  const bool stream = requests.size() == 1;
  std::vector<GenerationResult> results = generator.generate(requests, [&](size_t, int32_t token) {
    if (!stream) return;
    fmt::print("{}", model.tokenizer.token_text(token));
    std::fflush(stdout);
  });
  if (stream) {
    fmt::print("\n");
  } else {
    for (size_t k = 0; k < results.size(); ++k) {
      fmt::print("[{}] {}\n", k + 1, model.tokenizer.decode(results[k].tokens));
    }
  }

  const GenerationStats& s = generator.stats();
  const int64_t page_bytes = runtime.backend().kv_bytes_per_page();
  int64_t kv_tokens = 0;
  for (size_t k = 0; k < requests.size(); ++k) kv_tokens += requests[k].prompt.size() + results[k].tokens.size();
  const double prefill_tok_s = s.prefill_s > 0 ? s.prompt_tokens / s.prefill_s : 0;
  const int64_t decode_tokens = s.generated_tokens - static_cast<int64_t>(requests.size());
  const double decode_tok_s = s.decode_s > 0 ? std::max<int64_t>(decode_tokens, 0) / s.decode_s : 0;
  fmt::print(stderr, "prefill: {} prompt tokens in {:.3f} s ({:.1f} tok/s); decode: {} tokens in {:.3f} s ({:.1f} tok/s)\n",
             s.prompt_tokens, s.prefill_s, prefill_tok_s, std::max<int64_t>(decode_tokens, 0), s.decode_s, decode_tok_s);
  const double bits = kv_bits_per_element(model.config, runtime.backend(), s.peak_used_pages,
                                          static_cast<int64_t>(requests.size()), kv_tokens);
  const KvCacheStats kv_stats = runtime.backend().kv_stats();
  fmt::print(stderr, "kv cache: {}, peak {} pages of {} tokens = {} (pool {} pages, {}); {:.2f} bits/element; "
             "outliers {} stored, {} over capacity\n",
             r.kv, s.peak_used_pages, o.page, format_bytes(static_cast<double>(s.peak_used_pages) * page_bytes),
             runtime.n_pages(), format_bytes(static_cast<double>(runtime.n_pages()) * page_bytes), bits,
             kv_stats.outliers_stored, kv_stats.outliers_over_capacity);

  report.set_model(o.model);
  report.set_device(runtime.backend().device_name());
  report.settings() = {{"kv", r.kv}, {"n", r.n}, {"temp", r.temperature}, {"top_p", r.top_p}, {"seed", r.seed},
                       {"chat", r.chat}, {"page", o.page}, {"chunk", o.chunk}, {"pool_pages", runtime.n_pages()}};
  for (size_t k = 0; k < results.size(); ++k) {
    report.add_result({{"request", k + 1},
                       {"kv", r.kv},
                       {"prompt_tokens", requests[k].prompt},
                       {"tokens", results[k].tokens},
                       {"text", model.tokenizer.decode(results[k].tokens)},
                       {"stop_reason", results[k].stop_reason},
                       {"ttft_s", results[k].first_token_s},
                       {"finish_s", results[k].finish_s},
                       {"prefill_tok_s", prefill_tok_s},
                       {"decode_tok_s", decode_tok_s},
                       {"peak_kv_bytes", static_cast<int64_t>(s.peak_used_pages) * page_bytes},
                       {"bits_per_element", bits},
                       {"outliers_over_capacity", kv_stats.outliers_over_capacity}});
  }
  return 0;
}

// ---- kvq ppl -----------------------------------------------------------------
struct PplOptions {
  std::string file;
  int32_t ctx = 2048;
  int32_t stride = 0;  // 0: ctx / 2
  int64_t max_tokens = 0;  // 0: all
  std::string kv = "fp16";
};

int cmd_ppl(const CommonOptions& o, const PplOptions& p, RunReport& report) {
  const std::vector<std::string> formats = parse_kv_formats(p.kv);
  apply_threads(o);
  LoadedModel model(o.model, true);
  std::vector<int32_t> tokens = model.tokenizer.encode(read_file(p.file), false);
  if (p.max_tokens > 0 && static_cast<int64_t>(tokens.size()) > p.max_tokens) tokens.resize(p.max_tokens);
  PerplexityOptions options;
  options.ctx = p.ctx;
  options.stride = p.stride > 0 ? p.stride : p.ctx / 2;
  options.chunk = o.chunk;
  options.bos_id = model.tokenizer.add_bos() ? model.tokenizer.bos_id() : -1;
  report.set_model(o.model);
  report.settings() = {{"file", p.file}, {"ctx", p.ctx}, {"stride", options.stride}, {"max_tokens", p.max_tokens},
                       {"text_tokens", tokens.size()}, {"page", o.page}, {"chunk", o.chunk}, {"sinks", o.sinks},
                       {"tail", o.tail}, {"kscale", o.kscale}, {"exact_chunk", o.exact_chunk}};

  fmt::print("{:<10} {:>6} {:>7} {:>8} {:>10} {:>8} {:>10} {:>9}\n", "kv", "ctx", "stride", "tokens", "ppl", "+-",
             "bits/elem", "overflow");
  for (const std::string& kv : formats) {
    Runtime runtime(model.config, &model.weights, model_fingerprint(model), o, kv);
    report.set_device(runtime.backend().device_name());
    ProgressBar bar(fmt::format("ppl {} windows", kv));
    const auto start = std::chrono::steady_clock::now();
    PerplexityResult result = evaluate_perplexity(model.config, runtime.backend(), runtime.tables(), tokens, options,
                                                  [&](int64_t done, int64_t total) { bar.update(done, total); });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double bits = kv_bits_per_element(model.config, runtime.backend(), runtime.tables().pages_for_tokens(p.ctx), 1, p.ctx);
    const KvCacheStats kv_stats = runtime.backend().kv_stats();
    fmt::print("{:<10} {:>6} {:>7} {:>8} {:>10.4f} {:>8.4f} {:>10.2f} {:>9}\n", kv, p.ctx, options.stride,
               result.tokens_scored, result.ppl, result.ppl_stderr, bits, kv_stats.outliers_over_capacity);
    report.add_result({{"kv", kv},
                       {"ctx", p.ctx},
                       {"stride", options.stride},
                       {"tokens", result.tokens_scored},
                       {"windows", result.windows},
                       {"ppl", result.ppl},
                       {"ppl_stderr", result.ppl_stderr},
                       {"mean_nll", result.mean_nll},
                       {"bits_per_element", bits},
                       {"outliers_stored", kv_stats.outliers_stored},
                       {"outliers_over_capacity", kv_stats.outliers_over_capacity},
                       {"seconds", seconds},
                       {"tok_s", result.tokens_scored / seconds}});
  }
  return 0;
}

// ---- kvq calibrate -----------------------------------------------------------
struct CalibrateCliOptions {
  std::string file;
  std::string output;  // default: beside the model
  std::string sensitivity = "fisher";
  CalibrateOptions options;
};

int cmd_calibrate(const CommonOptions& o, CalibrateCliOptions& cal, RunReport& report) {
  require_cpu(o, "calibrate");
  apply_threads(o);
  LoadedModel model(o.model, true);
  const std::vector<int32_t> tokens = model.tokenizer.encode(read_file(cal.file), false);
  CalibrateOptions& options = cal.options;
  options.fisher = cal.sensitivity == "fisher";
  options.sinks = o.sinks;
  options.bos_id = model.tokenizer.add_bos() ? model.tokenizer.bos_id() : -1;
  const std::string output = cal.output.empty() ? default_calibration_path(o.model) : cal.output;
  fmt::print(stderr, "calibrating on {} samples x {} tokens of {} ({} tokens), sensitivity {}, {} threads\n",
             options.samples, options.ctx, cal.file, tokens.size(), cal.sensitivity, omp_get_max_threads());
  std::optional<ProgressBar> bar;
  std::string stage;
  const auto start = std::chrono::steady_clock::now();
  const std::map<std::string, std::string> metadata = {
      {"model", std::filesystem::path(o.model).filename().string()},
      {"model_fingerprint", model_fingerprint(model)},
      {"text", std::filesystem::path(cal.file).filename().string()},
      {"threads", std::to_string(omp_get_max_threads())},
      {"kvq_version", kKvqVersion}};
  const CalibrationFile file = calibrate(model.config, model.weights, tokens, options, metadata,
                                         [&](const std::string& what, int64_t done, int64_t total) {
                                           if (what != stage) bar.emplace(fmt::format("calibrate: {}", what)), stage = what;
                                           bar->update(done, total);
                                         });
  bar.reset();
  file.save(output);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  fmt::print("wrote {} ({} tensors) in {:.1f} s\n", output, file.tensors.size(), seconds);
  report.set_model(o.model);
  report.set_device("cpu");
  report.settings() = {{"file", cal.file}, {"samples", options.samples}, {"ctx", options.ctx}, {"bits", options.bits},
                       {"outliers", options.outliers}, {"sensitivity", cal.sensitivity}, {"seed", options.seed},
                       {"threads", omp_get_max_threads()}};
  report.add_result({{"output", output}, {"tensors", file.tensors.size()}, {"seconds", seconds}});
  return 0;
}

// ---- kvq bench ---------------------------------------------------------------
struct BenchOptions {
  std::vector<int32_t> prompt_lengths = {512};
  std::vector<int32_t> batches = {1};
  int32_t gen = 16;
  std::string kv = "fp16";
  bool ragged = false;
  std::string dummy;  // preset name: random weights of its shapes instead of -m
  int repeats = 3;
  uint64_t seed = 0;
};

double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + v.size() / 2, v.end());
  return v[v.size() / 2];
}

int cmd_bench(const CommonOptions& o, const BenchOptions& b, RunReport& report) {
  const std::vector<std::string> formats = parse_kv_formats(b.kv);
  apply_threads(o);
  std::optional<LoadedModel> model;  // none with --dummy
  if (b.dummy.empty()) model.emplace(o.model, true);
  const LlamaConfig c = model ? model->config : dummy_preset(b.dummy);
  const LlamaWeights* weights = model ? &model->weights : nullptr;
  const bool on_cpu = resolve_device(o) == "cpu";
  if (!model && on_cpu) fail("--dummy weights are generated on the GPU: use --device cuda");
  report.set_model(model ? o.model : "dummy:" + b.dummy);
  report.settings() = {{"prompt_len", b.prompt_lengths}, {"batch", b.batches}, {"gen", b.gen}, {"ragged", b.ragged},
                       {"repeats", b.repeats}, {"page", o.page}, {"chunk", o.chunk}, {"threads", omp_get_max_threads()}};
  fmt::print("{:<6} {:>7} {:>6} {:>4} {:>10} {:>12} {:>14} {:>8} {:>12} {:>10} {:>6}\n", "kv", "prompt", "batch",
             "gen", "prefill_s", "prefill t/s", "GEMM-only t/s", "ratio", "decode t/s", "kv MiB", "bits");
  std::mt19937_64 rng(b.seed);
  for (const std::string& kv : formats) {
    Runtime runtime(c, weights, model ? model_fingerprint(*model) : "dummy", o, kv);
    report.set_device(runtime.backend().device_name());
    for (int32_t length : b.prompt_lengths) {
      for (int32_t batch : b.batches) {
        if (length < 1 || batch < 1 || length > c.context) fail("--prompt-len must be in 1..{}, --batch >= 1", c.context);
        std::vector<GenerationRequest> requests(batch);
        int64_t prompt_tokens = 0;
        int32_t pages_needed = 0;
        for (GenerationRequest& r : requests) {
          const int32_t n = b.ragged ? std::uniform_int_distribution<int32_t>(std::max(1, length / 4), length)(rng) : length;
          r.prompt.resize(n);
          for (int32_t& id : r.prompt) id = std::uniform_int_distribution<int32_t>(0, c.vocab - 1)(rng);
          r.max_new_tokens = b.gen;
          prompt_tokens += n;
          pages_needed += runtime.tables().pages_for_tokens(std::min<int64_t>(n + b.gen - 1, c.context));
        }
        nlohmann::json point = {{"kv", kv}, {"prompt_len", length}, {"batch", batch}, {"gen", b.gen},
                                {"page", o.page}, {"ragged", b.ragged}, {"prompt_tokens", prompt_tokens},
                                {"energy_status", "unsupported: energy is measured on GPUs through NVML only"}};
        if (pages_needed > runtime.tables().n_pages()) {
          point["status"] = "oom";
          fmt::print("{:<6} {:>7} {:>6} {:>4} {:>10}\n", kv, length, batch, b.gen, "oom (pool)");
          report.add_result(point);
          continue;
        }
        std::vector<double> prefill_s, decode_s, ttft_s;
        GenerationStats stats;
        for (int rep = 0; rep <= b.repeats; ++rep) {  // repetition 0 warms up
          Generator generator(c, runtime.backend(), runtime.tables(), {o.chunk, {}}, [](int32_t) { return false; });
          std::vector<GenerationResult> results = generator.generate(requests);
          stats = generator.stats();
          if (rep == 0) continue;
          prefill_s.push_back(stats.prefill_s);
          decode_s.push_back(stats.decode_s);
          ttft_s.push_back(results.front().first_token_s);
        }
        // CPU: GEMM-only time of the same prefill steps, full chunks plus the remainder.
        const int64_t full_steps = prompt_tokens / o.chunk;
        const int32_t remainder = static_cast<int32_t>(prompt_tokens % o.chunk);
        double gemm_s = 0, gemm_flops = 0;
        if (on_cpu && full_steps > 0) {
          GemmCeiling g = measure_cpu_gemm_ceiling(c, *weights, o.chunk, 1, b.repeats);
          gemm_s += g.seconds * full_steps;
          gemm_flops += g.flops * full_steps;
        }
        if (on_cpu && remainder > 0) {
          GemmCeiling g = measure_cpu_gemm_ceiling(c, *weights, remainder, batch, b.repeats);
          gemm_s += g.seconds;
          gemm_flops += g.flops;
        }
        double attention_gemm_s = 0;
        if (on_cpu) {
          std::vector<int32_t> lengths;
          for (const GenerationRequest& r : requests) lengths.push_back(static_cast<int32_t>(r.prompt.size()));
          const GemmCeiling attention = measure_cpu_attention_gemms(c, lengths, b.repeats);
          attention_gemm_s = attention.seconds;
          gemm_s += attention.seconds;
          gemm_flops += attention.flops;
        }
        auto or_null = [&](double value) { return on_cpu ? nlohmann::json(value) : nlohmann::json(nullptr); };
        const double prefill = median(prefill_s);
        const double decode = b.gen > 1 ? median(decode_s) : 0;
        const int64_t decode_tokens = int64_t{batch} * (b.gen - 1);
        const int64_t page_bytes = runtime.backend().kv_bytes_per_page();
        const int64_t kv_bytes = int64_t{stats.peak_used_pages} * page_bytes;
        const double bits = kv_bits_per_element(c, runtime.backend(), stats.peak_used_pages, batch,
                                                prompt_tokens + decode_tokens);
        struct rusage usage {};
        getrusage(RUSAGE_SELF, &usage);
        point.update({{"prefill_s", prefill},
                      {"prefill_tok_s", prompt_tokens / prefill},
                      {"ttft_s", median(ttft_s)},
                      {"decode_s", decode},
                      {"decode_tok_s", decode > 0 ? decode_tokens / decode : 0.0},
                      {"gemm_only_s", or_null(gemm_s)},
                      {"attention_gemm_s", or_null(attention_gemm_s)},
                      {"gemm_only_tok_s", or_null(prompt_tokens / gemm_s)},
                      {"gemm_gflop_s", or_null(gemm_flops / gemm_s / 1e9)},
                      {"prefill_over_gemm_only", or_null(prefill / gemm_s)},
                      {"peak_mem_bytes", int64_t{usage.ru_maxrss} * 1024},
                      {"kv_bytes", kv_bytes},
                      {"bits_per_element", bits},
                      {"energy_j_per_token", nullptr},
                      {"avg_watts", nullptr},
                      {"status", "ok"}});
        const std::string gemm_only = on_cpu ? fmt::format("{:.1f}", prompt_tokens / gemm_s) : "-";
        const std::string ratio = on_cpu ? fmt::format("{:.2f}", prefill / gemm_s) : "-";
        fmt::print("{:<6} {:>7} {:>6} {:>4} {:>10.3f} {:>12.1f} {:>14} {:>8} {:>12.2f} {:>10.1f} {:>6.2f}\n", kv, length,
                   batch, b.gen, prefill, prompt_tokens / prefill, gemm_only, ratio,
                   decode > 0 ? decode_tokens / decode : 0.0, kv_bytes / 1048576.0, bits);
        std::fflush(stdout);
        report.add_result(point);
      }
    }
  }
  if (on_cpu) {
    fmt::print("GEMM-only: the forward's matrix products alone, with the same weights and shapes (projections, "
               "logits, and attention's scores and values products; OpenBLAS sgemm, {} threads); ratio = prefill time "
               "/ GEMM-only time.\n", omp_get_max_threads());
  }
  return 0;
}

int run_main(int argc, char** argv) {
  CLI::App app{"kvq: LLM inference with a quantized, paged KV cache"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string(kKvqVersion) + " (" + git_commit() + ")");
  CommonOptions common;

  CLI::App* info = app.add_subcommand("info", "show the model's metadata, shapes and tensor types");
  add_common(*info, common);

  CLI::App* tokenize = app.add_subcommand("tokenize", "print the token ids of a text as JSON");
  add_common(*tokenize, common);
  std::string tok_prompt, tok_file;
  bool tok_special = false;
  tokenize->add_option("-p,--prompt", tok_prompt, "text");
  tokenize->add_option("-f,--file", tok_file, "text file")->check(CLI::ExistingFile);
  tokenize->add_flag("--special", tok_special, "match special-token text such as <|im_start|>");

  CLI::App* run = app.add_subcommand("run", "generate text from a prompt or a batch of prompts");
  add_common(*run, common);
  RunOptions run_options;
  run->add_option("-p,--prompt", run_options.prompt, "prompt text");
  run->add_option("-f,--file", run_options.prompt_file, "prompt file")->check(CLI::ExistingFile);
  run->add_option("--batch-file", run_options.batch_file, "JSONL requests {\"prompt\", \"n\"}")->check(CLI::ExistingFile);
  run->add_option("-n", run_options.n, "tokens to generate")->check(CLI::Range(1, 1 << 24))->capture_default_str();
  run->add_option("--kv", run_options.kv, "KV format")->capture_default_str();
  run->add_option("--temp", run_options.temperature, "temperature; 0 is greedy")->check(CLI::Range(0.0f, 100.0f))->capture_default_str();
  run->add_option("--top-p", run_options.top_p, "nucleus mass")->check(CLI::Range(0.0f, 1.0f))->capture_default_str();
  run->add_option("--seed", run_options.seed, "sampling seed")->capture_default_str();
  run->add_flag("--chat", run_options.chat, "wrap the prompt in the model's chat template");

  CLI::App* ppl = app.add_subcommand("ppl", "perplexity of a text with sliding windows");
  add_common(*ppl, common);
  PplOptions ppl_options;
  ppl->add_option("-f,--file", ppl_options.file, "text file")->required()->check(CLI::ExistingFile);
  ppl->add_option("--ctx", ppl_options.ctx, "window length in tokens")->check(CLI::Range(2, 1 << 24))->capture_default_str();
  ppl->add_option("--stride", ppl_options.stride, "window advance (default ctx/2)")->check(CLI::Range(1, 1 << 24));
  ppl->add_option("--max-tokens", ppl_options.max_tokens, "use only the text's first N tokens")->check(CLI::Range(int64_t{2}, int64_t{1} << 40));
  ppl->add_option("--kv", ppl_options.kv, "KV formats, comma-separated")->capture_default_str();

  CLI::App* calibrate_cmd = app.add_subcommand("calibrate", "fit KV quantization ranges and codebooks on a text");
  add_common(*calibrate_cmd, common);
  CalibrateCliOptions cal;
  calibrate_cmd->add_option("-f,--file", cal.file, "calibration text")->required()->check(CLI::ExistingFile);
  calibrate_cmd->add_option("--samples", cal.options.samples, "samples of --ctx tokens")->check(CLI::Range(1, 1 << 16))->capture_default_str();
  calibrate_cmd->add_option("--ctx", cal.options.ctx, "tokens per sample")->check(CLI::Range(2, 1 << 24))->capture_default_str();
  calibrate_cmd->add_option("--bits", cal.options.bits, "code widths")->delimiter(',')->capture_default_str();
  calibrate_cmd->add_option("--outliers", cal.options.outliers, "outlier fractions")->delimiter(',')->capture_default_str();
  calibrate_cmd->add_option("--sensitivity", cal.sensitivity, "k-means weights: fisher or none")
      ->check(CLI::IsMember({"fisher", "none"}))->capture_default_str();
  calibrate_cmd->add_option("--seed", cal.options.seed, "seed of the sample positions")->capture_default_str();
  calibrate_cmd->add_option("-o,--output", cal.output, "output file (default: beside the model)");

  CLI::App* bench = app.add_subcommand("bench", "prefill and decode speed over prompt lengths and batches");
  add_common(*bench, common);
  BenchOptions bench_options;
  bench->add_option("--prompt-len", bench_options.prompt_lengths, "prompt lengths")->delimiter(',')->capture_default_str();
  bench->add_option("--batch", bench_options.batches, "batch sizes")->delimiter(',')->capture_default_str();
  bench->add_option("--gen", bench_options.gen, "decode steps after prefill")->check(CLI::Range(1, 1 << 20))->capture_default_str();
  bench->add_option("--kv", bench_options.kv, "KV formats, comma-separated")->capture_default_str();
  bench->add_flag("--ragged", bench_options.ragged, "prompt lengths uniform in [L/4, L]");
  bench->add_option("--dummy", bench_options.dummy, "random weights of a preset's shapes: " +
                                                        fmt::format("{}", fmt::join(dummy_preset_names(), ", ")));
  bench->add_option("--repeats", bench_options.repeats, "timed repetitions after one warm-up (median reported)")
      ->check(CLI::Range(1, 1000))->capture_default_str();
  bench->add_option("--seed", bench_options.seed, "seed of the random prompts")->capture_default_str();

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    fmt::print(stderr, "kvq: error: {}\n", e.what());
    return 2;
  }

  CLI::App* chosen = app.get_subcommands().front();
  RunReport report(chosen->get_name(), argc, argv);
  int status = 0;
  if (chosen == info) {
    status = cmd_info(common, report);
  } else if (chosen == tokenize) {
    if (tok_prompt.empty() == tok_file.empty()) throw UsageError("kvq tokenize needs exactly one of -p TEXT or -f FILE");
    status = cmd_tokenize(common, tok_prompt, tok_file, tok_special, report);
  } else if (chosen == run) {
    status = cmd_run(common, run_options, report);
  } else if (chosen == ppl) {
    status = cmd_ppl(common, ppl_options, report);
  } else if (chosen == calibrate_cmd) {
    status = cmd_calibrate(common, cal, report);
  } else if (chosen == bench) {
    status = cmd_bench(common, bench_options, report);
  }
  report.write(common.json_path);
  write_csv(common.csv_path, report.to_json()["results"]);
  return status;
}

}  // namespace
}  // namespace kvq

int main(int argc, char** argv) {
  try {
  kvq::reexec_with_fast_blas_kernels(argv);
    return kvq::run_main(argc, argv);
  } catch (const kvq::UsageError& e) {
    fmt::print(stderr, "kvq: error: {}\n", e.what());
    return 2;
  } catch (const std::bad_alloc&) {
    fmt::print(stderr, "kvq: error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "kvq: error: {}\n", e.what());
    return 1;
  }
}
