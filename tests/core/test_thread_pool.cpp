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

// Concurrent callers: the contract (docs/threading.md) is that calls from different threads take
// turns on the whole pool. Each caller checks its own exact result, so a call that lost indices to
// another (job_ or count_ overwritten mid-run) fails here even without ThreadSanitizer.
TEST_CASE("parallel_for from several threads at once: every call completes exactly", "[parallel][threads]") {
  kvc::thread_pool pool(3);
  constexpr int callers = 4, rounds = 200;
  std::atomic<int> wrong{0};
  std::vector<std::thread> ts;
  for (int c = 0; c < callers; ++c)
    ts.emplace_back([&, c] {
      for (int r = 0; r < rounds; ++r) {
        const std::int32_t n = 1 + (c * 37 + r * 11) % 64;
        std::vector<int> hits(static_cast<std::size_t>(n), 0);  // plain ints: each index written once
        pool.parallel_for(n, [&](std::int32_t i) { hits[static_cast<std::size_t>(i)] += c + 1; });
        for (int h : hits)
          if (h != c + 1) ++wrong;
      }
    });
  for (auto& t : ts) t.join();
  REQUIRE(wrong.load() == 0);
}

TEST_CASE("parallel_for called from inside its own task runs inline and completes", "[parallel][threads]") {
  kvc::thread_pool pool(4);
  constexpr std::int32_t outer = 8, inner = 16;
  std::vector<std::atomic<int>> hits(static_cast<std::size_t>(outer * inner));
  for (auto& h : hits) h = 0;
  std::atomic<int> wrong_thread{0};
  pool.parallel_for(outer, [&](std::int32_t i) {
    const auto me = std::this_thread::get_id();
    pool.parallel_for(inner, [&](std::int32_t j) {
      if (std::this_thread::get_id() != me) ++wrong_thread;  // nested: inline on the task's thread
      hits[static_cast<std::size_t>(i * inner + j)].fetch_add(1);
    });
  });
  for (auto& h : hits) REQUIRE(h.load() == 1);
  REQUIRE(wrong_thread.load() == 0);
  // A nested call that throws propagates through the outer call, and the pool stays usable.
  REQUIRE_THROWS_WITH(pool.parallel_for(4,
                                        [&](std::int32_t) {
                                          pool.parallel_for(3, [](std::int32_t j) {
                                            if (j == 2) throw std::runtime_error("inner 2");
                                          });
                                        }),
                      "inner 2");
  std::atomic<int> after{0};
  pool.parallel_for(50, [&](std::int32_t) { ++after; });
  REQUIRE(after.load() == 50);
}

TEST_CASE("parallel_for: pool A's task calls pool B whose task calls A again (no deadlock)", "[parallel][threads]") {
  kvc::thread_pool a(3), b(3);
  std::atomic<int> leaves{0};
  // Two engine threads also share A at the same time.
  auto body = [&] {
    a.parallel_for(4, [&](std::int32_t) {
      b.parallel_for(4, [&](std::int32_t) { a.parallel_for(5, [&](std::int32_t) { ++leaves; }); });
    });
  };
  std::thread other(body);
  body();
  other.join();
  REQUIRE(leaves.load() == 2 * 4 * 4 * 5);
}
