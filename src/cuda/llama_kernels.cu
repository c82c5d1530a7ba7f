// Row-wise kernels of the forward: memory-bound, one pass each, 16-byte
// accesses where rows allow (hidden, ffn and head_dim are multiples of 8 in
// every supported model; the launchers check).
#include "cuda/llama_kernels.h"

#include <cmath>
#include <cstdint>

#include "core/error.h"
#include "cuda/cuda_check.h"

namespace kvq::cuda {
namespace {

constexpr int kRowThreads = 256;

__device__ float block_sum(float value, float* scratch) {  // scratch: 32 floats
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = value;
  __syncthreads();
  value = lane < blockDim.x / 32 ? scratch[lane] : 0.0f;
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// (value, index) a beats b: larger value, or the same value at a lower index.
__device__ __forceinline__ bool argmax_beats(float a_value, int32_t a_index, float b_value, int32_t b_index) {
  return a_value > b_value || (a_value == b_value && a_index < b_index);
}

__global__ void argmax_rows_kernel(const float* logits, int32_t vocab, int32_t* ids) {
  __shared__ float s_value[kRowThreads / 32];
  __shared__ int32_t s_index[kRowThreads / 32];
  const float* row = logits + static_cast<int64_t>(blockIdx.x) * vocab;
  // Each thread scans its columns in increasing order, so a strict > keeps the lowest index of its maximum.
  float best = -INFINITY;
  int32_t best_index = INT32_MAX;
  for (int32_t k = threadIdx.x; k < vocab; k += kRowThreads) {
    const float v = row[k];
    if (v > best || best_index == INT32_MAX) {
      best = v;
      best_index = k;
    }
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(0xffffffffu, best, offset);
    const int32_t other_index = __shfl_xor_sync(0xffffffffu, best_index, offset);
    if (argmax_beats(other, other_index, best, best_index)) {
      best = other;
      best_index = other_index;
    }
  }
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
    s_value[warp] = best;
    s_index[warp] = best_index;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kRowThreads / 32; ++w) {
      if (argmax_beats(s_value[w], s_index[w], best, best_index)) {
        best = s_value[w];
        best_index = s_index[w];
      }
    }
    ids[blockIdx.x] = best_index;
  }
}

__global__ void embed_kernel(const int32_t* tokens, const __half* embedding, int32_t hidden, float* x) {
  const int32_t t = blockIdx.x;
  const __half* row = embedding + static_cast<int64_t>(tokens[t]) * hidden;
  float* out = x + static_cast<int64_t>(t) * hidden;
  for (int k = threadIdx.x * 2; k < hidden; k += blockDim.x * 2) {
    float2 v = __half22float2(*reinterpret_cast<const __half2*>(row + k));
    *reinterpret_cast<float2*>(out + k) = v;
  }
}

__global__ void rms_norm_kernel(const float* x, const int32_t* rows, int32_t hidden, const float* weight, float eps,
                                __half* y) {
  __shared__ float scratch[32];
  const int32_t r = blockIdx.x;
  const float* in = x + static_cast<int64_t>(rows ? rows[r] : r) * hidden;
  float sum_sq = 0.0f;
  for (int k = threadIdx.x * 4; k < hidden; k += blockDim.x * 4) {
    float4 v = *reinterpret_cast<const float4*>(in + k);
    sum_sq += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
  }
  sum_sq = block_sum(sum_sq, scratch);
  const float scale = rsqrtf(sum_sq / hidden + eps);
  __half* out = y + static_cast<int64_t>(r) * hidden;
  for (int k = threadIdx.x * 4; k < hidden; k += blockDim.x * 4) {
    float4 v = *reinterpret_cast<const float4*>(in + k);
    float4 w = *reinterpret_cast<const float4*>(weight + k);
    __half2 lo = __floats2half2_rn(v.x * scale * w.x, v.y * scale * w.y);
    __half2 hi = __floats2half2_rn(v.z * scale * w.z, v.w * scale * w.w);
    *reinterpret_cast<__half2*>(out + k) = lo;
    *reinterpret_cast<__half2*>(out + k + 2) = hi;
  }
}

__global__ void swiglu_kernel(const __half* gate_up, int32_t n_tokens, int32_t ffn, __half* out) {
  const int64_t pairs = static_cast<int64_t>(n_tokens) * ffn / 2;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < pairs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i * 2 / ffn, k = i * 2 % ffn;
    const __half* row = gate_up + t * 2 * ffn;
    float2 g = __half22float2(*reinterpret_cast<const __half2*>(row + k));
    float2 u = __half22float2(*reinterpret_cast<const __half2*>(row + ffn + k));
    float a = g.x / (1.0f + __expf(-g.x)) * u.x;
    float b = g.y / (1.0f + __expf(-g.y)) * u.y;
    *reinterpret_cast<__half2*>(out + t * ffn + k) = __floats2half2_rn(a, b);
  }
}

// One block per token: 8 halves per thread-step over K and V heads, then the query pairs.
__global__ void write_kv_rotate_q_kernel(__half* qkv, const int32_t* positions, const int2* slots, KvWriteShape s,
                                         const float2* rope, __half* keys, __half* values) {
  const int32_t t = blockIdx.x;
  const int32_t q_dim = s.n_heads * s.head_dim, kv_dim = s.n_kv_heads * s.head_dim;
  __half* row = qkv + static_cast<int64_t>(t) * (q_dim + 2 * kv_dim);
  const int2 slot = slots[t];
  for (int k = threadIdx.x * 8; k < kv_dim; k += blockDim.x * 8) {
    const int h = k / s.head_dim, d = k % s.head_dim;
    const int64_t dst = ((static_cast<int64_t>(slot.x) * s.n_kv_heads + h) * s.page_size + slot.y) * s.head_dim + d;
    *reinterpret_cast<uint4*>(keys + dst) = *reinterpret_cast<const uint4*>(row + q_dim + k);
    *reinterpret_cast<uint4*>(values + dst) = *reinterpret_cast<const uint4*>(row + q_dim + kv_dim + k);
  }
  const float2* angles = rope + static_cast<int64_t>(positions[t]) * (s.head_dim / 2);
  for (int k = threadIdx.x * 2; k < q_dim; k += blockDim.x * 2) {
    const float2 cs = angles[(k % s.head_dim) / 2];
    float2 x = __half22float2(*reinterpret_cast<const __half2*>(row + k));
    *reinterpret_cast<__half2*>(row + k) = __floats2half2_rn(x.x * cs.x - x.y * cs.y, x.x * cs.y + x.y * cs.x);
  }
}

__device__ uint64_t splitmix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

__global__ void fill_uniform_kernel(__half* p, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t bits = splitmix64(seed ^ splitmix64(static_cast<uint64_t>(i)));
    const float unit = static_cast<float>(bits >> 40) * (1.0f / 16777216.0f);  // [0, 1)
    p[i] = __float2half_rn((2.0f * unit - 1.0f) * scale);
  }
}

__global__ void fill_normal_kernel(__half* p, int64_t n, uint64_t seed, float stddev) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint64_t bits = splitmix64(seed ^ splitmix64(static_cast<uint64_t>(i)));
    const float u1 = (static_cast<float>(bits >> 40) + 1.0f) * (1.0f / 16777216.0f);  // (0, 1]: log stays finite
    const float u2 = static_cast<float>(bits & 0xffffffu) * (1.0f / 16777216.0f);     // [0, 1)
    p[i] = __float2half_rn(stddev * sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2));
  }
}

__global__ void fill_kernel(float* p, int64_t n, float value) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    p[i] = value;
  }
}

int grid_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

}  // namespace

void launch_embed(const int32_t* tokens, int32_t n_tokens, const __half* embedding, int32_t hidden, float* x,
                  cudaStream_t stream) {
  if (hidden % 2 != 0) fail("embedding: hidden {} must be even", hidden);
  if (n_tokens == 0) return;
  embed_kernel<<<n_tokens, kRowThreads, 0, stream>>>(tokens, embedding, hidden, x);
  CUDA_CHECK_LAUNCH(stream, "embed_kernel");
}

void launch_rms_norm(const float* x, const int32_t* rows, int32_t n_rows, int32_t hidden, const float* weight, float eps,
                     __half* y, cudaStream_t stream) {
  if (hidden % 4 != 0) fail("rms_norm: hidden {} must be a multiple of 4", hidden);
  if (n_rows == 0) return;
  rms_norm_kernel<<<n_rows, kRowThreads, 0, stream>>>(x, rows, hidden, weight, eps, y);
  CUDA_CHECK_LAUNCH(stream, "rms_norm_kernel");
}

void launch_swiglu(const __half* gate_up, int32_t n_tokens, int32_t ffn, __half* out, cudaStream_t stream) {
  if (ffn % 2 != 0) fail("swiglu: ffn {} must be even", ffn);
  if (n_tokens == 0) return;
  swiglu_kernel<<<grid_for(int64_t{n_tokens} * ffn / 2, kRowThreads), kRowThreads, 0, stream>>>(gate_up, n_tokens, ffn,
                                                                                                 out);
  CUDA_CHECK_LAUNCH(stream, "swiglu_kernel");
}

void launch_write_kv_rotate_q(__half* qkv, int32_t n_tokens, const int32_t* positions, const int2* slots,
                              const KvWriteShape& shape, const float2* rope, __half* keys, __half* values,
                              cudaStream_t stream) {
  if (shape.head_dim % 8 != 0) fail("kv write: head_dim {} must be a multiple of 8", shape.head_dim);
  if (n_tokens == 0) return;
  write_kv_rotate_q_kernel<<<n_tokens, 128, 0, stream>>>(qkv, positions, slots, shape, rope, keys, values);
  CUDA_CHECK_LAUNCH(stream, "write_kv_rotate_q_kernel");
}

void launch_argmax_rows(const float* logits, int32_t n_rows, int32_t vocab, int32_t* ids, cudaStream_t stream) {
  if (vocab < 1) fail("argmax: vocab {} must be positive", vocab);
  if (n_rows == 0) return;
  argmax_rows_kernel<<<n_rows, kRowThreads, 0, stream>>>(logits, vocab, ids);
  CUDA_CHECK_LAUNCH(stream, "argmax_rows_kernel");
}

void launch_fill_uniform(__half* p, int64_t n, uint64_t seed, float scale, cudaStream_t stream) {
  if (n == 0) return;
  fill_uniform_kernel<<<grid_for(n, 256), 256, 0, stream>>>(p, n, seed, scale);
  CUDA_CHECK_LAUNCH(stream, "fill_uniform_kernel");
}

void launch_fill_normal(__half* p, int64_t n, uint64_t seed, float stddev, cudaStream_t stream) {
  if (n == 0) return;
  fill_normal_kernel<<<grid_for(n, 256), 256, 0, stream>>>(p, n, seed, stddev);
  CUDA_CHECK_LAUNCH(stream, "fill_normal_kernel");
}

void launch_fill(float* p, int64_t n, float value, cudaStream_t stream) {
  if (n == 0) return;
  fill_kernel<<<grid_for(n, 256), 256, 0, stream>>>(p, n, value);
  CUDA_CHECK_LAUNCH(stream, "fill_kernel");
}

}  // namespace kvq::cuda
