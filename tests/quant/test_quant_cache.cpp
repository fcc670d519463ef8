// SPDX-License-Identifier: Apache-2.0
// quant_cache: residual window, chunking invariance, keep/compaction, fork, share_layer, accounting, strong guarantee.
#include <cstring>
#include <random>
#include <set>
#include <vector>

#include <kvc/quant/fp8.hpp>
#include <kvc/quant/int8.hpp>
#include <kvc/quant/kivi.hpp>
#include <kvc/store/quant_cache.hpp>

#include "kvc_catch.hpp"
#include "quant_test_util.hpp"

using namespace kvc::quant;

namespace {

kvc::quant_cache_config small(int H = 2, int D = 64, int P = 32, int pages = 256) {
  kvc::quant_cache_config c;
  c.num_layers = 2;
  c.num_kv_heads = H;
  c.head_dim = D;
  c.page_size = P;
  c.max_pages = pages;
  c.max_fp_pages = 32;
  return c;
}

/// fp16-representable random values
std::vector<float> halfs(std::size_t n, std::uint32_t seed) {
  auto v = qtest::randn(n, seed);
  for (auto& x : v) x = float(kvc::half(x));
  return v;
}

template <class C>
struct snapshot {
  std::vector<std::vector<float>> k, v;
  std::vector<std::vector<std::int32_t>> pos;
  std::size_t bytes;
  std::int64_t tokens;
  snapshot(const C& c, kvc::seq_id s, int layer) : bytes(c.bytes_in_use()), tokens(c.tokens_held()) {
    const int H = c.config().num_kv_heads, D = c.config().head_dim;
    for (int h = 0; h < H; ++h) {
      const int L = c.length(s, layer, h);
      k.emplace_back(std::size_t(L) * D);
      v.emplace_back(std::size_t(L) * D);
      c.gather(s, layer, h, k.back().data(), v.back().data());
      pos.emplace_back(c.positions(s, layer, h), c.positions(s, layer, h) + L);
    }
  }
  bool operator==(const snapshot& o) const {
    return k == o.k && v == o.v && pos == o.pos && bytes == o.bytes && tokens == o.tokens;
  }
};

}  // namespace

TEST_CASE("the newest tokens inside the residual window are stored exactly", "[quant][cache]") {
  const int H = 2, D = 64;
  kvc::quant_cache<kivi<2>, kivi<2>> c(small(H, D));
  REQUIRE(c.residual_window() == 128);
  REQUIRE(c.encoding_unit() == 32);
  auto s = c.add_sequence();
  const int n = 1000;
  auto k = halfs(std::size_t(n) * H * D, 1), v = halfs(k.size(), 2);
  int appended = 0;
  for (int chunk : {300, 1, 1, 77, 5, 31, 32, 1, 552}) {
    c.append(s, 0, k.data() + std::size_t(appended) * H * D, v.data() + std::size_t(appended) * H * D, chunk);
    appended += chunk;
    for (int h = 0; h < H; ++h) {
      const auto r = c.regions(s, 0, h);
      REQUIRE(r.residual >= std::min(appended, 128));
      REQUIRE(r.residual < 128 + 32);
      REQUIRE(r.quantized % 32 == 0);  // whole per-channel groups only
      std::vector<float> kk(std::size_t(appended) * D), vv(kk.size());
      c.gather(s, 0, h, kk.data(), vv.data());
      for (int t = appended - std::min(appended, 128); t < appended; ++t)
        for (int d = 0; d < D; ++d) {
          REQUIRE(kk[std::size_t(t) * D + d] == k[(std::size_t(t) * H + h) * D + d]);
          REQUIRE(vv[std::size_t(t) * D + d] == v[(std::size_t(t) * H + h) * D + d]);
        }
    }
  }
  REQUIRE(appended == n);
  REQUIRE(c.seen(s, 0) == n);
  REQUIRE(c.positions(s, 0, 1)[999] == 999);
}

TEST_CASE("encoding does not depend on how appends are chunked", "[quant][cache]") {
  const int H = 2, D = 64, n = 500;
  auto k = qtest::keylike(n, H, D, 3), v = qtest::randn(std::size_t(n) * H * D, 4);
  kvc::quant_cache<kivi<2>, kivi<4>> a(small(H, D)), b(small(H, D));
  auto sa = a.add_sequence(), sb = b.add_sequence();
  a.append(sa, 1, k.data(), v.data(), n);
  for (int t = 0; t < n; ++t) b.append(sb, 1, k.data() + std::size_t(t) * H * D, v.data() + std::size_t(t) * H * D, 1);
  REQUIRE(snapshot<decltype(a)>(a, sa, 1) == snapshot<decltype(b)>(b, sb, 1));
}

TEST_CASE("memory accounting comes from the pools", "[quant][cache]") {
  const int H = 2, D = 128, n = 4096;
  auto k = qtest::randn(std::size_t(n) * H * D, 5), v = qtest::randn(k.size(), 6);
  kvc::quant_cache<kivi<2>, kivi<2>> c(small(H, D, 64, 512));
  auto s = c.add_sequence();
  REQUIRE(c.bytes_in_use() == 0);
  c.append(s, 0, k.data(), v.data(), n);
  const auto& qp = c.quant_pool();
  REQUIRE(c.bytes_in_use() == qp.bytes_in_use() + c.residual_pool()->bytes_in_use());
  REQUIRE(c.bytes_in_use(0) == c.bytes_in_use());
  REQUIRE(c.bytes_in_use(1) == 0);
  REQUIRE(c.stream_bytes(s, 0, 0) == c.pages(s, 0, 0).size() * qp.page_bytes() + c.residual_pool()->page_bytes());
  // 2-bit codes + per-group fp16 scale/zero: (32 + 512/32 [K params] + 32 + 16 [V]) bytes/token vs 512 in fp16
  const double per_token = double(qp.bytes_in_use()) / (H * c.regions(s, 0, 0).quantized);
  CHECK(per_token < 512.0 / 4.5);
  REQUIRE(c.tokens_held() == std::int64_t(n) * H);
  c.remove_sequence(s);
  REQUIRE(c.bytes_in_use() == 0);
}

template <class KQ, class VQ>
void keep_test(bool per_token) {
  const int H = 2, D = 64, n = 700;
  auto k = qtest::keylike(n, H, D, 7), v = qtest::randn(std::size_t(n) * H * D, 8);
  kvc::quant_cache<KQ, VQ> c(small(H, D));
  auto s = c.add_sequence();
  c.append(s, 0, k.data(), v.data(), n);
  snapshot<decltype(c)> before(c, s, 0);
  std::vector<std::vector<std::int32_t>> kept(H);
  for (int t = 0; t < n; ++t) {
    if (t % 3 != 1) kept[0].push_back(t);
    if (t < 5 || t >= 400 || t % 7 == 0) kept[1].push_back(t);
  }
  const auto bytes0 = c.bytes_in_use();
  std::vector<typename kvc::quant_cache<KQ, VQ>::region_counts> reg0;
  for (int h = 0; h < H; ++h) reg0.push_back(c.regions(s, 0, h));
  c.keep_layer(s, 0, kept);
  REQUIRE(c.bytes_in_use() < bytes0);
  for (int h = 0; h < H; ++h) {
    const int L = c.length(s, 0, h);
    REQUIRE(L == int(kept[h].size()));
    std::vector<float> kk(std::size_t(L) * D), vv(kk.size());
    c.gather(s, 0, h, kk.data(), vv.data());
    const auto r = c.regions(s, 0, h);
    // keep never moves tokens into the window: every kept quantized token is still quantized.
    REQUIRE(r.quantized == int(std::count_if(kept[h].begin(), kept[h].end(),
                                             [&](int t) { return t >= reg0[h].sink && t < reg0[h].sink + reg0[h].quantized; })));
    for (int i = 0; i < L; ++i) {
      const int t = kept[h][i];
      REQUIRE(c.positions(s, 0, h)[i] == t);
      for (int d = 0; d < D; ++d) {
        const float kb = before.k[h][std::size_t(t) * D + d], vb = before.v[h][std::size_t(t) * D + d];
        if (per_token) {  // records moved as bytes: bit-identical
          REQUIRE(kk[std::size_t(i) * D + d] == kb);
          REQUIRE(vv[std::size_t(i) * D + d] == vb);
        } else if (i < r.quantized) {  // re-encoded group: a second rounding, <= half the new group's step
          const int g0 = i / 32 * 32;  // a trailing partial group holds fewer real tokens
          float lo = INFINITY, hi = -INFINITY;
          for (int j = g0; j < std::min(g0 + 32, r.quantized); ++j) {
            lo = std::min(lo, before.k[h][std::size_t(kept[h][j]) * D + d]);
            hi = std::max(hi, before.k[h][std::size_t(kept[h][j]) * D + d]);
          }
          // Repacked groups sit on a dyadic grid (channel_affine::repack): a power of two that spans
          // the group, at most the first one >= (hi - lo) / (qmax - 1), where lo..hi round to at most
          // qmax + 1 codes whatever the grid's offset.
          const double step = hi > lo ? std::ldexp(1.0, int(std::ceil(std::log2((hi - lo) / ((1 << KQ::bits) - 2.0))))) : 0.0;
          REQUIRE(std::fabs(kk[std::size_t(i) * D + d] - kb) <= 0.5 * step + 2e-3f * std::fabs(kb) + 1e-6f);
          REQUIRE(vv[std::size_t(i) * D + d] == vb);  // KIVI values are per token: moved as bytes
        } else {  // residual: exact, or a dequantized token rounded to fp16
          REQUIRE(std::fabs(kk[std::size_t(i) * D + d] - kb) <= 1e-3f * std::fabs(kb));
          REQUIRE(std::fabs(vv[std::size_t(i) * D + d] - vb) <= 1e-3f * std::fabs(vb));
        }
      }
    }
  }
  // appending after a keep continues the stream
  c.append(s, 0, k.data(), v.data(), 50);
  REQUIRE(c.length(s, 0, 0) == int(kept[0].size()) + 50);
  REQUIRE(c.positions(s, 0, 0)[c.length(s, 0, 0) - 1] == n + 49);
}

TEST_CASE("keep compacts per-token records exactly and re-encodes per-channel groups", "[quant][cache]") {
  keep_test<int8, int4>(true);
  keep_test<fp8<>, int2>(true);
  keep_test<kivi<2>, kivi<2>>(false);
  keep_test<kivi<4>, kivi<8>>(false);
}

TEST_CASE("fork shares pages and copies on write", "[quant][cache]") {
  const int H = 2, D = 64, n = 300;
  auto k = qtest::randn(std::size_t(n) * H * D, 9), v = qtest::randn(k.size(), 10);
  kvc::quant_cache<kivi<2>, kivi<2>> c(small(H, D));
  auto a = c.add_sequence();
  c.append(a, 0, k.data(), v.data(), n);
  snapshot<decltype(c)> before(c, a, 0);
  const auto bytes = c.bytes_in_use();
  auto b = c.fork(a);
  REQUIRE(c.bytes_in_use() == bytes);
  c.append(b, 0, k.data(), v.data(), 100);
  std::vector<std::int32_t> kept{0, 5, 9, 200, 250};
  c.keep(b, 0, 1, kept.data(), 5);
  snapshot<decltype(c)> after(c, a, 0);
  REQUIRE(after.k == before.k);
  REQUIRE(after.v == before.v);
  REQUIRE(after.pos == before.pos);
  REQUIRE(c.length(b, 0, 1) == 5);
  c.remove_sequence(a);
  c.remove_sequence(b);
  REQUIRE(c.bytes_in_use() == 0);
}

TEST_CASE("failing calls throw a clear error and leave the cache unchanged", "[quant][cache]") {
  const int H = 2, D = 64;
  auto k = qtest::randn(std::size_t(400) * H * D, 11), v = qtest::randn(k.size(), 12);
  kvc::quant_cache<kivi<2>, kivi<2>> c(small(H, D, 32, 10));  // 10 quant pages only
  auto s = c.add_sequence();
  c.append(s, 0, k.data(), v.data(), 200);
  snapshot<decltype(c)> before(c, s, 0);
  REQUIRE_THROWS_AS(c.append(s, 0, k.data(), v.data(), 400), kvc::out_of_memory);
  REQUIRE(snapshot<decltype(c)>(c, s, 0) == before);
  REQUIRE(c.seen(s, 0) == 200);
  auto bad = k;
  bad[1000] = NAN;
  REQUIRE_THROWS_WITH(c.append(s, 0, bad.data(), v.data(), 10), Catch::Contains("k[1000]"));
  REQUIRE(snapshot<decltype(c)>(c, s, 0) == before);
  std::vector<std::int32_t> kept{3, 2};
  REQUIRE_THROWS_WITH(c.keep(s, 0, 0, kept.data(), 2), Catch::Contains("strictly increasing"));
  kept = {0, 1, 500};
  REQUIRE_THROWS_WITH(c.keep(s, 0, 1, kept.data(), 3), Catch::Contains("kept[2] = 500"));
  REQUIRE_THROWS_AS(c.keep_layer(s, 0, {{1, 2}, {0, 0}}), kvc::error);  // second head invalid: first unchanged
  REQUIRE(snapshot<decltype(c)>(c, s, 0) == before);
  REQUIRE_THROWS_WITH(c.append(s, 2, k.data(), v.data(), 1), Catch::Contains("layer = 2"));
  REQUIRE_THROWS_WITH(c.gather(99, 0, 0, nullptr), Catch::Contains("unknown sequence id 99"));
  // fork + keep that needs copies of shared pages, with the pool exhausted
  auto f = c.fork(s);
  std::vector<std::int32_t> odd;
  for (int t = 1; t < 200; t += 2) odd.push_back(t);
  std::vector<kvc::page_id> hog(static_cast<std::size_t>(c.quant_pool().free_pages()));
  const_cast<kvc::page_pool&>(c.quant_pool()).allocate(static_cast<std::int32_t>(hog.size()), hog.data());
  snapshot<decltype(c)> fb(c, f, 0);
  REQUIRE_THROWS_AS(c.keep(f, 0, 0, odd.data(), std::int32_t(odd.size())), kvc::out_of_memory);
  REQUIRE(snapshot<decltype(c)>(c, f, 0) == fb);
  const_cast<kvc::page_pool&>(c.quant_pool()).release(static_cast<std::int32_t>(hog.size()), hog.data());
  c.keep(f, 0, 0, odd.data(), std::int32_t(odd.size()));
  snapshot<decltype(c)> after(c, s, 0);
  REQUIRE((after.k == before.k && after.v == before.v && after.pos == before.pos));
}

TEST_CASE("bad cache configurations fail with a clear kvc::error", "[quant][cache]") {
  auto c = small(2, 64, 16);
  REQUIRE_THROWS_WITH((kvc::quant_cache<kivi<2>, kivi<2>>(c)), Catch::Contains("page_size = 16") &&
                                                                   Catch::Contains("multiple of the codecs' encoding unit"));
  c = small(2, 64, 24);
  REQUIRE_THROWS_WITH((kvc::quant_cache<int8, int8>(c)), Catch::Contains("power of two"));
  c = small(2, 48, 32);
  REQUIRE_THROWS_WITH((kvc::quant_cache<kivi<2>, kivi<2>>(c)), Catch::Contains("head_dim = 48"));
  c = small(2, 64, 32);
  kivi<2> k;
  k.residual_tokens = 40;
  REQUIRE_THROWS_WITH((kvc::quant_cache<kivi<2>, kivi<2>>(c, k)), Catch::Contains("residual = 40"));
}

TEST_CASE("attention sinks stay in full precision", "[quant][cache]") {
  auto cfg = small(1, 64, 32);
  cfg.sink_tokens = 5;
  kvc::quant_cache<int2, int2> c(cfg);
  auto s = c.add_sequence();
  auto k = halfs(300 * 64, 13), v = halfs(300 * 64, 14);
  c.append(s, 0, k.data(), v.data(), 3);
  c.append(s, 0, k.data() + 3 * 64, v.data() + 3 * 64, 297);
  REQUIRE(c.regions(s, 0, 0).sink == 5);
  std::vector<float> kk(300 * 64), vv(kk.size());
  c.gather(s, 0, 0, kk.data(), vv.data());
  for (int i = 0; i < 5 * 64; ++i) REQUIRE((kk[i] == k[i] && vv[i] == v[i]));
  std::vector<std::int32_t> kept{0, 2, 4, 10, 299};
  c.keep(s, 0, 0, kept.data(), 5);
  REQUIRE(c.regions(s, 0, 0).sink == 3);
  c.gather(s, 0, 0, kk.data(), vv.data());
  for (int d = 0; d < 64; ++d) REQUIRE((kk[64 + d] == k[2 * 64 + d] && kk[2 * 64 + d] == k[4 * 64 + d]));
}

namespace {

/// rewind on a fork of a stream that was evicted and then grew: after each rewind to n the fork
/// holds exactly the source's rows at positions < n, bit for bit (nothing is re-encoded), with no
/// pool traffic even while the quantized pool has no free page; the source never changes. Then
/// the fork keeps growing from position n, its newest tokens exact in the residual window.
template <class KQ, class VQ>
void rewind_test(int sinks, std::uint32_t seed) {
  const int H = 2, D = 64, n = 600, more = 300;
  auto k = qtest::keylike(n + more, H, D, seed), v = qtest::randn(std::size_t(n + more) * H * D, seed + 1);
  auto cfg = small(H, D);
  cfg.sink_tokens = sinks;
  kvc::quant_cache<KQ, VQ> c(cfg);
  INFO("residual " << c.residual_window() << ", unit " << c.encoding_unit() << ", sinks " << sinks);
  const auto s = c.add_sequence();
  c.append(s, 0, k.data(), v.data(), 300);
  std::vector<std::vector<std::int32_t>> kept(H);
  for (int t = 0; t < 300; ++t) {
    if (t % 5 != 2) kept[0].push_back(t);
    if (t % 3 == 0 || t >= 250) kept[1].push_back(t);
  }
  c.keep_layer(s, 0, kept);
  for (int t = 300; t < n; t += 37) {
    const int m = std::min(37, n - t);
    c.append(s, 0, k.data() + std::size_t(t) * H * D, v.data() + std::size_t(t) * H * D, m);
  }
  const snapshot<decltype(c)> src(c, s, 0);
  const auto f = c.fork(s), g = c.fork(s);
  std::vector<kvc::page_id> hog(static_cast<std::size_t>(c.quant_pool().free_pages()));
  auto& qpool = const_cast<kvc::page_pool&>(c.quant_pool());
  qpool.allocate(static_cast<std::int32_t>(hog.size()), hog.data());
  const auto traffic = c.traffic();
  auto rewind_and_check = [&](kvc::seq_id fk, int target) {
    INFO("rewind to " << target);
    const auto bytes = c.bytes_in_use();
    c.rewind(fk, 0, target);
    REQUIRE(c.seen(fk, 0) == target);
    REQUIRE(c.seen(fk, 1) == 0);
    REQUIRE(c.bytes_in_use() <= bytes);
    REQUIRE(c.traffic().bytes_allocated == traffic.bytes_allocated);
    const snapshot<decltype(c)> now(c, fk, 0);
    for (int h = 0; h < H; ++h) {
      std::size_t m = 0;
      while (m < src.pos[h].size() && src.pos[h][m] < target) ++m;
      REQUIRE(now.pos[h] == std::vector<std::int32_t>(src.pos[h].begin(), src.pos[h].begin() + std::ptrdiff_t(m)));
      REQUIRE(now.k[h] == std::vector<float>(src.k[h].begin(), src.k[h].begin() + std::ptrdiff_t(m * D)));
      REQUIRE(now.v[h] == std::vector<float>(src.v[h].begin(), src.v[h].begin() + std::ptrdiff_t(m * D)));
    }
    const snapshot<decltype(c)> source(c, s, 0);
    REQUIRE((source.k == src.k && source.v == src.v && source.pos == src.pos));
  };
  for (int target : {n, 599, 590, 577, 512, 470, 301, 300, 299, 251}) rewind_and_check(f, target);
  for (int target : {64, sinks + 1, sinks, 0}) rewind_and_check(g, target);
  c.remove_sequence(g);
  REQUIRE_THROWS_WITH(c.rewind(f, 0, 252), Catch::Contains("n = 252, expected 0..251"));
  REQUIRE_THROWS_WITH(c.rewind(f, 0, -1), Catch::Contains("n = -1"));
  REQUIRE_THROWS_WITH(c.rewind(f, 2, 0), Catch::Contains("layer = 2"));
  REQUIRE_THROWS_WITH(c.rewind(99, 0, 0), Catch::Contains("unknown sequence id 99"));
  qpool.release(static_cast<std::int32_t>(hog.size()), hog.data());
  // Growing again from 251: positions continue there, and the newest tokens sit in the window.
  const int base = c.length(f, 0, 1);
  c.append(f, 0, k.data() + std::size_t(n) * H * D, v.data() + std::size_t(n) * H * D, more);
  REQUIRE(c.seen(f, 0) == 251 + more);
  const snapshot<decltype(c)> grown(c, f, 0);
  REQUIRE(int(grown.pos[1].size()) == base + more);
  const int exact = std::min(more, c.residual_window());
  for (int i = 0; i < more; ++i) {
    REQUIRE(grown.pos[1][std::size_t(base + i)] == 251 + i);
    if (i < more - exact) continue;
    for (int d = 0; d < D; ++d) {
      const std::size_t src_i = (std::size_t(n + i) * H + 1) * D + std::size_t(d);
      REQUIRE(grown.k[1][std::size_t(base + i) * D + std::size_t(d)] == float(kvc::half(k[src_i])));
      REQUIRE(grown.v[1][std::size_t(base + i) * D + std::size_t(d)] == float(kvc::half(v[src_i])));
    }
  }
  c.remove_sequence(f);
  REQUIRE(snapshot<decltype(c)>(c, s, 0) == src);
  c.remove_sequence(s);
  REQUIRE(c.bytes_in_use() == 0);
}

}  // namespace

TEST_CASE("rewind forgets the newest tokens without re-encoding or allocating", "[quant][cache][rewind]") {
  rewind_test<int8, int4>(0, 31);
  rewind_test<kivi<2>, kivi<2>>(0, 32);
  rewind_test<kivi<4>, kivi<4>>(4, 33);
  rewind_test<fp8<>, int2>(5, 34);
}

namespace {

/// One logged call on a layer, replayable into a fresh cache.
struct layer_op {
  enum kind_t { append, keep, rewind } kind = append;
  int head = 0, from = 0, n = 0;  // append: tokens [from, from + n) of the inputs; rewind: n
  std::vector<std::int32_t> kept;
};

/// share_layer against a model with no sharing at all: every layer's calls are logged (a share
/// copies the source's log), and after every call a fresh cache replaying each layer's log must
/// hold the same decoded rows, positions and `seen`, bit for bit (the codecs are deterministic),
/// so every write to a shared page was copied first. Bytes: the pools' figure must equal the
/// distinct pages the streams hold, counted here from the tables and views, never more than the
/// unshared replay, and a share allocates nothing.
template <class KQ, class VQ>
void share_test(int sinks, bool pre_rope, std::uint32_t seed) {
  const int L = 3, H = 2, D = 64, N = 700;
  const auto k = qtest::keylike(N, H, D, seed), v = qtest::randn(std::size_t(N) * H * D, seed + 1);
  auto cfg = small(H, D, 32, 512);
  cfg.num_layers = L;
  cfg.max_fp_pages = 64;
  cfg.sink_tokens = sinks;
  cfg.pre_rope = pre_rope;
  using cache = kvc::quant_cache<KQ, VQ>;
  cache c(cfg);
  INFO("residual " << c.residual_window() << ", unit " << c.encoding_unit() << ", sinks " << sinks << ", pre_rope "
                   << pre_rope);
  const auto s = c.add_sequence();
  std::vector<std::vector<layer_op>> log(L);
  auto run = [&](cache& x, kvc::seq_id q, int l, const layer_op& op) {
    if (op.kind == layer_op::append)
      x.append(q, l, k.data() + std::size_t(op.from) * H * D, v.data() + std::size_t(op.from) * H * D, op.n);
    else if (op.kind == layer_op::keep)
      x.keep(q, l, op.head, op.kept.data(), std::int32_t(op.kept.size()));
    else
      x.rewind(q, l, op.n);
  };
  auto check = [&](const char* what) {
    INFO("after " << what);
    cache ref(cfg);
    const auto r = ref.add_sequence();
    for (int l = 0; l < L; ++l)
      for (const auto& op : log[std::size_t(l)]) run(ref, r, l, op);
    std::set<kvc::page_id> quant;
    std::set<const void*> res, sink;
    for (int l = 0; l < L; ++l) {
      REQUIRE(c.seen(s, l) == ref.seen(r, l));
      const snapshot<cache> got(c, s, l), want(ref, r, l);
      REQUIRE(got.pos == want.pos);
      REQUIRE(got.k == want.k);
      REQUIRE(got.v == want.v);
      for (int h = 0; h < H; ++h) {
        for (auto p : c.pages(s, l, h)) quant.insert(p);
        const auto sv = c.view(s, l, h);
        if (sv.res_k) res.insert(sv.res_k);
        if (sv.sink_k) sink.insert(sv.sink_k);
      }
    }
    const std::size_t distinct = quant.size() * c.quant_pool().page_bytes() +
                                 (res.empty() ? 0 : res.size() * c.residual_pool()->page_bytes()) +
                                 (sink.empty() ? 0 : sink.size() * c.sink_pool()->page_bytes());
    REQUIRE(c.bytes_in_use() == distinct);
    REQUIRE(c.bytes_in_use() <= ref.bytes_in_use());
    // Per layer, the quantized pages count in the layer that allocated them (the pool's tag),
    // whichever layers hold them now.
    for (int l = 0; l < L; ++l) {
      std::size_t tagged = 0;
      for (auto p : quant) tagged += c.quant_pool().tag(p) == l ? c.quant_pool().page_bytes() : 0;
      REQUIRE(c.quant_pool().bytes_in_use(l) == tagged);
    }
  };
  std::mt19937 rng(seed);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  int shares = 0;
  for (int step = 0; step < 120; ++step) {
    const int l = pick(0, L - 1), what = step < 3 ? 0 : pick(0, 9);
    layer_op op;
    op.kind = layer_op::append;
    if (what <= 4) {  // append 1..80 tokens (single tokens often, so shared residual pages are written)
      op.n = what <= 1 ? 1 : pick(2, 80);
      op.from = pick(0, N - op.n);
    } else if (what <= 6) {  // keep a random subset of one head
      const int len = c.length(s, l, 0);
      if (len == 0) continue;
      op.kind = layer_op::keep;
      op.head = pick(0, H - 1);
      for (int t = 0; t < c.length(s, l, op.head); ++t)
        if (pick(0, 3) != 0) op.kept.push_back(t);
    } else if (what == 7) {
      op.kind = layer_op::rewind;
      op.n = pick(0, c.seen(s, l));
    } else {  // share: the layer now replays from's calls
      const int from = (l + pick(1, L - 1)) % L;
      const auto traffic = c.traffic().bytes_allocated;
      c.share_layer(s, l, from);
      REQUIRE(c.traffic().bytes_allocated == traffic);
      for (int h = 0; h < H; ++h)
        for (auto p : c.pages(s, l, h)) REQUIRE(c.quant_pool().ref_count(p) >= 2);
      log[std::size_t(l)] = log[std::size_t(from)];
      ++shares;
      check("share_layer");
      continue;
    }
    run(c, s, l, op);
    log[std::size_t(l)].push_back(op);
    check(op.kind == layer_op::append ? "append" : op.kind == layer_op::keep ? "keep" : "rewind");
  }
  REQUIRE(shares >= 8);
  // Bad arguments name themselves and change nothing.
  const snapshot<cache> before(c, s, 1);
  REQUIRE_THROWS_WITH(c.share_layer(s, 1, 1), Catch::Contains("from = 1 = layer"));
  REQUIRE_THROWS_WITH(c.share_layer(s, 1, L), Catch::Contains("from = 3, expected 0..2"));
  REQUIRE_THROWS_WITH(c.share_layer(s, -1, 0), Catch::Contains("layer = -1"));
  REQUIRE_THROWS_WITH(c.share_layer(99, 1, 0), Catch::Contains("unknown sequence id 99"));
  REQUIRE(snapshot<cache>(c, s, 1) == before);
  check("refused calls");
  c.remove_sequence(s);
  REQUIRE(c.bytes_in_use() == 0);
}

}  // namespace

TEST_CASE("share_layer: layers share every page, and a write to a shared page copies it", "[quant][cache][share]") {
  share_test<kivi<2>, kivi<2>>(0, false, 41);
  share_test<int8, int4>(4, false, 42);
  share_test<kivi<4>, kivi<4>>(4, true, 43);
  share_test<fp8<>, int2>(0, true, 44);
}
