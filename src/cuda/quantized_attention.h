// Attention over quantized KV pages (every --kv format but fp16), prefill and
// decode rows alike: each query row's keys are split into two disjoint sets by
// one rule, the CPU's (KvCacheOptions::exact_from): key p is read exactly iff
// p < sinks or p >= exact_from(row) (from this step's K/V when the row's chunk
// holds p, else from the sequence's exact-row store), and from the pages
// otherwise (codes decoded with kv_dequant.cuh, outliers put back, RoPE at p for
// pre-RoPE formats). Each set is cut into key ranges (typed splits: one source
// each) that run as split-K flash attention in parallel, all the query heads of
// a KV head in one block; launch_decode_combine merges a row's splits.
//
// Work is one block per (split, KV head) whatever the chunk length, so rows of
// a chunk re-read their keys once per row: correct for any row and fast for
// decode; the backend runs decode rows here and chunks of several rows on the
// wgmma prefill kernel (quantized_prefill.h), which reads keys once per query
// tile.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "cpu/cpu_backend.h"
#include "cuda/attention.h"
#include "cuda/exact_rows.h"
#include "cuda/kv_quantize.h"
#include "cuda/side_stream.h"

namespace kvq::cuda {

// One layer's quantized pages and the exact rows beside them.
struct QuantizedPagedKv {
  const uint8_t* pool;             // this layer's pages: (n_pages, [K block] x n_kv_heads, [V block] x n_kv_heads)
  PageBlockLayout key_layout;
  PageBlockLayout value_layout;
  DeviceLayerCalibration calib;
  const int32_t* page_table;       // as PagedKv::page_table
  const float2* rope;              // (context, head_dim / 2) (cos, sin)
  int32_t n_kv_heads;
  int32_t rotate_keys;             // 1: stored keys (pages and exact rows) are pre-RoPE, rotated at their positions
  const __half* step_keys;         // (T, step_stride): K of this step's rows at column kv_head * head_dim, V kv_dim later
  int32_t step_stride;
  ExactRowStore store;
};

// Where a query row's exact keys come from: its chunk's rows of this step, or the store.
struct ExactSource {
  int32_t chunk_first_row;  // step row of the chunk's first token
  int32_t chunk_start;      // position of that token: keys from here on are this step's rows
  int32_t slot;             // the sequence's slot in the exact-row store
};

// The fp16 row (head_dim halves) of key (kind 0) or value (kind 1) `pos` of KV head kv_head, read exactly:
// this step's row when the chunk holds pos, else the store's.
__host__ __device__ inline const __half* exact_kv_row(const QuantizedPagedKv& kv, const ExactSource& source, int kind,
                                                      int kv_head, int head_dim, int pos) {
  if (pos >= source.chunk_start) {
    return kv.step_keys + static_cast<int64_t>(source.chunk_first_row + pos - source.chunk_start) * kv.step_stride +
           (kind * kv.n_kv_heads + kv_head) * head_dim;
  }
  return kv.store.rows + exact_row_offset(kv.store, kv.n_kv_heads, head_dim, source.slot, kind, kv_head, pos);
}

struct QuantizedSplit {
  int32_t row;        // index into the launch's query rows (AttentionChunk of one token each)
  int32_t key_begin;  // keys [key_begin, key_end) of the row's sequence; empty: padding, writes nothing read
  int32_t key_end;
  int32_t exact;      // 1: read exactly (ExactSource), 0: from the pages
};

// One launch: query rows (one AttentionChunk each: first_row = the row, start_pos = its position, page_offset =
// its sequence's), their exact sources, the splits, and which splits merge into which row.
struct QuantizedAttentionPlan {
  std::vector<AttentionChunk> rows;
  std::vector<ExactSource> sources;  // (rows)
  std::vector<QuantizedSplit> splits;
  std::vector<DecodeChunk> combine;  // (rows): DecodeChunk::chunk indexes rows
};

// Query rows per launch at most: bounds the partial results in flight (a row has about 3 splits: sinks,
// pages, exact; llama3-8b: 4096 rows x 3 x 32 heads x 128 x 4 bytes = 200 MB) and the combine grid.
constexpr int32_t kQuantizedRowsPerLaunch = 4096;

// The step's launches: every row of the listed chunks (chunk_slots: each chunk's store slot), cut into splits
// of sizes that fill `n_sms` multiprocessors in whole waves of the head_dim's page kernel.
std::vector<QuantizedAttentionPlan> plan_quantized_attention(const std::vector<AttentionChunk>& chunks,
                                                             const std::vector<int32_t>& chunk_slots,
                                                             const KvCacheOptions& options, int page_size,
                                                             int n_kv_heads, int head_dim, int n_sms);

// The bits a layout's decoding kernel instances are built for: the packed schemes' own (int, nuq, kivi), 4 for
// the others (which ignore them). Decode and prefill kernels both instantiate per bucket.
int quantized_bits_bucket(const PageBlockLayout& layout);

bool quantized_attention_supported(int head_dim, int group);
// Whether the page splits of these pages run on the fragment kernel: int or nuq keys and values with calibrated
// key ranges, pre-RoPE, in pages of whole 16-key tiles. Its fp16 operands are R(j) k and R(base)^T q for a key
// at row j of a tile at position base (a multiple of 16), where the other page kernel's are R(base + j) k and q.
bool quantized_fragment_pages(const QuantizedPagedKv& kv);
int64_t quantized_attention_workspace_bytes(int32_t n_splits, int n_heads, int head_dim);

// rows, sources, splits, combine: device arrays of one plan. side: where the exact splits' kernel may run beside
// the page splits' (joined before the combine), or null.
void launch_quantized_attention(const AttentionQuery& query, const QuantizedPagedKv& kv, const AttentionChunk* rows,
                                const ExactSource* sources, const QuantizedSplit* splits, int32_t n_splits,
                                const DecodeChunk* combine, int32_t n_rows, void* workspace, cudaStream_t stream,
                                const SideStream* side = nullptr);

}  // namespace kvq::cuda
