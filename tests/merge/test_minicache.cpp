// SPDX-License-Identifier: Apache-2.0
// MiniCache (kvc/merge/minicache.hpp, kvc/cpu/minicache_attention.hpp) against its rule written
// here in double from the rows appended: per pair of adjacent layers, per kv head and token,
// keys and values separately, the angular distance d = arccos(cos)/π of the two layers' rows,
// the SLERP of their directions at t, retention of tokens whose key or value distance exceeds
// d_min + γ(d_max − d_min); a merged token restored as |x_l|·e in layer l. Attention against a
// dense double softmax over the restored rows. Nothing of the cache's planning or the kernel is
// reused by the reference.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <kvc/cpu/minicache_attention.hpp>
#include <kvc/merge/minicache.hpp>
#include <kvc/parallel/thread_pool.hpp>

#include "cache_builders.hpp"
#include "fast_require.hpp"
#include "kvc_catch.hpp"
#include "merge_test_util.hpp"
#include "random.hpp"

namespace {

using kvc::merge::minicache_cache;
using kvc::merge::minicache_options;
using dvec = std::vector<double>;

/// SLERP in double: returns d = Ω/π (2 for a zero row) and the unit direction in e.
double ref_slerp(const float* x, const float* y, int D, double t, dvec& e) {
  double nx = 0, ny = 0;
  for (int d = 0; d < D; ++d) nx += double(x[d]) * x[d], ny += double(y[d]) * y[d];
  e.assign(std::size_t(D), 0.0);
  if (nx == 0 || ny == 0) return 2;
  nx = std::sqrt(nx), ny = std::sqrt(ny);
  double c = 0;
  for (int d = 0; d < D; ++d) c += (x[d] / nx) * (y[d] / ny);
  c = std::max(-1.0, std::min(1.0, c));
  const double om = std::acos(c);
  double a = 1 - t, b = t;
  if (std::sin(om) >= 1e-6) a = std::sin((1 - t) * om) / std::sin(om), b = std::sin(t * om) / std::sin(om);
  double ne = 0;
  for (int d = 0; d < D; ++d) e[std::size_t(d)] = a * x[d] / nx + b * y[d] / ny, ne += e[std::size_t(d)] * e[std::size_t(d)];
  ne = std::sqrt(ne);
  if (ne == 0) return 2;
  for (auto& v : e) v /= ne;
  return om / M_PI;
}

/// The rows one layer must show after the merge: [token][D] keys and values, in position order.
struct ref_layer {
  std::vector<dvec> k, v;
  std::vector<char> merged;
};

/// Rows [n][H][D] of the pair's layers a and b as appended; returns the expected layers a and b
/// of kv head h.
std::pair<ref_layer, ref_layer> reference_pair(const std::vector<float>& ka, const std::vector<float>& va,
                                               const std::vector<float>& kb, const std::vector<float>& vb, int n, int H,
                                               int D, int h, double t, double gamma, int page) {
  std::vector<dvec> ek(static_cast<std::size_t>(n)), ev(static_cast<std::size_t>(n));
  dvec dk(static_cast<std::size_t>(n)), dv(static_cast<std::size_t>(n));
  auto row = [&](const std::vector<float>& x, int tok) { return &x[(std::size_t(tok) * H + std::size_t(h)) * D]; };
  for (int tok = 0; tok < n; ++tok) {
    dk[std::size_t(tok)] = ref_slerp(row(ka, tok), row(kb, tok), D, t, ek[std::size_t(tok)]);
    dv[std::size_t(tok)] = ref_slerp(row(va, tok), row(vb, tok), D, t, ev[std::size_t(tok)]);
  }
  auto cut = [&](const dvec& d) {
    double lo = 3, hi = -1;
    for (double x : d)
      if (x <= 1) lo = std::min(lo, x), hi = std::max(hi, x);
    return hi < lo ? -1.0 : lo + gamma * (hi - lo);
  };
  const double ck = cut(dk), cv = cut(dv);
  // The page rule: the head merges only if its two layers' retained rows plus the shared rows
  // take no more pages of `page` rows than the two layers' n rows did.
  int m = 0;
  for (int tok = 0; tok < n; ++tok) m += !(dk[std::size_t(tok)] > ck || dv[std::size_t(tok)] > cv);
  const auto pages = [&](int rows) { return (rows + page - 1) / page; };
  const bool merges = m > 0 && 2 * pages(n - m) + pages(m) <= 2 * pages(n);
  ref_layer A, B;
  auto norm = [&](const float* x) {
    double s = 0;
    for (int d = 0; d < D; ++d) s += double(x[d]) * x[d];
    return std::sqrt(s);
  };
  for (int tok = 0; tok < n; ++tok) {
    const bool keep = !merges || dk[std::size_t(tok)] > ck || dv[std::size_t(tok)] > cv;
    for (int which = 0; which < 2; ++which) {
      ref_layer& L = which ? B : A;
      const std::vector<float>& K = which ? kb : ka;
      const std::vector<float>& V = which ? vb : va;
      dvec kr(static_cast<std::size_t>(D)), vr(static_cast<std::size_t>(D));
      const double mk = norm(row(K, tok)), mv = norm(row(V, tok));
      for (int d = 0; d < D; ++d) {
        kr[std::size_t(d)] = keep ? row(K, tok)[d] : mk * ek[std::size_t(tok)][std::size_t(d)];
        vr[std::size_t(d)] = keep ? row(V, tok)[d] : mv * ev[std::size_t(tok)][std::size_t(d)];
      }
      L.k.push_back(kr);
      L.v.push_back(vr);
      L.merged.push_back(!keep);
    }
  }
  return {A, B};
}

/// Layer b = layer a turned a little (noise of `spread` times the row) and rescaled, so the
/// distances spread over the cut; now and then an outlier token or a zero row.
void fill_pair(std::vector<float>& ka, std::vector<float>& va, std::vector<float>& kb, std::vector<float>& vb, int n,
               int H, int D, kvc_test::rng& r) {
  ka = r.normals(std::size_t(n) * H * D);
  va = r.normals(ka.size());
  kb.resize(ka.size());
  vb.resize(ka.size());
  for (std::size_t i = 0; i < ka.size(); i += std::size_t(D)) {
    const float spread = r.coin(0.1) ? 3.0f : r.uniform(0.02f, 0.4f), sk = r.uniform(0.3f, 3.0f), sv = r.uniform(0.3f, 3.0f);
    for (int d = 0; d < D; ++d) {
      kb[i + std::size_t(d)] = sk * (ka[i + std::size_t(d)] + spread * r.normal());
      vb[i + std::size_t(d)] = sv * (va[i + std::size_t(d)] + spread * r.normal());
    }
    if (r.coin(0.02))
      for (int d = 0; d < D; ++d) kb[i + std::size_t(d)] = 0.0f;
  }
}

/// Dense attention in double over rows (position order) visible to a query at `qpos`.
dvec dense(const float* q, const std::vector<dvec>& k, const std::vector<dvec>& v, const std::vector<int>& pos, int qpos,
           int D, double scale, double& lse) {
  dvec out(std::size_t(D), 0.0), s;
  double mx = -INFINITY;
  std::vector<std::size_t> vis;
  for (std::size_t t = 0; t < k.size(); ++t) {
    if (pos[t] > qpos) continue;
    double x = 0;
    for (int d = 0; d < D; ++d) x += double(q[d]) * k[t][std::size_t(d)];
    s.push_back(scale * x);
    vis.push_back(t);
    mx = std::max(mx, s.back());
  }
  double z = 0;
  for (double x : s) z += std::exp(x - mx);
  for (std::size_t i = 0; i < vis.size(); ++i)
    for (int d = 0; d < D; ++d) out[std::size_t(d)] += std::exp(s[i] - mx) / z * v[vis[i]][std::size_t(d)];
  lse = vis.empty() ? -INFINITY : mx + std::log(z);
  return out;
}

template <class T>
void rule_trials(std::uint64_t salt, kvc::thread_pool* pool) {
  const bool fp16 = std::is_same<T, kvc::half>::value;
  std::int64_t merged_total = 0, kept_total = 0, bytes_saved = 0;
  for (int trial = 0; trial < 40; ++trial) {
    kvc_test::rng r(salt + std::uint64_t(trial));
    const int layers = r.integer(2, 6), H = r.integer(1, 3), D = r.integer(2, 40), P = 1 << r.integer(0, 4);
    const int G = r.integer(1, 10), n = r.integer(1, 60);
    minicache_options o;
    o.start_layer = trial % 3 == 0 ? -1 : r.integer(0, layers - 1);
    o.t = trial % 4 == 0 ? 0.6f : r.uniform(0.0f, 1.0f);
    o.gamma = trial % 5 == 0 ? 0.05f : r.uniform(0.0f, 1.0f);
    minicache_cache<T> c(kvc_test::cache_shape(layers, H, D, P, 4096), o);
    const kvc::seq_id s = c.add_sequence();
    const int start = c.options().start_layer;
    INFO("trial " << trial << (fp16 ? " fp16" : " fp32") << " layers=" << layers << " H=" << H << " D=" << D
                  << " P=" << P << " start=" << start << " t=" << o.t << " gamma=" << o.gamma << " n=" << n);
    REQUIRE(start == (trial % 3 == 0 ? layers / 2 : o.start_layer));
    REQUIRE(c.num_pairs() == (layers - start) / 2);
    std::vector<std::vector<float>> K(static_cast<std::size_t>(layers)), V(static_cast<std::size_t>(layers));
    for (int l = 0; l < layers; l += 2) {
      if (l + 1 < layers) fill_pair(K[std::size_t(l)], V[std::size_t(l)], K[std::size_t(l + 1)], V[std::size_t(l + 1)], n, H, D, r);
      else K[std::size_t(l)] = r.normals(std::size_t(n) * H * D), V[std::size_t(l)] = r.normals(std::size_t(n) * H * D);
    }
    // Pairs start at `start`, which may be odd: refill so layer pairs (start + 2i, start + 2i + 1) are close.
    for (int p = 0; p < c.num_pairs(); ++p) {
      const std::size_t a = std::size_t(start + 2 * p);
      fill_pair(K[a], V[a], K[a + 1], V[a + 1], n, H, D, r);
    }
    // Stored rows round to T: the reference reads what the cache holds before the merge.
    for (int l = 0; l < layers; ++l) c.append(s, l, K[std::size_t(l)].data(), V[std::size_t(l)].data(), n);
    for (int l = 0; l < layers; ++l)
      for (int h = 0; h < H; ++h) {
        std::vector<float> kh(std::size_t(n) * D), vh(kh.size());
        c.cache().gather(s, l, h, kh.data(), vh.data());
        for (int tok = 0; tok < n; ++tok)
          for (int d = 0; d < D; ++d) {
            K[std::size_t(l)][(std::size_t(tok) * H + std::size_t(h)) * D + std::size_t(d)] = kh[std::size_t(tok) * D + std::size_t(d)];
            V[std::size_t(l)][(std::size_t(tok) * H + std::size_t(h)) * D + std::size_t(d)] = vh[std::size_t(tok) * D + std::size_t(d)];
          }
      }
    const std::size_t before = c.bytes_in_use();
    const auto rep = c.merge_pairs(s);
    std::int64_t merged = 0, kept = 0;
    const double tol = fp16 ? 2.0 / 1024 : 2e-6;
    const auto q = r.normals(std::size_t(H) * G * D, 1.5f);
    const int nq = r.integer(1, 6);
    const auto qq = r.normals(std::size_t(nq) * H * G * D, 1.5f);
    std::vector<std::int32_t> qp(static_cast<std::size_t>(nq));
    for (auto& x : qp) x = r.integer(-1, n + 1);
    for (int l = 0; l < layers; ++l) {
      const int p = c.pair_of(l);
      REQUIRE(p == (l >= start && l < start + 2 * c.num_pairs() ? (l - start) / 2 : -1));
      std::vector<float> out(q.size()), lse(std::size_t(H) * G), pout(qq.size()), plse(std::size_t(nq) * H * G);
      kvc::decode_options opt;
      opt.pool = pool;
      opt.lse = lse.data();
      kvc::cpu::minicache_decode_attention(c, s, l, q.data(), H * G, out.data(), opt);
      opt.lse = plse.data();
      kvc::cpu::minicache_prefill_attention(c, s, l, qq.data(), nq, qp.data(), H * G, pout.data(), opt);
      for (int h = 0; h < H; ++h) {
        ref_layer ref;
        if (p >= 0) {
          const std::size_t a = std::size_t(start + 2 * p);
          auto pr = reference_pair(K[a], V[a], K[a + 1], V[a + 1], n, H, D, h, o.t, o.gamma, P);
          ref = std::size_t(l) == a ? pr.first : pr.second;
        } else {
          for (int tok = 0; tok < n; ++tok) {
            dvec kr(static_cast<std::size_t>(D)), vr(static_cast<std::size_t>(D));
            for (int d = 0; d < D; ++d) {
              kr[std::size_t(d)] = K[std::size_t(l)][(std::size_t(tok) * H + std::size_t(h)) * D + std::size_t(d)];
              vr[std::size_t(d)] = V[std::size_t(l)][(std::size_t(tok) * H + std::size_t(h)) * D + std::size_t(d)];
            }
            ref.k.push_back(kr), ref.v.push_back(vr), ref.merged.push_back(0);
          }
        }
        // Restored rows, in position order (gather), against the reference.
        REQUIRE(c.length(s, l, h) == n);
        std::vector<float> kg(std::size_t(n) * D), vg(kg.size());
        std::vector<std::int32_t> pg(static_cast<std::size_t>(n));
        c.gather(s, l, h, kg.data(), vg.data());
        c.positions(s, l, h, pg.data());
        std::vector<int> pos(static_cast<std::size_t>(n));
        for (int tok = 0; tok < n; ++tok) {
          pos[std::size_t(tok)] = tok;
          REQUIRE(pg[std::size_t(tok)] == tok);
          for (int d = 0; d < D; ++d) {
            const double ek = ref.k[std::size_t(tok)][std::size_t(d)], ev = ref.v[std::size_t(tok)][std::size_t(d)];
            KVC_REQUIRE(std::fabs(kg[std::size_t(tok) * D + std::size_t(d)] - ek) <= tol * (1 + std::fabs(ek)) * 4,
                        "layer " << l << " head " << h << " token " << tok << " d " << d << " merged " << int(ref.merged[std::size_t(tok)]));
            KVC_REQUIRE(std::fabs(vg[std::size_t(tok) * D + std::size_t(d)] - ev) <= tol * (1 + std::fabs(ev)) * 4,
                        "layer " << l << " head " << h << " token " << tok << " d " << d);
          }
          if (p >= 0 && l == start + 2 * p) (ref.merged[std::size_t(tok)] ? merged : kept) += 1;
        }
        // Attention against the dense reference over the restored rows.
        const double scale = 1.0 / std::sqrt(double(D));
        double vmax = 1;
        for (const auto& v : ref.v)
          for (double x : v) vmax = std::max(vmax, std::fabs(x));
        for (int g = 0; g < G; ++g) {
          const std::size_t row = std::size_t(h) * G + std::size_t(g);
          double rl = 0;
          const dvec ro = dense(&q[row * D], ref.k, ref.v, pos, n, D, scale, rl);
          for (int d = 0; d < D; ++d)
            KVC_REQUIRE(std::fabs(out[row * D + std::size_t(d)] - ro[std::size_t(d)]) <= (fp16 ? 4e-3 : 2e-5) * vmax,
                        "decode layer " << l << " q head " << row << " d " << d);
          KVC_REQUIRE(std::fabs(lse[row] - rl) <= (fp16 ? 4e-3 : 2e-5) * (1 + std::fabs(rl)), "lse layer " << l);
          for (int i = 0; i < nq; ++i) {
            const std::size_t pr = std::size_t(i) * H * G + row;
            double pl = 0;
            const dvec po = dense(&qq[pr * D], ref.k, ref.v, pos, qp[std::size_t(i)], D, scale, pl);
            for (int d = 0; d < D; ++d)
              KVC_REQUIRE(std::fabs(pout[pr * D + std::size_t(d)] - po[std::size_t(d)]) <= (fp16 ? 4e-3 : 2e-5) * vmax,
                          "prefill layer " << l << " query " << i << " (position " << qp[std::size_t(i)] << ") d " << d);
            if (std::isinf(pl)) KVC_REQUIRE((std::isinf(plse[pr]) && plse[pr] < 0), "empty row lse");
            else KVC_REQUIRE(std::fabs(plse[pr] - pl) <= (fp16 ? 4e-3 : 2e-5) * (1 + std::fabs(pl)), "prefill lse");
          }
        }
      }
    }
    REQUIRE(rep.merged == merged);
    REQUIRE(rep.retained == kept);
    merged_total += merged;
    kept_total += kept;
    // Real bytes: never more (a head whose merge would open more pages than it frees merges
    // nothing), the pool's own figure, and a merged token pair costs one row pair.
    REQUIRE(c.bytes_in_use() <= before);
    REQUIRE(c.bytes_in_use() == std::size_t(c.cache().pool().pages_in_use()) * c.cache().pool().page_bytes());
    bytes_saved += std::int64_t(before) - std::int64_t(c.bytes_in_use());
    REQUIRE(c.metadata_bytes() >= std::size_t(merged) * 4 * sizeof(float));
  }
  REQUIRE(merged_total > 500);
  REQUIRE(kept_total > 300);
  REQUIRE(bytes_saved > 0);
}

}  // namespace

TEST_CASE("MiniCache merges adjacent layers by the rule and attends over both streams", "[merge][minicache]") {
  rule_trials<float>(16100, nullptr);
  rule_trials<kvc::half>(16200, nullptr);
  kvc::thread_pool pool(3);
  rule_trials<float>(16300, &pool);
}

TEST_CASE("MiniCache: later tokens stay unmerged and are attended with the shared ones", "[merge][minicache]") {
  kvc_test::rng r(16400);
  const int layers = 4, H = 2, D = 16, n = 30;
  minicache_options o;
  o.gamma = 1;  // every token with a direction merges
  minicache_cache<float> c(kvc_test::cache_shape(layers, H, D, 4, 1024), o);
  const kvc::seq_id s = c.add_sequence();
  for (int l = 0; l < layers; ++l) {
    const auto k = r.normals(std::size_t(n) * H * D), v = r.normals(k.size());
    c.append(s, l, k.data(), v.data(), n);
  }
  c.merge_pairs(s);
  REQUIRE(c.cache().length(s, 2, 0) == 0);  // layer 2 (pair 0 = layers 2, 3) keeps nothing of its own
  const auto k = r.normals(std::size_t(3) * H * D), v = r.normals(k.size());
  c.append(s, 2, k.data(), v.data(), 3);
  REQUIRE(c.length(s, 2, 1) == n + 3);
  std::vector<float> kg(std::size_t(n + 3) * D);
  std::vector<std::int32_t> pg(std::size_t(n + 3));
  c.gather(s, 2, 1, kg.data());
  c.positions(s, 2, 1, pg.data());
  for (int t = 0; t < n + 3; ++t) REQUIRE(pg[std::size_t(t)] == t);
  for (int d = 0; d < D; ++d) REQUIRE(kg[std::size_t(n + 2) * D + std::size_t(d)] == k[(2 * std::size_t(H) + 1) * D + std::size_t(d)]);
}

TEST_CASE("MiniCache refuses what it cannot merge and changes nothing", "[merge][minicache][strong]") {
  kvc_test::rng r(16500);
  using kvc_test::require_error;
  minicache_options bad;
  bad.t = 1.5f;
  require_error([&] { minicache_cache<float>(kvc_test::cache_shape(4, 1, 8, 4, 64), bad); }, "minicache_options.t = 1.5");
  bad = {};
  bad.gamma = -0.1f;
  require_error([&] { minicache_cache<float>(kvc_test::cache_shape(4, 1, 8, 4, 64), bad); }, "minicache_options.gamma = -0.1");
  bad = {};
  bad.start_layer = 5;
  require_error([&] { minicache_cache<float>(kvc_test::cache_shape(4, 1, 8, 4, 64), bad); }, "minicache_options.start_layer = 5");

  const int layers = 4, H = 2, D = 8, n = 12;
  minicache_cache<kvc::half> c(kvc_test::cache_shape(layers, H, D, 4, 1024));
  const kvc::seq_id s = c.add_sequence();
  for (int l = 0; l < layers; ++l) {
    const auto k = r.normals(std::size_t(n) * H * D), v = r.normals(k.size());
    c.append(s, l, k.data(), v.data(), l == 3 ? n - 1 : n);  // layer 3 one token short
  }
  const std::size_t bytes = c.bytes_in_use();
  require_error([&] { c.merge_pairs(s); }, "layer 3 kv head 0 holds 11 tokens, expected 12");
  REQUIRE(c.bytes_in_use() == bytes);
  REQUIRE_FALSE(c.merged(s, 0));
  const auto k = r.normals(std::size_t(H) * D), v = r.normals(k.size());
  c.append(s, 3, k.data(), v.data(), 1);
  c.merge_pairs(s);
  REQUIRE(c.merged(s, 0));
  const std::size_t after = c.bytes_in_use();
  require_error([&] { c.merge_pairs(s); }, "are merged already");
  REQUIRE(c.bytes_in_use() == after);
  require_error([&] { c.merge_pairs(s + 7); }, "unknown sequence id");
  // The pool's headroom: a sequence filling every page the config asked for still merges.
  minicache_cache<float> tight(kvc_test::cache_shape(layers, 1, D, 4, 4 * 3));
  const kvc::seq_id u = tight.add_sequence();
  for (int l = 0; l < layers; ++l) {
    const auto kk = r.normals(std::size_t(n) * D), vv = r.normals(kk.size());
    tight.append(u, l, kk.data(), vv.data(), n);
  }
  REQUIRE(tight.bytes_in_use() == 12 * tight.cache().pool().page_bytes());
  // ... unless another sequence took the headroom: then the pair stays untouched.
  const kvc::seq_id w = tight.add_sequence();
  const auto kw = r.normals(std::size_t(12) * D), vw = r.normals(kw.size());
  for (int l = 0; l < layers; ++l)
    if (tight.cache().pool().free_pages() >= 3) tight.append(w, l, kw.data(), vw.data(), 12);
  std::vector<float> k0(std::size_t(n) * D), k1(k0.size());
  tight.gather(u, 2, 0, k0.data());
  const std::size_t tb = tight.bytes_in_use();
  require_error([&] { tight.merge_pairs(u); }, "kvc::page_pool::allocate");
  REQUIRE(tight.bytes_in_use() == tb);
  REQUIRE_FALSE(tight.merged(u, 0));
  REQUIRE(tight.length(u, 2, 0) == n);
  tight.gather(u, 2, 0, k1.data());
  REQUIRE(k0 == k1);
  tight.remove_sequence(w);
  tight.merge_pairs(u);
  REQUIRE(tight.merged(u, 0));
  REQUIRE(tight.length(u, 3, 0) == n);
  // Attention errors.
  std::vector<float> q(std::size_t(2) * D), out(q.size());
  require_error([&] { kvc::cpu::minicache_decode_attention(c, s, 4, q.data(), 2, out.data()); }, "layer = 4");
  require_error([&] { kvc::cpu::minicache_decode_attention(c, s, 0, q.data(), 3, out.data()); }, "num_q_heads = 3");
  require_error([&] { kvc::cpu::minicache_prefill_attention(c, s, 0, q.data(), 1, nullptr, 2, out.data()); }, "q_positions is null");
}
