// kvq bench: prefill and decode speed over prompt lengths x batches x formats.
#include "cli.h"

#include <omp.h>

#include <sys/resource.h>

#include <algorithm>
#include <cstdio>
#include <optional>
#include <random>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "bench/cpu_gemm_ceiling.h"
#include "core/error.h"
#include "engine/generator.h"
#include "model/dummy_presets.h"

namespace kvq {
namespace {

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

}  // namespace

Command add_bench_command(CLI::App& app, CommonOptions& common) {
  CLI::App* cmd = app.add_subcommand("bench", "prefill and decode speed over prompt lengths and batches");
  add_common(*cmd, common);
  auto options = std::make_shared<BenchOptions>();
  cmd->add_option("--prompt-len", options->prompt_lengths, "prompt lengths")->delimiter(',')->capture_default_str();
  cmd->add_option("--batch", options->batches, "batch sizes")->delimiter(',')->capture_default_str();
  cmd->add_option("--gen", options->gen, "decode steps after prefill")->check(CLI::Range(1, 1 << 20))->capture_default_str();
  cmd->add_option("--kv", options->kv, "KV formats, comma-separated")->capture_default_str();
  cmd->add_flag("--ragged", options->ragged, "prompt lengths uniform in [L/4, L]");
  cmd->add_option("--dummy", options->dummy,
                  "random weights of a preset's shapes: " + fmt::format("{}", fmt::join(dummy_preset_names(), ", ")));
  cmd->add_option("--repeats", options->repeats, "timed repetitions after one warm-up (median reported)")
      ->check(CLI::Range(1, 1000))->capture_default_str();
  cmd->add_option("--seed", options->seed, "seed of the random prompts")->capture_default_str();
  return {cmd, [&common, options](RunReport& report) { return cmd_bench(common, *options, report); }};
}

}  // namespace kvq
