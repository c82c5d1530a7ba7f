#include "kv/kv_format.h"

#include <fmt/format.h>

#include "core/error.h"

namespace kvq {
namespace {

constexpr const char* kValidNames =
    "fp16, int4, int3, int2, nuq4, nuq3, nuq2 (int/nuq with -0.5%, -1% or -2% outliers), fp8, q8_0, q4_0, kivi2, "
    "kivi4";

[[noreturn]] void bad_format(const std::string& name, const std::string& why) {
  throw UsageError(fmt::format("--kv {}: {}; valid formats: {}", name, why, kValidNames));
}

}  // namespace

bool KvFormat::keys_post_rope() const {
  return scheme == KvScheme::fp8 || scheme == KvScheme::q8_0 || scheme == KvScheme::q4_0 || scheme == KvScheme::kivi;
}

KvFormat parse_kv_format(const std::string& name) {
  KvFormat format;
  format.name = name;
  if (name == "fp16") return format;
  if (name == "fp8") return format.scheme = KvScheme::fp8, format.bits = 8, format;
  if (name == "q8_0") return format.scheme = KvScheme::q8_0, format.bits = 8, format;
  if (name == "q4_0") return format.scheme = KvScheme::q4_0, format.bits = 4, format;
  if (name == "kivi2" || name == "kivi4") {
    format.scheme = KvScheme::kivi;
    format.bits = name.back() - '0';
    return format;
  }
  std::string base = name, suffix;
  if (auto dash = name.find('-'); dash != std::string::npos) {
    base = name.substr(0, dash);
    suffix = name.substr(dash + 1);
  }
  if (base.size() != 4 || (base.rfind("int", 0) != 0 && base.rfind("nuq", 0) != 0)) bad_format(name, "unknown format");
  format.scheme = base[0] == 'i' ? KvScheme::uniform : KvScheme::nonuniform;
  format.bits = base[3] - '0';
  if (format.bits < 2 || format.bits > 4) bad_format(name, "bits must be 2, 3 or 4");
  if (!suffix.empty()) {
    if (suffix == "0.5%") format.outlier_fraction = 0.005;
    else if (suffix == "1%") format.outlier_fraction = 0.01;
    else if (suffix == "2%") format.outlier_fraction = 0.02;
    else bad_format(name, fmt::format("unknown outlier suffix '-{}' (use -0.5%, -1% or -2%)", suffix));
    format.outlier_label = suffix;
  }
  return format;
}

}  // namespace kvq
