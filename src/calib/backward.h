// Native backward pass for calibration: how much the language-model loss of a
// token sequence depends on each pre-RoPE key and each value the model writes to
// its KV cache. kvq calibrate squares these gradients (diagonal Fisher
// information) to weight the k-means that builds the nuq codebooks.
//
// One dense fp32 forward over the sequence (no pages) keeps, per layer, what the
// backward needs — the layer input, the fused qkv rows (Q and K rotated), the
// residual after attention and the gate/up rows: (2 * hidden + qkv_dim + 2 * ffn)
// floats per token per layer, 1.3 GB for SmolLM2-135M at 2048 tokens. Attention
// probabilities are recomputed block by block in the backward, and logits exist
// only for a block of rows at a time. The math is CpuBackend's (the test checks
// the losses agree); weights get no gradients.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "model/llama.h"

namespace kvq {

struct KvSensitivityOptions {
  // Round pre-RoPE K and V to fp16 as the fp16 KV cache (CpuBackend) stores
  // them, so the loss is the one inference computes; the gradient passes through
  // the rounding unchanged (straight-through). `keys` and `values` then hold the
  // rounded values.
  bool round_kv_to_fp16 = false;
  // Added to the pre-RoPE K / V before any rounding, (n_layers, T, kv_dim) each, or
  // null: the finite-difference tests perturb one activation through these.
  const std::vector<float>* key_delta = nullptr;
  const std::vector<float>* value_delta = nullptr;
};

// For one sequence of T tokens. Row t of layer l is at (l * T + t) * kv_dim, KV
// head g's channels at g * head_dim within it.
struct KvSensitivity {
  double loss = 0;                  // mean next-token cross-entropy over positions 0..T-2, nats
  std::vector<float> keys;          // (n_layers, T, kv_dim) pre-RoPE K activations
  std::vector<float> values;        // (n_layers, T, kv_dim) V activations
  std::vector<float> key_grads;     // (n_layers, T, kv_dim) d loss / d pre-RoPE K
  std::vector<float> value_grads;   // (n_layers, T, kv_dim) d loss / d V
};

// Runs kv_sensitivity over many sequences, keeping its buffers (the saved
// activations and scratch, ~1.5 GB at 2048 tokens for SmolLM2) from one sequence
// to the next: first-touching fresh pages costs ~8% of a 2048-token call on this
// project's 2-core VM (30.2 s fresh, 27.7 s reused; 2026-11-26). One run at a time.
class KvSensitivityPass {
 public:
  // `weights` must outlive the pass.
  KvSensitivityPass(const LlamaConfig& config, const LlamaWeights& weights);
  ~KvSensitivityPass();
  KvSensitivity run(const std::vector<int32_t>& tokens, const KvSensitivityOptions& options = {});
  double loss(const std::vector<int32_t>& tokens, const KvSensitivityOptions& options = {});  // forward only

  struct Workspace;

 private:
  LlamaConfig config_;
  const LlamaWeights& weights_;
  std::unique_ptr<Workspace> workspace_;
};

// Forward and backward over `tokens` (2 <= T <= context). Multithreaded with
// OpenMP; deterministic for a given thread count. The last position has no
// target, so its K and V gradients are exactly zero.
KvSensitivity kv_sensitivity(const LlamaConfig& config, const LlamaWeights& weights,
                             const std::vector<int32_t>& tokens, const KvSensitivityOptions& options = {});

// The same forward without the backward (and without keeping activations): the loss only.
double sequence_loss(const LlamaConfig& config, const LlamaWeights& weights, const std::vector<int32_t>& tokens,
                     const KvSensitivityOptions& options = {});

}  // namespace kvq
