// The KV formats named by --kv (DESIGN.md, "KV formats"): what each stores per
// element, per token and per page, parsed from names such as "nuq3-1%".
#pragma once

#include <string>

namespace kvq {

enum class KvScheme {
  fp16,  // raw fp16, pre-RoPE keys
  uniform,  // int2/3/4: uniform asymmetric codes; keys per channel (calibrated ranges), values per token
  nonuniform,  // nuq2/3/4: calibrated codebook, same normalization as uniform
  fp8,   // e4m3, one scale per token per KV head, post-RoPE keys
  q8_0,  // llama.cpp blocks of 32 along head_dim, post-RoPE keys
  q4_0,
  kivi,  // KIVI: keys per channel over 32-token groups, values per token over 32-channel groups, post-RoPE
};

struct KvFormat {
  std::string name;  // as given, e.g. "nuq3-1%"
  KvScheme scheme = KvScheme::fp16;
  int bits = 16;                  // bits per code
  double outlier_fraction = 0;    // 0.005, 0.01, 0.02 for the -0.5%/-1%/-2% suffixes (int/nuq only)
  std::string outlier_label = "0%";  // as the calibration file names it

  bool calibrated() const { return scheme == KvScheme::uniform || scheme == KvScheme::nonuniform; }
  // Keys rotated before quantizing (peers, as their engines do) instead of after dequantizing.
  bool keys_post_rope() const;
  // The newest tokens each query reads exactly, whatever the options: KIVI's fp16 residual.
  int native_exact_window() const { return scheme == KvScheme::kivi ? 128 : 0; }
};

// Parses a --kv name; throws UsageError naming the bad part and listing the valid names.
KvFormat parse_kv_format(const std::string& name);

}  // namespace kvq
