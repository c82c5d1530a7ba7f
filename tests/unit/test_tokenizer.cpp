// Tokenizer on tiny synthetic vocabularies: merge priority and ties, byte
// fallback, the pre-tokenizers' word boundaries, special tokens, invalid UTF-8,
// round trips, errors, the chat template and reading the vocabulary from GGUF.
// (tests/model/test_tokenizer_reference.py checks the real SmolLM2 vocabulary
// against llama.cpp.)
#include <gtest/gtest.h>

#include <cstring>

#include "core/error.h"
#include "gguf_builder.h"
#include "model/gguf.h"
#include "tokenizer/tokenizer.h"

namespace kvq {
namespace {

// GPT-2's byte-level character for a byte, written out independently of the
// tokenizer: printable Latin-1 stands for itself, the rest maps to U+0100.. in order.
std::string byte_char(int byte) {
  int cpt = byte;
  auto printable = [](int b) { return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE); };
  if (!printable(byte)) {
    cpt = 0x100;
    for (int b = 0; b < byte; ++b) cpt += printable(b) ? 0 : 1;
  }
  std::string out;
  if (cpt < 0x80) {
    out.push_back(static_cast<char>(cpt));
  } else {
    out.push_back(static_cast<char>(0xC0 | (cpt >> 6)));
    out.push_back(static_cast<char>(0x80 | (cpt & 0x3F)));
  }
  return out;
}

constexpr int32_t kNormal = 1, kControl = 3, kUserDefined = 4;

// Ids 0..255 are the byte tokens (id == byte), then each merge's result in
// order, then `extra` tokens. Merges use byte-level text ("Ġ" is a space).
struct VocabBuilder {
  TokenizerVocab vocab;
  explicit VocabBuilder(std::string pre = "smollm") {
    vocab.pre = std::move(pre);
    for (int b = 0; b < 256; ++b) add(byte_char(b), kNormal);
  }
  VocabBuilder& merge(const std::string& left, const std::string& right) {
    vocab.merges.push_back(left + " " + right);
    add(left + right, kNormal);
    return *this;
  }
  int32_t add(const std::string& text, int32_t type) {
    for (size_t id = 0; id < vocab.tokens.size(); ++id) {
      if (vocab.tokens[id] == text) return static_cast<int32_t>(id);
    }
    vocab.tokens.push_back(text);
    vocab.token_types.push_back(type);
    return static_cast<int32_t>(vocab.tokens.size() - 1);
  }
  int32_t id(const std::string& text) const {
    for (size_t i = 0; i < vocab.tokens.size(); ++i) {
      if (vocab.tokens[i] == text) return static_cast<int32_t>(i);
    }
    ADD_FAILURE() << "no token " << text;
    return -1;
  }
};

using Ids = std::vector<int32_t>;

TEST(Tokenizer, EmptyInputGivesNoTokens) {
  Tokenizer tok(VocabBuilder().vocab);
  EXPECT_TRUE(tok.encode("", false).empty());
  EXPECT_TRUE(tok.encode("", true).empty());
  EXPECT_EQ(tok.decode({}), "");
}

TEST(Tokenizer, WithoutMergesEveryByteIsItsToken) {
  Tokenizer tok(VocabBuilder().vocab);
  EXPECT_EQ(tok.encode("hi!", false), (Ids{'h', 'i', '!'}));
  EXPECT_EQ(tok.encode("é", false), (Ids{0xC3, 0xA9}));  // two UTF-8 bytes, two tokens
  EXPECT_EQ(tok.encode("\n", false), (Ids{'\n'}));
}

TEST(Tokenizer, LowerRankMergesFirst) {
  // "hello": "l o" outranks "l l", so the l's never pair up.
  VocabBuilder b;
  b.merge("l", "o").merge("l", "l").merge("h", "e").merge("he", "l");
  Tokenizer tok(b.vocab);
  EXPECT_EQ(tok.encode("hello", false), (Ids{b.id("hel"), b.id("lo")}));

  // The same merges ranked the other way round.
  VocabBuilder swapped;
  swapped.merge("l", "l").merge("l", "o").merge("h", "e").merge("he", "l");
  Tokenizer tok2(swapped.vocab);
  EXPECT_EQ(tok2.encode("hello", false), (Ids{swapped.id("he"), swapped.id("ll"), 'o'}));
}

TEST(Tokenizer, EqualRanksMergeLeftmostFirst) {
  VocabBuilder b;
  b.merge("a", "a");
  Tokenizer tok(b.vocab);
  EXPECT_EQ(tok.encode("aaa", false), (Ids{b.id("aa"), 'a'}));
  EXPECT_EQ(tok.encode("aaaa", false), (Ids{b.id("aa"), b.id("aa")}));
}

TEST(Tokenizer, MergedTokensMergeAgain) {
  VocabBuilder b;
  b.merge("a", "b").merge("ab", "c").merge("abc", "d");
  Tokenizer tok(b.vocab);
  EXPECT_EQ(tok.encode("abcd", false), (Ids{b.id("abcd")}));
  EXPECT_EQ(tok.encode("abdc", false), (Ids{b.id("ab"), 'd', 'c'}));
}

TEST(Tokenizer, ByteMissingFromVocabularyIsDropped) {
  // As llama.cpp does: a byte whose byte-level character is not a token has no
  // id to become (SmolLM2 lacks 0x04, for example).
  VocabBuilder b;
  b.vocab.tokens[4] = "<removed>";
  b.vocab.token_types[4] = kControl;
  Tokenizer tok(b.vocab);
  EXPECT_EQ(tok.encode("a\x04z", false), (Ids{'a', 'z'}));
}

TEST(Tokenizer, DigitsSplitOneByOneInSmolLM) {
  VocabBuilder smollm("smollm"), gpt2("gpt-2");
  for (VocabBuilder* b : {&smollm, &gpt2}) b->merge("Ġ", "1").merge("1", "2");
  EXPECT_EQ(Tokenizer(smollm.vocab).encode(" 12", false), (Ids{' ', '1', '2'}));
  EXPECT_EQ(Tokenizer(gpt2.vocab).encode(" 12", false), (Ids{gpt2.id("Ġ1"), '2'}));
  EXPECT_EQ(Tokenizer(gpt2.vocab).encode("12", false), (Ids{gpt2.id("12")}));
  // Non-ASCII digits too (ARABIC-INDIC DIGIT ONE, TWO: two bytes each).
  VocabBuilder arabic("smollm");
  arabic.merge(byte_char(0xD9), byte_char(0xA1)).merge(byte_char(0xD9) + byte_char(0xA1), byte_char(0xD9));
  EXPECT_EQ(Tokenizer(arabic.vocab).encode("\u0661\u0662", false),
            (Ids{arabic.id(byte_char(0xD9) + byte_char(0xA1)), 0xD9, 0xA2}));
}

TEST(Tokenizer, WordBoundariesOfTheGpt2Pattern) {
  // Each merge below would cross a word boundary, so it must not apply.
  VocabBuilder b("gpt-2");
  b.merge("t", "'").merge("'", "s").merge("Ġ", "Ġ").merge("ĠĠ", "Ġ").merge("a", "Ġ").merge("!", "a").merge("Ġ", "w");
  Tokenizer tok(b.vocab);
  // Contractions split from the word before them; "'S" is not a contraction.
  EXPECT_EQ(tok.encode("it's", false), (Ids{'i', 't', b.id("'s")}));
  EXPECT_EQ(tok.encode("it'S", false), (Ids{'i', 't', '\'', 'S'}));
  // A space run before a word leaves its last space to the word: "a", "  ", " w".
  EXPECT_EQ(tok.encode("a   w", false), (Ids{'a', b.id("ĠĠ"), b.id("Ġw")}));
  // A space run at the end stays whole.
  EXPECT_EQ(tok.encode("a   ", false), (Ids{'a', b.id("ĠĠĠ")}));
  // Punctuation and letters are separate words.
  EXPECT_EQ(tok.encode("!a", false), (Ids{'!', 'a'}));
}

TEST(Tokenizer, DefaultPreTokenizerIsolatesPunctuationAndDigitTriples) {
  VocabBuilder b("default");
  b.merge("Ġ", "!").merge("1", "2").merge("12", "3").merge("3", "4");
  Tokenizer tok(b.vocab);
  EXPECT_EQ(tok.encode(" !", false), (Ids{' ', '!'}));  // "!" is split out before the space can join it
  EXPECT_EQ(tok.encode("1234", false), (Ids{b.id("123"), '4'}));
  EXPECT_EQ(Tokenizer(VocabBuilder("").vocab).encode("x", false), (Ids{'x'}));  // no pre name: default
}

TEST(Tokenizer, ControlTokensParsedOnlyWhenAsked) {
  VocabBuilder b;
  const int32_t start = b.add("<|im_start|>", kControl);
  Tokenizer tok(b.vocab);
  EXPECT_EQ(tok.encode("<|im_start|>x", true), (Ids{start, 'x'}));
  const Ids as_text = tok.encode("<|im_start|>x", false);
  EXPECT_EQ(as_text.size(), std::strlen("<|im_start|>x"));
  EXPECT_EQ(tok.decode(as_text), "<|im_start|>x");
  EXPECT_EQ(tok.encode("a<|im_start|", true), (Ids{'a', '<', '|', 'i', 'm', '_', 's', 't', 'a', 'r', 't', '|'}));
}

TEST(Tokenizer, UserDefinedTokensAlwaysSplitOut) {
  VocabBuilder b;
  const int32_t tool = b.add("<tool>", kUserDefined);
  Tokenizer tok(b.vocab);
  EXPECT_EQ(tok.encode("a<tool>b", false), (Ids{'a', tool, 'b'}));
  EXPECT_EQ(tok.decode(Ids{tool}), "<tool>");
}

TEST(Tokenizer, LongerSpecialTokenWins) {
  VocabBuilder b;
  const int32_t end = b.add("<end>", kControl);
  const int32_t end_turn = b.add("<end><turn>", kControl);
  Tokenizer tok(b.vocab);
  EXPECT_EQ(tok.encode("<end><turn><end>", true), (Ids{end_turn, end}));
}

TEST(Tokenizer, TextBetweenSpecialTokensIsSplitOnItsOwn) {
  // The space before a special token cannot join the word after it.
  VocabBuilder b;
  b.merge("Ġ", "x");
  const int32_t sep = b.add("<s>", kControl);
  Tokenizer tok(b.vocab);
  EXPECT_EQ(tok.encode(" <s>x", true), (Ids{' ', sep, 'x'}));
  EXPECT_EQ(tok.encode(" x", true), (Ids{b.id("Ġx")}));
}

TEST(Tokenizer, InvalidUtf8BecomesReplacementCharacters) {
  Tokenizer tok(VocabBuilder().vocab);
  const Ids replacement{0xEF, 0xBF, 0xBD};  // U+FFFD
  auto repeated = [&](int n) {
    Ids ids;
    for (int i = 0; i < n; ++i) ids.insert(ids.end(), replacement.begin(), replacement.end());
    return ids;
  };
  EXPECT_EQ(tok.encode("\xff", false), repeated(1));
  EXPECT_EQ(tok.encode("\x80\xbf", false), repeated(2));        // lone continuation bytes
  EXPECT_EQ(tok.encode("\xe2\x82", false), repeated(2));        // truncated: each byte on its own
  EXPECT_EQ(tok.encode("\xf5\x80\x80\x80", false), repeated(4));  // beyond U+10FFFF
  EXPECT_EQ(tok.decode(tok.encode("\xff", false)), "\xEF\xBF\xBD");
  // Structurally valid forms are accepted as llama.cpp accepts them: an
  // overlong 'A' becomes 'A', a surrogate keeps its bytes.
  EXPECT_EQ(tok.encode("\xc1\x81", false), (Ids{'A'}));
  EXPECT_EQ(tok.encode("\xed\xa0\x80", false), (Ids{0xED, 0xA0, 0x80}));
}

TEST(Tokenizer, RoundTripsValidUtf8) {
  VocabBuilder b;
  b.merge("Ġ", "t").merge("h", "e").merge("Ġt", "he").merge("Ċ", "Ċ");
  Tokenizer tok(b.vocab);
  for (const char* text : {"the cat", " the\n\nthe  \t end ", "naïve café 中文 ١٢٣ 👨‍👩‍👧", "x'll 'S 12345",
                           "\x01\x7f", "   ", "<|im_start|>"}) {
    for (bool special : {false, true}) EXPECT_EQ(tok.decode(tok.encode(text, special)), text) << text;
  }
}

TEST(Tokenizer, TokenTextAndEndOfGeneration) {
  VocabBuilder b;
  b.merge("Ġ", "w");
  const int32_t im_end = b.add("<|im_end|>", kControl);
  const int32_t other_control = b.add("<|im_start|>", kControl);
  b.vocab.eos_id = b.add("</s>", kControl);
  Tokenizer tok(b.vocab);
  EXPECT_EQ(tok.token_text(b.id("Ġw")), " w");
  EXPECT_EQ(tok.token_text(0x0A), "\n");
  EXPECT_EQ(tok.token_text(im_end), "");  // control tokens print nothing
  EXPECT_EQ(tok.decode(Ids{other_control, b.id("Ġw"), im_end}), " w");
  EXPECT_THROW(tok.token_text(tok.n_vocab()), Error);
  EXPECT_TRUE(tok.is_end_of_generation(b.vocab.eos_id));
  EXPECT_TRUE(tok.is_end_of_generation(im_end));
  EXPECT_FALSE(tok.is_end_of_generation(other_control));
  EXPECT_FALSE(tok.is_end_of_generation('a'));
}

TEST(Tokenizer, ByteTokensDecodeToTheirByte) {
  VocabBuilder b;
  const int32_t byte = b.add("<0x0A>", 6);
  EXPECT_EQ(Tokenizer(b.vocab).token_text(byte), "\n");
  b.vocab.tokens[byte] = "<0xZZ>";
  EXPECT_THROW(Tokenizer{b.vocab}, Error);
}

void expect_error_mentioning(const TokenizerVocab& vocab, const std::string& needle) {
  try {
    Tokenizer tok(vocab);
    ADD_FAILURE() << "no error; expected one mentioning " << needle;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Tokenizer, RejectsWhatItDoesNotImplement) {
  VocabBuilder b;
  b.vocab.model = "llama";
  expect_error_mentioning(b.vocab, "'llama'");
  b.vocab.model = "gpt2";
  b.vocab.pre = "qwen2";
  expect_error_mentioning(b.vocab, "'qwen2'");
}

TEST(Tokenizer, RejectsInconsistentVocabularies) {
  VocabBuilder unknown_side;
  unknown_side.vocab.merges.push_back("a zz");
  expect_error_mentioning(unknown_side.vocab, "a zz");
  VocabBuilder no_result;
  no_result.vocab.merges.push_back("a b");  // "ab" is not a token
  expect_error_mentioning(no_result.vocab, "a b");
  VocabBuilder no_space;
  no_space.vocab.merges.push_back("ab");
  expect_error_mentioning(no_space.vocab, "'ab'");
  VocabBuilder types;
  types.vocab.token_types.pop_back();
  expect_error_mentioning(types.vocab, "token types");
  VocabBuilder bos;
  bos.vocab.bos_id = 100000;
  expect_error_mentioning(bos.vocab, "bos");
}

// SmolLM2-135M-Instruct's tokenizer.chat_template, verbatim.
constexpr const char* kSmolLM2Template =
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n"
    "' + message['content'] + '<|im_end|>' + '\n"
    "'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n"
    "' }}{% endif %}";

TEST(Tokenizer, ChatTemplateWithDefaultSystemMessage) {
  VocabBuilder b;
  b.vocab.chat_template = kSmolLM2Template;
  EXPECT_EQ(Tokenizer(b.vocab).apply_chat_template("Hi there"),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n");
}

TEST(Tokenizer, ChatTemplateSystemMessageFromEscapedNewline) {
  // Qwen2.5-style: the caller's system message is spliced in first, the default
  // one is a literal inside a Jinja string with a "\n" escape.
  VocabBuilder b;
  b.vocab.chat_template =
      "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
      "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}{%- endif %}";
  EXPECT_EQ(Tokenizer(b.vocab).apply_chat_template("x"),
            "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n");
}

TEST(Tokenizer, ChatTemplateWithoutSystemMessage) {
  VocabBuilder b;
  b.vocab.chat_template =
      "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
      "'<|im_end|>\n'}}{% endfor %}";
  EXPECT_EQ(Tokenizer(b.vocab).apply_chat_template("x"), "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n");
}

TEST(Tokenizer, ChatTemplateMustBeChatML) {
  VocabBuilder b;
  EXPECT_THROW(Tokenizer(b.vocab).apply_chat_template("x"), Error);  // none
  b.vocab.chat_template = "{{ bos_token }}[INST] {{ message }} [/INST]";
  EXPECT_THROW(Tokenizer(b.vocab).apply_chat_template("x"), Error);
}

TEST(Tokenizer, VocabFromGguf) {
  VocabBuilder b;
  b.merge("h", "i");
  const int32_t im_end = b.add("<|im_end|>", kControl);
  test::GgufBuilder gguf;
  gguf.add_string("tokenizer.ggml.model", "gpt2");
  gguf.add_string("tokenizer.ggml.pre", "smollm");
  gguf.add_string_array("tokenizer.ggml.tokens", b.vocab.tokens);
  gguf.add_i32_array("tokenizer.ggml.token_type", b.vocab.token_types);
  gguf.add_string_array("tokenizer.ggml.merges", b.vocab.merges);
  gguf.add_u32("tokenizer.ggml.bos_token_id", 1);
  gguf.add_u32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(im_end));
  gguf.add_bool("tokenizer.ggml.add_bos_token", false);
  gguf.add_string("tokenizer.chat_template", kSmolLM2Template);
  const std::vector<uint8_t> bytes = gguf.bytes();
  const GgufFile file = GgufFile::parse(bytes, "tiny.gguf");
  const TokenizerVocab vocab = Tokenizer::vocab_from_gguf(file);
  EXPECT_EQ(vocab.tokens, b.vocab.tokens);
  EXPECT_EQ(vocab.token_types, b.vocab.token_types);
  EXPECT_EQ(vocab.merges, b.vocab.merges);
  EXPECT_EQ(vocab.pre, "smollm");
  EXPECT_EQ(vocab.bos_id, 1);
  EXPECT_EQ(vocab.eos_id, im_end);
  EXPECT_EQ(vocab.unk_id, -1);
  EXPECT_FALSE(vocab.add_bos);
  EXPECT_EQ(vocab.chat_template, kSmolLM2Template);
  Tokenizer tok(vocab);
  EXPECT_EQ(tok.encode("hi<|im_end|>", true), (Ids{b.id("hi"), im_end}));
  EXPECT_TRUE(tok.is_end_of_generation(im_end));
}

TEST(Tokenizer, VocabFromGgufNamesMissingKey) {
  test::GgufBuilder gguf;
  gguf.add_string("tokenizer.ggml.model", "gpt2");
  const std::vector<uint8_t> bytes = gguf.bytes();
  const GgufFile file = GgufFile::parse(bytes, "no-tokens.gguf");
  try {
    Tokenizer::vocab_from_gguf(file);
    ADD_FAILURE() << "no error for a GGUF without tokens";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tokenizer.ggml.tokens"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace kvq
