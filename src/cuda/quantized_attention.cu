// Split-K attention over quantized pages and exact rows (quantized_attention.h).
//
// A block takes one split (a key range of one query row, one source) of one KV
// head with every query head of the group. Two kernels over the same split
// array, each skipping the other's splits, write the partial results in decode
// attention's format (decode_partials.cuh), which launch_decode_combine merges:
// a page kernel (page_fragment_kernel for int and nuq pages with calibrated key
// ranges, whose lanes decode straight into their mma fragments: see its section;
// page_split_kernel for the rest) and exact_split_kernel.
//
// page_split_kernel (splits of the pages), on the tensor cores (mma.sync,
// mma_sync.cuh): a pipeline of kStages stages, each the whole K and V blocks
// (codes, row and group parameters, outlier slots: contiguous per block) of
// `pages_per_stage` consecutive pages of the sequence, copied by the TMA (a
// bulk copy a block, issued by one thread, landing on the stage's mbarrier;
// a block barrier before each refill, once every warp is done with the buffer).
// Once a stage has landed (its mbarrier), each of
// the 4 warps takes a run of consecutive 16-key tiles of the stage and, per
// tile:
//   - decodes the 16 key rows into a per-warp fp16 tile (16, head_dim) in shared
//     memory, head_dim / 8 lanes per row, 8 elements a lane: decode_chunk8 or
//     its packed twin (an FFMA an element, see decode_packed1;
//     codebooks and calibrated per-channel key constants in shared memory),
//     pre-RoPE keys rotated in fp32 with (cos, sin) stepped in registers, then
//     rounded to fp16; then the tile's outlier slots (found by warp ballots over
//     the block's slots, which are in row order: tile_slot_range), one per lane:
//     the slot's RoPE pair (its other element decoded, or taken from its row's
//     slots where it is an outlier too) rotated at its position and stored over
//     the first (the packed decodes work a one-page tile's patches out before
//     decoding it: fill_tile);
//   - S^T (16 keys x 8 heads) = K Q^T by head_dim / 16 mma.m16n8k16, the query
//     heads of the group as the 8 columns (fp16 as stored; padding heads zero);
//   - the online softmax of decode_partials.cuh per head column (log2 units,
//     kRescaleSlack), keys outside the split masked; P rounded to fp16;
//   - decodes the 16 value rows into the same tile (the keys are consumed), a
//     value outlier stored as its slot's half, and accumulates O^T (head_dim x 8
//     heads) += V^T P, head_dim / 16 mma.
// The next stages' copies are in flight meanwhile. At the end the 4 warps'
// (max, sum, O) are merged in shared memory into the split's partial result.
// Operands in fp16 are what the wgmma prefill kernel uses too (the CPU twin test
// rounds the same values).
//
// exact_split_kernel (sinks, the exact tail window, the step's own rows): fp16
// rows from this step's K/V or the sequence's exact-row store, one key per lane
// group at a time on CUDA cores (short ranges: at most the window per row).
#include "cuda/quantized_attention.h"

#include <algorithm>
#include <type_traits>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/decode_partials.cuh"
#include "cuda/kv_dequant.cuh"
#include "cuda/kv_page_loader.cuh"
#include "cuda/mma_sync.cuh"
#include "cuda/warp_specialize.cuh"

namespace kvq::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

// Q of the block's query heads for this lane's 8 dims, pre-scaled by scale * log2 e (heads >= group: zeros).
template <int D, int kMaxGroup>
__device__ __forceinline__ void load_scaled_query(const AttentionQuery& query, const AttentionChunk& row, int kv_head,
                                                  int group, int c0, float (&q)[kMaxGroup][8]) {
  const float scale_log2 = query.scale * 1.4426950408889634f;
  const __half* q_row = query.q + static_cast<int64_t>(row.first_row) * query.q_stride + (kv_head * group) * D + c0;
#pragma unroll
  for (int h = 0; h < kMaxGroup; ++h) {
    float x[8] = {};
    if (h < group) half8_to_float(*reinterpret_cast<const uint4*>(q_row + h * D), x);
#pragma unroll
    for (int i = 0; i < 8; ++i) q[h][i] = x[i] * scale_log2;
  }
}

// Where a thread of exact_split_kernel sits: head_dim / 8 lanes (a lane group) read a key row, lane `sub`
// its elements c0 .. c0 + 7; key_group numbers the block's lane groups.
struct LanePlace {
  int sub, c0, key_group;
};
template <int D>
__device__ __forceinline__ LanePlace lane_place() {
  constexpr int kLanes = D / 8;
  const int thread = static_cast<int>(threadIdx.x), lane = thread % 32, sub = lane % kLanes;
  return {sub, sub * 8, thread / 32 * (32 / kLanes) + lane / kLanes};
}

// ---- page_split_kernel ----

constexpr int kStages = 3;     // page stages: kStages - 1 in flight while one is decoded
constexpr int kTileKeys = 16;  // keys per warp tile: the M of mma.m16n8k16 (S^T) and its K (O^T)
constexpr int kMmaHeads = 8;   // query heads per block as mma columns (N): groups of up to 8

constexpr int kCodebookFloats = 16;  // 2^bits, bits <= 4
// The calibration's shared-memory bytes (see below): 4 codebook tables, then the keys' lo and span per channel.
template <int D>
constexpr int kCalibBytes = (4 * kCodebookFloats + 2 * D) * 4;

// A page kernel's dynamic shared memory, sized on the host (page_stage_shape), in this order:
//   calib:      (page_split_kernel; page_fragment_kernel's tables are static) key codebook, value codebook, then (decode_packed8) both codebooks' centre + 1, kCodebookFloats
//               floats each, first, so that a lookup's address is the code's offset plus a constant (one
//               instruction fewer per element); then (decode_packed8) the keys' lo and span per channel (D
//               floats each; in registers they pushed the kernel into spills);
//   stages:     kStages x pages_per_stage x (K block, V block) of the KV head, 16-byte aligned;
//   tiles:      kWarps x (kTileKeys, head_dim) fp16, a warp's keys then values (page_fragment_kernel: its Δ tile;
//               tile_offset's swizzle), 128-byte aligned.
// After the loop the block merge (kSplitMergeFloats<D, kMmaHeads, kWarps>: per warp the running max and sum of the
// 8 head columns, then O^T as (warp, head, head_dim)) reuses it from the start, up to the stages' kStages mbarriers,
// which come last.
struct PageStageShape {
  int32_t pages_per_stage;
  int32_t pair_bytes;   // K block + V block bytes of one page and KV head
  int32_t stage_bytes;  // pages_per_stage * pair_bytes
  int32_t tiles_offset;
  int32_t barriers_offset;  // kStages mbarriers (8 bytes each), after the tiles and the merge's floats
  int32_t smem_bytes;
};

// Value row `row`'s (lo, span) from a packed block's row parameters (fp16 lo, hi), as decode_packed1 takes them.
template <int kBits, bool kCodebook>
__device__ __forceinline__ float2 value_row_range(const PageBlockLayout& layout, const uint8_t* block, int row) {
  const uint32_t p = reinterpret_cast<const uint32_t*>(block + layout.row_params_offset)[row];
  const float lo = half_bits_to_float(p & 0xffff);
  return {lo, packed_span(kCodebook, lo, half_bits_to_float(p >> 16), kBits)};
}

// The packed formats with calibrated key ranges (int, nuq without --kscale page; here in pages of sizes other
// than multiples of 16, the rest going to page_fragment_kernel), decoded
// with per-channel constants hoisted out of the key loop: element j = lo[j] + x * span[j] with x the code
// (int) or its codebook centre + 1 (nuq), span (hi - lo) / levels or (hi - lo) / 2: decode_chunk8's fp32
// operations (uniform_decode, codebook_decode) in one fused multiply-add, rounded once where they round twice:
// up to half an ulp of x * span apart (more ulps of the result where lo and x * span nearly cancel), so after
// the tile's rounding to fp16 an element now and then differs from the CPU's by one fp16 ulp (~0.04% of random
// int4 elements). An int code becomes a float by its bits (2^23 + code, exact, minus 2^23): integer-to-float
// conversions issue at an eighth of the rate of additions.
template <bool kCodebook>
__device__ __forceinline__ float decode_packed1(uint32_t code, const float* centre_plus_one, float lo, float span) {
  const float x = kCodebook ? centre_plus_one[code] : __fsub_rn(__uint_as_float(0x4b000000u | code), 8388608.0f);
  return __fmaf_rn(x, span, lo);
}
template <int kBits, bool kCodebook>
__device__ __forceinline__ void decode_packed8(uint32_t codes, const float* centre_plus_one, const float (&lo)[8],
                                               const float (&span)[8], float (&out)[8]) {
  constexpr uint32_t kMask = (1u << kBits) - 1;
#pragma unroll
  for (int j = 0; j < 8; ++j) out[j] = decode_packed1<kCodebook>((codes >> (kBits * j)) & kMask, centre_plus_one, lo[j], span[j]);
}

// How the page kernel decodes a block's rows: decode_packed8 (nuq or int with calibrated key ranges) or
// decode_chunk8 (every other format).
enum class RowDecode { codebook, uniform, generic };

// Calls f with row_decode as a compile-time constant (std::integral_constant), so that the loops f runs are
// compiled once per way of decoding, without a branch per row.
template <typename F>
__device__ __forceinline__ void with_row_decode(RowDecode row_decode, F&& f) {
  switch (row_decode) {
    case RowDecode::codebook: return f(std::integral_constant<RowDecode, RowDecode::codebook>{});
    case RowDecode::uniform: return f(std::integral_constant<RowDecode, RowDecode::uniform>{});
    case RowDecode::generic: return f(std::integral_constant<RowDecode, RowDecode::generic>{});
  }
}

// The 8 packed codes of elements [c0, c0 + 8) of row `row` (c0 % 8 == 0) of a block (head_dim D): load_codes8
// with the offset in 32-bit arithmetic (a block holds far fewer than 2^31 codes).
template <int D, int kBits>
__device__ __forceinline__ uint32_t row_codes8(const PageBlockLayout& layout, const uint8_t* block, int row, int c0) {
  return load_codes8<kBits>(block + layout.codes_offset + (row * (D / 8) + c0 / 8) * kBits, 0);
}

// Elements [c0, c0 + 8) of key row `row` of a staged K block (head_dim D), without the outliers (the page kernel's
// fill_tile patches them into the tile). key_lo, key_span (shared, D each): the calibrated channels' lo and span
// (RowDecode::codebook, uniform).
template <int D, int kBits, RowDecode kDecode>
__device__ __forceinline__ void decode_key8(const PageBlockLayout& layout, const uint8_t* block, int row, int c0,
                                            const BlockCalibration& calib, const float* centre_plus_one,
                                            const float* key_lo, const float* key_span, float (&k)[8]) {
  if constexpr (kDecode == RowDecode::generic) {
    decode_chunk8<kBits>(layout, block, row, c0, calib, k);
  } else {
    const float4 lo0 = reinterpret_cast<const float4*>(key_lo + c0)[0], lo1 = reinterpret_cast<const float4*>(key_lo + c0)[1];
    const float4 span0 = reinterpret_cast<const float4*>(key_span + c0)[0];
    const float4 span1 = reinterpret_cast<const float4*>(key_span + c0)[1];
    const float lo[8] = {lo0.x, lo0.y, lo0.z, lo0.w, lo1.x, lo1.y, lo1.z, lo1.w};
    const float span[8] = {span0.x, span0.y, span0.z, span0.w, span1.x, span1.y, span1.z, span1.w};
    decode_packed8<kBits, kDecode == RowDecode::codebook>(row_codes8<D, kBits>(layout, block, row, c0),
                                                          centre_plus_one, lo, span, k);
  }
}

// The same for value row `row` of a staged V block (packed: the row's own (lo, hi)).
template <int D, int kBits, RowDecode kDecode>
__device__ __forceinline__ void decode_value8(const PageBlockLayout& layout, const uint8_t* block, int row, int c0,
                                              const BlockCalibration& calib, const float* centre_plus_one,
                                              float (&v)[8]) {
  if constexpr (kDecode == RowDecode::generic) {
    decode_chunk8<kBits>(layout, block, row, c0, calib, v);
  } else {
    constexpr bool kCodebook = kDecode == RowDecode::codebook;
    const auto [lo, span] = value_row_range<kBits, kCodebook>(layout, block, row);
    const float row_lo[8] = {lo, lo, lo, lo, lo, lo, lo, lo};
    const float row_span[8] = {span, span, span, span, span, span, span, span};
    decode_packed8<kBits, kCodebook>(row_codes8<D, kBits>(layout, block, row, c0), centre_plus_one, row_lo, row_span, v);
  }
}

// 8 elements rounded to fp16 into a tile's 16-byte chunk (shared memory), one 16-byte store (written as a
// uint4 the compiler made four 4-byte stores of it). Only the tile's ldmatrix (volatile asm, kept in order with
// this one and the __syncwarp between them) reads these bytes, so no memory clobber: the next rows' loads from
// the stage may be scheduled before it.
__device__ __forceinline__ void store_half8(__half* chunk, const float (&x)[8]) {
  const auto address = static_cast<uint32_t>(__cvta_generic_to_shared(chunk));
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(address), "r"(half2_bits(x[0], x[1])),
               "r"(half2_bits(x[2], x[3])), "r"(half2_bits(x[4], x[5])), "r"(half2_bits(x[6], x[7])));
}

// Slots [first, end) of a block's n_slots slots (rows in ascending order, by magnitude within a row; index =
// row * head_dim + channel) whose index lies in [index_begin, index_end), both multiples of head_dim (row
// bounds): counted by the warp's ballots, 32 slots at a time, up to the first 32 that reach index_end. Every
// lane of the warp calls it (and gets the same range).
__device__ __forceinline__ int2 tile_slot_range(const uint32_t* slots, int n_slots, int index_begin, int index_end,
                                                int lane) {
  int first = 0, end = 0;
  for (int base = 0; base < n_slots; base += 32) {
    const int index = base + lane < n_slots ? static_cast<int>(slot_index(slots[base + lane])) : index_end;
    first += __popc(__ballot_sync(0xffffffffu, index < index_begin));
    const uint32_t below_end = __ballot_sync(0xffffffffu, index < index_end);
    end += __popc(below_end);
    if (below_end != 0xffffffffu) break;  // the rest are past index_end
  }
  return {first, end};
}

// The slot of the other element of slot at_slot's pair (channels 2j, 2j + 1) where that element is an outlier
// too, else slots[at_slot]: searched among the slot's row's slots, which are contiguous.
__device__ __forceinline__ uint32_t pair_slot(const uint32_t* slots, int n_slots, int at_slot, int head_dim) {
  const uint32_t slot = slots[at_slot], other = slot_index(slot) ^ 1u;
  const uint32_t row_begin = slot_index(slot) / head_dim * head_dim, row_end = row_begin + head_dim;
  for (int t = at_slot - 1; t >= 0 && slot_index(slots[t]) >= row_begin; --t) {
    if (slot_index(slots[t]) == other) return slots[t];
  }
  for (int t = at_slot + 1; t < n_slots && slot_index(slots[t]) < row_end; ++t) {
    if (slot_index(slots[t]) == other) return slots[t];
  }
  return slot;
}

// The slot of the other element of slot `at`'s RoPE pair where that is an outlier too, else slots[at], for slot
// `at` of a tile's range of n_range slots (first_round: the lanes holding its first 32, one each, every one of
// which calls this): from the lane holding it when the range is one round (a row's slots are all in the range),
// else searched among the row's slots (pair_slot).
template <int D>
__device__ __forceinline__ uint32_t partner_slot(const uint32_t* slots, int n_slots, int at, int n_range,
                                                 unsigned first_round, int lane) {
  const uint32_t slot = slots[at];
  if (n_range > 32) return pair_slot(slots, n_slots, at, D);
  const unsigned same_pair = __match_any_sync(first_round, slot_index(slot) >> 1) & ~(1u << lane);
  return __shfl_sync(first_round, slot, same_pair ? __ffs(same_pair) - 1 : lane);
}

// An outlier's patch of a warp's tile: at `offset` of the tile (tile_offset), the half x0 (values) or the pair
// of halves (x0, x1) rotated by `angle` (keys; offset even; (1, 0) leaves them as they are); offset -1: none.
// Kept unrounded until stored, so that a patch made before the tile's decode waits for its angle's load only
// then.
struct TilePatch {
  int offset;
  float x0, x1;
  float2 angle;
};

// A staged row: page `page` of the stage, row `row` of that page.
struct StageRow {
  int page, row;
};
__device__ __forceinline__ StageRow stage_row(int t, int page_size) { return {t / page_size, t % page_size}; }
// The row `rows` stage rows further, without a division (page_size may be below rows).
__device__ __forceinline__ void advance(StageRow& at, int rows, int page_size) {
  for (at.row += rows; at.row >= page_size; at.row -= page_size) ++at.page;
}

// What a warp decodes of a tile: lane `column` (elements c0 = 8 column .. c0 + 7) of tile rows
// lane_row + i * kRowStep, i < kPasses (unrolled); and the registers that allows: head_dim 64 at most 128 (4
// blocks per multiprocessor), head_dim 128 at most 168 (3 blocks; its shared memory allows 3 at page 16,
// nuq3-1%). Head_dim 64 is past the edge: it spills 12-20 bytes (ptxas -v, nvcc 13.0). Deriving the lane's first
// row of each tile from tile_at instead of carrying it cut that to 4-12 bytes but made q4_0 pages 2% slower
// (session 16), so `at` is carried. Not yet timed against other bounds.
template <int D>
struct PageTile {
  static constexpr int kChunks = D / 8;                  // lanes per row
  static constexpr int kRowStep = 32 / kChunks;          // rows a warp decodes at once
  static constexpr int kPasses = kTileKeys / kRowStep;   // per lane and tile
  static constexpr int kMinBlocks = D <= 64 ? 4 : 3;     // resident blocks per multiprocessor compiled for
};

// The query heads of the block as the B operand (head_dim x 8 heads) of S^T = K Q^T, one fragment per 16
// dims: lane holds head lane / 4's dims 16 kt + 2 (lane % 4) + {0, 1} and + 8 (mma_sync.cuh), fp16 as the
// step stores them (the softmax scale multiplies the fp32 scores instead, so Q is not rounded again); heads
// >= group (padding columns) zero.
template <int D>
__device__ __forceinline__ void load_query_fragments(const AttentionQuery& query, const AttentionChunk& row, int kv_head,
                                                     int group, int lane, uint32_t (&q)[D / 16][2]) {
  const int head = lane / 4;
  const __half* q_row =
      query.q + static_cast<int64_t>(row.first_row) * query.q_stride + (kv_head * group + head) * D + 2 * (lane % 4);
#pragma unroll
  for (int kt = 0; kt < D / 16; ++kt) {
    q[kt][0] = head < group ? *reinterpret_cast<const uint32_t*>(q_row + 16 * kt) : 0u;
    q[kt][1] = head < group ? *reinterpret_cast<const uint32_t*>(q_row + 16 * kt + 8) : 0u;
  }
}

// The split's pages of one KV head, staged kStages deep (the file comment): stage s holds pages first_page +
// s * pages_per_stage + j, j < pages_per_stage, each (K block, V block), copied by thread 0 as one bulk copy a
// block (block_bytes are multiples of 16) that lands on full[s % kStages]. The copies of 16-byte chunks by
// every thread they replace took ~10% of the page kernel's instructions (Nsight Compute source counters,
// H200, 2026-11-27), and the bulk copies made smollm2 64 x 8192 nuq3-1% 4% faster (kvq-gpu-bench --parts
// qdecode, H200, 2026-11-27).
struct SplitStages {
  const uint8_t* pool;
  const int32_t* pages;  // the row's page table
  int64_t page_bytes, key_block_offset, value_block_offset;
  int key_bytes, value_bytes;
  int page_size, first_page, n_pages, n_stages;  // n_stages: uniform over the block
  uint8_t* buffers;                              // kStages x shape.stage_bytes
  uint64_t* full;                                // kStages mbarriers
  PageStageShape shape;

  __device__ uint8_t* stage(int s) const { return buffers + (s % kStages) * shape.stage_bytes; }
  __device__ int stage_pages(int s) const { return min(shape.pages_per_stage, n_pages - s * shape.pages_per_stage); }
  // The position of stage s's first key.
  __device__ int stage_pos(int s) const { return (first_page + s * shape.pages_per_stage) * page_size; }
  // Thread 0: stage s's copies.
  __device__ void issue(int s) const {
    uint8_t* buffer = stage(s);
    const int n = stage_pages(s);
    uint64_t* bar = &full[s % kStages];
    mbarrier_arrive_expect_tx(bar, n * shape.pair_bytes);
    for (int j = 0; j < n; ++j) {
      const uint8_t* page = pool + __ldg(pages + first_page + s * shape.pages_per_stage + j) * page_bytes;
      uint8_t* staged = buffer + j * shape.pair_bytes;
      bulk_copy_to_shared(staged, page + key_block_offset, key_bytes, bar);
      bulk_copy_to_shared(staged + key_bytes, page + value_block_offset, value_bytes, bar);
    }
  }
  // Stage s's keys at positions [pos, end) (the split's end cuts the last stage) in 16-key tiles: warp w takes a
  // run of consecutive tiles [tile, tile_end) (empty where tile >= tile_end); a split starting mid-page (after
  // the sinks) skips the tiles before its first key.
  struct WarpTiles {
    int pos, end, tile, tile_end;
  };
  __device__ WarpTiles warp_tiles(int s, const QuantizedSplit& split, int warp) const {
    const int pos = stage_pos(s), end = min(split.key_end, pos + stage_pages(s) * page_size);
    const int n_tiles = (end - pos + kTileKeys - 1) / kTileKeys;
    const int tiles_per_warp = (n_tiles + kWarps - 1) / kWarps;
    return {pos, end, max(warp * tiles_per_warp, (max(split.key_begin, pos) - pos) / kTileKeys),
            min(n_tiles, (warp + 1) * tiles_per_warp)};
  }
  // Every thread, at the top of stage s's loop: waits for it to land, then (a block barrier: every thread is
  // done with stage s - 1) thread 0 refills stage s - 1's buffer with stage s + kStages - 1.
  __device__ void begin(int s) const {
    mbarrier_wait(&full[s % kStages], (s / kStages) & 1);
    __syncthreads();
    if (threadIdx.x == 0 && s + kStages - 1 < n_stages) issue(s + kStages - 1);
  }
};

// Initializes the mbarriers and issues the first kStages - 1 stages of `split`'s pages (every thread calls it).
__device__ __forceinline__ SplitStages start_split_stages(const QuantizedPagedKv& kv, const AttentionChunk& row,
                                                          const QuantizedSplit& split, int kv_head,
                                                          const PageStageShape& shape, uint8_t* smem,
                                                          int calib_bytes) {
  SplitStages st;
  st.pool = kv.pool;
  st.pages = kv.page_table + row.page_offset;
  st.key_bytes = kv.key_layout.block_bytes;
  st.value_bytes = kv.value_layout.block_bytes;
  st.page_bytes = int64_t{kv.n_kv_heads} * (st.key_bytes + st.value_bytes);
  st.key_block_offset = int64_t{kv_head} * st.key_bytes;
  st.value_block_offset = int64_t{kv.n_kv_heads} * st.key_bytes + int64_t{kv_head} * st.value_bytes;
  st.page_size = kv.key_layout.page_size;
  st.first_page = split.key_begin / st.page_size;
  st.n_pages = (split.key_end - 1) / st.page_size + 1 - st.first_page;
  st.n_stages = (st.n_pages + shape.pages_per_stage - 1) / shape.pages_per_stage;
  st.buffers = smem + calib_bytes;
  st.full = reinterpret_cast<uint64_t*>(smem + shape.barriers_offset);
  st.shape = shape;
  if (threadIdx.x == 0) {
    for (int b = 0; b < kStages; ++b) mbarrier_init(&st.full[b], 1);
    mbarrier_init_fence();
  }
  __syncthreads();  // the mbarriers are initialized before any thread waits on one
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages - 1 && s < st.n_stages; ++s) st.issue(s);
  }
  return st;
}

// The online softmax of a warp's 16-key tile, as accumulate_key: score is the S^T (keys x heads) C fragment
// (score[0..1] of key lane / 4, score[2..3] of key lane / 4 + 8, heads 2 (lane % 4) + {0, 1}); the max is
// raised only past kRescaleSlack, each lane keeps the sum of its own keys' weights (summed over lanes at the
// end). Branch-free (a correction of 1 when the max stays), so the warp stays converged for the mma. Returns P
// (keys x heads) in fp16 as the B fragment of O^T += V^T P (k = keys, n = heads): the C layout transposed. The
// sums take the rounded weights, so numerator and denominator weigh each key alike.
template <int kDimTiles>
__device__ __forceinline__ void tile_softmax(const float (&score)[4], bool valid_low, bool valid_high, float scale_log2,
                                             float (&running_max)[2], float (&running_sum)[2],
                                             float (&out)[kDimTiles][4], uint32_t (&p)[2]) {
  float weight[4];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float low = score[h] * scale_log2, high = score[2 + h] * scale_log2;
    float top = fmaxf(valid_low ? low : -INFINITY, valid_high ? high : -INFINITY);
#pragma unroll
    for (int offset = 4; offset < 32; offset *= 2) top = fmaxf(top, __shfl_xor_sync(0xffffffffu, top, offset));
    const float new_max = top > running_max[h] + kRescaleSlack ? top : running_max[h];
    // new_max is finite once a key is valid; -inf - -inf would be NaN, so no correction without a change.
    const float correction = new_max == running_max[h] ? 1.0f : fast_exp2(running_max[h] - new_max);
    running_max[h] = new_max;
    running_sum[h] *= correction;
#pragma unroll
    for (int mt = 0; mt < kDimTiles; ++mt) {
      out[mt][h] *= correction;
      out[mt][2 + h] *= correction;
    }
    weight[h] = valid_low ? fast_exp2(low - new_max) : 0.0f;  // at most 2^kRescaleSlack: fits fp16
    weight[2 + h] = valid_high ? fast_exp2(high - new_max) : 0.0f;
  }
  const uint32_t p_low = half2_bits(weight[0], weight[1]), p_high = half2_bits(weight[2], weight[3]);
  const float2 rounded_low = __half22float2(*reinterpret_cast<const __half2*>(&p_low));
  const float2 rounded_high = __half22float2(*reinterpret_cast<const __half2*>(&p_high));
  running_sum[0] += rounded_low.x + rounded_high.x;
  running_sum[1] += rounded_low.y + rounded_high.y;
  p[0] = movmatrix_trans(p_low);
  p[1] = movmatrix_trans(p_high);
}

// The block merge of a page kernel: each warp's (max, sum) per head column and its O^T (out[mt][2 u + h]:
// dim dim_of(mt, u) of head 2 (lane % 4) + h), then the split's partial result (decode_partials.cuh's format)
// for the `group` real heads. Every thread calls it after its last tile; it reuses the shared memory from
// `smem` on.
template <int D, typename DimOf>
__device__ __forceinline__ void merge_page_split(uint8_t* smem, float (&running_max)[2], float (&running_sum)[2],
                                                 const float (&out)[D / 16][4], DimOf dim_of, int group, int kv_head,
                                                 int split_index, int n_heads, DecodeWorkspace ws) {
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  // Each lane summed the weights of its own keys: the sum over the 8 lanes of its head columns.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int offset = 4; offset < 32; offset *= 2) running_sum[h] += __shfl_xor_sync(0xffffffffu, running_sum[h], offset);
  }
  __syncthreads();  // every thread is done with the stages and tiles before the merge reuses them
  float* merge = reinterpret_cast<float*>(smem);
  float(*s_max)[kMmaHeads] = reinterpret_cast<float(*)[kMmaHeads]>(merge);
  float(*s_sum)[kMmaHeads] = reinterpret_cast<float(*)[kMmaHeads]>(merge + kWarps * kMmaHeads);
  float(*s_out)[kMmaHeads][D] = reinterpret_cast<float(*)[kMmaHeads][D]>(merge + 2 * kWarps * kMmaHeads);
  const int head_pair = 2 * (lane % 4);
  if (lane < 4) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      s_max[warp][head_pair + h] = running_max[h];
      s_sum[warp][head_pair + h] = running_sum[h];
    }
  }
#pragma unroll
  for (int mt = 0; mt < D / 16; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      s_out[warp][head_pair + h][dim_of(mt, 0)] = out[mt][h];
      s_out[warp][head_pair + h][dim_of(mt, 1)] = out[mt][2 + h];
    }
  }
  __syncthreads();
  merge_split_parts<D, kMmaHeads, kWarps, kThreads>(merge, group, kv_head, split_index, n_heads, ws);
}

// One split of the pages of one KV head (the file comment tells the steps); the query heads of the group as
// mma columns, so one kernel serves every group size up to 8.
template <int D, int kBits>
__global__ void __launch_bounds__(kThreads, PageTile<D>::kMinBlocks)
    page_split_kernel(AttentionQuery query, QuantizedPagedKv kv, const AttentionChunk* rows, const QuantizedSplit* splits,
                      PageStageShape shape, DecodeWorkspace ws) {
  using Tile = PageTile<D>;
  constexpr int kDimTiles = D / 16;  // k-steps of S^T, m-tiles of O^T
  extern __shared__ uint4 s_dynamic[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(s_dynamic);

  const int split_index = blockIdx.x;
  const int kv_head = blockIdx.y;
  const QuantizedSplit split = splits[split_index];
  if (split.exact || split.key_begin == split.key_end) return;  // exact_split_kernel's, or padding
  const AttentionChunk row = rows[split.row];
  const int group = query.n_heads / kv.n_kv_heads;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int column = lane % Tile::kChunks, c0 = column * 8, lane_row = lane / Tile::kChunks;
  const PageBlockLayout& key_layout = kv.key_layout;
  const PageBlockLayout& value_layout = kv.value_layout;
  const SplitStages st = start_split_stages(kv, row, split, kv_head, shape, smem, kCalibBytes<D>);
  const int page_size = st.page_size;
  const int key_bytes = st.key_bytes;
  // Calibration in shared memory (read for every element; the first stage barrier publishes it).
  float* s_calib = reinterpret_cast<float*>(smem);
  const BlockCalibration global_key_calib = block_calibration(kv.calib, key_layout, kv_head);
  const BlockCalibration global_value_calib = block_calibration(kv.calib, value_layout, kv_head);
  const bool codebook = key_layout.scheme == KvScheme::nonuniform;
  // decode_packed8 serves int and nuq pages with calibrated key ranges; the rest go through decode_chunk8.
  const bool packed = (key_layout.scheme == KvScheme::uniform || codebook) && !key_layout.per_page_key_ranges &&
                      global_key_calib.key_lo != nullptr;
  const RowDecode row_decode = !packed ? RowDecode::generic : codebook ? RowDecode::codebook : RowDecode::uniform;
  float* key_centres = s_calib + 2 * kCodebookFloats;  // centre + 1 of the key codebook, then the value codebook's
  float* value_centres = key_centres + kCodebookFloats;
  if (threadIdx.x < kCodebookFloats && threadIdx.x < (1 << kBits)) {
    if (global_key_calib.codebook) {
      s_calib[threadIdx.x] = global_key_calib.codebook[threadIdx.x];
      key_centres[threadIdx.x] = __fadd_rn(global_key_calib.codebook[threadIdx.x], 1.0f);
    }
    if (global_value_calib.codebook) {
      s_calib[kCodebookFloats + threadIdx.x] = global_value_calib.codebook[threadIdx.x];
      value_centres[threadIdx.x] = __fadd_rn(global_value_calib.codebook[threadIdx.x], 1.0f);
    }
  }
  // decode_chunk8 reads the key ranges (global) only for the packed schemes, which take decode_packed8 here.
  const BlockCalibration key_calib{global_key_calib.key_lo, global_key_calib.key_hi,
                                   global_key_calib.codebook ? s_calib : nullptr};
  const BlockCalibration value_calib{nullptr, nullptr, global_value_calib.codebook ? s_calib + kCodebookFloats : nullptr};
  // The calibrated key channels (decode_packed8): lo and span, the same for every key.
  float* key_lo = value_centres + kCodebookFloats;  // (D)
  float* key_span = key_lo + D;                     // (D)
  for (int i = threadIdx.x; i < D && packed; i += kThreads) {
    const float lo = global_key_calib.key_lo[i], hi = global_key_calib.key_hi[i];
    key_lo[i] = lo;
    key_span[i] = packed_span(codebook, lo, hi, kBits);
  }
  __half* warp_tile = reinterpret_cast<__half*>(smem + shape.tiles_offset) + warp * kTileKeys * D;  // (kTileKeys, D)

  uint32_t q[kDimTiles][2];
  load_query_fragments<D>(query, row, kv_head, group, lane, q);
  const float scale_log2 = query.scale * 1.4426950408889634f;
  // Running max (log2 units) and sum of the lane's two head columns 2 (lane % 4) + {0, 1}, and O^T: out[mt]
  // holds dims 16 mt + lane / 4 (+ 8 in [2], [3]) of those heads (C fragments).
  float running_max[2] = {-INFINITY, -INFINITY}, running_sum[2] = {0.0f, 0.0f};
  float out[kDimTiles][4];
#pragma unroll
  for (int mt = 0; mt < kDimTiles; ++mt) out[mt][0] = out[mt][1] = out[mt][2] = out[mt][3] = 0.0f;
  // (cos, sin) of kRowStep positions: the lane's next row. Keys stored after RoPE get the identity (1, 0),
  // which rotates finite values exactly, so the loop rotates without a branch (the branch cost a register move
  // per element where the two paths merged).
  float2 step[4] = {{1.0f, 0.0f}, {1.0f, 0.0f}, {1.0f, 0.0f}, {1.0f, 0.0f}};
  if (kv.rotate_keys) {
    const float2* angles = kv.rope + int64_t{Tile::kRowStep} * (D / 2) + column * 4;
#pragma unroll
    for (int j = 0; j < 4; ++j) step[j] = __ldg(angles + j);
  }

  // The loop bounds are uniform over the block (the barriers need every thread), the tile loop over the warp
  // (the mma, ldmatrix and shuffles need every lane).
  for (int s = 0; s < st.n_stages; ++s) {
    st.begin(s);
    const uint8_t* stage = st.stage(s);
    const int stage_pages = st.stage_pages(s);

    // The warp's run of the stage's tiles (SplitStages::warp_tiles): a lane's rows (and RoPE angles) advance by
    // kRowStep from one pass to the next across them. Rows outside [key_begin, stage_end) (also those past the
    // staged pages in a last partial tile) decode the stage's first row instead (staged, written and indexed
    // whatever the split: finite values, so their zero weights add nothing) and their scores are masked.
    const SplitStages::WarpTiles tiles = st.warp_tiles(s, split, warp);
    const int stage_pos = tiles.pos, stage_end = tiles.end, tile_end = tiles.tile_end;
    int tile = tiles.tile;
    if (tile >= tile_end) continue;  // nothing for this warp in this stage
    StageRow at = stage_row(tile * kTileKeys + lane_row, page_size);  // the lane's first row of the tile
    StageRow tile_at = stage_row(tile * kTileKeys, page_size);        // the tile's first row (no division per tile)
    float2 cs[4] = {{1.0f, 0.0f}, {1.0f, 0.0f}, {1.0f, 0.0f}, {1.0f, 0.0f}};  // the lane's 4 pairs at its current row
    if (kv.rotate_keys) {
      const int pos = stage_pos + tile * kTileKeys + lane_row;
      const float2* angles = kv.rope + static_cast<int64_t>(pos < split.key_end ? pos : split.key_begin) * (D / 2) + column * 4;
#pragma unroll
      for (int p = 0; p < 4; ++p) cs[p] = __ldg(angles + p);
    }
    // The lane's rows of the tile at tile_pos, from row `at` on, each decoded by decode_row(decode, page, page_row,
    // c, x) (decode: the RowDecode as a type; elements [c, c + 8) of the row, without outliers) and rounded into
    // warp_tile; returns the row after them. The passes of decode_chunk8 (a switch over every format) stay rolled:
    // unrolled (8 copies of the switch per operand at head_dim 128), q4_0 and fp8 pages took 0.57 and 0.64 ms
    // instead of 0.32 at llama3-8b 16 x 8192 (H100).
    // Where the blocks keep outliers, the tile's slots are spread over the lanes (a slot per lane, ~10 per tile at
    // 1%), and patch(decode, page, page_row, column, tile_row, slot, other) makes each one's TilePatch (other: for
    // keys (kPairs), the slot of the pair's other element where it is an outlier too, else the slot itself),
    // stored over the decoded tile; instead of every lane looking for its chunk's slots on every row. For the
    // packed decodes, where the tile lies in one page and its slots are one round (pages of 16 rows or a multiple,
    // up to 32 slots), the patches are made before the decode, so that their loads (a key's RoPE
    // angle, from global memory) wait under it; else after it, page by page (the generic decode keeps its
    // registers: with early patches q4_0 and fp8 pages, which have no slots, took 2-3% longer at llama3-8b).
    // layout, blocks: the staged K (0) or V (key_bytes) blocks.
    const auto fill_tile = [&](int tile_pos, const PageBlockLayout& layout, int blocks, auto pairs, auto&& decode_row,
                               auto&& patch) {
      constexpr bool kPairs = decltype(pairs)::value;
      StageRow r = at;
      const int tile_first = tile_pos - stage_pos;  // the tile's rows [tile_first, tile_first + kTileKeys) of the stage,
                                                    // from row tile_at.row of staged page tile_at.page
      with_row_decode(row_decode, [&](auto decode) {
        // The patch of slot at_slot of a range of n_range (first_round: the lanes holding its first 32) in the
        // staged block of page `page`; offset -1 where its key is outside [key_begin, stage_end).
        const auto slot_patch = [&](int page, const uint32_t* slots, int n_slots, int at_slot, int n_range,
                                    unsigned first_round) {
          const uint32_t slot = slots[at_slot];
          // The other element of a key's RoPE pair (channels 2j, 2j + 1).
          const uint32_t other = kPairs ? partner_slot<D>(slots, n_slots, at_slot, n_range, first_round, lane) : slot;
          const int page_row = static_cast<int>(slot_index(slot)) / D, column_of_slot = static_cast<int>(slot_index(slot)) % D;
          const int tile_row = page * page_size + page_row - tile_first, pos = tile_pos + tile_row;
          return pos >= split.key_begin && pos < stage_end ? patch(decode, page, page_row, column_of_slot, tile_row, slot, other)
                                                           : TilePatch{-1};
        };
        const auto store_patch = [&](TilePatch p) {
          if (p.offset < 0) return;
          if constexpr (kPairs) {
            rotate_pair(p.x0, p.x1, p.angle);
            *reinterpret_cast<uint32_t*>(warp_tile + p.offset) = half2_bits(p.x0, p.x1);
          } else {
            warp_tile[p.offset] = __float2half_rn(p.x0);
          }
        };
        // The slot range of the tile's rows in staged page `page`.
        const auto page_slots = [&](int page, const uint32_t*& slots, int& n_slots) {
          const int row_begin = max(0, tile_first - page * page_size);
          const int row_end = min(page_size, tile_first + kTileKeys - page * page_size);
          const uint8_t* block = stage + page * shape.pair_bytes + blocks;
          slots = outlier_slots(layout, block);
          n_slots = static_cast<int>(outlier_count(layout, block));
          return tile_slot_range(slots, n_slots, row_begin * D, row_end * D, lane);
        };
        TilePatch early{-1};
        bool patched_early = false;
        if (decltype(decode)::value != RowDecode::generic && layout.outlier_capacity > 0 &&
            tile_at.row + kTileKeys <= page_size) {
          const int page = tile_at.page;
          const uint32_t* slots;
          int n_slots;
          const int2 range = page_slots(page, slots, n_slots);
          const int n_range = range.y - range.x;
          if (n_range <= 32) {
            patched_early = true;
            const unsigned first_round = __ballot_sync(0xffffffffu, lane < n_range);  // lanes holding a slot
            if (lane < n_range) early = slot_patch(page, slots, n_slots, range.x + lane, n_range, first_round);
          }
        }
#pragma unroll(decltype(decode)::value == RowDecode::generic ? 1 : Tile::kPasses)
        for (int i = 0; i < Tile::kPasses; ++i) {
          const int tile_row = lane_row + i * Tile::kRowStep, pos = tile_pos + tile_row;
          const bool valid = pos >= split.key_begin && pos < stage_end;
          float x[8];
          decode_row(decode, valid ? r.page : 0, valid ? r.row : 0, c0, x);
          store_half8(warp_tile + tile_offset<D, kTileKeys>(tile_row, c0), x);
          advance(r, Tile::kRowStep, page_size);
        }
        if (layout.outlier_capacity == 0) return;
        __syncwarp();  // the decoded chunks are stored before the patches overwrite some of them
        if (patched_early) {
          store_patch(early);
          return;
        }
        // The staged pages the tile's rows fall in.
        for (int page = tile_at.page; page < stage_pages && page * page_size < tile_first + kTileKeys; ++page) {
          const uint32_t* slots;
          int n_slots;
          const int2 range = page_slots(page, slots, n_slots);
          const int n_range = range.y - range.x;
          const unsigned first_round = __ballot_sync(0xffffffffu, lane < n_range);  // lanes holding a slot
          for (int at_slot = range.x + lane; at_slot < range.y; at_slot += 32) {
            store_patch(slot_patch(page, slots, n_slots, at_slot, n_range, first_round));
          }
        }
      });
      return r;
    };
    for (; tile < tile_end; ++tile) {
      const int tile_pos = stage_pos + tile * kTileKeys;
      // Keys: decoded, rotated and rounded into the tile.
      const auto decode_key = [&](auto decode, int page, int page_row, int c, float (&k)[8]) {
        decode_key8<D, kBits, decltype(decode)::value>(key_layout, stage + page * shape.pair_bytes, page_row, c,
                                                    key_calib, key_centres, key_lo, key_span, k);
      };
      // Element `column` of key row page_row without its outlier, as decode_key gives it: the packed decodes
      // take that element's code alone, the others decode its chunk.
      const auto decode_key_element = [&](auto decode, int page, int page_row, int column) {
        if constexpr (decltype(decode)::value == RowDecode::generic) {
          float k[8];
          decode_key(decode, page, page_row, column / 8 * 8, k);
          float x = k[0];
#pragma unroll
          for (int j = 1; j < 8; ++j) {  // constant indices keep k in registers
            if (column % 8 == j) x = k[j];
          }
          return x;
        } else {
          const uint32_t codes = row_codes8<D, kBits>(key_layout, stage + page * shape.pair_bytes, page_row, column / 8 * 8);
          return decode_packed1<decltype(decode)::value == RowDecode::codebook>(
              (codes >> (kBits * (column % 8))) & ((1u << kBits) - 1), key_centres, key_lo[column], key_span[column]);
        }
      };
      // A key outlier changes its RoPE pair: the lane takes the pair's other element (its slot's value where it
      // is an outlier too, else decoded) and the angle of the key's position (from the table); the pair, rotated,
      // is stored over the tile's (lanes with slots in the same pair store the same halves).
      const auto patch_key = [&](auto decode, int page, int page_row, int column_of_slot, int tile_row, uint32_t slot,
                                 uint32_t other) {
        const float other_value =
            other != slot ? slot_value(other) : decode_key_element(decode, page, page_row, column_of_slot ^ 1);
        const float2 angle = kv.rotate_keys ? __ldg(kv.rope + static_cast<int64_t>(tile_pos + tile_row) * (D / 2) + column_of_slot / 2)
                                            : float2{1.0f, 0.0f};
        return TilePatch{tile_offset<D, kTileKeys>(tile_row, column_of_slot / 2 * 2),
                         column_of_slot % 2 ? other_value : slot_value(slot),
                         column_of_slot % 2 ? slot_value(slot) : other_value, angle};
      };
      fill_tile(tile_pos, key_layout, 0, std::true_type{},
                [&](auto decode, int page, int page_row, int c, float (&k)[8]) {
                  decode_key(decode, page, page_row, c, k);
                  rotate8(cs, k);
                  step_angles(cs, step);
                },
                patch_key);
      __syncwarp();  // the tile's keys are stored

      // S^T (keys x heads): score[0..1] of key lane / 4, score[2..3] of key lane / 4 + 8, heads 2 (lane % 4) + {0, 1}.
      float score[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int kt = 0; kt < kDimTiles; ++kt) {
        uint32_t a[4];
        ldmatrix_x4(a, warp_tile + tile_offset<D, kTileKeys>(lane % 16, 16 * kt + 8 * (lane / 16)));
        mma_m16n8k16(score, a, q[kt]);
      }
      __syncwarp();  // every lane has read the keys: the values may take their place

      const int key = tile_pos + lane / 4;
      uint32_t p[2];
      tile_softmax<kDimTiles>(score, key >= split.key_begin && key < stage_end,
                              key + 8 >= split.key_begin && key + 8 < stage_end, scale_log2, running_max, running_sum,
                              out, p);

      // Values: decoded and rounded into the tile (the same rows as the keys); an outlier is its slot's half.
      at = fill_tile(
          tile_pos, value_layout, key_bytes, std::false_type{},
          [&](auto decode, int page, int page_row, int c, float (&v)[8]) {
            decode_value8<D, kBits, decltype(decode)::value>(value_layout, stage + page * shape.pair_bytes + key_bytes,
                                                          page_row, c, value_calib, value_centres, v);
          },
          [&](auto, int, int, int column_of_slot, int tile_row, uint32_t slot, uint32_t) {
            return TilePatch{tile_offset<D, kTileKeys>(tile_row, column_of_slot), slot_value(slot)};
          });
      __syncwarp();  // the tile's values are stored

      // O^T (dims x heads) += V^T (dims x keys) P (keys x heads).
#pragma unroll
      for (int mt = 0; mt < kDimTiles; ++mt) {
        uint32_t a[4];
        ldmatrix_x4_trans(a, warp_tile + tile_offset<D, kTileKeys>(lane % 8 + 8 * (lane / 16), 16 * mt + 8 * (lane / 8 % 2)));
        mma_m16n8k16(out[mt], a, p);
      }
      __syncwarp();  // every lane has read the values: the next tile's keys may take their place
      advance(tile_at, kTileKeys, page_size);
    }
  }
  merge_page_split<D>(smem, running_max, running_sum, out,
                      [&](int mt, int upper) { return 16 * mt + 8 * upper + lane / 4; }, group, kv_head, split_index,
                      query.n_heads, ws);
}

// ---- page_fragment_kernel ----
//
// The packed formats with calibrated key ranges (int, nuq without --kscale page) on pre-RoPE keys, pages of a
// multiple of 16 rows: each lane decodes its elements straight into its mma fragments, without the tile in
// shared memory, its stores, ldmatrix and per-row bookkeeping. An mma's k index (and O^T's rows) may take any
// order of dims as long as both operands (and the merge) agree, so a lane (lane = 4 g + t) takes runs of
// consecutive dims:
//   - keys, S^T = K Q^T: rows g and g + 8 of the tile, dims [t D / 4, (t + 1) D / 4); k-step kt holds dims
//     fragment_key_dim + {0, 1} in a[0], a[1] and + {2, 3} in a[2], a[3] (whole RoPE pairs), Q loaded in the
//     same order;
//   - values, O^T += V^T P: keys 2t, 2t + 1, 2t + 8, 2t + 9 (P's rows as movmatrix gives them), dims
//     [g D / 8, (g + 1) D / 8); m-tile mt holds dims fragment_value_dim (its row g) and + 1 (row g + 8).
// RoPE: a key at tile row j of a tile at position base scores q . R(base + j) k = (R(base)^T q) . (R(j) k), so
// the lane rotates its pre-RoPE keys by the angles of position j (the same few rows of the table for every
// tile, cached) and the warp's Q once per tile by -base: reading each key's own angles took more bytes of the
// table than the page's codes (call 1, 2026-11-28). The fp16 operands are R(j) k and R(base)^T q, rounded.
// Key codes decode through a per-channel table (lo + (centre + 1) span, or lo + code step, for every code: the
// FFMA of decode_packed1, done once), padded so that the 4 lanes reading different channels' entries at once
// touch different banks; value codes through the codebook's centre + 1 (static shared arrays, so a lookup is
// one load at the code's offset plus a constant).
// Outliers go in through a second mma on a per-warp Δ tile (fp16, zero elsewhere): for each of the tile's slots
// (spread over the lanes, found by warp ballots as in page_split_kernel) the exact element minus the decoded one
// (keys: the rotated RoPE pair, so that the score sees the pair rotated with its outlier), stored at the column
// of the dim's k (keys) or m (values) position, and cleared after the mma.

__host__ __device__ constexpr int gcd_of(int a, int b) { return b == 0 ? a : gcd_of(b, a % b); }

// The per-channel key table: channel c's 2^kBits entries at index(c, 0) on, each t block of D / 4 channels (a
// lane's run) kPad floats after the last, so that the 4 t lanes' entries for the same code fall in different
// banks at 2 and 3 bits; at 4 bits t blocks t and t + 2 share banks (16 entries a channel).
template <int D, int kBits>
struct KeyTable {
  static constexpr int kCodes = 1 << kBits;
  static constexpr int kPad = kBits == 4 ? 16 : 8;  // floats; a multiple of kCodes: the code bits stay free
  static constexpr int kBlockFloats = D / 4 * kCodes + kPad;
  static constexpr int kFloats = 4 * kBlockFloats;
  __device__ static constexpr int index(int c, int code) { return c / (D / 4) * kBlockFloats + c % (D / 4) * kCodes + code; }
};

// A float of shared memory at a shared-window address (__cvta_generic_to_shared); a constant added to the
// address folds into the load's immediate. Neither volatile nor clobbering memory: the tables it reads are
// written once before the first stage's barrier, and every address depends on codes loaded after it.
__device__ __forceinline__ float ld_shared_f32(uint32_t address) {
  float x;
  asm("ld.shared.f32 %0, [%1];" : "=f"(x) : "r"(address));
  return x;
}

// The entry of a table of floats (shared) for the code in bits [shift, shift + kBits) of w (or, past 32 - kBits,
// of w and next), `offset` bytes past the code's entry in the table at shared address `table` (its code bits,
// 2 .. kBits + 1, zero): the address is one shift and one LOP3 away from the codes, and the load takes the
// offset (a constant) as its immediate.
template <int kBits>
__device__ __forceinline__ float table_entry(uint32_t table, int offset, uint32_t w, uint32_t next, int shift) {
  constexpr uint32_t kMask = ((1u << kBits) - 1) << 2;
  const uint32_t bits = shift + kBits <= 32 ? (shift >= 2 ? w >> (shift - 2) : w << (2 - shift)) : __funnelshift_r(w, next, shift - 2);
  return ld_shared_f32(((bits & kMask) | table) + offset);
}

// A run of kCodes codes of one row of a block (head_dim D), from element c0 on, as little-endian 32-bit words
// (code i in bits [i kBits, i kBits + kBits)), loaded in kUnit-byte pieces: the largest power of two (up to 16)
// dividing both the run's bytes and the row's, so every load is aligned whatever the row and the lane's c0 (a
// multiple of kCodes).
template <int D, int kBits, int kCodes>
struct CodeRun {
  static constexpr int kBytes = kCodes * kBits / 8;
  static constexpr int kRowBytes = D * kBits / 8;
  static constexpr int kAlign = gcd_of(kBytes, kRowBytes);
  static constexpr int kUnit = kAlign % 16 == 0 ? 16 : kAlign % 8 == 0 ? 8 : kAlign % 4 == 0 ? 4 : kAlign % 2 == 0 ? 2 : 1;
  static constexpr int kWords = (kBytes + 3) / 4;
  uint32_t w[kWords];

  __device__ __forceinline__ void load(const uint8_t* codes, int row, int c0) {
    const uint8_t* p = codes + row * kRowBytes + c0 * kBits / 8;
    if constexpr (kUnit >= 4) {
#pragma unroll
      for (int u = 0; u < kBytes / kUnit; ++u) {
        if constexpr (kUnit == 16) {
          const uint4 x = reinterpret_cast<const uint4*>(p)[u];
          w[4 * u] = x.x, w[4 * u + 1] = x.y, w[4 * u + 2] = x.z, w[4 * u + 3] = x.w;
        } else if constexpr (kUnit == 8) {
          const uint2 x = reinterpret_cast<const uint2*>(p)[u];
          w[2 * u] = x.x, w[2 * u + 1] = x.y;
        } else {
          w[u] = reinterpret_cast<const uint32_t*>(p)[u];
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < kWords; ++i) w[i] = 0;
#pragma unroll
      for (int u = 0; u < kBytes / kUnit; ++u) {
        const uint32_t x = kUnit == 2 ? reinterpret_cast<const uint16_t*>(p)[u] : p[u];
        w[u * kUnit / 4] |= x << (u * kUnit % 4 * 8);
      }
    }
  }
  // The entry of code i (a compile-time constant once unrolled: the word and shift fold) in a table at shared
  // address `table` (table_entry), `offset` bytes further.
  __device__ __forceinline__ float entry(uint32_t table, int i, int offset = 0) const {
    const int bit = i * kBits, word = bit / 32;
    return table_entry<kBits>(table, offset, w[word], w[min(word + 1, kWords - 1)], bit % 32);
  }
};

// The fragments' dims (the section comment): key k-step kt of lane t, value m-tile mt of lane g.
template <int D>
__device__ __forceinline__ int fragment_key_dim(int t, int kt) {
  return t * (D / 4) + 4 * kt;
}
template <int D>
__device__ __forceinline__ int fragment_value_dim(int g, int mt) {
  return g * (D / 8) + 2 * mt;
}
// The Δ tile's column of dim d: the k index of the keys' fragments (ldmatrix_x4), the m index of the values'
// (ldmatrix_x4_trans).
template <int D>
__device__ __forceinline__ int key_tile_column(int d) {
  const int t = d / (D / 4), kt = d % (D / 4) / 4, r = d % 4;
  return 16 * kt + 2 * t + (r < 2 ? r : 6 + r);
}
template <int D>
__device__ __forceinline__ int value_tile_column(int d) {
  const int g = d / (D / 8), rem = d % (D / 8);
  return 16 * (rem / 2) + g + 8 * (rem % 2);
}

// The angle table's float of (cos, sin) of dims (d, d + 1) (d even) at tile row `row` (page_fragment_kernel's
// s_row_angles).
template <int D>
constexpr int kAngleRowFloats = 4 * (D / 4 + 4);
template <int D>
__device__ __forceinline__ int row_angle_index(int row, int d) {
  return row * kAngleRowFloats<D> + d / (D / 4) * (D / 4 + 4) + d % (D / 4);
}

// The patches of a tile's outlier slots: for each slot of the tile's rows [row_begin, row_begin + kTileKeys) of
// a staged block (spread over the lanes), patch(slot, other, page_row, d, tile_row) with `other` the slot of the
// RoPE partner (d ^ 1) where that is an outlier too, else the slot itself (kPairs; found as page_split_kernel
// finds it). Every lane calls it; returns whether the tile has slots (the same on every lane).
template <int D, bool kPairs, typename Patch>
__device__ __forceinline__ bool for_tile_slots(const PageBlockLayout& layout, const uint8_t* block, int row_begin,
                                               int lane, Patch&& patch) {
  const uint32_t* slots = outlier_slots(layout, block);
  const int n_slots = static_cast<int>(outlier_count(layout, block));
  const int2 range = tile_slot_range(slots, n_slots, row_begin * D, (row_begin + kTileKeys) * D, lane);
  const int n_range = range.y - range.x;
  const unsigned first_round = __ballot_sync(0xffffffffu, lane < n_range);  // lanes holding a slot
  for (int at = range.x + lane; at < range.y; at += 32) {
    const uint32_t slot = slots[at];
    const uint32_t other = kPairs ? partner_slot<D>(slots, n_slots, at, n_range, first_round, lane) : slot;
    const int page_row = static_cast<int>(slot_index(slot)) / D;
    patch(slot, other, page_row, static_cast<int>(slot_index(slot)) % D, page_row - row_begin);
  }
  return n_range > 0;
}

// An outlier's entry of the Δ tile: the exact operand minus the decoded one (both fp16), clamped to fp16's
// range (a difference of halves of opposite signs can pass it). The tile's sum with the decoded operand is the
// exact one to half an ulp of Δ (an ulp of the outlier where the two have opposite signs), not always to the bit.
__device__ __forceinline__ float delta_of(__half exact, __half decoded) {
  return fminf(fmaxf(__half2float(exact) - __half2float(decoded), -65504.0f), 65504.0f);
}

// Zeroes the Δ tile's entries a warp's patches wrote: one per lane (its offset, -1 for none) where the tile had
// at most 32 slots, else the whole tile.
template <int D>
__device__ __forceinline__ void clear_delta_tile(__half* tile, bool many, int offset, int lane) {
  if (many) {
    for (int i = lane; i < kTileKeys * D / 8; i += 32) reinterpret_cast<uint4*>(tile)[i] = make_uint4(0, 0, 0, 0);
  } else if (offset >= 0) {
    *reinterpret_cast<uint32_t*>(tile + (offset & ~1)) = 0u;
  }
}

// After a tile's patches (any: the tile has slots; many: a lane patched more than once): the Δ tile's mma
// (`mma` reads it), then the entries cleared for the next patches. Every lane calls it.
template <int D, typename Mma>
__device__ __forceinline__ void apply_delta_tile(__half* delta, bool any, bool many, int patched, int lane, Mma&& mma) {
  if (!any) return;
  __syncwarp();  // the patches are stored
  mma();
  __syncwarp();  // every lane has read the tile
  clear_delta_tile<D>(delta, __any_sync(0xffffffffu, many), patched, lane);
  __syncwarp();  // cleared before the next patches
}

// The fragment kernel's resident blocks per multiprocessor compiled for: head_dim 64 in 96 registers (5 blocks;
// 8-24 bytes of spills, ptxas, nvcc 13.0), head_dim 128 in 168 (3; at 4 blocks, 128 registers, it spilled 64-72
// bytes).
template <int D>
constexpr int kFragmentMinBlocks = D <= 64 ? 5 : 3;

// The formats page_fragment_kernel serves (with calibrated, pre-RoPE keys: int and nuq always have them): int
// and nuq without --kscale page, in pages of whole 16-key tiles.
bool fragment_scheme(KvScheme scheme, bool per_page_key_ranges, int page_size) {
  return (scheme == KvScheme::uniform || scheme == KvScheme::nonuniform) && !per_page_key_ranges &&
         page_size % kTileKeys == 0;
}

// The blocks per multiprocessor the page kernel serving the pages is compiled for (the stages' budget, the
// planner's waves).
int page_kernel_blocks(bool fragments, int head_dim) {
  return head_dim <= 64 ? (fragments ? kFragmentMinBlocks<64> : PageTile<64>::kMinBlocks)
                        : (fragments ? kFragmentMinBlocks<128> : PageTile<128>::kMinBlocks);
}

template <int D, int kBits, bool kCodebook>
__global__ void __launch_bounds__(kThreads, kFragmentMinBlocks<D>)
    page_fragment_kernel(AttentionQuery query, QuantizedPagedKv kv, const AttentionChunk* rows,
                         const QuantizedSplit* splits, PageStageShape shape, DecodeWorkspace ws) {
  constexpr int kDimTiles = D / 16;  // k-steps of S^T, m-tiles of O^T
  using Table = KeyTable<D, kBits>;
  using KeyRun = CodeRun<D, kBits, D / 4>;
  using ValueRun = CodeRun<D, kBits, D / 8>;
  __shared__ __align__(64) float s_key_table[Table::kFloats];        // 64-byte aligned: table_entry's code bits
  __shared__ __align__(64) float s_value_centres[kCodebookFloats];  // centre + 1 (nuq) or the code (int)
  // (cos, sin) of the tile rows' positions 0..15 per pair (row_angle_index), each t block of D / 4 floats (a
  // lane's run) 4 floats after the last: the quarter-warp of a 16-byte load (g, g + 1 and the 4 t) then reads
  // 32 different banks.
  __shared__ __align__(16) float s_row_angles[kTileKeys * kAngleRowFloats<D>];

  const int split_index = blockIdx.x, kv_head = blockIdx.y;
  const QuantizedSplit split = splits[split_index];
  if (split.exact || split.key_begin == split.key_end) return;  // exact_split_kernel's, or padding
  const AttentionChunk row = rows[split.row];
  const int group = query.n_heads / kv.n_kv_heads;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4, t = lane % 4;
  extern __shared__ uint4 s_dynamic[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(s_dynamic);
  const PageBlockLayout& key_layout = kv.key_layout;
  const PageBlockLayout& value_layout = kv.value_layout;
  const SplitStages st = start_split_stages(kv, row, split, kv_head, shape, smem, 0);  // its tables are static
  const int page_size = st.page_size;

  // The tables (published by the first stage's barrier): decode_packed1's values, computed as it computes them.
  {
    const BlockCalibration key_calib = block_calibration(kv.calib, key_layout, kv_head);
    const BlockCalibration value_calib = block_calibration(kv.calib, value_layout, kv_head);
    for (int i = threadIdx.x; i < D * Table::kCodes; i += kThreads) {
      const int c = i / Table::kCodes, code = i % Table::kCodes;
      const float lo = key_calib.key_lo[c], hi = key_calib.key_hi[c];
      s_key_table[Table::index(c, code)] =
          __fmaf_rn(packed_x(kCodebook, key_calib.codebook, code), packed_span(kCodebook, lo, hi, kBits), lo);
    }
    if (threadIdx.x < Table::kCodes) s_value_centres[threadIdx.x] = packed_x(kCodebook, value_calib.codebook, threadIdx.x);
    for (int i = threadIdx.x; i < kTileKeys * D / 2; i += kThreads) {  // a page split means >= 16 positions
      const float2 cs = kv.rope[i];  // row i / (D / 2), pair i % (D / 2)
      *reinterpret_cast<float2*>(s_row_angles + row_angle_index<D>(i / (D / 2), i % (D / 2) * 2)) = cs;
    }
  }
  // The lane's run of the key table and the value centres, as table_entry takes them.
  const uint32_t key_table = smem_address(s_key_table + Table::index(t * (D / 4), 0));
  const uint32_t value_centres = smem_address(s_value_centres);
  __half* delta = reinterpret_cast<__half*>(smem + shape.tiles_offset) + warp * kTileKeys * D;  // (kTileKeys, D)
  clear_delta_tile<D>(delta, true, -1, lane);  // the first stage's barrier orders it before the patches

  // Q's B fragments in the keys' dim order: [0] dims fragment_key_dim + {0, 1}, [1] + {2, 3} of head g.
  uint32_t q[kDimTiles][2];
  {
    const __half* q_row = query.q + static_cast<int64_t>(row.first_row) * query.q_stride + (kv_head * group + g) * D;
#pragma unroll
    for (int kt = 0; kt < kDimTiles; ++kt) {
      const uint2 x = g < group ? *reinterpret_cast<const uint2*>(q_row + fragment_key_dim<D>(t, kt)) : make_uint2(0, 0);
      q[kt][0] = x.x, q[kt][1] = x.y;
    }
  }
  const float scale_log2 = query.scale * 1.4426950408889634f;
  float running_max[2] = {-INFINITY, -INFINITY}, running_sum[2] = {0.0f, 0.0f};
  float out[kDimTiles][4];
#pragma unroll
  for (int mt = 0; mt < kDimTiles; ++mt) out[mt][0] = out[mt][1] = out[mt][2] = out[mt][3] = 0.0f;

  for (int s = 0; s < st.n_stages; ++s) {
    st.begin(s);
    const uint8_t* stage = st.stage(s);
    // The warp's run of the stage's tiles (each within one page here).
    const SplitStages::WarpTiles tiles = st.warp_tiles(s, split, warp);
    const int stage_pos = tiles.pos, stage_end = tiles.end, tile_end = tiles.tile_end;
    int tile = tiles.tile;
    if (tile >= tile_end) continue;
    for (StageRow tile_at = stage_row(tile * kTileKeys, page_size); tile < tile_end;
         ++tile, advance(tile_at, kTileKeys, page_size)) {
      const int tile_pos = stage_pos + tile * kTileKeys;
      const uint8_t* key_block = stage + tile_at.page * shape.pair_bytes;
      const uint8_t* value_block = key_block + st.key_bytes;
      // Tile row r's block and row: rows outside [key_begin, stage_end) read the stage's first row instead
      // (staged and written whatever the split: finite values; their scores are masked, their weights zero).
      const auto valid_row = [&](int r) { return tile_pos + r >= split.key_begin && tile_pos + r < stage_end; };
      const auto staged_row = [&](int r, int kind_offset, int& block_row) {
        const bool valid = valid_row(r);
        block_row = valid ? tile_at.row + r : 0;
        return stage + (valid ? tile_at.page * shape.pair_bytes : 0) + kind_offset;
      };

      // R(tile_pos)^T Q: each pair (a, b) of the lane's fragments to (a c + b s, b c - a s), the products of s
      // rounded, then one FFMA each (the CPU twin rounds the same way).
      uint32_t q_tile[kDimTiles][2];
      {
        // (cos, sin) of the lane's pairs at tile_pos: k-step kt's two pairs are float4 kt.
        const float4* base_angles = reinterpret_cast<const float4*>(kv.rope + static_cast<int64_t>(tile_pos) * (D / 2) + t * (D / 8));
#pragma unroll
        for (int kt = 0; kt < kDimTiles; ++kt) {
          const float4 cs = __ldg(base_angles + kt);
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const float2 x = __half22float2(*reinterpret_cast<const __half2*>(&q[kt][j]));
            const float c = j ? cs.z : cs.x, sn = j ? cs.w : cs.y;
            q_tile[kt][j] = half2_bits(__fmaf_rn(x.x, c, __fmul_rn(x.y, sn)), __fmaf_rn(x.y, c, -__fmul_rn(x.x, sn)));
          }
        }
      }

      // S^T (keys x heads) = K Q^T: score[0..1] of key g, score[2..3] of key g + 8, heads 2t + {0, 1}.
      float score[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      {
        KeyRun codes[2];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          int block_row;
          const uint8_t* block = staged_row(g + 8 * u, 0, block_row);
          codes[u].load(block + key_layout.codes_offset, block_row, t * (D / 4));
        }
#pragma unroll
        for (int kt = 0; kt < kDimTiles; ++kt) {
          const int d = fragment_key_dim<D>(t, kt);
          uint32_t a[4];
#pragma unroll
          for (int u = 0; u < 2; ++u) {
            const float4 cs = *reinterpret_cast<const float4*>(s_row_angles + row_angle_index<D>(g + 8 * u, d));  // pairs d / 2, d / 2 + 1
            float k[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              k[j] = codes[u].entry(key_table, 4 * kt + j, (4 * kt + j) * Table::kCodes * 4);
            }
            const float2 r01 = rotated_pair(k[0], k[1], make_float2(cs.x, cs.y));
            const float2 r23 = rotated_pair(k[2], k[3], make_float2(cs.z, cs.w));
            a[u] = half2_bits(r01.x, r01.y);
            a[2 + u] = half2_bits(r23.x, r23.y);
          }
          mma_m16n8k16(score, a, q_tile[kt]);
        }
      }
      // Key outliers: the pair rotated with its outlier(s) minus the pair as decoded, through the Δ tile.
      if (key_layout.outlier_capacity > 0) {
        int patched = -1;
        bool many = false;
        const bool any = for_tile_slots<D, true>(
            key_layout, key_block, tile_at.row, lane,
            [&](uint32_t slot, uint32_t other, int page_row, int d, int tile_row) {
              many |= patched >= 0;
              const int pos = tile_pos + tile_row;
              if (pos < split.key_begin || pos >= stage_end) return;
              const int d0 = d & ~1;
              const uint32_t codes = row_codes8<D, kBits>(key_layout, key_block, page_row, d0 / 8 * 8);
              float decoded[2];
#pragma unroll
              for (int e = 0; e < 2; ++e) {
                decoded[e] = s_key_table[Table::index(d0 + e, (codes >> (kBits * (d0 % 8 + e))) & (Table::kCodes - 1))];
              }
              // The pair with its outlier(s): the slot's element, and the partner's slot where it has one.
              const float own = slot_value(slot), partner = other != slot ? slot_value(other) : d & 1 ? decoded[0] : decoded[1];
              const float exact0 = d & 1 ? partner : own, exact1 = d & 1 ? own : partner;
              const float2 cs = *reinterpret_cast<const float2*>(s_row_angles + row_angle_index<D>(tile_row, d0));
              const float2 rd = rotated_pair(decoded[0], decoded[1], cs), rx = rotated_pair(exact0, exact1, cs);
              patched = tile_offset<D, kTileKeys>(tile_row, key_tile_column<D>(d0));
              const __half2 exact = __floats2half2_rn(rx.x, rx.y), decoded_pair = __floats2half2_rn(rd.x, rd.y);
              *reinterpret_cast<uint32_t*>(delta + patched) =
                  half2_bits(delta_of(exact.x, decoded_pair.x), delta_of(exact.y, decoded_pair.y));
            });
        apply_delta_tile<D>(delta, any, many, patched, lane, [&] {
#pragma unroll
          for (int kt = 0; kt < kDimTiles; ++kt) {
            uint32_t a[4];
            ldmatrix_x4(a, delta + tile_offset<D, kTileKeys>(lane % 16, 16 * kt + 8 * (lane / 16)));
            mma_m16n8k16(score, a, q_tile[kt]);
          }
        });
      }

      uint32_t p[2];
      tile_softmax<kDimTiles>(score, valid_row(g), valid_row(g + 8), scale_log2, running_max, running_sum, out, p);

      // O^T (dims x heads) += V^T P: keys 2t + {0, 1} and 2t + 8 + {0, 1}.
      {
        ValueRun codes[4];
        float2 range[4];  // (lo, span) of each key's row
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          int block_row;
          const uint8_t* block = staged_row(2 * t + (u & 1) + 8 * (u >> 1), st.key_bytes, block_row);
          codes[u].load(block + value_layout.codes_offset, block_row, g * (D / 8));
          range[u] = value_row_range<kBits, kCodebook>(value_layout, block, block_row);
        }
#pragma unroll
        for (int mt = 0; mt < kDimTiles; ++mt) {
          float v[4][2];
#pragma unroll
          for (int u = 0; u < 4; ++u) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              v[u][e] = __fmaf_rn(codes[u].entry(value_centres, 2 * mt + e), range[u].y, range[u].x);
            }
          }
          const uint32_t a[4] = {half2_bits(v[0][0], v[1][0]), half2_bits(v[0][1], v[1][1]),
                                 half2_bits(v[2][0], v[3][0]), half2_bits(v[2][1], v[3][1])};
          mma_m16n8k16(out[mt], a, p);
        }
      }
      // Value outliers: the slot's half minus the decoded element, through the Δ tile.
      if (value_layout.outlier_capacity > 0) {
        int patched = -1;
        bool many = false;
        const bool any = for_tile_slots<D, false>(
            value_layout, value_block, tile_at.row, lane, [&](uint32_t slot, uint32_t, int page_row, int d, int tile_row) {
              many |= patched >= 0;
              const int pos = tile_pos + tile_row;
              if (pos < split.key_begin || pos >= stage_end) return;
              const float2 range = value_row_range<kBits, kCodebook>(value_layout, value_block, page_row);
              const uint32_t codes = row_codes8<D, kBits>(value_layout, value_block, page_row, d / 8 * 8);
              const float decoded =
                  __fmaf_rn(s_value_centres[(codes >> (kBits * (d % 8))) & (Table::kCodes - 1)], range.y, range.x);
              patched = tile_offset<D, kTileKeys>(tile_row, value_tile_column<D>(d));
              delta[patched] = __float2half_rn(delta_of(__ushort_as_half(static_cast<uint16_t>(slot >> 16)),
                                                        __float2half_rn(decoded)));
            });
        apply_delta_tile<D>(delta, any, many, patched, lane, [&] {
#pragma unroll
          for (int mt = 0; mt < kDimTiles; ++mt) {
            uint32_t a[4];
            ldmatrix_x4_trans(a, delta + tile_offset<D, kTileKeys>(lane % 8 + 8 * (lane / 16), 16 * mt + 8 * (lane / 8 % 2)));
            mma_m16n8k16(out[mt], a, p);
          }
        });
      }
    }
  }
  merge_page_split<D>(smem, running_max, running_sum, out,
                      [&](int mt, int upper) { return fragment_value_dim<D>(g, mt) + upper; }, group, kv_head,
                      split_index, query.n_heads, ws);
}

// ---- exact_split_kernel ----

template <int D, int kMaxGroup>
__global__ void __launch_bounds__(kThreads)
    exact_split_kernel(AttentionQuery query, QuantizedPagedKv kv, const AttentionChunk* rows, const ExactSource* sources,
                       const QuantizedSplit* splits, DecodeWorkspace ws) {
  constexpr int kLanes = D / 8;  // lanes per key row
  constexpr int kKeyGroups = kThreads / kLanes;
  __shared__ float s_merge[kSplitMergeFloats<D, kMaxGroup, kKeyGroups>];

  const int split_index = blockIdx.x;
  const int kv_head = blockIdx.y;
  const QuantizedSplit split = splits[split_index];
  if (!split.exact || split.key_begin == split.key_end) return;  // page_split_kernel's, or padding
  const AttentionChunk row = rows[split.row];
  const ExactSource source = sources[split.row];
  const int group = query.n_heads / kv.n_kv_heads;
  const auto [sub, c0, key_group] = lane_place<D>();

  float q[kMaxGroup][8];
  load_scaled_query<D, kMaxGroup>(query, row, kv_head, group, c0, q);
  float m[kMaxGroup], l[kMaxGroup], acc[kMaxGroup][8];
  init_running_softmax<kMaxGroup>(m, l, acc);

  // The loop bound is uniform over the block: the shuffles need every lane.
  for (int base = split.key_begin; base < split.key_end; base += kKeyGroups) {
    const int pos = base + key_group;
    const bool valid = pos < split.key_end;
    float k[8] = {}, v[8] = {};
    if (valid) {
      half8_to_float(*reinterpret_cast<const uint4*>(exact_kv_row(kv, source, 0, kv_head, D, pos) + c0), k);
      half8_to_float(*reinterpret_cast<const uint4*>(exact_kv_row(kv, source, 1, kv_head, D, pos) + c0), v);
      if (kv.rotate_keys) {
        const float2* angles = kv.rope + static_cast<int64_t>(pos) * (D / 2) + sub * 4;
        float2 cs[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) cs[j] = __ldg(angles + j);
        rotate8(cs, k);
      }
    }
    accumulate_key<kLanes, kMaxGroup>(q, k, v, valid, group, m, l, acc);
  }
  write_split_partial<D, kMaxGroup, kKeyGroups, kThreads>(m, l, acc, s_merge, key_group, sub, group, kv_head,
                                                          split_index, query.n_heads, ws);
}

int group_bucket(int group) { return group <= 1 ? 1 : group <= 4 ? 4 : group <= 8 ? 8 : 0; }

// Rows per page stage (pages_per_stage = ceil(kStageRows / page_size), fewer where the blocks are large): 2
// tiles per warp between the stage barriers; page 16, nuq3-1%, head_dim 64: 7.4 KB a stage.
constexpr int kStageRows = 128;
constexpr int kMaxSharedBytes = 227 * 1024;         // per block, H100
constexpr int kSharedBytesPerSm = 228 * 1024;       // H100
constexpr int kReservedSharedBytesPerBlock = 1024;  // the runtime's share of each resident block

// calib_bytes: the calibration region before the stages (page_split_kernel's kCalibBytes; page_fragment_kernel keeps
// its tables in static shared memory: 0); static_bytes: the kernel's static shared memory, which the dynamic part
// shares the block's and the multiprocessor's budget with; min_blocks: the blocks per multiprocessor it is
// compiled for.
template <int D>
PageStageShape page_stage_shape(const QuantizedPagedKv& kv, int calib_bytes, int static_bytes, int min_blocks) {
  const PageBlockLayout& key = kv.key_layout;
  const PageBlockLayout& value = kv.value_layout;
  if (key.block_bytes % 16 != 0 || value.block_bytes % 16 != 0) {
    fail("quantized attention: blocks of {} and {} bytes (multiples of 16 expected)", key.block_bytes, value.block_bytes);
  }
  auto shape_for = [&](int pages_per_stage) {
    PageStageShape shape;
    shape.pages_per_stage = pages_per_stage;
    shape.pair_bytes = key.block_bytes + value.block_bytes;
    shape.stage_bytes = shape.pages_per_stage * shape.pair_bytes;
    shape.tiles_offset = (calib_bytes + kStages * shape.stage_bytes + 127) / 128 * 128;
    const int tiles_end = shape.tiles_offset + kWarps * kTileKeys * D * static_cast<int>(sizeof(__half));
    shape.barriers_offset = (std::max(tiles_end, kSplitMergeFloats<D, kMmaHeads, kWarps> * 4) + 7) / 8 * 8;
    shape.smem_bytes = shape.barriers_offset + kStages * static_cast<int>(sizeof(uint64_t));
    return shape;
  };
  // Fewer pages per stage where the blocks are large (fp8, q8_0: a stage of 128 rows at head_dim 128 left room
  // for one block per multiprocessor), down to one page.
  const int block_budget = kSharedBytesPerSm / min_blocks - kReservedSharedBytesPerBlock - static_bytes;
  int pages_per_stage = std::max(1, (kStageRows + key.page_size - 1) / key.page_size);
  while (pages_per_stage > 1 && shape_for(pages_per_stage).smem_bytes > block_budget) --pages_per_stage;
  const PageStageShape shape = shape_for(pages_per_stage);
  if (shape.smem_bytes + static_bytes > kMaxSharedBytes) {
    fail("quantized attention: pages of {} rows need {} bytes of shared memory per block (at most {})", key.page_size,
         shape.smem_bytes + static_bytes, kMaxSharedBytes);
  }
  return shape;
}

template <int D, int kBits>
void launch_page_kernel(const AttentionQuery& query, const QuantizedPagedKv& kv, const AttentionChunk* rows,
                        const QuantizedSplit* splits, int32_t n_splits, DecodeWorkspace ws, cudaStream_t stream) {
  const bool fragments = quantized_fragment_pages(kv), codebook = kv.key_layout.scheme == KvScheme::nonuniform;
  auto* kernel = !fragments ? page_split_kernel<D, kBits>
                 : codebook ? page_fragment_kernel<D, kBits, true>
                            : page_fragment_kernel<D, kBits, false>;
  cudaFuncAttributes attributes;
  CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  const PageStageShape shape = page_stage_shape<D>(kv, fragments ? 0 : kCalibBytes<D>,
                                                   static_cast<int>(attributes.sharedSizeBytes),
                                                   page_kernel_blocks(fragments, D));
  if (shape.smem_bytes > 48 * 1024 - static_cast<int>(attributes.sharedSizeBytes)) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shape.smem_bytes));
  }
  kernel<<<dim3(n_splits, kv.n_kv_heads), kThreads, shape.smem_bytes, stream>>>(query, kv, rows, splits, shape, ws);
  CUDA_CHECK_LAUNCH(stream, fragments ? "page_fragment_kernel" : "page_split_kernel");
}

template <int D, int kMaxGroup>
void launch_exact_kernel(const AttentionQuery& query, const QuantizedPagedKv& kv, const AttentionChunk* rows,
                         const ExactSource* sources, const QuantizedSplit* splits, int32_t n_splits, DecodeWorkspace ws,
                         cudaStream_t stream) {
  exact_split_kernel<D, kMaxGroup><<<dim3(n_splits, kv.n_kv_heads), kThreads, 0, stream>>>(query, kv, rows, sources,
                                                                                           splits, ws);
  CUDA_CHECK_LAUNCH(stream, "exact_split_kernel");
}

// The page and exact split kernels over the same splits; each block of either kernel returns at once on
// the other's splits. The page kernel is compiled per code width (its decode), the exact one per group
// bucket (its per-lane query and accumulator arrays).
template <int D>
void launch_head_dim(int bucket, int bits, const AttentionQuery& query, const QuantizedPagedKv& kv,
                     const AttentionChunk* rows, const ExactSource* sources, const QuantizedSplit* splits,
                     int32_t n_splits, DecodeWorkspace ws, cudaStream_t stream, cudaStream_t exact_stream) {
  switch (bits) {
    case 2: launch_page_kernel<D, 2>(query, kv, rows, splits, n_splits, ws, stream); break;
    case 3: launch_page_kernel<D, 3>(query, kv, rows, splits, n_splits, ws, stream); break;
    case 4: launch_page_kernel<D, 4>(query, kv, rows, splits, n_splits, ws, stream); break;
    default: fail("quantized attention: {}-bit codes are not supported", bits);
  }
  switch (bucket) {
    case 1: return launch_exact_kernel<D, 1>(query, kv, rows, sources, splits, n_splits, ws, exact_stream);
    case 4: return launch_exact_kernel<D, 4>(query, kv, rows, sources, splits, n_splits, ws, exact_stream);
    case 8: return launch_exact_kernel<D, 8>(query, kv, rows, sources, splits, n_splits, ws, exact_stream);
    default: fail("quantized attention: unsupported group bucket {}", bucket);
  }
}

}  // namespace

int quantized_bits_bucket(const PageBlockLayout& layout) {
  const bool packed = layout.scheme == KvScheme::uniform || layout.scheme == KvScheme::nonuniform ||
                      layout.scheme == KvScheme::kivi;
  return packed ? layout.bits : 4;
}

bool quantized_fragment_pages(const QuantizedPagedKv& kv) {
  return fragment_scheme(kv.key_layout.scheme, kv.key_layout.per_page_key_ranges, kv.key_layout.page_size) &&
         kv.value_layout.scheme == kv.key_layout.scheme && kv.calib.key_lo != nullptr && kv.rotate_keys;
}

bool quantized_attention_supported(int head_dim, int group) {
  return (head_dim == 64 || head_dim == 128) && group_bucket(group) > 0;
}

int64_t quantized_attention_workspace_bytes(int32_t n_splits, int n_heads, int head_dim) {
  return decode_workspace_bytes(n_splits, n_heads, head_dim);
}

namespace {

// A query row's keys by source (the rule of CpuBackend::attention): sinks [0, n_sinks) and [exact_from, n_keys)
// exactly, the keys between from the pages.
struct RowKeyRanges {
  int64_t n_keys, n_sinks, exact_from;
};

// How a range of n keys is cut: `count` splits of at most split_keys keys, each `size` keys rounded up to a
// multiple of round_to (page ranges: the page size, so that cuts fall at page starts; exact ranges: 1).
struct RangeCut {
  int64_t count, size;
};
RangeCut cut_range(int64_t n, int64_t split_keys, int64_t round_to) {
  const int64_t count = (n + split_keys - 1) / split_keys;
  return {count, ((n + count - 1) / count + round_to - 1) / round_to * round_to};
}

// The page splits' size in keys (at least 128, so short rows stay one split). A step's page blocks run in
// waves of the multiprocessors' resident blocks (resident_blocks per multiprocessor), and a wave takes about as long as its longest
// split, so of the sizes that make 1 to kMaxWaves waves the one with the least estimated time, waves x (longest
// split + kBlockOverheadKeys), wins (ties: the fewer blocks). Sized for two waves of 8 blocks instead, at
// llama3-8b 16 x 8192 (3 resident blocks) the splits made 5.2 waves, the last 17% full.
int64_t page_split_keys(const std::vector<RowKeyRanges>& rows, int page_size, int n_kv_heads, int resident_blocks,
                        int n_sms) {
  constexpr int kMaxWaves = 12;
  constexpr int64_t kBlockOverheadKeys = 64;  // a block's setup, merge and combine, as keys (a guess)
  const int64_t slots = int64_t{resident_blocks} * std::max(n_sms, 1);
  int64_t page_keys = 0;
  for (const RowKeyRanges& r : rows) page_keys += r.exact_from - r.n_sinks;
  int64_t best_keys = 128;
  double best_time = INFINITY;
  for (int waves = kMaxWaves; waves >= 1; --waves) {  // fewer waves (larger splits) win ties
    const int64_t keys = std::max<int64_t>(128, (page_keys * n_kv_heads / (waves * slots) + 63) / 64 * 64);
    int64_t blocks = 0, longest = 0;
    for (const RowKeyRanges& r : rows) {
      if (r.exact_from <= r.n_sinks) continue;
      const RangeCut cut = cut_range(r.exact_from - r.n_sinks, keys, page_size);
      blocks += cut.count * n_kv_heads;
      longest = std::max(longest, cut.size);
    }
    const double time = static_cast<double>((blocks + slots - 1) / slots) * static_cast<double>(longest + kBlockOverheadKeys);
    if (time <= best_time) best_time = time, best_keys = keys;
  }
  return best_keys;
}

}  // namespace

std::vector<QuantizedAttentionPlan> plan_quantized_attention(const std::vector<AttentionChunk>& chunks,
                                                             const std::vector<int32_t>& chunk_slots,
                                                             const KvCacheOptions& options, int page_size,
                                                             int n_kv_heads, int head_dim, int n_sms) {
  std::vector<QuantizedAttentionPlan> plans;
  if (chunks.empty()) return plans;
  if (chunk_slots.size() != chunks.size()) fail("quantized attention: {} slots for {} chunks", chunk_slots.size(), chunks.size());
  const int sinks = options.effective_sinks();
  std::vector<RowKeyRanges> row_keys;
  for (const AttentionChunk& c : chunks) {
    for (int32_t t = 0; t < c.n_tokens; ++t) {
      const int64_t pos = int64_t{c.start_pos} + t, n_keys = pos + 1;
      const int64_t n_sinks = std::min<int64_t>(sinks, n_keys);
      row_keys.push_back({n_keys, n_sinks, std::clamp<int64_t>(options.exact_from(pos, c.start_pos, page_size), n_sinks, n_keys)});
    }
  }
  const int resident_blocks =
      page_kernel_blocks(fragment_scheme(options.format.scheme, options.per_page_key_ranges, page_size), head_dim);
  const int64_t split_keys = page_split_keys(row_keys, page_size, n_kv_heads, resident_blocks, n_sms);

  plans.emplace_back();
  size_t row_index = 0;
  for (size_t i = 0; i < chunks.size(); ++i) {
    const AttentionChunk& c = chunks[i];
    for (int32_t t = 0; t < c.n_tokens; ++t) {
      if (static_cast<int32_t>(plans.back().rows.size()) == kQuantizedRowsPerLaunch) plans.emplace_back();
      QuantizedAttentionPlan& plan = plans.back();
      const int64_t pos = int64_t{c.start_pos} + t;
      const auto row = static_cast<int32_t>(plan.rows.size());
      plan.rows.push_back({c.first_row + t, 1, static_cast<int32_t>(pos), c.page_offset});
      plan.sources.push_back({c.first_row, c.start_pos, chunk_slots[i]});
      DecodeChunk dc{row, static_cast<int32_t>(plan.splits.size()), 0};
      const auto [n_keys, n_sinks, exact_from] = row_keys[row_index++];
      // Page ranges are cut at page starts (a multiple of page_size keys apart, so no two splits stage the same
      // page but the one a cut cannot avoid); exact ranges anywhere.
      auto add = [&](int64_t begin, int64_t end, int exact) {
        if (begin >= end) return;
        const int64_t size = cut_range(end - begin, split_keys, exact ? 1 : page_size).size;
        for (int64_t k = begin; k < end;) {
          const int64_t next = std::min(end, exact ? k + size : (k + size) / page_size * page_size);
          plan.splits.push_back({row, static_cast<int32_t>(k), static_cast<int32_t>(next), exact});
          ++dc.n_splits;
          k = next;
        }
      };
      add(0, n_sinks, 1);
      add(n_sinks, exact_from, 0);
      add(exact_from, n_keys, 1);
      plan.combine.push_back(dc);
    }
  }
  return plans;
}

void launch_quantized_attention(const AttentionQuery& query, const QuantizedPagedKv& kv, const AttentionChunk* rows,
                                const ExactSource* sources, const QuantizedSplit* splits, int32_t n_splits,
                                const DecodeChunk* combine, int32_t n_rows, void* workspace, cudaStream_t stream,
                                const SideStream* side) {
  if (n_splits == 0) return;
  const int group = query.n_heads / kv.n_kv_heads;
  if (query.n_heads % kv.n_kv_heads != 0 || !quantized_attention_supported(query.head_dim, group)) {
    fail("quantized attention: head_dim {} with {} query heads per KV head is not supported (64 or 128, at most 8)",
         query.head_dim, group);
  }
  if (kv.key_layout.head_dim != query.head_dim || kv.value_layout.head_dim != query.head_dim) {
    fail("quantized attention: pages of head_dim {} for queries of head_dim {}", kv.key_layout.head_dim, query.head_dim);
  }
  if (quantized_bits_bucket(kv.key_layout) != quantized_bits_bucket(kv.value_layout)) fail("quantized attention: keys and values differ in bits");
  const DecodeWorkspace ws = split_workspace(workspace, n_splits, query.n_heads, query.head_dim);
  const int bits = quantized_bits_bucket(kv.key_layout);
  if (bits < 2 || bits > 4) fail("quantized attention: {}-bit codes are not supported", bits);  // before the fork
  // The two kernels write disjoint splits' partials; the combine reads them all.
  if (side) fork_side(*side, stream);
  const cudaStream_t exact_stream = side ? side->stream : stream;
  if (query.head_dim == 64) {
    launch_head_dim<64>(group_bucket(group), bits, query, kv, rows, sources, splits, n_splits, ws, stream, exact_stream);
  } else {
    launch_head_dim<128>(group_bucket(group), bits, query, kv, rows, sources, splits, n_splits, ws, stream, exact_stream);
  }
  if (side) join_side(*side, stream);
  launch_decode_combine(query, rows, combine, n_rows, n_splits, workspace, stream);
}

}  // namespace kvq::cuda
