// SPDX-License-Identifier: Apache-2.0
// Paged offsets are 64-bit: page id x page stride leaves int32 in pools of a few GB (vLLM block
// 40000 of 16 tokens x 32 heads x 128 dims is element 2621440000; kvc's own 16-token, head_dim 128
// pages pass 2^31 elements at page 2^19). Two checks:
//  - the mappings of every paged view (vLLM NHD/HND blocks, FlashInfer's combined cache, HDN pages
//    with a static page size) against offsets computed here in int64 from the layout formulas, for
//    page ids up to INT32_MAX; no memory behind them is touched;
//  - kvc::cpu::decode_attention over a kv_cache whose pages have ids >= 2^19 (the low ids are taken
//    from the pool first, without writing them: the arena is only reserved) against the dense
//    double reference. Before the fix the kernel read 8-16 GB below the arena (segfault, or UBSan's
//    signed overflow).
// Tolerance as test_attention: |out - ref| <= 2e-5 max|V|, |lse - ref| <= 2e-5 max(1, |lse|).

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <kvc/cpu/decode_attention.hpp>
#include <kvc/store/kv_cache.hpp>
#include <kvc/view/engine.hpp>
#include <kvc/view/layout_paged.hpp>

#include "cache_builders.hpp"
#include "dense_reference.hpp"
#include "fast_require.hpp"
#include "kvc_catch.hpp"
#include "random.hpp"

namespace {

using i64 = std::int64_t;

/// Element offset of (t, h, d) for a page table, written from the layout definitions.
i64 expect_offset(kvc::page_order o, const std::vector<std::int32_t>& table, i64 P, i64 H, i64 D, i64 stride,
                  i64 base, i64 t, i64 h, i64 d) {
  const i64 page = table[static_cast<std::size_t>(t / P)], s = t % P;
  i64 in = 0;
  if (o == kvc::page_order::nhd) in = s * H * D + h * D + d;
  else if (o == kvc::page_order::hnd) in = h * P * D + s * D + d;
  else in = h * D * P + d * P + s;
  return page * stride + base + in;
}

template <class View>
void require_mapping(const View& v, kvc::page_order o, const std::vector<std::int32_t>& table, i64 P, i64 H, i64 D,
                     i64 stride, i64 base, kvc_test::rng& r) {
  const auto& m = v.mapping();
  const i64 n = v.extent(0);
  for (int i = 0; i < 200; ++i) {
    const i64 t = r.integer(0, static_cast<std::int32_t>(n - 1)), h = r.integer(0, static_cast<std::int32_t>(H - 1)),
              d = r.integer(0, static_cast<std::int32_t>(D - 1));
    const i64 want = expect_offset(o, table, P, H, D, stride, base, t, h, d);
    const i64 got = m(static_cast<std::int32_t>(t), static_cast<std::int32_t>(h), static_cast<std::int32_t>(d));
    KVC_REQUIRE(got == want, "t=" << t << " h=" << h << " d=" << d << " got " << got << " want " << want);
    REQUIRE(want >= 0);
    if (o != kvc::page_order::hdn) {
      const auto run = m.run(static_cast<std::int32_t>(t), static_cast<std::int32_t>(h));
      KVC_REQUIRE(run.offset == expect_offset(o, table, P, H, D, stride, base, t, h, 0), "run t=" << t);
    }
  }
  static_assert(std::is_same<decltype(m(0, 0, 0)), std::int64_t>::value, "paged offsets are 64-bit");
}

}  // namespace

TEST_CASE("vLLM block 40000 of 16 x 32 x 128 maps element (0,0,0) to 2621440000", "[view][offsets64]") {
  const std::vector<std::int32_t> table = {40000};
  const float* blocks = nullptr;  // mappings only: nothing is read
  const auto v = kvc::vllm_block_view<kvc::page_order::nhd>(blocks, table.data(), 16, 16, 32, 128);
  REQUIRE(v.mapping()(0, 0, 0) == std::int64_t{2621440000});
  REQUIRE(v.mapping()(15, 31, 127) == std::int64_t{2621440000} + 16 * 32 * 128 - 1);
  REQUIRE(v.mapping().run(3, 5).offset == std::int64_t{2621440000} + (3 * 32 + 5) * 128);
  REQUIRE(v.mapping().required_span_size() == std::int64_t{40001} * 16 * 32 * 128);
}

TEST_CASE("paged mappings give 64-bit offsets for page ids up to INT32_MAX", "[view][offsets64]") {
  kvc_test::rng r(6401);
  const float* pool = nullptr;
  for (int round = 0; round < 20; ++round) {
    const std::int32_t P = 1 << r.integer(0, 6), H = r.integer(1, 40), D = 8 * r.integer(1, 32);
    const std::int32_t n = r.integer(1, 5 * P);
    const std::int32_t pages = (n + P - 1) / P;
    std::vector<std::int32_t> table(static_cast<std::size_t>(pages));
    // Ids near the top of the int32 range and around the old overflow points.
    for (auto& id : table) {
      const int kind = r.integer(0, 3);
      id = kind == 0   ? std::numeric_limits<std::int32_t>::max() - r.integer(0, 1000)
           : kind == 1 ? 40000 + r.integer(0, 100)
           : kind == 2 ? (1 << 19) + r.integer(0, 100)
                       : r.integer(0, std::numeric_limits<std::int32_t>::max());
    }
    INFO("P=" << P << " H=" << H << " D=" << D << " n=" << n);
    const i64 dense = i64{P} * H * D;
    require_mapping(kvc::vllm_block_view<kvc::page_order::nhd>(pool, table.data(), n, P, H, D), kvc::page_order::nhd,
                    table, P, H, D, dense, 0, r);
    require_mapping(kvc::vllm_block_view<kvc::page_order::hnd>(pool, table.data(), n, P, H, D), kvc::page_order::hnd,
                    table, P, H, D, dense, 0, r);
    // FlashInfer's combined [pages][2][P][H][D]: V at + P H D, stride 2 P H D.
    const std::int32_t indptr[2] = {0, pages};
    const std::int32_t last = n - (pages - 1) * P;
    const kvc::paged_batch<const float> fb(pool, 1, indptr, table.data(), &last, P, H, D,
                                           static_cast<std::int32_t>(2 * dense), static_cast<std::int32_t>(dense));
    require_mapping(fb.seq(0), kvc::page_order::nhd, table, P, H, D, 2 * dense, dense, r);
    // HDN pages with a static page size (the KIVI-style per-channel layout).
    using M64 = kvc::layout_paged<kvc::page_order::hdn, 64>::mapping<kvc::kv_dextents<>>;
    const kvc::kv_view<const float, kvc::kv_dextents<>, kvc::layout_paged<kvc::page_order::hdn, 64>> hv(
        pool, M64(kvc::kv_dextents<>(n, H, D), table.data(), 64, i64{64} * H * D + 64));
    require_mapping(hv, kvc::page_order::hdn, table, 64, H, D, i64{64} * H * D + 64, 0, r);
  }
}

namespace {

template <class T>
void run_high_page_attention(std::uint64_t seed) {
  kvc_test::rng r(seed);
  constexpr std::int32_t P = 16, D = 128, hkv = 2, hq = 8;
  constexpr std::int32_t low = 1 << 19;  // 2^19 pages x 2 x 16 x 128 elements = 2^31 elements of T
  kvc::cache_config c;
  c.num_kv_heads = hkv;
  c.head_dim = D;
  c.page_size = P;
  c.max_pages = low + 64;
  kvc::kv_cache<T> cache(c);
  // Take the low ids first: allocation hands out ids without touching the pages, so this costs the
  // pool's bookkeeping (a few MB), not the 4-8 GB of arena below the ids the test reads.
  std::vector<kvc::page_id> taken(static_cast<std::size_t>(low));
  const_cast<kvc::page_pool&>(cache.pool()).allocate(low, taken.data(), 0);

  kvc_test::dense_cache_model model;
  model.layers = 1;
  model.heads = hkv;
  model.dim = D;
  const kvc::seq_id s = cache.add_sequence();
  model.add_sequence(s);
  const std::int32_t total = r.integer(3 * P, 20 * P);
  kvc_test::append_random_chunks<T>(cache, model, s, 0, total, 50, 0.0, r);
  for (std::int32_t h = 0; h < hkv; ++h) {
    const auto kept = r.subset(total, r.integer(1, total));
    cache.keep(s, 0, h, kept.data(), static_cast<std::int32_t>(kept.size()));
    model.keep(s, 0, h, kept);
    for (kvc::page_id p : cache.pages(s, 0, h)) REQUIRE(p >= low);
  }
  std::vector<kvc_test::dense_head> heads;
  for (std::int32_t h = 0; h < hkv; ++h) heads.push_back(model.head(s, 0, h));
  const std::vector<float> q = r.normals(static_cast<std::size_t>(hq) * D);
  const auto ref = kvc_test::dense_decode_attention(heads, D, q.data(), hq, 1.0 / std::sqrt(double{D}));
  for (std::int32_t split : {0, 16}) {
    std::vector<float> out(static_cast<std::size_t>(hq) * D), lse(hq);
    kvc::decode_options o;
    o.lse = lse.data();
    o.split_tokens = split;
    kvc::cpu::decode_attention(cache, s, 0, q.data(), hq, out.data(), o);
    for (std::int32_t qh = 0; qh < hq; ++qh) {
      const auto& H = heads[static_cast<std::size_t>(qh / (hq / hkv))];
      double vmax = 0;
      for (double x : H.v) vmax = std::max(vmax, std::fabs(x));
      for (std::int32_t d = 0; d < D; ++d) {
        const std::size_t i = static_cast<std::size_t>(qh) * D + d;
        KVC_REQUIRE(std::fabs(out[i] - ref.out[i]) <= 2e-5 * vmax,
                    "qh=" << qh << " d=" << d << " got " << out[i] << " want " << ref.out[i]);
      }
      const double rl = ref.lse[static_cast<std::size_t>(qh)];
      KVC_REQUIRE(std::fabs(lse[static_cast<std::size_t>(qh)] - rl) <= 2e-5 * std::max(1.0, std::fabs(rl)), "lse qh=" << qh);
    }
  }
  // The same rows through the paged views the kernels read.
  for (std::int32_t h = 0; h < hkv; ++h) {
    const auto kv = cache.keys(s, 0, h);
    const auto& st = model.streams.at({s, 0, h});
    for (std::int32_t t = 0; t < st.n(); t += 7)
      KVC_REQUIRE(kvc::to_float(kv(t, 0, 5)) == st.k[static_cast<std::size_t>(t) * D + 5], "t=" << t);
  }
  const_cast<kvc::page_pool&>(cache.pool()).release(low, taken.data());
}

}  // namespace

TEST_CASE("cpu::decode_attention reads kv_cache pages with ids above 2^19 (offsets past 2^31 elements)",
          "[attention][offsets64]") {
  run_high_page_attention<float>(6402);
  run_high_page_attention<kvc::half>(6403);
}
