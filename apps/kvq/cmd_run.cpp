// kvq run: generate from a prompt, a file or a JSONL batch of requests.
#include "cli.h"

#include <algorithm>
#include <cstdio>
#include <fstream>

#include <fmt/format.h>

#include "core/error.h"
#include "engine/generator.h"

namespace kvq {
namespace {

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

}  // namespace

Command add_run_command(CLI::App& app, CommonOptions& common) {
  CLI::App* cmd = app.add_subcommand("run", "generate text from a prompt or a batch of prompts");
  add_common(*cmd, common);
  auto options = std::make_shared<RunOptions>();
  cmd->add_option("-p,--prompt", options->prompt, "prompt text");
  cmd->add_option("-f,--file", options->prompt_file, "prompt file")->check(CLI::ExistingFile);
  cmd->add_option("--batch-file", options->batch_file, "JSONL requests {\"prompt\", \"n\"}")->check(CLI::ExistingFile);
  cmd->add_option("-n", options->n, "tokens to generate")->check(CLI::Range(1, 1 << 24))->capture_default_str();
  cmd->add_option("--kv", options->kv, "KV format")->capture_default_str();
  cmd->add_option("--temp", options->temperature, "temperature; 0 is greedy")->check(CLI::Range(0.0f, 100.0f))->capture_default_str();
  cmd->add_option("--top-p", options->top_p, "nucleus mass")->check(CLI::Range(0.0f, 1.0f))->capture_default_str();
  cmd->add_option("--seed", options->seed, "sampling seed")->capture_default_str();
  cmd->add_flag("--chat", options->chat, "wrap the prompt in the model's chat template");
  return {cmd, [&common, options](RunReport& report) { return cmd_run(common, *options, report); }};
}

}  // namespace kvq
