#include "cpu/llama_ops.h"

#include <cblas.h>

#include <cmath>

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
