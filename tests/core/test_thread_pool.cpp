// SPDX-License-Identifier: Apache-2.0
// thread_pool: parallel_for runs every index exactly once, rethrows the first exception, and the
// pool stays usable (also built under ThreadSanitizer: label tsan).

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <thread>
#include <vector>

#include <kvc/parallel/thread_pool.hpp>

#include "kvc_catch.hpp"

TEST_CASE("parallel_for covers every index exactly once, on several threads", "[parallel]") {
  for (std::int32_t threads : {1, 2, 4}) {
    kvc::thread_pool pool(threads);
    REQUIRE(pool.size() == threads);
    for (std::int32_t n : {0, 1, 2, 7, 1000}) {
      std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
      for (auto& h : hits) h = 0;
      pool.parallel_for(n, [&](std::int32_t i) { hits[static_cast<std::size_t>(i)].fetch_add(1); });
      for (std::int32_t i = 0; i < n; ++i) REQUIRE(hits[static_cast<std::size_t>(i)].load() == 1);
    }
  }
  kvc::thread_pool zero(0);  // clamps to the caller alone
  REQUIRE(zero.size() == 1);
  kvc::thread_pool pool(3);
  std::atomic<int> in_flight{0}, most{0};
  pool.parallel_for(3, [&](std::int32_t) {  // the three tasks meet: they really run at once
    const int now = ++in_flight;
    int m = most.load();
    while (now > m && !most.compare_exchange_weak(m, now)) {}
    for (int spin = 0; spin < 2000 && in_flight.load() < 3; ++spin) std::this_thread::sleep_for(std::chrono::microseconds(100));
    --in_flight;
  });
  REQUIRE(most.load() >= 2);
}

TEST_CASE("parallel_for rethrows a task's exception and the pool is reusable", "[parallel]") {
  kvc::thread_pool pool(4);
  for (int round = 0; round < 50; ++round) {
    std::atomic<int> ran{0};
    REQUIRE_THROWS_WITH(pool.parallel_for(100,
                                          [&](std::int32_t i) {
                                            ++ran;
                                            if (i == 37) throw std::runtime_error("task 37 failed");
                                          }),
                        "task 37 failed");
    REQUIRE(ran.load() == 100);  // the other tasks still ran; nothing is left running
    std::atomic<std::int64_t> sum{0};
    pool.parallel_for(round + 1, [&](std::int32_t i) { sum += i; });
    REQUIRE(sum.load() == static_cast<std::int64_t>(round) * (round + 1) / 2);
  }
  REQUIRE_THROWS_AS(pool.parallel_for(1, [](std::int32_t) { throw kvc::error("x"); }), kvc::error);
}
