#include "bench/cpu_gemm_ceiling.h"

#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <vector>

#include "cpu/cpu_backend.h"
#include "model/llama.h"

namespace kvq {

namespace {

double median_seconds(const std::function<void()>& run, int repeats) {
  run();  // warm-up
  std::vector<double> times;
  for (int r = 0; r < std::max(1, repeats); ++r) {
    const auto start = std::chrono::steady_clock::now();
    run();
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
  return times[times.size() / 2];
}

}  // namespace

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
  result.seconds = median_seconds(forward_gemms, repeats);
  return result;
}

GemmCeiling measure_cpu_attention_gemms(const LlamaConfig& c, const std::vector<int32_t>& prompt_lengths, int repeats) {
  const int hd = c.head_dim;
  int32_t longest = 0;
  for (int32_t n : prompt_lengths) longest = std::max(longest, n);
  std::vector<float> q(size_t(kAttentionQueryBlock) * hd, 0.01f), keys(size_t(longest) * hd, 0.01f);
  std::vector<float> scores(size_t(kAttentionQueryBlock) * longest), out(size_t(kAttentionQueryBlock) * hd);
  GemmCeiling result;
  auto products = [&] {
    for (int layer = 0; layer < c.n_layers; ++layer) {
      for (int32_t n : prompt_lengths) {
        // The backend runs these inside its own parallel region, one head per thread.
#pragma omp parallel for schedule(dynamic, 1)
        for (int head = 0; head < c.n_heads; ++head) {
          std::vector<float> s(scores.size()), o(out.size());
          for (int32_t r0 = 0; r0 < n; r0 += kAttentionQueryBlock) {
            const int rows = std::min(kAttentionQueryBlock, n - r0);
            const int visible = r0 + rows;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, visible, hd, 1.0f, q.data(), hd, keys.data(), hd,
                        0.0f, s.data(), visible);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, hd, visible, 1.0f, s.data(), visible,
                        keys.data(), hd, 0.0f, o.data(), hd);
          }
        }
      }
    }
  };
  for (int32_t n : prompt_lengths) {
    for (int32_t r0 = 0; r0 < n; r0 += kAttentionQueryBlock) {
      const double rows = std::min(kAttentionQueryBlock, n - r0);
      result.flops += 2 * 2.0 * rows * (r0 + rows) * hd * c.n_heads * c.n_layers;
    }
  }
  result.seconds = median_seconds(products, repeats);
  return result;
}

}  // namespace kvq
