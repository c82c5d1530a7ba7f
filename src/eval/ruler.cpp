// RULER's synthetic task generators, written from the task definitions (see ruler.h).
#include "eval/ruler.h"

#include <algorithm>
#include <cmath>
#include <numbers>
#include <sstream>

#include <fmt/format.h>

#include "core/error.h"

namespace kvq {
namespace {

constexpr const char* kRepeatHaystack =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";

enum class Haystack { repeat, essay, needle };
enum class NeedleKind { numbers, words, uuids };

struct NiahConfig {
  Haystack haystack;
  NeedleKind key;
  NeedleKind value;
  int num_keys = 1;     // needles' keys (RULER: max(num_needle_k, num_needle_q))
  int num_values = 1;   // values per key
  int num_queries = 1;  // keys asked for
};

// scripts/synthetic.yaml
NiahConfig niah_config(const std::string& task) {
  using H = Haystack;
  using N = NeedleKind;
  if (task == "niah_single_1") return {H::repeat, N::words, N::numbers};
  if (task == "niah_single_2") return {H::essay, N::words, N::numbers};
  if (task == "niah_single_3") return {H::essay, N::words, N::uuids};
  if (task == "niah_multikey_1") return {H::essay, N::words, N::numbers, 4};
  if (task == "niah_multikey_2") return {H::needle, N::words, N::numbers};
  if (task == "niah_multikey_3") return {H::needle, N::uuids, N::uuids};
  if (task == "niah_multivalue") return {H::essay, N::words, N::numbers, 1, 4};
  if (task == "niah_multiquery") return {H::essay, N::words, N::numbers, 4, 1, 4};
  fail("unknown RULER task '{}'", task);
}

const char* plural_name(NeedleKind kind) {
  switch (kind) {
    case NeedleKind::numbers: return "numbers";
    case NeedleKind::words: return "words";
    case NeedleKind::uuids: return "uuids";
  }
  return "";
}

std::string join(const std::vector<std::string>& parts, std::string_view separator) {
  std::string out;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (i > 0) out += separator;
    out += parts[i];
  }
  return out;
}

std::string random_needle_text(NeedleKind kind, TaskRng& rng, const RulerSources& sources) {
  switch (kind) {
    case NeedleKind::numbers: return std::to_string(rng.uniform(1000000, 9999999));  // 7 digits
    case NeedleKind::words: {
      // RULER joins a random adjective and noun ("adj-noun"); the word list has no parts of speech.
      const auto& words = sources.words();
      const int64_t last = static_cast<int64_t>(words.size()) - 1;
      const std::string& first = words[static_cast<size_t>(rng.uniform(0, last))];
      return first + "-" + words[static_cast<size_t>(rng.uniform(0, last))];
    }
    case NeedleKind::uuids: {  // version 4, variant 1, lowercase
      uint64_t hi = rng.next(), lo = rng.next();
      hi = (hi & ~0xf000ull) | 0x4000ull;
      lo = (lo & ~(0xc000ull << 48)) | (0x8000ull << 48);
      const std::string hex = fmt::format("{:016x}{:016x}", hi, lo);
      return fmt::format("{}-{}-{}-{}-{}", hex.substr(0, 8), hex.substr(8, 4), hex.substr(12, 4), hex.substr(16, 4),
                         hex.substr(20));
    }
  }
  return "";
}

std::string needle_sentence(NeedleKind value_kind, const std::string& key, const std::string& value) {
  return fmt::format("One of the special magic {} for {} is: {}.", plural_name(value_kind), key, value);
}

// Inserts `items` into `lines` at distinct random line indices (RULER: sorted
// descending, inserted in that order so earlier inserts do not shift later ones).
void insert_at_random_lines(std::vector<std::string>& lines, const std::vector<std::string>& items, TaskRng& rng) {
  std::vector<int64_t> indices = rng.sample(static_cast<int64_t>(lines.size()), static_cast<int64_t>(items.size()));
  std::sort(indices.rbegin(), indices.rend());
  for (size_t i = 0; i < items.size(); ++i) lines.insert(lines.begin() + indices[i], items[i]);
}

// RULER's depths: round(linspace(0, 100, 40)).
std::vector<int> niah_depths() {
  std::vector<int> depths;
  for (int i = 0; i < 40; ++i) depths.push_back(static_cast<int>(std::lround(100.0 * i / 39.0)));
  return depths;
}

TaskSample make_niah(const NiahConfig& c, int64_t units, TaskRng& rng, const RulerSources& sources) {
  std::vector<std::string> keys, needles;
  std::vector<std::vector<std::string>> values;
  for (int k = 0; k < c.num_keys; ++k) {
    keys.push_back(random_needle_text(c.key, rng, sources));
    values.emplace_back();
    for (int v = 0; v < c.num_values; ++v) {
      values.back().push_back(random_needle_text(c.value, rng, sources));
      needles.push_back(needle_sentence(c.value, keys.back(), values.back().back()));
    }
  }
  rng.shuffle(needles);

  std::string context;
  if (c.haystack == Haystack::essay) {
    // Needles go between sentences of the haystack's first `units` words, at depths drawn from RULER's 40.
    const std::vector<std::string> sentences =
        split_sentences(sources.haystack_words(), sources.sentence_ends(), static_cast<size_t>(units));
    const std::vector<int> depths = niah_depths();
    std::vector<int64_t> cuts;
    for (const int64_t d : rng.sample(static_cast<int64_t>(depths.size()), static_cast<int64_t>(needles.size()))) {
      cuts.push_back(static_cast<int64_t>(sentences.size()) * depths[static_cast<size_t>(d)] / 100);
    }
    std::sort(cuts.begin(), cuts.end());
    cuts.push_back(static_cast<int64_t>(sentences.size()));
    std::vector<std::string> parts;
    int64_t begin = 0;
    for (size_t i = 0; i < cuts.size(); ++i) {
      if (cuts[i] > begin) {
        parts.push_back(join(std::vector<std::string>(sentences.begin() + begin, sentences.begin() + cuts[i]), " "));
      }
      if (i < needles.size()) parts.push_back(needles[i]);
      begin = cuts[i];
    }
    context = join(parts, " ");
  } else {
    std::vector<std::string> lines;
    for (int64_t i = 0; i < units; ++i) {
      if (c.haystack == Haystack::repeat) {
        lines.emplace_back(kRepeatHaystack);
      } else {  // distractor needles with keys and values of their own
        const std::string key = random_needle_text(c.key, rng, sources);
        lines.push_back(needle_sentence(c.value, key, random_needle_text(c.value, rng, sources)));
      }
    }
    insert_at_random_lines(lines, needles, rng);
    context = join(lines, "\n");
  }

  TaskSample sample;
  std::vector<std::string> queries;
  for (const int64_t k : rng.sample(c.num_keys, c.num_queries)) {
    queries.push_back(keys[static_cast<size_t>(k)]);
    for (const std::string& v : values[static_cast<size_t>(k)]) sample.references.push_back(v);
  }
  const std::string query =
      queries.size() == 1
          ? queries[0]
          : join(std::vector<std::string>(queries.begin(), queries.end() - 1), ", ") + ", and " + queries.back();
  // RULER turns the template singular ("Some ... are" -> "A ... is", "numbers" -> "number") for a single answer.
  if (c.num_queries * c.num_values == 1) {
    std::string kind = plural_name(c.value);
    kind.pop_back();
    sample.prompt = fmt::format(
        "A special magic {0} is hidden within the following text. Make sure to memorize it. I will quiz you about the "
        "{0} afterwards.\n{1}\nWhat is the special magic {0} for {2} mentioned in the provided text?",
        kind, context, query);
    sample.answer_prefix = fmt::format(" The special magic {} for {} mentioned in the provided text is", kind, query);
  } else {
    const char* kind = plural_name(c.value);
    sample.prompt = fmt::format(
        "Some special magic {0} are hidden within the following text. Make sure to memorize it. I will quiz you about "
        "the {0} afterwards.\n{1}\nWhat are all the special magic {0} for {2} mentioned in the provided text?",
        kind, context, query);
    sample.answer_prefix = fmt::format(" The special magic {} for {} mentioned in the provided text are", kind, query);
  }
  return sample;
}

// --- vt: variable tracking ---------------------------------------------------

constexpr int kVtHops = 4;  // one chain of 5 variables
constexpr int32_t kVtNewTokens = 30;
constexpr int32_t kVtExampleTokens = 500;  // RULER's budget for the in-context example

std::string vt_prompt(const std::string& context, const std::string& value) {
  return fmt::format(
      "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{}\nQuestion: Find all "
      "variables that are assigned the value {} in the text above.",
      context, value);
}

std::string vt_answer_prefix(const std::string& value) {
  // "assgined" is RULER's spelling.
  return fmt::format(
      " Answer: According to the chain(s) of variable assignment in the text above, {} variables are assgined the "
      "value {}, they are: ",
      kVtHops + 1, value);
}

struct VtChain {
  std::vector<std::string> variables;   // (kVtHops + 1) names, first assigned the value
  std::vector<std::string> statements;  // "VAR A = 12345", "VAR B = VAR A", ...
  std::string value;
};

VtChain make_vt_chain(int name_letters, TaskRng& rng) {
  VtChain chain;
  while (static_cast<int>(chain.variables.size()) < kVtHops + 1) {
    std::string name;
    for (int i = 0; i < name_letters; ++i) name += static_cast<char>('A' + rng.uniform(0, 25));
    if (std::find(chain.variables.begin(), chain.variables.end(), name) == chain.variables.end()) {
      chain.variables.push_back(name);
    }
  }
  chain.value = std::to_string(rng.uniform(10000, 99998));  // numpy randint(10000, 99999)
  chain.statements.push_back(fmt::format("VAR {} = {}", chain.variables[0], chain.value));
  for (int j = 0; j < kVtHops; ++j) {
    chain.statements.push_back(fmt::format("VAR {} = VAR {}", chain.variables[j + 1], chain.variables[j]));
  }
  return chain;
}

// The chain's statements between the haystack's first `units` sentences, one a line.
std::string vt_context(const VtChain& chain, int64_t units, TaskRng& rng, const RulerSources& sources) {
  std::vector<std::string> lines(sources.sentences().begin(), sources.sentences().begin() + units);
  std::vector<int64_t> slots = rng.sample(units, static_cast<int64_t>(chain.statements.size()));
  std::sort(slots.begin(), slots.end());
  for (size_t j = 0; j < slots.size(); ++j) {
    lines.insert(lines.begin() + slots[j] + static_cast<int64_t>(j), chain.statements[j]);
  }
  return join(lines, "\n");
}

// The in-context example: 3-letter names, answered, then a blank line.
std::string vt_example(int64_t units, TaskRng& rng, const RulerSources& sources) {
  const VtChain chain = make_vt_chain(3, rng);
  return vt_prompt(vt_context(chain, units, rng, sources), chain.value) + vt_answer_prefix(chain.value) +
         join(chain.variables, " ") + "\n\n";
}

TaskGenerator vt_generator(int32_t length, const RulerSources& sources, const PromptTokenCounter& prompt_tokens) {
  const int64_t sentences = static_cast<int64_t>(sources.sentences().size());
  if (sentences < kVtHops + 1) fail("vt: the haystack has {} sentences, fewer than a chain", sentences);
  // The example's haystack: the most sentences that keep it within RULER's 500 tokens.
  int64_t example_units = kVtHops + 1;
  for (int64_t units = example_units; units <= std::min<int64_t>(sentences, kVtExampleTokens); ++units) {
    TaskRng probe(0);
    TaskSample example;
    example.prompt = vt_example(units, probe, sources);
    if (prompt_tokens(example) + kVtNewTokens > kVtExampleTokens) break;
    example_units = units;
  }
  TaskGenerator generator;
  generator.max_new_tokens = kVtNewTokens;
  generator.min_units = kVtHops + 1;
  generator.max_units = std::min<int64_t>(sentences, std::max(generator.min_units, int64_t{length}));
  generator.make = [&sources, example_units](int64_t units, TaskRng& rng, int32_t) {
    TaskSample sample;
    const std::string example = vt_example(example_units, rng, sources);
    const VtChain chain = make_vt_chain(5, rng);
    sample.prompt = example + vt_prompt(vt_context(chain, units, rng, sources), chain.value);
    sample.answer_prefix = vt_answer_prefix(chain.value);
    sample.references = chain.variables;
    return sample;
  };
  return generator;
}

// --- cwe: common words extraction ----------------------------------------------

constexpr int kCweCommon = 10;

std::string cwe_prompt(const std::string& context) {
  return fmt::format(
      "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones that "
      "appear most often.\n{}\nQuestion: What are the 10 most common words in the above list?",
      context);
}
constexpr const char* kCweAnswerPrefix = " Answer: The top 10 words that appear most often in the list are:";

std::string numbered(const std::vector<std::string>& words) {
  std::vector<std::string> items;
  for (size_t i = 0; i < words.size(); ++i) items.push_back(fmt::format("{}. {}", i + 1, words[i]));
  return join(items, " ");
}

// `distinct` words: the first 10 repeated `common_repeats` times, the rest
// `rare_repeats` times, shuffled and numbered; returns the list and the 10.
std::pair<std::string, std::vector<std::string>> cwe_list(int64_t distinct, int common_repeats, int rare_repeats,
                                                          TaskRng& rng, const RulerSources& sources) {
  std::vector<std::string> chosen;
  for (const int64_t i : rng.sample(static_cast<int64_t>(sources.words().size()), distinct)) {
    chosen.push_back(sources.words()[static_cast<size_t>(i)]);
  }
  std::vector<std::string> list;
  for (size_t i = 0; i < chosen.size(); ++i) {
    list.insert(list.end(), i < kCweCommon ? common_repeats : rare_repeats, chosen[i]);
  }
  rng.shuffle(list);
  chosen.resize(kCweCommon);
  return {numbered(list), chosen};
}

TaskGenerator cwe_generator(int32_t length, const RulerSources& sources) {
  // RULER's repeats: below 4096 tokens common words 6x and the rest once (the example 3x/1x of 20 words),
  // from 4096 on 30x and 3x (the example 10x/3x of 40 words).
  const bool short_context = length < 4096;
  TaskGenerator generator;
  generator.max_new_tokens = 120;
  generator.min_units = kCweCommon + 1;
  generator.max_units = std::min<int64_t>(static_cast<int64_t>(sources.words().size()), std::max(length, 2 * kCweCommon));
  generator.make = [&sources, short_context](int64_t units, TaskRng& rng, int32_t) {
    const auto [example_list, example_answer] =
        short_context ? cwe_list(20, 3, 1, rng, sources) : cwe_list(40, 10, 3, rng, sources);
    const auto [list, answer] =
        short_context ? cwe_list(units, 6, 1, rng, sources) : cwe_list(units, 30, 3, rng, sources);
    TaskSample sample;
    sample.prompt = cwe_prompt(example_list) + kCweAnswerPrefix + " " + numbered(example_answer) + "\n" + cwe_prompt(list);
    sample.answer_prefix = kCweAnswerPrefix;
    sample.references = answer;
    return sample;
  };
  return generator;
}

// --- fwe: frequent words extraction --------------------------------------------

constexpr double kFweAlpha = 2.0;
constexpr int kFweWordLetters = 6;

TaskGenerator fwe_generator(int32_t length) {
  const int64_t vocab_size = std::max(length / 50, 8);  // RULER: max_seq_length // 50
  TaskGenerator generator;
  generator.max_new_tokens = 50;
  generator.min_units = 16;  // enough that rank 3 appears at least once
  generator.max_units = std::max<int64_t>(generator.min_units, 2 * int64_t{length});
  generator.make = [vocab_size](int64_t units, TaskRng& rng, int32_t) {
    std::vector<std::string> vocab;
    while (static_cast<int64_t>(vocab.size()) < vocab_size) {
      std::string word;
      for (int i = 0; i < kFweWordLetters; ++i) word += static_cast<char>('a' + rng.uniform(0, 25));
      if (std::find(vocab.begin(), vocab.end(), word) == vocab.end()) vocab.push_back(word);
    }
    vocab[0] = "...";  // the most frequent "word" is noise
    // Zipf: rank k appears floor(units * k^-alpha / zeta(alpha)) times.
    const double zeta2 = std::numbers::pi * std::numbers::pi / 6.0;
    std::vector<std::string> text;
    for (int64_t k = 1; k <= vocab_size; ++k) {
      const double expected = static_cast<double>(units) * std::pow(static_cast<double>(k), -kFweAlpha) / zeta2;
      const auto count = static_cast<int64_t>(expected);
      text.insert(text.end(), static_cast<size_t>(count), vocab[static_cast<size_t>(k - 1)]);
    }
    rng.shuffle(text);
    TaskSample sample;
    sample.prompt = fmt::format(
        "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
        "appeared coded words. {}\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are "
        "the three most frequently appeared words in the above coded text?",
        join(text, " "));
    sample.answer_prefix = " Answer: According to the coded text above, the three most frequently appeared words are:";
    sample.references = {vocab[1], vocab[2], vocab[3]};
    return sample;
  };
  return generator;
}

bool is_title(const std::string& word) {
  static const std::vector<std::string> titles = {"Mr.", "Mrs.", "Ms.", "Dr.", "St.", "Messrs.", "Esq."};
  return std::find(titles.begin(), titles.end(), word) != titles.end();
}

}  // namespace

std::vector<bool> find_sentence_ends(const std::vector<std::string>& words) {
  std::vector<bool> ends(words.size(), false);
  for (size_t i = 0; i < words.size(); ++i) {
    const std::string& w = words[i];
    const size_t last = w.find_last_not_of("\"')]_");
    ends[i] = last != std::string::npos && (w[last] == '.' || w[last] == '!' || w[last] == '?') && !is_title(w);
  }
  return ends;
}

std::vector<std::string> split_sentences(const std::vector<std::string>& words, const std::vector<bool>& ends,
                                         size_t n) {
  std::vector<std::string> sentences;
  std::string current;
  for (size_t i = 0; i < std::min(n, words.size()); ++i) {
    if (!current.empty()) current += ' ';
    current += words[i];
    if (ends[i]) {
      sentences.push_back(current);
      current.clear();
    }
  }
  if (!current.empty()) sentences.push_back(current);
  return sentences;
}

RulerSources::RulerSources(const std::string& haystack_text, const std::string& word_list)
    : haystack_words_(split_words(haystack_text)), sentence_ends_(find_sentence_ends(haystack_words_)) {
  sentences_ = split_sentences(haystack_words_, sentence_ends_, haystack_words_.size());
  std::istringstream lines(word_list);
  for (std::string word; std::getline(lines, word);) {
    const bool lowercase_letters = std::all_of(word.begin(), word.end(), [](char c) { return c >= 'a' && c <= 'z'; });
    if (lowercase_letters && word.size() >= 3 && word.size() <= 10) words_.push_back(word);
  }
  std::sort(words_.begin(), words_.end());
  words_.erase(std::unique(words_.begin(), words_.end()), words_.end());
  if (haystack_words_.empty()) fail("the haystack text is empty");
  if (words_.size() < 1000) {
    fail("the word list has {} usable words (3-10 lowercase letters); expected a dictionary", words_.size());
  }
}

const std::vector<std::string>& ruler_task_names() {
  static const std::vector<std::string> names = {
      "niah_single_1",   "niah_single_2",   "niah_single_3",   "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
      "niah_multivalue", "niah_multiquery", "vt",              "cwe",             "fwe"};
  return names;
}

bool is_ruler_task(const std::string& name) {
  const auto& names = ruler_task_names();
  return std::find(names.begin(), names.end(), name) != names.end();
}

TaskGenerator ruler_generator(const std::string& task, int32_t length, const RulerSources& sources,
                              const PromptTokenCounter& prompt_tokens) {
  if (task == "vt") return vt_generator(length, sources, prompt_tokens);
  if (task == "cwe") return cwe_generator(length, sources);
  if (task == "fwe") return fwe_generator(length);
  const NiahConfig config = niah_config(task);
  TaskGenerator generator;
  generator.max_new_tokens = 128;
  const int64_t needles = int64_t{config.num_keys} * config.num_values;
  if (config.haystack == Haystack::essay) {
    generator.min_units = 1;
    generator.max_units = std::min<int64_t>(static_cast<int64_t>(sources.haystack_words().size()), 4 * int64_t{length});
  } else {
    generator.min_units = needles;
    generator.max_units = std::max<int64_t>(needles, length);
  }
  generator.make = [config, &sources](int64_t units, TaskRng& rng, int32_t) {
    return make_niah(config, units, rng, sources);
  };
  return generator;
}

}  // namespace kvq
