#include "kv/page_codec.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/dtypes.h"
#include "core/error.h"
#include "quant/pack.h"
#include "quant/scalar_codecs.h"

namespace kvq {
namespace {

int64_t align4(int64_t n) { return (n + 3) / 4 * 4; }

struct OutlierSlot {
  uint16_t index;  // row * head_dim + channel
  uint16_t value;  // fp16
};

// Normalization of int/nuq codes: [lo, hi] maps to the codes' range.
struct CodeRange {
  float lo, hi;
  uint8_t encode(float x, const KvFormat& format, const float* codebook) const {
    if (format.scheme == KvScheme::uniform) return UniformRange(lo, hi, format.bits).encode(x, format.bits);
    const float scale = hi > lo ? 2.0f / (hi - lo) : 0.0f;
    const float t = std::clamp((x - lo) * scale - 1.0f, -1.0f, 1.0f);
    return Codebook{codebook, format.bits}.nearest(t);
  }
  float decode(uint8_t code, const KvFormat& format, const float* codebook) const {
    if (format.scheme == KvScheme::uniform) return UniformRange(lo, hi, format.bits).decode(code);
    return lo + (codebook[code] + 1.0f) * ((hi - lo) * 0.5f);
  }
};

// KIVI's asymmetric groups: fp16 (scale, min) from the group's min and max, and
// codes rint((x - min) / scale), computed from the fp16-rounded parameters.
struct AsymmetricGroup {
  uint16_t scale_bits, min_bits;
  float scale, min;
  AsymmetricGroup(float mn, float mx, float levels)
      : scale_bits(fp32_to_fp16((mx - mn) / levels)), min_bits(fp32_to_fp16(mn)),
        scale(fp16_to_fp32(scale_bits)), min(fp16_to_fp32(min_bits)) {}
  uint8_t encode(float x, float levels) const {
    const float q = scale > 0 ? std::nearbyint((x - min) / scale) : 0.0f;
    return static_cast<uint8_t>(std::clamp(q, 0.0f, levels));
  }
};

// Key outlier candidates: elements outside the calibrated per-channel range, by
// how far outside relative to the range.
void key_outlier_candidates(const float* x, const HeadCalibration& calib, int head_dim, uint8_t* candidate,
                            float* magnitude) {
  for (int c = 0; c < head_dim; ++c) {
    const float span = calib.key_hi[c] - calib.key_lo[c];
    const float excess = std::max(calib.key_lo[c] - x[c], x[c] - calib.key_hi[c]);
    candidate[c] = excess > 0;
    magnitude[c] = span > 0 ? excess / span : excess;
  }
}

}  // namespace

PageCodec::PageCodec(const KvFormat& format, KvKind kind, int page_size, int head_dim, bool per_page_key_ranges)
    : format_(format), kind_(kind), page_size_(page_size), head_dim_(head_dim),
      per_page_key_ranges_(per_page_key_ranges && kind == KvKind::key && format.calibrated()) {
  const int64_t elements = int64_t{page_size} * head_dim;
  const int64_t blocks_per_row = head_dim / kGgmlBlock;
  int64_t codes = 0, row_params = 0, group_params = 0;
  switch (format.scheme) {
    case KvScheme::fp16: codes = elements * 2; break;
    case KvScheme::fp8: codes = elements; row_params = int64_t{page_size} * 2; break;
    case KvScheme::q8_0:
    case KvScheme::q4_0:
      if (head_dim % kGgmlBlock != 0) fail("--kv {} needs head_dim divisible by 32, the model has {}", format.name, head_dim);
      codes = format.scheme == KvScheme::q8_0 ? elements : packed_bytes(elements, 4);
      row_params = page_size * blocks_per_row * 2;
      break;
    case KvScheme::uniform:
    case KvScheme::nonuniform:
      codes = packed_bytes(elements, format.bits);
      if (kind == KvKind::value) row_params = int64_t{page_size} * 4;
      if (per_page_key_ranges_) group_params = int64_t{head_dim} * 4, rows_per_group_ = page_size;
      break;
    case KvScheme::kivi:
      codes = packed_bytes(elements, format.bits);
      if (kind == KvKind::key) {
        if (page_size % 32 != 0) fail("--kv {} needs --page divisible by 32 (its key groups), got {}", format.name, page_size);
        group_params = int64_t{page_size} / 32 * head_dim * 4;
        rows_per_group_ = 32;
      } else {
        if (head_dim % 32 != 0) fail("--kv {} needs head_dim divisible by 32, the model has {}", format.name, head_dim);
        row_params = page_size * blocks_per_row * 4;
      }
      break;
  }
  int64_t outlier_bytes = 0;
  if (format.outlier_fraction > 0) {
    if (elements > 65536) fail("--kv {}: pages of {} x {} elements exceed the outlier index range", format.name, page_size, head_dim);
    outlier_capacity_ = static_cast<int>(std::ceil(format.outlier_fraction * static_cast<double>(elements) - 1e-9));
    outlier_bytes = 4 + int64_t{outlier_capacity_} * 4;
  }
  codes_offset_ = 0;
  row_params_offset_ = align4(codes);
  group_params_offset_ = row_params_offset_ + align4(row_params);
  outliers_offset_ = group_params_offset_ + align4(group_params);
  block_bytes_ = (outliers_offset_ + outlier_bytes + 15) / 16 * 16;
}

void PageCodec::take_outliers(uint8_t* block, int row, const float* x, const uint8_t* is_candidate,
                              const float* magnitude, uint8_t* stored, OutlierCounts& counts) const {
  std::vector<int> candidates;
  for (int c = 0; c < head_dim_; ++c) {
    if (is_candidate[c] && !stored[c]) candidates.push_back(c);
  }
  // Largest first, then by channel: the same order on every backend.
  std::stable_sort(candidates.begin(), candidates.end(), [&](int a, int b) { return magnitude[a] > magnitude[b]; });
  auto* count = reinterpret_cast<uint32_t*>(block + outliers_offset_);
  auto* slots = reinterpret_cast<OutlierSlot*>(block + outliers_offset_ + 4);
  for (int c : candidates) {
    if (*count >= static_cast<uint32_t>(outlier_capacity_)) {
      ++counts.over_capacity;
      continue;
    }
    slots[(*count)++] = {static_cast<uint16_t>(row * head_dim_ + c), fp32_to_fp16(x[c])};
    stored[c] = 1;
    ++counts.stored;
  }
}

void PageCodec::encode_row(uint8_t* block, int row, const float* x, const HeadCalibration& calib,
                           OutlierCounts& counts) const {
  const int hd = head_dim_;
  const int64_t first = int64_t{row} * hd;
  uint8_t* codes = block + codes_offset_;
  std::vector<uint8_t> row_codes(hd);
  switch (format_.scheme) {
    case KvScheme::fp16: {
      auto* halves = reinterpret_cast<uint16_t*>(codes) + first;
      for (int c = 0; c < hd; ++c) halves[c] = fp32_to_fp16(x[c]);
      return;
    }
    case KvScheme::fp8: {
      float amax = 0;
      for (int c = 0; c < hd; ++c) amax = std::max(amax, std::fabs(x[c]));
      const uint16_t scale_bits = fp32_to_fp16(amax / 448.0f);
      reinterpret_cast<uint16_t*>(block + row_params_offset_)[row] = scale_bits;
      const float scale = fp16_to_fp32(scale_bits);
      for (int c = 0; c < hd; ++c) codes[first + c] = scale > 0 ? fp32_to_e4m3(x[c] / scale) : 0;
      return;
    }
    case KvScheme::q8_0:
    case KvScheme::q4_0: {
      const int blocks = hd / kGgmlBlock;
      auto* scales = reinterpret_cast<uint16_t*>(block + row_params_offset_) + int64_t{row} * blocks;
      for (int b = 0; b < blocks; ++b) {
        if (format_.scheme == KvScheme::q8_0) {
          quantize_q8_0_block(x + b * kGgmlBlock, reinterpret_cast<int8_t*>(codes) + first + b * kGgmlBlock, &scales[b]);
        } else {
          quantize_q4_0_block(x + b * kGgmlBlock, row_codes.data() + b * kGgmlBlock, &scales[b]);
        }
      }
      if (format_.scheme == KvScheme::q4_0) pack_codes(codes, first, row_codes.data(), hd, 4);
      return;
    }
    case KvScheme::kivi: {  // values: per token over groups of 32 channels
      auto* params = reinterpret_cast<uint16_t*>(block + row_params_offset_) + int64_t{row} * (hd / 32) * 2;
      const float levels = static_cast<float>((1 << format_.bits) - 1);
      for (int g = 0; g < hd / 32; ++g) {
        const float* xs = x + g * 32;
        const auto [mn, mx] = std::minmax_element(xs, xs + 32);
        const AsymmetricGroup group(*mn, *mx, levels);
        params[2 * g] = group.scale_bits;
        params[2 * g + 1] = group.min_bits;
        for (int c = 0; c < 32; ++c) row_codes[g * 32 + c] = group.encode(xs[c], levels);
      }
      pack_codes(codes, first, row_codes.data(), hd, format_.bits);
      return;
    }
    case KvScheme::uniform:
    case KvScheme::nonuniform:
      break;
  }

  // int / nuq: outliers first, then codes for the rest.
  std::vector<uint8_t> stored(hd, 0);
  if (format_.outlier_fraction > 0) {
    std::vector<uint8_t> candidate(hd, 0);
    std::vector<float> magnitude(hd, 0);
    if (kind_ == KvKind::key) {
      key_outlier_candidates(x, calib, hd, candidate.data(), magnitude.data());
    } else {
      double sum_sq = 0;
      for (int c = 0; c < hd; ++c) sum_sq += static_cast<double>(x[c]) * x[c];
      const float limit = calib.value_threshold * static_cast<float>(std::sqrt(sum_sq / hd));
      for (int c = 0; c < hd; ++c) {
        magnitude[c] = std::fabs(x[c]);
        candidate[c] = magnitude[c] > limit;
      }
    }
    take_outliers(block, row, x, candidate.data(), magnitude.data(), stored.data(), counts);
  }
  if (kind_ == KvKind::key) {
    for (int c = 0; c < hd; ++c) {
      row_codes[c] = CodeRange{calib.key_lo[c], calib.key_hi[c]}.encode(x[c], format_, calib.codebook);
    }
  } else {
    float mn = INFINITY, mx = -INFINITY;
    for (int c = 0; c < hd; ++c) {
      if (!stored[c]) mn = std::min(mn, x[c]), mx = std::max(mx, x[c]);
    }
    if (mn > mx) mn = mx = 0;  // every element is an outlier
    auto* params = reinterpret_cast<uint16_t*>(block + row_params_offset_) + int64_t{row} * 2;
    params[0] = fp32_to_fp16(mn);
    params[1] = fp32_to_fp16(mx);
    const CodeRange range{fp16_to_fp32(params[0]), fp16_to_fp32(params[1])};
    for (int c = 0; c < hd; ++c) row_codes[c] = range.encode(x[c], format_, calib.codebook);
  }
  pack_codes(codes, first, row_codes.data(), hd, format_.bits);
}

void PageCodec::encode_kivi_key_group(uint8_t* block, int row0, const float* x) const {
  const int hd = head_dim_;
  const float levels = static_cast<float>((1 << format_.bits) - 1);
  auto* params = reinterpret_cast<uint16_t*>(block + group_params_offset_) + int64_t{row0 / 32} * hd * 2;
  std::vector<uint8_t> group_codes(32 * hd);
  for (int c = 0; c < hd; ++c) {
    float mn = x[c], mx = x[c];
    for (int r = 1; r < 32; ++r) mn = std::min(mn, x[r * hd + c]), mx = std::max(mx, x[r * hd + c]);
    const AsymmetricGroup group(mn, mx, levels);
    params[2 * c] = group.scale_bits;
    params[2 * c + 1] = group.min_bits;
    for (int r = 0; r < 32; ++r) group_codes[r * hd + c] = group.encode(x[r * hd + c], levels);
  }
  pack_codes(block + codes_offset_, int64_t{row0} * hd, group_codes.data(), 32 * hd, format_.bits);
}

void PageCodec::encode(uint8_t* block, int row0, int n, const float* x, int exact_rows, const HeadCalibration& calib,
                       OutlierCounts& counts) const {
  const int hd = head_dim_;
  if (row0 % rows_per_group_ != 0 || n % rows_per_group_ != 0) {
    fail("page codec {}: rows [{}, {}) are not whole groups of {}", format_.name, row0, row0 + n, rows_per_group_);
  }
  if (row0 == 0 && outlier_capacity_ > 0) *reinterpret_cast<uint32_t*>(block + outliers_offset_) = 0;
  if (format_.scheme == KvScheme::kivi && kind_ == KvKind::key) {
    for (int g = 0; g < n; g += 32) encode_kivi_key_group(block, row0 + g, x + int64_t{g} * hd);
    return;
  }
  if (!per_page_key_ranges_) {
    for (int r = 0; r < n; ++r) {
      if (r < exact_rows) {
        // Sinks exist for int/nuq only: zero codes (and a zero value range); nothing reads them.
        if (!format_.calibrated()) fail("page codec {}: exact rows are for int/nuq formats", format_.name);
        const std::vector<uint8_t> zero_codes(hd, 0);
        pack_codes(block + codes_offset_, int64_t{row0 + r} * hd, zero_codes.data(), hd, format_.bits);
        if (kind_ == KvKind::value) std::fill_n(block + row_params_offset_ + int64_t{row0 + r} * 4, 4, 0);
        continue;
      }
      encode_row(block, row0 + r, x + int64_t{r} * hd, calib, counts);
    }
    return;
  }
  // --kscale page: outliers by the calibrated thresholds, then per-channel ranges over the page's other elements.
  std::vector<uint8_t> stored(int64_t{n} * hd, 0);
  if (format_.outlier_fraction > 0) {
    std::vector<uint8_t> candidate(hd);
    std::vector<float> magnitude(hd);
    for (int r = exact_rows; r < n; ++r) {
      const float* row = x + int64_t{r} * hd;
      key_outlier_candidates(row, calib, hd, candidate.data(), magnitude.data());
      take_outliers(block, row0 + r, row, candidate.data(), magnitude.data(), stored.data() + int64_t{r} * hd, counts);
    }
  }
  auto* params = reinterpret_cast<uint16_t*>(block + group_params_offset_);
  std::vector<float> lo(hd), hi(hd);
  for (int c = 0; c < hd; ++c) {
    float mn = INFINITY, mx = -INFINITY;
    for (int r = exact_rows; r < n; ++r) {
      if (!stored[int64_t{r} * hd + c]) mn = std::min(mn, x[int64_t{r} * hd + c]), mx = std::max(mx, x[int64_t{r} * hd + c]);
    }
    if (mn > mx) mn = mx = 0;
    params[2 * c] = fp32_to_fp16(mn);
    params[2 * c + 1] = fp32_to_fp16(mx);
    lo[c] = fp16_to_fp32(params[2 * c]);
    hi[c] = fp16_to_fp32(params[2 * c + 1]);
  }
  std::vector<uint8_t> row_codes(hd);
  for (int r = 0; r < n; ++r) {
    for (int c = 0; c < hd; ++c) {
      row_codes[c] = r < exact_rows ? 0 : CodeRange{lo[c], hi[c]}.encode(x[int64_t{r} * hd + c], format_, calib.codebook);
    }
    pack_codes(block + codes_offset_, int64_t{row0 + r} * hd, row_codes.data(), hd, format_.bits);
  }
}

void PageCodec::decode(const uint8_t* block, int n, float* out, const HeadCalibration& calib) const {
  const int hd = head_dim_;
  const uint8_t* codes = block + codes_offset_;
  std::vector<uint8_t> row_codes(hd);
  for (int r = 0; r < n; ++r) {
    float* y = out + int64_t{r} * hd;
    const int64_t first = int64_t{r} * hd;
    switch (format_.scheme) {
      case KvScheme::fp16: {
        const auto* halves = reinterpret_cast<const uint16_t*>(codes) + first;
        for (int c = 0; c < hd; ++c) y[c] = fp16_to_fp32(halves[c]);
        continue;
      }
      case KvScheme::fp8: {
        const float scale = fp16_to_fp32(reinterpret_cast<const uint16_t*>(block + row_params_offset_)[r]);
        for (int c = 0; c < hd; ++c) y[c] = e4m3_to_fp32(codes[first + c]) * scale;
        continue;
      }
      case KvScheme::q8_0:
      case KvScheme::q4_0: {
        const int blocks = hd / kGgmlBlock;
        const auto* scales = reinterpret_cast<const uint16_t*>(block + row_params_offset_) + int64_t{r} * blocks;
        if (format_.scheme == KvScheme::q4_0) unpack_codes(codes, first, row_codes.data(), hd, 4);
        for (int c = 0; c < hd; ++c) {
          const float d = fp16_to_fp32(scales[c / kGgmlBlock]);
          y[c] = format_.scheme == KvScheme::q8_0 ? static_cast<float>(reinterpret_cast<const int8_t*>(codes)[first + c]) * d
                                                  : static_cast<float>(row_codes[c] - 8) * d;
        }
        continue;
      }
      case KvScheme::kivi: {
        unpack_codes(codes, first, row_codes.data(), hd, format_.bits);
        const uint16_t* params = kind_ == KvKind::key
                                     ? reinterpret_cast<const uint16_t*>(block + group_params_offset_) + int64_t{r / 32} * hd * 2
                                     : reinterpret_cast<const uint16_t*>(block + row_params_offset_) + int64_t{r} * (hd / 32) * 2;
        for (int c = 0; c < hd; ++c) {
          const int p = kind_ == KvKind::key ? c : c / 32;
          y[c] = static_cast<float>(row_codes[c]) * fp16_to_fp32(params[2 * p]) + fp16_to_fp32(params[2 * p + 1]);
        }
        continue;
      }
      case KvScheme::uniform:
      case KvScheme::nonuniform: {
        unpack_codes(codes, first, row_codes.data(), hd, format_.bits);
        if (kind_ == KvKind::value) {
          const auto* params = reinterpret_cast<const uint16_t*>(block + row_params_offset_) + int64_t{r} * 2;
          const CodeRange range{fp16_to_fp32(params[0]), fp16_to_fp32(params[1])};
          for (int c = 0; c < hd; ++c) y[c] = range.decode(row_codes[c], format_, calib.codebook);
        } else if (per_page_key_ranges_) {
          const auto* params = reinterpret_cast<const uint16_t*>(block + group_params_offset_);
          for (int c = 0; c < hd; ++c) {
            y[c] = CodeRange{fp16_to_fp32(params[2 * c]), fp16_to_fp32(params[2 * c + 1])}.decode(row_codes[c], format_,
                                                                                               calib.codebook);
          }
        } else {
          for (int c = 0; c < hd; ++c) y[c] = CodeRange{calib.key_lo[c], calib.key_hi[c]}.decode(row_codes[c], format_, calib.codebook);
        }
        continue;
      }
    }
  }
  if (outlier_capacity_ > 0) {
    const uint32_t count = *reinterpret_cast<const uint32_t*>(block + outliers_offset_);
    const auto* slots = reinterpret_cast<const OutlierSlot*>(block + outliers_offset_ + 4);
    for (uint32_t s = 0; s < count; ++s) {
      if (slots[s].index < int64_t{n} * hd) out[slots[s].index] = fp16_to_fp32(slots[s].value);
    }
  }
}

}  // namespace kvq
