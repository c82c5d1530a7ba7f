// Byte-level BPE tokenizer. The reference is llama.cpp's tokenizer on the same
// GGUF (its src/llama-vocab.cpp and src/unicode.cpp): the word splitting below
// reproduces what llama.cpp does, including where that departs from the regular
// expressions it is named after, and BPE merges the lowest-ranked adjacent pair
// first, the leftmost among equals.
#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <charconv>
#include <utility>

#include "core/error.h"
#include "model/gguf.h"
#include "tokenizer/unicode_tables.h"

namespace kvq {
namespace {

// GGUF token types (llama.cpp's llama_token_type).
constexpr int32_t kTokenNormal = 1;
constexpr int32_t kTokenUnknown = 2;
constexpr int32_t kTokenControl = 3;
constexpr int32_t kTokenUserDefined = 4;
constexpr int32_t kTokenByte = 6;

constexpr uint32_t kReplacementCharacter = 0xFFFD;

// GPT-2's byte-level alphabet: the printable Latin-1 bytes stand for themselves,
// the other 68 bytes for U+0100, U+0101, ... in byte order.
constexpr std::array<uint32_t, 256> make_byte_codepoints() {
  std::array<uint32_t, 256> codepoints{};
  uint32_t next_unprintable = 0x100;
  for (uint32_t b = 0; b < 256; ++b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    codepoints[b] = printable ? b : next_unprintable++;
  }
  return codepoints;
}
constexpr std::array<uint32_t, 256> kByteCodepoints = make_byte_codepoints();
constexpr uint32_t kByteCodepointLimit = 0x100 + 68;  // every byte-level character is below this
static_assert(*std::max_element(kByteCodepoints.begin(), kByteCodepoints.end()) == kByteCodepointLimit - 1);

void append_utf8(uint32_t cpt, std::string& out) {
  if (cpt < 0x80) {
    out.push_back(static_cast<char>(cpt));
  } else if (cpt < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cpt >> 6)));
    out.push_back(static_cast<char>(0x80 | (cpt & 0x3F)));
  } else if (cpt < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cpt >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cpt >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cpt & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cpt >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cpt >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cpt >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cpt & 0x3F)));
  }
}

// Decodes as llama.cpp does: a lead byte followed by its continuation bytes is
// accepted whatever it encodes (overlong forms and surrogates too, so "\xC1\x81"
// reads as 'A'); any other byte becomes U+FFFD on its own. One departure:
// sequences beyond U+10FFFF (lead bytes F4..F7) are invalid here, where
// llama.cpp accepts them and then aborts the process when re-encoding them.
void decode_utf8(std::string_view text, std::vector<uint32_t>& cpts) {
  cpts.clear();
  cpts.reserve(text.size());
  const auto* bytes = reinterpret_cast<const uint8_t*>(text.data());
  const size_t size = text.size();
  size_t pos = 0;
  while (pos < size) {
    const uint8_t lead = bytes[pos];
    size_t length = 0;
    uint32_t cpt = 0;
    if (lead < 0x80) {
      length = 1;
      cpt = lead;
    } else if ((lead & 0xE0) == 0xC0) {
      length = 2;
      cpt = lead & 0x1F;
    } else if ((lead & 0xF0) == 0xE0) {
      length = 3;
      cpt = lead & 0x0F;
    } else if ((lead & 0xF8) == 0xF0) {
      length = 4;
      cpt = lead & 0x07;
    }
    bool valid = length > 0 && pos + length <= size;
    for (size_t i = 1; valid && i < length; ++i) {
      valid = (bytes[pos + i] & 0xC0) == 0x80;
      cpt = (cpt << 6) | (bytes[pos + i] & 0x3F);
    }
    if (valid && cpt <= 0x10FFFF) {
      cpts.push_back(cpt);
      pos += length;
    } else {
      cpts.push_back(kReplacementCharacter);
      pos += 1;
    }
  }
}

// ---- Word splitting ------------------------------------------------------------
// Text is split in passes. Each pass refines every word of the previous pass on
// its own (a word's neighbours are invisible to it), as llama.cpp applies its
// list of regular expressions. Words are kept as their end offsets in codepoints.

struct SplitText {
  std::span<const uint32_t> cpts;
  std::span<const CodepointClass> classes;  // (cpts.size())
};

// Applies `split(begin, end, out)`, which appends the ends of the words it makes
// of [begin, end), to every word in `ends`.
template <typename SplitWord>
void refine(std::vector<size_t>& ends, std::vector<size_t>& scratch, SplitWord split) {
  scratch.clear();
  size_t begin = 0;
  for (const size_t end : ends) {
    split(begin, end, scratch);
    begin = end;
  }
  ends.swap(scratch);
}

// A pass for a regular expression matched leftmost-first with no empty matches:
// every match becomes a word, and so does every stretch between matches.
// `match_length(pos, end)` is the length of the match starting at pos, 0 if none.
template <typename MatchLength>
auto isolate_matches(MatchLength match_length) {
  return [match_length](size_t begin, size_t end, std::vector<size_t>& out) {
    size_t unmatched_from = begin;
    size_t pos = begin;
    while (pos < end) {
      const size_t length = match_length(pos, end);
      if (length == 0) {
        ++pos;
        continue;
      }
      if (pos > unmatched_from) out.push_back(pos);
      pos += length;
      out.push_back(pos);
      unmatched_from = pos;
    }
    if (end > unmatched_from) out.push_back(end);
  };
}

// GPT-2's 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// as llama.cpp's hand-written matcher applies it to one word of the previous pass.
void split_gpt2(const SplitText& text, size_t begin, size_t end, std::vector<size_t>& out) {
  // Punctuation is just "other" here: only \p{L}, \p{N} and \s are distinguished.
  auto group = [&](size_t pos) {
    const CodepointClass cls = text.classes[pos];
    return cls == CodepointClass::Punctuation ? CodepointClass::Other : cls;
  };
  size_t pos = begin;
  while (pos < end) {
    const uint32_t cpt = text.cpts[pos];
    if (cpt == '\'' && pos + 1 < end) {  // contractions, lowercase only
      const uint32_t next = text.cpts[pos + 1];
      if (next == 's' || next == 't' || next == 'm' || next == 'd') {
        pos += 2;
        out.push_back(pos);
        continue;
      }
      if (pos + 2 < end) {
        const uint32_t after = text.cpts[pos + 2];
        if ((next == 'r' && after == 'e') || (next == 'v' && after == 'e') || (next == 'l' && after == 'l')) {
          pos += 3;
          out.push_back(pos);
          continue;
        }
      }
    }
    // " ?\p{L}+", " ?\p{N}+", " ?[^\s\p{L}\p{N}]+": one leading space joins the run after it.
    const size_t run_start = cpt == ' ' ? pos + 1 : pos;
    if (run_start < end && group(run_start) != CodepointClass::Whitespace) {
      const CodepointClass run_class = group(run_start);
      pos = run_start + 1;
      while (pos < end && group(pos) == run_class) ++pos;
      out.push_back(pos);
      continue;
    }
    // Whitespace (cpt is whitespace here). "\s+(?!\S)": a run followed by more
    // text leaves its last character to start the next word (" word"); a run
    // that ends the word of the previous pass stays whole.
    size_t run_end = pos + 1;
    while (run_end < end && text.classes[run_end] == CodepointClass::Whitespace) ++run_end;
    pos = (run_end - pos > 1 && run_end < end) ? run_end - 1 : run_end;
    out.push_back(pos);
  }
}

// \p{N}: every number character is a word of its own (SmolLM2's digit splitting).
size_t match_number(const SplitText& text, size_t pos) {
  return text.classes[pos] == CodepointClass::Number ? 1 : 0;
}

// \p{N}+
size_t match_number_run(const SplitText& text, size_t pos, size_t end) {
  size_t p = pos;
  while (p < end && text.classes[p] == CodepointClass::Number) ++p;
  return p - pos;
}

// [\p{P}\$\+<=>\^~\|]+
size_t match_punctuation_run(const SplitText& text, size_t pos, size_t end) {
  auto matches = [&](size_t p) {
    const uint32_t cpt = text.cpts[p];
    return text.classes[p] == CodepointClass::Punctuation || cpt == '$' || cpt == '+' || cpt == '<' ||
           cpt == '=' || cpt == '>' || cpt == '^' || cpt == '~' || cpt == '|';
  };
  size_t p = pos;
  while (p < end && matches(p)) ++p;
  return p - pos;
}

// [0-9][0-9][0-9]
size_t match_ascii_digit_triple(const SplitText& text, size_t pos, size_t end) {
  if (pos + 3 > end) return 0;
  for (size_t p = pos; p < pos + 3; ++p) {
    if (text.cpts[p] < '0' || text.cpts[p] > '9') return 0;
  }
  return 3;
}

// ---- BPE -------------------------------------------------------------------------

constexpr int32_t kMergedAway = -2;  // symbol id once merged into its left neighbour

struct Symbol {
  int32_t id;    // token id; -1: a byte whose byte-level character is not in the vocabulary
  int32_t prev;  // index of the neighbouring live symbols, -1 at the ends
  int32_t next;
};

// A mergeable adjacent pair as it was when queued; stale once either side changed.
struct MergeCandidate {
  int32_t rank;
  int32_t left;  // symbol index
  int32_t left_id;
  int32_t right_id;
  int32_t merged_id;
};

// Heap order: the top is the lowest rank, then the leftmost pair.
bool later_merge(const MergeCandidate& a, const MergeCandidate& b) {
  return a.rank != b.rank ? a.rank > b.rank : a.left > b.left;
}

}  // namespace

struct Tokenizer::EncodeScratch {
  std::vector<uint32_t> cpts;
  std::vector<CodepointClass> classes;
  std::vector<size_t> word_ends;
  std::vector<size_t> word_ends_scratch;
  std::string word_bytes;
  std::vector<Symbol> symbols;
  std::vector<MergeCandidate> heap;
};

Tokenizer::Tokenizer(TokenizerVocab vocab) : vocab_(std::move(vocab)) {
  if (vocab_.model != "gpt2") {
    fail("tokenizer: unsupported tokenizer model '{}' (only byte-level BPE, 'gpt2', is implemented)", vocab_.model);
  }
  // Names as llama.cpp spells them; a GGUF without tokenizer.ggml.pre gets "default".
  if (vocab_.pre == "smollm") {
    pre_tokenizer_ = PreTokenizer::SmolLM;
  } else if (vocab_.pre == "gpt-2") {
    pre_tokenizer_ = PreTokenizer::Gpt2;
  } else if (vocab_.pre == "default" || vocab_.pre.empty()) {
    pre_tokenizer_ = PreTokenizer::Default;
  } else {
    fail("tokenizer: unsupported pre-tokenizer '{}' (implemented: smollm, gpt-2, default)", vocab_.pre);
  }

  const size_t n_tokens = vocab_.tokens.size();
  if (n_tokens == 0 || n_tokens > static_cast<size_t>(INT32_MAX)) {
    fail("tokenizer: vocabulary has {} tokens", n_tokens);
  }
  if (vocab_.token_types.size() != n_tokens) {
    fail("tokenizer: {} token types for {} tokens", vocab_.token_types.size(), n_tokens);
  }
  for (const auto& [name, id] : {std::pair{"bos", vocab_.bos_id}, std::pair{"eos", vocab_.eos_id},
                                 std::pair{"unk", vocab_.unk_id}, std::pair{"pad", vocab_.pad_id}}) {
    if (id < -1 || id >= n_vocab()) fail("tokenizer: {} token id {} is outside the vocabulary of {}", name, id, n_tokens);
  }
  if (vocab_.add_bos && vocab_.bos_id < 0) fail("tokenizer: add_bos is set but the vocabulary has no BOS token");

  // A text listed twice maps to its last id, as in llama.cpp.
  token_ids_.reserve(n_tokens);
  for (size_t id = 0; id < n_tokens; ++id) token_ids_[vocab_.tokens[id]] = static_cast<int32_t>(id);

  for (uint32_t b = 0; b < 256; ++b) {
    std::string character;
    append_utf8(kByteCodepoints[b], character);
    byte_token_[b] = find_token(character);
  }

  merges_.reserve(vocab_.merges.size());
  for (size_t rank = 0; rank < vocab_.merges.size(); ++rank) {
    const std::string& merge = vocab_.merges[rank];
    const size_t space = merge.find(' ', 1);  // from 1: a pair's left side is never empty
    if (space == std::string::npos) fail("tokenizer: merge {} '{}' is not \"left right\"", rank, merge);
    const std::string_view left = std::string_view(merge).substr(0, space);
    const std::string_view right = std::string_view(merge).substr(space + 1);
    const int32_t left_id = find_token(left);
    const int32_t right_id = find_token(right);
    const int32_t merged_id = find_token(std::string(left) + std::string(right));
    if (left_id < 0 || right_id < 0 || merged_id < 0) {
      fail("tokenizer: merge {} '{}' involves text that is not a token of the vocabulary", rank, merge);
    }
    const uint64_t key = (static_cast<uint64_t>(left_id) << 32) | static_cast<uint32_t>(right_id);
    merges_.try_emplace(key, Merge{static_cast<int32_t>(rank), merged_id});  // a repeated pair keeps its first rank
  }

  // What each token prints as. Normal tokens are byte-level text; a character
  // outside the byte-level alphabet is kept as it is (llama.cpp prints an
  // "[UNK_BYTE_...]" marker there instead).
  std::array<int16_t, kByteCodepointLimit> codepoint_byte;
  codepoint_byte.fill(-1);
  for (uint32_t b = 0; b < 256; ++b) codepoint_byte[kByteCodepoints[b]] = static_cast<int16_t>(b);
  token_bytes_.resize(n_tokens);
  std::vector<uint32_t> cpts;
  for (size_t id = 0; id < n_tokens; ++id) {
    const std::string& text = vocab_.tokens[id];
    std::string& bytes = token_bytes_[id];
    switch (vocab_.token_types[id]) {
      case kTokenNormal:
        decode_utf8(text, cpts);
        for (const uint32_t cpt : cpts) {
          if (cpt < kByteCodepointLimit && codepoint_byte[cpt] >= 0) {
            bytes.push_back(static_cast<char>(codepoint_byte[cpt]));
          } else {
            append_utf8(cpt, bytes);
          }
        }
        break;
      case kTokenUserDefined:
        bytes = text;
        break;
      case kTokenByte: {  // "<0xAB>"
        uint8_t value = 0;
        const char* hex_end = text.data() + std::min<size_t>(text.size(), 5);
        if (text.size() != 6 || !text.starts_with("<0x") || text[5] != '>' ||
            std::from_chars(text.data() + 3, hex_end, value, 16).ptr != hex_end) {
          fail("tokenizer: byte token {} '{}' is not of the form <0xAB>", id, text);
        }
        bytes.push_back(static_cast<char>(value));
        break;
      }
      default:  // control, unknown and unused tokens print nothing
        break;
    }
  }

  // Split out before pre-tokenization, longest first so that a special token
  // containing another wins (llama.cpp's order; ties by id for determinism).
  for (size_t id = 0; id < n_tokens; ++id) {
    const int32_t type = vocab_.token_types[id];
    if ((type == kTokenControl || type == kTokenUserDefined || type == kTokenUnknown) && !vocab_.tokens[id].empty()) {
      special_ids_.push_back(static_cast<int32_t>(id));
    }
  }
  std::stable_sort(special_ids_.begin(), special_ids_.end(), [&](int32_t a, int32_t b) {
    return vocab_.tokens[a].size() > vocab_.tokens[b].size();
  });

  // Control tokens that end a turn: the common ones of llama.cpp's end-of-generation list.
  end_of_generation_.assign(n_tokens, false);
  if (vocab_.eos_id >= 0) end_of_generation_[vocab_.eos_id] = true;
  for (const char* text : {"<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<|eom_id|>", "<end_of_turn>",
                           "<|end_of_text|>"}) {
    const int32_t id = find_token(text);
    if (id >= 0 && vocab_.token_types[id] == kTokenControl) end_of_generation_[id] = true;
  }
}

TokenizerVocab Tokenizer::vocab_from_gguf(const GgufFile& file) {
  TokenizerVocab vocab;
  vocab.model = file.get_string("tokenizer.ggml.model");
  if (file.has("tokenizer.ggml.pre")) vocab.pre = file.get_string("tokenizer.ggml.pre");
  vocab.tokens = file.get_string_array("tokenizer.ggml.tokens");
  if (file.has("tokenizer.ggml.token_type")) {
    for (const int64_t type : file.get_int_array("tokenizer.ggml.token_type")) {
      vocab.token_types.push_back(static_cast<int32_t>(type));
    }
  } else {
    vocab.token_types.assign(vocab.tokens.size(), kTokenNormal);  // llama.cpp's default too
  }
  if (vocab.model == "gpt2") vocab.merges = file.get_string_array("tokenizer.ggml.merges");
  auto read_id = [&](std::string_view key, int32_t& id) {
    if (!file.has(key)) return;
    const int64_t value = file.get_int(key);
    if (value < 0 || value >= static_cast<int64_t>(vocab.tokens.size())) {
      fail("{}: token id {} is outside the vocabulary of {}", key, value, vocab.tokens.size());
    }
    id = static_cast<int32_t>(value);
  };
  read_id("tokenizer.ggml.bos_token_id", vocab.bos_id);
  read_id("tokenizer.ggml.eos_token_id", vocab.eos_id);
  read_id("tokenizer.ggml.unknown_token_id", vocab.unk_id);
  read_id("tokenizer.ggml.padding_token_id", vocab.pad_id);
  if (file.has("tokenizer.ggml.add_bos_token")) vocab.add_bos = file.get_bool("tokenizer.ggml.add_bos_token");
  if (file.has("tokenizer.chat_template")) vocab.chat_template = file.get_string("tokenizer.chat_template");
  return vocab;
}

int32_t Tokenizer::find_token(std::string_view text) const {
  const auto it = token_ids_.find(text);
  return it == token_ids_.end() ? -1 : it->second;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool parse_special) const {
  // Fragments of the text in order: raw text [begin, end) or one special token.
  struct Fragment {
    size_t begin, end;
    int32_t token;  // -1 for raw text
  };
  std::vector<Fragment> fragments;
  if (!text.empty()) fragments.push_back({0, text.size(), -1});
  std::vector<Fragment> refined;
  for (const int32_t special_id : special_ids_) {
    // Without parse_special only user-defined tokens are split out (as in llama.cpp).
    if (!parse_special && vocab_.token_types[special_id] != kTokenUserDefined) continue;
    const std::string& special = vocab_.tokens[special_id];
    refined.clear();
    for (const Fragment& fragment : fragments) {
      if (fragment.token >= 0) {
        refined.push_back(fragment);
        continue;
      }
      size_t begin = fragment.begin;
      for (;;) {
        const size_t match = text.substr(0, fragment.end).find(special, begin);
        if (match == std::string_view::npos) break;
        if (match > begin) refined.push_back({begin, match, -1});
        refined.push_back({match, match + special.size(), special_id});
        begin = match + special.size();
      }
      if (begin < fragment.end) refined.push_back({begin, fragment.end, -1});
    }
    fragments.swap(refined);
  }

  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3);
  EncodeScratch scratch;
  for (const Fragment& fragment : fragments) {
    if (fragment.token >= 0) {
      ids.push_back(fragment.token);
    } else {
      encode_text(text.substr(fragment.begin, fragment.end - fragment.begin), scratch, ids);
    }
  }
  return ids;
}

void Tokenizer::encode_text(std::string_view text, EncodeScratch& scratch, std::vector<int32_t>& ids) const {
  decode_utf8(text, scratch.cpts);
  const size_t n = scratch.cpts.size();
  scratch.classes.resize(n);
  for (size_t i = 0; i < n; ++i) scratch.classes[i] = codepoint_class(scratch.cpts[i]);
  const SplitText split{scratch.cpts, scratch.classes};

  std::vector<size_t>& ends = scratch.word_ends;
  std::vector<size_t>& spare = scratch.word_ends_scratch;
  ends.assign(1, n);
  auto gpt2 = [&](size_t begin, size_t end, std::vector<size_t>& out) { split_gpt2(split, begin, end, out); };
  switch (pre_tokenizer_) {
    case PreTokenizer::SmolLM:
      refine(ends, spare, isolate_matches([&](size_t pos, size_t) { return match_number(split, pos); }));
      refine(ends, spare, gpt2);
      break;
    case PreTokenizer::Gpt2:
      refine(ends, spare, gpt2);
      break;
    case PreTokenizer::Default:
      refine(ends, spare, isolate_matches([&](size_t pos, size_t end) { return match_punctuation_run(split, pos, end); }));
      refine(ends, spare, gpt2);
      refine(ends, spare, isolate_matches([&](size_t pos, size_t end) { return match_number_run(split, pos, end); }));
      refine(ends, spare, isolate_matches([&](size_t pos, size_t end) { return match_ascii_digit_triple(split, pos, end); }));
      break;
  }

  size_t begin = 0;
  for (const size_t end : ends) {
    // Words are re-encoded from codepoints, so invalid bytes arrive as U+FFFD.
    scratch.word_bytes.clear();
    for (size_t i = begin; i < end; ++i) append_utf8(scratch.cpts[i], scratch.word_bytes);
    encode_word(scratch, ids);
    begin = end;
  }
}

void Tokenizer::encode_word(EncodeScratch& scratch, std::vector<int32_t>& ids) const {
  const std::string& bytes = scratch.word_bytes;
  std::vector<Symbol>& symbols = scratch.symbols;
  const int32_t n = static_cast<int32_t>(bytes.size());
  symbols.resize(n);
  for (int32_t i = 0; i < n; ++i) {
    symbols[i] = {byte_token_[static_cast<uint8_t>(bytes[i])], i - 1, i + 1 < n ? i + 1 : -1};
  }

  std::vector<MergeCandidate>& heap = scratch.heap;
  heap.clear();
  auto consider = [&](int32_t left) {
    if (left < 0) return;
    const int32_t right = symbols[left].next;
    if (right < 0 || symbols[left].id < 0 || symbols[right].id < 0) return;
    const uint64_t key = (static_cast<uint64_t>(symbols[left].id) << 32) | static_cast<uint32_t>(symbols[right].id);
    const auto it = merges_.find(key);
    if (it == merges_.end()) return;
    heap.push_back({it->second.rank, left, symbols[left].id, symbols[right].id, it->second.merged_id});
    std::push_heap(heap.begin(), heap.end(), later_merge);
  };
  for (int32_t i = 0; i + 1 < n; ++i) consider(i);

  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later_merge);
    const MergeCandidate candidate = heap.back();
    heap.pop_back();
    Symbol& left = symbols[candidate.left];
    if (left.id != candidate.left_id || left.next < 0 || symbols[left.next].id != candidate.right_id) continue;
    Symbol& right = symbols[left.next];
    left.id = candidate.merged_id;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = candidate.left;
    right.id = kMergedAway;
    consider(left.prev);
    consider(candidate.left);
  }

  // Symbol 0 is never merged away (merges absorb the right side), so the chain starts there.
  for (int32_t i = n > 0 ? 0 : -1; i >= 0; i = symbols[i].next) {
    if (symbols[i].id >= 0) {
      ids.push_back(symbols[i].id);
      continue;
    }
    // A byte whose byte-level character is missing from the vocabulary: llama.cpp
    // looks up each byte of that character's UTF-8 as a one-byte token, which
    // byte-level vocabularies do not have, so the byte is usually dropped.
    std::string character;
    append_utf8(kByteCodepoints[static_cast<uint8_t>(bytes[i])], character);
    for (const char c : character) {
      const int32_t id = find_token(std::string_view(&c, 1));
      if (id >= 0) ids.push_back(id);
    }
  }
}

std::string Tokenizer::decode(std::span<const int32_t> ids) const {
  std::string text;
  for (const int32_t id : ids) text += token_text(id);
  return text;
}

std::string Tokenizer::token_text(int32_t id) const {
  if (id < 0 || id >= n_vocab()) fail("tokenizer: token id {} is outside the vocabulary of {}", id, n_vocab());
  return token_bytes_[id];
}

bool Tokenizer::is_end_of_generation(int32_t id) const {
  return id >= 0 && id < n_vocab() && end_of_generation_[id];
}

namespace {

// The default system message a ChatML template writes when the conversation has
// none: the text of a literal "<|im_start|>system\n...<|im_end|>" in the
// template. Occurrences that splice in Jinja expressions (the caller's system
// message) are skipped. Empty if there is none.
std::string default_system_message(std::string_view chat_template) {
  static constexpr std::string_view kSystemStart = "<|im_start|>system";
  static constexpr std::string_view kEnd = "<|im_end|>";
  for (size_t pos = chat_template.find(kSystemStart); pos != std::string_view::npos;
       pos = chat_template.find(kSystemStart, pos + 1)) {
    std::string_view rest = chat_template.substr(pos + kSystemStart.size());
    // The newline is a real one in some templates and a "\n" escape inside a Jinja string in others.
    if (rest.starts_with("\n")) {
      rest.remove_prefix(1);
    } else if (rest.starts_with("\\n")) {
      rest.remove_prefix(2);
    } else {
      continue;
    }
    const size_t end = rest.find(kEnd);
    if (end == std::string_view::npos) continue;
    const std::string_view message = rest.substr(0, end);
    if (message.empty() || message.find_first_of("{}'\"") != std::string_view::npos) continue;
    return std::string(message);
  }
  return {};
}

}  // namespace

std::string Tokenizer::apply_chat_template(std::string_view user_message) const {
  if (vocab_.chat_template.empty()) fail("tokenizer: the model has no chat template (tokenizer.chat_template)");
  if (vocab_.chat_template.find("<|im_start|>") == std::string::npos) {
    fail("tokenizer: unsupported chat template (only ChatML, with <|im_start|>, is implemented)");
  }
  std::string prompt;
  const std::string system = default_system_message(vocab_.chat_template);
  if (!system.empty()) prompt += "<|im_start|>system\n" + system + "<|im_end|>\n";
  prompt += "<|im_start|>user\n";
  prompt += user_message;
  prompt += "<|im_end|>\n<|im_start|>assistant\n";
  return prompt;
}

}  // namespace kvq
