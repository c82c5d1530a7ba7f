// What the GEMMs alone allow on the CPU: the forward's matrix products (fused
// QKV, O, gate+up, down per layer; logits for one row per sequence) timed on
// their own with the model's weights, so prefill tok/s can be compared with
// the rate OpenBLAS reaches on the same shapes.
#pragma once

#include <cstdint>
#include <vector>

namespace kvq {

struct LlamaConfig;
struct LlamaWeights;

struct GemmCeiling {
  double seconds = 0;  // median over repeats, one forward's GEMMs
  double flops = 0;    // 2 * m * n * k summed over the GEMMs
  double gflop_s() const { return seconds > 0 ? flops / seconds / 1e9 : 0; }
};

// tokens: rows of the step (T); logit_rows: rows that need logits.
GemmCeiling measure_cpu_gemm_ceiling(const LlamaConfig& config, const LlamaWeights& weights, int32_t tokens,
                                     int32_t logit_rows, int repeats);

// The attention's products for prompts of these lengths, shaped as the CPU
// backend runs them: per query head, blocks of kAttentionQueryBlock rows times
// every key the block sees, for the scores and again for the values.
GemmCeiling measure_cpu_attention_gemms(const LlamaConfig& config, const std::vector<int32_t>& prompt_lengths,
                                        int repeats);

}  // namespace kvq
