// kvq eval: long-context accuracy of KV formats side by side — passkey
// retrieval, RULER's synthetic tasks and KL divergence against fp16. Every
// format answers the same prompts (generated once from --seed), so the
// comparison is paired.
#include "cli.h"

#include <algorithm>
#include <chrono>
#include <map>
#include <optional>

#include <fmt/format.h>

#include "core/error.h"
#include "core/progress.h"
#include "engine/generator.h"
#include "eval/kl.h"
#include "eval/passkey.h"
#include "eval/ruler.h"
#include "eval/scoring.h"
#include "eval/tasks.h"
#include "kv/kv_format.h"

namespace kvq {
namespace {

struct EvalOptions {
  std::string tasks;
  std::string lengths = "1024,2048,4096,8192";
  int32_t samples = 50;
  std::string kv = "fp16";
  bool chat = false;
  uint64_t seed = 42;  // RULER's default
  int32_t depths = 5;
  std::string haystack = "data/haystack.txt";
  std::string words = "data/words.txt";
  std::string text = "data/evaluation.txt";
};

// --task: names checked, "ruler" expanded to its 11 tasks, duplicates dropped.
std::vector<std::string> parse_tasks(const std::string& list) {
  std::vector<std::string> tasks;
  auto add = [&](const std::string& name) {
    if (std::find(tasks.begin(), tasks.end(), name) == tasks.end()) tasks.push_back(name);
  };
  for (const std::string& name : split_commas(list)) {
    if (name.empty()) {
      continue;  // "passkey," or "passkey,,kl"
    } else if (name == "ruler") {
      for (const std::string& task : ruler_task_names()) add(task);
    } else if (name == "passkey" || name == "kl" || is_ruler_task(name)) {
      add(name);
    } else {
      std::string known = "passkey, ruler";
      for (const std::string& task : ruler_task_names()) known += ", " + task;
      throw UsageError(fmt::format("--task: unknown task '{}' (known: {}, kl)", name, known));
    }
  }
  if (tasks.empty()) throw UsageError("--task needs at least one task");
  return tasks;
}

// --lengths: tokens, "4096" or "4K" (x1024).
std::vector<int32_t> parse_lengths(const std::string& list) {
  std::vector<int32_t> lengths;
  for (const std::string& item : split_commas(list)) {
    if (item.empty()) continue;
    std::string digits = item;
    int64_t scale = 1;
    if (digits.back() == 'K' || digits.back() == 'k') {
      scale = 1024;
      digits.pop_back();
    }
    int64_t value = 0;
    const bool numeric = !digits.empty() && digits.size() < 10 &&
                         std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (numeric) value = std::stoll(digits) * scale;
    if (!numeric || value < 16 || value > (int64_t{1} << 30)) {
      throw UsageError(fmt::format("--lengths: '{}' is not a length in tokens (16 or more, e.g. 4096 or 4K)", item));
    }
    lengths.push_back(static_cast<int32_t>(value));
  }
  if (lengths.empty()) throw UsageError("--lengths needs at least one length");
  return lengths;
}

// FNV-1a over every prompt's ids: equal digests across formats show the prompts were the same.
std::string prompts_digest(const std::vector<GenerationRequest>& requests) {
  uint64_t hash = 0xcbf29ce484222325ull;
  for (const GenerationRequest& request : requests) {
    for (const int32_t id : request.prompt) {
      for (int byte = 0; byte < 4; ++byte) {
        hash = (hash ^ ((static_cast<uint32_t>(id) >> (8 * byte)) & 0xffu)) * 0x100000001b3ull;
      }
    }
    hash = (hash ^ 0xffu) * 0x100000001b3ull;  // prompt boundary
  }
  return fmt::format("{:016x}", hash);
}

// One task at one length: its prompts, the same for every format.
struct GenerationPoint {
  std::string task;
  int32_t length = 0;
  std::vector<TaskSample> samples;
  std::vector<GenerationRequest> requests;
  std::string digest;
  double prompt_tokens_mean = 0;
};

GenerationPoint build_point(const std::string& task, int32_t length, const EvalOptions& e, const LoadedModel& model,
                            const std::optional<RulerSources>& sources) {
  const PromptTokenCounter count = [&](const TaskSample& sample) {
    return static_cast<int64_t>(encode_prompt(sample, model.tokenizer, e.chat).size());
  };
  const TaskGenerator generator =
      task == "passkey" ? passkey_generator(e.depths, length) : ruler_generator(task, length, *sources, count);
  GenerationPoint point;
  point.task = task;
  point.length = length;
  point.samples = build_task_samples(task, generator, length, e.samples, e.seed, count);
  double tokens = 0;
  for (const TaskSample& sample : point.samples) {
    point.requests.push_back({encode_prompt(sample, model.tokenizer, e.chat), generator.max_new_tokens});
    tokens += static_cast<double>(point.requests.back().prompt.size());
  }
  point.digest = prompts_digest(point.requests);
  point.prompt_tokens_mean = tokens / static_cast<double>(point.samples.size());
  return point;
}

double score_sample(const TaskSample& sample, const std::string& output) {
  return sample.passkey >= 0 ? score_passkey(output, sample.passkey) : string_match_all(output, sample.references);
}

constexpr size_t kFirstAnswersKept = 2;
constexpr size_t kMissesKept = 3;

struct Cell {
  double accuracy, ci95;
};
using TableKey = std::pair<std::string, int32_t>;  // task, length

void print_matrix(const std::vector<TableKey>& rows, const std::vector<std::string>& formats,
                  const std::map<std::pair<TableKey, std::string>, Cell>& cells) {
  fmt::print("\n{:<16} {:>6}", "task", "length");
  for (const std::string& kv : formats) fmt::print(" {:>14}", kv);
  fmt::print("\n");
  for (const TableKey& row : rows) {
    fmt::print("{:<16} {:>6}", row.first, row.second);
    for (const std::string& kv : formats) {
      const auto it = cells.find({row, kv});
      fmt::print(" {:>14}", it == cells.end() ? "-" : fmt::format("{:.1f} ±{:.1f}", it->second.accuracy, it->second.ci95));
    }
    fmt::print("\n");
  }
}

void run_generation(const CommonOptions& o, const EvalOptions& e, const LoadedModel& model,
                    const std::vector<std::string>& formats, const std::vector<GenerationPoint>& points,
                    RunReport& report) {
  std::map<std::pair<TableKey, std::string>, Cell> cells;
  std::vector<TableKey> rows;
  for (const GenerationPoint& p : points) rows.emplace_back(p.task, p.length);
  for (const std::string& kv : formats) {
    Runtime runtime(model.config, &model.weights, model_fingerprint(model), o, kv);
    report.set_device(runtime.backend().device_name());
    for (const GenerationPoint& point : points) {
      Generator generator(model.config, runtime.backend(), runtime.tables(), GeneratorOptions{o.chunk, {}},
                          [&](int32_t id) { return model.tokenizer.is_end_of_generation(id); });
      ProgressBar bar(fmt::format("{} {} {}", point.task, point.length, kv));
      int64_t total_new = 0;
      for (const GenerationRequest& r : point.requests) total_new += r.max_new_tokens;
      int64_t generated = 0;
      const auto start = std::chrono::steady_clock::now();
      const std::vector<GenerationResult> results =
          generator.generate(point.requests, [&](size_t, int32_t) { bar.update(++generated, total_new); });
      bar.update(total_new, total_new);
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

      std::vector<double> scores;
      std::map<double, std::vector<double>> scores_by_depth;
      // What the model said: the first answers and the first misses.
      nlohmann::json examples = nlohmann::json::array();
      size_t misses_kept = 0;
      for (size_t i = 0; i < results.size(); ++i) {
        const std::string output = model.tokenizer.decode(results[i].tokens);
        scores.push_back(score_sample(point.samples[i], output));
        if (point.task == "passkey") scores_by_depth[point.samples[i].depth].push_back(scores.back());
        const bool missed = scores.back() < 1.0 && misses_kept < kMissesKept;
        if (i < kFirstAnswersKept || missed) {
          const TaskSample& s = point.samples[i];
          misses_kept += missed;
          examples.push_back({{"prompt", i + 1},
                              {"output", output},
                              {"expected", s.passkey >= 0 ? std::vector<std::string>{std::to_string(s.passkey)}
                                                          : s.references},
                              {"score", scores.back()}});
        }
      }
      const AccuracySummary summary = summarize_scores(scores);
      cells[{{point.task, point.length}, kv}] = {summary.accuracy, summary.ci95};
      fmt::print("{:<16} {:>6} {:<10} n={:<4} accuracy {:6.2f} ± {:5.2f}  ({:.0f} prompt tokens on average, {:.1f} s)\n",
                 point.task, point.length, kv, scores.size(), summary.accuracy, summary.ci95, point.prompt_tokens_mean,
                 seconds);
      nlohmann::json result = {{"task", point.task},
                               {"length", point.length},
                               {"depth", nullptr},
                               {"kv", kv},
                               {"samples", scores.size()},
                               {"accuracy", summary.accuracy},
                               {"ci95", summary.ci95},
                               {"chat", e.chat},
                               {"seed", e.seed},
                               {"max_new_tokens", point.requests.front().max_new_tokens},
                               {"prompt_tokens_mean", point.prompt_tokens_mean},
                               {"prompts_digest", point.digest},
                               {"scores", scores},
                               {"examples", examples},
                               {"generated_tokens", generated},
                               {"seconds", seconds}};
      report.add_result(result);
      for (const auto& [depth, depth_scores] : scores_by_depth) {
        const AccuracySummary at_depth = summarize_scores(depth_scores);
        result["depth"] = depth * 100.0;  // percent of the filler before the needle
        result["samples"] = depth_scores.size();
        result["accuracy"] = at_depth.accuracy;
        result["ci95"] = at_depth.ci95;
        result["scores"] = depth_scores;
        result.erase("examples");
        result.erase("generated_tokens");
        result.erase("seconds");
        report.add_result(result);
      }
    }
  }
  print_matrix(rows, formats, cells);
}

// The pool each KL runtime needs: one window at fp16's size (the largest format) and a margin.
CommonOptions kl_runtime_options(const CommonOptions& o, const LlamaConfig& config, int32_t longest) {
  CommonOptions options = o;
  if (options.pool_gib <= 0) {
    const double fp16_bytes_per_token = 2.0 * config.n_layers * config.kv_dim() * 2.0;
    options.pool_gib = (1.25 * fp16_bytes_per_token * (longest + 2.0 * o.page)) / kGib + 0.0625;
  }
  return options;
}

void run_kl(const CommonOptions& o, const EvalOptions& e, const LoadedModel& model,
            const std::vector<std::string>& formats, const std::vector<int32_t>& lengths, RunReport& report) {
  std::vector<std::string> compared;
  for (const std::string& kv : formats) {
    if (kv != "fp16") compared.push_back(kv);
  }
  if (compared.empty()) fail("--task kl compares formats with fp16: add a format other than fp16 to --kv");
  const std::vector<int32_t> text = model.tokenizer.encode(read_file(e.text), false);
  const CommonOptions options = kl_runtime_options(o, model.config, *std::max_element(lengths.begin(), lengths.end()));
  const std::string fingerprint = model_fingerprint(model);
  Runtime reference(model.config, &model.weights, fingerprint, options, "fp16");
  std::vector<std::unique_ptr<Runtime>> runtimes;
  std::vector<BackendWithTables> backends;
  for (const std::string& kv : compared) {
    runtimes.push_back(std::make_unique<Runtime>(model.config, &model.weights, fingerprint, options, kv));
    backends.push_back({&runtimes.back()->backend(), &runtimes.back()->tables()});
  }
  report.set_device(reference.backend().device_name());

  for (const int32_t length : lengths) {
    KlOptions kl;
    kl.length = length;
    kl.windows = e.samples;
    kl.chunk = o.chunk;
    kl.bos_id = model.tokenizer.add_bos() ? model.tokenizer.bos_id() : -1;
    ProgressBar bar(fmt::format("kl {} windows", length));
    const auto start = std::chrono::steady_clock::now();
    const std::vector<KlSummary> summaries =
        evaluate_kl(model.config, {&reference.backend(), &reference.tables()}, backends, text, kl,
                    [&](int64_t done, int64_t total) { bar.update(done, total); });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (length == lengths.front()) {  // after the first run, so a refused run prints only its error
      fmt::print("\n{:<10} {:>6} {:>8} {:>10} {:>10} {:>10}\n", "kv", "length", "tokens", "kl_mean", "kl_p99", "top1 %");
    }
    for (size_t f = 0; f < compared.size(); ++f) {
      const KlSummary& s = summaries[f];
      fmt::print("{:<10} {:>6} {:>8} {:>10.5f} {:>10.5f} {:>10.2f}\n", compared[f], length, s.tokens, s.kl_mean,
                 s.kl_p99, s.top1_agree);
      report.add_result({{"task", "kl"},
                         {"length", length},
                         {"kv", compared[f]},
                         {"samples", e.samples},
                         {"tokens", s.tokens},
                         {"kl_mean", s.kl_mean},
                         {"kl_p99", s.kl_p99},
                         {"top1_agree", s.top1_agree},
                         {"chat", false},
                         {"seconds", seconds}});
    }
  }
}

int cmd_eval(const CommonOptions& o, const EvalOptions& e, RunReport& report) {
  const std::vector<std::string> tasks = parse_tasks(e.tasks);
  const std::vector<int32_t> lengths = parse_lengths(e.lengths);
  const std::vector<std::string> formats = parse_kv_formats(e.kv);
  apply_threads(o);
  LoadedModel model(o.model, true);
  for (const int32_t length : lengths) {
    if (length > model.config.context) {
      fail("--lengths {}: longer than the model's context of {} tokens", length, model.config.context);
    }
  }
  report.set_model(o.model);
  report.settings() = {{"tasks", tasks},       {"lengths", lengths},       {"samples", e.samples},
                       {"kv", formats},        {"chat", e.chat},           {"seed", e.seed},
                       {"depths", e.depths},   {"haystack", e.haystack},   {"words", e.words},
                       {"text", e.text},       {"page", o.page},           {"chunk", o.chunk},
                       {"sinks", o.sinks},     {"tail", o.tail},           {"kscale", o.kscale},
                       {"exact_chunk", o.exact_chunk}};

  std::optional<RulerSources> sources;
  if (std::any_of(tasks.begin(), tasks.end(), is_ruler_task)) sources.emplace(read_file(e.haystack), read_file(e.words));
  std::vector<GenerationPoint> points;
  for (const std::string& task : tasks) {
    if (task == "kl") continue;
    for (const int32_t length : lengths) points.push_back(build_point(task, length, e, model, sources));
  }
  if (!points.empty()) run_generation(o, e, model, formats, points, report);
  if (std::find(tasks.begin(), tasks.end(), "kl") != tasks.end()) run_kl(o, e, model, formats, lengths, report);
  return 0;
}

}  // namespace

Command add_eval_command(CLI::App& app, CommonOptions& common) {
  CLI::App* cmd = app.add_subcommand("eval", "long-context accuracy: passkey, RULER tasks, KL divergence vs fp16");
  add_common(*cmd, common);
  auto options = std::make_shared<EvalOptions>();
  cmd->add_option("--task", options->tasks,
                  "tasks, comma-separated: passkey, ruler (all 11), niah_single_1, ..., vt, cwe, fwe, kl")
      ->required();
  cmd->add_option("--lengths", options->lengths, "prompt lengths in tokens (4096 or 4K), comma-separated")
      ->capture_default_str();
  cmd->add_option("--samples", options->samples, "prompts per task and length (kl: windows)")
      ->check(CLI::Range(1, 1 << 20))->capture_default_str();
  cmd->add_option("--kv", options->kv, "KV formats, comma-separated")->capture_default_str();
  cmd->add_flag("--chat", options->chat, "wrap prompts in the model's chat template");
  cmd->add_option("--seed", options->seed, "seed of the generated prompts")->capture_default_str();
  cmd->add_option("--depths", options->depths, "passkey: needle depths spread evenly over 0..100%")
      ->check(CLI::Range(1, 1000))->capture_default_str();
  cmd->add_option("--haystack", options->haystack, "RULER essay haystack text")->capture_default_str();
  cmd->add_option("--words", options->words, "word list, one a line (RULER keys and common words)")->capture_default_str();
  cmd->add_option("--text", options->text, "kl: the text whose windows are compared")->capture_default_str();
  return {cmd, [&common, options](RunReport& report) { return cmd_eval(common, *options, report); }};
}

}  // namespace kvq
