// SPDX-License-Identifier: Apache-2.0
// Memory accounting of eviction, for every storage of the run-time registry (kv_cache<float/half/
// bfloat16>; quant_cache with int8 sym/asym, int4, int2, fp8 e4m3/e5m2, kivi 2/3/4/8 and mixed bits,
// KIVI with residual 0, rotated, outliers, gear; sinks; mikv's mixed precision), driven through
// runtime::make_cache and evict::apply_layer on random keep sets and shapes.
//
// Invariants checked (docs/design.md, Store):
//  1. apply_layer reports what the pools did: bytes_in_use after = before + bytes_allocated -
//     bytes_released, exactly (before the fix it returned before - after as size_t, and a keep that
//     copied shared pages reported 18446744073709538816 bytes "released").
//  2. With no page shared, a keep never grows memory: bytes_allocated == 0, after <= before.
//     (Keeping 63 of 64 KIVI-2 tokens used to decode the partial group into a fresh residual page:
//     6144 -> 18944 bytes at head_dim 128.)
//  3. With pages shared by a fork, copy-on-write may allocate, but only copies of pages the kept
//     sequence referenced in that layer: bytes_allocated <= that layer's bytes in an unshared twin
//     (the same appends, no fork), and once the other sequence is removed the kept sequence holds
//     exactly the bytes the twin holds after the same keep: sharing never costs more in the end.
// After every keep, decode attention (any_cache::attention, each storage's CPU kernel, which now
// meets trailing partial groups) equals the dense double reference over the gathered rows:
// |out - ref| <= 1e-4 max|V|, |lse - ref| <= 1e-4 (1 + |lse|) (float kernels on dequantized values;
// a padded or dropped token counted in the softmax would move the output by ~1/n).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <kvc/evict/compressor.hpp>
#include <kvc/evict/core.hpp>
#include <kvc/evict/knorm.hpp>
#include <kvc/runtime/make_cache.hpp>
#include <kvc/store/kv_cache.hpp>

#include "cache_builders.hpp"
#include "dense_reference.hpp"
#include "fast_require.hpp"
#include "kvc_catch.hpp"
#include "random.hpp"

namespace {

using kvc::runtime::any_cache;

const std::vector<std::string>& storages() {
  static const std::vector<std::string> s = {
      "fp32", "fp16", "bf16", "int8", "int8(scheme=asym)", "int4", "int2", "int4(sinks=3)", "fp8", "fp8(format=e5m2)",
      "kivi", "kivi(bits=4)", "kivi(bits=8)", "kivi(kbits=4,vbits=2)", "kivi(residual=0)", "kivi(residual=32,sinks=4)",
      "kivi(bits=3)", "kivi(bits=3,residual=32,sinks=2)", "nuq", "nuq(bits=2,residual=32,sinks=2)",
      "rotated", "rotated(bits=4)", "outliers", "outliers(bits=4)", "gear", "gear(bits=2)", "mikv",
      "mikv(hbits=8,lbits=4,sinks=2)"};
  return s;
}

kvc::cache_config shape(std::int32_t H, std::int32_t D) {
  return kvc_test::cache_shape(2, H, D, 16, 4096);
}

/// Appends the same random tokens to `seq` of both caches (n per layer, in chunks).
void fill(any_cache& a, kvc::seq_id sa, any_cache* b, kvc::seq_id sb, std::int32_t n, kvc_test::rng& r) {
  const std::int32_t H = a.config().num_kv_heads, D = a.config().head_dim;
  for (std::int32_t done = 0; done < n;) {
    const std::int32_t m = std::min(n - done, r.coin(0.3) ? 1 : r.integer(1, 80));
    for (std::int32_t l = 0; l < a.config().num_layers; ++l) {
      const auto k = r.normals(static_cast<std::size_t>(m) * H * D), v = r.normals(k.size());
      a.append(sa, l, k.data(), v.data(), m);
      if (b) b->append(sb, l, k.data(), v.data(), m);
    }
    done += m;
  }
}

std::vector<std::vector<std::int32_t>> random_keep(const any_cache& c, kvc::seq_id s, std::int32_t layer,
                                                   kvc_test::rng& r) {
  std::vector<std::vector<std::int32_t>> kept;
  for (std::int32_t h = 0; h < c.config().num_kv_heads; ++h) {
    const std::int32_t L = c.length(s, layer, h);
    const int kind = r.integer(0, 3);
    const std::int32_t n = kind == 0 ? L : kind == 1 ? std::max(0, L - r.integer(1, 3)) : r.integer(0, L);
    kept.push_back(r.subset(L, n));
  }
  return kept;
}

void require_attention(const any_cache& c, kvc::seq_id s, std::int32_t layer, kvc_test::rng& r) {
  const std::int32_t H = c.config().num_kv_heads, D = c.config().head_dim, hq = 2 * H;
  std::vector<kvc_test::dense_head> heads(static_cast<std::size_t>(H));
  for (std::int32_t h = 0; h < H; ++h) {
    auto& dh = heads[static_cast<std::size_t>(h)];
    dh.n = c.length(s, layer, h);
    std::vector<float> k(static_cast<std::size_t>(dh.n) * D), v(k.size());
    c.gather(s, layer, h, k.data(), v.data());
    dh.k.assign(k.begin(), k.end());
    dh.v.assign(v.begin(), v.end());
  }
  const auto q = r.normals(static_cast<std::size_t>(hq) * D);
  const auto ref = kvc_test::dense_decode_attention(heads, D, q.data(), hq, 1.0 / std::sqrt(double(D)));
  std::vector<float> out(q.size()), lse(static_cast<std::size_t>(hq));
  kvc::decode_options o;
  o.lse = lse.data();
  c.attention(s, layer, q.data(), hq, out.data(), o);
  for (std::int32_t qh = 0; qh < hq; ++qh) {
    const auto& dh = heads[static_cast<std::size_t>(qh / 2)];
    if (dh.n == 0) continue;
    double vmax = 0;
    for (double x : dh.v) vmax = std::max(vmax, std::fabs(x));
    for (std::int32_t d = 0; d < D; ++d) {
      const std::size_t i = static_cast<std::size_t>(qh) * D + d;
      KVC_REQUIRE(std::fabs(out[i] - ref.out[i]) <= 1e-4 * vmax,
                  "attention layer " << layer << " qh " << qh << " d " << d << " got " << out[i] << " want " << ref.out[i]);
    }
    const double rl = ref.lse[static_cast<std::size_t>(qh)];
    KVC_REQUIRE(std::fabs(lse[static_cast<std::size_t>(qh)] - rl) <= 1e-4 * (1 + std::fabs(rl)), "lse qh " << qh);
  }
}

void require_identity(const any_cache& c, std::size_t before, const kvc::evict::apply_result& res) {
  INFO("before " << before << " allocated " << res.bytes_allocated << " released " << res.bytes_released << " after "
                 << c.bytes_in_use());
  REQUIRE(c.bytes_in_use() + res.bytes_released == before + res.bytes_allocated);
}

}  // namespace

TEST_CASE("keeping 63 of 64 KIVI-2 tokens does not grow the stream (was 6144 -> 18944 bytes)", "[evict][accounting]") {
  kvc::cache_config c = shape(1, 128);
  c.num_layers = 1;
  auto cache = kvc::runtime::make_cache("kivi(bits=2,residual=0)", c);
  kvc_test::rng r(1601);
  const auto s = cache->add_sequence();
  const auto k = r.normals(64 * 128), v = r.normals(k.size());
  cache->append(s, 0, k.data(), v.data(), 64);
  const std::size_t before = cache->bytes_in_use();
  std::vector<std::vector<std::int32_t>> kept(1);
  for (std::int32_t t = 0; t < 64; ++t)
    if (t != 17) kept[0].push_back(t);
  const auto res = kvc::evict::apply_layer(*cache, s, 0, kept);
  INFO("bytes " << before << " -> " << cache->bytes_in_use());
  REQUIRE(cache->bytes_in_use() <= before);
  REQUIRE(res.bytes_allocated == 0);
  require_identity(*cache, before, res);
  REQUIRE(cache->length(s, 0, 0) == 63);
  // The stream goes on: appends complete the partial group.
  for (int i = 0; i < 40; ++i) cache->append(s, 0, k.data() + i * 128, v.data() + i * 128, 1);
  REQUIRE(cache->length(s, 0, 0) == 103);
  require_attention(*cache, s, 0, r);
}

TEST_CASE("apply_layer reports bytes allocated and released; keep never grows unshared memory, for every storage",
          "[evict][accounting]") {
  std::uint64_t salt = 1700;
  for (const std::string& spec : storages()) {
    for (int trial = 0; trial < 6; ++trial) {
      kvc_test::rng r(++salt);
      const std::int32_t H = r.integer(1, 3), D = r.coin() ? 64 : 32;
      const kvc::cache_config cfg = shape(H, D);
      INFO(spec << " trial " << trial << " H=" << H << " D=" << D);
      auto cache = kvc::runtime::make_cache(spec, cfg);
      auto twin = kvc::runtime::make_cache(spec, cfg);
      const auto a = cache->add_sequence();
      const auto ta = twin->add_sequence();
      fill(*cache, a, twin.get(), ta, r.integer(1, 300), r);
      // No sharing: a few keeps in a row on either layer.
      for (int step = 0; step < 3; ++step) {
        const std::int32_t layer = r.integer(0, 1);
        const auto kept = random_keep(*cache, a, layer, r);
        const std::size_t before = cache->bytes_in_use();
        const auto res = kvc::evict::apply_layer(*cache, a, layer, kept);
        require_identity(*cache, before, res);
        REQUIRE(res.bytes_allocated == 0);
        REQUIRE(cache->bytes_in_use() <= before);
        // The twin attends with the same queries: mikv's attention() accumulates the importance
        // that picks the tokens its later appends demote, so a twin that never attends demotes
        // others and holds other bytes.
        kvc_test::rng same_queries = r;
        require_attention(*cache, a, layer, r);
        (void)kvc::evict::apply_layer(*twin, ta, layer, kept);
        require_attention(*twin, ta, layer, same_queries);
        REQUIRE(twin->bytes_in_use() == cache->bytes_in_use());
        if (r.coin()) fill(*cache, a, twin.get(), ta, r.integer(1, 60), r);
      }
      // Sharing: fork, maybe append to either side, keep on either side.
      kvc::seq_id b;
      try {
        b = cache->fork(a);
      } catch (const kvc::error&) {
        continue;  // mikv: fork refused (documented), no sharing to test
      }
      const bool keep_child = r.coin();
      const kvc::seq_id ks = keep_child ? b : a, other = keep_child ? a : b;
      if (r.coin()) {  // the kept sequence moves on first (the twin gets the same tokens)
        fill(*cache, ks, twin.get(), ta, r.integer(1, 40), r);
      }
      const std::int32_t layer = r.integer(0, 1);
      const auto kept = random_keep(*cache, ks, layer, r);
      const std::size_t before = cache->bytes_in_use();
      const std::size_t twin_layer = twin->bytes_in_use(layer);
      const auto res = kvc::evict::apply_layer(*cache, ks, layer, kept);
      require_identity(*cache, before, res);
      REQUIRE(res.bytes_allocated <= twin_layer);
      require_attention(*cache, ks, layer, r);
      require_attention(*cache, other, layer, r);
      (void)kvc::evict::apply_layer(*twin, ta, layer, kept);
      cache->remove_sequence(other);
      REQUIRE(cache->bytes_in_use() == twin->bytes_in_use());
    }
  }
}

TEST_CASE("a keep after fork reports the pages it copied instead of an underflowed release", "[evict][accounting]") {
  kvc::kv_cache<float> cache(kvc_test::cache_shape(1, 2, 32, 16, 256));
  kvc_test::rng r(1801);
  const auto a = cache.add_sequence();
  const auto k = r.normals(64 * 2 * 32), v = r.normals(k.size());
  cache.append(a, 0, k.data(), v.data(), 64);  // 4 full pages per head
  const auto b = cache.fork(a);
  const std::size_t page = cache.pool().page_bytes();
  // Dropping token 0 of b shifts every row: all 4 shared pages of each head are copied, none is
  // emptied (63 tokens still fill 4 pages). Before the fix: "released" 2^64 - 8 pages.
  std::vector<std::vector<std::int32_t>> kept(2);
  for (std::int32_t t = 1; t < 64; ++t) kept[0].push_back(t), kept[1].push_back(t);
  std::size_t before = cache.bytes_in_use();
  const auto res = kvc::evict::apply_layer(cache, b, 0, kept);
  REQUIRE(res.bytes_allocated == 8 * page);
  REQUIRE(res.bytes_released == 0);
  REQUIRE(cache.bytes_in_use() == before + 8 * page);

  // The compressor's report carries both numbers, equal to the pool's traffic.
  const auto b2 = cache.fork(b);  // b's pages shared again
  kvc::evict::compressor_options o;
  o.target = kvc::budget::tokens(20);
  o.protect = kvc::evict::protection{0, 0};
  kvc::evict::compressor<kvc::evict::knorm> comp({}, o);
  before = cache.bytes_in_use();
  const kvc::memory_traffic t0 = cache.traffic();
  const auto rep = comp.compress(cache, b2, 0);
  const kvc::memory_traffic t1 = cache.traffic();
  REQUIRE(rep.compressed);
  REQUIRE(rep.bytes_allocated == t1.bytes_allocated - t0.bytes_allocated);
  REQUIRE(rep.bytes_released == t1.bytes_released - t0.bytes_released);
  REQUIRE(rep.bytes_allocated <= 4 * page);  // at most the 2 pages per head that 20 tokens fill, copied
  REQUIRE(cache.bytes_in_use() == before + rep.bytes_allocated - rep.bytes_released);
  // Unshared, the same budget only releases: 4 pages per head -> 2.
  cache.remove_sequence(b2);
  cache.remove_sequence(a);
  before = cache.bytes_in_use();
  const auto rep2 = comp.compress(cache, b, 0);
  REQUIRE(rep2.bytes_allocated == 0);
  REQUIRE(rep2.bytes_released == 4 * page);
  REQUIRE(cache.bytes_in_use() == before - 4 * page);
}
