// Decode attention (flash-decoding): one query row per chunk, keys split into
// ranges that run in parallel, each block taking one range of one KV head with
// all the query heads that share it; a second kernel merges the ranges.
//
// Memory-bound in intent, issue-bound in practice (ncu, H100 2026-11-27: 62-68%
// issue slots busy at 50% of DRAM bandwidth before the instruction diet below),
// so the loop is written to spend few instructions per key. Each key row (head_dim
// fp16) is read by head_dim / 8 lanes, 16 bytes each; lane group g of a block
// takes keys g, g + kKeyGroups, g + 2 kKeyGroups, ... of its range, kKeysPerStep
// per step. K/V go through shared memory with cp.async, kStages - 1 steps in
// flight ahead of the one computed, and the page indices of the next step to
// issue are loaded one step earlier (positions advanced without divisions), so the
// page index -> K/V chain is off the critical path. The load step from stored to
// operand (rotate_chunk_to_float: pre-RoPE fp16 keys rotated at their positions,
// kept in fp32) is the seam where quantized pages plug in. The lane's (cos, sin)
// step by kKeyGroups positions by complex multiplication in registers, re-read
// from the table every few steps. Scores and the online softmax are fp32 on CUDA
// cores; the running max is raised lazily (see kRescaleSlack), and query heads
// that only pad the group to kMaxGroup are skipped by a block-uniform branch.
// kMaxGroup, the query heads per KV head rounded up to 1, 4 or 8, is a template
// parameter because it sizes the per-lane register arrays.
#include <algorithm>
#include <cfloat>

#include "core/error.h"
#include "cuda/attention.h"
#include "cuda/cuda_check.h"
#include "cuda/decode_partials.cuh"
#include "cuda/kv_page_loader.cuh"

namespace kvq::cuda {
namespace {

constexpr int kDecodeThreads = 128;

// The decode kernel's load step from stored to operand: 8 stored pre-RoPE key halves rotated at their
// position in fp32 and kept in fp32 (the prefill loader rounds them to fp16 for its MMAs; here they
// feed fp32 dot products). A quantized page format replaces this with dequantize-then-rotate.
__device__ __forceinline__ void rotate_chunk_to_float(uint4 raw, const float2 (&cs)[4], float (&k)[8]) {
  const __half2* pairs = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 x = __half22float2(pairs[j]);
    k[2 * j] = x.x * cs[j].x - x.y * cs[j].y;
    k[2 * j + 1] = x.x * cs[j].y + x.y * cs[j].x;
  }
}

// Resident blocks per multiprocessor the kernel is compiled for. 4 (at most 128 registers): without the
// bound kMaxGroup 4 took more and ran 3 blocks, llama3-8b 16x8192 1755 instead of 1976 GB/s (H100,
// 2026-11-27). kMaxGroup 8 holds twice the query and accumulator registers and spilled under 128 and 168 (3 blocks).
constexpr int decode_min_blocks(int max_group) { return max_group >= 8 ? 2 : 4; }

template <int D, int kMaxGroup>
__global__ void __launch_bounds__(kDecodeThreads, decode_min_blocks(kMaxGroup))
    decode_attention_kernel(AttentionQuery query, PagedKv kv, const AttentionChunk* chunks, const DecodeSplit* splits,
                            DecodeWorkspace ws) {
  constexpr int kLanes = D / 8;  // lanes per key row
  constexpr int kGroupsPerWarp = 32 / kLanes;
  constexpr int kKeyGroups = kDecodeThreads / kLanes;
  // Keys per lane group per step: the loads each lane has in flight. 8 for kMaxGroup 4 measured slower
  // (H100, 2026-11-26: 162 instead of 124 registers, llama3-8b 16x8192 1054 instead of 1639 GB/s).
  constexpr int kKeysPerStep = 4;
  constexpr int kStride = kKeyGroups * kKeysPerStep;  // keys per block step
  // K/V of a step go through shared memory with cp.async, kStages steps in flight; each thread reads back
  // only the 16-byte chunks it copied itself, so cp.async.wait_group alone orders them (no block barrier).
  constexpr int kStages = 3;
  constexpr int kStageChunks = kStages * kKeysPerStep * 2 * kDecodeThreads;
  // After the loop the staging area holds the block merge.
  static_assert(kSplitMergeFloats<D, kMaxGroup, kKeyGroups> * 4 <= kStageChunks * 16, "the merge fits in the staging area");
  __shared__ uint4 s_stage[kStageChunks];

  const int kv_head = blockIdx.x;
  const int split_index = blockIdx.y;
  const DecodeSplit split = splits[split_index];
  if (split.key_begin == split.key_end) return;  // padding of a graph's fixed grid: no chunk reads it
  const AttentionChunk chunk = chunks[split.chunk];
  const int group = query.n_heads / kv.n_kv_heads;  // heads h >= group of kMaxGroup are padding: skipped
  const int lane = threadIdx.x % 32;
  const int sub = lane % kLanes;                                 // which 8 dims of the row
  const int key_group = threadIdx.x / 32 * kGroupsPerWarp + lane / kLanes;
  const int32_t* pages = kv.page_table + chunk.page_offset;
  const float scale_log2 = query.scale * 1.4426950408889634f;
  const int n_steps = (split.key_end - split.key_begin + kStride - 1) / kStride;  // uniform over the block
  // Lane group g takes keys key_begin + g + i * kKeyGroups, i = 0, 1, ...: kKeysPerStep of them per step.
  // At each key the lane groups of a warp read adjacent rows, and one RoPE step (kKeyGroups positions)
  // advances a lane's angles from any key to its next.
  const int first = split.key_begin + key_group;

  // Page indices (and rows in the page) of the next step to issue, loaded one step ahead of their use.
  // load_pages runs for steps 0, 1, 2, ... in order, so the key position advances without divisions.
  int next_index = first / kv.page_size, next_row = first % kv.page_size, next_pos = first;
  int page_of[kKeysPerStep], row_of[kKeysPerStep];
  auto load_pages = [&](int s) {
#pragma unroll
    for (int u = 0; u < kKeysPerStep; ++u) {
      page_of[u] = (s < n_steps && next_pos < split.key_end) ? __ldg(pages + next_index) : -1;
      row_of[u] = next_row;
      next_pos += kKeyGroups;
      for (next_row += kKeyGroups; next_row >= kv.page_size; next_row -= kv.page_size) ++next_index;
    }
  };
  const int64_t page_stride = int64_t{kv.n_kv_heads} * kv.page_size * D;  // halves per pool page
  const int head_base = kv_head * kv.page_size * D + sub * 8;
  auto issue = [&](int s) {
    uint4* stage = s_stage + (s % kStages) * (kKeysPerStep * 2 * kDecodeThreads);
#pragma unroll
    for (int u = 0; u < kKeysPerStep; ++u) {
      const bool valid = page_of[u] >= 0;
      const int64_t offset = valid ? page_of[u] * page_stride + head_base + row_of[u] * D : 0;
      cp_async_16(stage + (2 * u) * kDecodeThreads + threadIdx.x, kv.keys + offset, valid);
      cp_async_16(stage + (2 * u + 1) * kDecodeThreads + threadIdx.x, kv.values + offset, valid);
    }
  };

  // Prologue: the first kStages - 1 steps in flight before any query work.
  load_pages(0);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_steps) issue(s);
    cp_async_commit();
    load_pages(s + 1);
  }

  // RoPE angles in registers: (cos, sin) of this lane's 4 pairs at its current key, advanced by the angles
  // of kKeyGroups positions (complex multiplication, as the prefill loader does) and re-read from the table
  // every kReseedSteps steps, so at most kReseedSteps * kKeysPerStep products accumulate (fp32, ~1e-6
  // relative, far below the keys' fp16 rounding).
  constexpr int kReseedSteps = 8;
  auto table_angles = [&](int pos, float2(&cs)[4]) {
    const float2* row = kv.rope + static_cast<int64_t>(pos < split.key_end ? pos : 0) * (D / 2) + sub * 4;
#pragma unroll
    for (int j = 0; j < 4; ++j) cs[j] = __ldg(row + j);
  };
  float2 cs[4], step[4];
  table_angles(kKeyGroups, step);

  float q[kMaxGroup][8];
  const __half* q_row = query.q + static_cast<int64_t>(chunk.first_row) * query.q_stride + (kv_head * group) * D + sub * 8;
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
    if (h < group) {
      float x[8];
      half8_to_float(*reinterpret_cast<const uint4*>(q_row + h * D), x);
#pragma unroll
      for (int i = 0; i < 8; ++i) q[h][i] = x[i] * scale_log2;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) q[h][i] = 0.0f;
    }
  }

  // Running max m (log2 units), sum l and weighted values acc per head (accumulate_key).
  float m[kMaxGroup], l[kMaxGroup], acc[kMaxGroup][8];
  init_running_softmax<kMaxGroup>(m, l, acc);

  // The loop bound is uniform over the block: the shuffles below need every lane.
  for (int s = 0; s < n_steps; ++s) {
    if (s + kStages - 1 < n_steps) issue(s + kStages - 1);
    cp_async_commit();
    load_pages(s + kStages);
    const int base = first + s * kStride;
    if (s % kReseedSteps == 0) table_angles(base, cs);
    cp_async_wait<kStages - 1>();  // step s has landed (this thread's chunks)
    const uint4* stage = s_stage + (s % kStages) * (kKeysPerStep * 2 * kDecodeThreads);
#pragma unroll
    for (int u = 0; u < kKeysPerStep; ++u) {
      const bool valid = base + u * kKeyGroups < split.key_end;
      float k[8], v[8];
      rotate_chunk_to_float(stage[(2 * u) * kDecodeThreads + threadIdx.x], cs, k);
      step_angles(cs, step);
      half8_to_float(stage[(2 * u + 1) * kDecodeThreads + threadIdx.x], v);
      accumulate_key<kLanes, kMaxGroup>(q, k, v, valid, group, m, l, acc);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every thread is done with the staging area before the merge reuses it

  write_split_partial<D, kMaxGroup, kKeyGroups, kDecodeThreads>(m, l, acc, reinterpret_cast<float*>(s_stage), key_group,
                                                                sub, group, kv_head, split_index, query.n_heads, ws);
}

// One block per (query head, decode chunk): merges the chunk's splits into out. The threads form
// kCombineThreads / D split lanes of D dims each, so that a chunk of many splits (batch 1: up to ~8 per
// multiprocessor per KV head) is summed in parallel, not as one long chain of dependent loads.
constexpr int kCombineThreads = 256;

template <int D>
__global__ void __launch_bounds__(kCombineThreads)
    decode_combine_kernel(AttentionQuery query, const AttentionChunk* chunks, const DecodeChunk* decode_chunks,
                          DecodeWorkspace ws) {
  constexpr int kSplitLanes = kCombineThreads / D;
  __shared__ float s_max[kCombineThreads / 32];
  __shared__ float s_sum[kSplitLanes], s_value[kSplitLanes][D];
  const int head = blockIdx.x;
  const DecodeChunk dc = decode_chunks[blockIdx.y];
  const float2* ml = ws.partial_ml + static_cast<int64_t>(dc.split_begin) * query.n_heads + head;  // stride n_heads
  float local_max = -INFINITY;
  for (int s = threadIdx.x; s < dc.n_splits; s += kCombineThreads) local_max = fmaxf(local_max, ml[int64_t{s} * query.n_heads].x);
  for (int offset = 16; offset > 0; offset /= 2) local_max = fmaxf(local_max, __shfl_xor_sync(0xffffffffu, local_max, offset));
  if (threadIdx.x % 32 == 0) s_max[threadIdx.x / 32] = local_max;
  __syncthreads();
  float total_max = s_max[0];
  for (int w = 1; w < kCombineThreads / 32; ++w) total_max = fmaxf(total_max, s_max[w]);

  // Empty splits (max -inf, sums 0) get weight 0; every chunk has a key, so total_max is finite.
  const int d = threadIdx.x % D, split_lane = threadIdx.x / D;
  float sum = 0.0f, value = 0.0f;
#pragma unroll 4
  for (int s = split_lane; s < dc.n_splits; s += kSplitLanes) {
    const int64_t index = static_cast<int64_t>(dc.split_begin + s) * query.n_heads + head;
    const float2 split_ml = ws.partial_ml[index];
    const float w = exp2f(split_ml.x - total_max);
    sum += w * split_ml.y;
    value += w * ws.partial_out[index * D + d];
  }
  s_value[split_lane][d] = value;
  if (d == 0) s_sum[split_lane] = sum;
  __syncthreads();
  if (split_lane == 0) {
    for (int lane = 1; lane < kSplitLanes; ++lane) {
      value += s_value[lane][d];
      sum += s_sum[lane];
    }
    query.out[static_cast<int64_t>(chunks[dc.chunk].first_row) * query.out_stride + head * D + d] = __float2half_rn(value / sum);
  }
}

int group_bucket(int group) { return group <= 1 ? 1 : group <= 4 ? 4 : group <= 8 ? 8 : 0; }

template <int D, int kMaxGroup>
void launch_split(const AttentionQuery& query, const PagedKv& kv, const AttentionChunk* chunks, const DecodeSplit* splits,
                  int32_t n_splits, DecodeWorkspace ws, cudaStream_t stream) {
  const dim3 grid(kv.n_kv_heads, n_splits);
  decode_attention_kernel<D, kMaxGroup><<<grid, kDecodeThreads, 0, stream>>>(query, kv, chunks, splits, ws);
  CUDA_CHECK_LAUNCH(stream, "decode_attention_kernel");
}

template <int D>
void launch_for_head_dim(int bucket, const AttentionQuery& query, const PagedKv& kv, const AttentionChunk* chunks,
                         const DecodeSplit* splits, int32_t n_splits, DecodeWorkspace ws, cudaStream_t stream) {
  switch (bucket) {
    case 1: return launch_split<D, 1>(query, kv, chunks, splits, n_splits, ws, stream);
    case 4: return launch_split<D, 4>(query, kv, chunks, splits, n_splits, ws, stream);
    case 8: return launch_split<D, 8>(query, kv, chunks, splits, n_splits, ws, stream);
    default: fail("decode attention: unsupported group bucket {}", bucket);
  }
}

}  // namespace

bool decode_attention_supported(int head_dim, int group) {
  return (head_dim == 64 || head_dim == 128) && group_bucket(group) > 0;
}

DecodePlan plan_decode(const std::vector<AttentionChunk>& chunks, const std::vector<int32_t>& chunk_ids, int n_heads,
                       int n_kv_heads, int n_sms) {
  DecodePlan plan;
  if (chunk_ids.empty()) return plan;
  std::vector<int32_t> n_keys;
  int64_t total_keys = 0;
  for (int32_t id : chunk_ids) {
    const AttentionChunk& c = chunks[id];
    if (c.n_tokens != 1) fail("decode attention: chunk {} has {} query rows (1 expected)", id, c.n_tokens);
    n_keys.push_back(c.start_pos + 1);
    total_keys += n_keys.back();
  }
  // A chunk of n keys in splits of at most `split` keys: ceil(n / split) splits of equal size (multiples of
  // 64 keys), so no short last split.
  auto chunk_split = [](int64_t n, int64_t split) {
    const int64_t count = (n + split - 1) / split;
    return ((n + count - 1) / count + 63) / 64 * 64;
  };
  // Blocks run in waves of `slots` (the resident blocks of the device), and a block's time is about its
  // keys plus a fixed cost (prologue, merge, partial write: ~kBlockCostKeys keys). Candidates fill
  // 1 .. kMaxWaves waves (at least 128 keys per split); the plan takes the one whose estimated time,
  // waves * (longest split + fixed cost), is least. (Before: a fixed ~2 waves, which left smollm2 64x8192 at
  // 2.18 waves, its third wave 18% full.)
  constexpr int64_t kBlockCostKeys = 96;
  constexpr int kMaxWaves = 8;
  const int group_blocks = decode_min_blocks(group_bucket(n_heads / std::max(n_kv_heads, 1)));
  const int64_t slots = int64_t{group_blocks} * std::max(n_sms, 1);
  int64_t best_split = 0, best_cost = INT64_MAX;
  for (int waves = 1; waves <= kMaxWaves; ++waves) {
    const int64_t target = (total_keys * n_kv_heads + waves * slots - 1) / (waves * slots);
    const int64_t split = std::max<int64_t>(128, (target + 63) / 64 * 64);
    int64_t blocks = 0, longest = 0;
    for (int32_t n : n_keys) {
      blocks += (n + split - 1) / split * n_kv_heads;
      longest = std::max(longest, chunk_split(n, split));
    }
    const int64_t cost = (blocks + slots - 1) / slots * (longest + kBlockCostKeys);
    if (cost < best_cost) {
      best_cost = cost;
      best_split = split;
    }
  }
  for (size_t i = 0; i < chunk_ids.size(); ++i) {
    const int32_t id = chunk_ids[i];
    const int64_t split_keys = chunk_split(n_keys[i], best_split);
    DecodeChunk dc{id, static_cast<int32_t>(plan.splits.size()), 0};
    for (int64_t k = 0; k < n_keys[i]; k += split_keys) {
      plan.splits.push_back({id, static_cast<int32_t>(k), static_cast<int32_t>(std::min<int64_t>(k + split_keys, n_keys[i]))});
      ++dc.n_splits;
    }
    plan.chunks.push_back(dc);
  }
  return plan;
}

int64_t decode_workspace_bytes(int32_t n_splits, int n_heads, int head_dim) {
  const int64_t out_floats = (int64_t{n_splits} * n_heads * head_dim + 3) / 4 * 4;
  return out_floats * 4 + int64_t{n_splits} * n_heads * 8;
}

void launch_decode_attention(const AttentionQuery& query, const PagedKv& kv, const AttentionChunk* chunks,
                             const DecodeSplit* splits, int32_t n_splits, const DecodeChunk* decode_chunks,
                             int32_t n_decode_chunks, void* workspace, cudaStream_t stream) {
  if (n_splits == 0) return;
  if (n_splits > 65535 || n_decode_chunks > 65535) fail("decode attention: {} splits in one step (at most 65535)", n_splits);
  const int group = query.n_heads / kv.n_kv_heads;
  if (query.n_heads % kv.n_kv_heads != 0 || !decode_attention_supported(query.head_dim, group)) {
    fail("decode attention: head_dim {} with {} query heads per KV head is not supported (64 or 128, at most 8)",
         query.head_dim, group);
  }
  const DecodeWorkspace ws = split_workspace(workspace, n_splits, query.n_heads, query.head_dim);
  const int bucket = group_bucket(group);
  if (query.head_dim == 64) {
    launch_for_head_dim<64>(bucket, query, kv, chunks, splits, n_splits, ws, stream);
  } else {
    launch_for_head_dim<128>(bucket, query, kv, chunks, splits, n_splits, ws, stream);
  }
  launch_decode_combine(query, chunks, decode_chunks, n_decode_chunks, n_splits, workspace, stream);
}

void launch_decode_combine(const AttentionQuery& query, const AttentionChunk* chunks, const DecodeChunk* decode_chunks,
                           int32_t n_decode_chunks, int32_t n_splits, void* workspace, cudaStream_t stream) {
  if (n_decode_chunks == 0) return;
  if (n_decode_chunks > 65535) fail("decode combine: {} query rows in one launch (at most 65535)", n_decode_chunks);
  const DecodeWorkspace ws = split_workspace(workspace, n_splits, query.n_heads, query.head_dim);
  const dim3 combine_grid(query.n_heads, n_decode_chunks);
  if (query.head_dim == 64) {
    decode_combine_kernel<64><<<combine_grid, kCombineThreads, 0, stream>>>(query, chunks, decode_chunks, ws);
  } else {
    decode_combine_kernel<128><<<combine_grid, kCombineThreads, 0, stream>>>(query, chunks, decode_chunks, ws);
  }
  CUDA_CHECK_LAUNCH(stream, "decode_combine_kernel");
}

}  // namespace kvq::cuda
