// Ragged batch assembly.
#include "engine/step_batch.h"

#include "core/error.h"
#include "engine/sampler.h"
#include "kv/page_tables.h"
#include "model/llama.h"

namespace kvq {

void StepBatch::add_chunk(int32_t seq, int64_t start_pos, const int32_t* ids, int32_t n, bool all_logits) {
  chunks.push_back({seq, start_pos, n, n_tokens(), all_logits});
  tokens.insert(tokens.end(), ids, ids + n);
}

int32_t StepBatch::n_logit_rows() const {
  int32_t rows = 0;
  for (const SequenceChunk& c : chunks) rows += c.all_logits ? c.n_tokens : 1;
  return rows;
}

void check_step(const StepBatch& batch, const PageTables& tables, const LlamaConfig& config) {
  for (const SequenceChunk& chunk : batch.chunks) {
    if (chunk.start_pos + chunk.n_tokens > config.context) {
      fail("sequence {}: position {} is beyond the model's context of {}", chunk.seq,
           chunk.start_pos + chunk.n_tokens - 1, config.context);
    }
    if (chunk.start_pos + chunk.n_tokens > tables.capacity(chunk.seq)) {
      fail("sequence {}: pages for positions up to {} were not reserved", chunk.seq, chunk.start_pos + chunk.n_tokens);
    }
  }
  for (int32_t id : batch.tokens) {
    if (id < 0 || id >= config.vocab) fail("token id {} is outside the vocabulary of {}", id, config.vocab);
  }
}

void Backend::forward_greedy(const StepBatch& batch, const PageTables& tables, std::vector<int32_t>& tokens) {
  std::vector<float> logits;
  forward(batch, tables, logits);
  const size_t rows = static_cast<size_t>(batch.n_logit_rows());
  const size_t vocab = rows ? logits.size() / rows : 0;
  tokens.resize(rows);
  for (size_t r = 0; r < rows; ++r) tokens[r] = greedy_token(std::span<const float>(logits.data() + r * vocab, vocab));
}

}  // namespace kvq
