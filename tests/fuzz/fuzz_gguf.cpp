// libFuzzer target: parse arbitrary bytes as GGUF and dequantize every tensor
// the reader accepts. Any exception other than kvq::Error is a bug; so is any
// sanitizer report or a allocation beyond libFuzzer's -rss_limit_mb.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/error.h"
#include "model/dequant.h"
#include "model/gguf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    kvq::GgufFile file = kvq::GgufFile::parse({data, size}, "fuzz");
    for (const kvq::GgufTensorInfo& t : file.tensors()) {
      if (!kvq::dequant_supported(t.type) || t.n_elements > (1 << 20)) continue;
      std::vector<float> out(t.n_elements);
      kvq::dequantize(t.type, file.tensor_bytes(t), out);
    }
    for (const auto& [key, value] : file.metadata()) {
      if (value.type == kvq::GgufValueType::ARRAY && value.element_type == kvq::GgufValueType::STRING) {
        (void)file.get_string_array(key);
      }
    }
  } catch (const kvq::Error&) {
  }
  return 0;
}
