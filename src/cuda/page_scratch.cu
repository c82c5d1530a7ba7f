// The page scratch's planner, pre-pass and group launcher (page_scratch.h).
// The pre-pass is a plain grid, one thread per 16-byte chunk of a row: the
// decode is QuantizedPageProducer's own (tile_chunk), so the rows are the bits
// its tiles would hold.
#include <algorithm>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/page_scratch.h"
#include "cuda/quantized_page_producer.cuh"

namespace kvq::cuda {
namespace {

// grid (spans, n_kv_heads, 2: keys then values), kPageScratchSpanRows * D / 8 threads.
template <int D, int kBits>
__global__ void __launch_bounds__(kPageScratchSpanRows * D / 8)
    fill_page_scratch_kernel(QuantizedPrefillSource source, const AttentionChunk* chunks, const PageScratchSpan* spans) {
  // The decoding producer's per-chunk code; its tile shape does not enter tile_chunk().
  using Decoder = QuantizedPageProducer<D, 128, 128, kBits>;
  const PageScratchSpan span = spans[blockIdx.x];
  const int column = threadIdx.x % (D / 8);
  const int pos = span.key_begin + static_cast<int>(threadIdx.x) / (D / 8);
  if (pos >= span.key_end) return;
  const int kv_head = blockIdx.y;
  const KvKind kind = blockIdx.z == 0 ? KvKind::key : KvKind::value;
  const Decoder decoder(source, kv_head, chunks[span.chunk], span.chunk, column);  // thread `column`: row 0
  const uint4 chunk = decoder.tile_chunk(source, kind, pos, pos < source.rule.sinks);
  const PageScratch& scratch = source.scratch;
  const int64_t row = int64_t{kv_head} * scratch.n_rows + scratch.chunk_rows[span.chunk] + pos;
  *reinterpret_cast<uint4*>((kind == KvKind::key ? scratch.keys : scratch.values) + row * D + column * 8) = chunk;
}

template <int D>
void launch_fill(int bits, const QuantizedPrefillSource& source, const AttentionChunk* chunks,
                 const PageScratchSpan* spans, int32_t n_spans, cudaStream_t stream) {
  const dim3 grid(n_spans, source.kv.n_kv_heads, 2);
  constexpr int kThreads = kPageScratchSpanRows * D / 8;
  switch (bits) {
    case 2: fill_page_scratch_kernel<D, 2><<<grid, kThreads, 0, stream>>>(source, chunks, spans); break;
    case 3: fill_page_scratch_kernel<D, 3><<<grid, kThreads, 0, stream>>>(source, chunks, spans); break;
    case 4: fill_page_scratch_kernel<D, 4><<<grid, kThreads, 0, stream>>>(source, chunks, spans); break;
    default: fail("page scratch: {}-bit codes are not supported", bits);
  }
  CUDA_CHECK_LAUNCH(stream, "fill_page_scratch_kernel");
}

}  // namespace

int64_t page_scratch_bytes(int64_t n_rows, int n_kv_heads, int head_dim) {
  return n_rows * n_kv_heads * head_dim * 2 * 2;  // keys and values, fp16
}

PageScratchPlan plan_page_scratch(const std::vector<AttentionChunk>& chunks, const std::vector<PrefillWork>& work,
                                  const ExactRule& rule, int n_kv_heads, int head_dim, int64_t cap_bytes,
                                  bool quantize_decodes) {
  PageScratchPlan plan;
  plan.chunk_rows.assign(chunks.size(), 0);
  plan.decoded_end.assign(chunks.size(), 0);
  // The chunks in the order of their first work item (the longest key ranges first), each group's in turn.
  std::vector<int32_t> group_of(chunks.size(), -1);
  const int64_t row_bytes = page_scratch_bytes(1, n_kv_heads, head_dim);
  const auto close_group = [&] {
    if (!plan.groups.empty()) plan.groups.back().span_end = static_cast<int32_t>(plan.spans.size());
  };
  const auto open_group = [&] {
    close_group();
    const auto spans = static_cast<int32_t>(plan.spans.size());
    plan.groups.push_back({0, 0, spans, spans, 0});
  };
  bool group_decodes = false;  // the open group is a chunk over the cap
  for (const PrefillWork& w : work) {
    if (group_of[w.chunk] >= 0) continue;
    const AttentionChunk& chunk = chunks[w.chunk];
    // The page keys of the chunk's last row: the most any of its query tiles reads as page tiles.
    const int32_t page_keys = rule.split(chunk.start_pos + chunk.n_tokens - 1, chunk.start_pos);
    const bool over_cap = page_keys * row_bytes > cap_bytes;
    if (plan.groups.empty() || over_cap || group_decodes || (plan.groups.back().n_rows + page_keys) * row_bytes > cap_bytes) {
      open_group();
      group_decodes = over_cap;
    }
    PageScratchGroup& group = plan.groups.back();
    group_of[w.chunk] = static_cast<int32_t>(plan.groups.size()) - 1;
    if (over_cap) continue;  // n_rows stays 0: the decoding producer
    plan.chunk_rows[w.chunk] = static_cast<int32_t>(group.n_rows);
    // The first group's own rows are the quantize launch's (it runs before any group): the pre-pass takes the
    // keys of earlier steps. Later groups reuse the buffer, so their chunks' rows all come from the pre-pass.
    int32_t prepass_end = page_keys;
    if (quantize_decodes && plan.groups.size() == 1) {
      plan.decoded_end[w.chunk] = page_keys;
      prepass_end = std::min(page_keys, chunk.start_pos);
    }
    for (int32_t k = 0; k < prepass_end; k += kPageScratchSpanRows) {
      plan.spans.push_back({w.chunk, k, std::min(k + kPageScratchSpanRows, prepass_end)});
    }
    group.n_rows += page_keys;
    plan.max_rows = std::max(plan.max_rows, group.n_rows);
  }
  close_group();
  for (size_t g = 0; g < plan.groups.size(); ++g) {
    PageScratchGroup& group = plan.groups[g];
    group.work_begin = static_cast<int32_t>(plan.work.size());
    for (const PrefillWork& w : work) {
      if (group_of[w.chunk] == static_cast<int32_t>(g)) plan.work.push_back(w);
    }
    group.work_end = static_cast<int32_t>(plan.work.size());
  }
  return plan;
}

void route_decoded_rows(const PageScratchPlan& plan, std::vector<KvWriteRun>& runs) {
  for (KvWriteRun& run : runs) {
    if (run.first_row != kConsecutiveRows || run.n_rows == 0) continue;  // listed rows are earlier steps'
    const int32_t end = plan.decoded_end.at(run.chunk);
    if (run.first_pos >= end) continue;
    run.scratch_row = plan.chunk_rows[run.chunk] + run.first_pos;
    run.scratch_rows = std::min(run.n_rows, end - run.first_pos);
  }
}

PageScratch group_scratch(const PageScratchGroup& group, void* buffer, const int32_t* chunk_rows, int n_kv_heads,
                          int head_dim) {
  if (group.n_rows == 0) return {};
  __half* keys = static_cast<__half*>(buffer);
  return {keys, keys + group.n_rows * n_kv_heads * head_dim, chunk_rows, group.n_rows};
}

void launch_fill_page_scratch(const QuantizedPrefillSource& source, int head_dim, const AttentionChunk* chunks,
                              const PageScratchSpan* spans, int32_t n_spans, cudaStream_t stream) {
  if (n_spans == 0) return;
  if (source.scratch.keys == nullptr) fail("page scratch: no scratch to fill");
  const QuantizedPagedKv& kv = source.kv;
  if (!quantized_prefill_supported(head_dim, kv.key_layout, kv.value_layout)) {
    fail("page scratch: head_dim {} with these pages is not supported", head_dim);
  }
  const int bits = quantized_bits_bucket(kv.key_layout);
  if (head_dim == 64) return launch_fill<64>(bits, source, chunks, spans, n_spans, stream);
  launch_fill<128>(bits, source, chunks, spans, n_spans, stream);
}

void launch_quantized_prefill_groups(const AttentionQuery& query, const QuantizedPrefillSource& source,
                                     const AttentionChunk* chunks, const PrefillWork* work, const int32_t* chunk_rows,
                                     const PageScratchSpan* spans, const std::vector<PageScratchGroup>& groups,
                                     void* scratch, cudaStream_t stream) {
  for (const PageScratchGroup& group : groups) {
    QuantizedPrefillSource group_source = source;
    // The stream orders this group's fill after the previous group's kernel.
    group_source.scratch = group_scratch(group, scratch, chunk_rows, source.kv.n_kv_heads, query.head_dim);
    if (group.n_rows > 0) {
      launch_fill_page_scratch(group_source, query.head_dim, chunks, spans + group.span_begin,
                               group.span_end - group.span_begin, stream);
    }
    launch_quantized_prefill_attention(query, group_source, chunks, work + group.work_begin,
                                       group.work_end - group.work_begin, stream);
  }
}

}  // namespace kvq::cuda
