// Llama configuration and weight loading from GGUF.
#include "model/llama.h"

#include <map>

#include "core/error.h"
#include "model/dequant.h"
#include "model/gguf.h"

namespace kvq {
namespace {

int read_positive(const GgufFile& file, const std::string& key, int64_t max_value) {
  int64_t v = file.get_int(key);
  if (v <= 0 || v > max_value) fail("{}: metadata '{}' = {} is out of range (1..{})", file.source_name(), key, v, max_value);
  return static_cast<int>(v);
}

// Dequantizes tensor `name` into dst[offset, offset + n), checking its GGUF dims (ne0 first).
void load_into(const GgufFile& file, const std::string& name, std::vector<int64_t> expected_dims,
               std::vector<float>& dst, size_t offset) {
  const GgufTensorInfo& info = file.tensor(name);
  if (info.dims != expected_dims) {
    auto show = [](const std::vector<int64_t>& d) { return fmt::format("[{}]", fmt::join(d, ", ")); };
    fail("{}: tensor '{}' has shape {}, expected {}", file.source_name(), name, show(info.dims), show(expected_dims));
  }
  if (!dequant_supported(info.type)) {
    fail("{}: tensor '{}' has type {}, which kvq does not support (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q6_K)",
         file.source_name(), name, gguf_type_name(info.type));
  }
  if (dst.size() < offset + static_cast<size_t>(info.n_elements)) dst.resize(offset + info.n_elements);
  dequantize(info.type, file.tensor_bytes(info), std::span<float>(dst.data() + offset, info.n_elements));
}

}  // namespace

int64_t LlamaConfig::parameter_count() const {
  int64_t per_layer = int64_t{hidden} * qkv_dim() + int64_t{q_dim()} * hidden + 3 * int64_t{hidden} * ffn + 2 * hidden;
  return int64_t{vocab} * hidden + n_layers * per_layer + hidden;
}

LlamaConfig LlamaConfig::from_gguf(const GgufFile& file) {
  const std::string& arch = file.get_string("general.architecture");
  if (arch != "llama") fail("{}: unsupported architecture '{}' (kvq runs 'llama')", file.source_name(), arch);
  LlamaConfig c;
  c.name = file.has("general.name") ? file.get_string("general.name") : "llama";
  c.n_layers = read_positive(file, "llama.block_count", 1024);
  c.hidden = read_positive(file, "llama.embedding_length", 1 << 16);
  c.ffn = read_positive(file, "llama.feed_forward_length", 1 << 18);
  c.n_heads = read_positive(file, "llama.attention.head_count", 1024);
  c.n_kv_heads = file.has("llama.attention.head_count_kv") ? read_positive(file, "llama.attention.head_count_kv", 1024)
                                                            : c.n_heads;
  c.context = read_positive(file, "llama.context_length", 1 << 24);
  if (c.hidden % c.n_heads != 0 || c.n_heads % c.n_kv_heads != 0) {
    fail("{}: {} heads / {} KV heads do not divide hidden size {}", file.source_name(), c.n_heads, c.n_kv_heads,
         c.hidden);
  }
  c.head_dim = c.hidden / c.n_heads;
  if (file.has("llama.rope.dimension_count") &&
      read_positive(file, "llama.rope.dimension_count", 1 << 16) != c.head_dim) {
    fail("{}: partial RoPE (llama.rope.dimension_count != head_dim {}) is not supported", file.source_name(),
         c.head_dim);
  }
  if (c.head_dim % 2 != 0) fail("{}: head_dim {} is odd", file.source_name(), c.head_dim);
  if (file.has("llama.rope.freq_base")) c.rope_theta = static_cast<float>(file.get_float("llama.rope.freq_base"));
  if (file.has("llama.attention.layer_norm_rms_epsilon")) {
    c.rms_eps = static_cast<float>(file.get_float("llama.attention.layer_norm_rms_epsilon"));
  }
  if (file.has("llama.rope.scaling.type") && file.get_string("llama.rope.scaling.type") != "none") {
    fail("{}: RoPE scaling '{}' is not supported", file.source_name(), file.get_string("llama.rope.scaling.type"));
  }
  const GgufTensorInfo& embd = file.tensor("token_embd.weight");
  if (embd.dims.size() != 2 || embd.dims[0] != c.hidden || embd.dims[1] > (1 << 22)) {
    fail("{}: tensor 'token_embd.weight' has an unexpected shape", file.source_name());
  }
  c.vocab = static_cast<int>(embd.dims[1]);
  if (file.has("llama.vocab_size") && file.get_int("llama.vocab_size") != c.vocab) {
    fail("{}: metadata 'llama.vocab_size' = {} disagrees with token_embd.weight ({})", file.source_name(),
         file.get_int("llama.vocab_size"), c.vocab);
  }
  return c;
}

LlamaWeights LlamaWeights::from_gguf(const GgufFile& file, const LlamaConfig& c) {
  LlamaWeights w;
  const int64_t h = c.hidden;
  load_into(file, "token_embd.weight", {h, c.vocab}, w.token_embd, 0);
  load_into(file, "output_norm.weight", {h}, w.output_norm, 0);
  if (file.find_tensor("output.weight") != nullptr) load_into(file, "output.weight", {h, c.vocab}, w.output, 0);
  w.layers.resize(c.n_layers);
  for (int i = 0; i < c.n_layers; ++i) {
    LlamaLayerWeights& l = w.layers[i];
    auto name = [i](const char* suffix) { return fmt::format("blk.{}.{}", i, suffix); };
    load_into(file, name("attn_norm.weight"), {h}, l.attn_norm, 0);
    load_into(file, name("attn_q.weight"), {h, c.q_dim()}, l.wqkv, 0);
    load_into(file, name("attn_k.weight"), {h, c.kv_dim()}, l.wqkv, size_t(c.q_dim()) * h);
    load_into(file, name("attn_v.weight"), {h, c.kv_dim()}, l.wqkv, size_t(c.q_dim() + c.kv_dim()) * h);
    load_into(file, name("attn_output.weight"), {c.q_dim(), h}, l.wo, 0);
    load_into(file, name("ffn_norm.weight"), {h}, l.ffn_norm, 0);
    load_into(file, name("ffn_gate.weight"), {h, c.ffn}, l.w_gate_up, 0);
    load_into(file, name("ffn_up.weight"), {h, c.ffn}, l.w_gate_up, size_t(c.ffn) * h);
    load_into(file, name("ffn_down.weight"), {c.ffn, h}, l.w_down, 0);
  }
  return w;
}

std::vector<std::pair<std::string, int>> tensor_type_histogram(const GgufFile& file) {
  std::map<std::string, int> counts;
  for (const GgufTensorInfo& t : file.tensors()) ++counts[gguf_type_name(t.type)];
  return {counts.begin(), counts.end()};
}

}  // namespace kvq
