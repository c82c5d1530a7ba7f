// What the split-K attention kernels share (decode_attention.cu over fp16
// pages, quantized_attention.cu over quantized pages and exact rows): the
// partial results a split writes and the combine kernel merges (one format for
// both, so one combine serves both), the per-key online softmax both run,
// the merge of a block's key groups into its split's partial result, and small
// helpers.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/attention.h"

namespace kvq::cuda {

struct DecodeWorkspace {
  float* partial_out;  // (n_splits, n_heads, head_dim) unnormalized sums of p * v
  float2* partial_ml;  // (n_splits, n_heads) (max in log2 units, sum of p)
};

inline DecodeWorkspace split_workspace(void* workspace, int32_t n_splits, int n_heads, int head_dim) {
  float* out = static_cast<float*>(workspace);
  const int64_t out_floats = int64_t{n_splits} * n_heads * head_dim;
  return {out, reinterpret_cast<float2*>(out + ((out_floats + 3) / 4) * 4)};
}

// 2^x (ex2.approx: 2 ulp; -inf gives 0).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ void half8_to_float(uint4 raw, float (&x)[8]) {
  const __half2* pairs = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 f = __half22float2(pairs[j]);
    x[2 * j] = f.x;
    x[2 * j + 1] = f.y;
  }
}

// (cos, sin) of 4 pairs advanced by the angles of `step` (complex multiplication).
__device__ __forceinline__ void step_angles(float2 (&cs)[4], const float2 (&step)[4]) {
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    cs[p] = make_float2(cs[p].x * step[p].x - cs[p].y * step[p].y, cs[p].x * step[p].y + cs[p].y * step[p].x);
  }
}

// One RoPE pair of fp32 key elements rotated by its (cos, sin), the roundings spelled out (one product rounded,
// the other fused), so that every kernel rotating a pair gets the same bits: quantize-on-write's rotated keys
// and decoded rows, the page producer's tiles, and a lane's fragment and an outlier's patch.
__device__ __forceinline__ float2 rotated_pair(float x0, float x1, float2 cs) {
  return {__fmaf_rn(x0, cs.x, -__fmul_rn(x1, cs.y)), __fmaf_rn(x0, cs.y, __fmul_rn(x1, cs.x))};
}
// The pair rotated as the CPU's RopeTable::rotate rounds it (every product and sum rounded: never fused), then
// rounded to fp16: the queries' and post-RoPE keys' rotation, equal to the CPU's for equal fp16 inputs.
__device__ __forceinline__ __half2 cpu_rotated_half2(__half2 pair, float2 cs) {
  const float2 x = __half22float2(pair);
  return __floats2half2_rn(__fsub_rn(__fmul_rn(x.x, cs.x), __fmul_rn(x.y, cs.y)),
                           __fadd_rn(__fmul_rn(x.x, cs.y), __fmul_rn(x.y, cs.x)));
}
__device__ __forceinline__ void rotate_pair(float& x0, float& x1, float2 cs) {
  const float2 r = rotated_pair(x0, x1, cs);
  x0 = r.x;
  x1 = r.y;
}
// Rotates 8 fp32 key elements (4 adjacent pairs) by their (cos, sin).
__device__ __forceinline__ void rotate8(const float2 (&cs)[4], float (&k)[8]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) rotate_pair(k[2 * j], k[2 * j + 1], cs[j]);
}

// The running max is raised only when a score exceeds it by more than this (log2 units), so the rescale of
// l and acc is rare after the first keys; p = exp2(score - m) then stays below 2^kRescaleSlack, far inside fp32.
constexpr float kRescaleSlack = 8.0f;

// The running max (-inf), sum and weighted values (zeros) before the first key.
template <int kMaxGroup>
__device__ __forceinline__ void init_running_softmax(float (&m)[kMaxGroup], float (&l)[kMaxGroup],
                                                     float (&acc)[kMaxGroup][8]) {
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[h][i] = 0.0f;
  }
}

// One key of a lane group (kLanes lanes, 8 dims each) into the running max m (log2 units), sum l and
// weighted values acc of the `group` query heads (q pre-scaled by scale * log2 e; heads h >= group only pad
// kMaxGroup and are skipped, a branch uniform over the block). Every lane of the warp must call it (the score
// is summed by shuffles); an invalid key (valid false, k and v finite) changes nothing. m starts at -inf.
template <int kLanes, int kMaxGroup>
__device__ __forceinline__ void accumulate_key(const float (&q)[kMaxGroup][8], const float (&k)[8], const float (&v)[8],
                                               bool valid, int group, float (&m)[kMaxGroup], float (&l)[kMaxGroup],
                                               float (&acc)[kMaxGroup][8]) {
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
    if (h >= group) continue;
    float even = 0.0f, odd = 0.0f;  // two chains of 4 dependent FMAs instead of one of 8
#pragma unroll
    for (int i = 0; i < 8; i += 2) {
      even = fmaf(q[h][i], k[i], even);
      odd = fmaf(q[h][i + 1], k[i + 1], odd);
    }
    float score = even + odd;
#pragma unroll
    for (int offset = kLanes / 2; offset > 0; offset /= 2) score += __shfl_xor_sync(0xffffffffu, score, offset);
    if (valid && score > m[h] + kRescaleSlack) {  // rare after the first keys (m = -inf before them)
      const float correction = fast_exp2(m[h] - score);
      m[h] = score;
      l[h] *= correction;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[h][i] *= correction;
    }
    const float p = valid ? fast_exp2(score - m[h]) : 0.0f;  // m is finite once a key is valid
    l[h] += p;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[h][i] = fmaf(p, v[i], acc[h][i]);
  }
}

// Shared memory the merge of kParts partial results of kHeads heads needs (floats): their maxima
// (kParts, kHeads), sums (kParts, kHeads) and weighted values (kParts, kHeads, D), in that order.
template <int D, int kHeads, int kParts>
constexpr int kSplitMergeFloats = 2 * kParts * kHeads + kParts * kHeads * D;

// Merges kParts partial (max, sum, values) of a block, stored in `merge` in kSplitMergeFloats' layout and
// published by a barrier, into split `split_index`'s partial result for the `group` query heads of kv_head
// (a part without keys has max -inf and is skipped).
template <int D, int kHeads, int kParts, int kThreads>
__device__ __forceinline__ void merge_split_parts(const float* merge, int group, int kv_head, int split_index,
                                                  int n_heads, const DecodeWorkspace& ws) {
  const float(*s_max)[kHeads] = reinterpret_cast<const float(*)[kHeads]>(merge);
  const float(*s_sum)[kHeads] = reinterpret_cast<const float(*)[kHeads]>(merge + kParts * kHeads);
  const float(*s_acc)[kHeads][D] = reinterpret_cast<const float(*)[kHeads][D]>(merge + 2 * kParts * kHeads);
  for (int i = threadIdx.x; i < group * D; i += kThreads) {
    const int h = i / D, d = i % D;
    float block_max = -INFINITY;
    for (int part = 0; part < kParts; ++part) block_max = fmaxf(block_max, s_max[part][h]);
    float sum = 0.0f, value = 0.0f;
    for (int part = 0; part < kParts; ++part) {
      if (s_max[part][h] == -INFINITY) continue;  // this part had no keys
      const float w = exp2f(s_max[part][h] - block_max);
      sum += w * s_sum[part][h];
      value += w * s_acc[part][h][d];
    }
    const int head = kv_head * group + h;
    ws.partial_out[(static_cast<int64_t>(split_index) * n_heads + head) * D + d] = value;
    if (d == 0) ws.partial_ml[static_cast<int64_t>(split_index) * n_heads + head] = make_float2(block_max, sum);
  }
}

// Merges the running (max m, sum l, acc) of the block's key groups (lane `sub` of key group `key_group` holds
// dims sub * 8 .. sub * 8 + 7) and writes split `split_index`'s partial result for the `group` query heads of
// kv_head. merge: kSplitMergeFloats floats of shared memory; the caller synchronizes before reusing it.
template <int D, int kMaxGroup, int kKeyGroups, int kThreads>
__device__ __forceinline__ void write_split_partial(const float (&m)[kMaxGroup], const float (&l)[kMaxGroup],
                                                    const float (&acc)[kMaxGroup][8], float* merge, int key_group,
                                                    int sub, int group, int kv_head, int split_index, int n_heads,
                                                    const DecodeWorkspace& ws) {
  float(*s_max)[kMaxGroup] = reinterpret_cast<float(*)[kMaxGroup]>(merge);
  float(*s_sum)[kMaxGroup] = reinterpret_cast<float(*)[kMaxGroup]>(merge + kKeyGroups * kMaxGroup);
  float(*s_acc)[kMaxGroup][D] = reinterpret_cast<float(*)[kMaxGroup][D]>(merge + 2 * kKeyGroups * kMaxGroup);
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
  merge_split_parts<D, kMaxGroup, kKeyGroups, kThreads>(merge, group, kv_head, split_index, n_heads, ws);
}

}  // namespace kvq::cuda
