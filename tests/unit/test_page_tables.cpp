// Page bookkeeping replayed against a simple model of the truth: random
// interleavings of new sequences (prefill), appends and frees. Every written
// token stamps its slot in a shadow pool; a live token's stamp must survive
// everything that happens after it, so a page handed out twice shows up.
#include <gtest/gtest.h>

#include <map>
#include <random>
#include <set>

#include "core/error.h"
#include "kv/page_tables.h"

namespace kvq {
namespace {

TEST(PageTables, ReserveIsAllOrNothing) {
  PageTables t(4, 16);
  t.add_sequence(1);
  EXPECT_TRUE(t.reserve(1, 40));  // 3 pages
  EXPECT_EQ(t.n_free_pages(), 1);
  t.add_sequence(2);
  EXPECT_FALSE(t.reserve(2, 17));  // needs 2, 1 free: nothing taken
  EXPECT_EQ(t.n_free_pages(), 1);
  EXPECT_EQ(t.capacity(2), 0);
  EXPECT_TRUE(t.reserve(2, 16));
  EXPECT_EQ(t.n_free_pages(), 0);
  t.free_sequence(1);
  EXPECT_EQ(t.n_free_pages(), 3);
  EXPECT_THROW(t.append(2, 17), Error);
  EXPECT_THROW(t.add_sequence(2), Error);
  EXPECT_THROW(t.free_sequence(1), Error);
  EXPECT_THROW(t.locate(2, 16), Error);
}

TEST(PageTables, LocateMapsPositionsThroughThePageList) {
  PageTables t(8, 4);
  t.add_sequence(0);
  t.add_sequence(1);
  ASSERT_TRUE(t.reserve(0, 4));
  ASSERT_TRUE(t.reserve(1, 4));
  ASSERT_TRUE(t.reserve(0, 8));  // second page of seq 0 comes after seq 1's
  TokenSlot a = t.locate(0, 5);
  EXPECT_EQ(a.page, t.pages(0)[1]);
  EXPECT_EQ(a.slot, 1);
  EXPECT_NE(t.pages(0)[1], t.pages(1)[0]);
  EXPECT_EQ(t.owner(t.pages(1)[0]), 1);
}

TEST(PageTables, RandomInterleavingsNeverShareALiveSlot) {
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 20; ++trial) {
    const int32_t n_pages = 1 + static_cast<int32_t>(rng() % 40);
    const int32_t page_size = 1 + static_cast<int32_t>(rng() % 9);
    PageTables tables(n_pages, page_size);
    std::map<int32_t, int64_t> truth;                  // seq -> tokens written
    std::vector<int64_t> shadow(size_t(n_pages) * page_size, -1);  // slot -> stamp (seq << 32 | pos)
    int32_t next_seq = 0;
    for (int op = 0; op < 2000; ++op) {
      const int kind = static_cast<int>(rng() % 3);
      if (kind == 0) {  // prefill a new sequence
        const int32_t seq = next_seq++;
        const int64_t n = 1 + rng() % (3 * page_size + 2);
        tables.add_sequence(seq);
        const int32_t free_before = tables.n_free_pages();
        if (!tables.reserve(seq, n)) {
          EXPECT_LT(free_before, tables.pages_for_tokens(n));
          EXPECT_EQ(tables.n_free_pages(), free_before);
          tables.free_sequence(seq);
          continue;
        }
        truth[seq] = 0;
        for (int64_t pos = 0; pos < n; ++pos) {
          TokenSlot s = tables.locate(seq, pos);
          shadow[size_t(s.page) * page_size + s.slot] = (int64_t{seq} << 32) | pos;
        }
        tables.append(seq, n);
        truth[seq] = n;
      } else if (kind == 1 && !truth.empty()) {  // append one token to a random live sequence
        auto it = std::next(truth.begin(), static_cast<long>(rng() % truth.size()));
        const int32_t seq = it->first;
        if (!tables.reserve(seq, it->second + 1)) continue;
        TokenSlot s = tables.locate(seq, it->second);
        shadow[size_t(s.page) * page_size + s.slot] = (int64_t{seq} << 32) | it->second;
        tables.append(seq, 1);
        ++it->second;
      } else if (kind == 2 && !truth.empty()) {  // free a random sequence
        auto it = std::next(truth.begin(), static_cast<long>(rng() % truth.size()));
        tables.free_sequence(it->first);
        truth.erase(it);
      }
      // Invariants after every operation.
      int32_t pages_owned = 0;
      for (const auto& [seq, length] : truth) {
        ASSERT_EQ(tables.length(seq), length);
        ASSERT_GE(tables.capacity(seq), length);
        ASSERT_EQ(tables.pages(seq).size(), size_t(tables.pages_for_tokens(tables.capacity(seq))));
        pages_owned += static_cast<int32_t>(tables.pages(seq).size());
        for (int32_t page : tables.pages(seq)) ASSERT_EQ(tables.owner(page), seq);
        for (int64_t pos = 0; pos < length; ++pos) {
          TokenSlot s = tables.locate(seq, pos);
          ASSERT_EQ(shadow[size_t(s.page) * page_size + s.slot], (int64_t{seq} << 32) | pos)
              << "live token overwritten: seq " << seq << " pos " << pos;
        }
      }
      ASSERT_EQ(pages_owned + tables.n_free_pages(), n_pages);
    }
  }
}

}  // namespace
}  // namespace kvq
