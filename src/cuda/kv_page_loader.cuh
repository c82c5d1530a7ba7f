// The K/V load stage of the attention kernels: fills shared-memory tiles of
// post-RoPE fp16 keys and fp16 values for a key range of one sequence and KV
// head, reading the pool through the sequence's page indices.
//
// A loader has two phases so the next tile loads while the current one is used:
//   issue():  starts copying what the pages store (cp.async) into the tiles;
//   finish(): once the copies have landed, turns stored data into the
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

// Tiles are (kRows, D) fp16 in the layout wgmma reads with its 128-byte swizzle:
// column blocks of 64 halves, each (kRows, 64) contiguous, 16-byte chunk c of
// row r stored at chunk c ^ (r % 8) (ldmatrix and wgmma then touch 8 different
// bank groups per 8 rows). Tiles start 1024-byte aligned.
template <int D, int kRows>
__device__ __forceinline__ int tile_offset(int row, int col) {
  static_assert(D % 64 == 0, "the swizzle needs 64-half column blocks");
  return (col >> 6) * (kRows * 64) + row * 64 + ((((col >> 3) & 7) ^ (row & 7)) << 3) + (col & 7);
}

// Rotates the 4 adjacent pairs of 8 halves by the (cos, sin) of pairs 4c .. 4c+3 at one position.
__device__ __forceinline__ uint4 rotate_chunk(uint4 raw, const float2 (&cs)[4]) {
  __half2* pairs = reinterpret_cast<__half2*>(&raw);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const float2 x = __half22float2(pairs[j]);
    pairs[j] = __floats2half2_rn(x.x * cs[j].x - x.y * cs[j].y, x.x * cs[j].y + x.y * cs[j].x);
  }
  return raw;
}

// The fp16 load stage for a warp-specialized kernel: the kThreads threads of a
// producer warpgroup fill a tile, each one rotating only the key chunks it
// copied itself, so that after its own cp_async_wait a thread can finish()
// without waiting for the others (no barrier among producers). Thread i copies
// column chunk i % (D / 8) of rows i / (D / 8) + j * kRowStep; the (cos, sin)
// of its first row travel in registers from issue() to finish() and are
// stepped forward by kRowStep positions by complex multiplication (fp32,
// at most kRows / kRowStep - 1 = 15 steps: ~1e-6 relative, far below the
// keys' fp16 rounding).
//
// A quantized-page producer keeps this shape: issue() copies codes, scales and
// outliers (its Pending says where), finish() dequantizes and rotates them
// into the same tiles.
template <int D, int kRows, int kThreads>
struct Fp16PageProducer {
  static constexpr int kChunksPerRow = D / 8;
  static constexpr int kRowStep = kThreads / kChunksPerRow;
  static constexpr int kRowsPerThread = kRows / kRowStep;
  static_assert(kThreads % kChunksPerRow == 0 && kRows % kRowStep == 0, "every thread owns the same rows");

  // What finish() needs of its issue(): the angles of the thread's 4 pairs at its first row.
  struct Pending {
    float4 cs01, cs23;
  };

  int column;         // the thread's column chunk
  int first_row;      // its first row in the tile
  int page_elems;     // halves of one pool page (all KV heads)
  int head_elems;     // offset of the thread's chunk in a page at slot 0: kv_head's rows, column
  int page_size_elems;  // halves of a page's rows of one head
  int step_pages;     // kRowStep rows = step_pages pages + step_slot_elems / D slots
  int step_slot_elems;
  float2 step[4];     // rotation by kRowStep positions of its 4 pairs

  __device__ Fp16PageProducer(const PagedKv& kv, int kv_head, int n_keys, int thread)
      : column(thread % kChunksPerRow),
        first_row(thread / kChunksPerRow),
        page_elems(kv.n_kv_heads * kv.page_size * D),
        head_elems(kv_head * kv.page_size * D + column * 8),
        page_size_elems(kv.page_size * D),
        step_pages(kRowStep / kv.page_size),
        step_slot_elems(kRowStep % kv.page_size * D) {
    // Row kRowStep of the table exists whenever a second row is ever rotated.
    const Pending angles = load_angles(kv, kRowStep < n_keys ? kRowStep : -1);
    step[0] = {angles.cs01.x, angles.cs01.y};
    step[1] = {angles.cs01.z, angles.cs01.w};
    step[2] = {angles.cs23.x, angles.cs23.y};
    step[3] = {angles.cs23.z, angles.cs23.w};
  }

  // Starts copying keys [k0, k0 + kRows) into sK and values into sV (rows at or past n_keys zero-filled);
  // pages: the sequence's page indices.
  __device__ Pending issue(const PagedKv& kv, const int32_t* pages, int k0, int n_keys, __half* sK, __half* sV) const {
    // A batch of the thread's rows at a time: their pool pages first, all loads in flight at once (no
    // division per row: (page, slot) of the next row is stepped), then their copies. Batches of 8 rows
    // bound the registers.
    constexpr int kBatch = kRowsPerThread < 8 ? kRowsPerThread : 8;
    const int pos0 = k0 + first_row;
    int page = pos0 / kv.page_size;
    int slot_offset = (pos0 - page * kv.page_size) * D;  // of the row in its page's head
#pragma unroll
    for (int j0 = 0; j0 < kRowsPerThread; j0 += kBatch) {
      int pool_page[kBatch], row_offset[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        pool_page[j] = pos0 + (j0 + j) * kRowStep < n_keys ? pages[page] : -1;
        row_offset[j] = head_elems + slot_offset;
        page += step_pages;
        slot_offset += step_slot_elems;
        if (slot_offset >= page_size_elems) {
          slot_offset -= page_size_elems;
          ++page;
        }
      }
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int r = first_row + (j0 + j) * kRowStep;
        const bool valid = pool_page[j] >= 0;
        const int64_t offset = valid ? static_cast<int64_t>(pool_page[j]) * page_elems + row_offset[j] : 0;
        cp_async_16(sK + tile_offset<D, kRows>(r, column * 8), kv.keys + offset, valid);
        cp_async_16(sV + tile_offset<D, kRows>(r, column * 8), kv.values + offset, valid);
      }
    }
    return load_angles(kv, pos0 < n_keys ? pos0 : -1);
  }

  // RoPE on this thread's landed key chunks (after its cp_async_wait for the tile). Rows past the keys
  // were zero-filled and stay zero, so every row is rotated: no branch between the shared-memory loads.
  __device__ void finish(const Pending& pending, __half* sK) const {
    float2 cs[4] = {{pending.cs01.x, pending.cs01.y},
                    {pending.cs01.z, pending.cs01.w},
                    {pending.cs23.x, pending.cs23.y},
                    {pending.cs23.z, pending.cs23.w}};
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) {
      uint4* chunk = reinterpret_cast<uint4*>(sK + tile_offset<D, kRows>(first_row + j * kRowStep, column * 8));
      *chunk = rotate_chunk(*chunk, cs);
      if (j + 1 < kRowsPerThread) {
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          cs[p] = make_float2(cs[p].x * step[p].x - cs[p].y * step[p].y, cs[p].x * step[p].y + cs[p].y * step[p].x);
        }
      }
    }
  }

 private:
  // The (cos, sin) of the thread's pairs at a position (-1: none, identity returned).
  __device__ Pending load_angles(const PagedKv& kv, int pos) const {
    if (pos < 0) return {{1.0f, 0.0f, 1.0f, 0.0f}, {1.0f, 0.0f, 1.0f, 0.0f}};
    const float4* row = reinterpret_cast<const float4*>(kv.rope + static_cast<int64_t>(pos) * (D / 2) + column * 4);
    return {__ldg(row), __ldg(row + 1)};
  }
};

}  // namespace kvq::cuda
