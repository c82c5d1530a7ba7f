#include "core/progress.h"

#include <unistd.h>

#include <cstdio>

#include <fmt/format.h>

namespace kvq {

ProgressBar::ProgressBar(std::string label)
    : label_(std::move(label)),
      terminal_(isatty(STDERR_FILENO) != 0),
      start_(std::chrono::steady_clock::now()) {}

void ProgressBar::update(int64_t done, int64_t total) {
  const double fraction = total > 0 ? static_cast<double>(done) / static_cast<double>(total) : 1.0;
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double eta = fraction > 0 ? elapsed * (1 - fraction) / fraction : 0;
  if (terminal_) {
    constexpr int kWidth = 30;
    const int filled = static_cast<int>(fraction * kWidth);
    fmt::print(stderr, "\r{} [{}{}] {}/{} {:.0f}s elapsed, {:.0f}s left ", label_, std::string(filled, '#'),
               std::string(kWidth - filled, '.'), done, total, elapsed, eta);
    if (done >= total) fmt::print(stderr, "\n");
  } else {
    const int decile = static_cast<int>(fraction * 10);
    if (decile != last_decile_) {
      fmt::print(stderr, "{}: {}/{} ({:.0f}%) {:.0f}s elapsed, {:.0f}s left\n", label_, done, total, fraction * 100,
                 elapsed, eta);
      last_decile_ = decile;
    }
  }
  std::fflush(stderr);
}

}  // namespace kvq
