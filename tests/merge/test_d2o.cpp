// SPDX-License-Identifier: Apache-2.0
// D2O's token-level merge (kvc/merge/d2o.hpp) against its rule written here in double, from the
// rows gathered before the step: per kv head, u_e = max over kept c of cos(k_e, k_c) (zero key:
// cosine 0; first kept token on ties), m = mean of u_e over the layer's evicted tokens that had a
// kept token, τ' = m on the first step else β·τ + (1 − β)·m, e merges into its nearest kept token
// iff u_e >= τ' (as a float); a kept token c with merged set E_c becomes the mean of {c} ∪ E_c
// weighted by exp(u_i)·exp(lw_i) (u_c = 1), with log-weight log Σ exp(lw_i); every other evicted
// token is dropped. Nothing of d2o_plan or merge_layer is reused by the reference.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <kvc/cpu/merged_attention.hpp>
#include <kvc/merge/d2o.hpp>
#include <kvc/store/merged_cache.hpp>

#include "cache_builders.hpp"
#include "cache_checks.hpp"
#include "fast_require.hpp"
#include "kvc_catch.hpp"
#include "merge_test_util.hpp"
#include "random.hpp"

namespace {

using kvc::merge::d2o_options;
using kvc::merge::d2o_threshold;
using kvc::merge::merge_group;
using kvc::merge::merged_cache;

using kvc_test::copy_stream;
using kvc_test::premerge;
using kvc_test::stream_copy;

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

/// The reference decisions of one head: per evicted token (ascending), its u and nearest kept token.
struct ref_head {
  std::vector<std::int32_t> evicted, nearest;  // nearest: -1 when nothing is kept
  std::vector<double> u;
};

ref_head reference_head(const stream_copy& b, const std::vector<std::int32_t>& kept, std::int32_t D) {
  ref_head r;
  for (std::int32_t e = 0; e < b.n; ++e) {
    if (std::find(kept.begin(), kept.end(), e) != kept.end()) continue;
    double best = -std::numeric_limits<double>::infinity();
    std::int32_t at = -1;
    for (std::int32_t c : kept) {
      const double x = cosine(&b.k[static_cast<std::size_t>(e) * D], &b.k[static_cast<std::size_t>(c) * D], D);
      if (at < 0 || x > best) best = x, at = c;
    }
    r.evicted.push_back(e);
    r.nearest.push_back(at);
    r.u.push_back(best);
  }
  return r;
}

/// The threshold after a step, in double then rounded as the state stores it; `m` the statistic
/// (NaN when no evicted token had a kept token).
d2o_threshold reference_threshold(const d2o_threshold& before, double beta, double m) {
  if (std::isnan(m)) return before;
  d2o_threshold t;
  t.primed = true;
  t.tau = static_cast<float>(before.primed ? beta * before.tau + (1 - beta) * m : m);
  return t;
}

/// Fills one layer with random keys, about a third of them near copies of an earlier key (so
/// that similarities spread over the threshold), sometimes a zero key.
template <class T>
void fill_similar(merged_cache<T>& c, kvc::seq_id s, std::int32_t layer, std::int32_t L, kvc_test::rng& r) {
  const std::int32_t H = c.config().num_kv_heads, D = c.config().head_dim;
  auto k = r.normals(static_cast<std::size_t>(L) * H * D);
  const auto v = r.normals(k.size());
  for (std::int32_t t = 1; t < L; ++t)
    for (std::int32_t h = 0; h < H; ++h) {
      float* row = &k[(static_cast<std::size_t>(t) * H + h) * D];
      if (r.coin(0.35)) {
        const std::int32_t j = r.integer(0, t - 1);
        const float* src = &k[(static_cast<std::size_t>(j) * H + h) * D];
        const float eps = r.uniform(0.01f, 0.6f);
        for (std::int32_t d = 0; d < D; ++d) row[d] = src[d] + eps * r.normal();
      } else if (r.coin(0.03)) {
        for (std::int32_t d = 0; d < D; ++d) row[d] = 0.0f;
      }
    }
  c.append(s, layer, k.data(), v.data(), L);
}

template <class T>
void rule_trials(std::uint64_t salt) {
  const bool fp16 = std::is_same<T, kvc::half>::value;
  std::int64_t merged_total = 0, dropped_total = 0;
  for (int trial = 0; trial < 100; ++trial) {
    kvc_test::rng r(salt + static_cast<std::uint64_t>(trial));
    // D = 1 every 7th trial: every cosine is ±1, so ties between kept tokens are the rule there
    // (the first kept token must win).
    const std::int32_t H = r.integer(1, 4), D = trial % 7 == 3 ? 1 : r.integer(1, 48), P = 1 << r.integer(0, 4), layers = 2;
    merged_cache<T> c(kvc_test::cache_shape(layers, H, D, P, 4096));
    const kvc::seq_id s = c.add_sequence();
    const std::int32_t layer = r.integer(0, layers - 1);
    fill_similar(c, s, 0, r.integer(1, 90), r);
    fill_similar(c, s, 1, r.integer(1, 90), r);
    if (r.coin()) premerge(c, s, layer, r, 9);
    d2o_options o;
    o.beta = trial % 5 == 0 ? 0.5f : (trial % 5 == 1 ? 0.0f : r.uniform(0.0f, 0.999f));
    d2o_threshold tau;
    if (trial % 3 != 0) tau.primed = true, tau.tau = r.uniform(-0.5f, 1.2f);
    std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(H));
    std::vector<stream_copy> before;
    for (std::int32_t h = 0; h < H; ++h) {
      before.push_back(copy_stream(c, s, layer, h));
      const std::int32_t n = before.back().n;
      std::int32_t k = r.integer(0, n);
      if (trial % 11 == 5 && (h == 0 || r.coin())) k = 0;  // a head keeps nothing: its tokens are dropped
      if (trial % 13 == 7 && (h == 0 || r.coin())) k = n;  // a head evicts nothing
      kept[static_cast<std::size_t>(h)] = r.subset(n, k);
    }
    const std::size_t bytes_before = c.bytes_in_use();
    INFO("trial " << trial << (fp16 ? " fp16" : " fp32") << " H=" << H << " D=" << D << " P=" << P << " beta=" << o.beta
                  << " primed=" << tau.primed << " tau=" << tau.tau);
    // The reference.
    std::vector<ref_head> ref;
    double sum = 0;
    std::int64_t count = 0;
    for (std::int32_t h = 0; h < H; ++h) {
      ref.push_back(reference_head(before[static_cast<std::size_t>(h)], kept[static_cast<std::size_t>(h)], D));
      for (std::size_t i = 0; i < ref.back().u.size(); ++i)
        if (ref.back().nearest[i] >= 0) sum += ref.back().u[i], ++count;
    }
    const double m = count > 0 ? sum / static_cast<double>(count) : std::numeric_limits<double>::quiet_NaN();
    const d2o_threshold want_tau = reference_threshold(tau, o.beta, m);

    const d2o_threshold tau_before = tau;
    const auto plan = kvc::merge::d2o_merge_layer(c, s, layer, kept, tau, o);

    REQUIRE(tau.primed == want_tau.primed);
    REQUIRE(tau.tau == want_tau.tau);
    REQUIRE(plan.threshold.tau == tau.tau);
    if (count == 0) {
      REQUIRE(std::isnan(plan.statistic));
      REQUIRE(tau.tau == tau_before.tau);
    } else {
      REQUIRE(std::fabs(plan.statistic - m) <= 1e-12);
    }
    std::int64_t merged = 0, dropped = 0;
    for (std::int32_t h = 0; h < H; ++h) {
      const stream_copy& b = before[static_cast<std::size_t>(h)];
      const ref_head& rh = ref[static_cast<std::size_t>(h)];
      const auto& kh = kept[static_cast<std::size_t>(h)];
      const auto& ph = plan.heads[static_cast<std::size_t>(h)];
      // Decisions.
      std::vector<std::vector<std::int32_t>> into(kh.size());  // per kept index: index into rh of its merged tokens
      REQUIRE(ph.evicted.size() == rh.evicted.size());
      std::size_t drops = 0;
      for (std::size_t i = 0; i < rh.evicted.size(); ++i) {
        const bool merge = rh.nearest[i] >= 0 && rh.u[i] >= static_cast<double>(want_tau.tau);
        const std::int32_t want_target = merge ? rh.nearest[i] : -1;
        REQUIRE(ph.evicted[i].token == rh.evicted[i]);
        KVC_REQUIRE(ph.evicted[i].target == want_target,
                    "h " << h << " token " << rh.evicted[i] << " u " << rh.u[i] << " tau " << want_tau.tau);
        if (rh.nearest[i] >= 0) REQUIRE(std::fabs(ph.evicted[i].similarity - rh.u[i]) <= 1e-6);
        else REQUIRE(ph.evicted[i].similarity == -std::numeric_limits<float>::infinity());
        if (merge) {
          const auto at = std::lower_bound(kh.begin(), kh.end(), rh.nearest[i]) - kh.begin();
          into[static_cast<std::size_t>(at)].push_back(static_cast<std::int32_t>(i));
          ++merged;
        } else {
          REQUIRE(drops < ph.dropped.size());
          REQUIRE(ph.dropped[drops++] == rh.evicted[i]);
          ++dropped;
        }
      }
      REQUIRE(drops == ph.dropped.size());
      // The cache after the step.
      const stream_copy a = copy_stream(c, s, layer, h);
      REQUIRE(a.n == static_cast<std::int32_t>(kh.size()));
      const double tol = kvc_test::merged_row_tol(fp16);
      std::size_t g = 0;
      for (std::size_t i = 0; i < kh.size(); ++i) {
        const std::size_t t = static_cast<std::size_t>(kh[i]);
        REQUIRE(a.pos[i] == b.pos[t]);
        if (into[i].empty()) {
          REQUIRE(a.lw[i] == b.lw[t]);
          for (std::int32_t d = 0; d < D; ++d) {
            REQUIRE(a.k[i * D + static_cast<std::size_t>(d)] == b.k[t * D + static_cast<std::size_t>(d)]);
            REQUIRE(a.v[i * D + static_cast<std::size_t>(d)] == b.v[t * D + static_cast<std::size_t>(d)]);
          }
          continue;
        }
        // The group of this kept token: members, the paper's weights exp(u)/Σ (u_c = 1).
        std::vector<std::size_t> mem(1, t);
        std::vector<double> ex(1, std::exp(1.0));
        for (std::int32_t j : into[i]) {
          mem.push_back(static_cast<std::size_t>(rh.evicted[static_cast<std::size_t>(j)]));
          ex.push_back(std::exp(rh.u[static_cast<std::size_t>(j)]));
        }
        double z = 0;
        for (double x : ex) z += x;
        REQUIRE(g < ph.groups.size());
        const merge_group& pg = ph.groups[g++];
        REQUIRE(pg.target == kh[i]);
        REQUIRE(pg.members.size() == mem.size());
        for (std::size_t j = 0; j < mem.size(); ++j) {
          REQUIRE(pg.members[j] == static_cast<std::int32_t>(mem[j]));
          REQUIRE(std::fabs(pg.weights[j] - ex[j] / z) <= 1e-6);
        }
        double mass = 0, asum = 0;
        std::vector<double> kk(static_cast<std::size_t>(D), 0.0), vv(kk.size(), 0.0);
        for (std::size_t j = 0; j < mem.size(); ++j) {
          const double mj = std::exp(double{b.lw[mem[j]]});
          mass += mj;
          const double aj = ex[j] / z * mj;
          asum += aj;
          for (std::int32_t d = 0; d < D; ++d) {
            kk[static_cast<std::size_t>(d)] += aj * b.k[mem[j] * D + static_cast<std::size_t>(d)];
            vv[static_cast<std::size_t>(d)] += aj * b.v[mem[j] * D + static_cast<std::size_t>(d)];
          }
        }
        const double lw = std::log(mass);
        KVC_REQUIRE(std::fabs(a.lw[i] - lw) <= 1e-6 * (1 + std::fabs(lw)), "h " << h << " kept " << i << ": lw " << a.lw[i] << " vs " << lw);
        for (std::int32_t d = 0; d < D; ++d) {
          const double wk = kk[static_cast<std::size_t>(d)] / asum, wv = vv[static_cast<std::size_t>(d)] / asum;
          KVC_REQUIRE(std::fabs(a.k[i * D + static_cast<std::size_t>(d)] - wk) <= tol * (std::fabs(wk) + 1),
                      "h " << h << " kept " << i << " d " << d << ": k " << a.k[i * D + static_cast<std::size_t>(d)] << " vs " << wk);
          KVC_REQUIRE(std::fabs(a.v[i * D + static_cast<std::size_t>(d)] - wv) <= tol * (std::fabs(wv) + 1),
                      "h " << h << " kept " << i << " d " << d << ": v " << a.v[i * D + static_cast<std::size_t>(d)] << " vs " << wv);
        }
      }
      REQUIRE(g == ph.groups.size());
    }
    REQUIRE(plan.merged == merged);
    REQUIRE(plan.dropped == dropped);
    merged_total += merged;
    dropped_total += dropped;
    // Accounting: never more bytes, and the pool's own figure.
    REQUIRE(c.bytes_in_use() <= bytes_before);
    REQUIRE(c.bytes_in_use() == static_cast<std::size_t>(c.cache().pool().pages_in_use()) * c.cache().pool().page_bytes());
    // The other layer is untouched by construction; its log-weights are all 0 or premerged only.
  }
  // The trials exercise both outcomes, many times each.
  REQUIRE(merged_total > 100);
  REQUIRE(dropped_total > 100);
}

}  // namespace

TEST_CASE("D2O merges evicted tokens into their nearest kept keys by the rule, in double", "[merge][d2o]") {
  rule_trials<float>(12100);
  rule_trials<kvc::half>(12200);
}

TEST_CASE("D2O with a threshold above every similarity is plain eviction", "[merge][d2o]") {
  for (int trial = 0; trial < 20; ++trial) {
    kvc_test::rng r(12300 + static_cast<std::uint64_t>(trial));
    const std::int32_t H = r.integer(1, 4), D = r.integer(1, 40), P = 1 << r.integer(0, 4), L = r.integer(2, 80);
    const auto shape = kvc_test::cache_shape(1, H, D, P, 4096);
    merged_cache<kvc::half> a(shape), b(shape);
    const kvc::seq_id sa = a.add_sequence(), sb = b.add_sequence();
    kvc_test::rng ra(12350 + static_cast<std::uint64_t>(trial)), rb(12350 + static_cast<std::uint64_t>(trial));
    fill_similar(a, sa, 0, L, ra);
    fill_similar(b, sb, 0, L, rb);
    if (trial % 2) premerge(a, sa, 0, ra, 9), premerge(b, sb, 0, rb, 9);
    std::vector<std::vector<std::int32_t>> kept;
    for (std::int32_t h = 0; h < H; ++h) {
      const std::int32_t n = a.length(sa, 0, h);
      kept.push_back(r.subset(n, r.integer(1, n)));
    }
    // τ' = β·10 + (1 − β)·m >= 5 − 0.5 > 1 >= every cosine.
    d2o_threshold tau;
    tau.primed = true;
    tau.tau = 10.0f;
    d2o_options o;
    o.beta = r.uniform(0.5f, 0.99f);
    INFO("trial " << trial << " H=" << H << " D=" << D << " P=" << P << " L=" << L);
    const auto plan = kvc::merge::d2o_merge_layer(a, sa, 0, kept, tau, o);
    b.keep_layer(sb, 0, kept);
    REQUIRE(plan.merged == 0);
    REQUIRE(tau.tau > 1.0f);
    for (std::int32_t h = 0; h < H; ++h) {
      const stream_copy x = copy_stream(a, sa, 0, h), y = copy_stream(b, sb, 0, h);
      REQUIRE(x.n == y.n);
      REQUIRE(x.k == y.k);
      REQUIRE(x.v == y.v);
      REQUIRE(x.lw == y.lw);
      REQUIRE(x.pos == y.pos);
      REQUIRE(plan.heads[static_cast<std::size_t>(h)].groups.empty());
    }
    REQUIRE(a.bytes_in_use() == b.bytes_in_use());
  }
}

TEST_CASE("D2O merging exact duplicates leaves the attention output unchanged", "[merge][d2o]") {
  std::int32_t changed_by_dropping = 0;
  for (int trial = 0; trial < 40; ++trial) {
    kvc_test::rng r(12400 + static_cast<std::uint64_t>(trial));
    // D >= 2: in one dimension every key is collinear with every other, so a duplicate's nearest
    // kept key need not be its original.
    const std::int32_t H = r.integer(1, 3), D = r.integer(2, 64), P = 1 << r.integer(0, 4), G = r.integer(1, 6);
    const std::int32_t base = r.integer(1, 40), dups = r.integer(1, 30);
    const bool fp16 = trial % 2 == 1;
    INFO("trial " << trial << (fp16 ? " fp16" : " fp32") << " H=" << H << " D=" << D << " P=" << P << " G=" << G
                  << " base=" << base << " dups=" << dups);
    // Tokens: `base` distinct ones, then `dups` exact copies of random ones among them (same key
    // and value in every head), appended in random order among the originals.
    const auto kb = r.normals(static_cast<std::size_t>(base) * H * D), vb = r.normals(kb.size());
    std::vector<std::int32_t> src;  // per token of the stream: the distinct token it copies
    for (std::int32_t t = 0; t < base; ++t) src.push_back(t);
    for (std::int32_t j = 0; j < dups; ++j) src.push_back(r.integer(0, base - 1));
    std::shuffle(src.begin() + 1, src.end(), r.engine());
    const std::int32_t L = base + dups;
    std::vector<float> k(static_cast<std::size_t>(L) * H * D), v(k.size());
    for (std::int32_t t = 0; t < L; ++t)
      for (std::size_t x = 0; x < static_cast<std::size_t>(H * D); ++x) {
        k[static_cast<std::size_t>(t) * H * D + x] = kb[static_cast<std::size_t>(src[static_cast<std::size_t>(t)]) * H * D + x];
        v[static_cast<std::size_t>(t) * H * D + x] = vb[static_cast<std::size_t>(src[static_cast<std::size_t>(t)]) * H * D + x];
      }
    // Keep the first occurrence of each distinct token; evict every later copy.
    std::vector<std::int32_t> first;
    {
      std::vector<int> seen(static_cast<std::size_t>(base), 0);
      for (std::int32_t t = 0; t < L; ++t)
        if (!seen[static_cast<std::size_t>(src[static_cast<std::size_t>(t)])]++) first.push_back(t);
    }
    const std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(H), first);
    const auto q = r.normals(static_cast<std::size_t>(H * G) * D, 2.0f);
    std::vector<float> full(q.size()), merged(q.size()), evicted(q.size()), lf(static_cast<std::size_t>(H * G)), lm(lf.size());
    double vmax = 1;
    for (float x : v) vmax = std::max(vmax, std::fabs(double{x}));
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
      // A threshold every duplicate passes: τ' = 0.5·(−1) + 0.5·m <= 0 < cos = 1.
      d2o_threshold tau;
      tau.primed = true;
      tau.tau = -1.0f;
      const auto plan = kvc::merge::d2o_merge_layer(c, s, 0, kept, tau);
      REQUIRE(plan.merged == static_cast<std::int64_t>(dups) * H);
      REQUIRE(plan.dropped == 0);
      for (std::int32_t h = 0; h < H; ++h) {
        REQUIRE(c.length(s, 0, h) == base);
        // Each kept token stands for its copies: lw = log(copies).
        std::vector<int> copies(static_cast<std::size_t>(base), 0);
        for (std::int32_t t : src) ++copies[static_cast<std::size_t>(t)];
        for (std::int32_t i = 0; i < base; ++i) {
          const double want = std::log(static_cast<double>(copies[static_cast<std::size_t>(src[static_cast<std::size_t>(first[static_cast<std::size_t>(i)])])]));
          KVC_REQUIRE(std::fabs(c.log_weights(s, 0, h)[static_cast<std::size_t>(i)] - want) <= 1e-6, "h " << h << " i " << i);
        }
      }
      o.lse = lm.data();
      kvc::cpu::merged_decode_attention(c, s, 0, q.data(), H * G, merged.data(), o);
      plain.keep_layer(sp, 0, kept);
      o.lse = nullptr;
      kvc::cpu::merged_decode_attention(plain, sp, 0, q.data(), H * G, evicted.data(), o);
    };
    if (fp16) run(kvc::half{});
    else run(0.0f);
    for (std::size_t i = 0; i < full.size(); ++i)
      KVC_REQUIRE(std::fabs(full[i] - merged[i]) <= 4e-6 * vmax, "out " << i << ": " << full[i] << " vs " << merged[i]);
    for (std::size_t i = 0; i < lf.size(); ++i) KVC_REQUIRE(std::fabs(lf[i] - lm[i]) <= 4e-6f * (1 + std::fabs(lf[i])), i);
    double worst = 0;
    for (std::size_t i = 0; i < full.size(); ++i) worst = std::max(worst, std::fabs(double{full[i]} - evicted[i]));
    if (worst > 1e-3 * vmax) ++changed_by_dropping;
  }
  // Plain eviction of the same copies does change the output: the merge is what keeps it.
  REQUIRE(changed_by_dropping >= 20);
}

TEST_CASE("D2O's threshold is an exponential moving average of the step statistics", "[merge][d2o]") {
  kvc_test::rng r(12500);
  const std::int32_t H = 3, D = 16;
  merged_cache<float> c(kvc_test::cache_shape(1, H, D, 8, 4096));
  const kvc::seq_id s = c.add_sequence();
  fill_similar(c, s, 0, 60, r);
  d2o_options o;
  o.beta = 0.7f;
  d2o_threshold tau;  // not primed: the first statistic becomes τ
  // A step with nothing evicted leaves the state as it is.
  {
    std::vector<std::vector<std::int32_t>> all;
    for (std::int32_t h = 0; h < H; ++h) all.push_back(r.subset(c.length(s, 0, h), c.length(s, 0, h)));
    const auto p = kvc::merge::d2o_merge_layer(c, s, 0, all, tau, o);
    REQUIRE(std::isnan(p.statistic));
    REQUIRE(!tau.primed);
  }
  double want = 0;
  for (int step = 0; step < 6; ++step) {
    fill_similar(c, s, 0, 12, r);  // new tokens each step, as in decoding
    std::vector<std::vector<std::int32_t>> kept;
    std::vector<stream_copy> b;
    for (std::int32_t h = 0; h < H; ++h) {
      b.push_back(copy_stream(c, s, 0, h));
      kept.push_back(r.subset(b.back().n, b.back().n * 3 / 4));
    }
    double sum = 0;
    std::int64_t count = 0;
    for (std::int32_t h = 0; h < H; ++h) {
      const ref_head rh = reference_head(b[static_cast<std::size_t>(h)], kept[static_cast<std::size_t>(h)], D);
      for (double u : rh.u) sum += u, ++count;
    }
    const double m = sum / static_cast<double>(count);
    // τ_1 = m_1; τ_t = β·τ_{t-1} + (1 − β)·m_t, with τ_{t-1} the stored float.
    // (β as the options hold it: the float 0.7f, not the decimal 0.7.)
    const double beta = double{o.beta};
    want = step == 0 ? m : beta * double{tau.tau} + (1 - beta) * m;
    const auto p = kvc::merge::d2o_merge_layer(c, s, 0, kept, tau, o);
    INFO("step " << step << " m " << m << " tau " << tau.tau << " want " << want);
    REQUIRE(tau.primed);
    REQUIRE(std::fabs(p.statistic - m) <= 1e-12);
    REQUIRE(std::fabs(double{tau.tau} - want) <= 1e-7 * (1 + std::fabs(want)));
    // Every merged token passed the threshold of this step, every dropped one failed it.
    // (x.similarity is u rounded to float, so within 1e-6 of the boundary either way is fine.)
    std::int64_t merged = 0;
    for (const auto& ph : p.heads)
      for (const auto& x : ph.evicted) {
        if (x.target >= 0) {
          REQUIRE(double{x.similarity} >= double{tau.tau} - 1e-6);
          ++merged;
        } else {
          REQUIRE(double{x.similarity} < double{tau.tau} + 1e-6);
        }
      }
    REQUIRE(merged == p.merged);
  }
  // A step where every head keeps nothing has no statistic: τ stays.
  const float last = tau.tau;
  const auto p = kvc::merge::d2o_merge_layer(c, s, 0, std::vector<std::vector<std::int32_t>>(H), tau, o);
  REQUIRE(std::isnan(p.statistic));
  REQUIRE(tau.tau == last);
  REQUIRE(c.length(s, 0, 0) == 0);
  REQUIRE(p.dropped > 0);
}

TEST_CASE("D2O rejects bad arguments and changes nothing", "[merge][d2o][strong]") {
  kvc_test::rng r(12600);
  merged_cache<kvc::half> c(kvc_test::cache_shape(2, 2, 8, 4, 1024));
  const kvc::seq_id s = c.add_sequence();
  fill_similar(c, s, 0, 20, r);
  fill_similar(c, s, 1, 20, r);
  premerge(c, s, 0, r, 9);  // nonzero log-weights
  const std::int32_t n0 = c.length(s, 0, 0), n1 = c.length(s, 0, 1);
  auto state = [&] { return kvc_test::full_state(c, {s}); };
  const auto before = state();
  const std::size_t bytes = c.bytes_in_use();
  const std::vector<std::vector<std::int32_t>> kept = {{0, 2, 5}, {1, 3, n1 - 1}};
  d2o_threshold tau;
  tau.primed = true;
  tau.tau = 0.25f;
  auto expect_error = [&](auto&& call, const std::string& text) {
    d2o_threshold t = tau;
    kvc_test::require_error([&] { call(t); }, text);
    REQUIRE(state() == before);
    REQUIRE(c.bytes_in_use() == bytes);
    REQUIRE(t.primed == tau.primed);
    REQUIRE(t.tau == tau.tau);
  };
  using kvc::merge::d2o_merge_layer;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  {
    d2o_threshold bad;
    bad.primed = true;
    bad.tau = nan;
    expect_error([&](d2o_threshold&) { d2o_merge_layer(c, s, 0, kept, bad); },
                 "kvc::merge::d2o_plan: threshold.tau = nan, expected a finite threshold");
    bad.tau = std::numeric_limits<float>::infinity();
    expect_error([&](d2o_threshold&) { d2o_merge_layer(c, s, 0, kept, bad); }, "threshold.tau = inf");
  }
  for (float beta : {1.0f, -0.1f, 1.5f, nan}) {
    d2o_options o;
    o.beta = beta;
    expect_error([&](d2o_threshold& t) { d2o_merge_layer(c, s, 0, kept, t, o); },
                 "d2o_options.beta = " + std::string(std::isnan(beta) ? "nan" : beta == 1.0f ? "1" : beta < 0 ? "-0.1" : "1.5") +
                     ", expected 0 <= beta < 1");
  }
  auto k2 = kept;
  k2[1].push_back(n1);
  expect_error([&](d2o_threshold& t) { d2o_merge_layer(c, s, 0, k2, t); },
               "kept[1][3] = " + std::to_string(n1) + ", expected 0.." + std::to_string(n1 - 1));
  k2 = kept;
  k2[0][0] = -1;
  expect_error([&](d2o_threshold& t) { d2o_merge_layer(c, s, 0, k2, t); }, "kept[0][0] = -1, expected 0..");
  k2 = kept;
  k2[0] = {3, 2};
  expect_error([&](d2o_threshold& t) { d2o_merge_layer(c, s, 0, k2, t); }, "kept[0][1] = 2 after 3, expected strictly increasing");
  k2 = kept;
  k2[0] = {4, 4};
  expect_error([&](d2o_threshold& t) { d2o_merge_layer(c, s, 0, k2, t); }, "kept[0][1] = 4 after 4");
  expect_error([&](d2o_threshold& t) { d2o_merge_layer(c, s, 0, {{0, 1}}, t); }, "kept.size() = 1, expected num_kv_heads = 2");
  expect_error([&](d2o_threshold& t) { d2o_merge_layer(c, s, 2, kept, t); }, "layer = 2");
  expect_error([&](d2o_threshold& t) { d2o_merge_layer(c, s + 5, 0, kept, t); }, "sequence");
  // d2o_plan alone: its own argument checks.
  expect_error([&](d2o_threshold& t) { kvc::merge::d2o_plan({std::vector<float>(7)}, 2, {{}}, t); },
               "keys[0].size() = 7, expected a multiple of head_dim = 2");
  expect_error([&](d2o_threshold& t) { kvc::merge::d2o_plan({{1.0f, nan}}, 2, {{0}}, t); }, "keys[0][1] = nan, expected a finite key");
  expect_error([&](d2o_threshold& t) { kvc::merge::d2o_plan({{1.0f}}, 0, {{}}, t); }, "head_dim = 0, expected >= 1");
  // (Sizes from the generator: with literal sizes GCC 12 inlines past the throw and warns.)
  const std::vector<std::vector<std::int32_t>> no_kept(static_cast<std::size_t>(r.integer(0, 0)));
  expect_error([&](d2o_threshold& t) { kvc::merge::d2o_plan({{1.0f}}, 1, no_kept, t); }, "kept.size() = 0, expected keys.size() = 1");
  // merge_layer's `drop` list, which D2O's commit uses.
  std::vector<std::vector<merge_group>> none(2);
  std::vector<std::vector<std::int32_t>> drop = {{1}, {n1}};
  expect_error([&](d2o_threshold&) { c.merge_layer(s, 0, none, kvc::merge::mean_weights::mass, &drop); },
               "drop[1][0] = " + std::to_string(n1) + ", expected 0..");
  drop = {{1, 1}, {}};
  expect_error([&](d2o_threshold&) { c.merge_layer(s, 0, none, kvc::merge::mean_weights::mass, &drop); },
               "drop[0][1] = 1 is listed twice");
  merge_group g;
  g.target = 3;
  g.members = {3, 4};
  g.weights = {1, 1};
  std::vector<std::vector<merge_group>> one = {{g}, {}};
  drop = {{4}, {}};
  expect_error([&](d2o_threshold&) { c.merge_layer(s, 0, one, kvc::merge::mean_weights::mass, &drop); },
               "drop[0][0] = 4 is a member of a group of kv head 0");
  drop = {{3}, {}};
  expect_error([&](d2o_threshold&) { c.merge_layer(s, 0, one, kvc::merge::mean_weights::mass, &drop); },
               "drop[0][0] = 3 is a member of a group");
  drop = {{}};
  expect_error([&](d2o_threshold&) { c.merge_layer(s, 0, none, kvc::merge::mean_weights::mass, &drop); },
               "drop->size() = 1, expected num_kv_heads = 2");
  (void)n0;
  // And a good call after all that works.
  const auto p = d2o_merge_layer(c, s, 0, kept, tau);
  REQUIRE(c.length(s, 0, 0) == 3);
  REQUIRE(p.merged + p.dropped == static_cast<std::int64_t>(n0 - 3 + n1 - 3));
}

TEST_CASE("D2O on a forked sequence with the pool exhausted changes nothing", "[merge][d2o][strong]") {
  for (int trial = 0; trial < 6; ++trial) {
    kvc_test::rng r(12700 + static_cast<std::uint64_t>(trial));
    const std::int32_t H = r.integer(1, 3), P = 4, D = r.integer(2, 20), L = r.integer(9, 40);
    const std::int32_t pages = H * ((L + P - 1) / P);
    // Exactly the pages the prompt needs: the step must copy a shared page, and cannot.
    merged_cache<float> c(kvc_test::cache_shape(1, H, D, P, pages));
    const kvc::seq_id a = c.add_sequence();
    fill_similar(c, a, 0, L, r);
    const kvc::seq_id b = c.fork(a);
    std::vector<std::vector<std::int32_t>> kept;
    for (std::int32_t h = 0; h < H; ++h) {
      std::vector<std::int32_t> k;  // evict token 1: page 0 changes
      for (std::int32_t t = 0; t < L; ++t)
        if (t != 1) k.push_back(t);
      kept.push_back(k);
    }
    auto state = [&] { return kvc_test::full_state(c, {a, b}); };
    const auto before = state();
    d2o_threshold tau;
    tau.primed = trial % 2 == 0;
    tau.tau = trial % 4 == 0 ? -1.0f : 0.3f;  // merged or dropped, either way page 0 is rewritten
    const d2o_threshold tau0 = tau;
    const kvc::seq_id target = trial % 2 ? a : b;
    REQUIRE_THROWS_AS(kvc::merge::d2o_merge_layer(c, target, 0, kept, tau), kvc::out_of_memory);
    REQUIRE(state() == before);
    REQUIRE(tau.primed == tau0.primed);
    REQUIRE(tau.tau == tau0.tau);
    REQUIRE(c.cache().pool().pages_in_use() == pages);
    // With the sibling gone, the step goes through and frees nothing it should keep.
    c.remove_sequence(target == a ? b : a);
    const auto p = kvc::merge::d2o_merge_layer(c, target, 0, kept, tau);
    REQUIRE(p.merged + p.dropped == H);
    REQUIRE(c.length(target, 0, 0) == L - 1);
    REQUIRE(tau.primed);
  }
}

namespace {
template <class T>
void no_mass_trials(std::uint64_t salt) {
  // Twin caches, the same step with carry_mass true and false: the means are the same (to the
  // rounding of rescaled weights), and without mass every merged token keeps the log-weight its
  // target had (the paper's form), where with mass it grows to log Σ exp(lw_i).
  // fp16 pages: the two means may round to neighbouring binary16 values.
  const double tol = std::is_same<T, kvc::half>::value ? 1.0 / 1024 : 1e-6;
  std::int64_t merged = 0;
  for (int trial = 0; trial < 40; ++trial) {
    kvc_test::rng r(salt + static_cast<std::uint64_t>(trial));
    const std::int32_t H = r.integer(1, 3), D = r.integer(2, 40), P = 1 << r.integer(0, 3);
    merged_cache<T> a(kvc_test::cache_shape(1, H, D, P, 4096)), b(a.config());
    const kvc::seq_id sa = a.add_sequence(), sb = b.add_sequence();
    const std::int32_t L = r.integer(4, 80);
    kvc_test::rng r2 = r;
    fill_similar(a, sa, 0, L, r);
    fill_similar(b, sb, 0, L, r2);
    if (r.coin(0.5)) {
      kvc_test::rng r3 = r;
      premerge(a, sa, 0, r, 9);
      premerge(b, sb, 0, r3, 9);
    }
    std::vector<std::vector<std::int32_t>> kept;
    std::vector<std::vector<float>> lw0;
    for (std::int32_t h = 0; h < H; ++h) {
      kept.push_back(r.subset(a.length(sa, 0, h), r.integer(1, a.length(sa, 0, h))));
      lw0.push_back(a.log_weights(sa, 0, h));
    }
    kvc::merge::d2o_threshold ta, tb;
    kvc::merge::d2o_options with, without;
    without.carry_mass = false;
    const auto pa = kvc::merge::d2o_merge_layer(a, sa, 0, kept, ta, with);
    const auto pb = kvc::merge::d2o_merge_layer(b, sb, 0, kept, tb, without);
    REQUIRE(pa.merged == pb.merged);
    merged += pb.merged;
    for (std::int32_t h = 0; h < H; ++h) {
      const stream_copy ca = kvc_test::copy_stream(a, sa, 0, h), cb = kvc_test::copy_stream(b, sb, 0, h);
      REQUIRE(ca.n == cb.n);
      for (std::size_t i = 0; i < ca.k.size(); ++i) {
        KVC_REQUIRE(std::fabs(ca.k[i] - cb.k[i]) <= tol * (1 + std::fabs(ca.k[i])), "k " << i);
        KVC_REQUIRE(std::fabs(ca.v[i] - cb.v[i]) <= tol * (1 + std::fabs(ca.v[i])), "v " << i);
      }
      const auto& kh = kept[static_cast<std::size_t>(h)];
      for (std::size_t i = 0; i < kh.size(); ++i) {
        const float before = lw0[static_cast<std::size_t>(h)][static_cast<std::size_t>(kh[i])];
        KVC_REQUIRE(std::fabs(cb.lw[i] - before) <= 1e-6f * (1 + std::fabs(before)), "h " << h << " kept " << i);
        KVC_REQUIRE(ca.lw[i] >= before - 1e-6f, "with mass a merged token never loses mass");
      }
    }
  }
  REQUIRE(merged > 100);
}
}  // namespace

TEST_CASE("D2O without carried mass: same merged rows, the kept token's log-weight unchanged", "[merge][d2o]") {
  no_mass_trials<float>(15100);
  no_mass_trials<kvc::half>(15200);
}

// d2o_plan decides on float cosines of keys normalised once and settles in double what float
// cannot (a rival within the float bound); keys near float's range ends are normalised in double.
// Against the double reference: keys scaled by 1e-41 (subnormal elements) to 1e37, zero keys,
// near-parallel copies (cosines 1e-7..1e-4 apart: inside the float bound, so the double fallback
// decides), few evicted tokens (the raw-key path) and many (the tiled one), D across the SIMD
// widths. τ = -10 merges every evicted token into its nearest kept one, so every target shows.
TEST_CASE("D2O's float fast path gives the double rule's nearest keys at float's range ends and near ties",
          "[merge][d2o]") {
  const float scales[] = {1.0f, 1e-41f, 1e-30f, 1e-19f, 1e19f, 1e30f, 1e37f, 0.0f};
  std::int64_t checked = 0, near_rival = 0;
  for (int trial = 0; trial < 60; ++trial) {
    kvc_test::rng r(12900 + static_cast<std::uint64_t>(trial));
    const std::int32_t dims[] = {1, 3, 8, 13, 16, 40, 64, 128};
    const std::int32_t D = dims[r.integer(0, 7)], H = r.integer(1, 3), n = r.integer(2, 90);
    const bool few = trial % 2 == 0;
    std::vector<std::vector<float>> keys(static_cast<std::size_t>(H));
    std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(H));
    for (std::int32_t h = 0; h < H; ++h) {
      auto& k = keys[static_cast<std::size_t>(h)];
      k = r.normals(static_cast<std::size_t>(n) * D);
      for (std::int32_t t = 1; t < n; ++t) {
        float* row = &k[static_cast<std::size_t>(t) * D];
        if (r.coin(0.4)) {  // a near-parallel copy of an earlier key (before the scaling)
          const float* src = &k[static_cast<std::size_t>(r.integer(0, t - 1)) * D];
          const float eps = std::pow(10.0f, r.uniform(-4.0f, -2.0f));
          for (std::int32_t d = 0; d < D; ++d) row[d] = src[d] * (1.0f + eps * r.normal());
        }
      }
      for (std::int32_t t = 0; t < n; ++t) {
        const float s = scales[r.integer(0, 7)];
        for (std::int32_t d = 0; d < D; ++d) k[static_cast<std::size_t>(t) * D + d] *= s;
      }
      for (std::int32_t t = 0; t < n; ++t)
        if (few ? !(r.coin(0.05) || t == n / 2) : r.coin(0.4)) kept[static_cast<std::size_t>(h)].push_back(t);
    }
    d2o_threshold tau;
    tau.primed = true;
    tau.tau = -10.0f;
    const auto plan = kvc::merge::d2o_plan(keys, D, kept, tau);
    double sum = 0;
    std::int64_t count = 0;
    for (std::int32_t h = 0; h < H; ++h) {
      stream_copy b;
      b.k = keys[static_cast<std::size_t>(h)];
      b.n = n;
      const auto& kh = kept[static_cast<std::size_t>(h)];
      const ref_head rh = reference_head(b, kh, D);
      const auto& ph = plan.heads[static_cast<std::size_t>(h)];
      REQUIRE(ph.evicted.size() == rh.evicted.size());
      for (std::size_t i = 0; i < rh.evicted.size(); ++i) {
        const auto& x = ph.evicted[i];
        REQUIRE(x.token == rh.evicted[i]);
        if (rh.nearest[i] < 0) {
          REQUIRE(x.target == -1);
          continue;
        }
        sum += rh.u[i], ++count;
        INFO("trial " << trial << " D " << D << " h " << h << " token " << x.token << " u " << rh.u[i]);
        REQUIRE(std::fabs(x.similarity - rh.u[i]) <= 1e-6);
        // The reference's ties: kept keys within its own rounding (~D·2^-52) of the best; the
        // first of them is the rule's choice, but the reference's other formula may order them.
        const float* ke = &b.k[static_cast<std::size_t>(x.token) * D];
        std::vector<std::int32_t> tied;
        bool rival = false;
        for (std::int32_t c : kh) {
          const double cs = cosine(ke, &b.k[static_cast<std::size_t>(c) * D], D);
          if (cs >= rh.u[i] - 1e-12) tied.push_back(c);
          else if (cs >= rh.u[i] - 1e-4) rival = true;
        }
        near_rival += rival;
        if (tied.size() == 1) REQUIRE(x.target == rh.nearest[i]);
        else REQUIRE(std::find(tied.begin(), tied.end(), x.target) != tied.end());
        ++checked;
      }
    }
    if (count > 0) REQUIRE(std::fabs(plan.statistic - sum / static_cast<double>(count)) <= 1e-12);
  }
  INFO("checked " << checked << ", with a rival within 1e-4 " << near_rival);
  REQUIRE(checked > 1000);
  REQUIRE(near_rival > 50);  // the double fallback was exercised

  // An inf or NaN found by the normalisation (a row of the raw-key path, of a kept tile, of the
  // evicted rows) gives check_layer_keys' message, the first bad element's.
  for (int where = 0; where < 3; ++where) {
    const std::int32_t D = 9, n = 40;
    std::vector<std::vector<float>> keys{kvc_test::rng(77).normals(static_cast<std::size_t>(n) * D)};
    std::vector<std::vector<std::int32_t>> kept(1);
    for (std::int32_t t = 0; t < n; ++t)
      if (where == 0 ? t != 5 : t % 2 == 0) kept[0].push_back(t);
    const std::int32_t bad = where == 2 ? 7 : 30;  // 30: kept; 7: evicted
    keys[0][static_cast<std::size_t>(bad) * D + 4] = where == 1 ? std::numeric_limits<float>::infinity()
                                                                 : std::numeric_limits<float>::quiet_NaN();
    keys[0][static_cast<std::size_t>(bad + 2) * D + 1] = std::numeric_limits<float>::quiet_NaN();
    kvc_test::require_error([&] { (void)kvc::merge::d2o_plan(keys, D, kept, d2o_threshold{}); },
                            "kvc::merge::d2o_plan: keys[0][" + std::to_string(bad * D + 4) + "] = " +
                                (where == 1 ? "inf" : "nan") + ", expected a finite key");
  }
}
