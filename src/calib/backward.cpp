#include "calib/backward.h"

#include <algorithm>
#include <numeric>

#include "calib/llama_ops_backward.h"
#include "core/dtypes.h"
#include "core/error.h"
#include "cpu/llama_ops.h"

namespace kvq {
namespace {

constexpr int kLogitRows = 32;  // rows per logits block: (32, vocab) floats per thread, 6 MB for SmolLM2

// Grows v to at least n values (never shrinks, so a reused buffer keeps its
// pages); what it holds is overwritten by the caller.
float* at_least(std::vector<float>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

}  // namespace

// Buffers, grown on demand and kept from one sequence to the next.
struct KvSensitivityPass::Workspace {
  explicit Workspace(const LlamaConfig& config) : rope(config) {}
  RopeTable rope;
  // Activations the backward reads, (n_slots, T, width) each: n_slots is n_layers
  // when a backward follows, else 1 (every layer reuses slot 0).
  std::vector<float> x_in;     // (n_slots, T, hidden) residual stream entering the layer
  std::vector<float> qkv;      // (n_slots, T, qkv_dim) fused rows, Q and K rotated, V as attended
  std::vector<float> x_mid;    // (n_slots, T, hidden) residual stream after attention
  std::vector<float> gate_up;  // (n_slots, T, 2 * ffn)
  std::vector<float> x;        // (T, hidden) residual stream
  std::vector<float> dx;       // (T, hidden) its gradient, during the backward
  std::vector<float> xn;       // (T, hidden) normalized rows; in the backward, a norm's output gradient
  std::vector<float> attn;     // (T, q_dim) attention output; in the backward, its gradient
  std::vector<float> act;      // (T, ffn) SwiGLU output; in the backward, its gradient
  std::vector<float> d_gate_up;  // (T, 2 * ffn)
  std::vector<float> d_qkv;      // (T, qkv_dim)
};

namespace {

// One sequence through the model: forward, then (with gradients) backward.
class SensitivityPass {
 public:
  SensitivityPass(const LlamaConfig& config, const LlamaWeights& weights, KvSensitivityPass::Workspace& workspace,
                  const std::vector<int32_t>& tokens, const KvSensitivityOptions& options, bool with_gradients)
      : c_(config),
        w_(weights),
        ws_(workspace),
        rope_(workspace.rope),
        tokens_(tokens),
        options_(options),
        with_gradients_(with_gradients),
        n_(static_cast<int>(tokens.size())),
        threaded_(n_ >= kMinTokensForThreads) {
    validate();
  }

  KvSensitivity run() {
    const size_t kv_size = size_t(c_.n_layers) * n_ * c_.kv_dim();
    result_.keys.resize(kv_size);
    result_.values.resize(kv_size);
    forward_layers();
    result_.loss = head();
    if (with_gradients_) {
      result_.key_grads.resize(kv_size);
      result_.value_grads.resize(kv_size);
      backward_layers();
    }
    return std::move(result_);
  }

 private:
  void validate() const {
    if (n_ < 2) fail("the backward pass needs at least 2 tokens (one prediction), got {}", n_);
    if (n_ > c_.context) fail("{} tokens are beyond the model's context of {}", n_, c_.context);
    for (int32_t id : tokens_) {
      if (id < 0 || id >= c_.vocab) fail("token id {} is outside the vocabulary of {}", id, c_.vocab);
    }
    const size_t kv_size = size_t(c_.n_layers) * n_ * c_.kv_dim();
    for (const std::vector<float>* delta : {options_.key_delta, options_.value_delta}) {
      if (delta != nullptr && delta->size() != kv_size) {
        fail("KV perturbation has {} values, expected n_layers * T * kv_dim = {}", delta->size(), kv_size);
      }
    }
  }

  size_t slot(int layer, int width) const { return size_t(with_gradients_ ? layer : 0) * n_ * width; }

  // Pre-RoPE K and V of one layer: perturbed, rounded, written back into the qkv
  // rows and copied to the result.
  void capture_kv(int layer, float* qkv) {
    const int kv_dim = c_.kv_dim(), qkv_dim = c_.qkv_dim();
#pragma omp parallel for schedule(static) if (threaded_)
    for (int t = 0; t < n_; ++t) {
      const size_t out = (size_t(layer) * n_ + t) * kv_dim;
      float* k = qkv + size_t(t) * qkv_dim + c_.q_dim();
      float* v = k + kv_dim;
      for (int ch = 0; ch < kv_dim; ++ch) {
        if (options_.key_delta != nullptr) k[ch] += (*options_.key_delta)[out + ch];
        if (options_.value_delta != nullptr) v[ch] += (*options_.value_delta)[out + ch];
        if (options_.round_kv_to_fp16) {
          k[ch] = round_to_fp16(k[ch]);
          v[ch] = round_to_fp16(v[ch]);
        }
        result_.keys[out + ch] = k[ch];
        result_.values[out + ch] = v[ch];
      }
    }
  }

  void forward_layers() {
    const int h = c_.hidden, qkv_dim = c_.qkv_dim(), q_dim = c_.q_dim(), kv_dim = c_.kv_dim(), ffn = c_.ffn;
    const size_t n_slots = with_gradients_ ? c_.n_layers : 1;
    float* saved_x_in = at_least(ws_.x_in, n_slots * n_ * h);
    float* saved_qkv = at_least(ws_.qkv, n_slots * n_ * qkv_dim);
    float* saved_x_mid = at_least(ws_.x_mid, n_slots * n_ * h);
    float* saved_gate_up = at_least(ws_.gate_up, n_slots * n_ * 2 * ffn);
    float* x = at_least(ws_.x, size_t(n_) * h);
    float* xn = at_least(ws_.xn, size_t(n_) * h);
    float* attn = at_least(ws_.attn, size_t(n_) * q_dim);
    float* act = at_least(ws_.act, size_t(n_) * ffn);

#pragma omp parallel for schedule(static) if (threaded_)
    for (int t = 0; t < n_; ++t) {
      std::copy_n(w_.token_embd.data() + size_t(tokens_[t]) * h, h, x + size_t(t) * h);
    }
    for (int layer = 0; layer < c_.n_layers; ++layer) {
      const LlamaLayerWeights& lw = w_.layers[layer];
      float* x_in = saved_x_in + slot(layer, h);
      float* qkv = saved_qkv + slot(layer, qkv_dim);
      float* x_mid = saved_x_mid + slot(layer, h);
      float* gate_up = saved_gate_up + slot(layer, 2 * ffn);

      std::copy_n(x, size_t(n_) * h, x_in);
#pragma omp parallel for schedule(static) if (threaded_)
      for (int t = 0; t < n_; ++t) rms_norm(&x[size_t(t) * h], lw.attn_norm.data(), &xn[size_t(t) * h], h, c_.rms_eps);
      gemm_abt(n_, qkv_dim, h, xn, h, lw.wqkv.data(), h, qkv, qkv_dim);
      capture_kv(layer, qkv);
#pragma omp parallel for schedule(static) if (threaded_)
      for (int t = 0; t < n_; ++t) {
        float* row = qkv + size_t(t) * qkv_dim;
        for (int head = 0; head < c_.n_heads; ++head) rope_.rotate(row + head * c_.head_dim, t);
        for (int head = 0; head < c_.n_kv_heads; ++head) rope_.rotate(row + q_dim + head * c_.head_dim, t);
      }
      causal_attention(c_, n_, qkv, qkv + q_dim, qkv + q_dim + kv_dim, qkv_dim, attn, q_dim);
      gemm_abt(n_, h, q_dim, attn, q_dim, lw.wo.data(), q_dim, x, h, 1.0f, 1.0f);

      std::copy_n(x, size_t(n_) * h, x_mid);
#pragma omp parallel for schedule(static) if (threaded_)
      for (int t = 0; t < n_; ++t) rms_norm(&x[size_t(t) * h], lw.ffn_norm.data(), &xn[size_t(t) * h], h, c_.rms_eps);
      gemm_abt(n_, 2 * ffn, h, xn, h, lw.w_gate_up.data(), h, gate_up, 2 * ffn);
#pragma omp parallel for schedule(static) if (threaded_)
      for (int t = 0; t < n_; ++t) {
        const float* gate = gate_up + size_t(t) * 2 * ffn;
        swiglu(gate, gate + ffn, &act[size_t(t) * ffn], ffn);
      }
      gemm_abt(n_, h, ffn, act, ffn, lw.w_down.data(), ffn, x, h, 1.0f, 1.0f);
    }
  }

  // Final norm, logits and cross-entropy over rows 0..T-2 (row t predicts token
  // t+1), a block of rows at a time; with gradients, also d loss / d final
  // residual into ws_.dx. Returns the mean loss.
  double head() {
    const int h = c_.hidden, vocab = c_.vocab;
    const int n_rows = n_ - 1;
    const int n_blocks = (n_rows + kLogitRows - 1) / kLogitRows;
    const float* w_out = w_.output_matrix().data();
    const float grad_scale = 1.0f / static_cast<float>(n_rows);
    std::vector<double> row_loss(n_rows);
    const float* x = ws_.x.data();
    float* dx = with_gradients_ ? at_least(ws_.dx, size_t(n_) * h) : nullptr;
    if (with_gradients_) std::fill_n(dx, size_t(n_) * h, 0.0f);  // the last row has no target: zero
#pragma omp parallel if (threaded_)
    {
      std::vector<float> xn(size_t(kLogitRows) * h), dxn(size_t(kLogitRows) * h);
      std::vector<float> logits(size_t(kLogitRows) * vocab);  // (rows, vocab), then their gradient
#pragma omp for schedule(dynamic, 1)
      for (int block = 0; block < n_blocks; ++block) {
        const int r0 = block * kLogitRows;
        const int rows = std::min(kLogitRows, n_rows - r0);
        for (int r = 0; r < rows; ++r) {
          rms_norm(&x[size_t(r0 + r) * h], w_.output_norm.data(), &xn[size_t(r) * h], h, c_.rms_eps);
        }
        gemm_abt(rows, vocab, h, xn.data(), h, w_out, h, logits.data(), vocab);
        for (int r = 0; r < rows; ++r) {
          float* row = &logits[size_t(r) * vocab];
          row_loss[r0 + r] = cross_entropy(row, vocab, tokens_[r0 + r + 1], grad_scale, with_gradients_ ? row : nullptr);
        }
        if (!with_gradients_) continue;
        linear_backward(rows, vocab, h, logits.data(), vocab, w_out, dxn.data(), h);
        for (int r = 0; r < rows; ++r) {
          rms_norm_backward(&x[size_t(r0 + r) * h], w_.output_norm.data(), &dxn[size_t(r) * h],
                            &dx[size_t(r0 + r) * h], h, c_.rms_eps);
        }
      }
    }
    return std::accumulate(row_loss.begin(), row_loss.end(), 0.0) / n_rows;  // in row order: deterministic
  }

  void backward_layers() {
    const int h = c_.hidden, qkv_dim = c_.qkv_dim(), q_dim = c_.q_dim(), kv_dim = c_.kv_dim(), ffn = c_.ffn;
    const int hd = c_.head_dim;
    // The forward's scratch holds the matching gradients now.
    float* d_act = at_least(ws_.act, size_t(n_) * ffn);               // (T, ffn)
    float* d_gate_up = at_least(ws_.d_gate_up, size_t(n_) * 2 * ffn);  // (T, 2 * ffn)
    float* dxn = at_least(ws_.xn, size_t(n_) * h);                    // (T, hidden) gradient of a norm's output
    float* d_attn = at_least(ws_.attn, size_t(n_) * q_dim);           // (T, q_dim)
    float* d_qkv = at_least(ws_.d_qkv, size_t(n_) * qkv_dim);         // (T, qkv_dim)
    float* dx = ws_.dx.data();  // d loss / d (residual stream leaving the layer), then entering it
    for (int layer = c_.n_layers - 1; layer >= 0; --layer) {
      const LlamaLayerWeights& lw = w_.layers[layer];
      const float* x_in = ws_.x_in.data() + slot(layer, h);
      const float* qkv = ws_.qkv.data() + slot(layer, qkv_dim);
      const float* x_mid = ws_.x_mid.data() + slot(layer, h);
      const float* gate_up = ws_.gate_up.data() + slot(layer, 2 * ffn);

      // x_out = x_mid + swiglu(x_mid normalized W_gate_up^T) W_down^T
      linear_backward(n_, h, ffn, dx, h, lw.w_down.data(), d_act, ffn);
#pragma omp parallel for schedule(static) if (threaded_)
      for (int t = 0; t < n_; ++t) {
        const float* gate = gate_up + size_t(t) * 2 * ffn;
        float* d_gate = &d_gate_up[size_t(t) * 2 * ffn];
        swiglu_backward(gate, gate + ffn, &d_act[size_t(t) * ffn], d_gate, d_gate + ffn, ffn);
      }
      linear_backward(n_, 2 * ffn, h, d_gate_up, 2 * ffn, lw.w_gate_up.data(), dxn, h);
#pragma omp parallel for schedule(static) if (threaded_)
      for (int t = 0; t < n_; ++t) {
        rms_norm_backward(x_mid + size_t(t) * h, lw.ffn_norm.data(), &dxn[size_t(t) * h], &dx[size_t(t) * h], h,
                          c_.rms_eps);
      }

      // x_mid = x_in + attention(RoPE(x_in normalized W_qkv^T)) W_o^T
      linear_backward(n_, h, q_dim, dx, h, lw.wo.data(), d_attn, q_dim);
      causal_attention_backward(c_, n_, qkv, qkv + q_dim, qkv + q_dim + kv_dim, qkv_dim, d_attn, q_dim,
                                d_qkv, d_qkv + q_dim, d_qkv + q_dim + kv_dim, qkv_dim);
#pragma omp parallel for schedule(static) if (threaded_)
      for (int t = 0; t < n_; ++t) {
        float* row = &d_qkv[size_t(t) * qkv_dim];
        for (int head = 0; head < c_.n_heads; ++head) rope_backward(rope_, row + head * hd, t, hd);
        for (int head = 0; head < c_.n_kv_heads; ++head) rope_backward(rope_, row + q_dim + head * hd, t, hd);
        const size_t out = (size_t(layer) * n_ + t) * kv_dim;
        std::copy_n(row + q_dim, kv_dim, &result_.key_grads[out]);
        std::copy_n(row + q_dim + kv_dim, kv_dim, &result_.value_grads[out]);
      }
      linear_backward(n_, qkv_dim, h, d_qkv, qkv_dim, lw.wqkv.data(), dxn, h);
#pragma omp parallel for schedule(static) if (threaded_)
      for (int t = 0; t < n_; ++t) {
        rms_norm_backward(x_in + size_t(t) * h, lw.attn_norm.data(), &dxn[size_t(t) * h], &dx[size_t(t) * h], h,
                          c_.rms_eps);
      }
    }
  }

  const LlamaConfig& c_;
  const LlamaWeights& w_;
  KvSensitivityPass::Workspace& ws_;
  const RopeTable& rope_;
  const std::vector<int32_t>& tokens_;
  const KvSensitivityOptions& options_;
  const bool with_gradients_;
  const int n_;  // T
  const bool threaded_;
  KvSensitivity result_;
};

}  // namespace

KvSensitivityPass::KvSensitivityPass(const LlamaConfig& config, const LlamaWeights& weights)
    : config_(config), weights_(weights), workspace_(std::make_unique<Workspace>(config)) {}

KvSensitivityPass::~KvSensitivityPass() = default;

KvSensitivity KvSensitivityPass::run(const std::vector<int32_t>& tokens, const KvSensitivityOptions& options) {
  return SensitivityPass(config_, weights_, *workspace_, tokens, options, true).run();
}

double KvSensitivityPass::loss(const std::vector<int32_t>& tokens, const KvSensitivityOptions& options) {
  return SensitivityPass(config_, weights_, *workspace_, tokens, options, false).run().loss;
}

KvSensitivity kv_sensitivity(const LlamaConfig& config, const LlamaWeights& weights,
                             const std::vector<int32_t>& tokens, const KvSensitivityOptions& options) {
  return KvSensitivityPass(config, weights).run(tokens, options);
}

double sequence_loss(const LlamaConfig& config, const LlamaWeights& weights, const std::vector<int32_t>& tokens,
                     const KvSensitivityOptions& options) {
  return KvSensitivityPass(config, weights).loss(tokens, options);
}

}  // namespace kvq
