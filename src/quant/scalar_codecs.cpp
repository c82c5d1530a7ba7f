#include "quant/scalar_codecs.h"

#include <algorithm>
#include <cmath>

#include "core/dtypes.h"

namespace kvq {

uint8_t fp32_to_e4m3(float x) {
  const uint32_t u = float_bits(x);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7f;                  // NaN
  if (bits_float(abs) >= 448.0f) return sign | 0x7e;          // saturate (inf included)
  const int exponent = static_cast<int>(abs >> 23) - 127;
  if (exponent < -6) {
    // Subnormal: multiples of 2^-9. A result of 8 is the smallest normal, 0x08: the encoding carries over.
    return sign | static_cast<uint8_t>(std::nearbyint(bits_float(abs) * 512.0f));
  }
  uint32_t result = (static_cast<uint32_t>(exponent + 7) << 3) | ((abs & 0x7fffffu) >> 20);
  const uint32_t remainder = abs & 0xfffffu;
  if (remainder > 0x80000u || (remainder == 0x80000u && (result & 1u))) ++result;
  return sign | static_cast<uint8_t>(std::min<uint32_t>(result, 0x7e));
}

float e4m3_to_fp32(uint8_t code) {
  const float sign = (code & 0x80) ? -1.0f : 1.0f;
  const int exponent = (code >> 3) & 0xf;
  const int mantissa = code & 7;
  if (exponent == 15 && mantissa == 7) return std::nanf("");
  if (exponent == 0) return sign * std::ldexp(static_cast<float>(mantissa), -9);
  return sign * std::ldexp(1.0f + static_cast<float>(mantissa) / 8.0f, exponent - 7);
}

UniformRange::UniformRange(float lo_, float hi, int bits) : lo(lo_) {
  const float levels = static_cast<float>((1 << bits) - 1);
  const float span = hi - lo_;
  step = span / levels;
  inv_step = span > 0 ? levels / span : 0.0f;
}

uint8_t UniformRange::encode(float x, int bits) const {
  const float scaled = std::nearbyint((x - lo) * inv_step);
  return static_cast<uint8_t>(std::clamp(scaled, 0.0f, static_cast<float>((1 << bits) - 1)));
}

uint8_t Codebook::nearest(float x) const {
  const int n = 1 << bits;
  int code = 0;
  // Midpoints between neighbours decide; computed the same way on every backend.
  while (code + 1 < n && x > 0.5f * (centres[code] + centres[code + 1])) ++code;
  return static_cast<uint8_t>(code);
}

void quantize_q8_0_block(const float* x, int8_t* codes, uint16_t* scale_fp16) {
  float amax = 0;
  for (int j = 0; j < kGgmlBlock; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.0f;
  const float id = d != 0 ? 1.0f / d : 0.0f;
  *scale_fp16 = fp32_to_fp16(d);
  for (int j = 0; j < kGgmlBlock; ++j) codes[j] = static_cast<int8_t>(std::round(x[j] * id));
}

void quantize_q4_0_block(const float* x, uint8_t* codes, uint16_t* scale_fp16) {
  float amax = 0, max = 0;  // the value of largest magnitude, with its sign
  for (int j = 0; j < kGgmlBlock; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  const float d = max / -8.0f;
  const float id = d != 0 ? 1.0f / d : 0.0f;
  *scale_fp16 = fp32_to_fp16(d);
  for (int j = 0; j < kGgmlBlock; ++j) {
    codes[j] = static_cast<uint8_t>(std::min(15, static_cast<int>(static_cast<int8_t>(x[j] * id + 8.5f))));
  }
}

}  // namespace kvq
