// SPDX-License-Identifier: Apache-2.0
// ThinK (kvc/lowrank/think.hpp) and the run-time storage think(ratio=, vratio=, window=, coef=)
// (kvc/runtime/lowrank_storages.hpp). The channel scores are checked against sums written here in
// double from their definitions (the Frobenius norm of the window's logit share, the norm of the
// window's attention outputs); the cache's attention against a dense double reference over the
// appended K/V rounded to fp16, with the channels this test chose itself set to zero. Pool bytes
// against a count of pages made here.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <kvc/lowrank/think.hpp>
#include <kvc/runtime/layered_storage.hpp>
#include <kvc/runtime/lowrank_storages.hpp>
#include <kvc/runtime/make_cache.hpp>

#include "cache_builders.hpp"
#include "kvc_catch.hpp"

// Storage headers register nothing by being included (runtime/make_cache.hpp): the storages this
// file builds by spec are registered here, in its own ISA configuration, before any test runs.
[[maybe_unused]] static const bool storages_registered =
    (kvc::runtime::register_lowrank_storages(), kvc::runtime::register_layered_storage(), true);

namespace {

using kvc::cache_config;
using kvc::seq_id;
using kvc::runtime::any_cache;
using kvc::runtime::make_cache;
using Catch::Contains;

std::vector<float> randn(std::size_t n, std::uint32_t seed, float spread = 0) {
  std::mt19937 g(seed);
  std::normal_distribution<float> nd;
  std::vector<float> x(n);
  // spread > 0: channel d (of 64-channel rows) scaled by 1 + spread·(d % 7), so scores differ clearly.
  for (std::size_t i = 0; i < n; ++i) x[i] = nd(g) * (1.0f + spread * static_cast<float>(i % 7));
  return x;
}

/// Whether the cache under test stores fp16 (the reference rounds its rows the same way) or fp32.
bool g_fp16 = true;
float fp16(float x) { return g_fp16 ? static_cast<float>(kvc::half(x)) : x; }

/// score[d] = ‖Q[:, d] K[:, d]ᵀ‖_F summed entry by entry: Σ_i Σ_t (q_id k_td)².
std::vector<double> ref_key_scores(const std::vector<float>& q, std::int32_t nq, const std::vector<float>& k,
                                   std::int32_t n, std::int32_t D) {
  std::vector<double> s(static_cast<std::size_t>(D), 0.0);
  for (std::int32_t d = 0; d < D; ++d) {
    double f = 0;
    for (std::int32_t i = 0; i < nq; ++i)
      for (std::int32_t t = 0; t < n; ++t) {
        const double x = double(q[static_cast<std::size_t>(i) * D + d]) * k[static_cast<std::size_t>(t) * D + d];
        f += x * x;
      }
    s[static_cast<std::size_t>(d)] = std::sqrt(f);
  }
  return s;
}

/// Causal softmax attention of query i (at qpos[i]) over keys at kpos, in double: the output row.
std::vector<double> ref_attend(const float* q, const std::vector<float>& k, const std::vector<float>& v,
                               const std::vector<std::int32_t>& kpos, std::int32_t qpos, std::int32_t D, double scale) {
  const std::size_t n = kpos.size();
  std::vector<double> s(n, -std::numeric_limits<double>::infinity()), o(static_cast<std::size_t>(D), 0.0);
  double m = -std::numeric_limits<double>::infinity();
  for (std::size_t t = 0; t < n; ++t) {
    if (kpos[t] > qpos) continue;
    double a = 0;
    for (std::int32_t d = 0; d < D; ++d) a += double(q[d]) * k[t * D + d];
    s[t] = a * scale;
    m = std::max(m, s[t]);
  }
  if (!(m > -std::numeric_limits<double>::infinity())) return o;
  double l = 0;
  for (std::size_t t = 0; t < n; ++t) l += std::exp(s[t] - m);
  for (std::size_t t = 0; t < n; ++t)
    for (std::int32_t d = 0; d < D; ++d) o[static_cast<std::size_t>(d)] += std::exp(s[t] - m) / l * v[t * D + d];
  return o;
}

/// The `keep` largest scores' channels, ascending (a plain selection: ties are not expected).
std::vector<std::int32_t> ref_top(const std::vector<double>& s, std::int32_t keep) {
  std::vector<std::int32_t> idx(s.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::sort(idx.begin(), idx.end(), [&](std::int32_t a, std::int32_t b) { return s[a] > s[b]; });
  idx.resize(static_cast<std::size_t>(keep));
  std::sort(idx.begin(), idx.end());
  return idx;
}

TEST_CASE("think: key and value channel scores match their definitions", "[lowrank][think]") {
  for (std::int32_t D : {16, 64}) {
    for (std::int32_t G : {1, 3}) {
      const std::int32_t n = 37, nq = 5, Hq = 2 * G;  // two kv heads' worth of query heads; score the second group
      const auto q = randn(static_cast<std::size_t>(nq) * Hq * D, 11u + D + G);
      const auto k = randn(static_cast<std::size_t>(n) * D, 12u + D, 0.3f);
      const auto v = randn(static_cast<std::size_t>(n) * D, 13u + D, 0.3f);
      std::vector<std::int32_t> kpos(n), qpos(nq);
      for (std::int32_t t = 0; t < n; ++t) kpos[t] = 2 * t;  // a gap between every token
      for (std::int32_t i = 0; i < nq; ++i) qpos[i] = 2 * n - 1 - 8 * (nq - 1 - i);  // earlier queries see fewer keys
      kvc::lowrank::window_queries w{q.data() + static_cast<std::size_t>(G) * D, nq, G, static_cast<std::int64_t>(Hq) * D,
                                     qpos.data()};
      // The group's queries as [nq·G][D] rows for the references.
      std::vector<float> qg;
      for (std::int32_t i = 0; i < nq; ++i)
        for (std::int32_t g = 0; g < G; ++g) {
          const float* r = q.data() + (static_cast<std::size_t>(i) * Hq + G + g) * D;
          qg.insert(qg.end(), r, r + D);
        }
      const auto ks = kvc::lowrank::key_channel_scores(w, k.data(), n, D, D);
      const auto rk = ref_key_scores(qg, nq * G, k, n, D);
      for (std::int32_t d = 0; d < D; ++d) CHECK(ks[d] == Approx(rk[d]).epsilon(1e-10));
      const double scale = 1.0 / std::sqrt(double(D));
      const auto vs = kvc::lowrank::value_channel_scores(w, k.data(), v.data(), kpos.data(), n, D, D, scale);
      std::vector<double> rv(static_cast<std::size_t>(D), 0.0);
      for (std::int32_t i = 0; i < nq; ++i)
        for (std::int32_t g = 0; g < G; ++g) {
          const auto o = ref_attend(qg.data() + (static_cast<std::size_t>(i) * G + g) * D, k, v, kpos, qpos[i], D, scale);
          for (std::int32_t d = 0; d < D; ++d) rv[d] += o[d] * o[d];
        }
      for (std::int32_t d = 0; d < D; ++d) CHECK(vs[d] == Approx(std::sqrt(rv[d])).epsilon(1e-9));
    }
  }
}

TEST_CASE("think: channel selection, kept counts and selection bases", "[lowrank][think]") {
  CHECK(kvc::lowrank::think_kept(0.5, 64) == 32);
  CHECK(kvc::lowrank::think_kept(0.0, 64) == 64);
  CHECK(kvc::lowrank::think_kept(0.3, 10) == 7);  // floor(3.0) pruned, although 0.3 · 10 is 2.9999... in binary
  CHECK(kvc::lowrank::think_kept(0.99, 64) == 1);
  CHECK_THROWS_WITH(kvc::lowrank::think_kept(1.0, 64), Contains("ratio = 1") && Contains("0 <= ratio < 1"));
  const std::vector<double> s{0.5, 3, 1, 3, 0, 2};
  CHECK(kvc::lowrank::top_channels(s, 3) == std::vector<std::int32_t>{1, 3, 5});
  CHECK(kvc::lowrank::top_channels(s, 2) == std::vector<std::int32_t>{1, 3});  // a tie keeps both only when both fit
  CHECK(kvc::lowrank::top_channels({1, 1, 1}, 1) == std::vector<std::int32_t>{0});  // ties: the lower channel
  const auto b = kvc::lowrank::selection_basis({1, 3, 5}, 6, &s);
  REQUIRE(b.rank == 3);
  for (std::int32_t j = 0; j < 3; ++j)
    for (std::int32_t d = 0; d < 6; ++d) CHECK(b.u[static_cast<std::size_t>(j) * 6 + d] == (d == 2 * j + 1 ? 1.0f : 0.0f));
  CHECK(b.energy == Approx(8.0 / 9.5));
  CHECK_THROWS_WITH(kvc::lowrank::selection_basis({3, 1}, 6), Contains("channels[1] = 1") && Contains("strictly increasing"));
}

// ---- the storage --------------------------------------------------------------------------

constexpr std::int32_t L = 2, H = 2, D = 64, G = 2, P = 16;

cache_config shape(std::int32_t max_pages = 1 << 12) { return kvc_test::cache_shape(L, H, D, P, max_pages); }

/// What this test knows of one sequence: every appended row (float) with its position, and the
/// tokens each (layer, head) still holds (indices into the appended rows).
struct truth {
  std::vector<std::vector<float>> k, v;  // [layer] rows [token][H][D]
  std::vector<std::vector<std::int32_t>> pos;  // [layer][token]
  std::vector<std::vector<std::vector<std::int32_t>>> held;  // [layer][head] token indices
  truth() : k(L), v(L), pos(L), held(L, std::vector<std::vector<std::int32_t>>(H)) {}
  void append(std::int32_t l, const std::vector<float>& kk, const std::vector<float>& vv, std::int32_t first) {
    const std::int32_t n = static_cast<std::int32_t>(kk.size() / (H * D)), base = static_cast<std::int32_t>(pos[l].size());
    k[l].insert(k[l].end(), kk.begin(), kk.end());
    v[l].insert(v[l].end(), vv.begin(), vv.end());
    for (std::int32_t i = 0; i < n; ++i) {
      pos[l].push_back(first + i);
      for (std::int32_t h = 0; h < H; ++h) held[l][h].push_back(base + i);
    }
  }
  /// Rows of head h as stored: fp16, channels outside keep_k / keep_v zero (empty: all kept).
  void rows(std::int32_t l, std::int32_t h, const std::vector<std::int32_t>& keep_k, const std::vector<std::int32_t>& keep_v,
            std::vector<float>& K, std::vector<float>& V, std::vector<std::int32_t>& kp) const {
    K.clear(), V.clear(), kp.clear();
    for (std::int32_t t : held[l][h]) {
      for (std::int32_t d = 0; d < D; ++d) {
        const std::size_t i = (static_cast<std::size_t>(t) * H + h) * D + d;
        const bool ik = keep_k.empty() || std::binary_search(keep_k.begin(), keep_k.end(), d);
        const bool iv = keep_v.empty() || std::binary_search(keep_v.begin(), keep_v.end(), d);
        K.push_back(ik ? fp16(k[l][i]) : 0.0f);
        V.push_back(iv ? fp16(v[l][i]) : 0.0f);
      }
      kp.push_back(pos[l][static_cast<std::size_t>(t)]);
    }
  }
};

/// The channels the test expects ThinK to keep for (layer, head) from window q ([n][H·G][D]).
void expected_channels(const truth& tr, std::int32_t l, std::int32_t h, const std::vector<float>& q, std::int32_t nq,
                       std::int32_t kk, std::int32_t kv, std::vector<std::int32_t>& keep_k, std::vector<std::int32_t>& keep_v) {
  std::vector<float> K, V;
  std::vector<std::int32_t> kp;
  tr.rows(l, h, {}, {}, K, V, kp);
  std::vector<float> qg;
  for (std::int32_t i = 0; i < nq; ++i)
    for (std::int32_t g = 0; g < G; ++g) {
      const float* r = q.data() + (static_cast<std::size_t>(i) * H * G + h * G + g) * D;
      qg.insert(qg.end(), r, r + D);
    }
  const std::int32_t n = static_cast<std::int32_t>(kp.size());
  keep_k = ref_top(ref_key_scores(qg, nq * G, K, n, D), kk);
  keep_v.clear();
  if (kv < D) {
    const std::int32_t seen = static_cast<std::int32_t>(tr.pos[l].size());  // positions 0.. appended without gaps
    std::vector<double> rv(static_cast<std::size_t>(D), 0.0);
    for (std::int32_t i = 0; i < nq; ++i)
      for (std::int32_t g = 0; g < G; ++g) {
        const auto o = ref_attend(qg.data() + (static_cast<std::size_t>(i) * G + g) * D, K, V, kp, seen - nq + i, D,
                                  1.0 / std::sqrt(double(D)));
        for (std::int32_t d = 0; d < D; ++d) rv[d] += o[d] * o[d];
      }
    keep_v = ref_top(rv, kv);
  }
}

/// Decode attention of the cache's layer l against the reference over the rows the test expects.
void check_attention(const any_cache& c, seq_id s, const truth& tr, std::int32_t l,
                     const std::vector<std::vector<std::int32_t>>& keep_k, const std::vector<std::vector<std::int32_t>>& keep_v,
                     std::uint32_t seed) {
  const auto q = randn(static_cast<std::size_t>(H) * G * D, seed);
  std::vector<float> out(q.size());
  c.attention(s, l, q.data(), H * G, out.data());
  for (std::int32_t qh = 0; qh < H * G; ++qh) {
    const std::int32_t h = qh / G;
    std::vector<float> K, V;
    std::vector<std::int32_t> kp;
    tr.rows(l, h, keep_k.empty() ? std::vector<std::int32_t>{} : keep_k[h], keep_v.empty() ? std::vector<std::int32_t>{} : keep_v[h],
            K, V, kp);
    const auto o = ref_attend(q.data() + static_cast<std::size_t>(qh) * D, K, V, kp, std::numeric_limits<std::int32_t>::max(), D,
                              1.0 / std::sqrt(double(D)));
    for (std::int32_t d = 0; d < D; ++d) CHECK(out[static_cast<std::size_t>(qh) * D + d] == Approx(o[d]).margin(2e-5).epsilon(1e-4));
  }
}

std::size_t pages(std::int32_t n) { return static_cast<std::size_t>((n + P - 1) / P); }

TEST_CASE("think storage: whole until the window, then pruned; attention, positions and bytes", "[lowrank][think]") {
  for (const char* spec : {"think(ratio=0.5)", "think(ratio=0.25,vratio=0.5,window=8)", "think(ratio=0.5,coef=fp32)",
                           "think(ratio=0)"}) {
    INFO(spec);
    auto c = make_cache(spec, shape());
    const std::string sp = spec;
    const double ratio = sp.find("0.25") != std::string::npos ? 0.25 : sp.find("ratio=0)") != std::string::npos ? 0.0 : 0.5;
    const bool vprune = sp.find("vratio") != std::string::npos, f32 = sp.find("fp32") != std::string::npos;
    g_fp16 = !f32;
    const std::int32_t kk = kvc::lowrank::think_kept(ratio, D), kv = vprune ? kvc::lowrank::think_kept(0.5, D) : D;
    const std::int32_t window = sp.find("window=8") != std::string::npos ? 8 : 32;
    CHECK(c->query_window() == window);
    const seq_id s = c->add_sequence();
    truth tr;
    const std::int32_t n = 77;
    for (std::int32_t l = 0; l < L; ++l) {
      const auto k = randn(static_cast<std::size_t>(n) * H * D, 100u + l, 0.4f), v = randn(k.size(), 200u + l, 0.4f);
      c->append(s, l, k.data(), v.data(), n, nullptr);
      tr.append(l, k, v, 0);
    }
    // Before the window the layers are plain fp16 (or fp32) pages: attention is exact on them.
    const std::size_t T = f32 ? 4 : 2;
    CHECK(c->bytes_in_use() == L * H * pages(n) * P * 2 * D * T);
    check_attention(*c, s, tr, 0, {}, {}, 7u);
    // Eviction before ThinK leaves the heads ragged (kvpress's ComposedPress order).
    std::vector<std::vector<std::int32_t>> kept(H);
    for (std::int32_t t = 0; t < n; ++t) {
      if (t % 3 != 1) kept[0].push_back(t);
      if (t % 2 == 0 || t > 60) kept[1].push_back(t);
    }
    c->keep_layer(s, 0, kept);
    for (std::int32_t h = 0; h < H; ++h) {
      std::vector<std::int32_t> held;
      for (std::int32_t i : kept[h]) held.push_back(tr.held[0][h][static_cast<std::size_t>(i)]);
      tr.held[0][h] = held;
    }
    const std::int32_t nq = 40;  // more than the window: the cache is handed the last `window`
    const auto q = randn(static_cast<std::size_t>(nq) * H * G * D, 300u);
    const std::int32_t w = std::min(nq, window);
    std::vector<float> qw(q.end() - static_cast<std::ptrdiff_t>(w) * H * G * D, q.end());
    c->observe_window(s, 0, qw.data(), w, H * G);
    std::vector<std::vector<std::int32_t>> keep_k(H), keep_v(H);
    for (std::int32_t h = 0; h < H; ++h) expected_channels(tr, 0, h, qw, w, kk, kv, keep_k[h], keep_v[h]);
    if (!vprune) keep_v.clear();
    // Layer 0 pruned, layer 1 still whole; positions and lengths as before.
    const std::size_t rowT = static_cast<std::size_t>((kk + kv + 1) / 2 * 2) * T;
    CHECK(c->bytes_in_use(0) == (pages(static_cast<std::int32_t>(kept[0].size())) + pages(static_cast<std::int32_t>(kept[1].size()))) * P * rowT);
    CHECK(c->bytes_in_use(1) == H * pages(n) * P * 2 * D * T);
    for (std::int32_t h = 0; h < H; ++h) {
      REQUIRE(c->length(s, 0, h) == static_cast<std::int32_t>(kept[h].size()));
      for (std::size_t i = 0; i < kept[h].size(); ++i) CHECK(c->positions(s, 0, h)[i] == kept[h][i]);
    }
    CHECK(c->seen(s, 0) == n);
    check_attention(*c, s, tr, 0, keep_k, keep_v, 8u);
    // gather: the kept channels back in place, the pruned ones zero.
    for (std::int32_t h = 0; h < H; ++h) {
      std::vector<float> K, V, gk(kept[h].size() * D), gv(gk.size());
      std::vector<std::int32_t> kp;
      tr.rows(0, h, keep_k[h], vprune ? keep_v[h] : std::vector<std::int32_t>{}, K, V, kp);
      c->gather(s, 0, h, gk.data(), gv.data());
      for (std::size_t i = 0; i < gk.size(); ++i) {
        CHECK(gk[i] == K[i]);
        CHECK(gv[i] == V[i]);
      }
    }
    // A second window for the same layer changes nothing.
    const std::size_t b0 = c->bytes_in_use();
    c->observe_window(s, 0, q.data(), w, H * G);
    CHECK(c->bytes_in_use() == b0);
    check_attention(*c, s, tr, 0, keep_k, keep_v, 9u);
    // Decode appends after the fit are pruned, at the next positions.
    const auto k1 = randn(static_cast<std::size_t>(3) * H * D, 400u), v1 = randn(k1.size(), 401u);
    c->append(s, 0, k1.data(), v1.data(), 3, nullptr);
    tr.append(0, k1, v1, n);
    CHECK(c->seen(s, 0) == n + 3);
    for (std::int32_t h = 0; h < H; ++h) CHECK(c->positions(s, 0, h)[kept[h].size()] == n);
    check_attention(*c, s, tr, 0, keep_k, keep_v, 10u);
    // Prefill attention over the pruned layer: causal, against the same rows.
    {
      const std::int32_t nqp = 3;
      const auto qp = randn(static_cast<std::size_t>(nqp) * H * G * D, 500u);
      const std::vector<std::int32_t> qpos{n - 1, n + 1, n + 2};
      std::vector<float> out(qp.size());
      c->prefill_attention(s, 0, qp.data(), nqp, qpos.data(), H * G, out.data());
      for (std::int32_t i = 0; i < nqp; ++i)
        for (std::int32_t qh = 0; qh < H * G; ++qh) {
          std::vector<float> K, V;
          std::vector<std::int32_t> kp;
          tr.rows(0, qh / G, keep_k[qh / G], keep_v.empty() ? std::vector<std::int32_t>{} : keep_v[qh / G], K, V, kp);
          const auto o = ref_attend(qp.data() + (static_cast<std::size_t>(i) * H * G + qh) * D, K, V, kp, qpos[i], D,
                                    1.0 / std::sqrt(double(D)));
          for (std::int32_t d = 0; d < D; ++d)
            CHECK(out[(static_cast<std::size_t>(i) * H * G + qh) * D + d] == Approx(o[d]).margin(2e-5).epsilon(1e-4));
        }
    }
  }
}

TEST_CASE("think storage: every sequence's layer moves, forks included; refusals leave the cache as it was",
          "[lowrank][think]") {
  g_fp16 = true;
  auto c = make_cache("think(ratio=0.5)", shape());
  const seq_id a = c->add_sequence();
  truth ta;
  const std::int32_t n = 50;
  for (std::int32_t l = 0; l < L; ++l) {
    const auto k = randn(static_cast<std::size_t>(n) * H * D, 600u + l, 0.4f), v = randn(k.size(), 700u + l);
    c->append(a, l, k.data(), v.data(), n, nullptr);
    ta.append(l, k, v, 0);
  }
  const seq_id b = c->fork(a);
  truth tb = ta;
  const auto kb = randn(static_cast<std::size_t>(5) * H * D, 800u), vb = randn(kb.size(), 801u);
  c->append(b, 0, kb.data(), vb.data(), 5, nullptr);
  tb.append(0, kb, vb, n);
  const auto q = randn(static_cast<std::size_t>(32) * H * G * D, 900u);
  const std::size_t before = c->bytes_in_use();
  // Refused windows: nothing moves.
  CHECK_THROWS_WITH(c->observe_window(a, 0, q.data(), 0, H * G), Contains("n = 0") && Contains("unchanged"));
  CHECK_THROWS_WITH(c->observe_window(a, 0, q.data(), 4, 3), Contains("num_q_heads = 3"));
  CHECK_THROWS_WITH(c->observe_window(a, 2, q.data(), 4, H * G), Contains("layer = 2"));
  CHECK_THROWS_WITH(c->observe_window(99, 0, q.data(), 4, H * G), Contains("seq = 99"));
  auto bad = q;
  bad[5] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(c->observe_window(a, 0, bad.data(), 4, H * G), Contains("q[5] = nan") && Contains("finite"));
  CHECK(c->bytes_in_use() == before);
  c->observe_window(a, 0, q.data(), 32, H * G);
  std::vector<std::vector<std::int32_t>> keep_k(H), keep_v;
  for (std::int32_t h = 0; h < H; ++h) {
    std::vector<std::int32_t> unused;
    expected_channels(ta, 0, h, q, 32, 32, D, keep_k[h], unused);
  }
  // Both sequences read pruned keys on the channels fitted on `a`.
  check_attention(*c, a, ta, 0, keep_k, keep_v, 11u);
  check_attention(*c, b, tb, 0, keep_k, keep_v, 12u);
  CHECK(c->seen(b, 0) == n + 5);
  c->remove_sequence(b);
  c->remove_sequence(a);
  CHECK(c->bytes_in_use() == 0);
}

TEST_CASE("think storage: a pool too small for the pruned copy refuses the move and keeps the layer whole",
          "[lowrank][think]") {
  g_fp16 = true;
  // Each store has its own pool of max_pages = 10. Layer 1, pruned first and then grown, fills
  // the pruned pool; layer 0's move then finds no room there.
  auto c = make_cache("think(ratio=0.5)", shape(10));
  const seq_id s = c->add_sequence();
  truth tr;
  const std::int32_t n = 32;  // 2 pages per head, 4 per layer
  const auto q = randn(static_cast<std::size_t>(32) * H * G * D, 1200u);
  {
    const auto k = randn(static_cast<std::size_t>(n) * H * D, 1001u, 0.4f), v = randn(k.size(), 1101u);
    c->append(s, 1, k.data(), v.data(), n, nullptr);
    c->observe_window(s, 1, q.data(), 32, H * G);
    const auto k2 = randn(static_cast<std::size_t>(48) * H * D, 1002u), v2 = randn(k2.size(), 1102u);
    c->append(s, 1, k2.data(), v2.data(), 48, nullptr);  // 80 tokens: 5 pages per head, the whole pool
  }
  const auto k = randn(static_cast<std::size_t>(n) * H * D, 1000u, 0.4f), v = randn(k.size(), 1100u);
  c->append(s, 0, k.data(), v.data(), n, nullptr);
  tr.append(0, k, v, 0);
  const std::size_t before = c->bytes_in_use();
  std::vector<float> g0(static_cast<std::size_t>(n) * D), g1(g0.size());
  c->gather(s, 0, 1, g0.data(), nullptr);
  CHECK_THROWS_WITH(c->observe_window(s, 0, q.data(), 32, H * G), Contains("pages requested"));
  CHECK(c->bytes_in_use() == before);
  CHECK(c->seen(s, 0) == n);
  c->gather(s, 0, 1, g1.data(), nullptr);
  CHECK(g0 == g1);  // still the whole fp16 keys
  check_attention(*c, s, tr, 0, {}, {}, 13u);
  // Freed pages make room: the same call then succeeds.
  c->keep_layer(s, 1, std::vector<std::vector<std::int32_t>>(H));
  c->observe_window(s, 0, q.data(), 32, H * G);
  CHECK(c->bytes_in_use() == H * pages(n) * P * static_cast<std::size_t>(32 + D) * 2);
  CHECK(c->seen(s, 0) == n);
}

TEST_CASE("think storage: spec errors name the argument", "[lowrank][think]") {
  CHECK_THROWS_WITH(make_cache("think", shape()), Contains("ratio"));
  CHECK_THROWS_WITH(make_cache("think(ratio=1)", shape()), Contains("ratio = 1") && Contains("0 <= ratio < 1"));
  CHECK_THROWS_WITH(make_cache("think(ratio=0.5,vratio=-0.1)", shape()), Contains("vratio = -0.1"));
  CHECK_THROWS_WITH(make_cache("think(ratio=0.5,window=0)", shape()), Contains("window = 0"));
  CHECK_THROWS_WITH(make_cache("think(ratio=0.5,coef=int8)", shape()), Contains("coef = int8"));
  CHECK_THROWS_WITH(make_cache("think(ratio=0.5,rato=2)", shape()), Contains("rato"));
}

TEST_CASE("think storage in layers(...): the window reaches the layer's part", "[lowrank][think]") {
  g_fp16 = true;
  auto c = make_cache("layers(fp16, l1=think(ratio=0.5,window=4))", shape());
  CHECK(c->query_window() == 4);
  const seq_id s = c->add_sequence();
  const std::int32_t n = 40;
  const auto k = randn(static_cast<std::size_t>(n) * H * D, 1300u), v = randn(k.size(), 1301u);
  for (std::int32_t l = 0; l < L; ++l) c->append(s, l, k.data(), v.data(), n, nullptr);
  const auto q = randn(static_cast<std::size_t>(8) * H * G * D, 1302u);
  const std::size_t before = c->bytes_in_use();
  c->observe_window(s, 0, q.data(), 8, H * G);  // fp16 part: nothing
  CHECK(c->bytes_in_use() == before);
  c->observe_window(s, 1, q.data(), 8, H * G);
  CHECK(c->bytes_in_use(1) == H * pages(n) * P * static_cast<std::size_t>(32 + D) * 2);
  CHECK(c->bytes_in_use() < before);
}

}  // namespace
