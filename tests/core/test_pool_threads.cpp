// SPDX-License-Identifier: Apache-2.0
// page_pool from several threads at once: allocations never hand one page to two owners,
// retain/release keep exact counts, exhaustion under contention throws kvc::out_of_memory and
// loses nothing. Built alone under ThreadSanitizer by scripts/test (label tsan).

#include <atomic>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include <kvc/store/page_pool.hpp>

#include "kvc_catch.hpp"
#include "random.hpp"

TEST_CASE("page_pool: concurrent allocate/release never shares a page and loses none", "[store][pool][threads]") {
  constexpr std::int32_t threads = 4, capacity = 64, rounds = 400;
  kvc::page_pool pool(64, capacity, threads);
  std::atomic<int> failures{0}, ooms{0};
  std::vector<std::thread> ts;
  for (std::int32_t w = 0; w < threads; ++w) {
    ts.emplace_back([&, w] {
      kvc_test::rng r(static_cast<std::uint64_t>(500 + w));
      std::vector<kvc::page_id> mine;
      for (int i = 0; i < rounds; ++i) {
        const std::int32_t n = r.integer(1, 12);
        std::vector<kvc::page_id> got(static_cast<std::size_t>(n));
        try {
          pool.allocate(n, got.data(), w);
        } catch (const kvc::out_of_memory&) {
          ++ooms;
          got.clear();
        }
        for (kvc::page_id p : got) {  // stamp the page: an owner is alone with it
          std::memset(pool.data(p), w + 1, pool.page_bytes());
          mine.push_back(p);
        }
        for (kvc::page_id p : mine)
          for (std::size_t b = 0; b < pool.page_bytes(); b += 8)
            if (static_cast<int>(pool.data(p)[b]) != w + 1) ++failures;
        if (!mine.empty() && r.coin(0.3)) {  // share one page with ourselves and drop it again
          pool.retain(1, &mine.front());
          if (pool.ref_count(mine.front()) != 2) ++failures;
          pool.release(mine.front());
        }
        const std::int32_t drop = r.integer(0, static_cast<std::int32_t>(mine.size()));
        pool.release(drop, mine.data());
        mine.erase(mine.begin(), mine.begin() + drop);
      }
      if (pool.bytes_in_use(w) != mine.size() * pool.page_bytes()) ++failures;
      pool.release(static_cast<std::int32_t>(mine.size()), mine.data());
    });
  }
  for (auto& t : ts) t.join();
  REQUIRE(failures.load() == 0);
  REQUIRE(pool.free_pages() == capacity);
  REQUIRE(pool.bytes_in_use() == 0);
  for (std::int32_t w = 0; w < threads; ++w) REQUIRE(pool.bytes_in_use(w) == 0);
  for (kvc::page_id p = 0; p < capacity; ++p) REQUIRE(pool.ref_count(p) == 0);
  WARN("out_of_memory under contention: " << ooms.load() << " times");
}

TEST_CASE("page_pool: concurrent retain/release of shared pages keeps exact counts", "[store][pool][threads]") {
  kvc::page_pool pool(64, 16);
  std::vector<kvc::page_id> shared(8);
  pool.allocate(8, shared.data());
  std::vector<std::thread> ts;
  for (int w = 0; w < 4; ++w)
    ts.emplace_back([&] {
      for (int i = 0; i < 2000; ++i) {
        pool.retain(8, shared.data());
        pool.release(8, shared.data());
      }
    });
  for (auto& t : ts) t.join();
  for (kvc::page_id p : shared) REQUIRE(pool.ref_count(p) == 1);
  REQUIRE(pool.free_pages() == 8);
  pool.release(8, shared.data());
  REQUIRE(pool.free_pages() == 16);
}
