// Generation over a ragged batch: requests are admitted in order as the page
// pool allows, prompts are prefilled in chunks, decode steps batch every live
// sequence, and a finished sequence's pages return to the pool at once.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "engine/sampler.h"

namespace kvq {

class Backend;
class PageTables;
struct LlamaConfig;

struct GenerationRequest {
  std::vector<int32_t> prompt;  // token ids, BOS included if the model wants one
  int32_t max_new_tokens = 0;
};

struct GenerationResult {
  std::vector<int32_t> tokens;  // generated ids, end-of-generation token excluded
  std::string stop_reason;      // "eos" | "length" | "context"
  double first_token_s = 0;     // from the start of generate()
  double finish_s = 0;
};

struct GenerationStats {
  int64_t prompt_tokens = 0;
  int64_t generated_tokens = 0;
  double prefill_s = 0;  // steps that carried prompt tokens
  double decode_s = 0;   // steps of decode tokens only
  int32_t peak_used_pages = 0;
  int64_t steps = 0;
};

struct GeneratorOptions {
  int32_t chunk = 2048;  // most tokens one step carries
  SamplerOptions sampling;
  // Hold decode tokens until every admitted prompt is prefilled, so that no step mixes the two phases and the
  // decode steps carry the whole batch (benchmarks: decode_s then times what a batched prefill-then-decode
  // baseline times). Off: a finished prompt's decode tokens ride along with the next prompts' chunks.
  bool decode_after_prefill = false;
};

// KV slots a request reserves: its prompt and every generated token but the
// last (never fed back), capped at the context.
int64_t kv_tokens_needed(int64_t prompt_tokens, int32_t max_new_tokens, int32_t context);

class Generator {
 public:
  Generator(const LlamaConfig& config, Backend& backend, PageTables& tables, GeneratorOptions options,
            std::function<bool(int32_t)> is_end_of_generation);

  // Throws before running anything if a request is empty, longer than the
  // context, or can never fit in the pool. on_token(request index, id) is
  // called as each token is chosen.
  std::vector<GenerationResult> generate(const std::vector<GenerationRequest>& requests,
                                         const std::function<void(size_t, int32_t)>& on_token = {});
  const GenerationStats& stats() const { return stats_; }

 private:
  const LlamaConfig& config_;
  Backend& backend_;
  PageTables& tables_;
  GeneratorOptions options_;
  std::function<bool(int32_t)> is_end_of_generation_;
  GenerationStats stats_;
};

}  // namespace kvq
