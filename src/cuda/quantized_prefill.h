// Prefill attention over quantized pages on the warp-specialized wgmma kernel
// (prefill_attention.cu, with quantized_page_producer.cuh as its load stage).
//
// A query at position q reads key p exactly iff p < sinks or p >= exact_from(q)
// (KvCacheOptions::exact_from, the CPU's rule), from the pages otherwise. With
// split(q) the planner's clamp of exact_from(q) to [min(sinks, q + 1), q + 1]:
//   page keys:  p < split(q)        (sinks among them read exactly),
//   band keys:  split(q) <= p <= q  (read exactly; empty when split(q) = q + 1).
// A block of query rows walks its page tiles (keys [0, split(last row))) and
// then its band tiles (keys [split(first row with a band), last row]) in one
// online softmax: each tile is masked per row by the set it belongs to, so no
// second pass and no merge. The band is at most a page (tail, --kscale page),
// 128 keys (kivi) or the chunk (--exact-chunk, whose page tiles then stop at
// the chunk's start), so it costs about one tile per block.
//
// Page tiles are decoded once per layer and step when the step's page scratch
// is set (page_scratch.h: a pre-pass decodes every chunk's page-tile keys into
// fp16 rows the kernel copies); otherwise each query tile decodes the page
// tiles it reads (QuantizedPageProducer). Both give the same bits.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cpu/cpu_backend.h"
#include "cuda/attention.h"
#include "cuda/quantized_attention.h"

namespace kvq::cuda {

// KvCacheOptions::exact_from as data a kernel evaluates.
struct ExactRule {
  int32_t sinks;          // effective sinks
  int32_t native_window;  // 0, or the format's newest keys read exactly (kivi: 128)
  int32_t page_align;     // 0, or the page size (calibrated formats with --tail or --kscale page)
  int32_t exact_chunk;    // 1: a chunk's own keys are read exactly

  // The first key the query at `pos` (of a chunk starting at chunk_start) reads in its band; pos + 1 when
  // it has none. Keys below it come from the pages (sinks exactly).
  __host__ __device__ int split(int pos, int chunk_start) const {
    int from = pos + 1;
    if (native_window > 0) from = min_(from, pos + 1 - native_window);
    if (page_align > 0) from = min_(from, pos / page_align * page_align);
    if (exact_chunk) from = min_(from, chunk_start);
    const int n_sinks = min_(sinks, pos + 1);
    return max_(max_(from, 0), n_sinks);  // never above pos + 1: every term above is at most pos + 1
  }
  __host__ __device__ bool has_band(int pos, int chunk_start) const { return split(pos, chunk_start) <= pos; }
  // Whether any query can have a band (sinks alone make none).
  __host__ __device__ bool has_bands() const { return native_window > 0 || page_align > 0 || exact_chunk; }

 private:
  __host__ __device__ static int min_(int a, int b) { return a < b ? a : b; }
  __host__ __device__ static int max_(int a, int b) { return a > b ? a : b; }
};

ExactRule exact_rule(const KvCacheOptions& options, int page_size);

// Whether a prefill step's quantize-on-write stores its keys rotated for these pages' band tiles
// (KvDecodedRows::rotated_keys, QuantizedPrefillSource::rotated_step_keys): int and nuq with per-row ranges
// (pre-RoPE keys) under a rule with bands.
inline bool quantize_rotates_band_keys(const PageBlockLayout& key_layout, const PageBlockLayout& value_layout,
                                       const ExactRule& rule) {
  return kv_quantize_decodes_rows(key_layout, value_layout) && rule.has_bands();
}

// The step's page-tile keys and values decoded once (page_scratch.h): for each prefill chunk, keys
// [0, split(its last row)) of its sequence as the page tiles hold them (fp16, keys of pre-RoPE formats
// rotated), per KV head. keys null: no scratch, the kernel decodes its page tiles itself.
struct PageScratch {
  __half* keys;               // (n_kv_heads, n_rows, head_dim)
  __half* values;             // (n_kv_heads, n_rows, head_dim)
  const int32_t* chunk_rows;  // (chunks) row of the chunk's key 0 in each KV head's rows (prefill chunks)
  int64_t n_rows;             // rows per KV head
};

// What the quantized prefill kernel reads: the layer's pages and exact rows, the rule, each chunk's slot
// in the exact-row store, the page scratch if the step has one, and this step's keys rotated if it has them.
struct QuantizedPrefillSource {
  QuantizedPagedKv kv;
  ExactRule rule;
  const int32_t* chunk_slots;  // (chunks) store slot of each chunk's sequence
  PageScratch scratch;         // filled by launch_fill_page_scratch before the kernel; keys null: none
  // (step rows, n_kv_heads, head_dim) pre-RoPE formats: this step's keys rotated as the tiles rotate exactly read
  // keys (quantize-on-write stores them: KvDecodedRows::rotated_keys), so that band tiles of the step's own keys
  // are plain copies (the page scratch's kernel); null: band keys are rotated as they land.
  const __half* rotated_step_keys = nullptr;
};

// head_dim 64 or 128, keys and values of the same bits bucket.
bool quantized_prefill_supported(int head_dim, const PageBlockLayout& key_layout, const PageBlockLayout& value_layout);

// The step's prefill rows (work as plan_prefill plans it; chunks, work and source.chunk_slots device arrays)
// into query.out; page tiles from source.scratch when it is set (filled for these chunks and work).
void launch_quantized_prefill_attention(const AttentionQuery& query, const QuantizedPrefillSource& source,
                                        const AttentionChunk* chunks, const PrefillWork* work, int32_t n_work,
                                        cudaStream_t stream);

}  // namespace kvq::cuda
