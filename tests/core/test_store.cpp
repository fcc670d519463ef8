// SPDX-License-Identifier: Apache-2.0
// page_pool and kv_cache against a dense model (support/dense_reference.hpp): random appends
// (decode steps and prefill chunks), keeps (random subsets, head-wise lengths), layers sharing
// another layer's pages, forks with copy-on-write and removals; after every operation the cache must hold exactly what the model
// holds, and the pool must account for exactly the pages the streams reference.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <set>
#include <vector>

#include <kvc/store/kv_cache.hpp>
#include <kvc/store/page_pool.hpp>

#include "cache_checks.hpp"
#include "dense_reference.hpp"
#include "kvc_catch.hpp"
#include "random.hpp"

namespace {

/// Random K or V input for n tokens, and the same values as the cache stores them.
template <class T>
struct kv_input {
  std::vector<float> raw, stored;
  kv_input(std::int32_t n, std::int32_t H, std::int32_t D, kvc_test::rng& r)
      : raw(r.normals(static_cast<std::size_t>(n) * H * D, 3.0f)), stored(raw.size()) {
    for (std::size_t i = 0; i < raw.size(); ++i) stored[i] = kvc::to_float(kvc::from_float<T>(raw[i]));
  }
  std::vector<T> as_storage() const {
    std::vector<T> out;
    for (float x : raw) out.push_back(kvc::from_float<T>(x));
    return out;
  }
};

template <class T>
void append_both(kvc::kv_cache<T>& c, kvc_test::dense_cache_model& m, kvc::seq_id s, std::int32_t l, std::int32_t n,
                 kvc_test::rng& r, bool storage_input, const std::int32_t* positions = nullptr) {
  const kv_input<T> k(n, m.heads, m.dim, r), v(n, m.heads, m.dim, r);
  if (storage_input) {
    const auto ks = k.as_storage(), vs = v.as_storage();
    c.append(s, l, ks.data(), vs.data(), n, positions);
  } else {
    c.append(s, l, k.raw.data(), v.raw.data(), n, positions);
  }
  m.append(s, l, k.stored, v.stored, n, positions);
}

}  // namespace

TEST_CASE("page_pool: allocation, reference counts, tags, exhaustion", "[store][pool]") {
  kvc::page_pool pool(100, 10, 3);
  REQUIRE(pool.page_bytes() == 128);  // rounded up to the alignment
  REQUIRE(pool.capacity() == 10);
  REQUIRE(pool.free_pages() == 10);
  std::vector<kvc::page_id> a(4), b(6);
  pool.allocate(4, a.data(), 1);
  pool.allocate(6, b.data(), 2);
  std::set<kvc::page_id> all(a.begin(), a.end());
  all.insert(b.begin(), b.end());
  REQUIRE(all.size() == 10);  // distinct
  for (kvc::page_id p : all) {
    REQUIRE(p >= 0);
    REQUIRE(p < 10);
    REQUIRE(pool.ref_count(p) == 1);
    REQUIRE(reinterpret_cast<std::uintptr_t>(pool.data(p)) % kvc::page_pool::alignment == 0);
    REQUIRE(pool.data(p) == pool.base() + static_cast<std::size_t>(p) * pool.page_bytes());
  }
  REQUIRE(pool.free_pages() == 0);
  REQUIRE(pool.bytes_in_use() == 10 * 128);
  REQUIRE(pool.bytes_in_use(0) == 0);
  REQUIRE(pool.bytes_in_use(1) == 4 * 128);
  REQUIRE(pool.bytes_in_use(2) == 6 * 128);
  kvc::page_id one;
  REQUIRE_THROWS_AS(pool.allocate(1, &one), kvc::out_of_memory);
  REQUIRE_THROWS_WITH(pool.allocate(1, &one), Catch::Contains("1 pages requested, 0 free of 10"));
  // Shared pages survive one release.
  pool.retain(2, a.data());
  REQUIRE(pool.ref_count(a[0]) == 2);
  pool.release(4, a.data());
  REQUIRE(pool.free_pages() == 2);
  REQUIRE(pool.ref_count(a[0]) == 1);
  REQUIRE(pool.ref_count(a[2]) == 0);
  REQUIRE(pool.bytes_in_use(1) == 2 * 128);
  // All or nothing: 3 pages asked, 2 free.
  std::vector<kvc::page_id> c(3, -7);
  REQUIRE_THROWS_AS(pool.allocate(3, c.data(), 0), kvc::out_of_memory);
  REQUIRE(pool.free_pages() == 2);
  REQUIRE(c == std::vector<kvc::page_id>(3, -7));
  pool.allocate(2, c.data(), 0);
  REQUIRE(pool.bytes_in_use(0) == 2 * 128);
  pool.release(2, c.data());
  pool.release(2, a.data());
  pool.release(6, b.data());
  REQUIRE(pool.free_pages() == 10);
  REQUIRE(pool.bytes_in_use() == 0);
  // Preconditions name the argument and the value.
  REQUIRE_THROWS_WITH(pool.allocate(-1, c.data()), Catch::Contains("n = -1"));
  REQUIRE_THROWS_WITH(pool.allocate(1, c.data(), 3), Catch::Contains("tag = 3"));
  REQUIRE_THROWS_WITH(kvc::page_pool(0, 4), Catch::Contains("page_bytes = 0"));
  REQUIRE_THROWS_WITH(kvc::page_pool(64, 0), Catch::Contains("capacity = 0"));
  REQUIRE_THROWS_WITH(kvc::page_pool(64, 4, 0), Catch::Contains("num_tags = 0"));
}

TEMPLATE_TEST_CASE("kv_cache equals a dense model under random appends, keeps, rewinds, shares, forks and removals",
                   "[store]",
                   float, kvc::half, kvc::bfloat16) {
  using T = TestType;
  for (std::int32_t P : {1, 4, 16}) {
    kvc_test::rng r(100 + static_cast<std::uint64_t>(P));
    kvc::cache_config cfg;
    cfg.num_layers = 3;  // share_layer chains: a layer may take pages another took
    cfg.num_kv_heads = 3;
    cfg.head_dim = 5;
    cfg.page_size = P;
    cfg.max_pages = 4096;
    kvc::kv_cache<T> c(cfg);
    kvc_test::dense_cache_model m;
    m.layers = cfg.num_layers;
    m.heads = cfg.num_kv_heads;
    m.dim = cfg.head_dim;
    std::vector<kvc::seq_id> seqs;
    auto add = [&] {
      const kvc::seq_id s = c.add_sequence();
      m.add_sequence(s);
      seqs.push_back(s);
    };
    add();
    for (int op = 0; op < 70; ++op) {
      const kvc::seq_id s = seqs[static_cast<std::size_t>(r.integer(0, static_cast<std::int32_t>(seqs.size()) - 1))];
      const std::int32_t l = r.integer(0, cfg.num_layers - 1);
      const int kind = r.integer(0, 11);
      INFO("P=" << P << " op " << op << " kind " << kind << " seq " << s << " layer " << l);
      if (kind <= 3) {  // decode step or prefill chunk, float or storage-type input
        const std::int32_t n = r.coin(0.4) ? 1 : r.integer(0, 40);
        append_both(c, m, s, l, n, r, r.coin());
      } else if (kind == 4) {  // explicit positions (e.g. after a shift), increasing
        const std::int32_t n = r.integer(1, 9);
        std::vector<std::int32_t> pos(static_cast<std::size_t>(n));
        std::int32_t p = r.integer(0, 1000);
        for (auto& x : pos) x = (p += r.integer(1, 5));
        append_both(c, m, s, l, n, r, false, pos.data());
      } else if (kind <= 6) {  // keep one head: a random subset (empty, all, or any size)
        const std::int32_t h = r.integer(0, cfg.num_kv_heads - 1);
        const std::int32_t L = c.length(s, l, h);
        const std::int32_t k = r.coin(0.1) ? 0 : r.coin(0.1) ? L : r.integer(0, L);
        const auto kept = r.subset(L, k);
        const std::int32_t before = c.pool().pages_in_use();
        const bool shared = std::any_of(c.pages(s, l, h).begin(), c.pages(s, l, h).end(),
                                        [&](kvc::page_id p) { return c.pool().ref_count(p) > 1; });
        const std::int32_t old_pages = static_cast<std::int32_t>(c.pages(s, l, h).size());
        c.keep(s, l, h, kept.data(), k);
        m.keep(s, l, h, kept);
        if (!shared)  // the pool shrinks by exactly the pages the stream emptied
          REQUIRE(before - c.pool().pages_in_use() == old_pages - (k + P - 1) / P);
      } else if (kind == 7) {  // keep a whole layer with head-wise (ada-like) lengths
        std::vector<std::vector<std::int32_t>> kept;
        for (std::int32_t h = 0; h < cfg.num_kv_heads; ++h) {
          const std::int32_t L = c.length(s, l, h);
          kept.push_back(r.subset(L, r.integer(0, L)));
        }
        c.keep_layer(s, l, kept);
        for (std::int32_t h = 0; h < cfg.num_kv_heads; ++h) m.keep(s, l, h, kept[static_cast<std::size_t>(h)]);
      } else if (kind == 10) {  // rewind: forget the tokens at positions >= n (a rejected draft)
        const std::int32_t n = r.coin(0.2) ? c.seen(s, l) : r.integer(0, c.seen(s, l));
        bool ascending = true;  // then the dropped tokens are a suffix: nothing moves, nothing is allocated
        for (std::int32_t h = 0; h < cfg.num_kv_heads; ++h)
          for (std::int32_t t = 1; t < c.length(s, l, h); ++t)
            ascending = ascending && c.positions(s, l, h)[t] > c.positions(s, l, h)[t - 1];
        const auto allocated = c.traffic().bytes_allocated;
        c.rewind(s, l, n);
        m.rewind(s, l, n);
        REQUIRE(c.seen(s, l) == n);
        if (ascending) REQUIRE(c.traffic().bytes_allocated == allocated);
      } else if (kind == 11) {  // the layer takes the other layer's pages by reference
        const std::int32_t from = (l + r.integer(1, cfg.num_layers - 1)) % cfg.num_layers;
        const std::int32_t before = c.pool().pages_in_use();
        c.share_layer(s, l, from);
        m.share_layer(s, l, from);
        REQUIRE(c.pool().pages_in_use() <= before);  // never allocates
      } else if (kind == 8 && seqs.size() < 5) {
        const kvc::seq_id f = c.fork(s);
        m.fork(s, f);
        seqs.push_back(f);
      } else if (kind == 9 && seqs.size() > 1) {
        c.remove_sequence(s);
        m.remove_sequence(s);
        seqs.erase(std::find(seqs.begin(), seqs.end(), s));
      } else {
        add();
      }
      kvc_test::require_matches(c, m);
    }
    for (kvc::seq_id s : seqs) c.remove_sequence(s);
    REQUIRE(c.pool().pages_in_use() == 0);
    REQUIRE(c.bytes_in_use() == 0);
    REQUIRE(c.num_sequences() == 0);
  }
}

TEST_CASE("kv_cache: positions default to the layer's next ones and stay with kept tokens", "[store]") {
  kvc::cache_config cfg;
  cfg.num_layers = 2;
  cfg.num_kv_heads = 2;
  cfg.head_dim = 3;
  cfg.page_size = 4;
  kvc::kv_cache<float> c(cfg);
  const auto s = c.add_sequence();
  kvc_test::rng r(7);
  const auto k = r.normals(10 * 2 * 3), v = r.normals(10 * 2 * 3);
  c.append(s, 0, k.data(), v.data(), 6);
  c.append(s, 0, k.data(), v.data(), 4);
  c.append(s, 1, k.data(), v.data(), 2);
  REQUIRE(c.seen(s, 0) == 10);
  REQUIRE(c.seen(s, 1) == 2);
  for (std::int32_t t = 0; t < 10; ++t) REQUIRE(c.positions(s, 0, 1)[t] == t);
  const std::int32_t kept[] = {1, 4, 9};
  c.keep(s, 0, 1, kept, 3);
  REQUIRE(c.length(s, 0, 1) == 3);
  REQUIRE(c.length(s, 0, 0) == 10);
  REQUIRE(std::vector<std::int32_t>(c.positions(s, 0, 1), c.positions(s, 0, 1) + 3) ==
          std::vector<std::int32_t>{1, 4, 9});
  c.append(s, 0, k.data(), v.data(), 1);  // seen counts every token, kept or not
  REQUIRE(c.positions(s, 0, 1)[3] == 10);
  REQUIRE(c.metadata_bytes() == 4 * ((11 + 3) + (4 + 1) + (2 + 1) * 2) + 4 * 0);
}

TEST_CASE("kv_cache fork: copy on write never changes the other sequence", "[store][fork]") {
  for (std::int32_t P : {1, 4, 16}) {
    kvc_test::rng r(200 + static_cast<std::uint64_t>(P));
    kvc::cache_config cfg;
    cfg.num_layers = 2;
    cfg.num_kv_heads = 2;
    cfg.head_dim = 4;
    cfg.page_size = P;
    cfg.max_pages = 1024;
    kvc::kv_cache<float> c(cfg);
    kvc_test::dense_cache_model m;
    m.layers = 2;
    m.heads = 2;
    m.dim = 4;
    const auto a = c.add_sequence();
    m.add_sequence(a);
    append_both(c, m, a, 0, 2 * P + 1, r, false);  // a partial last page
    append_both(c, m, a, 1, 3 * P, r, false);      // full pages
    const std::int32_t used = c.pool().pages_in_use();
    const auto b = c.fork(a);
    m.fork(a, b);
    INFO("P=" << P);
    REQUIRE(c.pool().pages_in_use() == used);  // shared, not copied
    REQUIRE(c.pages(b, 0, 0) == c.pages(a, 0, 0));
    for (kvc::page_id p : c.pages(a, 0, 0)) REQUIRE(c.pool().ref_count(p) == 2);
    kvc_test::require_matches(c, m);

    SECTION("append to the fork") {
      append_both(c, m, b, 0, 1, r, false);
      append_both(c, m, b, 1, 1, r, false);
      kvc_test::require_matches(c, m);
      append_both(c, m, a, 0, P + 2, r, true);
      kvc_test::require_matches(c, m);
    }
    SECTION("keep on the fork") {
      for (std::int32_t h = 0; h < 2; ++h) {
        const auto kept = r.subset(c.length(b, 0, h), r.integer(0, c.length(b, 0, h)));
        c.keep(b, 0, h, kept.data(), static_cast<std::int32_t>(kept.size()));
        m.keep(b, 0, h, kept);
        kvc_test::require_matches(c, m);
      }
      const auto kept = r.subset(c.length(a, 1, 0), P);
      c.keep(a, 1, 0, kept.data(), P);
      m.keep(a, 1, 0, kept);
      kvc_test::require_matches(c, m);
    }
    SECTION("rewrite keys of the fork") {
      std::vector<std::int32_t> np(static_cast<std::size_t>(c.length(b, 0, 1)));
      for (std::size_t i = 0; i < np.size(); ++i) np[i] = static_cast<std::int32_t>(1000 + 2 * i);
      c.rewrite_keys(
          b, 0, 1,
          [&](std::int32_t t, float* row) {
            for (std::int32_t d = 0; d < 4; ++d) row[d] = static_cast<float>(t * 10 + d);
          },
          np.data());
      auto& st = m.streams[{b, 0, 1}];
      for (std::int32_t t = 0; t < st.n(); ++t)
        for (std::int32_t d = 0; d < 4; ++d) st.k[static_cast<std::size_t>(t) * 4 + d] = static_cast<float>(t * 10 + d);
      st.pos = np;
      kvc_test::require_matches(c, m);
    }
    SECTION("remove the original") {
      c.remove_sequence(a);
      m.remove_sequence(a);
      kvc_test::require_matches(c, m);
      REQUIRE(c.pool().pages_in_use() == used);
      for (kvc::page_id p : c.pages(b, 0, 0)) REQUIRE(c.pool().ref_count(p) == 1);
    }
  }
}

namespace {

/// Every page's channel-wise key min and max recomputed from the model's rows ([pages][2][D]).
std::vector<float> model_key_bounds(const kvc_test::dense_cache_model::stream& st, std::int32_t P, std::int32_t D) {
  std::vector<float> b;
  for (std::int32_t pg = 0; pg * P < st.n(); ++pg) {
    std::vector<float> lo(static_cast<std::size_t>(D), 1e30f), hi(static_cast<std::size_t>(D), -1e30f);
    for (std::int32_t t = pg * P; t < std::min(st.n(), (pg + 1) * P); ++t)
      for (std::int32_t d = 0; d < D; ++d) {
        const float x = st.k[static_cast<std::size_t>(t) * D + d];
        lo[static_cast<std::size_t>(d)] = std::min(lo[static_cast<std::size_t>(d)], x);
        hi[static_cast<std::size_t>(d)] = std::max(hi[static_cast<std::size_t>(d)], x);
      }
    b.insert(b.end(), lo.begin(), lo.end());
    b.insert(b.end(), hi.begin(), hi.end());
  }
  return b;
}

}  // namespace

TEMPLATE_TEST_CASE("kv_cache share_layer: a layer holds another's pages by reference, copy on write", "[store][share]",
                   float, kvc::half) {
  using T = TestType;
  for (std::int32_t P : {1, 4, 16}) {
    kvc_test::rng r(300 + static_cast<std::uint64_t>(P));
    kvc::cache_config cfg;
    cfg.num_layers = 3;
    cfg.num_kv_heads = 2;
    cfg.head_dim = 6;
    cfg.page_size = P;
    cfg.max_pages = 1024;
    cfg.key_bounds = true;
    kvc::kv_cache<T> c(cfg);
    kvc_test::dense_cache_model m;
    m.layers = 3;
    m.heads = 2;
    m.dim = 6;
    const auto a = c.add_sequence();
    m.add_sequence(a);
    append_both(c, m, a, 0, 3 * P + 1, r, false);  // a partial last page when P > 1
    append_both(c, m, a, 1, 2 * P, r, false);
    append_both(c, m, a, 2, 5, r, false);
    const std::int32_t used = c.pool().pages_in_use();
    const std::size_t bytes0 = c.bytes_in_use(0);
    INFO("P=" << P);

    c.share_layer(a, 1, 0);
    m.share_layer(a, 1, 0);
    kvc_test::require_matches(c, m);
    // Layer 1's own pages went back to the pool; nothing was allocated.
    REQUIRE(c.pool().pages_in_use() == used - 2 * 2);
    REQUIRE(c.bytes_in_use(1) == 0);
    REQUIRE(c.bytes_in_use(0) == bytes0);
    REQUIRE(c.seen(a, 1) == 3 * P + 1);
    for (std::int32_t h = 0; h < 2; ++h) {
      REQUIRE(c.pages(a, 1, h) == c.pages(a, 0, h));
      for (kvc::page_id p : c.pages(a, 1, h)) REQUIRE(c.pool().ref_count(p) == 2);
      const auto want = model_key_bounds(m.streams[{a, 1, h}], P, 6);
      for (std::size_t i = 0; i < want.size(); ++i)
        KVC_REQUIRE(kvc::to_float(c.key_bounds(a, 1, h)[i]) == want[i], "h=" << h << " i=" << i);
    }

    SECTION("appends to either layer copy the shared partial page, never write through") {
      append_both(c, m, a, 1, 1, r, false);
      kvc_test::require_matches(c, m);
      append_both(c, m, a, 0, P + 2, r, true);
      kvc_test::require_matches(c, m);
      for (std::int32_t h = 0; h < 2; ++h) {
        REQUIRE(c.pages(a, 1, h).size() == static_cast<std::size_t>(3 + (P == 1 ? 2 : 1)));
        const auto want = model_key_bounds(m.streams[{a, 1, h}], P, 6);
        for (std::size_t i = 0; i < want.size(); ++i)
          KVC_REQUIRE(kvc::to_float(c.key_bounds(a, 1, h)[i]) == want[i], "h=" << h << " i=" << i);
      }
    }
    SECTION("keep and rewind on the sharer leave the source as it was") {
      for (std::int32_t h = 0; h < 2; ++h) {
        const auto kept = r.subset(c.length(a, 1, h), r.integer(0, c.length(a, 1, h)));
        c.keep(a, 1, h, kept.data(), static_cast<std::int32_t>(kept.size()));
        m.keep(a, 1, h, kept);
        kvc_test::require_matches(c, m);
      }
      c.rewind(a, 0, P);
      m.rewind(a, 0, P);
      kvc_test::require_matches(c, m);
    }
    SECTION("chains, forks and removals keep the counts") {
      c.share_layer(a, 2, 1);  // layer 1 already holds layer 0's pages: now three references
      m.share_layer(a, 2, 1);
      kvc_test::require_matches(c, m);
      for (kvc::page_id p : c.pages(a, 0, 0)) REQUIRE(c.pool().ref_count(p) == 3);
      c.share_layer(a, 1, 2);  // the same pages again: references neither gained nor lost
      m.share_layer(a, 1, 2);
      for (kvc::page_id p : c.pages(a, 0, 0)) REQUIRE(c.pool().ref_count(p) == 3);
      const auto b = c.fork(a);
      m.fork(a, b);
      for (kvc::page_id p : c.pages(a, 0, 0)) REQUIRE(c.pool().ref_count(p) == 6);
      append_both(c, m, b, 2, 2, r, false);
      kvc_test::require_matches(c, m);
      c.remove_sequence(a);
      m.remove_sequence(a);
      kvc_test::require_matches(c, m);
      c.remove_sequence(b);
      REQUIRE(c.pool().pages_in_use() == 0);
      REQUIRE(c.bytes_in_use() == 0);
    }
    SECTION("bad arguments are refused by name and change nothing") {
      const auto before = kvc_test::snapshot(c, {a});
      REQUIRE_THROWS_WITH(c.share_layer(a, 1, 1), Catch::Contains("share_layer") && Catch::Contains("from = 1"));
      REQUIRE_THROWS_WITH(c.share_layer(a, 1, 3), Catch::Contains("from = 3") && Catch::Contains("expected 0..2"));
      REQUIRE_THROWS_WITH(c.share_layer(a, -1, 0), Catch::Contains("share_layer: layer = -1"));
      REQUIRE_THROWS_WITH(c.share_layer(a + 7, 2, 0), Catch::Contains("share_layer"));
      REQUIRE(kvc_test::snapshot(c, {a}) == before);
    }
  }
}

TEST_CASE("kv_cache: bad configurations are rejected with the field and value", "[store]") {
  auto make = [](auto edit) {
    kvc::cache_config c;
    edit(c);
    return kvc::kv_cache<float>(c);
  };
  REQUIRE_THROWS_WITH(make([](auto& c) { c.page_size = 12; }), Catch::Contains("page_size = 12"));
  REQUIRE_THROWS_WITH(make([](auto& c) { c.num_layers = 0; }), Catch::Contains("num_layers = 0"));
  REQUIRE_THROWS_WITH(make([](auto& c) { c.num_kv_heads = -2; }), Catch::Contains("num_kv_heads = -2"));
  REQUIRE_THROWS_WITH(make([](auto& c) { c.head_dim = 0; }), Catch::Contains("head_dim = 0"));
  REQUIRE_THROWS_WITH(make([](auto& c) { c.max_pages = 0; }), Catch::Contains("max_pages = 0"));
  REQUIRE_THROWS_AS(make([](auto& c) { c.page_size = 0; }), kvc::error);
}
