// Perplexity over windows run as single-sequence batches, chunked like prefill.
#include "eval/perplexity.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "engine/step_batch.h"
#include "kv/page_tables.h"
#include "model/llama.h"

namespace kvq {

double log_sum_exp(std::span<const float> row) {
  const float max_logit = *std::max_element(row.begin(), row.end());
  double sum_exp = 0;
  for (const float logit : row) sum_exp += std::exp(static_cast<double>(logit - max_logit));
  return std::log(sum_exp) + max_logit;
}

void forward_chunk_all_logits(Backend& backend, PageTables& tables, int32_t seq, int64_t pos,
                              std::span<const int32_t> tokens, StepBatch& batch, std::vector<float>& logits) {
  batch.tokens.clear();
  batch.chunks.clear();
  batch.add_chunk(seq, pos, tokens.data(), static_cast<int32_t>(tokens.size()), true);
  backend.forward(batch, tables, logits);
  tables.append(seq, static_cast<int32_t>(tokens.size()));
}

PerplexityResult evaluate_perplexity(const LlamaConfig& config, Backend& backend, PageTables& tables,
                                     std::span<const int32_t> tokens, const PerplexityOptions& options,
                                     const std::function<void(int64_t, int64_t)>& progress) {
  const bool bos = options.bos_id >= 0;
  const int64_t text_per_window = options.ctx - (bos ? 1 : 0);
  if (options.ctx < 2 || options.ctx > config.context) {
    fail("--ctx must be in 2..{} (the model's context), got {}", config.context, options.ctx);
  }
  if (options.stride < 1 || options.stride > text_per_window) {
    fail("--stride must be in 1..{}, got {}", text_per_window, options.stride);
  }
  if (options.chunk < 1) fail("--chunk must be positive, got {}", options.chunk);
  if (tables.pages_for_tokens(options.ctx) > tables.n_pages()) {
    fail("a window of {} tokens needs {} KV pages but the pool holds {}; raise --pool-gib", options.ctx,
         tables.pages_for_tokens(options.ctx), tables.n_pages());
  }
  const int64_t n = static_cast<int64_t>(tokens.size());
  if (n < (bos ? 1 : 2)) fail("the text has {} tokens: too few to score", n);

  int64_t n_windows = 1;
  while ((n_windows - 1) * options.stride + text_per_window < n) ++n_windows;

  double sum_nll = 0, sum_nll_sq = 0;
  int64_t scored = 0;
  int64_t scored_until = bos ? 0 : 1;  // first text index not yet scored
  PerplexityResult result;
  StepBatch batch;
  std::vector<float> logits;
  std::vector<int32_t> window;
  const int32_t seq = 0;
  for (int64_t w = 0; w < n_windows; ++w) {
    const int64_t begin = w * options.stride;
    const int64_t end = std::min(n, begin + text_per_window);
    window.clear();
    if (bos) window.push_back(options.bos_id);
    window.insert(window.end(), tokens.begin() + begin, tokens.begin() + end);
    const int64_t offset = bos ? 1 : 0;  // window index of text token `begin`

    tables.add_sequence(seq);
    tables.reserve(seq, static_cast<int64_t>(window.size()));
    for (int64_t pos = 0; pos < static_cast<int64_t>(window.size()); pos += options.chunk) {
      const int32_t len = static_cast<int32_t>(std::min<int64_t>(options.chunk, window.size() - pos));
      forward_chunk_all_logits(backend, tables, seq, pos, std::span<const int32_t>(window.data() + pos, len), batch,
                               logits);
      // Row r predicts window[pos + r + 1], i.e. text index begin + pos + r + 1 - offset.
#pragma omp parallel for schedule(static) reduction(+ : sum_nll, sum_nll_sq, scored)
      for (int32_t r = 0; r < len; ++r) {
        const int64_t target = begin + pos + r + 1 - offset;
        if (target < scored_until || target >= end) continue;
        const float* row = logits.data() + static_cast<size_t>(r) * config.vocab;
        const double nll = log_sum_exp(std::span<const float>(row, config.vocab)) - row[tokens[target]];
        sum_nll += nll;
        sum_nll_sq += nll * nll;
        ++scored;
      }
    }
    tables.free_sequence(seq);
    backend.release_sequence(seq);
    scored_until = end;
    ++result.windows;
    if (progress) progress(w + 1, n_windows);
  }

  result.tokens_scored = scored;
  const double count = static_cast<double>(scored);
  result.mean_nll = sum_nll / count;
  const double variance = std::max(0.0, sum_nll_sq / count - result.mean_nll * result.mean_nll);
  result.ppl = std::exp(result.mean_nll);
  result.ppl_stderr = result.ppl * std::sqrt(variance / count);
  return result;
}

}  // namespace kvq
