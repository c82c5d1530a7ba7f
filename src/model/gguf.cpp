// GGUF reader. The parser walks a bounded cursor over the mapped bytes; every
// length read from the file is compared with what remains before anything is
// allocated, so a hostile file cannot make it read out of bounds or reserve
// more memory than the file itself occupies.
#include "model/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "core/error.h"

namespace kvq {
namespace {

constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" little-endian
constexpr uint64_t kMaxMetadataEntries = 1u << 20;
constexpr uint64_t kMaxTensors = 1u << 20;
constexpr uint32_t kMaxDims = 4;  // GGML_MAX_DIMS
constexpr int kMaxArrayNesting = 4;

// FNV-1a, 64 bit.
uint64_t fnv1a(std::span<const uint8_t> bytes, uint64_t hash = 0xcbf29ce484222325ull) {
  for (uint8_t b : bytes) {
    hash ^= b;
    hash *= 0x100000001b3ull;
  }
  return hash;
}

class Cursor {
 public:
  Cursor(std::span<const uint8_t> bytes, const std::string& source) : bytes_(bytes), source_(source) {}

  uint64_t position() const { return pos_; }
  uint64_t remaining() const { return bytes_.size() - pos_; }

  template <typename T>
  T read(std::string_view what) {
    need(sizeof(T), what);
    T value;
    std::memcpy(&value, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return value;
  }

  std::string read_string(std::string_view what) {
    uint64_t length = read<uint64_t>(what);
    if (length > remaining()) {
      fail("{}: {}: string length {} exceeds the {} bytes left in the file", source_, what, length,
           remaining());
    }
    std::string s(reinterpret_cast<const char*>(bytes_.data() + pos_), length);
    pos_ += length;
    return s;
  }

  void need(uint64_t n, std::string_view what) const {
    if (n > remaining()) fail("{}: truncated file while reading {}", source_, what);
  }

 private:
  std::span<const uint8_t> bytes_;
  const std::string& source_;
  uint64_t pos_ = 0;
};

// Smallest encoded size of one value of a type, used to bound array counts.
uint64_t min_encoded_size(GgufValueType type) {
  switch (type) {
    case GgufValueType::UINT8:
    case GgufValueType::INT8:
    case GgufValueType::BOOL:
      return 1;
    case GgufValueType::UINT16:
    case GgufValueType::INT16:
      return 2;
    case GgufValueType::UINT32:
    case GgufValueType::INT32:
    case GgufValueType::FLOAT32:
      return 4;
    case GgufValueType::UINT64:
    case GgufValueType::INT64:
    case GgufValueType::FLOAT64:
    case GgufValueType::STRING:  // its length prefix
      return 8;
    case GgufValueType::ARRAY:  // element type + count
      return 12;
  }
  return 1;
}

bool is_known_value_type(uint32_t type) { return type <= static_cast<uint32_t>(GgufValueType::FLOAT64); }

GgufValue read_value(Cursor& cursor, GgufValueType type, const std::string& key, const std::string& source,
                     int depth) {
  GgufValue value;
  value.type = type;
  switch (type) {
    case GgufValueType::UINT8: value.u = cursor.read<uint8_t>(key); break;
    case GgufValueType::INT8: value.i = cursor.read<int8_t>(key); break;
    case GgufValueType::UINT16: value.u = cursor.read<uint16_t>(key); break;
    case GgufValueType::INT16: value.i = cursor.read<int16_t>(key); break;
    case GgufValueType::UINT32: value.u = cursor.read<uint32_t>(key); break;
    case GgufValueType::INT32: value.i = cursor.read<int32_t>(key); break;
    case GgufValueType::UINT64: value.u = cursor.read<uint64_t>(key); break;
    case GgufValueType::INT64: value.i = cursor.read<int64_t>(key); break;
    case GgufValueType::FLOAT32: value.f = cursor.read<float>(key); break;
    case GgufValueType::FLOAT64: value.f = cursor.read<double>(key); break;
    case GgufValueType::BOOL: {
      uint8_t b = cursor.read<uint8_t>(key);
      if (b > 1) fail("{}: metadata '{}': boolean byte {} is neither 0 nor 1", source, key, b);
      value.u = b;
      break;
    }
    case GgufValueType::STRING: value.s = cursor.read_string(key); break;
    case GgufValueType::ARRAY: {
      if (depth >= kMaxArrayNesting) fail("{}: metadata '{}': arrays nested too deeply", source, key);
      uint32_t element_type = cursor.read<uint32_t>(key);
      if (!is_known_value_type(element_type)) {
        fail("{}: metadata '{}': unknown array element type {}", source, key, element_type);
      }
      value.element_type = static_cast<GgufValueType>(element_type);
      uint64_t count = cursor.read<uint64_t>(key);
      if (count > cursor.remaining() / min_encoded_size(value.element_type)) {
        fail("{}: metadata '{}': array of {} elements cannot fit in the {} bytes left", source, key, count,
             cursor.remaining());
      }
      value.items.reserve(count);
      for (uint64_t k = 0; k < count; ++k) {
        value.items.push_back(read_value(cursor, value.element_type, key, source, depth + 1));
      }
      break;
    }
  }
  return value;
}

}  // namespace

GgufTypeTraits gguf_type_traits(uint32_t type) {
  switch (static_cast<GgufType>(type)) {
    case GgufType::F32: return {true, 1, 4};
    case GgufType::F16: return {true, 1, 2};
    case GgufType::BF16: return {true, 1, 2};
    case GgufType::Q4_0: return {true, 32, 18};
    case GgufType::Q4_1: return {true, 32, 20};
    case GgufType::Q5_0: return {true, 32, 22};
    case GgufType::Q5_1: return {true, 32, 24};
    case GgufType::Q8_0: return {true, 32, 34};
    case GgufType::Q8_1: return {true, 32, 36};
    case GgufType::Q2_K: return {true, 256, 84};
    case GgufType::Q3_K: return {true, 256, 110};
    case GgufType::Q4_K: return {true, 256, 144};
    case GgufType::Q5_K: return {true, 256, 176};
    case GgufType::Q6_K: return {true, 256, 210};
    case GgufType::Q8_K: return {true, 256, 292};
  }
  return {};
}

std::string gguf_type_name(uint32_t type) {
  switch (static_cast<GgufType>(type)) {
    case GgufType::F32: return "F32";
    case GgufType::F16: return "F16";
    case GgufType::BF16: return "BF16";
    case GgufType::Q4_0: return "Q4_0";
    case GgufType::Q4_1: return "Q4_1";
    case GgufType::Q5_0: return "Q5_0";
    case GgufType::Q5_1: return "Q5_1";
    case GgufType::Q8_0: return "Q8_0";
    case GgufType::Q8_1: return "Q8_1";
    case GgufType::Q2_K: return "Q2_K";
    case GgufType::Q3_K: return "Q3_K";
    case GgufType::Q4_K: return "Q4_K";
    case GgufType::Q5_K: return "Q5_K";
    case GgufType::Q6_K: return "Q6_K";
    case GgufType::Q8_K: return "Q8_K";
  }
  return fmt::format("type {}", type);
}

std::string gguf_value_type_name(GgufValueType type) {
  static constexpr const char* kNames[] = {"uint8", "int8",  "uint16", "int16",  "uint32", "int32", "float32",
                                           "bool",  "string", "array", "uint64", "int64",  "float64"};
  auto index = static_cast<uint32_t>(type);
  return index < std::size(kNames) ? kNames[index] : fmt::format("value type {}", index);
}

struct GgufFile::Mapping {
  void* address = nullptr;
  size_t length = 0;
  ~Mapping() {
    if (address != nullptr) munmap(address, length);
  }
};

GgufFile::GgufFile(GgufFile&&) noexcept = default;
GgufFile& GgufFile::operator=(GgufFile&&) noexcept = default;
GgufFile::~GgufFile() = default;

GgufFile GgufFile::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("{}: cannot open: {}", path, std::strerror(errno));
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail("{}: not a regular file", path);
  }
  GgufFile file;
  file.source_name_ = path;
  file.mapping_ = std::make_unique<Mapping>();
  if (st.st_size > 0) {
    void* address = mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
    if (address == MAP_FAILED) {
      ::close(fd);
      fail("{}: mmap failed: {}", path, std::strerror(errno));
    }
    file.mapping_->address = address;
    file.mapping_->length = static_cast<size_t>(st.st_size);
    file.bytes_ = {static_cast<const uint8_t*>(address), static_cast<size_t>(st.st_size)};
  }
  ::close(fd);
  file.parse_all();
  return file;
}

GgufFile GgufFile::parse(std::span<const uint8_t> bytes, std::string source_name) {
  GgufFile file;
  file.bytes_ = bytes;
  file.source_name_ = std::move(source_name);
  file.parse_all();
  return file;
}

void GgufFile::parse_all() {
  const std::string& src = source_name_;
  Cursor cursor(bytes_, src);
  if (bytes_.size() < 4) fail("{}: not a GGUF file (only {} bytes)", src, bytes_.size());
  uint32_t magic = cursor.read<uint32_t>("magic");
  if (magic != kGgufMagic) fail("{}: not a GGUF file (bad magic 0x{:08x})", src, magic);
  version_ = cursor.read<uint32_t>("version");
  if (version_ != 2 && version_ != 3) fail("{}: unsupported GGUF version {} (supported: 2, 3)", src, version_);
  uint64_t n_tensors = cursor.read<uint64_t>("tensor count");
  uint64_t n_metadata = cursor.read<uint64_t>("metadata count");
  // Each metadata entry takes at least 8 (key length) + 4 (type) + 1 bytes; each tensor 8+4+8+4+8.
  if (n_metadata > kMaxMetadataEntries || n_metadata > cursor.remaining() / 13) {
    fail("{}: absurd metadata count {}", src, n_metadata);
  }
  if (n_tensors > kMaxTensors || n_tensors > cursor.remaining() / 32) {
    fail("{}: absurd tensor count {}", src, n_tensors);
  }

  for (uint64_t k = 0; k < n_metadata; ++k) {
    std::string key = cursor.read_string(fmt::format("metadata key #{}", k));
    uint32_t type = cursor.read<uint32_t>(key);
    if (!is_known_value_type(type)) fail("{}: metadata '{}': unknown value type {}", src, key, type);
    GgufValue value = read_value(cursor, static_cast<GgufValueType>(type), key, src, 0);
    if (metadata_index_.count(key) != 0) fail("{}: metadata '{}' appears twice", src, key);
    metadata_index_.emplace(key, metadata_.size());
    metadata_.emplace_back(std::move(key), std::move(value));
  }

  if (has("general.alignment")) {
    const GgufValue& a = value("general.alignment");
    if (a.type != GgufValueType::UINT32 || a.u == 0 || (a.u & (a.u - 1)) != 0) {
      fail("{}: metadata 'general.alignment' must be a power-of-two uint32", src);
    }
    alignment_ = a.u;
  }

  tensors_.reserve(n_tensors);
  for (uint64_t k = 0; k < n_tensors; ++k) {
    GgufTensorInfo info;
    info.name = cursor.read_string(fmt::format("name of tensor #{}", k));
    const std::string what = fmt::format("tensor '{}'", info.name);
    uint32_t n_dims = cursor.read<uint32_t>(what);
    if (n_dims == 0 || n_dims > kMaxDims) fail("{}: {}: {} dimensions (1..{} allowed)", src, what, n_dims, kMaxDims);
    info.n_elements = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      uint64_t dim = cursor.read<uint64_t>(what);
      // 2^40 elements per dimension and 2^50 in all are far beyond any model that fits a file.
      if (dim == 0 || dim > (1ull << 40) || static_cast<uint64_t>(info.n_elements) * dim > (1ull << 50)) {
        fail("{}: {}: absurd dimension {}", src, what, dim);
      }
      info.dims.push_back(static_cast<int64_t>(dim));
      info.n_elements *= static_cast<int64_t>(dim);
    }
    info.type = cursor.read<uint32_t>(what);
    GgufTypeTraits traits = gguf_type_traits(info.type);
    if (!traits.known) fail("{}: {}: unknown tensor type {}", src, what, info.type);
    if (info.dims[0] % traits.block_elements != 0) {
      fail("{}: {}: first dimension {} is not a multiple of the {} block size {}", src, what, info.dims[0],
           gguf_type_name(info.type), traits.block_elements);
    }
    info.n_bytes = static_cast<uint64_t>(info.n_elements / traits.block_elements) * traits.block_bytes;
    info.offset = cursor.read<uint64_t>(what);
    if (info.offset % alignment_ != 0) {
      fail("{}: {}: offset {} is not aligned to {}", src, what, info.offset, alignment_);
    }
    if (tensor_index_.count(info.name) != 0) fail("{}: {} appears twice", src, what);
    tensor_index_.emplace(info.name, tensors_.size());
    tensors_.push_back(std::move(info));
  }

  uint64_t header_end = cursor.position();
  fingerprint_ = fnv1a(bytes_.subspan(0, header_end));
  data_offset_ = (header_end + alignment_ - 1) / alignment_ * alignment_;
  uint64_t data_size = bytes_.size() >= data_offset_ ? bytes_.size() - data_offset_ : 0;

  // Bounds, then overlaps: sort by offset and compare neighbours.
  std::vector<const GgufTensorInfo*> by_offset;
  by_offset.reserve(tensors_.size());
  for (const GgufTensorInfo& t : tensors_) {
    if (t.offset > data_size || t.n_bytes > data_size - t.offset) {
      fail("{}: tensor '{}': data [{}, {}) runs past the end of the file (data section holds {} bytes)", src,
           t.name, t.offset, t.offset + t.n_bytes, data_size);
    }
    by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const GgufTensorInfo* a, const GgufTensorInfo* b) { return a->offset < b->offset; });
  for (size_t k = 1; k < by_offset.size(); ++k) {
    const GgufTensorInfo& prev = *by_offset[k - 1];
    if (prev.offset + prev.n_bytes > by_offset[k]->offset) {
      fail("{}: tensors '{}' and '{}' overlap", src, prev.name, by_offset[k]->name);
    }
  }
}

bool GgufFile::has(std::string_view key) const { return metadata_index_.find(key) != metadata_index_.end(); }

const GgufValue& GgufFile::value(std::string_view key) const {
  auto it = metadata_index_.find(key);
  if (it == metadata_index_.end()) fail("{}: missing metadata '{}'", source_name_, key);
  return metadata_[it->second].second;
}

uint64_t GgufFile::get_uint(std::string_view key) const {
  const GgufValue& v = value(key);
  switch (v.type) {
    case GgufValueType::UINT8:
    case GgufValueType::UINT16:
    case GgufValueType::UINT32:
    case GgufValueType::UINT64: return v.u;
    case GgufValueType::INT8:
    case GgufValueType::INT16:
    case GgufValueType::INT32:
    case GgufValueType::INT64:
      if (v.i >= 0) return static_cast<uint64_t>(v.i);
      fail("{}: metadata '{}' is negative ({}) where a count is expected", source_name_, key, v.i);
    default: fail("{}: metadata '{}' is {}, expected an integer", source_name_, key, gguf_value_type_name(v.type));
  }
}

int64_t GgufFile::get_int(std::string_view key) const {
  const GgufValue& v = value(key);
  switch (v.type) {
    case GgufValueType::INT8:
    case GgufValueType::INT16:
    case GgufValueType::INT32:
    case GgufValueType::INT64: return v.i;
    case GgufValueType::UINT8:
    case GgufValueType::UINT16:
    case GgufValueType::UINT32:
    case GgufValueType::UINT64:
      if (v.u <= static_cast<uint64_t>(INT64_MAX)) return static_cast<int64_t>(v.u);
      fail("{}: metadata '{}' = {} is out of range", source_name_, key, v.u);
    default: fail("{}: metadata '{}' is {}, expected an integer", source_name_, key, gguf_value_type_name(v.type));
  }
}

double GgufFile::get_float(std::string_view key) const {
  const GgufValue& v = value(key);
  if (v.type != GgufValueType::FLOAT32 && v.type != GgufValueType::FLOAT64) {
    fail("{}: metadata '{}' is {}, expected a float", source_name_, key, gguf_value_type_name(v.type));
  }
  return v.f;
}

bool GgufFile::get_bool(std::string_view key) const {
  const GgufValue& v = value(key);
  if (v.type != GgufValueType::BOOL) {
    fail("{}: metadata '{}' is {}, expected a bool", source_name_, key, gguf_value_type_name(v.type));
  }
  return v.u != 0;
}

const std::string& GgufFile::get_string(std::string_view key) const {
  const GgufValue& v = value(key);
  if (v.type != GgufValueType::STRING) {
    fail("{}: metadata '{}' is {}, expected a string", source_name_, key, gguf_value_type_name(v.type));
  }
  return v.s;
}

std::vector<std::string> GgufFile::get_string_array(std::string_view key) const {
  const GgufValue& v = value(key);
  if (v.type != GgufValueType::ARRAY || v.element_type != GgufValueType::STRING) {
    fail("{}: metadata '{}' is not an array of strings", source_name_, key);
  }
  std::vector<std::string> out;
  out.reserve(v.items.size());
  for (const GgufValue& item : v.items) out.push_back(item.s);
  return out;
}

std::vector<int64_t> GgufFile::get_int_array(std::string_view key) const {
  const GgufValue& v = value(key);
  if (v.type != GgufValueType::ARRAY) fail("{}: metadata '{}' is not an array", source_name_, key);
  std::vector<int64_t> out;
  out.reserve(v.items.size());
  for (const GgufValue& item : v.items) {
    switch (item.type) {
      case GgufValueType::INT8:
      case GgufValueType::INT16:
      case GgufValueType::INT32:
      case GgufValueType::INT64: out.push_back(item.i); break;
      case GgufValueType::UINT8:
      case GgufValueType::UINT16:
      case GgufValueType::UINT32:
      case GgufValueType::BOOL: out.push_back(static_cast<int64_t>(item.u)); break;
      default: fail("{}: metadata '{}' is an array of {}, expected integers", source_name_, key,
                    gguf_value_type_name(item.type));
    }
  }
  return out;
}

const GgufTensorInfo* GgufFile::find_tensor(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const GgufTensorInfo& GgufFile::tensor(std::string_view name) const {
  const GgufTensorInfo* info = find_tensor(name);
  if (info == nullptr) fail("{}: missing tensor '{}'", source_name_, name);
  return *info;
}

std::span<const uint8_t> GgufFile::tensor_bytes(const GgufTensorInfo& info) const {
  return bytes_.subspan(data_offset_ + info.offset, info.n_bytes);
}

}  // namespace kvq
