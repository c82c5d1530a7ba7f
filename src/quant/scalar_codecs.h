// Element and block quantizers shared by the KV formats. Every function is
// deterministic fp32 arithmetic (no contraction, round-to-nearest-even where
// not stated) so the CUDA twins can reproduce the codes bit for bit.
#pragma once

#include <cstdint>

namespace kvq {

// OCP FP8 E4M3 ("fn": no infinities, max 448), round to nearest even, saturating.
uint8_t fp32_to_e4m3(float x);
float e4m3_to_fp32(uint8_t code);

// Uniform asymmetric: code = clamp(rint((x - lo) * levels / (hi - lo)), 0, levels), levels = 2^bits - 1.
struct UniformRange {
  float lo = 0;
  float step = 0;      // (hi - lo) / levels
  float inv_step = 0;  // levels / (hi - lo), 0 when hi == lo
  UniformRange(float lo, float hi, int bits);
  uint8_t encode(float x, int bits) const;
  float decode(uint8_t code) const { return lo + static_cast<float>(code) * step; }
};

// A sorted codebook of 2^bits centres in [-1, 1]; x in [-1, 1] after normalization.
struct Codebook {
  const float* centres = nullptr;  // (2^bits) ascending
  int bits = 0;
  uint8_t nearest(float x) const;  // ties go to the lower centre
};

// llama.cpp's q8_0 / q4_0 over one block of 32 values (quantize_row_q*_0_ref):
// codes (32) and the fp16 scale bits.
constexpr int kGgmlBlock = 32;
void quantize_q8_0_block(const float* x, int8_t* codes, uint16_t* scale_fp16);
void quantize_q4_0_block(const float* x, uint8_t* codes, uint16_t* scale_fp16);  // codes 0..15, value (code-8)*d

}  // namespace kvq
