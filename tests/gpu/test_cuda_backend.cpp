// The CUDA backend against the CPU reference backend on random models whose
// weights are fp16-representable (both backends then use identical weights).
// What differs: the GPU rounds xn, qkv, attention outputs and the SwiGLU input
// and output to fp16 (2^-11 relative each), rounds post-RoPE keys and P to fp16
// in attention, and sums in other orders. Through a few layers that moves logits
// by ~1e-3 of their RMS; a wrong page, position or mask moves them by O(1) of it.
// So per logit row: ||gpu - cpu|| <= 1e-2 ||cpu|| (RMS over the vocabulary).
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "core/dtypes.h"
#include "core/error.h"
#include "cpu/cpu_backend.h"
#include "cuda/cuda_backend.h"
#include "engine/sampler.h"
#include "kv/kv_format.h"
#include "gpu_test_util.h"
#include "kv/page_tables.h"
#include "model/dummy_presets.h"

namespace kvq::gputest {
namespace {

#define SKIP_WITHOUT_GPU() \
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device"

LlamaWeights random_fp16_weights(const LlamaConfig& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto fill = [&](size_t n, float scale, float offset = 0.0f) {
    std::vector<float> v(n);
    for (float& x : v) x = round_to_fp16(offset + scale * normal(rng));
    return v;
  };
  LlamaWeights w;
  w.token_embd = fill(size_t(c.vocab) * c.hidden, 1.0f);
  w.output_norm = fill(c.hidden, 0.1f, 1.0f);
  for (int l = 0; l < c.n_layers; ++l) {
    LlamaLayerWeights lw;
    lw.attn_norm = fill(c.hidden, 0.1f, 1.0f);
    lw.wqkv = fill(size_t(c.qkv_dim()) * c.hidden, 1.5f / std::sqrt(float(c.hidden)));
    lw.wo = fill(size_t(c.hidden) * c.q_dim(), 1.0f / std::sqrt(float(c.q_dim())));
    lw.ffn_norm = fill(c.hidden, 0.1f, 1.0f);
    lw.w_gate_up = fill(size_t(2) * c.ffn * c.hidden, 1.0f / std::sqrt(float(c.hidden)));
    lw.w_down = fill(size_t(c.hidden) * c.ffn, 1.0f / std::sqrt(float(c.ffn)));
    w.layers.push_back(std::move(lw));
  }
  return w;
}

LlamaConfig small_config(int head_dim) {
  LlamaConfig c;
  c.name = "small";
  c.n_layers = 3;
  c.hidden = 256;
  c.ffn = 512;
  c.n_heads = 6;
  c.n_kv_heads = 2;
  c.head_dim = head_dim;
  c.vocab = 1000;
  c.context = 4096;
  c.rope_theta = 10000.0f;
  return c;
}

void expect_rows_close(const std::vector<float>& gpu, const std::vector<float>& cpu, int vocab, const std::string& what) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  double worst = 0;
  for (size_t r = 0; r < cpu.size() / vocab; ++r) {
    double diff = 0, norm = 0;
    for (int k = 0; k < vocab; ++k) {
      const double a = gpu[r * vocab + k], b = cpu[r * vocab + k];
      diff += (a - b) * (a - b);
      norm += b * b;
    }
    const double rel = std::sqrt(diff / norm);
    worst = std::max(worst, std::isnan(rel) ? 1e30 : rel);
    EXPECT_LE(rel, 1e-2) << what << " row " << r;
  }
  std::printf("[ info ] %s: worst row relative error %.2e\n", what.c_str(), worst);
}

// Runs the same steps through both backends with identical page tables.
struct TwinBackends {
  TwinBackends(const LlamaConfig& c, const LlamaWeights& w, int32_t n_pages, int32_t page, const KvCacheOptions& kv = {})
      : cpu(c, w, n_pages, page, kv), cpu_tables(n_pages, page), gpu_tables(n_pages, page) {
    CudaBackendOptions options;
    options.page_size = page;
    options.pool_bytes = int64_t{n_pages} * cpu.kv_bytes_per_page();
    options.max_step_tokens = 256;
    options.kv = kv;
    gpu = make_cuda_backend(c, &w, options);
  }
  CpuBackend cpu;
  std::unique_ptr<Backend> gpu;
  PageTables cpu_tables, gpu_tables;
};

TEST(CudaBackend, RaggedBatchThenChunksAndDecodeMatchCpu) {
  SKIP_WITHOUT_GPU();
  for (int head_dim : {64, 128}) {
    const LlamaConfig c = small_config(head_dim);
    const LlamaWeights w = random_fp16_weights(c, 7 + head_dim);
    const int page = 16, n_pages = 200;
    TwinBackends twins(c, w, n_pages, page);
    ASSERT_EQ(twins.gpu->n_pages(), n_pages);
    std::mt19937 rng(9);
    const std::vector<int> lengths = {1, 17, 64, 200, 700};
    std::vector<std::vector<int32_t>> ids(lengths.size());
    for (size_t s = 0; s < lengths.size(); ++s) {
      for (int k = 0; k < lengths[s] + 40; ++k) ids[s].push_back(int32_t(rng() % c.vocab));
      for (PageTables* t : {&twins.cpu_tables, &twins.gpu_tables}) t->add_sequence(int32_t(s));
    }
    // Interleaved grants scatter every sequence's pages over the pool.
    for (int64_t need = page; need < 800; need += page) {
      for (size_t s = 0; s < lengths.size(); ++s) {
        for (PageTables* t : {&twins.cpu_tables, &twins.gpu_tables}) ASSERT_TRUE(t->reserve(int32_t(s), std::min<int64_t>(need, lengths[s] + 40)));
      }
    }
    std::vector<int64_t> pos(lengths.size(), 0);
    auto step = [&](const std::vector<int>& take, bool all_logits, const std::string& what) {
      StepBatch batch;
      for (size_t s = 0; s < take.size(); ++s) {
        if (take[s] == 0) continue;
        batch.add_chunk(int32_t(s), pos[s], ids[s].data() + pos[s], take[s], all_logits);
      }
      std::vector<float> cpu_logits, gpu_logits;
      twins.cpu.forward(batch, twins.cpu_tables, cpu_logits);
      twins.gpu->forward(batch, twins.gpu_tables, gpu_logits);
      expect_rows_close(gpu_logits, cpu_logits, c.vocab, what + " head_dim " + std::to_string(head_dim));
      for (size_t s = 0; s < take.size(); ++s) {
        if (take[s] == 0) continue;
        twins.cpu_tables.append(int32_t(s), take[s]);
        twins.gpu_tables.append(int32_t(s), take[s]);
        pos[s] += take[s];
      }
    };
    step({1, 17, 64, 200, 500}, true, "ragged prefill");
    step({0, 0, 0, 0, 200}, false, "later chunk");
    for (int k = 0; k < 3; ++k) step({1, 1, 1, 1, 1}, false, "decode");
    step({1, 5, 1, 30, 1}, true, "mixed decode and chunks");
  }
}

TEST(CudaBackend, Smollm2ShapesMatchCpu) {
  SKIP_WITHOUT_GPU();
  LlamaConfig c = dummy_preset("smollm2-135m");
  c.n_layers = 4;  // the real depth only multiplies CPU time
  c.context = 2048;
  const LlamaWeights w = random_fp16_weights(c, 21);
  TwinBackends twins(c, w, 64, 64);
  std::mt19937 rng(22);
  std::vector<int32_t> a(300), b(90);
  for (int32_t& id : a) id = int32_t(rng() % c.vocab);
  for (int32_t& id : b) id = int32_t(rng() % c.vocab);
  for (PageTables* t : {&twins.cpu_tables, &twins.gpu_tables}) {
    t->add_sequence(0);
    t->add_sequence(1);
    ASSERT_TRUE(t->reserve(1, 90));
    ASSERT_TRUE(t->reserve(0, 300));
  }
  StepBatch batch;
  batch.add_chunk(0, 0, a.data(), 299, false);
  batch.add_chunk(1, 0, b.data(), 89, true);
  std::vector<float> cpu_logits, gpu_logits;
  twins.cpu.forward(batch, twins.cpu_tables, cpu_logits);
  twins.gpu->forward(batch, twins.gpu_tables, gpu_logits);
  expect_rows_close(gpu_logits, cpu_logits, c.vocab, "smollm2 shapes prefill");
  for (PageTables* t : {&twins.cpu_tables, &twins.gpu_tables}) {
    t->append(0, 299);
    t->append(1, 89);
  }
  StepBatch decode;
  decode.add_chunk(0, 299, a.data() + 299, 1, false);
  decode.add_chunk(1, 89, b.data() + 89, 1, false);
  twins.cpu.forward(decode, twins.cpu_tables, cpu_logits);
  twins.gpu->forward(decode, twins.gpu_tables, gpu_logits);
  expect_rows_close(gpu_logits, cpu_logits, c.vocab, "smollm2 shapes decode");
}

KvCacheOptions kv_options_for(const FormatCase& f, const TestCalibration* calib) {
  KvCacheOptions kv = options_for(f);
  if (kv.format.calibrated()) kv.calibration = calib->layers;
  return kv;
}

// Decode steps replayed from CUDA graphs against the same steps run eagerly by a
// second backend with identical weights and page tables: the kernels and their
// inputs are the same, so the logits must be identical bit for bit (steps of
// even index; odd ones run forward_greedy on the graphs' side, whose device
// argmax must pick each eager row's token). The steps cover changing lengths,
// sequences crossing page boundaries, a batch size that changes (a second
// graph, then the first again), prefill steps in between, a workspace
// reallocation (which must drop the graphs), a plan with more decode splits
// than its graph was captured for and, for quantized formats, a new sequence
// that grows the exact-row store (which must drop the graphs too) and KIVI
// steps that complete key groups (run eagerly between replays).
void expect_graphs_match_eager(const LlamaConfig& c, const LlamaWeights& w, const KvCacheOptions& kv, int page,
                               const std::string& name) {
  const int n_pages = 300;
  CudaBackendOptions options;
  options.page_size = page;
  options.pool_bytes = n_pages * CpuKvPages::bytes_per_page(c, page, kv);
  options.max_step_tokens = 64;
  options.kv = kv;
  options.decode_graphs = false;
  std::unique_ptr<Backend> eager = make_cuda_backend(c, &w, options);
  options.decode_graphs = true;
  std::unique_ptr<Backend> graphs = make_cuda_backend(c, &w, options);
  PageTables eager_tables(n_pages, page), graph_tables(n_pages, page);
  std::mt19937 rng(31);
  const std::vector<int> prompt = {14, 1, 47, 60};  // 14 and 47 cross a page boundary within 3 steps
  std::vector<std::vector<int32_t>> ids(prompt.size() + 1);
  for (size_t s = 0; s < ids.size(); ++s) {
    for (int k = 0; k < 400; ++k) ids[s].push_back(int32_t(rng() % c.vocab));
    for (PageTables* t : {&eager_tables, &graph_tables}) {
      t->add_sequence(int32_t(s));
      ASSERT_TRUE(t->reserve(int32_t(s), 400));
    }
  }
  std::vector<int64_t> pos(ids.size(), 0);
  int step_index = 0;
  // take[s]: tokens of sequence s in the step (0: not in it). replays: the step must replay a graph captured before
  // it (a batch size seen in the step before, no buffer grown since, no page or split boundary crossed).
  auto step = [&](const std::vector<int>& take, bool replays = false) {
    const std::string what = name + " step " + std::to_string(step_index);
    const int64_t captures_before = graphs->decode_graph_captures();
    const bool greedy = step_index++ % 2 == 1;
    StepBatch batch;
    for (size_t s = 0; s < take.size(); ++s) {
      if (take[s] > 0) batch.add_chunk(int32_t(s), pos[s], ids[s].data() + pos[s], take[s], false);
    }
    std::vector<float> eager_logits, graph_logits;
    std::vector<int32_t> graph_greedy;
    eager->forward(batch, eager_tables, eager_logits);
    if (greedy) {
      graphs->forward_greedy(batch, graph_tables, graph_greedy);
      ASSERT_EQ(graph_greedy.size(), batch.chunks.size()) << what;
      for (size_t r = 0; r < graph_greedy.size(); ++r) {
        EXPECT_EQ(graph_greedy[r], greedy_token(std::span<const float>(eager_logits.data() + r * c.vocab, c.vocab)))
            << what << " row " << r;
      }
    } else {
      graphs->forward(batch, graph_tables, graph_logits);
      ASSERT_EQ(graph_logits.size(), eager_logits.size()) << what;
      size_t mismatches = 0;
      for (size_t k = 0; k < eager_logits.size(); ++k) mismatches += graph_logits[k] != eager_logits[k];
      EXPECT_EQ(mismatches, 0u) << what << ": logits differ between graph replay and eager run";
    }
    for (size_t s = 0; s < take.size(); ++s) {
      if (take[s] == 0) continue;
      eager_tables.append(int32_t(s), take[s]);
      graph_tables.append(int32_t(s), take[s]);
      pos[s] += take[s];
    }
    EXPECT_EQ(eager->decode_graph_captures(), 0) << what;
    if (replays) {
      EXPECT_EQ(graphs->decode_graph_captures(), captures_before) << what << ": captured instead of replayed";
    }
  };
  step({14, 1, 47, 60, 0});
  for (int k = 0; k < 4; ++k) step({1, 1, 1, 1, 0});  // batch 4: positions 14..17 cross 16, 47..50 cross 48
  for (int k = 0; k < 3; ++k) step({1, 0, 1, 1, 0});  // batch 3: a second graph
  step({0, 0, 0, 0, 20});                               // prefill between decode steps (a new store slot)
  for (int k = 0; k < 3; ++k) step({1, 1, 1, 1, 0}, k > 0);  // batch 4 again
  step({0, 0, 0, 0, 200});                              // more tokens than any step before: reallocated
  for (int k = 0; k < 3; ++k) step({1, 1, 1, 1, 1}, k > 0);  // batch 5 after the reallocation
  for (int k = 0; k < 2; ++k) step({1, 1, 1, 1, 0});  // batch 4 captured again
  step({300, 0, 0, 0, 0});                              // sequence 0 grows to ~330 keys: more splits
  for (int k = 0; k < 6; ++k) step({1, 1, 1, 1, 0});  // more splits than batch 4's graph holds: recaptured
}

TEST(CudaBackend, DecodeGraphsMatchEagerSteps) {
  SKIP_WITHOUT_GPU();
  for (int head_dim : {64, 128}) {
    const LlamaConfig c = small_config(head_dim);
    const LlamaWeights w = random_fp16_weights(c, 30 + head_dim);
    expect_graphs_match_eager(c, w, {}, 16, "fp16 head_dim " + std::to_string(head_dim));
    for (const FormatCase& f : {FormatCase{"nuq3-1%"}, FormatCase{"q4_0"}, FormatCase{"kivi2"}}) {
      const TestCalibration calib(c.n_layers, c.kv_dim(), parse_kv_format(f.kv).bits);
      const int page = parse_kv_format(f.kv).scheme == KvScheme::kivi ? 32 : 16;  // KIVI: whole key groups per page
      expect_graphs_match_eager(c, w, kv_options_for(f, &calib), page, f.label() + " head_dim " + std::to_string(head_dim));
    }
  }
}

std::vector<FormatCase> format_cases() {
  std::vector<FormatCase> cases;
  for (const char* kv : {"int2", "int3", "int4", "nuq2", "nuq3", "nuq4", "int3-1%", "nuq2-1%", "nuq3-1%", "nuq4-1%"}) {
    cases.push_back({kv});
  }
  cases.push_back({"nuq3-1%", 1, true, true, false});   // --kscale page
  cases.push_back({"nuq3-1%", 1, false, false, false}); // --no-tail
  cases.push_back({"nuq3-1%", 0, true, false, false});  // no sinks
  cases.push_back({"nuq4-1%", 4, true, false, true});   // 4 sinks, --exact-chunk
  cases.push_back({"int4", 1, false, true, false});     // --kscale page without the tail option
  for (const char* kv : {"fp8", "q8_0", "q4_0", "kivi2", "kivi4"}) cases.push_back({kv});
  cases.push_back({"q4_0", 1, true, false, true});      // a peer with --exact-chunk
  cases.push_back({"kivi2", 1, true, false, true});
  return cases;
}

// One layer whose K/V rows are the same halves on both backends, so that their pages hold the same codes:
// embedding rows of +-1 (mean square exactly 1), rms_eps 0 and an attn_norm of ones make the normalized rows
// exactly +-1 on both; Q/K/V weights on a grid of 2^-8 make every K and V element a sum of exact terms on
// that grid below 8 in magnitude, which fp32 sums exactly in any order and fp16 holds exactly; post-RoPE
// formats rotate those keys with the same fp32 operations (exact_rows.cu) and round them once. What remains
// is what differs for fp16 pages (the top of the file), so the tolerance is the same.
// Why one layer with crafted weights: with several layers, or with K/V that differ by an ulp, a code flips
// wherever the two sides' inputs straddle a quantization boundary, each flip one quantization step of one
// element that every later query reads: that measures the format's sensitivity, not the GPU path (observed
// 2e-2 (q8_0) to 5e-1 (int2) of the logits' RMS with 3 random layers; 1e-2 to 5e-2 in a few rows of one
// sequence with 1e-5 relative K/V differences; H100, 2026-11-27).
LlamaConfig one_layer_config(int head_dim) {
  LlamaConfig c = small_config(head_dim);
  c.n_layers = 1;
  c.rms_eps = 0.0f;
  return c;
}
LlamaWeights exact_kv_weights(const LlamaConfig& c, uint32_t seed) {
  LlamaWeights w = random_fp16_weights(c, seed);
  std::mt19937 rng(seed + 1);
  for (float& x : w.token_embd) x = rng() % 2 ? 1.0f : -1.0f;
  for (LlamaLayerWeights& lw : w.layers) {
    std::fill(lw.attn_norm.begin(), lw.attn_norm.end(), 1.0f);
    for (float& x : lw.wqkv) x = std::round(x * 256.0f) / 256.0f;
  }
  return w;
}

// Every quantized --kv format through both backends: ragged prefill in chunks that are not multiples of the
// page, decode steps crossing page (and KIVI group) boundaries, sequences freed and new ones started in their
// pages and exact-row slots, GQA (6 query heads over 2 KV heads), head_dim 64 and 128, on the one-layer model
// above (pages equal on both sides). Tolerance: the fp16 test's, 1e-2 of the row RMS; a wrong code path
// (page, slot, outlier, RoPE, exact/page split, sink, store slot) moves logits by O(1) of it. Pool bytes per
// page and exact-row bytes per sequence equal the CPU's; outlier counts agree.
TEST(CudaBackend, QuantizedFormatsMatchCpu) {
  SKIP_WITHOUT_GPU();
  for (int head_dim : {64, 128}) {
    const LlamaConfig c = one_layer_config(head_dim);
    const LlamaWeights w = exact_kv_weights(c, 40 + head_dim);
    for (const FormatCase& f : format_cases()) {
      const KvFormat format = parse_kv_format(f.kv);
      const TestCalibration calib(c.n_layers, c.kv_dim(), format.bits);
      const KvCacheOptions kv = kv_options_for(f, &calib);
      const int page = format.scheme == KvScheme::kivi ? 32 : 16, n_pages = 120;  // KIVI: whole key groups per page
      TwinBackends twins(c, w, n_pages, page, kv);
      const std::string what = f.label() + " head_dim " + std::to_string(head_dim);
      EXPECT_EQ(twins.gpu->kv_bytes_per_page(), twins.cpu.kv_bytes_per_page()) << what;
      EXPECT_EQ(twins.gpu->kv_bytes_per_sequence(), twins.cpu.kv_bytes_per_sequence()) << what;
      EXPECT_EQ(twins.gpu->n_pages(), n_pages) << what;
      std::mt19937 rng(50 + head_dim);
      const int n_seqs = 5;
      std::vector<std::vector<int32_t>> ids(n_seqs + 2);
      for (auto& seq : ids) {
        for (int k = 0; k < 400; ++k) seq.push_back(int32_t(rng() % c.vocab));
      }
      std::vector<int64_t> pos(ids.size(), 0);
      for (int s = 0; s < n_seqs; ++s) {
        for (PageTables* t : {&twins.cpu_tables, &twins.gpu_tables}) t->add_sequence(s);
      }
      // Interleaved grants scatter every sequence's pages over the pool.
      for (int64_t need = page; need <= 320; need += page) {
        for (int s = 0; s < n_seqs; ++s) {
          for (PageTables* t : {&twins.cpu_tables, &twins.gpu_tables}) ASSERT_TRUE(t->reserve(s, need));
        }
      }
      auto step = [&](const std::vector<std::pair<int, int>>& take, bool all_logits, const std::string& name) {
        StepBatch batch;
        for (auto [s, n] : take) batch.add_chunk(s, pos[s], ids[s].data() + pos[s], n, all_logits);
        std::vector<float> cpu_logits, gpu_logits;
        twins.cpu.forward(batch, twins.cpu_tables, cpu_logits);
        twins.gpu->forward(batch, twins.gpu_tables, gpu_logits);
        expect_rows_close(gpu_logits, cpu_logits, c.vocab, what + " " + name);
        for (auto [s, n] : take) {
          twins.cpu_tables.append(s, n);
          twins.gpu_tables.append(s, n);
          pos[s] += n;
        }
      };
      step({{0, 1}, {1, 23}, {2, 37}, {3, 70}, {4, 130}}, true, "ragged prefill");
      step({{3, 45}, {4, 50}}, true, "second chunks");
      for (int k = 0; k < 6; ++k) step({{0, 1}, {1, 1}, {2, 1}, {3, 1}, {4, 1}}, false, "decode " + std::to_string(k));
      step({{0, 1}, {1, 9}, {2, 1}, {3, 20}}, true, "mixed decode and chunks");
      // Free two sequences; new ones take their pages (and exact-row slots).
      for (int s : {1, 3}) {
        for (PageTables* t : {&twins.cpu_tables, &twins.gpu_tables}) t->free_sequence(s);
        twins.cpu.release_sequence(s);
        twins.gpu->release_sequence(s);
      }
      for (int s : {5, 6}) {
        for (PageTables* t : {&twins.cpu_tables, &twins.gpu_tables}) {
          t->add_sequence(s);
          ASSERT_TRUE(t->reserve(s, 200));
        }
      }
      step({{5, 40}, {6, 3}, {0, 1}}, true, "new sequences");
      for (int k = 0; k < 3; ++k) step({{0, 1}, {2, 1}, {4, 1}, {5, 1}, {6, 1}}, false, "decode after free");
      const KvCacheStats cpu_stats = twins.cpu.kv_stats(), gpu_stats = twins.gpu->kv_stats();
      // Counts may differ by the rare code-boundary rows described above; both must see outliers when kept.
      if (format.outlier_fraction > 0) {
        EXPECT_GT(gpu_stats.outliers_stored, 0) << what;
        EXPECT_NEAR(double(gpu_stats.outliers_stored), double(cpu_stats.outliers_stored),
                    0.02 * double(cpu_stats.outliers_stored) + 4)
            << what;
      }
    }
  }
}

// Mixed rounds: a random number of tokens appended to random sequences, some freed and replaced, compared
// with the CPU after every round (nuq3-1% with the tail, kivi2, q4_0; GQA, head_dim 64; the one-layer model
// above, so pages hold the same codes on both sides).
TEST(CudaBackend, QuantizedMixedRoundsMatchCpu) {
  SKIP_WITHOUT_GPU();
  const LlamaConfig c = one_layer_config(64);
  const LlamaWeights w = exact_kv_weights(c, 61);
  for (const char* name : {"nuq3-1%", "kivi2", "q4_0"}) {
    const FormatCase f{name};
    const TestCalibration calib(c.n_layers, c.kv_dim(), parse_kv_format(name).bits);
    const int page = 32, n_pages = 160;
    TwinBackends twins(c, w, n_pages, page, kv_options_for(f, &calib));
    std::mt19937 rng(62);
    struct Live {
      int32_t seq;
      int64_t pos;
      int64_t capacity;
    };
    std::vector<Live> live;
    int32_t next_seq = 0;
    for (int round = 0; round < 12; ++round) {
      // Start sequences while pages last.
      while (live.size() < 6) {
        const int64_t capacity = 40 + int64_t(rng() % 200);
        bool ok = true;
        for (PageTables* t : {&twins.cpu_tables, &twins.gpu_tables}) {
          t->add_sequence(next_seq);
          ok = ok && t->reserve(next_seq, capacity);
        }
        if (!ok) {
          for (PageTables* t : {&twins.cpu_tables, &twins.gpu_tables}) t->free_sequence(next_seq);
          ++next_seq;
          break;
        }
        live.push_back({next_seq++, 0, capacity});
      }
      std::vector<int32_t> tokens(4096);
      for (int32_t& id : tokens) id = int32_t(rng() % c.vocab);
      StepBatch batch;
      size_t used = 0;
      for (const Live& l : live) {
        if (l.pos >= l.capacity || rng() % 3 == 0) continue;
        const int64_t left = l.capacity - l.pos;
        const int64_t n = l.pos == 0 ? std::min<int64_t>(left, 1 + rng() % 60) : std::min<int64_t>(left, rng() % 2 ? 1 : 1 + rng() % 40);
        batch.add_chunk(l.seq, l.pos, tokens.data() + used, int32_t(n), rng() % 2 == 0);
        used += n;
      }
      if (batch.chunks.empty()) continue;
      std::vector<float> cpu_logits, gpu_logits;
      twins.cpu.forward(batch, twins.cpu_tables, cpu_logits);
      twins.gpu->forward(batch, twins.gpu_tables, gpu_logits);
      expect_rows_close(gpu_logits, cpu_logits, c.vocab, std::string(name) + " round " + std::to_string(round));
      for (const SequenceChunk& chunk : batch.chunks) {
        for (PageTables* t : {&twins.cpu_tables, &twins.gpu_tables}) t->append(chunk.seq, chunk.n_tokens);
        for (Live& l : live) {
          if (l.seq == chunk.seq) l.pos += chunk.n_tokens;
        }
      }
      // Free a random sequence (or a finished one).
      for (size_t i = 0; i < live.size(); ++i) {
        if (live[i].pos >= live[i].capacity || rng() % 5 == 0) {
          for (PageTables* t : {&twins.cpu_tables, &twins.gpu_tables}) t->free_sequence(live[i].seq);
          twins.cpu.release_sequence(live[i].seq);
          twins.gpu->release_sequence(live[i].seq);
          live.erase(live.begin() + i);
          break;
        }
      }
    }
  }
}

TEST(CudaBackend, DummyPresetRunsAndRefusesBadSteps) {
  SKIP_WITHOUT_GPU();
  const LlamaConfig c = dummy_preset("smollm2-135m");
  CudaBackendOptions options;
  options.pool_bytes = int64_t{1} << 30;
  options.dummy_seed = 5;
  std::unique_ptr<Backend> backend = make_cuda_backend(c, nullptr, options);
  EXPECT_EQ(backend->n_pages(), (int64_t{1} << 30) / backend->kv_bytes_per_page());
  PageTables tables(backend->n_pages(), options.page_size);
  tables.add_sequence(0);
  ASSERT_TRUE(tables.reserve(0, 100));
  std::vector<int32_t> ids(100);
  for (int k = 0; k < 100; ++k) ids[k] = (k * 7919) % c.vocab;
  StepBatch batch;
  batch.add_chunk(0, 0, ids.data(), 100, false);
  std::vector<float> logits;
  backend->forward(batch, tables, logits);
  ASSERT_EQ(logits.size(), size_t(c.vocab));
  for (float v : logits) ASSERT_TRUE(std::isfinite(v));
  StepBatch too_long;
  std::vector<int32_t> more(200, 1);
  too_long.add_chunk(0, 0, more.data(), 200, false);
  EXPECT_THROW(backend->forward(too_long, tables, logits), Error);
  StepBatch bad_id;
  std::vector<int32_t> bad = {c.vocab};
  bad_id.add_chunk(0, 0, bad.data(), 1, false);
  EXPECT_THROW(backend->forward(bad_id, tables, logits), Error);
}

}  // namespace
}  // namespace kvq::gputest
