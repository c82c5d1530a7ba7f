// kvq-gpu-bench: the CUDA backend's benchmarks (scripts/gpu_check.sh runs it
// beside scripts/baseline_torch.py on the same card).
//   copy      device-to-device copy, GB/s counting bytes read + written (the ceiling)
//   prefill   prefill attention kernel TFLOP/s (4 S^2 H D per sequence, halved for causal)
//   decode    decode attention kernel GB/s (K and V bytes read) and % of copy
//   qdecode   decode attention over quantized pages (nuq4-1%, nuq3-1%, q4_0, fp8; sinks 1 and the tail for
//             nuq) written from N(0, 1) rows with the --dummy synthetic calibration (outliers as end to end):
//             ms, GB/s of the bytes of the blocks and exact rows read, and speed-up over fp16 pages
//   qprefill  prefill attention over quantized pages (nuq4-1%, nuq3-1% with and without the tail, q4_0, fp8,
//             kivi2) against fp16 pages, same shapes: ms (the page scratch's pre-pass and the kernel) and the
//             ratio to fp16 (the gate: <= 1.05); the pre-pass alone, and the kernel decoding its page tiles
//             itself (the fallback past the scratch's cap). The backend skips the pre-pass of int and nuq
//             prompts' own rows: quantize-on-write stores them (quantize's decoded-rows time)
//   quantize  quantize-on-write (launch_kv_quantize) of a prefill step's K and V, N(0, 1) rows and the --dummy
//             synthetic calibration (nuq3/4/2-1%, int4-1%, q4_0, fp8, kivi2): ms, GB/s of the fp16 rows read + blocks
//             written, and % of copy; int and nuq also storing the rows' page tiles decoded into the page
//             scratch, as the backend runs a fresh prompt (KvDecodedRows), and also their keys rotated for the
//             prefill kernel's band tiles
//   e2e       whole-backend prefill tok/s and decode tok/s on --dummy presets; decode with
//             CUDA graphs on and off, returning logits (forward) or greedy ids (forward_greedy)
// Each point: warm-up, then the median of repeats timed with events (kernels)
// or around forward() (which ends with a stream sync). Writes one JSON object.
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <fstream>
#include <iostream>
#include <numeric>

#include "core/error.h"
#include "cuda/attention.h"
#include "cuda/cuda_backend.h"
#include "cuda/kv_quantize.h"
#include "cuda/llama_kernels.h"
#include "cuda/page_scratch.h"
#include "cuda/quantized_attention.h"
#include "cuda/quantized_prefill.h"
#include "engine/step_batch.h"
#include "kv/kv_format.h"
#include "gpu_test_util.h"
#include "kv/page_tables.h"
#include "model/dummy_presets.h"

using namespace kvq;
using namespace kvq::gputest;
using nlohmann::json;

namespace {

// The RoPE angles the benches rotate by: positions [0, context), theta 10000.
std::vector<float2> bench_rope(int head_dim, int context) {
  LlamaConfig c;
  c.head_dim = head_dim;
  c.context = context;
  c.rope_theta = 10000.0f;
  return rope_table(c);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <typename F>
double time_kernel_ms(F&& launch, int warmup, int repeats) {
  for (int k = 0; k < warmup; ++k) launch();
  cudaEvent_t start, stop;
  CUDA_CHECK(cudaEventCreate(&start));
  CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<double> ms;
  for (int k = 0; k < repeats; ++k) {
    CUDA_CHECK(cudaEventRecord(start));
    launch();
    CUDA_CHECK(cudaEventRecord(stop));
    CUDA_CHECK(cudaEventSynchronize(stop));
    float t = 0;
    CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
    ms.push_back(t);
  }
  CUDA_CHECK(cudaEventDestroy(start));
  CUDA_CHECK(cudaEventDestroy(stop));
  return median(ms);
}

double measure_copy_gbs() {
  const size_t bytes = size_t(2) << 30;
  DeviceArray<char> a(bytes), b(bytes);
  CUDA_CHECK(cudaMemset(a.get(), 1, bytes));
  const double ms = time_kernel_ms([&] { CUDA_CHECK(cudaMemcpyAsync(b.get(), a.get(), bytes, cudaMemcpyDeviceToDevice)); }, 3, 15);
  return 2.0 * bytes / (ms * 1e-3) / 1e9;
}

// One layer's pool with `n_seqs` sequences of `seq_len` keys on shuffled pages, random contents.
struct AttentionSetup {
  AttentionSetup(int n_seqs, int seq_len, int n_tokens_per_seq, int head_dim, int n_heads, int n_kv_heads, int page) {
    std::mt19937 rng(1);
    const int pages_per_seq = (seq_len + page - 1) / page;
    const int n_pages = pages_per_seq * n_seqs;
    std::vector<int32_t> order(n_pages);
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    int32_t rows = 0;
    for (int s = 0; s < n_seqs; ++s) {
      chunks.push_back({rows, n_tokens_per_seq, seq_len - n_tokens_per_seq, s * pages_per_seq});
      ids.push_back(s);
      rows += n_tokens_per_seq;
    }
    const size_t pool = size_t(n_pages) * n_kv_heads * page * head_dim;
    keys.resize(pool);
    values.resize(pool);
    q.resize(size_t(rows) * n_heads * head_dim);
    out.resize(q.size());
    cuda::launch_fill_uniform(keys.get(), int64_t(pool), 1, 1.7f, nullptr);
    cuda::launch_fill_uniform(values.get(), int64_t(pool), 2, 1.7f, nullptr);
    cuda::launch_fill_uniform(q.get(), int64_t(q.size()), 3, 1.7f, nullptr);
    d_pages.resize(order.size());
    d_pages.upload(order);
    d_chunks.resize(chunks.size());
    d_chunks.upload(chunks);
    d_rope.resize(size_t(seq_len) * head_dim / 2);
    d_rope.upload(bench_rope(head_dim, seq_len));
    query = {q.get(), n_heads * head_dim, out.get(), n_heads * head_dim, n_heads, head_dim, 1.0f / std::sqrt(float(head_dim))};
    kv = {keys.get(), values.get(), d_pages.get(), d_rope.get(), page, n_kv_heads};
    CUDA_CHECK(cudaDeviceSynchronize());
  }
  std::vector<cuda::AttentionChunk> chunks;
  std::vector<int32_t> ids;
  DeviceArray<__half> keys, values, q, out;
  DeviceArray<int32_t> d_pages;
  DeviceArray<cuda::AttentionChunk> d_chunks;
  DeviceArray<float2> d_rope;
  cuda::AttentionQuery query{};
  cuda::PagedKv kv{};
};

struct AttnShape {
  const char* name;
  int head_dim, n_heads, n_kv_heads;
};
const AttnShape kShapes[] = {{"hd64 9/3", 64, 9, 3}, {"hd128 32/32", 128, 32, 32}, {"hd128 32/8", 128, 32, 8}};

json bench_prefill(const std::vector<int>& lengths, int tokens_per_point) {
  json results = json::array();
  for (const AttnShape& shape : kShapes) {
    for (int S : lengths) {
      const int batch = std::max(1, tokens_per_point / S);
      AttentionSetup setup(batch, S, S, shape.head_dim, shape.n_heads, shape.n_kv_heads, 64);
      const std::vector<cuda::PrefillWork> work = cuda::plan_prefill(setup.chunks, setup.ids, shape.head_dim);
      DeviceArray<cuda::PrefillWork> d_work(work);
      const double ms = time_kernel_ms(
          [&] { cuda::launch_prefill_attention(setup.query, setup.kv, setup.d_chunks.get(), d_work.get(), int32_t(work.size()), nullptr); },
          3, 10);
      const double flops = double(batch) * 4.0 * S * double(S) * shape.n_heads * shape.head_dim / 2.0;
      const double tflops = flops / (ms * 1e-3) / 1e12;
      results.push_back({{"shape", shape.name}, {"head_dim", shape.head_dim}, {"n_heads", shape.n_heads},
                         {"n_kv_heads", shape.n_kv_heads}, {"seq_len", S}, {"batch", batch}, {"ms", ms}, {"tflops", tflops}});
      std::printf("prefill-attn %-12s S=%-6d B=%-3d %8.3f ms %7.1f TFLOP/s\n", shape.name, S, batch, ms, tflops);
      std::fflush(stdout);
    }
  }
  return results;
}

json bench_decode(double copy_gbs) {
  struct Point {
    const char* model;
    AttnShape shape;
    int batch, context;
  };
  const Point points[] = {{"smollm2-135m", kShapes[0], 64, 8192},
                          {"smollm2-135m", kShapes[0], 1, 8192},
                          {"llama3-8b", kShapes[2], 16, 8192},
                          {"llama2-7b", kShapes[1], 1, 32768}};
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  json results = json::array();
  for (const Point& p : points) {
    AttentionSetup setup(p.batch, p.context, 1, p.shape.head_dim, p.shape.n_heads, p.shape.n_kv_heads, 64);
    const cuda::DecodePlan plan = cuda::plan_decode(setup.chunks, setup.ids, p.shape.n_heads, p.shape.n_kv_heads,
                                                       prop.multiProcessorCount);
    DeviceArray<cuda::DecodeSplit> d_splits(plan.splits);
    DeviceArray<cuda::DecodeChunk> d_dchunks(plan.chunks);
    DeviceArray<char> ws(cuda::decode_workspace_bytes(int32_t(plan.splits.size()), p.shape.n_heads, p.shape.head_dim));
    const double ms = time_kernel_ms(
        [&] {
          cuda::launch_decode_attention(setup.query, setup.kv, setup.d_chunks.get(), d_splits.get(), int32_t(plan.splits.size()),
                                        d_dchunks.get(), int32_t(plan.chunks.size()), ws.get(), nullptr);
        },
        5, 30);
    const double bytes = double(p.batch) * p.context * p.shape.n_kv_heads * p.shape.head_dim * 2.0 * 2.0;
    const double gbs = bytes / (ms * 1e-3) / 1e9;
    results.push_back({{"model", p.model}, {"shape", p.shape.name}, {"batch", p.batch}, {"context", p.context},
                       {"splits", plan.splits.size()}, {"ms", ms}, {"gb_s", gbs}, {"fraction_of_copy", gbs / copy_gbs}});
    std::printf("decode-attn %-12s %-12s B=%-3d ctx=%-6d %8.4f ms %7.0f GB/s (%.0f%% of copy)\n", p.model, p.shape.name,
                p.batch, p.context, ms, gbs, 100.0 * gbs / copy_gbs);
    std::fflush(stdout);
  }
  return results;
}

json bench_e2e(const std::string& preset, const std::vector<std::pair<int, int>>& prefill_points, bool ragged,
               const std::vector<int>& decode_batches, int decode_context, bool graphs) {
  const LlamaConfig c = dummy_preset(preset);
  int max_tokens = 0;
  for (auto [L, B] : prefill_points) max_tokens = std::max(max_tokens, L * B);
  for (int B : decode_batches) max_tokens = std::max(max_tokens, decode_context * B > 32768 ? 32768 : decode_context * B);
  CudaBackendOptions options;
  options.max_step_tokens = max_tokens;
  options.dummy_seed = 1;
  options.pool_bytes = 0;  // what the device has free after weights and the workspace above
  options.decode_graphs = graphs;
  std::unique_ptr<Backend> backend = make_cuda_backend(c, nullptr, options);
  json results = json::array();
  std::mt19937 rng(5);
  auto random_ids = [&](int n) {
    std::vector<int32_t> ids(n);
    for (int32_t& id : ids) id = int32_t(rng() % c.vocab);
    return ids;
  };
  std::vector<float> logits;
  for (auto [L, B] : prefill_points) {
    for (int variant = 0; variant < (ragged ? 2 : 1); ++variant) {
      std::vector<int> lengths(B, L);
      if (variant == 1) {
        std::uniform_int_distribution<int> pick(L / 4, L);
        for (int& n : lengths) n = pick(rng);
      }
      PageTables tables(backend->n_pages(), options.page_size);
      StepBatch batch;
      std::vector<std::vector<int32_t>> ids;
      for (int s = 0; s < B; ++s) {
        tables.add_sequence(s);
        if (!tables.reserve(s, lengths[s])) throw kvq::Error("bench: pool too small");
        ids.push_back(random_ids(lengths[s]));
        batch.add_chunk(s, 0, ids.back().data(), lengths[s], false);
      }
      std::vector<double> seconds;
      for (int rep = 0; rep < 6; ++rep) {
        const auto t0 = std::chrono::steady_clock::now();
        backend->forward(batch, tables, logits);
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (rep > 0) seconds.push_back(s);
      }
      const double t = median(seconds);
      const int tokens = batch.n_tokens();
      results.push_back({{"mode", "prefill"}, {"model", preset}, {"prompt_len", L}, {"batch", B}, {"ragged", variant == 1},
                         {"tokens", tokens}, {"prefill_s", t}, {"prefill_tok_s", tokens / t}});
      std::printf("e2e-prefill %-13s L=%-5d B=%-3d %-7s %8.2f ms %9.0f tok/s\n", preset.c_str(), L, B,
                  variant ? "ragged" : "full", t * 1e3, tokens / t);
      std::fflush(stdout);
    }
  }
  for (int B : decode_batches) {
    PageTables tables(backend->n_pages(), options.page_size);
    std::vector<std::vector<int32_t>> ids;
    const int steps = 16;
    const int total = decode_context + 2 * (steps + 2) + 6;
    for (int s = 0; s < B; ++s) {
      tables.add_sequence(s);
      if (!tables.reserve(s, total)) throw kvq::Error("bench: pool too small");
      ids.push_back(random_ids(total));
    }
    // Prefill the context in steps of at most 32768 tokens.
    for (int s0 = 0; s0 < B;) {
      StepBatch batch;
      int s = s0;
      for (; s < B && batch.n_tokens() + decode_context <= std::max(32768, decode_context); ++s) {
        batch.add_chunk(s, 0, ids[s].data(), decode_context, false);
      }
      backend->forward(batch, tables, logits);
      for (int k = s0; k < s; ++k) tables.append(k, decode_context);
      s0 = s;
    }
    // Logits to the host (what sampling with a temperature needs), then greedy ids picked on the device.
    std::vector<int32_t> greedy;
    for (const bool greedy_output : {false, true}) {
      std::vector<double> seconds;
      for (int step = 0; step < steps + 2; ++step) {
        StepBatch batch;
        for (int s = 0; s < B; ++s) batch.add_chunk(s, tables.length(s), ids[s].data() + tables.length(s), 1, false);
        const auto t0 = std::chrono::steady_clock::now();
        if (greedy_output) {
          backend->forward_greedy(batch, tables, greedy);
        } else {
          backend->forward(batch, tables, logits);
        }
        const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        for (int s = 0; s < B; ++s) tables.append(s, 1);
        if (step >= 2) seconds.push_back(t);
      }
      const double t = median(seconds);
      const char* output = greedy_output ? "greedy" : "logits";
      results.push_back({{"mode", "decode"}, {"model", preset}, {"context", decode_context}, {"batch", B},
                         {"graphs", graphs}, {"output", output}, {"step_s", t}, {"decode_tok_s", B / t}});
      std::printf("e2e-decode  %-13s ctx=%-5d B=%-3d graphs=%-3s %-6s %8.3f ms/step %9.0f tok/s\n", preset.c_str(),
                  decode_context, B, graphs ? "on" : "off", output, t * 1e3, B / t);
      std::fflush(stdout);
    }
  }
  return results;
}

std::vector<int> parse_ints(const std::string& s) {
  std::vector<int> v;
  size_t k = 0;
  while (k < s.size()) {
    size_t e = s.find(',', k);
    if (e == std::string::npos) e = s.size();
    v.push_back(std::stoi(s.substr(k, e - k)));
    k = e + 1;
  }
  return v;
}

// One layer's page block layouts and, for the calibrated formats, the --dummy models' synthetic calibration on
// the device.
struct SyntheticLayer {
  SyntheticLayer(const KvCacheOptions& options, int page, int n_kv, int D)
      : device_calib(options.format.calibrated() ? synthetic_calibration(one_layer(n_kv, D), options.format, calibration)
                                                 : std::vector<LayerCalibration>{},
                     options.format, n_kv * D),
        key_layout(cuda::page_block_layout(PageCodec(options.format, KvKind::key, page, D, options.per_page_key_ranges))),
        value_layout(cuda::page_block_layout(PageCodec(options.format, KvKind::value, page, D, options.per_page_key_ranges))) {}
  static LlamaConfig one_layer(int n_kv, int D) {
    LlamaConfig config;
    config.n_layers = 1;
    config.n_kv_heads = n_kv;
    config.head_dim = D;
    return config;
  }
  CalibrationFile calibration;  // the tensors behind device_calib's upload
  cuda::DeviceCalibration device_calib;
  cuda::PageBlockLayout key_layout, value_layout;
};

// One layer's quantized pages for `batch` sequences of `context` keys (pages scattered, `tables`), written by
// launch_kv_quantize from rows (batch, context, 2, kv_dim) with the synthetic calibration: with rows N(0, 1),
// like the --dummy models' keys and values, about the format's fraction of elements are outliers, as end to end
// (the patch of the outliers into the tiles is part of the decode kernels' time).
struct QuantizedPages : SyntheticLayer {
  QuantizedPages(const KvCacheOptions& options, const __half* rows, const PageTables& tables, int batch, int context,
                 int page, int n_kv, int D)
      : SyntheticLayer(options, page, n_kv, D),
        page_bytes(int64_t{n_kv} * (key_layout.block_bytes + value_layout.block_bytes)),
        pool(size_t(tables.n_pages()) * page_bytes) {
    const int kv_dim = n_kv * D;
    const uint16_t* base = reinterpret_cast<const uint16_t*>(rows);
    const std::array<unsigned long long, 2> counts = quantize_rows_into_pool(
        pool.get(), pool.size(), std::vector<int>(batch, context), tables, key_layout, value_layout, n_kv, D,
        options.effective_sinks(), device_calib.layer(0),
        [&](int s, int64_t pos) { return base + (size_t(s) * context + pos) * 2 * kv_dim; });
    outlier_fraction = double(counts[0]) / (2.0 * batch * context * kv_dim);
    CUDA_CHECK(cudaDeviceSynchronize());
  }
  int64_t page_bytes;
  DeviceArray<uint8_t> pool;
  double outlier_fraction = 0;  // outliers stored / elements written
};

// B sequences of `context` tokens on pages interleaved over the pool (as a batch fills it).
PageTables interleaved_tables(int batch, int context, int page) {
  PageTables tables(batch * ((context + page - 1) / page), page);
  for (int s = 0; s < batch; ++s) tables.add_sequence(s);
  for (int64_t need = page; need < context + page; need += page) {
    for (int s = 0; s < batch; ++s) tables.reserve(s, std::min<int64_t>(need, context));
  }
  return tables;
}

// Prefill attention over quantized pages against fp16 pages, same shapes: B prompts of S tokens in one chunk
// each (position 0 on), time of the attention alone: the page scratch's pre-pass plus the kernel (what a layer
// of the backend runs), the pre-pass alone, and the kernel with the decoding producer. Default options (sinks 1, no tail) and the tail for
// nuq3-1% (a band of up to a page per query tile), whose band keys are copied from the step's rotated keys as in
// the backend (quantize-on-write stores them; their values do not enter the timing).
json bench_quantized_prefill() {
  struct Point {
    const char* model;
    AttnShape shape;
    int batch, seq_len;
  };
  const Point points[] = {{"smollm2-135m", kShapes[0], 16, 1024}, {"llama2-7b", kShapes[1], 1, 2048},
                          {"llama2-7b", kShapes[1], 4, 2048}, {"llama2-7b", kShapes[1], 1, 8192}};
  struct Format {
    const char* name;
    bool tail;
  };
  const Format formats[] = {{"nuq4-1%", false}, {"nuq3-1%", false}, {"nuq3-1%", true}, {"q4_0", false}, {"fp8", false},
                            {"kivi2", false}};
  json results = json::array();
  const int page = 64;
  for (const Point& p : points) {
    const int D = p.shape.head_dim, n_kv = p.shape.n_kv_heads, n_heads = p.shape.n_heads;
    const int kv_dim = n_kv * D, q_dim = n_heads * D, stride = q_dim + 2 * kv_dim;
    AttentionSetup fp16(p.batch, p.seq_len, p.seq_len, D, n_heads, n_kv, page);
    const std::vector<cuda::PrefillWork> work = cuda::plan_prefill(fp16.chunks, fp16.ids, D);
    DeviceArray<cuda::PrefillWork> d_work(work);
    const double fp16_ms = time_kernel_ms(
        [&] { cuda::launch_prefill_attention(fp16.query, fp16.kv, fp16.d_chunks.get(), d_work.get(), int32_t(work.size()), nullptr); },
        3, 10);
    std::printf("qprefill-attn %-12s %-12s %-12s B=%-3d S=%-6d %8.3f ms\n", p.model, p.shape.name, "fp16", p.batch,
                p.seq_len, fp16_ms);
    // The step's rows (B * S, stride): Q random, K and V the rows the pages were written from.
    DeviceArray<__half> rows(size_t(p.batch) * p.seq_len * 2 * kv_dim), step(size_t(p.batch) * p.seq_len * stride),
        out(size_t(p.batch) * p.seq_len * q_dim);
    cuda::launch_fill_normal(rows.get(), int64_t(rows.size()), 11, 1.0f, nullptr);
    cuda::launch_fill_uniform(step.get(), int64_t(step.size()), 12, 1.7f, nullptr);
    const PageTables tables = interleaved_tables(p.batch, p.seq_len, page);
    std::vector<cuda::AttentionChunk> chunks;
    std::vector<int32_t> page_table, slots;
    for (int s = 0; s < p.batch; ++s) {
      chunks.push_back({s * p.seq_len, p.seq_len, 0, int32_t(page_table.size())});
      const std::vector<int32_t>& pages = tables.pages(s);
      page_table.insert(page_table.end(), pages.begin(), pages.end());
      slots.push_back(s);
    }
    DeviceArray<int32_t> d_pages(page_table), d_slots(slots);
    DeviceArray<cuda::AttentionChunk> d_chunks(chunks);
    DeviceArray<float2> d_rope(bench_rope(D, p.seq_len));
    DeviceArray<__half> rotated_keys(size_t(p.batch) * p.seq_len * kv_dim);
    cuda::launch_fill_uniform(rotated_keys.get(), int64_t(rotated_keys.size()), 14, 1.7f, nullptr);
    for (const Format& f : formats) {
      KvCacheOptions options;
      options.format = parse_kv_format(f.name);
      options.tail = f.tail;
      const QuantizedPages pages(options, rows.get(), tables, p.batch, p.seq_len, page, n_kv, D);
      const int sinks = options.effective_sinks(), window = options.exact_window_capacity(page);
      DeviceArray<__half> store(std::max<size_t>(8, size_t(p.batch) * 2 * kv_dim * (sinks + window)));
      cuda::launch_fill_uniform(store.get(), int64_t(store.size()), 13, 2.5f, nullptr);
      const cuda::QuantizedPagedKv kv{pages.pool.get(), pages.key_layout, pages.value_layout, pages.device_calib.layer(0),
                                      d_pages.get(), d_rope.get(), n_kv, options.format.keys_post_rope() ? 0 : 1,
                                      step.get() + q_dim, stride, {store.get(), sinks, window}};
      const cuda::ExactRule rule = cuda::exact_rule(options, page);
      cuda::QuantizedPrefillSource decoding{kv, rule, d_slots.get(), {}};
      const bool rotated_band = cuda::quantize_rotates_band_keys(pages.key_layout, pages.value_layout, rule);
      cuda::QuantizedPrefillSource backend = decoding;
      if (rotated_band) backend.rotated_step_keys = rotated_keys.get();
      const cuda::AttentionQuery query{step.get(), stride, out.get(), q_dim, n_heads, D, 1.0f / std::sqrt(float(D))};
      const auto run_kernel = [&](const cuda::QuantizedPrefillSource& source) {
        cuda::launch_quantized_prefill_attention(query, source, d_chunks.get(), d_work.get(), int32_t(work.size()), nullptr);
      };
      const double decoding_ms = time_kernel_ms([&] { run_kernel(decoding); }, 3, 10);
      // The page scratch without the backend's cap (past it the step would run in groups): one group.
      const cuda::PageScratchPlan plan = cuda::plan_page_scratch(chunks, work, rule, n_kv, D, INT64_MAX);
      DeviceArray<__half> scratch(std::max<size_t>(8, size_t(plan.max_rows) * n_kv * D * 2));
      DeviceArray<cuda::PrefillWork> d_scratch_work(plan.work);
      DeviceArray<int32_t> d_chunk_rows(plan.chunk_rows);
      DeviceArray<cuda::PageScratchSpan> d_spans(plan.spans);
      cuda::QuantizedPrefillSource scratched = decoding;
      scratched.scratch = {scratch.get(), scratch.get() + plan.max_rows * n_kv * D, d_chunk_rows.get(), plan.max_rows};
      const auto fill = [&] {
        cuda::launch_fill_page_scratch(scratched, D, d_chunks.get(), d_spans.get(), int32_t(plan.spans.size()), nullptr);
      };
      const double fill_ms = plan.max_rows > 0 ? time_kernel_ms(fill, 3, 10) : 0.0;
      const double ms = time_kernel_ms(
          [&] {
            cuda::launch_quantized_prefill_groups(query, backend, d_chunks.get(), d_scratch_work.get(),
                                                  d_chunk_rows.get(), d_spans.get(), plan.groups, scratch.get(), nullptr);
          },
          3, 10);
      const std::string kv_name = std::string(f.name) + (f.tail ? " tail" : "");
      json point = {{"model", p.model}, {"shape", p.shape.name}, {"kv", kv_name}, {"batch", p.batch},
                    {"seq_len", p.seq_len}, {"ms", ms}, {"scratch_fill_ms", fill_ms},
                    {"scratch_bytes", cuda::page_scratch_bytes(plan.max_rows, n_kv, D)},
                    {"decoding_producer_ms", decoding_ms}, {"fp16_ms", fp16_ms}, {"ratio_vs_fp16", ms / fp16_ms},
                    {"decoding_ratio_vs_fp16", decoding_ms / fp16_ms}};
      std::printf("qprefill-attn %-12s %-12s %-12s B=%-3d S=%-6d %8.3f ms %6.2fx fp16 pages (pre-pass %.3f ms, "
                  "%.0f MiB; decoding producer %.3f ms %.2fx)\n",
                  p.model, p.shape.name, kv_name.c_str(), p.batch, p.seq_len, ms, ms / fp16_ms, fill_ms,
                  cuda::page_scratch_bytes(plan.max_rows, n_kv, D) / 1048576.0, decoding_ms, decoding_ms / fp16_ms);
      results.push_back(point);
      std::fflush(stdout);
    }
  }
  return results;
}

// Decode attention over quantized pages: B sequences of `context` keys, pages scattered, written by
// launch_kv_quantize from random rows with a synthetic calibration; one query row per sequence.
json bench_quantized_decode(double copy_gbs, const json& fp16_points) {
  struct Point {
    const char* model;
    AttnShape shape;
    int batch, context;
  };
  const Point points[] = {{"smollm2-135m", kShapes[0], 64, 8192}, {"llama3-8b", kShapes[2], 16, 8192}};
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  json results = json::array();
  const int page = 64;
  for (const Point& p : points) {
    const int D = p.shape.head_dim, n_kv = p.shape.n_kv_heads, n_heads = p.shape.n_heads;
    const int kv_dim = n_kv * D, q_dim = n_heads * D, stride = q_dim + 2 * kv_dim;
    double fp16_ms = 0;
    for (const json& r : fp16_points) {
      if (r["model"] == p.model && r["batch"] == p.batch && r["context"] == p.context) fp16_ms = r["ms"].get<double>();
    }
    // Random K/V rows of every position (B, context, 2, kv_dim) and the step's rows (B, stride).
    DeviceArray<__half> rows(size_t(p.batch) * p.context * 2 * kv_dim), step(size_t(p.batch) * stride), out(size_t(p.batch) * q_dim);
    cuda::launch_fill_normal(rows.get(), int64_t(rows.size()), 11, 1.0f, nullptr);
    cuda::launch_fill_uniform(step.get(), int64_t(step.size()), 12, 1.7f, nullptr);
    const int pages_per_seq = (p.context + page - 1) / page;
    const PageTables tables = interleaved_tables(p.batch, p.context, page);
    std::vector<cuda::AttentionChunk> chunks;
    std::vector<int32_t> page_table, slots;
    for (int s = 0; s < p.batch; ++s) {
      chunks.push_back({s, 1, p.context - 1, int32_t(page_table.size())});
      const std::vector<int32_t>& pages = tables.pages(s);
      page_table.insert(page_table.end(), pages.begin(), pages.end());
      slots.push_back(s);
    }
    DeviceArray<int32_t> d_pages(page_table);
    DeviceArray<float2> d_rope(bench_rope(D, p.context));
    for (const char* name : {"nuq4-1%", "nuq3-1%", "q4_0", "fp8"}) {
      KvCacheOptions options;
      options.format = parse_kv_format(name);
      const QuantizedPages pages(options, rows.get(), tables, p.batch, p.context, page, n_kv, D);
      const int sinks = options.effective_sinks(), window = options.exact_window_capacity(page);
      const int per_head = sinks + window;
      DeviceArray<__half> store(std::max<size_t>(8, size_t(p.batch) * 2 * kv_dim * per_head));
      cuda::launch_fill_uniform(store.get(), int64_t(store.size()), 13, 2.5f, nullptr);
      const cuda::QuantizedPagedKv kv{pages.pool.get(), pages.key_layout, pages.value_layout, pages.device_calib.layer(0),
                                      d_pages.get(), d_rope.get(), n_kv, options.format.keys_post_rope() ? 0 : 1,
                                      step.get() + q_dim, stride, {store.get(), sinks, window}};
      const cuda::AttentionQuery query{step.get(), stride, out.get(), q_dim, n_heads, D, 1.0f / std::sqrt(float(D))};
      const std::vector<cuda::QuantizedAttentionPlan> plans =
          cuda::plan_quantized_attention(chunks, slots, options, page, n_kv, D, prop.multiProcessorCount);
      const cuda::QuantizedAttentionPlan& plan = plans.at(0);
      DeviceArray<cuda::AttentionChunk> d_rows(plan.rows);
      DeviceArray<cuda::ExactSource> d_sources(plan.sources);
      DeviceArray<cuda::QuantizedSplit> d_splits(plan.splits);
      DeviceArray<cuda::DecodeChunk> d_combine(plan.combine);
      DeviceArray<char> ws(cuda::quantized_attention_workspace_bytes(int32_t(plan.splits.size()), n_heads, D));
      const double ms = time_kernel_ms(
          [&] {
            cuda::launch_quantized_attention(query, kv, d_rows.get(), d_sources.get(), d_splits.get(), int32_t(plan.splits.size()),
                                             d_combine.get(), int32_t(plan.rows.size()), ws.get(), nullptr);
          },
          5, 30);
      // Bytes read: the blocks of every page of every sequence (codes, parameters, outlier slots) and the exact rows.
      int64_t exact_rows = 0;
      for (const cuda::QuantizedSplit& sp : plan.splits) exact_rows += sp.exact ? sp.key_end - sp.key_begin : 0;
      const double bytes = double(p.batch) * pages_per_seq * pages.page_bytes + double(exact_rows) * 2 * kv_dim * 2;
      const double gbs = bytes / (ms * 1e-3) / 1e9;
      results.push_back({{"model", p.model}, {"shape", p.shape.name}, {"kv", name}, {"batch", p.batch}, {"context", p.context},
                         {"splits", plan.splits.size()}, {"outlier_fraction", pages.outlier_fraction}, {"ms", ms},
                         {"bytes", bytes}, {"gb_s", gbs},
                         {"fraction_of_copy", gbs / copy_gbs}, {"fp16_ms", fp16_ms},
                         {"speedup_vs_fp16", fp16_ms > 0 ? fp16_ms / ms : 0.0}});
      std::printf("qdecode-attn %-12s %-12s %-8s B=%-3d ctx=%-6d outliers %.2f%% %8.4f ms %7.0f GB/s (%.0f%% of copy) "
                  "%.2fx fp16 pages\n",
                  p.model, p.shape.name, name, p.batch, p.context, 100.0 * pages.outlier_fraction, ms, gbs,
                  100.0 * gbs / copy_gbs, fp16_ms > 0 ? fp16_ms / ms : 0.0);
      std::fflush(stdout);
    }
  }
  return results;
}

// Quantize-on-write alone: one launch_kv_quantize writing a prefill step of B prompts of S tokens (one layer,
// pages interleaved), inputs N(0, 1) like the --dummy models' K and V, with their synthetic calibration. GB/s
// counts the fp16 rows read and the blocks written.
json bench_quantize(double copy_gbs) {
  struct Point {
    const char* model;
    int batch, seq_len, n_kv_heads, head_dim;
  };
  const Point points[] = {{"llama2-7b", 4, 2048, 32, 128}, {"smollm2-135m", 64, 2048, 3, 64}};
  const char* formats[] = {"nuq3-1%", "nuq4-1%", "nuq2-1%", "int4-1%", "q4_0", "fp8", "kivi2"};
  json results = json::array();
  const int page = 64;
  for (const Point& p : points) {
    const int D = p.head_dim, n_kv = p.n_kv_heads, kv_dim = n_kv * D;
    std::mt19937 rng(7);
    // (B, S, 2, kv_dim): each position's keys then values.
    const DeviceArray<uint16_t> rows(random_half(rng, size_t(p.batch) * p.seq_len * 2 * kv_dim, 1.0f));
    const PageTables tables = interleaved_tables(p.batch, p.seq_len, page);
    for (const char* name : formats) {
      KvCacheOptions options;
      options.format = parse_kv_format(name);
      const SyntheticLayer layer(options, page, n_kv, D);
      const cuda::PageBlockLayout& key_layout = layer.key_layout;
      const cuda::PageBlockLayout& value_layout = layer.value_layout;
      const PrefillWrites writes(std::vector<int>(p.batch, p.seq_len), tables, key_layout, value_layout, n_kv, D,
                                 options.effective_sinks(), [&](int s, int64_t pos) {
                                   return rows.get() + (size_t(s) * p.seq_len + pos) * 2 * kv_dim;
                                 });
      DeviceArray<uint8_t> pool(size_t(tables.n_pages()) * n_kv * (key_layout.block_bytes + value_layout.block_bytes));
      DeviceArray<unsigned long long> counts(std::vector<unsigned long long>{0, 0});
      const int n_sms = device_sm_count();
      const double ms = time_kernel_ms(
          [&] {
            cuda::launch_kv_quantize(pool.get(), key_layout, value_layout, layer.device_calib.layer(0), writes.runs.get(),
                                     int32_t(writes.plan.runs.size()), writes.rows.get(), counts.get(), n_sms, nullptr);
          },
          3, 15);
      double bytes = 0;  // the fp16 rows read and the blocks written
      for (const cuda::KvWriteRun& run : writes.plan.runs) {
        bytes += double(run.n_rows) * D * 2;
        bytes += run.kind == static_cast<int32_t>(KvKind::key) ? key_layout.block_bytes : value_layout.block_bytes;
      }
      const double gbs = bytes / (ms * 1e-3) / 1e9;
      // The same launch storing every prompt's page-tile rows decoded (page_scratch.h's plan, one group), then also
      // the keys rotated (band tiles' keys, where the rule has bands: --tail, the command line's default).
      double decoded_ms = 0, rotated_ms = 0;
      if (cuda::kv_quantize_decodes_rows(key_layout, value_layout)) {
        std::vector<cuda::AttentionChunk> chunks;
        std::vector<int32_t> ids;
        for (int s = 0; s < p.batch; ++s) {
          chunks.push_back({s * p.seq_len, p.seq_len, 0, 0});
          ids.push_back(s);
        }
        const cuda::PageScratchPlan plan = cuda::plan_page_scratch(chunks, cuda::plan_prefill(chunks, ids, D),
                                                                   cuda::exact_rule(options, page), n_kv, D, INT64_MAX, true);
        std::vector<cuda::KvWriteRun> routed = writes.plan.runs;
        cuda::route_decoded_rows(plan, routed);
        const DeviceArray<cuda::KvWriteRun> d_routed(routed);
        DeviceArray<__half> scratch(size_t(plan.max_rows) * n_kv * D * 2);
        const DeviceArray<float2> d_rope(bench_rope(D, p.seq_len));
        cuda::KvDecodedRows decoded{scratch.get(), scratch.get() + plan.max_rows * n_kv * D, plan.max_rows,
                                    d_rope.get()};
        const auto time_launch = [&] {
          return time_kernel_ms(
              [&] {
                cuda::launch_kv_quantize(pool.get(), key_layout, value_layout, layer.device_calib.layer(0),
                                         d_routed.get(), int32_t(routed.size()), writes.rows.get(), counts.get(), n_sms,
                                         nullptr, cuda::KvQuantizeCtas::by_launch, decoded);
              },
              3, 15);
        };
        decoded_ms = time_launch();
        DeviceArray<__half> rotated_keys(size_t(p.batch) * p.seq_len * kv_dim);
        decoded.rotated_keys = rotated_keys.get();
        decoded.n_kv_heads = n_kv;
        rotated_ms = time_launch();
      }
      results.push_back({{"model", p.model}, {"kv", name}, {"batch", p.batch}, {"seq_len", p.seq_len},
                         {"n_kv_heads", n_kv}, {"head_dim", D}, {"runs", writes.plan.runs.size()}, {"ms", ms},
                         {"bytes", bytes}, {"gb_s", gbs}, {"fraction_of_copy", gbs / copy_gbs},
                         {"with_decoded_rows_ms", decoded_ms}, {"with_rotated_keys_ms", rotated_ms}});
      std::printf("quantize %-12s %-8s B=%-3d S=%-5d kv_heads=%-2d hd=%-3d %8.3f ms %7.0f GB/s (%.0f%% of copy)", p.model,
                  name, p.batch, p.seq_len, n_kv, D, ms, gbs, 100.0 * gbs / copy_gbs);
      if (decoded_ms > 0) std::printf("; storing the page tiles too %.3f ms, and rotated keys %.3f ms", decoded_ms, rotated_ms);
      std::printf("\n");
      std::fflush(stdout);
    }
  }
  return results;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kvq-gpu-bench: CUDA attention and end-to-end benchmarks"};
  std::string parts = "copy,prefill,decode,e2e", json_path, lengths = "512,2048,8192,16384";
  int tokens_per_point = 16384;
  app.add_option("--parts", parts, "which of copy,prefill,qprefill,decode,qdecode,quantize,e2e");
  app.add_option("--lengths", lengths, "prefill attention sequence lengths");
  app.add_option("--tokens", tokens_per_point, "prefill attention: batch = max(1, tokens / S)");
  app.add_option("--json", json_path, "write the results here");
  CLI11_PARSE(app, argc, argv);
  try {
    if (!has_cuda_device()) {
      std::cerr << "kvq-gpu-bench: no CUDA device\n";
      return 1;
    }
    cudaDeviceProp prop{};
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    char date[32];
    const std::time_t now = std::time(nullptr);
    std::strftime(date, sizeof date, "%Y-%m-%d", std::gmtime(&now));
    json out = {{"device", prop.name}, {"date", date}, {"argv", std::vector<std::string>(argv, argv + argc)}};
    auto wants = [&](const char* part) { return parts.find(part) != std::string::npos; };
    const double copy_gbs = measure_copy_gbs();
    out["copy_gb_s"] = copy_gbs;
    std::printf("copy %.0f GB/s (read + write) on %s\n", copy_gbs, prop.name);
    if (wants("quantize")) out["quantize"] = bench_quantize(copy_gbs);
    if (wants("qprefill")) out["quantized_prefill_attention"] = bench_quantized_prefill();
    if (wants(",prefill") || parts.rfind("prefill", 0) == 0) out["prefill_attention"] = bench_prefill(parse_ints(lengths), tokens_per_point);
    if (wants("decode") || wants("qdecode")) out["decode_attention"] = bench_decode(copy_gbs);
    if (wants("qdecode")) out["quantized_decode_attention"] = bench_quantized_decode(copy_gbs, out["decode_attention"]);
    if (wants("e2e")) {
      json e2e = json::array();
      for (auto& r : bench_e2e("smollm2-135m", {{2048, 64}}, true, {1, 64}, 2048, true)) e2e.push_back(r);
      for (auto& r : bench_e2e("smollm2-135m", {}, false, {1, 64}, 2048, false)) e2e.push_back(r);
      for (auto& r : bench_e2e("llama2-7b", {{2048, 1}, {2048, 4}, {2048, 16}, {8192, 4}}, true, {1}, 2048, true)) e2e.push_back(r);
      for (auto& r : bench_e2e("llama2-7b", {}, false, {1}, 2048, false)) e2e.push_back(r);
      out["e2e"] = e2e;
    }
    if (!json_path.empty()) std::ofstream(json_path) << out.dump(2) << "\n";
  } catch (const std::exception& e) {
    std::cerr << "kvq-gpu-bench: error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
