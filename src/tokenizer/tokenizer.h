// Byte-level BPE tokenizer (GPT-2 style, tokenizer.ggml.model = "gpt2") built
// from GGUF metadata, and the ChatML chat template. Token for token it is meant
// to equal llama.cpp's tokenizer on the same GGUF: special tokens split out
// first, then the pre-tokenizer's word splitting, then BPE by merge rank.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace kvq {

// Plain data, so tests can build tiny vocabularies.
struct TokenizerVocab {
  std::vector<std::string> tokens;    // (n_vocab) byte-level strings as stored in GGUF
  std::vector<int32_t> token_types;   // (n_vocab) GGUF token types (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)
  std::vector<std::string> merges;    // (n_merges) "left right", highest priority first
  std::string model = "gpt2";         // tokenizer.ggml.model
  std::string pre;                    // tokenizer.ggml.pre, e.g. "smollm"
  int32_t bos_id = -1, eos_id = -1, unk_id = -1, pad_id = -1;  // -1: absent
  bool add_bos = false;
  std::string chat_template;          // raw Jinja text (only used to recognise the template family)
};

class GgufFile;  // src/model/gguf.h

class Tokenizer {
 public:
  // Throws kvq::Error for an unsupported model or pre-tokenizer name (naming it),
  // and for a vocabulary that is inconsistent (merges of unknown tokens, ids out of range).
  explicit Tokenizer(TokenizerVocab vocab);
  // Reads the tokenizer.* metadata; throws naming a missing required key.
  static TokenizerVocab vocab_from_gguf(const GgufFile& file);

  // No BOS is added here. Safe to call from several threads at once. parse_special: control tokens written in the text
  // (e.g. "<|im_start|>") become their ids; otherwise they are tokenized as text.
  // Invalid UTF-8 is tokenized as U+FFFD per bad byte, as llama.cpp does.
  std::vector<int32_t> encode(std::string_view text, bool parse_special) const;
  // Concatenated token_text of each id; control tokens render as nothing.
  std::string decode(std::span<const int32_t> ids) const;
  // The bytes a token stands for (may be part of a UTF-8 sequence), for streaming
  // output; empty for control, unknown and unused tokens. Throws for an id out of range.
  std::string token_text(int32_t id) const;

  int32_t n_vocab() const { return static_cast<int32_t>(vocab_.tokens.size()); }
  int32_t bos_id() const { return vocab_.bos_id; }
  int32_t eos_id() const { return vocab_.eos_id; }
  bool add_bos() const { return vocab_.add_bos; }
  // EOS and the control tokens that end a turn (<|im_end|>, <|endoftext|>, <|eot_id|>, ...).
  bool is_end_of_generation(int32_t id) const;

  // The ChatML prompt for one user message: the template's default system
  // message when it has one, the user turn, then the assistant generation prompt.
  // Throws for a template that is not ChatML (<|im_start|>) or is absent.
  std::string apply_chat_template(std::string_view user_message) const;

 private:
  // Word splitting rules, named after llama.cpp's pre-tokenizer types.
  enum class PreTokenizer { Gpt2, SmolLM, Default };
  struct Merge {
    int32_t rank;       // position in the merge list: lower merges first
    int32_t merged_id;  // token made by the merge
  };
  struct EncodeScratch;  // buffers reused across the words of one encode call
  struct StringHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
  };

  // Pre-tokenizes and BPE-encodes text that holds no special token.
  void encode_text(std::string_view text, EncodeScratch& scratch, std::vector<int32_t>& ids) const;
  // BPE over scratch.word_bytes, one word of the pre-tokenizer.
  void encode_word(EncodeScratch& scratch, std::vector<int32_t>& ids) const;
  int32_t find_token(std::string_view text) const;  // -1 if absent

  TokenizerVocab vocab_;
  PreTokenizer pre_tokenizer_ = PreTokenizer::Gpt2;
  std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>> token_ids_;
  std::unordered_map<uint64_t, Merge> merges_;  // key: left id << 32 | right id
  std::array<int32_t, 256> byte_token_{};       // (256) token of each byte's byte-level character, -1 if absent
  std::vector<std::string> token_bytes_;        // (n_vocab) what token_text returns
  std::vector<int32_t> special_ids_;            // tokens split out before pre-tokenization, longest text first
  std::vector<bool> end_of_generation_;         // (n_vocab)
};

}  // namespace kvq
