// kvq eval's task generators and scorers without a model: prompts are the same
// for the same seed, hand-checked for small cases (needle, depth, question,
// answer prefix, references), fitted to the length by a stand-in token counter
// (words), and the scorers are right on right, partly right, wrong and empty outputs.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <regex>
#include <string>
#include <vector>

#include "cpu/cpu_backend.h"
#include "engine/step_batch.h"
#include "eval/kl.h"
#include "eval/perplexity.h"
#include "kv/kv_format.h"
#include "kv/page_tables.h"
#include "tiny_model.h"
#include "eval/passkey.h"
#include "eval/ruler.h"
#include "eval/scoring.h"
#include "eval/task_rng.h"
#include "eval/tasks.h"

namespace kvq {
namespace {

// A token is a whitespace-separated word here: enough to test fitting.
const PromptTokenCounter kWords = [](const TaskSample& s) {
  return static_cast<int64_t>(split_words(s.prompt + s.answer_prefix).size());
};

constexpr const char* kFiller = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
constexpr const char* kHaystack =
    "First sentence here. Mr. Brown said hello! Is it so? Yes it is. The end came. Then more words follow here. "
    "And again.";

// 3-letter words aaa..zzb: 1352 of them, all kept by RulerSources.
std::string synthetic_word_list() {
  std::string list;
  for (char a = 'a'; a <= 'z'; ++a) {
    for (char b = 'a'; b <= 'z'; ++b) {
      for (char c = 'a'; c <= 'b'; ++c) list += std::string{a, b, c, '\n'};
    }
  }
  return list + "Capital\napostrophe's\nab\n";  // dropped: capitals, apostrophes, fewer than 3 letters
}

size_t count(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
}

TEST(TaskRng, SameSeedSameDrawsAndBounds) {
  TaskRng a(7), b(7), c(8);
  std::vector<int64_t> draws_a, draws_b, draws_c;
  for (int i = 0; i < 1000; ++i) {
    draws_a.push_back(a.uniform(-3, 5));
    draws_b.push_back(b.uniform(-3, 5));
    draws_c.push_back(c.uniform(-3, 5));
  }
  EXPECT_EQ(draws_a, draws_b);
  EXPECT_NE(draws_a, draws_c);
  EXPECT_EQ(*std::min_element(draws_a.begin(), draws_a.end()), -3);
  EXPECT_EQ(*std::max_element(draws_a.begin(), draws_a.end()), 5);
  std::vector<int64_t> sample = a.sample(10, 10);
  std::sort(sample.begin(), sample.end());
  for (int64_t i = 0; i < 10; ++i) EXPECT_EQ(sample[static_cast<size_t>(i)], i);
  EXPECT_NE(TaskRng::derive(42, "passkey", 1024, 0), TaskRng::derive(42, "passkey", 1024, 1));
  EXPECT_NE(TaskRng::derive(42, "passkey", 1024, 0), TaskRng::derive(42, "niah_single_1", 1024, 0));
}

TEST(Passkey, HandCheckedPromptsAtEachDepth) {
  const TaskGenerator generator = passkey_generator(3, 100);
  EXPECT_EQ(generator.max_new_tokens, 10);
  const std::vector<TaskSample> samples = build_task_samples("passkey", generator, 100, 3, 42, kWords);
  ASSERT_EQ(samples.size(), 3u);
  const std::string instruction =
      "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz you "
      "about the important information there.\n";
  const std::string filler = kFiller;
  // The filler of 100 words less the rest fits twice (2 x 18 + 24 + 10 generated <= 100; 3 x 18 would not).
  for (const TaskSample& s : samples) {
    EXPECT_EQ(s.haystack_units, 2);
    EXPECT_GE(s.passkey, 1);
    EXPECT_LE(s.passkey, 50000);
    EXPECT_EQ(s.answer_prefix, " The pass key is");
    EXPECT_LE(kWords(s) + 10, 100);
  }
  const auto needle = [](int64_t k) {
    return "The pass key is " + std::to_string(k) + ". Remember it. " + std::to_string(k) + " is the pass key.\n";
  };
  EXPECT_DOUBLE_EQ(samples[0].depth, 0.0);
  EXPECT_EQ(samples[0].prompt, instruction + "\n" + needle(samples[0].passkey) + filler + " " + filler +
                                   "\nWhat is the pass key?");
  EXPECT_DOUBLE_EQ(samples[1].depth, 0.5);
  EXPECT_EQ(samples[1].prompt, instruction + filler + "\n" + needle(samples[1].passkey) + filler +
                                   "\nWhat is the pass key?");
  EXPECT_DOUBLE_EQ(samples[2].depth, 1.0);
  EXPECT_EQ(samples[2].prompt, instruction + filler + " " + filler + "\n" + needle(samples[2].passkey) +
                                   "\nWhat is the pass key?");
  // The keys of seed 42 (fixed: a change here changes every published prompt).
  EXPECT_EQ(samples[0].passkey, 36474);
  EXPECT_EQ(samples[1].passkey, 28786);
  EXPECT_EQ(samples[2].passkey, 625);
}

TEST(Passkey, DeterministicPerSeedAndFittedToLength) {
  const TaskGenerator generator = passkey_generator(5, 2000);
  const auto a = build_task_samples("passkey", generator, 2000, 6, 1, kWords);
  const auto b = build_task_samples("passkey", generator, 2000, 6, 1, kWords);
  const auto c = build_task_samples("passkey", generator, 2000, 6, 2, kWords);
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].prompt, b[i].prompt);
    EXPECT_LE(kWords(a[i]) + 10, 2000);
    // The largest filler that fits: one more repetition (18 words) would not.
    EXPECT_GT(kWords(a[i]) + 18 + 10, 2000);
  }
  EXPECT_NE(a[0].prompt, c[0].prompt);
  EXPECT_DOUBLE_EQ(a[5].depth, 0.0);  // depths cycle 0, 0.25, .., 1
  EXPECT_DOUBLE_EQ(a[3].depth, 0.75);
}

TEST(Ruler, SentenceSplitKeepsTitlesInside) {
  const std::vector<std::string> words = split_words(kHaystack);
  const std::vector<std::string> sentences = split_sentences(words, find_sentence_ends(words), words.size());
  ASSERT_EQ(sentences.size(), 7u);
  EXPECT_EQ(sentences[1], "Mr. Brown said hello!");
  EXPECT_EQ(sentences[2], "Is it so?");
  EXPECT_EQ(split_sentences(words, find_sentence_ends(words), 5).back(), "Mr. Brown");  // unfinished
}

TEST(Ruler, SourcesFilterTheWordList) {
  const RulerSources sources(kHaystack, synthetic_word_list());
  EXPECT_EQ(sources.words().size(), 26u * 26u * 2u);
  EXPECT_EQ(sources.sentences().size(), 7u);
  EXPECT_THROW(RulerSources(kHaystack, "just\na\nfew\n"), std::exception);
}

TEST(Ruler, NiahSingleRepeatHaystack) {
  const RulerSources sources(kHaystack, synthetic_word_list());
  const TaskGenerator generator = ruler_generator("niah_single_1", 300, sources, kWords);
  EXPECT_EQ(generator.max_new_tokens, 128);
  const auto samples = build_task_samples("niah_single_1", generator, 300, 2, 42, kWords);
  const TaskSample& s = samples[0];
  ASSERT_EQ(s.references.size(), 1u);
  EXPECT_TRUE(std::regex_match(s.references[0], std::regex("[1-9][0-9]{6}")));
  // The singular template; the key is "word-word".
  const std::regex question(
      "A special magic number is hidden within the following text\\. Make sure to memorize it\\. I will quiz you "
      "about the number afterwards\\.\n([\\s\\S]*)\nWhat is the special magic number for ([a-z]+-[a-z]+) mentioned "
      "in the provided text\\?");
  std::smatch match;
  ASSERT_TRUE(std::regex_match(s.prompt, match, question)) << s.prompt;
  const std::string key = match[2];
  EXPECT_EQ(s.answer_prefix, " The special magic number for " + key + " mentioned in the provided text is");
  // Context: the filler a line each and the needle on a line of its own.
  const std::string context = match[1];
  const std::string needle = "One of the special magic numbers for " + key + " is: " + s.references[0] + ".";
  EXPECT_EQ(count(context, needle), 1u);
  EXPECT_EQ(count(context, kFiller), static_cast<size_t>(s.haystack_units));
  EXPECT_EQ(count(context, "\n"), static_cast<size_t>(s.haystack_units));  // units + 1 lines
  EXPECT_LE(kWords(s) + 128, 300);
  EXPECT_NE(samples[0].prompt, samples[1].prompt);
  EXPECT_EQ(build_task_samples("niah_single_1", generator, 300, 2, 42, kWords)[1].prompt, samples[1].prompt);
}

TEST(Ruler, NiahEssayNeedlesBetweenSentences) {
  const RulerSources sources(kHaystack, synthetic_word_list());
  const TaskGenerator generator = ruler_generator("niah_multikey_1", 400, sources, kWords);
  const TaskSample s = build_task_samples("niah_multikey_1", generator, 400, 1, 3, kWords)[0];
  EXPECT_EQ(s.haystack_units, 23);  // every word of the haystack fits
  ASSERT_EQ(s.references.size(), 1u);
  EXPECT_EQ(count(s.prompt, "One of the special magic numbers for "), 4u);  // 4 keys, one asked for
  // Every haystack sentence is still whole, with the needles between sentences.
  const std::vector<std::string> words = split_words(kHaystack);
  for (const std::string& sentence : split_sentences(words, find_sentence_ends(words), words.size())) {
    EXPECT_EQ(count(s.prompt, sentence), 1u) << sentence;
  }
  const std::regex needle("One of the special magic numbers for [a-z]+-[a-z]+ is: [0-9]{7}\\.");
  EXPECT_EQ(std::distance(std::sregex_iterator(s.prompt.begin(), s.prompt.end(), needle), std::sregex_iterator()), 4);
}

TEST(Ruler, NiahMultivalueAndMultiqueryArePlural) {
  const RulerSources sources(kHaystack, synthetic_word_list());
  const TaskSample mv =
      build_task_samples("niah_multivalue", ruler_generator("niah_multivalue", 400, sources, kWords), 400, 1, 5, kWords)[0];
  ASSERT_EQ(mv.references.size(), 4u);
  EXPECT_EQ(mv.prompt.rfind("Some special magic numbers are hidden", 0), 0u);
  for (const std::string& value : mv.references) EXPECT_EQ(count(mv.prompt, " is: " + value + "."), 1u);
  EXPECT_NE(mv.answer_prefix.find("mentioned in the provided text are"), std::string::npos);

  const TaskSample mq =
      build_task_samples("niah_multiquery", ruler_generator("niah_multiquery", 400, sources, kWords), 400, 1, 5, kWords)[0];
  ASSERT_EQ(mq.references.size(), 4u);
  EXPECT_TRUE(std::regex_search(
      mq.answer_prefix, std::regex("^ The special magic numbers for [a-z-]+, [a-z-]+, [a-z-]+, and [a-z-]+ mentioned")));
}

TEST(Ruler, NiahMultikeyUuidsAmongDistractorNeedles) {
  const RulerSources sources(kHaystack, synthetic_word_list());
  const TaskSample s =
      build_task_samples("niah_multikey_3", ruler_generator("niah_multikey_3", 600, sources, kWords), 600, 1, 9, kWords)[0];
  const std::string uuid = "[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}";
  ASSERT_EQ(s.references.size(), 1u);
  EXPECT_TRUE(std::regex_match(s.references[0], std::regex(uuid)));
  const std::regex line("One of the special magic uuids for " + uuid + " is: " + uuid + "\\.");
  EXPECT_EQ(std::distance(std::sregex_iterator(s.prompt.begin(), s.prompt.end(), line), std::sregex_iterator()),
            s.haystack_units + 1);
  EXPECT_EQ(count(s.prompt, " is: " + s.references[0] + "."), 1u);
}

TEST(Ruler, VariableTrackingChainInOrder) {
  const RulerSources sources(kHaystack, synthetic_word_list());
  const TaskGenerator generator = ruler_generator("vt", 400, sources, kWords);
  EXPECT_EQ(generator.max_new_tokens, 30);
  const TaskSample s = build_task_samples("vt", generator, 400, 1, 11, kWords)[0];
  ASSERT_EQ(s.references.size(), 5u);
  // The query's chain: five-letter names, each assigned the previous one, in order in the text.
  std::smatch value;
  ASSERT_TRUE(std::regex_search(s.prompt, value, std::regex("VAR " + s.references[0] + " = ([0-9]{5})\n")));
  size_t at = s.prompt.find("VAR " + s.references[0] + " = " + std::string(value[1]));
  for (size_t j = 1; j < 5; ++j) {
    EXPECT_TRUE(std::regex_match(s.references[j], std::regex("[A-Z]{5}")));
    const size_t next = s.prompt.find("VAR " + s.references[j] + " = VAR " + s.references[j - 1]);
    ASSERT_NE(next, std::string::npos);
    EXPECT_GT(next, at);
    at = next;
  }
  EXPECT_NE(s.prompt.find("Question: Find all variables that are assigned the value " + std::string(value[1]) +
                          " in the text above."),
            std::string::npos);
  EXPECT_EQ(s.answer_prefix, " Answer: According to the chain(s) of variable assignment in the text above, 5 "
                             "variables are assgined the value " + std::string(value[1]) + ", they are: ");
  // The in-context example comes first, answered with three-letter names.
  EXPECT_EQ(count(s.prompt, "Memorize and track the chain(s)"), 2u);
  EXPECT_TRUE(std::regex_search(s.prompt, std::regex("they are: [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3} [A-Z]{3}\n\n")));
}

TEST(Ruler, CommonWordsRepeatCounts) {
  const RulerSources sources(kHaystack, synthetic_word_list());
  const TaskGenerator generator = ruler_generator("cwe", 1000, sources, kWords);
  EXPECT_EQ(generator.max_new_tokens, 120);
  const TaskSample s = build_task_samples("cwe", generator, 1000, 1, 13, kWords)[0];
  ASSERT_EQ(s.references.size(), 10u);
  const std::string question = "\nQuestion: What are the 10 most common words in the above list?";
  const size_t list_start = s.prompt.rfind("appear most often.\n") + 19;
  const std::string list = " " + s.prompt.substr(list_start, s.prompt.rfind(question) - list_start) + " ";
  // Below 4096 tokens: the 10 common words 6 times each, the others once.
  for (const std::string& word : s.references) EXPECT_EQ(count(list, ". " + word + " "), 6u) << word;
  EXPECT_EQ(count(list, ". "), static_cast<size_t>(60 + s.haystack_units - 10));
  EXPECT_EQ(s.answer_prefix, " Answer: The top 10 words that appear most often in the list are:");
}

TEST(Ruler, FrequentWordsFollowZipf) {
  const RulerSources sources(kHaystack, synthetic_word_list());
  const TaskGenerator generator = ruler_generator("fwe", 1000, sources, kWords);
  const TaskSample s = build_task_samples("fwe", generator, 1000, 1, 17, kWords)[0];
  ASSERT_EQ(s.references.size(), 3u);
  std::vector<size_t> counts;
  for (const std::string& word : s.references) counts.push_back(count(s.prompt, " " + word + " "));
  const size_t dots = count(s.prompt, " ... ");
  EXPECT_GT(dots, counts[0]);
  EXPECT_GT(counts[0], counts[1]);
  EXPECT_GT(counts[1], counts[2]);
  EXPECT_GT(counts[2], 0u);
}

TEST(Ruler, SmallestHaystackTooLongIsAnError) {
  const RulerSources sources(kHaystack, synthetic_word_list());
  EXPECT_THROW(build_task_samples("niah_single_1", ruler_generator("niah_single_1", 100, sources, kWords), 100, 1, 1,
                                  kWords),
               std::exception);
}

TEST(Scoring, PasskeyFirstInteger) {
  EXPECT_EQ(first_integer(" 4242. Remember 17"), "4242");
  EXPECT_EQ(first_integer("no digits"), std::nullopt);
  EXPECT_EQ(score_passkey(" 36474. Remember it.", 36474), 1.0);       // right
  EXPECT_EQ(score_passkey(" 036474", 36474), 1.0);                    // the same number
  EXPECT_EQ(score_passkey(" 12 and then 36474", 36474), 0.0);         // only the first integer counts
  EXPECT_EQ(score_passkey(" 3647", 36474), 0.0);                      // partly right is wrong
  EXPECT_EQ(score_passkey(" 364745", 36474), 0.0);
  EXPECT_EQ(score_passkey("", 36474), 0.0);                           // empty
  EXPECT_EQ(score_passkey(" 99999999999999999999999", 36474), 0.0);  // no overflow
}

TEST(Scoring, StringMatchAll) {
  const std::vector<std::string> refs = {"1234567", "7654321", "ABC-def", "x"};
  EXPECT_DOUBLE_EQ(string_match_all(" 1234567, 7654321, abc-DEF and x.", refs), 1.0);  // right, any case
  EXPECT_DOUBLE_EQ(string_match_all(" 1234567 and abc-def", refs), 0.5);                 // partly right
  EXPECT_DOUBLE_EQ(string_match_all(" 12345 something else", std::vector<std::string>{"1234567"}), 0.0);  // wrong
  EXPECT_DOUBLE_EQ(string_match_all("", refs), 0.0);                                      // empty
  EXPECT_THROW(string_match_all("x", std::vector<std::string>{}), std::exception);
}

TEST(Scoring, AccuracyAndInterval) {
  const std::vector<double> scores = {1, 0, 1, 1};
  const AccuracySummary s = summarize_scores(scores);
  EXPECT_DOUBLE_EQ(s.accuracy, 75.0);
  EXPECT_NEAR(s.ci95, 100 * 1.96 * 0.5 / 2, 1e-9);  // sample stdev 0.5, n 4
  const std::vector<double> perfect = {1, 1, 1};
  EXPECT_DOUBLE_EQ(summarize_scores(perfect).ci95, 0.0);
}

TEST(Kl, KnownDivergenceAndAgreement) {
  const std::vector<float> same = {0.5f, -1.0f, 2.0f};
  EXPECT_NEAR(compare_logits(same, same).kl, 0.0, 1e-12);
  EXPECT_TRUE(compare_logits(same, same).top1_agree);
  // p = (1/2, 1/2), q = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2.
  const std::vector<float> p = {0.0f, 0.0f}, q = {std::log(3.0f), 0.0f};
  EXPECT_NEAR(compare_logits(p, q).kl, 0.5 * std::log(2.0 / 3.0) + 0.5 * std::log(2.0), 1e-6);
  EXPECT_TRUE(compare_logits(p, q).top1_agree);  // ties go to the first index
  const std::vector<float> r = {0.0f, 1.0f};
  EXPECT_FALSE(compare_logits(q, r).top1_agree);
  // Shifting logits does not change the distribution.
  const std::vector<float> shifted = {100.5f, 99.0f, 102.0f};
  EXPECT_NEAR(compare_logits(same, shifted).kl, 0.0, 1e-9);
}

TEST(Kl, SummaryMeanPercentileAgreement) {
  std::vector<double> kls;
  for (int i = 100; i >= 1; --i) kls.push_back(i);
  const KlSummary s = summarize_kl(kls, 25);
  EXPECT_EQ(s.tokens, 100);
  EXPECT_DOUBLE_EQ(s.kl_mean, 50.5);
  EXPECT_DOUBLE_EQ(s.kl_p99, 99.0);  // nearest rank: the 99th of 100
  EXPECT_DOUBLE_EQ(s.top1_agree, 25.0);
}

// evaluate_kl on a tiny random model: an fp16 copy of the reference diverges by
// exactly 0; q4_0 by what comparing its own run with the reference's gives
// (same chunks, so the same logits), and the windows must fit the text.
TEST(Kl, EvaluateAgainstReferenceOnTinyModel) {
  const LlamaConfig config = testing::tiny_config(32);  // q4_0 blocks span 32 channels
  const LlamaWeights weights = testing::random_weights(config, 5);
  std::mt19937 rng(3);
  const std::vector<int32_t> text = testing::random_ids(rng, 120, config.vocab);
  KvCacheOptions fp16, q4_0;
  q4_0.format = parse_kv_format("q4_0");
  constexpr int32_t kPage = 16, kPages = 8;
  CpuBackend reference(config, weights, kPages, kPage, fp16), copy(config, weights, kPages, kPage, fp16),
      quantized(config, weights, kPages, kPage, q4_0);
  PageTables reference_tables(kPages, kPage), copy_tables(kPages, kPage), quantized_tables(kPages, kPage);
  const std::vector<BackendWithTables> formats = {{&copy, &copy_tables}, {&quantized, &quantized_tables}};
  KlOptions options;
  options.length = 40;
  options.windows = 3;
  options.chunk = 16;  // 16 + 16 + 8 rows per window
  options.bos_id = 1;
  const std::vector<KlSummary> s = evaluate_kl(config, {&reference, &reference_tables}, formats, text, options);
  ASSERT_EQ(s.size(), 2u);
  EXPECT_EQ(s[0].tokens, 120);
  EXPECT_EQ(s[0].kl_mean, 0.0);
  EXPECT_EQ(s[0].top1_agree, 100.0);
  EXPECT_GT(s[1].kl_mean, 0.0);
  EXPECT_GE(s[1].kl_p99, s[1].kl_mean);

  // The quantized format's first window by hand.
  options.windows = 1;
  const KlSummary first = evaluate_kl(config, {&reference, &reference_tables}, std::span(formats).subspan(1), text,
                                      options)[0];
  std::vector<int32_t> window = {1};
  window.insert(window.end(), text.begin(), text.begin() + 39);
  StepBatch batch;
  std::vector<float> ref_logits, q_logits;
  double sum = 0;
  reference_tables.add_sequence(0);
  reference_tables.reserve(0, 40);
  quantized_tables.add_sequence(0);
  quantized_tables.reserve(0, 40);
  for (int64_t pos = 0; pos < 40; pos += 16) {
    const std::span<const int32_t> chunk(window.data() + pos, std::min<size_t>(16, 40 - pos));
    forward_chunk_all_logits(reference, reference_tables, 0, pos, chunk, batch, ref_logits);
    forward_chunk_all_logits(quantized, quantized_tables, 0, pos, chunk, batch, q_logits);
    const size_t vocab = static_cast<size_t>(config.vocab);
    for (size_t r = 0; r < chunk.size(); ++r) {
      sum += compare_logits(std::span<const float>(ref_logits.data() + r * vocab, vocab),
                            std::span<const float>(q_logits.data() + r * vocab, vocab))
                 .kl;
    }
  }
  EXPECT_NEAR(first.kl_mean, sum / 40, 1e-12);

  options.windows = 4;  // 4 x 39 text tokens > 120
  EXPECT_THROW(evaluate_kl(config, {&reference, &reference_tables}, formats, text, options), std::exception);
}

}  // namespace
}  // namespace kvq
