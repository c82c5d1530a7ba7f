// Builds GGUF bytes in memory for reader tests: metadata entries and tensors
// written exactly as the specification lays them out, with hooks to corrupt them.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace kvq::test {

class GgufBuilder {
 public:
  explicit GgufBuilder(uint32_t version = 3) : version_(version) {}

  void add_u32(const std::string& key, uint32_t v) { scalar(key, 4, &v, 4); }
  void add_i32(const std::string& key, int32_t v) { scalar(key, 5, &v, 4); }
  void add_f32(const std::string& key, float v) { scalar(key, 6, &v, 4); }
  void add_bool(const std::string& key, bool v) { uint8_t b = v; scalar(key, 7, &b, 1); }
  void add_u64(const std::string& key, uint64_t v) { scalar(key, 10, &v, 8); }
  void add_f64(const std::string& key, double v) { scalar(key, 12, &v, 8); }
  void add_string(const std::string& key, const std::string& v) {
    put_string(meta_, key);
    put<uint32_t>(meta_, 8);
    put_string(meta_, v);
    ++n_meta_;
  }
  void add_string_array(const std::string& key, const std::vector<std::string>& items) {
    put_string(meta_, key);
    put<uint32_t>(meta_, 9);
    put<uint32_t>(meta_, 8);
    put<uint64_t>(meta_, items.size());
    for (const auto& s : items) put_string(meta_, s);
    ++n_meta_;
  }
  void add_i32_array(const std::string& key, const std::vector<int32_t>& items) {
    put_string(meta_, key);
    put<uint32_t>(meta_, 9);
    put<uint32_t>(meta_, 5);
    put<uint64_t>(meta_, items.size());
    for (int32_t v : items) put(meta_, v);
    ++n_meta_;
  }
  // Raw metadata bytes for hand-made corruptions (counts as one entry).
  void add_raw_entry(const std::vector<uint8_t>& bytes) {
    meta_.insert(meta_.end(), bytes.begin(), bytes.end());
    ++n_meta_;
  }

  // dims with ne0 first; data appended at the next 32-byte aligned offset unless offset given.
  void add_tensor(const std::string& name, std::vector<uint64_t> dims, uint32_t type, const std::vector<uint8_t>& data,
                  int64_t forced_offset = -1) {
    uint64_t offset = forced_offset >= 0 ? static_cast<uint64_t>(forced_offset) : (data_.size() + 31) / 32 * 32;
    if (forced_offset < 0) {
      data_.resize(offset, 0);
      data_.insert(data_.end(), data.begin(), data.end());
    }
    put_string(tensors_, name);
    put<uint32_t>(tensors_, static_cast<uint32_t>(dims.size()));
    for (uint64_t d : dims) put(tensors_, d);
    put(tensors_, type);
    put(tensors_, offset);
    ++n_tensors_;
  }

  std::vector<uint8_t> bytes() const {
    std::vector<uint8_t> out;
    put<uint32_t>(out, 0x46554747);
    put(out, version_);
    put<uint64_t>(out, n_tensors_);
    put<uint64_t>(out, n_meta_);
    out.insert(out.end(), meta_.begin(), meta_.end());
    out.insert(out.end(), tensors_.begin(), tensors_.end());
    out.resize((out.size() + 31) / 32 * 32, 0);
    out.insert(out.end(), data_.begin(), data_.end());
    return out;
  }

 private:
  template <typename T>
  static void put(std::vector<uint8_t>& out, T v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    out.insert(out.end(), p, p + sizeof(T));
  }
  static void put_string(std::vector<uint8_t>& out, const std::string& s) {
    put<uint64_t>(out, s.size());
    out.insert(out.end(), s.begin(), s.end());
  }
  void scalar(const std::string& key, uint32_t type, const void* v, size_t n) {
    put_string(meta_, key);
    put(meta_, type);
    const auto* p = static_cast<const uint8_t*>(v);
    meta_.insert(meta_.end(), p, p + n);
    ++n_meta_;
  }

  uint32_t version_;
  uint64_t n_meta_ = 0, n_tensors_ = 0;
  std::vector<uint8_t> meta_, tensors_, data_;
};

}  // namespace kvq::test
