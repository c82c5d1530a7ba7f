// CPU reference forward. Attention reads every key and value back from the
// fp16 pages (the current chunk included) and applies RoPE to the keys at each
// key's position after reading, the path quantized pages will share.
#include "cpu/cpu_backend.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <fstream>

#include "core/dtypes.h"
#include "core/error.h"
#include "cpu/llama_ops.h"
#include "kv/page_tables.h"

namespace kvq {
namespace {

constexpr int kQueryBlock = 256;  // query rows per score block: bounds scratch to 256 x keys floats

template <typename T>
void grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

}  // namespace

CpuKvPages::CpuKvPages(const LlamaConfig& config, int32_t n_pages, int32_t page_size)
    : config_(config),
      n_pages_(n_pages),
      page_size_(page_size),
      n_elements_(static_cast<size_t>(config.n_layers) * 2 * n_pages * config.kv_dim() * page_size),
      // new[] without () leaves the memory untouched, so an unused pool costs no RSS.
      storage_(new uint16_t[n_elements_]) {}

int64_t CpuKvPages::bytes_per_page(const LlamaConfig& config, int32_t page_size) {
  return int64_t{config.n_layers} * 2 * config.kv_dim() * page_size * 2;
}

uint16_t* CpuKvPages::block(int layer, int kind, int32_t page, int kv_head) {
  size_t head_block = static_cast<size_t>(page_size_) * config_.head_dim;
  size_t index = ((static_cast<size_t>(layer) * 2 + kind) * n_pages_ + page) * config_.n_kv_heads + kv_head;
  return storage_.get() + index * head_block;
}

uint16_t* CpuKvPages::keys(int layer, int32_t page, int kv_head) { return block(layer, 0, page, kv_head); }
uint16_t* CpuKvPages::values(int layer, int32_t page, int kv_head) { return block(layer, 1, page, kv_head); }

CpuBackend::CpuBackend(const LlamaConfig& config, const LlamaWeights& weights, int32_t n_pages, int32_t page_size)
    : config_(config), weights_(weights), page_size_(page_size), kv_(config, n_pages, page_size), rope_(config) {}

std::string CpuBackend::device_name() const {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(line.find_first_not_of(' ', colon + 1));
    }
  }
  return "cpu";
}

void CpuBackend::write_kv(int layer, const StepBatch& batch, const PageTables& tables) {
  const int hd = config_.head_dim;
  const int qkv_dim = config_.qkv_dim();
  for (const SequenceChunk& chunk : batch.chunks) {
#pragma omp parallel for schedule(static)
    for (int32_t t = 0; t < chunk.n_tokens; ++t) {
      TokenSlot slot = tables.locate(chunk.seq, chunk.start_pos + t);
      const float* row = qkv_.data() + static_cast<size_t>(chunk.first_row + t) * qkv_dim;
      for (int h = 0; h < config_.n_kv_heads; ++h) {
        const float* k = row + config_.q_dim() + h * hd;
        const float* v = row + config_.q_dim() + config_.kv_dim() + h * hd;
        uint16_t* k_dst = kv_.keys(layer, slot.page, h) + static_cast<size_t>(slot.slot) * hd;
        uint16_t* v_dst = kv_.values(layer, slot.page, h) + static_cast<size_t>(slot.slot) * hd;
        for (int d = 0; d < hd; ++d) {
          k_dst[d] = fp32_to_fp16(k[d]);
          v_dst[d] = fp32_to_fp16(v[d]);
        }
      }
    }
  }
}

void CpuBackend::attention(int layer, const StepBatch& batch, const PageTables& tables) {
  const int hd = config_.head_dim;
  const int group = config_.n_heads / config_.n_kv_heads;
  const int qkv_dim = config_.qkv_dim();
  const int q_dim = config_.q_dim();
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int n_tasks = static_cast<int>(batch.chunks.size()) * config_.n_kv_heads;

#pragma omp parallel
  {
    std::vector<float> keys, values, scores;  // (n_keys, hd), (n_keys, hd), (kQueryBlock, n_keys)
#pragma omp for schedule(dynamic, 1)
    for (int task = 0; task < n_tasks; ++task) {
      const SequenceChunk& chunk = batch.chunks[task / config_.n_kv_heads];
      const int kv_head = task % config_.n_kv_heads;
      const int64_t n_keys = chunk.start_pos + chunk.n_tokens;
      grow(keys, n_keys * hd);
      grow(values, n_keys * hd);
      grow(scores, static_cast<size_t>(kQueryBlock) * n_keys);

      // Read back every key and value of the sequence as stored, then rotate keys.
      const std::vector<int32_t>& pages = tables.pages(chunk.seq);
      for (int64_t pos = 0; pos < n_keys; ++pos) {
        int32_t page = pages[pos / page_size_];
        size_t offset = static_cast<size_t>(pos % page_size_) * hd;
        const uint16_t* k = kv_.keys(layer, page, kv_head) + offset;
        const uint16_t* v = kv_.values(layer, page, kv_head) + offset;
        float* k_out = keys.data() + pos * hd;
        float* v_out = values.data() + pos * hd;
        for (int d = 0; d < hd; ++d) {
          k_out[d] = fp16_to_fp32(k[d]);
          v_out[d] = fp16_to_fp32(v[d]);
        }
        rope_.rotate(k_out, pos);
      }

      for (int g = 0; g < group; ++g) {
        const int head = kv_head * group + g;
        for (int r0 = 0; r0 < chunk.n_tokens; r0 += kQueryBlock) {
          const int rows = std::min(kQueryBlock, chunk.n_tokens - r0);
          const int64_t visible = chunk.start_pos + r0 + rows;  // keys the block's last row sees
          const float* q = qkv_.data() + static_cast<size_t>(chunk.first_row + r0) * qkv_dim + head * hd;
          gemm_abt(rows, static_cast<int>(visible), hd, q, qkv_dim, keys.data(), hd, scores.data(),
                   static_cast<int>(visible), scale);
          for (int r = 0; r < rows; ++r) {
            float* s = scores.data() + static_cast<size_t>(r) * visible;
            const int64_t n_visible = chunk.start_pos + r0 + r + 1;  // causal: keys at positions <= own
            float max_score = *std::max_element(s, s + n_visible);
            double sum = 0;
            for (int64_t j = 0; j < n_visible; ++j) {
              s[j] = std::exp(s[j] - max_score);
              sum += s[j];
            }
            float inv = static_cast<float>(1.0 / sum);
            for (int64_t j = 0; j < n_visible; ++j) s[j] *= inv;
            std::fill(s + n_visible, s + visible, 0.0f);
          }
          float* out = attn_.data() + static_cast<size_t>(chunk.first_row + r0) * q_dim + head * hd;
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, hd, static_cast<int>(visible), 1.0f,
                      scores.data(), static_cast<int>(visible), values.data(), hd, 0.0f, out, q_dim);
        }
      }
    }
  }
}

void CpuBackend::forward(const StepBatch& batch, const PageTables& tables, std::vector<float>& logits) {
  const LlamaConfig& c = config_;
  const int n = batch.n_tokens();
  const int h = c.hidden;
  for (const SequenceChunk& chunk : batch.chunks) {
    if (chunk.start_pos + chunk.n_tokens > c.context) {
      fail("sequence {}: position {} is beyond the model's context of {}", chunk.seq,
           chunk.start_pos + chunk.n_tokens - 1, c.context);
    }
    if (chunk.start_pos + chunk.n_tokens > tables.capacity(chunk.seq)) {
      fail("sequence {}: pages for positions up to {} were not reserved", chunk.seq, chunk.start_pos + chunk.n_tokens);
    }
  }
  grow(x_, size_t(n) * h);
  grow(xn_, size_t(n) * h);
  grow(qkv_, size_t(n) * c.qkv_dim());
  grow(attn_, size_t(n) * c.q_dim());
  grow(gate_up_, size_t(n) * 2 * c.ffn);
  grow(act_, size_t(n) * c.ffn);

  for (int32_t id : batch.tokens) {
    if (id < 0 || id >= c.vocab) fail("token id {} is outside the vocabulary of {}", id, c.vocab);
  }
#pragma omp parallel for schedule(static)
  for (int t = 0; t < n; ++t) {
    int32_t id = batch.tokens[t];
    std::copy_n(weights_.token_embd.data() + size_t(id) * h, h, x_.data() + size_t(t) * h);
  }

  for (int layer = 0; layer < c.n_layers; ++layer) {
    const LlamaLayerWeights& w = weights_.layers[layer];
#pragma omp parallel for schedule(static)
    for (int t = 0; t < n; ++t) rms_norm(&x_[size_t(t) * h], w.attn_norm.data(), &xn_[size_t(t) * h], h, c.rms_eps);
    gemm_abt(n, c.qkv_dim(), h, xn_.data(), h, w.wqkv.data(), h, qkv_.data(), c.qkv_dim());
    write_kv(layer, batch, tables);
    // Queries are rotated here; keys after they are read back from the pages.
    for (const SequenceChunk& chunk : batch.chunks) {
#pragma omp parallel for schedule(static)
      for (int t = 0; t < chunk.n_tokens; ++t) {
        const int64_t pos = chunk.start_pos + t;
        float* q = &qkv_[size_t(chunk.first_row + t) * c.qkv_dim()];
        for (int head = 0; head < c.n_heads; ++head) {
          rope_.rotate(q + head * c.head_dim, pos);
        }
      }
    }
    attention(layer, batch, tables);
    gemm_abt(n, h, c.q_dim(), attn_.data(), c.q_dim(), w.wo.data(), c.q_dim(), x_.data(), h, 1.0f, 1.0f);

#pragma omp parallel for schedule(static)
    for (int t = 0; t < n; ++t) rms_norm(&x_[size_t(t) * h], w.ffn_norm.data(), &xn_[size_t(t) * h], h, c.rms_eps);
    gemm_abt(n, 2 * c.ffn, h, xn_.data(), h, w.w_gate_up.data(), h, gate_up_.data(), 2 * c.ffn);
#pragma omp parallel for schedule(static)
    for (int t = 0; t < n; ++t) {
      const float* gate = &gate_up_[size_t(t) * 2 * c.ffn];
      const float* up = gate + c.ffn;
      float* out = &act_[size_t(t) * c.ffn];
      swiglu(gate, up, out, c.ffn);
    }
    gemm_abt(n, h, c.ffn, act_.data(), c.ffn, w.w_down.data(), c.ffn, x_.data(), h, 1.0f, 1.0f);
  }

  // Final norm on the rows that need logits only.
  std::vector<int32_t> rows;
  rows.reserve(batch.n_logit_rows());
  for (const SequenceChunk& chunk : batch.chunks) {
    if (chunk.all_logits) {
      for (int32_t t = 0; t < chunk.n_tokens; ++t) rows.push_back(chunk.first_row + t);
    } else {
      rows.push_back(chunk.first_row + chunk.n_tokens - 1);
    }
  }
  const int n_rows = static_cast<int>(rows.size());
#pragma omp parallel for schedule(static)
  for (int r = 0; r < n_rows; ++r) {
    rms_norm(&x_[size_t(rows[r]) * h], weights_.output_norm.data(), &xn_[size_t(r) * h], h, c.rms_eps);
  }
  logits.resize(size_t(n_rows) * c.vocab);
  gemm_abt(n_rows, c.vocab, h, xn_.data(), h, weights_.output_matrix().data(), h, logits.data(), c.vocab);
}

}  // namespace kvq
