// Quantize-on-write of KV rows into pool blocks on the GPU, the CUDA twin of
// PageCodec::encode (kv/page_codec.h): the bytes a launch writes are the bytes
// the CPU codec writes for the same rows, for every --kv format, and so are the
// outlier counts. Also the host side the kernels need: the block layout as a
// POD, the calibration uploaded per layer, and the planner that turns a step
// into write runs exactly as CpuBackend::write_kv splits it into tasks.
// Decoding (for attention loaders and tests) is in kv_dequant.cuh.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "calib/calibration_file.h"
#include "kv/page_codec.h"

namespace kvq {
class PageTables;
struct StepBatch;
struct SequenceChunk;
}  // namespace kvq

namespace kvq::cuda {

// One page block's layout (PageCodec's), usable by value in kernels.
struct PageBlockLayout {
  KvScheme scheme;
  KvKind kind;
  int32_t bits;                 // bits per code (16 fp16, 8 fp8 / q8_0, 4 q4_0, 2..4 int / nuq / kivi)
  int32_t page_size;            // token rows per block
  int32_t head_dim;
  int32_t rows_per_group;       // 1, 32 (KIVI keys) or page_size (--kscale page keys)
  int32_t per_page_key_ranges;  // 1: --kscale page keys (fp16 lo, hi per channel in the group params)
  int32_t outlier_capacity;     // slots per block; 0: no outlier part
  int32_t codes_offset;         // bytes from the block start to each part
  int32_t row_params_offset;
  int32_t group_params_offset;
  int32_t outliers_offset;      // uint32 count, then outlier_capacity uint32 slots (index | fp16 value << 16)
  int32_t block_bytes;
};

PageBlockLayout page_block_layout(const PageCodec& codec);

// One layer's calibration on the device (LayerCalibration's twin); null where the format needs none.
struct DeviceLayerCalibration {
  const float* key_lo = nullptr;          // (n_kv_heads, head_dim) pre-RoPE per-channel key range
  const float* key_hi = nullptr;          // (n_kv_heads, head_dim)
  const float* key_scale = nullptr;       // (n_kv_heads, head_dim) per channel levels / (hi - lo) (int) or 2 / (hi - lo) (nuq)
  const float* key_codebook = nullptr;    // (2^bits) ascending, nonuniform formats
  const float* value_codebook = nullptr;  // (2^bits)
  float value_threshold = 0;              // value outlier when |v| > threshold * rms(token's v)
};

// Owns every layer's calibration in one device allocation.
class DeviceCalibration {
 public:
  DeviceCalibration() = default;
  // layers (n_layers) as calibration_for_format returns them; nothing is uploaded for uncalibrated formats.
  DeviceCalibration(const std::vector<LayerCalibration>& layers, const KvFormat& format, int kv_dim);
  ~DeviceCalibration();
  DeviceCalibration(const DeviceCalibration&) = delete;
  DeviceCalibration& operator=(const DeviceCalibration&) = delete;
  DeviceLayerCalibration layer(int i) const { return layers_.empty() ? DeviceLayerCalibration{} : layers_.at(i); }

 private:
  float* storage_ = nullptr;  // per layer: key_lo, key_hi, key_scale (kv_dim each), key codebook, value codebook
  std::vector<DeviceLayerCalibration> layers_;
};

// ---- writes ----

struct KvWriteRow {
  const uint16_t* src;  // (head_dim) fp16 bits, 16-byte aligned: pre-RoPE keys for fp16/int/nuq, rotated otherwise
  int32_t page_row;     // row in the block
  int32_t exact;        // 1: a sink held exactly elsewhere (int/nuq only): zero codes, no slots, no say in ranges
};

// Rows of one block written by one launch, in ascending page rows (an encode call of the CPU codec): listed in
// the plan's rows, or (rows of this step, the common case) consecutive, described by the run alone, so that a
// prefill step's plan is a run per block instead of a row per token, KV head and kind (llama2-7b, 8192 tokens:
// 524288 rows, 8 MB planned and uploaded each step while the device waited).
struct KvWriteRun {
  int64_t block_offset;  // bytes from the pool base to the destination block (16-byte aligned)
  int32_t first_row;     // index of the run's first row in the plan's rows; kConsecutiveRows: see src
  int32_t n_rows;        // 1 .. page_size; whole groups for grouped codecs (rows_per_group > 1); 0: padding of a
                         // graph's fixed grid, writes nothing
  int32_t kind;          // KvKind: selects the layout
  int32_t kv_head;       // selects the calibrated key ranges
  // Consecutive rows: row i reads src + i * src_stride, writes page row first_page_row + i, and is a sink (exact)
  // for i < n_sinks.
  const uint16_t* src;     // (n_rows rows src_stride apart, head_dim each) fp16 bits, as KvWriteRow::src
  int32_t src_stride;      // elements
  int32_t first_page_row;  // the first row's row in the block
  int32_t n_sinks;         // leading rows that are sinks (KvWriteRow::exact)
  int32_t chunk;           // the step's chunk (StepBatch::chunks) the rows belong to
  int32_t first_pos;       // the first row's position in its sequence
  // Consecutive rows of kv_quantize_decodes_rows layouts: the first scratch_rows rows are also stored decoded into
  // the launch's KvDecodedRows, row i at scratch row scratch_row + i (route_decoded_rows, page_scratch.h); 0: none.
  int32_t scratch_row;
  int32_t scratch_rows;
  int32_t step_row;  // consecutive rows: row i is the step's row step_row + i (KvDecodedRows::rotated_keys); else -1
};
constexpr int32_t kConsecutiveRows = -1;

// Where quantize-on-write also stores rows as the prefill kernel's tiles hold them: page-tile rows (the page
// scratch, page_scratch.h) decoded with their outliers (sinks exactly), keys of pre-RoPE formats rotated at
// their positions in fp32, rounded to fp16: the bits of QuantizedPageProducer::tile_chunk(); keys null: none.
// And band-tile keys: every key of the launch's consecutive runs exactly, rotated the same way
// (QuantizedPrefillSource::rotated_step_keys); rotated_keys null: none.
struct KvDecodedRows {
  __half* keys = nullptr;        // (n_kv_heads, n_rows, head_dim)
  __half* values = nullptr;      // (n_kv_heads, n_rows, head_dim)
  int64_t n_rows = 0;            // rows per KV head
  const float2* rope = nullptr;  // (positions, head_dim / 2) the angles keys are rotated by; null: not rotated
  __half* rotated_keys = nullptr;  // (step rows, n_kv_heads, head_dim), by KvWriteRun::step_row (every run's rows
                                   // inside); needs rope
  int32_t n_kv_heads = 0;
  // > 0: the step's queries, n_heads of them a row (heads h * n_heads / n_kv_heads .. with KV head h), rotated in
  // place at their positions as launch_rope_in_place rotates them, by the lanes of the consecutive key runs (a step
  // row's key of each KV head is in exactly one). Those runs' rows must lie as the QKV GEMM leaves them: a row's
  // queries, then its keys (KvWriteRow::src of KV head h n_heads + h heads after its first query). Needs rope.
  int32_t n_heads = 0;
};

// Whether launch_kv_quantize stores these layouts' rows decoded, their keys rotated and rotates the queries
// (KvDecodedRows): int and nuq with per-row ranges (calibrated key ranges, not --kscale page), keys and values
// alike; their keys are stored pre-RoPE, and their consecutive key runs hold every row of a step.
bool kv_quantize_decodes_rows(const PageBlockLayout& key_layout, const PageBlockLayout& value_layout);

// Row i of a run, from the plan's rows (device or host array) or from the run itself.
__host__ __device__ inline KvWriteRow run_row(const KvWriteRun& run, const KvWriteRow* rows, int i) {
  if (run.first_row != kConsecutiveRows) return rows[run.first_row + i];
  return {run.src + static_cast<int64_t>(i) * run.src_stride, run.first_page_row + i, i < run.n_sinks ? 1 : 0};
}

// A step's writes: each block appears in at most one run (runs of one launch touch disjoint blocks).
struct KvWritePlan {
  std::vector<KvWriteRun> runs;
  std::vector<KvWriteRow> rows;
};

// Where row `pos` of a chunk's sequence is read from (this step's rows or an earlier one's, for groups). The
// step's own rows (pos >= chunk.start_pos) must lie row_stride elements apart (plan_kv_writes).
using KvRowSource = std::function<const uint16_t*(const SequenceChunk& chunk, int64_t pos, KvKind kind, int kv_head)>;
// Byte offset of a block in the pool.
using KvBlockOffset = std::function<int64_t(KvKind kind, int32_t page, int kv_head)>;

// The runs CpuBackend::write_kv encodes for this step, in its order: per chunk, keys then values, per
// page, per KV head; grouped codecs get the groups the step completes. sinks: effective sinks (0 unless int/nuq).
// A run of the step's own rows is consecutive (source(chunk, pos + 1, ..) = source(chunk, pos, ..) + row_stride);
// one that reads earlier rows (a KIVI key group the step completes) lists its rows.
KvWritePlan plan_kv_writes(const StepBatch& batch, const PageTables& tables, const PageBlockLayout& key_layout,
                           const PageBlockLayout& value_layout, int n_kv_heads, int sinks, const KvRowSource& source,
                           int64_t row_stride, const KvBlockOffset& block_offset);

bool kv_quantize_supported(int head_dim);  // 64 and 128

// The CTAs of launch_kv_quantize at head_dim 64: four times the threads where the launch has few runs for the
// device's n_sms multiprocessors (a CTA encodes a run's rows a few at a time, so a small step leaves the
// device idle), else the occupancy-bound kind; or either forced (the tests run both). Head_dim 128 has one
// kind.
enum class KvQuantizeCtas { by_launch, many_runs, few_runs };

// Encodes every run into pool (bytes). runs (n_runs), rows (device arrays); outlier_counts (2) device
// counters, added to: outliers stored, outliers that found their block's slots full. n_sms: the device's
// multiprocessors (cudaDeviceProp::multiProcessorCount), which KvQuantizeCtas::by_launch weighs the runs
// against. decoded: where runs with scratch_rows store those rows decoded, consecutive runs' keys rotated, and
// whether their lanes rotate the step's queries.
void launch_kv_quantize(uint8_t* pool, const PageBlockLayout& key_layout, const PageBlockLayout& value_layout,
                        const DeviceLayerCalibration& calib, const KvWriteRun* runs, int32_t n_runs,
                        const KvWriteRow* rows, unsigned long long* outlier_counts, int n_sms, cudaStream_t stream,
                        KvQuantizeCtas ctas = KvQuantizeCtas::by_launch, const KvDecodedRows& decoded = {});

// ---- reads (the fallback and the tests' path; attention loaders use kv_dequant.cuh directly) ----

struct KvReadBlock {
  int64_t block_offset;  // bytes from the pool base
  int32_t kv_head;
  int32_t n_rows;        // rows [0, n_rows) decoded; the rest of the output block is left untouched
};

// out (n_blocks, page_size, head_dim) fp32 = PageCodec::decode of each block, bit for bit.
void launch_kv_dequantize(const uint8_t* pool, const PageBlockLayout& layout, const DeviceLayerCalibration& calib,
                          const KvReadBlock* blocks, int32_t n_blocks, float* out, cudaStream_t stream);

}  // namespace kvq::cuda
