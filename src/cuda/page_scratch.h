// The page scratch of quantized prefill: every key and value the prefill
// kernel reads as a page tile (quantized_prefill.h), decoded once per layer and
// step into fp16 rows (by a pre-pass, or by quantize-on-write: below), so the
// kernel's query tiles copy them
// (ScratchPageProducer, quantized_page_producer.cuh) instead of each decoding
// them again (a key was decoded S / 128 times a step, 64 times at S = 8192).
//
// Layout (PageScratch): keys then values, each per KV head the rows of a
// group of prefill chunks one after the other, chunk c's key p at row
// chunk_rows[c] + p, for keys [0, split(last row of c)): the page tiles of
// every query tile of c lie inside (split rises with the position), band tiles
// are read exactly as before. Each row holds what
// QuantizedPageProducer::tile_chunk() gives (the pre-pass calls it;
// quantize-on-write repeats its operations): sinks read exactly, other keys
// decoded with their outliers, pre-RoPE keys rotated in fp32, all rounded to
// fp16, so the tiles and the kernel's results are the same to the bit as with
// the decoding producer.
//
// The step's own rows of the first group's chunks can be stored by
// quantize-on-write instead (plan_page_scratch's quantize_decodes, then
// route_decoded_rows and KvDecodedRows: the encoding lanes hold each row's
// codes, so the pre-pass neither reads them back nor decodes them again); the
// pre-pass then fills only the keys earlier steps wrote. Same bits either way.
//
// Bound: a group's page keys (for a chunk late in a long prompt, the prompt's
// keys so far) of one layer at a time (every layer reuses the buffer), at most
// kPageScratchCapBytes: a step over the cap runs in groups of chunks that fit
// it, one pre-pass and one prefill launch per group, reusing the buffer; a
// chunk over the cap by itself runs with the decoding producer.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "cuda/attention.h"
#include "cuda/quantized_prefill.h"

namespace kvq::cuda {

// The most the page scratch may take: llama2-7b shapes (32 KV heads x 128 x 2 x 2 bytes = 16 KiB a key) fit
// 32768 page keys, a chunk at the end of a 32K prompt (llama3-8b's 8 KV heads: 131072), held beside the pool
// inside the backend's margin (1 GiB or 4% of the device at least); a longer chunk keeps the decoding
// producer (slower, same result).
constexpr int64_t kPageScratchCapBytes = int64_t{512} << 20;

// Keys [key_begin, key_end) of one chunk's sequence: the pre-pass's work item (a block per span, KV head and
// K or V).
struct PageScratchSpan {
  int32_t chunk;  // index into the step's chunks
  int32_t key_begin;
  int32_t key_end;
};

// Keys per span.
constexpr int32_t kPageScratchSpanRows = 16;

// One pre-pass and one prefill launch: some chunks' work items and spans.
struct PageScratchGroup {
  int32_t work_begin, work_end;  // into PageScratchPlan::work
  int32_t span_begin, span_end;  // into PageScratchPlan::spans
  int64_t n_rows;                // rows per KV head; 0: the decoding producer (no page keys, or a chunk over the cap)
};

struct PageScratchPlan {
  std::vector<PrefillWork> work;    // the step's work items, group after group (each group's in their order)
  std::vector<int32_t> chunk_rows;  // (chunks) PageScratch::chunk_rows in its group's scratch; 0 without work
  // (chunks) keys [start_pos, decoded_end) of the chunk are the quantize launch's to store (KvDecodedRows), not
  // the pre-pass's; decoded_end <= start_pos: none.
  std::vector<int32_t> decoded_end;
  std::vector<PageScratchSpan> spans;
  std::vector<PageScratchGroup> groups;
  int64_t max_rows = 0;             // the most rows of a group: what the buffer must hold
};

int64_t page_scratch_bytes(int64_t n_rows, int n_kv_heads, int head_dim);

// Groups the chunks of `work` (plan_prefill's) in its order, each group's rows within cap_bytes. quantize_decodes:
// the step's quantize launch stores the first group's own rows (kv_quantize_decodes_rows layouts; the plan must
// then go through route_decoded_rows), so its spans leave them out.
PageScratchPlan plan_page_scratch(const std::vector<AttentionChunk>& chunks, const std::vector<PrefillWork>& work,
                                  const ExactRule& rule, int n_kv_heads, int head_dim,
                                  int64_t cap_bytes = kPageScratchCapBytes, bool quantize_decodes = false);

// Points the step's write runs (plan_kv_writes', whose chunks are the plan's) at the scratch rows they store
// decoded (KvWriteRun::scratch_row), as plan.decoded_end says.
void route_decoded_rows(const PageScratchPlan& plan, std::vector<KvWriteRun>& runs);

// Where a group's rows lie in the scratch buffer (each group in turn reuses it from the start): keys then values,
// each (n_kv_heads, group.n_rows, head_dim); keys null for a group without rows. chunk_rows: the plan's (device).
PageScratch group_scratch(const PageScratchGroup& group, void* buffer, const int32_t* chunk_rows, int n_kv_heads,
                          int head_dim);

// Fills source.scratch (keys, values, chunk_rows and n_rows of a group) from source's pages and exact rows,
// after the step's pages are written; chunks and spans (the group's): device arrays.
void launch_fill_page_scratch(const QuantizedPrefillSource& source, int head_dim, const AttentionChunk* chunks,
                              const PageScratchSpan* spans, int32_t n_spans, cudaStream_t stream);

// The step's prefill rows as the backend runs them: per group, the pre-pass into `scratch` (device memory of
// page_scratch_bytes(max_rows) bytes at least) and the prefill kernel over the group's work (the decoding
// producer for groups without rows). work, chunk_rows, spans: the plan's arrays on the device; groups: the
// plan's; source.scratch is ignored.
void launch_quantized_prefill_groups(const AttentionQuery& query, const QuantizedPrefillSource& source,
                                     const AttentionChunk* chunks, const PrefillWork* work, const int32_t* chunk_rows,
                                     const PageScratchSpan* spans, const std::vector<PageScratchGroup>& groups,
                                     void* scratch, cudaStream_t stream);

}  // namespace kvq::cuda
