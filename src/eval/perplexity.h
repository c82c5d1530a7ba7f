// Sliding-window perplexity: windows of `ctx` tokens advance by `stride`;
// each token is scored once, by the first window that predicts it.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

namespace kvq {

class Backend;
class PageTables;
struct LlamaConfig;
struct StepBatch;

struct PerplexityOptions {
  int32_t ctx = 2048;
  int32_t stride = 1024;
  int32_t chunk = 2048;  // most tokens per forward step
  int32_t bos_id = -1;   // prepended to every window when >= 0 (the window then holds ctx - 1 text tokens)
};

struct PerplexityResult {
  int64_t tokens_scored = 0;
  int64_t windows = 0;
  double mean_nll = 0;    // nats per token
  double ppl = 0;         // exp(mean_nll)
  double ppl_stderr = 0;  // ppl * stderr(mean_nll), delta method
};

// log(sum(exp(row))), stable: the normalizer of a logits row.
double log_sum_exp(std::span<const float> row);

// Runs `tokens` as the chunk of sequence `seq` starting at `pos` (its pages
// reserved in `tables`), appends it to the sequence and leaves the logits of
// every token, (tokens.size(), vocab), in `logits`. `batch` is scratch.
void forward_chunk_all_logits(Backend& backend, PageTables& tables, int32_t seq, int64_t pos,
                              std::span<const int32_t> tokens, StepBatch& batch, std::vector<float>& logits);

// tokens: the text's ids (already capped by --max-tokens). progress(done, total) after each window.
PerplexityResult evaluate_perplexity(const LlamaConfig& config, Backend& backend, PageTables& tables,
                                     std::span<const int32_t> tokens, const PerplexityOptions& options,
                                     const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace kvq
