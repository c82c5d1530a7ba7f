// The K/V load stage of the attention kernels: fills shared-memory tiles of
// post-RoPE fp16 keys and fp16 values for a key range of one sequence and KV
// head, reading the pool through the sequence's page indices.
//
// A loader has two phases so the next tile loads while the current one is used:
//   issue:  starts copying what the pages store (cp.async) into the tiles;
//   finish: once the copies have landed, turns stored data into the
//           attention's operands in place (here: RoPE on the keys).
// Keys and values are issued (and finished) separately, so a kernel can fill
// each into its own stage as soon as that one is free. The quantized-page
// loaders (quantized_page_producer.cuh) keep this interface: their issue
// decodes (and rotates) straight into the same tiles, or copies rows a
// pre-pass decoded and rotated (page_scratch.h), and their finish has nothing
// left.
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

// The keys of one tile: [k0, k0 + rows) of the sequence, those at or past `end` zero-filled. exact: read every
// key exactly (a quantized band tile, quantized_prefill.h); fp16 pages have page tiles only.
struct KeyRange {
  int k0;
  int end;
  int exact;
};

// The fp16 load stage for a warp-specialized kernel, in three steps per tile
// so that keys and values can go into stages freed at different times:
//   locate():       the pool rows of the tile's keys (one page-table lookup per
//                   row, each lane of a warp one of the 32 rows its warp
//                   copies), into the warp's slice of a shared-memory table;
//   issue_keys() / issue_values(): cp.async of the thread's 16-byte chunks of
//                   those rows into the tile (rows past the keys zero-filled);
//   finish_keys():  RoPE on the thread's landed key chunks.
// Each thread touches only the chunks it copied itself, so after its own
// cp_async_wait a thread can finish without waiting for the others, and the
// table is shared only within a warp (__syncwarp, no barrier among producers).
// Thread i copies column chunk i % (D / 8) of rows i / (D / 8) + j * kRowStep;
// the (cos, sin) of its first row travel in registers from issue_keys() to
// finish_keys() and are stepped forward by kRowStep positions by complex
// multiplication (fp32, at most kRows / kRowStep - 1 = 15 steps: ~1e-6
// relative, far below the keys' fp16 rounding).
//
// The quantized-page producer (quantized_page_producer.cuh) keeps this shape.
template <int D, int kRows, int kThreads>
struct Fp16PageProducer {
  static constexpr bool kQuantized = false;
  using Source = PagedKv;
  static constexpr int kChunksPerRow = D / 8;
  static constexpr int kRowStep = kThreads / kChunksPerRow;
  static constexpr int kRowsPerThread = kRows / kRowStep;
  static constexpr int kFirstRowsPerWarp = 32 / kChunksPerRow;
  static_assert(kThreads % 32 == 0 && 32 % kChunksPerRow == 0 && kRows % kRowStep == 0 && kRowsPerThread % 4 == 0,
                "every thread owns the same rows, in groups of 4");
  static_assert(kRows == kThreads, "a warp copies 32 rows: one lookup per lane");
  // int32 entries of the shared-memory table locate() fills (per warp: its 32 rows' pool rows).
  static constexpr int kTableEntries = kThreads;

  // What finish_keys() needs of its issue_keys(): the angles of the thread's 4 pairs at its first row.
  struct Pending {
    float4 cs01, cs23;
  };

  int column;               // the thread's column chunk
  int first_row;            // its first row in the tile
  int kv_head;
  int lane_row;             // the tile row this lane looks up
  int32_t* table_entry;     // shared: where this lane's lookup goes
  const int4* table_rows;   // shared: the pool rows of the thread's kRowsPerThread rows, in order
  float2 step[4];           // rotation by kRowStep positions of its 4 pairs

  // table: shared memory of kTableEntries int32 for this producer's threads.
  __device__ Fp16PageProducer(const PagedKv& kv, int kv_head, int n_keys, int thread, int32_t* table)
      : column(thread % kChunksPerRow), first_row(thread / kChunksPerRow), kv_head(kv_head) {
    // A warp's threads have first rows kFirstRowsPerWarp * warp + e (e < kFirstRowsPerWarp), so its rows are
    // those plus multiples of kRowStep: lane l looks up e = l % kFirstRowsPerWarp, multiple l / kFirstRowsPerWarp,
    // and stores it where the threads of that e read their rows in order.
    const int warp = thread / 32, lane = thread % 32;
    const int e = lane % kFirstRowsPerWarp, j = lane / kFirstRowsPerWarp;
    int32_t* warp_table = table + warp * 32;
    lane_row = kFirstRowsPerWarp * warp + e + kRowStep * j;
    table_entry = warp_table + e * kRowsPerThread + j;
    table_rows = reinterpret_cast<const int4*>(warp_table + (first_row % kFirstRowsPerWarp) * kRowsPerThread);
    // Row kRowStep of the table exists whenever a second row is ever rotated.
    const Pending angles = load_angles(kv, kRowStep < n_keys ? kRowStep : -1);
    step[0] = {angles.cs01.x, angles.cs01.y};
    step[1] = {angles.cs01.z, angles.cs01.w};
    step[2] = {angles.cs23.x, angles.cs23.y};
    step[3] = {angles.cs23.z, angles.cs23.w};
  }

  // Looks up the pool rows of keys [k0, k0 + kRows) (-1 at or past end); pages: the sequence's page
  // indices. A pool row is (page * n_kv_heads + kv_head) * page_size + slot, the row of that key in the pool
  // viewed as (rows, D); int32 holds it for pools below 2^31 rows (256 GiB of keys at D = 64).
  __device__ void locate(const PagedKv& kv, const int32_t* pages, const KeyRange& range) const {
    const int pos = range.k0 + lane_row;
    int32_t pool_row = -1;
    if (pos < range.end) {
      const int page = pos / kv.page_size;
      pool_row = (pages[page] * kv.n_kv_heads + kv_head) * kv.page_size + (pos - page * kv.page_size);
    }
    __syncwarp();  // every lane has copied the previous tile's rows
    *table_entry = pool_row;
    __syncwarp();
  }

  // After locate(): starts copying the keys into sK and returns what finish_keys() needs.
  __device__ Pending issue_keys(const PagedKv& kv, const KeyRange& range, __half* sK) const {
    copy_rows(kv.keys, sK);
    const int pos0 = range.k0 + first_row;
    return load_angles(kv, pos0 < range.end ? pos0 : -1);
  }

  // After locate(): starts copying the values into sV.
  __device__ void issue_values(const PagedKv& kv, const KeyRange&, __half* sV) const { copy_rows(kv.values, sV); }

  // RoPE on this thread's landed key chunks (after its cp_async_wait for them). Rows past the keys were
  // zero-filled and stay zero, so every row is rotated: no branch between the shared-memory loads.
  __device__ void finish_keys(const Pending& pending, __half* sK) const {
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
  // cp.async of the thread's chunks of the located rows from pool (keys or values) into tile.
  __device__ void copy_rows(const __half* pool, __half* tile) const {
    const __half* source = pool + column * 8;
#pragma unroll
    for (int j4 = 0; j4 < kRowsPerThread / 4; ++j4) {
      const int4 four = table_rows[j4];
      const int32_t pool_rows[4] = {four.x, four.y, four.z, four.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = first_row + (4 * j4 + i) * kRowStep;
        const bool valid = pool_rows[i] >= 0;
        cp_async_16(tile + tile_offset<D, kRows>(r, column * 8),
                    source + static_cast<int64_t>(valid ? pool_rows[i] : 0) * D, valid);
      }
    }
  }

  // The (cos, sin) of the thread's pairs at a position (-1: none, identity returned).
  __device__ Pending load_angles(const PagedKv& kv, int pos) const {
    if (pos < 0) return {{1.0f, 0.0f, 1.0f, 0.0f}, {1.0f, 0.0f, 1.0f, 0.0f}};
    const float4* row = reinterpret_cast<const float4*>(kv.rope + static_cast<int64_t>(pos) * (D / 2) + column * 4);
    return {__ldg(row), __ldg(row + 1)};
  }
};

}  // namespace kvq::cuda
