// Row kernels around the exact-row store (exact_rows.h).
#include "cuda/exact_rows.h"

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/decode_partials.cuh"

namespace kvq::cuda {
namespace {

constexpr int kRowThreads = 128;

__global__ void save_exact_rows_kernel(const __half* qkv, int32_t q_dim, int32_t n_kv_heads, int32_t head_dim,
                                       const ExactRowSave* saves, ExactRowStore store) {
  const ExactRowSave save = saves[blockIdx.x];
  if (save.row < 0) return;  // padding
  const int kv_dim = n_kv_heads * head_dim;
  const __half* row = qkv + static_cast<int64_t>(save.row) * (q_dim + 2 * kv_dim) + q_dim;  // K, then V
  for (int i = threadIdx.x * 8; i < 2 * kv_dim; i += blockDim.x * 8) {
    const int kind = i / kv_dim, h = i % kv_dim / head_dim, d = i % head_dim;
    __half* dst = store.rows + exact_row_offset(store, n_kv_heads, head_dim, save.slot, kind, h, save.pos) + d;
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(row + i);
  }
}

// RopeTable::rotate's operations, each rounded as the CPU rounds them (cpu_rotated_half2), then rounded to fp16:
// keys rotated here before quantization equal the CPU's kv_rows_ whenever the pre-RoPE halves are equal. A thread
// takes 8 elements (4 pairs) at a time: a pair at a time, llama2-7b's 2048-token queries took 15 us a layer, a
// third of the copy rate (Nsight Compute, H100, 2026-11-28).
__global__ void rope_in_place_kernel(__half* qkv, const int32_t* positions, int32_t n_heads, int32_t n_kv_heads,
                                     int32_t head_dim, int32_t rotate_keys, const float2* rope) {
  const int32_t t = blockIdx.x;
  const int32_t q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim;
  uint4* row = reinterpret_cast<uint4*>(qkv + static_cast<int64_t>(t) * (q_dim + 2 * kv_dim));
  const float4* angles = reinterpret_cast<const float4*>(rope + static_cast<int64_t>(positions[t]) * (head_dim / 2));
  const int chunks = (q_dim + (rotate_keys ? kv_dim : 0)) / 8;
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
    const int pair0 = c % (head_dim / 8) * 4;  // the chunk's first pair in its head
    const float4 a = __ldg(angles + pair0 / 2), b = __ldg(angles + pair0 / 2 + 1);
    const float2 cs[4] = {{a.x, a.y}, {a.z, a.w}, {b.x, b.y}, {b.z, b.w}};
    uint4 chunk = row[c];
    __half2* pairs = reinterpret_cast<__half2*>(&chunk);
#pragma unroll
    for (int p = 0; p < 4; ++p) pairs[p] = cpu_rotated_half2(pairs[p], cs[p]);
    row[c] = chunk;
  }
}

}  // namespace

void launch_save_exact_rows(const __half* qkv, int32_t q_dim, int32_t n_kv_heads, int32_t head_dim,
                            const ExactRowSave* saves, int32_t n_saves, const ExactRowStore& store, cudaStream_t stream) {
  if (n_saves == 0) return;
  if (head_dim % 8 != 0) fail("exact rows: head_dim {} must be a multiple of 8", head_dim);
  save_exact_rows_kernel<<<n_saves, kRowThreads, 0, stream>>>(qkv, q_dim, n_kv_heads, head_dim, saves, store);
  CUDA_CHECK_LAUNCH(stream, "save_exact_rows_kernel");
}

void launch_rope_in_place(__half* qkv, int32_t n_tokens, const int32_t* positions, int32_t n_heads, int32_t n_kv_heads,
                          int32_t head_dim, bool rotate_keys, const float2* rope, cudaStream_t stream) {
  if (n_tokens == 0) return;
  if (head_dim % 8 != 0) fail("rope: head_dim {} must be a multiple of 8", head_dim);
  rope_in_place_kernel<<<n_tokens, kRowThreads, 0, stream>>>(qkv, positions, n_heads, n_kv_heads, head_dim,
                                                             rotate_keys ? 1 : 0, rope);
  CUDA_CHECK_LAUNCH(stream, "rope_in_place_kernel");
}

}  // namespace kvq::cuda
