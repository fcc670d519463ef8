// SPDX-License-Identifier: Apache-2.0
// Quest (kvc/sparse/quest.hpp) and the page key bounds the store keeps for it
// (cache_config::key_bounds). This test keeps its own model of every stream: the rows it appended,
// rounded to the cache's element type, put through the same keeps. Against that model, in double:
// the bounds are each page's channel-wise min and max; every bound is >= q.k of every key of its
// page; the pages chosen are the sinks, the newest pages and the best-bounded others (bounds
// recomputed here from the rows, not read from the pages); the attention is a softmax over the
// tokens of the chosen pages, and over every token when the budget covers the stream.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <kvc/parallel/thread_pool.hpp>
#include <kvc/sparse/quest.hpp>

#include "kvc_catch.hpp"

namespace {

using kvc::cache_config;
using kvc::kv_cache;
using kvc::quest_options;
using kvc::seq_id;
using Catch::Contains;

template <class T>
float round_to(float x) {
  return static_cast<float>(T(x));
}

/// The model of one cache: rows[layer][head] = the kept tokens' key and value rows, as stored.
struct model {
  std::int32_t H = 0, D = 0;
  std::vector<std::vector<std::vector<float>>> k, v;  // [layer][head][token * D + d]
};

template <class T>
struct fixture {
  cache_config cfg;
  kv_cache<T> cache;
  seq_id s;
  model m;
  std::mt19937 g;
  fixture(std::int32_t layers, std::int32_t H, std::int32_t D, std::int32_t P, std::uint32_t seed)
      : cfg(make_cfg(layers, H, D, P)), cache(cfg), s(cache.add_sequence()), g(seed) {
    m.H = H, m.D = D;
    m.k.assign(static_cast<std::size_t>(layers), std::vector<std::vector<float>>(static_cast<std::size_t>(H)));
    m.v = m.k;
  }
  static cache_config make_cfg(std::int32_t layers, std::int32_t H, std::int32_t D, std::int32_t P) {
    cache_config c;
    c.num_layers = layers, c.num_kv_heads = H, c.head_dim = D, c.page_size = P, c.max_pages = 1 << 14;
    c.key_bounds = true;
    return c;
  }
  /// Appends n random tokens to a layer; keys of each page get a per-page offset so that pages
  /// differ in what they can score (a uniform cloud would make every bound alike).
  void append(std::int32_t layer, std::int32_t n) {
    const std::int32_t H = cfg.num_kv_heads, D = cfg.head_dim;
    std::normal_distribution<float> nd;
    std::vector<float> k(static_cast<std::size_t>(n) * H * D), v(k.size());
    for (std::int32_t i = 0; i < n; ++i)
      for (std::int32_t h = 0; h < H; ++h) {
        const float shift = nd(g);  // one per token and head: bounds then spread between pages
        for (std::int32_t d = 0; d < D; ++d) {
          const std::size_t at = (static_cast<std::size_t>(i) * H + h) * D + d;
          k[at] = nd(g) + ((d % 3 == 0) ? shift : 0.0f);
          v[at] = nd(g);
        }
      }
    cache.append(s, layer, k.data(), v.data(), n);
    for (std::int32_t i = 0; i < n; ++i)
      for (std::int32_t h = 0; h < H; ++h)
        for (std::int32_t d = 0; d < D; ++d) {
          const std::size_t at = (static_cast<std::size_t>(i) * H + h) * D + d;
          m.k[layer][h].push_back(round_to<T>(k[at]));
          m.v[layer][h].push_back(round_to<T>(v[at]));
        }
  }
  /// Keeps the first n tokens of every head of a layer.
  void keep_prefix(std::int32_t layer, std::int32_t n) {
    const std::int32_t H = cfg.num_kv_heads, D = cfg.head_dim;
    std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(H));
    for (std::int32_t h = 0; h < H; ++h) {
      for (std::int32_t t = 0; t < std::min(n, cache.length(s, layer, h)); ++t) kept[static_cast<std::size_t>(h)].push_back(t);
      m.k[layer][h].resize(kept[static_cast<std::size_t>(h)].size() * D);
      m.v[layer][h].resize(kept[static_cast<std::size_t>(h)].size() * D);
    }
    cache.keep_layer(s, layer, kept);
  }
  /// Keeps a random subset (about `frac` of the tokens) of every head of a layer.
  void keep_random(std::int32_t layer, double frac) {
    const std::int32_t H = cfg.num_kv_heads, D = cfg.head_dim;
    std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(H));
    std::uniform_real_distribution<double> u(0, 1);
    for (std::int32_t h = 0; h < H; ++h) {
      const std::int32_t L = cache.length(s, layer, h);
      for (std::int32_t t = 0; t < L; ++t)
        if (u(g) < frac) kept[static_cast<std::size_t>(h)].push_back(t);
    }
    cache.keep_layer(s, layer, kept);
    for (std::int32_t h = 0; h < H; ++h) {
      std::vector<float> nk, nv;
      for (std::int32_t t : kept[static_cast<std::size_t>(h)]) {
        nk.insert(nk.end(), m.k[layer][h].begin() + t * D, m.k[layer][h].begin() + (t + 1) * D);
        nv.insert(nv.end(), m.v[layer][h].begin() + t * D, m.v[layer][h].begin() + (t + 1) * D);
      }
      m.k[layer][h].swap(nk);
      m.v[layer][h].swap(nv);
    }
  }
};

/// Every page's stored bounds equal the min and max of the model's rows on that page.
template <class T>
void check_bounds(const fixture<T>& f, std::int32_t layer) {
  const std::int32_t P = f.cfg.page_size, D = f.cfg.head_dim;
  for (std::int32_t h = 0; h < f.cfg.num_kv_heads; ++h) {
    const auto& rows = f.m.k[layer][h];
    const std::int32_t L = static_cast<std::int32_t>(rows.size() / D);
    REQUIRE(f.cache.length(f.s, layer, h) == L);
    REQUIRE(static_cast<std::int32_t>(f.cache.pages(f.s, layer, h).size()) == (L + P - 1) / P);
    for (std::int32_t pg = 0; pg * P < L; ++pg) {
      const T* b = f.cache.key_bounds(f.s, layer, h) + static_cast<std::size_t>(pg) * 2 * D;
      for (std::int32_t d = 0; d < D; ++d) {
        double lo = std::numeric_limits<double>::infinity(), hi = -lo;
        for (std::int32_t t = pg * P; t < std::min(L, (pg + 1) * P); ++t) {
          lo = std::min(lo, double(rows[static_cast<std::size_t>(t) * D + d]));
          hi = std::max(hi, double(rows[static_cast<std::size_t>(t) * D + d]));
        }
        INFO("head " << h << " page " << pg << " channel " << d);
        REQUIRE(double(static_cast<float>(b[d])) == lo);
        REQUIRE(double(static_cast<float>(b[D + d])) == hi);
      }
    }
  }
}

/// Bound of one page in double from the model's rows: max over the group of Σ_d max(q m, q M).
double ref_bound(const std::vector<float>& rows, std::int32_t t0, std::int32_t t1, const float* q, std::int32_t G,
                 std::int32_t D) {
  double best = -std::numeric_limits<double>::infinity();
  for (std::int32_t gi = 0; gi < G; ++gi) {
    double s = 0;
    for (std::int32_t d = 0; d < D; ++d) {
      double lo = std::numeric_limits<double>::infinity(), hi = -lo;
      for (std::int32_t t = t0; t < t1; ++t) {
        lo = std::min(lo, double(rows[static_cast<std::size_t>(t) * D + d]));
        hi = std::max(hi, double(rows[static_cast<std::size_t>(t) * D + d]));
      }
      const double qd = q[static_cast<std::size_t>(gi) * D + d];
      s += std::max(qd * lo, qd * hi);
    }
    best = std::max(best, s);
  }
  return best;
}

/// Softmax attention in double of G query heads over the given tokens of one head.
void ref_attend(const std::vector<float>& K, const std::vector<float>& V, const std::vector<std::int32_t>& tokens,
                const float* q, std::int32_t G, std::int32_t D, double scale, std::vector<double>& out,
                std::vector<double>& lse) {
  out.assign(static_cast<std::size_t>(G) * D, 0.0);
  lse.assign(static_cast<std::size_t>(G), -std::numeric_limits<double>::infinity());
  for (std::int32_t gi = 0; gi < G; ++gi) {
    std::vector<double> s;
    double mx = -std::numeric_limits<double>::infinity();
    for (std::int32_t t : tokens) {
      double x = 0;
      for (std::int32_t d = 0; d < D; ++d)
        x += double(q[static_cast<std::size_t>(gi) * D + d]) * K[static_cast<std::size_t>(t) * D + d];
      s.push_back(x * scale);
      mx = std::max(mx, s.back());
    }
    if (tokens.empty()) continue;
    double z = 0;
    for (double& x : s) z += (x = std::exp(x - mx));
    for (std::size_t i = 0; i < tokens.size(); ++i)
      for (std::int32_t d = 0; d < D; ++d)
        out[static_cast<std::size_t>(gi) * D + d] += s[i] / z * V[static_cast<std::size_t>(tokens[i]) * D + d];
    lse[static_cast<std::size_t>(gi)] = mx + std::log(z);
  }
}

std::vector<float> random_q(std::int32_t n, std::mt19937& g) {
  std::normal_distribution<float> nd;
  std::vector<float> q(static_cast<std::size_t>(n));
  for (float& x : q) x = nd(g);
  return q;
}

/// Selection and attention of one layer against the model.
template <class T>
void check_quest(fixture<T>& f, std::int32_t layer, std::int32_t G, const quest_options& qo,
                 kvc::thread_pool* pool = nullptr) {
  const std::int32_t H = f.cfg.num_kv_heads, D = f.cfg.head_dim, P = f.cfg.page_size;
  const std::vector<float> q = random_q(H * G * D, f.g);
  const double scale = 1.0 / std::sqrt(double(D));
  std::vector<float> out(q.size()), lse(static_cast<std::size_t>(H * G));
  kvc::decode_options opt;
  opt.lse = lse.data();
  opt.pool = pool;
  kvc::cpu::quest_decode_attention(f.cache, f.s, layer, q.data(), H * G, out.data(), qo, opt);
  const std::int32_t budget_pages = qo.token_budget / P;
  for (std::int32_t h = 0; h < H; ++h) {
    const float* qh = q.data() + static_cast<std::size_t>(h) * G * D;
    const auto& rows = f.m.k[layer][h];
    const std::int32_t L = static_cast<std::int32_t>(rows.size() / D), n = (L + P - 1) / P;
    std::vector<float> got_bounds;
    const auto chosen = kvc::cpu::quest_select(f.cache, f.s, layer, h, qh, G, qo, &got_bounds);
    REQUIRE(static_cast<std::int32_t>(got_bounds.size()) == n);
    std::vector<double> ref(static_cast<std::size_t>(n));
    double most = 0;
    for (std::int32_t pg = 0; pg < n; ++pg) {
      ref[static_cast<std::size_t>(pg)] = ref_bound(rows, pg * P, std::min(L, (pg + 1) * P), qh, G, D);
      most = std::max(most, std::abs(ref[static_cast<std::size_t>(pg)]));
    }
    const double tol = 1e-5 * (1 + most) * std::sqrt(double(D));
    // The bounds the code computed bound: no key of a page scores above its bound for any head
    // of the group (up to float rounding).
    for (std::int32_t pg = 0; pg < n; ++pg)
      for (std::int32_t t = pg * P; t < std::min(L, (pg + 1) * P); ++t)
        for (std::int32_t gi = 0; gi < G; ++gi) {
          double x = 0;
          for (std::int32_t d = 0; d < D; ++d)
            x += double(qh[static_cast<std::size_t>(gi) * D + d]) * rows[static_cast<std::size_t>(t) * D + d];
          REQUIRE(x <= double(got_bounds[static_cast<std::size_t>(pg)]) + tol);
        }
    for (std::int32_t pg = 0; pg < n; ++pg)
      REQUIRE(std::abs(double(got_bounds[static_cast<std::size_t>(pg)]) - ref[static_cast<std::size_t>(pg)]) <= tol);
    // The chosen set: everything when the stream fits, else sinks + newest + the best bounds.
    REQUIRE(std::is_sorted(chosen.begin(), chosen.end()));
    if (n <= budget_pages) {
      REQUIRE(static_cast<std::int32_t>(chosen.size()) == n);
    } else {
      REQUIRE(static_cast<std::int32_t>(chosen.size()) == budget_pages);
      std::vector<char> in(static_cast<std::size_t>(n), 0);
      for (std::int32_t i : chosen) in[static_cast<std::size_t>(i)] = 1;
      for (std::int32_t i = 0; i < qo.sink_pages; ++i) REQUIRE(in[static_cast<std::size_t>(i)]);
      for (std::int32_t i = n - qo.recent_pages; i < n; ++i) REQUIRE(in[static_cast<std::size_t>(i)]);
      // Middle pages: every chosen bound >= every unchosen one (up to float rounding).
      double lowest_in = std::numeric_limits<double>::infinity(), highest_out = -lowest_in;
      for (std::int32_t i = qo.sink_pages; i < n - qo.recent_pages; ++i) {
        const double b = ref[static_cast<std::size_t>(i)];
        if (in[static_cast<std::size_t>(i)])
          lowest_in = std::min(lowest_in, b);
        else
          highest_out = std::max(highest_out, b);
      }
      REQUIRE(lowest_in >= highest_out - 2 * tol);
    }
    // Attention over the chosen pages' tokens.
    std::vector<std::int32_t> tokens;
    for (std::int32_t pg : chosen)
      for (std::int32_t t = pg * P; t < std::min(L, (pg + 1) * P); ++t) tokens.push_back(t);
    std::vector<double> ro, rl;
    ref_attend(rows, f.m.v[layer][h], tokens, qh, G, D, scale, ro, rl);
    for (std::int32_t gi = 0; gi < G; ++gi) {
      const std::size_t qi = static_cast<std::size_t>(h * G + gi);
      if (tokens.empty()) continue;
      REQUIRE(std::abs(double(lse[qi]) - rl[static_cast<std::size_t>(gi)]) <= 1e-4 * (1 + std::abs(rl[gi])));
      for (std::int32_t d = 0; d < D; ++d)
        REQUIRE(std::abs(double(out[qi * D + d]) - ro[static_cast<std::size_t>(gi) * D + d]) <= 2e-4);
    }
  }
}

template <class T>
void run_shapes() {
  struct shape {
    std::int32_t H, G, D, P;
  };
  const shape shapes[] = {{2, 4, 64, 16}, {1, 1, 40, 8}, {3, 2, 72, 4}, {2, 8, 128, 16}, {1, 3, 24, 32}};
  std::uint32_t seed = 11;
  for (const shape& sh : shapes) {
    INFO("H " << sh.H << " G " << sh.G << " D " << sh.D << " P " << sh.P);
    fixture<T> f(2, sh.H, sh.D, sh.P, seed++);
    // Appends of ragged sizes (decode steps among them), so pages fill across calls.
    for (std::int32_t n : {1, 5, sh.P, 3 * sh.P + 1, 1, 1, 7 * sh.P - 2}) f.append(0, n);
    f.append(1, 2 * sh.P + 3);
    check_bounds(f, 0);
    check_bounds(f, 1);
    const std::int32_t L = f.cache.length(f.s, 0, 0);
    for (std::int32_t budget_pages : {2, 3, 5, (L + sh.P - 1) / sh.P + 1}) {
      quest_options qo;
      qo.token_budget = budget_pages * sh.P + (budget_pages % 2);  // not a page multiple: rounded down
      INFO("budget pages " << budget_pages);
      check_quest(f, 0, sh.G, qo);
      check_quest(f, 1, sh.G, qo);
    }
    quest_options wide;
    wide.token_budget = 6 * sh.P, wide.sink_pages = 2, wide.recent_pages = 2;
    check_quest(f, 0, sh.G, wide);
    // Eviction compacts pages and leaves partial ones: their bounds are rebuilt.
    f.keep_random(0, 0.6);
    check_bounds(f, 0);
    check_quest(f, 0, sh.G, wide);
    f.append(0, sh.P + 2);  // appends after a keep fill the partial last page
    check_bounds(f, 0);
    // A keep that drops only the newest rows leaves the earlier rows of their page in place:
    // the page still needs bounds over the rows it has left.
    f.keep_prefix(0, f.cache.length(f.s, 0, 0) - sh.P / 2 - 1);
    check_bounds(f, 0);
    kvc::thread_pool pool(2);
    check_quest(f, 0, sh.G, wide, &pool);
  }
}

}  // namespace

TEST_CASE("quest: page bounds, selection and attention against the double reference (float pages)") {
  run_shapes<float>();
}

TEST_CASE("quest: page bounds, selection and attention against the double reference (fp16 pages)") {
  run_shapes<kvc::half>();
}

TEST_CASE("quest: bounds stay exact through fork, copy-on-write and key rewrites") {
  fixture<kvc::half> f(1, 2, 32, 8, 5);
  f.append(0, 21);
  const seq_id child = f.cache.fork(f.s);
  // The child's append copies the shared partial page; the parent's bounds must not move.
  std::vector<float> k(2 * 32, 9.0f), v(2 * 32, 0.0f);
  f.cache.append(child, 0, k.data(), v.data(), 1);
  check_bounds(f, 0);
  const std::size_t last = f.cache.pages(child, 0, 0).size() - 1;
  const kvc::half* b = f.cache.key_bounds(child, 0, 0) + last * 2 * 32;
  for (std::int32_t d = 0; d < 32; ++d) REQUIRE(static_cast<float>(b[32 + d]) == 9.0f);
  // A key rewrite (StreamingLLM's re-rotation uses it) changes rows in place: bounds follow.
  f.cache.rewrite_keys(f.s, 0, 1, [](std::int32_t t, kvc::half* row) {
    if (t == 3) row[0] = kvc::half(-50.0f);
  });
  f.m.k[0][1][3 * 32] = -50.0f;
  check_bounds(f, 0);
  // The child still reads its own bounds over shared full pages.
  const kvc::half* c0 = f.cache.key_bounds(child, 0, 1);
  REQUIRE(static_cast<float>(c0[0]) > -50.0f);
}

TEST_CASE("quest: the bounds' bytes are counted in metadata_bytes, fork included") {
  for (std::int32_t D : {64, 40}) {
    cache_config c;
    c.num_layers = 2, c.num_kv_heads = 3, c.head_dim = D, c.page_size = 16, c.max_pages = 256;
    kv_cache<kvc::half> plain(c);
    c.key_bounds = true;
    kv_cache<kvc::half> bounded(c);
    const std::vector<float> kv(static_cast<std::size_t>(37) * 3 * D, 0.25f);
    const seq_id a = plain.add_sequence(), b = bounded.add_sequence();
    plain.append(a, 1, kv.data(), kv.data(), 37);
    bounded.append(b, 1, kv.data(), kv.data(), 37);
    const std::size_t pages = 3 * 3;  // 37 tokens in 16-token pages, 3 heads
    REQUIRE(bounded.metadata_bytes() == plain.metadata_bytes() + pages * 2 * D * sizeof(kvc::half));
    REQUIRE(bounded.bytes_in_use() == plain.bytes_in_use());  // pages are unchanged
    bounded.fork(b);
    plain.fork(a);
    REQUIRE(bounded.metadata_bytes() == plain.metadata_bytes() + 2 * pages * 2 * D * sizeof(kvc::half));
  }
}

TEST_CASE("quest: bad input is refused with the argument named") {
  fixture<float> f(1, 2, 16, 4, 3);
  f.append(0, 30);
  const std::vector<float> q(2 * 2 * 16, 0.5f);
  std::vector<float> out(q.size());
  quest_options qo;
  qo.token_budget = 7;  // one page of 4: less than sink + recent
  REQUIRE_THROWS_WITH(kvc::cpu::quest_decode_attention(f.cache, f.s, 0, q.data(), 4, out.data(), qo),
                      Contains("quest_options.token_budget = 7") && Contains("expected >= (sink_pages"));
  qo = {};
  qo.recent_pages = 0;
  REQUIRE_THROWS_WITH(kvc::cpu::quest_decode_attention(f.cache, f.s, 0, q.data(), 4, out.data(), qo),
                      Contains("quest_options.recent_pages = 0"));
  qo = {};
  std::vector<float> probs(64);
  kvc::decode_options opt;
  opt.probs = probs.data(), opt.probs_stride = 32;
  REQUIRE_THROWS_WITH(kvc::cpu::quest_decode_attention(f.cache, f.s, 0, q.data(), 4, out.data(), qo, opt),
                      Contains("decode_options.probs/group_probs are set"));
  REQUIRE_THROWS_WITH(kvc::cpu::quest_decode_attention(f.cache, f.s, 0, q.data(), 3, out.data(), qo),
                      Contains("num_q_heads = 3"));
  REQUIRE_THROWS_WITH(kvc::cpu::quest_decode_attention(f.cache, 99, 0, q.data(), 4, out.data(), qo),
                      Contains("seq = 99"));
  std::vector<float> bad = q;
  bad[5] = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_WITH(kvc::cpu::quest_decode_attention(f.cache, f.s, 0, bad.data(), 4, out.data(), qo),
                      Contains("q[5] = nan"));
  cache_config c = f.cfg;
  c.key_bounds = false;
  kv_cache<float> plain(c);
  const seq_id s = plain.add_sequence();
  std::vector<float> kv(2 * 16, 1.0f);
  plain.append(s, 0, kv.data(), kv.data(), 1);
  REQUIRE_THROWS_WITH(kvc::cpu::quest_decode_attention(plain, s, 0, q.data(), 4, out.data(), qo),
                      Contains("cache_config.key_bounds = false"));
  REQUIRE_THROWS_WITH(plain.key_bounds(s, 0, 0), Contains("key_bounds = false"));
  REQUIRE_THROWS_WITH(f.cache.key_bounds(f.s, 0, 2), Contains("head = 2"));
}

TEST_CASE("quest: equal bounds go to the earlier pages") {
  // Every key alike: every page has the same bound, and the budget's middle pages must be the
  // first ones after the sinks (a deterministic choice, whatever the partition does).
  cache_config c;
  c.num_layers = 1, c.num_kv_heads = 1, c.head_dim = 16, c.page_size = 4, c.max_pages = 256, c.key_bounds = true;
  kv_cache<float> cache(c);
  const seq_id s = cache.add_sequence();
  const std::vector<float> kv(static_cast<std::size_t>(4 * 40 + 3) * 16, 0.5f);
  cache.append(s, 0, kv.data(), kv.data(), 4 * 40 + 3);  // 41 pages, the last one partial
  const std::vector<float> q(2 * 16, 1.0f);
  for (std::int32_t sinks : {0, 1, 3}) {
    quest_options qo;
    qo.token_budget = 4 * 9, qo.sink_pages = sinks, qo.recent_pages = 2;
    const auto chosen = kvc::cpu::quest_select(cache, s, 0, 0, q.data(), 2, qo);
    std::vector<std::int32_t> want;
    for (std::int32_t i = 0; i < 9 - 2; ++i) want.push_back(i);  // sinks, then the earliest middle pages
    want.push_back(39), want.push_back(40);
    REQUIRE(chosen == want);
  }
}

namespace {

/// Every page's stored bounds against the min and max of the rows gather() reads back (the
/// pages as stored, whatever wrote them).
template <class T>
void check_bounds_by_gather(const kv_cache<T>& c, seq_id s, std::int32_t layer) {
  const std::int32_t P = c.config().page_size, D = c.config().head_dim;
  for (std::int32_t h = 0; h < c.config().num_kv_heads; ++h) {
    const std::int32_t L = c.length(s, layer, h);
    std::vector<float> k(static_cast<std::size_t>(L) * D);
    c.gather(s, layer, h, k.data());
    for (std::int32_t pg = 0; pg * P < L; ++pg) {
      const T* b = c.key_bounds(s, layer, h) + static_cast<std::size_t>(pg) * 2 * D;
      for (std::int32_t d = 0; d < D; ++d) {
        float lo = std::numeric_limits<float>::infinity(), hi = -lo;
        for (std::int32_t t = pg * P; t < std::min(L, (pg + 1) * P); ++t)
          lo = std::min(lo, k[static_cast<std::size_t>(t) * D + d]), hi = std::max(hi, k[static_cast<std::size_t>(t) * D + d]);
        INFO("seq " << s << " head " << h << " page " << pg << " channel " << d);
        REQUIRE(static_cast<float>(b[d]) == lo);
        REQUIRE(static_cast<float>(b[D + d]) == hi);
      }
    }
  }
}

}  // namespace

TEST_CASE("quest: bounds follow every mutation path, on shared pages too") {
  fixture<kvc::half> f(1, 2, 24, 4, 21);
  f.append(0, 45);
  auto& c = f.cache;
  const seq_id child = c.fork(f.s);
  // keep on the child: its pages are shared with the parent until written.
  std::vector<std::vector<std::int32_t>> kept(2);
  for (std::int32_t t = 0; t < 45; ++t) {
    if (t % 3 != 1) kept[0].push_back(t);
    if (t < 30 || t % 2 == 0) kept[1].push_back(t);
  }
  c.keep_layer(child, 0, kept);
  check_bounds_by_gather(c, child, 0);
  check_bounds_by_gather(c, f.s, 0);
  // keep_layer_rewrite with a subset of rows (a merge's commit) on pages shared with a new fork.
  const seq_id grandchild = c.fork(child);
  std::vector<std::vector<std::int32_t>> all(2), rows(2);
  for (std::int32_t h = 0; h < 2; ++h) {
    for (std::int32_t i = 0; i < c.length(grandchild, 0, h); ++i) all[static_cast<std::size_t>(h)].push_back(i);
    rows[static_cast<std::size_t>(h)] = {1, 9};
  }
  c.keep_layer_rewrite(grandchild, 0, all, [](std::int32_t, std::int32_t i, kvc::half* k, kvc::half* v) {
    k[3] = kvc::half(i == 1 ? 30.0f : -30.0f);
    v[0] = kvc::half(1.0f);
  }, &rows);
  check_bounds_by_gather(c, grandchild, 0);
  check_bounds_by_gather(c, child, 0);
  // keep_layer_rewrite_keys (StreamingLLM's re-rotation after eviction).
  std::vector<std::vector<std::int32_t>> first(2);
  for (std::int32_t h = 0; h < 2; ++h)
    for (std::int32_t i = 0; i < 13; ++i) first[static_cast<std::size_t>(h)].push_back(2 * i);
  c.keep_layer_rewrite_keys(child, 0, first, [](std::int32_t h, std::int32_t i, kvc::half* k) {
    k[0] = kvc::half(static_cast<float>(h * 100 + i));
  });
  check_bounds_by_gather(c, child, 0);
  check_bounds_by_gather(c, grandchild, 0);
  // Appends after all of it fill the partial pages.
  std::vector<float> kv(7 * 2 * 24, -3.0f);
  for (seq_id s : {f.s, child, grandchild}) {
    c.append(s, 0, kv.data(), kv.data(), 7);
    check_bounds_by_gather(c, s, 0);
  }
  // Down to nothing and back.
  c.keep_layer(child, 0, {{}, {}});
  REQUIRE(c.pages(child, 0, 0).empty());
  c.append(child, 0, kv.data(), kv.data(), 5);
  check_bounds_by_gather(c, child, 0);
}

TEST_CASE("quest: ties among bounds above the threshold go to the earlier pages") {
  // Pages 2, 5 and 7 clearly above the rest, and pages 1, 3, 4, 6, 8 tied below them: a budget
  // of 1 sink + 1 recent + 5 middle pages takes 2, 5, 7 and the two earliest tied pages.
  cache_config c;
  c.num_layers = 1, c.num_kv_heads = 1, c.head_dim = 8, c.page_size = 4, c.max_pages = 64, c.key_bounds = true;
  kv_cache<float> cache(c);
  const seq_id s = cache.add_sequence();
  const std::int32_t pages = 10;
  std::vector<float> k(static_cast<std::size_t>(pages) * 4 * 8, 0.5f), v(k.size(), 0.0f);
  for (std::int32_t p : {2, 5, 7})
    for (std::int32_t t = 0; t < 4; ++t) k[static_cast<std::size_t>(p * 4 + t) * 8] = 5.0f + static_cast<float>(p);
  cache.append(s, 0, k.data(), v.data(), pages * 4);
  const std::vector<float> q(8, 1.0f);
  quest_options qo;
  qo.token_budget = 4 * 7;
  const auto chosen = kvc::cpu::quest_select(cache, s, 0, 0, q.data(), 1, qo);
  REQUIRE(chosen == std::vector<std::int32_t>{0, 1, 2, 3, 5, 7, 9});
}

TEST_CASE("quest: a page whose bound overflows fp16 is read, not dropped") {
  cache_config c;
  c.num_layers = 1, c.num_kv_heads = 1, c.head_dim = 8, c.page_size = 4, c.max_pages = 64, c.key_bounds = true;
  c.check_finite = false;  // a finite float key above fp16's 65504 becomes inf in the page
  kv_cache<kvc::half> cache(c);
  const seq_id s = cache.add_sequence();
  std::vector<float> k(static_cast<std::size_t>(12) * 4 * 8, 0.25f), v(k.size(), 0.0f);
  k[static_cast<std::size_t>(6 * 4) * 8 + 1] = 1e6f;  // page 6, channel 1: +inf as fp16
  k[static_cast<std::size_t>(6 * 4 + 1) * 8 + 1] = -1e6f;  // and -inf: 0 x inf terms, a NaN bound
  cache.append(s, 0, k.data(), v.data(), 12 * 4);
  std::vector<float> q(8, 0.0f);
  q[0] = 1.0f;  // q_1 = 0: the bound's channel 1 term is 0 x inf
  quest_options qo;
  qo.token_budget = 4 * 3;
  std::vector<float> b;
  const auto chosen = kvc::cpu::quest_select(cache, s, 0, 0, q.data(), 1, qo, &b);
  REQUIRE(std::isinf(b[6]));
  REQUIRE(chosen == std::vector<std::int32_t>{0, 6, 11});
}
