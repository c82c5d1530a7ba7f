// kvq calibrate: fit the KV quantization ranges and codebooks on a text (CPU).
#include "cli.h"

#include <omp.h>

#include <chrono>
#include <filesystem>
#include <map>
#include <optional>

#include <fmt/format.h>

#include "calib/calibrate.h"
#include "core/progress.h"

namespace kvq {
namespace {

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

}  // namespace

Command add_calibrate_command(CLI::App& app, CommonOptions& common) {
  CLI::App* cmd = app.add_subcommand("calibrate", "fit KV quantization ranges and codebooks on a text");
  add_common(*cmd, common);
  auto options = std::make_shared<CalibrateCliOptions>();
  cmd->add_option("-f,--file", options->file, "calibration text")->required()->check(CLI::ExistingFile);
  cmd->add_option("--samples", options->options.samples, "samples of --ctx tokens")->check(CLI::Range(1, 1 << 16))->capture_default_str();
  cmd->add_option("--ctx", options->options.ctx, "tokens per sample")->check(CLI::Range(2, 1 << 24))->capture_default_str();
  cmd->add_option("--bits", options->options.bits, "code widths")->delimiter(',')->capture_default_str();
  cmd->add_option("--outliers", options->options.outliers, "outlier fractions")->delimiter(',')->capture_default_str();
  cmd->add_option("--sensitivity", options->sensitivity, "k-means weights: fisher or none")
      ->check(CLI::IsMember({"fisher", "none"}))->capture_default_str();
  cmd->add_option("--seed", options->options.seed, "seed of the sample positions")->capture_default_str();
  cmd->add_option("-o,--output", options->output, "output file (default: beside the model)");
  return {cmd, [&common, options](RunReport& report) { return cmd_calibrate(common, *options, report); }};
}

}  // namespace kvq
