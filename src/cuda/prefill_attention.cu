// Prefill attention: flash attention (online softmax) over a ragged batch,
// causal by position, GQA, reading keys and values through the page table with
// the loader of kv_page_loader.cuh. Tensor cores through sm_90a wgmma (this file
// alone is built for sm_90a; see CMakeLists.txt).
//
// A block owns kBlockM = 64 * kWarpGroups query rows of one chunk and one query
// head; each warpgroup owns 64 rows. Per key tile of kBlockN keys: S = Q K^T
// (wgmma, both operands in shared memory), mask, online softmax in the log2
// domain, P (fp16, straight from the accumulators, in registers) times V
// (wgmma, V read N-major). The next key tile is copied (cp.async) while the
// current one is used; the warpgroups drift apart inside a tile, so one's
// softmax overlaps the other's matrix work. One block per multiprocessor
// (225 / 212 registers). Tried and slower (H200, 2026-11-26, hd128 S=8192):
// one warpgroup per block with Q in registers, kBlockN 64, two blocks per
// multiprocessor: 138 instead of 198 TFLOP/s (each block re-reads K/V and
// re-rotates keys for half the rows).
#include <algorithm>
#include <cfloat>

#include "core/error.h"
#include "cuda/attention.h"
#include "cuda/cuda_check.h"
#include "cuda/kv_page_loader.cuh"
#include "cuda/wgmma.cuh"

namespace kvq::cuda {
namespace {

template <int D>
struct PrefillTraits {
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
  static constexpr int kWarpGroups = 2, kBlockN = 128;
};

template <int D>
struct PrefillShape {
  using T = PrefillTraits<D>;
  static constexpr int kThreads = T::kWarpGroups * 128;
  static constexpr int kBlockM = T::kWarpGroups * 64;
  static constexpr int kBlockN = T::kBlockN;
  using Loader = Fp16PageLoader<D, kBlockN, kThreads>;
  // sQ (kBlockM, D), sK 2 x (kBlockN, D), sV 2 x (kBlockN, D) fp16, then the loader's staging;
  // 1024 bytes of slack to align the tiles for the swizzle.
  static constexpr int kTileBytes = (kBlockM + 4 * kBlockN) * D * 2;
  static constexpr int kSmemBytes = 1024 + kTileBytes + Loader::kStagingBytes;
};

template <int D>
__global__ void __launch_bounds__(PrefillShape<D>::kThreads, 1)
    prefill_attention_kernel(AttentionQuery query, PagedKv kv, const AttentionChunk* chunks, const PrefillWork* work) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Shape = PrefillShape<D>;
  using Loader = typename Shape::Loader;
  constexpr int kBlockM = Shape::kBlockM, kBlockN = Shape::kBlockN, kThreads = Shape::kThreads;

  extern __shared__ unsigned char smem_raw[];
  const uint32_t raw_address = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  unsigned char* smem = smem_raw + ((1024 - (raw_address & 1023)) & 1023);
  __half* sQ = reinterpret_cast<__half*>(smem);  // (kBlockM, D)
  __half* sK = sQ + kBlockM * D;                 // 2 x (kBlockN, D)
  __half* sV = sK + 2 * kBlockN * D;             // 2 x (kBlockN, D)
  void* staging = smem + Shape::kTileBytes;      // the loader's, one tile

  const int head = blockIdx.x;
  const PrefillWork item = work[blockIdx.y];
  const AttentionChunk chunk = chunks[item.chunk];
  const int kv_head = head / (query.n_heads / kv.n_kv_heads);
  const int q_rows = min(kBlockM, chunk.n_tokens - item.q_begin);
  const int q_pos0 = chunk.start_pos + item.q_begin;  // position of tile row 0
  const int n_keys = q_pos0 + q_rows;                 // keys the tile's last row sees
  const int n_tiles = (n_keys + kBlockN - 1) / kBlockN;
  const int32_t* pages = kv.page_table + chunk.page_offset;

  const int warp_group = threadIdx.x / 128, warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int group_row0 = warp_group * 64;
  const int warp_row0 = group_row0 + warp * 16;

  // Q tile (rows past the chunk zero-filled), then the first key tile.
  const __half* q_base = query.q + static_cast<int64_t>(chunk.first_row + item.q_begin) * query.q_stride + head * D;
#pragma unroll
  for (int j = 0; j < kBlockM * D / 8 / kThreads; ++j) {
    const int i = threadIdx.x + j * kThreads;
    const int r = i / (D / 8), c = i % (D / 8);
    const bool valid = r < q_rows;
    cp_async_16(sQ + tile_offset<D, kBlockM>(r, c * 8),
                valid ? q_base + static_cast<int64_t>(r) * query.q_stride + c * 8 : query.q, valid);
  }
  Loader::issue(kv, pages, kv_head, 0, n_keys, sK, sV, staging);
  cp_async_commit();

  float o[D / 2];  // (64, D) per warpgroup, accumulator layout
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
  const float scale_log2 = query.scale * 1.4426950408889634f;
  const int group_last_pos = q_pos0 + group_row0 + 63;
  // K-major operands: 8-row groups 1024 bytes apart; k-step kk at column block kk / 4, byte 32 (kk % 4).
  const __half* sQg = sQ + group_row0 * 64;

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int k0 = tile * kBlockN;
    __half* sKt = sK + (tile & 1) * kBlockN * D;
    __half* sVt = sV + (tile & 1) * kBlockN * D;
    cp_async_wait<0>();
    __syncthreads();
    Loader::finish(k0, n_keys, sKt, staging);
    fence_proxy_async();  // the rotated keys (and cp.async data) are read by wgmma next
    __syncthreads();
    if (tile + 1 < n_tiles) {
      Loader::issue(kv, pages, kv_head, k0 + kBlockN, n_keys, sK + ((tile + 1) & 1) * kBlockN * D,
                    sV + ((tile + 1) & 1) * kBlockN * D, staging);
    }
    cp_async_commit();
    if (k0 > group_last_pos) continue;  // every key of the tile is in this warpgroup's future (uniform per group)

    float s[kBlockN / 2];  // (64, kBlockN) per warpgroup
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int block_offset = (kk / 4) * 64, byte_col = (kk % 4) * 16;  // in halves
      const uint64_t desc_q = wgmma_desc(sQg + block_offset * kBlockM + byte_col, 16, 1024);
      const uint64_t desc_k = wgmma_desc(sKt + block_offset * kBlockN + byte_col, 16, 1024);
      Wgmma<kBlockN>::ss(s, desc_q, desc_k, kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(s);

    const bool need_mask = k0 + kBlockN - 1 > q_pos0 + warp_row0 || k0 + kBlockN > n_keys;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int q_pos = q_pos0 + warp_row0 + g + hr * 8;
      float tile_max = -INFINITY;
#pragma unroll
      for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = k0 + n * 8 + 2 * t + e;
          float v = s[4 * n + hr * 2 + e] * scale_log2;
          if (need_mask && (key > q_pos || key >= n_keys)) v = -INFINITY;
          s[4 * n + hr * 2 + e] = v;
          tile_max = fmaxf(tile_max, v);
        }
      }
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      // Tile 0 holds key 0, visible to every row, so new_max is finite from then on.
      const float new_max = fmaxf(row_max[hr], tile_max);
      const float correction = exp2f(row_max[hr] - new_max);
      row_max[hr] = new_max;
      float sum = 0.0f;
#pragma unroll
      for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float p = exp2f(s[4 * n + hr * 2 + e] - new_max);
          s[4 * n + hr * 2 + e] = p;
          sum += p;
        }
      }
      row_sum[hr] = row_sum[hr] * correction + sum;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[4 * n + hr * 2] *= correction;
        o[4 * n + hr * 2 + 1] *= correction;
      }
    }

    uint32_t p[kBlockN / 16][4];  // A operand of P V, k-step kk = keys 16 kk .. 16 kk + 15
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      p[kk][0] = pack_half2(s[8 * kk + 0], s[8 * kk + 1]);
      p[kk][1] = pack_half2(s[8 * kk + 2], s[8 * kk + 3]);
      p[kk][2] = pack_half2(s[8 * kk + 4], s[8 * kk + 5]);
      p[kk][3] = pack_half2(s[8 * kk + 6], s[8 * kk + 7]);
    }
    wgmma_fence_operands(o);
    wgmma_fence();
    // V N-major: 8-key groups 1024 bytes apart, the D column blocks kBlockN * 128 bytes apart.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      Wgmma<D>::rs_trans_b(o, p[kk], wgmma_desc(sVt + kk * 16 * 64, kBlockN * 128, 1024), 1);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(o);
  }
  cp_async_wait<0>();

#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float sum = row_sum[hr];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    const int r = warp_row0 + g + hr * 8;
    if (r >= q_rows) continue;
    const float inv = 1.0f / sum;
    __half* out = query.out + static_cast<int64_t>(chunk.first_row + item.q_begin + r) * query.out_stride + head * D;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      *reinterpret_cast<uint32_t*>(out + n * 8 + 2 * t) = pack_half2(o[4 * n + hr * 2] * inv, o[4 * n + hr * 2 + 1] * inv);
    }
  }
#else
  __trap();  // built for sm_90a only (CMakeLists.txt); the host never launches another build
#endif
}

template <int D>
void launch(const AttentionQuery& query, const PagedKv& kv, const AttentionChunk* chunks, const PrefillWork* work,
            int32_t n_work, cudaStream_t stream) {
  using Shape = PrefillShape<D>;
  CUDA_CHECK(cudaFuncSetAttribute(prefill_attention_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  Shape::kSmemBytes));
  const dim3 grid(query.n_heads, n_work);
  prefill_attention_kernel<D><<<grid, Shape::kThreads, Shape::kSmemBytes, stream>>>(query, kv, chunks, work);
  CUDA_CHECK_LAUNCH(stream, "prefill_attention_kernel");
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
    case 64: return launch<64>(query, kv, chunks, work, n_work, stream);
    case 128: return launch<128>(query, kv, chunks, work, n_work, stream);
    default: fail("prefill attention: head_dim {} is not supported (64 or 128)", query.head_dim);
  }
}

}  // namespace kvq::cuda
