// Prefill attention: flash attention (online softmax) over a ragged batch,
// causal by position, GQA, reading keys and values through the page table.
// Tensor cores through sm_90a wgmma (this file alone is built for sm_90a; see
// CMakeLists.txt).
//
// Warp-specialized: a block owns kBlockM = 128 query rows of one chunk and one
// query head and has four warpgroups, one block per multiprocessor.
//   producers (warpgroups 0 and 1, few registers): the K/V load stage
//     (kv_page_loader.cuh's Fp16PageProducer), taking key tiles of kBlockN
//     keys in turn: page lookups, cp.async of the tile's keys into one of
//     kStages key stages, RoPE on them once they land, `full_k[stage]`; then
//     cp.async of its values into the value stage, `full_v[stage]`.
//     Keys and values have their own barriers because the consumers are done
//     with a tile's keys one step before its values: with one barrier per
//     stage, a stage came free only after P V of its tile, and a producer had
//     one consumer step to look up, copy and rotate the tile that reused it
//     (the limit at head_dim 128). Now the keys of tile t + kStages may load
//     and rotate as soon as S of tile t is done, about two consumer steps
//     before they are needed; only the values wait the extra step.
//   consumers (warpgroups 2 and 3, 64 query rows each, many registers): per
//     tile S = Q K^T (wgmma, Q and K in shared memory), mask, online softmax
//     in the log2 domain, P (fp16, in registers) times V (wgmma, V N-major),
//     releasing `empty_k[stage]` when S completes and `empty_v[stage]` when
//     P V does. Inside a warpgroup the loop is skewed by one tile:
//     S of tile t and P V of tile t-1 are issued together, and the softmax of
//     tile t runs while P V of tile t-1 is still on the tensor cores; the two
//     warpgroups take turns issuing their products (named barriers), so one's
//     softmax overlaps the other's matrix work.
// No block-wide barrier after the start: stages change hands through mbarriers
// (warp_specialize.cuh). A consumer warpgroup skips the matrix work of tiles
// wholly in its rows' future but still takes and returns them.
//
// Quantized pages (quantized_prefill.h) run the same kernel with a quantized
// load stage (quantized_page_producer.cuh): ScratchPageProducer, copying page
// tiles from the step's page scratch (page_scratch.h), or, when the step has
// none, QuantizedPageProducer, decoding them. The block's tiles are its page
// tiles then its band tiles, each masked per row by the set it belongs to;
// stages, barriers and turns are unchanged. The fp16
// instances compile to the same consumer code as before (SASS compared).
#include <algorithm>
#include <cfloat>

#include "core/error.h"
#include "cuda/attention.h"
#include "cuda/cuda_check.h"
#include "cuda/kv_page_loader.cuh"
#include "cuda/quantized_page_producer.cuh"
#include "cuda/quantized_prefill.h"
#include "cuda/warp_specialize.cuh"
#include "cuda/wgmma.cuh"

namespace kvq::cuda {
namespace {

template <int D>
struct PrefillShape {
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
  static constexpr int kConsumers = 2;  // warpgroups of 64 query rows
  static constexpr int kBlockM = 64 * kConsumers, kBlockN = 128, kStages = 3;
  static constexpr int kProducers = 2;  // warpgroups of the load stage, taking tiles in turn
  static constexpr int kThreads = 128 * (kProducers + kConsumers);
  // setmaxnreg budgets: 128 * (kProducers * kProducerRegs + kConsumers * kConsumerRegs) <= 65536
  // (one block per multiprocessor); no spills in ptxas's report (nvcc 13.0).
  static constexpr int kProducerRegs = D == 128 ? 56 : 64, kConsumerRegs = D == 128 ? 200 : 192;
  using Loader = Fp16PageProducer<D, kBlockN, 128>;
  // sQ (kBlockM, D), then per stage sK (kBlockN, D) and sV (kBlockN, D), fp16, then the mbarriers, then the
  // producers' row tables; 1024 bytes of slack to align the tiles for the swizzle.
  static constexpr int kStageHalves = 2 * kBlockN * D;
  static constexpr int kTileBytes = (kBlockM * D + kStages * kStageHalves) * 2;
  static constexpr int kBarrierBytes = 4 * kStages * 8;
  static constexpr int kSmemBytes = 1024 + kTileBytes + kBarrierBytes + kProducers * Loader::kTableEntries * 4;
  static_assert(kSmemBytes <= 227 * 1024, "more shared memory than an sm_90 block may have");
};

// One tile of the online softmax for one thread's two rows (accumulator rows g
// and g + 8 of its warp): with kMask, masks raw scores s of keys k0 + n * 8 +
// 2 t + e (n, e the accumulator's block and element) past last_col[hr] (the
// last key a row sees, minus k0 + 2 t); raises the running maxima and turns s
// into exp2 probabilities; correction[hr] is what the previous accumulators
// are to be multiplied by. Tiles off the diagonal take the kMask = false
// instance: no per-element compares.
//
// Quantized pages (kQuantized): keys below first_col[hr] are masked too (a band
// tile), and a row may meet tiles with no key it sees before its first visible
// one, so a maximum still -inf scales by 0 instead of giving -inf - -inf.
template <int kBlockN, bool kMask, bool kQuantized = false>
__device__ __forceinline__ void softmax_tile(float (&s)[kBlockN / 2], float (&row_max)[2], float (&row_sum)[2],
                                             float (&correction)[2], const int (&last_col)[2], float scale_log2,
                                             const int (&first_col)[2]) {
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float tile_max = -INFINITY;
#pragma unroll
    for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& v = s[4 * n + hr * 2 + e];
        if (kMask && (n * 8 + e > last_col[hr] || (kQuantized && n * 8 + e < first_col[hr]))) v = -INFINITY;
        tile_max = fmaxf(tile_max, v);
      }
    }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
    // fp16 pages: tile 0 holds key 0, visible to every row, so new_max is finite from then on.
    const float new_max = fmaxf(row_max[hr], tile_max);
    const float max_scaled = kQuantized && new_max == -INFINITY ? 0.0f : new_max * scale_log2;
    correction[hr] = fast_exp2(row_max[hr] * scale_log2 - max_scaled);  // 0 on tile 0 (row_max -inf)
    row_max[hr] = new_max;
    float sum = 0.0f;
#pragma unroll
    for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& v = s[4 * n + hr * 2 + e];
        v = fast_exp2(fmaf(v, scale_log2, -max_scaled));
        sum += v;
      }
    }
    row_sum[hr] = row_sum[hr] * correction[hr] + sum;
  }
}

// A block's key tiles: page tiles over keys [0, page_end), then (quantized pages) band tiles over
// [band_begin, band_end) (quantized_prefill.h).
template <int kBlockN>
struct BlockTiles {
  int page_end;
  int n_page_tiles;
  int band_begin;
  int band_end;
  int n_tiles;

  __device__ KeyRange range(int tile) const {
    return tile < n_page_tiles ? KeyRange{tile * kBlockN, page_end, 0}
                               : KeyRange{band_begin + (tile - n_page_tiles) * kBlockN, band_end, 1};
  }
};

// n_keys: the keys of the block's last row (its position + 1).
template <int kBlockN>
__device__ BlockTiles<kBlockN> block_tiles(const PagedKv&, const AttentionChunk&, int q_pos0, int n_keys) {
  const int n = (n_keys + kBlockN - 1) / kBlockN;
  return {n_keys, n, n_keys, n_keys, n};
}
template <int kBlockN>
__device__ BlockTiles<kBlockN> block_tiles(const QuantizedPrefillSource& source, const AttentionChunk& chunk,
                                           int q_pos0, int n_keys) {
  const ExactRule& rule = source.rule;
  const int q_last = n_keys - 1;
  BlockTiles<kBlockN> tiles;
  tiles.page_end = rule.split(q_last, chunk.start_pos);  // split rises with the position
  tiles.n_page_tiles = (tiles.page_end + kBlockN - 1) / kBlockN;
  // Rows with a band are those from max(chunk start, sinks) on when the rule has one (tested on the host).
  const int q_band = max(q_pos0, rule.sinks);
  const bool band = q_band <= q_last && rule.has_band(q_band, chunk.start_pos);
  tiles.band_begin = band ? rule.split(q_band, chunk.start_pos) : n_keys;
  tiles.band_end = n_keys;
  tiles.n_tiles = tiles.n_page_tiles + (tiles.band_end - tiles.band_begin + kBlockN - 1) / kBlockN;
  return tiles;
}

__device__ __forceinline__ int kv_heads_of(const PagedKv& kv) { return kv.n_kv_heads; }
__device__ __forceinline__ int kv_heads_of(const QuantizedPrefillSource& source) { return source.kv.n_kv_heads; }
__device__ __forceinline__ const int32_t* page_table_of(const PagedKv& kv) { return kv.page_table; }
__device__ __forceinline__ const int32_t* page_table_of(const QuantizedPrefillSource& source) {
  return source.kv.page_table;
}

// Loader: Fp16PageProducer (fp16 pages), ScratchPageProducer or QuantizedPageProducer; its Source is what
// the kernel reads.
template <int D, class Loader>
__global__ void __launch_bounds__(PrefillShape<D>::kThreads, 1)
    prefill_attention_kernel(AttentionQuery query, typename Loader::Source kv, const AttentionChunk* chunks,
                             const PrefillWork* work) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Shape = PrefillShape<D>;
  constexpr bool kQuantized = Loader::kQuantized;
  constexpr int kBlockM = Shape::kBlockM, kBlockN = Shape::kBlockN, kStages = Shape::kStages;
  // The quantized producer decodes at head_dim 128 with 64 registers (56 spilled its loop state); its
  // consumers keep the rest of the budget.
  constexpr int kProducerRegs = kQuantized && D == 128 ? 64 : Shape::kProducerRegs;
  constexpr int kConsumerRegs = kQuantized && D == 128 ? 192 : Shape::kConsumerRegs;
  static_assert(Shape::kProducers * kProducerRegs + Shape::kConsumers * kConsumerRegs <= 65536 / 128);

  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (smem_address(smem_raw) & 1023)) & 1023);
  __half* sQ = reinterpret_cast<__half*>(smem);  // (kBlockM, D)
  __half* stages = sQ + kBlockM * D;             // kStages x {sK (kBlockN, D), sV (kBlockN, D)}
  uint64_t* full_k = reinterpret_cast<uint64_t*>(smem + Shape::kTileBytes);  // (kStages) stage holds ready keys
  uint64_t* full_v = full_k + kStages;                                        // (kStages) ... ready values
  uint64_t* empty_k = full_v + kStages;                                       // (kStages) key stage may be refilled
  uint64_t* empty_v = empty_k + kStages;                                      // (kStages) value stage ...
  int32_t* row_tables = reinterpret_cast<int32_t*>(smem + Shape::kTileBytes + Shape::kBarrierBytes);
  const auto stage_k = [&](int tile) { return stages + (tile % kStages) * Shape::kStageHalves; };
  const auto stage_v = [&](int tile) { return stage_k(tile) + kBlockN * D; };

  if (threadIdx.x == 0) {
    for (int i = 0; i < kStages; ++i) {
      mbarrier_init(&full_k[i], 128);                        // every thread of the tile's producer
      mbarrier_init(&full_v[i], 128);
      mbarrier_init(&empty_k[i], 128 * Shape::kConsumers);   // every consumer thread
      mbarrier_init(&empty_v[i], 128 * Shape::kConsumers);
    }
    mbarrier_init_fence();
  }
  __syncthreads();

  const int head = blockIdx.x;
  const PrefillWork item = work[blockIdx.y];
  const AttentionChunk chunk = chunks[item.chunk];
  const int kv_head = head / (query.n_heads / kv_heads_of(kv));
  const int q_rows = min(kBlockM, chunk.n_tokens - item.q_begin);
  const int q_pos0 = chunk.start_pos + item.q_begin;  // position of tile row 0
  const int n_keys = q_pos0 + q_rows;                 // keys the block's last row sees
  const BlockTiles<kBlockN> tiles = block_tiles<kBlockN>(kv, chunk, q_pos0, n_keys);
  const int n_tiles = tiles.n_tiles;
  const int warp_group = threadIdx.x / 128;

  if (warp_group < Shape::kProducers) {
    // ---- producers: the load stage, warpgroup p filling tiles p, p + kProducers, ... ----
    // One tile at a time per warpgroup (keys: copy, wait, rotate; then values: copy, wait): the other
    // warpgroup's tile hides the latency.
    setmaxnreg_dec<kProducerRegs>();
    const int32_t* pages = page_table_of(kv) + chunk.page_offset;
    const Loader loader = [&] {
      if constexpr (kQuantized) {
        return Loader(kv, kv_head, chunk, item.chunk, threadIdx.x % 128);
      } else {
        return Loader(kv, kv_head, n_keys, threadIdx.x % 128, row_tables + warp_group * Loader::kTableEntries);
      }
    }();
    for (int tile = warp_group; tile < n_tiles; tile += Shape::kProducers) {
      // Stage reuse: the consumers return the keys of tile - kStages at their step tile - kStages and its
      // values at step tile - kStages + 1, which needs keys up to tile - kStages + 1 <= tile - kProducers and
      // values up to tile - kStages: all filled at earlier tiles of this producer or the other.
      static_assert(kStages >= Shape::kProducers + 1, "a producer never waits on its own unfinished tile");
      const int stage = tile % kStages;
      const uint32_t reuse_parity = (tile / kStages - 1) & 1;
      const KeyRange range = tiles.range(tile);
      loader.locate(kv, pages, range);
      if (tile >= kStages) mbarrier_wait(&empty_k[stage], reuse_parity);
      const typename Loader::Pending pending = loader.issue_keys(kv, range, stage_k(tile));
      cp_async_commit();
      cp_async_wait<0>();
      loader.finish_keys(pending, stage_k(tile));
      fence_proxy_async();  // the rotated keys are read by wgmma next
      mbarrier_arrive(&full_k[stage]);
      if (tile >= kStages) mbarrier_wait(&empty_v[stage], reuse_parity);
      loader.issue_values(kv, range, stage_v(tile));
      cp_async_commit();
      cp_async_wait<0>();
      fence_proxy_async();
      mbarrier_arrive(&full_v[stage]);
    }
  } else {
    // ---- consumers: matrix work and softmax ----
    setmaxnreg_inc<kConsumerRegs>();
    const int group_thread = threadIdx.x % 128, warp = group_thread / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int group = warp_group - Shape::kProducers, other_group = 1 - group;
    const int group_row0 = group * 64;
    const int warp_row0 = group_row0 + warp * 16;

    // This warpgroup's 64 rows of Q (rows past the chunk zero-filled).
    const __half* q_base = query.q + static_cast<int64_t>(chunk.first_row + item.q_begin) * query.q_stride + head * D;
#pragma unroll
    for (int j = 0; j < 64 * D / 8 / 128; ++j) {
      const int i = group_thread + j * 128;
      const int r = group_row0 + i / (D / 8), c = i % (D / 8);
      const bool valid = r < q_rows;
      cp_async_16(sQ + tile_offset<D, kBlockM>(r, c * 8),
                  valid ? q_base + static_cast<int64_t>(r) * query.q_stride + c * 8 : query.q, valid);
    }
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();
    named_barrier_sync(1 + group, 128);

    // Tiles with a key visible to one of a group's rows: k0 <= the position of its last row (fp16); the
    // page tiles below its last row's split, or every page tile and the band tiles up to its last row.
    const auto tiles_of_group = [&](int row0) {
      if (row0 >= q_rows) return 0;
      const int q_last = q_pos0 + min(row0 + 64, q_rows) - 1;
      if constexpr (kQuantized) {
        if (kv.rule.has_band(q_last, chunk.start_pos)) return tiles.n_page_tiles + (q_last - tiles.band_begin) / kBlockN + 1;
        return (kv.rule.split(q_last, chunk.start_pos) + kBlockN - 1) / kBlockN;
      } else {
        return q_last / kBlockN + 1;
      }
    };
    const int my_tiles = tiles_of_group(group_row0);
    // The two groups take turns issuing their matrix work (named barriers 3 and 4), so that one's
    // softmax runs while the other's products are on the tensor cores. A group's turns: S of tile 0,
    // then S of tile t with P V of tile t - 1 for each later tile, then P V of its last tile. Turn k
    // of group 0 comes before turn k of group 1, which comes before turn k + 1 of group 0; a group
    // waits only for a turn the other group has, and signals only a turn the other group waits in.
    const auto turns_of = [](int tiles) { return tiles > 0 ? tiles + 1 : 0; };
    const int other_turns = turns_of(tiles_of_group(other_group * 64));
    int turn = 0;
    const auto begin_turn = [&] {
      if (group == 0 ? turn > 0 && turn - 1 < other_turns : turn < other_turns) named_barrier_sync(3 + group, 256);
    };
    const auto end_turn = [&] {
      if (group == 0 ? turn < other_turns : turn + 1 < other_turns) named_barrier_arrive(3 + other_group, 256);
      ++turn;
    };
    const float scale_log2 = query.scale * 1.4426950408889634f;
    const int q_pos_g = q_pos0 + warp_row0 + g;
    // K-major operands: 8-row groups 1024 bytes apart; k-step kk at column block kk / 4, byte 32 (kk % 4).
    const __half* sQg = sQ + group_row0 * 64;

    float o[D / 2];  // (64, D) per warpgroup, accumulator layout
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
    float s[kBlockN / 2];         // (64, kBlockN) per warpgroup
    uint32_t p[kBlockN / 16][4];  // A operand of P V, k-step kk = keys 16 kk .. 16 kk + 15
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f}, correction[2];

    const auto issue_qk = [&](int tile) {
      const __half* sKt = stage_k(tile);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const int block_offset = (kk / 4) * 64, byte_col = (kk % 4) * 16;  // in halves
        const uint64_t desc_q = wgmma_desc(sQg + block_offset * kBlockM + byte_col, 16, 1024);
        const uint64_t desc_k = wgmma_desc(sKt + block_offset * kBlockN + byte_col, 16, 1024);
        Wgmma<kBlockN>::ss(s, desc_q, desc_k, kk > 0);
      }
      wgmma_commit();
    };
    // V N-major: 8-key groups 1024 bytes apart, the D column blocks kBlockN * 128 bytes apart.
    const auto issue_pv = [&](int tile) {
      const __half* sVt = stage_v(tile);
      wgmma_fence_operands(o);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        Wgmma<D>::rs_trans_b(o, p[kk], wgmma_desc(sVt + kk * 16 * 64, kBlockN * 128, 1024), 1);
      }
      wgmma_commit();
    };
    // Quantized pages: the thread's two rows' positions (rows past the chunk as its last row) and splits.
    int row_pos[2] = {}, row_split[2] = {}, warp_split = 0;
    if constexpr (kQuantized) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        row_pos[hr] = min(q_pos_g + 8 * hr, n_keys - 1);
        row_split[hr] = kv.rule.split(row_pos[hr], chunk.start_pos);
      }
      warp_split = kv.rule.split(min(q_pos0 + warp_row0, n_keys - 1), chunk.start_pos);  // the warp's least
    }
    const auto softmax = [&](int tile) {
      const int no_limit[2] = {kBlockN, kBlockN}, no_floor[2] = {0, 0};
      if constexpr (kQuantized) {
        // Page tiles: keys below the row's split; band tiles: keys from its split to its position.
        const KeyRange range = tiles.range(tile);
        const int k0 = range.k0;
        if (!range.exact && k0 + kBlockN <= warp_split) {
          softmax_tile<kBlockN, false, true>(s, row_max, row_sum, correction, no_limit, scale_log2, no_floor);
        } else {
          int last_col[2], first_col[2];
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            last_col[hr] = (range.exact ? row_pos[hr] : row_split[hr] - 1) - k0 - 2 * t;
            first_col[hr] = (range.exact ? row_split[hr] : 0) - k0 - 2 * t;
          }
          softmax_tile<kBlockN, true, true>(s, row_max, row_sum, correction, last_col, scale_log2, first_col);
        }
      } else {
        const int k0 = tile * kBlockN;
        // A key is visible to a row at position q_pos when key <= q_pos and key < n_keys (rows past the
        // chunk see no more than its last row).
        if (k0 + kBlockN - 1 > q_pos0 + warp_row0 || k0 + kBlockN > n_keys) {
          const int last_col[2] = {min(q_pos_g, n_keys - 1) - k0 - 2 * t, min(q_pos_g + 8, n_keys - 1) - k0 - 2 * t};
          softmax_tile<kBlockN, true>(s, row_max, row_sum, correction, last_col, scale_log2, no_floor);
        } else {
          softmax_tile<kBlockN, false>(s, row_max, row_sum, correction, no_limit, scale_log2, no_floor);
        }
      }
    };
    const auto pack_p = [&] {
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        p[kk][0] = pack_half2(s[8 * kk + 0], s[8 * kk + 1]);
        p[kk][1] = pack_half2(s[8 * kk + 2], s[8 * kk + 3]);
        p[kk][2] = pack_half2(s[8 * kk + 4], s[8 * kk + 5]);
        p[kk][3] = pack_half2(s[8 * kk + 6], s[8 * kk + 7]);
      }
    };

    const auto ready_parity = [](int tile) { return static_cast<uint32_t>(tile / kStages) & 1; };
    if (my_tiles > 0) {
      mbarrier_wait(&full_k[0], 0);
      begin_turn();
      issue_qk(0);
      end_turn();
      wgmma_wait<0>();
      wgmma_fence_operands(s);
      mbarrier_arrive(&empty_k[0]);
      softmax(0);  // o is still zero: no correction (0 or 1: the quantized rows may have seen nothing yet)
      pack_p();
      for (int tile = 1; tile < my_tiles; ++tile) {
        mbarrier_wait(&full_k[tile % kStages], ready_parity(tile));
        mbarrier_wait(&full_v[(tile - 1) % kStages], ready_parity(tile - 1));
        begin_turn();
        issue_qk(tile);
        issue_pv(tile - 1);
        end_turn();
        wgmma_wait<1>();  // S of this tile
        wgmma_fence_operands(s);
        mbarrier_arrive(&empty_k[tile % kStages]);
        softmax(tile);
        // Pinned here: the compiler would otherwise sink the softmax past the wait below, serializing it
        // with P V instead of overlapping.
        wgmma_fence_operands(s);
        wgmma_fence_operands(correction);
        wgmma_wait<0>();  // P V of the previous tile
        wgmma_fence_operands(o);
        wgmma_fence_operands(p);
        mbarrier_arrive(&empty_v[(tile - 1) % kStages]);
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
#pragma unroll
          for (int hr = 0; hr < 2; ++hr) {
            o[4 * n + hr * 2] *= correction[hr];
            o[4 * n + hr * 2 + 1] *= correction[hr];
          }
        }
        pack_p();
      }
      mbarrier_wait(&full_v[(my_tiles - 1) % kStages], ready_parity(my_tiles - 1));
      begin_turn();
      issue_pv(my_tiles - 1);
      end_turn();
      wgmma_wait<0>();
      wgmma_fence_operands(o);
      wgmma_fence_operands(p);
      mbarrier_arrive(&empty_v[(my_tiles - 1) % kStages]);
    }
    // Tiles wholly in the group's future: taken and returned (the producer counts on every consumer).
    for (int tile = my_tiles; tile < n_tiles; ++tile) {
      mbarrier_wait(&full_k[tile % kStages], ready_parity(tile));
      mbarrier_arrive(&empty_k[tile % kStages]);
      mbarrier_wait(&full_v[tile % kStages], ready_parity(tile));
      mbarrier_arrive(&empty_v[tile % kStages]);
    }

#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float sum = row_sum[hr];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int r = warp_row0 + g + hr * 8;
      if (r >= q_rows) continue;
      const float inv = 1.0f / sum;
      __half* out =
          query.out + static_cast<int64_t>(chunk.first_row + item.q_begin + r) * query.out_stride + head * D;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        *reinterpret_cast<uint32_t*>(out + n * 8 + 2 * t) =
            pack_half2(o[4 * n + hr * 2] * inv, o[4 * n + hr * 2 + 1] * inv);
      }
    }
  }
#else
  __trap();  // built for sm_90a only (CMakeLists.txt); the host never launches another build
#endif
}

template <int D, class Loader>
void launch(const AttentionQuery& query, const typename Loader::Source& kv, const AttentionChunk* chunks,
            const PrefillWork* work, int32_t n_work, cudaStream_t stream) {
  using Shape = PrefillShape<D>;
  CUDA_CHECK(cudaFuncSetAttribute(prefill_attention_kernel<D, Loader>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  Shape::kSmemBytes));
  const dim3 grid(query.n_heads, n_work);
  prefill_attention_kernel<D, Loader><<<grid, Shape::kThreads, Shape::kSmemBytes, stream>>>(query, kv, chunks, work);
  CUDA_CHECK_LAUNCH(stream, "prefill_attention_kernel");
}

template <int D>
using Fp16Loader = Fp16PageProducer<D, PrefillShape<D>::kBlockN, 128>;
template <int D, int kBits>
using QuantizedLoader = QuantizedPageProducer<D, PrefillShape<D>::kBlockN, 128, kBits>;
template <int D>
using ScratchLoader = ScratchPageProducer<D, PrefillShape<D>::kBlockN, 128>;

template <int D>
void launch_quantized(int bits, const AttentionQuery& query, const QuantizedPrefillSource& source,
                      const AttentionChunk* chunks, const PrefillWork* work, int32_t n_work, cudaStream_t stream) {
  if (source.scratch.keys != nullptr) return launch<D, ScratchLoader<D>>(query, source, chunks, work, n_work, stream);
  switch (bits) {
    case 2: return launch<D, QuantizedLoader<D, 2>>(query, source, chunks, work, n_work, stream);
    case 3: return launch<D, QuantizedLoader<D, 3>>(query, source, chunks, work, n_work, stream);
    case 4: return launch<D, QuantizedLoader<D, 4>>(query, source, chunks, work, n_work, stream);
    default: fail("quantized prefill attention: {}-bit codes are not supported", bits);
  }
}

}  // namespace

bool prefill_attention_supported(int head_dim) { return prefill_rows_per_tile(head_dim) > 0; }

int prefill_rows_per_tile(int head_dim) {
  switch (head_dim) {
    case 64: return PrefillShape<64>::kBlockM;
    case 128: return PrefillShape<128>::kBlockM;
    default: return 0;
  }
}

std::vector<PrefillWork> plan_prefill(const std::vector<AttentionChunk>& chunks, const std::vector<int32_t>& chunk_ids,
                                      int head_dim) {
  const int rows = prefill_rows_per_tile(head_dim);
  if (rows == 0) fail("prefill attention: head_dim {} is not supported (64 or 128)", head_dim);
  std::vector<std::pair<int64_t, PrefillWork>> weighted;
  for (int32_t id : chunk_ids) {
    const AttentionChunk& c = chunks[id];
    for (int32_t q = 0; q < c.n_tokens; q += rows) {
      weighted.push_back({int64_t{c.start_pos} + std::min(q + rows, c.n_tokens), PrefillWork{id, q}});
    }
  }
  std::stable_sort(weighted.begin(), weighted.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  std::vector<PrefillWork> work;
  work.reserve(weighted.size());
  for (const auto& w : weighted) work.push_back(w.second);
  return work;
}

void launch_prefill_attention(const AttentionQuery& query, const PagedKv& kv, const AttentionChunk* chunks,
                              const PrefillWork* work, int32_t n_work, cudaStream_t stream) {
  if (n_work == 0) return;
  if (n_work > 65535) fail("prefill attention: {} query tiles in one step (at most 65535)", n_work);
  if (query.n_heads % kv.n_kv_heads != 0) fail("prefill attention: {} heads over {} KV heads", query.n_heads, kv.n_kv_heads);
  switch (query.head_dim) {
    case 64: return launch<64, Fp16Loader<64>>(query, kv, chunks, work, n_work, stream);
    case 128: return launch<128, Fp16Loader<128>>(query, kv, chunks, work, n_work, stream);
    default: fail("prefill attention: head_dim {} is not supported (64 or 128)", query.head_dim);
  }
}

ExactRule exact_rule(const KvCacheOptions& options, int page_size) {
  ExactRule rule{};
  rule.sinks = options.effective_sinks();
  rule.native_window = options.format.native_exact_window();
  rule.page_align = options.format.calibrated() && (options.tail || options.per_page_key_ranges) ? page_size : 0;
  rule.exact_chunk = options.exact_chunk ? 1 : 0;
  return rule;
}

bool quantized_prefill_supported(int head_dim, const PageBlockLayout& key_layout, const PageBlockLayout& value_layout) {
  const int bits = quantized_bits_bucket(key_layout);
  return prefill_attention_supported(head_dim) && bits == quantized_bits_bucket(value_layout) && bits >= 2 && bits <= 4 &&
         key_layout.head_dim == head_dim && value_layout.head_dim == head_dim;
}

void launch_quantized_prefill_attention(const AttentionQuery& query, const QuantizedPrefillSource& source,
                                        const AttentionChunk* chunks, const PrefillWork* work, int32_t n_work,
                                        cudaStream_t stream) {
  if (n_work == 0) return;
  if (n_work > 65535) fail("quantized prefill attention: {} query tiles in one step (at most 65535)", n_work);
  const QuantizedPagedKv& kv = source.kv;
  if (query.n_heads % kv.n_kv_heads != 0) {
    fail("quantized prefill attention: {} heads over {} KV heads", query.n_heads, kv.n_kv_heads);
  }
  if (!quantized_prefill_supported(query.head_dim, kv.key_layout, kv.value_layout)) {
    fail("quantized prefill attention: head_dim {} with these pages is not supported", query.head_dim);
  }
  const int bits = quantized_bits_bucket(kv.key_layout);
  if (query.head_dim == 64) return launch_quantized<64>(bits, query, source, chunks, work, n_work, stream);
  launch_quantized<128>(bits, query, source, chunks, work, n_work, stream);
}

}  // namespace kvq::cuda
