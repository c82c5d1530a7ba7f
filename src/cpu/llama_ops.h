// Row-wise Llama operations shared by the CPU forward (cpu_backend.cpp) and
// the calibration forward/backward (src/calib/): fp32 in and out.
#pragma once

#include <vector>

#include "model/llama.h"

namespace kvq {

// y = x / rms(x) * w over `width` values (sum of squares in double).
void rms_norm(const float* x, const float* w, float* y, int width, float eps);

// cos/sin of every (position, pair) angle, RoPE on adjacent pairs as GGUF stores Q/K.
class RopeTable {
 public:
  RopeTable(const LlamaConfig& config);
  const float* cos(int64_t pos) const { return &cos_[pos * half_]; }  // (head_dim / 2)
  const float* sin(int64_t pos) const { return &sin_[pos * half_]; }  // (head_dim / 2)
  // Rotates adjacent pairs (x[2i], x[2i+1]) of one head by pair i's angle at pos.
  void rotate(float* x, int64_t pos) const;

 private:
  int half_;
  std::vector<float> cos_, sin_;  // (context, head_dim / 2)
};

// Softmax in place over s[0..n), zeros in s[n..width): the causal row of attention
// scores. exp by range reduction and a polynomial (relative error < 3e-7) in
// plain arithmetic, so the loop vectorizes; sums in double.
void softmax_row(float* s, int64_t n, int64_t width);

// out = silu(gate) * up over `width` values.
void swiglu(const float* gate, const float* up, float* out, int width);

// C (m, n) = alpha * A (m, k) * B^T + beta * C with B (n, k), all row-major.
void gemm_abt(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c, int ldc,
              float alpha = 1.0f, float beta = 0.0f);

}  // namespace kvq
