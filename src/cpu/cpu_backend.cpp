// CPU reference forward. Attention reads every key and value back from the
// pages as stored (the current chunk included: quantize, then attend), applies
// RoPE to pre-RoPE keys at each key's position after decoding, and reads
// exactly only what the options keep exact (sinks, --tail, KIVI's window,
// --exact-chunk).
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


template <typename T>
void grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

}  // namespace

int KvCacheOptions::exact_window_capacity(int page_size) const {
  int window = format.native_exact_window();
  if (format.calibrated() && (tail || per_page_key_ranges)) window = std::max(window, page_size);
  return window;
}

int64_t KvCacheOptions::exact_from(int64_t pos, int64_t chunk_start, int page_size) const {
  int64_t from = pos + 1;
  if (format.native_exact_window() > 0) from = std::min(from, pos + 1 - format.native_exact_window());
  if (format.calibrated() && (tail || per_page_key_ranges)) from = std::min(from, pos / page_size * page_size);
  if (exact_chunk) from = std::min(from, chunk_start);
  return std::max<int64_t>(from, 0);
}

CpuKvPages::CpuKvPages(const LlamaConfig& config, int32_t n_pages, int32_t page_size, const KvCacheOptions& options)
    : config_(config),
      n_pages_(n_pages),
      key_codec_(options.format, KvKind::key, page_size, config.head_dim, options.per_page_key_ranges),
      value_codec_(options.format, KvKind::value, page_size, config.head_dim, options.per_page_key_ranges),
      // new[] without () leaves the memory untouched, so an unused pool costs no RSS.
      storage_(new uint8_t[static_cast<size_t>(bytes_per_page(config, page_size, options)) * n_pages]) {}

int64_t CpuKvPages::bytes_per_page(const LlamaConfig& config, int32_t page_size, const KvCacheOptions& options) {
  const PageCodec keys(options.format, KvKind::key, page_size, config.head_dim, options.per_page_key_ranges);
  const PageCodec values(options.format, KvKind::value, page_size, config.head_dim, options.per_page_key_ranges);
  return int64_t{config.n_layers} * config.n_kv_heads * (keys.block_bytes() + values.block_bytes());
}

uint8_t* CpuKvPages::block(int layer, KvKind kind, int32_t page, int kv_head) {
  const size_t k_bytes = key_codec_.block_bytes(), v_bytes = value_codec_.block_bytes();
  const size_t page_bytes = config_.n_kv_heads * (k_bytes + v_bytes);
  size_t offset = (static_cast<size_t>(layer) * n_pages_ + page) * page_bytes;
  offset += kind == KvKind::key ? kv_head * k_bytes : config_.n_kv_heads * k_bytes + kv_head * v_bytes;
  return storage_.get() + offset;
}

CpuBackend::CpuBackend(const LlamaConfig& config, const LlamaWeights& weights, int32_t n_pages, int32_t page_size,
                       KvCacheOptions options)
    : config_(config),
      weights_(weights),
      page_size_(page_size),
      options_(std::move(options)),
      window_(options_.exact_window_capacity(page_size)),
      kv_(config, n_pages, page_size, options_),
      rope_(config) {
  if (options_.format.calibrated() && static_cast<int>(options_.calibration.size()) != config.n_layers) {
    fail("--kv {} needs a calibration of {} layers", options_.format.name, config.n_layers);
  }
  if (options_.effective_sinks() < 0) fail("--sinks must be >= 0, got {}", options_.sinks);
}

int64_t CpuBackend::kv_bytes_per_sequence() const {
  return int64_t{options_.effective_sinks() + window_} * config_.n_layers * 2 * config_.kv_dim() * 2;
}

HeadCalibration CpuBackend::head_calibration(int layer, KvKind kind, int kv_head) const {
  if (!options_.format.calibrated()) return {};
  const LayerCalibration& layer_calib = options_.calibration[layer];
  const int offset = kv_head * config_.head_dim;
  return {layer_calib.key_lo + offset, layer_calib.key_hi + offset,
          kind == KvKind::key ? layer_calib.key_codebook : layer_calib.value_codebook, layer_calib.value_threshold};
}

size_t CpuBackend::exact_row_offset(int layer, KvKind kind, int kv_head, int64_t pos) const {
  const int sinks = options_.effective_sinks();
  const size_t head_index = (static_cast<size_t>(layer) * 2 + static_cast<int>(kind)) * config_.n_kv_heads + kv_head;
  if (pos < sinks) return (head_index * sinks + pos) * config_.head_dim;
  return (head_index * window_ + pos % window_) * config_.head_dim;
}

void CpuBackend::load_exact_row(const SequenceChunk& chunk, int layer, KvKind kind, int kv_head, int64_t pos,
                                float* out) const {
  const int hd = config_.head_dim;
  if (pos >= chunk.start_pos) {
    const float* src = kv_rows_.data() + static_cast<size_t>(chunk.first_row + pos - chunk.start_pos) * 2 * config_.kv_dim() +
                       static_cast<int>(kind) * config_.kv_dim() + kv_head * hd;
    std::copy_n(src, hd, out);
    return;
  }
  const ExactRows& rows = exact_rows_.at(chunk.seq);
  const uint16_t* src = (pos < options_.effective_sinks() ? rows.sinks : rows.window).data() +
                        exact_row_offset(layer, kind, kv_head, pos);
  for (int d = 0; d < hd; ++d) out[d] = fp16_to_fp32(src[d]);
}

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

void CpuBackend::round_kv(const StepBatch& batch) {
  const int kv_dim = config_.kv_dim();
  const bool rotate_keys = options_.format.keys_post_rope();
  for (const SequenceChunk& chunk : batch.chunks) {
#pragma omp parallel for schedule(static)
    for (int32_t t = 0; t < chunk.n_tokens; ++t) {
      const size_t row = chunk.first_row + t;
      const float* k = qkv_.data() + row * config_.qkv_dim() + config_.q_dim();
      float* out = kv_rows_.data() + row * 2 * kv_dim;
      std::copy_n(k, 2 * kv_dim, out);  // K then V
      if (rotate_keys) {
        for (int h = 0; h < config_.n_kv_heads; ++h) rope_.rotate(out + h * config_.head_dim, chunk.start_pos + t);
      }
      for (int i = 0; i < 2 * kv_dim; ++i) out[i] = round_to_fp16(out[i]);
    }
  }
}

// fp16 copies of each sequence's sinks and newest `window_` tokens. Runs after
// the layer's attention, which still reads the window's older rows.
void CpuBackend::save_exact_rows(int layer, const StepBatch& batch) {
  const int hd = config_.head_dim;
  const int kv_dim = config_.kv_dim();
  const int sinks = options_.effective_sinks();
  if (sinks == 0 && window_ == 0) return;
  for (const SequenceChunk& chunk : batch.chunks) {
    if (chunk.start_pos == 0 && layer == 0) {
      ExactRows& rows = exact_rows_[chunk.seq];
      rows.sinks.assign(static_cast<size_t>(config_.n_layers) * 2 * kv_dim * sinks, 0);
      rows.window.assign(static_cast<size_t>(config_.n_layers) * 2 * kv_dim * window_, 0);
    }
    auto found = exact_rows_.find(chunk.seq);
    if (found == exact_rows_.end()) fail("sequence {}: its first chunk (position 0) never ran", chunk.seq);
    const int64_t end = chunk.start_pos + chunk.n_tokens;
    for (int64_t pos = chunk.start_pos; pos < end; ++pos) {
      if (pos >= sinks && pos < end - window_) continue;
      const float* row = kv_rows_.data() + static_cast<size_t>(chunk.first_row + pos - chunk.start_pos) * 2 * kv_dim;
      for (int kind = 0; kind < 2; ++kind) {
        for (int h = 0; h < config_.n_kv_heads; ++h) {
          uint16_t* dst = (pos < sinks ? found->second.sinks : found->second.window).data() +
                          exact_row_offset(layer, static_cast<KvKind>(kind), h, pos);
          for (int d = 0; d < hd; ++d) dst[d] = fp32_to_fp16(row[kind * kv_dim + h * hd + d]);
        }
      }
    }
  }
}

void CpuBackend::write_kv(int layer, const StepBatch& batch, const PageTables& tables) {
  const int hd = config_.head_dim;
  const int sinks = options_.effective_sinks();

  // One task per (chunk, page, kind, head): rows of a page are encoded in order, so
  // its outlier slots fill deterministically. Grouped codecs encode the groups
  // this step completes, earlier rows of a group coming from the exact window.
  struct Task {
    const SequenceChunk* chunk;
    int64_t first, end;  // positions
    KvKind kind;
    int kv_head;
  };
  std::vector<Task> tasks;
  for (const SequenceChunk& chunk : batch.chunks) {
    const int64_t end = chunk.start_pos + chunk.n_tokens;
    for (int kind = 0; kind < 2; ++kind) {
      const int group = kv_.codec(static_cast<KvKind>(kind)).rows_per_group();
      const int64_t first = chunk.start_pos / group * group;
      const int64_t last = end / group * group;  // groups complete by the end of the step
      for (int64_t page_start = first / page_size_ * page_size_; page_start < last; page_start += page_size_) {
        const int64_t lo = std::max(first, page_start), hi = std::min(last, page_start + page_size_);
        if (lo >= hi) continue;
        for (int h = 0; h < config_.n_kv_heads; ++h) tasks.push_back({&chunk, lo, hi, static_cast<KvKind>(kind), h});
      }
    }
  }
  const int n_tasks = static_cast<int>(tasks.size());
  int64_t stored = 0, over_capacity = 0;
#pragma omp parallel reduction(+ : stored, over_capacity)
  {
    std::vector<float> rows;  // (rows, head_dim)
    OutlierCounts counts;
#pragma omp for schedule(dynamic, 1)
    for (int i = 0; i < n_tasks; ++i) {
      const Task& task = tasks[i];
      const SequenceChunk& chunk = *task.chunk;
      const int n = static_cast<int>(task.end - task.first);
      grow(rows, static_cast<size_t>(n) * hd);
      for (int64_t pos = task.first; pos < task.end; ++pos) {
        load_exact_row(chunk, layer, task.kind, task.kv_head, pos, rows.data() + (pos - task.first) * hd);
      }
      const TokenSlot slot = tables.locate(chunk.seq, task.first);
      const int exact_rows = static_cast<int>(std::clamp<int64_t>(sinks - task.first, 0, n));
      kv_.codec(task.kind).encode(kv_.block(layer, task.kind, slot.page, task.kv_head), slot.slot, n, rows.data(),
                                  exact_rows, head_calibration(layer, task.kind, task.kv_head), counts);
    }
    stored += counts.stored;
    over_capacity += counts.over_capacity;
  }
  stats_.outliers_stored += stored;
  stats_.outliers_over_capacity += over_capacity;
}

void CpuBackend::attention(int layer, const StepBatch& batch, const PageTables& tables) {
  const int hd = config_.head_dim;
  const int group = config_.n_heads / config_.n_kv_heads;
  const int qkv_dim = config_.qkv_dim();
  const int q_dim = config_.q_dim();
  const int sinks = options_.effective_sinks();
  const bool rotate_keys = !options_.format.keys_post_rope();
  const bool any_exact = options_.format.scheme != KvScheme::fp16;  // fp16 pages are already exact
  const int key_group = kv_.codec(KvKind::key).rows_per_group();
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  // One task per (chunk, query head): each decodes its KV head's pages itself (cheap next to
  // the products), which keeps every core busy when a step holds a single sequence.
  const int n_tasks = static_cast<int>(batch.chunks.size()) * config_.n_heads;

#pragma omp parallel
  {
    // (n_keys, hd) as stored; exact rows (sinks, then positions exact_lo..n_keys); (kAttentionQueryBlock, n_keys) scores.
    std::vector<float> keys, values, exact_keys, exact_values, scores;
#pragma omp for schedule(dynamic, 1)
    for (int task = 0; task < n_tasks; ++task) {
      const SequenceChunk& chunk = batch.chunks[task / config_.n_heads];
      const int head = task % config_.n_heads;
      const int kv_head = head / group;
      const int64_t n_keys = chunk.start_pos + chunk.n_tokens;
      grow(keys, n_keys * hd);
      grow(values, n_keys * hd);
      grow(scores, static_cast<size_t>(kAttentionQueryBlock) * n_keys);

      // Every key and value of the sequence as stored; keys of unsealed groups are
      // zeros (every query reads those exactly). Then RoPE at each key's position.
      const std::vector<int32_t>& pages = tables.pages(chunk.seq);
      const HeadCalibration key_calib = head_calibration(layer, KvKind::key, kv_head);
      const HeadCalibration value_calib = head_calibration(layer, KvKind::value, kv_head);
      const int64_t sealed = n_keys / key_group * key_group;  // keys of an unfinished group have no codes yet
      for (int64_t page_start = 0; page_start < n_keys; page_start += page_size_) {
        const int rows = static_cast<int>(std::min<int64_t>(page_size_, n_keys - page_start));
        const int key_rows = static_cast<int>(std::clamp<int64_t>(sealed - page_start, 0, rows));
        const int32_t page = pages[page_start / page_size_];
        if (key_rows > 0) {
          kv_.codec(KvKind::key).decode(kv_.block(layer, KvKind::key, page, kv_head), key_rows,
                                        keys.data() + page_start * hd, key_calib);
        }
        kv_.codec(KvKind::value).decode(kv_.block(layer, KvKind::value, page, kv_head), rows, values.data() + page_start * hd,
                                        value_calib);
      }
      std::fill(keys.begin() + sealed * hd, keys.begin() + n_keys * hd, 0.0f);
      if (rotate_keys) {
        for (int64_t pos = 0; pos < sealed; ++pos) rope_.rotate(keys.data() + pos * hd, pos);
      }

      // Exact rows: sinks and every position some query of the chunk reads exactly.
      const int n_sinks = static_cast<int>(std::min<int64_t>(sinks, n_keys));
      const int64_t exact_lo = any_exact ? std::max<int64_t>(exact_from(chunk.start_pos, chunk.start_pos), n_sinks) : n_keys;
      const int64_t n_exact = n_sinks + (n_keys - exact_lo);
      if (any_exact && n_exact > 0) {
        grow(exact_keys, n_exact * hd);
        grow(exact_values, n_exact * hd);
        for (int64_t e = 0; e < n_exact; ++e) {
          const int64_t pos = e < n_sinks ? e : exact_lo + (e - n_sinks);
          load_exact_row(chunk, layer, KvKind::key, kv_head, pos, exact_keys.data() + e * hd);
          load_exact_row(chunk, layer, KvKind::value, kv_head, pos, exact_values.data() + e * hd);
          if (rotate_keys) rope_.rotate(exact_keys.data() + e * hd, pos);
        }
      }
      const float* exact_after_sinks = exact_keys.data() + static_cast<size_t>(n_sinks) * hd;  // position exact_lo on
      const float* exact_values_after_sinks = exact_values.data() + static_cast<size_t>(n_sinks) * hd;
      auto dot = [hd](const float* a, const float* b) {
        float sum = 0;
        for (int d = 0; d < hd; ++d) sum += a[d] * b[d];
        return sum;
      };

      for (int r0 = 0; r0 < chunk.n_tokens; r0 += kAttentionQueryBlock) {
        const int rows = std::min(kAttentionQueryBlock, chunk.n_tokens - r0);
        const int64_t visible = chunk.start_pos + r0 + rows;  // keys the block's last row sees
        const float* q = qkv_.data() + static_cast<size_t>(chunk.first_row + r0) * qkv_dim + head * hd;
        // Keys before `split` enter as stored, the rest exactly: split is where the block's first
        // row starts reading exactly, so later rows read the band [split, their own start) as
        // stored and every row reads the sinks exactly: both fixed up per row below.
        const int64_t split =
            any_exact ? std::max<int64_t>(exact_from(chunk.start_pos + r0, chunk.start_pos), n_sinks) : visible;
        auto own_start = [&](int64_t query_pos) {
          return std::max<int64_t>(exact_from(query_pos, chunk.start_pos), n_sinks);
        };
        const int ld = static_cast<int>(visible);
        if (split > 0) gemm_abt(rows, static_cast<int>(split), hd, q, qkv_dim, keys.data(), hd, scores.data(), ld, scale);
        if (visible > split) {
          gemm_abt(rows, static_cast<int>(visible - split), hd, q, qkv_dim, exact_after_sinks + (split - exact_lo) * hd,
                   hd, scores.data() + split, ld, scale);
        }
        for (int r = 0; r < rows; ++r) {
          float* s = scores.data() + static_cast<size_t>(r) * visible;
          const int64_t query_pos = chunk.start_pos + r0 + r;
          const int64_t n_visible = query_pos + 1;  // causal: keys at positions <= own
          if (any_exact) {
            const float* qr = q + static_cast<size_t>(r) * qkv_dim;
            for (int64_t pos = 0; pos < std::min<int64_t>(n_sinks, n_visible); ++pos) {
              s[pos] = dot(qr, exact_keys.data() + pos * hd) * scale;
            }
            for (int64_t pos = split; pos < std::min(own_start(query_pos), n_visible); ++pos) {
              s[pos] = dot(qr, keys.data() + pos * hd) * scale;
            }
          }
          softmax_row(s, n_visible, visible);
        }
        float* out = attn_.data() + static_cast<size_t>(chunk.first_row + r0) * q_dim + head * hd;
        if (split > 0) {
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, hd, static_cast<int>(split), 1.0f, scores.data(), ld,
                      values.data(), hd, 0.0f, out, q_dim);
        }
        if (visible > split) {
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, hd, static_cast<int>(visible - split), 1.0f,
                      scores.data() + split, ld, exact_values_after_sinks + (split - exact_lo) * hd, hd,
                      split > 0 ? 1.0f : 0.0f, out, q_dim);
        }
        if (!any_exact) continue;
        // The same fix-ups for values: out += p * (wanted - what the product used).
        for (int r = 0; r < rows; ++r) {
          const float* p = scores.data() + static_cast<size_t>(r) * visible;
          const int64_t query_pos = chunk.start_pos + r0 + r;
          float* o = out + static_cast<size_t>(r) * q_dim;
          for (int64_t pos = 0; pos < std::min<int64_t>(n_sinks, query_pos + 1); ++pos) {
            const float* exact = exact_values.data() + pos * hd;
            const float* stored = values.data() + pos * hd;
            for (int d = 0; d < hd; ++d) o[d] += p[pos] * (exact[d] - stored[d]);
          }
          for (int64_t pos = split; pos < std::min(own_start(query_pos), query_pos + 1); ++pos) {
            const float* exact = exact_values_after_sinks + (pos - exact_lo) * hd;
            const float* stored = values.data() + pos * hd;
            for (int d = 0; d < hd; ++d) o[d] += p[pos] * (stored[d] - exact[d]);
          }
        }
      }
    }
  }
}

void CpuBackend::forward(const StepBatch& batch, const PageTables& tables, std::vector<float>& logits) {
  const LlamaConfig& c = config_;
  const int n = batch.n_tokens();
  const int h = c.hidden;
  check_step(batch, tables, c);
  grow(x_, size_t(n) * h);
  grow(xn_, size_t(n) * h);
  grow(qkv_, size_t(n) * c.qkv_dim());
  grow(kv_rows_, size_t(n) * 2 * c.kv_dim());
  grow(attn_, size_t(n) * c.q_dim());
  grow(gate_up_, size_t(n) * 2 * c.ffn);
  grow(act_, size_t(n) * c.ffn);

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
    round_kv(batch);
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
    save_exact_rows(layer, batch);
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
