// SPDX-License-Identifier: Apache-2.0
// KVMerger (kvc/merge/kvmerger.hpp) against its rule written here in double, from the rows
// gathered before the step, per kv head: tokens t − 1 and t are linked when neither is protected
// and cos(k_{t−1}, k_t) > ε (zero key: cosine 0); the merging sets are the maximal runs of linked
// tokens (found here by a forward pass; the code scans backward); the pivot is the member with the
// largest score (the first on ties); member i gets g_i = exp(−‖k_i − k_p‖² / (2σ²)); the set
// becomes one token at the pivot with key and value Σ g_i·exp(lw_i)·x_i / Σ g_i·exp(lw_i) and
// log-weight log Σ exp(lw_i); every other token is unchanged. Nothing of kvmerger_plan or
// merge_layer is reused by the reference.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include <kvc/cpu/merged_attention.hpp>
#include <kvc/merge/kvmerger.hpp>
#include <kvc/store/merged_cache.hpp>

#include "cache_builders.hpp"
#include "cache_checks.hpp"
#include "fast_require.hpp"
#include "kvc_catch.hpp"
#include "merge_test_util.hpp"
#include "random.hpp"

namespace {

using kvc_test::premerge;

using kvc::merge::kvmerger_options;
using kvc::merge::merge_group;
using kvc::merge::merged_cache;

using kvc_test::copy_stream;
using kvc_test::stream_copy;

using ivec = std::vector<std::int32_t>;

/// Cosine in double, each vector normalised first; 0 when either is the zero vector.
double cosine(const float* a, const float* b, std::int32_t D) {
  double na = 0, nb = 0;
  for (std::int32_t d = 0; d < D; ++d) na += double{a[d]} * a[d], nb += double{b[d]} * b[d];
  if (na == 0 || nb == 0) return 0;
  na = std::sqrt(na), nb = std::sqrt(nb);
  double s = 0;
  for (std::int32_t d = 0; d < D; ++d) s += (a[d] / na) * (b[d] / nb);
  return s;
}

/// One reference merging set.
struct ref_set {
  ivec members;  // ascending
  std::int32_t pivot = -1;
  std::vector<double> g;  // unnormalised Gaussian weights, per member
};

std::vector<ref_set> reference_sets(const stream_copy& b, const std::vector<float>& score, const ivec& protect,
                                    std::int32_t D, double eps, double sigma) {
  std::vector<char> prot(static_cast<std::size_t>(b.n), 0);
  for (std::int32_t t : protect) prot[static_cast<std::size_t>(t)] = 1;
  std::vector<ref_set> out;
  ivec run;
  auto close = [&] {
    if (run.size() >= 2) {
      ref_set s;
      s.members = run;
      s.pivot = run[0];
      for (std::int32_t t : run)
        if (score[static_cast<std::size_t>(t)] > score[static_cast<std::size_t>(s.pivot)]) s.pivot = t;
      for (std::int32_t t : run) {
        double d2 = 0;
        for (std::int32_t d = 0; d < D; ++d) {
          const double x = double{b.k[static_cast<std::size_t>(t) * D + d]} - b.k[static_cast<std::size_t>(s.pivot) * D + d];
          d2 += x * x;
        }
        s.g.push_back(std::exp(-d2 / (2 * sigma * sigma)));
      }
      out.push_back(s);
    }
    run.clear();
  };
  for (std::int32_t t = 0; t < b.n; ++t) {
    const bool linked = t > 0 && !prot[static_cast<std::size_t>(t)] && !prot[static_cast<std::size_t>(t - 1)] &&
                        cosine(&b.k[static_cast<std::size_t>(t - 1) * D], &b.k[static_cast<std::size_t>(t) * D], D) > eps;
    if (!linked) close();
    run.push_back(t);
  }
  close();
  return out;
}

/// Per kv head: runs of 1..8 tokens whose keys are near copies of the run's base key (noise
/// 0.01..0.5 of it, sometimes an exact copy, sometimes a rescaled copy: same direction, another
/// distance), so that adjacent similarities spread over the thresholds; sometimes a zero key.
template <class T>
void fill_runs(merged_cache<T>& c, kvc::seq_id s, std::int32_t layer, std::int32_t L, kvc_test::rng& r,
               bool exact_copies = true) {
  const std::int32_t H = c.config().num_kv_heads, D = c.config().head_dim;
  std::vector<float> k(static_cast<std::size_t>(L) * H * D);
  const auto v = r.normals(k.size());
  for (std::int32_t h = 0; h < H; ++h) {
    std::vector<float> base;
    std::int32_t left = 0;
    float noise = 0;
    for (std::int32_t t = 0; t < L; ++t) {
      float* row = &k[(static_cast<std::size_t>(t) * H + h) * D];
      if (left == 0) {
        base = r.normals(static_cast<std::size_t>(D));
        left = r.integer(1, 8);
        noise = exact_copies && r.coin(0.2) ? 0.0f : r.uniform(0.01f, 0.5f);
      }
      --left;
      const float scale = r.coin(0.15) ? r.uniform(0.3f, 3.0f) : 1.0f;
      for (std::int32_t d = 0; d < D; ++d) row[d] = scale * base[static_cast<std::size_t>(d)] + noise * r.normal();
      if (r.coin(0.02))
        for (std::int32_t d = 0; d < D; ++d) row[d] = 0.0f;
    }
  }
  c.append(s, layer, k.data(), v.data(), L);
}

std::vector<float> random_scores(std::int32_t n, int kind, kvc_test::rng& r) {
  std::vector<float> sc(static_cast<std::size_t>(n));
  for (auto& x : sc)
    x = kind == 0 ? r.uniform(0.0f, 1.0f) : kind == 1 ? static_cast<float>(r.integer(0, 2)) : r.uniform(-3.0f, 3.0f);
  return sc;
}

ivec random_protect(std::int32_t n, kvc_test::rng& r) {
  ivec p = r.subset(n, r.integer(0, n / 3));
  if (n > 0 && r.coin()) {  // a recent window, as the paper protects
    const std::int32_t w = r.integer(1, std::min(n, 6));
    for (std::int32_t t = n - w; t < n; ++t) p.push_back(t);
    std::sort(p.begin(), p.end());
    p.erase(std::unique(p.begin(), p.end()), p.end());
  }
  return p;
}

/// The stream after a step, against the reference sets: each set's pivot is the weighted mean
/// of its members (weights g_i·exp(lw_i)) carrying their mass, its other members and the
/// `dropped` tokens are gone, every other token is unchanged, in order.
void check_after(const stream_copy& b, const stream_copy& a, const std::vector<ref_set>& ref, const ivec& dropped,
                 std::int32_t D, bool fp16, std::int32_t h) {
  std::vector<std::int32_t> set_of(static_cast<std::size_t>(b.n), -1);  // token -> set index
  for (std::size_t i = 0; i < ref.size(); ++i)
    for (std::int32_t t : ref[i].members) set_of[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(i);
  std::vector<char> gone(static_cast<std::size_t>(b.n), 0);
  for (std::int32_t t : dropped) gone[static_cast<std::size_t>(t)] = 1;
  const double tol = kvc_test::merged_row_tol(fp16);
  std::int32_t i = 0;
  for (std::int32_t t = 0; t < b.n; ++t) {
    const std::int32_t si = set_of[static_cast<std::size_t>(t)];
    if (gone[static_cast<std::size_t>(t)]) continue;
    if (si >= 0 && ref[static_cast<std::size_t>(si)].pivot != t) continue;  // merged away
    REQUIRE(i < a.n);
    const std::size_t ia = static_cast<std::size_t>(i), tb = static_cast<std::size_t>(t);
    REQUIRE(a.pos[ia] == b.pos[tb]);
    if (si < 0) {
      REQUIRE(a.lw[ia] == b.lw[tb]);
      for (std::int32_t d = 0; d < D; ++d) {
        REQUIRE(a.k[ia * D + static_cast<std::size_t>(d)] == b.k[tb * D + static_cast<std::size_t>(d)]);
        REQUIRE(a.v[ia * D + static_cast<std::size_t>(d)] == b.v[tb * D + static_cast<std::size_t>(d)]);
      }
    } else {
      const ref_set& rs = ref[static_cast<std::size_t>(si)];
      double mass = 0, asum = 0;
      std::vector<double> kk(static_cast<std::size_t>(D), 0.0), vv(kk.size(), 0.0);
      for (std::size_t j = 0; j < rs.members.size(); ++j) {
        const std::size_t u = static_cast<std::size_t>(rs.members[j]);
        const double m = std::exp(double{b.lw[u]});
        mass += m;
        asum += rs.g[j] * m;
        for (std::int32_t d = 0; d < D; ++d) {
          kk[static_cast<std::size_t>(d)] += rs.g[j] * m * b.k[u * D + static_cast<std::size_t>(d)];
          vv[static_cast<std::size_t>(d)] += rs.g[j] * m * b.v[u * D + static_cast<std::size_t>(d)];
        }
      }
      const double lw = std::log(mass);
      KVC_REQUIRE(std::fabs(a.lw[ia] - lw) <= 1e-6 * (1 + std::fabs(lw)), "h " << h << " token " << t << ": lw " << a.lw[ia] << " vs " << lw);
      for (std::int32_t d = 0; d < D; ++d) {
        const double wk = kk[static_cast<std::size_t>(d)] / asum, wv = vv[static_cast<std::size_t>(d)] / asum;
        KVC_REQUIRE(std::fabs(a.k[ia * D + static_cast<std::size_t>(d)] - wk) <= tol * (std::fabs(wk) + 1),
                    "h " << h << " token " << t << " d " << d << ": k " << a.k[ia * D + static_cast<std::size_t>(d)] << " vs " << wk);
        KVC_REQUIRE(std::fabs(a.v[ia * D + static_cast<std::size_t>(d)] - wv) <= tol * (std::fabs(wv) + 1),
                    "h " << h << " token " << t << " d " << d << ": v " << a.v[ia * D + static_cast<std::size_t>(d)] << " vs " << wv);
      }
    }
    ++i;
  }
  REQUIRE(i == a.n);
}

template <class T>
void rule_trials(std::uint64_t salt) {
  const bool fp16 = std::is_same<T, kvc::half>::value;
  std::int64_t sets_total = 0, off_first = 0, uneven = 0, premerged_members = 0;
  for (int trial = 0; trial < 120; ++trial) {
    kvc_test::rng r(salt + static_cast<std::uint64_t>(trial));
    const std::int32_t H = r.integer(1, 4), D = trial % 9 == 4 ? 1 : r.integer(2, 48), P = 1 << r.integer(0, 4), layers = 2;
    merged_cache<T> c(kvc_test::cache_shape(layers, H, D, P, 4096));
    const kvc::seq_id s = c.add_sequence();
    const std::int32_t layer = r.integer(0, layers - 1);
    fill_runs(c, s, 0, r.integer(1, 100), r);
    fill_runs(c, s, 1, r.integer(1, 100), r);
    if (r.coin(0.4)) premerge(c, s, layer, r, 11);
    kvmerger_options o;
    if (trial % 4 != 0) o.threshold = trial % 7 == 1 ? r.uniform(-0.5f, 0.5f) : r.uniform(0.5f, 0.999f);
    if (trial % 3 != 0) o.sigma = r.uniform(0.2f, 10.0f);
    std::vector<std::vector<float>> scores;
    std::vector<ivec> protect;
    std::vector<stream_copy> before;
    for (std::int32_t h = 0; h < H; ++h) {
      before.push_back(copy_stream(c, s, layer, h));
      const std::int32_t n = before.back().n;
      scores.push_back(random_scores(n, trial % 3, r));
      protect.push_back(trial % 5 == 2 ? ivec{} : random_protect(n, r));
    }
    const std::size_t bytes_before = c.bytes_in_use();
    INFO("trial " << trial << (fp16 ? " fp16" : " fp32") << " H=" << H << " D=" << D << " P=" << P
                  << " eps=" << o.threshold << " sigma=" << o.sigma);
    const auto plan = kvc::merge::kvmerger_merge_layer(c, s, layer, scores, protect, o);

    std::int64_t sets = 0, removed = 0;
    REQUIRE(plan.heads.size() == static_cast<std::size_t>(H));
    for (std::int32_t h = 0; h < H; ++h) {
      const stream_copy& b = before[static_cast<std::size_t>(h)];
      const auto& sc = scores[static_cast<std::size_t>(h)];
      const auto& pr = protect[static_cast<std::size_t>(h)];
      const auto ref = reference_sets(b, sc, pr, D, double{o.threshold}, double{o.sigma});
      const auto& groups = plan.heads[static_cast<std::size_t>(h)].groups;
      // The sets, pivots and weights.
      REQUIRE(groups.size() == ref.size());
      for (std::size_t i = 0; i < ref.size(); ++i) {
        const ref_set& rs = ref[i];
        const merge_group& g = groups[i];
        KVC_REQUIRE(g.members == rs.members, "h " << h << " set " << i << " from " << rs.members.front());
        KVC_REQUIRE(g.target == rs.pivot, "h " << h << " set " << i << ": pivot " << g.target << " vs " << rs.pivot);
        double z = 0;
        for (double x : rs.g) z += x;
        REQUIRE(g.weights.size() == rs.g.size());
        for (std::size_t j = 0; j < rs.g.size(); ++j)
          KVC_REQUIRE(std::fabs(g.weights[j] - rs.g[j] / z) <= 1e-6,
                      "h " << h << " set " << i << " member " << j << ": " << g.weights[j] << " vs " << rs.g[j] / z);
        for (std::int32_t t : rs.members) {
          // Protected tokens never join a set.
          KVC_REQUIRE(!std::binary_search(pr.begin(), pr.end(), t), "h " << h << " protected token " << t << " merged");
          if (b.lw[static_cast<std::size_t>(t)] != 0.0f) ++premerged_members;
        }
        ++sets;
        removed += static_cast<std::int64_t>(rs.members.size()) - 1;
        if (rs.pivot != rs.members.front()) ++off_first;
        if (std::fabs(rs.g.back() / z - rs.g.front() / z) > 1e-3) ++uneven;
      }
      // The cache after the step: the pivots merged, the other members gone, the rest as they were.
      check_after(b, copy_stream(c, s, layer, h), ref, {}, D, fp16, h);
    }
    REQUIRE(plan.sets == sets);
    REQUIRE(plan.removed == removed);
    sets_total += sets;
    // Accounting: never more bytes, and the pool's own figure.
    REQUIRE(c.bytes_in_use() <= bytes_before);
    REQUIRE(c.bytes_in_use() == static_cast<std::size_t>(c.cache().pool().pages_in_use()) * c.cache().pool().page_bytes());
  }
  // The trials exercise what matters, many times each: sets form, pivots other than the first
  // member, weights that differ within a set, members that were merged before.
  REQUIRE(sets_total > 500);
  REQUIRE(off_first > 100);
  REQUIRE(uneven > 100);
  REQUIRE(premerged_members > 50);
}


}  // namespace

TEST_CASE("KVMerger merges runs of similar adjacent keys by the rule, in double", "[merge][kvmerger]") {
  rule_trials<float>(13100);
  rule_trials<kvc::half>(13200);
}

TEST_CASE("KVMerger with a threshold above every similarity changes nothing", "[merge][kvmerger]") {
  std::int64_t merged_just_below = 0;
  for (int trial = 0; trial < 40; ++trial) {
    kvc_test::rng r(13300 + static_cast<std::uint64_t>(trial));
    const std::int32_t H = r.integer(1, 3), D = r.integer(2, 32), P = 1 << r.integer(0, 3);
    merged_cache<float> c(kvc_test::cache_shape(1, H, D, P, 4096));
    const kvc::seq_id s = c.add_sequence();
    fill_runs(c, s, 0, r.integer(2, 80), r, trial % 4 == 0);  // no exact copies in most trials
    if (r.coin()) premerge(c, s, 0, r, 11);
    std::vector<std::vector<float>> scores;
    double best = -2;  // the largest adjacent similarity of the layer, by the reference's cosine
    for (std::int32_t h = 0; h < H; ++h) {
      const stream_copy b = copy_stream(c, s, 0, h);
      scores.push_back(random_scores(b.n, 0, r));
      for (std::int32_t t = 1; t < b.n; ++t)
        best = std::max(best, cosine(&b.k[static_cast<std::size_t>(t - 1) * D], &b.k[static_cast<std::size_t>(t) * D], D));
    }
    const std::vector<ivec> none(static_cast<std::size_t>(H));
    const auto before = kvc_test::full_state(c, {s});
    INFO("trial " << trial << " H=" << H << " D=" << D << " best=" << best);
    kvmerger_options o;
    // Exact copies have cosine 1 up to rounding: above 1 + 1e-6, nothing passes; and just above
    // the largest similarity when that is below 1 − 1e-6.
    for (float eps : {1.000001f, 2.0f, 1e30f, best < 1 - 1e-6 ? std::nextafter(static_cast<float>(best + 1e-7), 2.0f) : 1.5f}) {
      o.threshold = eps;
      const auto plan = kvc::merge::kvmerger_merge_layer(c, s, 0, scores, none, o);
      REQUIRE(plan.sets == 0);
      REQUIRE(plan.removed == 0);
      REQUIRE(kvc_test::full_state(c, {s}) == before);
    }
    // Just below the largest similarity, at least that pair merges: the boundary is the threshold.
    if (best > -1 && best < 1 - 1e-6) {
      o.threshold = static_cast<float>(best - 1e-5);
      const auto plan = kvc::merge::kvmerger_merge_layer(c, s, 0, scores, none, o);
      REQUIRE(plan.sets >= 1);
      ++merged_just_below;
    }
  }
  REQUIRE(merged_just_below >= 10);
}

TEST_CASE("KVMerger's threshold is strict: a similarity equal to it does not merge", "[merge][kvmerger]") {
  // D = 1: every cosine is exactly ±1 (in double: a·b / (|a|·|b|)); a zero key has cosine 0.
  kvc_test::rng r(13350);
  merged_cache<float> c(kvc_test::cache_shape(1, 1, 1, 4, 64));
  const kvc::seq_id s = c.add_sequence();
  const std::vector<float> k = {1.0f, 2.5f, 0.0f, 0.0f, -3.0f, -0.5f, 4.0f}, v = r.normals(k.size());
  c.append(s, 0, k.data(), v.data(), static_cast<std::int32_t>(k.size()));
  const std::vector<std::vector<float>> scores = {random_scores(7, 0, r)};
  const std::vector<ivec> none(1);
  const auto before = kvc_test::full_state(c, {s});
  kvmerger_options o;
  o.threshold = 1.0f;  // cos = 1 for {0, 1} and {4, 5}: equal, so no merge
  auto plan = kvc::merge::kvmerger_merge_layer(c, s, 0, scores, none, o);
  REQUIRE(plan.sets == 0);
  REQUIRE(kvc_test::full_state(c, {s}) == before);
  o.threshold = 0.0f;  // cos = 0 for the zero keys' pairs {1, 2}, {2, 3}, {3, 4}: no merge either
  plan = kvc::merge::kvmerger_merge_layer(c, s, 0, {scores}, none, o);
  REQUIRE(plan.sets == 2);
  REQUIRE(plan.heads[0].groups[0].members == ivec{0, 1});
  REQUIRE(plan.heads[0].groups[1].members == ivec{4, 5});
  REQUIRE(c.length(s, 0, 0) == 5);
}

TEST_CASE("KVMerger on runs of identical tokens leaves merged attention unchanged", "[merge][kvmerger]") {
  int changed_by_dropping = 0;
  for (int trial = 0; trial < 60; ++trial) {
    kvc_test::rng r(13400 + static_cast<std::uint64_t>(trial));
    // D >= 24 random directions: distinct neighbours stay far below the threshold 0.95, copies at 1.
    const std::int32_t H = r.integer(1, 3), D = r.integer(24, 96), P = 1 << r.integer(0, 4), G = r.integer(1, 6);
    const bool fp16 = trial % 2 == 1;
    // Per kv head: runs of 1..6 exact copies (key and value) of a random token.
    std::vector<std::vector<std::int32_t>> run_of(static_cast<std::size_t>(H));  // per head, per token: its run
    const std::int32_t L = r.integer(2, 90);
    std::vector<float> k(static_cast<std::size_t>(L) * H * D), v(k.size());
    for (std::int32_t h = 0; h < H; ++h) {
      std::vector<float> kb, vb;
      std::int32_t left = 0, run = -1;
      for (std::int32_t t = 0; t < L; ++t) {
        if (left == 0) kb = r.normals(static_cast<std::size_t>(D)), vb = r.normals(kb.size()), left = r.integer(1, 6), ++run;
        --left;
        run_of[static_cast<std::size_t>(h)].push_back(run);
        std::copy(kb.begin(), kb.end(), &k[(static_cast<std::size_t>(t) * H + h) * D]);
        std::copy(vb.begin(), vb.end(), &v[(static_cast<std::size_t>(t) * H + h) * D]);
      }
    }
    std::vector<std::vector<float>> scores;
    for (std::int32_t h = 0; h < H; ++h) scores.push_back(random_scores(L, 0, r));
    const auto q = r.normals(static_cast<std::size_t>(H * G) * D, 2.0f);
    std::vector<float> full(q.size()), merged(q.size()), dropped(q.size()), lf(static_cast<std::size_t>(H * G)), lm(lf.size());
    double vmax = 1;
    for (float x : v) vmax = std::max(vmax, std::fabs(double{x}));
    INFO("trial " << trial << (fp16 ? " fp16" : " fp32") << " H=" << H << " D=" << D << " P=" << P << " G=" << G << " L=" << L);
    auto run = [&](auto tag) {
      using T = decltype(tag);
      const auto shape = kvc_test::cache_shape(1, H, D, P, 4096);
      merged_cache<T> c(shape), plain(shape);
      const kvc::seq_id s = c.add_sequence(), sp = plain.add_sequence();
      c.append(s, 0, k.data(), v.data(), L);
      plain.append(sp, 0, k.data(), v.data(), L);
      kvc::decode_options o;
      o.lse = lf.data();
      kvc::cpu::merged_decode_attention(c, s, 0, q.data(), H * G, full.data(), o);
      kvmerger_options ko;
      ko.threshold = 0.95f;
      const std::vector<ivec> none(static_cast<std::size_t>(H));
      const auto plan = kvc::merge::kvmerger_merge_layer(c, s, 0, scores, none, ko);
      std::vector<ivec> kept(static_cast<std::size_t>(H));  // pivots and singletons
      for (std::int32_t h = 0; h < H; ++h) {
        const auto& ro = run_of[static_cast<std::size_t>(h)];
        // The sets are exactly the runs of copies, each with log-weight log(run length).
        std::int32_t runs = ro.back() + 1, i = 0;
        REQUIRE(c.length(s, 0, h) == runs);
        for (const auto& g : plan.heads[static_cast<std::size_t>(h)].groups) {
          for (std::int32_t t : g.members) REQUIRE(ro[static_cast<std::size_t>(t)] == ro[static_cast<std::size_t>(g.members[0])]);
          REQUIRE(g.members.size() == static_cast<std::size_t>(std::count(ro.begin(), ro.end(), ro[static_cast<std::size_t>(g.members[0])])));
        }
        for (std::int32_t t = 0; t < L; ++t) {
          if (t > 0 && ro[static_cast<std::size_t>(t)] == ro[static_cast<std::size_t>(t - 1)]) continue;
          const auto len = std::count(ro.begin(), ro.end(), ro[static_cast<std::size_t>(t)]);
          KVC_REQUIRE(std::fabs(c.log_weights(s, 0, h)[static_cast<std::size_t>(i)] - std::log(static_cast<double>(len))) <= 1e-6,
                      "h " << h << " run " << i);
          ++i;
        }
        // Plain eviction of the same tokens: keep the pivots and the singletons.
        ivec keep;
        std::size_t gi = 0;
        const auto& gs = plan.heads[static_cast<std::size_t>(h)].groups;
        for (std::int32_t t = 0; t < L; ++t) {
          while (gi < gs.size() && gs[gi].members.back() < t) ++gi;
          const bool in = gi < gs.size() && gs[gi].members.front() <= t;
          if (!in || gs[gi].target == t) keep.push_back(t);
        }
        kept[static_cast<std::size_t>(h)] = keep;
      }
      o.lse = lm.data();
      kvc::cpu::merged_decode_attention(c, s, 0, q.data(), H * G, merged.data(), o);
      plain.keep_layer(sp, 0, kept);
      o.lse = nullptr;
      kvc::cpu::merged_decode_attention(plain, sp, 0, q.data(), H * G, dropped.data(), o);
    };
    if (fp16) run(kvc::half{});
    else run(0.0f);
    for (std::size_t i = 0; i < full.size(); ++i)
      KVC_REQUIRE(std::fabs(full[i] - merged[i]) <= 4e-6 * vmax, "out " << i << ": " << full[i] << " vs " << merged[i]);
    for (std::size_t i = 0; i < lf.size(); ++i) KVC_REQUIRE(std::fabs(lf[i] - lm[i]) <= 4e-6f * (1 + std::fabs(lf[i])), i);
    double worst = 0;
    for (std::size_t i = 0; i < full.size(); ++i) worst = std::max(worst, std::fabs(double{full[i]} - dropped[i]));
    if (worst > 1e-3 * vmax) ++changed_by_dropping;
  }
  // Keeping only the pivots without their mass does change the output: the log-weight keeps it.
  REQUIRE(changed_by_dropping >= 30);
}

TEST_CASE("KVMerger never merges a protected token", "[merge][kvmerger]") {
  for (int trial = 0; trial < 30; ++trial) {
    kvc_test::rng r(13500 + static_cast<std::uint64_t>(trial));
    const std::int32_t H = r.integer(1, 3), D = r.integer(1, 16), L = r.integer(2, 60);
    merged_cache<float> c(kvc_test::cache_shape(1, H, D, 4, 4096));
    const kvc::seq_id s = c.add_sequence();
    // Every token of a head has the same key: without protection the whole head is one set.
    std::vector<float> k(static_cast<std::size_t>(L) * H * D), v = r.normals(k.size());
    const auto kb = r.normals(static_cast<std::size_t>(H * D));
    for (std::int32_t t = 0; t < L; ++t) std::copy(kb.begin(), kb.end(), &k[static_cast<std::size_t>(t) * H * D]);
    c.append(s, 0, k.data(), v.data(), L);
    std::vector<ivec> protect;
    std::vector<std::vector<float>> scores;
    std::vector<stream_copy> before;
    for (std::int32_t h = 0; h < H; ++h) {
      protect.push_back(r.subset(L, r.integer(0, L)));
      scores.push_back(random_scores(L, 1, r));
      before.push_back(copy_stream(c, s, 0, h));
    }
    INFO("trial " << trial << " H=" << H << " D=" << D << " L=" << L);
    const auto plan = kvc::merge::kvmerger_merge_layer(c, s, 0, scores, protect);
    for (std::int32_t h = 0; h < H; ++h) {
      const auto& pr = protect[static_cast<std::size_t>(h)];
      // The sets are the maximal runs of >= 2 unprotected tokens; every protected token is still
      // there, with its own key, value and log-weight 0.
      std::vector<ivec> want;
      ivec cur;
      for (std::int32_t t = 0; t <= L; ++t) {
        if (t == L || std::binary_search(pr.begin(), pr.end(), t)) {
          if (cur.size() >= 2) want.push_back(cur);
          cur.clear();
        } else {
          cur.push_back(t);
        }
      }
      const auto& gs = plan.heads[static_cast<std::size_t>(h)].groups;
      REQUIRE(gs.size() == want.size());
      for (std::size_t i = 0; i < gs.size(); ++i) REQUIRE(gs[i].members == want[i]);
      const stream_copy a = copy_stream(c, s, 0, h);
      const stream_copy& b = before[static_cast<std::size_t>(h)];
      for (std::int32_t t : pr) {
        const auto it = std::find(a.pos.begin(), a.pos.end(), b.pos[static_cast<std::size_t>(t)]);
        REQUIRE(it != a.pos.end());
        const std::size_t i = static_cast<std::size_t>(it - a.pos.begin());
        REQUIRE(a.lw[i] == 0.0f);
        for (std::int32_t d = 0; d < D; ++d)
          REQUIRE(a.v[i * D + static_cast<std::size_t>(d)] == b.v[static_cast<std::size_t>(t) * D + static_cast<std::size_t>(d)]);
      }
    }
  }
}

TEST_CASE("KVMerger rejects bad arguments and changes nothing", "[merge][kvmerger][strong]") {
  kvc_test::rng r(13600);
  merged_cache<kvc::half> c(kvc_test::cache_shape(2, 2, 8, 4, 1024));
  const kvc::seq_id s = c.add_sequence();
  fill_runs(c, s, 0, 24, r);
  fill_runs(c, s, 1, 24, r);
  premerge(c, s, 0, r, 11);  // nonzero log-weights
  const std::int32_t n0 = c.length(s, 0, 0), n1 = c.length(s, 0, 1);
  const auto before = kvc_test::full_state(c, {s});
  const std::vector<std::vector<float>> scores = {random_scores(n0, 0, r), random_scores(n1, 0, r)};
  const std::vector<ivec> protect = {{0, 3}, {n1 - 2, n1 - 1}};
  auto expect_error = [&](auto&& call, const std::string& text) {
    kvc_test::require_error(call, text);
    REQUIRE(kvc_test::full_state(c, {s}) == before);
  };
  using kvc::merge::kvmerger_merge_layer;
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  for (float eps : {nan, inf, -inf}) {
    kvmerger_options o;
    o.threshold = eps;
    expect_error([&] { kvmerger_merge_layer(c, s, 0, scores, protect, o); },
                 "kvc::merge::kvmerger_plan: kvmerger_options.threshold = " +
                     std::string(std::isnan(eps) ? "nan" : eps > 0 ? "inf" : "-inf") + ", expected a finite cosine-similarity threshold");
  }
  for (float sigma : {0.0f, -1.0f, nan, inf}) {
    kvmerger_options o;
    o.sigma = sigma;
    expect_error([&] { kvmerger_merge_layer(c, s, 0, scores, protect, o); },
                 "kvmerger_options.sigma = " + std::string(std::isnan(sigma) ? "nan" : sigma == 0 ? "0" : sigma < 0 ? "-1" : "inf") +
                     ", expected a finite kernel width > 0");
  }
  // Scores: one vector per kv head, one finite score per token.
  expect_error([&] { kvmerger_merge_layer(c, s, 0, {scores[0]}, protect); }, "kvc::merge::kvmerger_merge_layer: scores.size() = 1, expected num_kv_heads = 2");
  auto sc2 = scores;
  sc2[1].push_back(0.5f);
  expect_error([&] { kvmerger_merge_layer(c, s, 0, sc2, protect); },
               "scores[1].size() = " + std::to_string(n1 + 1) + ", expected " + std::to_string(n1) + " (kv head 1 holds");
  sc2 = scores;
  sc2[0].pop_back();
  expect_error([&] { kvmerger_merge_layer(c, s, 0, sc2, protect); }, "scores[0].size() = " + std::to_string(n0 - 1));
  sc2 = scores;
  sc2[0][3] = nan;
  expect_error([&] { kvmerger_merge_layer(c, s, 0, sc2, protect); }, "scores[0][3] = nan, expected a finite score");
  sc2[0][3] = -inf;
  expect_error([&] { kvmerger_merge_layer(c, s, 0, sc2, protect); }, "scores[0][3] = -inf");
  // Protected tokens: in range, strictly increasing.
  expect_error([&] { kvmerger_merge_layer(c, s, 0, scores, {protect[0]}); }, "protect.size() = 1, expected num_kv_heads = 2");
  auto p2 = protect;
  p2[1].push_back(n1);
  expect_error([&] { kvmerger_merge_layer(c, s, 0, scores, p2); }, "protect[1][2] = " + std::to_string(n1) + ", expected 0.." + std::to_string(n1 - 1));
  p2 = protect;
  p2[0][0] = -1;
  expect_error([&] { kvmerger_merge_layer(c, s, 0, scores, p2); }, "protect[0][0] = -1, expected 0..");
  p2 = protect;
  p2[0] = {3, 2};
  expect_error([&] { kvmerger_merge_layer(c, s, 0, scores, p2); }, "protect[0][1] = 2 after 3, expected strictly increasing");
  p2[0] = {2, 2};
  expect_error([&] { kvmerger_merge_layer(c, s, 0, scores, p2); }, "protect[0][1] = 2 after 2");
  // Layer and sequence.
  expect_error([&] { kvmerger_merge_layer(c, s, 2, scores, protect); }, "layer = 2");
  expect_error([&] { kvmerger_merge_layer(c, s, -1, scores, protect); }, "layer = -1");
  expect_error([&] { kvmerger_merge_layer(c, s + 5, 0, scores, protect); }, "sequence");
  // kvmerger_plan alone: its own argument checks.
  using kvc::merge::kvmerger_plan;
  const std::vector<ivec> one_empty(static_cast<std::size_t>(r.integer(1, 1)));
  expect_error([&] { kvmerger_plan({std::vector<float>(7)}, 2, {{}}, one_empty); }, "keys[0].size() = 7, expected a multiple of head_dim = 2");
  expect_error([&] { kvmerger_plan({{1.0f, nan}}, 2, {{0.0f}}, one_empty); }, "keys[0][1] = nan, expected a finite key");
  expect_error([&] { kvmerger_plan({{1.0f}}, 0, {{0.0f}}, one_empty); }, "head_dim = 0, expected >= 1");
  // (Sizes from the generator: with literal sizes GCC 12 inlines past the throw and warns.)
  const std::vector<std::vector<float>> no_scores(static_cast<std::size_t>(r.integer(0, 0)));
  const std::vector<ivec> no_protect(static_cast<std::size_t>(r.integer(0, 0)));
  expect_error([&] { kvmerger_plan({{1.0f}}, 1, no_scores, one_empty); }, "scores.size() = 0, expected keys.size() = 1");
  expect_error([&] { kvmerger_plan({{1.0f}}, 1, {{0.0f}}, no_protect); }, "protect.size() = 0, expected keys.size() = 1");
  // And a good call after all that works.
  kvmerger_options o;
  o.threshold = -2.0f;  // every unprotected neighbour pair passes
  const auto p = kvmerger_merge_layer(c, s, 0, scores, protect, o);
  REQUIRE(p.sets == 3);  // head 0: {1, 2} and {4..n0-1}; head 1: {0..n1-3}
  REQUIRE(c.length(s, 0, 0) == 4);
  REQUIRE(c.length(s, 0, 1) == 3);
}

TEST_CASE("KVMerger on a forked sequence with the pool exhausted changes nothing", "[merge][kvmerger][strong]") {
  for (int trial = 0; trial < 6; ++trial) {
    kvc_test::rng r(13700 + static_cast<std::uint64_t>(trial));
    const std::int32_t H = r.integer(1, 3), P = 4, D = r.integer(2, 20), L = r.integer(9, 40);
    const std::int32_t pages = H * ((L + P - 1) / P);
    // Exactly the pages the prompt needs: the step must copy a shared page, and cannot.
    merged_cache<float> c(kvc_test::cache_shape(1, H, D, P, pages));
    const kvc::seq_id a = c.add_sequence();
    fill_runs(c, a, 0, L, r);
    const kvc::seq_id b = c.fork(a);
    std::vector<std::vector<float>> scores;
    std::vector<ivec> protect;
    for (std::int32_t h = 0; h < H; ++h) {
      scores.push_back(random_scores(L, 0, r));
      ivec p;  // everything but tokens 0 and 1: they merge, page 0 changes
      for (std::int32_t t = 2; t < L; ++t) p.push_back(t);
      protect.push_back(p);
    }
    kvmerger_options o;
    o.threshold = -2.0f;
    const auto before = kvc_test::full_state(c, {a, b});
    const kvc::seq_id target = trial % 2 ? a : b;
    REQUIRE_THROWS_AS(kvc::merge::kvmerger_merge_layer(c, target, 0, scores, protect, o), kvc::out_of_memory);
    REQUIRE(kvc_test::full_state(c, {a, b}) == before);
    REQUIRE(c.cache().pool().pages_in_use() == pages);
    // With the sibling gone, the step goes through.
    c.remove_sequence(target == a ? b : a);
    const auto p = kvc::merge::kvmerger_merge_layer(c, target, 0, scores, protect, o);
    REQUIRE(p.sets == H);
    REQUIRE(c.length(target, 0, 0) == L - 1);
  }
}

// ---- KVMerger at an eviction budget (kvmerger_evict_plan / kvmerger_evict_layer) ----
// The rule written again here in double: runs of tokens whose adjacent keys have cos > ε (every
// token may link); in a run with a kept token, the pivot is the kept member with the largest
// score (the first on ties) and the run's evicted members merge into it with Gaussian weights;
// the evicted members of a run without a kept token are dropped; the layer keeps exactly the
// kept tokens.

namespace {

std::vector<ref_set> reference_evict_sets(const stream_copy& b, const std::vector<float>& score, const ivec& kept,
                                          std::int32_t D, double eps, double sigma, ivec& dropped) {
  std::vector<char> is_kept(static_cast<std::size_t>(b.n), 0);
  for (std::int32_t t : kept) is_kept[static_cast<std::size_t>(t)] = 1;
  std::vector<ref_set> out;
  ivec run;
  auto close = [&] {
    std::int32_t pivot = -1;
    for (std::int32_t t : run)
      if (is_kept[static_cast<std::size_t>(t)] &&
          (pivot < 0 || score[static_cast<std::size_t>(t)] > score[static_cast<std::size_t>(pivot)]))
        pivot = t;
    ref_set s;
    s.pivot = pivot;
    for (std::int32_t t : run) {
      if (is_kept[static_cast<std::size_t>(t)] && t != pivot) continue;
      if (pivot < 0) {
        dropped.push_back(t);
        continue;
      }
      double d2 = 0;
      for (std::int32_t d = 0; d < D; ++d) {
        const double x = double{b.k[static_cast<std::size_t>(t) * D + d]} - b.k[static_cast<std::size_t>(pivot) * D + d];
        d2 += x * x;
      }
      s.members.push_back(t);
      s.g.push_back(std::exp(-d2 / (2 * sigma * sigma)));
    }
    if (s.members.size() >= 2) out.push_back(s);
    run.clear();
  };
  for (std::int32_t t = 0; t < b.n; ++t) {
    const bool linked =
        t > 0 && cosine(&b.k[static_cast<std::size_t>(t - 1) * D], &b.k[static_cast<std::size_t>(t) * D], D) > eps;
    if (!linked && !run.empty()) close();
    run.push_back(t);
  }
  if (!run.empty()) close();
  return out;
}

template <class T>
void evict_trials(std::uint64_t salt) {
  const bool fp16 = std::is_same<T, kvc::half>::value;
  std::int64_t merged_total = 0, dropped_total = 0, off_first = 0;
  for (int trial = 0; trial < 120; ++trial) {
    kvc_test::rng r(salt + static_cast<std::uint64_t>(trial));
    const std::int32_t H = r.integer(1, 4), D = trial % 9 == 4 ? 1 : r.integer(2, 48), P = 1 << r.integer(0, 4);
    merged_cache<T> c(kvc_test::cache_shape(2, H, D, P, 4096));
    const kvc::seq_id s = c.add_sequence();
    const std::int32_t layer = r.integer(0, 1);
    fill_runs(c, s, 0, r.integer(1, 100), r);
    fill_runs(c, s, 1, r.integer(1, 100), r);
    if (r.coin(0.4)) premerge(c, s, layer, r, 11);
    kvmerger_options o;
    if (trial % 4 != 0) o.threshold = trial % 7 == 1 ? r.uniform(-0.5f, 0.5f) : r.uniform(0.5f, 0.999f);
    if (trial % 3 != 0) o.sigma = r.uniform(0.2f, 10.0f);
    std::vector<std::vector<float>> scores;
    std::vector<ivec> kept;
    std::vector<stream_copy> before;
    for (std::int32_t h = 0; h < H; ++h) {
      before.push_back(copy_stream(c, s, layer, h));
      const std::int32_t n = before.back().n;
      scores.push_back(random_scores(n, trial % 3, r));
      // Every 5th trial evicts 1-3 tokens, as a decode-time step does: the plan then looks only
      // at the runs around them, and must find what the whole-stream scan finds.
      const std::int32_t keep_n = trial % 5 == 2 ? std::max(0, n - r.integer(1, 3)) : r.integer(0, n);
      kept.push_back(trial % 11 == 3 ? ivec{} : r.subset(n, keep_n));
    }
    const std::size_t bytes_before = c.bytes_in_use();
    INFO("trial " << trial << (fp16 ? " fp16" : " fp32") << " H=" << H << " D=" << D << " P=" << P
                  << " eps=" << o.threshold << " sigma=" << o.sigma);
    const auto plan = kvc::merge::kvmerger_evict_layer(c, s, layer, scores, kept, o);
    REQUIRE(plan.heads.size() == static_cast<std::size_t>(H));
    std::int64_t merged = 0, dropped = 0;
    for (std::int32_t h = 0; h < H; ++h) {
      const stream_copy& b = before[static_cast<std::size_t>(h)];
      ivec ref_dropped;
      const auto ref = reference_evict_sets(b, scores[static_cast<std::size_t>(h)], kept[static_cast<std::size_t>(h)], D,
                                            double{o.threshold}, double{o.sigma}, ref_dropped);
      const auto& ph = plan.heads[static_cast<std::size_t>(h)];
      REQUIRE(ph.dropped == ref_dropped);
      REQUIRE(ph.groups.size() == ref.size());
      for (std::size_t i = 0; i < ref.size(); ++i) {
        KVC_REQUIRE(ph.groups[i].members == ref[i].members, "h " << h << " set " << i);
        KVC_REQUIRE(ph.groups[i].target == ref[i].pivot, "h " << h << " set " << i);
        double z = 0;
        for (double x : ref[i].g) z += x;
        for (std::size_t j = 0; j < ref[i].g.size(); ++j)
          KVC_REQUIRE(std::fabs(ph.groups[i].weights[j] - ref[i].g[j] / z) <= 1e-6, "h " << h << " set " << i << " member " << j);
        merged += static_cast<std::int64_t>(ref[i].members.size()) - 1;
        if (ref[i].pivot != ref[i].members.front()) ++off_first;
      }
      dropped += static_cast<std::int64_t>(ref_dropped.size());
      const stream_copy a = copy_stream(c, s, layer, h);
      // Exactly the kept tokens remain: the eviction's budget.
      REQUIRE(a.n == static_cast<std::int32_t>(kept[static_cast<std::size_t>(h)].size()));
      check_after(b, a, ref, ref_dropped, D, fp16, h);
    }
    REQUIRE(plan.merged == merged);
    REQUIRE(plan.dropped == dropped);
    merged_total += merged;
    dropped_total += dropped;
    REQUIRE(c.bytes_in_use() <= bytes_before);
    REQUIRE(c.bytes_in_use() == static_cast<std::size_t>(c.cache().pool().pages_in_use()) * c.cache().pool().page_bytes());
  }
  // Merges, drops and pivots past a run's first member all happen, many times.
  REQUIRE(merged_total > 300);
  REQUIRE(dropped_total > 300);
  REQUIRE(off_first > 50);
}

}  // namespace

TEST_CASE("KVMerger at an eviction budget merges evicted run members into the run's best kept token", "[merge][kvmerger]") {
  evict_trials<float>(13700);
  evict_trials<kvc::half>(13800);
}

TEST_CASE("KVMerger at an eviction budget rejects bad arguments and changes nothing", "[merge][kvmerger][strong]") {
  kvc_test::rng r(13900);
  merged_cache<kvc::half> c(kvc_test::cache_shape(2, 2, 8, 4, 1024));
  const kvc::seq_id s = c.add_sequence();
  fill_runs(c, s, 0, 24, r);
  fill_runs(c, s, 1, 24, r);
  premerge(c, s, 0, r, 11);
  const std::int32_t n0 = c.length(s, 0, 0), n1 = c.length(s, 0, 1);
  const auto before = kvc_test::full_state(c, {s});
  const std::vector<std::vector<float>> scores = {random_scores(n0, 0, r), random_scores(n1, 0, r)};
  const std::vector<ivec> kept = {{0, 3, 5}, {1, n1 - 1}};
  auto expect_error = [&](auto&& call, const std::string& text) {
    kvc_test::require_error(call, text);
    REQUIRE(kvc_test::full_state(c, {s}) == before);
  };
  using kvc::merge::kvmerger_evict_layer;
  kvmerger_options o;
  o.threshold = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { kvmerger_evict_layer(c, s, 0, scores, kept, o); },
               "kvc::merge::kvmerger_evict_layer: kvmerger_options.threshold = nan");
  // The plan on its own, from the same keys: the same checks, under its own name, and a
  // non-finite key (the cache holds none) is named.
  const auto keys = kvc::merge::layer_keys(c, s, 0);
  expect_error([&] { kvc::merge::kvmerger_evict_plan(keys, 8, scores, kept, o); },
               "kvc::merge::kvmerger_evict_plan: kvmerger_options.threshold = nan");
  auto bad_keys = keys;
  bad_keys[1][5] = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { kvc::merge::kvmerger_evict_plan(bad_keys, 8, scores, kept); }, "keys[1][5] = nan");
  o = {};
  o.sigma = 0;
  expect_error([&] { kvmerger_evict_layer(c, s, 0, scores, kept, o); }, "kvmerger_options.sigma = 0");
  expect_error([&] { kvmerger_evict_layer(c, s, 0, {scores[0]}, kept); },
               "kvc::merge::kvmerger_evict_layer: scores.size() = 1, expected num_kv_heads = 2");
  expect_error([&] { kvmerger_evict_layer(c, s, 0, scores, {kept[0]}); }, "kept.size() = 1, expected num_kv_heads = 2");
  auto sc2 = scores;
  sc2[1][2] = std::numeric_limits<float>::infinity();
  expect_error([&] { kvmerger_evict_layer(c, s, 0, sc2, kept); }, "scores[1][2] = inf, expected a finite score");
  sc2 = scores;
  sc2[0].pop_back();
  expect_error([&] { kvmerger_evict_layer(c, s, 0, sc2, kept); }, "scores[0].size() = " + std::to_string(n0 - 1));
  auto k2 = kept;
  k2[1] = {2, 1};
  expect_error([&] { kvmerger_evict_layer(c, s, 0, scores, k2); }, "kept[1][1] = 1 after 2, expected strictly increasing");
  k2[1] = {n1};
  expect_error([&] { kvmerger_evict_layer(c, s, 0, scores, k2); }, "kept[1][0] = " + std::to_string(n1));
  expect_error([&] { kvmerger_evict_layer(c, s, 2, scores, kept); }, "layer = 2");
}

TEST_CASE("KVMerger without carried mass: same merged rows, the pivot's log-weight unchanged", "[merge][kvmerger]") {
  std::int64_t merged = 0;
  for (int trial = 0; trial < 40; ++trial) {
    kvc_test::rng r(14100 + static_cast<std::uint64_t>(trial));
    const std::int32_t H = r.integer(1, 3), D = r.integer(2, 40), P = 1 << r.integer(0, 3);
    merged_cache<float> a(kvc_test::cache_shape(1, H, D, P, 4096)), b(a.config());
    const kvc::seq_id sa = a.add_sequence(), sb = b.add_sequence();
    const std::int32_t L = r.integer(4, 80);
    kvc_test::rng r2 = r;
    fill_runs(a, sa, 0, L, r);
    fill_runs(b, sb, 0, L, r2);
    if (r.coin(0.5)) {
      kvc_test::rng r3 = r;
      premerge(a, sa, 0, r, 9);
      premerge(b, sb, 0, r3, 9);
    }
    std::vector<std::vector<float>> scores;
    std::vector<ivec> kept;
    std::vector<stream_copy> before;
    for (std::int32_t h = 0; h < H; ++h) {
      const std::int32_t n = a.length(sa, 0, h);
      scores.push_back(random_scores(n, 0, r));
      kept.push_back(r.subset(n, r.integer(1, n)));
      before.push_back(copy_stream(a, sa, 0, h));
    }
    kvmerger_options with, without;
    with.threshold = without.threshold = 0.6f;
    without.carry_mass = false;
    const auto pa = trial % 2 ? kvc::merge::kvmerger_evict_layer(a, sa, 0, scores, kept, with).merged
                              : kvc::merge::kvmerger_merge_layer(a, sa, 0, scores, kept, with).removed;
    const auto pb = trial % 2 ? kvc::merge::kvmerger_evict_layer(b, sb, 0, scores, kept, without).merged
                              : kvc::merge::kvmerger_merge_layer(b, sb, 0, scores, kept, without).removed;
    REQUIRE(pa == pb);
    merged += pb;
    for (std::int32_t h = 0; h < H; ++h) {
      const stream_copy ca = copy_stream(a, sa, 0, h), cb = copy_stream(b, sb, 0, h);
      REQUIRE(ca.n == cb.n);
      for (std::size_t i = 0; i < ca.k.size(); ++i) {
        KVC_REQUIRE(std::fabs(ca.k[i] - cb.k[i]) <= 1e-6 * (1 + std::fabs(ca.k[i])), "k " << i);
        KVC_REQUIRE(std::fabs(ca.v[i] - cb.v[i]) <= 1e-6 * (1 + std::fabs(ca.v[i])), "v " << i);
      }
      // Every token left holds the log-weight it had before: found by its position (unique in a
      // stream; merging keeps the target's).
      const stream_copy& pre = before[static_cast<std::size_t>(h)];
      for (std::int32_t i = 0; i < cb.n; ++i) {
        const auto it = std::find(pre.pos.begin(), pre.pos.end(), cb.pos[static_cast<std::size_t>(i)]);
        REQUIRE(it != pre.pos.end());
        const float lw = pre.lw[static_cast<std::size_t>(it - pre.pos.begin())];
        KVC_REQUIRE(std::fabs(cb.lw[static_cast<std::size_t>(i)] - lw) <= 1e-6f * (1 + std::fabs(lw)), "h " << h << " token " << i);
        KVC_REQUIRE(ca.lw[static_cast<std::size_t>(i)] >= lw - 1e-6f, "with mass a merged token never loses mass");
      }
    }
  }
  REQUIRE(merged > 100);
}

// kvmerger_plan links adjacent keys on float cosines of keys normalised once, and in double where
// the float cosine is within its bound of ε; keys near float's range ends are normalised in
// double. Against the double reference: adjacent cosines placed 1e-8..3e-5 from ε (inside the
// float bound at every D here, so the double fallback decides), keys scaled by 1e-41 (subnormal
// elements) to 1e37, zero keys, protected tokens, D across the SIMD widths.
TEST_CASE("KVMerger's float fast path links as the double rule at ε and at float's range ends", "[merge][kvmerger]") {
  const float scales[] = {1.0f, 1e-41f, 1e-30f, 1e-19f, 1e19f, 1e30f, 1e37f};
  const float thresholds[] = {0.75f, 0.0f, -0.3f, 0.99f};
  std::int64_t near = 0, pairs = 0;
  for (int trial = 0; trial < 60; ++trial) {
    kvc_test::rng r(13100 + static_cast<std::uint64_t>(trial));
    const std::int32_t dims[] = {2, 3, 8, 13, 16, 40, 64, 128};
    const std::int32_t D = dims[r.integer(0, 7)], H = r.integer(1, 3), n = r.integer(2, 120);
    kvmerger_options o;
    o.threshold = thresholds[trial % 4];
    std::vector<std::vector<float>> keys(static_cast<std::size_t>(H)), scores(static_cast<std::size_t>(H));
    std::vector<ivec> protect(static_cast<std::size_t>(H));
    for (std::int32_t h = 0; h < H; ++h) {
      auto& k = keys[static_cast<std::size_t>(h)];
      k.assign(static_cast<std::size_t>(n) * D, 0.0f);
      std::vector<double> u(static_cast<std::size_t>(D)), w(u.size());
      for (auto& x : u) x = r.normal();
      for (std::int32_t t = 0; t < n; ++t) {
        // Key t at an angle to key t − 1's direction u whose cosine is ε plus a small offset:
        // cos·u + sin·w, w a random direction orthogonal to u (Gram–Schmidt in double).
        double nu = 0;
        for (double x : u) nu += x * x;
        for (auto& x : u) x /= std::sqrt(nu);
        for (auto& x : w) x = r.normal();
        double uw = 0, nw = 0;
        for (std::size_t d = 0; d < u.size(); ++d) uw += u[d] * w[d];
        for (std::size_t d = 0; d < u.size(); ++d) w[d] -= uw * u[d], nw += w[d] * w[d];
        for (auto& x : w) x /= std::sqrt(nw);
        const double off = (r.coin() ? 1 : -1) * std::pow(10.0, r.uniform(-8.0f, -4.5f));
        const double cs = std::min(1.0, std::max(-1.0, double{o.threshold} + (r.coin(0.7) ? off : r.uniform(-0.5f, 0.5f))));
        const double sn = std::sqrt(1 - cs * cs);
        for (std::size_t d = 0; d < u.size(); ++d) u[d] = cs * u[d] + sn * w[d];
        const float s = r.coin(0.04) ? 0.0f : scales[r.integer(0, 6)];
        for (std::int32_t d = 0; d < D; ++d) k[static_cast<std::size_t>(t) * D + d] = static_cast<float>(u[static_cast<std::size_t>(d)] * s);
      }
      scores[static_cast<std::size_t>(h)] = r.normals(static_cast<std::size_t>(n));
      for (std::int32_t t = 0; t < n; ++t)
        if (r.coin(0.1)) protect[static_cast<std::size_t>(h)].push_back(t);
    }
    const auto plan = kvc::merge::kvmerger_plan(keys, D, scores, protect, o);
    for (std::int32_t h = 0; h < H; ++h) {
      stream_copy b;
      b.k = keys[static_cast<std::size_t>(h)];
      b.n = n;
      const auto want = reference_sets(b, scores[static_cast<std::size_t>(h)], protect[static_cast<std::size_t>(h)], D,
                                       double{o.threshold}, double{o.sigma});
      for (std::int32_t t = 1; t < n; ++t) {
        const double cs = cosine(&b.k[static_cast<std::size_t>(t - 1) * D], &b.k[static_cast<std::size_t>(t) * D], D);
        ++pairs;
        near += std::fabs(cs - double{o.threshold}) <= 3e-5;
      }
      const auto& got = plan.heads[static_cast<std::size_t>(h)].groups;
      INFO("trial " << trial << " D " << D << " h " << h << " eps " << o.threshold);
      REQUIRE(got.size() == want.size());
      for (std::size_t i = 0; i < want.size(); ++i) {
        REQUIRE(got[i].members == want[i].members);
        REQUIRE(got[i].target == want[i].pivot);
      }
    }
  }
  INFO("adjacent pairs " << pairs << ", within 3e-5 of the threshold " << near);
  REQUIRE(near > 500);  // the double fallback was exercised
}
