// kvq ppl: sliding-window perplexity of a text, one row per --kv format.
#include "cli.h"

#include <chrono>

#include <fmt/format.h>

#include "core/progress.h"
#include "eval/perplexity.h"

namespace kvq {
namespace {

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

}  // namespace

Command add_ppl_command(CLI::App& app, CommonOptions& common) {
  CLI::App* cmd = app.add_subcommand("ppl", "perplexity of a text with sliding windows");
  add_common(*cmd, common);
  auto options = std::make_shared<PplOptions>();
  cmd->add_option("-f,--file", options->file, "text file")->required()->check(CLI::ExistingFile);
  cmd->add_option("--ctx", options->ctx, "window length in tokens")->check(CLI::Range(2, 1 << 24))->capture_default_str();
  cmd->add_option("--stride", options->stride, "window advance (default ctx/2)")->check(CLI::Range(1, 1 << 24));
  cmd->add_option("--max-tokens", options->max_tokens, "use only the text's first N tokens")->check(CLI::Range(int64_t{2}, int64_t{1} << 40));
  cmd->add_option("--kv", options->kv, "KV formats, comma-separated")->capture_default_str();
  return {cmd, [&common, options](RunReport& report) { return cmd_ppl(common, *options, report); }};
}

}  // namespace kvq
