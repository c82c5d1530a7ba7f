// Shapes exactly as DESIGN.md gives them; rms_eps is the usual 1e-5.
#include "model/dummy_presets.h"

#include "core/error.h"

namespace kvq {
namespace {

LlamaConfig make(const char* name, int layers, int hidden, int ffn, int heads, int kv_heads, int head_dim, int vocab,
                 int context, float theta) {
  LlamaConfig c;
  c.name = name;
  c.n_layers = layers;
  c.hidden = hidden;
  c.ffn = ffn;
  c.n_heads = heads;
  c.n_kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.vocab = vocab;
  c.context = context;
  c.rope_theta = theta;
  c.rms_eps = 1e-5f;
  return c;
}

}  // namespace

std::vector<std::string> dummy_preset_names() { return {"smollm2-135m", "llama2-7b", "llama3-8b"}; }

LlamaConfig dummy_preset(const std::string& name) {
  if (name == "smollm2-135m") return make("smollm2-135m", 30, 576, 1536, 9, 3, 64, 49152, 8192, 100000.0f);
  if (name == "llama2-7b") return make("llama2-7b", 32, 4096, 11008, 32, 32, 128, 32000, 32768, 10000.0f);
  if (name == "llama3-8b") return make("llama3-8b", 32, 4096, 14336, 32, 8, 128, 128256, 8192, 500000.0f);
  throw UsageError(fmt::format("unknown dummy preset '{}' (smollm2-135m, llama2-7b or llama3-8b)", name));
}

}  // namespace kvq
