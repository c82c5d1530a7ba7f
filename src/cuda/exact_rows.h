// The fp16 rows a quantized KV cache keeps outside its pages, on the GPU: per
// sequence the first `sinks` rows and a ring of the newest `window` rows of
// every layer, K and V (CpuBackend::ExactRows' twin, same content), and the two
// row kernels of a quantized step around them: RoPE in place on a step's
// queries (and keys, for formats that store keys after RoPE) and the save of
// the rows a later step reads exactly, run after the layer's attention.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kvq::cuda {

// One layer's view of the store: (n_slots, 2 (K, V), n_kv_heads, sinks + window, head_dim) fp16;
// position p of a sequence is row p when p < sinks, else row sinks + p % window.
struct ExactRowStore {
  __half* rows;
  int32_t sinks;
  int32_t window;
};

__host__ __device__ inline int64_t exact_row_offset(const ExactRowStore& store, int n_kv_heads, int head_dim, int slot,
                                                    int kind, int kv_head, int64_t pos) {
  const int per_head = store.sinks + store.window;
  const int64_t row = pos < store.sinks ? pos : store.sinks + pos % store.window;
  return ((int64_t{slot} * 2 + kind) * n_kv_heads + kv_head) * per_head * head_dim + row * head_dim;
}

// A row of the step to keep: this step's row `row` is position `pos` of the sequence in store slot `slot`.
struct ExactRowSave {
  int32_t row;  // -1: padding of a graph's fixed grid, saves nothing
  int32_t slot;
  int32_t pos;
};

// store[slot, kind, h, pos] = K, V of qkv[row] for every save. qkv (n_tokens, q_dim + 2 kv_dim) fp16; saves (n_saves).
void launch_save_exact_rows(const __half* qkv, int32_t q_dim, int32_t n_kv_heads, int32_t head_dim,
                            const ExactRowSave* saves, int32_t n_saves, const ExactRowStore& store, cudaStream_t stream);

// Rotates the query heads of every token of qkv (n_tokens, q_dim + 2 kv_dim) in place at positions (n_tokens),
// and the key heads too when rotate_keys (formats that store keys after RoPE); rope (context, head_dim / 2).
void launch_rope_in_place(__half* qkv, int32_t n_tokens, const int32_t* positions, int32_t n_heads, int32_t n_kv_heads,
                          int32_t head_dim, bool rotate_keys, const float2* rope, cudaStream_t stream);

}  // namespace kvq::cuda
