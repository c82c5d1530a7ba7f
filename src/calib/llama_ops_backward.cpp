#include "calib/llama_ops_backward.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace kvq {
namespace {

// Query rows per score block: scratch is kQueryBlock x n_tokens floats per
// buffer, and the masked half of each diagonal block (wasted work) stays ~6% at 2048.
constexpr int kQueryBlock = 128;

// Row r of the (rows, visible) score block sees its first first_visible + r
// keys: softmax over those, zeros after, as CpuBackend::attention computes it.
void causal_softmax(float* scores, int rows, int64_t visible, int64_t first_visible) {
  for (int r = 0; r < rows; ++r) softmax_row(scores + static_cast<size_t>(r) * visible, first_visible + r, visible);
}

}  // namespace

void rms_norm_backward(const float* x, const float* w, const float* dy, float* dx, int width, float eps) {
  // y_k = x_k s w_k with s = (sum x^2 / n + eps)^-1/2, ds/dx_j = -s^3 x_j / n, so
  // dx_j = s g_j - s^3 x_j (g . x) / n with g = dy * w.
  double sum_sq = 0, g_dot_x = 0;
  for (int k = 0; k < width; ++k) {
    sum_sq += static_cast<double>(x[k]) * x[k];
    g_dot_x += static_cast<double>(dy[k]) * w[k] * x[k];
  }
  const double s = 1.0 / std::sqrt(sum_sq / width + eps);
  const double correction = s * s * s * g_dot_x / width;
  for (int k = 0; k < width; ++k) {
    dx[k] += static_cast<float>(s * (static_cast<double>(dy[k]) * w[k]) - correction * x[k]);
  }
}

void rope_backward(const RopeTable& rope, float* grad, int64_t pos, int head_dim) {
  const float* c = rope.cos(pos);
  const float* s = rope.sin(pos);
  for (int i = 0; i < head_dim / 2; ++i) {
    float g0 = grad[2 * i], g1 = grad[2 * i + 1];
    grad[2 * i] = g0 * c[i] + g1 * s[i];
    grad[2 * i + 1] = -g0 * s[i] + g1 * c[i];
  }
}

void swiglu_backward(const float* gate, const float* up, const float* d_out, float* d_gate, float* d_up, int width) {
  for (int k = 0; k < width; ++k) {
    const float sigmoid = 1.0f / (1.0f + std::exp(-gate[k]));
    const float silu = gate[k] * sigmoid;
    // d silu / d gate = sigmoid * (1 + gate * (1 - sigmoid))
    d_gate[k] = d_out[k] * up[k] * sigmoid * (1.0f + gate[k] * (1.0f - sigmoid));
    d_up[k] = d_out[k] * silu;
  }
}

void linear_backward(int m, int out, int in, const float* dy, int ldy, const float* w, float* dx, int ldx, float beta) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, in, out, 1.0f, dy, ldy, w, in, beta, dx, ldx);
}

double cross_entropy(const float* logits, int vocab, int target, float scale, float* grad) {
  const float max_logit = *std::max_element(logits, logits + vocab);
  double sum = 0;
  for (int k = 0; k < vocab; ++k) sum += std::exp(static_cast<double>(logits[k]) - max_logit);
  const double log_sum = std::log(sum);
  const double loss = max_logit + log_sum - logits[target];
  if (grad != nullptr) {
    for (int k = 0; k < vocab; ++k) {
      grad[k] = static_cast<float>(scale * std::exp(static_cast<double>(logits[k]) - max_logit - log_sum));
    }
    grad[target] -= scale;
  }
  return loss;
}

void causal_attention(const LlamaConfig& config, int n_tokens, const float* q, const float* k, const float* v,
                      int stride, float* out, int out_stride) {
  const int hd = config.head_dim;
  const int group = config.n_heads / config.n_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const int n_blocks = (n_tokens + kQueryBlock - 1) / kQueryBlock;
  const int n_tasks = config.n_heads * n_blocks;
#pragma omp parallel if (n_tokens >= kMinTokensForThreads)
  {
    std::vector<float> scores(static_cast<size_t>(std::min(kQueryBlock, n_tokens)) * n_tokens);  // (rows, visible)
#pragma omp for schedule(dynamic, 1)
    for (int task = 0; task < n_tasks; ++task) {
      const int head = task % config.n_heads;
      const int kv_head = head / group;
      const int r0 = (n_blocks - 1 - task / config.n_heads) * kQueryBlock;  // longest blocks first
      const int rows = std::min(kQueryBlock, n_tokens - r0);
      const int visible = r0 + rows;
      gemm_abt(rows, visible, hd, q + static_cast<size_t>(r0) * stride + head * hd, stride, k + kv_head * hd, stride,
               scores.data(), visible, scale);
      causal_softmax(scores.data(), rows, visible, r0 + 1);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, hd, visible, 1.0f, scores.data(), visible,
                  v + kv_head * hd, stride, 0.0f, out + static_cast<size_t>(r0) * out_stride + head * hd, out_stride);
    }
  }
}

void causal_attention_backward(const LlamaConfig& config, int n_tokens, const float* q, const float* k,
                               const float* v, int stride, const float* d_out, int d_out_stride, float* dq, float* dk,
                               float* dv, int d_stride) {
  const int hd = config.head_dim;
  const int group = config.n_heads / config.n_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const size_t head_block = static_cast<size_t>(n_tokens) * hd;
  // Per query head: its share of dK and dV, (n_heads, n_tokens, head_dim), summed
  // over each group afterwards in a fixed order so results don't depend on threads.
  std::vector<float> head_dk(config.n_heads * head_block, 0.0f), head_dv(config.n_heads * head_block, 0.0f);
#pragma omp parallel if (n_tokens >= kMinTokensForThreads)
  {
    const size_t scratch = static_cast<size_t>(std::min(kQueryBlock, n_tokens)) * n_tokens;
    std::vector<float> probs(scratch), d_scores(scratch);  // (rows, visible) each
#pragma omp for schedule(dynamic, 1)
    for (int head = 0; head < config.n_heads; ++head) {
      const int kv_head = head / group;
      const float* k_head = k + kv_head * hd;
      const float* v_head = v + kv_head * hd;
      float* dk_head = head_dk.data() + head * head_block;
      float* dv_head = head_dv.data() + head * head_block;
      for (int r0 = 0; r0 < n_tokens; r0 += kQueryBlock) {
        const int rows = std::min(kQueryBlock, n_tokens - r0);
        const int visible = r0 + rows;
        const float* q_rows = q + static_cast<size_t>(r0) * stride + head * hd;
        const float* d_out_rows = d_out + static_cast<size_t>(r0) * d_out_stride + head * hd;
        // P recomputed exactly as the forward computed it.
        gemm_abt(rows, visible, hd, q_rows, stride, k_head, stride, probs.data(), visible, scale);
        causal_softmax(probs.data(), rows, visible, r0 + 1);
        // dP = dO V^T; dS = P * (dP - sum_j P dP) (softmax backward, row by row).
        gemm_abt(rows, visible, hd, d_out_rows, d_out_stride, v_head, stride, d_scores.data(), visible);
        for (int r = 0; r < rows; ++r) {
          const float* p = probs.data() + static_cast<size_t>(r) * visible;
          float* ds = d_scores.data() + static_cast<size_t>(r) * visible;
          const int n_visible = r0 + r + 1;
          double p_dot_dp = 0;
          for (int j = 0; j < n_visible; ++j) p_dot_dp += static_cast<double>(p[j]) * ds[j];
          const float centre = static_cast<float>(p_dot_dp);
          for (int j = 0; j < n_visible; ++j) ds[j] = p[j] * (ds[j] - centre);
          std::fill(ds + n_visible, ds + visible, 0.0f);
        }
        // dQ = scale dS K; dK += scale dS^T Q; dV += P^T dO.
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, hd, visible, scale, d_scores.data(), visible,
                    k_head, stride, 0.0f, dq + static_cast<size_t>(r0) * d_stride + head * hd, d_stride);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, visible, hd, rows, scale, d_scores.data(), visible,
                    q_rows, stride, 1.0f, dk_head, hd);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, visible, hd, rows, 1.0f, probs.data(), visible,
                    d_out_rows, d_out_stride, 1.0f, dv_head, hd);
      }
    }
#pragma omp for schedule(static)
    for (int t = 0; t < n_tokens; ++t) {
      for (int kv_head = 0; kv_head < config.n_kv_heads; ++kv_head) {
        float* dk_row = dk + static_cast<size_t>(t) * d_stride + kv_head * hd;
        float* dv_row = dv + static_cast<size_t>(t) * d_stride + kv_head * hd;
        std::fill(dk_row, dk_row + hd, 0.0f);
        std::fill(dv_row, dv_row + hd, 0.0f);
        for (int g = 0; g < group; ++g) {
          const size_t offset = (kv_head * group + g) * head_block + static_cast<size_t>(t) * hd;
          for (int d = 0; d < hd; ++d) {
            dk_row[d] += head_dk[offset + d];
            dv_row[d] += head_dv[offset + d];
          }
        }
      }
    }
  }
}

}  // namespace kvq
