// SPDX-License-Identifier: Apache-2.0
// Every failure path of kv_cache leaves the cache exactly as it was (the strong guarantee): a
// snapshot of all streams' data, positions, page ids, tokens seen, every page's reference count
// and the pool's counters is taken before the failing call and compared after it. Each error
// message names the argument and its value.

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <kvc/store/kv_cache.hpp>

#include "cache_checks.hpp"
#include "kvc_catch.hpp"
#include "random.hpp"

namespace {

constexpr std::int32_t H = 2, D = 4, P = 4;

/// Sequence a: layer 0 holds 7 tokens (a partial last page), layer 1 holds 4 (one full page);
/// b is a fork of a (all pages shared); c is a filler that leaves exactly `free` pages free.
template <class T>
struct fixture {
  kvc::kv_cache<T> cache;
  kvc::seq_id a, b, c;
  std::vector<kvc::seq_id> all;
  kvc_test::rng r{300};
  explicit fixture(std::int32_t free) : cache(config(free)) {
    a = cache.add_sequence();
    const auto k = r.normals(2 * P * H * D), v = r.normals(2 * P * H * D);
    cache.append(a, 0, k.data(), v.data(), 7);
    cache.append(a, 1, k.data(), v.data(), 4);
    b = cache.fork(a);
    c = cache.add_sequence();
    // The filler takes H pages per prefill of P tokens; config() leaves room for exactly two.
    cache.append(c, 0, k.data(), v.data(), 2 * P);
    REQUIRE(cache.pool().free_pages() == free);
    all = {a, b, c};
  }
  static kvc::cache_config config(std::int32_t free) {
    kvc::cache_config cfg;
    cfg.num_layers = 2;
    cfg.num_kv_heads = H;
    cfg.head_dim = D;
    cfg.page_size = P;
    cfg.max_pages = 6 + 2 * H + free;  // a and b: 6 pages; filler: 2*H pages
    return cfg;
  }
  kvc_test::cache_snapshot snap() const { return kvc_test::snapshot(cache, all); }
};

std::vector<float> rows(std::int32_t n, kvc_test::rng& r) { return r.normals(static_cast<std::size_t>(n) * H * D); }

}  // namespace

// Each check: take a snapshot, make the call throw, compare.
#define KVC_REQUIRE_UNCHANGED_THROWS(fx, call, exc, text)      \
  do {                                                         \
    const auto before_ = (fx).snap();                          \
    REQUIRE_THROWS_AS(call, exc);                              \
    REQUIRE_THROWS_WITH(call, Catch::Contains(text));          \
    REQUIRE((fx).snap() == before_);                           \
  } while (0)

TEST_CASE("pool exhausted: append, keep, rewrite and copy-on-write change nothing", "[store][errors]") {
  SECTION("append needing a copy of a shared partial page plus new pages (4 needed, 3 free)") {
    fixture<float> fx(3);
    const auto k = rows(2, fx.r), v = rows(2, fx.r);
    KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.append(fx.a, 0, k.data(), v.data(), 2), kvc::out_of_memory,
                                 "4 pages requested, 3 free");
  }
  SECTION("append of a new page on every head (2 needed, 1 free): no head gets one") {
    fixture<float> fx(1);
    const auto k = rows(1, fx.r), v = rows(1, fx.r);
    KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.append(fx.a, 1, k.data(), v.data(), 1), kvc::out_of_memory,
                                 "2 pages requested, 1 free");
  }
  SECTION("keep on a forked sequence whose pages must be copied") {
    fixture<float> fx(0);
    const std::int32_t kept[] = {1, 2, 5};
    KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.keep(fx.b, 0, 1, kept, 3), kvc::out_of_memory, "pages requested");
    const std::vector<std::vector<std::int32_t>> layer = {{0, 1, 2, 3, 4, 5, 6}, {0, 3}};
    KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.keep_layer(fx.a, 0, layer), kvc::out_of_memory, "pages requested");
  }
  SECTION("rewrite_keys on a forked sequence") {
    fixture<float> fx(1);
    bool called = false;
    KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.rewrite_keys(fx.b, 0, 0, [&](std::int32_t, float*) { called = true; }),
                                 kvc::out_of_memory, "pages requested");
    REQUIRE_FALSE(called);
  }
  SECTION("rewind of a forked sequence needs no page, so it works with none free") {
    fixture<float> fx(0);
    const auto other = kvc_test::snapshot(fx.cache, {fx.a, fx.c});
    const auto bytes = fx.cache.bytes_in_use();
    fx.cache.rewind(fx.b, 0, 5);  // inside the shared partial page: it stays shared
    fx.cache.rewind(fx.b, 1, 0);  // the whole stream: its shared page is released by b only
    const auto after = kvc_test::snapshot(fx.cache, {fx.a, fx.c});
    REQUIRE((after.streams == other.streams && after.seen == other.seen));  // a and c hold what they held
    REQUIRE(after.free_pages == 0);
    REQUIRE(fx.cache.bytes_in_use() == bytes);  // every page b dropped is still a's
    REQUIRE(fx.cache.length(fx.b, 0, 1) == 5);
    REQUIRE(fx.cache.length(fx.b, 1, 0) == 0);
    REQUIRE(fx.cache.seen(fx.b, 1) == 0);
    // b's next token goes to a copy of the shared page, which now needs one page: none is free.
    const auto k = rows(1, fx.r), v = rows(1, fx.r);
    KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.append(fx.b, 0, k.data(), v.data(), 1), kvc::out_of_memory,
                                 "pages requested");
  }
  SECTION("after a failure the cache still works") {
    fixture<float> fx(3);
    const auto k = rows(2, fx.r), v = rows(2, fx.r);
    REQUIRE_THROWS_AS(fx.cache.append(fx.a, 0, k.data(), v.data(), 2), kvc::out_of_memory);
    fx.cache.remove_sequence(fx.c);
    fx.cache.append(fx.a, 0, k.data(), v.data(), 2);
    REQUIRE(fx.cache.length(fx.a, 0, 0) == 9);
    REQUIRE(fx.cache.length(fx.b, 0, 0) == 7);
  }
}

TEST_CASE("wrong layer, head or sequence changes nothing and names the value", "[store][errors]") {
  fixture<float> fx(8);
  const auto k = rows(3, fx.r), v = rows(3, fx.r);
  const std::int32_t kept[] = {0, 1};
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.append(fx.a, 2, k.data(), v.data(), 3), kvc::error, "layer = 2");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.append(fx.a, -1, k.data(), v.data(), 3), kvc::error, "layer = -1");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.keep(fx.a, 5, 0, kept, 2), kvc::error, "layer = 5");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.keep(fx.a, 0, 2, kept, 2), kvc::error, "head = 2");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.keep(fx.a, 0, -1, kept, 2), kvc::error, "head = -1");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.keep_layer(fx.a, 0, {{0}}), kvc::error, "kept.size() = 1");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.rewrite_keys(fx.a, 0, 3, [](std::int32_t, float*) {}), kvc::error,
                               "head = 3");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.rewrite_keys(fx.a, 4, 0, [](std::int32_t, float*) {}), kvc::error,
                               "layer = 4");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.append(99, 0, k.data(), v.data(), 3), kvc::error, "unknown sequence id 99");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.keep(99, 0, 0, kept, 2), kvc::error, "unknown sequence id 99");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.keep_layer(-3, 0, {{0}, {0}}), kvc::error, "unknown sequence id -3");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.fork(99), kvc::error, "unknown sequence id 99");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.remove_sequence(99), kvc::error, "unknown sequence id 99");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.rewrite_keys(99, 0, 0, [](std::int32_t, float*) {}), kvc::error,
                               "unknown sequence id 99");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.rewind(fx.a, 2, 0), kvc::error, "layer = 2");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.rewind(99, 0, 0), kvc::error, "unknown sequence id 99");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.rewind(fx.a, 0, 8), kvc::error, "n = 8, expected 0..7");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.rewind(fx.a, 1, -1), kvc::error, "n = -1, expected 0..4");
  // Readers check too.
  REQUIRE_THROWS_WITH(fx.cache.keys(fx.a, 0, 2), Catch::Contains("head = 2"));
  REQUIRE_THROWS_WITH(fx.cache.values(fx.a, 2, 0), Catch::Contains("layer = 2"));
  REQUIRE_THROWS_WITH(fx.cache.length(77, 0, 0), Catch::Contains("unknown sequence id 77"));
  REQUIRE_THROWS_WITH(fx.cache.positions(fx.a, 0, 9), Catch::Contains("head = 9"));
  REQUIRE_THROWS_WITH(fx.cache.seen(fx.a, 3), Catch::Contains("layer = 3"));
  REQUIRE_THROWS_WITH(fx.cache.bytes_in_use(-1), Catch::Contains("layer = -1"));
  std::vector<kvc::kv_cache<float>::view_type> buf;
  REQUIRE_THROWS_WITH(fx.cache.layer(fx.a, 2, buf), Catch::Contains("layer = 2"));
}

TEMPLATE_TEST_CASE("NaN or Inf in k or v changes nothing and names the element", "[store][errors]", float,
                   kvc::half, kvc::bfloat16) {
  fixture<TestType> fx(8);
  for (const float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                          -std::numeric_limits<float>::infinity()}) {
    auto k = rows(3, fx.r), v = rows(3, fx.r);
    const std::size_t at = static_cast<std::size_t>(fx.r.integer(0, 3 * H * D - 1));
    // Built with append: GCC 12 at -O3 flags `"[" + std::string` with a false -Wrestrict.
    std::string where("[");
    where.append(std::to_string(at)).append("] = ");
    INFO("bad = " << bad << " at " << at);
    auto kb = k;
    kb[at] = bad;
    KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.append(fx.a, 0, kb.data(), v.data(), 3), kvc::error, std::string("k") + where);
    auto vb = v;
    vb[at] = bad;
    KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.append(fx.b, 1, k.data(), vb.data(), 3), kvc::error, std::string("v") + where);
    // The storage-type input path checks too.
    std::vector<TestType> ks, vs;
    for (std::size_t i = 0; i < k.size(); ++i) ks.push_back(TestType(k[i])), vs.push_back(TestType(vb[i]));
    KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.append(fx.a, 1, ks.data(), vs.data(), 3), kvc::error, "finite");
  }
}

TEST_CASE("bad kept indices, null pointers and negative counts change nothing", "[store][errors]") {
  fixture<float> fx(8);
  const auto k = rows(3, fx.r), v = rows(3, fx.r);
  const std::int32_t repeat[] = {0, 2, 2}, down[] = {3, 1}, past[] = {0, 7}, neg[] = {-1, 2};
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.keep(fx.a, 0, 0, repeat, 3), kvc::error, "kept[2] = 2 after 2");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.keep(fx.a, 0, 1, down, 2), kvc::error, "kept[1] = 1 after 3");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.keep(fx.a, 0, 0, past, 2), kvc::error, "kept[1] = 7");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.keep(fx.b, 1, 0, past, 2), kvc::error, "the stream's length is 4");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.keep(fx.a, 0, 0, neg, 2), kvc::error, "kept[0] = -1");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.keep(fx.a, 0, 0, neg, -1), kvc::error, "n = -1");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.keep(fx.a, 0, 0, static_cast<const std::int32_t*>(nullptr), 2),
                               kvc::error, "kept is null");
  // A layer keep with one bad head changes no head.
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.keep_layer(fx.a, 0, {{0, 1, 2}, {4, 3}}), kvc::error, "kept[1] = 3 after 4");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.keep_layer(fx.a, 0, {{0, 1, 2}, {0, 9}}), kvc::error, "head 1");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.append(fx.a, 0, static_cast<const float*>(nullptr), v.data(), 3), kvc::error,
                               "k or v is null with n = 3");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.append(fx.a, 0, k.data(), static_cast<const float*>(nullptr), 3), kvc::error,
                               "k or v is null");
  KVC_REQUIRE_UNCHANGED_THROWS(fx, fx.cache.append(fx.a, 0, k.data(), v.data(), -2), kvc::error, "n = -2");
  // n == 0 is a no-op, even with null pointers.
  const auto before = fx.snap();
  fx.cache.append(fx.a, 0, static_cast<const float*>(nullptr), static_cast<const float*>(nullptr), 0);
  fx.cache.keep(fx.c, 1, 0, static_cast<const std::int32_t*>(nullptr), 0);  // empty stream keeps nothing
  REQUIRE(fx.snap() == before);
}

TEST_CASE("the sequence table every store shares: ids, checks and messages", "[store][errors]") {
  struct seq {
    std::vector<int> streams;
  };
  kvc::detail::sequence_table<seq> t("kvc::test_store", 3, 2);
  REQUIRE(t.add(seq{{0, 1, 2, 3, 4, 5}}) == 0);
  REQUIRE(t.add(seq{{6, 7, 8, 9, 10, 11}}) == 1);
  // An id taken from an inner store: add() continues after it; a live id is refused, table unchanged.
  t.add_as(5, seq{{12, 13, 14, 15, 16, 17}});
  REQUIRE_THROWS_WITH(t.add_as(1, seq{}), Catch::Contains("kvc::test_store: sequence id 1 is live, expected a new id"));
  REQUIRE(t.size() == 3);
  REQUIRE(t.find(1, "x").streams[0] == 6);
  REQUIRE(t.add(seq{}) == 6);
  // Streams are [layer * num_kv_heads + head]; each argument is checked in the order seq, layer, head.
  for (std::int32_t l = 0; l < 3; ++l)
    for (std::int32_t h = 0; h < 2; ++h) REQUIRE(t.get(5, l, h, "get") == 12 + 2 * l + h);
  REQUIRE_THROWS_WITH(t.get(4, 9, 9, "length"),
                      Catch::Contains("kvc::test_store::length: unknown sequence id 4 (argument seq), expected a live "
                                      "sequence id: {0, 1, 5, 6}"));
  REQUIRE_THROWS_WITH(t.get(0, 3, 9, "keys"), Catch::Contains("kvc::test_store::keys: layer = 3, expected 0..2"));
  REQUIRE_THROWS_WITH(t.get(0, 2, -1, "keys"), Catch::Contains("kvc::test_store::keys: head = -1, expected 0..1"));
  t.erase(1);
  REQUIRE_FALSE(t.contains(1));
  REQUIRE(t.contains(0));
  REQUIRE(t.add(seq{}) == 7);  // ids are never reused
  kvc::detail::sequence_table<seq> empty("kvc::test_store", 1, 1);
  REQUIRE_THROWS_WITH(empty.find(0, "fork"), Catch::Contains("expected a live sequence id: none"));
}
