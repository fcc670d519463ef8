// SPDX-License-Identifier: Apache-2.0
// Every scorer against a plain double-precision reference of its published formula. The
// references read the raw K/V/Q arrays and share no code with the scorers.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "evict_test_util.hpp"
#include "kvc_catch.hpp"

using namespace kvc::evict;


namespace {

void require_close(const std::vector<float>& got, const std::vector<double>& want, double tol = 1e-4) {
  REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    INFO("token " << i << ": got " << got[i] << ", want " << want[i]);
    REQUIRE(std::abs(got[i] - want[i]) <= tol * (1.0 + std::abs(want[i])));
  }
}

double norm2(const std::vector<double>& x) {
  double s = 0;
  for (double v : x) s += v * v;
  return std::sqrt(s);
}

std::vector<double> softmax(std::vector<double> x) {
  double m = *std::max_element(x.begin(), x.end()), s = 0;
  for (double& v : x) s += (v = std::exp(v - m));
  for (double& v : x) v /= s;
  return x;
}

// attention probabilities of query vector q (position qp) over the first n tokens of (l, h), causal
std::vector<double> ref_attn(const kt::filled& f, int l, int h, const float* q, int qp, int n) {
  std::vector<double> s;
  std::vector<int> vis;
  for (int t = 0; t < n; ++t) {
    if (t > qp) continue;
    double a = 0;
    for (int d = 0; d < f.m.d; ++d) a += double(q[d]) * f.K(l, t, h, d);
    s.push_back(a / std::sqrt(double(f.m.d)));
    vis.push_back(t);
  }
  auto p = softmax(s);
  std::vector<double> out(std::size_t(n), 0.0);
  for (std::size_t i = 0; i < vis.size(); ++i) out[std::size_t(vis[i])] = p[i];
  return out;
}

}  // namespace

TEST_CASE("knorm scores -||k||", "[evict][knorm]") {
  kt::filled f({}, 37, 1);
  auto s = f.run(knorm{}, 1);
  for (int h = 0; h < f.m.hkv; ++h) {
    std::vector<double> want;
    for (int t = 0; t < f.n; ++t) {
      std::vector<double> k(f.m.d);
      for (int d = 0; d < f.m.d; ++d) k[d] = f.K(1, t, h, d);
      want.push_back(-norm2(k));
    }
    require_close(s[h], want);
  }
}

TEST_CASE("keydiff scores -cos(k, mean normalised key)", "[evict][keydiff]") {
  kt::filled f({}, 41, 2);
  auto s = f.run(keydiff{}, 0);
  for (int h = 0; h < f.m.hkv; ++h) {
    std::vector<double> mean(f.m.d, 0.0);
    for (int t = 0; t < f.n; ++t) {
      std::vector<double> k(f.m.d);
      for (int d = 0; d < f.m.d; ++d) k[d] = f.K(0, t, h, d);
      const double nk = norm2(k);
      for (int d = 0; d < f.m.d; ++d) mean[d] += k[d] / nk;
    }
    std::vector<double> want;
    for (int t = 0; t < f.n; ++t) {
      std::vector<double> k(f.m.d);
      double dot = 0;
      for (int d = 0; d < f.m.d; ++d) k[d] = f.K(0, t, h, d), dot += k[d] * mean[d];
      want.push_back(-dot / (norm2(k) * norm2(mean)));
    }
    require_close(s[h], want);
  }
}

TEST_CASE("random is uniform in [0,1), reproducible, and seeded", "[evict][random]") {
  kt::filled f({}, 50, 3);
  auto a = f.run(kvc::evict::random{}, 0), b = f.run(kvc::evict::random{}, 0), c = f.run(kvc::evict::random(random_params{7}), 0);
  REQUIRE(a == b);
  REQUIRE(a != c);
  REQUIRE(a[0] != a[1]);
  for (auto& h : a)
    for (float x : h) REQUIRE((x >= 0.0f && x < 1.0f));
}

TEST_CASE("lagkv: lag-relative normalised std, softmax and rank within partitions", "[evict][lagkv]") {
  kt::filled f({}, 4 + 3 * 8 + 5, 4);  // sinks 4, lag 8: partitions 0,1 scored, 2 + remainder is the tail
  lagkv_params p;
  p.lag = 8;
  for (bool cross : {false, true}) {
    p.cross_scoring = cross;
    auto s = f.run(lagkv(p), 1);
    for (int h = 0; h < f.m.hkv; ++h) {
      std::vector<double> want(std::size_t(f.n), 0.0);
      auto part = [&](bool use_k, int a) {
        std::vector<double> sc;
        for (int i = 0; i < 8; ++i) {
          std::vector<double> z;
          for (int d = 0; d < f.m.d; ++d) {
            double mn = 1e300, mx = -1e300;
            for (int t = a + 8; t < a + 16; ++t) {
              const double x = use_k ? f.K(1, t, h, d) : f.V(1, t, h, d);
              mn = std::min(mn, x), mx = std::max(mx, x);
            }
            const double x = use_k ? f.K(1, a + i, h, d) : f.V(1, a + i, h, d);
            z.push_back((x - mn) / (mx - mn));
          }
          double m = std::accumulate(z.begin(), z.end(), 0.0) / z.size(), var = 0;
          for (double x : z) var += (x - m) * (x - m);
          sc.push_back(std::sqrt(var / (z.size() - 1)));
        }
        return softmax(sc);
      };
      double best = -1e300;
      for (int q = 0; q < 2; ++q) {
        const int a = 4 + q * 8;
        auto ks = part(true, a), vs = part(false, a);
        std::vector<double> avg(8);
        for (int i = 0; i < 8; ++i) avg[i] = (ks[i] + vs[i]) / 2;
        for (int i = 0; i < 8; ++i) {
          if (cross) {
            want[a + i] = avg[i];
          } else {
            int rank = 0;
            for (int j = 0; j < 8; ++j) rank += avg[j] < avg[i] || (avg[j] == avg[i] && j < i);
            want[a + i] = rank / 8.0;
          }
          best = std::max(best, want[a + i]);
        }
      }
      for (int t = 0; t < 4; ++t) want[t] = best;
      for (int t = 4 + 16; t < f.n; ++t) want[t] = best;
      require_close(s[h], want, 1e-4);
    }
  }
}

TEST_CASE("curdkv: local-window normalised ||k||^2 ||v||^2", "[evict][curdkv]") {
  kt::filled f({}, 45, 5);
  auto s = f.run(curdkv{}, 0);
  for (int h = 0; h < f.m.hkv; ++h) {
    std::vector<double> k2(f.n), v2(f.n), sc(f.n);
    for (int t = 0; t < f.n; ++t)
      for (int d = 0; d < f.m.d; ++d) k2[t] += f.K(0, t, h, d) * f.K(0, t, h, d), v2[t] += f.V(0, t, h, d) * f.V(0, t, h, d);
    double tot = 0;
    for (int w = 0; w < f.n; w += 16) {
      double sk = 0, sv = 0;
      for (int t = w; t < std::min(f.n, w + 16); ++t) sk += k2[t], sv += v2[t];
      for (int t = w; t < std::min(f.n, w + 16); ++t) tot += (sc[t] = k2[t] / sk * v2[t] / sv);
    }
    std::vector<double> want;
    for (int t = 0; t < f.n; ++t) want.push_back(t < 4 ? 1.0 : sc[t] / tot);
    require_close(s[h], want);
  }
}

TEST_CASE("leverage: diag(X (X^T X)^-1 X^T) of the sketched centred keys, z-normalised", "[evict][leverage]") {
  kt::filled f({}, 60, 6);
  leverage_params p;
  p.sketch_dimension = 6;
  p.jitter = 0;
  leverage L(p);
  auto s = f.run(L, 1);
  for (int h = 0; h < f.m.hkv; ++h) {
    const Eigen::MatrixXd S = L.sketch(f.m.d, 1, h);  // the sketch is part of the method's state
    Eigen::MatrixXd K(f.n, f.m.d);
    for (int t = 0; t < f.n; ++t)
      for (int d = 0; d < f.m.d; ++d) K(t, d) = f.K(1, t, h, d);
    Eigen::RowVectorXd mu = K.colwise().mean();
    for (int t = 0; t < f.n; ++t) K.row(t) -= mu;
    const Eigen::MatrixXd X = K * S;
    const Eigen::MatrixXd H = X * (X.transpose() * X).inverse() * X.transpose();
    std::vector<double> lev(f.n);
    for (int t = 0; t < f.n; ++t) lev[t] = H(t, t);
    double m = std::accumulate(lev.begin(), lev.end(), 0.0) / f.n, var = 0;
    for (double x : lev) var += (x - m) * (x - m);
    const double sd = std::sqrt(var / (f.n - 1));
    std::vector<double> want;
    for (double x : lev) want.push_back((x - m) / sd);
    require_close(s[h], want, 1e-3);
  }
}

namespace {
struct window_fixture {
  kt::filled f;
  int w;
  std::vector<float> q;  // [w][hq][d]
  query_window win;
  window_fixture(int n, int w_, std::uint64_t seed) : f({}, n, seed), w(w_) {
    q = kt::randn(std::size_t(w) * f.m.hq * f.m.d, seed + 99, 0.7f);
    win = query_window{q.data(), nullptr, w, f.m.hq, f.m.d};
  }
  const float* qv(int i, int qh) const { return q.data() + (std::size_t(i) * f.m.hq + qh) * f.m.d; }
};
}  // namespace

TEST_CASE("snapkv: window-mean attention, pooled, GQA-aggregated, window kept", "[evict][snapkv]") {
  window_fixture x(53, 6, 7);
  auto& f = x.f;
  for (auto agg : {group_agg::mean, group_agg::max})
    for (auto pool : {pooling::avg, pooling::max}) {
      snapkv_params p;
      p.window = 6;
      p.kernel = 5;
      p.agg = agg;
      p.pool = pool;
      observations obs;
      obs.window = &x.win;
      auto s = f.run(snapkv(p), 1, obs);
      const int prefix = f.n - 6;
      for (int h = 0; h < f.m.hkv; ++h) {
        std::vector<double> want(f.n, 0.0);
        for (int g = 0; g < f.m.G(); ++g) {
          std::vector<double> a(prefix, 0.0);
          for (int i = 0; i < 6; ++i) {
            auto pr = ref_attn(f, 1, h, x.qv(i, h * f.m.G() + g), f.n - 6 + i, f.n);
            for (int j = 0; j < prefix; ++j) a[j] += pr[j] / 6;
          }
          for (int j = 0; j < prefix; ++j) {
            double acc = 0, mx = -1e300;
            for (int k = j - 2; k <= j + 2; ++k)
              if (k >= 0 && k < prefix) acc += a[k], mx = std::max(mx, a[k]);
            const double pv = pool == pooling::avg ? acc / 5 : mx;
            if (agg == group_agg::mean) want[j] += pv / f.m.G();
            else want[j] = g == 0 ? pv : std::max(want[j], pv);
          }
        }
        double mx = *std::max_element(want.begin(), want.begin() + prefix);
        // window tokens above the prefix, newest highest
        for (int j = prefix; j < f.n; ++j) want[j] = mx + 1 + double(j - prefix + 1) / (f.n - prefix + 1);
        require_close(s[h], want, 1e-4);
        // a budget below the window keeps the newest window tokens (decode-time use)
        std::vector<std::int32_t> kept;
        select_top(s[h].data(), f.n, 3, protection{0, 0}, kept);
        REQUIRE(kept == std::vector<std::int32_t>{f.n - 3, f.n - 2, f.n - 1});
      }
    }
}

TEST_CASE("pyramidkv: KVCache-Factory layer schedule", "[evict][pyramidkv]") {
  // Factory: C = 320 (window 64 included), beta 20, q_len 2000, 32 layers:
  // min = 256 // 20 = 12; max = 512 - 12 = 500; steps = 488 // 31 = 15; layer l keeps 500 - 15 l + 64.
  auto a = pyramidkv{}.preferred_allocator();
  for (int l : {0, 1, 17, 31}) REQUIRE(a.pyramid_keep(320, 2000, l, 32) == 500 - 15 * l + 64);
  // q_len 600: max 500 < q_len - w = 536, no clipping: layer 0 keeps 500 + 64
  REQUIRE(a.pyramid_keep(320, 600, 0, 32) == 500 + 64);
  // max clipped to q_len - w: q_len 540 -> max = 476, min = 512 - 476 = 36; steps = 440 // 31 = 14
  REQUIRE(a.pyramid_keep(320, 540, 0, 32) == 476 + 64);
  REQUIRE(a.pyramid_keep(320, 540, 31, 32) == 476 - 14 * 31 + 64);
  // short prompt: q_len < 2 (C - w) -> uniform C
  REQUIRE(a.pyramid_keep(320, 500, 5, 32) == 320);
  // scores are SnapKV's
  window_fixture x(40, 8, 8);
  observations obs;
  obs.window = &x.win;
  pyramidkv_params pp;
  pp.window = 8;
  snapkv_params sp;
  sp.window = 8;
  REQUIRE(x.f.run(pyramidkv(pp), 0, obs) == x.f.run(snapkv(sp), 0, obs));
}

TEST_CASE("finch: question-span attention renormalised by visible count, span kept", "[evict][finch]") {
  window_fixture x(30, 5, 9);
  auto& f = x.f;
  std::vector<std::int32_t> pos = {10, 11, 12, 13, 14};  // a question in the middle of the prompt
  x.win.positions = pos.data();
  observations obs;
  obs.window = &x.win;
  auto s = f.run(finch{}, 0, obs);
  for (int h = 0; h < f.m.hkv; ++h) {
    std::vector<double> want(f.n, 0.0);
    for (int g = 0; g < f.m.G(); ++g) {
      std::vector<double> a(f.n, 0.0);
      std::vector<int> cnt(f.n, 0);
      for (int i = 0; i < 5; ++i) {
        auto pr = ref_attn(f, 0, h, x.qv(i, h * f.m.G() + g), pos[i], f.n);
        for (int j = 0; j < f.n; ++j) a[j] += pr[j], cnt[j] += j <= pos[i];
      }
      for (int j = 0; j < f.n; ++j) want[j] += (cnt[j] ? a[j] / cnt[j] : 0.0) / f.m.G();
    }
    const double mx = *std::max_element(want.begin(), want.end());
    for (int p : pos) want[p] = mx + 1;
    require_close(s[h], want);
  }
}

TEST_CASE("noncausal attention: chunk column sums x ||v||, pooled, z-normalised", "[evict][noncausal]") {
  window_fixture x(20, 20, 10);
  auto& f = x.f;
  noncausal_attention_params p;
  p.chunk = 8;
  observations obs;
  obs.window = &x.win;
  auto s = f.run(noncausal_attention(p), 1, obs);
  for (int h = 0; h < f.m.hkv; ++h) {
    std::vector<double> col(f.n, 0.0);
    for (int g = 0; g < f.m.G(); ++g)
      for (int c0 = 0; c0 < f.n; c0 += 8) {
        const int c1 = std::min(f.n, c0 + 8);
        for (int i = c0; i < c1; ++i) {
          std::vector<double> lg;
          for (int j = c0; j < c1; ++j) {
            double a = 0;
            for (int d = 0; d < f.m.d; ++d) a += double(x.qv(i, h * f.m.G() + g)[d]) * f.K(1, j, h, d);
            lg.push_back(a / std::sqrt(double(f.m.d)));
          }
          auto pr = softmax(lg);
          for (int j = c0; j < c1; ++j) col[j] += pr[j - c0] / f.m.G();
        }
      }
    for (int t = 0; t < f.n; ++t) {
      double vn = 0;
      for (int d = 0; d < f.m.d; ++d) vn += f.V(1, t, h, d) * f.V(1, t, h, d);
      col[t] *= std::sqrt(vn);
    }
    std::vector<double> pooled(f.n);
    for (int t = 0; t < f.n; ++t) {
      double a = 0;
      for (int k = t - 1; k <= t + 1; ++k)
        if (k >= 0 && k < f.n) a += col[k];
      pooled[t] = a / 3;
    }
    double m = std::accumulate(pooled.begin(), pooled.end(), 0.0) / f.n, var = 0;
    for (double v : pooled) var += (v - m) * (v - m);
    std::vector<double> want;
    for (double v : pooled) want.push_back((v - m) / std::sqrt(var / (f.n - 1)));
    require_close(s[h], want, 1e-3);
  }
}

TEST_CASE("decode scorers read the observer: h2o sum (and sum / count), a2sf decay, tova last, scissorhands counts",
          "[evict][decode]") {
  kt::model m;
  kt::filled f(m, 12, 11);
  observer_params op;
  op.forgetting = 0.5f;
  op.track_count = true;  // h2o(normalize) reads it
  attention_observer ob(op);
  const int L = 0, steps = 5;
  std::vector<std::vector<std::vector<double>>> hist(m.hkv);  // [h][step][t] group-mean probs
  for (int st = 0; st < steps; ++st) {
    auto kn = kt::randn(std::size_t(m.hkv) * m.d, 500 + st), vn = kt::randn(std::size_t(m.hkv) * m.d, 600 + st);
    f.cache.append(f.seq, L, kn.data(), vn.data(), 1);
    for (int h = 0; h < m.hkv; ++h)
      for (int d = 0; d < m.d; ++d) f.k[L].push_back(0), f.v[L].push_back(0);  // keep raw arrays sized (unused)
    auto q = kt::randn(std::size_t(m.hq) * m.d, 700 + st);
    const int n = f.cache.length(f.seq, L, 0);
    std::vector<float> out(std::size_t(m.hq) * m.d), probs(std::size_t(m.hq) * n);
    kvc::decode_options o;
    o.probs = probs.data();
    o.probs_stride = n;
    std::vector<kvc::kv_cache<float>::view_type> buf;
    kvc::reference::decode_attention(f.cache.layer(f.seq, L, buf), q.data(), m.hq, out.data(), o);
    ob.observe(f.cache, f.seq, L, probs.data(), m.hq, n);
    for (int h = 0; h < m.hkv; ++h) {
      std::vector<double> gm(n, 0.0);
      for (int g = 0; g < m.G(); ++g)
        for (int t = 0; t < n; ++t) gm[t] += probs[std::size_t(h * m.G() + g) * n + t] / m.G();
      hist[h].push_back(gm);
    }
  }
  observations obs;
  obs.attention = &ob;
  const int n = f.cache.length(f.seq, L, 0);
  auto sh = f.run(h2o{}, L, obs), sa = f.run(a2sf{}, L, obs), st = f.run(tova(tova_params{false, 0}), L, obs),
       ss = f.run(scissorhands{}, L, obs), stv = f.run(tova{}, L, obs);
  h2o_params hn;
  hn.normalize = true;
  auto shn = f.run(h2o(hn), L, obs);
  for (int h = 0; h < m.hkv; ++h) {
    std::vector<double> sum(n, 0.0), dec(n, 0.0), last(n, 0.0), cnt(n, 0.0), saw(n, 0.0);
    for (int s = 0; s < steps; ++s) {
      const auto& p = hist[h][s];
      for (std::size_t t = 0; t < p.size(); ++t) {
        sum[t] += p[t];
        saw[t] += 1;  // a token appended at step s was seen by steps s..end only
        dec[t] = 0.5 * dec[t] + p[t];
        cnt[t] -= p[t] < 1.0 / p.size();
      }
    }
    for (std::size_t t = 0; t < hist[h].back().size(); ++t) last[t] = hist[h].back()[t];
    require_close(sh[h], sum, 1e-5);
    std::vector<double> mean(n);
    for (int t = 0; t < n; ++t) mean[t] = sum[t] / saw[t];
    require_close(shn[h], mean, 1e-5);
    REQUIRE(saw.front() != saw.back());  // the counts differ, so normalising is checked
    require_close(sa[h], dec, 1e-5);
    require_close(st[h], last, 1e-5);
    require_close(ss[h], cnt, 1e-6);
    std::vector<double> shared(n, 0.0);
    for (int hh = 0; hh < m.hkv; ++hh)
      for (int t = 0; t < n; ++t) shared[t] += hist[hh].back()[t] / m.hkv;
    require_close(stv[h], shared, 1e-5);
  }
}

TEST_CASE("expected attention: averaged-RoPE mean/cov quadratic form, softmax, x ||v||", "[evict][expected_attention]") {
  kt::model m;
  kt::filled f(m, 33, 12);
  kvc::rope_config rc;
  rc.head_dim = m.d;
  kvc::rope r(rc);
  const int nq = 40;
  auto qpre = kt::randn(std::size_t(nq) * m.hq * m.d, 13, 0.8f);
  // kvc's defaults, then kvpress's choices: sinks out of the softmax, the first queries skipped
  // (added in two calls, so the skip spans them).
  struct variant {
    bool sinks_in_softmax;
    int n_sink, skip;
  };
  for (const variant var : {variant{true, 4, 0}, variant{false, 4, 4}, variant{false, 3, 0}, variant{true, 0, 7}}) {
    INFO("sinks_in_softmax " << var.sinks_in_softmax << " n_sink " << var.n_sink << " skip " << var.skip);
    query_stats_accumulator acc(m.hq, m.d, true, var.skip);
    acc.add(qpre.data(), 5);
    acc.add(qpre.data() + std::size_t(5) * m.hq * m.d, nq - 5);
    REQUIRE(acc.count() == nq - var.skip);
    REQUIRE(acc.seen() == nq);
    auto qs = acc.view(&r);
    observations obs;
    obs.stats = &qs;
    expected_attention_params p;
    p.n_future_positions = 7;
    p.epsilon = 0.01f;
    p.n_sink = var.n_sink;
    p.sinks_in_softmax = var.sinks_in_softmax;
    auto s = f.run(expected_attention(p), 1, obs);
    const int p0 = f.cache.seen(f.seq, 1);
    const int q0 = var.skip, used = nq - var.skip, s0 = var.sinks_in_softmax ? 0 : var.n_sink;
    for (int h = 0; h < m.hkv; ++h) {
      std::vector<double> want(f.n, 0.0);
      for (int g = 0; g < m.G(); ++g) {
        const int qh = h * m.G() + g;
        // mean and covariance in double
        std::vector<double> mu(m.d, 0.0);
        std::vector<std::vector<double>> cov(m.d, std::vector<double>(m.d, 0.0));
        for (int i = q0; i < nq; ++i)
          for (int d = 0; d < m.d; ++d) mu[d] += qpre[(std::size_t(i) * m.hq + qh) * m.d + d] / used;
        for (int i = q0; i < nq; ++i)
          for (int a = 0; a < m.d; ++a)
            for (int b = 0; b < m.d; ++b)
              cov[a][b] += (qpre[(std::size_t(i) * m.hq + qh) * m.d + a] - mu[a]) *
                           (qpre[(std::size_t(i) * m.hq + qh) * m.d + b] - mu[b]) / used;
        // R̄ built column by column by rotating basis vectors with rope::apply, averaged over positions
        std::vector<std::vector<double>> R(m.d, std::vector<double>(m.d, 0.0));
        for (int c = 0; c < m.d; ++c)
          for (int pp = p0; pp < p0 + 7; ++pp) {
            std::vector<double> e(m.d, 0.0);
            e[c] = 1;
            std::vector<float> ef(e.begin(), e.end());
            // rope::apply rounds to float; rotate in double by hand instead (rotate-half pairs)
            for (int i = 0; i < m.d / 2; ++i) {
              const double ang = pp * std::pow(10000.0, -2.0 * i / m.d);
              const double x0 = e[i], x1 = e[i + m.d / 2];
              R[i][c] += (x0 * std::cos(ang) - x1 * std::sin(ang)) / 7;
              R[i + m.d / 2][c] += (x0 * std::sin(ang) + x1 * std::cos(ang)) / 7;
            }
          }
        std::vector<double> mr(m.d, 0.0);
        for (int a = 0; a < m.d; ++a)
          for (int b = 0; b < m.d; ++b) mr[a] += R[a][b] * mu[b];
        std::vector<std::vector<double>> RS(m.d, std::vector<double>(m.d, 0.0)), SR(m.d, std::vector<double>(m.d, 0.0));
        for (int a = 0; a < m.d; ++a)
          for (int b = 0; b < m.d; ++b)
            for (int c = 0; c < m.d; ++c) RS[a][b] += R[a][c] * cov[c][b];
        for (int a = 0; a < m.d; ++a)
          for (int b = 0; b < m.d; ++b)
            for (int c = 0; c < m.d; ++c) SR[a][b] += RS[a][c] * R[b][c];
        std::vector<double> lg(f.n);
        for (int t = 0; t < f.n; ++t) {
          double lin = 0, quad = 0;
          for (int a = 0; a < m.d; ++a) {
            lin += f.K(1, t, h, a) * mr[a];
            for (int b = 0; b < m.d; ++b) quad += f.K(1, t, h, a) * SR[a][b] * f.K(1, t, h, b);
          }
          lg[t] = lin / std::sqrt(double(m.d)) + quad / (2.0 * m.d);
        }
        auto sm = softmax(std::vector<double>(lg.begin() + s0, lg.end()));
        for (int t = s0; t < f.n; ++t) want[t] += sm[std::size_t(t - s0)] / m.G();
      }
      double top = 0;
      for (int t = s0; t < f.n; ++t) {
        double vn = 0;
        for (int d = 0; d < m.d; ++d) vn += f.V(1, t, h, d) * f.V(1, t, h, d);
        want[t] = (want[t] + 0.01) * std::sqrt(vn);
        top = std::max(top, want[t]);
      }
      for (int t = 0; t < s0; ++t) want[t] = top + 1;  // left out of the softmax: above every scored token
      require_close(s[h], want, 2e-3);
    }
  }
}

TEST_CASE("q-filters: principal query direction, oriented, score <k, f>", "[evict][qfilters]") {
  kt::model m;
  kt::filled f(m, 25, 14);
  const int nq = 64;
  auto q = kt::randn(std::size_t(nq) * m.hq * m.d, 15);
  for (int i = 0; i < nq; ++i)  // a dominant direction
    for (int qh = 0; qh < m.hq; ++qh) q[(std::size_t(i) * m.hq + qh) * m.d + 3] += 4.0f + 0.1f * qh;
  std::vector<float> filters;
  for (int l = 0; l < m.layers; ++l) {
    auto fl = fit_qfilters(q.data(), nq, m.hq, m.hkv, m.d);
    filters.insert(filters.end(), fl.begin(), fl.end());
  }
  // reference: power iteration on Q^T Q of the group's queries
  for (int h = 0; h < m.hkv; ++h) {
    std::vector<double> v(m.d, 1.0);
    for (int it = 0; it < 500; ++it) {
      std::vector<double> w(m.d, 0.0);
      for (int i = 0; i < nq; ++i)
        for (int g = 0; g < m.G(); ++g) {
          const float* r = q.data() + (std::size_t(i) * m.hq + h * m.G() + g) * m.d;
          double dot = 0;
          for (int d = 0; d < m.d; ++d) dot += r[d] * v[d];
          for (int d = 0; d < m.d; ++d) w[d] += dot * r[d];
        }
      const double nw = norm2(w);
      for (int d = 0; d < m.d; ++d) v[d] = w[d] / nw;
    }
    double mean_proj = 0;
    for (int i = 0; i < nq; ++i)
      for (int g = 0; g < m.G(); ++g)
        for (int d = 0; d < m.d; ++d) mean_proj += q[(std::size_t(i) * m.hq + h * m.G() + g) * m.d + d] * v[d];
    if (mean_proj < 0)
      for (double& x : v) x = -x;
    for (int d = 0; d < m.d; ++d) REQUIRE(filters[std::size_t(h) * m.d + d] == Approx(v[d]).margin(1e-4));
  }
  qfilters_params p;
  p.filters = filters.data();
  p.num_layers = m.layers;
  auto s = f.run(qfilters(p), 1);
  for (int h = 0; h < m.hkv; ++h) {
    std::vector<double> want;
    for (int t = 0; t < f.n; ++t) {
      double a = 0;
      for (int d = 0; d < m.d; ++d) a += f.K(1, t, h, d) * filters[(std::size_t(1) * m.hkv + h) * m.d + d];
      want.push_back(a);
    }
    require_close(s[h], want);
  }
}

TEST_CASE("rkv redundancy against the pairwise double reference on many shapes", "[evict][wrappers][rkv]") {
  // Head dims that are and are not whole SIMD batches, streams from 1 token up to several of rkv's
  // float blocks, and keys sharing a large common direction (mean cosine near 0.9, as real keys
  // are) where the sum of normalised keys is long and cancellation in k̂·Σk̂ - 1 shows.
  struct shape {
    int hkv, hq, d, page, n;
    float common;
  };
  const shape shapes[] = {{1, 1, 8, 4, 1, 0.0f},   {2, 4, 16, 8, 2, 0.0f},   {2, 6, 20, 8, 37, 0.0f},
                          {1, 3, 64, 16, 130, 3.0f}, {3, 9, 64, 16, 300, 0.0f}, {2, 2, 12, 8, 257, 3.0f}};
  for (const shape& sh : shapes) {
    kt::model m;
    m.layers = 1;
    m.hkv = sh.hkv;
    m.hq = sh.hq;
    m.d = sh.d;
    m.page = sh.page;
    kt::filled f(m, sh.n, 100 + sh.d + sh.n);
    if (sh.common != 0.0f) {  // rebuild the cache with a shared offset in every key
      const auto dir = kt::randn(std::size_t(m.d), 7);
      for (int t = 0; t < f.n; ++t)
        for (int h = 0; h < m.hkv; ++h)
          for (int dd = 0; dd < m.d; ++dd) f.k[0][(std::size_t(t) * m.hkv + h) * m.d + dd] += sh.common * dir[dd];
      f.cache.remove_sequence(f.seq);
      f.seq = f.cache.add_sequence();
      f.cache.append(f.seq, 0, f.k[0].data(), f.v[0].data(), f.n);
    }
    INFO("hkv " << sh.hkv << " hq " << sh.hq << " d " << sh.d << " n " << sh.n << " common " << sh.common);
    const float lambda = 0.3f;
    auto base = f.run(knorm{}, 0);
    auto sr = f.run(rkv<knorm>(rkv_params{lambda}), 0);
    for (int h = 0; h < m.hkv; ++h) {
      std::vector<double> imp(base[h].begin(), base[h].end());
      imp = softmax(imp);
      std::vector<double> red(f.n, 0.0);
      for (int i = 0; i < f.n; ++i)
        for (int j = 0; j < f.n; ++j) {
          if (i == j) continue;
          double dot = 0, ni = 0, nj = 0;
          for (int d = 0; d < m.d; ++d)
            dot += f.K(0, i, h, d) * f.K(0, j, h, d), ni += f.K(0, i, h, d) * f.K(0, i, h, d), nj += f.K(0, j, h, d) * f.K(0, j, h, d);
          red[i] += dot / std::sqrt(ni * nj) / (f.n - 1);
        }
      red = softmax(red);
      std::vector<double> want;
      for (int t = 0; t < f.n; ++t) want.push_back(lambda * imp[t] - (1.0 - lambda) * red[t]);
      // Scores are O(1/n); compare relative to that scale so large streams are held as tightly.
      const double scale = 1.0 / f.n;
      REQUIRE(sr[h].size() == want.size());
      for (int t = 0; t < f.n; ++t) {
        INFO("head " << h << " token " << t << ": got " << sr[h][t] << ", want " << want[t]);
        REQUIRE(std::abs(sr[h][t] - want[t]) <= 1e-4 * scale);
      }
    }
  }
}

TEST_CASE("kv_cache<half>::gather returns every kept row, converted, in stream order", "[evict][gather]") {
  for (int d : {8, 20, 64})
    for (int page : {8, 16})
      for (int n : {1, 15, 16, 17, 100}) {
        INFO("d " << d << " page " << page << " n " << n);
        kvc::cache_config c;
        c.num_layers = 1;
        c.num_kv_heads = 2;
        c.head_dim = d;
        c.page_size = page;
        c.max_pages = 64;
        kvc::kv_cache<kvc::half> cache(c);
        const auto s = cache.add_sequence();
        const auto k = kt::randn(std::size_t(n) * 2 * d, 11 + n), v = kt::randn(std::size_t(n) * 2 * d, 13 + n);
        cache.append(s, 0, k.data(), v.data(), n);
        // Keep every third token of head 1, so its rows no longer sit at their original slots.
        std::vector<std::int32_t> kept;
        for (int t = 0; t < n; t += 3) kept.push_back(t);
        cache.keep(s, 0, 1, kept.data(), static_cast<std::int32_t>(kept.size()));
        for (int h = 0; h < 2; ++h) {
          const int len = cache.length(s, 0, h);
          std::vector<float> gk(std::size_t(len) * d, -1.0f), gv(gk.size(), -1.0f);
          cache.gather(s, 0, h, gk.data(), gv.data());
          for (int i = 0; i < len; ++i) {
            const int t = h == 0 ? i : kept[std::size_t(i)];
            for (int dd = 0; dd < d; ++dd) {
              const std::size_t src = (std::size_t(t) * 2 + h) * d + dd, dst = std::size_t(i) * d + dd;
              REQUIRE(gk[dst] == static_cast<float>(kvc::half(k[src])));
              REQUIRE(gv[dst] == static_cast<float>(kvc::half(v[src])));
            }
          }
          std::vector<float> only_v(gk.size(), -1.0f);
          cache.gather(s, 0, h, nullptr, only_v.data());  // one output alone
          REQUIRE(only_v == gv);
        }
      }
}

TEST_CASE("wrappers: vnorm (L1 and W_o), rkv redundancy, chunkkv shared chunks", "[evict][wrappers]") {
  kt::filled f({}, 40, 16);
  auto base = f.run(knorm{}, 0);
  auto s = f.run(vnorm<knorm>(vnorm_params{0.5f}), 0);
  for (int h = 0; h < f.m.hkv; ++h) {
    std::vector<double> want;
    for (int t = 0; t < f.n; ++t) {
      double l1 = 0;
      for (int d = 0; d < f.m.d; ++d) l1 += std::abs(f.V(0, t, h, d));
      want.push_back((base[h][t] + 0.5) * l1);
    }
    require_close(s[h], want);
  }
  const int out_dim = 3;
  auto W = kt::randn(std::size_t(f.m.layers) * f.m.hkv * out_dim * f.m.d, 17);
  vnorm_params vp;
  vp.w_o = W.data();
  vp.out_dim = out_dim;
  auto sw = f.run(vnorm<knorm>(vp), 1);
  auto b1 = f.run(knorm{}, 1);
  for (int h = 0; h < f.m.hkv; ++h) {
    std::vector<double> want;
    for (int t = 0; t < f.n; ++t) {
      double l1 = 0;
      for (int o = 0; o < out_dim; ++o) {
        double a = 0;
        for (int d = 0; d < f.m.d; ++d) a += W[((std::size_t(1) * f.m.hkv + h) * out_dim + o) * f.m.d + d] * f.V(1, t, h, d);
        l1 += std::abs(a);
      }
      want.push_back(b1[h][t] * l1);
    }
    require_close(sw[h], want);
  }
  auto sr = f.run(rkv<knorm>{}, 0);
  for (int h = 0; h < f.m.hkv; ++h) {
    std::vector<double> imp(base[h].begin(), base[h].end());
    imp = softmax(imp);
    std::vector<double> red(f.n, 0.0);
    for (int i = 0; i < f.n; ++i) {
      for (int j = 0; j < f.n; ++j) {
        if (i == j) continue;
        double dot = 0, ni = 0, nj = 0;
        for (int d = 0; d < f.m.d; ++d)
          dot += f.K(0, i, h, d) * f.K(0, j, h, d), ni += f.K(0, i, h, d) * f.K(0, i, h, d), nj += f.K(0, j, h, d) * f.K(0, j, h, d);
        red[i] += dot / std::sqrt(ni * nj) / (f.n - 1);
      }
    }
    red = softmax(red);
    std::vector<double> want;
    for (int t = 0; t < f.n; ++t) want.push_back(0.1 * imp[t] - 0.9 * red[t]);
    require_close(sr[h], want, 1e-4);
  }
  // chunkkv: the same chunks for every head, best mean head-summed score first
  chunkkv<knorm> ck(chunkkv_params{5}, knorm(knorm_params{{0, 0}}));
  kvc::evict::gathered_layer g;
  kvc::evict::gather_layer(f.cache, f.seq, 0, f.m.hq, reads_keys, g);
  layer_scores sc;
  ck.score(g.in, {}, sc);
  layer_selection sel;
  ck.select(g.in, {}, sc, kvc::budget::tokens(15), kvc::allocator::uniform(), {0, 0}, sel);
  REQUIRE(sel[0] == sel[1]);
  REQUIRE(sel[0].size() == 15);
  std::vector<std::pair<double, int>> cs;
  for (int c = 0; c < 8; ++c) {
    double a = 0;
    for (int t = c * 5; t < c * 5 + 5; ++t) a += base[0][t] + base[1][t];
    cs.push_back({-a / 5, c});
  }
  std::sort(cs.begin(), cs.end());
  std::vector<int32_t> want;
  for (int i = 0; i < 3; ++i)
    for (int t = cs[i].second * 5; t < cs[i].second * 5 + 5; ++t) want.push_back(t);
  std::sort(want.begin(), want.end());
  REQUIRE(sel[0] == want);
}

TEST_CASE("scorers that miss their observation say which one", "[evict][errors]") {
  kt::filled f({}, 20, 18);
  REQUIRE_THROWS_WITH(f.run(snapkv{}, 0), Catch::Contains("snapkv") && Catch::Contains("query_window"));
  REQUIRE_THROWS_WITH(f.run(h2o{}, 0), Catch::Contains("h2o") && Catch::Contains("attention_observer"));
  REQUIRE_THROWS_WITH(f.run(expected_attention{}, 0), Catch::Contains("query_stats"));
  REQUIRE_THROWS_AS(f.run(qfilters{}, 0), kvc::error);
}
