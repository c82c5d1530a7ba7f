// Quantization building blocks: bit packing, element codecs, page codecs of
// every --kv format, outlier slots, weighted k-means, the calibration file and the
// synthetic calibration of --dummy presets.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>

#include "calib/calibration_file.h"
#include "core/dtypes.h"
#include "core/error.h"
#include "kv/kv_format.h"
#include "kv/page_codec.h"
#include "model/dummy_presets.h"
#include "model/llama.h"
#include "quant/kmeans.h"
#include "quant/pack.h"
#include "quant/scalar_codecs.h"

namespace kvq {
namespace {

TEST(Pack, RoundTripsAtEveryAlignmentAndLeavesNeighboursAlone) {
  std::mt19937 rng(1);
  for (int bits : {1, 2, 3, 4, 5, 8}) {
    for (int first = 0; first < 17; ++first) {
      for (int n : {1, 7, 8, 9, 64}) {
        std::vector<uint8_t> codes(n);
        for (auto& c : codes) c = static_cast<uint8_t>(rng() & ((1u << bits) - 1));
        std::vector<uint8_t> stream(packed_bytes(first + n + 8, bits), 0xA5);
        const std::vector<uint8_t> before = stream;
        pack_codes(stream.data(), first, codes.data(), n, bits);
        std::vector<uint8_t> back(n);
        unpack_codes(stream.data(), first, back.data(), n, bits);
        EXPECT_EQ(back, codes) << "bits " << bits << " first " << first << " n " << n;
        // Bits outside [first*bits, (first+n)*bits) keep their old values.
        for (int64_t bit = 0; bit < static_cast<int64_t>(stream.size()) * 8; ++bit) {
          if (bit >= int64_t{first} * bits && bit < int64_t{first + n} * bits) continue;
          ASSERT_EQ((stream[bit / 8] >> (bit % 8)) & 1, (before[bit / 8] >> (bit % 8)) & 1) << "bit " << bit;
        }
      }
    }
  }
}

TEST(Pack, KnownLayout) {
  // 3-bit codes 1..8 (mod 8) little-endian: 001 010 011 100 101 110 111 000.
  const uint8_t codes[8] = {1, 2, 3, 4, 5, 6, 7, 0};
  uint8_t stream[3] = {};
  pack_codes(stream, 0, codes, 8, 3);
  EXPECT_EQ(stream[0], 0b11010001);
  EXPECT_EQ(stream[1], 0b01011000);
  EXPECT_EQ(stream[2], 0b00011111);
}

TEST(E4m3, KnownValuesRoundingAndSaturation) {
  EXPECT_EQ(fp32_to_e4m3(0.0f), 0x00);
  EXPECT_EQ(fp32_to_e4m3(1.0f), 0x38);
  EXPECT_EQ(fp32_to_e4m3(-2.0f), 0xC0);
  EXPECT_EQ(fp32_to_e4m3(448.0f), 0x7E);
  EXPECT_EQ(fp32_to_e4m3(1e6f), 0x7E);        // saturates, never NaN
  EXPECT_EQ(fp32_to_e4m3(INFINITY), 0x7E);
  EXPECT_EQ(fp32_to_e4m3(std::ldexp(1.0f, -9)), 0x01);  // smallest subnormal
  EXPECT_EQ(fp32_to_e4m3(1.0625f), 0x38);     // halfway 1 and 1.125: to even
  EXPECT_EQ(fp32_to_e4m3(1.1875f), 0x3A);     // halfway 1.125 and 1.25: to even (1.25)
  // Every code decodes and re-encodes to itself (NaN excluded).
  for (int code = 0; code < 256; ++code) {
    if ((code & 0x7f) == 0x7f) continue;
    const float x = e4m3_to_fp32(static_cast<uint8_t>(code));
    if (code == 0x80) continue;  // -0 encodes as sign | 0
    EXPECT_EQ(fp32_to_e4m3(x), code) << code << " " << x;
  }
  // Relative error of normals is at most 2^-4.
  std::mt19937 rng(2);
  std::uniform_real_distribution<float> dist(-400.0f, 400.0f);
  for (int i = 0; i < 10000; ++i) {
    const float x = dist(rng);
    if (std::fabs(x) < std::ldexp(1.0f, -6)) continue;
    EXPECT_LE(std::fabs(e4m3_to_fp32(fp32_to_e4m3(x)) - x), std::fabs(x) / 16 + 1e-6f) << x;
  }
}

TEST(GgmlBlocks, Q8AndQ4ErrorsWithinHalfAStep) {
  std::mt19937 rng(3);
  std::normal_distribution<float> dist(0.0f, 2.0f);
  for (int trial = 0; trial < 200; ++trial) {
    float x[kGgmlBlock];
    for (float& v : x) v = dist(rng);
    int8_t q8[kGgmlBlock];
    uint8_t q4[kGgmlBlock];
    uint16_t d8, d4;
    quantize_q8_0_block(x, q8, &d8);
    quantize_q4_0_block(x, q4, &d4);
    float amax = 0;
    for (float v : x) amax = std::max(amax, std::fabs(v));
    for (int j = 0; j < kGgmlBlock; ++j) {
      // Half a step, plus what the fp16 rounding of the scale adds at the largest code.
      EXPECT_LE(std::fabs(q8[j] * fp16_to_fp32(d8) - x[j]), amax / 127 * (0.5f + 127 * 1e-3f));
      EXPECT_LE(q4[j], 15);
      // q4_0 codes span -8d..7d: the side opposite the largest magnitude clamps at 7d, up to a whole step off.
      EXPECT_LE(std::fabs((q4[j] - 8) * fp16_to_fp32(d4) - x[j]), amax / 8 * (1.0f + 8 * 1e-3f) + 1e-6f);
    }
  }
}

TEST(KvFormat, ParsesNamesAndRefusesOthers) {
  const KvFormat f = parse_kv_format("nuq3-1%");
  EXPECT_EQ(f.scheme, KvScheme::nonuniform);
  EXPECT_EQ(f.bits, 3);
  EXPECT_DOUBLE_EQ(f.outlier_fraction, 0.01);
  EXPECT_EQ(f.outlier_label, "1%");
  EXPECT_EQ(parse_kv_format("int2-0.5%").outlier_label, "0.5%");
  EXPECT_EQ(parse_kv_format("kivi2").bits, 2);
  EXPECT_TRUE(parse_kv_format("q4_0").keys_post_rope());
  EXPECT_FALSE(parse_kv_format("int4").keys_post_rope());
  for (const char* bad : {"int5", "nuq3-3%", "fp4", "nuq", "q4_1", "int3-1", ""}) {
    EXPECT_THROW(parse_kv_format(bad), UsageError) << bad;
  }
}

// Random rows with a few large values, and a codebook/range calibration for them.
struct CodecFixture {
  static constexpr int kPage = 64, kHeadDim = 64;
  std::vector<float> rows;                    // (kPage, kHeadDim)
  std::vector<float> key_lo, key_hi;          // (kHeadDim)
  std::vector<float> codebook;                // (16), enough for every width
  CodecFixture() : rows(kPage * kHeadDim), key_lo(kHeadDim), key_hi(kHeadDim) {
    std::mt19937 rng(4);
    std::normal_distribution<float> dist(0.0f, 1.0f);
    for (float& v : rows) v = round_to_fp16(dist(rng));
    rows[5 * kHeadDim + 7] = 25.0f;    // outliers
    rows[40 * kHeadDim + 63] = -30.0f;
    // ~0.3% of N(0, 1) lies outside +-3: within the 1% slots, so every outlier is kept.
    for (int c = 0; c < kHeadDim; ++c) key_lo[c] = -3.0f, key_hi[c] = 3.0f;
  }
  HeadCalibration calibration(int bits) {
    codebook.clear();
    for (int j = 0; j < (1 << bits); ++j) codebook.push_back(-1.0f + (2.0f * j + 1.0f) / (1 << bits));
    return {key_lo.data(), key_hi.data(), codebook.data(), 3.0f};
  }
};

TEST(PageCodec, EveryFormatRoundTripsWithinItsBound) {
  CodecFixture fx;
  const int n = CodecFixture::kPage, hd = CodecFixture::kHeadDim;
  for (const char* name : {"fp16", "int4", "int3", "int2", "nuq4", "nuq3", "nuq2", "int4-1%", "nuq3-1%", "nuq2-2%",
                           "fp8", "q8_0", "q4_0", "kivi2", "kivi4"}) {
    const KvFormat format = parse_kv_format(name);
    for (KvKind kind : {KvKind::key, KvKind::value}) {
      const PageCodec codec(format, kind, n, hd, false);
      std::vector<uint8_t> block(codec.block_bytes(), 0xCD);
      const HeadCalibration calib = fx.calibration(format.bits);
      OutlierCounts counts;
      if (codec.rows_per_group() == 1) {
        for (int r = 0; r < n; ++r) codec.encode(block.data(), r, 1, fx.rows.data() + r * hd, 0, calib, counts);
      } else {
        codec.encode(block.data(), 0, n, fx.rows.data(), 0, calib, counts);
      }
      std::vector<float> out(n * hd);
      codec.decode(block.data(), n, out.data(), calib);
      for (int r = 0; r < n; ++r) {
        const float* x = fx.rows.data() + r * hd;
        float amax = 0, mn = INFINITY, mx = -INFINITY;
        for (int c = 0; c < hd; ++c) amax = std::max(amax, std::fabs(x[c])), mn = std::min(mn, x[c]), mx = std::max(mx, x[c]);
        for (int c = 0; c < hd; ++c) {
          const float err = std::fabs(out[r * hd + c] - x[c]);
          float bound = 0;
          switch (format.scheme) {
            case KvScheme::fp16: bound = 0; break;
            case KvScheme::fp8: bound = std::fabs(x[c]) / 16 + amax / 448 * std::ldexp(1.0f, -9) * 2; break;
            case KvScheme::q8_0: bound = amax / 127 * 0.6f; break;
            case KvScheme::q4_0: bound = amax / 8 * 1.01f; break;
            case KvScheme::kivi: bound = 1e9f; break;  // checked below per group
            case KvScheme::uniform:
            case KvScheme::nonuniform: {
              // Within the range: half a step (uniform) or half the widest codebook gap; outside: clamped
              // unless kept as an outlier.
              const float lo = kind == KvKind::key ? fx.key_lo[c] : mn, hi = kind == KvKind::key ? fx.key_hi[c] : mx;
              const float levels = static_cast<float>((1 << format.bits) - 1);
              const float half_step = format.scheme == KvScheme::uniform ? (hi - lo) / levels / 2
                                                                         : (hi - lo) / 2 * (1.0f / (1 << format.bits) + 1e-3f);
              const bool outside = x[c] < lo || x[c] > hi;
              if (outside && format.outlier_fraction == 0) continue;  // clamped: no bound
              bound = outside ? std::fabs(x[c]) * 1e-3f : half_step * 1.01f + 1e-3f;
              if (kind == KvKind::value) bound = std::max(bound, (hi - lo) / levels);  // range rebuilt from inliers
              break;
            }
          }
          ASSERT_LE(err, bound) << name << (kind == KvKind::key ? " key" : " value") << " row " << r << " ch " << c;
        }
      }
      if (format.outlier_fraction > 0) {
        EXPECT_GE(counts.stored, 2) << name;  // the two planted outliers at least
        EXPECT_EQ(counts.over_capacity, 0) << name;
        EXPECT_EQ(out[5 * hd + 7], 25.0f) << name;
        EXPECT_EQ(out[40 * hd + 63], -30.0f) << name;
      }
    }
  }
}

TEST(PageCodec, KiviGroupsWithinHalfAStep) {
  CodecFixture fx;
  const int n = CodecFixture::kPage, hd = CodecFixture::kHeadDim;
  for (int bits : {2, 4}) {
    const KvFormat format = parse_kv_format(bits == 2 ? "kivi2" : "kivi4");
    const PageCodec keys(format, KvKind::key, n, hd, false);
    std::vector<uint8_t> block(keys.block_bytes());
    OutlierCounts counts;
    keys.encode(block.data(), 0, n, fx.rows.data(), 0, {}, counts);
    std::vector<float> out(n * hd);
    keys.decode(block.data(), n, out.data(), {});
    for (int g = 0; g < n / 32; ++g) {
      for (int c = 0; c < hd; ++c) {
        float mn = INFINITY, mx = -INFINITY;
        for (int r = g * 32; r < g * 32 + 32; ++r) mn = std::min(mn, fx.rows[r * hd + c]), mx = std::max(mx, fx.rows[r * hd + c]);
        const float step = (mx - mn) / ((1 << bits) - 1);
        for (int r = g * 32; r < g * 32 + 32; ++r) {
          ASSERT_LE(std::fabs(out[r * hd + c] - fx.rows[r * hd + c]), step * 0.51f + std::fabs(mx) * 2e-3f + 1e-3f);
        }
      }
    }
  }
}

TEST(PageCodec, OutlierSlotsRoundTripExactlyAndOverflowIsCounted) {
  const int n = 64, hd = 64;
  const KvFormat format = parse_kv_format("int4-1%");  // ceil(0.01 * 4096) = 41 slots per block
  const PageCodec codec(format, KvKind::key, n, hd, false);
  EXPECT_EQ(codec.outlier_capacity(), 41);
  std::vector<float> lo(hd, -1.0f), hi(hd, 1.0f);
  const HeadCalibration calib{lo.data(), hi.data(), nullptr, 0};
  std::vector<float> rows(n * hd, 0.25f);
  // 50 outliers: 41 fit, 9 overflow (clamped to the range).
  for (int i = 0; i < 50; ++i) rows[i * 80 % (n * hd)] = 3.0f + 0.001f * static_cast<float>(i);
  std::vector<uint8_t> block(codec.block_bytes());
  OutlierCounts counts;
  for (int r = 0; r < n; ++r) codec.encode(block.data(), r, 1, rows.data() + r * hd, 0, calib, counts);
  EXPECT_EQ(counts.stored, 41);
  EXPECT_EQ(counts.over_capacity, 9);
  std::vector<float> out(n * hd);
  codec.decode(block.data(), n, out.data(), calib);
  int exact = 0, clamped = 0;
  for (int i = 0; i < n * hd; ++i) {
    if (rows[i] < 2) continue;
    if (out[i] == round_to_fp16(rows[i])) ++exact;
    else if (out[i] == 1.0f) ++clamped;
  }
  EXPECT_EQ(exact, 41);
  EXPECT_EQ(clamped, 9);
  // Re-encoding row 0 starts the page afresh.
  OutlierCounts again;
  codec.encode(block.data(), 0, 1, rows.data(), 0, calib, again);
  EXPECT_EQ(again.stored, 1);  // row 0 holds one outlier (index 0)
}

TEST(PageCodec, ExactRowsTakeNoSlotsAndDoNotWidenRanges) {
  const int n = 64, hd = 64;
  const KvFormat format = parse_kv_format("int4-1%");
  const PageCodec values(format, KvKind::value, n, hd, false);
  std::vector<float> rows(n * hd, 0.5f);
  for (int c = 0; c < hd; ++c) rows[c] = 1000.0f;  // a sink row of huge values
  std::vector<uint8_t> block(values.block_bytes());
  OutlierCounts counts;
  values.encode(block.data(), 0, 2, rows.data(), 1, {nullptr, nullptr, nullptr, 2.0f}, counts);
  EXPECT_EQ(counts.stored, 0);
  std::vector<float> out(2 * hd);
  values.decode(block.data(), 2, out.data(), {});
  EXPECT_EQ(out[hd], 0.5f);
}

TEST(WeightedKmeans, FindsClustersAndFollowsWeights) {
  WeightedHistogram hist;
  std::mt19937 rng(5);
  std::normal_distribution<float> noise(0.0f, 0.01f);
  const float truth[4] = {-0.8f, -0.1f, 0.3f, 0.9f};
  for (int i = 0; i < 40000; ++i) hist.add(truth[i % 4] + noise(rng), 1.0f);
  const std::vector<float> centres = hist.codebook(2);
  ASSERT_EQ(centres.size(), 4u);
  for (int j = 0; j < 4; ++j) EXPECT_NEAR(centres[j], truth[j], 2e-3f);
  // Heavy weight on one point pulls a centre onto it.
  WeightedHistogram weighted;
  for (int i = 0; i < 1000; ++i) weighted.add(-1.0f + 2.0f * static_cast<float>(i) / 999.0f, 1.0f);
  weighted.add(0.5f, 1e6f);
  bool hit = false;
  for (float c : weighted.codebook(2)) hit |= std::fabs(c - 0.5f) < 1e-3f;
  EXPECT_TRUE(hit);
  // Deterministic.
  EXPECT_EQ(hist.codebook(3), hist.codebook(3));
}

TEST(CalibrationFile, RoundTripsByteIdenticallyAndNamesMissingTensors) {
  CalibrationFile file;
  file.metadata = {{"model_fingerprint", "00ff"}, {"seed", "1"}};
  file.tensors["blk.0.k.lo.1%"] = {-1.0f, -2.0f};
  file.tensors["blk.0.k.codebook.2.1%"] = {-0.75f, -0.25f, 0.25f, 0.75f};
  const std::string a = (std::filesystem::temp_directory_path() / "kvq_calib_a.safetensors").string();
  const std::string b = (std::filesystem::temp_directory_path() / "kvq_calib_b.safetensors").string();
  file.save(a);
  CalibrationFile loaded = CalibrationFile::load(a);
  EXPECT_EQ(loaded.metadata, file.metadata);
  EXPECT_EQ(loaded.tensors, file.tensors);
  loaded.save(b);
  auto bytes = [](const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  };
  EXPECT_EQ(bytes(a), bytes(b));
  try {
    loaded.tensor("blk.3.v.codebook.3.1%", 8);
    FAIL() << "missing tensor accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("blk.3.v.codebook.3.1%"), std::string::npos);
  }
  EXPECT_THROW(loaded.tensor("blk.0.k.lo.1%", 3), Error);  // wrong size
  // Truncated file: a clear error, not a crash.
  std::string text = bytes(a);
  std::ofstream(b, std::ios::binary | std::ios::trunc) << text.substr(0, text.size() - 5);
  EXPECT_THROW(CalibrationFile::load(b), Error);
  std::remove(a.c_str());
  std::remove(b.c_str());
}

// The --dummy presets' keys and values are close to N(0, 1); their synthetic calibration must make about the
// format's outlier fraction of such elements outlier candidates (keys outside the range, values past the
// threshold), so quantize-on-write costs what it does with a real calibration; ascending codebooks in [-1, 1].
TEST(CalibrationFile, SyntheticCalibrationTakesTheOutlierFractionOfUnitNormals) {
  const LlamaConfig config = dummy_preset("smollm2-135m");
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> samples(200000);
  for (float& x : samples) x = normal(rng);
  for (const char* name : {"nuq3-1%", "nuq4-0.5%", "int3-2%", "nuq3"}) {
    const KvFormat format = parse_kv_format(name);
    CalibrationFile file;
    const std::vector<LayerCalibration> layers = synthetic_calibration(config, format, file);
    ASSERT_EQ(layers.size(), size_t(config.n_layers)) << name;
    EXPECT_EQ(file.metadata.at("synthetic"), "true");
    const LayerCalibration& layer = layers.back();
    size_t outside = 0, past = 0;
    for (float x : samples) {
      outside += x < layer.key_lo[config.kv_dim() - 1] || x > layer.key_hi[0];
      past += std::fabs(x) > layer.value_threshold;
    }
    const double expected = std::max(format.outlier_fraction, 1e-5);
    const double tolerance = 4 * std::sqrt(expected / samples.size()) + 1e-5;  // 4 sigma of the count, + a sample
    EXPECT_NEAR(double(outside) / samples.size(), expected, tolerance) << name;
    EXPECT_NEAR(double(past) / samples.size(), expected, tolerance) << name;
    if (format.scheme == KvScheme::nonuniform) {
      const std::vector<float> centres(layer.key_codebook, layer.key_codebook + (size_t{1} << format.bits));
      EXPECT_TRUE(std::is_sorted(centres.begin(), centres.end())) << name;
      EXPECT_FLOAT_EQ(centres.front(), -1.0f);
      EXPECT_FLOAT_EQ(centres.back(), 1.0f);
    }
  }
}

}  // namespace
}  // namespace kvq
