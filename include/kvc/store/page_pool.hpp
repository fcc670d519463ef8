// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `page_pool`: one arena of fixed-size pages with O(1) allocation and release, reference counts
/// for shared prefixes, and per-tag byte counters so memory accounting is read from the pool
/// rather than computed from ratios.

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <kvc/error.hpp>

KVC_BEGIN_NAMESPACE

using page_id = std::int32_t;

/// Pool traffic since construction, in bytes: what one call allocated and released is the
/// difference of two readings (bytes_in_use after = before + allocated - released). Both are
/// needed: a keep can copy shared pages (after fork) while it frees emptied ones, and their net
/// difference alone cannot say either.
struct memory_traffic {
  std::uint64_t bytes_allocated = 0;
  std::uint64_t bytes_released = 0;
  memory_traffic& operator+=(const memory_traffic& o) noexcept {
    bytes_allocated += o.bytes_allocated;
    bytes_released += o.bytes_released;
    return *this;
  }
};

namespace testing {

/// Test-only fault injection for the strong-guarantee tests. While one is installed on a thread
/// (scoped_allocation_fault), the allocate call with n > 0 number `fail_at` (0-based, counted on
/// that thread over every page_pool) throws kvc::out_of_memory as exhaustion would, pool
/// unchanged. Uninstalled it costs one thread-local pointer test per allocate call, which already
/// takes a mutex.
struct allocation_fault {
  std::int64_t fail_at = -1;  ///< which allocate call fails; -1: none (count only)
  std::int64_t calls = 0;     ///< allocate calls with n > 0 seen while installed
};

inline allocation_fault*& current_allocation_fault() noexcept {
  static thread_local allocation_fault* f = nullptr;
  return f;
}

/// Installs `f` on this thread for the scope (restoring the previous one after).
class scoped_allocation_fault {
 public:
  explicit scoped_allocation_fault(allocation_fault& f) noexcept : prev_(current_allocation_fault()) {
    current_allocation_fault() = &f;
  }
  ~scoped_allocation_fault() { current_allocation_fault() = prev_; }
  scoped_allocation_fault(const scoped_allocation_fault&) = delete;
  scoped_allocation_fault& operator=(const scoped_allocation_fault&) = delete;

 private:
  allocation_fault* prev_;
};

}  // namespace testing

/// A fixed-capacity pool of equally sized pages. All members are safe to call from several
/// threads; page *contents* are the caller's to synchronise.
/// Threads: every member may be called concurrently (docs/threading.md).
class page_pool {
 public:
  /// Alignment of every page: a cache line, and enough for any SIMD load kvc issues.
  static constexpr std::size_t alignment = 64;
  /// Arenas of at least this size are aligned to it and advised to use transparent huge pages.
  static constexpr std::size_t huge_page = std::size_t{2} << 20;

  /// \param page_bytes  bytes per page, > 0 (rounded up to a multiple of `alignment`)
  /// \param capacity    pages, > 0 and < 2^31. The arena is reserved at once; the OS commits
  ///                    memory only as pages are first written.
  /// \param num_tags    number of accounting tags (e.g. layers); every page carries one
  page_pool(std::size_t page_bytes, std::int32_t capacity, std::int32_t num_tags = 1)
      : page_bytes_(round_up(page_bytes)), capacity_(capacity) {
    KVC_EXPECTS(page_bytes > 0, "page_bytes = ", page_bytes, ", expected > 0");
    KVC_EXPECTS(capacity > 0, "capacity = ", capacity, ", expected > 0 pages");
    KVC_EXPECTS(num_tags > 0, "num_tags = ", num_tags, ", expected > 0");
    const std::size_t total = page_bytes_ * static_cast<std::size_t>(capacity);
    KVC_EXPECTS(total / page_bytes_ == static_cast<std::size_t>(capacity), "page_bytes * capacity overflows");
    // Large arenas are 2 MiB aligned and asked for transparent huge pages: decode attention
    // streams whole pages, and 4 KiB TLB misses cost 1.55x on fp16 32k decode (bench_decode,
    // 3.6 -> 5.5 GB/s in one process on the 2-core dev VM, 2026-11). Where THP is off this is a no-op.
    const std::size_t align = total >= huge_page ? huge_page : alignment;
    const std::size_t reserved = (total + align - 1) / align * align;
    void* p = std::aligned_alloc(align, reserved);
    if (!p) detail::fail<out_of_memory>(detail::concat("kvc::page_pool: cannot reserve ", reserved, " bytes"));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (align == huge_page) (void)::madvise(p, reserved, MADV_HUGEPAGE);
#endif
    arena_.reset(static_cast<std::byte*>(p));
    refs_.assign(static_cast<std::size_t>(capacity), 0);
    tag_of_.assign(static_cast<std::size_t>(capacity), 0);
    tag_pages_.assign(static_cast<std::size_t>(num_tags), 0);
    free_.reserve(static_cast<std::size_t>(capacity));
    for (std::int32_t i = capacity - 1; i >= 0; --i) free_.push_back(i);  // low ids first
  }

  page_pool(const page_pool&) = delete;
  page_pool& operator=(const page_pool&) = delete;

  std::size_t page_bytes() const noexcept { return page_bytes_; }
  std::int32_t capacity() const noexcept { return capacity_; }
  std::int32_t num_tags() const noexcept { return static_cast<std::int32_t>(tag_pages_.size()); }

  std::byte* data(page_id p) noexcept { return arena_.get() + static_cast<std::size_t>(p) * page_bytes_; }
  const std::byte* data(page_id p) const noexcept {
    return arena_.get() + static_cast<std::size_t>(p) * page_bytes_;
  }
  /// Base of the arena: page p starts at base() + p * page_bytes().
  std::byte* base() noexcept { return arena_.get(); }
  const std::byte* base() const noexcept { return arena_.get(); }

  /// Takes n pages, all or none: on exhaustion throws kvc::out_of_memory and the pool is unchanged.
  /// New pages have reference count 1.
  void allocate(std::int32_t n, page_id* out, std::int32_t tag = 0) {
    KVC_EXPECTS(n >= 0, "n = ", n, ", expected >= 0");
    KVC_EXPECTS(tag >= 0 && tag < num_tags(), "tag = ", tag, ", expected 0..", num_tags() - 1);
    if (testing::allocation_fault* f = testing::current_allocation_fault(); f != nullptr && n > 0)
      if (f->calls++ == f->fail_at)
        detail::fail<out_of_memory>(detail::concat("kvc::page_pool::allocate: ", n,
                                                   " pages requested; injected failure (testing::allocation_fault)"));
    std::lock_guard<std::mutex> lock(mu_);
    if (static_cast<std::size_t>(n) > free_.size())
      detail::fail<out_of_memory>(detail::concat("kvc::page_pool::allocate: ", n, " pages requested, ",
                                                 free_.size(), " free of ", capacity_,
                                                 "; raise the pool capacity or compress the cache"));
    for (std::int32_t i = 0; i < n; ++i) {
      const page_id p = free_.back();
      free_.pop_back();
      refs_[p] = 1;
      tag_of_[p] = tag;
      out[i] = p;
    }
    tag_pages_[tag] += n;
    allocated_ += static_cast<std::uint64_t>(n);
  }

  page_id allocate(std::int32_t tag = 0) {
    page_id p;
    allocate(1, &p, tag);
    return p;
  }

  /// Adds a reference to each page (a forked sequence now shares them).
  void retain(std::int32_t n, const page_id* pages) noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    for (std::int32_t i = 0; i < n; ++i) {
      KVC_ASSERT(refs_[pages[i]] > 0);
      ++refs_[pages[i]];
    }
  }

  /// Drops a reference from each page; pages reaching zero return to the free list at once.
  void release(std::int32_t n, const page_id* pages) noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    for (std::int32_t i = 0; i < n; ++i) {
      const page_id p = pages[i];
      KVC_ASSERT(refs_[p] > 0);
      if (--refs_[p] == 0) {
        free_.push_back(p);
        --tag_pages_[tag_of_[p]];
        ++released_;
      }
    }
  }
  void release(page_id p) noexcept { release(1, &p); }

  std::int32_t ref_count(page_id p) const noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    return refs_[p];
  }
  std::int32_t free_pages() const noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<std::int32_t>(free_.size());
  }
  std::int32_t pages_in_use() const noexcept { return capacity_ - free_pages(); }
  std::size_t bytes_in_use() const noexcept { return static_cast<std::size_t>(pages_in_use()) * page_bytes_; }
  /// Bytes of pages handed out and returned to the free list since construction (shared pages
  /// count when allocated and when their last reference goes).
  memory_traffic traffic() const noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    return {allocated_ * page_bytes_, released_ * page_bytes_};
  }
  /// Bytes of the live pages that were allocated with `tag`.
  std::size_t bytes_in_use(std::int32_t tag) const noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<std::size_t>(tag_pages_[tag]) * page_bytes_;
  }

 private:
  static std::size_t round_up(std::size_t b) noexcept { return (b + alignment - 1) / alignment * alignment; }
  struct free_deleter {
    void operator()(std::byte* p) const noexcept { std::free(p); }
  };

  std::size_t page_bytes_;
  std::int32_t capacity_;
  std::unique_ptr<std::byte, free_deleter> arena_;
  mutable std::mutex mu_;
  std::vector<page_id> free_;
  std::vector<std::int32_t> refs_;
  std::vector<std::int32_t> tag_of_;
  std::vector<std::int64_t> tag_pages_;
  std::uint64_t allocated_ = 0, released_ = 0;  // pages, since construction
};

KVC_END_NAMESPACE
