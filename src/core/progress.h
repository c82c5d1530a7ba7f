// Progress display on stderr for long work: a redrawn bar on a terminal,
// a line every 10% otherwise (logs stay readable).
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace kvq {

class ProgressBar {
 public:
  explicit ProgressBar(std::string label);
  void update(int64_t done, int64_t total);  // done == total prints the last line
 private:
  std::string label_;
  bool terminal_;
  int last_decile_ = -1;
  std::chrono::steady_clock::time_point start_;
};

}  // namespace kvq
