// SPDX-License-Identifier: Apache-2.0
// Issue 4's invariants on random inputs of many shapes, each checked against plain code written
// here: selection against a full sort; exact budgets, protection, sorted and deterministic kept
// tokens for many scorers and allocators; pool bytes against the pages emptied; attention over the
// compressed cache against a double-precision softmax over the kept tokens; the decode-time
// scorers against double statistics of double attention through compaction; 10,000-step decode
// runs of every decode-time scorer within budget; bad arguments leave the cache unchanged.
#include <algorithm>
#include <cmath>
#include <deque>
#include <limits>
#include <map>
#include <numeric>
#include <set>

#include "evict_test_util.hpp"
#include "kvc_catch.hpp"

using namespace kvc::evict;

namespace {

using cache_t = kvc::kv_cache<float>;

/// Every stream's length and positions, for "the cache is unchanged".
std::vector<std::int32_t> snapshot(const cache_t& c, kvc::seq_id s) {
  std::vector<std::int32_t> out;
  const auto& cfg = c.config();
  for (int l = 0; l < cfg.num_layers; ++l)
    for (int h = 0; h < cfg.num_kv_heads; ++h) {
      const int n = c.length(s, l, h);
      out.push_back(n);
      out.insert(out.end(), c.positions(s, l, h), c.positions(s, l, h) + n);
    }
  return out;
}

/// Keys the selection ranks by, in double: NaN counts as -inf.
double rank_key(float x) { return std::isnan(x) ? -std::numeric_limits<double>::infinity() : double(x); }

/// Reference selection: protected first (sinks, then the most recent), the rest by a full sort on
/// (score desc, index asc), returned sorted.
std::vector<std::int32_t> ref_select(const std::vector<float>& s, int keep, int sinks, int recent) {
  const int n = int(s.size());
  if (keep == n) {
    std::vector<std::int32_t> all(n);
    std::iota(all.begin(), all.end(), 0);
    return all;
  }
  sinks = std::min(sinks, n);
  recent = std::min(recent, n - sinks);
  std::vector<std::int32_t> out;
  if (keep <= sinks + recent) {
    const int a = std::min(keep, sinks);
    for (int t = 0; t < a; ++t) out.push_back(t);
    for (int t = n - (keep - a); t < n; ++t) out.push_back(t);
    std::sort(out.begin(), out.end());
    return out;
  }
  std::vector<std::pair<double, int>> cand;
  for (int t = sinks; t < n - recent; ++t) cand.push_back({-rank_key(s[t]), t});
  std::sort(cand.begin(), cand.end());
  for (int t = 0; t < sinks; ++t) out.push_back(t);
  for (int i = 0; i < keep - sinks - recent; ++i) out.push_back(cand[i].second);
  for (int t = n - recent; t < n; ++t) out.push_back(t);
  std::sort(out.begin(), out.end());
  return out;
}

/// Double-precision decode attention of query q (one head, already unscaled) over the tokens
/// `pos` of (layer, head) of a filled cache's raw arrays: out, lse and probabilities.
struct ref_attention {
  std::vector<double> out, p;
  double lse = -INFINITY;
};
ref_attention ref_attend(const kt::filled& f, int l, int h, const float* q, const std::int32_t* pos, int n) {
  ref_attention r;
  r.out.assign(std::size_t(f.m.d), 0.0);
  if (n == 0) return r;
  std::vector<double> s(static_cast<std::size_t>(n));
  double mx = -INFINITY;
  for (int i = 0; i < n; ++i) {
    double a = 0;
    for (int d = 0; d < f.m.d; ++d) a += double(q[d]) * f.K(l, pos[i], h, d);
    s[std::size_t(i)] = a / std::sqrt(double(f.m.d));
    mx = std::max(mx, s[std::size_t(i)]);
  }
  double z = 0;
  for (double x : s) z += std::exp(x - mx);
  r.lse = mx + std::log(z);
  for (int i = 0; i < n; ++i) {
    r.p.push_back(std::exp(s[std::size_t(i)] - r.lse));
    for (int d = 0; d < f.m.d; ++d) r.out[std::size_t(d)] += r.p.back() * f.V(l, pos[i], h, d);
  }
  return r;
}

/// Random probability rows [hq][stride] over n tokens (what an observer is fed between real steps).
void random_probs(std::mt19937_64& g, int hq, int n, int stride, std::vector<float>& probs) {
  std::normal_distribution<float> nd;
  probs.assign(std::size_t(hq) * std::max(stride, 1), 0.0f);
  for (int qh = 0; qh < hq; ++qh) {
    float* r = probs.data() + std::size_t(qh) * stride;
    float z = 0;
    for (int t = 0; t < n; ++t) z += (r[t] = std::exp(2.0f * nd(g)));
    for (int t = 0; t < n; ++t) r[t] /= z;
  }
}

}  // namespace

TEST_CASE("select_top equals a full sort by (score desc, index asc) with protection", "[evict][select][invariants]") {
  std::mt19937 g(7);
  const float specials[] = {NAN, INFINITY, -INFINITY, 0.0f, -0.0f, 1.0f};
  for (int trial = 0; trial < 2000; ++trial) {
    const int n = 1 + int(g() % 200);
    std::vector<float> s(static_cast<std::size_t>(n));
    const int distinct = 1 + int(g() % 50);  // few distinct values: many ties
    for (auto& x : s) x = (g() % 10 == 0) ? specials[g() % 6] : float(int(g() % distinct) - distinct / 2) * 0.25f;
    const int keep = int(g() % (n + 1)), sinks = int(g() % 8), recent = int(g() % 8);
    std::vector<std::int32_t> got;
    select_top(s.data(), n, keep, protection{sinks, recent}, got);
    INFO("trial " << trial << " n=" << n << " keep=" << keep << " sinks=" << sinks << " recent=" << recent);
    REQUIRE(got == ref_select(s, keep, sinks, recent));
  }
}

TEST_CASE("compress on random shapes: exact budgets, protection, sorted, deterministic, pool bytes, attention",
          "[evict][invariants]") {
  std::mt19937_64 g(11);
  for (int trial = 0; trial < 60; ++trial) {
    kt::model m;
    m.layers = 2;
    m.hkv = 1 + int(g() % 4);
    m.hq = m.hkv * (1 + int(g() % 3));
    m.d = 8 << (g() % 3);
    m.page = 1 << (g() % 5);
    const int n = 1 + int(g() % 160);
    const int kind = trial % 9;
    const int alloc_kind = int(g() % 3);  // uniform, ada, pyramid
    const bool use_ratio = g() % 2 == 0;
    const double ratios[] = {0.0, 0.1, 0.5, 0.75, 0.9, 0.99};
    const double r = ratios[g() % 6];
    const int tokens = int(g() % (n + 1));
    const int layer = int(g() % 2);
    const std::uint64_t seed = 1000 + std::uint64_t(trial);
    INFO("trial " << trial << " scorer kind " << kind << " alloc " << alloc_kind << " hkv=" << m.hkv << " hq=" << m.hq
                  << " d=" << m.d << " page=" << m.page << " n=" << n << (use_ratio ? " ratio " : " tokens ")
                  << (use_ratio ? r : double(tokens)) << " layer " << layer);

    compressor_options o;
    o.target = use_ratio ? kvc::budget::ratio(r) : kvc::budget::tokens(tokens);
    o.num_q_heads = m.hq;
    if (alloc_kind == 1) o.alloc = kvc::allocator::ada(double(g() % 3) / 2.0);  // 0, 0.5, 1
    if (alloc_kind == 2) o.alloc = kvc::allocator::pyramid(20, 4);
    const int wn = std::min(n, 4);
    auto wq = kt::randn(std::size_t(wn) * m.hq * m.d, seed + 5);
    query_window w{wq.data(), nullptr, wn, m.hq, m.d};
    observer_params op;
    op.forgetting = 0.9f;

    // One run on a fresh cache; returns the kept positions of every head of `layer`.
    auto run_once = [&](kt::filled& f, compress_report& rep, std::size_t& before) {
      attention_observer ob(op);
      std::mt19937_64 pg(seed + 9);
      std::vector<float> probs;
      for (int st = 0; st < 3; ++st) {
        random_probs(pg, m.hq, n, n, probs);
        ob.observe(f.cache, f.seq, layer, probs.data(), m.hq, n);
      }
      observations obs;
      obs.window = &w;
      obs.attention = &ob;
      before = f.cache.bytes_in_use();
      auto go = [&](auto scorer) {
        compressor<decltype(scorer)> c(scorer, o);
        rep = c.compress(f.cache, f.seq, layer, obs);
        return c.protect();
      };
      snapkv_params sp;
      sp.window = wn;
      switch (kind) {
        case 0: return go(knorm{});
        case 1: return go(keydiff{});
        case 2: return go(curdkv{});
        case 3: return go(snapkv(sp));
        case 4: return go(h2o(h2o_params{8, 2}));
        case 5: return go(tova{});
        case 6: return go(scissorhands(scissorhands_params{16, 8, 1}));
        case 7: return go(a2sf(a2sf_params{8, 0}));
        default: return go(kvc::evict::random{});
      }
    };
    kt::filled f(m, n, seed), f2(m, n, seed);
    compress_report rep, rep2;
    std::size_t before = 0, before2 = 0;
    const protection prot = run_once(f, rep, before);
    run_once(f2, rep2, before2);
    REQUIRE(snapshot(f.cache, f.seq) == snapshot(f2.cache, f2.seq));  // same result every run

    // Expected kept counts, computed here.
    const int base = use_ratio ? int(std::floor(n * (1.0 - r) + 1e-9)) : std::min(tokens, n);
    std::vector<int> lens;
    std::int64_t total = 0;
    for (int h = 0; h < m.hkv; ++h) lens.push_back(f.cache.length(f.seq, layer, h)), total += lens.back();
    if (alloc_kind == 0) {
      for (int h = 0; h < m.hkv; ++h) REQUIRE(lens[std::size_t(h)] == base);
    } else if (alloc_kind == 1) {
      REQUIRE(total == std::int64_t(base) * m.hkv);  // one layer-wide budget, split by score
    } else {
      for (int h = 0; h < m.hkv; ++h) REQUIRE(lens[std::size_t(h)] == lens[0]);  // the layer's own budget
      REQUIRE(lens[0] == o.alloc->pyramid_keep(base, n, layer, m.layers));
    }
    const int pc = std::min(n, prot.sinks + prot.recent);
    for (int h = 0; h < m.hkv; ++h) {
      const int L = lens[std::size_t(h)];
      const std::int32_t* p = f.cache.positions(f.seq, layer, h);
      for (int i = 1; i < L; ++i) REQUIRE(p[i - 1] < p[i]);  // sorted, no duplicates
      if (L > 0) REQUIRE((p[0] >= 0 && p[L - 1] < n));
      if (L >= pc) {  // every protected token kept
        std::set<int> kept(p, p + L);
        for (int t = 0; t < std::min(prot.sinks, n); ++t) REQUIRE(kept.count(t));
        for (int t = std::max(0, n - prot.recent); t < n; ++t) REQUIRE(kept.count(t));
      }
      REQUIRE(f.cache.length(f.seq, 1 - layer, h) == n);  // the other layer is untouched
    }
    // Pool bytes fall by exactly the pages emptied; the layer holds its streams' own pages.
    const std::size_t page_bytes = f.cache.pool().page_bytes();
    std::size_t emptied = 0, held = 0;
    for (int L : lens) emptied += kt::pages_for(n, m.page) - kt::pages_for(L, m.page), held += kt::pages_for(L, m.page);
    REQUIRE(before - f.cache.bytes_in_use() == emptied * page_bytes);
    REQUIRE(rep.bytes_released == emptied * page_bytes);
    REQUIRE(f.cache.bytes_in_use(layer) == held * page_bytes);
    REQUIRE(rep.tokens_after == total);

    // Decode attention over the compressed layer equals double attention over the kept tokens.
    auto q = kt::randn(std::size_t(m.hq) * m.d, seed + 7, 1.5f);
    std::vector<float> out(std::size_t(m.hq) * m.d), lse(std::size_t(m.hq)), probs(std::size_t(m.hq) * n),
        gprobs(std::size_t(m.hkv) * n);
    kvc::decode_options dopt;
    dopt.lse = lse.data();
    dopt.probs = probs.data();
    dopt.group_probs = gprobs.data();
    dopt.probs_stride = n;
    if (total == 0) {  // the budget evicted the whole layer: attention over nothing is an error, not zeros
      REQUIRE_THROWS_WITH(kvc::cpu::decode_attention(f.cache, f.seq, layer, q.data(), m.hq, out.data(), dopt),
                          Catch::Contains("holds 0 tokens in all its kv heads"));
      continue;
    }
    kvc::cpu::decode_attention(f.cache, f.seq, layer, q.data(), m.hq, out.data(), dopt);
    for (int qh = 0; qh < m.hq; ++qh) {
      const int h = qh / m.G();
      const int L = lens[std::size_t(h)];
      const auto ref = ref_attend(f, layer, h, q.data() + std::size_t(qh) * m.d, f.cache.positions(f.seq, layer, h), L);
      double vmax = 1e-30;
      for (int t = 0; t < n; ++t)
        for (int d = 0; d < m.d; ++d) vmax = std::max(vmax, std::abs(f.V(layer, t, h, d)));
      for (int d = 0; d < m.d; ++d)
        REQUIRE(std::abs(out[std::size_t(qh) * m.d + d] - ref.out[std::size_t(d)]) <= 2e-5 * vmax);
      if (L == 0) {
        REQUIRE((std::isinf(lse[std::size_t(qh)]) && lse[std::size_t(qh)] < 0));
        continue;
      }
      REQUIRE(std::abs(lse[std::size_t(qh)] - ref.lse) <= 2e-5 * std::max(1.0, std::abs(ref.lse)));
      for (int t = 0; t < L; ++t)
        REQUIRE(std::abs(probs[std::size_t(qh) * n + t] - ref.p[std::size_t(t)]) <= 2e-5 * ref.p[std::size_t(t)] + 1e-7);
    }
  }
}

TEST_CASE("decode scorers against double statistics of double attention, through compaction",
          "[evict][decode][invariants]") {
  // A decode run whose every step feeds the observer decode_attention's group_probs (observe_group)
  // and compresses with h2o; the reference keeps, per original position, the statistics of the
  // group-mean attention computed in double from the raw K, and drops what the cache dropped.
  const int H = 2, Hq = 6, G = Hq / H, D = 16, P = 4, steps = 90, history = 8;
  const double lambda = 0.8;
  kvc::cache_config cfg;
  cfg.num_layers = 1;
  cfg.num_kv_heads = H;
  cfg.head_dim = D;
  cfg.page_size = P;
  cfg.max_pages = 1024;
  cache_t cache(cfg);
  auto s = cache.add_sequence();
  observer_params op;
  op.forgetting = float(lambda);
  attention_observer ob(op);
  compressor_options o;
  o.target = kvc::budget::tokens(24);
  o.num_q_heads = Hq;
  o.interval = 8;
  o.slack = 6;
  compressor<h2o> c(h2o(h2o_params{4, 2}), o);
  struct stats {
    double sum = 0, dec = 0, last = 0;
    std::deque<bool> low;  // newest first
  };
  std::vector<std::map<int, stats>> ref(H);
  std::vector<std::vector<double>> K(H), V(H);  // [h][pos * D + d]
  std::mt19937_64 g(3);
  std::normal_distribution<float> nd;
  int compressions = 0;
  for (int step = 0; step < steps; ++step) {
    std::vector<float> k(std::size_t(H) * D), v(k.size()), q(std::size_t(Hq) * D), out(q.size());
    for (auto& x : k) x = 1.5f * nd(g);
    for (auto& x : v) x = nd(g);
    for (auto& x : q) x = 1.5f * nd(g);
    cache.append(s, 0, k.data(), v.data(), 1);
    for (int h = 0; h < H; ++h)
      for (int d = 0; d < D; ++d) K[h].push_back(k[std::size_t(h) * D + d]), V[h].push_back(v[std::size_t(h) * D + d]);
    const int stride = step + 1;
    std::vector<float> gp(std::size_t(H) * stride);
    kvc::decode_options dopt;
    dopt.group_probs = gp.data();
    dopt.probs_stride = stride;
    kvc::cpu::decode_attention(cache, s, 0, q.data(), Hq, out.data(), dopt);
    ob.observe_group(cache, s, 0, gp.data(), stride, G);
    for (int h = 0; h < H; ++h) {
      const int n = cache.length(s, 0, h);
      const std::int32_t* pos = cache.positions(s, 0, h);
      std::vector<double> mean(std::size_t(n), 0.0);
      for (int gq = 0; gq < G; ++gq) {
        const float* qq = q.data() + std::size_t(h * G + gq) * D;
        std::vector<double> sc(static_cast<std::size_t>(n));
        double mx = -INFINITY, z = 0;
        for (int i = 0; i < n; ++i) {
          double a = 0;
          for (int d = 0; d < D; ++d) a += double(qq[d]) * K[h][std::size_t(pos[i]) * D + d];
          mx = std::max(mx, sc[std::size_t(i)] = a / std::sqrt(double(D)));
        }
        for (double x : sc) z += std::exp(x - mx);
        for (int i = 0; i < n; ++i) mean[std::size_t(i)] += std::exp(sc[std::size_t(i)] - mx) / z / G;
      }
      for (int i = 0; i < n; ++i) {
        stats& st = ref[h][pos[i]];
        const double p = mean[std::size_t(i)];
        st.sum += p;
        st.dec = lambda * st.dec + p;
        st.last = p;
        st.low.push_front(p < 1.0 / n);
      }
    }
    observations obs;
    obs.attention = &ob;
    compressions += c.after_decode_step(cache, s, 0, obs).compressed;
    for (int h = 0; h < H; ++h) {  // drop what the cache dropped
      std::set<int> kept(cache.positions(s, 0, h), cache.positions(s, 0, h) + cache.length(s, 0, h));
      for (auto it = ref[h].begin(); it != ref[h].end();) it = kept.count(it->first) ? std::next(it) : ref[h].erase(it);
      REQUIRE(ref[h].size() == std::size_t(cache.length(s, 0, h)));
    }
    // Every scorer after every step, so right after a compaction too (before the next observation
    // overwrites what a compaction may have misaligned).
    kvc::evict::gathered_layer gl;
    gather_layer(cache, s, 0, Hq, reads_nothing, gl);
    layer_scores sh, sa, st, ss;
    h2o{}.score(gl.in, obs, sh);
    a2sf{}.score(gl.in, obs, sa);
    tova(tova_params{false, 0}).score(gl.in, obs, st);
    scissorhands(scissorhands_params{history, 0, 0}).score(gl.in, obs, ss);
    for (int h = 0; h < H; ++h) {
      const int n = cache.length(s, 0, h);
      const std::int32_t* pos = cache.positions(s, 0, h);
      for (int i = 0; i < n; ++i) {
        const stats& r = ref[h].at(pos[i]);
        INFO("step " << step << " head " << h << " token " << i << " position " << pos[i]);
        REQUIRE(std::abs(sh[h][i] - r.sum) <= 1e-5 * (1 + r.sum));
        REQUIRE(std::abs(sa[h][i] - r.dec) <= 1e-5 * (1 + r.dec));
        REQUIRE(std::abs(st[h][i] - r.last) <= 1e-5 * r.last + 1e-7);
        int cnt = 0;
        for (std::size_t j = 0; j < r.low.size() && j < std::size_t(history); ++j) cnt += r.low[j];
        REQUIRE(ss[h][i] == float(-cnt));
      }
    }
  }
  REQUIRE(compressions > 5);
}

TEST_CASE("decode: 10,000 steps of every decode-time scorer stay within budget", "[evict][decode][long]") {
  const int H = 2, Hq = 4, D = 8, P = 8, slack = 8;
  for (int which = 0; which < 5; ++which) {
    // 0-3: tova, scissorhands, a2sf, h2o with a token budget; 4: h2o with a ratio of the tokens seen
    const bool ratio = which == 4;
    const int budget_tokens = 40;
    const double r = 0.995;  // keeps floor(0.005 * seen): 50 tokens at 10,000
    INFO("scorer " << which);
    kvc::cache_config cfg;
    cfg.num_layers = 1;
    cfg.num_kv_heads = H;
    cfg.head_dim = D;
    cfg.page_size = P;
    cfg.max_pages = 256;
    cache_t cache(cfg);
    auto s = cache.add_sequence();
    observer_params op;
    op.forgetting = 0.95f;
    attention_observer ob(op);
    compressor_options o;
    o.target = ratio ? kvc::budget::ratio(r) : kvc::budget::tokens(budget_tokens);
    o.num_q_heads = Hq;
    o.interval = 16;
    o.slack = slack;
    auto target = [&](int seen) { return ratio ? int(std::floor(seen * (1 - r) + 1e-9)) : budget_tokens; };
    std::mt19937_64 g(100 + which);
    std::normal_distribution<float> nd;
    std::vector<float> k(std::size_t(H) * D), v(k.size()), q(std::size_t(Hq) * D), out(q.size()), gp;
    int compressions = 0;
    auto step_all = [&](auto& c) {
      for (int step = 0; step < 10000; ++step) {
        for (auto& x : k) x = nd(g);
        for (auto& x : v) x = nd(g);
        cache.append(s, 0, k.data(), v.data(), 1);
        int longest = 0;
        for (int h = 0; h < H; ++h) longest = std::max(longest, cache.length(s, 0, h));
        gp.assign(std::size_t(H) * longest, 0.0f);
        if (step % 64 == 0) {  // real attention now and then, cheap random distributions in between
          for (auto& x : q) x = nd(g);
          kvc::decode_options dopt;
          dopt.group_probs = gp.data();
          dopt.probs_stride = longest;
          kvc::cpu::decode_attention(cache, s, 0, q.data(), Hq, out.data(), dopt);
        } else {
          std::vector<float> pr;
          random_probs(g, H, longest, longest, pr);
          for (std::size_t i = 0; i < gp.size(); ++i) gp[i] = pr[i] * float(Hq / H);
        }
        ob.observe_group(cache, s, 0, gp.data(), longest, Hq / H);
        observations obs;
        obs.attention = &ob;
        compressions += c.after_decode_step(cache, s, 0, obs).compressed;
        const int cap = std::max(target(cache.seen(s, 0)), 0) + slack;
        const std::size_t limit = std::size_t(H) * kt::pages_for(cap, P) * cache.pool().page_bytes();
        bool ok = cache.bytes_in_use() <= limit;
        for (int h = 0; h < H; ++h) {
          const stream_stats* st = ob.find(s, 0, h);
          const std::size_t held = std::max({st->sum.size(), st->decayed.size(), st->last.size(), st->low.size()});
          ok = ok && cache.length(s, 0, h) <= cap && held == std::size_t(cache.length(s, 0, h));
        }
        if (!ok) FAIL("step " << step << ": over budget (cap " << cap << ") or observer out of sync");
      }
    };
    switch (which) {
      case 0: { compressor<tova> c(tova{}, o); step_all(c); break; }
      case 1: { compressor<scissorhands> c(scissorhands(scissorhands_params{32, 8, 2}), o); step_all(c); break; }
      case 2: { compressor<a2sf> c(a2sf(a2sf_params{8, 2}), o); step_all(c); break; }
      default: { compressor<h2o> c(h2o(h2o_params{8, 2}), o); step_all(c); break; }
    }
    REQUIRE(cache.seen(s, 0) == 10000);
    REQUIRE(compressions > 100);
    if (!ratio)
      for (int h = 0; h < H; ++h) REQUIRE(cache.length(s, 0, h) <= budget_tokens + slack);
  }
}

TEST_CASE("bad budgets, unknown heads and bad selections: clear errors, cache and observer unchanged",
          "[evict][errors]") {
  kt::filled f({}, 30, 61);
  attention_observer ob;
  std::vector<float> probs;
  std::mt19937_64 g(1);
  random_probs(g, f.m.hq, 30, 30, probs);
  ob.observe(f.cache, f.seq, 0, probs.data(), f.m.hq, 30);
  const auto snap = snapshot(f.cache, f.seq);
  const std::size_t bytes = f.cache.bytes_in_use();
  const std::vector<float> sum0 = ob.find(f.seq, 0, 0)->sum;
  auto unchanged = [&] {
    REQUIRE(snapshot(f.cache, f.seq) == snap);
    REQUIRE(f.cache.bytes_in_use() == bytes);
    REQUIRE(ob.find(f.seq, 0, 0)->sum == sum0);
  };
  observations obs;
  obs.attention = &ob;
  // budgets
  REQUIRE_THROWS_WITH(kvc::budget::ratio(std::nan("")), Catch::Contains("ratio = ") && Catch::Contains("[0, 1)"));
  REQUIRE_THROWS_WITH(kvc::budget::tokens(3000000000LL), Catch::Contains("tokens = ") &&
                                                             Catch::Contains("whole number of tokens"));
  {
    compressor_options o;
    o.target = kvc::budget{kvc::budget::kind::tokens, 2.5};
    REQUIRE_THROWS_WITH(compressor<h2o>(h2o{}, o), Catch::Contains("target = 2.5") && Catch::Contains("whole number"));
    o.target = kvc::budget{kvc::budget::kind::ratio, -0.5};
    REQUIRE_THROWS_WITH(compressor<h2o>(h2o{}, o), Catch::Contains("target = -0.5") && Catch::Contains("[0, 1)"));
    o.target = kvc::budget::ratio(0.5);
    o.interval = 0;
    REQUIRE_THROWS_WITH(compressor<h2o>(h2o{}, o), Catch::Contains("interval = 0") && Catch::Contains(">= 1"));
    o.interval = 1;
    o.slack = -1;
    REQUIRE_THROWS_WITH(compressor<h2o>(h2o{}, o), Catch::Contains("slack = -1") && Catch::Contains(">= 0"));
  }
  REQUIRE_THROWS_WITH(kvc::allocator::ada(1.5), Catch::Contains("alpha_safeguard = 1.5") && Catch::Contains("[0, 1]"));
  REQUIRE_THROWS_WITH(kvc::allocator::per_layer_budgets({kvc::budget::ratio(0.5), kvc::budget{kvc::budget::kind::ratio, 2.0}}),
                      Catch::Contains("per_layer budget = 2") && Catch::Contains("[0, 1)"));
  {
    compressor_options o;
    o.target = kvc::budget::tokens(31);
    compressor<h2o> c(h2o{}, o);
    REQUIRE_THROWS_WITH(c.compress(f.cache, f.seq, 0, obs), Catch::Contains("tokens = 31") && Catch::Contains("30"));
    unchanged();
    compressor<h2o> c2;
    REQUIRE_THROWS_WITH(c2.after_decode_step(f.cache, f.seq, 2, obs), Catch::Contains("layer = 2"));
    REQUIRE_THROWS_WITH(c2.after_chunk(f.cache, f.seq, -1, obs), Catch::Contains("layer = -1"));
    REQUIRE_THROWS_WITH(c2.after_prefill(f.cache, 7, 0, obs), Catch::Contains("unknown sequence id 7"));
    unchanged();
  }
  // unknown heads
  {
    compressor_options o;
    o.alloc = kvc::allocator::head_labels({1, 0, 1, 0, 1});  // 5 labels for 2 layers x 2 heads
    compressor<knorm> c(knorm{}, o);
    REQUIRE_THROWS_WITH(c.compress(f.cache, f.seq, 0), Catch::Contains("head labels: 5") &&
                                                           Catch::Contains("num_layers * num_kv_heads = 4"));
    const auto a = kvc::allocator::head_labels({1, 0, 1, 0});
    REQUIRE_THROWS_WITH(a.is_retrieval(0, 2, 2), Catch::Contains("head = 2") && Catch::Contains("0..1"));
    REQUIRE_THROWS_WITH(a.is_retrieval(0, -1, 2), Catch::Contains("head = -1"));
    unchanged();
  }
  // selections naming unknown heads or tokens: keep_layer and the observer reject them whole
  REQUIRE_THROWS_WITH(apply_layer(f.cache, f.seq, 0, {{0, 1}, {0, 1}, {0, 1}}),
                      Catch::Contains("kept.size() = 3") && Catch::Contains("num_kv_heads = 2"));
  REQUIRE_THROWS_AS(apply_layer(f.cache, f.seq, 0, {{0, 1}, {0, 30}}), kvc::error);
  unchanged();
  REQUIRE_THROWS_WITH(ob.keep_layer(f.seq, 0, {{0, 1}, {0, 30}}),
                      Catch::Contains("kept[1][1] = 30") && Catch::Contains("0..29"));
  REQUIRE_THROWS_WITH(ob.keep_layer(f.seq, 0, {{3, 2}, {0}}), Catch::Contains("kept[0][1] = 2") &&
                                                                 Catch::Contains("strictly increasing"));
  REQUIRE_THROWS_WITH(ob.observe(f.cache, f.seq, 0, probs.data(), f.m.hq, 29), Catch::Contains("stride = 29"));
  REQUIRE_THROWS_WITH(ob.observe(f.cache, f.seq, 0, probs.data(), 3, 30), Catch::Contains("num_q_heads = 3"));
  std::vector<std::int32_t> sel;
  REQUIRE_THROWS_WITH(select_top(probs.data(), 30, 31, {}, sel), Catch::Contains("keep = 31") && Catch::Contains("0..30"));
  REQUIRE_THROWS_WITH(select_top(probs.data(), 30, 3, protection{-1, 0}, sel), Catch::Contains("sinks -1"));
  unchanged();
}

namespace {
/// Two streams' observer statistics, both present and equal field by field.
void require_same_stats(const stream_stats* x, const stream_stats* y) {
  REQUIRE(x != nullptr);
  REQUIRE(y != nullptr);
  REQUIRE(x->sum == y->sum);
  REQUIRE(x->decayed == y->decayed);
  REQUIRE(x->last == y->last);
  REQUIRE(x->low == y->low);
  REQUIRE(x->steps == y->steps);
}
}  // namespace

TEST_CASE("a forked sequence inherits the observer's statistics; the two then evolve independently",
          "[evict][decode][fork]") {
  // Reference: a second observer that sees the same steps on one sequence only. The fork must
  // start where the parent stood and must not move it afterwards.
  kt::filled f({}, 40, 71);
  observer_params op;
  op.forgetting = 0.9f;
  attention_observer ob(op), ref_parent(op), ref_child(op);
  std::vector<float> probs;
  auto observe = [&](attention_observer& o, kvc::seq_id s, std::uint64_t seed) {
    std::mt19937_64 gg(seed);
    for (int l = 0; l < f.m.layers; ++l) {
      random_probs(gg, f.m.hq, f.n, f.n, probs);
      o.observe(f.cache, s, l, probs.data(), f.m.hq, f.n);
    }
  };
  auto same = [&](const attention_observer& a, kvc::seq_id sa, const attention_observer& b, kvc::seq_id sb) {
    for (int l = 0; l < f.m.layers; ++l)
      for (int h = 0; h < f.m.hkv; ++h) {
        require_same_stats(a.find(sa, l, h), b.find(sb, l, h));
      }
  };
  for (std::uint64_t step = 0; step < 5; ++step) {
    observe(ob, f.seq, 100 + step);
    observe(ref_parent, f.seq, 100 + step);
    observe(ref_child, f.seq, 100 + step);
  }
  const kvc::seq_id child = f.cache.fork(f.seq);
  ob.fork(f.seq, child);
  same(ob, child, ref_child, f.seq);
  same(ob, f.seq, ref_parent, f.seq);
  for (std::uint64_t step = 0; step < 3; ++step) {
    observe(ob, child, 200 + step);
    observe(ref_child, f.seq, 200 + step);
    observe(ob, f.seq, 300 + step);
    observe(ref_parent, f.seq, 300 + step);
  }
  same(ob, child, ref_child, f.seq);
  same(ob, f.seq, ref_parent, f.seq);
  // bad forks: clear errors, statistics unchanged
  const std::size_t bytes = ob.bytes();
  REQUIRE_THROWS_WITH(ob.fork(f.seq, f.seq), Catch::Contains("from = to = ") && Catch::Contains("two different"));
  REQUIRE_THROWS_WITH(ob.fork(f.seq, child), Catch::Contains("to = ") && Catch::Contains("no statistics yet"));
  REQUIRE(ob.bytes() == bytes);
  same(ob, child, ref_child, f.seq);
  ob.remove_sequence(child);
  REQUIRE(ob.find(child, 0, 0) == nullptr);
  same(ob, f.seq, ref_parent, f.seq);
}

TEST_CASE("a layer that shares another's pages takes a copy of its observer statistics", "[evict][decode][share]") {
  // Reference: a copy of the observer taken before the share, fed the same steps on the source
  // layer. The sharer must start where the source stood, evolve apart from it, and the other
  // layers and sequences must not move.
  kt::model m;
  m.layers = 3;
  kt::filled f(m, 40, 72);
  observer_params op;
  op.forgetting = 0.8f;
  attention_observer ob(op);
  std::vector<float> probs;
  auto observe = [&](attention_observer& o, kvc::seq_id s, int l, std::uint64_t seed) {
    std::mt19937_64 gg(seed);
    random_probs(gg, f.m.hq, f.n, f.n, probs);
    o.observe(f.cache, s, l, probs.data(), f.m.hq, f.n);
  };
  auto same = [&](const attention_observer& a, int la, const attention_observer& b, int lb) {
    for (int h = 0; h < f.m.hkv; ++h) {
      require_same_stats(a.find(f.seq, la, h), b.find(f.seq, lb, h));
    }
  };
  for (std::uint64_t step = 0; step < 4; ++step)
    for (int l = 0; l < 2; ++l) observe(ob, f.seq, l, 10 * step + std::uint64_t(l));  // layer 2: no statistics
  const attention_observer before = ob;
  f.cache.share_layer(f.seq, 1, 0);
  ob.share_layer(f.seq, 1, 0);
  same(ob, 1, before, 0);
  same(ob, 0, before, 0);
  attention_observer ref = before;
  for (std::uint64_t step = 0; step < 3; ++step) {
    observe(ob, f.seq, 1, 500 + step);
    observe(ref, f.seq, 0, 500 + step);  // the reference's layer 0 plays the sharer
  }
  same(ob, 1, ref, 0);
  same(ob, 0, before, 0);
  // A source with no statistics leaves the layer with none (its old ones described other tokens).
  f.cache.share_layer(f.seq, 0, 2);
  ob.share_layer(f.seq, 0, 2);
  for (int h = 0; h < f.m.hkv; ++h) REQUIRE(ob.find(f.seq, 0, h) == nullptr);
  same(ob, 1, ref, 0);
  // layer == from: a clear error, statistics unchanged.
  const std::size_t bytes = ob.bytes();
  REQUIRE_THROWS_WITH(ob.share_layer(f.seq, 1, 1), Catch::Contains("from = layer = 1") &&
                                                       Catch::Contains("two different layers"));
  REQUIRE(ob.bytes() == bytes);
  same(ob, 1, ref, 0);
}
