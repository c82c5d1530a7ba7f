// CPU backend on a tiny random Llama against a naive double-precision forward
// written here from the definitions (no pages, no BLAS, one sequence at a
// time). Both round pre-RoPE K and V to fp16, so what is left is fp32-vs-double
// arithmetic, which agrees to ~1e-6 on logits of magnitude ~10 — except where
// the two land on either side of an fp16 rounding boundary of some K or V
// element: that element then differs by one fp16 ulp (2^-11 relative), which
// moves this and every later position's logits, by up to ~2e-3 (median 2e-4)
// here. So: median error <= 5e-4 and max error <= 5e-3. For scale: a RoPE base
// off by 1% already gives median 1e-3..4e-3 and max up to 8e-2; a wrong mask or
// page lookup gives O(1).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "core/dtypes.h"
#include "core/error.h"
#include "cpu/cpu_backend.h"
#include "kv/page_tables.h"
#include "tiny_model.h"

namespace kvq {
namespace {

using testing::random_ids;
using testing::random_weights;
using testing::tiny_config;

// Logits (n, vocab) for every position of one sequence, in double.
std::vector<double> naive_forward(const LlamaConfig& c, const LlamaWeights& w, const std::vector<int32_t>& ids) {
  const int n = static_cast<int>(ids.size()), h = c.hidden, hd = c.head_dim;
  auto matvec = [](const std::vector<float>& m, int rows, int cols, const std::vector<double>& x, int row0 = 0) {
    std::vector<double> y(rows);
    for (int r = 0; r < rows; ++r)
      for (int k = 0; k < cols; ++k) y[r] += double(m[size_t(row0 + r) * cols + k]) * x[k];
    return y;
  };
  auto norm = [&](const std::vector<double>& x, const std::vector<float>& g) {
    double ss = 0;
    for (double v : x) ss += v * v;
    const double s = 1.0 / std::sqrt(ss / x.size() + c.rms_eps);
    std::vector<double> y(x.size());
    for (size_t k = 0; k < x.size(); ++k) y[k] = x[k] * s * g[k];
    return y;
  };
  auto rope = [&](std::vector<double>& v, int offset, int pos) {
    for (int i = 0; i < hd / 2; ++i) {
      const double a = pos * std::pow(double(c.rope_theta), -2.0 * i / hd);
      const double x0 = v[offset + 2 * i], x1 = v[offset + 2 * i + 1];
      v[offset + 2 * i] = x0 * std::cos(a) - x1 * std::sin(a);
      v[offset + 2 * i + 1] = x0 * std::sin(a) + x1 * std::cos(a);
    }
  };
  auto fp16 = [](double x) { return double(fp16_to_fp32(fp32_to_fp16(static_cast<float>(x)))); };
  std::vector<std::vector<double>> x(n);
  for (int t = 0; t < n; ++t) x[t].assign(w.token_embd.begin() + size_t(ids[t]) * h, w.token_embd.begin() + size_t(ids[t] + 1) * h);
  for (const LlamaLayerWeights& lw : w.layers) {
    std::vector<std::vector<double>> q(n), k(n), v(n);
    for (int t = 0; t < n; ++t) {
      auto xn = norm(x[t], lw.attn_norm);
      q[t] = matvec(lw.wqkv, c.q_dim(), h, xn, 0);
      k[t] = matvec(lw.wqkv, c.kv_dim(), h, xn, c.q_dim());
      v[t] = matvec(lw.wqkv, c.kv_dim(), h, xn, c.q_dim() + c.kv_dim());
      for (double& e : k[t]) e = fp16(e);
      for (double& e : v[t]) e = fp16(e);
      for (int head = 0; head < c.n_heads; ++head) rope(q[t], head * hd, t);
      for (int head = 0; head < c.n_kv_heads; ++head) rope(k[t], head * hd, t);
    }
    for (int t = 0; t < n; ++t) {
      std::vector<double> attn(c.q_dim());
      for (int head = 0; head < c.n_heads; ++head) {
        const int kvh = head / (c.n_heads / c.n_kv_heads);
        std::vector<double> s(t + 1);
        double mx = -1e300;
        for (int j = 0; j <= t; ++j) {
          for (int d = 0; d < hd; ++d) s[j] += q[t][head * hd + d] * k[j][kvh * hd + d];
          s[j] /= std::sqrt(double(hd));
          mx = std::max(mx, s[j]);
        }
        double z = 0;
        for (double& e : s) z += (e = std::exp(e - mx));
        for (int j = 0; j <= t; ++j)
          for (int d = 0; d < hd; ++d) attn[head * hd + d] += s[j] / z * v[j][kvh * hd + d];
      }
      auto o = matvec(lw.wo, h, c.q_dim(), attn);
      for (int e = 0; e < h; ++e) x[t][e] += o[e];
      auto xn = norm(x[t], lw.ffn_norm);
      auto gate = matvec(lw.w_gate_up, c.ffn, h, xn, 0);
      auto up = matvec(lw.w_gate_up, c.ffn, h, xn, c.ffn);
      std::vector<double> act(c.ffn);
      for (int e = 0; e < c.ffn; ++e) act[e] = gate[e] / (1 + std::exp(-gate[e])) * up[e];
      auto down = matvec(lw.w_down, h, c.ffn, act);
      for (int e = 0; e < h; ++e) x[t][e] += down[e];
    }
  }
  std::vector<double> logits;
  for (int t = 0; t < n; ++t) {
    auto row = matvec(w.token_embd, c.vocab, h, norm(x[t], w.output_norm));
    logits.insert(logits.end(), row.begin(), row.end());
  }
  return logits;
}

constexpr double kMedianTolerance = 5e-4;
constexpr double kMaxTolerance = 5e-3;

void expect_close(const float* actual, const double* expected, size_t n, const std::string& what) {
  std::vector<double> errors(n);
  for (size_t k = 0; k < n; ++k) errors[k] = std::abs(double(actual[k]) - expected[k]);
  std::sort(errors.begin(), errors.end());
  EXPECT_LE(errors[n / 2], kMedianTolerance) << what;
  EXPECT_LE(errors.back(), kMaxTolerance) << what;
}

TEST(CpuBackend, RaggedBatchOnScatteredPagesMatchesNaiveForward) {
  const LlamaConfig c = tiny_config();
  const LlamaWeights w = random_weights(c, 1);
  std::mt19937 rng(2);
  const std::vector<int> lengths = {1, 7, 20, 33};
  const int page = 5;
  PageTables tables(64, page);
  CpuBackend backend(c, w, 64, page);
  StepBatch batch;
  std::vector<std::vector<int32_t>> seqs;
  for (size_t s = 0; s < lengths.size(); ++s) seqs.push_back(random_ids(rng, lengths[s], c.vocab));
  for (size_t s = 0; s < lengths.size(); ++s) tables.add_sequence(static_cast<int32_t>(s));
  // Interleave page grants so every sequence's pages are scattered.
  for (int64_t need = 1; need <= 33; need += page) {
    for (size_t s = 0; s < lengths.size(); ++s) {
      ASSERT_TRUE(tables.reserve(static_cast<int32_t>(s), std::min<int64_t>(need, lengths[s])));
    }
  }
  for (size_t s = 0; s < lengths.size(); ++s) {
    batch.add_chunk(static_cast<int32_t>(s), 0, seqs[s].data(), lengths[s], true);
  }
  std::vector<float> logits;
  backend.forward(batch, tables, logits);
  ASSERT_EQ(logits.size(), size_t(61) * c.vocab);
  size_t row = 0;
  for (size_t s = 0; s < lengths.size(); ++s) {
    const std::vector<double> expected = naive_forward(c, w, seqs[s]);
    expect_close(logits.data() + row * c.vocab, expected.data(), expected.size(), fmt::format("sequence {}", s));
    row += lengths[s];
  }
}

TEST(CpuBackend, ChunkedPrefillThenDecodeMatchesNaiveForward) {
  const LlamaConfig c = tiny_config();
  const LlamaWeights w = random_weights(c, 3);
  std::mt19937 rng(4);
  const std::vector<int32_t> ids = random_ids(rng, 40, c.vocab);
  const std::vector<double> expected = naive_forward(c, w, ids);
  const int page = 4;
  PageTables tables(16, page);
  CpuBackend backend(c, w, 16, page);
  tables.add_sequence(9);
  ASSERT_TRUE(tables.reserve(9, 40));
  std::vector<float> logits;
  int64_t pos = 0;
  // Prefill chunks of 13 (last-token logits only), then one token per step.
  while (pos < 40) {
    const int32_t n = pos < 26 ? 13 : 1;
    StepBatch batch;
    batch.add_chunk(9, pos, ids.data() + pos, n, false);
    backend.forward(batch, tables, logits);
    tables.append(9, n);
    pos += n;
    ASSERT_EQ(logits.size(), size_t(c.vocab));
    expect_close(logits.data(), expected.data() + size_t(pos - 1) * c.vocab, c.vocab, fmt::format("position {}", pos - 1));
  }
}

TEST(CpuBackend, RefusesUnreservedPositionsAndBadIds) {
  const LlamaConfig c = tiny_config();
  const LlamaWeights w = random_weights(c, 5);
  PageTables tables(4, 4);
  CpuBackend backend(c, w, 4, 4);
  tables.add_sequence(0);
  ASSERT_TRUE(tables.reserve(0, 4));
  std::vector<int32_t> ids = {1, 2, 3, 4, 5};
  std::vector<float> logits;
  StepBatch too_long;
  too_long.add_chunk(0, 0, ids.data(), 5, false);
  EXPECT_THROW(backend.forward(too_long, tables, logits), Error);
  std::vector<int32_t> bad = {c.vocab};
  StepBatch bad_id;
  bad_id.add_chunk(0, 0, bad.data(), 1, false);
  EXPECT_THROW(backend.forward(bad_id, tables, logits), Error);
}

}  // namespace
}  // namespace kvq

namespace kvq {
namespace {

TEST(LlamaOps, SoftmaxRowMatchesDoublePrecision) {
  std::mt19937 rng(21);
  std::uniform_real_distribution<float> dist(-90.0f, 10.0f);
  for (int n : {1, 7, 64, 1000}) {
    std::vector<float> s(n + 5);
    for (float& x : s) x = dist(rng);
    std::vector<double> want(n);
    const double max_score = *std::max_element(s.begin(), s.begin() + n);
    double sum = 0;
    for (int j = 0; j < n; ++j) sum += want[j] = std::exp(double(s[j]) - max_score);
    softmax_row(s.data(), n, n + 5);
    for (int j = 0; j < n; ++j) EXPECT_NEAR(s[j], want[j] / sum, 1e-6 * want[j] / sum + 1e-30) << n << " " << j;
    for (int j = n; j < n + 5; ++j) EXPECT_EQ(s[j], 0.0f);
  }
}

}  // namespace
}  // namespace kvq
