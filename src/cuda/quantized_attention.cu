// Split-K attention over quantized pages and exact rows (quantized_attention.h).
//
// A block takes one split (a key range of one query row, one source) of one KV
// head with every query head of the group; head_dim / 8 lanes (a lane group)
// read a key row, 8 elements each. Two kernels over the same split array, each
// skipping the other's splits, write the partial results in decode attention's
// format (decode_partials.cuh), which launch_decode_combine merges:
//
// page_split_kernel (splits of the pages): a cp.async pipeline of kStages
// stages, each the whole K and V blocks (codes, row and group parameters,
// outlier slots: contiguous per block) of `pages_per_stage` consecutive pages of
// the sequence, copied with 16-byte cp.async by the whole block. Once a stage
// has landed (block barrier), the block indexes each staged block's outlier
// slots by row in shared memory (index_outlier_rows, a second barrier), then
// lane group g takes the stage's rows g, g + kKeyGroups, ...: decode_chunk8
// from shared memory (bit-equal to PageCodec::decode; calibrated key ranges and
// codebooks copied to shared memory once per block), outliers put back
// (apply_outliers8), pre-RoPE keys rotated in fp32 with (cos, sin) stepped in
// registers, and accumulate_keys, the online softmax the fp16 decode kernel
// runs, kRowsPerIteration rows at a time so that their latencies overlap. The
// next stages' copies are in flight meanwhile. Keys of a staged page outside
// the split (a split starting or ending mid-page) are masked.
//
// exact_split_kernel (sinks, the exact tail window, the step's own rows): fp16
// rows from this step's K/V or the sequence's exact-row store, one key per lane
// group at a time (short ranges: at most the window per row).
#include "cuda/quantized_attention.h"

#include <algorithm>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/decode_partials.cuh"
#include "cuda/kv_dequant.cuh"
#include "cuda/kv_page_loader.cuh"

namespace kvq::cuda {
namespace {

constexpr int kThreads = 128;

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

// Where a thread sits: head_dim / 8 lanes (a lane group) read a key row, lane `sub` its elements c0 .. c0 + 7;
// key_group numbers the block's lane groups.
struct LanePlace {
  int sub, c0, key_group;
};
template <int D>
__device__ __forceinline__ LanePlace lane_place() {
  constexpr int kLanes = D / 8;
  const int thread = static_cast<int>(threadIdx.x), lane = thread % 32, sub = lane % kLanes;
  return {sub, sub * 8, thread / 32 * (32 / kLanes) + lane / kLanes};
}

constexpr int kStages = 3;  // page stages: kStages - 1 in flight while one is decoded
constexpr int kRowsPerIteration = 2;  // rows a lane group decodes and accumulates together (instruction-level parallelism)

// The page kernel's shared memory, sized on the host (page_stage_shape), in this order:
//   stages:     kStages x pages_per_stage x (K block, V block) of the KV head, 16-byte aligned;
//   row_first:  pages_per_stage x 2 (K, V) x (page_size + 1) ints, the staged blocks' outlier index;
//   calib:      key_lo (D), key_hi (D), key codebook (16), value codebook (16), then for decode_packed8: the
//               keys' per-channel span (D) and both codebooks' centre + 1 (16 each) floats; 16-byte aligned.
// After the loop the block merge (kSplitMergeFloats) reuses it from the start.
struct PageStageShape {
  int32_t pages_per_stage;
  int32_t pair_bytes;   // K block + V block bytes of one page and KV head
  int32_t stage_bytes;  // pages_per_stage * pair_bytes
  int32_t row_first_offset;
  int32_t calib_offset;
  int32_t smem_bytes;
};

constexpr int kCodebookFloats = 16;  // 2^bits, bits <= 4
constexpr int calib_floats(int head_dim) { return 3 * head_dim + 4 * kCodebookFloats; }

// The packed formats with calibrated key ranges (int, nuq without --kscale page), the common case, decoded
// with per-channel constants hoisted out of the key loop: element j = lo[j] + x * span[j] with x the code
// (int) or its codebook centre + 1 (nuq), span (hi - lo) / levels or (hi - lo) / 2. These are decode_chunk8's
// fp32 operations with the same roundings (uniform_decode, codebook_decode), so the result is bit-equal.
template <int kBits, bool kCodebook>
__device__ __forceinline__ void decode_packed8(uint32_t codes, const float* centre_plus_one, const float (&lo)[8],
                                               const float (&span)[8], float (&out)[8]) {
  constexpr uint32_t kMask = (1u << kBits) - 1;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const uint32_t code = (codes >> (kBits * j)) & kMask;
    const float x = kCodebook ? centre_plus_one[code] : static_cast<float>(code);
    out[j] = __fadd_rn(lo[j], __fmul_rn(x, span[j]));
  }
}

// Keys and values of one row (8 elements each) by decode_packed8: the keys' lo and span per channel from
// shared memory, the values' from the row's (lo, hi).
template <int kBits, bool kCodebook>
__device__ __forceinline__ void decode_packed_row(const PageBlockLayout& key_layout, const uint8_t* key_block,
                                                  const PageBlockLayout& value_layout, const uint8_t* value_block,
                                                  int row, int c0, const float* s_calib, int head_dim, float (&k)[8],
                                                  float (&v)[8]) {
  const int64_t element = int64_t{row} * head_dim + c0;
  const float4* key_lo = reinterpret_cast<const float4*>(s_calib + c0);
  const float4* key_span = reinterpret_cast<const float4*>(s_calib + 2 * head_dim + 2 * kCodebookFloats + c0);
  const float4 lo0 = key_lo[0], lo1 = key_lo[1], span0 = key_span[0], span1 = key_span[1];
  const float klo[8] = {lo0.x, lo0.y, lo0.z, lo0.w, lo1.x, lo1.y, lo1.z, lo1.w};
  const float kspan[8] = {span0.x, span0.y, span0.z, span0.w, span1.x, span1.y, span1.z, span1.w};
  const float* key_table = s_calib + 3 * head_dim + 2 * kCodebookFloats;
  decode_packed8<kBits, kCodebook>(load_codes8<kBits>(key_block + key_layout.codes_offset, element), key_table, klo,
                                   kspan, k);
  const uint32_t p = reinterpret_cast<const uint32_t*>(value_block + value_layout.row_params_offset)[row];
  const float lo = half_bits_to_float(p & 0xffff), hi = half_bits_to_float(p >> 16);
  const float span = kCodebook ? codebook_half_span(lo, hi) : uniform_step(lo, hi, kBits);
  const float vlo[8] = {lo, lo, lo, lo, lo, lo, lo, lo};
  const float vspan[8] = {span, span, span, span, span, span, span, span};
  decode_packed8<kBits, kCodebook>(load_codes8<kBits>(value_block + value_layout.codes_offset, element),
                                   key_table + kCodebookFloats, vlo, vspan, v);
}

// Resident blocks per multiprocessor the page kernel is compiled for: at most 128, 168 or 256 registers.
constexpr int page_min_blocks(int max_group) { return max_group >= 8 ? 2 : max_group >= 4 ? 3 : 4; }

template <int D, int kMaxGroup, int kBits>
__global__ void __launch_bounds__(kThreads, page_min_blocks(kMaxGroup))
    page_split_kernel(AttentionQuery query, QuantizedPagedKv kv, const AttentionChunk* rows, const QuantizedSplit* splits,
                      PageStageShape shape, DecodeWorkspace ws) {
  constexpr int kLanes = D / 8;  // lanes per key row
  constexpr int kKeyGroups = kThreads / kLanes;
  extern __shared__ uint4 s_dynamic[];
  uint8_t* smem = reinterpret_cast<uint8_t*>(s_dynamic);

  const int split_index = blockIdx.x;
  const int kv_head = blockIdx.y;
  const QuantizedSplit split = splits[split_index];
  if (split.exact || split.key_begin == split.key_end) return;  // exact_split_kernel's, or padding
  const AttentionChunk row = rows[split.row];
  const int group = query.n_heads / kv.n_kv_heads;
  const auto [sub, c0, key_group] = lane_place<D>();
  const PageBlockLayout& key_layout = kv.key_layout;
  const PageBlockLayout& value_layout = kv.value_layout;
  const int page_size = key_layout.page_size;
  const int key_bytes = key_layout.block_bytes;
  const int64_t page_bytes = int64_t{kv.n_kv_heads} * (key_layout.block_bytes + value_layout.block_bytes);
  const int64_t key_block_offset = int64_t{kv_head} * key_bytes;
  const int64_t value_block_offset = int64_t{kv.n_kv_heads} * key_bytes + int64_t{kv_head} * value_layout.block_bytes;
  const int32_t* pages = kv.page_table + row.page_offset;
  const int first_page = split.key_begin / page_size;
  const int n_pages = (split.key_end - 1) / page_size + 1 - first_page;
  const int n_stages = (n_pages + shape.pages_per_stage - 1) / shape.pages_per_stage;  // uniform over the block

  // Stage s: pages first_page + s * pages_per_stage + j, j < pages_per_stage, each (K block, V block); 16-byte
  // chunks spread over the block's threads (block_bytes are multiples of 16).
  const int key_chunks = key_bytes / 16, pair_chunks = shape.pair_bytes / 16;
  auto issue = [&](int s) {
    uint8_t* stage = smem + (s % kStages) * shape.stage_bytes;
    const int stage_pages = min(shape.pages_per_stage, n_pages - s * shape.pages_per_stage);
    for (int c = threadIdx.x; c < stage_pages * pair_chunks; c += kThreads) {
      const int j = c / pair_chunks, chunk = c - j * pair_chunks;
      const int64_t page = __ldg(pages + first_page + s * shape.pages_per_stage + j);
      const uint8_t* block = kv.pool + page * page_bytes +
                             (chunk < key_chunks ? key_block_offset + chunk * 16 : value_block_offset + (chunk - key_chunks) * 16);
      cp_async_16(stage + j * shape.pair_bytes + chunk * 16, block, true);
    }
  };
  issue(0);
  cp_async_commit();
#pragma unroll
  for (int s = 1; s < kStages - 1; ++s) {
    if (s < n_stages) issue(s);
    cp_async_commit();
  }

  // Calibration in shared memory (read for every key): this KV head's key ranges and both codebooks.
  float* s_calib = reinterpret_cast<float*>(smem + shape.calib_offset);
  const BlockCalibration global_key_calib = block_calibration(kv.calib, key_layout, kv_head);
  const BlockCalibration global_value_calib = block_calibration(kv.calib, value_layout, kv_head);
  const bool codebook = key_layout.scheme == KvScheme::nonuniform;
  // decode_packed_row serves int and nuq pages with calibrated key ranges; the rest go through decode_chunk8.
  const bool packed = (key_layout.scheme == KvScheme::uniform || codebook) && !key_layout.per_page_key_ranges &&
                      global_key_calib.key_lo != nullptr;
  for (int i = threadIdx.x; i < D; i += kThreads) {
    if (global_key_calib.key_lo) {
      const float lo = global_key_calib.key_lo[i], hi = global_key_calib.key_hi[i];
      s_calib[i] = lo;
      s_calib[D + i] = hi;
      s_calib[2 * D + 2 * kCodebookFloats + i] = codebook ? codebook_half_span(lo, hi) : uniform_step(lo, hi, kBits);
    }
  }
  if (threadIdx.x < kCodebookFloats && threadIdx.x < (1 << kBits)) {
    float* centres_plus_one = s_calib + 3 * D + 2 * kCodebookFloats;
    if (global_key_calib.codebook) {
      s_calib[2 * D + threadIdx.x] = global_key_calib.codebook[threadIdx.x];
      centres_plus_one[threadIdx.x] = __fadd_rn(global_key_calib.codebook[threadIdx.x], 1.0f);
    }
    if (global_value_calib.codebook) {
      s_calib[2 * D + kCodebookFloats + threadIdx.x] = global_value_calib.codebook[threadIdx.x];
      centres_plus_one[kCodebookFloats + threadIdx.x] = __fadd_rn(global_value_calib.codebook[threadIdx.x], 1.0f);
    }
  }
  const BlockCalibration key_calib{global_key_calib.key_lo ? s_calib : nullptr, global_key_calib.key_lo ? s_calib + D : nullptr,
                                   global_key_calib.codebook ? s_calib + 2 * D : nullptr};
  const BlockCalibration value_calib{nullptr, nullptr,
                                     global_value_calib.codebook ? s_calib + 2 * D + kCodebookFloats : nullptr};
  int* row_first = reinterpret_cast<int*>(smem + shape.row_first_offset);  // (pages_per_stage, 2, page_size + 1)
  const bool key_outliers = key_layout.outlier_capacity > 0, value_outliers = value_layout.outlier_capacity > 0;

  float q[kMaxGroup][8];
  load_scaled_query<D, kMaxGroup>(query, row, kv_head, group, c0, q);
  float m[kMaxGroup], l[kMaxGroup], acc[kMaxGroup][8];
  init_running_softmax<kMaxGroup>(m, l, acc);
  float2 step[4];  // (cos, sin) of kKeyGroups positions: a lane group's next key
  if (kv.rotate_keys) {
    const float2* angles = kv.rope + int64_t{kKeyGroups} * (D / 2) + sub * 4;
#pragma unroll
    for (int j = 0; j < 4; ++j) step[j] = __ldg(angles + j);
  }

  // The loop bounds are uniform over the block: the barriers and the shuffles need every thread.
  for (int s = 0; s < n_stages; ++s) {
    cp_async_wait<kStages - 2>();  // stage s has landed (this thread's chunks)
    __syncthreads();               // ... and every thread's; every thread is done with stage s - 1
    if (s + kStages - 1 < n_stages) issue(s + kStages - 1);  // into stage s - 1's buffer
    cp_async_commit();
    const uint8_t* stage = smem + (s % kStages) * shape.stage_bytes;
    const int stage_pages = min(shape.pages_per_stage, n_pages - s * shape.pages_per_stage);
    if (key_outliers || value_outliers) {
      for (int j = 0; j < stage_pages; ++j) {
        const uint8_t* key_block = stage + j * shape.pair_bytes;
        const uint8_t* value_block = key_block + key_bytes;
        int* first = row_first + j * 2 * (page_size + 1);
        if (key_outliers) {
          index_outlier_rows(outlier_slots(key_layout, key_block), outlier_count(key_layout, key_block), D, page_size,
                             first, threadIdx.x, kThreads);
        }
        if (value_outliers) {
          index_outlier_rows(outlier_slots(value_layout, value_block), outlier_count(value_layout, value_block), D,
                             page_size, first + page_size + 1, threadIdx.x, kThreads);
        }
      }
      __syncthreads();  // the index is complete
    }

    // This lane group's rows of the stage, kRowsPerIteration at a time: t = key_group + i * kKeyGroups at
    // page j = t / page_size and row r = t % page_size (advanced without divisions), position stage_pos + t; the
    // loop ends with the split's keys in the stage (a bound uniform over the block). A row outside the split
    // decodes the stage's first row instead (staged and indexed whatever the split), masked: every iteration
    // decodes without branches, so the compiler interleaves the rows' loads, shuffles and exponentials.
    const int stage_pos = (first_page + s * shape.pages_per_stage) * page_size;
    const int stage_end = min(split.key_end, stage_pos + stage_pages * page_size);
    int j = key_group / page_size, r = key_group % page_size;
    float2 cs[4];
    if (kv.rotate_keys) {
      const int pos = stage_pos + key_group;
      const float2* angles = kv.rope + static_cast<int64_t>(pos < split.key_end ? pos : split.key_begin) * (D / 2) + sub * 4;
#pragma unroll
      for (int p = 0; p < 4; ++p) cs[p] = __ldg(angles + p);
    }
    for (int t = key_group; t - key_group < stage_end - stage_pos; t += kRowsPerIteration * kKeyGroups) {
      float k[kRowsPerIteration][8], v[kRowsPerIteration][8];
      bool valid[kRowsPerIteration];
#pragma unroll
      for (int u = 0; u < kRowsPerIteration; ++u) {
        const int pos = stage_pos + t + u * kKeyGroups;
        valid[u] = pos >= split.key_begin && pos < stage_end;
        const int page = valid[u] ? j : 0, row = valid[u] ? r : 0;
        const uint8_t* key_block = stage + page * shape.pair_bytes;
        const uint8_t* value_block = key_block + key_bytes;
        if (packed && codebook) {
          decode_packed_row<kBits, true>(key_layout, key_block, value_layout, value_block, row, c0, s_calib, D, k[u], v[u]);
        } else if (packed) {
          decode_packed_row<kBits, false>(key_layout, key_block, value_layout, value_block, row, c0, s_calib, D, k[u], v[u]);
        } else {
          decode_chunk8<kBits>(key_layout, key_block, row, c0, key_calib, k[u]);
          decode_chunk8<kBits>(value_layout, value_block, row, c0, value_calib, v[u]);
        }
        const int* first = row_first + page * 2 * (page_size + 1);
        if (key_outliers) apply_outliers8(outlier_slots(key_layout, key_block), first, row, c0, D, k[u]);
        if (value_outliers) apply_outliers8(outlier_slots(value_layout, value_block), first + page_size + 1, row, c0, D, v[u]);
        if (kv.rotate_keys) {
          rotate8(cs, k[u]);
          step_angles(cs, step);
        }
        for (r += kKeyGroups; r >= page_size; r -= page_size) ++j;
      }
      accumulate_keys<kLanes, kMaxGroup, kRowsPerIteration>(q, k, v, valid, group, m, l, acc);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every thread is done with the stages before the merge reuses them

  write_split_partial<D, kMaxGroup, kKeyGroups, kThreads>(m, l, acc, reinterpret_cast<float*>(smem), key_group, sub,
                                                          group, kv_head, split_index, query.n_heads, ws);
}

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

// Packed schemes decode with their own bits; the others ignore kBits (4 compiles their paths).
int bits_bucket(const PageBlockLayout& layout) {
  const bool packed = layout.scheme == KvScheme::uniform || layout.scheme == KvScheme::nonuniform ||
                      layout.scheme == KvScheme::kivi;
  return packed ? layout.bits : 4;
}

// Rows per page stage at least (pages_per_stage = ceil(kStageRows / page_size)): 8 keys per lane group at
// head_dim 64, 16 at 128, between the stage barriers; page 16, nuq3-1%, head_dim 64: 7.4 KB a stage.
constexpr int kStageRows = 128;
constexpr int kMaxSharedBytes = 227 * 1024;  // per block, H100

PageStageShape page_stage_shape(const QuantizedPagedKv& kv, int head_dim, int merge_bytes) {
  const PageBlockLayout& key = kv.key_layout;
  const PageBlockLayout& value = kv.value_layout;
  if (key.block_bytes % 16 != 0 || value.block_bytes % 16 != 0) {
    fail("quantized attention: blocks of {} and {} bytes (multiples of 16 expected)", key.block_bytes, value.block_bytes);
  }
  PageStageShape shape;
  shape.pages_per_stage = std::max(1, (kStageRows + key.page_size - 1) / key.page_size);
  shape.pair_bytes = key.block_bytes + value.block_bytes;
  shape.stage_bytes = shape.pages_per_stage * shape.pair_bytes;
  shape.row_first_offset = kStages * shape.stage_bytes;
  shape.calib_offset = (shape.row_first_offset + shape.pages_per_stage * 2 * (key.page_size + 1) * 4 + 15) / 16 * 16;
  shape.smem_bytes = std::max(shape.calib_offset + calib_floats(head_dim) * 4, merge_bytes);
  if (shape.smem_bytes > kMaxSharedBytes) {
    fail("quantized attention: pages of {} rows need {} bytes of shared memory per block (at most {})", key.page_size,
         shape.smem_bytes, kMaxSharedBytes);
  }
  return shape;
}

// The page and exact split kernels over the same splits; each block of either kernel returns at once on
// the other's splits.
template <int D, int kMaxGroup, int kBits>
void launch_bits(const AttentionQuery& query, const QuantizedPagedKv& kv, const AttentionChunk* rows,
                 const ExactSource* sources, const QuantizedSplit* splits, int32_t n_splits, DecodeWorkspace ws,
                 cudaStream_t stream) {
  const dim3 grid(n_splits, kv.n_kv_heads);
  constexpr int kMergeBytes = kSplitMergeFloats<D, kMaxGroup, kThreads / (D / 8)> * 4;
  const PageStageShape shape = page_stage_shape(kv, D, kMergeBytes);
  auto* page_kernel = page_split_kernel<D, kMaxGroup, kBits>;
  if (shape.smem_bytes > 48 * 1024) {
    CUDA_CHECK(cudaFuncSetAttribute(page_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shape.smem_bytes));
  }
  page_kernel<<<grid, kThreads, shape.smem_bytes, stream>>>(query, kv, rows, splits, shape, ws);
  CUDA_CHECK_LAUNCH(stream, "page_split_kernel");
  exact_split_kernel<D, kMaxGroup><<<grid, kThreads, 0, stream>>>(query, kv, rows, sources, splits, ws);
  CUDA_CHECK_LAUNCH(stream, "exact_split_kernel");
}

template <int D, int kMaxGroup>
void launch_group(int bits, const AttentionQuery& query, const QuantizedPagedKv& kv, const AttentionChunk* rows,
                  const ExactSource* sources, const QuantizedSplit* splits, int32_t n_splits, DecodeWorkspace ws,
                  cudaStream_t stream) {
  switch (bits) {
    case 2: return launch_bits<D, kMaxGroup, 2>(query, kv, rows, sources, splits, n_splits, ws, stream);
    case 3: return launch_bits<D, kMaxGroup, 3>(query, kv, rows, sources, splits, n_splits, ws, stream);
    case 4: return launch_bits<D, kMaxGroup, 4>(query, kv, rows, sources, splits, n_splits, ws, stream);
    default: fail("quantized attention: {}-bit codes are not supported", bits);
  }
}

template <int D>
void launch_head_dim(int bucket, int bits, const AttentionQuery& query, const QuantizedPagedKv& kv,
                     const AttentionChunk* rows, const ExactSource* sources, const QuantizedSplit* splits,
                     int32_t n_splits, DecodeWorkspace ws, cudaStream_t stream) {
  switch (bucket) {
    case 1: return launch_group<D, 1>(bits, query, kv, rows, sources, splits, n_splits, ws, stream);
    case 4: return launch_group<D, 4>(bits, query, kv, rows, sources, splits, n_splits, ws, stream);
    case 8: return launch_group<D, 8>(bits, query, kv, rows, sources, splits, n_splits, ws, stream);
    default: fail("quantized attention: unsupported group bucket {}", bucket);
  }
}

}  // namespace

bool quantized_attention_supported(int head_dim, int group) {
  return (head_dim == 64 || head_dim == 128) && group_bucket(group) > 0;
}

int64_t quantized_attention_workspace_bytes(int32_t n_splits, int n_heads, int head_dim) {
  return decode_workspace_bytes(n_splits, n_heads, head_dim);
}

std::vector<QuantizedAttentionPlan> plan_quantized_attention(const std::vector<AttentionChunk>& chunks,
                                                             const std::vector<int32_t>& chunk_slots,
                                                             const KvCacheOptions& options, int page_size,
                                                             int n_kv_heads, int n_sms) {
  std::vector<QuantizedAttentionPlan> plans;
  if (chunks.empty()) return plans;
  if (chunk_slots.size() != chunks.size()) fail("quantized attention: {} slots for {} chunks", chunk_slots.size(), chunks.size());
  // Splits of at most split_keys keys, sized so the step's blocks fill about two waves of 8 resident blocks
  // per multiprocessor (at least 128 keys, so short rows stay one split).
  int64_t total_keys = 0;
  for (const AttentionChunk& c : chunks) {
    const int64_t n = c.n_tokens;
    total_keys += n * c.start_pos + n * (n + 1) / 2;
  }
  const int64_t slots = int64_t{8} * std::max(n_sms, 1);
  const int64_t target = (total_keys * n_kv_heads + 2 * slots - 1) / (2 * slots);
  const int64_t split_keys = std::max<int64_t>(128, (target + 63) / 64 * 64);
  const int sinks = options.effective_sinks();

  plans.emplace_back();
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
      // The rule of CpuBackend::attention: sinks and [exact_from, pos] exactly, the keys between from the pages.
      const int64_t n_keys = pos + 1;
      const int64_t n_sinks = std::min<int64_t>(sinks, n_keys);
      const int64_t exact_from = std::clamp<int64_t>(options.exact_from(pos, c.start_pos, page_size), n_sinks, n_keys);
      // Page ranges are cut at page starts (a multiple of page_size keys apart, so no two splits stage the same
      // page but the one a cut cannot avoid); exact ranges anywhere.
      auto add = [&](int64_t begin, int64_t end, int exact) {
        if (begin >= end) return;
        const int64_t count = (end - begin + split_keys - 1) / split_keys;
        int64_t size = (end - begin + count - 1) / count;
        if (!exact) size = (size + page_size - 1) / page_size * page_size;
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
                                const DecodeChunk* combine, int32_t n_rows, void* workspace, cudaStream_t stream) {
  if (n_splits == 0) return;
  const int group = query.n_heads / kv.n_kv_heads;
  if (query.n_heads % kv.n_kv_heads != 0 || !quantized_attention_supported(query.head_dim, group)) {
    fail("quantized attention: head_dim {} with {} query heads per KV head is not supported (64 or 128, at most 8)",
         query.head_dim, group);
  }
  if (kv.key_layout.head_dim != query.head_dim || kv.value_layout.head_dim != query.head_dim) {
    fail("quantized attention: pages of head_dim {} for queries of head_dim {}", kv.key_layout.head_dim, query.head_dim);
  }
  if (bits_bucket(kv.key_layout) != bits_bucket(kv.value_layout)) fail("quantized attention: keys and values differ in bits");
  const DecodeWorkspace ws = split_workspace(workspace, n_splits, query.n_heads, query.head_dim);
  const int bits = bits_bucket(kv.key_layout);
  if (query.head_dim == 64) {
    launch_head_dim<64>(group_bucket(group), bits, query, kv, rows, sources, splits, n_splits, ws, stream);
  } else {
    launch_head_dim<128>(group_bucket(group), bits, query, kv, rows, sources, splits, n_splits, ws, stream);
  }
  launch_decode_combine(query, rows, combine, n_rows, n_splits, workspace, stream);
}

}  // namespace kvq::cuda
