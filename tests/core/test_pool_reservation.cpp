// SPDX-License-Identifier: Apache-2.0
// page_pool::reserve and page_pool::reservation: n free pages set aside that only allocations
// through the reservation may take. Checked against an independent count kept here (a model of
// which page ids are live, per tag, how many are reserved, and the traffic in pages): after every
// operation the pool's free_pages, reserved_pages, pages_in_use, bytes_in_use (total and per tag)
// and traffic must equal the model, and pages_in_use + reserved_pages + free_pages == capacity.
// Also: exhaustion and precondition messages (call, value, expectation), destruction / reset /
// move returning the unused pages, allocation_fault counting reserve but not reservation
// allocations, and the quant_cache overloads that take a reservation.

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <utility>
#include <vector>

#include <kvc/quant/int8.hpp>
#include <kvc/store/page_pool.hpp>
#include <kvc/store/quant_cache.hpp>

#include "cache_builders.hpp"
#include "kvc_catch.hpp"
#include "random.hpp"

namespace {

/// The independent count: live pages (id -> tag), pages reserved per reservation slot, traffic.
struct pool_model {
  std::int32_t capacity, tags;
  std::size_t page_bytes;
  std::map<kvc::page_id, std::int32_t> live;  // allocated page -> tag (reference counts stay 1 here)
  std::int64_t reserved = 0;
  std::uint64_t allocated = 0, released = 0;

  std::int64_t free() const { return capacity - static_cast<std::int64_t>(live.size()) - reserved; }

  void require_equal(const kvc::page_pool& p) const {
    REQUIRE(p.capacity() == capacity);
    REQUIRE(p.free_pages() == free());
    REQUIRE(p.reserved_pages() == reserved);
    REQUIRE(p.pages_in_use() == static_cast<std::int32_t>(live.size()));
    REQUIRE(p.pages_in_use() + p.reserved_pages() + p.free_pages() == p.capacity());
    REQUIRE(p.bytes_in_use() == live.size() * page_bytes);  // reserved pages are not in use
    for (std::int32_t t = 0; t < tags; ++t) {
      std::size_t n = 0;
      for (const auto& kv : live) n += kv.second == t ? 1 : 0;
      REQUIRE(p.bytes_in_use(t) == n * page_bytes);
    }
    const kvc::memory_traffic tr = p.traffic();
    REQUIRE(tr.bytes_allocated == allocated * page_bytes);  // a reserved page counts when taken
    REQUIRE(tr.bytes_released == released * page_bytes);
    for (const auto& kv : live) REQUIRE(p.ref_count(kv.first) == 1);
  }
  void took(const std::vector<kvc::page_id>& ids, std::int32_t tag) {
    for (kvc::page_id id : ids) {
      REQUIRE(id >= 0);
      REQUIRE(id < capacity);
      REQUIRE(live.count(id) == 0);  // a page handed out twice would be a leak or a double use
      live[id] = tag;
    }
    allocated += ids.size();
  }
  void gave_back(kvc::page_id id) {
    REQUIRE(live.erase(id) == 1);
    ++released;
  }
};

}  // namespace

TEST_CASE("page_pool::reserve: reserved pages are set aside, neither in use nor free", "[store][pool][reserve]") {
  kvc::page_pool pool(100, 10, 2);
  pool_model m{10, 2, 128, {}, 0, 0, 0};
  m.require_equal(pool);
  {
    auto r = pool.reserve(4);
    m.reserved = 4;
    REQUIRE(r.size() == 4);
    REQUIRE(r.pool() == &pool);
    m.require_equal(pool);  // free 6, reserved 4, in use 0: no bytes and no traffic yet
    // Plain allocations cannot take the reserved pages.
    std::vector<kvc::page_id> a(6);
    pool.allocate(6, a.data(), 0);
    m.took(a, 0);
    m.require_equal(pool);
    kvc::page_id one = -7;
    REQUIRE_THROWS_AS(pool.allocate(1, &one), kvc::out_of_memory);
    REQUIRE_THROWS_WITH(pool.allocate(1, &one), Catch::Contains("kvc::page_pool::allocate: 1 pages requested, 0 free of 10 (4 more reserved)"));
    REQUIRE(one == -7);
    m.require_equal(pool);
    // The reservation can: its pages are there whatever else was allocated.
    std::vector<kvc::page_id> b(3);
    r.allocate(3, b.data(), 1);
    m.reserved = 1;
    m.took(b, 1);
    REQUIRE(r.size() == 1);
    m.require_equal(pool);
    // Releasing a taken page makes it free (not reserved again).
    pool.release(b[0]);
    m.gave_back(b[0]);
    m.require_equal(pool);
    REQUIRE(pool.free_pages() == 1);
    for (kvc::page_id p : a) {
      pool.release(p);
      m.gave_back(p);
    }
    m.require_equal(pool);
  }
  // The reservation's unused page went back on destruction.
  m.reserved = 0;
  m.require_equal(pool);
  REQUIRE(pool.free_pages() == 8);
}

TEST_CASE("page_pool::reserve: exhaustion and preconditions name the call, the value and the expectation",
          "[store][pool][reserve]") {
  kvc::page_pool pool(64, 8, 2);
  std::vector<kvc::page_id> a(3);
  pool.allocate(3, a.data());
  auto r = pool.reserve(2);
  // 3 in use, 2 reserved, 3 free.
  REQUIRE_THROWS_AS(pool.reserve(4), kvc::out_of_memory);
  REQUIRE_THROWS_WITH(pool.reserve(4), Catch::Contains("kvc::page_pool::reserve: 4 pages requested, 3 free of 8 (2 more reserved)") &&
                                           Catch::Contains("expected n <= the free pages"));
  REQUIRE(pool.free_pages() == 3);
  REQUIRE(pool.reserved_pages() == 2);
  REQUIRE_THROWS_WITH(pool.reserve(-1), Catch::Contains("kvc::page_pool::reserve: n = -1, expected >= 0"));
  REQUIRE_THROWS_AS(pool.reserve(-1), kvc::error);
  // Taking more than the reservation holds is the caller's error, nothing taken.
  std::vector<kvc::page_id> b(3, -7);
  REQUIRE_THROWS_AS(r.allocate(3, b.data()), kvc::error);
  REQUIRE_THROWS_WITH(r.allocate(3, b.data()),
                      Catch::Contains("kvc::page_pool::reservation::allocate: n = 3, expected 0..2 (the pages left in "
                                      "this reservation)"));
  REQUIRE_THROWS_WITH(r.allocate(-1, b.data()), Catch::Contains("n = -1, expected 0..2"));
  REQUIRE_THROWS_WITH(r.allocate(1, b.data(), 2), Catch::Contains("kvc::page_pool::reservation::allocate: tag = 2, expected 0..1"));
  REQUIRE(b == std::vector<kvc::page_id>(3, -7));
  REQUIRE(r.size() == 2);
  REQUIRE(pool.reserved_pages() == 2);
  REQUIRE(pool.pages_in_use() == 3);
  // An empty (default-constructed or spent) reservation takes nothing.
  kvc::page_pool::reservation none;
  REQUIRE(none.size() == 0);
  REQUIRE(none.pool() == nullptr);
  REQUIRE_THROWS_WITH(none.allocate(1, b.data()), Catch::Contains("n = 1, expected 0..0"));
  none.allocate(0, b.data());  // n = 0 is fine
  auto zero = pool.reserve(0);
  REQUIRE(zero.size() == 0);
  REQUIRE(zero.pool() == &pool);
  REQUIRE(pool.reserved_pages() == 2);
  // Everything may be reserved; the plain allocate then says how many are reserved.
  auto rest = pool.reserve(3);
  REQUIRE(pool.free_pages() == 0);
  REQUIRE_THROWS_WITH(pool.reserve(1), Catch::Contains("1 pages requested, 0 free of 8 (5 more reserved)"));
  rest.reset();
  REQUIRE(rest.size() == 0);
  REQUIRE(rest.pool() == nullptr);
  REQUIRE(pool.free_pages() == 3);
  pool.release(3, a.data());
}

TEST_CASE("page_pool::reservation: moves transfer the pages, destruction and reset return the unused ones",
          "[store][pool][reserve]") {
  kvc::page_pool pool(64, 12);
  std::vector<kvc::page_id> got;
  {
    auto r1 = pool.reserve(5);
    kvc::page_pool::reservation r2(std::move(r1));
    REQUIRE(r1.size() == 0);  // NOLINT(bugprone-use-after-move): moved-from is empty by contract
    REQUIRE(r1.pool() == nullptr);
    REQUIRE(r2.size() == 5);
    REQUIRE(pool.reserved_pages() == 5);
    got.push_back(r2.allocate());
    REQUIRE(pool.reserved_pages() == 4);
    auto r3 = pool.reserve(2);
    REQUIRE(pool.reserved_pages() == 6);
    r3 = std::move(r2);  // r3's own 2 pages go back first
    REQUIRE(pool.reserved_pages() == 4);
    REQUIRE(r3.size() == 4);
    r3 = std::move(r3);  // self-move keeps the pages  NOLINT
    REQUIRE(r3.size() == 4);
    REQUIRE(pool.reserved_pages() == 4);
    got.push_back(r3.allocate());
  }
  REQUIRE(pool.reserved_pages() == 0);
  REQUIRE(pool.pages_in_use() == 2);
  REQUIRE(pool.free_pages() == 10);
  pool.release(2, got.data());
  REQUIRE(pool.free_pages() == 12);
  REQUIRE(pool.traffic().bytes_allocated == 2 * 64);
  REQUIRE(pool.traffic().bytes_released == 2 * 64);
}

TEST_CASE("page_pool::reserve: random operations keep the accounting exact against an independent count",
          "[store][pool][reserve]") {
  for (int trial = 0; trial < 20; ++trial) {
    kvc_test::rng r(7100 + trial);
    const std::int32_t cap = r.integer(1, 40), tags = r.integer(1, 3);
    kvc::page_pool pool(static_cast<std::size_t>(r.integer(1, 300)), cap, tags);
    pool_model m{cap, tags, pool.page_bytes(), {}, 0, 0, 0};
    std::vector<std::unique_ptr<kvc::page_pool::reservation>> res;
    INFO("trial " << trial << ", capacity " << cap);
    for (int step = 0; step < 300; ++step) {
      const int op = r.integer(0, 4);
      if (op == 0) {  // plain allocate, all or nothing
        const std::int32_t n = r.integer(0, 6), tag = r.integer(0, tags - 1);
        std::vector<kvc::page_id> ids(static_cast<std::size_t>(n));
        if (n > m.free()) {
          REQUIRE_THROWS_AS(pool.allocate(n, ids.data(), tag), kvc::out_of_memory);
        } else {
          pool.allocate(n, ids.data(), tag);
          m.took(ids, tag);
        }
      } else if (op == 1) {  // reserve
        const std::int32_t n = r.integer(0, 5);
        if (n > m.free()) {
          REQUIRE_THROWS_AS(pool.reserve(n), kvc::out_of_memory);
        } else {
          res.push_back(std::make_unique<kvc::page_pool::reservation>(pool.reserve(n)));
          m.reserved += n;
        }
      } else if (op == 2 && !res.empty()) {  // take through a reservation
        auto& rv = *res[static_cast<std::size_t>(r.integer(0, static_cast<std::int32_t>(res.size()) - 1))];
        const std::int32_t n = r.integer(0, rv.size() + 1), tag = r.integer(0, tags - 1);
        std::vector<kvc::page_id> ids(static_cast<std::size_t>(n));
        if (n > rv.size()) {
          REQUIRE_THROWS_AS(rv.allocate(n, ids.data(), tag), kvc::error);
        } else {
          rv.allocate(n, ids.data(), tag);
          m.reserved -= n;
          m.took(ids, tag);
        }
      } else if (op == 3 && !res.empty()) {  // drop a reservation
        const std::size_t i = static_cast<std::size_t>(r.integer(0, static_cast<std::int32_t>(res.size()) - 1));
        m.reserved -= res[i]->size();
        res.erase(res.begin() + static_cast<std::ptrdiff_t>(i));
      } else if (op == 4 && !m.live.empty()) {  // release a live page
        auto it = m.live.begin();
        std::advance(it, r.integer(0, static_cast<std::int32_t>(m.live.size()) - 1));
        const kvc::page_id p = it->first;
        pool.release(p);
        m.gave_back(p);
      }
      m.require_equal(pool);
    }
    res.clear();
    m.reserved = 0;
    m.require_equal(pool);
    for (const auto& kv : std::map<kvc::page_id, std::int32_t>(m.live)) {
      pool.release(kv.first);
      m.gave_back(kv.first);
    }
    m.require_equal(pool);
    REQUIRE(pool.free_pages() == cap);
  }
}

TEST_CASE("page_pool::reserve: allocation_fault counts reserve calls, not allocations through a reservation",
          "[store][pool][reserve][strong]") {
  kvc::page_pool pool(64, 8);
  kvc::testing::allocation_fault f;
  f.fail_at = 1;
  kvc::testing::scoped_allocation_fault guard(f);
  auto r = pool.reserve(3);  // call 0
  REQUIRE(f.calls == 1);
  auto none = pool.reserve(0);  // n = 0: not counted
  REQUIRE(f.calls == 1);
  std::vector<kvc::page_id> ids(3);
  r.allocate(3, ids.data());  // never fails, not counted
  REQUIRE(f.calls == 1);
  REQUIRE_THROWS_WITH(pool.reserve(2), Catch::Contains("kvc::page_pool::reserve: n = 2 pages requested; injected failure"));
  REQUIRE(f.calls == 2);
  REQUIRE(pool.reserved_pages() == 0);
  REQUIRE(pool.pages_in_use() == 3);
  pool.release(3, ids.data());
}

TEST_CASE("quant_cache: append / keep / keep_layer taking pages from a reservation", "[quant][reserve]") {
  using C = kvc::quant_cache<kvc::quant::int8>;
  C c(kvc_test::shape_as<kvc::quant_cache_config>(kvc_test::cache_shape(1, 2, 16, 8, 16)));
  kvc_test::rng r(77);
  const auto s = c.add_sequence();
  auto k = r.normals(20 * 2 * 16), v = r.normals(k.size());
  {
    auto res = c.reserve_quant_pages(6);  // 20 tokens x 2 heads in pages of 8: 3 pages per head
    REQUIRE(c.quant_pool().free_pages() == 10);
    c.append(s, 0, k.data(), v.data(), 20, nullptr, res);
    REQUIRE(res.size() == 0);
    REQUIRE(c.quant_pool().pages_in_use() == 6);
  }
  const auto f = c.fork(s);
  std::vector<float> before(20 * 16), after(before.size());
  c.gather(s, 0, 0, before.data());
  const std::size_t bytes = c.bytes_in_use();
  // Wrong reservations are refused before anything changes.
  kvc::page_pool other(64, 4);
  auto foreign = other.reserve(2);
  const std::vector<std::int32_t> kept = {0, 2, 4, 9, 19};
  REQUIRE_THROWS_WITH(c.keep(f, 0, 0, kept.data(), 5, foreign),
                      Catch::Contains("kvc::quant_cache::keep: quant_pages = a reservation of another pool, expected one "
                                      "of this cache's quant_pool()"));
  kvc::page_pool::reservation empty;
  REQUIRE_THROWS_WITH(c.keep_layer(f, 0, {kept, kept}, empty),
                      Catch::Contains("kvc::quant_cache::keep_layer: quant_pages = a reservation of no pool"));
  // Too few reserved pages: out_of_memory naming the call, the need and what was reserved.
  auto few = c.reserve_quant_pages(1);
  REQUIRE_THROWS_AS(c.keep_layer(f, 0, {kept, kept}, few), kvc::out_of_memory);
  REQUIRE_THROWS_WITH(c.keep_layer(f, 0, {kept, kept}, few),
                      Catch::Contains("kvc::quant_cache::keep_layer: needs 2 quantized pages and quant_pages has 1 reserved"));
  REQUIRE(few.size() == 1);
  REQUIRE(c.length(f, 0, 0) == 20);
  REQUIRE(c.bytes_in_use() == bytes);
  few.reset();
  // Enough: the copy-on-write pages come from the reservation; the parent is untouched.
  auto enough = c.reserve_quant_pages(6);
  REQUIRE(c.quant_pool().free_pages() == 4);
  c.keep_layer(f, 0, {kept, kept}, enough);
  REQUIRE(enough.size() == 4);  // one page per head was shared and changed
  REQUIRE(c.length(f, 0, 1) == 5);
  c.gather(s, 0, 0, after.data());
  REQUIRE(after == before);
  enough.reset();
  REQUIRE(c.quant_pool().reserved_pages() == 0);
  c.remove_sequence(f);
  c.remove_sequence(s);
  REQUIRE(c.bytes_in_use() == 0);
}
