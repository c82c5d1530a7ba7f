// KL divergence of a KV format's next-token distributions against fp16's on
// the same windows of a text, with top-1 agreement: the format's backends run
// every chunk right after the reference, so only one chunk of reference logits
// is held at a time.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

namespace kvq {

class Backend;
class PageTables;
struct LlamaConfig;

struct LogitsComparison {
  double kl = 0;            // KL(reference || other) in nats
  bool top1_agree = false;  // same argmax (first index on ties)
};
// One position's two logits rows, (vocab) each.
LogitsComparison compare_logits(std::span<const float> reference, std::span<const float> other);

struct KlSummary {
  int64_t tokens = 0;
  double kl_mean = 0;     // nats per token
  double kl_p99 = 0;      // 99th percentile of per-token KL (nearest rank)
  double top1_agree = 0;  // percent of tokens whose argmax matches the reference's
};
KlSummary summarize_kl(std::vector<double> per_token_kl, int64_t top1_agreements);

struct KlOptions {
  int32_t length = 2048;  // tokens per window, BOS included
  int32_t windows = 1;    // consecutive, non-overlapping windows from the text's start
  int32_t chunk = 2048;   // most tokens per forward step
  int32_t bos_id = -1;    // starts every window when >= 0
};

struct BackendWithTables {
  Backend* backend;
  PageTables* tables;
};

// One summary per entry of `formats`, every logits row of every window compared
// with `reference`'s. Throws when the text is shorter than the windows.
// progress(done, total) after each window.
std::vector<KlSummary> evaluate_kl(const LlamaConfig& config, BackendWithTables reference,
                                   std::span<const BackendWithTables> formats, std::span<const int32_t> tokens,
                                   const KlOptions& options, const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace kvq
