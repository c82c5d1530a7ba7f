// Split-K attention over quantized pages and exact rows (quantized_attention.h).
//
// A block takes one split (a key range of one query row, one source) of one KV
// head with every query head of the group. head_dim / 8 lanes read a key row,
// 8 elements each: from the pages with decode_chunk8 (bit-equal to
// PageCodec::decode in fp32), the row's outlier slots found by bisection (a
// block's slots are in row order) and put back; or an fp16 exact row. Pre-RoPE
// keys are rotated in fp32 at their position, as the CPU rotates its decoded
// keys; scores, softmax and the weighted sum of values are fp32. The partial
// result has decode attention's format (decode_partials.cuh), so
// launch_decode_combine merges a row's splits.
#include "cuda/quantized_attention.h"

#include <algorithm>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/decode_partials.cuh"
#include "cuda/kv_dequant.cuh"

namespace kvq::cuda {
namespace {

constexpr int kThreads = 128;

template <int D, int kMaxGroup, int kBits>
__global__ void __launch_bounds__(kThreads)
    quantized_split_kernel(AttentionQuery query, QuantizedPagedKv kv, const AttentionChunk* rows,
                           const ExactSource* sources, const QuantizedSplit* splits, DecodeWorkspace ws) {
  constexpr int kLanes = D / 8;  // lanes per key row
  constexpr int kGroupsPerWarp = 32 / kLanes;
  constexpr int kKeyGroups = kThreads / kLanes;
  __shared__ float s_merge[kSplitMergeFloats<D, kMaxGroup, kKeyGroups>];

  const int split_index = blockIdx.x;
  const int kv_head = blockIdx.y;
  const QuantizedSplit split = splits[split_index];
  if (split.key_begin == split.key_end) return;
  const AttentionChunk row = rows[split.row];
  const ExactSource source = sources[split.row];
  const int group = query.n_heads / kv.n_kv_heads;
  const int lane = threadIdx.x % 32;
  const int sub = lane % kLanes;
  const int c0 = sub * 8;
  const int key_group = threadIdx.x / 32 * kGroupsPerWarp + lane / kLanes;
  const int page_size = kv.key_layout.page_size;
  const int kv_dim = kv.n_kv_heads * D;
  const int64_t page_bytes = int64_t{kv.n_kv_heads} * (kv.key_layout.block_bytes + kv.value_layout.block_bytes);
  const BlockCalibration key_calib = block_calibration(kv.calib, kv.key_layout, kv_head);
  const BlockCalibration value_calib = block_calibration(kv.calib, kv.value_layout, kv_head);
  const float scale_log2 = query.scale * 1.4426950408889634f;

  float q[kMaxGroup][8];
  const __half* q_row = query.q + static_cast<int64_t>(row.first_row) * query.q_stride + (kv_head * group) * D + c0;
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
    float x[8] = {};
    if (h < group) half8_to_float(*reinterpret_cast<const uint4*>(q_row + h * D), x);
#pragma unroll
    for (int i = 0; i < 8; ++i) q[h][i] = x[i] * scale_log2;
  }
  float m[kMaxGroup], l[kMaxGroup], acc[kMaxGroup][8];
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[h][i] = 0.0f;
  }

  // The loop bound is uniform over the block: the shuffles below need every lane.
  for (int base = split.key_begin; base < split.key_end; base += kKeyGroups) {
    const int pos = base + key_group;
    const bool valid = pos < split.key_end;
    float k[8] = {}, v[8] = {};
    if (valid && split.exact) {
      const __half* key_row;
      if (pos >= source.chunk_start) {
        key_row = kv.step_keys + static_cast<int64_t>(source.chunk_first_row + pos - source.chunk_start) * kv.step_stride +
                  kv_head * D;
      } else {
        key_row = kv.store.rows + exact_row_offset(kv.store, kv.n_kv_heads, D, source.slot, 0, kv_head, pos);
      }
      // V sits kv_dim after K in a step row, and n_kv_heads * rows-per-head rows after it in the store.
      const int64_t value_offset = pos >= source.chunk_start
                                       ? kv_dim
                                       : int64_t{kv.n_kv_heads} * (kv.store.sinks + kv.store.window) * D;
      half8_to_float(*reinterpret_cast<const uint4*>(key_row + c0), k);
      half8_to_float(*reinterpret_cast<const uint4*>(key_row + value_offset + c0), v);
    } else if (valid) {
      const int32_t page = __ldg(kv.page_table + row.page_offset + pos / page_size);
      const int page_row = pos % page_size;
      const uint8_t* page_base = kv.pool + page * page_bytes;
      const uint8_t* key_block = page_base + kv_head * kv.key_layout.block_bytes;
      const uint8_t* value_block =
          page_base + kv.n_kv_heads * kv.key_layout.block_bytes + kv_head * kv.value_layout.block_bytes;
      decode_chunk8<kBits>(kv.key_layout, key_block, page_row, c0, key_calib, k);
      if (kv.key_layout.outlier_capacity > 0) apply_row_outliers(kv.key_layout, key_block, page_row, c0, k);
      decode_chunk8<kBits>(kv.value_layout, value_block, page_row, c0, value_calib, v);
      if (kv.value_layout.outlier_capacity > 0) apply_row_outliers(kv.value_layout, value_block, page_row, c0, v);
    }
    if (valid && kv.rotate_keys) {
      const float2* angles = kv.rope + static_cast<int64_t>(pos) * (D / 2) + sub * 4;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 cs = __ldg(angles + j);
        const float x0 = k[2 * j], x1 = k[2 * j + 1];
        k[2 * j] = x0 * cs.x - x1 * cs.y;
        k[2 * j + 1] = x0 * cs.y + x1 * cs.x;
      }
    }
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) {
      if (h >= group) continue;  // uniform over the block
      float score = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) score = fmaf(q[h][i], k[i], score);
#pragma unroll
      for (int offset = kLanes / 2; offset > 0; offset /= 2) score += __shfl_xor_sync(0xffffffffu, score, offset);
      if (!valid) continue;
      if (score > m[h]) {
        const float correction = fast_exp2(m[h] - score);  // 0 while m is -inf
        m[h] = score;
        l[h] *= correction;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[h][i] *= correction;
      }
      const float p = fast_exp2(score - m[h]);
      l[h] += p;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[h][i] = fmaf(p, v[i], acc[h][i]);
    }
  }
  write_split_partial<D, kMaxGroup, kKeyGroups, kThreads>(m, l, acc, s_merge, key_group, sub, group, kv_head,
                                                          split_index, query.n_heads, ws);
}

int group_bucket(int group) { return group <= 1 ? 1 : group <= 4 ? 4 : group <= 8 ? 8 : 0; }

// Packed schemes decode with their own bits; the others ignore kBits (4 compiles their paths).
int bits_bucket(const PageBlockLayout& layout) {
  const bool packed = layout.scheme == KvScheme::uniform || layout.scheme == KvScheme::nonuniform ||
                      layout.scheme == KvScheme::kivi;
  return packed ? layout.bits : 4;
}

template <int D, int kMaxGroup, int kBits>
void launch_bits(const AttentionQuery& query, const QuantizedPagedKv& kv, const AttentionChunk* rows,
                 const ExactSource* sources, const QuantizedSplit* splits, int32_t n_splits, DecodeWorkspace ws,
                 cudaStream_t stream) {
  const dim3 grid(n_splits, kv.n_kv_heads);
  quantized_split_kernel<D, kMaxGroup, kBits><<<grid, kThreads, 0, stream>>>(query, kv, rows, sources, splits, ws);
  CUDA_CHECK_LAUNCH(stream, "quantized_split_kernel");
}

template <int D, int kMaxGroup>
void launch_group(int bits, const AttentionQuery& query, const QuantizedPagedKv& kv, const AttentionChunk* rows,
                  const ExactSource* sources, const QuantizedSplit* splits, int32_t n_splits, DecodeWorkspace ws,
                  cudaStream_t stream) {
  switch (bits) {
    case 2: return launch_bits<D, kMaxGroup, 2>(query, kv, rows, sources, splits, n_splits, ws, stream);
    case 3: return launch_bits<D, kMaxGroup, 3>(query, kv, rows, sources, splits, n_splits, ws, stream);
    case 4: return launch_bits<D, kMaxGroup, 4>(query, kv, rows, sources, splits, n_splits, ws, stream);
    default: fail("quantized attention: {}-bit codes are not supported", bits);
  }
}

template <int D>
void launch_head_dim(int bucket, int bits, const AttentionQuery& query, const QuantizedPagedKv& kv,
                     const AttentionChunk* rows, const ExactSource* sources, const QuantizedSplit* splits,
                     int32_t n_splits, DecodeWorkspace ws, cudaStream_t stream) {
  switch (bucket) {
    case 1: return launch_group<D, 1>(bits, query, kv, rows, sources, splits, n_splits, ws, stream);
    case 4: return launch_group<D, 4>(bits, query, kv, rows, sources, splits, n_splits, ws, stream);
    case 8: return launch_group<D, 8>(bits, query, kv, rows, sources, splits, n_splits, ws, stream);
    default: fail("quantized attention: unsupported group bucket {}", bucket);
  }
}

}  // namespace

bool quantized_attention_supported(int head_dim, int group) {
  return (head_dim == 64 || head_dim == 128) && group_bucket(group) > 0;
}

int64_t quantized_attention_workspace_bytes(int32_t n_splits, int n_heads, int head_dim) {
  return decode_workspace_bytes(n_splits, n_heads, head_dim);
}

std::vector<QuantizedAttentionPlan> plan_quantized_attention(const std::vector<AttentionChunk>& chunks,
                                                             const std::vector<int32_t>& chunk_slots,
                                                             const KvCacheOptions& options, int page_size,
                                                             int n_kv_heads, int n_sms) {
  std::vector<QuantizedAttentionPlan> plans;
  if (chunks.empty()) return plans;
  if (chunk_slots.size() != chunks.size()) fail("quantized attention: {} slots for {} chunks", chunk_slots.size(), chunks.size());
  // Splits of at most split_keys keys, sized so the step's blocks fill about two waves of 8 resident blocks
  // per multiprocessor (at least 128 keys, so short rows stay one split).
  int64_t total_keys = 0;
  for (const AttentionChunk& c : chunks) {
    const int64_t n = c.n_tokens;
    total_keys += n * c.start_pos + n * (n + 1) / 2;
  }
  const int64_t slots = int64_t{8} * std::max(n_sms, 1);
  const int64_t target = (total_keys * n_kv_heads + 2 * slots - 1) / (2 * slots);
  const int64_t split_keys = std::max<int64_t>(128, (target + 63) / 64 * 64);
  const int sinks = options.effective_sinks();

  plans.emplace_back();
  for (size_t i = 0; i < chunks.size(); ++i) {
    const AttentionChunk& c = chunks[i];
    for (int32_t t = 0; t < c.n_tokens; ++t) {
      if (static_cast<int32_t>(plans.back().rows.size()) == kQuantizedRowsPerLaunch) plans.emplace_back();
      QuantizedAttentionPlan& plan = plans.back();
      const int64_t pos = int64_t{c.start_pos} + t;
      const auto row = static_cast<int32_t>(plan.rows.size());
      plan.rows.push_back({c.first_row + t, 1, static_cast<int32_t>(pos), c.page_offset});
      plan.sources.push_back({c.first_row, c.start_pos, chunk_slots[i]});
      DecodeChunk dc{row, static_cast<int32_t>(plan.splits.size()), 0};
      // The rule of CpuBackend::attention: sinks and [exact_from, pos] exactly, the keys between from the pages.
      const int64_t n_keys = pos + 1;
      const int64_t n_sinks = std::min<int64_t>(sinks, n_keys);
      const int64_t exact_from = std::clamp<int64_t>(options.exact_from(pos, c.start_pos, page_size), n_sinks, n_keys);
      auto add = [&](int64_t begin, int64_t end, int exact) {
        if (begin >= end) return;
        const int64_t count = (end - begin + split_keys - 1) / split_keys;
        const int64_t size = (end - begin + count - 1) / count;
        for (int64_t k = begin; k < end; k += size) {
          plan.splits.push_back({row, static_cast<int32_t>(k), static_cast<int32_t>(std::min(k + size, end)), exact});
          ++dc.n_splits;
        }
      };
      add(0, n_sinks, 1);
      add(n_sinks, exact_from, 0);
      add(exact_from, n_keys, 1);
      plan.combine.push_back(dc);
    }
  }
  return plans;
}

void launch_quantized_attention(const AttentionQuery& query, const QuantizedPagedKv& kv, const AttentionChunk* rows,
                                const ExactSource* sources, const QuantizedSplit* splits, int32_t n_splits,
                                const DecodeChunk* combine, int32_t n_rows, void* workspace, cudaStream_t stream) {
  if (n_splits == 0) return;
  const int group = query.n_heads / kv.n_kv_heads;
  if (query.n_heads % kv.n_kv_heads != 0 || !quantized_attention_supported(query.head_dim, group)) {
    fail("quantized attention: head_dim {} with {} query heads per KV head is not supported (64 or 128, at most 8)",
         query.head_dim, group);
  }
  if (kv.key_layout.head_dim != query.head_dim || kv.value_layout.head_dim != query.head_dim) {
    fail("quantized attention: pages of head_dim {} for queries of head_dim {}", kv.key_layout.head_dim, query.head_dim);
  }
  if (bits_bucket(kv.key_layout) != bits_bucket(kv.value_layout)) fail("quantized attention: keys and values differ in bits");
  const DecodeWorkspace ws = split_workspace(workspace, n_splits, query.n_heads, query.head_dim);
  const int bits = bits_bucket(kv.key_layout);
  if (query.head_dim == 64) {
    launch_head_dim<64>(group_bucket(group), bits, query, kv, rows, sources, splits, n_splits, ws, stream);
  } else {
    launch_head_dim<128>(group_bucket(group), bits, query, kv, rows, sources, splits, n_splits, ws, stream);
  }
  launch_decode_combine(query, rows, combine, n_rows, n_splits, workspace, stream);
}

}  // namespace kvq::cuda
