// Vector-Jacobian products of the Llama row operations in cpu/llama_ops.h, and a
// dense causal attention (forward and backward) over one whole sequence, for the
// calibration backward pass (calib/backward.h). fp32 in and out; reductions that
// cancel (norms, softmax sums) are taken in double. Each function is tested
// alone against finite differences (tests/unit/test_backward.cpp).
//
// The inference attention lives in CpuBackend and reads keys back from pages;
// calibration needs no pages, so this one reads Q, K, V straight from the fused
// qkv rows. Its softmax is written the same way, so the two agree to rounding.
#pragma once

#include <cstdint>

#include "cpu/llama_ops.h"
#include "model/llama.h"

namespace kvq {

// Sequences shorter than this run single-threaded: their work is smaller than an
// OpenMP fork/join, which costs a whole scheduler time slice when the cores are
// shared (the finite-difference tests run ~1000 tiny forwards).
constexpr int kMinTokensForThreads = 64;

// dx += J^T dy for y = rms_norm(x, w, eps) over `width` values: adds, because the
// residual stream's gradient already holds the skip path. (w needs no gradient.)
void rms_norm_backward(const float* x, const float* w, const float* dy, float* dx, int width, float eps);

// The transpose of RopeTable::rotate: rotates adjacent pairs of one head's
// gradient (head_dim values) by minus pair i's angle at pos, in place.
void rope_backward(const RopeTable& rope, float* grad, int64_t pos, int head_dim);

// d_gate, d_up = J^T d_out for out = silu(gate) * up over `width` values (overwrites).
void swiglu_backward(const float* gate, const float* up, const float* d_out, float* d_gate, float* d_up, int width);

// Input gradient of y = x W^T (gemm_abt): dx (m, in) = dy (m, out) W (out, in) + beta * dx.
void linear_backward(int m, int out, int in, const float* dy, int ldy, const float* w, float* dx, int ldx,
                     float beta = 0.0f);

// -log softmax(logits)[target] over `vocab` values. When grad is not null, also
// writes grad = scale * (softmax(logits) - onehot(target)); grad may alias logits.
double cross_entropy(const float* logits, int vocab, int target, float scale, float* grad);

// Causal GQA attention of one sequence of n_tokens (positions 0..n_tokens-1),
// scale 1/sqrt(head_dim); query head h reads KV head h / (n_heads / n_kv_heads).
// q, k, v: rows of stride `stride` (e.g. the fused qkv rows), query head h at
// q + t * stride + h * head_dim, KV head g at k (v) + t * stride + g * head_dim;
// q and k already rotated. out: (n_tokens, out_stride), head h at column h * head_dim.
void causal_attention(const LlamaConfig& config, int n_tokens, const float* q, const float* k, const float* v,
                      int stride, float* out, int out_stride);

// Backward of causal_attention: given d_out (same layout as out), overwrites dq,
// dk, dv (same layout as q, k, v, with stride d_stride; dk and dv summed over the
// query heads of each group). Recomputes the attention probabilities block by
// block instead of keeping them: scratch is O(block * n_tokens) per thread.
void causal_attention_backward(const LlamaConfig& config, int n_tokens, const float* q, const float* k,
                               const float* v, int stride, const float* d_out, int d_out_stride, float* dq, float* dk,
                               float* dv, int d_stride);

}  // namespace kvq
