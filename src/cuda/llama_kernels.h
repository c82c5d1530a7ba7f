// Row-wise Llama kernels of the CUDA forward (the CPU twins are in
// cpu/llama_ops.h and cpu_backend.cpp): embedding, RMSNorm, SwiGLU, the KV
// write into pages fused with the query RoPE, greedy token choice (twin:
// greedy_token in engine/sampler.h), and random fills for --dummy.
// Launchers take device pointers and enqueue on `stream`.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kvq::cuda {

// x (n_tokens, hidden) fp32 = rows of embedding (vocab, hidden) fp16 picked by tokens (n_tokens).
void launch_embed(const int32_t* tokens, int32_t n_tokens, const __half* embedding, int32_t hidden, float* x,
                  cudaStream_t stream);

// y (n_rows, hidden) fp16 = x[rows[r]] / rms * weight; rows == nullptr means rows[r] = r.
// x (*, hidden) fp32, weight (hidden) fp32.
void launch_rms_norm(const float* x, const int32_t* rows, int32_t n_rows, int32_t hidden, const float* weight, float eps,
                     __half* y, cudaStream_t stream);

// out (n_tokens, ffn) = silu(gate) * up with gate_up (n_tokens, 2 * ffn): gate columns, then up columns.
void launch_swiglu(const __half* gate_up, int32_t n_tokens, int32_t ffn, __half* out, cudaStream_t stream);

// Layout of one token's fused projection row and where it goes.
struct KvWriteShape {
  int32_t n_heads;
  int32_t n_kv_heads;
  int32_t head_dim;
  int32_t page_size;
};

// For every token t: copies K (pre-RoPE) and V of each KV head from qkv[t] into
// page slots[t].x, row slots[t].y of the layer's pools, and rotates the token's
// query heads in place by positions[t] (adjacent pairs, table `rope`).
// qkv (n_tokens, q_dim + 2 kv_dim) fp16; positions (n_tokens); slots (n_tokens) (page, slot);
// keys, values (n_pages, n_kv_heads, page_size, head_dim); rope (context, head_dim / 2) (cos, sin).
void launch_write_kv_rotate_q(__half* qkv, int32_t n_tokens, const int32_t* positions, const int2* slots,
                              const KvWriteShape& shape, const float2* rope, __half* keys, __half* values,
                              cudaStream_t stream);

// ids (n_rows) = index of the largest value of each row of logits (n_rows, vocab) fp32, the lowest index
// on ties (std::max_element's choice; rows hold no NaN).
void launch_argmax_rows(const float* logits, int32_t n_rows, int32_t vocab, int32_t* ids, cudaStream_t stream);

// Deterministic uniform values in [-scale, scale) from (seed, index): p (n).
void launch_fill_uniform(__half* p, int64_t n, uint64_t seed, float scale, cudaStream_t stream);
// Deterministic N(0, stddev^2) values from (seed, index) (Box-Muller): p (n).
void launch_fill_normal(__half* p, int64_t n, uint64_t seed, float stddev, cudaStream_t stream);
// p (n) = value.
void launch_fill(float* p, int64_t n, float value, cudaStream_t stream);

}  // namespace kvq::cuda
