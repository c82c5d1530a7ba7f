#include "gpu_test_util.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/dtypes.h"
#include "cpu/llama_ops.h"
#include "cuda/device.h"
#include "engine/step_batch.h"
#include "kv/kv_format.h"

namespace kvq::gputest {

bool has_cuda_device() { return !list_cuda_devices().empty(); }

int device_sm_count() {
  int device = 0, n_sms = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&n_sms, cudaDevAttrMultiProcessorCount, device));
  return n_sms;
}

std::vector<uint16_t> random_half(std::mt19937& rng, size_t n, float scale) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<uint16_t> v(n);
  for (uint16_t& x : v) x = fp32_to_fp16(normal(rng));
  return v;
}

std::vector<float2> rope_table(const LlamaConfig& config) {
  const RopeTable table(config);
  const int half = config.head_dim / 2;
  std::vector<float2> out(size_t(config.context) * half);
  for (int64_t pos = 0; pos < config.context; ++pos)
    for (int i = 0; i < half; ++i) out[pos * half + i] = make_float2(table.cos(pos)[i], table.sin(pos)[i]);
  return out;
}

PagedLayer make_paged_layer(std::mt19937& rng, const std::vector<int64_t>& seq_lengths, int32_t page_size,
                            int32_t n_kv_heads, int32_t head_dim, float scale) {
  PagedLayer layer;
  layer.page_size = page_size;
  layer.n_kv_heads = n_kv_heads;
  layer.head_dim = head_dim;
  int32_t total = 0;
  for (int64_t n : seq_lengths) total += static_cast<int32_t>((n + page_size - 1) / page_size);
  layer.n_pages = total + 3;  // a few pages nobody owns
  std::vector<int32_t> order(layer.n_pages);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  size_t next = 0;
  for (int64_t n : seq_lengths) {
    std::vector<int32_t> pages;
    for (int64_t p = 0; p < (n + page_size - 1) / page_size; ++p) pages.push_back(order[next++]);
    layer.seq_pages.push_back(pages);
  }
  const size_t elements = size_t(layer.n_pages) * n_kv_heads * page_size * head_dim;
  layer.keys = random_half(rng, elements, scale);
  layer.values = random_half(rng, elements, 1.0f);
  return layer;
}

void reference_attention_row(const PagedLayer& layer, const RopeTable& rope, int seq,
                             int kv_head, const uint16_t* q, int64_t n_keys, float scale, double* out) {
  const int hd = layer.head_dim;
  std::vector<double> scores(n_keys);
  std::vector<float> key(hd);
  std::vector<double> qd(hd);
  for (int d = 0; d < hd; ++d) qd[d] = fp16_to_fp32(q[d]);
  double max_score = -1e300;
  for (int64_t pos = 0; pos < n_keys; ++pos) {
    const int32_t page = layer.seq_pages[seq][pos / layer.page_size];
    const size_t offset = ((size_t(page) * layer.n_kv_heads + kv_head) * layer.page_size + pos % layer.page_size) * hd;
    for (int d = 0; d < hd; ++d) key[d] = fp16_to_fp32(layer.keys[offset + d]);
    rope.rotate(key.data(), pos);
    double dot = 0;
    for (int d = 0; d < hd; ++d) dot += qd[d] * key[d];
    scores[pos] = dot * scale;
    max_score = std::max(max_score, scores[pos]);
  }
  double sum = 0;
  for (double& s : scores) sum += (s = std::exp(s - max_score));
  std::fill(out, out + hd, 0.0);
  for (int64_t pos = 0; pos < n_keys; ++pos) {
    const int32_t page = layer.seq_pages[seq][pos / layer.page_size];
    const size_t offset = ((size_t(page) * layer.n_kv_heads + kv_head) * layer.page_size + pos % layer.page_size) * hd;
    const double p = scores[pos] / sum;
    for (int d = 0; d < hd; ++d) out[d] += p * fp16_to_fp32(layer.values[offset + d]);
  }
}

TestCalibration::TestCalibration(int n_layers, int kv_dim, int bits) {
  const int levels = bits <= 4 ? 1 << bits : 16;
  for (int l = 0; l < n_layers; ++l) {
    std::vector<float> lo(kv_dim), hi(kv_dim);
    for (int k = 0; k < kv_dim; ++k) {
      const float shift = 0.25f * std::sin(0.7f * static_cast<float>(k) + static_cast<float>(l));
      lo[k] = -3.5f + shift;
      hi[k] = 3.5f + shift;
    }
    std::vector<float> codebook(levels);
    for (int i = 0; i < levels; ++i) {
      const float u = -1.0f + 2.0f * static_cast<float>(i) / static_cast<float>(levels - 1);
      codebook[i] = std::copysign(std::pow(std::fabs(u), 1.3f), u);
    }
    key_lo.push_back(std::move(lo));
    key_hi.push_back(std::move(hi));
    codebooks.push_back(std::move(codebook));
  }
  for (int l = 0; l < n_layers; ++l) {
    layers.push_back({key_lo[l].data(), key_hi[l].data(), codebooks[l].data(), codebooks[l].data(), 2.5f});
  }
}

std::string FormatCase::label() const {
  return kv + " sinks " + std::to_string(sinks) + (tail ? " tail" : " no-tail") + (page_ranges ? " kscale-page" : "") +
         (exact_chunk ? " exact-chunk" : "");
}

KvCacheOptions options_for(const FormatCase& test) {
  KvCacheOptions options;
  options.format = parse_kv_format(test.kv);
  options.sinks = test.sinks;
  options.tail = test.tail;
  options.per_page_key_ranges = test.page_ranges;
  options.exact_chunk = test.exact_chunk;
  return options;
}

cuda::KvWritePlan plan_prefill_writes(const std::vector<int>& lengths, const PageTables& tables,
                                      const cuda::PageBlockLayout& key_layout, const cuda::PageBlockLayout& value_layout,
                                      int n_kv_heads, int head_dim, int sinks,
                                      const std::function<const uint16_t*(int, int64_t)>& row,
                                      const std::vector<int>& starts) {
  const int kv_dim = n_kv_heads * head_dim;
  const int64_t page_bytes = int64_t{n_kv_heads} * (key_layout.block_bytes + value_layout.block_bytes);
  std::vector<int32_t> ids(*std::max_element(lengths.begin(), lengths.end()), 0);
  StepBatch batch;
  for (int s = 0; s < int(lengths.size()); ++s) {
    const int start = starts.empty() ? 0 : starts[s];
    if (lengths[s] > start) batch.add_chunk(s, start, ids.data(), lengths[s] - start, false);
  }
  auto source = [&](const SequenceChunk& chunk, int64_t pos, KvKind kind, int h) -> const uint16_t* {
    return row(chunk.seq, pos) + static_cast<int>(kind) * kv_dim + h * head_dim;
  };
  auto block_offset = [&](KvKind kind, int32_t page, int h) -> int64_t {
    return page * page_bytes + (kind == KvKind::key ? h * int64_t{key_layout.block_bytes}
                                                    : n_kv_heads * int64_t{key_layout.block_bytes} +
                                                          h * int64_t{value_layout.block_bytes});
  };
  return cuda::plan_kv_writes(batch, tables, key_layout, value_layout, n_kv_heads, sinks, source, 2 * kv_dim,
                              block_offset);
}

PrefillWrites::PrefillWrites(const std::vector<int>& lengths, const PageTables& tables,
                             const cuda::PageBlockLayout& key_layout, const cuda::PageBlockLayout& value_layout,
                             int n_kv_heads, int head_dim, int sinks,
                             const std::function<const uint16_t*(int, int64_t)>& row)
    : plan(plan_prefill_writes(lengths, tables, key_layout, value_layout, n_kv_heads, head_dim, sinks, row)),
      runs(plan.runs), rows(plan.rows) {}

std::array<unsigned long long, 2> quantize_rows_into_pool(
    uint8_t* pool, size_t pool_bytes, const std::vector<int>& lengths, const PageTables& tables,
    const cuda::PageBlockLayout& key_layout, const cuda::PageBlockLayout& value_layout, int n_kv_heads, int head_dim,
    int sinks, const cuda::DeviceLayerCalibration& calib, const std::function<const uint16_t*(int, int64_t)>& row) {
  const PrefillWrites writes(lengths, tables, key_layout, value_layout, n_kv_heads, head_dim, sinks, row);
  CUDA_CHECK(cudaMemset(pool, 0, pool_bytes));
  DeviceArray<unsigned long long> d_counts(std::vector<unsigned long long>{0, 0});
  cuda::launch_kv_quantize(pool, key_layout, value_layout, calib, writes.runs.get(), int32_t(writes.plan.runs.size()),
                           writes.rows.get(), d_counts.get(), device_sm_count(), nullptr);
  const std::vector<unsigned long long> counts = d_counts.download();
  return {counts[0], counts[1]};
}

}  // namespace kvq::gputest
