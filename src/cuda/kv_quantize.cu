// Quantize-on-write and whole-block dequantization of KV pages (kv_quantize.h).
//
// One CTA encodes one run (the rows one launch writes into one block); warps encode rows in parallel, 4 channels a
// lane (two rows a warp at head_dim 64, one at 128), each lane packing its codes into one field that neighbouring
// lanes merge into the row's words by shuffles. Two kernel families:
// - int / nuq (calibrated ranges, outlier slots, sinks), one instance per bit width: rows go a round at a time (one
//   row a warp-half); each row's outlier candidates are found, the round's wants published in shared memory, and
//   after one CTA barrier every row takes its slots from a prefix sum over the rows before it (a row takes
//   min(candidates, free) slots, largest magnitude first; the rest are clamped and counted), which is exactly the
//   order the CPU codec fills them in, then encodes. --kscale page keys take their outliers the same way, then
//   per-channel ranges over the page's other elements, then codes. Rows a run routes to the page scratch are also
//   stored there decoded (KvDecodedRows) by the lanes that encoded them, and every key row of a consecutive run
//   exactly, rotated, where the prefill kernel's band tiles copy them from; the key rows' lanes also rotate the
//   step's queries of their KV head in place.
// - the other formats (fp16, fp8, q8_0, q4_0, KIVI): per row, or KIVI keys per channel over 32-row groups.
// One kernel for all formats, slots counted in a first pass over the rows and handed out by one warp before a
// second, executed 668 instructions a row at llama2-7b nuq3-1% (Nsight Compute: formats' branches, the pass over
// the rows twice); this split, with the packing and bisection below, 501 (kvq-gpu-bench --parts quantize,
// llama2-7b 4 x 2048 nuq3-1%: 0.392 -> 0.337 ms; q4_0 0.208 -> 0.146; H100, 2026-11-28).
//
// Bit-exactness with the CPU codec (built with -ffp-contract=off): fp32
// arithmetic uses the explicitly rounded intrinsics, which nvcc never fuses;
// min/max reductions return the element a sequential scan would keep (the
// first or last of equal values, which matters for the sign of zero); the
// values' outlier limit is an fp32 estimate when it provably sorts every
// element of the row as the CPU's limit does, else from a double sum of
// squares that provably rounds to the CPU's limit, or else is summed again in
// the CPU's order.
#include "cuda/kv_quantize.h"

#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <type_traits>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/decode_partials.cuh"
#include "cuda/kv_dequant.cuh"
#include "engine/step_batch.h"
#include "kv/page_tables.h"

namespace kvq::cuda {
namespace {

// int / nuq: CodeRange{lo, hi}.encode in two steps, so a range's scale is computed once: the scale
// (UniformRange's inv_step = levels / (hi - lo), or the codebook's 2 / (hi - lo); 0 for an empty range),
// then the code. code_scale is also run on the host for the calibrated key ranges: a lone subtraction
// and division, which no compiler contracts, round the same everywhere.
__host__ __device__ inline float code_scale(float lo, float hi, bool uniform, int bits) {
  if (uniform) {
    const float span = hi - lo;
    return span > 0 ? static_cast<float>((1 << bits) - 1) / span : 0.0f;
  }
  return hi > lo ? 2.0f / (hi - lo) : 0.0f;
}
}  // namespace

PageBlockLayout page_block_layout(const PageCodec& codec) {
  PageBlockLayout layout{};
  layout.scheme = codec.format().scheme;
  layout.kind = codec.kind();
  layout.bits = codec.format().bits;
  layout.page_size = codec.page_size();
  layout.head_dim = codec.head_dim();
  layout.rows_per_group = codec.rows_per_group();
  layout.per_page_key_ranges = codec.per_page_key_ranges() ? 1 : 0;
  layout.outlier_capacity = codec.outlier_capacity();
  layout.codes_offset = static_cast<int32_t>(codec.codes_offset());
  layout.row_params_offset = static_cast<int32_t>(codec.row_params_offset());
  layout.group_params_offset = static_cast<int32_t>(codec.group_params_offset());
  layout.outliers_offset = static_cast<int32_t>(codec.outliers_offset());
  layout.block_bytes = static_cast<int32_t>(codec.block_bytes());
  return layout;
}

DeviceCalibration::DeviceCalibration(const std::vector<LayerCalibration>& layers, const KvFormat& format, int kv_dim) {
  if (!format.calibrated() || layers.empty()) return;
  const bool codebooks = format.scheme == KvScheme::nonuniform;
  const size_t codebook = size_t{1} << format.bits;
  const bool uniform = format.scheme == KvScheme::uniform;
  const size_t per_layer = 3 * size_t(kv_dim) + (codebooks ? 2 * codebook : 0);
  std::vector<float> host(per_layer * layers.size());
  for (size_t i = 0; i < layers.size(); ++i) {
    float* dst = host.data() + i * per_layer;
    std::copy_n(layers[i].key_lo, kv_dim, dst);
    std::copy_n(layers[i].key_hi, kv_dim, dst + kv_dim);
    for (int c = 0; c < kv_dim; ++c) dst[2 * kv_dim + c] = code_scale(layers[i].key_lo[c], layers[i].key_hi[c], uniform, format.bits);
    if (codebooks) {
      // The GPU counts the midpoints below a value, which equals the CPU's upward scan only if they ascend.
      for (const float* centres : {layers[i].key_codebook, layers[i].value_codebook}) {
        if (!std::is_sorted(centres, centres + codebook)) fail("--kv {}: layer {}'s codebook is not ascending", format.name, i);
      }
      std::copy_n(layers[i].key_codebook, codebook, dst + 3 * kv_dim);
      std::copy_n(layers[i].value_codebook, codebook, dst + 3 * kv_dim + codebook);
    }
  }
  CUDA_CHECK(cudaMalloc(&storage_, host.size() * sizeof(float)));
  CUDA_CHECK(cudaMemcpy(storage_, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice));
  for (size_t i = 0; i < layers.size(); ++i) {
    const float* base = storage_ + i * per_layer;
    layers_.push_back({base, base + kv_dim, base + 2 * kv_dim, codebooks ? base + 3 * kv_dim : nullptr,
                       codebooks ? base + 3 * kv_dim + codebook : nullptr, layers[i].value_threshold});
  }
}

DeviceCalibration::~DeviceCalibration() {
  if (storage_) cudaFree(storage_);  // no throwing from a destructor
}

KvWritePlan plan_kv_writes(const StepBatch& batch, const PageTables& tables, const PageBlockLayout& key_layout,
                           const PageBlockLayout& value_layout, int n_kv_heads, int sinks, const KvRowSource& source,
                           int64_t row_stride, const KvBlockOffset& block_offset) {
  const int page_size = tables.page_size();
  if (row_stride <= 0 || row_stride > INT32_MAX) fail("KV writes: a row stride of {} elements", row_stride);
  KvWritePlan plan;
  for (size_t c = 0; c < batch.chunks.size(); ++c) {
    const SequenceChunk& chunk = batch.chunks[c];
    const int64_t end = chunk.start_pos + chunk.n_tokens;
    for (KvKind kind : {KvKind::key, KvKind::value}) {
      const int group = (kind == KvKind::key ? key_layout : value_layout).rows_per_group;
      const int64_t first = chunk.start_pos / group * group;
      const int64_t last = end / group * group;  // groups complete by the end of the step
      for (int64_t page_start = first / page_size * page_size; page_start < last; page_start += page_size) {
        const int64_t lo = std::max(first, page_start), hi = std::min(last, page_start + page_size);
        if (lo >= hi) continue;
        const int32_t page = tables.locate(chunk.seq, lo).page;
        for (int h = 0; h < n_kv_heads; ++h) {
          KvWriteRun run{block_offset(kind, page, h), kConsecutiveRows, static_cast<int32_t>(hi - lo),
                         static_cast<int32_t>(kind), h};
          run.chunk = static_cast<int32_t>(c);
          run.first_pos = static_cast<int32_t>(lo);
          if (lo >= chunk.start_pos) {
            run.src = source(chunk, lo, kind, h);
            // The kernel reads row i at src + i * stride: a source laid out otherwise would corrupt blocks silently.
            if (source(chunk, hi - 1, kind, h) != run.src + (hi - 1 - lo) * row_stride) {
              fail("KV writes: rows {}..{} of sequence {} are not {} elements apart", lo, hi - 1, chunk.seq,
                   row_stride);
            }
            run.src_stride = static_cast<int32_t>(row_stride);
            run.step_row = static_cast<int32_t>(chunk.first_row + (lo - chunk.start_pos));
            run.first_page_row = static_cast<int32_t>(lo % page_size);
            run.n_sinks = static_cast<int32_t>(std::clamp<int64_t>(sinks - lo, 0, hi - lo));
          } else {
            run.first_row = static_cast<int32_t>(plan.rows.size());
            run.step_row = -1;
            for (int64_t pos = lo; pos < hi; ++pos) {
              plan.rows.push_back(
                  {source(chunk, pos, kind, h), static_cast<int32_t>(pos % page_size), pos < sinks ? 1 : 0});
            }
          }
          plan.runs.push_back(run);
        }
      }
    }
  }
  return plan;
}

bool kv_quantize_supported(int head_dim) { return head_dim == 64 || head_dim == 128; }

bool kv_quantize_decodes_rows(const PageBlockLayout& key_layout, const PageBlockLayout& value_layout) {
  const auto per_row = [](const PageBlockLayout& layout) {
    return (layout.scheme == KvScheme::uniform || layout.scheme == KvScheme::nonuniform) && !layout.per_page_key_ranges;
  };
  return per_row(key_layout) && per_row(value_layout);
}

namespace {

// Threads a CTA: kThreads, or at head_dim 64 kFewRunsThreads for a launch of few runs (KvQuantizeCtas), which
// encodes more rows of a run at once where the SMs would otherwise sit idle (quantize_run's kCtaThreads).
constexpr int kThreads = 128;
constexpr int kFewRunsThreads = 512;
constexpr int kMaxCodebook = 16;

// A lane encodes kLaneChannels = 4 consecutive channels of a row, so a row takes head_dim / 4 lanes: at head_dim
// 64 half a warp, and a warp encodes two rows at once, its reductions, ballots and packing shuffles (most of a
// row's instructions there) serving both. Against a whole warp a row (2 channels a lane; kvq-gpu-bench --parts
// quantize, H100, 2026-11-27): nuq3-1% 0.52 -> 0.35 ms, q4_0 0.35 -> 0.165 (smollm2 64 x 2048). Two rows a warp
// at head_dim 128 (8 channels a lane) made q4_0 faster (0.24 -> 0.13 ms, llama2-7b 4 x 2048) but int and nuq
// 10-20% slower, so 128 keeps a warp a row. Nor does a warp take two of its rows a round one after the other
// (one barrier for both, their chains interleaved): the unrolled rows doubled the code the loop runs, and the
// int/nuq kernel, whose hot code is ~24 KB, then waited on its instruction cache (no-instruction stalls 10% -> 35%
// of samples), 0.353 -> 0.60 ms at llama2-7b 4 x 2048 nuq3-1% (Nsight Compute, H200, 2026-11-28;
// docs/results/2026-11-28-s24/two_rows_a_lane.patch). Every shuffle stays within its row's lanes (width kLanes);
// both rows of a warp run every warp-wide instruction, so rows that differ (a sink beside an ordinary row) take the
// same path and differ in data.
constexpr int kLaneChannels = 4;
template <int kHeadDim>
struct RowShape {
  static constexpr int kLanes = kHeadDim / kLaneChannels;
  static constexpr int kRowsPerWarp = 32 / kLanes;
  // Per CTA, at most: head_dim 128 has no few-run kernel. (Sized for kFewRunsThreads, its row scratch left room
  // for 7 blocks a multiprocessor, not the 8 its registers allow, once the decoded rows' tables were added:
  // llama2-7b 4 x 2048 nuq3-1% quantize 0.430 ms, sized for its own 4 rows 0.401; kvq-gpu-bench --parts quantize,
  // H100, 2026-11-28, two calls whose main measured 0.380 and 0.382.)
  static constexpr int kMaxRowsInFlight = (kHeadDim == 64 ? kFewRunsThreads : kThreads) / 32 * kRowsPerWarp;
};
// Where a lane sits: its row among the warp's (half) and its place in the row (sub: channels sub * 4 ..).
struct RowLane {
  int half, sub;
};
template <int kLanes>
__device__ __forceinline__ RowLane row_lane(int lane) {
  return {lane / kLanes, lane % kLanes};
}
// The bits of a ballot that belong to the lane's row.
template <int kLanes>
__device__ __forceinline__ unsigned row_bits(unsigned ballot, int lane) {
  if constexpr (kLanes == 32) {
    return ballot;
  } else {
    return ballot >> (lane / kLanes * kLanes) & ((1u << kLanes) - 1u);
  }
}

// A thread's place in a CTA of kCtaThreads threads encoding rows of head_dim kHeadDim (RowShape): its warp, its
// lane and where that sits in its row; the CTA has kRowsInFlight rows in flight.
template <int kHeadDim, int kCtaThreads>
struct CtaLane {
  static constexpr int kLanes = RowShape<kHeadDim>::kLanes;
  static constexpr int kRowsPerWarp = RowShape<kHeadDim>::kRowsPerWarp;
  static constexpr int kRowsInFlight = kCtaThreads / 32 * kRowsPerWarp;
  static_assert(kRowsInFlight <= RowShape<kHeadDim>::kMaxRowsInFlight, "a row scratch per row in flight");
  int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  RowLane at = row_lane<kLanes>(lane);
};

// ---- element encoders (twins of scalar_codecs.cpp and page_codec.cpp) ----

// The nuq code of t: the CPU scans up while t > mids[code] (ties go to the lower centre); the midpoints
// ascend, so its scan stops at the number of midpoints below t, which a bisection over the 2^k - 1 midpoints finds
// in k steps: each compares t with the median of those left and adds the half below it. Counting compared t with
// every midpoint (nuq3 11% of the quantize kernel's instructions, Nsight Compute); against it the bisection in
// shared memory took quantize from 0.449 to 0.430 ms at nuq3-1% and from 0.516 to 0.445 at nuq4-1% (llama2-7b 4 x
// 2048; smollm2-135m 64 x 2048 0.402 -> 0.376 and 0.474 -> 0.379; kvq-gpu-bench --parts quantize, H100,
// 2026-11-28). At 2 and 3 bits the midpoints sit in registers and each step's is picked by selects (a dependent
// shared-memory load and its address a step before, ~20 instructions an element at nuq3 against ~9); nuq4's 15
// stay in shared memory (in registers, by selects, they spilled).
template <int kMids>
__device__ __forceinline__ uint32_t count_midpoints_below(float t, const float* mids) {
  static_assert((kMids & (kMids + 1)) == 0, "2^k - 1 midpoints");
  uint32_t code = 0;  // midpoints [0, code) lie below t; [code, code + 2n - 1) are undecided
#pragma unroll
  for (uint32_t n = (kMids + 1) / 2; n > 0; n /= 2) code += t > mids[code + n - 1] ? n : 0u;
  return code;
}
__device__ __forceinline__ uint32_t count_midpoints_below(float t, const float (&m)[3]) {
  const bool above1 = t > m[1];
  const bool above_next = t > (above1 ? m[2] : m[0]);
  return (above1 ? 2u : 0u) + (above_next ? 1u : 0u);
}
__device__ __forceinline__ uint32_t count_midpoints_below(float t, const float (&m)[7]) {
  const bool above3 = t > m[3];
  const bool above_second = t > (above3 ? m[5] : m[1]);
  const bool above_third = t > (above3 ? (above_second ? m[6] : m[4]) : (above_second ? m[2] : m[0]));
  return (above3 ? 4u : 0u) + (above_second ? 2u : 0u) + (above_third ? 1u : 0u);
}
template <int E, int kMids>
__device__ __forceinline__ void encode_nonuniform(const float (&x)[E], const float (&lo)[E], const float (&scale)[E],
                                                  const float* shared_mids, uint8_t (&codes)[E]) {
  float mids[kMids <= 7 ? kMids : 1];  // 2 and 3 bits: in registers
  if constexpr (kMids <= 7) {
#pragma unroll
    for (int j = 0; j < kMids; ++j) mids[j] = shared_mids[j];
  }
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const float t = fminf(fmaxf(__fsub_rn(__fmul_rn(__fsub_rn(x[e], lo[e]), scale[e]), 1.0f), -1.0f), 1.0f);
    if constexpr (kMids <= 7) {
      codes[e] = static_cast<uint8_t>(count_midpoints_below(t, mids));
    } else {
      codes[e] = static_cast<uint8_t>(count_midpoints_below<kMids>(t, shared_mids));
    }
  }
}
// Codes of E elements with ranges (lo, scale) from code_scale. mids (2^bits - 1): midpoints between the
// codebook's neighbours (nuq).
template <int E, int kBits>
__device__ __forceinline__ void encode_scaled(const float (&x)[E], const float (&lo)[E], const float (&scale)[E],
                                              bool uniform, const float* mids, uint8_t (&codes)[E]) {
  if (uniform) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const float q = rintf(__fmul_rn(__fsub_rn(x[e], lo[e]), scale[e]));
      codes[e] = static_cast<uint8_t>(fminf(fmaxf(q, 0.0f), levels_of(kBits)));
    }
  } else {
    encode_nonuniform<E, (1 << kBits) - 1>(x, lo, scale, mids, codes);
  }
}

// KIVI's AsymmetricGroup: fp16 (scale, min) packed as scale | min << 16, codes from the rounded parameters.
struct AsymmetricParams {
  uint32_t packed;
  float scale, min;
};
__device__ __forceinline__ AsymmetricParams asymmetric_params(float mn, float mx, float levels) {
  const uint16_t scale_bits = float_to_half_bits(__fdiv_rn(__fsub_rn(mx, mn), levels));
  const uint16_t min_bits = float_to_half_bits(mn);
  return {static_cast<uint32_t>(scale_bits) | static_cast<uint32_t>(min_bits) << 16, half_bits_to_float(scale_bits),
          half_bits_to_float(min_bits)};
}
__device__ __forceinline__ uint32_t asymmetric_encode(float x, const AsymmetricParams& p, float levels) {
  const float q = p.scale > 0 ? rintf(__fdiv_rn(__fsub_rn(x, p.min), p.scale)) : 0.0f;
  return static_cast<uint32_t>(fminf(fmaxf(q, 0.0f), levels));
}

// Key outlier candidates: outside the calibrated range, by how far relative to the range (only
// candidates are ranked, so only they pay for the division).
__device__ __forceinline__ bool key_candidate(float x, float lo, float hi, float& magnitude) {
  const float below = __fsub_rn(lo, x), above = __fsub_rn(x, hi);
  const float excess = below < above ? above : below;  // std::max(below, above)
  if (!(excess > 0)) {
    magnitude = 0;
    return false;
  }
  const float span = __fsub_rn(hi, lo);
  magnitude = span > 0 ? __fdiv_rn(excess, span) : excess;
  return true;
}

// ---- warp reductions that keep the element a sequential scan keeps ----

// An element of a reduction: `key` is compared, `payload` is carried; index -1 = none.
struct Extreme {
  float key, payload;
  int index;
};
// Sequential std::min / std::max keep the first of equal values; std::minmax_element keeps the last largest.
template <bool kMax, bool kLast>
__device__ __forceinline__ Extreme better(const Extreme& a, const Extreme& b) {
  if (a.index < 0) return b;
  if (b.index < 0) return a;
  if (kMax ? b.key > a.key : b.key < a.key) return b;
  if (kMax ? a.key > b.key : a.key < b.key) return a;
  return (kLast ? b.index > a.index : b.index < a.index) ? b : a;
}
// Over groups of `width` lanes (a power of two, aligned).
template <bool kMax, bool kLast>
__device__ __forceinline__ Extreme reduce_extreme(Extreme e, int width) {
  for (int offset = 1; offset < width; offset <<= 1) {
    const Extreme other{__shfl_xor_sync(0xffffffffu, e.key, offset), __shfl_xor_sync(0xffffffffu, e.payload, offset),
                        __shfl_xor_sync(0xffffffffu, e.index, offset)};
    e = better<kMax, kLast>(e, other);
  }
  return e;
}
// What a sequential std::min (kMax false) or std::max scan in channel order keeps of the included
// elements, over groups of `width` lanes, each lane holding E consecutive channels from c0; +-infinity when
// none is included, as the scan starts there. Equal values have equal bits except +0 and -0, so a plain
// reduction decides unless the extreme is zero; then the first (kLast: last) zero met gives the sign.
template <int E, bool kMax, bool kLast>
__device__ __forceinline__ float scan_extreme(const float (&x)[E], const bool (&include)[E], int c0, int width) {
  float v = kMax ? -INFINITY : INFINITY;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    if (include[e]) v = kMax ? fmaxf(v, x[e]) : fminf(v, x[e]);
  }
  for (int offset = 1; offset < width; offset <<= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = kMax ? fmaxf(v, other) : fminf(v, other);
  }
  if (__all_sync(0xffffffffu, v != 0.0f)) return v;
  Extreme zero{0.0f, 0.0f, -1};
#pragma unroll
  for (int e = 0; e < E; ++e) {
    if (include[e] && x[e] == 0.0f) zero = better<kMax, kLast>(zero, Extreme{0.0f, x[e], c0 + e});
  }
  zero = reduce_extreme<kMax, kLast>(zero, width);
  return v != 0.0f ? v : zero.payload;
}

__device__ __forceinline__ float reduce_max(float v, int width) {
  for (int offset = 1; offset < width; offset <<= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// ---- shared memory ----

// Per row in flight (warp * kRowsPerWarp + half, RowShape) of an int / nuq run.
template <int kHeadDim>
struct RowScratch {
  float x[kHeadDim];                    // the row, fp32 (16-byte aligned: the size is a multiple of 16)
  float candidate_magnitude[kHeadDim];  // the row's outlier candidates, in no particular order
  uint8_t candidate_channel[kHeadDim];
};
// Per CTA of an int / nuq run; the rows in flight's wants (bytes: a row wants at most head_dim <= 128 slots) by
// the parity of the round (RoundPlace).
template <int kHeadDim>
struct CalibratedScratch {
  RowScratch<kHeadDim> row[RowShape<kHeadDim>::kMaxRowsInFlight];
  float key_lo[kHeadDim], key_hi[kHeadDim], key_scale[kHeadDim];  // the run's KV head's calibrated key ranges
  float key_span[kHeadDim];                                       // their packed_span (rows stored decoded)
  float page_lo[kHeadDim], page_scale[kHeadDim];                  // --kscale page: the page's own ranges
  float mids[kMaxCodebook];                                       // codebook midpoints
  float decode_x[kMaxCodebook];                                   // packed_x of each code (KvDecodedRows)
  uint8_t wants[2][RowShape<kHeadDim>::kMaxRowsInFlight];
  // Then, dynamically sized from kRowTableOffset: the run's rows (page_size KvWriteRow), then (--kscale page keys)
  // the stored bits (page_size * head_dim / 32 words).
};
// Per CTA of the other formats' runs.
template <int kHeadDim>
struct PeerScratch {
  uint8_t group_codes[32 * kHeadDim];  // KIVI keys: one group's codes (32, head_dim)
  // Then, dynamically sized from kRowTableOffset: the run's rows (page_size KvWriteRow).
};
template <class Scratch>
constexpr size_t kRowTableOffset = (sizeof(Scratch) + 15) / 16 * 16;

template <int kHeadDim>
size_t calibrated_scratch_bytes(int page_size) {
  return kRowTableOffset<CalibratedScratch<kHeadDim>> + size_t(page_size) * sizeof(KvWriteRow) +
         size_t(page_size) * kHeadDim / 8;
}
template <int kHeadDim>
size_t peer_scratch_bytes(int page_size) {
  return kRowTableOffset<PeerScratch<kHeadDim>> + size_t(page_size) * sizeof(KvWriteRow);
}

// codes (n) of one row or group, 8-bit each, into whole 32-bit words of the block's stream at `words`
// (n * bits is a multiple of 32: rows start on word boundaries). Threads `thread` of `n_threads`.
__device__ __forceinline__ void pack_words(const uint8_t* codes, int n, int bits, uint32_t* words, int thread,
                                           int n_threads) {
  const int n_words = n * bits / 32;
  for (int w = thread; w < n_words; w += n_threads) {
    const int bit0 = w * 32;
    int i = bit0 / bits;
    const int base = i * bits;
    uint64_t acc = 0;
    for (; i * bits < bit0 + 32; ++i) acc |= static_cast<uint64_t>(codes[i]) << (i * bits - base);
    words[w] = static_cast<uint32_t>(acc >> (bit0 - base));
  }
}

// A row's codes, E = 4 per lane (channels sub * 4 ..), into its words of the block's stream at `words`, laid out
// as pack_words and pack_codes lay them (code c at bits [c * bits, (c + 1) * bits), masked to bits as pack_codes
// masks): a lane's codes are one field of 4 * bits bits, and the fields of a few neighbouring lanes make whole
// words (2 lanes a word at 4 bits, 4 lanes a word at 2 bits, 8 lanes 3 words at 3 bits). Neighbours merge by
// shuffles, doubling the fields a step, and the group's first lane stores its words. A gather of each word from
// the fields overlapping it, shifts computed per lane, took ~80 instructions a row at 3 bits (Nsight Compute,
// llama2-7b nuq3-1%).
template <int E, int kBits, int kLanes>
__device__ __forceinline__ void pack_row_codes(const uint8_t (&codes)[E], uint32_t* words, int sub) {
  static_assert(E == 4 && kLanes % 8 == 0, "a lane's field is 4 codes; groups of 8 lanes stay within a row");
  constexpr unsigned kFull = 0xffffffffu;
  uint32_t field = 0;
#pragma unroll
  for (int e = 0; e < E; ++e) field |= (codes[e] & ((1u << kBits) - 1u)) << (e * kBits);
  if constexpr (kBits == 4) {
    const uint32_t word = field | __shfl_down_sync(kFull, field, 1, kLanes) << 16;
    if (sub % 2 == 0) words[sub / 2] = word;
  } else if constexpr (kBits == 2) {
    uint32_t word = field | __shfl_down_sync(kFull, field, 1, kLanes) << 8;
    word |= __shfl_down_sync(kFull, word, 2, kLanes) << 16;
    if (sub % 4 == 0) words[sub / 4] = word;
  } else {
    static_assert(kBits == 3, "2, 3 or 4 bits");
    const uint32_t pair = field | __shfl_down_sync(kFull, field, 1, kLanes) << 12;                    // 24 bits
    const uint64_t quad = pair | static_cast<uint64_t>(__shfl_down_sync(kFull, pair, 2, kLanes)) << 24;  // 48 bits
    const uint32_t low = static_cast<uint32_t>(quad), high = static_cast<uint32_t>(quad >> 32);
    const uint32_t next_low = __shfl_down_sync(kFull, low, 4, kLanes);
    const uint32_t next_high = __shfl_down_sync(kFull, high, 4, kLanes);
    if (sub % 8 == 0) {  // 96 bits: this quad, then the next lane group's at bit 48
      uint32_t* group = words + sub / 8 * 3;
      group[0] = low;
      group[1] = high | next_low << 16;
      group[2] = next_low >> 16 | next_high << 16;
    }
  }
}
// The same for the layout's bits: 2, 3 or 4, the packed schemes' and q4_0's (fp16, fp8 and q8_0 rows are stored
// before any packing).
template <int E, int kLanes>
__device__ __forceinline__ void pack_row_codes(const uint8_t (&codes)[E], int bits, uint32_t* words, int sub) {
  switch (bits) {
    case 2: return pack_row_codes<E, 2, kLanes>(codes, words, sub);
    case 3: return pack_row_codes<E, 3, kLanes>(codes, words, sub);
    default: return pack_row_codes<E, 4, kLanes>(codes, words, sub);
  }
}

template <int kHeadDim>
__device__ __forceinline__ uint32_t* row_words(const PageBlockLayout& layout, uint8_t* block, int row, int bits) {
  return reinterpret_cast<uint32_t*>(block + layout.codes_offset + row * (kHeadDim / 8 * bits));
}

// The lane's 4 consecutive fp16 elements (channels sub * 4 ..) of a row, as loaded, so a loop can have the
// next rows' loads in flight while it encodes these.
__device__ __forceinline__ uint2 load_row_raw(const uint16_t* src, int sub) {
  return reinterpret_cast<const uint2*>(src)[sub];
}
__device__ __forceinline__ uint16_t raw_bits(uint2 raw, int e) {
  return static_cast<uint16_t>((e < 2 ? raw.x : raw.y) >> (16 * (e % 2)));
}
__device__ __forceinline__ void unpack_row(uint2 raw, float (&x)[kLaneChannels]) {
#pragma unroll
  for (int e = 0; e < kLaneChannels; ++e) x[e] = half_bits_to_float(raw_bits(raw, e));
}
// The row a lane encodes in a loop whose warp takes rows base + half (half < kRowsPerWarp), then kRowsInFlight
// further: past the run's end (an odd last row at head_dim 64) both halves take the last row, so every lane has
// a row and the warp stays converged for its shuffles; they compute the same bytes and store them to the same
// places.
// With one row a warp (kRowsPerWarp 1) that is `base` itself: with the clamp there (and the sink flag loaded at
// the end of the first pass) the head_dim 128 kernel executed 6% more instructions than before two rows a warp
// (Nsight Compute: the loops' shared-memory addresses were recomputed every row) and nuq3-1% took 0.45 ms
// instead of 0.43; without both, 0.43 (llama2-7b 4 x 2048, H100).
template <int kRowsPerWarp>
__device__ __forceinline__ int row_of(int base, int half, int n_rows) {
  if constexpr (kRowsPerWarp == 1) {
    return base;
  } else {
    return min(base + half, n_rows - 1);
  }
}
// The load of that row for the loop's step at `base`; nothing past the run.
template <int kRowsPerWarp>
__device__ __forceinline__ uint2 prefetch_row(const KvWriteRow* rows, int base, int n_rows, RowLane at) {
  return base < n_rows ? load_row_raw(rows[row_of<kRowsPerWarp>(base, at.half, n_rows)].src, at.sub) : make_uint2(0, 0);
}

struct KernelArgs {
  uint8_t* pool;
  PageBlockLayout layouts[2];  // by KvKind
  DeviceLayerCalibration calib;
  const KvWriteRun* runs;
  const KvWriteRow* rows;
  unsigned long long* outlier_counts;  // (2)
  KvDecodedRows decoded;
  int32_t queries_per_kv_head;  // decoded.n_heads / decoded.n_kv_heads
};

// A run's layout, its block, and its rows, listed or consecutive, in one table in shared memory past the kernel's
// Scratch that the loops read (the caller synchronizes before reading it). Computing a consecutive run's rows
// where they are read instead took 128 registers at head_dim 128 (nuq3-1% 0.63 ms against 0.40), or bounded to 64
// ran 12% slower (kvq-gpu-bench --parts quantize, llama2-7b 4 x 2048, H100, 2026-11-27).
struct RunRows {
  const PageBlockLayout& layout;
  uint8_t* block;
  KvWriteRow* rows;  // (layout.page_size)
};
template <class Scratch, int kCtaThreads>
__device__ __forceinline__ RunRows load_run_rows(const KernelArgs& args, const KvWriteRun& run, unsigned char* shared) {
  KvWriteRow* rows = reinterpret_cast<KvWriteRow*>(shared + kRowTableOffset<Scratch>);
  for (int i = threadIdx.x; i < run.n_rows; i += kCtaThreads) rows[i] = run_row(run, args.rows, i);
  return {args.layouts[run.kind], args.pool + run.block_offset, rows};
}

// ---- the other formats' runs: fp16, fp8, q8_0, q4_0, KIVI (no outliers, no sinks) ----

// One row, by its lanes (RowShape); at head_dim 64 the warp's other half encodes another row (or the same one)
// alongside, so every path below is taken by the whole warp.
template <int kHeadDim>
__device__ void encode_peer_row(const PageBlockLayout& layout, uint8_t* block, int row, uint2 raw, int lane) {
  constexpr int E = kLaneChannels;
  constexpr int kLanes = RowShape<kHeadDim>::kLanes;
  const RowLane at = row_lane<kLanes>(lane);
  const int64_t first = int64_t{row} * kHeadDim;
  uint8_t* codes = block + layout.codes_offset;
  uint8_t* row_params = block + layout.row_params_offset;
  float x[E];
  unpack_row(raw, x);
  const int c0 = at.sub * E;
  uint8_t row_codes[E];  // q4_0 and KIVI: the lane's codes
  switch (layout.scheme) {
    case KvScheme::fp16: {
      uint16_t* halves = reinterpret_cast<uint16_t*>(codes) + first + c0;
#pragma unroll
      for (int e = 0; e < E; ++e) halves[e] = raw_bits(raw, e);
      return;
    }
    case KvScheme::fp8: {
      float amax = 0;
#pragma unroll
      for (int e = 0; e < E; ++e) amax = fmaxf(amax, fabsf(x[e]));
      amax = reduce_max(amax, kLanes);
      const uint16_t scale_bits = float_to_half_bits(__fdiv_rn(amax, 448.0f));
      if (at.sub == 0) reinterpret_cast<uint16_t*>(row_params)[row] = scale_bits;
      const float scale = half_bits_to_float(scale_bits);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        codes[first + c0 + e] = scale > 0 ? __nv_cvt_float_to_fp8(__fdiv_rn(x[e], scale), __NV_SATFINITE, __NV_E4M3) : 0;
      }
      return;
    }
    default: {  // q8_0, q4_0, KIVI values: per 32-channel block of the row, 32 / E lanes
      const int width = 32 / E;
      const int block32 = c0 / 32;
      const bool leader = lane % width == 0;
      if (layout.scheme == KvScheme::kivi) {
        bool all[E];
#pragma unroll
        for (int e = 0; e < E; ++e) all[e] = true;
        const float mn = scan_extreme<E, false, false>(x, all, c0, width);  // std::minmax_element: first smallest,
        const float mx = scan_extreme<E, true, true>(x, all, c0, width);    // last largest
        const float levels = levels_of(layout.bits);
        const AsymmetricParams p = asymmetric_params(mn, mx, levels);
        if (leader) reinterpret_cast<uint32_t*>(row_params)[int64_t{row} * (kHeadDim / 32) + block32] = p.packed;
#pragma unroll
        for (int e = 0; e < E; ++e) row_codes[e] = static_cast<uint8_t>(asymmetric_encode(x[e], p, levels));
      } else if (layout.scheme == KvScheme::q8_0) {
        float amax = 0;
#pragma unroll
        for (int e = 0; e < E; ++e) amax = fmaxf(amax, fabsf(x[e]));
        amax = reduce_max(amax, width);
        const float d = __fdiv_rn(amax, 127.0f);
        const float id = d != 0 ? __fdiv_rn(1.0f, d) : 0.0f;
        if (leader) reinterpret_cast<uint16_t*>(row_params)[int64_t{row} * (kHeadDim / 32) + block32] = float_to_half_bits(d);
#pragma unroll
        for (int e = 0; e < E; ++e) {
          codes[first + c0 + e] = static_cast<uint8_t>(static_cast<int8_t>(roundf(__fmul_rn(x[e], id))));
        }
        return;
      } else {  // q4_0: d from the element of largest magnitude (the first of equals), with its sign
        Extreme amax{0.0f, 0.0f, -1};
#pragma unroll
        for (int e = 0; e < E; ++e) {
          if (fabsf(x[e]) > (amax.index < 0 ? 0.0f : amax.key)) amax = Extreme{fabsf(x[e]), x[e], c0 + e};
        }
        amax = reduce_extreme<true, false>(amax, width);
        const float max = amax.index < 0 ? 0.0f : amax.payload;
        const float d = __fdiv_rn(max, -8.0f);
        const float id = d != 0 ? __fdiv_rn(1.0f, d) : 0.0f;
        if (leader) reinterpret_cast<uint16_t*>(row_params)[int64_t{row} * (kHeadDim / 32) + block32] = float_to_half_bits(d);
#pragma unroll
        for (int e = 0; e < E; ++e) {
          const int q = static_cast<int8_t>(__float2int_rz(__fadd_rn(__fmul_rn(x[e], id), 8.5f)));
          row_codes[e] = static_cast<uint8_t>(min(15, q));
        }
      }
      break;
    }
  }
  pack_row_codes<E, kLanes>(row_codes, layout.bits, row_words<kHeadDim>(layout, block, row, layout.bits), at.sub);
}

// KIVI keys: every 32-row group of the run, per channel (scale, min) over the group.
template <int kHeadDim>
__device__ void encode_kivi_key_groups(const PageBlockLayout& layout, uint8_t* block, const KvWriteRun& run,
                                       const KvWriteRow* rows, PeerScratch<kHeadDim>& scratch) {
  const float levels = levels_of(layout.bits);
  for (int g = 0; g < run.n_rows; g += 32) {
    const KvWriteRow* group = rows + g;
    const int row0 = group[0].page_row;
    for (int c = threadIdx.x; c < kHeadDim; c += blockDim.x) {
      float x[32];
#pragma unroll
      for (int r = 0; r < 32; ++r) x[r] = half_bits_to_float(group[r].src[c]);
      float mn = x[0], mx = x[0];
#pragma unroll
      for (int r = 1; r < 32; ++r) {
        mn = x[r] < mn ? x[r] : mn;  // std::min, std::max
        mx = mx < x[r] ? x[r] : mx;
      }
      const AsymmetricParams p = asymmetric_params(mn, mx, levels);
      reinterpret_cast<uint32_t*>(block + layout.group_params_offset)[int64_t{row0 / 32} * kHeadDim + c] = p.packed;
#pragma unroll
      for (int r = 0; r < 32; ++r) scratch.group_codes[r * kHeadDim + c] = static_cast<uint8_t>(asymmetric_encode(x[r], p, levels));
    }
    __syncthreads();
    pack_words(scratch.group_codes, 32 * kHeadDim, layout.bits, row_words<kHeadDim>(layout, block, row0, layout.bits),
               threadIdx.x, blockDim.x);
    __syncthreads();
  }
}

template <int kHeadDim, int kCtaThreads>
__device__ __forceinline__ void quantize_peer_run(const KernelArgs& args) {
  using Cta = CtaLane<kHeadDim, kCtaThreads>;
  extern __shared__ __align__(16) unsigned char shared[];
  const KvWriteRun run = args.runs[blockIdx.x];
  if (run.n_rows == 0) return;  // padding
  const auto [layout, block, rows] = load_run_rows<PeerScratch<kHeadDim>, kCtaThreads>(args, run, shared);
  __syncthreads();
  if (layout.scheme == KvScheme::kivi && layout.kind == KvKind::key) {
    encode_kivi_key_groups<kHeadDim>(layout, block, run, rows, *reinterpret_cast<PeerScratch<kHeadDim>*>(shared));
    return;
  }
  const Cta cta;
  const int first_base = cta.warp * Cta::kRowsPerWarp;  // the warp's rows: + half, then kRowsInFlight on
  uint2 raw = prefetch_row<Cta::kRowsPerWarp>(rows, first_base, run.n_rows, cta.at);
  for (int base = first_base; base < run.n_rows; base += Cta::kRowsInFlight) {
    const uint2 next = prefetch_row<Cta::kRowsPerWarp>(rows, base + Cta::kRowsInFlight, run.n_rows, cta.at);
    encode_peer_row<kHeadDim>(layout, block, rows[row_of<Cta::kRowsPerWarp>(base, cta.at.half, run.n_rows)].page_row,
                              raw, cta.lane);
    raw = next;
  }
}

// ---- int / nuq runs (calibrated ranges, outlier slots, sinks) ----

// Where a run's rows go as the prefill kernel's tiles hold them (KvDecodedRows), resolved once per run: row i's
// page-tile row at page_rows + i head_dim (i < n_page_rows), its rotated key at rotated_keys + i rotated_stride,
// the angles to rotate keys and queries by at angles + i head_dim / 2; and the n_queries queries of a key row's
// KV head, first at its src + query_offset.
struct RunTileRows {
  __half* page_rows;     // null: none
  int32_t n_page_rows;
  __half* rotated_keys;  // null: none
  int32_t rotated_stride;
  int32_t n_queries;     // 0: none
  int32_t query_offset;  // elements
  const float2* angles;  // null: not rotated (values, keys after RoPE)
};
template <int kHeadDim>
__device__ __forceinline__ RunTileRows run_tile_rows(const KernelArgs& args, const KvWriteRun& run) {
  const KvDecodedRows& decoded = args.decoded;
  const bool key = run.kind == static_cast<int32_t>(KvKind::key);
  RunTileRows rows{nullptr, run.scratch_rows, nullptr, decoded.n_kv_heads * kHeadDim, 0, 0, nullptr};
  if (run.scratch_rows > 0) {
    rows.page_rows = (key ? decoded.keys : decoded.values) + (int64_t{run.kv_head} * decoded.n_rows + run.scratch_row) * kHeadDim;
  }
  if (key && run.first_row == kConsecutiveRows) {
    if (decoded.rotated_keys != nullptr) {
      rows.rotated_keys = decoded.rotated_keys + (int64_t{run.step_row} * decoded.n_kv_heads + run.kv_head) * kHeadDim;
    }
    if (decoded.n_heads > 0) {  // query heads h G .. of KV head h start (h G - n_heads - h) heads from its key
      rows.n_queries = args.queries_per_kv_head;
      rows.query_offset = (run.kv_head * (args.queries_per_kv_head - 1) - decoded.n_heads) * kHeadDim;
    }
  }
  if (key && decoded.rope != nullptr) rows.angles = decoded.rope + int64_t{run.first_pos} * (kHeadDim / 2);
  return rows;
}
// Where row i of a run goes (null: nowhere) and, to rotate keys and queries, the angles of the lane's pairs at the
// row's position, loaded before the row's encoding so that the load's latency passes under it.
struct DecodedRowOut {
  __half* row;          // (head_dim) page-tile row
  __half* rotated_key;  // (head_dim)
  bool rotate;
  float2 angles[kLaneChannels / 2];
};
template <int kHeadDim>
__device__ __forceinline__ DecodedRowOut decoded_row_out(const RunTileRows& rows, int i, int sub) {
  static_assert(kLaneChannels == 4, "a lane's pairs are one 16-byte load");
  DecodedRowOut out{nullptr, nullptr, false, {}};
  if (i < rows.n_page_rows) out.row = rows.page_rows + int64_t{i} * kHeadDim;
  if (rows.rotated_keys != nullptr) out.rotated_key = rows.rotated_keys + int64_t{i} * rows.rotated_stride;
  out.rotate = rows.angles != nullptr && (out.row != nullptr || out.rotated_key != nullptr || rows.n_queries > 0);
  if (out.rotate) {
    const float4 pairs = *reinterpret_cast<const float4*>(rows.angles + int64_t{i} * (kHeadDim / 2) + sub * 2);
    out.angles[0] = make_float2(pairs.x, pairs.y);
    out.angles[1] = make_float2(pairs.z, pairs.w);
  }
  return out;
}

// The lane's E fp32 elements (channels c0 ..) of a row into row + c0 as a tile holds them: keys rotated at the
// row's position in fp32 (out.rotate; as rotate8 pairs them), rounded to fp16.
template <int E>
__device__ __forceinline__ void store_tile_row(const DecodedRowOut& out, __half* row, int c0, float (&v)[E]) {
  static_assert(E % 4 == 0, "whole RoPE pairs, stored 8 bytes at a time");
  if (out.rotate) {
#pragma unroll
    for (int p = 0; p < E / 2; ++p) rotate_pair(v[2 * p], v[2 * p + 1], out.angles[p]);
  }
#pragma unroll
  for (int e = 0; e < E; e += 4) {
    uint2 packed;
    *reinterpret_cast<__half2*>(&packed.x) = __floats2half2_rn(v[e], v[e + 1]);
    *reinterpret_cast<__half2*>(&packed.y) = __floats2half2_rn(v[e + 2], v[e + 3]);
    *reinterpret_cast<uint2*>(row + c0 + e) = packed;
  }
}
// The lane's E elements (channels c0 ..) of an int / nuq row where the row goes (DecodedRowOut): as the prefill
// kernel's page tiles hold them (QuantizedPageProducer::tile_chunk: exact for sinks and the outliers the row
// stored, bit e of `stored`, else decoded from their codes as decode_chunk8 decodes them, lo + x * span with
// packed_x and packed_span of the same fp32 range ends) and, for keys, as its band tiles hold them (exact).
template <int E>
__device__ __forceinline__ void store_tile_rows(const DecodedRowOut& out, int c0, const float* decode_x,
                                                const float (&lo)[E], const float (&span)[E], const float (&x)[E],
                                                bool sink, unsigned stored, const uint8_t (&codes)[E]) {
  if (out.row != nullptr) {
    float v[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
      v[e] = sink || (stored >> e & 1u) ? x[e] : __fadd_rn(lo[e], __fmul_rn(decode_x[codes[e]], span[e]));
    }
    store_tile_row<E>(out, out.row, c0, v);
  }
  if (out.rotated_key != nullptr) {
    float v[E];
#pragma unroll
    for (int e = 0; e < E; ++e) v[e] = x[e];
    store_tile_row<E>(out, out.rotated_key, c0, v);
  }
}

// A key row's queries (RunTileRows::n_queries), the lane's 4 elements of each (channels sub * 4 ..), rotated in
// place as launch_rope_in_place rotates them. first: the first query's elements, loaded ahead (load_row_raw). The
// rows are the QKV GEMM's output, which the launch owns for the step (KvDecodedRows::n_heads), hence the const_cast.
template <int kHeadDim>
__device__ __forceinline__ void rotate_queries(const RunTileRows& rows, const uint16_t* key, uint2 first,
                                               const DecodedRowOut& out, int sub) {
  uint2* query = reinterpret_cast<uint2*>(const_cast<uint16_t*>(key) + rows.query_offset) + sub;
  for (int g = 0; g < rows.n_queries; ++g) {
    uint2 pairs = g == 0 ? first : query[g * kHeadDim / 4];
    __half2* halves = reinterpret_cast<__half2*>(&pairs);
    halves[0] = cpu_rotated_half2(halves[0], out.angles[0]);
    halves[1] = cpu_rotated_half2(halves[1], out.angles[1]);
    query[g * kHeadDim / 4] = pairs;
  }
}

// The value outlier limit of a row, threshold * rms(row), equal to the CPU's to the bit; all the row's lanes get
// it. The CPU sums the squares in double in channel order. The squares of fp16 values are exact in double and
// non-negative, so any summation order lands within 2 * 127 * 2^-53 of the total of the CPU's; the row's lanes
// sum in a tree and, if both ends of a wider interval around its sum give the same limit, that is the CPU's
// limit too (each step from sum to limit is monotone). Otherwise (about once in 30000 rows) the row's first
// lane repeats the CPU's sum in its order.
template <int kHeadDim>
__device__ float exact_value_outlier_limit(const float (&x)[kLaneChannels], float threshold,
                                           RowScratch<kHeadDim>& scratch, RowLane at) {
  constexpr int E = kLaneChannels;
  constexpr int kLanes = RowShape<kHeadDim>::kLanes;
  auto limit_of = [threshold](double sum_sq) {
    return __fmul_rn(threshold, __double2float_rn(__dsqrt_rn(__ddiv_rn(sum_sq, double{kHeadDim}))));
  };
  double tree = 0;
#pragma unroll
  for (int e = 0; e < E; ++e) tree = __dadd_rn(tree, __dmul_rn(double(x[e]), double(x[e])));
  for (int offset = kLanes / 2; offset > 0; offset >>= 1) {
    tree = __dadd_rn(tree, __shfl_xor_sync(0xffffffffu, tree, offset, kLanes));
  }
  constexpr double kMargin = 0x1p-40;  // > 2 * 127 * 2^-53 with room for the rounding of the ends
  const float low = limit_of(__dmul_rn(tree, 1.0 - kMargin)), high = limit_of(__dmul_rn(tree, 1.0 + kMargin));
  if (__all_sync(0xffffffffu, low == high)) return low;  // both rows decided
#pragma unroll
  for (int e = 0; e < E; ++e) scratch.x[at.sub * E + e] = x[e];
  __syncwarp();
  float limit = 0;
  if (at.sub == 0) {
    const float4* x4 = reinterpret_cast<const float4*>(scratch.x);
    double sum_sq = 0;
#pragma unroll 8
    for (int c = 0; c < kHeadDim / 4; ++c) {
      const float4 v = x4[c];
      sum_sq = __dadd_rn(sum_sq, __dmul_rn(double(v.x), double(v.x)));
      sum_sq = __dadd_rn(sum_sq, __dmul_rn(double(v.y), double(v.y)));
      sum_sq = __dadd_rn(sum_sq, __dmul_rn(double(v.z), double(v.z)));
      sum_sq = __dadd_rn(sum_sq, __dmul_rn(double(v.w), double(v.w)));
    }
    limit = limit_of(sum_sq);
  }
  limit = __shfl_sync(0xffffffffu, limit, 0, kLanes);
  __syncwarp();
  return limit;
}

// The value outlier limit of a row, threshold * rms(row), as its elements see it: a limit every element of
// the row is above exactly when it is above the CPU's; all the row's lanes get it.
// First in fp32: the squares of fp16 values are exact in fp32 and non-negative, and every lane's tree adds
// each at most 8 times (E - 1 = 3 in the lane, up to 5 across lanes), so the sum is within (1 +- 2^-24)^8 of
// the exact one; the CPU's double sum is within 2^-45. Through the exact 1 / head_dim, sqrt (halving the relative
// error) and the product with the threshold, each rounded once on either side, the estimate and the CPU's
// limit are within 10 * 2^-24 of each other. If no element of the row lies within 2^-18 of the estimate
// (about 1 row in 10^4 of N(0, 1) has one) and the estimate is far from fp32's underflow and overflow (so
// each rounding is relative), every element compares with the estimate as with the CPU's limit. Otherwise
// the limit itself, to the bit, in double.
template <int kHeadDim>
__device__ float value_outlier_limit(const float (&x)[kLaneChannels], float threshold, RowScratch<kHeadDim>& scratch,
                                     RowLane at) {
  constexpr int E = kLaneChannels;
  constexpr int kLanes = RowShape<kHeadDim>::kLanes;
  float sum_sq = 0;
#pragma unroll
  for (int e = 0; e < E; ++e) sum_sq = __fadd_rn(sum_sq, __fmul_rn(x[e], x[e]));
  for (int offset = kLanes / 2; offset > 0; offset >>= 1) {
    sum_sq = __fadd_rn(sum_sq, __shfl_xor_sync(0xffffffffu, sum_sq, offset, kLanes));
  }
  const float estimate = __fmul_rn(threshold, __fsqrt_rn(__fmul_rn(sum_sq, 1.0f / kHeadDim)));
  const float below = __fmul_rn(estimate, 1.0f - 0x1p-18f), above = __fmul_rn(estimate, 1.0f + 0x1p-18f);
  bool decided = estimate >= 0x1p-100f && estimate <= 0x1p100f;  // false for NaN
#pragma unroll
  for (int e = 0; e < E; ++e) decided = decided && (fabsf(x[e]) < below || fabsf(x[e]) > above);
  if (__all_sync(0xffffffffu, decided)) return estimate;  // both rows decided
  return exact_value_outlier_limit<kHeadDim>(x, threshold, scratch, at);
}

// A row's outlier candidates (a sink's are counted too, and it takes no slot): for each of a lane's elements e,
// the row's lanes whose element e is one; the magnitudes they rank by (candidates only); their number.
struct RowCandidates {
  unsigned ballot[kLaneChannels];
  float magnitude[kLaneChannels];
  int count;
};
template <int kLanes>
__device__ __forceinline__ RowCandidates gather_candidates(const bool (&candidate)[kLaneChannels],
                                                           const float (&magnitude)[kLaneChannels], int lane) {
  RowCandidates c;
  c.count = 0;
#pragma unroll
  for (int e = 0; e < kLaneChannels; ++e) {
    c.ballot[e] = row_bits<kLanes>(__ballot_sync(0xffffffffu, candidate[e]), lane);
    c.magnitude[e] = magnitude[e];
    c.count += __popc(c.ballot[e]);
  }
  return c;
}
// Keys: outside the calibrated range (key_lo, key_hi: the KV head's, in shared memory).
template <int kLanes>
__device__ __forceinline__ RowCandidates key_candidates(const float (&x)[kLaneChannels], const float* key_lo,
                                                        const float* key_hi, int lane) {
  const int c0 = row_lane<kLanes>(lane).sub * kLaneChannels;
  const float4 lo = *reinterpret_cast<const float4*>(key_lo + c0), hi = *reinterpret_cast<const float4*>(key_hi + c0);
  const float los[kLaneChannels] = {lo.x, lo.y, lo.z, lo.w}, his[kLaneChannels] = {hi.x, hi.y, hi.z, hi.w};
  bool candidate[kLaneChannels];
  float magnitude[kLaneChannels];
#pragma unroll
  for (int e = 0; e < kLaneChannels; ++e) candidate[e] = key_candidate(x[e], los[e], his[e], magnitude[e]);
  return gather_candidates<kLanes>(candidate, magnitude, lane);
}
// Values: above the row's limit (value_outlier_limit) in magnitude.
template <int kLanes>
__device__ __forceinline__ RowCandidates value_candidates(const float (&x)[kLaneChannels], float limit, int lane) {
  bool candidate[kLaneChannels];
  float magnitude[kLaneChannels];
#pragma unroll
  for (int e = 0; e < kLaneChannels; ++e) {
    magnitude[e] = fabsf(x[e]);
    candidate[e] = magnitude[e] > limit;
  }
  return gather_candidates<kLanes>(candidate, magnitude, lane);
}

// The block's free slots, handed out in row order a round of rows at a time (RoundPlace) as the rows are
// encoded, so that each row is loaded and its candidates found once. The CPU fills slots one by one, so the
// count after rows 0..i is min(capacity, before + their wants) (once full, it stays full), or stays `before` if
// that already exceeds the capacity. Every thread of the CTA holds the same copy.
struct SlotHandout {
  unsigned before, capacity;
  unsigned wanted;  // by the rows of the rounds so far
  __device__ unsigned used_after(unsigned want) const { return max(before, min(capacity, before + want)); }
};
struct SlotGrant {
  int start, take;  // the row's slots: [start, start + take)
};
// The rows of one round: kRowsInFlight = the CTA's warps x kRowsPerWarp, the warp's first at `first`.
template <int kRowsPerWarp>
struct RoundPlace {
  int first;     // the warp's first row
  bool has_row;  // the warp has a row this round (the same on all its lanes)
  bool own;      // the lane's half has a row of its own (not the last row again: row_of)
  int i;         // the row the lane encodes
  __device__ RoundPlace(int base, int warp, int half, int n_rows)
      : first(base + warp * kRowsPerWarp), has_row(first < n_rows), own(first + half < n_rows),
        i(row_of<kRowsPerWarp>(first, half, n_rows)) {}
};
// One round of the hand-out, called by every thread of the CTA: each row publishes its want (a row's twin in the
// other half, and a warp without a row, want nothing), the CTA waits, and the row's slots follow from the wants of
// the round's rows before it (round slot i - base); the hand-out moves past the round. wants: this round's
// parity's bytes (the other parity's may still be read by warps finishing the last round).
template <int kRowsInFlight, int kRowsPerWarp>
__device__ SlotGrant grant_slots(SlotHandout& handout, uint8_t* wants, int base, const RoundPlace<kRowsPerWarp>& place,
                                 RowLane at, int want) {
  static_assert(kRowsInFlight % 4 == 0, "wants are summed a word of four at a time");
  if (at.sub == 0) wants[threadIdx.x / 32 * kRowsPerWarp + at.half] = place.own ? want : 0;
  __syncthreads();
  const int slot = place.i - base;
  unsigned below = 0, total = 0;
#pragma unroll
  for (int w = 0; w < kRowsInFlight / 4; ++w) {
    const unsigned four = reinterpret_cast<const unsigned*>(wants)[w];
    const int n_below = slot - 4 * w;  // bytes of this word below the row's
    const unsigned mask = n_below >= 4 ? ~0u : n_below <= 0 ? 0u : (1u << (8 * n_below)) - 1u;
    total = __dp4a(four, 0x01010101u, total);
    below = __dp4a(four & mask, 0x01010101u, below);
  }
  const unsigned start = handout.used_after(handout.wanted + below);
  const unsigned end = handout.used_after(handout.wanted + below + want);
  const SlotGrant grant{static_cast<int>(start), static_cast<int>(end - start)};
  handout.wanted += total;
  return grant;
}

// Stores the first grant.take of the row's candidates by (magnitude descending, channel ascending) into slots
// [grant.start, ..) and returns which of the lane's elements it stored (bit e). A lone candidate ranks first (in
// the 1% formats, about half the rows with one have one); otherwise the candidates are listed in scratch first, so
// each ranks itself against the few others rather than against every channel. Where neither of the warp's rows
// has a slot to take, nothing is listed.
template <int kHeadDim>
__device__ unsigned take_outliers(const PageBlockLayout& layout, uint8_t* block, int row, uint2 raw,
                                  const RowCandidates& candidates, SlotGrant grant, RowScratch<kHeadDim>& scratch,
                                  RowLane at) {
  constexpr int E = kLaneChannels;
  if (!__any_sync(0xffffffffu, grant.take > 0)) return 0;
  uint32_t* slots = reinterpret_cast<uint32_t*>(block + layout.outliers_offset + 4);
  unsigned stored = 0;
  const auto store = [&](int e, int rank) {
    if (rank < grant.take) {
      const uint32_t index = static_cast<uint32_t>(row * kHeadDim + at.sub * E + e);
      slots[grant.start + rank] = index | static_cast<uint32_t>(raw_bits(raw, e)) << 16;
      stored |= 1u << e;
    }
  };
  const auto mine = [&](int e) { return (candidates.ballot[e] >> at.sub & 1u) != 0; };
  if (__all_sync(0xffffffffu, candidates.count <= 1)) {
#pragma unroll
    for (int e = 0; e < E; ++e) {
      if (mine(e)) store(e, 0);
    }
    return stored;
  }
  int listed = 0;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    if (mine(e)) {
      const int at_list = listed + __popc(candidates.ballot[e] & ((1u << at.sub) - 1));
      scratch.candidate_channel[at_list] = static_cast<uint8_t>(at.sub * E + e);
      scratch.candidate_magnitude[at_list] = candidates.magnitude[e];
    }
    listed += __popc(candidates.ballot[e]);
  }
  __syncwarp();
#pragma unroll
  for (int e = 0; e < E; ++e) {
    if (!mine(e)) continue;
    const int c = at.sub * E + e;
    int rank = 0;
    for (int j = 0; j < candidates.count; ++j) {
      const float m = scratch.candidate_magnitude[j];
      rank += m > candidates.magnitude[e] || (m == candidates.magnitude[e] && scratch.candidate_channel[j] < c);
    }
    store(e, rank);
  }
  __syncwarp();
  return stored;
}

// The smallest and largest of the lane's elements marked in `kept` (bit e) over the row's kLanes lanes, as
// sequential std::min and std::max scans keep them (scan_extreme); +-infinity when none is. The elements are fp16
// values, so a lane's (min, -max) travel as one half2, one shuffle and one min a step instead of two; an extreme
// of zero, whose sign is the first zero's the scan meets, is left to scan_extreme.
template <int kLanes>
__device__ __forceinline__ void kept_range(uint2 raw, const float (&x)[kLaneChannels], unsigned kept, int c0, float& mn,
                                           float& mx) {
  constexpr int E = kLaneChannels;
  __half2 extremes = __halves2half2(__ushort_as_half(0x7c00), __ushort_as_half(0x7c00));  // (min, -max) = (+inf, +inf)
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const uint16_t bits = raw_bits(raw, e);
    const __half2 element = __halves2half2(__ushort_as_half(bits), __ushort_as_half(bits ^ 0x8000));  // (x, -x)
    if (kept >> e & 1u) extremes = __hmin2(extremes, element);
  }
  for (int offset = 1; offset < kLanes; offset <<= 1) {
    const unsigned other = __shfl_xor_sync(0xffffffffu, *reinterpret_cast<const unsigned*>(&extremes), offset);
    extremes = __hmin2(extremes, *reinterpret_cast<const __half2*>(&other));
  }
  mn = __low2float(extremes);
  mx = -__high2float(extremes);
  if (__all_sync(0xffffffffu, mn != 0.0f && mx != 0.0f)) return;
  bool include[E];
#pragma unroll
  for (int e = 0; e < E; ++e) include[e] = (kept >> e & 1u) != 0;
  mn = scan_extreme<E, false, false>(x, include, c0, kLanes);
  mx = scan_extreme<E, true, false>(x, include, c0, kLanes);
}

// One int / nuq row with per-row ranges (every format's values, keys but --kscale page), by its lanes (RowShape),
// once its slots are granted; at head_dim 64 the warp's other half encodes another row (or the same one)
// alongside. A sink (zero codes and, for values, a zero range; takes no slot) is encoded as any row and its codes
// and range replaced by zeros. decoded: where the row is also stored as the prefill kernel's tiles hold it.
template <int kHeadDim, int kBits, bool kKey>
__device__ __forceinline__ void encode_calibrated_row(const PageBlockLayout& layout, uint8_t* block, int row, bool sink,
                                                      uint2 raw, const float (&x)[kLaneChannels],
                                                      const RowCandidates& candidates, SlotGrant grant,
                                                      const CalibratedScratch<kHeadDim>& shared,
                                                      RowScratch<kHeadDim>& row_scratch, RowLane at,
                                                      const DecodedRowOut& decoded, bool uniform) {
  constexpr int E = kLaneChannels;
  constexpr int kLanes = RowShape<kHeadDim>::kLanes;
  const int c0 = at.sub * E;
  const unsigned stored = layout.outlier_capacity > 0
                              ? take_outliers<kHeadDim>(layout, block, row, raw, candidates, grant, row_scratch, at)
                              : 0u;
  float lo[E], scale[E], span[E];  // span: packed_span, for the decoded rows
  if constexpr (kKey) {
    const float4 lo4 = *reinterpret_cast<const float4*>(shared.key_lo + c0);
    const float4 scale4 = *reinterpret_cast<const float4*>(shared.key_scale + c0);
    const float4 span4 = *reinterpret_cast<const float4*>(shared.key_span + c0);
    lo[0] = lo4.x, lo[1] = lo4.y, lo[2] = lo4.z, lo[3] = lo4.w;
    scale[0] = scale4.x, scale[1] = scale4.y, scale[2] = scale4.z, scale[3] = scale4.w;
    span[0] = span4.x, span[1] = span4.y, span[2] = span4.z, span[3] = span4.w;
  } else {  // the row's range over its elements not kept as outliers
    float mn, mx;
    kept_range<kLanes>(raw, x, ~stored, c0, mn, mx);
    const bool none = sink || mn > mx;  // a sink, or every element is an outlier
    const uint16_t lo_bits = none ? 0 : float_to_half_bits(mn), hi_bits = none ? 0 : float_to_half_bits(mx);
    if (at.sub == 0) {
      reinterpret_cast<uint32_t*>(block + layout.row_params_offset)[row] = lo_bits | static_cast<uint32_t>(hi_bits) << 16;
    }
    const float row_lo = half_bits_to_float(lo_bits), row_hi = half_bits_to_float(hi_bits);
    const float row_scale = code_scale(row_lo, row_hi, uniform, kBits);
    const float row_span = decoded.row != nullptr ? packed_span(!uniform, row_lo, row_hi, kBits) : 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) lo[e] = row_lo, scale[e] = row_scale, span[e] = row_span;
  }
  uint8_t codes[E];
  encode_scaled<E, kBits>(x, lo, scale, uniform, shared.mids, codes);
  if (sink) {
#pragma unroll
    for (int e = 0; e < E; ++e) codes[e] = 0;
  }
  store_tile_rows<E>(decoded, c0, shared.decode_x, lo, span, x, sink, stored, codes);
  pack_row_codes<E, kBits, kLanes>(codes, row_words<kHeadDim>(layout, block, row, kBits), at.sub);
}

// The run's rows with per-row ranges, a round of kRowsInFlight at a time: each row's candidates, the round's
// slots handed out (one CTA barrier a round), then each row encoded. kKey: the run's kind.
template <int kHeadDim, int kCtaThreads, int kBits, bool kKey>
__device__ void encode_calibrated_rows(const KernelArgs& args, const KvWriteRun& run, const PageBlockLayout& layout,
                                       uint8_t* block, const KvWriteRow* rows, CalibratedScratch<kHeadDim>& scratch,
                                       SlotHandout& handout) {
  constexpr int E = kLaneChannels;
  using Cta = CtaLane<kHeadDim, kCtaThreads>;
  const Cta cta;
  RowScratch<kHeadDim>& row_scratch = scratch.row[cta.warp * Cta::kRowsPerWarp + cta.at.half];
  const bool slots = layout.outlier_capacity > 0;
  const bool uniform = layout.scheme == KvScheme::uniform;
  const RunTileRows tile_rows = run_tile_rows<kHeadDim>(args, run);
  uint2 raw = prefetch_row<Cta::kRowsPerWarp>(rows, cta.warp * Cta::kRowsPerWarp, run.n_rows, cta.at);
  for (int base = 0, parity = 0; base < run.n_rows; base += Cta::kRowsInFlight, parity ^= 1) {
    const RoundPlace<Cta::kRowsPerWarp> place(base, cta.warp, cta.at.half, run.n_rows);
    const uint2 next = prefetch_row<Cta::kRowsPerWarp>(rows, place.first + Cta::kRowsInFlight, run.n_rows, cta.at);
    float x[E];
    unpack_row(raw, x);
    RowCandidates candidates{};
    bool sink = false;
    if (place.has_row && slots) {
      sink = rows[place.i].exact;
      if constexpr (kKey) {
        candidates = key_candidates<Cta::kLanes>(x, scratch.key_lo, scratch.key_hi, cta.lane);
      } else {
        const float limit = value_outlier_limit<kHeadDim>(x, args.calib.value_threshold, row_scratch, cta.at);
        candidates = value_candidates<Cta::kLanes>(x, limit, cta.lane);
      }
    }
    // The row's first query, loaded before the round's barrier so that its latency passes under it. Rotated in place,
    // queries are not rewritten by a row's twin (row_of), which could read them rotated.
    const bool rotates_queries = kKey && place.own && tile_rows.n_queries > 0;
    uint2 first_query{};
    if (rotates_queries) {
      first_query = load_row_raw(rows[place.i].src + tile_rows.query_offset, cta.at.sub);
    }
    const SlotGrant grant = slots ? grant_slots<Cta::kRowsInFlight>(handout, scratch.wants[parity], base, place, cta.at,
                                                                    sink ? 0 : candidates.count)
                                  : SlotGrant{0, 0};
    if (place.has_row) {
      const KvWriteRow w = rows[place.i];
      const DecodedRowOut decoded = decoded_row_out<kHeadDim>(tile_rows, place.i, cta.at.sub);
      encode_calibrated_row<kHeadDim, kBits, kKey>(layout, block, w.page_row, w.exact, raw, x, candidates, grant,
                                                   scratch, row_scratch, cta.at, decoded, uniform);
      if (rotates_queries) rotate_queries<kHeadDim>(tile_rows, w.src, first_query, decoded, cta.at.sub);
    }
    raw = next;
  }
}

// --kscale page keys (the run is the whole page): outliers, a round at a time as encode_calibrated_rows takes
// them, then per-channel ranges of the rest, then codes.
template <int kHeadDim, int kCtaThreads, int kBits>
__device__ void encode_page_keys(const PageBlockLayout& layout, uint8_t* block, const KvWriteRow* rows, int n_rows,
                                 CalibratedScratch<kHeadDim>& scratch, uint32_t* stored_bits, SlotHandout& handout) {
  constexpr int E = kLaneChannels;
  using Cta = CtaLane<kHeadDim, kCtaThreads>;
  const Cta cta;
  const bool uniform = layout.scheme == KvScheme::uniform;
  if (layout.outlier_capacity > 0) {
    for (int base = 0, parity = 0; base < n_rows; base += Cta::kRowsInFlight, parity ^= 1) {
      const RoundPlace<Cta::kRowsPerWarp> place(base, cta.warp, cta.at.half, n_rows);
      uint2 raw{};
      RowCandidates candidates{};
      if (place.has_row) {
        float x[E];
        raw = load_row_raw(rows[place.i].src, cta.at.sub);
        unpack_row(raw, x);
        candidates = key_candidates<Cta::kLanes>(x, scratch.key_lo, scratch.key_hi, cta.lane);
      }
      const bool sink = place.has_row && rows[place.i].exact;
      const SlotGrant grant = grant_slots<Cta::kRowsInFlight>(handout, scratch.wants[parity], base, place, cta.at,
                                                         sink ? 0 : candidates.count);
      if (!place.has_row) continue;
      const unsigned stored = take_outliers<kHeadDim>(layout, block, rows[place.i].page_row, raw, candidates, grant,
                                                      scratch.row[cta.warp * Cta::kRowsPerWarp + cta.at.half], cta.at);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int bit = place.i * kHeadDim + cta.at.sub * E + e;
        if (stored >> e & 1u) atomicOr(&stored_bits[bit / 32], 1u << (bit % 32));
      }
    }
    __syncthreads();
  }
  for (int c = threadIdx.x; c < kHeadDim; c += kCtaThreads) {
    float mn = INFINITY, mx = -INFINITY;
    for (int i = 0; i < n_rows; ++i) {
      const int bit = i * kHeadDim + c;
      if (rows[i].exact || (stored_bits[bit / 32] >> (bit % 32) & 1u)) continue;
      const float v = half_bits_to_float(rows[i].src[c]);
      mn = v < mn ? v : mn;  // std::min, std::max
      mx = mx < v ? v : mx;
    }
    if (mn > mx) mn = mx = 0;
    const uint16_t lo_bits = float_to_half_bits(mn), hi_bits = float_to_half_bits(mx);
    reinterpret_cast<uint32_t*>(block + layout.group_params_offset)[c] = lo_bits | static_cast<uint32_t>(hi_bits) << 16;
    scratch.page_lo[c] = half_bits_to_float(lo_bits);
    scratch.page_scale[c] = code_scale(scratch.page_lo[c], half_bits_to_float(hi_bits), uniform, kBits);
  }
  __syncthreads();
  for (int base = cta.warp * Cta::kRowsPerWarp; base < n_rows; base += Cta::kRowsInFlight) {
    const int i = row_of<Cta::kRowsPerWarp>(base, cta.at.half, n_rows);
    uint8_t codes[E] = {};  // sinks: zero codes
    if (!rows[i].exact) {
      float x[E], lo[E], scale[E];
      unpack_row(load_row_raw(rows[i].src, cta.at.sub), x);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        lo[e] = scratch.page_lo[cta.at.sub * E + e], scale[e] = scratch.page_scale[cta.at.sub * E + e];
      }
      encode_scaled<E, kBits>(x, lo, scale, uniform, scratch.mids, codes);
    }
    pack_row_codes<E, kBits, Cta::kLanes>(codes, row_words<kHeadDim>(layout, block, rows[i].page_row, kBits), cta.at.sub);
  }
}

// One int / nuq run per block (the file comment tells the steps); the kernels below instantiate it per head_dim
// and bits.
template <int kHeadDim, int kCtaThreads, int kBits>
__device__ __forceinline__ void quantize_calibrated_run(const KernelArgs& args) {
  extern __shared__ __align__(16) unsigned char shared[];
  CalibratedScratch<kHeadDim>& scratch = *reinterpret_cast<CalibratedScratch<kHeadDim>*>(shared);
  const KvWriteRun run = args.runs[blockIdx.x];
  if (run.n_rows == 0) return;  // padding
  const auto [layout, block, rows] = load_run_rows<CalibratedScratch<kHeadDim>, kCtaThreads>(args, run, shared);
  uint32_t* stored_bits = reinterpret_cast<uint32_t*>(rows + layout.page_size);  // --kscale page (n_rows * head_dim / 32)
  const bool key = layout.kind == KvKind::key;
  const bool nonuniform = layout.scheme == KvScheme::nonuniform;
  const float* codebook = key ? args.calib.key_codebook : args.calib.value_codebook;
  if (threadIdx.x < (1 << kBits)) {
    scratch.decode_x[threadIdx.x] = packed_x(nonuniform, codebook, threadIdx.x);
    if (nonuniform && threadIdx.x + 1 < (1 << kBits)) {
      scratch.mids[threadIdx.x] = __fmul_rn(0.5f, __fadd_rn(codebook[threadIdx.x], codebook[threadIdx.x + 1]));
    }
  }
  if (layout.per_page_key_ranges) {
    for (int i = threadIdx.x; i < run.n_rows * kHeadDim / 32; i += kCtaThreads) stored_bits[i] = 0;
  }
  if (key) {
    const int64_t head = int64_t{run.kv_head} * kHeadDim;
    for (int c = threadIdx.x; c < kHeadDim; c += kCtaThreads) {
      scratch.key_lo[c] = args.calib.key_lo[head + c];
      scratch.key_hi[c] = args.calib.key_hi[head + c];
      scratch.key_scale[c] = args.calib.key_scale[head + c];
      scratch.key_span[c] = packed_span(nonuniform, scratch.key_lo[c], scratch.key_hi[c], kBits);
    }
  }
  __syncthreads();  // the row table, the ranges and the codebook are in place
  // The block's count, read by every thread before the first round's barrier and written after the last one's.
  uint32_t* count = reinterpret_cast<uint32_t*>(block + layout.outliers_offset);
  SlotHandout handout{0, static_cast<unsigned>(layout.outlier_capacity), 0};
  if (layout.outlier_capacity > 0 && rows[0].page_row != 0) handout.before = *count;  // row 0 starts it afresh
  if (layout.per_page_key_ranges) {
    encode_page_keys<kHeadDim, kCtaThreads, kBits>(layout, block, rows, run.n_rows, scratch, stored_bits, handout);
  } else if (key) {
    encode_calibrated_rows<kHeadDim, kCtaThreads, kBits, true>(args, run, layout, block, rows, scratch, handout);
  } else {
    encode_calibrated_rows<kHeadDim, kCtaThreads, kBits, false>(args, run, layout, block, rows, scratch, handout);
  }
  if (layout.outlier_capacity > 0 && threadIdx.x == 0) {
    const unsigned used = handout.used_after(handout.wanted);
    *count = used;
    const unsigned stored = used - handout.before;
    if (stored > 0) atomicAdd(args.outlier_counts, static_cast<unsigned long long>(stored));
    const unsigned clamped = handout.wanted - stored;
    if (clamped > 0) atomicAdd(args.outlier_counts + 1, static_cast<unsigned long long>(clamped));
  }
}

// Registers (ptxas, nvcc 13.0), each kernel at its bound: kv_quantize_calibrated_64 67-71, _64_few_runs 64 (8 bytes
// spilled at 3 bits), _128 63-64, the peer kernels 58-60. Rotating the queries cost the int/nuq kernels ~5% where
// there are none to rotate (kvq-gpu-bench --parts quantize, llama2-7b 4 x 2048 nuq3-1% 0.333-0.338 -> 0.352 ms,
// H100, 2026-11-28): the code is in every instance.
// The history of the bounds: head_dim 64 at most 72 registers (7 blocks of 128 threads per multiprocessor): with 2
// channels a lane and unbounded, the unrolled packing took 111 and nuq3-1% ran 0.72 ms instead of 0.52
// (kvq-gpu-bench --parts quantize, smollm2 64 x 2048, H200, 2026-11-27). The few-run launches take kFewRunsThreads,
// bounded to 2 blocks (unbounded 90 registers: one 512-thread block a multiprocessor, where a 2048-token
// smollm2-135m step's 192 runs want two). One kernel for both, its loops strided by blockDim.x, ran head_dim 128's
// nuq3-1% in 0.45 ms instead of 0.42: the CTA size is a compile-time constant of each kernel. Head_dim 128 bounded
// to 8 blocks (unbounded 87 registers and 0.512 ms against 0.449, llama2-7b 4 x 2048 nuq3-1%, H100, 2026-11-28); its
// few-run launches are rare (8 KV heads and more): kThreads always.
__global__ void __launch_bounds__(kThreads, 7) kv_quantize_peer_64(KernelArgs args) { quantize_peer_run<64, kThreads>(args); }
__global__ void __launch_bounds__(kFewRunsThreads, 2) kv_quantize_peer_64_few_runs(KernelArgs args) {
  quantize_peer_run<64, kFewRunsThreads>(args);
}
__global__ void __launch_bounds__(kThreads, 8) kv_quantize_peer_128(KernelArgs args) { quantize_peer_run<128, kThreads>(args); }
template <int kBits>
__global__ void __launch_bounds__(kThreads, 7) kv_quantize_calibrated_64(KernelArgs args) {
  quantize_calibrated_run<64, kThreads, kBits>(args);
}
template <int kBits>
__global__ void __launch_bounds__(kFewRunsThreads, 2) kv_quantize_calibrated_64_few_runs(KernelArgs args) {
  quantize_calibrated_run<64, kFewRunsThreads, kBits>(args);
}
template <int kBits>
__global__ void __launch_bounds__(kThreads, 8) kv_quantize_calibrated_128(KernelArgs args) {
  quantize_calibrated_run<128, kThreads, kBits>(args);
}

template <int kBits>
__device__ void dequantize_block(const PageBlockLayout& layout, const uint8_t* block, const BlockCalibration& calib,
                                 int n_rows, const int* row_first, float* out) {
  const uint32_t* slots = outlier_slots(layout, block);
  const int chunks_per_row = layout.head_dim / 8;
  for (int i = threadIdx.x; i < n_rows * chunks_per_row; i += blockDim.x) {
    const int row = i / chunks_per_row, c0 = i % chunks_per_row * 8;
    float v[8];
    decode_chunk8<kBits>(layout, block, row, c0, calib, v);
    if (layout.outlier_capacity > 0) apply_outliers8(slots, row_first, row, c0, layout.head_dim, v);
    float4* dst = reinterpret_cast<float4*>(out + int64_t{row} * layout.head_dim + c0);
    dst[0] = make_float4(v[0], v[1], v[2], v[3]);
    dst[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
}

__global__ void __launch_bounds__(kThreads) kv_dequantize_kernel(const uint8_t* pool, PageBlockLayout layout,
                                                                 DeviceLayerCalibration calib, const KvReadBlock* blocks,
                                                                 float* out) {
  extern __shared__ int row_first[];  // (page_size + 1)
  const KvReadBlock read = blocks[blockIdx.x];
  const uint8_t* block = pool + read.block_offset;
  if (layout.outlier_capacity > 0) {
    index_outlier_rows(outlier_slots(layout, block), outlier_count(layout, block), layout.head_dim, layout.page_size,
                       row_first, threadIdx.x, blockDim.x);
  }
  __syncthreads();
  const BlockCalibration block_calib = block_calibration(calib, layout, read.kv_head);
  float* dst = out + int64_t{blockIdx.x} * layout.page_size * layout.head_dim;
  switch (layout.bits) {
    case 2: dequantize_block<2>(layout, block, block_calib, read.n_rows, row_first, dst); break;
    case 3: dequantize_block<3>(layout, block, block_calib, read.n_rows, row_first, dst); break;
    default: dequantize_block<4>(layout, block, block_calib, read.n_rows, row_first, dst); break;  // 4, 8, 16
  }
}

}  // namespace

void launch_kv_quantize(uint8_t* pool, const PageBlockLayout& key_layout, const PageBlockLayout& value_layout,
                        const DeviceLayerCalibration& calib, const KvWriteRun* runs, int32_t n_runs,
                        const KvWriteRow* rows, unsigned long long* outlier_counts, int n_sms, cudaStream_t stream,
                        KvQuantizeCtas ctas, const KvDecodedRows& decoded) {
  if (n_runs == 0) return;
  const int head_dim = key_layout.head_dim;
  if (!kv_quantize_supported(head_dim)) fail("KV quantize-on-write supports head_dim 64 and 128, not {}", head_dim);
  if ((decoded.keys != nullptr || decoded.rotated_keys != nullptr) && !kv_quantize_decodes_rows(key_layout, value_layout)) {
    fail("KV quantize-on-write stores rows decoded or keys rotated for int and nuq formats with per-row ranges only");
  }
  if (decoded.rotated_keys != nullptr && (decoded.rope == nullptr || decoded.n_kv_heads <= 0)) {
    fail("KV quantize-on-write: rotated keys need the RoPE table and the KV heads");
  }
  if (decoded.n_heads > 0) {
    if (!kv_quantize_decodes_rows(key_layout, value_layout)) {
      fail("KV quantize-on-write rotates the queries of int and nuq formats with per-row ranges only");
    }
    if (decoded.rope == nullptr || decoded.n_kv_heads <= 0 || decoded.n_heads % decoded.n_kv_heads != 0) {
      fail("KV quantize-on-write: rotating {} query heads of {} KV heads needs the RoPE table and whole groups",
           decoded.n_heads, decoded.n_kv_heads);
    }
  }
  const int32_t queries_per_kv_head = decoded.n_heads > 0 ? decoded.n_heads / decoded.n_kv_heads : 0;
  const KernelArgs args{pool, {key_layout, value_layout}, calib, runs, rows, outlier_counts, decoded, queries_per_kv_head};
  // A CTA encodes its run's rows a few at a time, so a launch of at most two runs a multiprocessor (a prefill
  // step of one 2048-token smollm2-135m prompt: 192 runs) waits on those chains with most of the device
  // idle; twice the warps a CTA took such a launch from 27.1 to 18.3 us (H100, 2026-11-27), four times the warps
  // (512 threads, 32 rows in flight) made smollm2-135m's prefill at 2048 x 64 a further 2.6% faster (kvq bench
  // --dummy smollm2-135m --prompt-len 2048 --batch 64, three rounds, H100, 2026-11-27).
  const bool few_runs = ctas == KvQuantizeCtas::by_launch ? n_runs <= 2 * n_sms : ctas == KvQuantizeCtas::few_runs;
  const int page_size = key_layout.page_size;
  auto launch = [&](auto kernel, int threads, size_t smem) {
    constexpr size_t kDefaultLimit = 48 * 1024;  // above it a kernel must opt in (pages of 512+ rows)
    if (smem > kDefaultLimit) {
      CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    kernel<<<n_runs, threads, smem, stream>>>(args);
  };
  const bool calibrated = key_layout.scheme == KvScheme::uniform || key_layout.scheme == KvScheme::nonuniform;
  if (!calibrated) {
    if (head_dim == 128) {
      launch(kv_quantize_peer_128, kThreads, peer_scratch_bytes<128>(page_size));
    } else if (few_runs) {
      launch(kv_quantize_peer_64_few_runs, kFewRunsThreads, peer_scratch_bytes<64>(page_size));
    } else {
      launch(kv_quantize_peer_64, kThreads, peer_scratch_bytes<64>(page_size));
    }
  } else {
    const auto launch_bits = [&](auto bits) {
      constexpr int kBits = decltype(bits)::value;
      if (head_dim == 128) {
        launch(kv_quantize_calibrated_128<kBits>, kThreads, calibrated_scratch_bytes<128>(page_size));
      } else if (few_runs) {
        launch(kv_quantize_calibrated_64_few_runs<kBits>, kFewRunsThreads, calibrated_scratch_bytes<64>(page_size));
      } else {
        launch(kv_quantize_calibrated_64<kBits>, kThreads, calibrated_scratch_bytes<64>(page_size));
      }
    };
    switch (key_layout.bits) {
      case 2: launch_bits(std::integral_constant<int, 2>{}); break;
      case 3: launch_bits(std::integral_constant<int, 3>{}); break;
      case 4: launch_bits(std::integral_constant<int, 4>{}); break;
      default: fail("KV quantize-on-write: int / nuq formats have 2, 3 or 4 bits, not {}", key_layout.bits);
    }
  }
  CUDA_CHECK_LAUNCH(stream, "kv_quantize_kernel");
}

void launch_kv_dequantize(const uint8_t* pool, const PageBlockLayout& layout, const DeviceLayerCalibration& calib,
                          const KvReadBlock* blocks, int32_t n_blocks, float* out, cudaStream_t stream) {
  if (n_blocks == 0) return;
  if (layout.head_dim % 8 != 0) fail("KV dequantize needs head_dim divisible by 8, not {}", layout.head_dim);
  const size_t smem = (size_t(layout.page_size) + 1) * sizeof(int);
  kv_dequantize_kernel<<<n_blocks, kThreads, smem, stream>>>(pool, layout, calib, blocks, out);
  CUDA_CHECK_LAUNCH(stream, "kv_dequantize_kernel");
}

}  // namespace kvq::cuda
