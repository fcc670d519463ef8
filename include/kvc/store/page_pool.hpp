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
#include <string>
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
/// (scoped_allocation_fault), the allocate or reserve call with n > 0 number `fail_at` (0-based,
/// counted on that thread over every page_pool) throws kvc::out_of_memory as exhaustion would,
/// pool unchanged. Allocations through a page_pool::reservation are not counted: their pages were
/// set aside by the reserve call, which is where such a call can fail. Uninstalled it costs one
/// thread-local pointer test per allocate call, which already takes a mutex.
struct allocation_fault {
  std::int64_t fail_at = -1;  ///< which allocate call fails; -1: none (count only)
  std::int64_t calls = 0;     ///< allocate and reserve calls with n > 0 seen while installed
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
///
/// Reservations: reserve(n) sets n free pages aside and returns a `page_pool::reservation`; only
/// allocations made through that reservation may take them, so a call that plans its pages,
/// commits one part and allocates for the next part afterwards cannot run out of pages half way
/// (mixed_precision_cache::keep). Unused pages return to the pool when the reservation is
/// destroyed. Every page is in exactly one of three states, and
/// pages_in_use() + reserved_pages() + free_pages() == capacity():
///   - in use (reference count > 0): counted by pages_in_use(), bytes_in_use() and traffic();
///   - reserved (set aside, not yet taken): counted by reserved_pages() only, *not* in use and
///     *not* free; traffic() counts a reserved page when it is taken, not when it is reserved;
///   - free: what a plain allocate (or a new reservation) can take now.
/// Threads: every member may be called concurrently (docs/threading.md); one reservation object
/// must not be used by two threads at once.
class page_pool {
 public:
  class reservation;

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
  /// New pages have reference count 1. Pages set aside by live reservations are not available
  /// here (see reserve).
  void allocate(std::int32_t n, page_id* out, std::int32_t tag = 0) {
    KVC_EXPECTS_IN("kvc::page_pool::allocate", n >= 0, "n = ", n, ", expected >= 0 pages");
    KVC_EXPECTS_IN("kvc::page_pool::allocate", tag >= 0 && tag < num_tags(), "tag = ", tag, ", expected 0..",
                   num_tags() - 1);
    injected_failure("kvc::page_pool::allocate", n);
    std::lock_guard<std::mutex> lock(mu_);
    if (static_cast<std::size_t>(n) > free_.size() - reserved_)
      detail::fail<out_of_memory>(detail::concat("kvc::page_pool::allocate: ", n, " pages requested, ",
                                                 free_.size() - reserved_, " free of ", capacity_, reserved_note(),
                                                 "; raise the pool capacity or compress the cache"));
    take(n, out, tag);
  }

  page_id allocate(std::int32_t tag = 0) {
    page_id p;
    allocate(1, &p, tag);
    return p;
  }

  /// Sets n free pages aside for allocations made through the returned reservation, all or none:
  /// n > free_pages() throws kvc::out_of_memory and the pool is unchanged. Reserved pages are
  /// neither in use nor free (class comment). The pool must outlive the reservation. For
  /// testing::allocation_fault, reserve with n > 0 counts as an allocate call (it is where a
  /// reserving call can fail); allocations through the reservation never fail that way.
  reservation reserve(std::int32_t n);

  /// Pages set aside by live reservations and not yet taken through them.
  std::int32_t reserved_pages() const noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<std::int32_t>(reserved_);
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

  /// The tag a live page was allocated with: the layer whose bytes_in_use(tag) counts it, also
  /// while other layers or sequences share it.
  std::int32_t tag(page_id p) const noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    return tag_of_[p];
  }
  std::int32_t ref_count(page_id p) const noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    return refs_[p];
  }
  /// Pages a plain allocate (or reserve) can take now: reserved pages are not counted.
  std::int32_t free_pages() const noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<std::int32_t>(free_.size() - reserved_);
  }
  /// Pages with a reference count > 0 (reserved pages are not in use until taken).
  std::int32_t pages_in_use() const noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    return capacity_ - static_cast<std::int32_t>(free_.size());
  }
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

  /// testing::allocation_fault: the installed fault's numbered call with n > 0 throws.
  static void injected_failure(const char* who, std::int32_t n) {
    if (testing::allocation_fault* f = testing::current_allocation_fault(); f != nullptr && n > 0)
      if (f->calls++ == f->fail_at)
        detail::fail<out_of_memory>(detail::concat(who, ": n = ", n,
                                                   " pages requested; injected failure (testing::allocation_fault)"));
  }
  /// " (k more reserved)" when live reservations hold pages, for the exhaustion messages (mu_ held).
  std::string reserved_note() const {
    return reserved_ ? detail::concat(" (", reserved_, " more reserved)") : std::string();
  }
  /// Takes n pages off the free list (the caller holds mu_ and has checked there are enough).
  void take(std::int32_t n, page_id* out, std::int32_t tag) noexcept {
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
  std::size_t reserved_ = 0;  // pages of free_ set aside by live reservations (<= free_.size())
};

/// n free pages of one page_pool set aside (page_pool::reserve): allocate() through it takes
/// them and cannot run out (nor fail by testing::allocation_fault) while it has enough left;
/// destruction (or reset()) returns the pages not taken to the pool's free pages. Movable, not
/// copyable; a default-constructed reservation holds nothing. Not synchronised: one thread at a
/// time per reservation (the pool itself is locked).
class page_pool::reservation {
 public:
  reservation() noexcept = default;
  reservation(reservation&& o) noexcept : pool_(o.pool_), left_(o.left_) {
    o.pool_ = nullptr;
    o.left_ = 0;
  }
  reservation& operator=(reservation&& o) noexcept {
    if (this != &o) {
      reset();
      pool_ = o.pool_;
      left_ = o.left_;
      o.pool_ = nullptr;
      o.left_ = 0;
    }
    return *this;
  }
  reservation(const reservation&) = delete;
  reservation& operator=(const reservation&) = delete;
  ~reservation() { reset(); }

  /// Pages still set aside (reserved and not yet taken).
  std::int32_t size() const noexcept { return left_; }
  /// The pool the pages are reserved in (null when empty-constructed or moved from).
  const page_pool* pool() const noexcept { return pool_; }

  /// Takes n of the reserved pages (reference count 1, tag `tag`), all or none. n > size() is the
  /// caller's error: throws kvc::error, nothing taken.
  void allocate(std::int32_t n, page_id* out, std::int32_t tag = 0) {
    KVC_EXPECTS_IN("kvc::page_pool::reservation::allocate", n >= 0 && n <= left_, "n = ", n,
                   ", expected 0..", left_, " (the pages left in this reservation)");
    if (n == 0) return;
    KVC_EXPECTS_IN("kvc::page_pool::reservation::allocate", tag >= 0 && tag < pool_->num_tags(), "tag = ", tag,
                   ", expected 0..", pool_->num_tags() - 1);
    std::lock_guard<std::mutex> lock(pool_->mu_);
    KVC_ASSERT(pool_->reserved_ >= static_cast<std::size_t>(n) && pool_->free_.size() >= pool_->reserved_);
    pool_->reserved_ -= static_cast<std::size_t>(n);
    left_ -= n;
    pool_->take(n, out, tag);
  }
  page_id allocate(std::int32_t tag = 0) {
    page_id p;
    allocate(1, &p, tag);
    return p;
  }

  /// Returns the pages not taken to the pool; the reservation is then empty.
  void reset() noexcept {
    if (pool_ != nullptr && left_ > 0) {
      std::lock_guard<std::mutex> lock(pool_->mu_);
      KVC_ASSERT(pool_->reserved_ >= static_cast<std::size_t>(left_));
      pool_->reserved_ -= static_cast<std::size_t>(left_);
    }
    pool_ = nullptr;
    left_ = 0;
  }

 private:
  friend class page_pool;
  reservation(page_pool* pool, std::int32_t n) noexcept : pool_(pool), left_(n) {}
  page_pool* pool_ = nullptr;
  std::int32_t left_ = 0;
};

inline page_pool::reservation page_pool::reserve(std::int32_t n) {
  KVC_EXPECTS_IN("kvc::page_pool::reserve", n >= 0, "n = ", n, ", expected >= 0 pages");
  if (n == 0) return reservation(this, 0);
  injected_failure("kvc::page_pool::reserve", n);
  std::lock_guard<std::mutex> lock(mu_);
  const std::size_t avail = free_.size() - reserved_;
  if (static_cast<std::size_t>(n) > avail)
    detail::fail<out_of_memory>(detail::concat("kvc::page_pool::reserve: ", n, " pages requested, ", avail, " free of ",
                                               capacity_, reserved_note(),
                                               ", expected n <= the free pages; raise the pool capacity or compress "
                                               "the cache"));
  reserved_ += static_cast<std::size_t>(n);
  return reservation(this, n);
}

KVC_END_NAMESPACE
