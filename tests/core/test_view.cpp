// SPDX-License-Identifier: Apache-2.0
// Views: every layout reads exactly what a dense [token][head][dim] tensor holds. Paged storage is
// written here from the page-format definitions (slot s of a page, per page order) into a pool
// whose unused elements are NaN, through randomly shuffled page tables; the view must give back
// the dense tensor, and its row runs must agree with element access.

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <kvc/view/engine.hpp>
#include <kvc/view/extents.hpp>
#include <kvc/view/kv_view.hpp>
#include <kvc/view/layout_dense.hpp>
#include <kvc/view/layout_paged.hpp>
#include <kvc/view/layout_sink_window.hpp>

#include "fast_require.hpp"
#include "kvc_catch.hpp"
#include "random.hpp"

namespace {

constexpr float sentinel = std::numeric_limits<float>::quiet_NaN();

/// A dense [n][heads][dim] tensor of distinct random values.
struct dense {
  std::int32_t n, heads, dim;
  std::vector<float> x;
  dense(std::int32_t n_, std::int32_t h_, std::int32_t d_, kvc_test::rng& r)
      : n(n_), heads(h_), dim(d_), x(static_cast<std::size_t>(n_) * h_ * d_) {
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i) + r.uniform(0.0f, 0.5f);
  }
  float operator()(std::int32_t t, std::int32_t h, std::int32_t d) const {
    return x[(static_cast<std::size_t>(t) * heads + h) * dim + d];
  }
};

/// Offset of (slot, head, dim) in one page of P slots, from the page-order definitions.
std::int64_t in_page(kvc::page_order o, std::int32_t P, std::int32_t H, std::int32_t D, std::int32_t s,
                     std::int32_t h, std::int32_t d) {
  switch (o) {
    case kvc::page_order::nhd: return (static_cast<std::int64_t>(s) * H + h) * D + d;
    case kvc::page_order::hnd: return (static_cast<std::int64_t>(h) * P + s) * D + d;
    case kvc::page_order::hdn: return (static_cast<std::int64_t>(h) * D + d) * P + s;
  }
  return -1;
}

/// Writes `src` into page `table[t / P]` of `pool` at slot t % P.
void scatter(const dense& src, kvc::page_order o, std::int32_t P, std::int64_t stride, std::int64_t offset,
             const std::vector<std::int32_t>& table, std::vector<float>& pool) {
  for (std::int32_t t = 0; t < src.n; ++t)
    for (std::int32_t h = 0; h < src.heads; ++h)
      for (std::int32_t d = 0; d < src.dim; ++d)
        pool[static_cast<std::size_t>(table[static_cast<std::size_t>(t / P)] * stride + offset +
                                      in_page(o, P, src.heads, src.dim, t % P, h, d))] = src(t, h, d);
}

/// Every element of v equals the dense tensor.
template <class View>
void require_equal(const View& v, const dense& want) {
  REQUIRE(v.extent(0) == want.n);
  REQUIRE(v.extent(1) == want.heads);
  REQUIRE(v.extent(2) == want.dim);
  for (std::int32_t t = 0; t < want.n; ++t)
    for (std::int32_t h = 0; h < want.heads; ++h)
      for (std::int32_t d = 0; d < want.dim; ++d)
        KVC_REQUIRE(static_cast<float>(v(t, h, d)) == want(t, h, d), "t=" << t << " h=" << h << " d=" << d);
}

/// run(t, h) from every t: its rows are the element offsets of consecutive tokens, it stays in
/// the sequence, and for dim-contiguous layouts a row's dims are consecutive elements.
template <class View>
void require_runs_agree(const View& v) {
  const auto& m = v.mapping();
  for (std::int32_t h = 0; h < v.extent(1); ++h) {
    std::int32_t walked = 0;
    for (std::int32_t t = 0; t < v.extent(0); ++t) {
      const auto r = v.run(t, h);
      KVC_REQUIRE(r.length >= 1, "t=" << t);
      KVC_REQUIRE(t + r.length <= v.extent(0), "t=" << t);
      for (std::int32_t i = 0; i < r.length; ++i) {
        KVC_REQUIRE(m(t + i, h, 0) == r.offset + i * r.token_stride, "t=" << t << " i=" << i);
        if constexpr (View::mapping_type::dim_contiguous)
          for (std::int32_t d = 0; d < v.extent(2); ++d)
            KVC_REQUIRE(&v(t + i, h, d) == v.data_handle() + r.offset + i * r.token_stride + d,
                        "t=" << t << " i=" << i << " d=" << d);
      }
      if (t == walked) walked += r.length;  // runs from run starts tile the sequence
    }
    REQUIRE(walked == v.extent(0));
  }
}

/// Pages for n tokens from a shuffled pool of `pool_pages`, plus the pool, NaN-filled.
struct paged_store {
  std::vector<std::int32_t> table;
  std::vector<float> pool;
};
paged_store make_pages(std::int32_t n, std::int32_t P, std::int64_t stride, std::int32_t extra, kvc_test::rng& r) {
  const std::int32_t pages = (n + P - 1) / P;
  paged_store s;
  s.table = r.permutation(pages + extra);
  s.table.resize(static_cast<std::size_t>(pages));
  s.pool.assign(static_cast<std::size_t>((pages + extra) * stride), sentinel);
  return s;
}

template <kvc::page_order Order, std::size_t StaticP, class Extents>
void check_paged(std::int32_t n, std::int32_t P, Extents ext, bool combined, kvc_test::rng& r) {
  const std::int32_t H = static_cast<std::int32_t>(ext.extent(1)), D = static_cast<std::int32_t>(ext.extent(2));
  const std::int64_t tensor = static_cast<std::int64_t>(P) * H * D;
  const std::int64_t stride = combined ? 2 * tensor : tensor + r.integer(0, 3);  // padded pages too
  auto st = make_pages(n, P, stride, r.integer(0, 4), r);
  const dense k(n, H, D, r), v(n, H, D, r);
  scatter(k, Order, P, stride, 0, st.table, st.pool);
  if (combined) scatter(v, Order, P, stride, tensor, st.table, st.pool);
  using L = kvc::layout_paged<Order, StaticP>;
  using V = kvc::kv_view<const float, Extents, L>;
  using M = typename V::mapping_type;
  const V kv(st.pool.data(), M(ext, st.table.data(), P, static_cast<std::int32_t>(stride), 0));
  REQUIRE(kv.mapping().page_size() == P);
  REQUIRE(kv.mapping().num_pages() == (n + P - 1) / P);
  require_equal(kv, k);
  require_runs_agree(kv);
  for (std::int32_t t = 0; t < n; ++t) {  // runs are maximal within a page
    const auto run = kv.run(t, 0);
    REQUIRE(run.length == std::min(P - t % P, n - t));
  }
  if (combined) {
    const V vv(st.pool.data(), M(ext, st.table.data(), P, static_cast<std::int32_t>(stride),
                                 static_cast<std::int32_t>(tensor)));
    require_equal(vv, v);
    require_runs_agree(vv);
  }
  if (!combined && stride == tensor) {  // the dense-stride constructor is the same mapping
    const V k2(st.pool.data(), M(ext, st.table.data(), P));
    REQUIRE(k2.mapping() == kv.mapping());
    require_equal(k2, k);
  }
}

template <kvc::page_order Order>
void check_order(kvc_test::rng& r) {
  for (std::int32_t P : {1, 16, 64}) {
    for (bool combined : {false, true}) {
      for (std::int32_t n : {0, 1, P, P + 1, 3 * P - 1, r.integer(1, 150)}) {
        INFO("P=" << P << " n=" << n << " combined=" << combined);
        const std::int32_t H = r.integer(1, 3), D = r.integer(1, 9);
        check_paged<Order, kvc::dynamic_extent>(n, P, kvc::kv_dextents<>(n, H, D), combined, r);
        check_paged<Order, kvc::dynamic_extent>(n, P, kvc::kv_extents<2, 5>(n), combined, r);
        switch (P) {
          case 1: check_paged<Order, 1>(n, P, kvc::kv_dextents<>(n, H, D), combined, r); break;
          case 16: check_paged<Order, 16>(n, P, kvc::kv_extents<3, 4>(n), combined, r); break;
          default: check_paged<Order, 64>(n, P, kvc::kv_dextents<>(n, H, D), combined, r); break;
        }
      }
    }
  }
}

}  // namespace

TEST_CASE("extents: static extents are free, dynamic ones are stored, equality compares values", "[view]") {
  using E = kvc::kv_extents<4, 8>;
  STATIC_REQUIRE(E::rank() == 3);
  STATIC_REQUIRE(E::rank_dynamic() == 1);
  STATIC_REQUIRE(E::static_extent(1) == 4);
  STATIC_REQUIRE(E::static_extent(0) == kvc::dynamic_extent);
  STATIC_REQUIRE(kvc::kv_dextents<>::rank_dynamic() == 3);
  STATIC_REQUIRE(sizeof(kvc::extents<std::int32_t, 2, 4, 8>) == sizeof(std::int32_t));
  kvc_test::rng r(10);
  for (int i = 0; i < 100; ++i) {
    const std::int32_t n = r.integer(0, 1000);
    const E a(n);
    const E b(n, 4, 8);  // one value per rank
    REQUIRE(a.extent(0) == n);
    REQUIRE(a.extent(1) == 4);
    REQUIRE(a.extent(2) == 8);
    REQUIRE(a == b);
    const kvc::kv_dextents<> dyn(n, 4, 8);
    REQUIRE(dyn.extent(0) == n);
    REQUIRE(a == dyn);
    REQUIRE(!(a == kvc::kv_dextents<>(n, 4, 9)));
    REQUIRE(!(a == E(n + 1)));
    const kvc::extents<std::int64_t, kvc::dynamic_extent, 3, kvc::dynamic_extent> mixed(n, 7);
    REQUIRE(mixed.extent(0) == n);
    REQUIRE(mixed.extent(1) == 3);
    REQUIRE(mixed.extent(2) == 7);
  }
}

TEST_CASE("layout_paged nhd equals dense on shuffled page tables", "[view][paged]") {
  kvc_test::rng r(11);
  check_order<kvc::page_order::nhd>(r);
}
TEST_CASE("layout_paged hnd equals dense on shuffled page tables", "[view][paged]") {
  kvc_test::rng r(12);
  check_order<kvc::page_order::hnd>(r);
}
TEST_CASE("layout_paged hdn equals dense on shuffled page tables", "[view][paged]") {
  kvc_test::rng r(13);
  check_order<kvc::page_order::hdn>(r);
}

TEST_CASE("layout_nhd and layout_hnd (with capacity) equal dense", "[view][dense]") {
  kvc_test::rng r(14);
  for (int iter = 0; iter < 20; ++iter) {
    const std::int32_t n = r.integer(0, 40), H = r.integer(1, 4), D = r.integer(1, 16);
    const std::int32_t cap = n + r.integer(0, 5);
    const dense x(n, H, D, r);
    INFO("n=" << n << " H=" << H << " D=" << D << " capacity=" << cap);
    // NHD is the dense tensor itself.
    using VN = kvc::kv_view<const float, kvc::kv_dextents<>, kvc::layout_nhd>;
    const VN vn(x.x.data(), VN::mapping_type(kvc::kv_dextents<>(n, H, D)));
    require_equal(vn, x);
    require_runs_agree(vn);
    REQUIRE(vn.mapping().required_span_size() == n * H * D);
    for (std::int32_t t = 0; t + 1 < n; ++t)
      REQUIRE(vn.mapping()(t + 1, 0, 0) - vn.mapping()(t, 0, 0) == vn.mapping().stride(0));
    // HND: [head][capacity][dim], slots past n hold NaN.
    std::vector<float> hnd(static_cast<std::size_t>(H) * cap * D, sentinel);
    for (std::int32_t t = 0; t < n; ++t)
      for (std::int32_t h = 0; h < H; ++h)
        for (std::int32_t d = 0; d < D; ++d) hnd[(static_cast<std::size_t>(h) * cap + t) * D + d] = x(t, h, d);
    using VH = kvc::kv_view<const float, kvc::kv_dextents<>, kvc::layout_hnd>;
    const VH vh(hnd.data(), VH::mapping_type(kvc::kv_dextents<>(n, H, D), cap));
    require_equal(vh, x);
    require_runs_agree(vh);
    REQUIRE(vh.mapping().capacity() == cap);
    REQUIRE(vh.mapping().required_span_size() == H * cap * D);
    REQUIRE(vh.mapping().is_exhaustive() == (cap == n));
    if (H > 1) REQUIRE(vh.mapping()(0, 1, 0) - vh.mapping()(0, 0, 0) == vh.mapping().stride(1));
    // Static heads and dim read the same.
    if (H == 2 && D == 3) {
      using VS = kvc::kv_view<const float, kvc::kv_extents<2, 3>, kvc::layout_nhd>;
      require_equal(VS(x.x.data(), VS::mapping_type(kvc::kv_extents<2, 3>(n))), x);
    }
  }
}

TEST_CASE("layout_sink_window shows the sinks then the last window tokens, across ring wraps", "[view][window]") {
  kvc_test::rng r(15);
  for (std::int32_t sink : {0, 1, 4}) {
    for (std::int32_t window : {1, 3, 8}) {
      const std::int32_t H = 2, D = 3;
      const std::int32_t total = sink + 4 * window + 3;
      const dense seq(total, H, D, r);
      // The ring, written in arrival order: token g goes to slot g (< sink) or to
      // sink + (g - sink) % window.
      std::vector<float> ring(static_cast<std::size_t>(sink + window) * H * D, sentinel);
      for (std::int32_t seen = 0; seen <= total; ++seen) {
        if (seen > 0) {
          const std::int32_t g = seen - 1;
          const std::int32_t slot = g < sink ? g : sink + (g - sink) % window;
          for (std::int32_t h = 0; h < H; ++h)
            for (std::int32_t d = 0; d < D; ++d) ring[(static_cast<std::size_t>(slot) * H + h) * D + d] = seq(g, h, d);
        }
        // What must be visible: tokens [0, min(sink, seen)) then [max(sink, seen - window), seen).
        std::vector<std::int32_t> visible;
        for (std::int32_t g = 0; g < std::min(sink, seen); ++g) visible.push_back(g);
        for (std::int32_t g = std::max(sink, seen - window); g < seen; ++g) visible.push_back(g);
        const std::int32_t nv = static_cast<std::int32_t>(visible.size());
        INFO("sink=" << sink << " window=" << window << " seen=" << seen);
        REQUIRE(nv == std::min(seen, sink + window));
        using V = kvc::kv_view<const float, kvc::kv_dextents<>, kvc::layout_sink_window>;
        const V v(ring.data(), V::mapping_type(kvc::kv_dextents<>(nv, H, D), sink, window, seen));
        for (std::int32_t t = 0; t < nv; ++t) {
          REQUIRE(v.mapping().arrival(t) == visible[static_cast<std::size_t>(t)]);
          for (std::int32_t h = 0; h < H; ++h)
            for (std::int32_t d = 0; d < D; ++d) REQUIRE(v(t, h, d) == seq(visible[static_cast<std::size_t>(t)], h, d));
        }
        require_runs_agree(v);
        REQUIRE(v.mapping().required_span_size() == (sink + window) * H * D);
      }
    }
  }
}

TEST_CASE("vllm_block_view reads NHD and HND block arrays through a shuffled block table", "[view][engine]") {
  kvc_test::rng r(16);
  for (std::int32_t bs : {1, 16, 64}) {
    for (std::int32_t n : {0, 1, bs, 2 * bs + 1, r.integer(1, 130)}) {
      const std::int32_t H = r.integer(1, 3), D = r.integer(1, 8);
      const std::int64_t block = static_cast<std::int64_t>(bs) * H * D;
      INFO("block_size=" << bs << " tokens=" << n << " H=" << H << " D=" << D);
      const dense x(n, H, D, r);
      {
        auto st = make_pages(n, bs, block, 3, r);
        scatter(x, kvc::page_order::nhd, bs, block, 0, st.table, st.pool);
        const auto v = kvc::vllm_block_view<kvc::page_order::nhd>(st.pool.data(), st.table.data(), n, bs, H, D);
        require_equal(v, x);
        require_runs_agree(v);
      }
      {
        auto st = make_pages(n, bs, block, 3, r);
        scatter(x, kvc::page_order::hnd, bs, block, 0, st.table, st.pool);
        const auto v = kvc::vllm_block_view<kvc::page_order::hnd>(st.pool.data(), st.table.data(), n, bs, H, D);
        require_equal(v, x);
        require_runs_agree(v);
      }
    }
  }
  float pool[64] = {};
  const std::int32_t table[4] = {0, 1, 2, 3};
  REQUIRE_THROWS_AS(kvc::vllm_block_view(pool, table, 4, 3, 1, 1), kvc::error);
  REQUIRE_THROWS_WITH(kvc::vllm_block_view(pool, table, 4, 3, 1, 1), Catch::Contains("block_size = 3"));
  REQUIRE_THROWS_WITH(kvc::vllm_block_view(pool, table, -1, 4, 1, 1), Catch::Contains("tokens = -1"));
  REQUIRE_THROWS_WITH(kvc::vllm_block_view(pool, table, 4, 4, 0, 1), Catch::Contains("heads = 0"));
  REQUIRE_THROWS_WITH(kvc::vllm_block_view(pool, static_cast<const std::int32_t*>(nullptr), 4, 4, 1, 1),
                      Catch::Contains("block_table is null"));
}

TEST_CASE("paged_batch reads FlashInfer CSR page tables with combined K/V pages", "[view][engine]") {
  kvc_test::rng r(17);
  for (std::int32_t P : {1, 16, 64}) {
    for (int iter = 0; iter < 3; ++iter) {
      const std::int32_t H = r.integer(1, 3), D = r.integer(1, 8);
      const std::vector<std::int32_t> lens = {0, 1, P, 2 * P + 1, r.integer(0, 150), 0};
      const std::int32_t B = static_cast<std::int32_t>(lens.size());
      std::vector<std::int32_t> indptr{0}, last;
      for (std::int32_t n : lens) {
        indptr.push_back(indptr.back() + (n + P - 1) / P);
        last.push_back(n == 0 ? 0 : (n - 1) % P + 1);
      }
      const std::int32_t pages = indptr.back();
      const std::vector<std::int32_t> indices = r.permutation(pages);  // pages handed out in random order
      const std::int64_t tensor = static_cast<std::int64_t>(P) * H * D;
      for (kvc::page_order o : {kvc::page_order::nhd, kvc::page_order::hnd}) {
        // FlashInfer's combined cache: [pages][2][P][H][D] (NHD) or [pages][2][H][P][D] (HND).
        std::vector<float> pool(static_cast<std::size_t>(pages * 2 * tensor), sentinel);
        std::vector<dense> ks, vs;
        for (std::int32_t b = 0; b < B; ++b) {
          ks.emplace_back(lens[static_cast<std::size_t>(b)], H, D, r);
          vs.emplace_back(lens[static_cast<std::size_t>(b)], H, D, r);
          const std::vector<std::int32_t> table(indices.begin() + indptr[static_cast<std::size_t>(b)],
                                                indices.begin() + indptr[static_cast<std::size_t>(b) + 1]);
          scatter(ks.back(), o, P, 2 * tensor, 0, table, pool);
          scatter(vs.back(), o, P, 2 * tensor, tensor, table, pool);
        }
        INFO("P=" << P << " order=" << static_cast<int>(o));
        auto check = [&](auto order_tag) {
          constexpr kvc::page_order O = decltype(order_tag)::value;
          const kvc::paged_batch<float, O> kb(pool.data(), B, indptr.data(), indices.data(), last.data(), P, H, D,
                                              static_cast<std::int32_t>(2 * tensor), 0);
          const kvc::paged_batch<float, O> vb(pool.data(), B, indptr.data(), indices.data(), last.data(), P, H, D,
                                              static_cast<std::int32_t>(2 * tensor), static_cast<std::int32_t>(tensor));
          REQUIRE(kb.size() == B);
          for (std::int32_t b = 0; b < B; ++b) {
            REQUIRE(kb.tokens(b) == lens[static_cast<std::size_t>(b)]);
            require_equal(kb.seq(b), ks[static_cast<std::size_t>(b)]);
            require_equal(vb.seq(b), vs[static_cast<std::size_t>(b)]);
            require_runs_agree(kb.seq(b));
          }
          REQUIRE_THROWS_WITH(kb.seq(B), Catch::Contains("i = " + std::to_string(B)));
          REQUIRE_THROWS_AS(kb.seq(-1), kvc::error);
        };
        if (o == kvc::page_order::nhd) check(std::integral_constant<kvc::page_order, kvc::page_order::nhd>{});
        else check(std::integral_constant<kvc::page_order, kvc::page_order::hnd>{});
      }
    }
  }
  // Preconditions.
  float pool[64] = {};
  const std::int32_t indptr[] = {0, 1}, indices[] = {0}, bad_last[] = {0}, last[] = {1};
  REQUIRE_THROWS_WITH(kvc::paged_batch<float>(pool, 1, indptr, indices, bad_last, 4, 1, 1),
                      Catch::Contains("last_page_len[0] = 0"));
  REQUIRE_THROWS_WITH(kvc::paged_batch<float>(pool, 1, indptr, indices, last, 6, 1, 1), Catch::Contains("page_size = 6"));
  REQUIRE_THROWS_WITH(kvc::paged_batch<float>(pool, 1, indptr, indices, last, 4, 2, 2, 8),
                      Catch::Contains("page_stride = 8"));
  const std::int32_t back[] = {1, 0};
  REQUIRE_THROWS_WITH(kvc::paged_batch<float>(pool, 1, back, indices, last, 4, 1, 1), Catch::Contains("indptr[1] = 0"));
  REQUIRE_THROWS_WITH(kvc::paged_batch<float>(pool, -1, indptr, indices, last, 4, 1, 1), Catch::Contains("batch = -1"));
}
