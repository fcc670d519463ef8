// SPDX-License-Identifier: Apache-2.0
// The host/device shared math of the CUDA decode kernels (<kvc/attention/split_plan.hpp>), run on
// the CPU in the ordinary suite (no GPU needed):
//  - softmax states: online updates (per score and per tile, with masked -inf scores) and exact
//    merges in any split and any merge order, against softmax / log-sum-exp computed in double
//    over the whole range;
//  - the split-K plan: the items of every (stream, head block) tile its tokens in order exactly
//    once, never cross a segment, respect the chunk, and partial states map one-to-one to merge
//    jobs; the chunk heuristic's stated rules;
//  - paged row offsets against kvc's own layout_paged mapping (NHD, HND, page offsets, strides)
//    and against kv_cache's stream views.
//
// Tolerance for the merges: float work over <= 4096 unit-size scores; 1e-5 relative to max|v| for
// outputs and 1e-5 * max(1, |lse|) for the log-sum-exp (~100 float epsilons; a lost or doubled
// chunk moves them by >= 1e-3).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include <kvc/attention/split_plan.hpp>
#include <kvc/store/kv_cache.hpp>
#include <kvc/view/layout_paged.hpp>

#include "kvc_catch.hpp"
#include "random.hpp"

namespace {

using kvc::splitk::softmax_state;

struct dref {
  std::vector<double> out;
  double lse;
};

/// softmax(s) . V and log-sum-exp in double over all n scores.
dref reference(const std::vector<float>& s, const std::vector<float>& v, int D) {
  const std::size_t n = s.size();
  dref r{std::vector<double>(static_cast<std::size_t>(D), 0.0), -INFINITY};
  if (n == 0) return r;
  double m = -INFINITY;
  for (float x : s) m = std::max(m, static_cast<double>(x));
  double l = 0;
  for (std::size_t t = 0; t < n; ++t) {
    const double e = std::exp(static_cast<double>(s[t]) - m);
    l += e;
    for (int d = 0; d < D; ++d) r.out[static_cast<std::size_t>(d)] += e * v[t * D + static_cast<std::size_t>(d)];
  }
  for (auto& x : r.out) x /= l;
  r.lse = m + std::log(l);
  return r;
}

struct partial {
  softmax_state st;
  std::vector<float> o;
};

/// State of scores [t0, t1) pushed in tiles of `tile` (0: one score at a time with push_score).
partial attend(const std::vector<float>& s, const std::vector<float>& v, int D, int t0, int t1, int tile) {
  partial p{{}, std::vector<float>(static_cast<std::size_t>(D), 0.0f)};
  if (tile == 0) {
    for (int t = t0; t < t1; ++t) {
      const auto f = kvc::splitk::push_score(p.st, s[static_cast<std::size_t>(t)]);
      for (int d = 0; d < D; ++d) p.o[d] = p.o[d] * f.corr + f.p * v[static_cast<std::size_t>(t) * D + d];
    }
    return p;
  }
  std::vector<float> pr(static_cast<std::size_t>(tile));
  for (int t = t0; t < t1; t += tile) {
    const int n = std::min(tile, t1 - t);
    const float corr = kvc::splitk::push_scores(p.st, s.data() + t, n, pr.data());
    for (int d = 0; d < D; ++d) {
      float acc = p.o[d] * corr;
      for (int i = 0; i < n; ++i) acc += pr[i] * v[static_cast<std::size_t>(t + i) * D + d];
      p.o[d] = acc;
    }
  }
  return p;
}

void merge_into(partial& a, const partial& b) {
  const auto w = kvc::splitk::merge_states(a.st, b.st, a.st);
  for (std::size_t d = 0; d < a.o.size(); ++d) a.o[d] = a.o[d] * w.wa + b.o[d] * w.wb;
}

void check_against(const partial& p, const dref& r, double vmax) {
  const float lse = kvc::splitk::state_lse(p.st);
  if (r.lse == -INFINITY) {
    REQUIRE(lse == -INFINITY);
    return;
  }
  REQUIRE(std::fabs(lse - r.lse) <= 1e-5 * std::max(1.0, std::fabs(r.lse)));
  for (std::size_t d = 0; d < r.out.size(); ++d) {
    const double o = p.st.l > 0 ? p.o[d] / p.st.l : 0.0;
    INFO("d = " << d << " out = " << o << " ref = " << r.out[d]);
    REQUIRE(std::fabs(o - r.out[d]) <= 1e-5 * vmax);
  }
}

}  // namespace

TEST_CASE("softmax states: online updates and exact merges match a double softmax", "[cuda_host][split]") {
  kvc_test::rng g(601);
  const int D = 8;
  for (int trial = 0; trial < 200; ++trial) {
    const int n = trial < 5 ? trial : g.integer(1, 4096);
    const float spread = g.coin(0.2) ? 60.0f : 4.0f;  // wide spreads underflow most terms
    std::vector<float> s(static_cast<std::size_t>(n)), v(static_cast<std::size_t>(n) * D);
    for (auto& x : s) x = g.uniform(-spread, spread);
    double vmax = 1e-30;
    for (auto& x : v) {
      x = g.normal();
      vmax = std::max(vmax, static_cast<double>(std::fabs(x)));
    }
    const dref r = reference(s, v, D);
    const int tile = g.integer(0, 3) == 0 ? 0 : g.integer(1, 64);
    INFO("trial " << trial << " n = " << n << " tile = " << tile);
    // Whole range, one state.
    check_against(attend(s, v, D, 0, n, tile), r, vmax);
    // Random cut points, merged left to right and in a random order (merging is associative
    // and commutative up to rounding).
    std::vector<int> cuts{0, n};
    const int k = g.integer(0, 12);
    for (int i = 0; i < k; ++i) cuts.push_back(g.integer(0, n));
    std::sort(cuts.begin(), cuts.end());
    std::vector<partial> parts;
    for (std::size_t i = 0; i + 1 < cuts.size(); ++i) parts.push_back(attend(s, v, D, cuts[i], cuts[i + 1], tile));
    partial acc{{}, std::vector<float>(D, 0.0f)};
    for (const auto& p : parts) merge_into(acc, p);
    check_against(acc, r, vmax);
    std::vector<std::size_t> order(parts.size());
    std::iota(order.begin(), order.end(), std::size_t{0});
    for (std::size_t i = order.size(); i > 1; --i) std::swap(order[i - 1], order[static_cast<std::size_t>(g.integer(0, static_cast<int>(i) - 1))]);
    partial acc2{{}, std::vector<float>(D, 0.0f)};
    for (std::size_t i : order) merge_into(acc2, parts[i]);
    check_against(acc2, r, vmax);
  }
}

TEST_CASE("softmax states: empty states and masked scores", "[cuda_host][split]") {
  softmax_state a, b, out;
  auto w = kvc::splitk::merge_states(a, b, out);
  REQUIRE(w.wa == 0.0f);
  REQUIRE(w.wb == 0.0f);
  REQUIRE(out.m == -INFINITY);
  REQUIRE(out.l == 0.0f);
  REQUIRE(kvc::splitk::state_lse(out) == -INFINITY);
  // Empty merged with non-empty is the identity.
  b.m = 3.0f, b.l = 2.0f;
  w = kvc::splitk::merge_states(a, b, out);
  REQUIRE(w.wa == 0.0f);
  REQUIRE(w.wb == 1.0f);
  REQUIRE(out.m == 3.0f);
  REQUIRE(out.l == 2.0f);
  // A tile of masked scores leaves an empty state empty (no NaN from -inf - -inf).
  softmax_state e;
  const float masked[3] = {-INFINITY, -INFINITY, -INFINITY};
  float p[3] = {1, 1, 1};
  REQUIRE(kvc::splitk::push_scores(e, masked, 3, p) == 1.0f);
  REQUIRE(e.m == -INFINITY);
  REQUIRE(e.l == 0.0f);
  REQUIRE((p[0] == 0.0f && p[1] == 0.0f && p[2] == 0.0f));
  // Masked scores next to real ones weigh nothing.
  const float mixed[3] = {1.0f, -INFINITY, 1.0f};
  kvc::splitk::push_scores(e, mixed, 3, p);
  REQUIRE(p[1] == 0.0f);
  REQUIRE(e.l == 2.0f);
  REQUIRE(e.m == 1.0f);
  // Far-apart maxima do not overflow.
  softmax_state x{1000.0f, 1.0f}, y{-1000.0f, 5.0f};
  w = kvc::splitk::merge_states(x, y, out);
  REQUIRE(out.m == 1000.0f);
  REQUIRE(out.l == 1.0f);
  REQUIRE(w.wb == 0.0f);
}

namespace {

void check_plan(const kvc::splitk::split_plan& plan, const std::vector<std::int32_t>& len, std::int32_t G,
                const std::vector<std::int32_t>* segs, std::int32_t nseg) {
  using kvc::splitk::max_group_block;
  const std::int32_t S = static_cast<std::int32_t>(len.size());
  std::vector<int> part_seen(static_cast<std::size_t>(plan.num_partials), 0);
  std::size_t i = 0;
  for (std::int32_t s = 0; s < S; ++s)
    for (std::int32_t g0 = 0; g0 < G; g0 += max_group_block) {
      const std::int32_t gn = std::min(max_group_block, G - g0);
      std::int32_t t = 0;
      std::size_t first = i;
      while (i < plan.items.size() && plan.items[i].stream == s && plan.items[i].g0 == g0) {
        const auto& it = plan.items[i];
        INFO("stream " << s << " g0 " << g0 << " item [" << it.t0 << ", " << it.t1 << ")");
        REQUIRE(it.gn == gn);
        REQUIRE(it.t0 == t);
        REQUIRE(it.t1 >= it.t0);
        REQUIRE(it.t1 - it.t0 <= plan.chunk);
        if (segs) {  // inside one segment, the one it names
          std::int32_t a = 0;
          for (std::int32_t k = 0; k < it.seg; ++k) a += (*segs)[static_cast<std::size_t>(s * nseg + k)];
          const std::int32_t b = a + (*segs)[static_cast<std::size_t>(s * nseg + it.seg)];
          REQUIRE((it.t0 >= a && it.t1 <= b));
        }
        t = it.t1;
        ++i;
      }
      REQUIRE(i > first);
      REQUIRE(t == len[static_cast<std::size_t>(s)]);
      const std::size_t count = i - first;
      if (count == 1) {
        REQUIRE(plan.items[first].part == -1);
      } else {
        const auto job = std::find_if(plan.merges.begin(), plan.merges.end(),
                                      [&](const kvc::splitk::merge_job& j) { return j.stream == s && j.g0 == g0; });
        REQUIRE(job != plan.merges.end());
        REQUIRE(job->gn == gn);
        REQUIRE(job->count == static_cast<std::int32_t>(count));
        for (std::size_t k = first; k < i; ++k) {
          REQUIRE(plan.items[k].part == job->first + static_cast<std::int32_t>(k - first));
          ++part_seen[static_cast<std::size_t>(plan.items[k].part)];
        }
      }
    }
  REQUIRE(i == plan.items.size());
  for (int c : part_seen) REQUIRE(c == 1);
}

}  // namespace

TEST_CASE("split plan: items tile every stream exactly once, partials map to merge jobs", "[cuda_host][split]") {
  kvc_test::rng g(602);
  for (int trial = 0; trial < 300; ++trial) {
    const std::int32_t S = g.integer(0, 40), G = g.integer(1, 20);
    std::vector<std::int32_t> len(static_cast<std::size_t>(S));
    for (auto& n : len) n = g.coin(0.1) ? 0 : g.integer(1, g.coin(0.3) ? 200000 : 3000);
    kvc::splitk::split_params p;
    p.num_sms = g.integer(1, 140);
    p.blocks_per_sm = g.integer(1, 8);
    p.min_chunk = g.integer(1, 600);
    p.align = g.integer(1, 128);
    if (g.coin(0.3)) p.chunk_override = g.integer(1, 500);
    const bool with_segs = g.coin(0.5);
    std::vector<std::int32_t> segs;
    if (with_segs)
      for (auto n : len) {
        const std::int32_t a = g.integer(0, std::min(n, 8)), b = g.integer(0, n - a);
        segs.insert(segs.end(), {a, b, n - a - b});
      }
    INFO("trial " << trial << " S = " << S << " G = " << G);
    const auto plan = kvc::splitk::plan_splits(len.data(), S, G, p, with_segs ? segs.data() : nullptr, with_segs ? 3 : 1);
    check_plan(plan, len, G, with_segs ? &segs : nullptr, 3);
    if (p.chunk_override > 0) REQUIRE(plan.chunk == p.chunk_override);
  }
}

TEST_CASE("split plan: the chunk heuristic", "[cuda_host][split]") {
  using kvc::splitk::choose_chunk;
  kvc::splitk::split_params p;  // 132 SMs x 4 blocks = 528 target blocks
  const std::int32_t none = std::numeric_limits<std::int32_t>::max();
  // Enough (stream, head-block) units to fill the machine: no split.
  REQUIRE(choose_chunk(64LL * 8 * 32768, 64 * 8 + 16, 32768, p) == none);
  // Batch 1, 8 kv heads, 32k: 262144 tokens over 528 blocks = 497 -> 512 (multiple of 64).
  REQUIRE(choose_chunk(8LL * 32768, 8, 32768, p) == 512);
  // Short streams are not split below min_chunk.
  REQUIRE(choose_chunk(8LL * 200, 8, 200, p) == none);
  REQUIRE(choose_chunk(8LL * 4096, 8, 4096, p) == 256);
  // A chunk covering the longest stream is no split.
  p.min_chunk = 5000;
  REQUIRE(choose_chunk(8LL * 4096, 8, 4096, p) == none);
}

TEST_CASE("split plan: bad input names the argument", "[cuda_host][split]") {
  const std::vector<std::int32_t> len{4, -1};
  REQUIRE_THROWS_WITH(kvc::splitk::plan_splits(len.data(), 2, 1), Catch::Contains("lengths[1] = -1"));
  const std::vector<std::int32_t> ok{4, 5};
  REQUIRE_THROWS_WITH(kvc::splitk::plan_splits(ok.data(), 2, 0), Catch::Contains("G = 0"));
  const std::vector<std::int32_t> segs{1, 2, 1, 0, 0, 4};
  REQUIRE_THROWS_WITH(kvc::splitk::plan_splits(ok.data(), 2, 1, {}, segs.data(), 3),
                      Catch::Contains("stream 1: segments sum to 4, expected lengths[1] = 5"));
  REQUIRE_THROWS_WITH(kvc::splitk::store_rows(12, 64, 2 * 12 * 64), Catch::Contains("page_size = 12"));
  REQUIRE_THROWS_WITH(kvc::splitk::engine_rows(false, 16, 4, 64, 100), Catch::Contains("page_stride = 100"));
}

TEST_CASE("paged rows: offsets equal kvc's layout_paged mapping", "[cuda_host][paged]") {
  kvc_test::rng g(603);
  for (int trial = 0; trial < 200; ++trial) {
    const bool hnd = g.coin();
    const std::int32_t P = 1 << g.integer(0, 6), H = g.integer(1, 8), D = 8 * g.integer(1, 32);
    const std::int32_t n = g.integer(1, 500);
    const std::int32_t pages = (n + P - 1) / P;
    const std::int64_t stride = std::int64_t{P} * H * D * g.integer(1, 2) + (g.coin() ? 8 : 0);
    const std::int64_t offset = g.coin() ? std::int64_t{P} * H * D : 0;
    std::vector<std::int32_t> table(static_cast<std::size_t>(pages));
    for (auto& t : table) t = g.integer(0, 10000);
    const auto rows = kvc::splitk::engine_rows(hnd, P, H, D, stride);
    kvc::kv_dextents<> e(n, H, D);
    INFO("trial " << trial << " hnd " << hnd << " P " << P << " H " << H << " D " << D);
    for (int k = 0; k < 50; ++k) {
      const std::int32_t t = g.integer(0, n - 1), h = g.integer(0, H - 1), d = g.integer(0, D - 1);
      std::int64_t want;
      if (hnd) {
        kvc::layout_paged<kvc::page_order::hnd>::mapping<kvc::kv_dextents<>> m(e, table.data(), P, stride, offset);
        want = m(t, h, d);
      } else {
        kvc::layout_paged<kvc::page_order::nhd>::mapping<kvc::kv_dextents<>> m(e, table.data(), P, stride, offset);
        want = m(t, h, d);
      }
      REQUIRE(rows.offset(table.data(), t, h) + offset + d == want);
    }
  }
}

TEST_CASE("paged rows: store_rows addresses kv_cache's K and V pages", "[cuda_host][paged]") {
  kvc_test::rng g(604);
  kvc::cache_config cfg;
  cfg.num_layers = 2;
  cfg.num_kv_heads = 3;
  cfg.head_dim = 64;
  cfg.page_size = 8;
  cfg.max_pages = 256;
  kvc::kv_cache<kvc::half> c(cfg);
  const auto s = c.add_sequence();
  const std::int32_t n = 37;
  const auto k = g.normals(static_cast<std::size_t>(n) * 3 * 64);
  const auto v = g.normals(static_cast<std::size_t>(n) * 3 * 64);
  c.append(s, 1, k.data(), v.data(), n);
  const auto stride = static_cast<std::int64_t>(c.pool().page_bytes() / sizeof(kvc::half));
  const auto rows = kvc::splitk::store_rows(cfg.page_size, cfg.head_dim, stride);
  const auto* base = reinterpret_cast<const kvc::half*>(c.pool().base());
  for (std::int32_t h = 0; h < 3; ++h) {
    const auto kv = c.keys(s, 1, h);
    const auto vv = c.values(s, 1, h);
    const std::int32_t* table = c.pages(s, 1, h).data();
    for (std::int32_t t = 0; t < n; ++t)
      for (std::int32_t d = 0; d < 64; d += 7) {
        REQUIRE(&kv(t, 0, d) == base + rows.offset(table, t, 0) + d);
        REQUIRE(&vv(t, 0, d) == base + rows.offset(table, t, 0) + std::int64_t{cfg.page_size} * cfg.head_dim + d);
        REQUIRE(static_cast<float>(kv(t, 0, d)) == static_cast<float>(kvc::half(k[(static_cast<std::size_t>(t) * 3 + h) * 64 + d])));
      }
  }
}
