// Attention over the paged fp16 KV cache: the index structs shared by host and
// device, the host planners that split a step into work items, and the two
// kernel families (prefill_attention.cu, decode_attention.cu). Keys are stored
// before RoPE; the K/V load stage (kv_page_loader.cuh) rotates them at their
// positions while filling a tile, the seam where quantized pages plug in.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace kvq::cuda {

// One sequence's rows in a step.
struct AttentionChunk {
  int32_t first_row;    // row of the chunk's first token in AttentionQuery::q and ::out
  int32_t n_tokens;     // query rows of the chunk
  int32_t start_pos;    // position of the first row; keys 0 .. start_pos + n_tokens - 1 are in the pages
  int32_t page_offset;  // index in PagedKv::page_table of the sequence's first page
};

// One layer's pages as kv write left them.
struct PagedKv {
  const __half* keys;         // (n_pages, n_kv_heads, page_size, head_dim), before RoPE
  const __half* values;       // (n_pages, n_kv_heads, page_size, head_dim)
  const int32_t* page_table;  // (sum of chunks' page counts) pool page indices, each sequence in token order
  const float2* rope;         // (context, head_dim / 2) (cos, sin) of every position and pair
  int32_t page_size;
  int32_t n_kv_heads;
};

struct AttentionQuery {
  const __half* q;     // (rows, q_stride): head h at columns h * head_dim, already rotated
  int32_t q_stride;
  __half* out;         // (rows, out_stride): head h at columns h * head_dim
  int32_t out_stride;
  int32_t n_heads;
  int32_t head_dim;
  float scale;         // usually 1 / sqrt(head_dim)
};

// ---- prefill (prefill_attention.cu): flash attention, causal, tensor cores ----

// A tile of query rows of one chunk.
struct PrefillWork {
  int32_t chunk;    // index into the chunks array
  int32_t q_begin;  // first row of the tile inside the chunk
};

// The one runtime->compile-time dispatch answers both questions.
bool prefill_attention_supported(int head_dim);
int prefill_rows_per_tile(int head_dim);
// Tiles of the listed chunks, the longest key ranges first (causal work is uneven).
std::vector<PrefillWork> plan_prefill(const std::vector<AttentionChunk>& chunks, const std::vector<int32_t>& chunk_ids,
                                      int head_dim);
// chunks and work are device arrays.
void launch_prefill_attention(const AttentionQuery& query, const PagedKv& kv, const AttentionChunk* chunks,
                              const PrefillWork* work, int32_t n_work, cudaStream_t stream);

// ---- decode (decode_attention.cu): one query row per chunk, split-K over keys ----

// An empty split (key_begin == key_end, any valid chunk) writes a partial result of weight zero that no
// DecodeChunk reads: a graph pads its fixed grid with them.
struct DecodeSplit {
  int32_t chunk;      // index into the chunks array
  int32_t key_begin;  // keys [key_begin, key_end) of the sequence
  int32_t key_end;
};
struct DecodeChunk {
  int32_t chunk;        // index into the chunks array (n_tokens == 1)
  int32_t split_begin;  // its splits are split_begin .. split_begin + n_splits - 1
  int32_t n_splits;
};
struct DecodePlan {
  std::vector<DecodeSplit> splits;
  std::vector<DecodeChunk> chunks;
};

bool decode_attention_supported(int head_dim, int group);
// Splits sized so that the step fills the device (`n_sms` multiprocessors) in whole waves of blocks.
DecodePlan plan_decode(const std::vector<AttentionChunk>& chunks, const std::vector<int32_t>& chunk_ids, int n_heads,
                       int n_kv_heads, int n_sms);
// Scratch the launch needs for n_splits splits: partial outputs and (max, sum) per split and head.
int64_t decode_workspace_bytes(int32_t n_splits, int n_heads, int head_dim);
// chunks, splits, decode_chunks, workspace: device memory.
void launch_decode_attention(const AttentionQuery& query, const PagedKv& kv, const AttentionChunk* chunks,
                             const DecodeSplit* splits, int32_t n_splits, const DecodeChunk* decode_chunks,
                             int32_t n_decode_chunks, void* workspace, cudaStream_t stream);
// The second half of a split-K launch: merges each DecodeChunk's splits (partial results of n_splits splits in
// workspace, as the split kernels write them) into query.out at the chunk's row.
void launch_decode_combine(const AttentionQuery& query, const AttentionChunk* chunks, const DecodeChunk* decode_chunks,
                           int32_t n_decode_chunks, int32_t n_splits, void* workspace, cudaStream_t stream);

}  // namespace kvq::cuda
