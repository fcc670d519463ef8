// SPDX-License-Identifier: Apache-2.0
// compose::stack (kvc/compose/stack.hpp). Each stack is checked two ways:
//  - against the same policies run by hand on their own store (the stack's wiring: the same kept
//    tokens, the same bytes, the same output);
//  - its decode attention against a dense double-precision reference (tests/support/
//    dense_reference.hpp) over the rows the stack should hold. The projecting stage gets rows of
//    rank at most its rank, so whatever basis PCA fits spans them and the rebuilt rows are the
//    appended ones: the reference reads the original rows at the kept positions, independently of
//    the fit.
// And the refusals: an append that cannot fit a basis leaves the stack exactly as it was.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <kvc/compose/projecting.hpp>
#include <kvc/compose/stack.hpp>
#include <kvc/evict/snapkv.hpp>
#include <kvc/quant/int8.hpp>

#include "cache_builders.hpp"
#include "dense_reference.hpp"
#include "kvc_catch.hpp"
#include "random.hpp"

namespace {

namespace cs = kvc::compose;
using Catch::Contains;

/// [n][H][D] rows of rank at most r per head: x_t = sum_j a_tj b_j with head h's own r directions b_j.
std::vector<float> low_rank_rows(kvc_test::rng& g, std::int32_t n, std::int32_t H, std::int32_t D, std::int32_t r) {
  std::vector<float> x(static_cast<std::size_t>(n) * H * D, 0.0f);
  for (std::int32_t h = 0; h < H; ++h) {
    const std::vector<float> b = g.normals(static_cast<std::size_t>(r) * D);
    for (std::int32_t t = 0; t < n; ++t)
      for (std::int32_t j = 0; j < r; ++j) {
        const float a = g.normal();
        for (std::int32_t d = 0; d < D; ++d)
          x[(static_cast<std::size_t>(t) * H + h) * D + d] += a * b[static_cast<std::size_t>(j) * D + d] / std::sqrt(float(D));
      }
  }
  return x;
}

/// Two layers of H kv heads of D, 16-token pages (a quant_cache_config: every stack takes one).
kvc::quant_cache_config shape(std::int32_t H, std::int32_t D) {
  return kvc_test::shape_as<kvc::quant_cache_config>(kvc_test::cache_shape(2, H, D, 16, 4096));
}

/// The dense heads of one layer: the original rows at the positions each stream keeps.
template <class Store>
std::vector<kvc_test::dense_head> kept_rows(const Store& st, kvc::seq_id s, std::int32_t layer, const std::vector<float>& k,
                                            const std::vector<float>& v, std::int32_t H, std::int32_t D) {
  std::vector<kvc_test::dense_head> heads(static_cast<std::size_t>(H));
  for (std::int32_t h = 0; h < H; ++h) {
    auto& dh = heads[static_cast<std::size_t>(h)];
    dh.n = st.length(s, layer, h);
    const std::int32_t* pos = st.positions(s, layer, h);
    for (std::int32_t t = 0; t < dh.n; ++t)
      for (std::int32_t d = 0; d < D; ++d) {
        const std::size_t i = (static_cast<std::size_t>(pos[t]) * H + h) * D + d;
        dh.k.push_back(k[i]);
        dh.v.push_back(v[i]);
      }
  }
  return heads;
}

/// SnapKV over a window of W queries qw ([W][Q][D]) at target b: the scorer, the compressor options
/// and the observations a stack's compress and a compressor by hand both take.
struct snap_setup {
  kvc::evict::query_window win;
  kvc::evict::observations obs;
  kvc::evict::snapkv scorer;
  kvc::evict::compressor_options co;
  snap_setup(const std::vector<float>& qw, std::int32_t W, std::int32_t Q, std::int32_t D, kvc::budget b)
      : win{qw.data(), nullptr, W, Q, D} {
    obs.window = &win;
    kvc::evict::snapkv_params sp;
    sp.window = W;
    scorer = kvc::evict::snapkv(sp);
    co.target = b;
    co.num_q_heads = Q;
  }
  snap_setup(const snap_setup&) = delete;  // obs points at win
  cs::evicting<kvc::evict::snapkv> stage() const { return {scorer, co}; }
  kvc::evict::compressor<kvc::evict::snapkv> compressor() const { return kvc::evict::compressor<kvc::evict::snapkv>(scorer, co); }
};

double max_abs_diff(const std::vector<float>& a, const std::vector<double>& ref) {
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(double(a[i]) - ref[i]));
  return m;
}

}  // namespace

TEST_CASE("stack<projecting<pca>>: rebuilt rows and decode against the dense double reference", "[compose]") {
  struct shape_case {
    std::int32_t H, G, D, r, rv, n;
  };
  const shape_case cases[] = {{2, 2, 32, 8, 0, 40}, {3, 1, 64, 16, 24, 100}, {1, 4, 48, 5, 7, 17}, {4, 2, 128, 32, 0, 300}};
  kvc_test::rng g(101);
  for (const auto& sc : cases) {
    CAPTURE(sc.H, sc.G, sc.D, sc.r, sc.rv, sc.n);
    using S = cs::stack<cs::projecting<cs::pca>, cs::full_precision<float>>;
    static_assert(std::is_same<S::store_type, kvc::lowrank::projected_cache<float>>::value, "the store of a projection");
    cs::pca m;
    m.rank = sc.r;
    m.value_rank = sc.rv;
    S st(shape(sc.H, sc.D), cs::projecting<cs::pca>{m}, cs::full_precision<float>{});
    const std::int32_t rv = sc.rv ? sc.rv : sc.r;
    const std::vector<float> k = low_rank_rows(g, sc.n + 1, sc.H, sc.D, sc.r), v = low_rank_rows(g, sc.n + 1, sc.H, sc.D, rv);
    const kvc::seq_id s = st.add_sequence();
    for (std::int32_t layer = 0; layer < 2; ++layer) {
      st.append(s, layer, k.data(), v.data(), sc.n);  // fits the layer's bases
      REQUIRE(st.store().has_basis(layer, sc.H - 1));
      // A later append is projected on the same bases (the rows' span does not change).
      const std::size_t row = static_cast<std::size_t>(sc.H) * sc.D;
      st.append(s, layer, k.data() + sc.n * row, v.data() + sc.n * row, 1);
      std::vector<float> kg(static_cast<std::size_t>(sc.n + 1) * sc.D), vg(kg.size());
      double scale = 0;
      for (float x : k) scale = std::max(scale, double(std::abs(x)));
      for (std::int32_t h = 0; h < sc.H; ++h) {
        st.store().gather(s, layer, h, kg.data(), vg.data());
        for (std::int32_t t = 0; t <= sc.n; ++t)
          for (std::int32_t d = 0; d < sc.D; ++d) {
            const std::size_t i = (static_cast<std::size_t>(t) * sc.H + h) * sc.D + d, o = static_cast<std::size_t>(t) * sc.D + d;
            REQUIRE(std::abs(kg[o] - k[i]) <= 2e-4 * scale);
            REQUIRE(std::abs(vg[o] - v[i]) <= 2e-4 * scale);
          }
      }
      // Bytes: the pool's pages of w = r_k + r_v (rounded up to even) floats per token and head.
      const std::int32_t w = (sc.r + rv + 1) / 2 * 2;
      const std::int32_t pages = (sc.n + 1 + 15) / 16;
      CHECK(st.store().bytes_in_use(layer) == static_cast<std::size_t>(sc.H) * pages * 16 * w * sizeof(float));
      const std::int32_t Q = sc.H * sc.G;
      const std::vector<float> q = g.normals(static_cast<std::size_t>(Q) * sc.D);
      std::vector<float> out(q.size());
      st.decode_attention(s, layer, q.data(), Q, out.data());
      const auto ref = kvc_test::dense_decode_attention(kept_rows(st.store(), s, layer, k, v, sc.H, sc.D), sc.D, q.data(), Q,
                                                        1.0 / std::sqrt(double(sc.D)));
      CHECK(max_abs_diff(out, ref.out) <= 1e-3);
    }
    st.remove_sequence(s);
    CHECK(st.bytes_in_use() == 0);
  }
}

TEST_CASE("stack<evicting<snapkv>, projecting<pca>>: the same tokens as SnapKV by hand, attention over them", "[compose]") {
  const std::int32_t H = 2, G = 4, D = 64, r = 16, n = 256, W = 16, Q = H * G;
  kvc_test::rng g(202);
  const std::vector<float> k = low_rank_rows(g, n, H, D, r), v = low_rank_rows(g, n, H, D, r);
  std::vector<float> qw = g.normals(static_cast<std::size_t>(W) * Q * D);
  // Window queries near a few keys, so the scores are far from ties.
  for (std::int32_t i = 0; i < W; ++i)
    for (std::int32_t qh = 0; qh < Q; ++qh)
      for (std::int32_t d = 0; d < D; ++d)
        qw[(static_cast<std::size_t>(i) * Q + qh) * D + d] += 3.0f * k[(static_cast<std::size_t>(17 * (qh + 1) % n) * H + qh / G) * D + d];
  const snap_setup snap(qw, W, Q, D, kvc::budget::ratio(0.5));
  const kvc::evict::observations& obs = snap.obs;
  cs::pca m;
  m.rank = r;

  using S = cs::stack<cs::evicting<kvc::evict::snapkv>, cs::projecting<cs::pca>, cs::full_precision<float>>;
  S st(shape(H, D), snap.stage(), cs::projecting<cs::pca>{m}, cs::full_precision<float>{});
  const kvc::seq_id s = st.add_sequence();
  st.append(s, 0, k.data(), v.data(), n);
  const std::size_t before = st.bytes_in_use();
  const auto rep = st.compress(s, 0, obs);
  CHECK(rep.compressed);
  CHECK(rep.tokens_after == H * n / 2);
  CHECK(st.bytes_in_use() < before);

  // By hand: the same store, bases and compressor.
  kvc::lowrank::projected_config pc;
  pc.num_layers = 2;
  pc.num_kv_heads = H;
  pc.head_dim = D;
  pc.rank = r;
  pc.page_size = 16;
  kvc::lowrank::projected_cache<float> twin(pc);
  const kvc::seq_id t = twin.add_sequence();
  twin.fit_layer(0, k.data(), v.data(), n);
  twin.append(t, 0, k.data(), v.data(), n);
  snap.compressor().after_prefill(twin, t, 0, obs);
  for (std::int32_t h = 0; h < H; ++h) {
    REQUIRE(st.store().length(s, 0, h) == twin.length(t, 0, h));
    const std::int32_t* a = st.store().positions(s, 0, h);
    const std::int32_t* b = twin.positions(t, 0, h);
    CHECK(std::vector<std::int32_t>(a, a + twin.length(t, 0, h)) == std::vector<std::int32_t>(b, b + twin.length(t, 0, h)));
  }
  CHECK(st.bytes_in_use() == twin.bytes_in_use());

  // SnapKV over the rebuilt rows keeps what it keeps over the original rows (the rows agree to
  // float rounding and the window makes the scores far from ties): against a float kv_cache.
  using F = cs::stack<cs::evicting<kvc::evict::snapkv>, cs::full_precision<float>>;
  F fp(shape(H, D), snap.stage(), cs::full_precision<float>{});
  const kvc::seq_id f = fp.add_sequence();
  fp.append(f, 0, k.data(), v.data(), n);
  fp.compress(f, 0, obs);
  std::int32_t same = 0, total = 0;
  for (std::int32_t h = 0; h < H; ++h) {
    const std::int32_t* a = st.store().positions(s, 0, h);
    const std::int32_t* b = fp.store().positions(f, 0, h);
    const std::int32_t L = fp.store().length(f, 0, h);
    for (std::int32_t i = 0; i < L; ++i) same += std::binary_search(a, a + st.store().length(s, 0, h), b[i]);
    total += L;
  }
  CHECK(same >= total - 2);

  const std::vector<float> q = g.normals(static_cast<std::size_t>(Q) * D);
  std::vector<float> out(q.size());
  st.decode_attention(s, 0, q.data(), Q, out.data());
  const auto ref = kvc_test::dense_decode_attention(kept_rows(st.store(), s, 0, k, v, H, D), D, q.data(), Q, 1.0 / std::sqrt(double(D)));
  CHECK(max_abs_diff(out, ref.out) <= 1e-3);
}

TEST_CASE("stack<projecting<pca>>: a refused first append leaves the stack unchanged", "[compose]") {
  const std::int32_t H = 2, D = 32;
  kvc_test::rng g(303);
  cs::pca m;
  m.rank = 8;
  m.value_rank = 12;
  using S = cs::stack<cs::projecting<cs::pca>, cs::full_precision<kvc::half>>;
  S st(shape(H, D), cs::projecting<cs::pca>{m}, cs::full_precision<kvc::half>{});
  const kvc::seq_id s = st.add_sequence();
  std::vector<float> k = low_rank_rows(g, 20, H, D, 8), v = low_rank_rows(g, 20, H, D, 12);
  auto unchanged = [&] {
    CHECK(st.bytes_in_use() == 0);
    CHECK_FALSE(st.store().has_basis(0, 0));
    CHECK_FALSE(st.store().has_basis(0, H - 1));
    CHECK(st.store().length(s, 0, 0) == 0);
  };
  // Fewer tokens than the larger rank span too few directions.
  CHECK_THROWS_WITH(st.append(s, 0, k.data(), v.data(), 11), Contains("n = 11") && Contains("max(rank, vrank) = 12"));
  unchanged();
  // A non-finite row in the last head: no head keeps a basis.
  k[(static_cast<std::size_t>(5) * H + H - 1) * D + 3] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH(st.append(s, 0, k.data(), v.data(), 20), Contains("finite"));
  unchanged();
  k[(static_cast<std::size_t>(5) * H + H - 1) * D + 3] = 0.5f;
  // An unknown sequence.
  CHECK_THROWS_WITH(st.append(s + 7, 0, k.data(), v.data(), 20), Contains("is not a live sequence"));
  unchanged();
  // A coefficient past fp16's range: fitted, then refused by the fp16 pages, and the bases go.
  std::vector<float> big = k;
  for (std::size_t i = 0; i < 4 * static_cast<std::size_t>(H) * D; ++i) big[i] *= 1e6f;
  CHECK_THROWS_WITH(st.append(s, 0, big.data(), v.data(), 20), Contains("65504"));
  unchanged();
  st.append(s, 0, k.data(), v.data(), 20);
  CHECK(st.store().has_basis(0, H - 1));
  CHECK(st.store().length(s, 0, 0) == 20);
}

TEST_CASE("stack<evicting<snapkv>, encoding<int8>>: SnapKV's selection applied to int8 pages", "[compose]") {
  // The stack's eviction runs the compressor on the store; by hand on a twin store, the same.
  const std::int32_t H = 2, G = 2, D = 32, n = 96, W = 8, Q = H * G;
  kvc_test::rng g(404);
  const std::vector<float> k = g.normals(static_cast<std::size_t>(n) * H * D), v = g.normals(k.size());
  const std::vector<float> qw = g.normals(static_cast<std::size_t>(W) * Q * D);
  const snap_setup snap(qw, W, Q, D, kvc::budget::tokens(40));
  const kvc::evict::observations& obs = snap.obs;
  using E = cs::stack<cs::evicting<kvc::evict::snapkv>, cs::encoding<kvc::quant::int8>>;
  static_assert(std::is_same<E::store_type, kvc::quant_cache<kvc::quant::int8, kvc::quant::int8>>::value, "int8 pages");
  E st(shape(H, D), snap.stage(), cs::encoding<kvc::quant::int8>{});
  const kvc::seq_id s = st.add_sequence();
  st.append(s, 0, k.data(), v.data(), n);
  st.compress(s, 0, obs);
  kvc::quant_cache<kvc::quant::int8, kvc::quant::int8> twin(shape(H, D));
  const kvc::seq_id t = twin.add_sequence();
  twin.append(t, 0, k.data(), v.data(), n);
  snap.compressor().after_prefill(twin, t, 0, obs);
  for (std::int32_t h = 0; h < H; ++h) {
    REQUIRE(st.store().length(s, 0, h) == 40);
    const std::int32_t* a = st.store().positions(s, 0, h);
    const std::int32_t* b = twin.positions(t, 0, h);
    CHECK(std::vector<std::int32_t>(a, a + 40) == std::vector<std::int32_t>(b, b + 40));
  }
  CHECK(st.bytes_in_use() == twin.bytes_in_use());
  const std::vector<float> q = g.normals(static_cast<std::size_t>(Q) * D);
  std::vector<float> o1(q.size()), o2(q.size());
  st.decode_attention(s, 0, q.data(), Q, o1.data());
  kvc::cpu::decode_attention(twin, t, 0, q.data(), Q, o2.data());
  CHECK(o1 == o2);
}
