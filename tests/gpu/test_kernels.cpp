// Every CUDA kernel against its CPU twin (label "gpu"; skipped without a device).
//
// Tolerances, from what each kernel rounds that the CPU twin does not:
// - embedding, KV write: copies, bit-exact.
// - RMSNorm, SwiGLU, query RoPE: fp32 math, output rounded to fp16 (half an ulp,
//   2^-11 relative) plus fp32-vs-double sums and __expf: |d| <= 2e-3 |ref| + 1e-5.
// - attention: the GPU rounds post-RoPE keys and the softmax weights P to fp16
//   (relative 2^-11 each, so scores move by ~1e-3 at |q||k| ~ 10) and its output
//   to fp16 (|out| <= ~3 here: 1.5e-3); the reference rotates in fp32 and sums in
//   double. So |d| <= 4e-3 + 4e-3 |ref|; a masking error, a wrong page or a
//   missed RoPE gives differences of 0.1 to 1.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/dtypes.h"
#include "cpu/llama_ops.h"
#include "cuda/attention.h"
#include "cuda/llama_kernels.h"
#include "engine/sampler.h"
#include "gpu_test_util.h"

namespace kvq::gputest {
namespace {

#define SKIP_WITHOUT_GPU() \
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device"

constexpr uint16_t kPoison = 0x7e00;  // fp16 NaN: any output left unwritten fails

std::vector<float> to_float(const std::vector<uint16_t>& h) {
  std::vector<float> f(h.size());
  for (size_t k = 0; k < h.size(); ++k) f[k] = fp16_to_fp32(h[k]);
  return f;
}

void expect_close_rel(const std::vector<float>& actual, const std::vector<float>& expected, double rel, double abs,
                      const std::string& what) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  double worst = 0;
  size_t worst_at = 0;
  for (size_t k = 0; k < actual.size(); ++k) {
    const double d = std::abs(double(actual[k]) - expected[k]);
    const double excess = d - (abs + rel * std::abs(expected[k]));
    if (!(excess <= worst) || std::isnan(d)) {
      worst = std::isnan(d) ? 1e30 : excess;
      worst_at = k;
    }
  }
  EXPECT_LE(worst, 0.0) << what << ": at " << worst_at << " got " << actual[worst_at] << " expected "
                        << expected[worst_at];
}

TEST(CudaKernels, EmbeddingCopiesRows) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(1);
  const int vocab = 100, hidden = 576, n = 37;
  std::vector<uint16_t> table = random_half(rng, size_t(vocab) * hidden, 1.0f);
  std::vector<int32_t> tokens(n);
  for (int32_t& t : tokens) t = rng() % vocab;
  DeviceArray<uint16_t> d_table(table);
  DeviceArray<int32_t> d_tokens(tokens);
  DeviceArray<float> d_x(size_t(n) * hidden);
  cuda::launch_embed(d_tokens.get(), n, reinterpret_cast<const __half*>(d_table.get()), hidden, d_x.get(), nullptr);
  std::vector<float> x = d_x.download();
  for (int t = 0; t < n; ++t)
    for (int k = 0; k < hidden; ++k) ASSERT_EQ(x[size_t(t) * hidden + k], fp16_to_fp32(table[size_t(tokens[t]) * hidden + k]));
}

TEST(CudaKernels, RmsNormMatchesCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(2);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int hidden : {576, 4096}) {
    const int n = 29;
    std::vector<float> x(size_t(n) * hidden), w(hidden);
    for (float& v : x) v = normal(rng);
    for (float& v : w) v = 1.0f + 0.1f * normal(rng);
    std::vector<int32_t> rows = {3, 0, 28, 7};
    DeviceArray<float> d_x(x), d_w(w);
    DeviceArray<int32_t> d_rows(rows);
    DeviceArray<uint16_t> d_y(size_t(n) * hidden), d_picked(rows.size() * hidden);
    cuda::launch_rms_norm(d_x.get(), nullptr, n, hidden, d_w.get(), 1e-5f, reinterpret_cast<__half*>(d_y.get()), nullptr);
    cuda::launch_rms_norm(d_x.get(), d_rows.get(), 4, hidden, d_w.get(), 1e-5f, reinterpret_cast<__half*>(d_picked.get()),
                          nullptr);
    std::vector<float> expected(size_t(n) * hidden), expected_picked;
    for (int t = 0; t < n; ++t) rms_norm(&x[size_t(t) * hidden], w.data(), &expected[size_t(t) * hidden], hidden, 1e-5f);
    for (int32_t r : rows)
      expected_picked.insert(expected_picked.end(), expected.begin() + size_t(r) * hidden, expected.begin() + size_t(r + 1) * hidden);
    expect_close_rel(to_float(d_y.download()), expected, 2e-3, 1e-5, "rms_norm hidden " + std::to_string(hidden));
    expect_close_rel(to_float(d_picked.download()), expected_picked, 2e-3, 1e-5, "rms_norm rows");
  }
}

TEST(CudaKernels, SwigluMatchesCpu) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(3);
  const int n = 17, ffn = 1536;
  std::vector<uint16_t> gate_up = random_half(rng, size_t(n) * 2 * ffn, 3.0f);
  DeviceArray<uint16_t> d_in(gate_up), d_out(size_t(n) * ffn);
  cuda::launch_swiglu(reinterpret_cast<const __half*>(d_in.get()), n, ffn, reinterpret_cast<__half*>(d_out.get()), nullptr);
  std::vector<float> in = to_float(gate_up), expected(size_t(n) * ffn);
  for (int t = 0; t < n; ++t) swiglu(&in[size_t(t) * 2 * ffn], &in[size_t(t) * 2 * ffn + ffn], &expected[size_t(t) * ffn], ffn);
  expect_close_rel(to_float(d_out.download()), expected, 2e-3, 1e-5, "swiglu");
}

TEST(CudaKernels, KvWriteScattersPagesAndRotatesQueries) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(4);
  for (int head_dim : {64, 128}) {
    LlamaConfig c;
    c.n_heads = 6;
    c.n_kv_heads = 2;
    c.head_dim = head_dim;
    c.context = 300;
    c.rope_theta = 100000.0f;
    const int page = 7, n_pages = 50, n = 61;
    std::vector<uint16_t> qkv = random_half(rng, size_t(n) * c.qkv_dim(), 2.0f);
    std::vector<int32_t> positions(n);
    std::vector<int2> slots(n);
    std::vector<int32_t> pages(n_pages);
    std::iota(pages.begin(), pages.end(), 0);
    std::shuffle(pages.begin(), pages.end(), rng);
    for (int t = 0; t < n; ++t) {
      positions[t] = (t * 37 + 11) % c.context;
      slots[t] = make_int2(pages[t / page], t % page);  // token t owns row t % page of its page
    }
    const size_t pool = size_t(n_pages) * c.kv_dim() * page;
    DeviceArray<uint16_t> d_qkv(qkv), d_keys(pool), d_values(pool);
    DeviceArray<int32_t> d_pos(positions);
    DeviceArray<int2> d_slots(slots);
    DeviceArray<float2> d_rope(rope_table(c));
    cuda::launch_write_kv_rotate_q(reinterpret_cast<__half*>(d_qkv.get()), n, d_pos.get(), d_slots.get(),
                                   {c.n_heads, c.n_kv_heads, head_dim, page}, d_rope.get(),
                                   reinterpret_cast<__half*>(d_keys.get()), reinterpret_cast<__half*>(d_values.get()), nullptr);
    const std::vector<uint16_t> keys = d_keys.download(), values = d_values.download(), rotated = d_qkv.download();
    const RopeTable rope(c);
    std::vector<float> got_q, want_q;
    for (int t = 0; t < n; ++t) {
      const uint16_t* row = &qkv[size_t(t) * c.qkv_dim()];
      for (int h = 0; h < c.n_kv_heads; ++h) {
        const size_t dst = ((size_t(slots[t].x) * c.n_kv_heads + h) * page + slots[t].y) * head_dim;
        for (int d = 0; d < head_dim; ++d) {
          ASSERT_EQ(keys[dst + d], row[c.q_dim() + h * head_dim + d]);
          ASSERT_EQ(values[dst + d], row[c.q_dim() + c.kv_dim() + h * head_dim + d]);
        }
      }
      for (int h = 0; h < c.n_heads; ++h) {
        std::vector<float> q(head_dim);
        for (int d = 0; d < head_dim; ++d) q[d] = fp16_to_fp32(row[h * head_dim + d]);
        rope.rotate(q.data(), positions[t]);
        want_q.insert(want_q.end(), q.begin(), q.end());
        for (int d = 0; d < head_dim; ++d) got_q.push_back(fp16_to_fp32(rotated[size_t(t) * c.qkv_dim() + h * head_dim + d]));
      }
    }
    expect_close_rel(got_q, want_q, 2e-3, 1e-5, "query rope");
  }
}

// Exact: the same comparisons, so the GPU must pick the very index greedy_token picks.
TEST(CudaKernels, ArgmaxRowsMatchesGreedyTokenWithTies) {
  SKIP_WITHOUT_GPU();
  std::mt19937 rng(6);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int vocab : {1, 7, 1000, 32000, 49152, 128256}) {
    const int rows = 9;
    std::vector<float> logits(size_t(rows) * vocab);
    for (float& v : logits) v = normal(rng);
    auto row = [&](int r) { return logits.data() + size_t(r) * vocab; };
    const auto pick = [&] { return int(rng() % vocab); };
    // Row 0: random. Row 1: the max tied at two or three places. Row 2: the max at the last index and tied
    // at a random one. Row 3: all equal. Row 4: all -inf. Row 5: the max at index 0 tied at the last.
    // Row 6: a tie of the max in the same thread's columns (indices 256 apart). Rows 7, 8: quantized values
    // (many ties below the max too).
    for (int k : {pick(), pick(), pick()}) row(1)[k] = 100.0f;
    row(2)[vocab - 1] = 50.0f;
    row(2)[pick()] = 50.0f;
    std::fill(row(3), row(3) + vocab, 0.25f);
    std::fill(row(4), row(4) + vocab, -INFINITY);
    row(5)[0] = 60.0f;
    row(5)[vocab - 1] = 60.0f;
    const int a = pick();
    row(6)[a] = 70.0f;
    row(6)[std::min(vocab - 1, a + 256)] = 70.0f;
    for (int r : {7, 8})
      for (int k = 0; k < vocab; ++k) row(r)[k] = std::round(row(r)[k]);
    DeviceArray<float> d_logits(logits);
    DeviceArray<int32_t> d_ids(rows);
    cuda::launch_argmax_rows(d_logits.get(), rows, vocab, d_ids.get(), nullptr);
    const std::vector<int32_t> ids = d_ids.download();
    for (int r = 0; r < rows; ++r) {
      EXPECT_EQ(ids[r], greedy_token(std::span<const float>(row(r), vocab))) << "vocab " << vocab << " row " << r;
    }
  }
}

// One attention problem: sequences of given total lengths whose last rows form
// the step's chunks (start_pos = length - n_tokens), pages shuffled in the pool.
struct AttentionCase {
  int head_dim;
  int group;       // query heads per KV head
  int n_kv_heads;
  int page_size;
  std::vector<int64_t> lengths;   // keys per sequence after the step
  std::vector<int32_t> n_tokens;  // query rows of each sequence in the step
};

std::string describe(const AttentionCase& c) {
  std::string s = "head_dim " + std::to_string(c.head_dim) + " group " + std::to_string(c.group) + " kv_heads " +
                  std::to_string(c.n_kv_heads) + " page " + std::to_string(c.page_size) + " lengths";
  for (size_t i = 0; i < c.lengths.size(); ++i) s += " " + std::to_string(c.lengths[i]) + "/" + std::to_string(c.n_tokens[i]);
  return s;
}

void check_attention(const AttentionCase& ac, bool decode, uint32_t seed) {
  SCOPED_TRACE(describe(ac));
  std::mt19937 rng(seed);
  const int hd = ac.head_dim, n_heads = ac.group * ac.n_kv_heads;
  LlamaConfig c;
  c.head_dim = hd;
  c.context = static_cast<int>(*std::max_element(ac.lengths.begin(), ac.lengths.end()));
  c.rope_theta = 10000.0f;
  const PagedLayer layer = make_paged_layer(rng, ac.lengths, ac.page_size, ac.n_kv_heads, hd, 1.0f);

  std::vector<cuda::AttentionChunk> chunks;
  std::vector<int32_t> page_table, ids;
  int32_t rows = 0;
  for (size_t s = 0; s < ac.lengths.size(); ++s) {
    chunks.push_back({rows, ac.n_tokens[s], static_cast<int32_t>(ac.lengths[s] - ac.n_tokens[s]),
                      static_cast<int32_t>(page_table.size())});
    page_table.insert(page_table.end(), layer.seq_pages[s].begin(), layer.seq_pages[s].end());
    ids.push_back(static_cast<int32_t>(s));
    rows += ac.n_tokens[s];
  }
  const int q_stride = n_heads * hd + 8;  // not the output stride: catches mixed-up strides
  const std::vector<uint16_t> q = random_half(rng, size_t(rows) * q_stride, 1.5f);
  DeviceArray<uint16_t> d_q(q), d_keys(layer.keys), d_values(layer.values);
  DeviceArray<uint16_t> d_out(std::vector<uint16_t>(size_t(rows) * n_heads * hd, kPoison));
  DeviceArray<int32_t> d_pages(page_table);
  DeviceArray<cuda::AttentionChunk> d_chunks(chunks);
  DeviceArray<float2> d_rope(rope_table(c));
  const float scale = 1.0f / std::sqrt(float(hd));
  const cuda::AttentionQuery query{reinterpret_cast<const __half*>(d_q.get()), q_stride,
                                   reinterpret_cast<__half*>(d_out.get()), n_heads * hd, n_heads, hd, scale};
  const cuda::PagedKv kv{reinterpret_cast<const __half*>(d_keys.get()), reinterpret_cast<const __half*>(d_values.get()),
                         d_pages.get(), d_rope.get(), ac.page_size, ac.n_kv_heads};
  if (decode) {
    cudaDeviceProp prop{};
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    const cuda::DecodePlan plan = cuda::plan_decode(chunks, ids, n_heads, ac.n_kv_heads, prop.multiProcessorCount);
    DeviceArray<cuda::DecodeSplit> d_splits(plan.splits);
    DeviceArray<cuda::DecodeChunk> d_dchunks(plan.chunks);
    DeviceArray<char> d_ws(cuda::decode_workspace_bytes(int32_t(plan.splits.size()), n_heads, hd));
    cuda::launch_decode_attention(query, kv, d_chunks.get(), d_splits.get(), int32_t(plan.splits.size()), d_dchunks.get(),
                                  int32_t(plan.chunks.size()), d_ws.get(), nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
  } else {
    const std::vector<cuda::PrefillWork> work = cuda::plan_prefill(chunks, ids, hd);
    DeviceArray<cuda::PrefillWork> d_work(work);
    cuda::launch_prefill_attention(query, kv, d_chunks.get(), d_work.get(), int32_t(work.size()), nullptr);
    CUDA_CHECK(cudaDeviceSynchronize());
  }
  const std::vector<uint16_t> out = d_out.download();

  // Rows to check: all of short chunks; every 7th and the last 3 of long ones.
  struct RowCheck { int seq; int32_t row; };
  std::vector<RowCheck> checks;
  for (size_t s = 0; s < chunks.size(); ++s) {
    for (int32_t r = 0; r < chunks[s].n_tokens; ++r) {
      if (chunks[s].n_tokens <= 128 || r % 7 == 0 || r >= chunks[s].n_tokens - 3) checks.push_back({int(s), r});
    }
  }
  const RopeTable rope(c);
  std::vector<float> got(checks.size() * n_heads * hd), want(got.size());
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t i = 0; i < int64_t(checks.size()) * n_heads; ++i) {
    const RowCheck rc = checks[i / n_heads];
    const int head = static_cast<int>(i % n_heads);
    const cuda::AttentionChunk& ch = chunks[rc.seq];
    const int32_t row = ch.first_row + rc.row;
    std::vector<double> ref(hd);
    reference_attention_row(layer, rope, rc.seq, head / ac.group, &q[size_t(row) * q_stride + head * hd],
                            ch.start_pos + rc.row + 1, scale, ref.data());
    for (int d = 0; d < hd; ++d) {
      got[i * hd + d] = fp16_to_fp32(out[(size_t(row) * n_heads + head) * hd + d]);
      want[i * hd + d] = static_cast<float>(ref[d]);
    }
  }
  expect_close_rel(got, want, 4e-3, 4e-3, decode ? "decode attention" : "prefill attention");
  // Every output row of the step was written (no poison left), checked or not.
  for (uint16_t h : out) {
    if (h == kPoison) {
      ADD_FAILURE() << "unwritten output";
      break;
    }
  }
}

TEST(CudaKernels, PrefillAttentionMatchesCpuOverGrid) {
  SKIP_WITHOUT_GPU();
  uint32_t seed = 10;
  const int pages[] = {16, 64, 7};
  int page_pick = 0;
  for (int hd : {64, 128}) {
    for (int group : {1, 3, 4, 8}) {
      AttentionCase ac{hd, group, 2, pages[page_pick++ % 3], {1, 63, 64, 65, 1000, 1300}, {1, 63, 64, 65, 1000, 300}};
      check_attention(ac, false, ++seed);  // the last chunk continues a sequence: it reads 1000 earlier keys
    }
  }
}

TEST(CudaKernels, PrefillAttentionLongSequence) {
  SKIP_WITHOUT_GPU();
  check_attention({64, 3, 1, 64, {4097}, {4097}}, false, 30);
  check_attention({128, 4, 1, 16, {4097, 65}, {4097, 65}}, false, 31);
}

TEST(CudaKernels, DecodeAttentionMatchesCpuOverGrid) {
  SKIP_WITHOUT_GPU();
  uint32_t seed = 40;
  const int pages[] = {64, 16, 7};
  int page_pick = 0;
  for (int hd : {64, 128}) {
    for (int group : {1, 3, 4, 8}) {
      AttentionCase ac{hd, group, 2, pages[page_pick++ % 3], {1, 63, 64, 65, 1000, 4097}, {1, 1, 1, 1, 1, 1}};
      check_attention(ac, true, ++seed);
    }
  }
  check_attention({128, 4, 8, 64, {9000, 2, 8192}, {1, 1, 1}}, true, 50);
}

}  // namespace
}  // namespace kvq::gputest

namespace kvq::gputest {
namespace {

// Small problems that compute-sanitizer (memcheck, racecheck) can afford.
TEST(CudaKernels, SanitizerAttentionSmall) {
  SKIP_WITHOUT_GPU();
  for (int hd : {64, 128}) {
    check_attention({hd, 3, 1, 16, {1, 63, 130}, {1, 63, 70}}, false, 60 + hd);
    check_attention({hd, 3, 1, 16, {700}, {300}}, false, 62 + hd);  // K/V stages reused; a last tile of 44 rows
    check_attention({hd, 3, 1, 16, {1, 63, 700}, {1, 1, 1}}, true, 61 + hd);
  }
}

}  // namespace
}  // namespace kvq::gputest
