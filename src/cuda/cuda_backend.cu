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
// All device state (stream, cuBLAS handle, weights, pool, workspace, graphs)
// belongs to the backend object; nothing is file-static.
//
// Decode steps (one token per sequence) are replayed as CUDA graphs, one per
// batch size: the kernels read every per-step input (tokens, positions, page
// slots, page tables, decode splits) from the graph's own index buffer, which
// one copy refreshes before each replay. The grids that vary with the plan are
// fixed at the graph's capacity (GraphCapacity), the plan's arrays padded with
// entries that do nothing (their blocks exit at once). A graph is captured the
// first time its batch size runs, captured again with room for a quarter more
// when a plan outgrows it, and dropped when a buffer it uses is reallocated.
// KVQ_CUDA_GRAPHS=0 in the environment runs every step eagerly.
//
// Quantized formats (every --kv but fp16) take another path per layer, the
// CPU's steps in the CPU's order: RoPE on the queries (and on the keys of
// post-RoPE formats) in place -> quantize-on-write of the rows the step
// completes into the pool (kv_quantize.h; pool layout and bytes are the CPU's)
// -> attention over quantized pages and exact rows (prefill rows:
// quantized_prefill.h, the wgmma kernel; decode rows: quantized_attention.h) ->
// the rows later steps read exactly saved into the sequence's exact-row store
// (exact_rows.h). Launches that do not wait for the one before them run on a
// side stream beside it (cuda/side_stream.h; see enqueue_quantized_layer).
// Their decode steps replay graphs too (quantized arrays in the
// graph's second index buffer), except steps whose writes read earlier rows
// per layer (KIVI key groups completing) or that take several attention
// launches (over kQuantizedRowsPerLaunch rows): those run eagerly. The prefill
// kernel reads the step's page tiles decoded once into the page scratch
// (page_scratch.h; one buffer every layer reuses, at most kPageScratchCapBytes,
// a step over it in groups of chunks): int and nuq formats have quantize-on-write
// store the first group's own rows there as it encodes them (and, where the rule
// has bands, every key of the step rotated, which band tiles copy), and a pre-pass
// decodes the rest (earlier steps' keys, other formats): a chunk over the cap
// by itself, or a step the device has no room for, runs the kernel's decoding
// producer instead (same results).
#include "cuda/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <optional>

#include "core/dtypes.h"
#include "core/error.h"
#include "cpu/llama_ops.h"
#include "cuda/attention.h"
#include "cuda/cuda_check.h"
#include "cuda/exact_rows.h"
#include "cuda/kv_quantize.h"
#include "cuda/page_scratch.h"
#include "cuda/quantized_attention.h"
#include "cuda/quantized_prefill.h"
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
  // True when it allocated anew (pointers taken before, graphs included, are stale).
  bool reserve(int64_t bytes) {
    if (bytes <= bytes_) return false;
    CUDA_CHECK(reallocate(bytes));
    return true;
  }
  // As reserve, but false (holding nothing) when the device has no room instead of throwing; any other error
  // (a sticky one from an earlier launch, say) still throws.
  bool try_reserve(int64_t bytes) {
    if (bytes <= bytes_) return true;
    const cudaError_t status = reallocate(bytes);
    if (status == cudaErrorMemoryAllocation) {
      cudaGetLastError();  // clears the allocation error
      return false;
    }
    CUDA_CHECK(status);
    return true;
  }
  void swap(DeviceBuffer& other) {
    std::swap(ptr_, other.ptr_);
    std::swap(bytes_, other.bytes_);
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  int64_t bytes() const { return bytes_; }

 private:
  // Frees what it holds and allocates `bytes` anew; holds nothing if cudaMalloc fails (its error returned).
  cudaError_t reallocate(int64_t bytes) {
    if (ptr_) CUDA_CHECK(cudaFree(ptr_));
    ptr_ = nullptr;
    bytes_ = 0;
    const cudaError_t status = cudaMalloc(&ptr_, static_cast<size_t>(bytes));
    if (status != cudaSuccess) {
      ptr_ = nullptr;
      return status;
    }
    bytes_ = bytes;
    return cudaSuccess;
  }
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

// Streams and cuBLAS handle of one backend.
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
    CUDA_CHECK(cudaStreamCreateWithFlags(&side.stream, cudaStreamNonBlocking));
    CUDA_CHECK(cudaEventCreateWithFlags(&side.fork_event, cudaEventDisableTiming));
    CUDA_CHECK(cudaEventCreateWithFlags(&side.join_event, cudaEventDisableTiming));
    CUBLAS_CHECK(cublasCreate(&cublas));
    CUBLAS_CHECK(cublasSetStream(cublas, stream));
    // Our own workspace: cuBLAS then never allocates inside a step (or a graph capture).
    cublas_workspace.reserve(int64_t{32} << 20);
    CUBLAS_CHECK(cublasSetWorkspace(cublas, cublas_workspace.as<void>(), cublas_workspace.bytes()));
  }
  ~CudaContext() {
    if (cublas) cublasDestroy(cublas);
    if (side.join_event) cudaEventDestroy(side.join_event);
    if (side.fork_event) cudaEventDestroy(side.fork_event);
    if (side.stream) cudaStreamDestroy(side.stream);
    if (stream) cudaStreamDestroy(stream);
  }
  CudaContext(const CudaContext&) = delete;
  CudaContext& operator=(const CudaContext&) = delete;

  cudaDeviceProp properties{};
  cudaStream_t stream = nullptr;
  cuda::SideStream side;  // quantized layers' independent launches (enqueue_quantized_layer)
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

// The index arrays the kernels of one step read, planned on the host.
struct StepPlan {
  std::vector<int32_t> positions;        // (T) position of each row in its sequence
  std::vector<int2> slots;               // (T) (pool page, row in page) of each row
  std::vector<AttentionChunk> chunks;    // (chunks)
  std::vector<int32_t> page_table;       // pages of every chunk's sequence up to its last row
  std::vector<cuda::PrefillWork> prefill;
  cuda::DecodePlan decode;
  std::vector<int32_t> logit_rows;       // (logit rows) rows of the step whose logits are returned
  bool decode_only = true;               // one token and one logits row per chunk: a graph can replay it
};

// The index arrays of a quantized step, planned on the host (one plan serves every layer).
struct QuantizedStepPlan {
  cuda::KvWritePlan writes;
  bool rows_per_layer = false;  // writes.rows read earlier rows from the exact-row store: one copy of them per layer
  std::vector<cuda::ExactRowSave> saves;
  std::vector<cuda::QuantizedAttentionPlan> attention;  // decode rows (prefill rows: StepPlan::prefill)
  std::vector<int32_t> chunk_slots;                     // (chunks) exact-row store slots, for the prefill rows
  cuda::PageScratchPlan scratch;                        // the prefill rows' launches and their page tiles
};

// A quantized step's device arrays, placed in one buffer.
struct QuantizedStepArgs {
  const cuda::KvWriteRun* runs = nullptr;
  int32_t n_runs = 0;
  const cuda::KvWriteRow* rows = nullptr;  // (n_layers or 1, rows_per_layer)
  int64_t rows_layer_stride = 0;           // 0: every layer uses the same rows
  const cuda::ExactRowSave* saves = nullptr;
  int32_t n_saves = 0;
  struct Attention {
    const AttentionChunk* rows;
    const cuda::ExactSource* sources;
    const cuda::QuantizedSplit* splits;
    int32_t n_splits;
    const cuda::DecodeChunk* combine;
    int32_t n_rows;
  };
  std::vector<Attention> attention;
  const int32_t* chunk_slots = nullptr;
  // The prefill rows' launches (PageScratchPlan): its work, chunk rows and spans on the device, its groups.
  const cuda::PrefillWork* scratch_work = nullptr;
  const int32_t* scratch_chunk_rows = nullptr;
  const cuda::PageScratchSpan* scratch_spans = nullptr;
  std::vector<cuda::PageScratchGroup> scratch_groups;
};

// The grids of a decode graph that vary with the plan, fixed at capture: a step replays the graph when its
// plan fits, its arrays padded to these sizes with entries that do nothing (DecodeSplit {0, 0, 0},
// QuantizedSplit key_begin == key_end, KvWriteRun n_rows 0, ExactRowSave row -1).
struct GraphCapacity {
  int32_t splits = 0;      // decode splits: DecodeSplit (fp16) or QuantizedSplit
  int32_t write_runs = 0;  // quantized formats: KvWriteRun
  int32_t write_rows = 0;  // quantized formats: KvWriteRow
  int32_t saves = 0;       // quantized formats: ExactRowSave
  bool holds(const GraphCapacity& need) const {
    return splits >= need.splits && write_runs >= need.write_runs && write_rows >= need.write_rows && saves >= need.saves;
  }
  GraphCapacity at_least(const GraphCapacity& need) const {
    return {std::max(splits, need.splits), std::max(write_runs, need.write_runs), std::max(write_rows, need.write_rows),
            std::max(saves, need.saves)};
  }
  // A quarter more of each: the splits grow with the context, and a capture costs far more than a replay.
  GraphCapacity with_room() const {
    return {splits + splits / 4, write_runs + write_runs / 4, write_rows + write_rows / 4, saves + saves / 4};
  }
};

// What a quantized decode step needs of a graph, or nothing where no graph replays it: its writes read earlier
// rows once per layer (KIVI key groups completing), or its rows take several attention launches.
std::optional<GraphCapacity> quantized_graph_need(const QuantizedStepPlan& plan) {
  if (plan.rows_per_layer || plan.attention.size() != 1 || !plan.scratch.groups.empty()) return std::nullopt;
  return GraphCapacity{static_cast<int32_t>(plan.attention.front().splits.size()),
                       static_cast<int32_t>(plan.writes.runs.size()), static_cast<int32_t>(plan.writes.rows.size()),
                       static_cast<int32_t>(plan.saves.size())};
}

// A quantized step's arrays padded to a graph's capacity with entries that do nothing; the other arrays are
// sized by the batch (its rows, chunks and store slots), so every step of the graph places them alike.
void pad_to(QuantizedStepPlan& plan, const GraphCapacity& capacity) {
  if (!capacity.holds(*quantized_graph_need(plan))) fail("decode graph: a quantized plan outgrew its graph's capacity");
  plan.writes.runs.resize(capacity.write_runs, cuda::KvWriteRun{});
  plan.writes.rows.resize(capacity.write_rows, cuda::KvWriteRow{nullptr, 0, 0});
  plan.saves.resize(capacity.saves, cuda::ExactRowSave{-1, 0, 0});
  plan.attention.front().splits.resize(capacity.splits, cuda::QuantizedSplit{0, 0, 0, 0});
}

// Byte offsets of the index arrays in a step's device index buffer, each array
// sized for the given capacity (a graph's capacities stay fixed).
struct StepLayout {
  int64_t tokens = 0, positions = 0, slots = 0, chunks = 0, pages = 0, prefill = 0, splits = 0, decode = 0, rows = 0;
  int64_t bytes = 0;
};

StepLayout layout_for(int64_t n_tokens, int64_t n_chunks, int64_t n_pages, int64_t n_prefill, int64_t n_splits,
                      int64_t n_decode, int64_t n_rows) {
  StepLayout layout;
  auto place = [&](int64_t bytes) {
    const int64_t offset = layout.bytes;
    layout.bytes += align_up(bytes);
    return offset;
  };
  layout.tokens = place(n_tokens * 4);
  layout.positions = place(n_tokens * 4);
  layout.slots = place(n_tokens * int64_t{sizeof(int2)});
  layout.chunks = place(n_chunks * int64_t{sizeof(AttentionChunk)});
  layout.pages = place(n_pages * 4);
  layout.prefill = place(n_prefill * int64_t{sizeof(cuda::PrefillWork)});
  layout.splits = place(n_splits * int64_t{sizeof(cuda::DecodeSplit)});
  layout.decode = place(n_decode * int64_t{sizeof(cuda::DecodeChunk)});
  layout.rows = place(n_rows * 4);
  return layout;
}

// What the kernels of one step are launched with: device index arrays and their counts.
struct StepArgs {
  int32_t n_tokens = 0;
  const int32_t* tokens = nullptr;     // (n_tokens)
  const int32_t* positions = nullptr;  // (n_tokens)
  const int2* slots = nullptr;         // (n_tokens)
  const AttentionChunk* chunks = nullptr;
  const int32_t* pages = nullptr;
  const cuda::PrefillWork* prefill = nullptr;
  int32_t n_prefill = 0;
  const cuda::DecodeSplit* splits = nullptr;
  int32_t n_splits = 0;  // the decode attention grid (a graph's includes the empty padding splits)
  const cuda::DecodeChunk* decode = nullptr;
  int32_t n_decode = 0;
  const int32_t* rows = nullptr;  // (n_rows) logit rows
  int32_t n_rows = 0;
};

StepArgs step_args(const char* device_index, const StepLayout& layout, int32_t n_tokens, int32_t n_prefill,
                   int32_t n_splits, int32_t n_decode, int32_t n_rows) {
  StepArgs a;
  a.n_tokens = n_tokens;
  a.tokens = reinterpret_cast<const int32_t*>(device_index + layout.tokens);
  a.positions = reinterpret_cast<const int32_t*>(device_index + layout.positions);
  a.slots = reinterpret_cast<const int2*>(device_index + layout.slots);
  a.chunks = reinterpret_cast<const AttentionChunk*>(device_index + layout.chunks);
  a.pages = reinterpret_cast<const int32_t*>(device_index + layout.pages);
  a.prefill = reinterpret_cast<const cuda::PrefillWork*>(device_index + layout.prefill);
  a.n_prefill = n_prefill;
  a.splits = reinterpret_cast<const cuda::DecodeSplit*>(device_index + layout.splits);
  a.n_splits = n_splits;
  a.decode = reinterpret_cast<const cuda::DecodeChunk*>(device_index + layout.decode);
  a.n_decode = n_decode;
  a.rows = reinterpret_cast<const int32_t*>(device_index + layout.rows);
  a.n_rows = n_rows;
  return a;
}

// A decode step of one batch size, captured once and replayed.
struct DecodeGraph {
  DecodeGraph() = default;
  DecodeGraph(const DecodeGraph&) = delete;
  DecodeGraph& operator=(const DecodeGraph&) = delete;
  ~DecodeGraph() {
    if (exec) cudaGraphExecDestroy(exec);
  }
  cudaGraphExec_t exec = nullptr;
  GraphCapacity capacity;
  StepLayout layout;            // capacities: batch-size tokens and chunks, each sequence's most pages
  DeviceBuffer index;           // (layout.bytes) the step's inputs, refreshed before each replay
  DeviceBuffer quantized_index; // quantized formats: the step's QuantizedStepArgs arrays, padded to the capacity
};

bool graphs_disabled_by_environment() {
  const char* value = std::getenv("KVQ_CUDA_GRAPHS");
  return value != nullptr && value[0] == '0';
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(const LlamaConfig& config, const LlamaWeights* weights, const CudaBackendOptions& options);
  ~CudaBackend() override = default;

  void forward(const StepBatch& batch, const PageTables& tables, std::vector<float>& logits) override;
  void forward_greedy(const StepBatch& batch, const PageTables& tables, std::vector<int32_t>& tokens) override;
  std::string device_name() const override { return context_.properties.name; }
  int64_t kv_bytes_per_page() const override { return CpuKvPages::bytes_per_page(config_, page_size_, kv_options_); }
  int32_t n_pages() const override { return n_pages_; }
  int64_t kv_bytes_per_sequence() const override {
    return int64_t{kv_options_.effective_sinks() + exact_window_} * config_.n_layers * 2 * config_.kv_dim() * 2;
  }
  void release_sequence(int32_t seq) override;
  KvCacheStats kv_stats() const override;
  int64_t decode_graph_captures() const override { return decode_graph_captures_; }

 private:
  void allocate_weights();
  void upload_weights(const LlamaWeights& weights);
  void fill_dummy_weights(uint64_t seed);
  // True when a buffer was reallocated.
  bool reserve_workspace(int32_t n_tokens, int32_t n_logit_rows);
  StepPlan plan_step(const StepBatch& batch, const PageTables& tables) const;
  // Copies the plan's arrays into the pinned staging at layout's offsets, the decode splits padded with
  // empty ones up to n_splits, and enqueues their upload to device_index.
  void upload_index(const StepBatch& batch, const StepPlan& plan, const StepLayout& layout, int32_t n_splits,
                    void* device_index);
  // Runs the model over a planned step (graph replay or eager) and leaves its logits in logits_;
  // returns the number of logit rows.
  int32_t run_step(const StepBatch& batch, const PageTables& tables);
  // The graph of a decode step of batch_size sequences whose capacity holds `need`; quantized formats pass the
  // step's plan (its arrays are uploaded to the graph's buffer before a capture).
  DecodeGraph& decode_graph(int32_t batch_size, const GraphCapacity& need,
                            const QuantizedStepPlan* quantized_plan = nullptr);
  // Every kernel and GEMM of the forward, enqueued on the stream and (quantized layers) the side stream, joined
  // back at each layer's end (capturable). quantized: the quantized step's arrays (quantized formats only).
  void enqueue_forward(const StepArgs& step, const QuantizedStepArgs* quantized = nullptr);
  // out (rows, n_out) = a (rows, k) * w (n_out, k)^T + beta * out; out fp16 or fp32.
  void gemm(int32_t rows, int32_t n_out, int32_t k, const __half* a, const __half* w, void* out, bool out_fp32,
            float beta);
  bool quantized() const { return kv_options_.format.scheme != KvScheme::fp16; }
  // Pre-RoPE formats whose rule reads some keys exactly in band tiles, int and nuq with per-row ranges: quantize-on-
  // write also stores a prefill step's keys rotated into rotated_keys_ (QuantizedPrefillSource::rotated_step_keys).
  bool rotates_band_keys() const {
    return quantized() &&
           cuda::quantize_rotates_band_keys(key_layout_, value_layout_, cuda::exact_rule(kv_options_, page_size_));
  }
  // The sequences' store slots for this step (a chunk at position 0 takes a fresh one); grows the store.
  std::vector<int32_t> assign_exact_slots(const StepBatch& batch);
  QuantizedStepPlan plan_quantized_step(const StepBatch& batch, const PageTables& tables, const StepPlan& plan,
                                        const std::vector<int32_t>& chunk_slots) const;
  // Uploads the quantized plan's arrays into `device_buffer` (after the step's own index upload) and returns
  // their device view; equal array sizes place them at equal offsets.
  QuantizedStepArgs upload_quantized(const QuantizedStepPlan& plan, DeviceBuffer& device_buffer);
  void enqueue_quantized_layer(int layer, const StepArgs& step, const QuantizedStepArgs& q,
                               const cuda::AttentionQuery& query);
  cuda::ExactRowStore exact_store(int layer) const {
    return {exact_store_.as<__half>() + layer * exact_layer_elements(exact_slots_), kv_options_.effective_sinks(), exact_window_};
  }
  int64_t exact_layer_elements(int64_t n_slots) const {
    return n_slots * 2 * config_.kv_dim() * (kv_options_.effective_sinks() + exact_window_);
  }
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
  // fp16: (n_layers, 2, n_pages, n_kv_heads, page_size, head_dim); quantized: the CPU's
  // (n_layers, n_pages, [K block] x n_kv_heads, [V block] x n_kv_heads), blocks as kv/page_codec.h.
  DeviceBuffer pool_;

  // Quantized formats.
  KvCacheOptions kv_options_;  // its calibration pointers are cleared once uploaded
  cuda::PageBlockLayout key_layout_{}, value_layout_{};
  int64_t layer_pool_bytes_ = 0;  // n_pages * n_kv_heads * (key block + value block)
  std::unique_ptr<cuda::DeviceCalibration> calibration_;
  int exact_window_ = 0;          // kv_options_.exact_window_capacity(page_size)
  DeviceBuffer exact_store_;      // (n_layers, exact_slots_, 2, n_kv_heads, sinks + window, head_dim) fp16
  int32_t exact_slots_ = 0;
  std::map<int32_t, int32_t> exact_slot_of_;  // sequence -> slot
  std::vector<int32_t> free_exact_slots_;
  DeviceBuffer outlier_counts_;   // (2) unsigned long long: stored, over capacity
  DeviceBuffer quantized_index_;        // an eager step's QuantizedStepArgs arrays
  PinnedBuffer quantized_index_host_;  // their staging, graphs' too
  DeviceBuffer page_scratch_;     // (2, n_kv_heads, rows, head_dim) fp16: a step's page tiles, one layer at a time
  int64_t page_scratch_refused_bytes_ = INT64_MAX;  // the least scratch size cudaMalloc refused

  // Step workspace for up to workspace_tokens_ tokens.
  int32_t workspace_tokens_ = 0;
  int32_t workspace_logit_rows_ = 0;
  DeviceBuffer x_;        // (T, hidden) fp32
  DeviceBuffer xn_;       // (T, hidden) fp16
  DeviceBuffer qkv_;      // (T, qkv_dim) fp16
  DeviceBuffer attn_;     // (T, q_dim) fp16
  DeviceBuffer gate_up_;  // (T, 2 ffn) fp16
  DeviceBuffer act_;      // (T, ffn) fp16
  DeviceBuffer rotated_keys_;  // (T, kv_dim) fp16, rotates_band_keys() formats: a prefill step's keys rotated
  DeviceBuffer logits_;   // (logit rows, vocab) fp32
  DeviceBuffer decode_workspace_;
  DeviceBuffer step_index_;  // the step's index arrays when it runs eagerly
  PinnedBuffer step_index_host_;
  DeviceBuffer greedy_ids_;  // (logit rows) int32 for forward_greedy

  bool use_graphs_;
  std::map<int32_t, std::unique_ptr<DecodeGraph>> decode_graphs_;  // by batch size
  int64_t decode_graph_captures_ = 0;
};

CudaBackend::CudaBackend(const LlamaConfig& config, const LlamaWeights* weights, const CudaBackendOptions& options)
    : config_(config),
      page_size_(options.page_size),
      kv_options_(options.kv),
      use_graphs_(options.decode_graphs && !graphs_disabled_by_environment()) {
  const LlamaConfig& c = config_;
  if (page_size_ <= 0) fail("--page {}: must be positive", page_size_);
  if (!cuda::prefill_attention_supported(c.head_dim) ||
      !cuda::decode_attention_supported(c.head_dim, c.n_heads / std::max(c.n_kv_heads, 1)) || c.n_heads % c.n_kv_heads) {
    fail("CUDA backend: {} heads over {} KV heads of head_dim {} are not supported (head_dim 64 or 128, at most 8 heads per KV head)",
         c.n_heads, c.n_kv_heads, c.head_dim);
  }
  if (c.hidden % 8 || c.ffn % 8) fail("CUDA backend: hidden {} and ffn {} must be multiples of 8", c.hidden, c.ffn);
  exact_window_ = kv_options_.exact_window_capacity(page_size_);
  if (quantized()) {
    const KvFormat& format = kv_options_.format;
    if (format.calibrated() && static_cast<int>(kv_options_.calibration.size()) != c.n_layers) {
      fail("--kv {} needs a calibration of {} layers", format.name, c.n_layers);
    }
    if (kv_options_.effective_sinks() < 0) fail("--sinks must be >= 0, got {}", kv_options_.sinks);
    if (!cuda::kv_quantize_supported(c.head_dim) ||
        !cuda::quantized_attention_supported(c.head_dim, c.n_heads / std::max(c.n_kv_heads, 1))) {
      fail("CUDA backend: --kv {} supports head_dim 64 or 128 with at most 8 heads per KV head, not head_dim {}",
           format.name, c.head_dim);
    }
    key_layout_ = cuda::page_block_layout(PageCodec(format, KvKind::key, page_size_, c.head_dim, kv_options_.per_page_key_ranges));
    value_layout_ =
        cuda::page_block_layout(PageCodec(format, KvKind::value, page_size_, c.head_dim, kv_options_.per_page_key_ranges));
    if (!cuda::quantized_prefill_supported(c.head_dim, key_layout_, value_layout_)) {
      fail("CUDA backend: --kv {} has no prefill attention kernel at head_dim {}", format.name, c.head_dim);
    }
    calibration_ = std::make_unique<cuda::DeviceCalibration>(kv_options_.calibration, format, c.kv_dim());
    kv_options_.calibration.clear();  // uploaded; the host copy need not outlive the constructor
    outlier_counts_.reserve(2 * sizeof(unsigned long long));
    CUDA_CHECK(cudaMemset(outlier_counts_.as<void>(), 0, 2 * sizeof(unsigned long long)));
  }

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
  layer_pool_bytes_ = int64_t{n_pages_} * (page_bytes / c.n_layers);
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

bool CudaBackend::reserve_workspace(int32_t n_tokens, int32_t n_logit_rows) {
  const LlamaConfig& c = config_;
  bool grew = false;
  if (n_tokens > workspace_tokens_) {
    const int64_t t = n_tokens;
    grew |= x_.reserve(t * c.hidden * 4);
    grew |= xn_.reserve(t * c.hidden * 2);
    grew |= qkv_.reserve(t * c.qkv_dim() * 2);
    grew |= attn_.reserve(t * c.q_dim() * 2);
    grew |= gate_up_.reserve(t * 2 * c.ffn * 2);
    grew |= act_.reserve(t * c.ffn * 2);
    if (rotates_band_keys()) grew |= rotated_keys_.reserve(t * c.kv_dim() * 2);
    workspace_tokens_ = n_tokens;
  }
  if (n_logit_rows > workspace_logit_rows_) {
    grew |= logits_.reserve(int64_t{n_logit_rows} * c.vocab * 4);
    workspace_logit_rows_ = n_logit_rows;
  }
  return grew;
}

void CudaBackend::gemm(int32_t rows, int32_t n_out, int32_t k, const __half* a, const __half* w, void* out,
                       bool out_fp32, float beta) {
  const float alpha = 1.0f;
  // Row-major out (rows, n_out) is column-major (n_out, rows) = w (k, n_out)^T * a (k, rows).
  CUBLAS_CHECK(cublasGemmEx(context_.cublas, CUBLAS_OP_T, CUBLAS_OP_N, n_out, rows, k, &alpha, w, CUDA_R_16F, k, a,
                            CUDA_R_16F, k, &beta, out, out_fp32 ? CUDA_R_32F : CUDA_R_16F, n_out, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT));
}

StepPlan CudaBackend::plan_step(const StepBatch& batch, const PageTables& tables) const {
  const int32_t n = batch.n_tokens();
  StepPlan plan;
  plan.positions.resize(n);
  plan.slots.resize(n);
  std::vector<int32_t> prefill_ids, decode_ids;
  for (const SequenceChunk& sc : batch.chunks) {
    const std::vector<int32_t>& pages = tables.pages(sc.seq);
    const int64_t end = sc.start_pos + sc.n_tokens;
    const int64_t used_pages = (end + page_size_ - 1) / page_size_;
    AttentionChunk ac{sc.first_row, sc.n_tokens, static_cast<int32_t>(sc.start_pos), static_cast<int32_t>(plan.page_table.size())};
    for (int64_t p = 0; p < used_pages; ++p) {
      if (pages[p] < 0 || pages[p] >= n_pages_) fail("sequence {}: page {} is outside the CUDA pool of {} pages", sc.seq, pages[p], n_pages_);
      plan.page_table.push_back(pages[p]);
    }
    for (int32_t t = 0; t < sc.n_tokens; ++t) {
      const int64_t pos = sc.start_pos + t;
      plan.positions[sc.first_row + t] = static_cast<int32_t>(pos);
      plan.slots[sc.first_row + t] = make_int2(pages[pos / page_size_], static_cast<int32_t>(pos % page_size_));
    }
    (sc.n_tokens == 1 ? decode_ids : prefill_ids).push_back(static_cast<int32_t>(plan.chunks.size()));
    plan.chunks.push_back(ac);
    plan.decode_only = plan.decode_only && sc.n_tokens == 1 && !sc.all_logits;
    if (sc.all_logits) {
      for (int32_t t = 0; t < sc.n_tokens; ++t) plan.logit_rows.push_back(sc.first_row + t);
    } else if (sc.n_tokens > 0) {
      plan.logit_rows.push_back(sc.first_row + sc.n_tokens - 1);
    }
  }
  plan.prefill = cuda::plan_prefill(plan.chunks, prefill_ids, config_.head_dim);
  if (quantized()) return plan;  // its decode rows are planned by plan_quantized_step
  plan.decode = cuda::plan_decode(plan.chunks, decode_ids, config_.n_heads, config_.n_kv_heads,
                                  context_.properties.multiProcessorCount);
  return plan;
}

void CudaBackend::upload_index(const StepBatch& batch, const StepPlan& plan, const StepLayout& layout, int32_t n_splits,
                               void* device_index) {
  step_index_host_.reserve(layout.bytes);
  char* host = step_index_host_.data();
  auto copy_in = [&](int64_t offset, const void* src, size_t bytes) {
    if (bytes) std::memcpy(host + offset, src, bytes);
  };
  copy_in(layout.tokens, batch.tokens.data(), batch.tokens.size() * 4);
  copy_in(layout.positions, plan.positions.data(), plan.positions.size() * 4);
  copy_in(layout.slots, plan.slots.data(), plan.slots.size() * sizeof(int2));
  copy_in(layout.chunks, plan.chunks.data(), plan.chunks.size() * sizeof(AttentionChunk));
  copy_in(layout.pages, plan.page_table.data(), plan.page_table.size() * 4);
  copy_in(layout.prefill, plan.prefill.data(), plan.prefill.size() * sizeof(cuda::PrefillWork));
  copy_in(layout.splits, plan.decode.splits.data(), plan.decode.splits.size() * sizeof(cuda::DecodeSplit));
  auto* padding = reinterpret_cast<cuda::DecodeSplit*>(host + layout.splits);
  for (size_t k = plan.decode.splits.size(); k < static_cast<size_t>(n_splits); ++k) padding[k] = {0, 0, 0};
  copy_in(layout.decode, plan.decode.chunks.data(), plan.decode.chunks.size() * sizeof(cuda::DecodeChunk));
  copy_in(layout.rows, plan.logit_rows.data(), plan.logit_rows.size() * 4);
  CUDA_CHECK(cudaMemcpyAsync(device_index, host, layout.bytes, cudaMemcpyHostToDevice, context_.stream));
}

DecodeGraph& CudaBackend::decode_graph(int32_t batch_size, const GraphCapacity& need,
                                       const QuantizedStepPlan* quantized_plan) {
  std::unique_ptr<DecodeGraph>& slot = decode_graphs_[batch_size];
  if (slot && slot->capacity.holds(need)) return *slot;
  // Room on what this batch size needed so far, so that a plan outgrowing one capacity does not shrink another.
  const GraphCapacity capacity = (slot ? slot->capacity.at_least(need) : need).with_room();
  slot.reset();
  const LlamaConfig& c = config_;
  const int64_t workspace = quantized_plan
                                ? cuda::quantized_attention_workspace_bytes(capacity.splits, c.n_heads, c.head_dim)
                                : cuda::decode_workspace_bytes(capacity.splits, c.n_heads, c.head_dim);
  if (decode_workspace_.reserve(workspace)) decode_graphs_.clear();  // the other batch sizes' graphs use the old one
  auto graph = std::make_unique<DecodeGraph>();
  graph->capacity = capacity;
  // fp16 decode splits and chunks: quantized steps plan their own (QuantizedStepArgs).
  const int32_t fp16_splits = quantized_plan ? 0 : capacity.splits;
  const int32_t fp16_decode = quantized_plan ? 0 : batch_size;
  const int64_t max_pages_per_sequence = (c.context + page_size_ - 1) / page_size_;
  graph->layout = layout_for(batch_size, batch_size, batch_size * max_pages_per_sequence, 0, fp16_splits, fp16_decode,
                             batch_size);
  graph->index.reserve(graph->layout.bytes);
  const StepArgs args = step_args(graph->index.as<char>(), graph->layout, batch_size, 0, fp16_splits, fp16_decode,
                                  batch_size);
  QuantizedStepArgs quantized_args;
  if (quantized_plan) {
    // The device view of the padded arrays; uploading them now, before the capture, keeps the copy out of it.
    QuantizedStepPlan padded = *quantized_plan;
    pad_to(padded, capacity);
    quantized_args = upload_quantized(padded, graph->quantized_index);
  }
  cudaStream_t stream = context_.stream;
  cudaGraph_t captured = nullptr;
  CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  try {
    enqueue_forward(args, quantized_plan ? &quantized_args : nullptr);
  } catch (...) {
    cudaStreamEndCapture(stream, &captured);
    if (captured) cudaGraphDestroy(captured);
    throw;
  }
  CUDA_CHECK(cudaStreamEndCapture(stream, &captured));
  const cudaError_t instantiated = cudaGraphInstantiate(&graph->exec, captured, 0);
  cudaGraphDestroy(captured);
  CUDA_CHECK(instantiated);
  ++decode_graph_captures_;
  std::unique_ptr<DecodeGraph>& captured_slot = decode_graphs_[batch_size];  // clear() may have removed the first
  captured_slot = std::move(graph);
  return *captured_slot;
}

int32_t CudaBackend::run_step(const StepBatch& batch, const PageTables& tables) {
  const LlamaConfig& c = config_;
  const int32_t n = batch.n_tokens();
  if (tables.page_size() != page_size_) fail("page tables use pages of {} tokens, the CUDA pool {}", tables.page_size(), page_size_);
  check_step(batch, tables, c);
  if (n == 0) return 0;

  const StepPlan plan = plan_step(batch, tables);
  const auto n_rows = static_cast<int32_t>(plan.logit_rows.size());
  const auto n_chunks = static_cast<int32_t>(plan.chunks.size());
  const auto n_splits = static_cast<int32_t>(plan.decode.splits.size());
  if (reserve_workspace(n, n_rows)) decode_graphs_.clear();

  if (quantized()) {
    const std::vector<int32_t> chunk_slots = assign_exact_slots(batch);
    QuantizedStepPlan quantized_plan = plan_quantized_step(batch, tables, plan, chunk_slots);
    const std::optional<GraphCapacity> graph_need = quantized_graph_need(quantized_plan);
    if (use_graphs_ && plan.decode_only && graph_need) {
      DecodeGraph& graph = decode_graph(n_chunks, *graph_need, &quantized_plan);
      pad_to(quantized_plan, graph.capacity);
      upload_index(batch, plan, graph.layout, 0, graph.index.as<void>());
      upload_quantized(quantized_plan, graph.quantized_index);
      CUDA_CHECK(cudaGraphLaunch(graph.exec, context_.stream));
      return n_rows;
    }
    int64_t workspace = kAlign;
    for (const cuda::QuantizedAttentionPlan& a : quantized_plan.attention) {
      workspace = std::max(workspace, cuda::quantized_attention_workspace_bytes(static_cast<int32_t>(a.splits.size()),
                                                                                 c.n_heads, c.head_dim));
    }
    if (decode_workspace_.reserve(workspace)) decode_graphs_.clear();  // their launches use the old workspace
    const auto n_prefill = static_cast<int32_t>(plan.prefill.size());
    const StepLayout layout = layout_for(n, n_chunks, static_cast<int64_t>(plan.page_table.size()), n_prefill, 0, 0, n_rows);
    step_index_.reserve(layout.bytes);
    // The page scratch is optional, so it takes what the required buffers above leave. It grows by doubling up to
    // the cap: a long prompt's chunks read ever more keys, and reallocating at every step would cost a device-wide
    // cudaFree each time. A size the device refused is not asked again.
    const int64_t scratch_need = cuda::page_scratch_bytes(quantized_plan.scratch.max_rows, c.n_kv_heads, c.head_dim);
    bool have_scratch = scratch_need <= page_scratch_.bytes();
    if (!have_scratch && scratch_need < page_scratch_refused_bytes_) {
      const int64_t want = std::max(scratch_need, std::min<int64_t>(cuda::kPageScratchCapBytes, 2 * page_scratch_.bytes()));
      have_scratch = page_scratch_.try_reserve(want) || (want > scratch_need && page_scratch_.try_reserve(scratch_need));
      if (!have_scratch) page_scratch_refused_bytes_ = scratch_need;
    }
    if (have_scratch) {
      cuda::route_decoded_rows(quantized_plan.scratch, quantized_plan.writes.runs);
    } else {
      // No room beside the pool: one group without rows, the prefill kernel decoding its page tiles.
      const auto n_work = static_cast<int32_t>(plan.prefill.size());
      quantized_plan.scratch.work = plan.prefill;
      quantized_plan.scratch.spans.clear();
      quantized_plan.scratch.groups = {{0, n_work, 0, 0, 0}};
      quantized_plan.scratch.max_rows = 0;
    }
    upload_index(batch, plan, layout, 0, step_index_.as<void>());
    const QuantizedStepArgs quantized_args = upload_quantized(quantized_plan, quantized_index_);
    enqueue_forward(step_args(step_index_.as<char>(), layout, n, n_prefill, 0, 0, n_rows), &quantized_args);
    return n_rows;
  }

  if (use_graphs_ && plan.decode_only) {
    DecodeGraph& graph = decode_graph(n_chunks, GraphCapacity{n_splits});
    upload_index(batch, plan, graph.layout, graph.capacity.splits, graph.index.as<void>());
    CUDA_CHECK(cudaGraphLaunch(graph.exec, context_.stream));
    return n_rows;
  }

  const StepLayout layout = layout_for(n, n_chunks, static_cast<int64_t>(plan.page_table.size()),
                                       static_cast<int64_t>(plan.prefill.size()), n_splits,
                                       static_cast<int64_t>(plan.decode.chunks.size()), n_rows);
  if (decode_workspace_.reserve(std::max<int64_t>(kAlign, cuda::decode_workspace_bytes(n_splits, c.n_heads, c.head_dim)))) {
    decode_graphs_.clear();
  }
  step_index_.reserve(layout.bytes);
  upload_index(batch, plan, layout, n_splits, step_index_.as<void>());
  enqueue_forward(step_args(step_index_.as<char>(), layout, n, static_cast<int32_t>(plan.prefill.size()), n_splits,
                            static_cast<int32_t>(plan.decode.chunks.size()), n_rows));
  return n_rows;
}

void CudaBackend::enqueue_forward(const StepArgs& step, const QuantizedStepArgs* quantized) {
  const LlamaConfig& c = config_;
  const int32_t n = step.n_tokens;
  cudaStream_t stream = context_.stream;
  float* x = x_.as<float>();
  __half* xn = xn_.as<__half>();
  __half* qkv = qkv_.as<__half>();
  __half* attn = attn_.as<__half>();
  __half* gate_up = gate_up_.as<__half>();
  __half* act = act_.as<__half>();
  const cuda::KvWriteShape kv_shape{c.n_heads, c.n_kv_heads, c.head_dim, page_size_};
  const cuda::AttentionQuery query{qkv, c.qkv_dim(), attn, c.q_dim(), c.n_heads, c.head_dim,
                                   1.0f / std::sqrt(static_cast<float>(c.head_dim))};

  cuda::launch_embed(step.tokens, n, token_embd_, c.hidden, x, stream);
  for (int layer = 0; layer < c.n_layers; ++layer) {
    const DeviceLayer& w = layers_[layer];
    cuda::launch_rms_norm(x, nullptr, n, c.hidden, w.attn_norm, c.rms_eps, xn, stream);
    gemm(n, c.qkv_dim(), c.hidden, xn, w.wqkv, qkv, false, 0.0f);
    if (quantized) {
      enqueue_quantized_layer(layer, step, *quantized, query);
    } else {
      __half* keys = layer_pool(layer, 0);
      __half* values = layer_pool(layer, 1);
      cuda::launch_write_kv_rotate_q(qkv, n, step.positions, step.slots, kv_shape, rope_.as<float2>(), keys, values, stream);
      const cuda::PagedKv kv{keys, values, step.pages, rope_.as<float2>(), page_size_, c.n_kv_heads};
      cuda::launch_prefill_attention(query, kv, step.chunks, step.prefill, step.n_prefill, stream);
      cuda::launch_decode_attention(query, kv, step.chunks, step.splits, step.n_splits, step.decode, step.n_decode,
                                    decode_workspace_.as<void>(), stream);
    }
    gemm(n, c.hidden, c.q_dim(), attn, w.wo, x, true, 1.0f);
    cuda::launch_rms_norm(x, nullptr, n, c.hidden, w.ffn_norm, c.rms_eps, xn, stream);
    gemm(n, 2 * c.ffn, c.hidden, xn, w.w_gate_up, gate_up, false, 0.0f);
    cuda::launch_swiglu(gate_up, n, c.ffn, act, stream);
    gemm(n, c.hidden, c.ffn, act, w.w_down, x, true, 1.0f);
    if (quantized) cuda::join_side(context_.side, stream);  // the layer's exact-row save (enqueue_quantized_layer)
  }
  cuda::launch_rms_norm(x, step.rows, step.n_rows, c.hidden, output_norm_, c.rms_eps, xn, stream);
  gemm(step.n_rows, c.vocab, c.hidden, xn, output_, logits_.as<float>(), true, 0.0f);
}

std::vector<int32_t> CudaBackend::assign_exact_slots(const StepBatch& batch) {
  std::vector<int32_t> slots;
  const bool keeps_rows = kv_options_.effective_sinks() + exact_window_ > 0;
  for (const SequenceChunk& chunk : batch.chunks) {
    if (!keeps_rows) {
      slots.push_back(0);
      continue;
    }
    auto found = exact_slot_of_.find(chunk.seq);
    if (found == exact_slot_of_.end()) {
      if (chunk.start_pos != 0) fail("sequence {}: its first chunk (position 0) never ran", chunk.seq);
      int32_t slot;
      if (!free_exact_slots_.empty()) {
        slot = free_exact_slots_.back();
        free_exact_slots_.pop_back();
      } else {
        slot = static_cast<int32_t>(exact_slot_of_.size());
      }
      found = exact_slot_of_.emplace(chunk.seq, slot).first;
    }
    slots.push_back(found->second);
  }
  int32_t needed = 0;
  for (const auto& [seq, slot] : exact_slot_of_) needed = std::max(needed, slot + 1);
  if (needed > exact_slots_) {
    // Grow by doubling; each layer's slots move to the new layer stride (stream order keeps the copy after
    // the previous step's saves).
    const int32_t grown = std::max(needed, 2 * exact_slots_);
    DeviceBuffer store;
    store.reserve(int64_t{config_.n_layers} * exact_layer_elements(grown) * 2);
    if (exact_slots_ > 0) {
      for (int layer = 0; layer < config_.n_layers; ++layer) {
        CUDA_CHECK(cudaMemcpyAsync(store.as<__half>() + layer * exact_layer_elements(grown),
                                   exact_store_.as<__half>() + layer * exact_layer_elements(exact_slots_),
                                   exact_layer_elements(exact_slots_) * 2, cudaMemcpyDeviceToDevice, context_.stream));
      }
      CUDA_CHECK(cudaStreamSynchronize(context_.stream));  // before the old buffer is freed
      CUDA_CHECK(cudaStreamSynchronize(context_.side.stream));  // (a step that failed may not have joined its saves)
    }
    exact_store_.swap(store);
    exact_slots_ = grown;
    decode_graphs_.clear();  // their launches hold the old store
  }
  return slots;
}

void CudaBackend::release_sequence(int32_t seq) {
  auto found = exact_slot_of_.find(seq);
  if (found == exact_slot_of_.end()) return;
  free_exact_slots_.push_back(found->second);
  exact_slot_of_.erase(found);
}

KvCacheStats CudaBackend::kv_stats() const {
  KvCacheStats stats;
  if (!quantized()) return stats;
  unsigned long long counts[2] = {0, 0};
  CUDA_CHECK(cudaMemcpyAsync(counts, outlier_counts_.as<void>(), sizeof(counts), cudaMemcpyDeviceToHost, context_.stream));
  CUDA_CHECK(cudaStreamSynchronize(context_.stream));
  stats.outliers_stored = static_cast<int64_t>(counts[0]);
  stats.outliers_over_capacity = static_cast<int64_t>(counts[1]);
  return stats;
}

QuantizedStepPlan CudaBackend::plan_quantized_step(const StepBatch& batch, const PageTables& tables, const StepPlan& plan,
                                                   const std::vector<int32_t>& chunk_slots) const {
  const LlamaConfig& c = config_;
  const int hd = c.head_dim, kv_dim = c.kv_dim();
  const int sinks = kv_options_.effective_sinks();
  QuantizedStepPlan q;
  // Row sources: this step's rows in qkv_, earlier rows (groups the step completes) from layer 0's store.
  const uint16_t* qkv = qkv_.as<uint16_t>();
  const uint16_t* store = exact_store_.as<uint16_t>();
  const int64_t store_layer = exact_layer_elements(exact_slots_);
  const cuda::ExactRowStore store0 = exact_store(0);
  auto source = [&](const SequenceChunk& chunk, int64_t pos, KvKind kind, int h) -> const uint16_t* {
    if (pos >= chunk.start_pos) {
      return qkv + (chunk.first_row + pos - chunk.start_pos) * c.qkv_dim() + c.q_dim() + static_cast<int>(kind) * kv_dim + h * hd;
    }
    const int32_t slot = chunk_slots[&chunk - batch.chunks.data()];
    return store + cuda::exact_row_offset(store0, c.n_kv_heads, hd, slot, static_cast<int>(kind), h, pos);
  };
  const int64_t key_blocks = int64_t{c.n_kv_heads} * key_layout_.block_bytes;
  const int64_t page_stride = key_blocks + int64_t{c.n_kv_heads} * value_layout_.block_bytes;
  auto block_offset = [&](KvKind kind, int32_t page, int h) -> int64_t {
    return page * page_stride + (kind == KvKind::key ? h * int64_t{key_layout_.block_bytes} : key_blocks + h * int64_t{value_layout_.block_bytes});
  };
  q.writes = cuda::plan_kv_writes(batch, tables, key_layout_, value_layout_, c.n_kv_heads, sinks, source, c.qkv_dim(),
                                  block_offset);
  auto from_store = [&](const cuda::KvWriteRow& row) { return row.src >= store && row.src < store + store_layer; };
  q.rows_per_layer = std::any_of(q.writes.rows.begin(), q.writes.rows.end(), from_store);
  if (q.rows_per_layer) {
    const size_t n = q.writes.rows.size();
    q.writes.rows.resize(n * c.n_layers);
    for (int layer = 1; layer < c.n_layers; ++layer) {
      for (size_t i = 0; i < n; ++i) {
        cuda::KvWriteRow row = q.writes.rows[i];
        if (from_store(row)) row.src += layer * store_layer;
        q.writes.rows[layer * n + i] = row;
      }
    }
  }
  // The rows later steps read exactly: sinks and each sequence's newest `window` (CpuBackend::save_exact_rows).
  if (sinks + exact_window_ > 0) {
    for (size_t i = 0; i < batch.chunks.size(); ++i) {
      const SequenceChunk& chunk = batch.chunks[i];
      const int64_t end = chunk.start_pos + chunk.n_tokens;
      for (int64_t pos = chunk.start_pos; pos < end; ++pos) {
        if (pos >= sinks && pos < end - exact_window_) continue;
        q.saves.push_back({static_cast<int32_t>(chunk.first_row + pos - chunk.start_pos), chunk_slots[i], static_cast<int32_t>(pos)});
      }
    }
  }
  // Prefill rows run on the wgmma kernel (StepPlan::prefill), decode rows on the split kernel.
  std::vector<AttentionChunk> decode_chunks;
  std::vector<int32_t> decode_slots;
  for (size_t i = 0; i < plan.chunks.size(); ++i) {
    if (plan.chunks[i].n_tokens != 1) continue;
    decode_chunks.push_back(plan.chunks[i]);
    decode_slots.push_back(chunk_slots[i]);
  }
  q.attention = cuda::plan_quantized_attention(decode_chunks, decode_slots, kv_options_, page_size_, c.n_kv_heads, hd,
                                               context_.properties.multiProcessorCount);
  q.chunk_slots = chunk_slots;
  q.scratch = cuda::plan_page_scratch(plan.chunks, plan.prefill, cuda::exact_rule(kv_options_, page_size_), c.n_kv_heads, hd,
                                      cuda::kPageScratchCapBytes, cuda::kv_quantize_decodes_rows(key_layout_, value_layout_));
  return q;
}

QuantizedStepArgs CudaBackend::upload_quantized(const QuantizedStepPlan& plan, DeviceBuffer& device_buffer) {
  int64_t bytes = 0;
  auto place = [&](size_t n) {
    const int64_t offset = bytes;
    bytes += align_up(static_cast<int64_t>(n));
    return offset;
  };
  const int64_t runs = place(plan.writes.runs.size() * sizeof(cuda::KvWriteRun));
  const int64_t rows = place(plan.writes.rows.size() * sizeof(cuda::KvWriteRow));
  const int64_t saves = place(plan.saves.size() * sizeof(cuda::ExactRowSave));
  const int64_t chunk_slots = place(plan.chunk_slots.size() * sizeof(int32_t));
  const int64_t scratch_work = place(plan.scratch.work.size() * sizeof(cuda::PrefillWork));
  const int64_t scratch_chunk_rows = place(plan.scratch.chunk_rows.size() * sizeof(int32_t));
  const int64_t scratch_spans = place(plan.scratch.spans.size() * sizeof(cuda::PageScratchSpan));
  struct Offsets {
    int64_t rows, sources, splits, combine;
  };
  std::vector<Offsets> attention;
  for (const cuda::QuantizedAttentionPlan& a : plan.attention) {
    Offsets o{};
    o.rows = place(a.rows.size() * sizeof(AttentionChunk));
    o.sources = place(a.sources.size() * sizeof(cuda::ExactSource));
    o.splits = place(a.splits.size() * sizeof(cuda::QuantizedSplit));
    o.combine = place(a.combine.size() * sizeof(cuda::DecodeChunk));
    attention.push_back(o);
  }
  quantized_index_host_.reserve(std::max<int64_t>(bytes, kAlign));
  device_buffer.reserve(std::max<int64_t>(bytes, kAlign));
  char* host = quantized_index_host_.data();
  const char* device = device_buffer.as<char>();
  auto copy_in = [&](int64_t offset, const auto& v) {
    if (!v.empty()) std::memcpy(host + offset, v.data(), v.size() * sizeof(v[0]));
  };
  copy_in(runs, plan.writes.runs);
  copy_in(rows, plan.writes.rows);
  copy_in(saves, plan.saves);
  copy_in(chunk_slots, plan.chunk_slots);
  copy_in(scratch_work, plan.scratch.work);
  copy_in(scratch_chunk_rows, plan.scratch.chunk_rows);
  copy_in(scratch_spans, plan.scratch.spans);
  QuantizedStepArgs args;
  args.runs = reinterpret_cast<const cuda::KvWriteRun*>(device + runs);
  args.n_runs = static_cast<int32_t>(plan.writes.runs.size());
  args.rows = reinterpret_cast<const cuda::KvWriteRow*>(device + rows);
  args.rows_layer_stride = plan.rows_per_layer ? static_cast<int64_t>(plan.writes.rows.size()) / config_.n_layers : 0;
  args.saves = reinterpret_cast<const cuda::ExactRowSave*>(device + saves);
  args.n_saves = static_cast<int32_t>(plan.saves.size());
  args.chunk_slots = reinterpret_cast<const int32_t*>(device + chunk_slots);
  args.scratch_work = reinterpret_cast<const cuda::PrefillWork*>(device + scratch_work);
  args.scratch_chunk_rows = reinterpret_cast<const int32_t*>(device + scratch_chunk_rows);
  args.scratch_spans = reinterpret_cast<const cuda::PageScratchSpan*>(device + scratch_spans);
  args.scratch_groups = plan.scratch.groups;
  for (size_t i = 0; i < plan.attention.size(); ++i) {
    const cuda::QuantizedAttentionPlan& a = plan.attention[i];
    const Offsets& o = attention[i];
    copy_in(o.rows, a.rows);
    copy_in(o.sources, a.sources);
    copy_in(o.splits, a.splits);
    copy_in(o.combine, a.combine);
    args.attention.push_back({reinterpret_cast<const AttentionChunk*>(device + o.rows),
                              reinterpret_cast<const cuda::ExactSource*>(device + o.sources),
                              reinterpret_cast<const cuda::QuantizedSplit*>(device + o.splits),
                              static_cast<int32_t>(a.splits.size()),
                              reinterpret_cast<const cuda::DecodeChunk*>(device + o.combine),
                              static_cast<int32_t>(a.combine.size())});
  }
  if (bytes > 0) CUDA_CHECK(cudaMemcpyAsync(device_buffer.as<void>(), host, bytes, cudaMemcpyHostToDevice, context_.stream));
  return args;
}

void CudaBackend::enqueue_quantized_layer(int layer, const StepArgs& step, const QuantizedStepArgs& q,
                                          const cuda::AttentionQuery& query) {
  const LlamaConfig& c = config_;
  cudaStream_t stream = context_.stream;
  __half* qkv = qkv_.as<__half>();
  const bool keys_post_rope = kv_options_.format.keys_post_rope();
  uint8_t* pool = pool_.as<uint8_t>() + layer * layer_pool_bytes_;
  const cuda::DeviceLayerCalibration calib = calibration_->layer(layer);
  const cuda::ExactRowStore store = exact_store(layer);
  // The CPU's order: keys rotated before they are stored (post-RoPE formats), pages written, attention, then
  // the exact rows saved (the attention still reads the window's older rows). The queries of int/nuq formats with
  // per-row ranges are rotated by the quantize launch (its key rows' lanes, which load the angles anyway): a launch
  // of its own ran beside none of the quantization's blocks, and quantize plus RoPE took 4.234 ms a llama2-7b
  // 2048-token nuq3-1% step against 4.158 fused, 0.568 against 0.470 at smollm2-135m (Nsight Compute, H100,
  // 2026-11-28). What does not depend on the step before it runs on the side stream (context_.side): the other
  // pre-RoPE formats' query rotation beside the quantization (which never reads the queries), the exact splits
  // beside the page splits, and the save beside the rest of the layer (joined before the next layer's QKV GEMM
  // overwrites the rows it reads: enqueue_forward).
  const cuda::SideStream& side = context_.side;
  const bool quantize_rotates_queries = cuda::kv_quantize_decodes_rows(key_layout_, value_layout_);
  const auto rotate = [&](cudaStream_t on) {
    cuda::launch_rope_in_place(qkv, step.n_tokens, step.positions, c.n_heads, c.n_kv_heads, c.head_dim, keys_post_rope,
                               rope_.as<float2>(), on);
  };
  if (keys_post_rope) {
    rotate(stream);
  } else if (!quantize_rotates_queries) {
    cuda::fork_side(side, stream);
    rotate(side.stream);
  }
  // The first scratch group's own rows, stored decoded by the quantize launch (route_decoded_rows), and the step's
  // keys rotated, which band tiles copy instead of rotating each as it lands.
  cuda::KvDecodedRows decoded;
  decoded.rope = keys_post_rope ? nullptr : rope_.as<float2>();
  if (!q.scratch_groups.empty() && quantize_rotates_queries) {  // the formats that store rows decoded
    const cuda::PageScratch first = cuda::group_scratch(q.scratch_groups.front(), page_scratch_.as<void>(),
                                                        q.scratch_chunk_rows, c.n_kv_heads, c.head_dim);
    decoded.keys = first.keys, decoded.values = first.values, decoded.n_rows = first.n_rows;
  }
  const bool scratch_rows = std::any_of(q.scratch_groups.begin(), q.scratch_groups.end(),
                                        [](const cuda::PageScratchGroup& g) { return g.n_rows > 0; });
  if (scratch_rows && rotates_band_keys()) {  // only the page scratch's kernel copies them
    decoded.rotated_keys = rotated_keys_.as<__half>();
  }
  if (quantize_rotates_queries) decoded.n_heads = c.n_heads;  // the runs' rows are qkv's (plan_quantized_step)
  decoded.n_kv_heads = c.n_kv_heads;
  cuda::launch_kv_quantize(pool, key_layout_, value_layout_, calib, q.runs, q.n_runs, q.rows + layer * q.rows_layer_stride,
                           outlier_counts_.as<unsigned long long>(), context_.properties.multiProcessorCount, stream,
                           cuda::KvQuantizeCtas::by_launch, decoded);
  if (!keys_post_rope && !quantize_rotates_queries) cuda::join_side(side, stream);
  const cuda::QuantizedPagedKv kv{pool, key_layout_, value_layout_, calib, step.pages, rope_.as<float2>(), c.n_kv_heads,
                                  keys_post_rope ? 0 : 1, qkv + c.q_dim(), c.qkv_dim(), store};
  const cuda::QuantizedPrefillSource prefill{kv, cuda::exact_rule(kv_options_, page_size_), q.chunk_slots, {},
                                             decoded.rotated_keys};
  // The step's prefill work (step.prefill) regrouped by the page scratch's plan.
  cuda::launch_quantized_prefill_groups(query, prefill, step.chunks, q.scratch_work, q.scratch_chunk_rows,
                                        q.scratch_spans, q.scratch_groups, page_scratch_.as<void>(), stream);
  for (const QuantizedStepArgs::Attention& a : q.attention) {
    cuda::launch_quantized_attention(query, kv, a.rows, a.sources, a.splits, a.n_splits, a.combine, a.n_rows,
                                     decode_workspace_.as<void>(), stream, &side);
  }
  cuda::fork_side(side, stream);
  cuda::launch_save_exact_rows(qkv, c.q_dim(), c.n_kv_heads, c.head_dim, q.saves, q.n_saves, store, side.stream);
}

void CudaBackend::forward(const StepBatch& batch, const PageTables& tables, std::vector<float>& logits) {
  logits.clear();
  const int32_t n_rows = run_step(batch, tables);
  if (n_rows == 0) return;
  logits.resize(size_t(n_rows) * config_.vocab);
  cudaStream_t stream = context_.stream;
  CUDA_CHECK(cudaMemcpyAsync(logits.data(), logits_.as<void>(), logits.size() * 4, cudaMemcpyDeviceToHost, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
}

void CudaBackend::forward_greedy(const StepBatch& batch, const PageTables& tables, std::vector<int32_t>& tokens) {
  tokens.clear();
  const int32_t n_rows = run_step(batch, tables);
  if (n_rows == 0) return;
  cudaStream_t stream = context_.stream;
  greedy_ids_.reserve(int64_t{n_rows} * 4);
  cuda::launch_argmax_rows(logits_.as<float>(), n_rows, config_.vocab, greedy_ids_.as<int32_t>(), stream);
  tokens.resize(n_rows);
  CUDA_CHECK(cudaMemcpyAsync(tokens.data(), greedy_ids_.as<void>(), tokens.size() * 4, cudaMemcpyDeviceToHost, stream));
  CUDA_CHECK(cudaStreamSynchronize(stream));
}

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(const LlamaConfig& config, const LlamaWeights* weights,
                                           const CudaBackendOptions& options) {
  return std::make_unique<CudaBackend>(config, weights, options);
}

}  // namespace kvq
