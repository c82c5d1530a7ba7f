// A small random Llama for backend tests: shapes chosen per test, weights from a seed.
#pragma once

#include <random>
#include <vector>

#include "model/llama.h"

namespace kvq::testing {

inline LlamaConfig tiny_config(int head_dim = 8, int n_heads = 4, int n_kv_heads = 2) {
  LlamaConfig c;
  c.name = "tiny";
  c.n_layers = 2;
  c.hidden = 32;
  c.ffn = 48;
  c.n_heads = n_heads;
  c.n_kv_heads = n_kv_heads;
  c.head_dim = head_dim;
  c.vocab = 50;
  c.context = 256;
  c.rope_theta = 10000.0f;
  c.rms_eps = 1e-5f;
  return c;
}

inline LlamaWeights random_weights(const LlamaConfig& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto fill = [&](size_t n, float scale, float offset = 0.0f) {
    std::vector<float> v(n);
    for (float& x : v) x = offset + scale * normal(rng);
    return v;
  };
  LlamaWeights w;
  w.token_embd = fill(size_t(c.vocab) * c.hidden, 1.0f);
  w.output_norm = fill(c.hidden, 0.1f, 1.0f);
  for (int l = 0; l < c.n_layers; ++l) {
    LlamaLayerWeights lw;
    lw.attn_norm = fill(c.hidden, 0.1f, 1.0f);
    lw.wqkv = fill(size_t(c.qkv_dim()) * c.hidden, 0.3f);
    lw.wo = fill(size_t(c.hidden) * c.q_dim(), 0.2f);
    lw.ffn_norm = fill(c.hidden, 0.1f, 1.0f);
    lw.w_gate_up = fill(size_t(2) * c.ffn * c.hidden, 0.2f);
    lw.w_down = fill(size_t(c.hidden) * c.ffn, 0.2f);
    w.layers.push_back(std::move(lw));
  }
  return w;
}

inline std::vector<int32_t> random_ids(std::mt19937& rng, int n, int vocab) {
  std::vector<int32_t> ids(n);
  for (int32_t& id : ids) id = static_cast<int32_t>(rng() % vocab);
  return ids;
}

}  // namespace kvq::testing
