#include "core/run_report.h"

#include <unistd.h>

#include <cstdio>
#include <ctime>
#include <fstream>

#include "core/error.h"
#include "core/git_commit.h"

namespace kvq {

const char* const kKvqVersion = "0.1.0";

std::string git_commit() { return kGitCommit; }

RunReport::RunReport(std::string command, int argc, char** argv) : command_(std::move(command)) {
  argv_.assign(argv, argv + argc);
  std::time_t now = std::time(nullptr);
  char buffer[32];
  std::strftime(buffer, sizeof buffer, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  date_ = buffer;
}

nlohmann::json RunReport::to_json() const {
  char host[256] = {};
  gethostname(host, sizeof host - 1);
  return {{"command", command_}, {"argv", argv_},       {"kvq_version", kKvqVersion},
          {"git_commit", git_commit()}, {"date", date_}, {"host", host},
          {"device", device_},   {"model", model_},      {"settings", settings_},
          {"results", results_}};
}

void RunReport::write(const std::string& path) const {
  if (path.empty()) return;
  // Written beside the file and renamed over it, so a reader (or a run killed mid-write) sees the old or the new
  // object whole.
  const std::string partial = path + ".partial";
  {
    std::ofstream out(partial);
    if (!out) fail("--json: cannot write '{}'", partial);
    out << to_json().dump(2) << '\n';
    if (!out.flush()) fail("--json: writing '{}' failed", partial);
  }
  if (std::rename(partial.c_str(), path.c_str()) != 0) fail("--json: cannot rename '{}' to '{}'", partial, path);
}

}  // namespace kvq
