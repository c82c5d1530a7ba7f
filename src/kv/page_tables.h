// KV bookkeeping: which page of the pool holds which token of which sequence.
// Plain C++ with no tensors: backends receive page indices and own the storage.
// A page is owned by at most one sequence; pages return to the free list only
// when their sequence is freed, so a live page is never handed out twice.
#pragma once

#include <cstdint>
#include <map>
#include <vector>

namespace kvq {

struct TokenSlot {
  int32_t page = -1;  // index into the pool
  int32_t slot = -1;  // token row inside the page, 0..page_size-1
};

class PageTables {
 public:
  PageTables(int32_t n_pages, int32_t page_size);

  int32_t page_size() const { return page_size_; }
  int32_t n_pages() const { return static_cast<int32_t>(page_owner_.size()); }
  int32_t n_free_pages() const { return static_cast<int32_t>(free_pages_.size()); }
  int32_t n_used_pages() const { return n_pages() - n_free_pages(); }
  int32_t pages_for_tokens(int64_t n_tokens) const;

  // Registers a new, empty sequence; throws if the id is in use.
  void add_sequence(int32_t seq);
  bool has_sequence(int32_t seq) const { return tables_.count(seq) != 0; }
  // Grows the sequence's capacity to at least n_tokens. All or nothing: returns
  // false and changes nothing when the pool has too few free pages.
  bool reserve(int32_t seq, int64_t n_tokens);
  // Marks n more tokens as written (they must fit the reserved capacity).
  void append(int32_t seq, int64_t n_tokens);
  // Returns the sequence's pages to the pool.
  void free_sequence(int32_t seq);

  int64_t length(int32_t seq) const;    // tokens written
  int64_t capacity(int32_t seq) const;  // tokens reserved
  const std::vector<int32_t>& pages(int32_t seq) const;
  TokenSlot locate(int32_t seq, int64_t position) const;  // position < capacity
  int32_t owner(int32_t page) const { return page_owner_.at(page); }  // -1 when free

 private:
  struct Table {
    std::vector<int32_t> pages;  // (ceil(capacity / page_size)) pool indices in token order
    int64_t length = 0;
  };
  const Table& table(int32_t seq) const;
  Table& table(int32_t seq);

  int32_t page_size_;
  std::vector<int32_t> free_pages_;  // stack; lowest index on top for locality
  std::vector<int32_t> page_owner_;  // (n_pages) sequence id or -1
  std::map<int32_t, Table> tables_;
};

}  // namespace kvq
