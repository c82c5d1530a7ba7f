// GGUF reader: header, metadata of every value type, tensor table, alignment,
// mmap. Every count, length and offset is checked against the file before use,
// so a malformed file yields one kvq::Error naming the key or tensor, never a
// crash or an allocation larger than the file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace kvq {

// Tensor element types, numbered as in ggml.
enum class GgufType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  BF16 = 30,
};

// Metadata value types, numbered as in the GGUF specification.
enum class GgufValueType : uint32_t {
  UINT8 = 0,
  INT8 = 1,
  UINT16 = 2,
  INT16 = 3,
  UINT32 = 4,
  INT32 = 5,
  FLOAT32 = 6,
  BOOL = 7,
  STRING = 8,
  ARRAY = 9,
  UINT64 = 10,
  INT64 = 11,
  FLOAT64 = 12,
};

// Block geometry of a tensor type; known == false for types this reader cannot size.
struct GgufTypeTraits {
  bool known = false;
  int64_t block_elements = 0;  // elements per block
  int64_t block_bytes = 0;     // bytes per block
};
GgufTypeTraits gguf_type_traits(uint32_t type);
// "Q4_1", "F32", ... or "type 99" for numbers this reader does not know.
std::string gguf_type_name(uint32_t type);
std::string gguf_value_type_name(GgufValueType type);

struct GgufValue {
  GgufValueType type = GgufValueType::UINT8;
  uint64_t u = 0;     // UINT8..UINT64, BOOL
  int64_t i = 0;      // INT8..INT64
  double f = 0;       // FLOAT32, FLOAT64
  std::string s;      // STRING
  GgufValueType element_type = GgufValueType::UINT8;  // ARRAY only
  std::vector<GgufValue> items;                        // ARRAY only
};

struct GgufTensorInfo {
  std::string name;
  std::vector<int64_t> dims;  // ne[0] first: ne[0] is the contiguous dimension
  uint32_t type = 0;          // GgufType number
  uint64_t offset = 0;        // from the start of the data section
  int64_t n_elements = 0;
  uint64_t n_bytes = 0;
};

class GgufFile {
 public:
  // Maps the file read-only; throws kvq::Error naming the path and the problem.
  static GgufFile open(const std::string& path);
  // Parses a buffer that the caller keeps alive (tests and the fuzzer).
  static GgufFile parse(std::span<const uint8_t> bytes, std::string source_name);

  GgufFile(GgufFile&&) noexcept;
  GgufFile& operator=(GgufFile&&) noexcept;
  ~GgufFile();

  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  const std::string& source_name() const { return source_name_; }

  // Metadata in file order.
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return metadata_; }
  bool has(std::string_view key) const;
  const GgufValue& value(std::string_view key) const;  // throws if missing
  // Typed getters: throw naming the key when it is missing or of another type.
  uint64_t get_uint(std::string_view key) const;  // any unsigned integer type
  int64_t get_int(std::string_view key) const;    // any integer type that fits
  double get_float(std::string_view key) const;   // FLOAT32 or FLOAT64
  bool get_bool(std::string_view key) const;
  const std::string& get_string(std::string_view key) const;
  std::vector<std::string> get_string_array(std::string_view key) const;
  std::vector<int64_t> get_int_array(std::string_view key) const;

  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* find_tensor(std::string_view name) const;  // nullptr if absent
  const GgufTensorInfo& tensor(std::string_view name) const;       // throws if absent
  std::span<const uint8_t> tensor_bytes(const GgufTensorInfo& info) const;
  // FNV-1a over the metadata and tensor table bytes: identifies the model.
  uint64_t fingerprint() const { return fingerprint_; }

 private:
  GgufFile() = default;
  void parse_all();

  struct Mapping;
  std::unique_ptr<Mapping> mapping_;  // owns the mmap when opened from a path
  std::span<const uint8_t> bytes_;
  std::string source_name_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  uint64_t fingerprint_ = 0;
  std::vector<std::pair<std::string, GgufValue>> metadata_;
  std::map<std::string, size_t, std::less<>> metadata_index_;
  std::vector<GgufTensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> tensor_index_;
};

}  // namespace kvq
