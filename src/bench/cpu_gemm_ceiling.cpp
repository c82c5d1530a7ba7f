#include "bench/cpu_gemm_ceiling.h"

#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <vector>

#include "model/llama.h"

namespace kvq {

GemmCeiling measure_cpu_gemm_ceiling(const LlamaConfig& c, const LlamaWeights& w, int32_t tokens,
                                     int32_t logit_rows, int repeats) {
  const int h = c.hidden;
  std::vector<float> in(size_t(tokens) * std::max(c.ffn, c.q_dim()) , 0.01f);  // (T, widest input)
  std::vector<float> out(size_t(std::max(tokens, logit_rows)) * std::max({c.qkv_dim(), 2 * c.ffn, c.vocab}));
  auto gemm = [&](int m, int n, int k, const float* weight) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, in.data(), k, weight, k, 0.0f, out.data(), n);
  };
  auto forward_gemms = [&] {
    for (const LlamaLayerWeights& l : w.layers) {
      gemm(tokens, c.qkv_dim(), h, l.wqkv.data());
      gemm(tokens, h, c.q_dim(), l.wo.data());
      gemm(tokens, 2 * c.ffn, h, l.w_gate_up.data());
      gemm(tokens, h, c.ffn, l.w_down.data());
    }
    gemm(logit_rows, c.vocab, h, w.output_matrix().data());
  };
  GemmCeiling result;
  const double per_layer = 2.0 * tokens * (double(h) * c.qkv_dim() + double(c.q_dim()) * h + 2.0 * h * c.ffn + double(c.ffn) * h);
  result.flops = per_layer * c.n_layers + 2.0 * logit_rows * c.vocab * h;
  forward_gemms();  // warm-up
  std::vector<double> times;
  for (int r = 0; r < std::max(1, repeats); ++r) {
    const auto start = std::chrono::steady_clock::now();
    forward_gemms();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
  result.seconds = times[times.size() / 2];
  return result;
}

}  // namespace kvq
