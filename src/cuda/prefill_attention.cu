// Prefill attention: flash attention (online softmax) over a ragged batch,
// causal by position, GQA, reading keys and values through the page table with
// the loader of kv_page_loader.cuh. Tensor cores through mma.sync m16n8k16.
//
// A block owns a tile of query rows of one chunk and one query head; each warp
// owns 16 * kMTiles rows. Per key tile of kBlockN keys: S = Q K^T (fp32), mask,
// online softmax in the log2 domain, P (fp16, straight from the accumulators)
// times V. The next key tile is copied while the current one is used.
#include <algorithm>
#include <cfloat>

#include "core/error.h"
#include "cuda/attention.h"
#include "cuda/cuda_check.h"
#include "cuda/kv_page_loader.cuh"
#include "cuda/mma.cuh"

namespace kvq::cuda {
namespace {

template <int D>
struct PrefillTraits;
template <>
struct PrefillTraits<64> {
  static constexpr int kWarps = 4, kMTiles = 2, kBlockN = 64;
};
template <>
struct PrefillTraits<128> {
  static constexpr int kWarps = 4, kMTiles = 1, kBlockN = 64;
};

template <int D>
struct PrefillShape {
  using T = PrefillTraits<D>;
  static constexpr int kThreads = T::kWarps * 32;
  static constexpr int kWarpRows = 16 * T::kMTiles;
  static constexpr int kBlockM = T::kWarps * kWarpRows;
  static constexpr int kBlockN = T::kBlockN;
  // sQ (kBlockM, D), sK 2 x (kBlockN, D), sV 2 x (kBlockN, D) fp16, then the loader's staging
  static constexpr int kTileBytes = (kBlockM + 4 * kBlockN) * D * 2;
  static constexpr int kSmemBytes = kTileBytes + Fp16PageLoader<D, kBlockN, kThreads>::kStagingBytes;
};

template <int D>
__global__ void __launch_bounds__(PrefillShape<D>::kThreads, 2)
    prefill_attention_kernel(AttentionQuery query, PagedKv kv, const AttentionChunk* chunks, const PrefillWork* work) {
  using Shape = PrefillShape<D>;
  constexpr int kMT = PrefillTraits<D>::kMTiles;
  constexpr int kBlockM = Shape::kBlockM, kBlockN = Shape::kBlockN, kThreads = Shape::kThreads;
  using Loader = Fp16PageLoader<D, kBlockN, kThreads>;

  extern __shared__ __align__(128) unsigned char smem[];
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

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int warp_row0 = warp * Shape::kWarpRows;

  // Q tile (rows past the chunk zero-filled), then the first key tile.
  const __half* q_base = query.q + static_cast<int64_t>(chunk.first_row + item.q_begin) * query.q_stride + head * D;
#pragma unroll
  for (int j = 0; j < kBlockM * D / 8 / kThreads; ++j) {
    const int i = threadIdx.x + j * kThreads;
    const int r = i / (D / 8), c = i % (D / 8);
    const bool valid = r < q_rows;
    cp_async_16(sQ + tile_offset<D>(r, c * 8), valid ? q_base + static_cast<int64_t>(r) * query.q_stride + c * 8 : query.q,
                valid);
  }
  Loader::issue(kv, pages, kv_head, 0, n_keys, sK, sV, staging);
  cp_async_commit();

  float o[kMT][D / 8][4];
  float row_max[kMT][2], row_sum[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.0f;
  }
  const float scale_log2 = query.scale * 1.4426950408889634f;
  const int warp_last_pos = q_pos0 + warp_row0 + Shape::kWarpRows - 1;

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int k0 = tile * kBlockN;
    __half* sKt = sK + (tile & 1) * kBlockN * D;
    __half* sVt = sV + (tile & 1) * kBlockN * D;
    cp_async_wait<0>();
    __syncthreads();
    Loader::finish(k0, n_keys, sKt, staging);
    __syncthreads();
    if (tile + 1 < n_tiles) {
      Loader::issue(kv, pages, kv_head, k0 + kBlockN, n_keys, sK + ((tile + 1) & 1) * kBlockN * D,
                    sV + ((tile + 1) & 1) * kBlockN * D, staging);
    }
    cp_async_commit();
    if (k0 > warp_last_pos) continue;  // every key of the tile is in this warp's future

    float s[kMT][kBlockN / 8][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int n = 0; n < kBlockN / 8; ++n) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.0f;

#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        ldmatrix_x4(a[mt], sQ + tile_offset<D>(warp_row0 + mt * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8));
      }
#pragma unroll
      for (int nn = 0; nn < kBlockN / 16; ++nn) {
        uint32_t b[4];
        ldmatrix_x4(b, sKt + tile_offset<D>(nn * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 16 + ((lane >> 3) & 1) * 8));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816(s[mt][2 * nn], a[mt], b[0], b[1]);
          mma_16816(s[mt][2 * nn + 1], a[mt], b[2], b[3]);
        }
      }
    }

    const bool need_mask = k0 + kBlockN - 1 > q_pos0 + warp_row0 || k0 + kBlockN > n_keys;
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int q_pos = q_pos0 + warp_row0 + mt * 16 + g + hr * 8;
        float tile_max = -INFINITY;
#pragma unroll
        for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int key = k0 + n * 8 + 2 * t + e;
            float v = s[mt][n][hr * 2 + e] * scale_log2;
            if (need_mask && (key > q_pos || key >= n_keys)) v = -INFINITY;
            s[mt][n][hr * 2 + e] = v;
            tile_max = fmaxf(tile_max, v);
          }
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        // Tile 0 holds key 0, visible to every row, so new_max is finite from then on.
        const float new_max = fmaxf(row_max[mt][hr], tile_max);
        const float correction = exp2f(row_max[mt][hr] - new_max);
        row_max[mt][hr] = new_max;
        float sum = 0.0f;
#pragma unroll
        for (int n = 0; n < kBlockN / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float p = exp2f(s[mt][n][hr * 2 + e] - new_max);
            s[mt][n][hr * 2 + e] = p;
            sum += p;
          }
        }
        row_sum[mt][hr] = row_sum[mt][hr] * correction + sum;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          o[mt][n][hr * 2] *= correction;
          o[mt][n][hr * 2 + 1] *= correction;
        }
      }
    }

#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t p[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        p[mt][0] = pack_half2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        p[mt][1] = pack_half2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        p[mt][2] = pack_half2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        p[mt][3] = pack_half2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, sVt + tile_offset<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dn * 16 + (lane >> 4) * 8));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816(o[mt][2 * dn], p[mt], b[0], b[1]);
          mma_16816(o[mt][2 * dn + 1], p[mt], b[2], b[3]);
        }
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float sum = row_sum[mt][hr];
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      const int r = warp_row0 + mt * 16 + g + hr * 8;
      if (r >= q_rows) continue;
      const float inv = 1.0f / sum;
      __half* out = query.out + static_cast<int64_t>(chunk.first_row + item.q_begin + r) * query.out_stride + head * D;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        *reinterpret_cast<uint32_t*>(out + n * 8 + 2 * t) = pack_half2(o[mt][n][hr * 2] * inv, o[mt][n][hr * 2 + 1] * inv);
      }
    }
  }
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
