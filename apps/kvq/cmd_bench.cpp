// kvq bench: prefill and decode speed, memory and energy over prompt lengths x
// batches x KV formats (DESIGN.md's bench fields), or with --mem-budget the
// largest batch each format runs under one KV budget. Every point gets its own
// backend whose pool holds exactly the pages the point needs (unless --pool-gib
// fixes it), so peak memory is what that point makes the process hold, and a
// point that does not fit is reported "oom" instead of ending the sweep.
#include "cli.h"

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <optional>
#include <random>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "bench/cpu_gemm_ceiling.h"
#include "bench/memory_usage.h"
#include "bench/nvml_energy.h"
#include "bench/sweep.h"
#include "core/error.h"
#include "core/progress.h"
#include "engine/generator.h"
#include "model/dummy_presets.h"

namespace kvq {
namespace {

constexpr int64_t kMaxWindowRepetitions = 100000;  // bounds the energy window of a point that takes microseconds
constexpr int32_t kMaxCapacityBatch = 1 << 16;

struct BenchOptions {
  std::vector<int32_t> prompt_lengths = {512};
  std::vector<int32_t> batches = {1};
  int32_t gen = 16;
  std::string kv = "fp16";
  bool ragged = false;
  std::string dummy;  // preset name: random weights of its shapes instead of -m
  int repeats = 3;
  int warmup = 1;
  uint64_t seed = 0;
  double mem_budget_gib = 0;  // > 0: capacity mode
  double energy_window_s = 5;
  EnergyPrices prices;
};

using Clock = std::chrono::steady_clock;

double now_s() { return std::chrono::duration<double>(Clock::now().time_since_epoch()).count(); }

// What every point of a run shares.
struct Bench {
  const CommonOptions& o;
  const BenchOptions& b;
  const LlamaConfig& config;
  const LlamaWeights* weights;  // nullptr with --dummy
  std::string fingerprint;
  bool on_cpu;
  NvmlEnergyMeter* meter;         // nullptr on the CPU
  std::string energy_status;      // "ok" or "unsupported: why" for the whole run
};

// What one format's pool costs, read from a backend built once per format
// with the run's --pool-gib (default: all the device can give the pool).
struct KvSizing {
  int64_t page_bytes = 0;
  int64_t sequence_bytes = 0;  // held per live sequence outside the pages (sinks, exact tail)
  int64_t device_pages = 0;    // pages that pool holds
};

std::vector<GenerationRequest> make_requests(const LlamaConfig& c, const std::vector<int32_t>& lengths, int32_t gen,
                                             std::mt19937_64& rng) {
  std::vector<GenerationRequest> requests(lengths.size());
  std::uniform_int_distribution<int32_t> token(0, c.vocab - 1);
  for (size_t i = 0; i < lengths.size(); ++i) {
    requests[i].prompt.resize(lengths[i]);
    for (int32_t& id : requests[i].prompt) id = token(rng);
    requests[i].max_new_tokens = gen;
  }
  return requests;
}

int64_t total_prompt_tokens(const std::vector<GenerationRequest>& requests) {
  int64_t tokens = 0;
  for (const GenerationRequest& r : requests) tokens += static_cast<int64_t>(r.prompt.size());
  return tokens;
}

std::vector<int32_t> prompt_lengths(const std::vector<GenerationRequest>& requests) {
  std::vector<int32_t> lengths;
  for (const GenerationRequest& r : requests) lengths.push_back(static_cast<int32_t>(r.prompt.size()));
  return lengths;
}

std::vector<GenerationResult> generate_once(const Bench& x, Runtime& runtime,
                                            const std::vector<GenerationRequest>& requests, GenerationStats* stats) {
  // Decode waits for the whole batch's prefill: decode_s times full-batch decode steps, as HF's baseline does.
  GeneratorOptions options{x.o.chunk, {}};
  options.decode_after_prefill = true;
  Generator generator(x.config, runtime.backend(), runtime.tables(), options, [](int32_t) { return false; });
  std::vector<GenerationResult> results = generator.generate(requests);
  if (stats != nullptr) *stats = generator.stats();
  return results;
}

// The CPU's GEMM-only time of the same prefill (full chunks plus the remainder, and attention's products).
void add_cpu_gemm_ceiling(const Bench& x, const std::vector<GenerationRequest>& requests, double prefill_s,
                          nlohmann::json& point) {
  const int64_t prompt_tokens = total_prompt_tokens(requests);
  const int64_t full_steps = prompt_tokens / x.o.chunk;
  const int32_t remainder = static_cast<int32_t>(prompt_tokens % x.o.chunk);
  double gemm_s = 0, gemm_flops = 0;
  if (full_steps > 0) {
    const GemmCeiling g = measure_cpu_gemm_ceiling(x.config, *x.weights, x.o.chunk, 1, x.b.repeats);
    gemm_s += g.seconds * full_steps;
    gemm_flops += g.flops * full_steps;
  }
  if (remainder > 0) {
    const GemmCeiling g = measure_cpu_gemm_ceiling(x.config, *x.weights, remainder,
                                                   static_cast<int32_t>(requests.size()), x.b.repeats);
    gemm_s += g.seconds;
    gemm_flops += g.flops;
  }
  const std::vector<int32_t> lengths = prompt_lengths(requests);
  const GemmCeiling attention = measure_cpu_attention_gemms(x.config, lengths, x.b.repeats);
  gemm_s += attention.seconds;
  gemm_flops += attention.flops;
  point.update({{"gemm_only_s", gemm_s},
                {"attention_gemm_s", attention.seconds},
                {"gemm_only_tok_s", prompt_tokens / gemm_s},
                {"gemm_gflop_s", gemm_flops / gemm_s / 1e9},
                {"prefill_over_gemm_only", prefill_s / gemm_s}});
}

// Measures one point on a runtime whose pool holds it: --warmup runs, then
// repetitions of the whole generation (at least --repeats, and with energy
// until the window lasts --energy-window seconds); medians of the timings,
// energy over the window. With energy, a second window of prefill alone
// (one generated token) separates prefill's J/token from decode's.
void measure_point(const Bench& x, Runtime& runtime, const std::vector<GenerationRequest>& requests,
                   nlohmann::json& point) {
  const int64_t batch = static_cast<int64_t>(requests.size());
  const int64_t prompt_tokens = total_prompt_tokens(requests);
  const int64_t decode_tokens = batch * (x.b.gen - 1);
  const bool energy = x.meter != nullptr && x.meter->supported() && x.b.energy_window_s > 0;
  auto read_energy = [&]() -> std::optional<uint64_t> { return energy ? x.meter->total_energy_mj() : std::nullopt; };

  GenerationStats stats;
  for (int i = 0; i < x.b.warmup; ++i) generate_once(x, runtime, requests, nullptr);
  std::vector<double> prefill_s, decode_s, ttft_s;
  const EnergyWindow full = measure_energy_window(
      [&] {
        std::vector<GenerationResult> results = generate_once(x, runtime, requests, &stats);
        double first_token_sum = 0;
        for (const GenerationResult& r : results) first_token_sum += r.first_token_s;
        prefill_s.push_back(stats.prefill_s);
        decode_s.push_back(stats.decode_s);
        ttft_s.push_back(first_token_sum / static_cast<double>(results.size()));
      },
      read_energy, now_s, energy ? x.b.energy_window_s : 0, x.b.repeats, kMaxWindowRepetitions);

  // Peak memory while the point's backend is alive: its device buffers only grow.
  const std::optional<int64_t> peak_mem = x.on_cpu ? host_peak_rss_bytes() : device_bytes_in_use();
  const double prefill = median(prefill_s);
  const double decode = x.b.gen > 1 ? median(decode_s) : 0;
  const int64_t kv_bytes = int64_t{stats.peak_used_pages} * runtime.backend().kv_bytes_per_page() +
                           batch * runtime.backend().kv_bytes_per_sequence();
  point.update({{"prefill_s", prefill},
                {"prefill_tok_s", prompt_tokens / prefill},
                {"ttft_s", median(ttft_s)},
                {"decode_s", decode},
                {"decode_tok_s", decode > 0 ? decode_tokens / decode : 0.0},
                {"peak_mem_bytes", peak_mem ? nlohmann::json(*peak_mem) : nlohmann::json(nullptr)},
                {"kv_bytes", kv_bytes},
                {"bits_per_element", kv_bits_per_element(x.config, runtime.backend(), stats.peak_used_pages, batch,
                                                         prompt_tokens + decode_tokens)},
                {"repetitions", full.repetitions},
                {"window_s", full.seconds},
                {"energy_j_per_token", nullptr},
                {"avg_watts", nullptr},
                {"prefill_j_per_token", nullptr},
                {"decode_j_per_token", nullptr},
                {"energy_status", x.energy_status},
                {"status", "ok"}});
  if (energy && full.joules) {
    const double j_per_token = *full.joules / static_cast<double>(full.repetitions * (prompt_tokens + decode_tokens));
    const PerMillionTokens per_mtok = per_million_tokens(j_per_token, x.b.prices);
    point.update({{"energy_j_per_token", j_per_token},
                  {"avg_watts", *full.joules / full.seconds},
                  {"kwh_per_mtok", per_mtok.kwh},
                  {"gco2_per_mtok", per_mtok.gco2},
                  {"usd_per_mtok", per_mtok.usd}});
    if (x.b.gen > 1) {
      std::vector<GenerationRequest> prefill_only = requests;
      for (GenerationRequest& r : prefill_only) r.max_new_tokens = 1;
      const EnergyWindow prefill_window = measure_energy_window(
          [&] { generate_once(x, runtime, prefill_only, nullptr); }, read_energy, now_s, x.b.energy_window_s, 1,
          kMaxWindowRepetitions);
      if (prefill_window.joules) {
        const double prefill_j = *prefill_window.joules / static_cast<double>(prefill_window.repetitions);
        const double full_j = *full.joules / static_cast<double>(full.repetitions);
        point["prefill_j_per_token"] = prefill_j / static_cast<double>(prompt_tokens);
        point["prefill_avg_watts"] = *prefill_window.joules / prefill_window.seconds;
        point["decode_j_per_token"] = (full_j - prefill_j) / static_cast<double>(decode_tokens);
      }
    } else {
      point["prefill_j_per_token"] = j_per_token;
    }
  }
  if (energy && !full.joules) point["energy_status"] = x.meter->status();  // the counter failed mid-way
  if (x.on_cpu) add_cpu_gemm_ceiling(x, requests, prefill, point);
}

void print_header(bool on_cpu) {
  fmt::print("{:<10} {:>6} {:>5} {:>4} {:>9} {:>11} {:>8} {:>10} {:>10} {:>9} {:>5} {:>9} {:>6}{}  {}\n", "kv", "prompt",
             "batch", "gen", "prefill_s", "prefill t/s", "ttft_s", "decode t/s", "peak mem", "kv MiB", "bits",
             "J/token", "W", on_cpu ? fmt::format(" {:>13} {:>6}", "GEMM-only t/s", "ratio") : "", "status");
}

void print_row(const nlohmann::json& p, bool on_cpu) {
  auto number = [&](const char* key, const char* spec) -> std::string {
    if (!p.contains(key) || !p[key].is_number()) return "-";
    return fmt::format(fmt::runtime(spec), p[key].get<double>());
  };
  const std::string peak =
      p.contains("peak_mem_bytes") && p["peak_mem_bytes"].is_number() ? format_bytes(p["peak_mem_bytes"].get<double>()) : "-";
  std::string status = p["status"].get<std::string>();
  if (p.contains("max_batch")) status += fmt::format(" (max_batch {})", p["max_batch"].get<int>());
  const std::string cpu_columns =
      on_cpu ? fmt::format(" {:>13} {:>6}", number("gemm_only_tok_s", "{:.1f}"), number("prefill_over_gemm_only", "{:.2f}"))
             : "";
  const double kv_mib = p.contains("kv_bytes") ? p["kv_bytes"].get<double>() / 1048576.0 : 0;
  fmt::print("{:<10} {:>6} {:>5} {:>4} {:>9} {:>11} {:>8} {:>10} {:>10} {:>9} {:>5} {:>9} {:>6}{}  {}\n",
             p["kv"].get<std::string>(), p["prompt_len"].get<int>(), p["batch"].get<int>(), p["gen"].get<int>(),
             number("prefill_s", "{:.3f}"), number("prefill_tok_s", "{:.1f}"), number("ttft_s", "{:.4f}"),
             number("decode_tok_s", "{:.1f}"), peak, p.contains("kv_bytes") ? fmt::format("{:.1f}", kv_mib) : "-",
             number("bits_per_element", "{:.2f}"), number("energy_j_per_token", "{:.4g}"), number("avg_watts", "{:.0f}"),
             cpu_columns, status);
  std::fflush(stdout);
}

nlohmann::json base_point(const Bench& x, const std::string& kv, int32_t length, int32_t batch,
                          const std::vector<GenerationRequest>& requests) {
  return {{"kv", kv},
          {"prompt_len", length},
          {"batch", batch},
          {"gen", x.b.gen},
          {"page", x.o.page},
          {"ragged", x.b.ragged},
          {"prompt_tokens", total_prompt_tokens(requests)},
          {"prompt_lengths", prompt_lengths(requests)},  // ragged draws, so a baseline can run the same batch
          {"energy_status", x.energy_status}};
}

// Marks `point` failed by `error`: "oom" for an allocation failure, else the error's text.
void mark_failed(nlohmann::json& point, const std::exception& error) {
  point["status"] = failure_status(error);
  if (point["status"] == "oom") {
    point["oom_reason"] = error.what();
    clear_device_error();
  }
}

// A copy of the options whose pool holds `pages` pages (half a page more, so rounding down keeps them all).
CommonOptions with_pool_pages(const CommonOptions& o, int64_t pages, int64_t page_bytes) {
  CommonOptions sized = o;
  sized.pool_gib = (static_cast<double>(pages) + 0.5) * static_cast<double>(page_bytes) / kGib;
  return sized;
}

// Why a prompt of `length` tokens cannot run --gen tokens in the model's context (the last generated token is
// never fed back), or "" when it can; a generation cut short would report no decode speed at all.
std::string context_error(const Bench& x, int32_t length) {
  if (int64_t{length} + x.b.gen - 1 <= x.config.context) return {};
  return fmt::format("prompt length {} + {} generated tokens exceeds the model's context of {}", length, x.b.gen,
                     x.config.context);
}

// One point of the sweep, on its own backend.
nlohmann::json sweep_point(const Bench& x, const std::string& kv, const std::optional<KvSizing>& sizing,
                           const std::string& format_error, int32_t length, int32_t batch, std::mt19937_64& rng) {
  const std::vector<int32_t> lengths = point_prompt_lengths(length, batch, x.b.ragged, rng);
  const std::vector<GenerationRequest> requests = make_requests(x.config, lengths, x.b.gen, rng);
  nlohmann::json point = base_point(x, kv, length, batch, requests);
  if (!sizing) {
    point["status"] = format_error;
    return point;
  }
  if (const std::string why = context_error(x, length); !why.empty()) {
    point["status"] = why;
    return point;
  }
  const int64_t pages = pages_for_batch(lengths, x.b.gen, x.o.page, x.config.context);
  point["kv_bytes_needed"] = pages * sizing->page_bytes + int64_t{batch} * sizing->sequence_bytes;
  if (pages > sizing->device_pages) {
    point["status"] = "oom";
    point["oom_reason"] = fmt::format("the batch needs {} KV pages ({}), the pool holds {} ({})", pages,
                                      format_bytes(static_cast<double>(pages * sizing->page_bytes)),
                                      sizing->device_pages,
                                      format_bytes(static_cast<double>(sizing->device_pages * sizing->page_bytes)));
    return point;
  }
  try {
    reset_host_peak_rss();
    const CommonOptions options = x.o.pool_gib > 0 ? x.o : with_pool_pages(x.o, pages, sizing->page_bytes);
    Runtime runtime(x.config, x.weights, x.fingerprint, options, kv);
    measure_point(x, runtime, requests, point);
  } catch (const std::exception& e) {
    mark_failed(point, e);
  }
  return point;
}

// Capacity mode for one format and length: the largest batch whose KV fits
// --mem-budget, found by real runs on a pool of that size, then measured; and
// the next batch, shown not to fit. Ragged lengths are drawn once, so batch b
// is always the first b of them and a larger batch never needs less.
std::vector<nlohmann::json> capacity_points(const Bench& x, const std::string& kv, const KvSizing& sizing,
                                            int32_t length, std::mt19937_64& rng) {
  if (const std::string why = context_error(x, length); !why.empty()) fail("{}", why);
  const int64_t budget_bytes = static_cast<int64_t>(x.b.mem_budget_gib * kGib);
  const int64_t pages_per_sequence_min = pages_for_batch({std::max(1, x.b.ragged ? length / 4 : length)}, x.b.gen,
                                                         x.o.page, x.config.context);
  const int64_t most = budget_bytes / (pages_per_sequence_min * sizing.page_bytes + sizing.sequence_bytes);
  const int32_t limit = static_cast<int32_t>(std::clamp<int64_t>(most + 1, 1, kMaxCapacityBatch));
  const std::vector<int32_t> all_lengths = point_prompt_lengths(length, limit, x.b.ragged, rng);
  const std::vector<GenerationRequest> all_requests = make_requests(x.config, all_lengths, x.b.gen, rng);
  auto first = [&](int32_t batch) {
    return std::vector<GenerationRequest>(all_requests.begin(), all_requests.begin() + batch);
  };
  std::vector<int64_t> prefix_bytes(limit + 1, 0);  // KV bytes of the first b sequences
  for (int32_t i = 0; i < limit; ++i) {
    prefix_bytes[i + 1] = prefix_bytes[i] +
                          pages_for_batch({all_lengths[i]}, x.b.gen, x.o.page, x.config.context) * sizing.page_bytes +
                          sizing.sequence_bytes;
  }
  auto bytes_needed = [&](int32_t batch) { return prefix_bytes[std::min(batch, limit)]; };
  int32_t hint = 1;
  while (hint < limit && bytes_needed(hint + 1) <= budget_bytes) ++hint;

  CommonOptions options = x.o;
  options.pool_gib = x.b.mem_budget_gib;
  std::optional<Runtime> runtime;
  std::map<int32_t, std::string> refusals;  // why a probed batch did not fit
  auto fits = [&](int32_t batch) {
    if (bytes_needed(batch) > budget_bytes) {
      refusals[batch] = fmt::format("its KV needs {}, over the budget of {}",
                                    format_bytes(static_cast<double>(bytes_needed(batch))),
                                    format_bytes(static_cast<double>(budget_bytes)));
      return false;
    }
    try {
      if (!runtime) runtime.emplace(x.config, x.weights, x.fingerprint, options, kv);
      generate_once(x, *runtime, first(batch), nullptr);
      return true;
    } catch (const std::exception& e) {
      if (failure_status(e) != "oom") throw;
      clear_device_error();
      refusals[batch] = e.what();
      runtime.reset();  // a step that failed half-way leaves its sequences in the page tables
      return false;
    }
  };
  const CapacityResult capacity = find_max_batch(fits, hint, limit);
  nlohmann::json probes = nlohmann::json::array();
  for (const CapacityProbe& p : capacity.probes) probes.push_back({{"batch", p.batch}, {"fits", p.fits}});

  std::vector<nlohmann::json> points;
  if (capacity.max_batch > 0) {
    const std::vector<GenerationRequest> requests = first(capacity.max_batch);
    nlohmann::json point = base_point(x, kv, length, capacity.max_batch, requests);
    point["kv_bytes_needed"] = bytes_needed(capacity.max_batch);
    try {
      reset_host_peak_rss();
      if (!runtime) runtime.emplace(x.config, x.weights, x.fingerprint, options, kv);
      measure_point(x, *runtime, requests, point);
    } catch (const std::exception& e) {
      mark_failed(point, e);
    }
    points.push_back(point);
  }
  runtime.reset();
  const int32_t over = capacity.max_batch + 1;
  if (refusals.contains(over)) {
    const std::vector<GenerationRequest> requests = first(over);
    nlohmann::json point = base_point(x, kv, length, over, requests);
    point.update({{"status", "oom"}, {"oom_reason", refusals[over]}, {"kv_bytes_needed", bytes_needed(over)}});
    points.push_back(point);
  }
  for (nlohmann::json& point : points) {
    point.update({{"max_batch", capacity.max_batch}, {"mem_budget_gib", x.b.mem_budget_gib}, {"capacity_probes", probes}});
  }
  return points;
}

std::string energy_status_of_run(bool on_cpu, const NvmlEnergyMeter* meter, double window_s) {
  if (on_cpu) return "unsupported: NVML measures the GPU board; this run is on the CPU";
  if (window_s <= 0) return "unsupported: --energy-window 0";
  return meter->status();
}

int cmd_bench(const CommonOptions& o, const BenchOptions& b, RunReport& report) {
  const std::vector<std::string> formats = parse_kv_formats(b.kv);
  apply_threads(o);
  const bool on_cpu = resolve_device(o) == "cpu";
  if (!b.dummy.empty() && on_cpu) fail("--dummy weights are generated on the GPU: use --device cuda");
  std::optional<LoadedModel> model;  // none with --dummy
  if (b.dummy.empty()) model.emplace(o.model, true);
  const LlamaConfig c = model ? model->config : dummy_preset(b.dummy);
  std::optional<NvmlEnergyMeter> meter;
  if (!on_cpu) meter.emplace(cuda_pci_bus_id());
  const Bench x{o, b, c, model ? &model->weights : nullptr, model ? model_fingerprint(*model) : "dummy", on_cpu,
                meter ? &*meter : nullptr, energy_status_of_run(on_cpu, meter ? &*meter : nullptr, b.energy_window_s)};
  const bool capacity_mode = b.mem_budget_gib > 0;

  report.set_model(model ? o.model : "dummy:" + b.dummy);
  report.settings() = {
      {"prompt_len", b.prompt_lengths}, {"batch", b.batches}, {"gen", b.gen}, {"ragged", b.ragged},
      {"repeats", b.repeats}, {"warmup", b.warmup}, {"seed", b.seed}, {"page", o.page}, {"chunk", o.chunk}, {"sinks", o.sinks},
      {"tail", o.tail}, {"kscale", o.kscale}, {"exact_chunk", o.exact_chunk}, {"pool_gib", o.pool_gib},
      {"threads", omp_get_max_threads()}, {"mem_budget_gib", b.mem_budget_gib},
      {"energy_window_s", b.energy_window_s}, {"energy_status", x.energy_status},
      {"grid_gco2_per_kwh", b.prices.grid_gco2_per_kwh}, {"usd_per_kwh", b.prices.usd_per_kwh}, {"pue", b.prices.pue},
      {"peak_mem_method", on_cpu ? "host peak resident set (VmHWM, reset before each point)"
                                 : "device memory in use (cudaMemGetInfo total - free) after the point, backend alive"},
      {"pool", o.pool_gib > 0 ? "--pool-gib" : capacity_mode ? "--mem-budget" : "per point: the pages it needs"},
      {"ttft", "mean over the batch's requests of the time to their first token"},
      {"decode", "after the whole batch is prefilled: every decode step carries every sequence"}};
  if (!on_cpu) fmt::print("energy: {}\n", x.energy_status);
  print_header(on_cpu);

  const int64_t total_points = int64_t(formats.size()) * int64_t(b.prompt_lengths.size()) *
                               (capacity_mode ? 1 : int64_t(b.batches.size()));
  ProgressBar bar("bench points");
  int64_t done = 0;
  std::mt19937_64 rng(b.seed);
  for (const std::string& kv : formats) {
    std::optional<KvSizing> sizing;
    std::string format_error;
    try {
      Runtime probe(c, x.weights, x.fingerprint, o, kv);
      sizing = KvSizing{probe.backend().kv_bytes_per_page(), probe.backend().kv_bytes_per_sequence(), probe.n_pages()};
      report.set_device(probe.backend().device_name());
    } catch (const std::exception& e) {
      format_error = failure_status(e);
      if (format_error == "oom") clear_device_error();
    }
    for (int32_t length : b.prompt_lengths) {
      std::vector<nlohmann::json> points;
      if (capacity_mode) {
        try {
          if (!sizing) fail("{}", format_error);
          points = capacity_points(x, kv, *sizing, length, rng);
        } catch (const std::exception& e) {
          points = {{{"kv", kv}, {"prompt_len", length}, {"gen", b.gen}, {"status", failure_status(e)}}};
        }
      } else {
        for (int32_t batch : b.batches) {
          points.push_back(sweep_point(x, kv, sizing, format_error, length, batch, rng));
          print_row(points.back(), on_cpu);
          report.add_result(points.back());
          report.write(o.json_path);  // what is measured survives a run stopped part-way
          bar.update(++done, total_points);
        }
        continue;
      }
      for (const nlohmann::json& point : points) {
        if (point.contains("batch")) print_row(point, on_cpu);
        report.add_result(point);
      }
      report.write(o.json_path);
      bar.update(++done, total_points);
    }
  }

  fmt::print("peak mem: {}.\n", report.settings()["peak_mem_method"].get<std::string>());
  if (x.energy_status == "ok") {
    fmt::print("energy: NVML total-energy counter of the GPU board over windows of at least {} s (repetitions of the "
               "whole generation); J/token over prompt and decode tokens. Per million tokens: kWh = J/token x 1e6 x "
               "PUE {} / 3.6e6; carbon at {} gCO2e/kWh (--grid-gco2-per-kwh), cost at ${}/kWh (--usd-per-kwh). "
               "Board energy only: host CPU, memory, network and cooling are outside it unless PUE covers them.\n",
               b.energy_window_s, b.prices.pue, b.prices.grid_gco2_per_kwh, b.prices.usd_per_kwh);
  }
  if (on_cpu) {
    fmt::print("GEMM-only: the forward's matrix products alone, with the same weights and shapes (projections, "
               "logits, and attention's scores and values products; OpenBLAS sgemm, {} threads); ratio = prefill time "
               "/ GEMM-only time.\n", omp_get_max_threads());
  }
  return 0;
}

}  // namespace

Command add_bench_command(CLI::App& app, CommonOptions& common) {
  CLI::App* cmd = app.add_subcommand("bench", "prefill and decode speed, memory and energy over prompt lengths and batches");
  add_common(*cmd, common);
  auto options = std::make_shared<BenchOptions>();
  cmd->add_option("--prompt-len", options->prompt_lengths, "prompt lengths")->delimiter(',')->capture_default_str();
  cmd->add_option("--batch", options->batches, "batch sizes (ignored with --mem-budget)")->delimiter(',')->capture_default_str();
  cmd->add_option("--gen", options->gen, "tokens generated per sequence (decode steps after prefill + 1)")
      ->check(CLI::Range(1, 1 << 20))->capture_default_str();
  cmd->add_option("--kv", options->kv, "KV formats, comma-separated")->capture_default_str();
  cmd->add_flag("--ragged", options->ragged, "prompt lengths uniform in [L/4, L]");
  cmd->add_option("--dummy", options->dummy,
                  "random weights of a preset's shapes: " + fmt::format("{}", fmt::join(dummy_preset_names(), ", ")));
  cmd->add_option("--repeats", options->repeats, "timed repetitions after the warm-up at least (median reported)")
      ->check(CLI::Range(1, 1000))->capture_default_str();
  cmd->add_option("--warmup", options->warmup,
                  "untimed runs of each point first (0: a point too long to run twice, timed cold)")
      ->check(CLI::Range(0, 100))
      ->capture_default_str();
  cmd->add_option("--seed", options->seed, "seed of the random prompts")->capture_default_str();
  cmd->add_option("--mem-budget", options->mem_budget_gib,
                  "capacity mode: the largest batch per format and length whose KV fits this many GiB")
      ->check(CLI::Range(0.0, 1e6));
  cmd->add_option("--energy-window", options->energy_window_s,
                  "seconds each energy window lasts at least (repeating the measured phase; 0: no energy)")
      ->check(CLI::Range(0.0, 3600.0))->capture_default_str();
  cmd->add_option("--grid-gco2-per-kwh", options->prices.grid_gco2_per_kwh,
                  "carbon intensity assumed for the electricity (g CO2e per kWh)")
      ->check(CLI::Range(0.0, 1e4))->capture_default_str();
  cmd->add_option("--usd-per-kwh", options->prices.usd_per_kwh, "electricity price assumed (USD per kWh)")
      ->check(CLI::Range(0.0, 1e3))->capture_default_str();
  cmd->add_option("--pue", options->prices.pue, "power usage effectiveness applied to the board's energy")
      ->check(CLI::Range(1.0, 10.0))->capture_default_str();
  return {cmd, [&common, options](RunReport& report) { return cmd_bench(common, *options, report); }};
}

}  // namespace kvq
