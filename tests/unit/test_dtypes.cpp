// fp16 conversions against the CPU's own F16C instructions (an independent
// implementation of IEEE round-to-nearest-even), exhaustively for fp16 -> fp32
// and over every fp32 exponent for fp32 -> fp16.
#include <gtest/gtest.h>
#include <immintrin.h>

#include <cmath>
#include <random>

#include "core/dtypes.h"

namespace kvq {
namespace {

uint16_t f16c_from_float(float f) { return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT)); }
float f16c_to_float(uint16_t h) { return _cvtsh_ss(h); }

TEST(Fp16, EveryHalfConvertsLikeF16C) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float ours = fp16_to_fp32(static_cast<uint16_t>(h));
    const float theirs = f16c_to_float(static_cast<uint16_t>(h));
    if (std::isnan(theirs)) {
      EXPECT_TRUE(std::isnan(ours)) << h;
    } else {
      EXPECT_EQ(float_bits(ours), float_bits(theirs)) << h;
      EXPECT_EQ(fp32_to_fp16(ours), h) << "round trip " << h;
    }
  }
}

TEST(Fp16, RoundsLikeF16C) {
  std::mt19937 rng(7);
  for (uint32_t exponent = 0; exponent < 256; ++exponent) {
    for (int k = 0; k < 2000; ++k) {
      // Random mantissa; every 4th sample sits exactly on a rounding tie.
      uint32_t mantissa = rng() & 0x7fffffu;
      if (k % 4 == 0) mantissa = (mantissa & ~0x1fffu) | 0x1000u;
      const uint32_t bits = ((rng() & 1u) << 31) | (exponent << 23) | mantissa;
      const float f = bits_float(bits);
      if (std::isnan(f)) continue;
      EXPECT_EQ(fp32_to_fp16(f), f16c_from_float(f)) << std::hex << bits;
    }
  }
}

TEST(Bf16, IsTheUpperHalfOfFp32) { EXPECT_EQ(bf16_to_fp32(0x3fc0), 1.5f); }

}  // namespace
}  // namespace kvq
