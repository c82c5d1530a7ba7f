// Encoding and decoding of one page block: the keys or the values of one KV
// head in one page of one layer, page_size token rows of head_dim elements, in
// any --kv format. Layout of a block (docs/FORMATS.md), each part 4-byte aligned:
//   codes        page_size * head_dim codes, row-major, bit-packed (fp16: raw halves)
//   row params   per token row: fp16 (lo, hi) for int/nuq values; fp16 scale for fp8;
//                per 32-element block: fp16 scale (q8_0, q4_0), fp16 (scale, min) (kivi values)
//   group params kivi keys: per 32-row group and channel fp16 (scale, min);
//                --kscale page keys: per channel fp16 (lo, hi)
//   outliers     uint32 count, then `capacity` slots of (uint16 row*head_dim+channel, fp16 value)
#pragma once

#include <cstdint>

#include "kv/kv_format.h"

namespace kvq {

enum class KvKind { key = 0, value = 1 };

// Calibrated parameters for one KV head of one layer (null where the format needs none).
struct HeadCalibration {
  const float* key_lo = nullptr;          // (head_dim)
  const float* key_hi = nullptr;          // (head_dim)
  const float* codebook = nullptr;        // (2^bits) for this kind
  float value_threshold = 0;
};

struct OutlierCounts {
  int64_t stored = 0;
  int64_t over_capacity = 0;  // outliers that found the page's slots full (clamped instead)
};

class PageCodec {
 public:
  PageCodec(const KvFormat& format, KvKind kind, int page_size, int head_dim, bool per_page_key_ranges);

  int64_t block_bytes() const { return block_bytes_; }
  int outlier_capacity() const { return outlier_capacity_; }
  // Rows whose codes depend on each other and are encoded together once all are
  // present: 1, 32 (KIVI keys) or page_size (--kscale page keys).
  int rows_per_group() const { return rows_per_group_; }
  // The layout, for the CUDA twin of this codec (cuda/kv_quantize.h).
  const KvFormat& format() const { return format_; }
  KvKind kind() const { return kind_; }
  int page_size() const { return page_size_; }
  int head_dim() const { return head_dim_; }
  bool per_page_key_ranges() const { return per_page_key_ranges_; }
  // Byte offsets of the block's parts from its start (the outlier part begins with the uint32 count).
  int64_t codes_offset() const { return codes_offset_; }
  int64_t row_params_offset() const { return row_params_offset_; }
  int64_t group_params_offset() const { return group_params_offset_; }
  int64_t outliers_offset() const { return outliers_offset_; }

  // Encodes rows [row0, row0 + n) from x (n, head_dim); grouped codecs need whole
  // groups. The first `exact_rows` of them are held exactly elsewhere (attention
  // sinks): they get zero codes, no outlier slots and no say in any range.
  // Encoding row 0 starts the block afresh (its outlier slots are emptied).
  void encode(uint8_t* block, int row0, int n, const float* x, int exact_rows, const HeadCalibration& calib,
              OutlierCounts& counts) const;
  // Decodes rows [0, n) into out (n, head_dim).
  void decode(const uint8_t* block, int n, float* out, const HeadCalibration& calib) const;

 private:
  // One token row of a per-row format (everything but KIVI keys and --kscale page keys).
  void encode_row(uint8_t* block, int row, const float* x, const HeadCalibration& calib, OutlierCounts& counts) const;
  void encode_kivi_key_group(uint8_t* block, int row0, const float* x) const;
  // Puts the row's candidates (not yet stored) into free slots, largest magnitude first; marks them in `stored`.
  void take_outliers(uint8_t* block, int row, const float* x, const uint8_t* is_candidate, const float* magnitude,
                     uint8_t* stored, OutlierCounts& counts) const;

  KvFormat format_;
  KvKind kind_;
  int page_size_, head_dim_;
  bool per_page_key_ranges_;
  int rows_per_group_ = 1;
  int outlier_capacity_ = 0;
  int64_t codes_offset_ = 0, row_params_offset_ = 0, group_params_offset_ = 0, outliers_offset_ = 0;
  int64_t block_bytes_ = 0;
};

}  // namespace kvq
