// The long-context generation tasks of `kvq eval` (passkey and RULER's
// synthetic tasks): what one generated prompt holds, how a task generator is
// described, and the fitting of a task's haystack to a length in tokens.
// Plain C++ over text: the token counter is passed in, so tests run without a model.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "eval/task_rng.h"

namespace kvq {

class Tokenizer;

struct TaskSample {
  std::string prompt;                   // the task text the model reads (its question included)
  std::string answer_prefix;            // follows the prompt (after the assistant turn opens, with --chat)
  std::vector<std::string> references;  // RULER: string_match_all references
  int64_t passkey = -1;                 // passkey: the key (1..50000)
  double depth = -1;                    // passkey: needle depth, 0 (start) .. 1 (end)
  int64_t haystack_units = 0;           // haystack size used (words, sentences, lines or list entries)
};

// One task: the prompt of sample `index` for a haystack of `units` units,
// drawing its randomness from `rng` only (the same rng state gives the same prompt).
struct TaskGenerator {
  int32_t max_new_tokens = 0;  // tokens generated per prompt (the source's tokens_to_generate)
  int64_t min_units = 1;       // haystack sizes searched
  int64_t max_units = 1;
  std::function<TaskSample(int64_t units, TaskRng& rng, int32_t index)> make;
};

// Tokens of a sample's whole prompt as the model reads it.
using PromptTokenCounter = std::function<int64_t(const TaskSample&)>;

// `samples` prompts of a task for `length` tokens: the haystack size is the
// largest whose first prompt leaves room for max_new_tokens within `length`
// (binary search); a sample that still does not fit shrinks its haystack.
// Sample i draws from TaskRng(derive(seed, task, length, i)). Throws when even
// the smallest haystack does not fit.
std::vector<TaskSample> build_task_samples(const std::string& task, const TaskGenerator& generator, int32_t length,
                                           int32_t samples, uint64_t seed, const PromptTokenCounter& prompt_tokens);

// The text the model reads: prompt + answer_prefix, or with `chat` the
// tokenizer's chat template around the prompt and the answer prefix (leading
// spaces dropped) opening the assistant's turn.
std::string render_prompt(const TaskSample& sample, const Tokenizer& tokenizer, bool chat);
// render_prompt tokenized, BOS first when the model asks for one.
std::vector<int32_t> encode_prompt(const TaskSample& sample, const Tokenizer& tokenizer, bool chat);

// Whitespace-separated words of a text (the essay haystack keeps its words, not its line breaks).
std::vector<std::string> split_words(const std::string& text);

}  // namespace kvq
