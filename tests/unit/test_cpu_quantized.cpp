// The CPU backend with quantized pages. Two kinds of checks:
// - where the options make every read exact (sinks covering the prompt, one
//   chunk with --exact-chunk, a page or KIVI window longer than the prompt),
//   logits equal the fp16 path's: this exercises the exact-row bookkeeping and
//   the stored-to-exact correction of attention (tolerance 2e-4: exact values
//   enter as P.V_stored + P.(V_exact - V_stored), whose cancellation leaves
//   ~1e-4 of fp32 rounding when V_stored is coarse);
// - a query's view of the cache depends on its position only, so prefilling in
//   one chunk, in several, or token by token gives the same last-token logits
//   in every format (tolerance 2e-4: which positions enter through the
//   corrections depends on where query blocks start; 5e-4 token by token,
//   whose projections are GEMVs), which exercises
//   sealing of grouped codecs across steps and the exact window's ring.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include <fmt/format.h>

#include "cpu/cpu_backend.h"
#include "kv/page_tables.h"
#include "tiny_model.h"

namespace kvq {
namespace {

using testing::random_ids;
using testing::random_weights;
using testing::tiny_config;

// Chunks of other sizes are other GEMM shapes: another summation order in every projection, which the
// exact-read corrections amplify. OpenBLAS picks its kernels by CPU: on an AVX-512 host (2026-11-27) kivi2's
// ragged chunks moved the logits by 2.04e-4 where the earlier hosts stayed under 2e-4. A query that saw a wrong
// key would move them by ~1e-2 (the int2 check below).
constexpr double kCorrectionTolerance = 3e-4;
// Single-token steps use GEMV instead of GEMM: another summation order in every
// projection, amplified by the exact-read corrections.
constexpr double kDecodeTolerance = 5e-4;

// Synthetic calibration: wide key ranges, evenly spaced codebooks, threshold 2.5 rms.
struct SyntheticCalibration {
  std::vector<float> lo, hi, codebook;
  std::vector<LayerCalibration> layers;
  SyntheticCalibration(const LlamaConfig& c, int bits) : lo(c.kv_dim(), -4.0f), hi(c.kv_dim(), 4.0f) {
    for (int j = 0; j < (1 << bits); ++j) codebook.push_back(-1.0f + (2.0f * j + 1.0f) / (1 << bits));
    for (int l = 0; l < c.n_layers; ++l) layers.push_back({lo.data(), hi.data(), codebook.data(), codebook.data(), 2.5f});
  }
};

KvCacheOptions options_for(const std::string& name, const SyntheticCalibration& calib) {
  KvCacheOptions o;
  o.format = parse_kv_format(name);
  if (o.format.calibrated()) o.calibration = calib.layers;
  return o;
}

// Last-token logits after feeding `ids` in steps of the given sizes.
std::vector<float> run_in_steps(const LlamaConfig& c, const LlamaWeights& w, const KvCacheOptions& options,
                                const std::vector<int32_t>& ids, const std::vector<int>& steps, int page) {
  PageTables tables(64, page);
  CpuBackend backend(c, w, 64, page, options);
  // A decoy sequence first, so the real one's pages are not the first in the pool.
  tables.add_sequence(1);
  EXPECT_TRUE(tables.reserve(1, page * 3));
  tables.add_sequence(7);
  EXPECT_TRUE(tables.reserve(7, static_cast<int64_t>(ids.size())));
  std::vector<float> logits;
  int64_t pos = 0;
  for (int n : steps) {
    StepBatch batch;
    batch.add_chunk(7, pos, ids.data() + pos, n, false);
    backend.forward(batch, tables, logits);
    tables.append(7, n);
    pos += n;
  }
  EXPECT_EQ(pos, static_cast<int64_t>(ids.size()));
  return logits;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0;
  for (size_t k = 0; k < a.size(); ++k) worst = std::max(worst, std::fabs(double(a[k]) - b[k]));
  return worst;
}

TEST(CpuQuantized, AllExactReadsEqualFp16) {
  const LlamaConfig c = tiny_config(32);
  const LlamaWeights w = random_weights(c, 11);
  std::mt19937 rng(12);
  const std::vector<int32_t> ids = random_ids(rng, 40, c.vocab);
  const SyntheticCalibration calib(c, 3);
  const std::vector<float> fp16 = run_in_steps(c, w, options_for("fp16", calib), ids, {40}, 16);

  KvCacheOptions sinks_cover = options_for("nuq3-1%", calib);
  sinks_cover.sinks = 40;
  EXPECT_LE(max_abs_diff(run_in_steps(c, w, sinks_cover, ids, {40}, 16), fp16), kCorrectionTolerance);

  KvCacheOptions exact_chunk = options_for("int2", calib);
  exact_chunk.exact_chunk = true;
  EXPECT_LE(max_abs_diff(run_in_steps(c, w, exact_chunk, ids, {40}, 16), fp16), kCorrectionTolerance);

  KvCacheOptions tail = options_for("int3", calib);
  tail.tail = true;  // one page of 64 holds the whole prompt: all of it is the unsealed tail
  EXPECT_LE(max_abs_diff(run_in_steps(c, w, tail, ids, {40}, 64), fp16), kCorrectionTolerance);

  // Post-RoPE formats keep exact rows rotated, then rounded to fp16 (fp16 pages: rounded, then
  // rotated), so they agree with each other exactly and with fp16 to the rounding's effect.
  KvCacheOptions q4_exact_chunk = options_for("q4_0", calib);
  q4_exact_chunk.exact_chunk = true;
  const std::vector<float> post_rope_exact = run_in_steps(c, w, q4_exact_chunk, ids, {40}, 64);
  EXPECT_LE(max_abs_diff(post_rope_exact, fp16), 3e-2);
  // KIVI reads its newest 128 tokens exactly.
  EXPECT_LE(max_abs_diff(run_in_steps(c, w, options_for("kivi2", calib), ids, {40}, 32), post_rope_exact),
            kCorrectionTolerance);

  // And quantization without those options does change the logits.
  EXPECT_GT(max_abs_diff(run_in_steps(c, w, options_for("int2", calib), ids, {40}, 16), fp16), 1e-2);
}

TEST(CpuQuantized, ChunkingDoesNotChangeWhatAQuerySees) {
  const LlamaConfig c = tiny_config(32);
  const LlamaWeights w = random_weights(c, 13);
  std::mt19937 rng(14);
  const int n = 170;  // > KIVI's 128-token window, several pages of 32
  const std::vector<int32_t> ids = random_ids(rng, n, c.vocab);
  const SyntheticCalibration calib(c, 3);
  std::vector<int> token_by_token(n, 1);
  std::vector<int> ragged_chunks = {50, 3, 77};
  ragged_chunks.push_back(n - 130);
  struct Case {
    const char* format;
    bool tail, kscale_page;
  };
  for (const Case& k : {Case{"int4-1%", false, false}, Case{"nuq3-1%", false, false}, Case{"nuq2", true, false},
                        Case{"nuq3-1%", false, true}, Case{"kivi2", false, false}, Case{"q8_0", false, false},
                        Case{"int3", true, true}}) {
    KvCacheOptions o = options_for(k.format, calib);
    o.tail = k.tail;
    o.per_page_key_ranges = k.kscale_page;
    const std::string what = fmt::format("{} tail {} kscale page {}", k.format, k.tail, k.kscale_page);
    const std::vector<float> whole = run_in_steps(c, w, o, ids, {n}, 32);
    EXPECT_LE(max_abs_diff(run_in_steps(c, w, o, ids, ragged_chunks, 32), whole), kCorrectionTolerance) << what;
    EXPECT_LE(max_abs_diff(run_in_steps(c, w, o, ids, token_by_token, 32), whole), kDecodeTolerance) << what;
  }
}

TEST(CpuQuantized, FreedSequenceStateIsDroppedAndBitsCountIt) {
  const LlamaConfig c = tiny_config(32);
  const LlamaWeights w = random_weights(c, 15);
  const SyntheticCalibration calib(c, 3);
  KvCacheOptions o = options_for("nuq3-1%", calib);
  o.sinks = 2;
  o.tail = true;
  CpuBackend backend(c, w, 8, 32, o);
  // Sinks (2) and the tail window (one page of 32) in fp16, per layer, K and V.
  EXPECT_EQ(backend.kv_bytes_per_sequence(), int64_t{2 + 32} * c.n_layers * 2 * c.kv_dim() * 2);
  KvCacheOptions fp16;
  CpuBackend plain(c, w, 8, 32, fp16);
  EXPECT_EQ(plain.kv_bytes_per_sequence(), 0);
  EXPECT_EQ(plain.kv_bytes_per_page(), int64_t{c.n_layers} * 2 * c.kv_dim() * 32 * 2);
}

}  // namespace
}  // namespace kvq
