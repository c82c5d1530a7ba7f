// Scorers of the long-context tasks, as their sources define them, and the
// summary of per-prompt scores (accuracy in percent with a 95% interval).
#pragma once

#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace kvq {

// The first run of decimal digits in `text` (Landmark attention's passkey
// check reads the first integer of the answer), or nothing.
std::optional<std::string> first_integer(std::string_view text);

// Passkey: 1 when the first integer of the generated text equals `key`, else 0.
double score_passkey(std::string_view generated, int64_t key);

// RULER's string_match_all: the fraction of references found in the
// prediction, each compared case-insensitively as a substring.
double string_match_all(std::string_view prediction, std::span<const std::string> references);

struct AccuracySummary {
  double accuracy = 0;  // mean score x 100
  double ci95 = 0;      // half-width, normal approximation: 1.96 x sample stdev / sqrt(n), x 100
};
AccuracySummary summarize_scores(std::span<const double> scores);

}  // namespace kvq
