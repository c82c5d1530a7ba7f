#include "quant/pack.h"

namespace kvq {

void pack_codes(uint8_t* stream, int64_t first, const uint8_t* codes, int64_t n, int bits) {
  const unsigned mask = (1u << bits) - 1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t bit = (first + i) * bits;
    // A code spans at most two bytes (bits <= 8): update them as one 16-bit window.
    uint8_t* byte = stream + bit / 8;
    const int shift = static_cast<int>(bit % 8);
    const unsigned window_mask = mask << shift;
    const unsigned value = (codes[i] & mask) << shift;
    byte[0] = static_cast<uint8_t>((byte[0] & ~window_mask) | value);
    if (shift + bits > 8) byte[1] = static_cast<uint8_t>((byte[1] & ~(window_mask >> 8)) | (value >> 8));
  }
}

void unpack_codes(const uint8_t* stream, int64_t first, uint8_t* codes, int64_t n, int bits) {
  const unsigned mask = (1u << bits) - 1;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t bit = (first + i) * bits;
    const uint8_t* byte = stream + bit / 8;
    const int shift = static_cast<int>(bit % 8);
    unsigned window = byte[0];
    if (shift + bits > 8) window |= static_cast<unsigned>(byte[1]) << 8;
    codes[i] = static_cast<uint8_t>((window >> shift) & mask);
  }
}

}  // namespace kvq
