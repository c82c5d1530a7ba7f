// The passkey prompt (Landmark attention's text, whole filler sentences).
#include "eval/passkey.h"

#include <cmath>

#include <fmt/format.h>

#include "core/error.h"

namespace kvq {
namespace {

constexpr const char* kInstruction =
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you "
    "about the important information there.";
constexpr const char* kFiller = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
constexpr const char* kQuestion = "What is the pass key?";
constexpr const char* kAnswerPrefix = " The pass key is";
constexpr int64_t kMaxKey = 50000;

std::string repeat_filler(int64_t times) {
  std::string text;
  for (int64_t i = 0; i < times; ++i) {
    if (i > 0) text += ' ';
    text += kFiller;
  }
  return text;
}

}  // namespace

TaskGenerator passkey_generator(int32_t depths, int32_t length) {
  if (depths < 1) fail("--depths must be at least 1, got {}", depths);
  TaskGenerator generator;
  generator.max_new_tokens = kPasskeyNewTokens;
  generator.min_units = 1;
  generator.max_units = std::max(1, length);  // one filler repetition is ~20 tokens
  generator.make = [depths](int64_t units, TaskRng& rng, int32_t index) {
    TaskSample sample;
    sample.passkey = rng.uniform(1, kMaxKey);
    sample.depth = depths == 1 ? 0.5 : static_cast<double>(index % depths) / (depths - 1);
    const int64_t before = std::llround(sample.depth * static_cast<double>(units));
    const std::string needle = fmt::format("The pass key is {0}. Remember it. {0} is the pass key.", sample.passkey);
    // Landmark joins the five parts with newlines (an empty filler part leaves an empty line).
    sample.prompt = fmt::format("{}\n{}\n{}\n{}\n{}", kInstruction, repeat_filler(before), needle,
                                repeat_filler(units - before), kQuestion);
    sample.answer_prefix = kAnswerPrefix;
    return sample;
  };
  return generator;
}

}  // namespace kvq
