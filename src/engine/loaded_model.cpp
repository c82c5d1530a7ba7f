#include "engine/loaded_model.h"

#include "core/error.h"

namespace kvq {

LoadedModel::LoadedModel(const std::string& model_path, bool with_weights)
    : path(model_path),
      file(GgufFile::open(model_path)),
      config(LlamaConfig::from_gguf(file)),
      weights(with_weights ? LlamaWeights::from_gguf(file, config) : LlamaWeights{}),
      tokenizer(Tokenizer::vocab_from_gguf(file)) {
  if (tokenizer.n_vocab() != config.vocab) {
    fail("{}: the tokenizer has {} tokens but token_embd.weight has {} rows", path, tokenizer.n_vocab(), config.vocab);
  }
}

}  // namespace kvq
