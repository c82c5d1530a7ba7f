// Dequantization of GGUF tensor blocks to fp32, done once at load.
#pragma once

#include <cstdint>
#include <span>

namespace kvq {

// Types this engine dequantizes: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q6_K.
bool dequant_supported(uint32_t gguf_type);

// src: the tensor's raw blocks; dst: (n_elements) fp32. Throws for unsupported types.
void dequantize(uint32_t gguf_type, std::span<const uint8_t> src, std::span<float> dst);

}  // namespace kvq
