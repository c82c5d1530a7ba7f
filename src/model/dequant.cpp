// Block layouts follow ggml (the GGUF producer): each block stores fp16 scale(s)
// followed by packed integer codes. Arithmetic order matches ggml's reference
// dequantizers, so results equal the gguf package's bit for bit.
#include "model/dequant.h"

#include <cstring>

#include "core/dtypes.h"
#include "core/error.h"
#include "model/gguf.h"

namespace kvq {
namespace {

uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// Q4_0: fp16 d, 16 bytes of nibbles; x = (q - 8) * d. Low nibbles are elements 0..15.
void dequant_q4_0(const uint8_t* block, float* out) {
  float d = fp16_to_fp32(load_u16(block));
  const uint8_t* qs = block + 2;
  for (int j = 0; j < 16; ++j) {
    out[j] = static_cast<float>((qs[j] & 0x0f) - 8) * d;
    out[j + 16] = static_cast<float>((qs[j] >> 4) - 8) * d;
  }
}

// Q4_1: fp16 d, fp16 m, 16 bytes of nibbles; x = q * d + m.
void dequant_q4_1(const uint8_t* block, float* out) {
  float d = fp16_to_fp32(load_u16(block));
  float m = fp16_to_fp32(load_u16(block + 2));
  const uint8_t* qs = block + 4;
  for (int j = 0; j < 16; ++j) {
    out[j] = static_cast<float>(qs[j] & 0x0f) * d + m;
    out[j + 16] = static_cast<float>(qs[j] >> 4) * d + m;
  }
}

// Q8_0: fp16 d, 32 int8; x = q * d.
void dequant_q8_0(const uint8_t* block, float* out) {
  float d = fp16_to_fp32(load_u16(block));
  const auto* qs = reinterpret_cast<const int8_t*>(block + 2);
  for (int j = 0; j < 32; ++j) out[j] = static_cast<float>(qs[j]) * d;
}

// Q6_K: 256 elements: ql[128] low nibbles, qh[64] high 2-bit pairs, 16 int8
// sub-block scales, fp16 d; x = d * scale * (q - 32) with q 6 bits.
void dequant_q6_k(const uint8_t* block, float* out) {
  const uint8_t* ql = block;
  const uint8_t* qh = block + 128;
  const auto* scales = reinterpret_cast<const int8_t*>(block + 192);
  float d = fp16_to_fp32(load_u16(block + 208));
  for (int half = 0; half < 2; ++half) {
    for (int l = 0; l < 32; ++l) {
      int sub = l / 16;
      int q1 = ((ql[l] & 0x0f) | (((qh[l] >> 0) & 3) << 4)) - 32;
      int q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
      int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      out[l] = d * static_cast<float>(scales[sub]) * static_cast<float>(q1);
      out[l + 32] = d * static_cast<float>(scales[sub + 2]) * static_cast<float>(q2);
      out[l + 64] = d * static_cast<float>(scales[sub + 4]) * static_cast<float>(q3);
      out[l + 96] = d * static_cast<float>(scales[sub + 6]) * static_cast<float>(q4);
    }
    out += 128;
    ql += 64;
    qh += 32;
    scales += 8;
  }
}

}  // namespace

bool dequant_supported(uint32_t gguf_type) {
  switch (static_cast<GgufType>(gguf_type)) {
    case GgufType::F32:
    case GgufType::F16:
    case GgufType::BF16:
    case GgufType::Q4_0:
    case GgufType::Q4_1:
    case GgufType::Q8_0:
    case GgufType::Q6_K: return true;
    default: return false;
  }
}

void dequantize(uint32_t gguf_type, std::span<const uint8_t> src, std::span<float> dst) {
  GgufTypeTraits traits = gguf_type_traits(gguf_type);
  if (!dequant_supported(gguf_type)) fail("tensor type {} is not supported", gguf_type_name(gguf_type));
  const int64_t n = static_cast<int64_t>(dst.size());
  if (n % traits.block_elements != 0 ||
      static_cast<int64_t>(src.size()) != n / traits.block_elements * traits.block_bytes) {
    fail("dequantize {}: {} bytes do not hold {} elements", gguf_type_name(gguf_type), src.size(), n);
  }
  const uint8_t* in = src.data();
  float* out = dst.data();
  const int64_t n_blocks = n / traits.block_elements;
  switch (static_cast<GgufType>(gguf_type)) {
    case GgufType::F32: std::memcpy(out, in, n * sizeof(float)); return;
    case GgufType::F16:
      for (int64_t k = 0; k < n; ++k) out[k] = fp16_to_fp32(load_u16(in + 2 * k));
      return;
    case GgufType::BF16:
      for (int64_t k = 0; k < n; ++k) out[k] = bf16_to_fp32(load_u16(in + 2 * k));
      return;
    default: break;
  }
  auto block_fn = [&]() -> void (*)(const uint8_t*, float*) {
    switch (static_cast<GgufType>(gguf_type)) {
      case GgufType::Q4_0: return dequant_q4_0;
      case GgufType::Q4_1: return dequant_q4_1;
      case GgufType::Q8_0: return dequant_q8_0;
      default: return dequant_q6_k;
    }
  }();
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < n_blocks; ++b) {
    block_fn(in + b * traits.block_bytes, out + b * traits.block_elements);
  }
}

}  // namespace kvq
