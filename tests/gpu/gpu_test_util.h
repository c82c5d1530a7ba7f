// Shared by the GPU tests and kvq-gpu-bench: device presence, a device buffer
// that frees itself, random fp16 data, and the CPU reference of paged attention.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "cuda/attention.h"
#include "calib/calibration_file.h"
#include "cpu/cpu_backend.h"
#include "cpu/llama_ops.h"
#include "cuda/cuda_check.h"
#include "cuda/kv_quantize.h"
#include "kv/page_tables.h"
#include "model/llama.h"

namespace kvq::gputest {

bool has_cuda_device();
int device_sm_count();  // multiprocessors of the current device

template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n = 0) { resize(n); }
  explicit DeviceArray(const std::vector<T>& host) {
    resize(host.size());
    upload(host);
  }
  ~DeviceArray() {
    if (ptr_) cudaFree(ptr_);
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  void resize(size_t n) {
    if (ptr_) CUDA_CHECK(cudaFree(ptr_));
    ptr_ = nullptr;
    n_ = n;
    if (n) CUDA_CHECK(cudaMalloc(&ptr_, n * sizeof(T)));
  }
  void upload(const std::vector<T>& host) {
    if (host.size()) CUDA_CHECK(cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    if (n_) CUDA_CHECK(cudaMemcpy(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return host;
  }
  T* get() const { return ptr_; }
  size_t size() const { return n_; }

 private:
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

// fp16 bits of normal(0, scale) values.
std::vector<uint16_t> random_half(std::mt19937& rng, size_t n, float scale);

// (context, head_dim / 2) (cos, sin) from RopeTable, as the backend uploads it.
std::vector<float2> rope_table(const LlamaConfig& config);

// A paged fp16 pool of one layer for tests: n_pages pages with shuffled page
// order per sequence, random pre-RoPE keys and values in every page.
struct PagedLayer {
  int32_t page_size = 0, n_kv_heads = 0, head_dim = 0, n_pages = 0;
  std::vector<uint16_t> keys, values;             // (n_pages, n_kv_heads, page_size, head_dim) fp16 bits
  std::vector<std::vector<int32_t>> seq_pages;    // per sequence, pool pages in token order
};
PagedLayer make_paged_layer(std::mt19937& rng, const std::vector<int64_t>& seq_lengths, int32_t page_size,
                            int32_t n_kv_heads, int32_t head_dim, float scale);

// Reference attention of one query row (already rotated, fp16 bits, head_dim)
// against keys 0..n_keys-1 of a sequence: keys read back, rotated with
// RopeTable::rotate in fp32, scores and softmax in double. out (head_dim).
void reference_attention_row(const PagedLayer& layer, const RopeTable& rope, int seq, int kv_head, const uint16_t* q, int64_t n_keys,
                             float scale, double* out);

// A calibration for random keys ~ N(0, 1.5^2) per channel: key ranges [-3.5 + s, 3.5 + s] with a small
// per-channel shift s, codebooks ascending and denser near 0 (the shape of real ones), value threshold 2.5
// (about 1% of Gaussian values). Its quality only sets how far the formats are from fp16; the CPU and the
// GPU quantize with the same numbers.
struct TestCalibration {
  TestCalibration(int n_layers, int kv_dim, int bits);
  std::vector<std::vector<float>> key_lo, key_hi, codebooks;  // (n_layers) x (kv_dim), (kv_dim), (2^bits)
  std::vector<LayerCalibration> layers;                       // views of the above
};

// A --kv format with the shared KV options, as the quantized-format tests sweep them.
struct FormatCase {
  std::string kv;
  int sinks = 1;
  bool tail = true;
  bool page_ranges = false;
  bool exact_chunk = false;
  int page = 0;  // rows per page where a test varies it; 0: the test's default
  std::string label() const;
};
// The case's KvCacheOptions (no calibration attached).
KvCacheOptions options_for(const FormatCase& test);

// The writes of a prefill step of rows starts[s]..lengths[s]-1 of every sequence s (one chunk each, chunk i of
// the step's batch for sequence i where no chunk is empty; starts empty: from position 0): the pages of
// `tables`, blocks laid out per page as n_kv_heads key blocks then n_kv_heads value blocks. row(s, pos): that
// row's (2, n_kv_heads * head_dim) fp16 keys and values on the device, a sequence's rows one after the other.
cuda::KvWritePlan plan_prefill_writes(const std::vector<int>& lengths, const PageTables& tables,
                                      const cuda::PageBlockLayout& key_layout, const cuda::PageBlockLayout& value_layout,
                                      int n_kv_heads, int head_dim, int sinks,
                                      const std::function<const uint16_t*(int, int64_t)>& row,
                                      const std::vector<int>& starts = {});

// Those writes (from position 0) planned and on the device.
struct PrefillWrites {
  PrefillWrites(const std::vector<int>& lengths, const PageTables& tables, const cuda::PageBlockLayout& key_layout,
                const cuda::PageBlockLayout& value_layout, int n_kv_heads, int head_dim, int sinks,
                const std::function<const uint16_t*(int, int64_t)>& row);
  cuda::KvWritePlan plan;  // host copy: runs and rows
  DeviceArray<cuda::KvWriteRun> runs;
  DeviceArray<cuda::KvWriteRow> rows;
};

// Plans those writes and runs them into `pool` (zeroed first) with one launch_kv_quantize. Returns the outlier
// counts {stored, found their block full}.
std::array<unsigned long long, 2> quantize_rows_into_pool(
    uint8_t* pool, size_t pool_bytes, const std::vector<int>& lengths, const PageTables& tables,
    const cuda::PageBlockLayout& key_layout, const cuda::PageBlockLayout& value_layout, int n_kv_heads, int head_dim,
    int sinks, const cuda::DeviceLayerCalibration& calib, const std::function<const uint16_t*(int, int64_t)>& row);

}  // namespace kvq::gputest
