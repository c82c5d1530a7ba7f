// kvq info (the model's metadata, shapes, tensor types, GPUs) and kvq tokenize.
#include "cli.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "core/error.h"
#include "model/llama.h"
#ifdef KVQ_HAS_CUDA
#include "cuda/device.h"
#endif

namespace kvq {
namespace {

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

}  // namespace

Command add_info_command(CLI::App& app, CommonOptions& common) {
  CLI::App* cmd = app.add_subcommand("info", "show the model's metadata, shapes and tensor types");
  add_common(*cmd, common);
  return {cmd, [&common](RunReport& report) { return cmd_info(common, report); }};
}

Command add_tokenize_command(CLI::App& app, CommonOptions& common) {
  CLI::App* cmd = app.add_subcommand("tokenize", "print the token ids of a text as JSON");
  add_common(*cmd, common);
  struct TokenizeOptions {
    std::string prompt, file;
    bool special = false;
  };
  auto options = std::make_shared<TokenizeOptions>();
  cmd->add_option("-p,--prompt", options->prompt, "text");
  cmd->add_option("-f,--file", options->file, "text file")->check(CLI::ExistingFile);
  cmd->add_flag("--special", options->special, "match special-token text such as <|im_start|>");
  return {cmd, [&common, options](RunReport& report) {
            if (options->prompt.empty() == options->file.empty()) {
              throw UsageError("kvq tokenize needs exactly one of -p TEXT or -f FILE");
            }
            return cmd_tokenize(common, options->prompt, options->file, options->special, report);
          }};
}

}  // namespace kvq
