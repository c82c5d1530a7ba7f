// Decode attention (flash-decoding): one query row per chunk, keys split into
// ranges that run in parallel, each block taking one range of one KV head with
// all the query heads that share it; a second kernel merges the ranges.
//
// Memory-bound: each key row (head_dim fp16) is read by head_dim / 8 lanes, 16
// bytes each, kKeysPerStep keys per lane group in flight; scores on CUDA cores
// in fp32 with the same pre-RoPE storage and rotation as the prefill loader
// (rope_chunk). kMaxGroup, the query heads per KV head rounded up to 1, 4 or 8,
// is a template parameter because it sizes the per-lane register arrays.
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
__global__ void __launch_bounds__(kDecodeThreads)
    decode_attention_kernel(AttentionQuery query, PagedKv kv, const AttentionChunk* chunks, const DecodeSplit* splits,
                            DecodeWorkspace ws) {
  constexpr int kLanes = D / 8;  // lanes per key row
  constexpr int kGroupsPerWarp = 32 / kLanes;
  constexpr int kKeyGroups = kDecodeThreads / kLanes;
  // Keys per lane group per step: the loads each lane has in flight. 8 for kMaxGroup 4 measured slower
  // (H100, 2026-11-26: 162 instead of 124 registers, llama3-8b 16x8192 1054 instead of 1639 GB/s).
  constexpr int kKeysPerStep = 4;
  __shared__ float s_max[kKeyGroups][kMaxGroup];
  __shared__ float s_sum[kKeyGroups][kMaxGroup];
  __shared__ float s_acc[kKeyGroups][kMaxGroup][D];

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
  for (int step = split.key_begin; step < split.key_end; step += kKeyGroups * kKeysPerStep) {
    const int base = step + key_group * kKeysPerStep;
    uint4 k_raw[kKeysPerStep], v_raw[kKeysPerStep];
#pragma unroll
    for (int u = 0; u < kKeysPerStep; ++u) {
      const int pos = base + u;
      if (pos < split.key_end) {
        const int64_t offset = page_row_offset<D>(kv, pages, kv_head, pos) + sub * 8;
        k_raw[u] = __ldg(reinterpret_cast<const uint4*>(kv.keys + offset));
        v_raw[u] = __ldg(reinterpret_cast<const uint4*>(kv.values + offset));
      } else {
        k_raw[u] = v_raw[u] = make_uint4(0, 0, 0, 0);
      }
    }
    float score[kKeysPerStep][kMaxGroup];
#pragma unroll
    for (int u = 0; u < kKeysPerStep; ++u) {
      const int pos = base + u;
      const bool valid = pos < split.key_end;
      uint4 rotated = valid ? rope_chunk(k_raw[u], kv.rope + static_cast<int64_t>(pos) * (D / 2) + sub * 4) : k_raw[u];
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
  // About four blocks per multiprocessor over the whole step, at least 256 keys each.
  const int64_t target_blocks = int64_t{4} * std::max(n_sms, 1);
  int64_t split_keys = (total_keys * n_kv_heads + target_blocks - 1) / target_blocks;
  split_keys = std::max<int64_t>(256, (split_keys + 63) / 64 * 64);
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
