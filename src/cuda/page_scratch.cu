// The page scratch's planner and pre-pass (page_scratch.h). The pre-pass is a
// plain grid, one thread per 16-byte chunk of a row: the decode is
// QuantizedPageProducer's own (tile_chunk), so the rows are the bits its
// tiles would hold.
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
                                  const ExactRule& rule, int n_kv_heads, int head_dim, int64_t cap_bytes) {
  std::vector<bool> prefilled(chunks.size(), false);
  for (const PrefillWork& w : work) prefilled[w.chunk] = true;
  PageScratchPlan plan;
  plan.chunk_rows.assign(chunks.size(), 0);
  for (size_t c = 0; c < chunks.size(); ++c) {
    if (!prefilled[c]) continue;
    const AttentionChunk& chunk = chunks[c];
    // The page keys of the chunk's last row: the most any of its query tiles reads as page tiles.
    const int32_t page_keys = rule.split(chunk.start_pos + chunk.n_tokens - 1, chunk.start_pos);
    plan.chunk_rows[c] = static_cast<int32_t>(plan.n_rows);
    for (int32_t k = 0; k < page_keys; k += kPageScratchSpanRows) {
      plan.spans.push_back({static_cast<int32_t>(c), k, std::min(k + kPageScratchSpanRows, page_keys)});
    }
    plan.n_rows += page_keys;
  }
  if (plan.n_rows == 0 || page_scratch_bytes(plan.n_rows, n_kv_heads, head_dim) > cap_bytes) return {};
  return plan;
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

}  // namespace kvq::cuda
