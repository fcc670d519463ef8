// SPDX-License-Identifier: Apache-2.0
// The strong guarantee under injected faults. kvc::testing::allocation_fault makes the N-th page
// allocation on this thread fail (kvc::out_of_memory) for N = 0, 1, 2, ... until the call under
// test succeeds; after every failure the cache must equal the snapshot taken before: gathered K/V,
// positions, page tables, reference counts, free pages and bytes per layer
// (support/cache_checks.hpp). Calls:
//  - evict::apply_layer with StreamingLLM re-rotation (keep + rewrite of every kept key) on a
//    forked sequence, where pages stay shared after the keep (before the fix the keep committed
//    and the per-head rewrite_keys then failed half way);
//  - kv_cache::rewrite_keys with a function that throws at its k-th row, for every k (before the
//    fix rows 0..k-1 were already rewritten in the pages);
//  - quant_cache append / keep_layer after fork (KIVI-2, whose partial groups are re-encoded);
//  - mixed_precision_cache keep_layer / keep after fork (before page_pool::reserve the low store's
//    copy-on-write allocated after the high store had committed).
// A successful re-rotation is checked against RoPE written here in double: kept token i of head h,
// at original position p, becomes R(i - p) k (rotate_half pairs (j, j + D/2), angle
// (i - p) theta^(-2j/D)); float pages: |err| <= 2e-5 (|k|_inf + 1).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <kvc/attention/rope.hpp>
#include <kvc/evict/core.hpp>
#include <kvc/quant/kivi.hpp>
#include <kvc/store/kv_cache.hpp>
#include <kvc/store/mixed_precision_cache.hpp>
#include <kvc/store/quant_cache.hpp>

#include "cache_builders.hpp"
#include "cache_checks.hpp"
#include "fast_require.hpp"
#include "kvc_catch.hpp"
#include "random.hpp"

namespace {

struct injected_row_error : std::runtime_error {
  injected_row_error() : std::runtime_error("injected") {}
};

template <class T>
struct fixture {
  kvc::kv_cache<T> cache;
  kvc::seq_id a, b;
  std::vector<kvc::seq_id> seqs;
  fixture(std::int32_t H, std::int32_t D, kvc_test::rng& r) : cache(config(H, D)) {
    a = cache.add_sequence();
    for (std::int32_t l = 0; l < 2; ++l) append(a, l, r.integer(20, 90), r);
    b = cache.fork(a);
    if (r.coin()) append(b, 0, r.integer(1, 20), r);
    seqs = {a, b};
  }
  static kvc::cache_config config(std::int32_t H, std::int32_t D) {
    return kvc_test::cache_shape(2, H, D, 8, 1024);
  }
  void append(kvc::seq_id s, std::int32_t l, std::int32_t n, kvc_test::rng& r) {
    const auto k = r.normals(static_cast<std::size_t>(n) * cache.config().num_kv_heads * cache.config().head_dim);
    const auto v = r.normals(k.size());
    cache.append(s, l, k.data(), v.data(), n);
  }
};

/// A keep set that leaves the first pages of each head unchanged (so they stay shared after the
/// keep and only a rewrite must copy them), and drops random later tokens.
std::vector<std::vector<std::int32_t>> keep_with_prefix(std::int32_t H, const std::vector<std::int32_t>& lens,
                                                        kvc_test::rng& r) {
  std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(H));
  for (std::int32_t h = 0; h < H; ++h) {
    const std::int32_t L = lens[static_cast<std::size_t>(h)], pre = std::min(L, r.integer(0, 24));
    for (std::int32_t t = 0; t < L; ++t)
      if (t < pre || r.coin(0.6)) kept[static_cast<std::size_t>(h)].push_back(t);
  }
  return kept;
}

/// Runs `op` with the N-th allocation failing, N = 0, 1, ...: every failure must leave `snap()`
/// unchanged; returns how many failures it took to succeed.
template <class Op, class Snap>
int run_until_success(Op op, Snap snap) {
  for (int n = 0; n < 1000; ++n) {
    const auto before = snap();
    kvc::testing::allocation_fault f;
    f.fail_at = n;
    bool ok = false;
    {
      kvc::testing::scoped_allocation_fault guard(f);
      try {
        op();
        ok = true;
      } catch (const kvc::out_of_memory& e) {
        INFO("failure at allocation " << n << ": " << e.what());
        REQUIRE(snap() == before);
      }
    }
    if (ok) {
      REQUIRE(f.calls <= n);  // it succeeded because no call reached the failing one
      return n;
    }
  }
  FAIL("never succeeded");
  return -1;
}

double rope_angle(double delta, std::int32_t j, std::int32_t D, double theta) {
  return delta * std::pow(theta, -2.0 * j / D);
}

}  // namespace

TEST_CASE("apply_layer with re-rotation is all or nothing under every allocation failure", "[store][strong]") {
  for (int trial = 0; trial < 12; ++trial) {
    kvc_test::rng r(3001 + trial);
    const std::int32_t H = r.integer(1, 3), D = 2 * r.integer(2, 16);
    fixture<float> fx(H, D, r);
    const kvc::seq_id s = r.coin() ? fx.b : fx.a;
    const std::int32_t layer = r.integer(0, 1);
    std::vector<std::int32_t> lens;
    std::vector<std::vector<float>> k0(static_cast<std::size_t>(H));
    std::vector<std::vector<std::int32_t>> p0(static_cast<std::size_t>(H));
    for (std::int32_t h = 0; h < H; ++h) {
      const std::int32_t L = fx.cache.length(s, layer, h);
      lens.push_back(L);
      k0[static_cast<std::size_t>(h)].resize(static_cast<std::size_t>(L) * D);
      fx.cache.gather(s, layer, h, k0[static_cast<std::size_t>(h)].data());
      p0[static_cast<std::size_t>(h)].assign(fx.cache.positions(s, layer, h), fx.cache.positions(s, layer, h) + L);
    }
    const auto kept = keep_with_prefix(H, lens, r);
    kvc::rope_config rc;
    rc.head_dim = D;
    const kvc::rope rope(rc);
    kvc::evict::apply_options o;
    o.rerotate = &rope;
    INFO("trial " << trial << " H=" << H << " D=" << D << " seq " << s << " layer " << layer);
    const int failures = run_until_success([&] { (void)kvc::evict::apply_layer(fx.cache, s, layer, kept, o); },
                                           [&] { return kvc_test::snapshot(fx.cache, fx.seqs); });
    REQUIRE(failures >= 0);
    // The result: kept keys rotated by (i - p) in double, positions 0..n-1, values untouched.
    for (std::int32_t h = 0; h < H; ++h) {
      const auto& kh = kept[static_cast<std::size_t>(h)];
      const std::int32_t n = static_cast<std::int32_t>(kh.size());
      REQUIRE(fx.cache.length(s, layer, h) == n);
      std::vector<float> k(static_cast<std::size_t>(n) * D);
      fx.cache.gather(s, layer, h, k.data());
      for (std::int32_t i = 0; i < n; ++i) {
        REQUIRE(fx.cache.positions(s, layer, h)[i] == i);
        const float* x = k0[static_cast<std::size_t>(h)].data() + static_cast<std::size_t>(kh[static_cast<std::size_t>(i)]) * D;
        const double delta = i - p0[static_cast<std::size_t>(h)][static_cast<std::size_t>(kh[static_cast<std::size_t>(i)])];
        double amax = 1;
        for (std::int32_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(double{x[d]}));
        for (std::int32_t j = 0; j < D / 2; ++j) {
          const double a = rope_angle(delta, j, D, rc.theta);
          const double x0 = x[j], x1 = x[j + D / 2];
          const double y0 = x0 * std::cos(a) - x1 * std::sin(a), y1 = x0 * std::sin(a) + x1 * std::cos(a);
          KVC_REQUIRE(std::fabs(k[static_cast<std::size_t>(i) * D + j] - y0) <= 2e-5 * amax, "h=" << h << " i=" << i << " j=" << j);
          KVC_REQUIRE(std::fabs(k[static_cast<std::size_t>(i) * D + j + D / 2] - y1) <= 2e-5 * amax, "h=" << h << " i=" << i);
        }
      }
    }
  }
}

TEST_CASE("keep_layer_rewrite edits kept keys and values, all or nothing, copying shared pages", "[store][strong]") {
  // fn sets k' = 2k + h and v' = v - i - 1 (i: index among the kept): checked against copies
  // gathered before the call, so a wrong source row, a missed V half or a write through a shared
  // page (the sibling's rows would change) shows.
  for (int trial = 0; trial < 8; ++trial) {
    kvc_test::rng r(3201 + trial);
    const std::int32_t H = r.integer(1, 3), D = r.integer(1, 20);
    fixture<kvc::half> fx(H, D, r);
    const bool forked = trial % 2 == 1;
    const kvc::seq_id s = forked ? fx.b : fx.a, sib = forked ? fx.a : fx.b;
    const std::int32_t layer = r.integer(0, 1);
    std::vector<std::int32_t> lens;
    std::vector<std::vector<float>> k0(static_cast<std::size_t>(H)), v0(static_cast<std::size_t>(H));
    std::vector<std::vector<std::int32_t>> p0(static_cast<std::size_t>(H));
    for (std::int32_t h = 0; h < H; ++h) {
      const std::int32_t L = fx.cache.length(s, layer, h);
      lens.push_back(L);
      k0[static_cast<std::size_t>(h)].resize(static_cast<std::size_t>(L) * D);
      v0[static_cast<std::size_t>(h)].resize(static_cast<std::size_t>(L) * D);
      fx.cache.gather(s, layer, h, k0[static_cast<std::size_t>(h)].data(), v0[static_cast<std::size_t>(h)].data());
      p0[static_cast<std::size_t>(h)].assign(fx.cache.positions(s, layer, h), fx.cache.positions(s, layer, h) + L);
    }
    const auto kept = keep_with_prefix(H, lens, r);
    // trial % 4 >= 2: only some kept rows are rewritten (the rows argument); the rest must be
    // compacted unchanged.
    const bool some = trial % 4 >= 2;
    std::vector<std::vector<std::int32_t>> rows(static_cast<std::size_t>(H));
    std::vector<std::vector<char>> chosen(static_cast<std::size_t>(H));
    for (std::int32_t h = 0; h < H; ++h) {
      const std::int32_t n = static_cast<std::int32_t>(kept[static_cast<std::size_t>(h)].size());
      chosen[static_cast<std::size_t>(h)].assign(static_cast<std::size_t>(n), some ? 0 : 1);
      for (std::int32_t i = 0; i < n; ++i)
        if (!some || r.coin(0.2)) rows[static_cast<std::size_t>(h)].push_back(i), chosen[static_cast<std::size_t>(h)][static_cast<std::size_t>(i)] = 1;
    }
    const auto* rows_arg = some ? &rows : nullptr;
    auto edit = [](std::int32_t h, std::int32_t i, kvc::half* k, kvc::half* v, std::int32_t D_) {
      for (std::int32_t d = 0; d < D_; ++d) {
        k[d] = kvc::half(2.0f * static_cast<float>(k[d]) + static_cast<float>(h));
        v[d] = kvc::half(static_cast<float>(v[d]) - static_cast<float>(i + 1));
      }
    };
    INFO("trial " << trial << " H=" << H << " D=" << D << " seq " << s << " layer " << layer);
    // A throwing fn at some (head, i): nothing changes, every page goes back.
    std::int32_t total = 0;
    for (const auto& rh : rows) total += static_cast<std::int32_t>(rh.size());
    for (std::int32_t bad = 0; bad < total; bad += std::max(1, total / 7)) {
      const auto before = kvc_test::snapshot(fx.cache, fx.seqs);
      std::int32_t calls = 0;
      REQUIRE_THROWS_AS(fx.cache.keep_layer_rewrite(s, layer, kept,
                                                    [&](std::int32_t h, std::int32_t i, kvc::half* k, kvc::half* v) {
                                                      if (calls++ == bad) throw injected_row_error();
                                                      edit(h, i, k, v, D);
                                                    }, rows_arg),
                        injected_row_error);
      REQUIRE(calls == bad + 1);
      REQUIRE(kvc_test::snapshot(fx.cache, fx.seqs) == before);
    }
    // Every allocation failure, then success.
    const auto sibling = kvc_test::snapshot(fx.cache, {sib});
    run_until_success(
        [&] {
          fx.cache.keep_layer_rewrite(s, layer, kept,
                                      [&](std::int32_t h, std::int32_t i, kvc::half* k, kvc::half* v) {
                                        REQUIRE(chosen[static_cast<std::size_t>(h)][static_cast<std::size_t>(i)]);
                                        edit(h, i, k, v, D);
                                      }, rows_arg);
        },
        [&] { return kvc_test::snapshot(fx.cache, fx.seqs); });
    // The sibling's rows, positions and page ids are as before: shared pages were copied, not
    // written through (refs and free pages do change: the writer's copies).
    REQUIRE(kvc_test::snapshot(fx.cache, {sib}).streams == sibling.streams);
    REQUIRE(kvc_test::snapshot(fx.cache, {sib}).seen == sibling.seen);
    for (std::int32_t h = 0; h < H; ++h) {
      const auto& kh = kept[static_cast<std::size_t>(h)];
      const std::int32_t n = static_cast<std::int32_t>(kh.size());
      REQUIRE(fx.cache.length(s, layer, h) == n);
      std::vector<float> k(static_cast<std::size_t>(n) * D), v(k.size());
      fx.cache.gather(s, layer, h, k.data(), v.data());
      for (std::int32_t i = 0; i < n; ++i) {
        const std::size_t src = static_cast<std::size_t>(kh[static_cast<std::size_t>(i)]);
        REQUIRE(fx.cache.positions(s, layer, h)[i] == p0[static_cast<std::size_t>(h)][src]);
        for (std::int32_t d = 0; d < D; ++d) {
          const bool ed = chosen[static_cast<std::size_t>(h)][static_cast<std::size_t>(i)];
          const float k_ = k0[static_cast<std::size_t>(h)][src * D + d], v_ = v0[static_cast<std::size_t>(h)][src * D + d];
          const float ek = ed ? static_cast<float>(kvc::half(2.0f * k_ + static_cast<float>(h))) : k_;
          const float ev = ed ? static_cast<float>(kvc::half(v_ - static_cast<float>(i + 1))) : v_;
          KVC_REQUIRE(k[static_cast<std::size_t>(i) * D + d] == ek, "h=" << h << " i=" << i << " d=" << d);
          KVC_REQUIRE(v[static_cast<std::size_t>(i) * D + d] == ev, "h=" << h << " i=" << i << " d=" << d);
        }
      }
    }
    // A bad rows argument is refused, naming it, and changes nothing.
    if (H > 0 && !kept[0].empty()) {
      const auto snap = kvc_test::snapshot(fx.cache, fx.seqs);
      std::vector<std::vector<std::int32_t>> bad(static_cast<std::size_t>(H));
      bad[0].push_back(static_cast<std::int32_t>(kept[0].size()));
      auto noop = [](std::int32_t, std::int32_t, kvc::half*, kvc::half*) {};
      REQUIRE_THROWS_WITH(fx.cache.keep_layer_rewrite(s, layer, kept, noop, &bad),
                          Catch::Contains("rows[0][0] = " + std::to_string(kept[0].size())));
      REQUIRE(kvc_test::snapshot(fx.cache, fx.seqs) == snap);
    }
    std::set<kvc::page_id> live;  // memory is what the streams hold, each shared page once
    for (kvc::seq_id q : fx.seqs)
      for (std::int32_t l = 0; l < 2; ++l)
        for (std::int32_t h = 0; h < H; ++h)
          for (kvc::page_id p : fx.cache.pages(q, l, h)) live.insert(p);
    REQUIRE(fx.cache.pool().pages_in_use() == static_cast<std::int32_t>(live.size()));
  }
}

TEST_CASE("rewrite_keys is all or nothing when the function throws at any row", "[store][strong]") {
  kvc_test::rng r(3101);
  for (int trial = 0; trial < 4; ++trial) {
    fixture<kvc::half> fx(2, 16, r);
    const kvc::seq_id s = trial % 2 ? fx.b : fx.a;  // a forked sequence: rewrites need copies
    const std::int32_t L = fx.cache.length(s, 1, 1);
    for (std::int32_t bad = 0; bad < L; bad += std::max(1, L / 9)) {
      const auto before = kvc_test::snapshot(fx.cache, fx.seqs);
      std::vector<std::int32_t> np(static_cast<std::size_t>(L), 7);
      std::int32_t calls = 0;
      REQUIRE_THROWS_AS(fx.cache.rewrite_keys(
                            s, 1, 1,
                            [&](std::int32_t t, kvc::half* row) {
                              ++calls;
                              if (t == bad) throw injected_row_error();
                              row[0] = kvc::half(99.0f);
                            },
                            np.data()),
                        injected_row_error);
      REQUIRE(calls == bad + 1);
      REQUIRE(kvc_test::snapshot(fx.cache, fx.seqs) == before);
    }
    // And under every allocation failure, then success.
    run_until_success(
        [&] {
          fx.cache.rewrite_keys(s, 1, 1, [](std::int32_t, kvc::half* row) { row[1] = kvc::half(-3.0f); });
        },
        [&] { return kvc_test::snapshot(fx.cache, fx.seqs); });
    std::vector<float> k(static_cast<std::size_t>(L) * 16);
    fx.cache.gather(s, 1, 1, k.data());
    for (std::int32_t t = 0; t < L; ++t) REQUIRE(k[static_cast<std::size_t>(t) * 16 + 1] == -3.0f);
  }
}

namespace {

/// What a quant_cache holds for a set of sequences, for before/after comparisons.
template <class C>
struct qsnap {
  std::vector<std::vector<float>> k, v;
  std::vector<std::vector<std::int32_t>> pos;
  std::vector<std::int32_t> seen;
  std::vector<std::size_t> layer_bytes;
  std::size_t bytes = 0;
  qsnap(const C& c, const std::vector<kvc::seq_id>& seqs) {
    const auto& cfg = c.config();
    for (kvc::seq_id s : seqs)
      for (std::int32_t l = 0; l < cfg.num_layers; ++l) {
        seen.push_back(c.seen(s, l));
        for (std::int32_t h = 0; h < cfg.num_kv_heads; ++h) {
          const std::int32_t L = c.length(s, l, h);
          k.emplace_back(static_cast<std::size_t>(L) * cfg.head_dim);
          v.emplace_back(k.back().size());
          c.gather(s, l, h, k.back().data(), v.back().data());
          pos.emplace_back(c.positions(s, l, h), c.positions(s, l, h) + L);
        }
      }
    for (std::int32_t l = 0; l < cfg.num_layers; ++l) layer_bytes.push_back(c.bytes_in_use(l));
    bytes = c.bytes_in_use();
  }
  bool operator==(const qsnap& o) const {
    return k == o.k && v == o.v && pos == o.pos && seen == o.seen && layer_bytes == o.layer_bytes && bytes == o.bytes;
  }
};

}  // namespace

TEST_CASE("quant_cache append and keep_layer after fork are all or nothing under every allocation failure",
          "[quant][strong]") {
  using C = kvc::quant_cache<kvc::quant::kivi<2>, kvc::quant::kivi<2>>;
  for (int trial = 0; trial < 6; ++trial) {
    kvc_test::rng r(3201 + trial);
    auto cfg = kvc_test::shape_as<kvc::quant_cache_config>(kvc_test::cache_shape(2, 2, 32, 32, 512));
    cfg.max_fp_pages = 64;
    cfg.sink_tokens = trial % 3;
    kvc::quant::kivi<2> q;
    q.residual_tokens = trial % 2 ? 0 : 32;
    C c(cfg, q, q);
    const auto a = c.add_sequence();
    auto add = [&](kvc::seq_id s, std::int32_t n) {
      for (std::int32_t l = 0; l < 2; ++l) {
        const auto k = r.normals(static_cast<std::size_t>(n) * 2 * 32), v = r.normals(k.size());
        c.append(s, l, k.data(), v.data(), n);
      }
    };
    add(a, r.integer(40, 160));
    const auto b = c.fork(a);
    const std::vector<kvc::seq_id> seqs = {a, b};
    auto snap = [&] { return qsnap<C>(c, seqs); };
    INFO("trial " << trial);
    // keep on one side leaves partial groups; the append that follows completes them.
    std::vector<std::vector<std::int32_t>> kept(2);
    for (std::int32_t h = 0; h < 2; ++h) kept[static_cast<std::size_t>(h)] = r.subset(c.length(b, 0, h), r.integer(1, c.length(b, 0, h)));
    run_until_success([&] { c.keep_layer(b, 0, kept); }, snap);
    const std::int32_t n = r.integer(1, 70);
    const auto k = r.normals(static_cast<std::size_t>(n) * 2 * 32), v = r.normals(k.size());
    run_until_success([&] { c.append(b, 0, k.data(), v.data(), n); }, snap);
    run_until_success([&] { c.append(a, 0, k.data(), v.data(), n); }, snap);
    REQUIRE(c.length(b, 0, 0) == static_cast<std::int32_t>(kept[0].size()) + n);
  }
}

namespace {

/// qsnap of a mixed_precision_cache plus its precision map and both pools' free and reserved pages.
template <class C>
struct msnap {
  qsnap<C> q;
  std::vector<std::vector<std::int32_t>> low;
  std::int32_t high_free, low_free, low_reserved;
  msnap(const C& c, const std::vector<kvc::seq_id>& seqs)
      : q(c, seqs),
        high_free(c.high_cache().quant_pool().free_pages()),
        low_free(c.low_cache().quant_pool().free_pages()),
        low_reserved(c.low_cache().quant_pool().reserved_pages()) {
    for (kvc::seq_id s : seqs)
      for (std::int32_t l = 0; l < c.config().num_layers; ++l)
        for (std::int32_t h = 0; h < c.config().num_kv_heads; ++h) low.push_back(c.low_indices(s, l, h));
  }
  bool operator==(const msnap& o) const {
    return q == o.q && low == o.low && high_free == o.high_free && low_free == o.low_free &&
           low_reserved == o.low_reserved;
  }
};

}  // namespace

// The gap docs/threading.md used to describe: keep_layer committed the high store, then the low
// store's copy-on-write allocated (after only a free-pages check). An allocation failing there
// (another thread taking the pages; here the injected fault) left the high store compacted and
// the low one not. Now the low pages are reserved before anything changes.
TEST_CASE("mixed_precision_cache keep_layer and keep after fork are all or nothing under every allocation failure",
          "[quant][mikv][strong]") {
  using C = kvc::mixed_precision_cache<kvc::quant::int8, kvc::quant::int2>;
  for (int trial = 0; trial < 6; ++trial) {
    kvc_test::rng r(4401 + trial);
    auto cfg = kvc_test::shape_as<kvc::quant_cache_config>(kvc_test::cache_shape(2, 2, 32, 8, 256));
    cfg.max_fp_pages = 64;
    cfg.sink_tokens = trial % 2;
    C c(cfg, 128);
    const auto a = c.add_sequence();
    for (std::int32_t l = 0; l < 2; ++l) {
      const std::int32_t n = r.integer(30, 70);
      const auto k = r.normals(static_cast<std::size_t>(n) * 2 * 32), v = r.normals(k.size());
      c.append(a, l, k.data(), v.data(), n);
      for (std::int32_t h = 0; h < 2; ++h) {  // demote about half of the demotable tokens
        std::vector<std::int32_t> d;
        for (std::int32_t t = cfg.sink_tokens; t < c.length(a, l, h); ++t)
          if (r.coin()) d.push_back(t);
        c.demote(a, l, h, d.data(), static_cast<std::int32_t>(d.size()));
      }
    }
    const auto b = c.fork(a);  // every page of both stores is now shared
    const std::vector<kvc::seq_id> seqs = {a, b};
    auto snap = [&] { return msnap<C>(c, seqs); };
    INFO("trial " << trial);
    std::vector<std::vector<std::int32_t>> kept(2);
    for (std::int32_t h = 0; h < 2; ++h) {
      const std::int32_t L = c.length(b, 0, h);
      kept[static_cast<std::size_t>(h)] = r.subset(L, r.integer(1, L - 1));
      std::sort(kept[static_cast<std::size_t>(h)].begin(), kept[static_cast<std::size_t>(h)].end());
    }
    const int failures = run_until_success([&] { c.keep_layer(b, 0, kept); }, snap);
    REQUIRE(failures >= 1);
    for (std::int32_t h = 0; h < 2; ++h) REQUIRE(c.length(b, 0, h) == static_cast<std::int32_t>(kept[static_cast<std::size_t>(h)].size()));
    std::vector<std::int32_t> one = r.subset(c.length(a, 1, 1), r.integer(1, c.length(a, 1, 1) - 1));
    std::sort(one.begin(), one.end());
    run_until_success([&] { c.keep(a, 1, 1, one.data(), static_cast<std::int32_t>(one.size())); }, snap);
    REQUIRE(c.length(a, 1, 1) == static_cast<std::int32_t>(one.size()));
    REQUIRE(c.low_cache().quant_pool().reserved_pages() == 0);
    c.remove_sequence(a);
    c.remove_sequence(b);
    REQUIRE(c.bytes_in_use() == 0);
  }
}
