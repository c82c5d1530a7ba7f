// Ragged batch assembly.
#include "engine/step_batch.h"

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

}  // namespace kvq
