// kvq: the single binary. Each subcommand lives in its cmd_*.cpp; this file
// registers them, parses the command line and turns library errors into
// "kvq: error: ..." with exit status 1 (usage: 2).
#include <new>

#include <fmt/format.h>

#include "cli.h"
#include "core/error.h"
#include "cpu/blas_kernels.h"

namespace kvq {
namespace {

int run_main(int argc, char** argv) {
  CLI::App app{"kvq: LLM inference with a quantized, paged KV cache"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string(kKvqVersion) + " (" + git_commit() + ")");
  CommonOptions common;
  const std::vector<Command> commands = {
      add_info_command(app, common),      add_tokenize_command(app, common), add_run_command(app, common),
      add_ppl_command(app, common),       add_calibrate_command(app, common), add_bench_command(app, common),
      add_eval_command(app, common),
  };

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

  const CLI::App* chosen = app.get_subcommands().front();
  RunReport report(chosen->get_name(), argc, argv);
  int status = 0;
  for (const Command& command : commands) {
    if (command.app == chosen) status = command.run(report);
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
