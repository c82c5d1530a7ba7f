// The quantized attention kernels against a CPU twin reading the same bytes:
// the split kernel (cuda/quantized_attention.h) for every row, or, as the
// backend runs them, the wgmma prefill kernel (cuda/quantized_prefill.h) for
// chunks of several rows and the split kernel for single rows. Inputs: pages written by launch_kv_quantize from random
// fp16 rows (sequences' pages scattered in the pool), downloaded and decoded with
// PageCodec::decode; exact rows from the same fp16 rows; the split rule of
// KvCacheOptions::exact_from; RoPE with RopeTable::rotate for pre-RoPE formats;
// scores and softmax in double. Every format and option the backend passes,
// head_dim 64 and 128, groups 1, 3 and 8, pages of 16 to 256 rows (page splits
// starting mid-page after sinks), chunks of 1 to 40 rows after 0 to 250 earlier
// keys (split kernel) and, for the prefill kernel, chunks of several 128-row
// query tiles and 128-key tiles, starting mid-page, reading earlier pages, over
// pages of 16, 64 and 256 rows.
//
// Tolerance: the twin's operands are the kernel's to the bit or nearly (decode
// is bit-exact, the exact rows are the same halves; the split kernels' int/nuq
// pages decode with an FFMA, which moves an element by one fp16 ulp now and
// then: decode_packed1; page_fragment_kernel adds an outlier to its operand as
// a difference of halves, exact to half an ulp of the difference: delta_of),
// so what differs is fp32
// accumulation order and ex2.approx in the kernel (~1e-6 relative), the output's
// rounding to fp16 (2^-11 relative) and the tensor-core operands. Both kernels
// run their page keys on the tensor cores, so they round the decoded, rotated
// keys and the values to fp16 for the MMAs (the prefill kernel its exact rows
// too; the split kernel's exact splits stay fp32 on CUDA cores); the twin rounds
// the same values the same way (without that, scores at |q||k| ~ 10 moved
// outputs by up to 4e-3 on the H200, 2026-11-27). What is left is P in fp16
// (2^-11 relative per weight): |gpu - cpu| <= 2e-3 |cpu| + 1e-3 (2e-4 would do
// for fp32 weights).
// A key read from the wrong source, row, page or head, or a wrong RoPE angle,
// moves outputs by the spread of values, ~0.1 to 1.
//
// The prefill kernel runs four times per case, as the backend runs it under
// four caps of the page scratch (page_scratch.h): 0 (every page tile decoded by
// the kernel, the fallback), one byte below the largest chunk's rows (that
// chunk decoded, the others from the scratch), exactly those rows (a group per
// chunk) and the backend's cap (one group), and for int and nuq pages once more
// as the backend runs it, the chunks' own rows stored into the scratch by the
// quantize launch that writes them (KvDecodedRows). Where that launch also
// rotates the chunks' keys for band tiles (int and nuq under a rule with
// bands), every run's band tiles of the step's own keys copy them, as in the
// backend. The tiles are the same halves, so the outputs must be the same bits
// (no tolerance).
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "core/dtypes.h"
#include "cuda/kv_quantize.h"
#include "cuda/page_scratch.h"
#include "cuda/quantized_attention.h"
#include "cuda/quantized_prefill.h"
#include "engine/step_batch.h"
#include "gpu_test_util.h"
#include "kv/kv_format.h"
#include "kv/page_codec.h"
#include "kv/page_tables.h"

namespace kvq::gputest {
namespace {

// Sequences of a step: `earlier` keys before a chunk of `chunk` query rows; prefill_kernel: chunks of several
// rows on the wgmma prefill kernel; n_sms: the multiprocessors the split planner fills (fewer: longer splits).
struct Shapes {
  std::vector<int> earlier = {0, 16, 40, 0, 250, 131};
  std::vector<int> chunk = {1, 1, 23, 40, 1, 5};
  bool prefill_kernel = false;
  int n_sms = 132;
  float query_range = 1.0f;  // queries uniform in +-query_range: larger sharpens the softmax over long rows
};

void run_case(const FormatCase& test, int head_dim, int group, uint32_t seed, const Shapes& shapes = {}) {
  const int n_kv_heads = 2, n_heads = n_kv_heads * group, D = head_dim;
  const int q_dim = n_heads * D, kv_dim = n_kv_heads * D, stride = q_dim + 2 * kv_dim;
  const KvCacheOptions options = options_for(test);
  const int page = test.page > 0 ? test.page : options.format.scheme == KvScheme::kivi ? 32 : 16;
  const TestCalibration calib(1, kv_dim, options.format.bits);
  const std::vector<LayerCalibration> no_layers;
  const cuda::DeviceCalibration device_calib(options.format.calibrated() ? calib.layers : no_layers, options.format, kv_dim);
  const PageCodec key_codec(options.format, KvKind::key, page, D, test.page_ranges);
  const PageCodec value_codec(options.format, KvKind::value, page, D, test.page_ranges);
  const cuda::PageBlockLayout key_layout = cuda::page_block_layout(key_codec);
  const cuda::PageBlockLayout value_layout = cuda::page_block_layout(value_codec);
  const int64_t page_bytes = int64_t{n_kv_heads} * (key_layout.block_bytes + value_layout.block_bytes);
  const int sinks = options.effective_sinks();
  const int window = options.exact_window_capacity(page);
  const std::string what = test.label() + " head_dim " + std::to_string(D) + " group " + std::to_string(group) +
                           " page " + std::to_string(page) + (shapes.prefill_kernel ? " prefill kernel" : "");

  const std::vector<int>& earlier = shapes.earlier;
  const std::vector<int>& chunk = shapes.chunk;
  const int n_seqs = static_cast<int>(earlier.size());
  int longest = 0;
  for (int s = 0; s < n_seqs; ++s) longest = std::max(longest, earlier[s] + chunk[s]);
  std::mt19937 rng(seed);
  const int n_pages = n_seqs * ((longest + page - 1) / page + 1);
  PageTables tables(n_pages, page);
  for (int s = 0; s < n_seqs; ++s) tables.add_sequence(s);
  for (int64_t need = page; need < longest + page; need += page) {  // interleaved: pages scattered over the pool
    for (int s = 0; s < n_seqs; ++s) ASSERT_TRUE(tables.reserve(s, std::min<int64_t>(need, earlier[s] + chunk[s])));
  }

  // Every row of every sequence: (len, 2, kv_dim) fp16 K then V; the chunk's rows also sit in the step rows.
  std::vector<std::vector<uint16_t>> kv_rows(n_seqs);
  for (int s = 0; s < n_seqs; ++s) kv_rows[s] = random_half(rng, size_t(earlier[s] + chunk[s]) * 2 * kv_dim, 1.5f);
  int total_rows = 0;
  for (int s = 0; s < n_seqs; ++s) total_rows += chunk[s];
  std::vector<uint16_t> step = random_half(rng, size_t(total_rows) * stride, shapes.query_range);  // Q columns: random
  std::vector<int> first_row(n_seqs);
  for (int s = 0, row = 0; s < n_seqs; row += chunk[s], ++s) {
    first_row[s] = row;
    for (int t = 0; t < chunk[s]; ++t) {
      std::copy_n(kv_rows[s].data() + size_t(earlier[s] + t) * 2 * kv_dim, 2 * kv_dim,
                  step.data() + size_t(row + t) * stride + q_dim);
    }
  }

  // Pages: every row of every sequence written in one launch (one chunk per sequence from position 0).
  std::vector<uint16_t> all_rows;
  std::vector<size_t> seq_offset(n_seqs);
  for (int s = 0; s < n_seqs; ++s) {
    seq_offset[s] = all_rows.size();
    all_rows.insert(all_rows.end(), kv_rows[s].begin(), kv_rows[s].end());
  }
  DeviceArray<uint16_t> d_all_rows(all_rows);
  const auto device_row = [&](int s, int64_t pos) { return d_all_rows.get() + seq_offset[s] + size_t(pos) * 2 * kv_dim; };
  std::vector<int> lengths(n_seqs);
  for (int s = 0; s < n_seqs; ++s) lengths[s] = earlier[s] + chunk[s];
  DeviceArray<uint8_t> d_pool(size_t(n_pages) * page_bytes);
  const std::array<unsigned long long, 2> outlier_counts =  // stored, found their block full
      quantize_rows_into_pool(d_pool.get(), d_pool.size(), lengths, tables, key_layout, value_layout, n_kv_heads, D,
                              sinks, device_calib.layer(0), device_row);
  const std::vector<uint8_t> pool = d_pool.download();

  // Exact-row store: sinks and the ring of the newest `window` rows before each chunk.
  const int per_head = sinks + window;
  std::vector<uint16_t> store(std::max<size_t>(1, size_t(n_seqs) * 2 * kv_dim * per_head), 0);
  cuda::ExactRowStore store_view{nullptr, sinks, window};
  for (int s = 0; s < n_seqs && per_head > 0; ++s) {
    for (int64_t pos = 0; pos < earlier[s]; ++pos) {
      if (pos >= sinks && pos < earlier[s] - window) continue;
      for (int kind = 0; kind < 2; ++kind) {
        for (int h = 0; h < n_kv_heads; ++h) {
          std::copy_n(kv_rows[s].data() + size_t(pos) * 2 * kv_dim + kind * kv_dim + h * D, D,
                      store.data() + cuda::exact_row_offset(store_view, n_kv_heads, D, s, kind, h, pos));
        }
      }
    }
  }
  DeviceArray<uint16_t> d_store(store);
  store_view.rows = reinterpret_cast<__half*>(d_store.get());

  // The attention step.
  std::vector<cuda::AttentionChunk> chunks;
  std::vector<int32_t> page_table, slots;
  for (int s = 0; s < n_seqs; ++s) {
    chunks.push_back({first_row[s], chunk[s], earlier[s], int32_t(page_table.size())});
    const std::vector<int32_t>& pages = tables.pages(s);
    page_table.insert(page_table.end(), pages.begin(), pages.end());
    slots.push_back(s);
  }
  LlamaConfig config;
  config.head_dim = D;
  config.context = std::max(512, longest);
  config.rope_theta = 10000.0f;
  const RopeTable rope(config);
  DeviceArray<float2> d_rope(rope_table(config));
  DeviceArray<int32_t> d_pages(page_table);
  DeviceArray<uint16_t> d_step(step);
  std::vector<uint16_t> out(size_t(total_rows) * q_dim, 0);
  DeviceArray<uint16_t> d_out(out);
  const cuda::AttentionQuery query{reinterpret_cast<const __half*>(d_step.get()), stride,
                                   reinterpret_cast<__half*>(d_out.get()), q_dim, n_heads, D,
                                   1.0f / std::sqrt(float(D))};
  const bool rotate_keys = !options.format.keys_post_rope();
  const cuda::QuantizedPagedKv kv{d_pool.get(), key_layout, value_layout, device_calib.layer(0), d_pages.get(),
                                  d_rope.get(), n_kv_heads, rotate_keys ? 1 : 0,
                                  reinterpret_cast<const __half*>(d_step.get()) + q_dim, stride, store_view};
  // As the backend: chunks of several rows on the prefill kernel, single rows on the split kernel.
  std::vector<cuda::AttentionChunk> split_chunks;
  std::vector<int32_t> split_slots, prefill_ids;
  for (int s = 0; s < n_seqs; ++s) {
    if (shapes.prefill_kernel && chunk[s] > 1) {
      prefill_ids.push_back(s);
    } else {
      split_chunks.push_back(chunks[s]);
      split_slots.push_back(slots[s]);
    }
  }
  // The prefill rows with the decoding producer, to compare with the page scratch's bit for bit.
  std::vector<uint16_t> decoded_out;
  int scratch_mismatches = 0;
  const auto compare_prefill_rows = [&](const std::vector<uint16_t>& got, const std::string& how) {
    for (int s : prefill_ids) {
      for (size_t i = size_t(first_row[s]) * q_dim; i < size_t(first_row[s] + chunk[s]) * q_dim; ++i) {
        if (got[i] != decoded_out[i] && ++scratch_mismatches <= 5) {
          ADD_FAILURE() << what << ": " << how << ": seq " << s << " row " << i / q_dim - first_row[s] << " column "
                        << i % q_dim << ": " << fp16_to_fp32(got[i]) << ", decoding producer "
                        << fp16_to_fp32(decoded_out[i]);
        }
      }
    }
  };
  if (!prefill_ids.empty()) {
    const std::vector<cuda::PrefillWork> work = cuda::plan_prefill(chunks, prefill_ids, D);
    DeviceArray<cuda::AttentionChunk> d_chunks(chunks);
    DeviceArray<int32_t> d_slots(slots);
    const cuda::ExactRule rule = cuda::exact_rule(options, page);
    const cuda::QuantizedPrefillSource source{kv, rule, d_slots.get(), {}};
    const bool rotated_band = cuda::quantize_rotates_band_keys(key_layout, value_layout, rule);
    DeviceArray<uint16_t> d_rotated_keys(size_t(total_rows) * kv_dim);
    // As the backend runs them, under a scratch cap: the work regrouped, per group the pre-pass and the kernel.
    // quantize_decodes, and every run of formats whose quantize-on-write rotates band keys: the pages written again
    // as two steps, the earlier rows and then the chunks' rows, whose launch stores the first group's own rows into
    // the scratch (quantize_decodes: route_decoded_rows, so that the pre-pass fills only the earlier ones) and
    // the chunks' keys rotated, which every group's band tiles copy (both into fp16 NaNs); ctas: those launches'
    // kernel. The pool's bytes must equal the one launch's.
    const auto run_prefill = [&](int64_t cap_bytes, bool quantize_decodes = false,
                                 cuda::KvQuantizeCtas ctas = cuda::KvQuantizeCtas::by_launch) {
      const cuda::PageScratchPlan plan =
          cuda::plan_page_scratch(chunks, work, rule, n_kv_heads, D, cap_bytes, quantize_decodes);
      EXPECT_EQ(plan.work.size(), work.size()) << what;
      DeviceArray<cuda::PrefillWork> d_work(plan.work);
      DeviceArray<int32_t> d_chunk_rows(plan.chunk_rows);
      DeviceArray<cuda::PageScratchSpan> d_spans(plan.spans);
      DeviceArray<uint8_t> d_scratch(size_t(cuda::page_scratch_bytes(plan.max_rows, n_kv_heads, D)));
      // fp16 NaNs in the scratch (a row read but never written shows, masked or not: 0 x NaN is NaN) and in
      // the output (rows a run misses show).
      if (d_scratch.size() > 0) CUDA_CHECK(cudaMemset(d_scratch.get(), 0xff, d_scratch.size()));
      CUDA_CHECK(cudaMemset(d_out.get(), 0xff, out.size() * 2));
      cuda::QuantizedPrefillSource run_source = source;
      const bool two_steps = quantize_decodes || rotated_band;
      DeviceArray<uint8_t> d_pool_by_steps(two_steps ? d_pool.size() : 0);
      if (two_steps) {
        CUDA_CHECK(cudaMemset(d_pool_by_steps.get(), 0, d_pool_by_steps.size()));
        DeviceArray<unsigned long long> d_counts(std::vector<unsigned long long>{0, 0});
        for (const bool own : {false, true}) {
          cuda::KvWritePlan writes = plan_prefill_writes(own ? lengths : earlier, tables, key_layout, value_layout,
                                                         n_kv_heads, D, sinks, device_row, own ? earlier : std::vector<int>{});
          cuda::KvDecodedRows decoded;
          if (own && quantize_decodes) {
            cuda::route_decoded_rows(plan, writes.runs);
            const cuda::PageScratch first =
                cuda::group_scratch(plan.groups.front(), d_scratch.get(), d_chunk_rows.get(), n_kv_heads, D);
            decoded = {first.keys, first.values, first.n_rows, rotate_keys ? d_rope.get() : nullptr};
          }
          if (own && rotated_band) {
            CUDA_CHECK(cudaMemset(d_rotated_keys.get(), 0xff, d_rotated_keys.size() * 2));
            decoded.rope = d_rope.get();
            decoded.rotated_keys = reinterpret_cast<__half*>(d_rotated_keys.get());
            decoded.n_kv_heads = n_kv_heads;
            run_source.rotated_step_keys = decoded.rotated_keys;
          }
          if (writes.runs.empty()) continue;
          DeviceArray<cuda::KvWriteRun> d_runs(writes.runs);
          DeviceArray<cuda::KvWriteRow> d_rows(writes.rows);
          cuda::launch_kv_quantize(d_pool_by_steps.get(), key_layout, value_layout, device_calib.layer(0), d_runs.get(),
                                   int32_t(writes.runs.size()), d_rows.get(), d_counts.get(), device_sm_count(),
                                   nullptr, ctas, decoded);
          CUDA_CHECK(cudaDeviceSynchronize());
        }
        EXPECT_TRUE(d_pool_by_steps.download() == pool) << what << ": pages written in two steps differ from one";
        run_source.kv.pool = d_pool_by_steps.get();
      }
      cuda::launch_quantized_prefill_groups(query, run_source, d_chunks.get(), d_work.get(), d_chunk_rows.get(),
                                            d_spans.get(), plan.groups, d_scratch.get(), nullptr);
      CUDA_CHECK(cudaDeviceSynchronize());
      return plan;
    };
    // The reference: the decoding producer over the planner's own work list, not regrouped (so a regrouping
    // error cannot be in the reference too).
    {
      DeviceArray<cuda::PrefillWork> d_work(work);
      CUDA_CHECK(cudaMemset(d_out.get(), 0xff, out.size() * 2));
      cuda::launch_quantized_prefill_attention(query, source, d_chunks.get(), d_work.get(), int32_t(work.size()),
                                               nullptr);
      CUDA_CHECK(cudaDeviceSynchronize());
      decoded_out = d_out.download();
    }
    // Cap 0: every group decodes its page tiles (the fallback), regrouped as the backend runs it.
    EXPECT_EQ(run_prefill(0).max_rows, 0) << what;
    compare_prefill_rows(d_out.download(), "scratch cap 0");
    // A cap of the largest chunk's rows less one byte: that chunk decodes, the others read the scratch in groups;
    // then its rows exactly: one group per chunk where two do not fit; then the backend's cap.
    int64_t largest = 0;
    for (int s : prefill_ids) largest = std::max<int64_t>(largest, rule.split(earlier[s] + chunk[s] - 1, earlier[s]));
    const int64_t largest_bytes = cuda::page_scratch_bytes(largest, n_kv_heads, D);
    for (const int64_t cap : {largest_bytes - 1, largest_bytes, cuda::kPageScratchCapBytes}) {
      const cuda::PageScratchPlan plan = run_prefill(cap);
      if (cap == cuda::kPageScratchCapBytes) {
        EXPECT_EQ(plan.groups.size(), 1u) << what;  // the whole step in one launch
      }
      compare_prefill_rows(d_out.download(), "scratch cap " + std::to_string(cap));
    }
    // The backend's plan for these pages: one group, its chunks' own rows stored by the quantize launch. These
    // small steps take head_dim 64's few-run kernel; the 128-thread one (a large step's) is forced once more.
    if (cuda::kv_quantize_decodes_rows(key_layout, value_layout)) {
      std::vector<cuda::KvQuantizeCtas> kernels = {cuda::KvQuantizeCtas::by_launch};
      if (D == 64) kernels.push_back(cuda::KvQuantizeCtas::many_runs);
      for (const cuda::KvQuantizeCtas ctas : kernels) {
        run_prefill(cuda::kPageScratchCapBytes, true, ctas);
        compare_prefill_rows(d_out.download(), std::string("own rows and rotated keys stored by quantize-on-write") +
                                                   (ctas == cuda::KvQuantizeCtas::many_runs ? ", 128-thread CTAs" : ""));
      }
    }
  }
  // 132 multiprocessors (default): splits of the least size (128 keys), so the longest rows get two page splits.
  for (const cuda::QuantizedAttentionPlan& plan :
       cuda::plan_quantized_attention(split_chunks, split_slots, options, page, n_kv_heads, D, shapes.n_sms)) {
    DeviceArray<cuda::AttentionChunk> d_rows(plan.rows);
    DeviceArray<cuda::ExactSource> d_sources(plan.sources);
    DeviceArray<cuda::QuantizedSplit> d_splits(plan.splits);
    DeviceArray<cuda::DecodeChunk> d_combine(plan.combine);
    DeviceArray<uint8_t> d_workspace(
        size_t(cuda::quantized_attention_workspace_bytes(int32_t(plan.splits.size()), n_heads, D)));
    cuda::launch_quantized_attention(query, kv, d_rows.get(), d_sources.get(), d_splits.get(), int32_t(plan.splits.size()),
                                     d_combine.get(), int32_t(plan.rows.size()), d_workspace.get(), nullptr);
  }
  CUDA_CHECK(cudaDeviceSynchronize());
  out = d_out.download();
  EXPECT_EQ(scratch_mismatches, 0) << what;

  // The CPU twin.
  double worst = 0;
  int failures = 0;
  for (int s = 0; s < n_seqs; ++s) {
    const std::vector<int32_t>& pages = tables.pages(s);
    for (int h = 0; h < n_kv_heads; ++h) {
      const int n_keys = earlier[s] + chunk[s];
      // Decoded pages of the sequence, (n_keys rounded up to pages, D) per kind.
      const int n_blocks = (n_keys + page - 1) / page;
      std::vector<float> keys(size_t(n_blocks) * page * D), values(keys.size());
      const HeadCalibration key_calib{calib.key_lo[0].data() + h * D, calib.key_hi[0].data() + h * D,
                                      calib.codebooks[0].data(), 2.5f};
      for (int b = 0; b < n_blocks; ++b) {
        const uint8_t* base = pool.data() + pages[b] * page_bytes;
        key_codec.decode(base + h * key_layout.block_bytes, page, keys.data() + size_t(b) * page * D, key_calib);
        value_codec.decode(base + n_kv_heads * key_layout.block_bytes + h * value_layout.block_bytes, page,
                           values.data() + size_t(b) * page * D, key_calib);
      }
      const bool on_prefill_kernel = shapes.prefill_kernel && chunk[s] > 1;
      // The fragment kernel's page keys: R(p % 16) k against R(p - p % 16)^T q (quantized_fragment_pages).
      const bool fragment_keys = !on_prefill_kernel && cuda::quantized_fragment_pages(kv);
      for (int t = 0; t < chunk[s]; ++t) {
        const int64_t pos = earlier[s] + t;
        const int64_t n_sinks = std::min<int64_t>(sinks, pos + 1);
        const int64_t exact_from = std::clamp<int64_t>(options.exact_from(pos, earlier[s], page), n_sinks, pos + 1);
        // P in fp16 where a row's keys meet the tensor cores (see the file comment): the prefill kernel, or page
        // keys on the page kernel; rows read exactly throughout stay on the exact kernel's fp32.
        const double abs_tolerance = on_prefill_kernel || exact_from > n_sinks ? 1e-3 : 2e-4;
        std::vector<float> k_rows(size_t(pos + 1) * D), v_rows(k_rows.size());
        for (int64_t p = 0; p <= pos; ++p) {
          float* k = k_rows.data() + p * D;
          float* v = v_rows.data() + p * D;
          const bool exact = p < n_sinks || p >= exact_from;
          if (exact) {
            const uint16_t* row = kv_rows[s].data() + size_t(p) * 2 * kv_dim + h * D;
            for (int d = 0; d < D; ++d) k[d] = fp16_to_fp32(row[d]), v[d] = fp16_to_fp32(row[kv_dim + d]);
          } else {
            std::copy_n(keys.data() + p * D, D, k);
            std::copy_n(values.data() + p * D, D, v);
          }
          if (rotate_keys) rope.rotate(k, fragment_keys && !exact ? p % 16 : p);
          if (on_prefill_kernel || !exact) {  // the kernel's tensor-core operands: rotated keys and values in fp16
            for (int d = 0; d < D; ++d) k[d] = round_to_fp16(k[d]), v[d] = round_to_fp16(v[d]);
          }
        }
        for (int g = 0; g < group; ++g) {
          const int head = h * group + g;
          const uint16_t* q = step.data() + size_t(first_row[s] + t) * stride + head * D;
          // The query as the fragment kernel's tile at `base` takes it: rotated by -base, rounded to fp16.
          std::vector<float> q_tile(D);
          const auto rotate_query = [&](int64_t base) {
            for (int i = 0; i < D / 2; ++i) {
              const float a = fp16_to_fp32(q[2 * i]), b = fp16_to_fp32(q[2 * i + 1]);
              const float c = rope.cos(base)[i], sn = rope.sin(base)[i];
              q_tile[2 * i] = round_to_fp16(std::fma(a, c, b * sn));  // the kernel's roundings
              q_tile[2 * i + 1] = round_to_fp16(std::fma(b, c, -(a * sn)));
            }
          };
          std::vector<double> scores(pos + 1);
          double max_score = -1e300;
          for (int64_t p = 0; p <= pos; ++p) {
            const bool tile_query = fragment_keys && p >= n_sinks && p < exact_from;
            if (tile_query && (p % 16 == 0 || p == n_sinks)) rotate_query(p - p % 16);
            double dot = 0;
            for (int d = 0; d < D; ++d) dot += double(tile_query ? q_tile[d] : fp16_to_fp32(q[d])) * k_rows[p * D + d];
            scores[p] = dot / std::sqrt(double(D));
            max_score = std::max(max_score, scores[p]);
          }
          double sum = 0;
          for (double& x : scores) sum += (x = std::exp(x - max_score));
          for (int d = 0; d < D; ++d) {
            double ref = 0;
            for (int64_t p = 0; p <= pos; ++p) ref += scores[p] * v_rows[p * D + d];
            ref /= sum;
            const double gpu = fp16_to_fp32(out[size_t(first_row[s] + t) * q_dim + head * D + d]);
            const double err = std::fabs(gpu - ref);
            worst = std::max(worst, std::isnan(err) ? double(INFINITY) : err);
            if (!(err <= 2e-3 * std::fabs(ref) + abs_tolerance) && ++failures <= 5) {  // NaN fails too
              ADD_FAILURE() << what << ": seq " << s << " pos " << pos << " head " << head << " dim " << d << ": gpu "
                            << gpu << " cpu " << ref;
            }
          }
        }
      }
    }
  }
  EXPECT_EQ(failures, 0) << what;
  std::printf("[ info ] %s: worst abs error %.2e (outliers stored %llu, block full %llu)\n", what.c_str(), worst,
              outlier_counts[0], outlier_counts[1]);
}

TEST(QuantizedAttention, MatchesCpuTwinOnTheSameBytes) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  std::vector<FormatCase> cases;
  for (const char* kv : {"int2", "int3", "int4", "nuq2", "nuq3", "nuq4", "int4-1%", "nuq2-1%", "nuq3-1%", "nuq4-1%"}) {
    cases.push_back({kv});
  }
  cases.push_back({"nuq3-1%", 1, true, true, false});    // --kscale page
  cases.push_back({"nuq3-1%", 1, false, false, false});  // --no-tail
  cases.push_back({"nuq3-1%", 0, true, false, false});
  cases.push_back({"nuq4-1%", 4, true, false, true});    // 4 sinks, --exact-chunk
  for (const char* kv : {"fp8", "q8_0", "q4_0", "kivi2", "kivi4"}) cases.push_back({kv});
  cases.push_back({"q4_0", 1, true, false, true});
  // Page sizes: a stage of several pages (16, 32, 64) or one page of 256; 4 sinks start the page range
  // mid-page; -0.5% leaves fewer slots than the random rows' outliers (blocks full); at -2% and page 64 a
  // 16-row tile of the page kernel holds more than 32 slots (its pair lookup without the warp match).
  cases.push_back({"nuq3-1%", 4, true, false, false, 32});
  cases.push_back({"nuq3-2%", 1, false, false, false, 64});
  cases.push_back({"nuq4-1%", 1, true, false, false, 64});
  cases.push_back({"int3-0.5%", 1, false, false, false, 64});
  cases.push_back({"nuq2-1%", 4, true, true, false, 256});
  cases.push_back({"kivi4", 1, true, false, false, 64});
  cases.push_back({"fp8", 1, true, false, false, 256});
  uint32_t seed = 1;
  for (int head_dim : {64, 128}) {
    for (int group : {1, 3, 8}) {
      for (const FormatCase& c : cases) run_case(c, head_dim, group, seed++);
    }
  }
}

// The prefill kernel over quantized pages (with the split kernel for single rows, as the backend runs them):
// chunks of 1 to 3 query tiles (128 rows) over 1 to 6 key tiles (128 keys), starting at position 0, mid-page
// and past earlier pages; pages of 16, 64 and 256 rows (a band of up to 256 keys: 3 band tiles); every option.
TEST(QuantizedAttention, PrefillKernelMatchesCpuTwin) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  std::vector<FormatCase> cases;
  for (const char* kv : {"int2", "int4", "nuq3", "nuq2-1%", "nuq4-1%", "fp8", "q8_0", "q4_0", "kivi2", "kivi4"}) {
    cases.push_back({kv});
  }
  cases.push_back({"nuq3-1%"});
  cases.push_back({"nuq3-1%", 1, true, true, false});    // --kscale page
  cases.push_back({"nuq3-1%", 1, false, false, false});  // --no-tail
  cases.push_back({"nuq3-1%", 0, true, false, false});
  cases.push_back({"nuq4-1%", 4, true, false, true});    // 4 sinks, --exact-chunk
  cases.push_back({"q4_0", 1, true, false, true});
  Shapes shapes;
  shapes.earlier = {0, 100, 37, 300, 250, 0};
  shapes.chunk = {300, 200, 1, 140, 5, 2};
  shapes.prefill_kernel = true;
  uint32_t seed = 1000;
  for (int head_dim : {64, 128}) {
    for (int group : {1, 3, 8}) {
      for (size_t i = 0; i < cases.size(); ++i) {
        const int pages[3] = {16, 64, 256};
        FormatCase test = cases[i];
        test.page = test.kv.rfind("kivi", 0) == 0 ? 32 * (1 + int(i + group) % 2) : pages[(i + group) % 3];
        run_case(test, head_dim, group, seed++, shapes);
      }
    }
  }
}

// What compute-sanitizer runs on the device (memcheck, racecheck): the prefill kernel over quantized pages with
// page and band tiles, 3 query tiles and 5 or more key tiles (every K/V stage reused), both head_dims.
TEST(QuantizedAttention, SanitizerQuantizedPrefillSmall) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  Shapes shapes;
  shapes.earlier = {300, 0};
  shapes.chunk = {300, 140};
  shapes.prefill_kernel = true;
  run_case({"kivi2", 1, true, false, true, 64}, 64, 3, 8, shapes);
  run_case({"nuq3-1%", 1, true, false, false, 64}, 128, 1, 9, shapes);
}

// ExactRule::split is the planner's clamp of KvCacheOptions::exact_from (host code, runs without a GPU), it
// rises with the position, and a chunk's rows with a band are exactly those from max(chunk start, sinks) on
// when the options have one (what the prefill kernel's tile plan assumes).
TEST(QuantizedAttention, ExactRuleIsTheCpuRule) {
  const std::vector<FormatCase> cases = {{"nuq3-1%"}, {"nuq3-1%", 4, false, false, false}, {"int4", 1, false, true, false},
                                   {"nuq4-1%", 2, true, false, true}, {"nuq2", 0, true, false, false}, {"kivi2"},
                                   {"kivi4", 1, true, false, true}, {"q4_0"}, {"fp8", 1, true, false, true}, {"fp16"}};
  for (const FormatCase& test : cases) {
    const KvCacheOptions options = options_for(test);
    for (int page : {16, 64, 256}) {
      const cuda::ExactRule rule = cuda::exact_rule(options, page);
      for (int start : {0, 1, 5, 63, 64, 300, 1000}) {
        int previous = 0;
        int first_band = -1;
        for (int pos = start; pos < start + 600; ++pos) {
          const int64_t n_sinks = std::min<int64_t>(options.effective_sinks(), pos + 1);
          const int64_t expected = std::clamp<int64_t>(options.exact_from(pos, start, page), n_sinks, pos + 1);
          const int split = rule.split(pos, start);
          ASSERT_EQ(split, expected) << test.kv << " page " << page << " start " << start << " pos " << pos;
          ASSERT_GE(split, previous) << test.kv << " pos " << pos;
          previous = split;
          if (rule.has_band(pos, start) && first_band < 0) first_band = pos;
          if (first_band >= 0) {
            ASSERT_TRUE(rule.has_band(pos, start)) << test.kv << " pos " << pos;  // rows with a band: a suffix
          }
        }
        const bool any = test.tail || test.page_ranges || test.exact_chunk || options.format.native_exact_window() > 0;
        const bool calibrated_only = !test.exact_chunk && options.format.native_exact_window() == 0;
        if (any && !(calibrated_only && !options.format.calibrated())) {
          EXPECT_EQ(first_band, std::max(start, options.effective_sinks())) << test.kv << " start " << start;
        } else {
          EXPECT_EQ(first_band, -1) << test.kv << " start " << start;
        }
      }
    }
  }
}

// Page splits of about 430 keys at head_dim 64 and 1,500 at 128 (the planner filling one multiprocessor's 4 or
// 3 resident blocks), so the page kernel's stages are reused (4 or 12 per split of the longer row, 3 buffers);
// pages of 3 rows (16-key tiles over 6 pages, a lane's next row pages ahead; stages of 129 rows: a partial last
// tile), 24 (tiles across page ends) and 16; 4 sinks (page splits starting mid-page); nuq (codebook) and int (uniform) decoding, and the general
// decode (q4_0, kivi2's 32-row key groups, per-page key ranges). Queries in +-4 make the softmax over these
// long rows peaked enough that one wrong key moves the output past the tolerance.
TEST(QuantizedAttention, LongSplitsReuseEveryStage) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  Shapes shapes;
  shapes.earlier = {3000, 1200};
  shapes.chunk = {1, 1};
  shapes.n_sms = 1;
  shapes.query_range = 4.0f;
  uint32_t seed = 2000;
  for (int head_dim : {64, 128}) {
    for (int group : {1, 3, 8}) {
      run_case({"nuq3-1%", 4, true, false, false, 3}, head_dim, group, seed++, shapes);
      run_case({"int4-1%", 4, true, false, false, 24}, head_dim, group, seed++, shapes);
      run_case({"nuq2-1%", 4, true, false, false, 16}, head_dim, group, seed++, shapes);
      run_case({"q4_0", 4, true, false, false, 16}, head_dim, group, seed++, shapes);
      run_case({"kivi2", 1, true, false, false, 32}, head_dim, group, seed++, shapes);
      run_case({"nuq3-1%", 4, true, true, false, 24}, head_dim, group, seed++, shapes);
    }
  }
}

// The page scratch's plan (host code, runs without a GPU): per prefill chunk, the rows of keys [0, split of its
// last row) in spans that cover them once, in order, inside its group's rows after the group's earlier chunks;
// every query tile's page tiles (keys below its last row's split) lie inside; the work regrouped, each item
// once; groups within the cap; a chunk over the cap alone in a group without rows; chunks without prefill work
// get none. With quantize_decodes, the first group's chunks leave their own keys [start, split) to the quantize
// launch (decoded_end), and route_decoded_rows points the runs of those keys at their rows.
TEST(QuantizedAttention, PageScratchPlanCoversEveryPageTile) {
  const std::vector<FormatCase> cases = {{"nuq3-1%"}, {"nuq3-1%", 4, true, false, false}, {"nuq4-1%", 2, true, false, true},
                                         {"kivi2"}, {"q4_0", 0, true, false, false}};
  const int D = 128, n_kv_heads = 8, page = 64;
  // Chunks: a long prompt's middle chunk, a first chunk, a decode row (no prefill work), a chunk of 2 rows.
  const std::vector<cuda::AttentionChunk> chunks = {{0, 300, 1000, 0}, {300, 129, 0, 20}, {429, 1, 77, 40}, {430, 2, 5, 60}};
  const std::vector<cuda::PrefillWork> work = cuda::plan_prefill(chunks, {0, 1, 3}, D);
  const int64_t row_bytes = cuda::page_scratch_bytes(1, n_kv_heads, D);
  for (const FormatCase& test : cases) {
    const KvCacheOptions options = options_for(test);
    const cuda::ExactRule rule = cuda::exact_rule(options, page);
    std::vector<int64_t> page_keys(chunks.size(), 0);
    for (int c : {0, 1, 3}) page_keys[c] = rule.split(chunks[c].start_pos + chunks[c].n_tokens - 1, chunks[c].start_pos);
    // Caps: the backend's (one group); each chunk's rows (groups split); one below the largest (it decodes).
    const int64_t largest = *std::max_element(page_keys.begin(), page_keys.end());
    for (const int64_t cap : {cuda::kPageScratchCapBytes, largest * row_bytes, largest * row_bytes - 1, int64_t{0}}) {
      for (const bool quantize_decodes : {false, true}) {
        const std::string what = test.kv + " cap " + std::to_string(cap) + (quantize_decodes ? " quantize decodes" : "");
        const cuda::PageScratchPlan plan =
            cuda::plan_page_scratch(chunks, work, rule, n_kv_heads, D, cap, quantize_decodes);
        ASSERT_EQ(plan.chunk_rows.size(), chunks.size()) << what;
        ASSERT_EQ(plan.decoded_end.size(), chunks.size()) << what;
        ASSERT_EQ(plan.work.size(), work.size()) << what;
        if (cap == cuda::kPageScratchCapBytes) {
          EXPECT_EQ(plan.groups.size(), 1u) << what;
        }
        std::vector<int> work_seen(chunks.size(), 0), chunk_groups(chunks.size(), 0);
        int32_t next_work = 0, next_span = 0;
        int64_t max_rows = 0;
        for (const cuda::PageScratchGroup& group : plan.groups) {
          EXPECT_EQ(group.work_begin, next_work) << what;
          EXPECT_EQ(group.span_begin, next_span) << what;
          EXPECT_LT(group.work_begin, group.work_end) << what;
          EXPECT_LE(group.n_rows * row_bytes, cap) << what;
          next_work = group.work_end;
          next_span = group.span_end;
          max_rows = std::max(max_rows, group.n_rows);
          std::vector<bool> in_group(chunks.size(), false);
          for (int32_t w = group.work_begin; w < group.work_end; ++w) {
            ++work_seen[plan.work[w].chunk];
            in_group[plan.work[w].chunk] = true;
          }
          int64_t rows = 0;
          int32_t span = group.span_begin;
          for (int c = 0; c < int(chunks.size()); ++c) {
            if (!in_group[c]) continue;
            ++chunk_groups[c];
            const bool over_cap = page_keys[c] * row_bytes > cap;
            if (over_cap) {
              EXPECT_EQ(group.n_rows, 0) << what << " chunk " << c;  // decoded by the kernel
              continue;
            }
            EXPECT_EQ(plan.chunk_rows[c], rows) << what << " chunk " << c;
            int next = 0;
            for (; span < group.span_end && plan.spans[span].chunk == c; ++span) {
              EXPECT_EQ(plan.spans[span].key_begin, next) << what << " chunk " << c;
              EXPECT_GT(plan.spans[span].key_end, plan.spans[span].key_begin) << what;
              EXPECT_LE(plan.spans[span].key_end - plan.spans[span].key_begin, cuda::kPageScratchSpanRows) << what;
              next = plan.spans[span].key_end;
            }
            const bool decoded = quantize_decodes && &group == &plan.groups.front();
            EXPECT_EQ(next, decoded ? std::min<int64_t>(chunks[c].start_pos, page_keys[c]) : page_keys[c])
                << what << " chunk " << c;
            EXPECT_EQ(plan.decoded_end[c], decoded ? page_keys[c] : 0) << what << " chunk " << c;
            for (const cuda::PrefillWork& w : work) {
              if (w.chunk != c) continue;
              const int q_last =
                  chunks[c].start_pos + std::min(w.q_begin + cuda::prefill_rows_per_tile(D), chunks[c].n_tokens) - 1;
              EXPECT_LE(rule.split(q_last, chunks[c].start_pos), page_keys[c]) << what << " chunk " << c;
            }
            rows += page_keys[c];
          }
          EXPECT_EQ(span, group.span_end) << what;
          if (group.n_rows > 0) {
            EXPECT_EQ(group.n_rows, rows) << what;
          }
        }
        EXPECT_EQ(next_work, int32_t(plan.work.size())) << what;
        EXPECT_EQ(next_span, int32_t(plan.spans.size())) << what;
        // Runs of chunk 0 (positions 1000 on): from its start, across its last page key, and past it.
        const int32_t end0 = plan.decoded_end[0];
        std::vector<cuda::KvWriteRun> runs(3, cuda::KvWriteRun{});
        for (cuda::KvWriteRun& run : runs) run.first_row = cuda::kConsecutiveRows, run.chunk = 0, run.n_rows = 24;
        runs[0].first_pos = 1000;
        runs[1].first_pos = std::max(1000, end0 - 10);
        runs[2].first_pos = std::max(1000, end0);
        cuda::route_decoded_rows(plan, runs);
        for (const cuda::KvWriteRun& run : runs) {
          const int32_t want = std::clamp(end0 - run.first_pos, 0, run.n_rows);
          EXPECT_EQ(run.scratch_rows, want) << what << " run at " << run.first_pos;
          if (want > 0) {
            EXPECT_EQ(run.scratch_row, plan.chunk_rows[0] + run.first_pos) << what;
          }
        }
        EXPECT_EQ(plan.max_rows, max_rows) << what;
        for (int c = 0; c < int(chunks.size()); ++c) {
          const int expected = int(std::count_if(work.begin(), work.end(), [&](const cuda::PrefillWork& w) { return w.chunk == c; }));
          EXPECT_EQ(work_seen[c], expected) << what << " chunk " << c;           // every work item once
          EXPECT_EQ(chunk_groups[c], c == 2 ? 0 : 1) << what << " chunk " << c;  // a chunk in one group
        }
      }
    }
  }
}

// A few cases for compute-sanitizer (memcheck, racecheck): the page kernel's stage barriers and outlier index
// with stages of several pages (16), of two (64) and of one page (256), KIVI's 32-row key groups, exact splits,
// and one long split whose stages reuse every buffer.
TEST(QuantizedAttention, SanitizerSmall) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  run_case({"nuq3-1%", 4, true, false, false, 16}, 64, 3, 101);
  run_case({"nuq4-1%", 1, false, false, false, 64}, 128, 4, 102);
  run_case({"nuq2-1%", 1, true, true, false, 256}, 64, 1, 103);
  run_case({"kivi2"}, 128, 8, 104);
  // One split of ~700 keys: 6 stages through the 3 buffers, so refilling a freed stage runs under the tools.
  Shapes long_split;
  long_split.earlier = {700};
  long_split.chunk = {1};
  long_split.n_sms = 1;
  run_case({"nuq3-1%", 4, true, false, false, 3}, 128, 8, 105, long_split);
}

// The planner alone (host code, runs without a GPU): for every option set, each query row's splits cover
// its keys 0..pos exactly once, in order, each split of one source by the CPU's rule, none longer than the
// planned size, page splits cut at page starts (only the first may start mid-page, after the sinks); rows
// and combine entries line up; launches hold at most kQuantizedRowsPerLaunch rows. Pages of 16 to 256 rows.
TEST(QuantizedAttention, PlanCoversEveryKeyOnceByTheRule) {
  const std::vector<FormatCase> cases = {{"nuq3-1%"}, {"nuq3-1%", 4, false, false, false}, {"int4", 1, false, true, false},
                                   {"nuq4-1%", 2, true, false, true}, {"kivi2"}, {"q4_0"}, {"fp8", 1, true, false, true}};
  for (const int page : {16, 32, 64, 256}) {
    for (const FormatCase& test : cases) {
      const KvCacheOptions options = options_for(test);
      // Chunks: (first_row, n_tokens, start_pos, page_offset); one of 5000 rows forces a second launch.
      const std::vector<cuda::AttentionChunk> chunks = {{0, 1, 0, 0}, {1, 40, 0, 7}, {41, 1, 5000, 9}, {42, 5000, 300, 11},
                                                        {5042, 3, 8190, 30}};
      const std::vector<int32_t> slots = {3, 1, 4, 0, 2};
      const std::vector<cuda::QuantizedAttentionPlan> plans = cuda::plan_quantized_attention(chunks, slots, options, page, 2, 64, 132);
      ASSERT_EQ(plans.size(), 2u) << test.kv;
      size_t chunk = 0;
      int32_t t = 0;
      int64_t longest = 0;
      for (const cuda::QuantizedAttentionPlan& plan : plans) {
        ASSERT_LE(plan.rows.size(), size_t(cuda::kQuantizedRowsPerLaunch));
        ASSERT_EQ(plan.rows.size(), plan.sources.size());
        ASSERT_EQ(plan.rows.size(), plan.combine.size());
        for (size_t r = 0; r < plan.rows.size(); ++r) {
          while (t == chunks[chunk].n_tokens) ++chunk, t = 0;
          const cuda::AttentionChunk& c = chunks[chunk];
          const int64_t pos = int64_t{c.start_pos} + t;
          ASSERT_EQ(plan.rows[r].first_row, c.first_row + t);
          ASSERT_EQ(plan.rows[r].start_pos, pos);
          ASSERT_EQ(plan.rows[r].page_offset, c.page_offset);
          ASSERT_EQ(plan.sources[r].chunk_first_row, c.first_row);
          ASSERT_EQ(plan.sources[r].chunk_start, c.start_pos);
          ASSERT_EQ(plan.sources[r].slot, slots[chunk]);
          const cuda::DecodeChunk& dc = plan.combine[r];
          ASSERT_EQ(dc.chunk, int32_t(r));
          ASSERT_GE(dc.n_splits, 1);
          const int64_t n_sinks = std::min<int64_t>(options.effective_sinks(), pos + 1);
          const int64_t exact_from = std::max(options.exact_from(pos, c.start_pos, page), n_sinks);
          int64_t next = 0;
          for (int32_t k = 0; k < dc.n_splits; ++k) {
            const cuda::QuantizedSplit& split = plan.splits[dc.split_begin + k];
            ASSERT_EQ(split.row, int32_t(r));
            ASSERT_EQ(split.key_begin, next) << test.kv << " pos " << pos;
            ASSERT_LT(split.key_begin, split.key_end);
            const bool exact = split.key_end <= n_sinks || split.key_begin >= exact_from;
            const bool paged = split.key_begin >= n_sinks && split.key_end <= exact_from;
            ASSERT_TRUE(exact != paged) << test.kv << " pos " << pos << ": split straddles a source boundary";
            ASSERT_EQ(split.exact, exact ? 1 : 0) << test.kv << " pos " << pos;
            if (paged && split.key_begin != n_sinks) {
              ASSERT_EQ(split.key_begin % page, 0) << test.kv << " pos " << pos;
            }
            longest = std::max<int64_t>(longest, split.key_end - split.key_begin);
            next = split.key_end;
          }
          ASSERT_EQ(next, pos + 1) << test.kv << " pos " << pos;
          ++t;
        }
      }
      EXPECT_GE(longest, 128) << test.kv;  // rows of 8190 keys are cut, none shorter than needed
    }
  }
}

// The planner's split size for the decode shapes (host code): the page blocks of a step at smollm2-135m 64 x 8192
// (head_dim 64, 3 KV heads) and llama3-8b 16 x 8192 (head_dim 128, 8 KV heads), 132 multiprocessors, fill the
// last of their waves of resident page blocks (page_fragment_kernel's 5 and 3 per multiprocessor) at least 85%;
// splits sized for two
// waves of 8 blocks made 5.2 waves at llama3-8b.
TEST(QuantizedAttention, PlanFillsWholeWaves) {
  struct Shape {
    int rows, head_dim, n_kv_heads, resident;
  };
  // The fragment kernel's resident blocks (nuq3-1% pages): 5 at head_dim 64, 3 at 128.
  for (const Shape& shape : {Shape{64, 64, 3, 5}, Shape{16, 128, 8, 3}}) {
    const KvCacheOptions options = options_for({"nuq3-1%"});
    std::vector<cuda::AttentionChunk> chunks;
    std::vector<int32_t> slots;
    for (int r = 0; r < shape.rows; ++r) {
      chunks.push_back({r, 1, 8191, r * 512});
      slots.push_back(r);
    }
    const auto plans = cuda::plan_quantized_attention(chunks, slots, options, 16, shape.n_kv_heads, shape.head_dim, 132);
    ASSERT_EQ(plans.size(), 1u);
    int64_t page_blocks = 0;
    for (const cuda::QuantizedSplit& split : plans[0].splits) page_blocks += split.exact ? 0 : shape.n_kv_heads;
    const double waves = double(page_blocks) / (shape.resident * 132);
    EXPECT_GE(waves - std::floor(waves - 1e-9), 0.85) << shape.rows << " rows: " << page_blocks << " page blocks, "
                                                      << waves << " waves";
  }
}

}  // namespace
}  // namespace kvq::gputest
