// Llama-family model: configuration from GGUF metadata and fp32 weights
// dequantized at load, laid out for the forward's fused GEMMs.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kvq {

class GgufFile;

struct LlamaConfig {
  std::string name;
  int n_layers = 0;
  int hidden = 0;      // embedding width
  int ffn = 0;         // SwiGLU inner width
  int n_heads = 0;     // query heads
  int n_kv_heads = 0;  // key/value heads (GQA when < n_heads)
  int head_dim = 0;
  int vocab = 0;
  int context = 0;  // trained context length: longer prompts are refused
  float rope_theta = 10000.0f;
  float rms_eps = 1e-5f;

  int q_dim() const { return n_heads * head_dim; }
  int kv_dim() const { return n_kv_heads * head_dim; }
  int qkv_dim() const { return q_dim() + 2 * kv_dim(); }
  int64_t parameter_count() const;

  // Reads llama.* metadata; refuses other architectures, naming them.
  static LlamaConfig from_gguf(const GgufFile& file);
};

// All matrices row-major (out_features, in_features): y = W x.
struct LlamaLayerWeights {
  std::vector<float> attn_norm;  // (hidden)
  std::vector<float> wqkv;       // (q_dim + 2*kv_dim, hidden): Q rows, then K rows, then V rows
  std::vector<float> wo;         // (hidden, q_dim)
  std::vector<float> ffn_norm;   // (hidden)
  std::vector<float> w_gate_up;  // (2*ffn, hidden): gate rows, then up rows
  std::vector<float> w_down;     // (hidden, ffn)
};

struct LlamaWeights {
  std::vector<float> token_embd;  // (vocab, hidden)
  std::vector<LlamaLayerWeights> layers;
  std::vector<float> output_norm;  // (hidden)
  std::vector<float> output;       // (vocab, hidden); empty when tied to token_embd
  const std::vector<float>& output_matrix() const { return output.empty() ? token_embd : output; }

  // Checks every tensor's presence, type and shape against the config (naming the
  // tensor on mismatch) and dequantizes to fp32.
  static LlamaWeights from_gguf(const GgufFile& file, const LlamaConfig& config);
};

// GGUF tensor type names in the file with their counts, e.g. {"Q4_1", 210}.
std::vector<std::pair<std::string, int>> tensor_type_histogram(const GgufFile& file);

}  // namespace kvq
