#include "cpu/llama_ops.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>

#include "core/dtypes.h"

namespace kvq {

void rms_norm(const float* x, const float* w, float* y, int width, float eps) {
  double sum_sq = 0;
  for (int k = 0; k < width; ++k) sum_sq += static_cast<double>(x[k]) * x[k];
  float scale = static_cast<float>(1.0 / std::sqrt(sum_sq / width + eps));
  for (int k = 0; k < width; ++k) y[k] = x[k] * scale * w[k];
}

RopeTable::RopeTable(const LlamaConfig& config) : half_(config.head_dim / 2) {
  cos_.resize(static_cast<size_t>(config.context) * half_);
  sin_.resize(cos_.size());
  for (int64_t pos = 0; pos < config.context; ++pos) {
    for (int i = 0; i < half_; ++i) {
      // Angles in double: float accumulation drifts by ~1e-3 rad at long positions.
      double angle = static_cast<double>(pos) * std::pow(static_cast<double>(config.rope_theta), -2.0 * i / config.head_dim);
      cos_[pos * half_ + i] = static_cast<float>(std::cos(angle));
      sin_[pos * half_ + i] = static_cast<float>(std::sin(angle));
    }
  }
}

void RopeTable::rotate(float* x, int64_t pos) const {
  const float* c = cos(pos);
  const float* s = sin(pos);
  for (int i = 0; i < half_; ++i) {
    float x0 = x[2 * i], x1 = x[2 * i + 1];
    x[2 * i] = x0 * c[i] - x1 * s[i];
    x[2 * i + 1] = x0 * s[i] + x1 * c[i];
  }
}

namespace {

// exp(x) for x <= 0: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor
// polynomial to degree 7, times 2^n built in the exponent bits.
inline float exp_nonpositive(float x) {
  x = x > -87.0f ? x : -87.0f;  // exp(-87) ~ 1.6e-38: still a normal float
  const float t = x * 1.44269504088896341f;
  const int n = static_cast<int>(t - 0.5f);  // t <= 0: rounds to nearest (ties down)
  const float nf = static_cast<float>(n);
  const float r = (x - nf * 0.693145751953125f) - nf * 1.428606765330187e-06f;  // ln2 split hi + lo
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * bits_float(static_cast<uint32_t>(n + 127) << 23);
}

}  // namespace

void softmax_row(float* s, int64_t n, int64_t width) {
  const float max_score = *std::max_element(s, s + n);
  for (int64_t j = 0; j < n; ++j) s[j] = exp_nonpositive(s[j] - max_score);
  // Eight running sums (one vector's lanes) keep the adds independent; doubles keep them exact enough.
  double lanes[8] = {};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int k = 0; k < 8; ++k) lanes[k] += s[j + k];
  }
  double sum = 0;
  for (; j < n; ++j) sum += s[j];
  for (double lane : lanes) sum += lane;
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
  std::fill(s + n, s + width, 0.0f);
}

void swiglu(const float* gate, const float* up, float* out, int width) {
  for (int k = 0; k < width; ++k) out[k] = gate[k] / (1.0f + std::exp(-gate[k])) * up[k];
}

void gemm_abt(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c, int ldc, float alpha,
              float beta) {
  if (m == 1) {  // decode rows: GEMV streams the weight matrix once, without GEMM packing
    cblas_sgemv(CblasRowMajor, CblasNoTrans, n, k, alpha, b, ldb, a, 1, beta, c, 1);
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace kvq
