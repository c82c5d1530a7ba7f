// KL divergence against the fp16 reference, chunk by chunk in lockstep.
#include "eval/kl.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "engine/step_batch.h"
#include "eval/perplexity.h"
#include "kv/page_tables.h"
#include "model/llama.h"

namespace kvq {

LogitsComparison compare_logits(std::span<const float> reference, std::span<const float> other) {
  // KL(p || q) = sum p (log p - log q) with log p = a - lse(a), log q = b - lse(b).
  const double lse_reference = log_sum_exp(reference);
  const double lse_other = log_sum_exp(other);
  double kl = 0;
  for (size_t v = 0; v < reference.size(); ++v) {
    const double log_p = reference[v] - lse_reference;
    kl += std::exp(log_p) * (log_p - (other[v] - lse_other));
  }
  LogitsComparison result;
  result.kl = std::max(0.0, kl);  // rounding can leave -1e-17 for equal rows
  result.top1_agree = std::max_element(reference.begin(), reference.end()) - reference.begin() ==
                      std::max_element(other.begin(), other.end()) - other.begin();
  return result;
}

KlSummary summarize_kl(std::vector<double> per_token_kl, int64_t top1_agreements) {
  KlSummary summary;
  summary.tokens = static_cast<int64_t>(per_token_kl.size());
  if (per_token_kl.empty()) return summary;
  double sum = 0;
  for (const double kl : per_token_kl) sum += kl;
  const double n = static_cast<double>(per_token_kl.size());
  summary.kl_mean = sum / n;
  const size_t rank = static_cast<size_t>(std::ceil(0.99 * n)) - 1;
  std::nth_element(per_token_kl.begin(), per_token_kl.begin() + rank, per_token_kl.end());
  summary.kl_p99 = per_token_kl[rank];
  summary.top1_agree = 100.0 * static_cast<double>(top1_agreements) / n;
  return summary;
}

std::vector<KlSummary> evaluate_kl(const LlamaConfig& config, BackendWithTables reference,
                                   std::span<const BackendWithTables> formats, std::span<const int32_t> tokens,
                                   const KlOptions& options, const std::function<void(int64_t, int64_t)>& progress) {
  const bool bos = options.bos_id >= 0;
  const int64_t text_per_window = options.length - (bos ? 1 : 0);
  if (options.length < 2 || options.length > config.context) {
    fail("kl: length {} must be in 2..{} (the model's context)", options.length, config.context);
  }
  if (options.chunk < 1) fail("--chunk must be positive, got {}", options.chunk);
  if (options.windows * text_per_window > static_cast<int64_t>(tokens.size())) {
    fail("kl: {} windows of {} tokens need {} text tokens; the text has {}", options.windows, options.length,
         options.windows * text_per_window, tokens.size());
  }
  std::vector<BackendWithTables> all = {reference};
  all.insert(all.end(), formats.begin(), formats.end());
  for (const BackendWithTables& b : all) {
    if (b.tables->pages_for_tokens(options.length) > b.tables->n_pages()) {
      fail("kl: a window of {} tokens needs {} KV pages but the pool holds {}; raise --pool-gib", options.length,
           b.tables->pages_for_tokens(options.length), b.tables->n_pages());
    }
  }

  std::vector<std::vector<double>> kls(formats.size());
  std::vector<int64_t> agreements(formats.size(), 0);
  StepBatch batch;
  std::vector<float> reference_logits, logits;
  std::vector<int32_t> window;
  const int32_t seq = 0;
  const size_t vocab = static_cast<size_t>(config.vocab);
  for (int32_t w = 0; w < options.windows; ++w) {
    window.clear();
    if (bos) window.push_back(options.bos_id);
    const auto text = tokens.begin() + w * text_per_window;
    window.insert(window.end(), text, text + text_per_window);
    for (const BackendWithTables& b : all) {
      b.tables->add_sequence(seq);
      b.tables->reserve(seq, static_cast<int64_t>(window.size()));
    }
    for (int64_t pos = 0; pos < static_cast<int64_t>(window.size()); pos += options.chunk) {
      const std::span<const int32_t> chunk(window.data() + pos,
                                           std::min<size_t>(options.chunk, window.size() - static_cast<size_t>(pos)));
      forward_chunk_all_logits(*reference.backend, *reference.tables, seq, pos, chunk, batch, reference_logits);
      for (size_t f = 0; f < formats.size(); ++f) {
        forward_chunk_all_logits(*formats[f].backend, *formats[f].tables, seq, pos, chunk, batch, logits);
        std::vector<double>& out = kls[f];
        const size_t first = out.size();
        out.resize(first + chunk.size());
        int64_t agree = 0;
#pragma omp parallel for schedule(static) reduction(+ : agree)
        for (size_t r = 0; r < chunk.size(); ++r) {
          const LogitsComparison c = compare_logits(std::span<const float>(reference_logits.data() + r * vocab, vocab),
                                                    std::span<const float>(logits.data() + r * vocab, vocab));
          out[first + r] = c.kl;
          agree += c.top1_agree;
        }
        agreements[f] += agree;
      }
    }
    for (const BackendWithTables& b : all) {
      b.tables->free_sequence(seq);
      b.backend->release_sequence(seq);
    }
    if (progress) progress(w + 1, options.windows);
  }

  std::vector<KlSummary> summaries;
  for (size_t f = 0; f < formats.size(); ++f) summaries.push_back(summarize_kl(std::move(kls[f]), agreements[f]));
  return summaries;
}

}  // namespace kvq
