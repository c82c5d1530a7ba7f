// Scheduling loop of the generator.
#include "engine/generator.h"

#include <algorithm>
#include <chrono>

#include "core/error.h"
#include "engine/step_batch.h"
#include "kv/page_tables.h"
#include "model/llama.h"

namespace kvq {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

struct LiveSequence {
  size_t request = 0;
  int64_t prefilled = 0;      // prompt tokens already run
  int32_t last_token = -1;    // sampled token to feed next (decode phase)
  bool decoding() const { return last_token >= 0; }
};

}  // namespace

Generator::Generator(const LlamaConfig& config, Backend& backend, PageTables& tables, GeneratorOptions options,
                     std::function<bool(int32_t)> is_end_of_generation)
    : config_(config),
      backend_(backend),
      tables_(tables),
      options_(options),
      is_end_of_generation_(std::move(is_end_of_generation)) {
  if (options_.chunk <= 0) fail("--chunk must be positive, got {}", options_.chunk);
}

int64_t kv_tokens_needed(int64_t prompt_tokens, int32_t max_new_tokens, int32_t context) {
  return std::min<int64_t>(prompt_tokens + max_new_tokens - 1, context);
}

std::vector<GenerationResult> Generator::generate(const std::vector<GenerationRequest>& requests,
                                                  const std::function<void(size_t, int32_t)>& on_token) {
  for (size_t r = 0; r < requests.size(); ++r) {
    const GenerationRequest& req = requests[r];
    if (req.prompt.empty()) fail("request {}: the prompt is empty", r + 1);
    if (static_cast<int64_t>(req.prompt.size()) > config_.context) {
      fail("request {}: the prompt has {} tokens, longer than the model's context of {}", r + 1, req.prompt.size(),
           config_.context);
    }
    if (req.max_new_tokens < 1) fail("request {}: -n must be at least 1, got {}", r + 1, req.max_new_tokens);
    const int64_t needed = kv_tokens_needed(static_cast<int64_t>(req.prompt.size()), req.max_new_tokens, config_.context);
    const int32_t pages = tables_.pages_for_tokens(needed);
    if (pages > tables_.n_pages()) {
      fail("request {}: needs {} KV pages ({} tokens) but the pool holds only {}; raise --pool-gib or lower -n", r + 1,
           pages, needed, tables_.n_pages());
    }
  }

  Sampler sampler(options_.sampling);
  std::vector<GenerationResult> results(requests.size());
  std::vector<LiveSequence> live;
  size_t next_request = 0;
  const auto start = Clock::now();
  StepBatch batch;
  std::vector<float> logits;
  std::vector<int32_t> greedy_tokens;  // (chunks) when sampling is greedy: the backend picks the tokens

  while (next_request < requests.size() || !live.empty()) {
    // Admit in order while the pool has room for a request's whole KV.
    while (next_request < requests.size()) {
      const int32_t seq = static_cast<int32_t>(next_request);
      tables_.add_sequence(seq);
      const GenerationRequest& request = requests[next_request];
      if (!tables_.reserve(seq, kv_tokens_needed(static_cast<int64_t>(request.prompt.size()), request.max_new_tokens,
                                                 config_.context))) {
        tables_.free_sequence(seq);
        backend_.release_sequence(seq);
        break;
      }
      live.push_back({next_request, 0, -1});
      ++next_request;
    }
    stats_.peak_used_pages = std::max(stats_.peak_used_pages, tables_.n_used_pages());

    // Decode tokens first (one each), then prompt chunks up to the step budget.
    batch.tokens.clear();
    batch.chunks.clear();
    int32_t budget = options_.chunk;
    bool has_prompt_tokens = false;
    const bool hold_decode = options_.decode_after_prefill &&
                             std::any_of(live.begin(), live.end(), [](const LiveSequence& s) { return !s.decoding(); });
    for (LiveSequence& s : live) {
      if (!s.decoding() || hold_decode) continue;
      const int32_t seq = static_cast<int32_t>(s.request);
      batch.add_chunk(seq, tables_.length(seq), &s.last_token, 1, false);
      --budget;
    }
    for (LiveSequence& s : live) {
      if (s.decoding() || budget <= 0) continue;
      const std::vector<int32_t>& prompt = requests[s.request].prompt;
      int32_t n = static_cast<int32_t>(std::min<int64_t>(budget, static_cast<int64_t>(prompt.size()) - s.prefilled));
      batch.add_chunk(static_cast<int32_t>(s.request), s.prefilled, prompt.data() + s.prefilled, n, false);
      budget -= n;
      has_prompt_tokens = true;
    }

    const auto step_start = Clock::now();
    if (sampler.greedy()) {
      backend_.forward_greedy(batch, tables_, greedy_tokens);
    } else {
      backend_.forward(batch, tables_, logits);
    }
    (has_prompt_tokens ? stats_.prefill_s : stats_.decode_s) += seconds_since(step_start);
    ++stats_.steps;

    // Consume the logits rows (one per chunk) and retire finished sequences.
    std::vector<LiveSequence> still_live;
    for (LiveSequence& s : live) {
      auto chunk_it = std::find_if(batch.chunks.begin(), batch.chunks.end(),
                                   [&](const SequenceChunk& c) { return c.seq == static_cast<int32_t>(s.request); });
      if (chunk_it == batch.chunks.end()) {  // not in this step: a prompt waiting for budget, or a held decode
        still_live.push_back(s);
        continue;
      }
      const size_t logits_row = static_cast<size_t>(chunk_it - batch.chunks.begin());  // one row per chunk
      const int32_t seq = static_cast<int32_t>(s.request);
      tables_.append(seq, chunk_it->n_tokens);
      const GenerationRequest& req = requests[s.request];
      GenerationResult& result = results[s.request];
      if (!s.decoding()) {
        s.prefilled += chunk_it->n_tokens;
        stats_.prompt_tokens += chunk_it->n_tokens;
        if (s.prefilled < static_cast<int64_t>(req.prompt.size())) {
          still_live.push_back(s);
          continue;
        }
        result.first_token_s = seconds_since(start);
      }
      const int32_t token =
          sampler.greedy() ? greedy_tokens[logits_row]
                           : sampler.sample(std::span<const float>(logits.data() + logits_row * config_.vocab,
                                                                   static_cast<size_t>(config_.vocab)));
      bool done = false;
      if (is_end_of_generation_(token)) {
        result.stop_reason = "eos";
        done = true;
      } else {
        result.tokens.push_back(token);
        ++stats_.generated_tokens;
        if (on_token) on_token(s.request, token);
        if (static_cast<int32_t>(result.tokens.size()) >= req.max_new_tokens) {
          result.stop_reason = "length";
          done = true;
        } else if (tables_.length(seq) >= config_.context) {
          result.stop_reason = "context";
          done = true;
        }
      }
      if (done) {
        result.finish_s = seconds_since(start);
        tables_.free_sequence(seq);
        backend_.release_sequence(seq);
      } else {
        s.last_token = token;
        still_live.push_back(s);
      }
    }
    live.swap(still_live);
  }
  return results;
}

}  // namespace kvq
