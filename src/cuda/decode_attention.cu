// Decode attention (flash-decoding): one query row per chunk, keys split into
// ranges that run in parallel, each block taking one range of one KV head with
// all the query heads that share it; a second kernel merges the ranges.
//
// Memory-bound: each key row (head_dim fp16) is read by head_dim / 8 lanes, 16
// bytes each, kKeysPerStep keys per lane group per step. K/V go through shared
// memory with cp.async, kStages - 1 steps in flight ahead of the one computed,
// and the page indices of the next step to issue are loaded one step earlier, so
// the page index -> K/V chain is off the critical path. Scores on CUDA cores in
// fp32 with the same pre-RoPE storage and rotation as the prefill loader: the
// lane's (cos, sin) start from one table row and step forward by complex
// multiplication in registers (rotate_chunk), no table reads in the loop.
// kMaxGroup, the query heads per KV head rounded up to 1, 4 or 8, is a template
// parameter because it sizes the per-lane register arrays.
#include <algorithm>
#include <cfloat>

#include "core/error.h"
#include "cuda/attention.h"
#include "cuda/cuda_check.h"
#include "cuda/kv_page_loader.cuh"

namespace kvq::cuda {
namespace {

constexpr int kDecodeThreads = 128;

struct DecodeWorkspace {
  float* partial_out;  // (n_splits, n_heads, head_dim) unnormalized sums of p * v
  float2* partial_ml;  // (n_splits, n_heads) (max in log2 units, sum of p)
};

DecodeWorkspace split_workspace(void* workspace, int32_t n_splits, int n_heads, int head_dim) {
  float* out = static_cast<float*>(workspace);
  const int64_t out_floats = int64_t{n_splits} * n_heads * head_dim;
  return {out, reinterpret_cast<float2*>(out + ((out_floats + 3) / 4) * 4)};
}

template <int D, int kMaxGroup>
// 4 blocks per multiprocessor (at most 128 registers): without the bound kMaxGroup 4 took more and ran 3 blocks,
// llama3-8b 16x8192 1755 instead of 1976 GB/s (H100, 2026-11-27).
__global__ void __launch_bounds__(kDecodeThreads, 4)
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
  // After the loop the staging area holds the block merge (s_max, s_sum, s_acc).
  constexpr int kMergeFloats = 2 * kKeyGroups * kMaxGroup + kKeyGroups * kMaxGroup * D;
  static_assert(kMergeFloats * 4 <= kStageChunks * 16, "the merge fits in the staging area");
  __shared__ uint4 s_stage[kStageChunks];
  float(*s_max)[kMaxGroup] = reinterpret_cast<float(*)[kMaxGroup]>(s_stage);
  float(*s_sum)[kMaxGroup] = reinterpret_cast<float(*)[kMaxGroup]>(reinterpret_cast<float*>(s_stage) + kKeyGroups * kMaxGroup);
  float(*s_acc)[kMaxGroup][D] =
      reinterpret_cast<float(*)[kMaxGroup][D]>(reinterpret_cast<float*>(s_stage) + 2 * kKeyGroups * kMaxGroup);

  const int kv_head = blockIdx.x;
  const int split_index = blockIdx.y;
  const DecodeSplit split = splits[split_index];
  const AttentionChunk chunk = chunks[split.chunk];
  const int group = query.n_heads / kv.n_kv_heads;
  const int lane = threadIdx.x % 32;
  const int sub = lane % kLanes;                                 // which 8 dims of the row
  const int key_group = threadIdx.x / 32 * kGroupsPerWarp + lane / kLanes;
  const int32_t* pages = kv.page_table + chunk.page_offset;
  const float scale_log2 = query.scale * 1.4426950408889634f;
  const int n_steps = (split.key_end - split.key_begin + kStride - 1) / kStride;  // uniform over the block
  const int first = split.key_begin + key_group * kKeysPerStep;  // this lane group's first key

  // Page indices of the next step to issue, loaded one step ahead of their use.
  int page_of[kKeysPerStep];
  auto load_pages = [&](int s) {
#pragma unroll
    for (int u = 0; u < kKeysPerStep; ++u) {
      const int pos = first + s * kStride + u;
      page_of[u] = (s < n_steps && pos < split.key_end) ? __ldg(pages + pos / kv.page_size) : -1;
    }
  };
  auto issue = [&](int s) {
    uint4* stage = s_stage + (s % kStages) * (kKeysPerStep * 2 * kDecodeThreads);
#pragma unroll
    for (int u = 0; u < kKeysPerStep; ++u) {
      const int pos = first + s * kStride + u;
      const bool valid = page_of[u] >= 0;
      const int64_t offset =
          valid ? ((static_cast<int64_t>(page_of[u]) * kv.n_kv_heads + kv_head) * kv.page_size + pos % kv.page_size) * D +
                      sub * 8
                : 0;
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

  // RoPE angles in registers: (cos, sin) of this lane's 4 pairs at its first key, stepped by one position
  // inside a step and by kStride between steps (complex multiplication, as the prefill loader does).
  float2 cs_base[4], step1[4], step_s[4];
  {
    const float2* base_row = kv.rope + static_cast<int64_t>(first < split.key_end ? first : 0) * (D / 2) + sub * 4;
    const float2* one_row = kv.rope + static_cast<int64_t>(1 < split.key_end ? 1 : 0) * (D / 2) + sub * 4;
    const float2* stride_row = kv.rope + static_cast<int64_t>(kStride < split.key_end ? kStride : 0) * (D / 2) + sub * 4;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      cs_base[j] = __ldg(base_row + j);
      step1[j] = __ldg(one_row + j);
      step_s[j] = __ldg(stride_row + j);
    }
  }

  float q[kMaxGroup][8];
  const __half* q_row = query.q + static_cast<int64_t>(chunk.first_row) * query.q_stride + (kv_head * group) * D + sub * 8;
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
    if (h < group) {
      uint4 raw = *reinterpret_cast<const uint4*>(q_row + h * D);
      const __half2* pairs = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 x = __half22float2(pairs[j]);
        q[h][2 * j] = x.x * scale_log2;
        q[h][2 * j + 1] = x.y * scale_log2;
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) q[h][i] = 0.0f;
    }
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
  for (int s = 0; s < n_steps; ++s) {
    if (s + kStages - 1 < n_steps) issue(s + kStages - 1);
    cp_async_commit();
    load_pages(s + kStages);
    cp_async_wait<kStages - 1>();  // step s has landed (this thread's chunks)
    const uint4* stage = s_stage + (s % kStages) * (kKeysPerStep * 2 * kDecodeThreads);
    const int base = first + s * kStride;
    uint4 v_raw[kKeysPerStep];
    float score[kKeysPerStep][kMaxGroup];
    float2 cs[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) cs[j] = cs_base[j];
#pragma unroll
    for (int u = 0; u < kKeysPerStep; ++u) {
      const int pos = base + u;
      const bool valid = pos < split.key_end;
      const uint4 k_raw = stage[(2 * u) * kDecodeThreads + threadIdx.x];
      v_raw[u] = stage[(2 * u + 1) * kDecodeThreads + threadIdx.x];
      uint4 rotated = rotate_chunk(k_raw, cs);
      if (u + 1 < kKeysPerStep) {
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          cs[p] = make_float2(cs[p].x * step1[p].x - cs[p].y * step1[p].y, cs[p].x * step1[p].y + cs[p].y * step1[p].x);
        }
      }
      const __half2* pairs = reinterpret_cast<const __half2*>(&rotated);
      float k[8];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 x = __half22float2(pairs[j]);
        k[2 * j] = x.x;
        k[2 * j + 1] = x.y;
      }
#pragma unroll
      for (int h = 0; h < kMaxGroup; ++h) {
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) dot += q[h][i] * k[i];
#pragma unroll
        for (int offset = kLanes / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        score[u][h] = valid ? dot : -INFINITY;
      }
    }
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      cs_base[p] = make_float2(cs_base[p].x * step_s[p].x - cs_base[p].y * step_s[p].y,
                               cs_base[p].x * step_s[p].y + cs_base[p].y * step_s[p].x);
    }
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) {
      float step_max = score[0][h];
#pragma unroll
      for (int u = 1; u < kKeysPerStep; ++u) step_max = fmaxf(step_max, score[u][h]);
      const float new_max = fmaxf(m[h], step_max);
      if (new_max == -INFINITY) continue;  // no key yet for this lane group
      const float correction = exp2f(m[h] - new_max);
      m[h] = new_max;
      l[h] *= correction;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[h][i] *= correction;
#pragma unroll
      for (int u = 0; u < kKeysPerStep; ++u) {
        const float p = exp2f(score[u][h] - new_max);
        l[h] += p;
        const __half2* pairs = reinterpret_cast<const __half2*>(&v_raw[u]);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float2 v = __half22float2(pairs[j]);
          acc[h][2 * j] += p * v.x;
          acc[h][2 * j + 1] += p * v.y;
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every thread is done with the staging area before the merge reuses it

  // Merge the block's key groups, then write the split's partial result.
  if (sub == 0) {
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) {
      s_max[key_group][h] = m[h];
      s_sum[key_group][h] = l[h];
    }
  }
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
#pragma unroll
    for (int i = 0; i < 8; ++i) s_acc[key_group][h][sub * 8 + i] = acc[h][i];
  }
  __syncthreads();
  for (int i = threadIdx.x; i < group * D; i += kDecodeThreads) {
    const int h = i / D, d = i % D;
    float block_max = -INFINITY;
    for (int kg = 0; kg < kKeyGroups; ++kg) block_max = fmaxf(block_max, s_max[kg][h]);
    float sum = 0.0f, value = 0.0f;
    for (int kg = 0; kg < kKeyGroups; ++kg) {
      if (s_max[kg][h] == -INFINITY) continue;  // this key group had no keys
      const float w = exp2f(s_max[kg][h] - block_max);
      sum += w * s_sum[kg][h];
      value += w * s_acc[kg][h][d];
    }
    const int head = kv_head * group + h;
    ws.partial_out[(static_cast<int64_t>(split_index) * query.n_heads + head) * D + d] = value;
    if (d == 0) ws.partial_ml[static_cast<int64_t>(split_index) * query.n_heads + head] = make_float2(block_max, sum);
  }
}

// One block per (query head, decode chunk): merges the chunk's splits into out.
__global__ void decode_combine_kernel(AttentionQuery query, const AttentionChunk* chunks, const DecodeChunk* decode_chunks,
                                      DecodeWorkspace ws) {
  const int head = blockIdx.x;
  const DecodeChunk dc = decode_chunks[blockIdx.y];
  const int D = query.head_dim;
  float total_max = -INFINITY;
  for (int s = 0; s < dc.n_splits; ++s) {
    total_max = fmaxf(total_max, ws.partial_ml[static_cast<int64_t>(dc.split_begin + s) * query.n_heads + head].x);
  }
  __half* out = query.out + static_cast<int64_t>(chunks[dc.chunk].first_row) * query.out_stride + head * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float sum = 0.0f, value = 0.0f;
    for (int s = 0; s < dc.n_splits; ++s) {
      const int64_t index = static_cast<int64_t>(dc.split_begin + s) * query.n_heads + head;
      const float2 ml = ws.partial_ml[index];
      if (ml.x == -INFINITY) continue;
      const float w = exp2f(ml.x - total_max);
      sum += w * ml.y;
      value += w * ws.partial_out[index * D + d];
    }
    out[d] = __float2half_rn(value / sum);
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

DecodePlan plan_decode(const std::vector<AttentionChunk>& chunks, const std::vector<int32_t>& chunk_ids, int n_kv_heads,
                       int n_sms) {
  DecodePlan plan;
  int64_t total_keys = 0;
  for (int32_t id : chunk_ids) total_keys += chunks[id].start_pos + 1;
  // About eight blocks per multiprocessor over the whole step (two waves of 4 resident: a smaller tail than
  // one wave of ~3.9; smollm2 64x8192 1793 instead of 1534 GB/s, H100 2026-11-27), at least 128 keys each
  // (batch 1 with few KV heads needs the smaller splits to fill the device).
  const int64_t target_blocks = int64_t{8} * std::max(n_sms, 1);
  int64_t split_keys = (total_keys * n_kv_heads + target_blocks - 1) / target_blocks;
  split_keys = std::max<int64_t>(128, (split_keys + 63) / 64 * 64);
  for (int32_t id : chunk_ids) {
    const AttentionChunk& c = chunks[id];
    if (c.n_tokens != 1) fail("decode attention: chunk {} has {} query rows (1 expected)", id, c.n_tokens);
    const int32_t n_keys = c.start_pos + 1;
    DecodeChunk dc{id, static_cast<int32_t>(plan.splits.size()), 0};
    for (int64_t k = 0; k < n_keys; k += split_keys) {
      plan.splits.push_back({id, static_cast<int32_t>(k), static_cast<int32_t>(std::min<int64_t>(k + split_keys, n_keys))});
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
  decode_combine_kernel<<<dim3(query.n_heads, n_decode_chunks), 128, 0, stream>>>(query, chunks, decode_chunks, ws);
  CUDA_CHECK_LAUNCH(stream, "decode_combine_kernel");
}

}  // namespace kvq::cuda
