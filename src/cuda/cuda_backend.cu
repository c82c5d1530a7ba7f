// CUDA forward over ragged batches with the paged fp16 KV cache: the same
// steps as CpuBackend::forward (cpu/cpu_backend.cpp), one kernel or GEMM each.
//
//   x (T, hidden) fp32 residual stream
//   per layer: RMSNorm -> xn fp16 -> QKV GEMM -> qkv fp16 -> K, V into pages,
//   Q rotated in place -> attention (prefill tiles + decode splits) -> attn fp16
//   -> O GEMM accumulating into x (beta = 1) -> RMSNorm -> gate|up GEMM ->
//   SwiGLU -> down GEMM accumulating into x
//   last: RMSNorm of the logit rows -> output GEMM -> logits fp32
//
// GEMMs: cuBLAS, fp16 inputs, fp32 accumulation (CUBLAS_COMPUTE_32F).
// All device state (stream, cuBLAS handle, weights, pool, workspace) belongs to
// the backend object; nothing is file-static.
#include "cuda/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/dtypes.h"
#include "core/error.h"
#include "cpu/llama_ops.h"
#include "cuda/attention.h"
#include "cuda/cuda_check.h"
#include "cuda/llama_kernels.h"
#include "kv/page_tables.h"

namespace kvq {
namespace {

using cuda::AttentionChunk;

constexpr int64_t kAlign = 256;
int64_t align_up(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// A device allocation that only grows.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr_) cudaFree(ptr_);
  }
  void reserve(int64_t bytes) {
    if (bytes <= bytes_) return;
    if (ptr_) CUDA_CHECK(cudaFree(ptr_));
    ptr_ = nullptr;
    bytes_ = 0;
    CUDA_CHECK(cudaMalloc(&ptr_, static_cast<size_t>(bytes)));
    bytes_ = bytes;
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  int64_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  int64_t bytes_ = 0;
};

// Pinned host staging that only grows.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer() {
    if (ptr_) cudaFreeHost(ptr_);
  }
  void reserve(int64_t bytes) {
    if (bytes <= bytes_) return;
    if (ptr_) CUDA_CHECK(cudaFreeHost(ptr_));
    ptr_ = nullptr;
    bytes_ = 0;
    CUDA_CHECK(cudaMallocHost(&ptr_, static_cast<size_t>(bytes)));
    bytes_ = bytes;
  }
  char* data() const { return static_cast<char*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  int64_t bytes_ = 0;
};

// Stream and cuBLAS handle of one backend.
class CudaContext {
 public:
  CudaContext() {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
      cudaGetLastError();
      fail("--device cuda: no CUDA device is visible");
    }
    CUDA_CHECK(cudaSetDevice(0));
    CUDA_CHECK(cudaGetDeviceProperties(&properties, 0));
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CUBLAS_CHECK(cublasCreate(&cublas));
    CUBLAS_CHECK(cublasSetStream(cublas, stream));
    // Our own workspace: cuBLAS then never allocates inside a step (or a graph capture).
    cublas_workspace.reserve(int64_t{32} << 20);
    CUBLAS_CHECK(cublasSetWorkspace(cublas, cublas_workspace.as<void>(), cublas_workspace.bytes()));
  }
  ~CudaContext() {
    if (cublas) cublasDestroy(cublas);
    if (stream) cudaStreamDestroy(stream);
  }
  CudaContext(const CudaContext&) = delete;
  CudaContext& operator=(const CudaContext&) = delete;

  cudaDeviceProp properties{};
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  DeviceBuffer cublas_workspace;
};

struct DeviceLayer {
  const float* attn_norm;   // (hidden)
  const __half* wqkv;       // (q_dim + 2 kv_dim, hidden)
  const __half* wo;         // (hidden, q_dim)
  const float* ffn_norm;    // (hidden)
  const __half* w_gate_up;  // (2 ffn, hidden)
  const __half* w_down;     // (hidden, ffn)
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(const LlamaConfig& config, const LlamaWeights* weights, const CudaBackendOptions& options);
  ~CudaBackend() override = default;

  void forward(const StepBatch& batch, const PageTables& tables, std::vector<float>& logits) override;
  std::string device_name() const override { return context_.properties.name; }
  int64_t kv_bytes_per_page() const override {
    return int64_t{config_.n_layers} * 2 * config_.kv_dim() * page_size_ * 2;
  }
  int32_t n_pages() const override { return n_pages_; }

 private:
  void allocate_weights();
  void upload_weights(const LlamaWeights& weights);
  void fill_dummy_weights(uint64_t seed);
  void reserve_workspace(int32_t n_tokens, int32_t n_logit_rows);
  // out (rows, n_out) = a (rows, k) * w (n_out, k)^T + beta * out; out fp16 or fp32.
  void gemm(int32_t rows, int32_t n_out, int32_t k, const __half* a, const __half* w, void* out, bool out_fp32,
            float beta);
  __half* layer_pool(int layer, int kind) const {
    const int64_t per_pool = int64_t{n_pages_} * config_.kv_dim() * page_size_;
    return pool_.as<__half>() + (int64_t{layer} * 2 + kind) * per_pool;
  }

  LlamaConfig config_;
  int32_t page_size_;
  int32_t n_pages_ = 0;
  CudaContext context_;

  DeviceBuffer weights_;  // every tensor below, one allocation
  DeviceBuffer output_untied_;  // (vocab, hidden) fp16 when the model has its own output matrix
  std::vector<DeviceLayer> layers_;
  const __half* token_embd_ = nullptr;   // (vocab, hidden)
  const __half* output_ = nullptr;       // (vocab, hidden); == token_embd_ when tied
  const float* output_norm_ = nullptr;   // (hidden)
  DeviceBuffer rope_;                    // (context, head_dim / 2) float2 (cos, sin), as RopeTable
  DeviceBuffer pool_;                    // (n_layers, 2, n_pages, n_kv_heads, page_size, head_dim) fp16

  // Step workspace for up to workspace_tokens_ tokens.
  int32_t workspace_tokens_ = 0;
  int32_t workspace_logit_rows_ = 0;
  DeviceBuffer x_;        // (T, hidden) fp32
  DeviceBuffer xn_;       // (T, hidden) fp16
  DeviceBuffer qkv_;      // (T, qkv_dim) fp16
  DeviceBuffer attn_;     // (T, q_dim) fp16
  DeviceBuffer gate_up_;  // (T, 2 ffn) fp16
  DeviceBuffer act_;      // (T, ffn) fp16
  DeviceBuffer logits_;   // (logit rows, vocab) fp32
  DeviceBuffer decode_workspace_;
  DeviceBuffer step_index_;  // the step's index arrays (see forward)
  PinnedBuffer step_index_host_;
};

CudaBackend::CudaBackend(const LlamaConfig& config, const LlamaWeights* weights, const CudaBackendOptions& options)
    : config_(config), page_size_(options.page_size) {
  const LlamaConfig& c = config_;
  if (page_size_ <= 0) fail("--page {}: must be positive", page_size_);
  if (!cuda::prefill_attention_supported(c.head_dim) ||
      !cuda::decode_attention_supported(c.head_dim, c.n_heads / std::max(c.n_kv_heads, 1)) || c.n_heads % c.n_kv_heads) {
    fail("CUDA backend: {} heads over {} KV heads of head_dim {} are not supported (head_dim 64 or 128, at most 8 heads per KV head)",
         c.n_heads, c.n_kv_heads, c.head_dim);
  }
  if (c.hidden % 8 || c.ffn % 8) fail("CUDA backend: hidden {} and ffn {} must be multiples of 8", c.hidden, c.ffn);

  allocate_weights();
  if (weights) {
    upload_weights(*weights);
  } else {
    fill_dummy_weights(options.dummy_seed);
  }

  // RoPE angles exactly as the CPU reference computes them.
  const RopeTable table(c);
  const int half = c.head_dim / 2;
  std::vector<float> interleaved(size_t(c.context) * half * 2);
  for (int64_t pos = 0; pos < c.context; ++pos) {
    for (int i = 0; i < half; ++i) {
      interleaved[(pos * half + i) * 2] = table.cos(pos)[i];
      interleaved[(pos * half + i) * 2 + 1] = table.sin(pos)[i];
    }
  }
  rope_.reserve(int64_t(interleaved.size()) * 4);
  CUDA_CHECK(cudaMemcpy(rope_.as<void>(), interleaved.data(), interleaved.size() * 4, cudaMemcpyHostToDevice));

  reserve_workspace(std::max(options.max_step_tokens, 1), std::min(std::max(options.max_step_tokens, 1), 256));

  const int64_t page_bytes = kv_bytes_per_page();
  int64_t pool_bytes = options.pool_bytes;
  if (pool_bytes <= 0) {
    size_t free_bytes = 0, total_bytes = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    // Margin for workspace growth, decode scratch and the CUDA/cuBLAS runtime.
    const int64_t margin = std::max<int64_t>(int64_t{1} << 30, static_cast<int64_t>(total_bytes) / 25);
    pool_bytes = static_cast<int64_t>(free_bytes) - margin;
  }
  const int64_t pages = pool_bytes / page_bytes;
  if (pages < 1) fail("CUDA backend: no room for a KV page of {} bytes after weights and workspace", page_bytes);
  n_pages_ = static_cast<int32_t>(std::min<int64_t>(pages, INT32_MAX));
  pool_.reserve(int64_t{n_pages_} * page_bytes);
  CUDA_CHECK(cudaStreamSynchronize(context_.stream));
}

void CudaBackend::allocate_weights() {
  const LlamaConfig& c = config_;
  const int64_t h = c.hidden;
  int64_t bytes = 0;
  auto take = [&](int64_t elements, int64_t element_bytes) {
    const int64_t offset = bytes;
    bytes += align_up(elements * element_bytes);
    return offset;
  };
  struct Offsets {
    int64_t attn_norm, wqkv, wo, ffn_norm, w_gate_up, w_down;
  };
  std::vector<Offsets> offsets(c.n_layers);
  const int64_t embd = take(int64_t{c.vocab} * h, 2);
  const int64_t out_norm = take(h, 4);
  for (Offsets& o : offsets) {
    o.attn_norm = take(h, 4);
    o.wqkv = take(int64_t{c.qkv_dim()} * h, 2);
    o.wo = take(h * c.q_dim(), 2);
    o.ffn_norm = take(h, 4);
    o.w_gate_up = take(2 * int64_t{c.ffn} * h, 2);
    o.w_down = take(h * c.ffn, 2);
  }
  weights_.reserve(bytes);
  char* base = weights_.as<char>();
  token_embd_ = reinterpret_cast<const __half*>(base + embd);
  output_ = token_embd_;  // tied unless upload_weights finds an output matrix
  output_norm_ = reinterpret_cast<const float*>(base + out_norm);
  for (const Offsets& o : offsets) {
    layers_.push_back({reinterpret_cast<const float*>(base + o.attn_norm), reinterpret_cast<const __half*>(base + o.wqkv),
                       reinterpret_cast<const __half*>(base + o.wo), reinterpret_cast<const float*>(base + o.ffn_norm),
                       reinterpret_cast<const __half*>(base + o.w_gate_up),
                       reinterpret_cast<const __half*>(base + o.w_down)});
  }
}

void CudaBackend::upload_weights(const LlamaWeights& w) {
  const LlamaConfig& c = config_;
  const size_t h = c.hidden;
  std::vector<uint16_t> staging;
  auto half_tensor = [&](const __half* dst, const std::vector<float>& src, size_t expected, const char* name) {
    if (src.size() != expected) fail("CUDA backend: weight {} has {} values, {} expected", name, src.size(), expected);
    staging.resize(src.size());
    for (size_t k = 0; k < src.size(); ++k) staging[k] = fp32_to_fp16(src[k]);
    CUDA_CHECK(cudaMemcpy(const_cast<__half*>(dst), staging.data(), staging.size() * 2, cudaMemcpyHostToDevice));
  };
  auto float_tensor = [&](const float* dst, const std::vector<float>& src, size_t expected, const char* name) {
    if (src.size() != expected) fail("CUDA backend: weight {} has {} values, {} expected", name, src.size(), expected);
    CUDA_CHECK(cudaMemcpy(const_cast<float*>(dst), src.data(), src.size() * 4, cudaMemcpyHostToDevice));
  };
  if (int(w.layers.size()) != c.n_layers) fail("CUDA backend: {} layers of weights, {} expected", w.layers.size(), c.n_layers);
  half_tensor(token_embd_, w.token_embd, size_t(c.vocab) * h, "token_embd");
  float_tensor(output_norm_, w.output_norm, h, "output_norm");
  if (!w.output.empty()) {
    // Untied output: one more (vocab, hidden) matrix.
    output_untied_.reserve(align_up(int64_t{c.vocab} * c.hidden * 2));
    output_ = output_untied_.as<__half>();
    half_tensor(output_, w.output, size_t(c.vocab) * h, "output");
  }
  for (int l = 0; l < c.n_layers; ++l) {
    const LlamaLayerWeights& lw = w.layers[l];
    const DeviceLayer& d = layers_[l];
    float_tensor(d.attn_norm, lw.attn_norm, h, "attn_norm");
    half_tensor(d.wqkv, lw.wqkv, size_t(c.qkv_dim()) * h, "wqkv");
    half_tensor(d.wo, lw.wo, h * c.q_dim(), "wo");
    float_tensor(d.ffn_norm, lw.ffn_norm, h, "ffn_norm");
    half_tensor(d.w_gate_up, lw.w_gate_up, 2 * size_t(c.ffn) * h, "w_gate_up");
    half_tensor(d.w_down, lw.w_down, h * c.ffn, "w_down");
  }
}

void CudaBackend::fill_dummy_weights(uint64_t seed) {
  const LlamaConfig& c = config_;
  cudaStream_t s = context_.stream;
  uint64_t tensor = 0;
  // Uniform with variance 1/fan_in keeps every GEMM output near unit scale.
  auto matrix = [&](const __half* p, int64_t rows, int64_t fan_in) {
    cuda::launch_fill_uniform(const_cast<__half*>(p), rows * fan_in, seed * 0x100000001b3ull + ++tensor,
                              std::sqrt(3.0f / static_cast<float>(fan_in)), s);
  };
  cuda::launch_fill_uniform(const_cast<__half*>(token_embd_), int64_t{c.vocab} * c.hidden, seed * 0x100000001b3ull + ++tensor,
                            1.0f, s);
  cuda::launch_fill(const_cast<float*>(output_norm_), c.hidden, 1.0f, s);
  for (const DeviceLayer& d : layers_) {
    cuda::launch_fill(const_cast<float*>(d.attn_norm), c.hidden, 1.0f, s);
    cuda::launch_fill(const_cast<float*>(d.ffn_norm), c.hidden, 1.0f, s);
    matrix(d.wqkv, c.qkv_dim(), c.hidden);
    matrix(d.wo, c.hidden, c.q_dim());
    matrix(d.w_gate_up, 2 * int64_t{c.ffn}, c.hidden);
    matrix(d.w_down, c.hidden, c.ffn);
  }
}

void CudaBackend::reserve_workspace(int32_t n_tokens, int32_t n_logit_rows) {
  const LlamaConfig& c = config_;
  if (n_tokens > workspace_tokens_) {
    const int64_t t = n_tokens;
    x_.reserve(t * c.hidden * 4);
    xn_.reserve(t * c.hidden * 2);
    qkv_.reserve(t * c.qkv_dim() * 2);
    attn_.reserve(t * c.q_dim() * 2);
    gate_up_.reserve(t * 2 * c.ffn * 2);
    act_.reserve(t * c.ffn * 2);
    workspace_tokens_ = n_tokens;
  }
  if (n_logit_rows > workspace_logit_rows_) {
    logits_.reserve(int64_t{n_logit_rows} * c.vocab * 4);
    workspace_logit_rows_ = n_logit_rows;
  }
}

void CudaBackend::gemm(int32_t rows, int32_t n_out, int32_t k, const __half* a, const __half* w, void* out,
                       bool out_fp32, float beta) {
  const float alpha = 1.0f;
  // Row-major out (rows, n_out) is column-major (n_out, rows) = w (k, n_out)^T * a (k, rows).
  CUBLAS_CHECK(cublasGemmEx(context_.cublas, CUBLAS_OP_T, CUBLAS_OP_N, n_out, rows, k, &alpha, w, CUDA_R_16F, k, a,
                            CUDA_R_16F, k, &beta, out, out_fp32 ? CUDA_R_32F : CUDA_R_16F, n_out, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT));
}

void CudaBackend::forward(const StepBatch& batch, const PageTables& tables, std::vector<float>& logits) {
  const LlamaConfig& c = config_;
  const int32_t n = batch.n_tokens();
  if (tables.page_size() != page_size_) fail("page tables use pages of {} tokens, the CUDA pool {}", tables.page_size(), page_size_);
  check_step(batch, tables, c);
  logits.clear();
  if (n == 0) return;

  // Host plan: every index array the kernels read, uploaded in one copy.
  std::vector<int32_t> positions(n);          // (T) position of each row in its sequence
  std::vector<int2> slots(n);                 // (T) (pool page, row in page) of each row
  std::vector<AttentionChunk> chunks;         // (chunks)
  std::vector<int32_t> page_table;            // pages of every chunk's sequence up to its last row
  std::vector<int32_t> prefill_ids, decode_ids, logit_rows;
  for (const SequenceChunk& sc : batch.chunks) {
    const std::vector<int32_t>& pages = tables.pages(sc.seq);
    const int64_t end = sc.start_pos + sc.n_tokens;
    const int64_t used_pages = (end + page_size_ - 1) / page_size_;
    AttentionChunk ac{sc.first_row, sc.n_tokens, static_cast<int32_t>(sc.start_pos), static_cast<int32_t>(page_table.size())};
    for (int64_t p = 0; p < used_pages; ++p) {
      if (pages[p] < 0 || pages[p] >= n_pages_) fail("sequence {}: page {} is outside the CUDA pool of {} pages", sc.seq, pages[p], n_pages_);
      page_table.push_back(pages[p]);
    }
    for (int32_t t = 0; t < sc.n_tokens; ++t) {
      const int64_t pos = sc.start_pos + t;
      positions[sc.first_row + t] = static_cast<int32_t>(pos);
      slots[sc.first_row + t] = make_int2(pages[pos / page_size_], static_cast<int32_t>(pos % page_size_));
    }
    (sc.n_tokens == 1 ? decode_ids : prefill_ids).push_back(static_cast<int32_t>(chunks.size()));
    chunks.push_back(ac);
    if (sc.all_logits) {
      for (int32_t t = 0; t < sc.n_tokens; ++t) logit_rows.push_back(sc.first_row + t);
    } else if (sc.n_tokens > 0) {
      logit_rows.push_back(sc.first_row + sc.n_tokens - 1);
    }
  }
  const std::vector<cuda::PrefillWork> prefill = cuda::plan_prefill(chunks, prefill_ids, c.head_dim);
  const cuda::DecodePlan decode = cuda::plan_decode(chunks, decode_ids, c.n_kv_heads, context_.properties.multiProcessorCount);
  const int32_t n_rows = static_cast<int32_t>(logit_rows.size());

  int64_t index_bytes = 0;
  auto place = [&](size_t bytes) {
    const int64_t offset = index_bytes;
    index_bytes += align_up(static_cast<int64_t>(bytes));
    return offset;
  };
  const int64_t o_tokens = place(batch.tokens.size() * 4), o_positions = place(positions.size() * 4),
                o_slots = place(slots.size() * sizeof(int2)), o_chunks = place(chunks.size() * sizeof(AttentionChunk)),
                o_pages = place(page_table.size() * 4), o_prefill = place(prefill.size() * sizeof(cuda::PrefillWork)),
                o_splits = place(decode.splits.size() * sizeof(cuda::DecodeSplit)),
                o_decode = place(decode.chunks.size() * sizeof(cuda::DecodeChunk)), o_rows = place(logit_rows.size() * 4);
  step_index_host_.reserve(index_bytes);
  step_index_.reserve(index_bytes);
  char* host = step_index_host_.data();
  auto copy_in = [&](int64_t offset, const void* src, size_t bytes) {
    if (bytes) std::memcpy(host + offset, src, bytes);
  };
  copy_in(o_tokens, batch.tokens.data(), batch.tokens.size() * 4);
  copy_in(o_positions, positions.data(), positions.size() * 4);
  copy_in(o_slots, slots.data(), slots.size() * sizeof(int2));
  copy_in(o_chunks, chunks.data(), chunks.size() * sizeof(AttentionChunk));
  copy_in(o_pages, page_table.data(), page_table.size() * 4);
  copy_in(o_prefill, prefill.data(), prefill.size() * sizeof(cuda::PrefillWork));
  copy_in(o_splits, decode.splits.data(), decode.splits.size() * sizeof(cuda::DecodeSplit));
  copy_in(o_decode, decode.chunks.data(), decode.chunks.size() * sizeof(cuda::DecodeChunk));
  copy_in(o_rows, logit_rows.data(), logit_rows.size() * 4);

  reserve_workspace(n, n_rows);
  decode_workspace_.reserve(std::max<int64_t>(
      kAlign, cuda::decode_workspace_bytes(static_cast<int32_t>(decode.splits.size()), c.n_heads, c.head_dim)));

  cudaStream_t stream = context_.stream;
  CUDA_CHECK(cudaMemcpyAsync(step_index_.as<void>(), host, index_bytes, cudaMemcpyHostToDevice, stream));
  const char* dev = step_index_.as<char>();
  const auto* d_tokens = reinterpret_cast<const int32_t*>(dev + o_tokens);
  const auto* d_positions = reinterpret_cast<const int32_t*>(dev + o_positions);
  const auto* d_slots = reinterpret_cast<const int2*>(dev + o_slots);
  const auto* d_chunks = reinterpret_cast<const AttentionChunk*>(dev + o_chunks);
  const auto* d_pages = reinterpret_cast<const int32_t*>(dev + o_pages);
  const auto* d_prefill = reinterpret_cast<const cuda::PrefillWork*>(dev + o_prefill);
  const auto* d_splits = reinterpret_cast<const cuda::DecodeSplit*>(dev + o_splits);
  const auto* d_decode = reinterpret_cast<const cuda::DecodeChunk*>(dev + o_decode);
  const auto* d_rows = reinterpret_cast<const int32_t*>(dev + o_rows);

  float* x = x_.as<float>();
  __half* xn = xn_.as<__half>();
  __half* qkv = qkv_.as<__half>();
  __half* attn = attn_.as<__half>();
  __half* gate_up = gate_up_.as<__half>();
  __half* act = act_.as<__half>();
  const cuda::KvWriteShape kv_shape{c.n_heads, c.n_kv_heads, c.head_dim, page_size_};
  const cuda::AttentionQuery query{qkv, c.qkv_dim(), attn, c.q_dim(), c.n_heads, c.head_dim,
                                   1.0f / std::sqrt(static_cast<float>(c.head_dim))};

  cuda::launch_embed(d_tokens, n, token_embd_, c.hidden, x, stream);
  for (int layer = 0; layer < c.n_layers; ++layer) {
    const DeviceLayer& w = layers_[layer];
    __half* keys = layer_pool(layer, 0);
    __half* values = layer_pool(layer, 1);
    cuda::launch_rms_norm(x, nullptr, n, c.hidden, w.attn_norm, c.rms_eps, xn, stream);
    gemm(n, c.qkv_dim(), c.hidden, xn, w.wqkv, qkv, false, 0.0f);
    cuda::launch_write_kv_rotate_q(qkv, n, d_positions, d_slots, kv_shape, rope_.as<float2>(), keys, values, stream);
    const cuda::PagedKv kv{keys, values, d_pages, rope_.as<float2>(), page_size_, c.n_kv_heads};
    cuda::launch_prefill_attention(query, kv, d_chunks, d_prefill, static_cast<int32_t>(prefill.size()), stream);
    cuda::launch_decode_attention(query, kv, d_chunks, d_splits, static_cast<int32_t>(decode.splits.size()), d_decode,
                                  static_cast<int32_t>(decode.chunks.size()), decode_workspace_.as<void>(), stream);
    gemm(n, c.hidden, c.q_dim(), attn, w.wo, x, true, 1.0f);
    cuda::launch_rms_norm(x, nullptr, n, c.hidden, w.ffn_norm, c.rms_eps, xn, stream);
    gemm(n, 2 * c.ffn, c.hidden, xn, w.w_gate_up, gate_up, false, 0.0f);
    cuda::launch_swiglu(gate_up, n, c.ffn, act, stream);
    gemm(n, c.hidden, c.ffn, act, w.w_down, x, true, 1.0f);
  }
  cuda::launch_rms_norm(x, d_rows, n_rows, c.hidden, output_norm_, c.rms_eps, xn, stream);
  gemm(n_rows, c.vocab, c.hidden, xn, output_, logits_.as<float>(), true, 0.0f);
  logits.resize(size_t(n_rows) * c.vocab);
  CUDA_CHECK(cudaMemcpyAsync(logits.data(), logits_.as<void>(), logits.size() * 4, cudaMemcpyDeviceToHost, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
}

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(const LlamaConfig& config, const LlamaWeights* weights,
                                           const CudaBackendOptions& options) {
  return std::make_unique<CudaBackend>(config, weights, options);
}

}  // namespace kvq
