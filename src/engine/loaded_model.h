// A model file opened for inference: GGUF, configuration, fp32 weights and tokenizer.
#pragma once

#include <string>

#include "model/gguf.h"
#include "model/llama.h"
#include "tokenizer/tokenizer.h"

namespace kvq {

struct LoadedModel {
  // Loads and validates everything; with_weights = false skips dequantization (info, tokenize).
  LoadedModel(const std::string& path, bool with_weights);

  std::string path;
  GgufFile file;
  LlamaConfig config;
  LlamaWeights weights;  // empty when loaded without weights
  Tokenizer tokenizer;
};

}  // namespace kvq
