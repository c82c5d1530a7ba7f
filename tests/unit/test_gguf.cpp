// GGUF reader: well-formed files parse to the values written; every kind of
// malformation the issue lists is refused with an error naming the culprit.
#include <gtest/gtest.h>

#include "core/dtypes.h"
#include "core/error.h"
#include "gguf_builder.h"
#include "model/dequant.h"
#include "model/gguf.h"

namespace kvq {
namespace {

using test::GgufBuilder;

std::vector<uint8_t> f32_bytes(const std::vector<float>& v) {
  std::vector<uint8_t> out(v.size() * 4);
  std::memcpy(out.data(), v.data(), out.size());
  return out;
}

// Expects parsing to throw kvq::Error whose message contains `needle`.
void expect_error(const std::vector<uint8_t>& bytes, const std::string& needle) {
  try {
    GgufFile::parse(bytes, "test.gguf");
    ADD_FAILURE() << "no error; expected one mentioning '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Gguf, ParsesEveryValueTypeAndTensorTable) {
  GgufBuilder b;
  b.add_string("general.architecture", "llama");
  b.add_u32("u32", 7);
  b.add_i32("i32", -5);
  b.add_f32("f32", 1.5f);
  b.add_bool("flag", true);
  b.add_u64("u64", 1ull << 40);
  b.add_f64("f64", 0.25);
  b.add_string_array("words", {"a", "bc", ""});
  b.add_i32_array("ints", {1, -2, 3});
  b.add_tensor("w", {4, 2}, 0, f32_bytes({1, 2, 3, 4, 5, 6, 7, 8}));
  b.add_tensor("v", {3}, 0, f32_bytes({9, 10, 11}));
  const auto bytes = b.bytes();
  GgufFile f = GgufFile::parse(bytes, "test.gguf");
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.get_string("general.architecture"), "llama");
  EXPECT_EQ(f.get_uint("u32"), 7u);
  EXPECT_EQ(f.get_int("i32"), -5);
  EXPECT_FLOAT_EQ(static_cast<float>(f.get_float("f32")), 1.5f);
  EXPECT_TRUE(f.get_bool("flag"));
  EXPECT_EQ(f.get_uint("u64"), 1ull << 40);
  EXPECT_DOUBLE_EQ(f.get_float("f64"), 0.25);
  EXPECT_EQ(f.get_string_array("words"), (std::vector<std::string>{"a", "bc", ""}));
  EXPECT_EQ(f.get_int_array("ints"), (std::vector<int64_t>{1, -2, 3}));
  ASSERT_EQ(f.tensors().size(), 2u);
  const GgufTensorInfo& v = f.tensor("v");
  EXPECT_EQ(v.dims, (std::vector<int64_t>{3}));
  std::vector<float> out(3);
  dequantize(v.type, f.tensor_bytes(v), out);
  EXPECT_EQ(out, (std::vector<float>{9, 10, 11}));
  EXPECT_EQ(f.metadata().front().first, "general.architecture");
}

TEST(Gguf, TypedGettersNameTheKey) {
  GgufBuilder b;
  b.add_string("name", "x");
  const auto bytes = b.bytes();
  GgufFile f = GgufFile::parse(bytes, "test.gguf");
  EXPECT_THROW(f.get_uint("name"), Error);
  try {
    f.get_uint("missing.key");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("missing.key"), std::string::npos);
  }
}

TEST(Gguf, RefusesBadMagicAndVersion) {
  GgufBuilder b;
  auto bytes = b.bytes();
  bytes[0] = 'X';
  expect_error(bytes, "bad magic");
  expect_error(GgufBuilder(1).bytes(), "unsupported GGUF version 1");
  expect_error({0x47, 0x47}, "not a GGUF file");
}

TEST(Gguf, RefusesTruncationAnywhere) {
  GgufBuilder b;
  b.add_string("general.architecture", "llama");
  b.add_string_array("words", {"alpha", "beta"});
  b.add_tensor("w", {8}, 0, f32_bytes({1, 2, 3, 4, 5, 6, 7, 8}));
  const auto full = b.bytes();
  for (size_t cut = 0; cut < full.size(); ++cut) {
    std::vector<uint8_t> part(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(cut));
    EXPECT_THROW(GgufFile::parse(part, "cut.gguf"), Error) << "cut at " << cut;
  }
}

TEST(Gguf, RefusesAbsurdCountsAndLengths) {
  {
    GgufBuilder b;
    std::vector<uint8_t> entry = {3, 0, 0, 0, 0, 0, 0, 0, 'k', 'e', 'y', 8, 0, 0, 0};
    for (int k = 0; k < 8; ++k) entry.push_back(0xff);  // string length 2^64-1
    b.add_raw_entry(entry);
    expect_error(b.bytes(), "string length");
  }
  {
    GgufBuilder b;
    std::vector<uint8_t> entry = {3, 0, 0, 0, 0, 0, 0, 0, 'a', 'r', 'r', 9, 0, 0, 0, 4, 0, 0, 0};
    for (int k = 0; k < 8; ++k) entry.push_back(0x7f);  // element count ~2^63
    b.add_raw_entry(entry);
    expect_error(b.bytes(), "'arr'");
  }
  {
    auto bytes = GgufBuilder().bytes();
    std::memset(bytes.data() + 16, 0xff, 8);  // metadata count
    expect_error(bytes, "absurd metadata count");
  }
  {
    auto bytes = GgufBuilder().bytes();
    std::memset(bytes.data() + 8, 0xff, 8);  // tensor count
    expect_error(bytes, "absurd tensor count");
  }
  {
    GgufBuilder b;
    std::vector<uint8_t> entry = {3, 0, 0, 0, 0, 0, 0, 0, 'b', 'a', 'd', 77, 0, 0, 0};
    b.add_raw_entry(entry);
    expect_error(b.bytes(), "unknown value type 77");
  }
}

TEST(Gguf, RefusesBadTensors) {
  {
    GgufBuilder b;
    b.add_tensor("big", {1024}, 0, f32_bytes({1, 2}));  // data shorter than 4 KiB
    expect_error(b.bytes(), "'big'");
  }
  {
    GgufBuilder b;
    b.add_tensor("a", {8}, 0, f32_bytes(std::vector<float>(8)), 0);
    b.add_tensor("b", {8}, 0, f32_bytes(std::vector<float>(16)), 0);
    b.add_tensor("pad", {16}, 0, f32_bytes(std::vector<float>(16)));
    expect_error(b.bytes(), "overlap");
  }
  {
    GgufBuilder b;
    b.add_tensor("odd", {8}, 99, f32_bytes(std::vector<float>(8)));
    expect_error(b.bytes(), "unknown tensor type 99");
  }
  {
    GgufBuilder b;
    b.add_tensor("q", {30}, 8, std::vector<uint8_t>(34));  // Q8_0 needs multiples of 32
    expect_error(b.bytes(), "'q'");
  }
  {
    GgufBuilder b;
    b.add_tensor("huge", {1ull << 41}, 0, {});
    expect_error(b.bytes(), "absurd dimension");
  }
  {
    GgufBuilder b;
    b.add_tensor("x", {4}, 0, f32_bytes({1, 2, 3, 4}));
    b.add_tensor("x", {4}, 0, f32_bytes({1, 2, 3, 4}));
    expect_error(b.bytes(), "appears twice");
  }
  {
    GgufBuilder b;
    b.add_tensor("unaligned", {4}, 0, f32_bytes({1, 2, 3, 4}), 4);
    expect_error(b.bytes(), "not aligned");
  }
  {
    GgufBuilder b;
    b.add_tensor("present", {4}, 0, f32_bytes({1, 2, 3, 4}));
    const auto bytes = b.bytes();
    GgufFile f = GgufFile::parse(bytes, "test.gguf");
    EXPECT_EQ(f.find_tensor("absent"), nullptr);
    EXPECT_THROW(f.tensor("absent"), Error);
  }
}

TEST(Dequant, BlockFormulasOnHandMadeBlocks) {
  // Q4_0 block: d = 0.5, nibble k at element k (low) and k + 16 (high = 15 - k).
  std::vector<uint8_t> q4_0(18);
  const uint16_t half = fp32_to_fp16(0.5f);
  std::memcpy(q4_0.data(), &half, 2);
  for (int k = 0; k < 16; ++k) q4_0[2 + k] = static_cast<uint8_t>(k | ((15 - k) << 4));
  std::vector<float> out(32);
  dequantize(static_cast<uint32_t>(GgufType::Q4_0), q4_0, out);
  for (int k = 0; k < 16; ++k) {
    EXPECT_EQ(out[k], (k - 8) * 0.5f);
    EXPECT_EQ(out[k + 16], (15 - k - 8) * 0.5f);
  }
  // Q4_1 adds the minimum m = -1.
  std::vector<uint8_t> q4_1(20);
  const uint16_t minus_one = fp32_to_fp16(-1.0f);
  std::memcpy(q4_1.data(), &half, 2);
  std::memcpy(q4_1.data() + 2, &minus_one, 2);
  for (int k = 0; k < 16; ++k) q4_1[4 + k] = static_cast<uint8_t>(k | ((15 - k) << 4));
  dequantize(static_cast<uint32_t>(GgufType::Q4_1), q4_1, out);
  for (int k = 0; k < 16; ++k) EXPECT_EQ(out[k], k * 0.5f - 1.0f);
  // Q8_0: int8 times d.
  std::vector<uint8_t> q8(34);
  std::memcpy(q8.data(), &half, 2);
  for (int k = 0; k < 32; ++k) q8[2 + k] = static_cast<uint8_t>(static_cast<int8_t>(k - 16));
  dequantize(static_cast<uint32_t>(GgufType::Q8_0), q8, out);
  for (int k = 0; k < 32; ++k) EXPECT_EQ(out[k], (k - 16) * 0.5f);
  // Unsupported types are named.
  std::vector<float> q5k_out(256);
  try {
    dequantize(static_cast<uint32_t>(GgufType::Q5_K), std::vector<uint8_t>(176), q5k_out);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("Q5_K"), std::string::npos);
  }
}

TEST(Dequant, Q6KSubBlockScalesAndHighBits) {
  // All 6-bit codes 33 (= +1 after the -32 offset) with scale index s = s + 1, d = 0.25:
  // element e lies in sub-block e / 16, so it must equal 0.25 * (e / 16 + 1).
  std::vector<uint8_t> block(210, 0);
  for (int k = 0; k < 128; ++k) block[k] = 0x11;  // low nibbles 1 for both halves
  for (int k = 0; k < 64; ++k) block[128 + k] = 0xaa;  // high 2-bit fields all 2 -> 2 << 4 | 1 = 33
  for (int s = 0; s < 16; ++s) block[192 + s] = static_cast<uint8_t>(s + 1);
  const uint16_t d = fp32_to_fp16(0.25f);
  std::memcpy(block.data() + 208, &d, 2);
  std::vector<float> out(256);
  dequantize(static_cast<uint32_t>(GgufType::Q6_K), block, out);
  for (int e = 0; e < 256; ++e) EXPECT_EQ(out[e], 0.25f * static_cast<float>(e / 16 + 1)) << e;
}

}  // namespace
}  // namespace kvq
