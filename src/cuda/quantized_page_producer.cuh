// The load stages of the prefill attention kernel over quantized pages: the
// quantized twins of Fp16PageProducer (kv_page_loader.cuh), same thread layout
// and interface, filling the same swizzled fp16 tiles.
//
// A tile is a page tile (keys read from the pages, sinks from the exact rows)
// or a band tile (every key read exactly: this step's rows of the chunk, or the
// sequence's exact-row store before the chunk), quantized_prefill.h.
//
// QuantizedPageProducer decodes: each thread decodes its 8-element chunks
// straight from global memory (codes, row and group parameters are per block
// contiguous and L2-resident while the block's query tiles pass; no shared
// staging, for which head_dim 128 has no room), puts the row's outliers back
// (bisection over the block's slots), rotates pre-RoPE keys at their positions
// in fp32 as the CPU rotates its decoded keys, and stores fp16. So issue_*() do
// all the work with ordinary loads and stores and finish_keys() has nothing
// left: the kernel's fence.proxy.async before each full barrier's arrival
// publishes the stores to wgmma as it does the rotated fp16 keys. Keys outside
// the tile's range are zero (never garbage from pages the step has not
// written: zero keys and values are masked and add nothing).
//
// Every query tile of a chunk decodes every page tile it reads, so a key is
// decoded S / 128 times a step; ScratchPageProducer instead copies page tiles
// (cp.async, as Fp16PageProducer) from the page scratch (page_scratch.h), filled
// once per layer and step with the very chunks QuantizedPageProducer::tile_chunk()
// computes (its pre-pass calls it; quantize-on-write, storing the step's own rows
// of int and nuq formats, repeats its operations), so the tiles, and the kernel's
// results, are the same to the bit. Band tiles are copied from the exact rows,
// keys rotated in place or, for this step's rows, from the step's rotated keys.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/decode_partials.cuh"
#include "cuda/kv_dequant.cuh"
#include "cuda/kv_page_loader.cuh"
#include "cuda/quantized_prefill.h"

namespace kvq::cuda {

// kBits: quantized_bits_bucket of the layouts (the packed schemes' bits; 4 for the others, which ignore it).
template <int D, int kRows, int kThreads, int kBits>
struct QuantizedPageProducer {
  static constexpr bool kQuantized = true;
  using Source = QuantizedPrefillSource;
  static constexpr int kChunksPerRow = D / 8;
  static constexpr int kRowStep = kThreads / kChunksPerRow;
  static constexpr int kRowsPerThread = kRows / kRowStep;
  static_assert(kThreads % 32 == 0 && kRows % kRowStep == 0, "every thread owns the same rows");
  static constexpr int kTableEntries = 0;  // no shared row table: each thread looks up its own rows

  struct Pending {};

  int column;      // the thread's column chunk
  int first_row;   // its first row in the tile
  int kv_head;
  ExactSource exact;     // where the chunk's exactly read keys and values are
  const int32_t* pages;  // the sequence's page indices

  __device__ QuantizedPageProducer(const Source& source, int kv_head, const AttentionChunk& chunk, int chunk_index,
                                   int thread)
      : column(thread % kChunksPerRow),
        first_row(thread / kChunksPerRow),
        kv_head(kv_head),
        exact{chunk.first_row, chunk.start_pos, source.chunk_slots[chunk_index]},
        pages(source.kv.page_table + chunk.page_offset) {}

  __device__ void locate(const Source&, const int32_t*, const KeyRange&) const {}

  __device__ Pending issue_keys(const Source& source, const KeyRange& range, __half* sK) const {
    fill(source, range, KvKind::key, sK);
    return {};
  }
  __device__ void issue_values(const Source& source, const KeyRange& range, __half* sV) const {
    fill(source, range, KvKind::value, sV);
  }
  __device__ void finish_keys(const Pending&, __half*) const {}

  // Where the thread's chunk of key (kind 0) or value `pos`, read exactly, is.
  __device__ const __half* exact_chunk(const QuantizedPagedKv& kv, KvKind kind, int pos) const {
    return exact_kv_row(kv, exact, static_cast<int>(kind), kv_head, D, pos) + column * 8;
  }

  // An exactly read pre-RoPE key chunk at pos, rotated as tile_chunk() rotates it (fp32, then fp16).
  __device__ __forceinline__ uint4 rotate_exact_chunk(const QuantizedPagedKv& kv, int pos, uint4 raw) const {
    float x[8];
    half8_to_float(raw, x);
    rotate(kv, pos, x);
    return to_half8(x);
  }

  // The fp16 chunk (elements [8 column, 8 column + 8)) a tile holds at key (or value) pos of the sequence,
  // pos below the tile's end: read exactly (band tiles, sinks) or decoded from the pages, keys of pre-RoPE
  // formats rotated at pos in fp32, rounded to fp16. The page scratch's pre-pass stores exactly this.
  __device__ __forceinline__ uint4 tile_chunk(const Source& source, KvKind kind, int pos, bool read_exactly) const {
    float x[8];
    if (read_exactly) {
      load_exact(source.kv, kind, pos, x);
    } else {
      decode_page_chunk(source.kv, kind, pos, column * 8, x);
    }
    if (kind == KvKind::key && source.kv.rotate_keys) rotate(source.kv, pos, x);
    return to_half8(x);
  }

 private:
  __device__ __forceinline__ void fill(const Source& source, const KeyRange& range, KvKind kind, __half* tile) const {
    const QuantizedPagedKv& kv = source.kv;
    const int c0 = column * 8;
    // The decode below is a chain of dependent loads per row (codes, then codebook and outlier slots). Its
    // first links hit L2 (the pages are shared by the sequence's query tiles); prefetching every row's lines
    // into L1 first lets those misses overlap, so the chains wait on L1 (L1 is what shared memory leaves,
    // ~28 KB: a tile's codes, 6 to 16 KB, fit; the RoPE angles, 32 to 64 KB a tile, are left to L2). A
    // hint: no effect on the result.
#pragma unroll 4
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int pos = range.k0 + first_row + j * kRowStep;
      if (pos >= range.end) break;
      if (range.exact || pos < source.rule.sinks) continue;
      const PageBlockLayout& layout = kind == KvKind::key ? kv.key_layout : kv.value_layout;
      int page_row;
      const uint8_t* block = page_block(kv, kind, pos, page_row);
      prefetch_l1(block + layout.codes_offset + (int64_t{page_row} * D + c0) * layout.bits / 8);
      if (layout.outlier_capacity > 0) prefetch_l1(block + layout.outliers_offset);
    }
#pragma unroll 2
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int r = first_row + j * kRowStep;
      const int pos = range.k0 + r;
      // As tile_chunk(), with zeros past the tile's keys; one rotation site keeps the head_dim 128 producer in
      // its 64 registers (a branch per source around tile_chunk() spilled).
      float x[8];
      if (pos >= range.end) {
#pragma unroll
        for (int i = 0; i < 8; ++i) x[i] = 0.0f;
      } else if (range.exact || pos < source.rule.sinks) {
        load_exact(kv, kind, pos, x);
      } else {
        decode_page_chunk(kv, kind, pos, c0, x);
      }
      if (kind == KvKind::key && kv.rotate_keys && pos < range.end) rotate(kv, pos, x);
      *reinterpret_cast<uint4*>(tile + tile_offset<D, kRows>(r, c0)) = to_half8(x);
    }
  }

  __device__ __forceinline__ void load_exact(const QuantizedPagedKv& kv, KvKind kind, int pos, float (&x)[8]) const {
    half8_to_float(*reinterpret_cast<const uint4*>(exact_chunk(kv, kind, pos)), x);
  }

  // Rounded to fp16 for the tensor cores.
  __device__ __forceinline__ static uint4 to_half8(const float (&x)[8]) {
    uint4 packed;
    __half2* pairs = reinterpret_cast<__half2*>(&packed);
#pragma unroll
    for (int i = 0; i < 4; ++i) pairs[i] = __floats2half2_rn(x[2 * i], x[2 * i + 1]);
    return packed;
  }

  // The pool block holding key (or value) pos of the thread's KV head, and pos's row in it.
  __device__ const uint8_t* page_block(const QuantizedPagedKv& kv, KvKind kind, int pos, int& page_row) const {
    const bool key = kind == KvKind::key;
    const PageBlockLayout& layout = key ? kv.key_layout : kv.value_layout;
    const int page_size = layout.page_size;
    const int32_t page = __ldg(pages + pos / page_size);
    page_row = pos - (pos / page_size) * page_size;
    const int64_t key_blocks = int64_t{kv.n_kv_heads} * kv.key_layout.block_bytes;
    const int64_t page_bytes = key_blocks + int64_t{kv.n_kv_heads} * kv.value_layout.block_bytes;
    return kv.pool + page * page_bytes + (key ? 0 : key_blocks) + int64_t{kv_head} * layout.block_bytes;
  }

  __device__ void decode_page_chunk(const QuantizedPagedKv& kv, KvKind kind, int pos, int c0, float (&x)[8]) const {
    const PageBlockLayout& layout = kind == KvKind::key ? kv.key_layout : kv.value_layout;
    int page_row;
    const uint8_t* block = page_block(kv, kind, pos, page_row);
    decode_chunk8<kBits>(layout, block, page_row, c0, block_calibration(kv.calib, layout, kv_head), x);
    if (layout.outlier_capacity > 0) apply_row_outliers(layout, block, page_row, c0, x);
  }

  __device__ static void prefetch_l1(const void* global) {
    asm volatile("prefetch.global.L1 [%0];\n" ::"l"(global));
  }

  // RoPE at pos on the thread's 4 pairs, fp32 (as the CPU rotates its decoded keys).
  __device__ void rotate(const QuantizedPagedKv& kv, int pos, float (&x)[8]) const {
    const float4* angles = reinterpret_cast<const float4*>(kv.rope + static_cast<int64_t>(pos) * (D / 2) + column * 4);
    const float4 a = __ldg(angles), b = __ldg(angles + 1);
    const float2 cs[4] = {{a.x, a.y}, {a.z, a.w}, {b.x, b.y}, {b.z, b.w}};
    rotate8(cs, x);
  }
};

// Page tiles from the page scratch (page_scratch.h), band tiles read exactly; same thread layout as
// QuantizedPageProducer. Both by cp.async (rows past the tile's keys zero-filled, as the decoding producer
// zeroes them): page-tile keys are stored rotated (the pre-pass rotated them); band-tile keys of this step come
// rotated too where the step has its keys rotated (QuantizedPrefillSource::rotated_step_keys, with the decoding
// producer's operations), others are rotated in place once landed, as the decoding producer rotates them.
// (Rotated in place, --tail's band tile of each query block took llama2-7b's prefill attention from 3.90 to
// 5.47 ms a 2048-token step: Nsight Compute, H100, 2026-11-28.) (Read with ordinary loads, two rows in flight, the
// tail's one band tile per query block made llama2-7b 4 x 2048 prefill attention 1.93x fp16's instead of 1.27x;
// copied, 1.53x: H100, kvq-gpu-bench --parts qprefill.)
template <int D, int kRows, int kThreads>
struct ScratchPageProducer {
  static constexpr bool kQuantized = true;
  using Source = QuantizedPrefillSource;
  // Band tiles are read exactly: the code bits of its decoding path (4 here) are never used.
  using BandReader = QuantizedPageProducer<D, kRows, kThreads, 4>;
  static constexpr int kRowStep = BandReader::kRowStep;
  static constexpr int kRowsPerThread = BandReader::kRowsPerThread;
  static constexpr int kTableEntries = 0;  // scratch rows are the positions: nothing to look up
  using Pending = typename BandReader::Pending;

  BandReader band;       // the thread's column and first row, and the band tiles' exact path
  const __half* keys;    // (keys of the chunk's page tiles, D): the sequence's key 0 of this KV head in the scratch
  const __half* values;  // (same, D)

  __device__ ScratchPageProducer(const Source& source, int kv_head, const AttentionChunk& chunk, int chunk_index,
                                 int thread)
      : band(source, kv_head, chunk, chunk_index, thread) {
    const PageScratch& scratch = source.scratch;
    const int64_t row0 = int64_t{kv_head} * scratch.n_rows + scratch.chunk_rows[chunk_index];
    keys = scratch.keys + row0 * D;
    values = scratch.values + row0 * D;
  }

  __device__ void locate(const Source&, const int32_t*, const KeyRange&) const {}

  __device__ Pending issue_keys(const Source& source, const KeyRange& range, __half* sK) const {
    if (!range.exact) {
      copy_rows(keys, D, 0, range, sK);
    } else if (source.rotated_step_keys != nullptr && range.k0 >= band.exact.chunk_start) {
      // This step's keys only, rotated already: key pos at step row chunk_first_row + pos - chunk_start.
      const int n_kv_heads = source.kv.n_kv_heads;
      copy_rows(source.rotated_step_keys + band.kv_head * D, int64_t{n_kv_heads} * D,
                band.exact.chunk_first_row - band.exact.chunk_start, range, sK);
    } else {
      copy_band(source.kv, range, KvKind::key, sK);
      if (source.kv.rotate_keys) rotate_band(source.kv, range, sK);
    }
    return {};
  }
  __device__ void issue_values(const Source& source, const KeyRange& range, __half* sV) const {
    if (range.exact) {
      copy_band(source.kv, range, KvKind::value, sV);
    } else {
      copy_rows(values, D, 0, range, sV);
    }
  }
  __device__ void finish_keys(const Pending&, __half*) const {}

 private:
  // cp.async of the thread's chunks of keys (or values) [k0, end) into tile, key pos at rows + (pos + offset)
  // stride: the scratch's page-tile rows (offset 0, stride D) or the step's rotated keys.
  __device__ void copy_rows(const __half* rows, int64_t stride, int offset, const KeyRange& range, __half* tile) const {
    const int c0 = band.column * 8;
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int r = band.first_row + j * kRowStep;
      const int pos = range.k0 + r;
      const bool valid = pos < range.end;
      cp_async_16(tile + tile_offset<D, kRows>(r, c0), rows + ((valid ? pos : range.k0) + offset) * stride + c0, valid);
    }
  }

  // cp.async of the thread's chunks of band keys (or values) [k0, end), read exactly, into tile.
  __device__ void copy_band(const QuantizedPagedKv& kv, const KeyRange& range, KvKind kind, __half* tile) const {
#pragma unroll
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int r = band.first_row + j * kRowStep;
      const int pos = range.k0 + r;
      const bool valid = pos < range.end;
      cp_async_16(tile + tile_offset<D, kRows>(r, band.column * 8), valid ? band.exact_chunk(kv, kind, pos) : kv.step_keys,
                  valid);
    }
  }

  // RoPE on the thread's band keys once they have landed (each thread rotates only the chunks it copied).
  __device__ void rotate_band(const QuantizedPagedKv& kv, const KeyRange& range, __half* sK) const {
    cp_async_commit();
    cp_async_wait<0>();
#pragma unroll 4
    for (int j = 0; j < kRowsPerThread; ++j) {
      const int r = band.first_row + j * kRowStep;
      const int pos = range.k0 + r;
      if (pos >= range.end) break;  // rows ascend with j; the rest are zero
      uint4* chunk = reinterpret_cast<uint4*>(sK + tile_offset<D, kRows>(r, band.column * 8));
      *chunk = band.rotate_exact_chunk(kv, pos, *chunk);
    }
  }
};

}  // namespace kvq::cuda
