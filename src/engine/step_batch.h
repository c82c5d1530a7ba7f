// One engine step: the tokens of several sequences packed without padding
// (a ragged batch), plus the interface every backend implements for it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace kvq {

class PageTables;
struct LlamaConfig;

struct SequenceChunk {
  int32_t seq = -1;        // sequence id in PageTables
  int64_t start_pos = 0;   // position of the chunk's first token in its sequence
  int32_t n_tokens = 0;    // tokens of this sequence in the step
  int32_t first_row = 0;   // index of the chunk's first token in StepBatch::tokens
  bool all_logits = false; // logits for every token (perplexity) or for the last one only
};

struct StepBatch {
  std::vector<int32_t> tokens;        // (n_tokens) chunks back to back
  std::vector<SequenceChunk> chunks;  // in row order

  void add_chunk(int32_t seq, int64_t start_pos, const int32_t* ids, int32_t n, bool all_logits);
  int32_t n_tokens() const { return static_cast<int32_t>(tokens.size()); }
  int32_t n_logit_rows() const;
};

// Throws, naming the sequence or token, unless every chunk stays inside the
// model's context and its reserved pages and every token id is in the vocabulary.
void check_step(const StepBatch& batch, const PageTables& tables, const LlamaConfig& config);

struct KvCacheStats {
  int64_t outliers_stored = 0;
  int64_t outliers_over_capacity = 0;  // outliers clamped because their page's slots were full
};

class Backend {
 public:
  virtual ~Backend() = default;
  // Runs the model over the batch: writes every token's K and V into its
  // sequence's pages (capacity already reserved in `tables`, positions
  // start_pos.. not yet appended), attends through the pages, and fills
  // `logits` with (batch.n_logit_rows(), vocab) rows in chunk order.
  virtual void forward(const StepBatch& batch, const PageTables& tables, std::vector<float>& logits) = 0;
  // forward() for greedy decoding: `tokens` gets greedy_token (engine/sampler.h) of each logits row. This
  // default picks on the host; a GPU backend picks on the device and copies back only the ids.
  virtual void forward_greedy(const StepBatch& batch, const PageTables& tables, std::vector<int32_t>& tokens);
  virtual std::string device_name() const = 0;
  // Bytes the pool allocates per page (all layers, K and V, with any metadata).
  virtual int64_t kv_bytes_per_page() const = 0;
  // Pages in the pool the backend allocated; PageTables hands out indices below it.
  virtual int32_t n_pages() const = 0;
  // Bytes held per live sequence outside the pages (fp16 attention sinks and
  // the exact window of --tail / KIVI), allocated when its first chunk runs.
  virtual int64_t kv_bytes_per_sequence() const { return 0; }
  // Drops a finished sequence's state outside the pages (call with PageTables::free_sequence).
  virtual void release_sequence(int32_t /*seq*/) {}
  virtual KvCacheStats kv_stats() const { return {}; }
  // Decode steps captured as CUDA graphs so far (backends that replay them): a step whose graph replays adds none.
  virtual int64_t decode_graph_captures() const { return 0; }
};

}  // namespace kvq
