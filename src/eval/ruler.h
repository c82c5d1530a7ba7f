// RULER's synthetic tasks (NVIDIA/RULER, scripts/synthetic.yaml and
// scripts/data/synthetic/*.py): niah_single_1/2/3, niah_multikey_1/2/3,
// niah_multivalue, niah_multiquery, vt, cwe, fwe, with their templates, needle
// counts, haystack kinds, answer prefixes and tokens to generate; scored by
// string_match_all. Where ours must differ (docs/EVAL.md): the essay haystack is
// the Austen haystack split, key words and common words come from the wamerican
// word list, and the random draws are ours (TaskRng), not Python's.
#pragma once

#include <string>
#include <vector>

#include "eval/tasks.h"

namespace kvq {

// What the generators draw from.
class RulerSources {
 public:
  // haystack_text: the essay haystack (data/haystack.txt); word_list: one word
  // a line (wamerican's american-english): kept are words of 3..10 lowercase ASCII letters.
  RulerSources(const std::string& haystack_text, const std::string& word_list);

  const std::vector<std::string>& haystack_words() const { return haystack_words_; }
  // (haystack_words) true where a word ends a sentence.
  const std::vector<bool>& sentence_ends() const { return sentence_ends_; }
  // The haystack's sentences, whole.
  const std::vector<std::string>& sentences() const { return sentences_; }
  const std::vector<std::string>& words() const { return words_; }

 private:
  std::vector<std::string> haystack_words_;
  std::vector<bool> sentence_ends_;
  std::vector<std::string> sentences_;
  std::vector<std::string> words_;
};

// The 11 task names, in RULER's order.
const std::vector<std::string>& ruler_task_names();
bool is_ruler_task(const std::string& name);

// Sentences of words[0, n): a sentence ends after a word ending in . ! or ?
// (closing quotes and brackets aside) that is not a title such as "Mr."; the
// last sentence may be unfinished.
std::vector<std::string> split_sentences(const std::vector<std::string>& words, const std::vector<bool>& ends,
                                         size_t n);
std::vector<bool> find_sentence_ends(const std::vector<std::string>& words);

// `sources` must outlive the generator. vt fits its in-context example to 500
// tokens with `prompt_tokens`, as RULER does.
TaskGenerator ruler_generator(const std::string& task, int32_t length, const RulerSources& sources,
                              const PromptTokenCounter& prompt_tokens);

}  // namespace kvq
