// The calibration backward pass (calib/backward.h, calib/llama_ops_backward.h)
// against central finite differences of its own fp32 forward: each op alone, then
// d loss / d K and d loss / d V end to end on a tiny random Llama, perturbing one
// pre-RoPE K or V activation at a time. Plus: the calibration forward's loss is
// the inference forward's (CpuBackend) loss.
//
// Tolerances. Every forward is fp32, so a function value f carries rounding noise
// of ~1e-7 |f| (cancellations make it somewhat worse); a central difference with
// step eps turns that into ~1e-7 |f| / eps of absolute error on the derivative,
// and adds a truncation error ~eps^2 |f'''| / 6. With eps = 1e-2 and inputs of
// order 1 both stay well under 1e-3 relative to the gradient's scale, so each check
// asks |finite difference - backward| <= 2e-3 * (largest |gradient| of that
// tensor) + 1e-6. Measured worst errors: <= 4e-5 of the scale for each op, 1.7e-4
// end to end — over 10x margin. Deliberate bugs (no mean term in the RMSNorm
// backward, RoPE rotated the wrong way, GQA group not summed, SwiGLU derivative
// without its gate term, softmax backward without its centring) each give
// 0.13..1.9 of the scale in the end-to-end check, and fail the op's check too. The scale
// is per tensor rather than per element because an element whose gradient is
// near zero has a relative error of order one from noise alone.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <random>

#include "calib/backward.h"
#include "calib/llama_ops_backward.h"
#include "core/error.h"
#include "cpu/cpu_backend.h"
#include "kv/page_tables.h"
#include "tiny_model.h"

namespace kvq {
namespace {

constexpr double kStep = 1e-2;            // central-difference step
constexpr double kRelativeTolerance = 2e-3;  // of the tensor's largest |gradient|
constexpr double kAbsoluteTolerance = 1e-6;

LlamaConfig tiny_config() {
  LlamaConfig c;
  c.name = "tiny";
  c.n_layers = 2;
  c.hidden = 16;
  c.ffn = 24;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 4;
  c.vocab = 37;
  c.context = 256;
  c.rope_theta = 10000.0f;
  c.rms_eps = 1e-5f;
  return c;
}

std::vector<float> random_vector(std::mt19937& rng, size_t n, float scale, float offset = 0.0f) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = offset + scale * normal(rng);
  return v;
}

LlamaWeights random_weights(const LlamaConfig& c, uint32_t seed) {
  std::mt19937 rng(seed);
  LlamaWeights w;
  w.token_embd = random_vector(rng, size_t(c.vocab) * c.hidden, 1.0f);
  w.output_norm = random_vector(rng, c.hidden, 0.1f, 1.0f);
  for (int l = 0; l < c.n_layers; ++l) {
    LlamaLayerWeights lw;
    lw.attn_norm = random_vector(rng, c.hidden, 0.1f, 1.0f);
    lw.wqkv = random_vector(rng, size_t(c.qkv_dim()) * c.hidden, 0.4f);
    lw.wo = random_vector(rng, size_t(c.hidden) * c.q_dim(), 0.3f);
    lw.ffn_norm = random_vector(rng, c.hidden, 0.1f, 1.0f);
    lw.w_gate_up = random_vector(rng, size_t(2) * c.ffn * c.hidden, 0.3f);
    lw.w_down = random_vector(rng, size_t(c.hidden) * c.ffn, 0.3f);
    w.layers.push_back(std::move(lw));
  }
  return w;
}

using testing::random_ids;

double dot(const std::vector<float>& a, const float* b) {
  double sum = 0;
  for (size_t k = 0; k < a.size(); ++k) sum += double(a[k]) * b[k];
  return sum;
}

// Central difference of f at each index of x listed in `indices` (all when
// empty), against `grad`. The difference divides by the step actually taken
// (x + eps and x - eps rounded to fp32).
void expect_gradient(const std::function<double(const std::vector<float>&)>& f, const std::vector<float>& x,
                     const std::vector<float>& grad, const std::string& what, std::vector<size_t> indices = {}) {
  ASSERT_EQ(x.size(), grad.size()) << what;
  if (indices.empty()) {
    indices.resize(x.size());
    for (size_t i = 0; i < x.size(); ++i) indices[i] = i;
  }
  double scale = 0;
  for (float g : grad) scale = std::max(scale, double(std::abs(g)));
  ASSERT_GT(scale, 0.0) << what << ": the gradient is all zero, nothing is tested";
  const double tolerance = kRelativeTolerance * scale + kAbsoluteTolerance;
  std::vector<float> probe = x;
  double worst = 0;
  size_t worst_index = 0;
  for (size_t i : indices) {
    probe[i] = static_cast<float>(x[i] + kStep);
    const double up = f(probe), x_up = probe[i];
    probe[i] = static_cast<float>(x[i] - kStep);
    const double down = f(probe), x_down = probe[i];
    probe[i] = x[i];
    const double error = std::abs((up - down) / (x_up - x_down) - grad[i]);
    if (error > worst) worst = error, worst_index = i;
  }
  EXPECT_LE(worst, tolerance) << what << ": worst at index " << worst_index << " (backward " << grad[worst_index]
                              << ", gradient scale " << scale << ")";
}

TEST(Backward, RmsNormMatchesFiniteDifferences) {
  std::mt19937 rng(1);
  for (int width : {16, 7}) {
    const std::vector<float> x = random_vector(rng, width, 1.5f, 0.3f);
    const std::vector<float> w = random_vector(rng, width, 0.2f, 1.0f);
    const std::vector<float> r = random_vector(rng, width, 1.0f);  // the loss is r . y
    const float eps = 1e-5f;
    auto loss = [&](const std::vector<float>& in) {
      std::vector<float> y(width);
      rms_norm(in.data(), w.data(), y.data(), width, eps);
      return dot(r, y.data());
    };
    std::vector<float> grad(width, 0.5f);  // adds: start from 0.5 and take it off
    rms_norm_backward(x.data(), w.data(), r.data(), grad.data(), width, eps);
    for (float& g : grad) g -= 0.5f;
    expect_gradient(loss, x, grad, fmt::format("rms_norm width {}", width));
  }
}

TEST(Backward, RopeBackwardIsTheTransposedRotation) {
  const LlamaConfig c = tiny_config();
  LlamaConfig wide = c;
  wide.head_dim = 8;  // several pair frequencies
  const RopeTable rope(wide);
  std::mt19937 rng(2);
  for (int64_t pos : {0, 3, 255}) {
    const std::vector<float> x = random_vector(rng, 8, 1.0f);
    const std::vector<float> r = random_vector(rng, 8, 1.0f);
    auto loss = [&](const std::vector<float>& in) {
      std::vector<float> y = in;
      rope.rotate(y.data(), pos);
      return dot(r, y.data());
    };
    std::vector<float> grad = r;
    rope_backward(rope, grad.data(), pos, 8);
    expect_gradient(loss, x, grad, fmt::format("rope at position {}", pos));
  }
}

TEST(Backward, SwigluMatchesFiniteDifferences) {
  std::mt19937 rng(3);
  const int width = 24;
  const std::vector<float> gate = random_vector(rng, width, 2.5f), up = random_vector(rng, width, 1.0f);
  const std::vector<float> r = random_vector(rng, width, 1.0f);
  std::vector<float> d_gate(width), d_up(width);
  swiglu_backward(gate.data(), up.data(), r.data(), d_gate.data(), d_up.data(), width);
  auto loss = [&](const std::vector<float>& g, const std::vector<float>& u) {
    std::vector<float> y(width);
    swiglu(g.data(), u.data(), y.data(), width);
    return dot(r, y.data());
  };
  expect_gradient([&](const std::vector<float>& g) { return loss(g, up); }, gate, d_gate, "swiglu gate");
  expect_gradient([&](const std::vector<float>& u) { return loss(gate, u); }, up, d_up, "swiglu up");
}

TEST(Backward, LinearMatchesFiniteDifferences) {
  std::mt19937 rng(4);
  const int m = 3, out = 5, in = 7;
  const std::vector<float> x = random_vector(rng, size_t(m) * in, 1.0f);
  const std::vector<float> w = random_vector(rng, size_t(out) * in, 0.5f);
  const std::vector<float> r = random_vector(rng, size_t(m) * out, 1.0f);
  auto loss = [&](const std::vector<float>& a) {
    std::vector<float> y(size_t(m) * out);
    gemm_abt(m, out, in, a.data(), in, w.data(), in, y.data(), out);
    return dot(r, y.data());
  };
  std::vector<float> grad(size_t(m) * in, 1.0f);
  linear_backward(m, out, in, r.data(), out, w.data(), grad.data(), in, 1.0f);  // beta = 1 adds
  for (float& g : grad) g -= 1.0f;
  expect_gradient(loss, x, grad, "linear");
}

TEST(Backward, CrossEntropyMatchesFiniteDifferences) {
  std::mt19937 rng(5);
  const int vocab = 37, target = 11;
  const float scale = 0.25f;
  const std::vector<float> logits = random_vector(rng, vocab, 3.0f);
  std::vector<float> grad = logits;  // in place
  const double loss = cross_entropy(grad.data(), vocab, target, scale, grad.data());
  double sum = 0;
  for (float l : logits) sum += std::exp(double(l));
  EXPECT_NEAR(loss, std::log(sum) - logits[target], 1e-6);
  auto f = [&](const std::vector<float>& l) { return scale * cross_entropy(l.data(), vocab, target, 0, nullptr); };
  expect_gradient(f, logits, grad, "cross-entropy");
}

// Attention over the fused (T, qkv_dim) rows, loss r . out; gradients of every q, k, v element.
void check_attention(int n_tokens, const std::vector<size_t>& indices) {
  const LlamaConfig c = tiny_config();
  const int stride = c.qkv_dim(), q_dim = c.q_dim(), kv_dim = c.kv_dim();
  std::mt19937 rng(6);
  const std::vector<float> qkv = random_vector(rng, size_t(n_tokens) * stride, 1.5f);
  const std::vector<float> r = random_vector(rng, size_t(n_tokens) * q_dim, 1.0f);
  auto loss = [&](const std::vector<float>& in) {
    std::vector<float> out(size_t(n_tokens) * q_dim);
    causal_attention(c, n_tokens, in.data(), in.data() + q_dim, in.data() + q_dim + kv_dim, stride, out.data(), q_dim);
    return dot(r, out.data());
  };
  std::vector<float> grad(qkv.size(), 7.0f);  // every element must be overwritten
  causal_attention_backward(c, n_tokens, qkv.data(), qkv.data() + q_dim, qkv.data() + q_dim + kv_dim, stride,
                            r.data(), q_dim, grad.data(), grad.data() + q_dim, grad.data() + q_dim + kv_dim, stride);
  expect_gradient(loss, qkv, grad, fmt::format("attention over {} tokens", n_tokens), indices);
}

TEST(Backward, CausalAttentionMatchesFiniteDifferences) { check_attention(9, {}); }

TEST(Backward, CausalAttentionAcrossQueryBlocksMatchesFiniteDifferences) {
  // 140 tokens: two blocks of query rows; positions on both sides of the block
  // boundary (128), each with Q, K and V columns of both KV heads. (Few: each
  // finite difference runs the threaded attention twice.)
  std::vector<size_t> indices;
  const size_t stride = tiny_config().qkv_dim();
  for (size_t t : {0, 127, 128, 139}) {
    for (size_t col : {1, 14, 17, 22, 26, 31}) indices.push_back(t * stride + col);
  }
  check_attention(140, indices);
}

// End to end: d loss / d K and d loss / d V of every layer, position and
// channel, against the loss with that one pre-RoPE activation perturbed.
TEST(Backward, KvGradientsMatchFiniteDifferencesEndToEnd) {
  const LlamaConfig c = tiny_config();
  const LlamaWeights w = random_weights(c, 7);
  std::mt19937 rng(8);
  const std::vector<int32_t> ids = random_ids(rng, 9, c.vocab);
  const KvSensitivity s = kv_sensitivity(c, w, ids);
  const size_t kv_size = size_t(c.n_layers) * ids.size() * c.kv_dim();
  ASSERT_EQ(s.keys.size(), kv_size);
  ASSERT_EQ(s.key_grads.size(), kv_size);
  ASSERT_EQ(s.value_grads.size(), kv_size);
  EXPECT_DOUBLE_EQ(s.loss, sequence_loss(c, w, ids));
  const std::vector<float> zero(kv_size, 0.0f);
  for (bool keys : {true, false}) {
    auto loss = [&](const std::vector<float>& delta) {
      KvSensitivityOptions options;
      (keys ? options.key_delta : options.value_delta) = &delta;
      return sequence_loss(c, w, ids, options);
    };
    expect_gradient(loss, zero, keys ? s.key_grads : s.value_grads, keys ? "d loss / d K" : "d loss / d V");
  }
  // The last position predicts nothing, so nothing depends on its K and V.
  for (int layer = 0; layer < c.n_layers; ++layer) {
    const size_t last = (size_t(layer) * ids.size() + ids.size() - 1) * c.kv_dim();
    for (int ch = 0; ch < c.kv_dim(); ++ch) {
      EXPECT_EQ(s.key_grads[last + ch], 0.0f);
      EXPECT_EQ(s.value_grads[last + ch], 0.0f);
    }
  }
}

TEST(Backward, CapturesPreRopeKeysAndValuesOfLayerZero) {
  const LlamaConfig c = tiny_config();
  const LlamaWeights w = random_weights(c, 9);
  std::mt19937 rng(10);
  const std::vector<int32_t> ids = random_ids(rng, 5, c.vocab);
  const KvSensitivity s = kv_sensitivity(c, w, ids);
  for (size_t t = 0; t < ids.size(); ++t) {
    std::vector<float> xn(c.hidden);
    rms_norm(&w.token_embd[size_t(ids[t]) * c.hidden], w.layers[0].attn_norm.data(), xn.data(), c.hidden, c.rms_eps);
    for (int ch = 0; ch < c.kv_dim(); ++ch) {
      double k = 0, v = 0;
      for (int e = 0; e < c.hidden; ++e) {
        k += double(w.layers[0].wqkv[size_t(c.q_dim() + ch) * c.hidden + e]) * xn[e];
        v += double(w.layers[0].wqkv[size_t(c.q_dim() + c.kv_dim() + ch) * c.hidden + e]) * xn[e];
      }
      EXPECT_NEAR(s.keys[t * c.kv_dim() + ch], k, 1e-5) << "position " << t << " channel " << ch;
      EXPECT_NEAR(s.values[t * c.kv_dim() + ch], v, 1e-5) << "position " << t << " channel " << ch;
    }
  }
}

// Mean next-token cross-entropy of the inference forward's logits, in double.
double cpu_backend_loss(const LlamaConfig& c, const LlamaWeights& w, const std::vector<int32_t>& ids) {
  const int page = 4, n = static_cast<int>(ids.size());
  const int n_pages = (n + page - 1) / page;
  PageTables tables(n_pages, page);
  CpuBackend backend(c, w, n_pages, page);
  tables.add_sequence(0);
  EXPECT_TRUE(tables.reserve(0, n));
  StepBatch batch;
  batch.add_chunk(0, 0, ids.data(), n, true);
  std::vector<float> logits;
  backend.forward(batch, tables, logits);
  double total = 0;
  for (int t = 0; t + 1 < n; ++t) {
    const float* row = &logits[size_t(t) * c.vocab];
    const double max_logit = *std::max_element(row, row + c.vocab);
    double sum = 0;
    for (int k = 0; k < c.vocab; ++k) sum += std::exp(row[k] - max_logit);
    total += max_logit + std::log(sum) - row[ids[t + 1]];
  }
  return total / (n - 1);
}

// With K and V rounded to fp16 as the cache stores them, the two forwards differ
// only in fp32 summation order (GEMM blocking, a softmax over padded blocks):
// measured <= 1e-9 relative on a loss of ~4 (asked: 1e-5). Without the rounding
// the fp16 error of K and V (2^-12 relative) shows: ~5e-5 here, asked 1e-3.
TEST(Backward, LossMatchesCpuBackend) {
  const LlamaConfig c = tiny_config();
  const LlamaWeights w = random_weights(c, 11);
  std::mt19937 rng(12);
  for (int n : {9, 30}) {
    const std::vector<int32_t> ids = random_ids(rng, n, c.vocab);
    const double reference = cpu_backend_loss(c, w, ids);
    KvSensitivityOptions fp16;
    fp16.round_kv_to_fp16 = true;
    EXPECT_NEAR(kv_sensitivity(c, w, ids, fp16).loss, reference, 1e-5 * reference) << n << " tokens";
    EXPECT_NEAR(sequence_loss(c, w, ids), reference, 1e-3 * reference) << n << " tokens, fp32 K and V";
  }
}

// Same input, same result, also from a pass reused over sequences of other
// lengths (its buffers then hold another sequence's data and are larger than needed).
TEST(Backward, IsDeterministicAndReusable) {
  const LlamaConfig c = tiny_config();
  const LlamaWeights w = random_weights(c, 13);
  std::mt19937 rng(14);
  const std::vector<int32_t> long_ids = random_ids(rng, 150, c.vocab), short_ids = random_ids(rng, 9, c.vocab);
  const KvSensitivity a = kv_sensitivity(c, w, long_ids);
  KvSensitivityPass pass(c, w);
  pass.run(long_ids);
  EXPECT_EQ(pass.loss(short_ids), sequence_loss(c, w, short_ids));
  const KvSensitivity b = pass.run(short_ids), fresh = kv_sensitivity(c, w, short_ids);
  EXPECT_EQ(b.loss, fresh.loss);
  EXPECT_EQ(b.key_grads, fresh.key_grads);
  EXPECT_EQ(b.value_grads, fresh.value_grads);
  const KvSensitivity a_again = pass.run(long_ids);
  EXPECT_EQ(a.loss, a_again.loss);
  EXPECT_EQ(a.keys, a_again.keys);
  EXPECT_EQ(a.key_grads, a_again.key_grads);
  EXPECT_EQ(a.value_grads, a_again.value_grads);
}

TEST(Backward, RefusesBadInput) {
  const LlamaConfig c = tiny_config();
  const LlamaWeights w = random_weights(c, 15);
  EXPECT_THROW(kv_sensitivity(c, w, {3}), Error);                           // no prediction
  EXPECT_THROW(kv_sensitivity(c, w, {3, c.vocab}), Error);                  // id out of range
  EXPECT_THROW(kv_sensitivity(c, w, std::vector<int32_t>(c.context + 1, 1)), Error);  // too long
  const std::vector<float> short_delta(3);
  KvSensitivityOptions options;
  options.key_delta = &short_delta;
  EXPECT_THROW(kv_sensitivity(c, w, {1, 2}, options), Error);
}

}  // namespace
}  // namespace kvq
