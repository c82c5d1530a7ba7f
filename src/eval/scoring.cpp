// Task scorers and the accuracy summary.
#include "eval/scoring.h"

#include <cctype>
#include <cmath>

#include "core/error.h"

namespace kvq {
namespace {

std::string lowercase(std::string_view text) {
  std::string out(text);
  for (char& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

bool is_digit(char c) { return c >= '0' && c <= '9'; }

}  // namespace

std::optional<std::string> first_integer(std::string_view text) {
  size_t begin = 0;
  while (begin < text.size() && !is_digit(text[begin])) ++begin;
  if (begin == text.size()) return std::nullopt;
  size_t end = begin;
  while (end < text.size() && is_digit(text[end])) ++end;
  return std::string(text.substr(begin, end - begin));
}

double score_passkey(std::string_view generated, int64_t key) {
  const std::optional<std::string> digits = first_integer(generated);
  if (!digits) return 0.0;
  // Compared as numbers (Landmark uses int()), without overflowing on long digit runs.
  const size_t nonzero = digits->find_first_not_of('0');
  const std::string value = nonzero == std::string::npos ? "0" : digits->substr(nonzero);
  return value == std::to_string(key) ? 1.0 : 0.0;
}

double string_match_all(std::string_view prediction, std::span<const std::string> references) {
  if (references.empty()) fail("string_match_all: a prompt has no reference answer");
  const std::string haystack = lowercase(prediction);
  int found = 0;
  for (const std::string& reference : references) found += haystack.find(lowercase(reference)) != std::string::npos;
  return static_cast<double>(found) / static_cast<double>(references.size());
}

AccuracySummary summarize_scores(std::span<const double> scores) {
  AccuracySummary summary;
  const double n = static_cast<double>(scores.size());
  if (scores.empty()) return summary;
  double sum = 0;
  for (const double s : scores) sum += s;
  const double mean = sum / n;
  double squares = 0;
  for (const double s : scores) squares += (s - mean) * (s - mean);
  const double stdev = scores.size() > 1 ? std::sqrt(squares / (n - 1)) : 0.0;
  summary.accuracy = 100.0 * mean;
  summary.ci95 = 100.0 * 1.96 * stdev / std::sqrt(n);
  return summary;
}

}  // namespace kvq
