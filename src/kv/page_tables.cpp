// Page tables over one fixed pool.
#include "kv/page_tables.h"

#include "core/error.h"

namespace kvq {

PageTables::PageTables(int32_t n_pages, int32_t page_size) : page_size_(page_size) {
  if (page_size <= 0) fail("page size must be positive, got {}", page_size);
  if (n_pages <= 0) fail("the KV pool must hold at least one page, got {}", n_pages);
  page_owner_.assign(n_pages, -1);
  free_pages_.reserve(n_pages);
  for (int32_t p = n_pages - 1; p >= 0; --p) free_pages_.push_back(p);
}

int32_t PageTables::pages_for_tokens(int64_t n_tokens) const {
  return static_cast<int32_t>((n_tokens + page_size_ - 1) / page_size_);
}

void PageTables::add_sequence(int32_t seq) {
  if (seq < 0) fail("sequence id {} is negative", seq);
  if (!tables_.emplace(seq, Table{}).second) fail("sequence {} already exists", seq);
}

const PageTables::Table& PageTables::table(int32_t seq) const {
  auto it = tables_.find(seq);
  if (it == tables_.end()) fail("unknown sequence {}", seq);
  return it->second;
}

PageTables::Table& PageTables::table(int32_t seq) {
  return const_cast<Table&>(static_cast<const PageTables*>(this)->table(seq));
}

bool PageTables::reserve(int32_t seq, int64_t n_tokens) {
  Table& t = table(seq);
  int32_t needed = pages_for_tokens(n_tokens) - static_cast<int32_t>(t.pages.size());
  if (needed <= 0) return true;
  if (needed > n_free_pages()) return false;
  for (int32_t k = 0; k < needed; ++k) {
    int32_t page = free_pages_.back();
    free_pages_.pop_back();
    page_owner_[page] = seq;
    t.pages.push_back(page);
  }
  return true;
}

void PageTables::append(int32_t seq, int64_t n_tokens) {
  Table& t = table(seq);
  if (n_tokens < 0 || t.length + n_tokens > capacity(seq)) {
    fail("sequence {}: appending {} tokens to {} exceeds its reserved {}", seq, n_tokens, t.length, capacity(seq));
  }
  t.length += n_tokens;
}

void PageTables::free_sequence(int32_t seq) {
  auto it = tables_.find(seq);
  if (it == tables_.end()) fail("unknown sequence {}", seq);
  // Return in reverse so the next allocation reuses the same pages in order.
  for (auto p = it->second.pages.rbegin(); p != it->second.pages.rend(); ++p) {
    page_owner_[*p] = -1;
    free_pages_.push_back(*p);
  }
  tables_.erase(it);
}

int64_t PageTables::length(int32_t seq) const { return table(seq).length; }

int64_t PageTables::capacity(int32_t seq) const {
  return static_cast<int64_t>(table(seq).pages.size()) * page_size_;
}

const std::vector<int32_t>& PageTables::pages(int32_t seq) const { return table(seq).pages; }

TokenSlot PageTables::locate(int32_t seq, int64_t position) const {
  const Table& t = table(seq);
  if (position < 0 || position >= static_cast<int64_t>(t.pages.size()) * page_size_) {
    fail("sequence {}: position {} is outside its reserved pages", seq, position);
  }
  return {t.pages[position / page_size_], static_cast<int32_t>(position % page_size_)};
}

}  // namespace kvq
