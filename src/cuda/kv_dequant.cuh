// Device-side decoding of page blocks (layout in kv/page_codec.h and
// cuda/kv_quantize.h): 8 consecutive elements of one row at a time (one 16-byte
// fp16 chunk of an attention tile), for every --kv format, equal bit for bit to
// PageCodec::decode. What attention loaders call: codes -> values (then RoPE
// for pre-RoPE keys, done by the loader).
//
// Exactness: every operation the CPU codec does in fp32 is written with the
// explicitly rounded intrinsics (__fmul_rn, __fadd_rn, __fdiv_rn, ...), which
// nvcc never contracts into FMAs; the CPU is built with -ffp-contract=off.
//
// Outliers: a block's slots are in ascending row order (rows are encoded in
// order and take slots in turn), so a loader indexes them once per block
// (index_outlier_rows, into shared memory) and each chunk then visits only its
// row's slots (apply_outliers8), which replace the decoded values.
#pragma once

#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>

#include "cuda/kv_quantize.h"

namespace kvq::cuda {

// One block's calibration: device (or shared) pointers, null where the format needs none.
struct BlockCalibration {
  const float* key_lo;    // (head_dim) this KV head's calibrated key range (int/nuq keys without --kscale page)
  const float* key_hi;    // (head_dim)
  const float* codebook;  // (2^bits) this kind's codebook (nuq)
};

__host__ __device__ inline BlockCalibration block_calibration(const DeviceLayerCalibration& calib,
                                                              const PageBlockLayout& layout, int kv_head) {
  const bool key = layout.kind == KvKind::key;
  const int64_t head = int64_t{kv_head} * layout.head_dim;
  return {calib.key_lo ? calib.key_lo + head : nullptr, calib.key_hi ? calib.key_hi + head : nullptr,
          key ? calib.key_codebook : calib.value_codebook};
}

__device__ __forceinline__ float half_bits_to_float(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
__device__ __forceinline__ uint16_t float_to_half_bits(float x) { return __half_as_ushort(__float2half_rn(x)); }

__device__ __forceinline__ float levels_of(int bits) { return static_cast<float>((1 << bits) - 1); }

// int-b: UniformRange(lo, hi, bits).decode(code) = lo + code * ((hi - lo) / levels).
__device__ __forceinline__ float uniform_step(float lo, float hi, int bits) {
  return __fdiv_rn(__fsub_rn(hi, lo), levels_of(bits));
}
__device__ __forceinline__ float uniform_decode(float lo, float step, uint32_t code) {
  return __fadd_rn(lo, __fmul_rn(static_cast<float>(code), step));
}
// nuq-b: lo + (centre + 1) * ((hi - lo) / 2).
__device__ __forceinline__ float codebook_half_span(float lo, float hi) { return __fmul_rn(__fsub_rn(hi, lo), 0.5f); }
__device__ __forceinline__ float codebook_decode(float lo, float half_span, float centre) {
  return __fadd_rn(lo, __fmul_rn(__fadd_rn(centre, 1.0f), half_span));
}
// Both as lo + x * span: the span from a packed range (lo, hi), (hi - lo) / 2 for nuq (x the centre + 1), the
// step (hi - lo) / levels for int (x the code).
__device__ __forceinline__ float packed_span(bool codebook, float lo, float hi, int bits) {
  return codebook ? codebook_half_span(lo, hi) : uniform_step(lo, hi, bits);
}
__device__ __forceinline__ float packed_x(bool codebook, const float* centres, uint32_t code) {
  return codebook ? __fadd_rn(centres[code], 1.0f) : static_cast<float>(code);
}
// KIVI: code * scale + min.
__device__ __forceinline__ float kivi_decode(uint32_t code, float scale, float min) {
  return __fadd_rn(__fmul_rn(static_cast<float>(code), scale), min);
}
__device__ __forceinline__ float e4m3_to_float(uint8_t code) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(code), __NV_E4M3)));
}

// The 8 codes of elements [element, element + 8) of a kBits-bit stream (element % 8 == 0):
// code j in bits [j * kBits, j * kBits + kBits) of the result.
template <int kBits>
__device__ __forceinline__ uint32_t load_codes8(const uint8_t* stream, int64_t element) {
  static_assert(kBits >= 2 && kBits <= 4, "packed codes are 2, 3 or 4 bits");
  const uint8_t* p = stream + element / 8 * kBits;  // 8 codes fill kBits whole bytes
  if constexpr (kBits == 2) return *reinterpret_cast<const uint16_t*>(p);
  if constexpr (kBits == 4) return *reinterpret_cast<const uint32_t*>(p);
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 | static_cast<uint32_t>(p[2]) << 16;
}

// Elements [c0, c0 + 8) of row `row` (c0 % 8 == 0), without the outliers. kBits must be the layout's bits
// for the packed schemes (int, nuq, kivi); fp16, fp8, q8_0 and q4_0 ignore it.
template <int kBits>
__device__ __forceinline__ void decode_chunk8(const PageBlockLayout& layout, const uint8_t* block, int row, int c0,
                                              const BlockCalibration& calib, float (&out)[8]) {
  const int hd = layout.head_dim;
  const int64_t element = int64_t{row} * hd + c0;
  const uint8_t* codes = block + layout.codes_offset;
  const uint8_t* row_params = block + layout.row_params_offset;
  const uint8_t* group_params = block + layout.group_params_offset;
  switch (layout.scheme) {
    case KvScheme::fp16: {
      const uint4 raw = *reinterpret_cast<const uint4*>(codes + element * 2);
      const __half2* pairs = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = __half22float2(pairs[j]);
        out[2 * j] = f.x, out[2 * j + 1] = f.y;
      }
      return;
    }
    case KvScheme::fp8: {
      const float scale = half_bits_to_float(reinterpret_cast<const uint16_t*>(row_params)[row]);
      const uint2 raw = *reinterpret_cast<const uint2*>(codes + element);
      const uint8_t* bytes = reinterpret_cast<const uint8_t*>(&raw);
#pragma unroll
      for (int j = 0; j < 8; ++j) out[j] = __fmul_rn(e4m3_to_float(bytes[j]), scale);
      return;
    }
    case KvScheme::q8_0:
    case KvScheme::q4_0: {
      const float d = half_bits_to_float(reinterpret_cast<const uint16_t*>(row_params)[int64_t{row} * (hd / 32) + c0 / 32]);
      if (layout.scheme == KvScheme::q8_0) {
        const uint2 raw = *reinterpret_cast<const uint2*>(codes + element);
        const int8_t* q = reinterpret_cast<const int8_t*>(&raw);
#pragma unroll
        for (int j = 0; j < 8; ++j) out[j] = __fmul_rn(static_cast<float>(q[j]), d);
      } else {
        const uint32_t q = load_codes8<4>(codes, element);
#pragma unroll
        for (int j = 0; j < 8; ++j) out[j] = __fmul_rn(static_cast<float>(static_cast<int>((q >> (4 * j)) & 15u) - 8), d);
      }
      return;
    }
    case KvScheme::kivi: {
      const uint32_t q = load_codes8<kBits>(codes, element);
      constexpr uint32_t kMask = (1u << kBits) - 1;
      if (layout.kind == KvKind::key) {  // per channel of the row's 32-row group
        const uint32_t* params = reinterpret_cast<const uint32_t*>(group_params) + int64_t{row / 32} * hd + c0;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const uint32_t p = params[j];
          out[j] = kivi_decode((q >> (kBits * j)) & kMask, half_bits_to_float(p & 0xffff), half_bits_to_float(p >> 16));
        }
      } else {  // per row and 32-channel group
        const uint32_t p = reinterpret_cast<const uint32_t*>(row_params)[int64_t{row} * (hd / 32) + c0 / 32];
        const float scale = half_bits_to_float(p & 0xffff), min = half_bits_to_float(p >> 16);
#pragma unroll
        for (int j = 0; j < 8; ++j) out[j] = kivi_decode((q >> (kBits * j)) & kMask, scale, min);
      }
      return;
    }
    case KvScheme::uniform:
    case KvScheme::nonuniform: {
      const uint32_t q = load_codes8<kBits>(codes, element);
      constexpr uint32_t kMask = (1u << kBits) - 1;
      const bool uniform = layout.scheme == KvScheme::uniform;
      // (lo, hi) of element j: the row's for values, the page's or the calibration's per channel for keys.
      auto decode = [&](int j, float lo, float hi) {
        const uint32_t code = (q >> (kBits * j)) & kMask;
        return uniform ? uniform_decode(lo, uniform_step(lo, hi, kBits), code)
                       : codebook_decode(lo, codebook_half_span(lo, hi), calib.codebook[code]);
      };
      if (layout.kind == KvKind::value) {
        const uint32_t p = reinterpret_cast<const uint32_t*>(row_params)[row];
        const float lo = half_bits_to_float(p & 0xffff), hi = half_bits_to_float(p >> 16);
#pragma unroll
        for (int j = 0; j < 8; ++j) out[j] = decode(j, lo, hi);
      } else if (layout.per_page_key_ranges) {
        const uint32_t* params = reinterpret_cast<const uint32_t*>(group_params) + c0;
#pragma unroll
        for (int j = 0; j < 8; ++j) out[j] = decode(j, half_bits_to_float(params[j] & 0xffff), half_bits_to_float(params[j] >> 16));
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) out[j] = decode(j, calib.key_lo[c0 + j], calib.key_hi[c0 + j]);
      }
      return;
    }
  }
}

// ---- outliers ----

__device__ __forceinline__ uint32_t outlier_count(const PageBlockLayout& layout, const uint8_t* block) {
  return layout.outlier_capacity > 0 ? *reinterpret_cast<const uint32_t*>(block + layout.outliers_offset) : 0u;
}
__device__ __forceinline__ const uint32_t* outlier_slots(const PageBlockLayout& layout, const uint8_t* block) {
  return reinterpret_cast<const uint32_t*>(block + layout.outliers_offset + 4);
}
__device__ __forceinline__ uint32_t slot_index(uint32_t slot) { return slot & 0xffffu; }  // row * head_dim + channel
__device__ __forceinline__ float slot_value(uint32_t slot) { return half_bits_to_float(static_cast<uint16_t>(slot >> 16)); }

// row_first (page_size + 1): slots [row_first[r], row_first[r + 1]) hold row r's outliers. slots (count) may be
// global or a shared copy. Called by n_threads threads (this one is `thread`); synchronize before reading row_first.
__device__ inline void index_outlier_rows(const uint32_t* slots, uint32_t count, int head_dim, int page_size,
                                          int* row_first, int thread, int n_threads) {
  // Each r in 0..page_size is written once: by the slot where rows step past it, or as `count` after the last.
  for (uint32_t s = thread; s < count; s += n_threads) {
    const int row = static_cast<int>(slot_index(slots[s])) / head_dim;
    const int previous = s > 0 ? static_cast<int>(slot_index(slots[s - 1])) / head_dim : -1;
    for (int r = previous + 1; r <= row; ++r) row_first[r] = static_cast<int>(s);
  }
  const int last = count > 0 ? static_cast<int>(slot_index(slots[count - 1])) / head_dim : -1;
  for (int r = last + 1 + thread; r <= page_size; r += n_threads) row_first[r] = static_cast<int>(count);
}

// Replaces the elements of chunk [c0, c0 + 8) of `row` that the block keeps as outliers.
__device__ __forceinline__ void apply_outliers8(const uint32_t* slots, const int* row_first, int row, int c0,
                                                int head_dim, float (&out)[8]) {
  const uint32_t base = static_cast<uint32_t>(row * head_dim + c0);
  for (int s = row_first[row]; s < row_first[row + 1]; ++s) {
    const uint32_t offset = slot_index(slots[s]) - base;  // wraps to a large value below c0
#pragma unroll
    for (int j = 0; j < 8; ++j) {  // constant indices keep `out` in registers
      if (offset == static_cast<uint32_t>(j)) out[j] = slot_value(slots[s]);
    }
  }
}

// As apply_outliers8 without an index: the row's first slot is found by bisection over the block's slots
// (global memory; for loaders with no shared memory to index a block in).
__device__ __forceinline__ void apply_row_outliers(const PageBlockLayout& layout, const uint8_t* block, int row, int c0,
                                                   float (&out)[8]) {
  const uint32_t count = outlier_count(layout, block);
  if (count == 0) return;
  const uint32_t* slots = outlier_slots(layout, block);
  const uint32_t row_begin = static_cast<uint32_t>(row * layout.head_dim), row_end = row_begin + layout.head_dim;
  uint32_t lo = 0, hi = count;
  while (lo < hi) {
    const uint32_t mid = (lo + hi) / 2;
    if (slot_index(slots[mid]) < row_begin) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  const uint32_t base = row_begin + c0;
  for (uint32_t s = lo; s < count; ++s) {
    const uint32_t index = slot_index(slots[s]);
    if (index >= row_end) break;
    const uint32_t offset = index - base;  // wraps to a large value below c0
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if (offset == static_cast<uint32_t>(j)) out[j] = slot_value(slots[s]);
    }
  }
}

}  // namespace kvq::cuda
