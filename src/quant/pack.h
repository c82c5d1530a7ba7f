// Bit packing of b-bit codes (b = 1..8) into a little-endian bit stream: code i
// occupies bits [i*b, i*b + b) counted from bit 0 of byte 0. Pages pack each
// token row's codes back to back, so a row may start at any bit.
#pragma once

#include <cstdint>

namespace kvq {

// Bytes that hold n codes of `bits` bits.
inline int64_t packed_bytes(int64_t n, int bits) { return (n * bits + 7) / 8; }

// Writes codes[0..n) as stream elements first..first+n; other bits are kept.
void pack_codes(uint8_t* stream, int64_t first, const uint8_t* codes, int64_t n, int bits);
// Reads stream elements first..first+n into codes[0..n).
void unpack_codes(const uint8_t* stream, int64_t first, uint8_t* codes, int64_t n, int bits);

}  // namespace kvq
