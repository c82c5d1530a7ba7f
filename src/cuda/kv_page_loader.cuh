// The K/V load stage of the attention kernels: fills shared-memory tiles of
// post-RoPE fp16 keys and fp16 values for a key range of one sequence and KV
// head, reading the pool through the sequence's page indices.
//
// A loader has two phases so the next tile loads while the current one is used:
//   issue():  starts copying what the pages store (cp.async) into the tiles;
//   finish(): after cp_async_wait + __syncthreads, turns stored data into the
//             attention's operands in place (here: RoPE on the keys).
// A quantized-page loader keeps this interface: issue() copies codes, scales and
// outlier slots to its staging area, finish() dequantizes and rotates into the
// same tiles, and the kernels do not change.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/attention.h"

namespace kvq::cuda {

__device__ __forceinline__ void cp_async_16(void* smem, const void* global, bool valid) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: fill the 16 bytes with zeros, read nothing
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Tiles are (rows, D) fp16 with 16-byte chunk c of row r stored at chunk c ^ (r % 8):
// ldmatrix of 8 rows at one logical chunk then touches 8 different bank groups.
template <int D>
__device__ __forceinline__ int tile_offset(int row, int col) {
  static_assert(D % 64 == 0, "the swizzle needs at least 8 chunks per row");
  return row * D + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

// Rotates the 4 adjacent pairs of 8 halves by the angles of pairs 4c .. 4c+3 at one position.
__device__ __forceinline__ uint4 rope_chunk(uint4 raw, const float2* angles) {
  const float4 a01 = *reinterpret_cast<const float4*>(angles);
  const float4 a23 = *reinterpret_cast<const float4*>(angles + 2);
  const float cs[8] = {a01.x, a01.y, a01.z, a01.w, a23.x, a23.y, a23.z, a23.w};
  __half2* pairs = reinterpret_cast<__half2*>(&raw);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 x = __half22float2(pairs[j]);
    const float c = cs[2 * j], s = cs[2 * j + 1];
    pairs[j] = __floats2half2_rn(x.x * c - x.y * s, x.x * s + x.y * c);
  }
  return raw;
}

// Pool offset (in halves) of key `pos` of a sequence for one KV head.
template <int D>
__device__ __forceinline__ int64_t page_row_offset(const PagedKv& kv, const int32_t* pages, int kv_head, int pos) {
  const int page = pages[pos / kv.page_size], slot = pos % kv.page_size;
  return ((static_cast<int64_t>(page) * kv.n_kv_heads + kv_head) * kv.page_size + slot) * D;
}

// fp16 pages: stored keys are pre-RoPE fp16, values fp16. The staging area
// holds the tile's RoPE rows (kRows, D / 2) (cos, sin), copied with the keys so
// that finish() reads only shared memory.
template <int D, int kRows, int kThreads>
struct Fp16PageLoader {
  static constexpr int kChunksPerRow = D / 8;
  static constexpr int kChunks = kRows * kChunksPerRow;
  static constexpr int kAngleChunksPerRow = D / 4;  // (D / 2) float2 = D * 4 bytes per row
  static constexpr int kAngleChunks = kRows * kAngleChunksPerRow;
  static constexpr int kStagingBytes = kRows * D * 4;
  static_assert(kChunks % kThreads == 0 && kAngleChunks % kThreads == 0, "every thread copies the same number of chunks");

  // Keys [k0, k0 + kRows) into sK, sV and their angles into staging; rows at or past n_keys are zero-filled.
  // staging may be reused as soon as the previous tile's finish() has completed (one buffer suffices).
  __device__ static void issue(const PagedKv& kv, const int32_t* pages, int kv_head, int k0, int n_keys, __half* sK,
                               __half* sV, void* staging) {
#pragma unroll
    for (int j = 0; j < kChunks / kThreads; ++j) {
      const int i = threadIdx.x + j * kThreads;
      const int r = i / kChunksPerRow, c = i % kChunksPerRow;
      const int pos = k0 + r;
      const bool valid = pos < n_keys;
      const int64_t offset = valid ? page_row_offset<D>(kv, pages, kv_head, pos) + c * 8 : 0;
      cp_async_16(sK + tile_offset<D>(r, c * 8), kv.keys + offset, valid);
      cp_async_16(sV + tile_offset<D>(r, c * 8), kv.values + offset, valid);
    }
    float2* angles = static_cast<float2*>(staging);
#pragma unroll
    for (int j = 0; j < kAngleChunks / kThreads; ++j) {
      const int i = threadIdx.x + j * kThreads;
      const int r = i / kAngleChunksPerRow, c = i % kAngleChunksPerRow;
      const int pos = k0 + r;
      const bool valid = pos < n_keys;
      cp_async_16(angles + r * (D / 2) + c * 2, kv.rope + (valid ? static_cast<int64_t>(pos) * (D / 2) + c * 2 : 0), valid);
    }
  }

  // RoPE on the landed keys at their positions.
  __device__ static void finish(int k0, int n_keys, __half* sK, const void* staging) {
    const float2* angles = static_cast<const float2*>(staging);
#pragma unroll
    for (int j = 0; j < kChunks / kThreads; ++j) {
      const int i = threadIdx.x + j * kThreads;
      const int r = i / kChunksPerRow, c = i % kChunksPerRow;
      if (k0 + r >= n_keys) continue;
      uint4* chunk = reinterpret_cast<uint4*>(sK + tile_offset<D>(r, c * 8));
      *chunk = rope_chunk(*chunk, angles + r * (D / 2) + c * 4);
    }
  }
};

}  // namespace kvq::cuda
