// CPU backend: the reference Llama forward over ragged batches with a paged KV
// cache in any --kv format. fp32 activations and accumulation, OpenBLAS GEMMs,
// OpenMP. Keys and values are rounded to fp16 (the GEMM output a GPU stores)
// before they are stored or quantized.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "calib/calibration_file.h"
#include "cpu/llama_ops.h"
#include "engine/step_batch.h"
#include "kv/kv_format.h"
#include "kv/page_codec.h"
#include "model/llama.h"

namespace kvq {

// Query rows per attention score block: bounds scratch to this many rows x keys floats.
constexpr int kAttentionQueryBlock = 256;

struct KvCacheOptions {
  KvFormat format;                             // default fp16
  std::vector<LayerCalibration> calibration;   // (n_layers), calibrated (int/nuq) formats only
  // Sinks, tail and page key ranges are ours (int/nuq formats); the peers run as their engines do.
  int sinks = 1;                               // first tokens of a sequence kept fp16
  bool tail = false;                           // the newest partial page is read exactly until sealed
  bool per_page_key_ranges = false;            // --kscale page: key ranges from each sealed page
  bool exact_chunk = false;                    // a chunk attends to its own keys/values exactly (every format)

  int effective_sinks() const { return format.calibrated() ? sinks : 0; }
  // Most tokens before a query that it may read exactly from the sequence's window (0: none).
  int exact_window_capacity(int page_size) const;
  // The first position the query at `pos` of a chunk starting at chunk_start reads exactly (apart from
  // sinks); pos + 1 when none. Shared by the CPU and CUDA backends: one rule for both.
  int64_t exact_from(int64_t pos, int64_t chunk_start, int page_size) const;
};

// The pool: per layer and page, the K blocks of every KV head, then the V blocks
// (layout of one block in kv/page_codec.h; keys pre-RoPE unless the format says otherwise).
class CpuKvPages {
 public:
  CpuKvPages(const LlamaConfig& config, int32_t n_pages, int32_t page_size, const KvCacheOptions& options);
  static int64_t bytes_per_page(const LlamaConfig& config, int32_t page_size, const KvCacheOptions& options);

  uint8_t* block(int layer, KvKind kind, int32_t page, int kv_head);
  const PageCodec& codec(KvKind kind) const { return kind == KvKind::key ? key_codec_ : value_codec_; }
  int32_t n_pages() const { return n_pages_; }

 private:
  LlamaConfig config_;
  int32_t n_pages_;
  PageCodec key_codec_, value_codec_;
  std::unique_ptr<uint8_t[]> storage_;  // (n_layers, n_pages, [K blocks (n_kv_heads)], [V blocks (n_kv_heads)])
};

class CpuBackend final : public Backend {
 public:
  // `weights` must outlive the backend, and so must the calibration file behind options.calibration.
  CpuBackend(const LlamaConfig& config, const LlamaWeights& weights, int32_t n_pages, int32_t page_size,
             KvCacheOptions options = {});

  void forward(const StepBatch& batch, const PageTables& tables, std::vector<float>& logits) override;
  std::string device_name() const override;
  int64_t kv_bytes_per_page() const override { return CpuKvPages::bytes_per_page(config_, page_size_, options_); }
  int32_t n_pages() const override { return kv_.n_pages(); }
  int64_t kv_bytes_per_sequence() const override;
  void release_sequence(int32_t seq) override { exact_rows_.erase(seq); }
  KvCacheStats kv_stats() const override { return stats_; }

 private:
  // fp16 rows kept outside the pages for one sequence, per layer, K/V and KV head.
  struct ExactRows {
    std::vector<uint16_t> sinks;   // (n_layers, 2, n_kv_heads, sinks, head_dim)
    std::vector<uint16_t> window;  // (n_layers, 2, n_kv_heads, window, head_dim) ring: position p at p % window
  };
  // Offset of position pos's row in ExactRows::sinks (pos < sinks) or ::window.
  size_t exact_row_offset(int layer, KvKind kind, int kv_head, int64_t pos) const;
  // The fp16-exact row (head_dim) of position pos: from this step's K/V when the
  // chunk holds it, else from the sequence's sinks or window.
  void load_exact_row(const SequenceChunk& chunk, int layer, KvKind kind, int kv_head, int64_t pos, float* out) const;
  int64_t exact_from(int64_t pos, int64_t chunk_start) const { return options_.exact_from(pos, chunk_start, page_size_); }
  HeadCalibration head_calibration(int layer, KvKind kind, int kv_head) const;

  void round_kv(const StepBatch& batch);
  void write_kv(int layer, const StepBatch& batch, const PageTables& tables);
  void save_exact_rows(int layer, const StepBatch& batch);
  void attention(int layer, const StepBatch& batch, const PageTables& tables);

  LlamaConfig config_;
  const LlamaWeights& weights_;
  int32_t page_size_;
  KvCacheOptions options_;
  int window_;  // options_.exact_window_capacity(page_size_)
  CpuKvPages kv_;
  RopeTable rope_;
  std::map<int32_t, ExactRows> exact_rows_;  // by sequence id
  KvCacheStats stats_;
  // Step workspace, grown on demand: T = tokens in the step.
  std::vector<float> x_;        // (T, hidden) residual stream
  std::vector<float> xn_;       // (T, hidden) normalized
  std::vector<float> qkv_;      // (T, q_dim + 2 * kv_dim)
  std::vector<float> kv_rows_;  // (T, 2, kv_dim) K and V rounded to fp16 (K rotated for post-RoPE formats)
  std::vector<float> attn_;     // (T, q_dim)
  std::vector<float> gate_up_;  // (T, 2 * ffn)
  std::vector<float> act_;      // (T, ffn)
};

}  // namespace kvq
