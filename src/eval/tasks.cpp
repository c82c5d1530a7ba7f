// Haystack fitting and prompt rendering shared by the passkey and RULER generators.
#include "eval/tasks.h"

#include <algorithm>
#include <sstream>

#include "core/error.h"
#include "tokenizer/tokenizer.h"

namespace kvq {

std::vector<TaskSample> build_task_samples(const std::string& task, const TaskGenerator& generator, int32_t length,
                                           int32_t samples, uint64_t seed, const PromptTokenCounter& prompt_tokens) {
  auto make = [&](int64_t units, int32_t index) {
    TaskRng rng(TaskRng::derive(seed, task, length, index));
    TaskSample sample = generator.make(units, rng, index);
    sample.haystack_units = units;
    return sample;
  };
  auto fits = [&](const TaskSample& sample) { return prompt_tokens(sample) + generator.max_new_tokens <= length; };

  int64_t lo = generator.min_units, hi = generator.max_units;
  if (!fits(make(lo, 0))) {
    fail("{} at {} tokens: even the smallest haystack does not leave room for {} generated tokens; use a longer length",
         task, length, generator.max_new_tokens);
  }
  while (lo < hi) {  // the largest size whose first prompt fits
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (fits(make(mid, 0))) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }

  std::vector<TaskSample> result;
  result.reserve(static_cast<size_t>(samples));
  for (int32_t i = 0; i < samples; ++i) {
    int64_t units = lo;
    TaskSample sample = make(units, i);
    // Other draws (longer keys, needles at other depths) can make a prompt a few tokens longer.
    while (!fits(sample)) {
      if (units == generator.min_units) fail("{} at {} tokens: sample {} does not fit", task, length, i + 1);
      units = std::max(generator.min_units, units - std::max<int64_t>(1, units / 100));
      sample = make(units, i);
    }
    result.push_back(std::move(sample));
  }
  return result;
}

std::string render_prompt(const TaskSample& sample, const Tokenizer& tokenizer, bool chat) {
  if (!chat) return sample.prompt + sample.answer_prefix;
  const size_t start = sample.answer_prefix.find_first_not_of(' ');
  return tokenizer.apply_chat_template(sample.prompt) +
         (start == std::string::npos ? std::string() : sample.answer_prefix.substr(start));
}

std::vector<int32_t> encode_prompt(const TaskSample& sample, const Tokenizer& tokenizer, bool chat) {
  std::vector<int32_t> ids;
  if (tokenizer.add_bos()) ids.push_back(tokenizer.bos_id());
  const std::vector<int32_t> text = tokenizer.encode(render_prompt(sample, tokenizer, chat), chat);
  ids.insert(ids.end(), text.begin(), text.end());
  return ids;
}

std::vector<std::string> split_words(const std::string& text) {
  std::vector<std::string> words;
  std::istringstream stream(text);
  for (std::string word; stream >> word;) words.push_back(std::move(word));
  return words;
}

}  // namespace kvq
