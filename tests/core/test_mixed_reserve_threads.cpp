// SPDX-License-Identifier: Apache-2.0
// mixed_precision_cache::keep_layer under concurrent allocation from the same low-precision pool
// (docs/threading.md, built alone under ThreadSanitizer by scripts/test: label tsan).
//
// One thread compacts forked sequences (their low pages are shared, so each keep_layer needs
// low pages for copy-on-write) while other threads append to and demote into their own
// sequences of the same cache, keeping a small low pool nearly full (they compact their own
// sequences when a demotion runs out of pages). Before page_pool::reserve, keep_layer only
// checked that the low pool had the pages, committed the high store, and then allocated: an
// appender taking the pages in between made the low store's keep throw with the high store
// already compacted. Now every call must either complete or throw kvc::out_of_memory leaving its
// sequence exactly as before (lengths, positions, precision map, gathered K/V, page bytes), a
// completed keep must hold exactly the kept tokens (compaction moves per-token records as bytes:
// bit-exact), and once every sequence is removed no page may be in use or reserved.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <string>
#include <thread>
#include <vector>

#include <kvc/quant/int8.hpp>
#include <kvc/store/mixed_precision_cache.hpp>

#include "kvc_catch.hpp"
#include "random.hpp"

namespace {

using cache_t = kvc::mixed_precision_cache<kvc::quant::int8, kvc::quant::int2>;
constexpr std::int32_t kLayers = 2, kHeads = 2, kDim = 64, kPage = 8;
constexpr std::int32_t kLowPages = 80;  // tight: the appenders fill what the forks and their copies leave
constexpr std::int32_t kAppenders = 2, kForks = 6, kRounds = 8;

kvc::quant_cache_config config() {
  kvc::quant_cache_config c;
  c.num_layers = kLayers;
  c.num_kv_heads = kHeads;
  c.head_dim = kDim;
  c.page_size = kPage;
  c.max_pages = 4096;  // the high pool is not what this test squeezes
  c.max_fp_pages = 64;
  return c;
}

/// Everything one sequence holds (what a failed call must leave as it was). `broken`: the
/// precision map and the high store disagree on how many high tokens a stream has (what the old
/// gap left behind: the high store compacted, the map not); the rows are then not gathered,
/// since gather would read past the high store's stream.
struct seq_snap {
  std::vector<std::vector<float>> k, v;
  std::vector<std::vector<std::int32_t>> pos, low, regions;
  std::vector<std::size_t> bytes;
  bool broken = false;
  seq_snap(const cache_t& c, kvc::seq_id s, std::int32_t l0 = 0, std::int32_t l1 = kLayers) {
    for (std::int32_t l = l0; l < l1; ++l)
      for (std::int32_t h = 0; h < kHeads; ++h) {
        const std::int32_t L = c.length(s, l, h);
        low.push_back(c.low_indices(s, l, h));
        const auto r = c.high_cache().regions(s, l, h);
        regions.push_back({r.sink, r.quantized, r.residual});
        const auto high = std::count(low.back().begin(), low.back().end(), -1);
        if (high != r.sink + r.quantized + r.residual) broken = true;
        pos.emplace_back(c.positions(s, l, h), c.positions(s, l, h) + L);
        bytes.push_back(c.stream_bytes(s, l, h));
      }
    if (broken) return;
    for (std::int32_t l = l0; l < l1; ++l)
      for (std::int32_t h = 0; h < kHeads; ++h) {
        const std::int32_t L = c.length(s, l, h);
        k.emplace_back(static_cast<std::size_t>(L) * kDim);
        v.emplace_back(k.back().size());
        c.gather(s, l, h, k.back().data(), v.back().data());
      }
  }
  bool operator==(const seq_snap& o) const {
    return !broken && !o.broken && k == o.k && v == o.v && pos == o.pos && low == o.low && regions == o.regions &&
           bytes == o.bytes;
  }
};

void append_rows(cache_t& c, kvc::seq_id s, std::int32_t l, std::int32_t n, kvc_test::rng& r) {
  const auto k = r.normals(static_cast<std::size_t>(n) * kHeads * kDim), v = r.normals(k.size());
  c.append(s, l, k.data(), v.data(), n);
}

/// Demotes the high tokens of one stream except its newest `spare` (int8 keeps no sinks here and
/// no full-precision window: every high token is demotable).
void demote_all_but(cache_t& c, kvc::seq_id s, std::int32_t l, std::int32_t h, std::int32_t spare) {
  const auto& low = c.low_indices(s, l, h);
  std::vector<std::int32_t> d;
  for (std::int32_t t = 0; t + spare < static_cast<std::int32_t>(low.size()); ++t)
    if (low[static_cast<std::size_t>(t)] < 0) d.push_back(t);
  c.demote(s, l, h, d.data(), static_cast<std::int32_t>(d.size()));
}

/// What one thread did and what it found wrong (Catch2's assertions are not thread-safe: the
/// threads record, the test thread REQUIREs).
struct counts {
  std::int64_t done = 0, refused = 0;
  std::vector<std::string> errors;
  void check(bool ok, const std::string& what) {
    if (!ok && errors.size() < 20) errors.push_back(what);
  }
};

/// An appender's life: append and demote into its own sequence until told to stop; a demotion
/// refused for want of low pages must leave the sequence as it was, and the thread then drops
/// its oldest quarter (a compaction of unshared pages: no allocation, cannot fail) to free pages.
void appender(cache_t& c, kvc::seq_id s, std::uint64_t seed, const std::atomic<bool>& stop, counts& out) {
  kvc_test::rng r(seed);
  for (int step = 0; !stop.load(std::memory_order_acquire) || step < 8; ++step) {
    const std::int32_t l = step % kLayers;
    append_rows(c, s, l, r.integer(1, 6), r);  // high pool: never short here
    const std::int32_t h = r.integer(0, kHeads - 1);
    const seq_snap before(c, s, l, l + 1);  // a demotion writes only its layer
    try {
      demote_all_but(c, s, l, h, 2);
      ++out.done;
    } catch (const kvc::out_of_memory&) {
      ++out.refused;
      out.check(seq_snap(c, s, l, l + 1) == before, "a refused demotion changed the appender's sequence");
      // Free a few pages only (the oldest quarter), so the pool stays near full.
      std::vector<std::vector<std::int32_t>> kept(kHeads);
      for (std::int32_t hh = 0; hh < kHeads; ++hh) {
        const std::int32_t L = c.length(s, l, hh);
        for (std::int32_t t = L / 4; t < L; ++t) kept[static_cast<std::size_t>(hh)].push_back(t);
      }
      c.keep_layer(s, l, kept);  // unshared pages: takes none
    }
  }
}

/// The compactor: keep_layer on every layer of every fork (shared low pages: copy-on-write),
/// retrying while the appenders hold the pages. Each attempt completes exactly or changes nothing.
void compactor(cache_t& c, const std::vector<kvc::seq_id>& forks, std::uint64_t seed, counts& out) {
  kvc_test::rng r(seed);
  for (kvc::seq_id f : forks)
    for (std::int32_t l = 0; l < kLayers; ++l) {
      // Drop token 0 (low) and token 1 (high) and maybe a few more: every shared low page shifts,
      // so the copy-on-write needs as many pages as the keep reserves (or checked, before), and
      // the high store compacts its whole stream first.
      std::vector<std::vector<std::int32_t>> kept(kHeads);
      for (std::int32_t h = 0; h < kHeads; ++h) {
        const std::int32_t L = c.length(f, l, h);
        for (std::int32_t t = 2; t < L; ++t)
          if (t < 40 || r.coin(0.9)) kept[static_cast<std::size_t>(h)].push_back(t);
      }
      for (int attempt = 0; attempt < 4000; ++attempt) {
        const seq_snap before(c, f);
        try {
          c.keep_layer(f, l, kept);
        } catch (const kvc::out_of_memory&) {
          ++out.refused;
          // the old gap: the high store compacted, the low one not
          const seq_snap now(c, f);
          out.check(!now.broken, "a refused keep_layer left the fork's precision map and high store out of step");
          out.check(now == before, "a refused keep_layer changed the fork");
          if (now.broken) return;  // the fork can no longer be read safely
          std::this_thread::yield();
          continue;
        }
        ++out.done;
        const seq_snap after(c, f);
        out.check(!after.broken, "a completed keep_layer left the precision map and the high store out of step");
        if (after.broken) return;
        for (std::int32_t h = 0; h < kHeads; ++h) {  // exactly the kept tokens, bit for bit
          const std::size_t i = static_cast<std::size_t>(l * kHeads + h);
          const auto& kh = kept[static_cast<std::size_t>(h)];
          if (after.pos[i].size() != kh.size()) {
            out.check(false, "a completed keep_layer holds the wrong number of tokens");
            continue;
          }
          for (std::size_t j = 0; j < kh.size(); ++j) {
            const std::size_t t = static_cast<std::size_t>(kh[j]);
            const auto same = [&](const std::vector<float>& a, const std::vector<float>& b) {
              return std::equal(a.begin() + static_cast<std::ptrdiff_t>(j * kDim),
                                a.begin() + static_cast<std::ptrdiff_t>((j + 1) * kDim),
                                b.begin() + static_cast<std::ptrdiff_t>(t * kDim));
            };
            out.check(after.pos[i][j] == before.pos[i][t] && (after.low[i][j] < 0) == (before.low[i][t] < 0) &&
                          same(after.k[i], before.k[i]) && same(after.v[i], before.v[i]),
                      "a completed keep_layer does not hold exactly the kept tokens");
          }
          const std::size_t other = static_cast<std::size_t>((1 - l) * kHeads + h);  // the other layer: untouched
          out.check(after.pos[other] == before.pos[other] && after.k[other] == before.k[other],
                    "keep_layer changed another layer");
        }
        break;
      }
    }
}

}  // namespace

TEST_CASE("mixed_precision_cache: keep_layer of forks while other threads fill the same low pool",
          "[threads][tsan][mikv]") {
  cache_t c(config(), kLowPages);
  kvc_test::rng r(9001);
  std::vector<kvc::seq_id> mine;  // the appenders' sequences
  for (std::int32_t i = 0; i < kAppenders; ++i) mine.push_back(c.add_sequence());
  counts comp_total, app_total;
  for (int round = 0; round < kRounds; ++round) {
    INFO("round " << round);
    // Exclusive setup: a parent with half its tokens low, and forks sharing every page of it.
    const kvc::seq_id parent = c.add_sequence();
    for (std::int32_t l = 0; l < kLayers; ++l) {
      append_rows(c, parent, l, 160, r);
      for (std::int32_t h = 0; h < kHeads; ++h) {
        std::vector<std::int32_t> d;  // 14 low tokens: 2 shared low pages per stream
        for (std::int32_t t = 0; t < 28; t += 2) d.push_back(t);
        c.demote(parent, l, h, d.data(), static_cast<std::int32_t>(d.size()));
      }
    }
    std::vector<kvc::seq_id> forks;
    for (std::int32_t i = 0; i < kForks; ++i) forks.push_back(c.fork(parent));
    // Concurrent phase: one compactor, kAppenders appenders, each on its own sequences.
    std::atomic<bool> stop{false};
    counts comp;
    std::vector<counts> app(kAppenders);
    std::vector<std::thread> ts;
    for (std::int32_t i = 0; i < kAppenders; ++i)
      ts.emplace_back([&, i] {
        counts& a = app[static_cast<std::size_t>(i)];
        try {
          appender(c, mine[static_cast<std::size_t>(i)], 100u * static_cast<std::uint64_t>(round) + static_cast<std::uint64_t>(i),
                   stop, a);
        } catch (const std::exception& e) {
          a.check(false, std::string("appender threw: ") + e.what());
        }
      });
    ts.emplace_back([&] {
      try {
        compactor(c, forks, 7u + static_cast<std::uint64_t>(round), comp);
      } catch (const std::exception& e) {
        comp.check(false, std::string("compactor threw: ") + e.what());
      }
      stop.store(true, std::memory_order_release);
    });
    for (auto& t : ts) t.join();
    for (const auto& e : comp.errors) FAIL_CHECK(e);
    for (const auto& a : app)
      for (const auto& e : a.errors) FAIL_CHECK(e);
    REQUIRE(comp.errors.empty());
    for (const auto& a : app) REQUIRE(a.errors.empty());
    comp_total.done += comp.done;
    comp_total.refused += comp.refused;
    for (const auto& a : app) {
      app_total.done += a.done;
      app_total.refused += a.refused;
    }
    REQUIRE(c.low_cache().quant_pool().reserved_pages() == 0);  // every reservation went back
    // Exclusive cleanup of the round's sequences.
    for (kvc::seq_id f : forks) c.remove_sequence(f);
    c.remove_sequence(parent);
  }
  INFO("compactor: " << comp_total.done << " keeps done, " << comp_total.refused << " refused; appenders: "
                     << app_total.done << " demotions done, " << app_total.refused << " refused");
  REQUIRE(comp_total.done > 0);
  REQUIRE(app_total.refused > 0);  // the pool really was tight
  for (kvc::seq_id s : mine) c.remove_sequence(s);
  // Nothing leaked: no page in use or reserved in any pool.
  REQUIRE(c.bytes_in_use() == 0);
  REQUIRE(c.low_cache().quant_pool().free_pages() == kLowPages);
  REQUIRE(c.low_cache().quant_pool().reserved_pages() == 0);
  REQUIRE(c.high_cache().quant_pool().pages_in_use() == 0);
  WARN("compactor: " << comp_total.done << " keeps done, " << comp_total.refused << " refused; appenders: "
                     << app_total.done << " demotions done, " << app_total.refused << " refused");
}
