// CPU backend: the reference Llama forward over ragged batches with a paged
// fp16 KV cache. fp32 activations and accumulation, OpenBLAS GEMMs, OpenMP.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "engine/step_batch.h"
#include "cpu/llama_ops.h"
#include "model/llama.h"

namespace kvq {

// fp16 pages in host memory. Per layer, K and V each of shape
// (n_pages, n_kv_heads, page_size, head_dim); keys are stored before RoPE.
class CpuKvPages {
 public:
  CpuKvPages(const LlamaConfig& config, int32_t n_pages, int32_t page_size);
  static int64_t bytes_per_page(const LlamaConfig& config, int32_t page_size);

  // (page_size, head_dim) block of one KV head in one page.
  uint16_t* keys(int layer, int32_t page, int kv_head);
  uint16_t* values(int layer, int32_t page, int kv_head);
  int64_t bytes() const { return static_cast<int64_t>(n_elements_) * 2; }
  int32_t n_pages() const { return n_pages_; }

 private:
  uint16_t* block(int layer, int kind, int32_t page, int kv_head);
  LlamaConfig config_;
  int32_t n_pages_;
  int32_t page_size_;
  size_t n_elements_;
  std::unique_ptr<uint16_t[]> storage_;  // (n_layers, 2, n_pages, n_kv_heads, page_size, head_dim), untouched until written
};

class CpuBackend final : public Backend {
 public:
  // `weights` must outlive the backend.
  CpuBackend(const LlamaConfig& config, const LlamaWeights& weights, int32_t n_pages, int32_t page_size);

  void forward(const StepBatch& batch, const PageTables& tables, std::vector<float>& logits) override;
  std::string device_name() const override;
  int64_t kv_bytes_per_page() const override { return CpuKvPages::bytes_per_page(config_, page_size_); }
  int32_t n_pages() const override { return kv_.n_pages(); }

 private:
  void write_kv(int layer, const StepBatch& batch, const PageTables& tables);
  void attention(int layer, const StepBatch& batch, const PageTables& tables);

  LlamaConfig config_;
  const LlamaWeights& weights_;
  int32_t page_size_;
  CpuKvPages kv_;
  RopeTable rope_;
  // Step workspace, grown on demand: T = tokens in the step.
  std::vector<float> x_;        // (T, hidden) residual stream
  std::vector<float> xn_;       // (T, hidden) normalized
  std::vector<float> qkv_;      // (T, q_dim + 2 * kv_dim)
  std::vector<float> attn_;     // (T, q_dim)
  std::vector<float> gate_up_;  // (T, 2 * ffn)
  std::vector<float> act_;      // (T, ffn)
};

}  // namespace kvq
