// SPDX-License-Identifier: Apache-2.0
// Rotation, dense-and-sparse outliers, pre-RoPE keys; accuracy ordering on key-like inputs.
#include <kvc/cpu/quant_attention.hpp>
#include <kvc/quant/int8.hpp>
#include <kvc/quant/kivi.hpp>
#include <kvc/quant/outliers.hpp>
#include <kvc/quant/rotated.hpp>

#include "kvc_catch.hpp"
#include "quant_test_util.hpp"

using namespace kvc::quant;

namespace {

kvc::quant_cache_config cfg(int H, int D, int P) {
  kvc::quant_cache_config c;
  c.num_layers = 1;
  c.num_kv_heads = H;
  c.head_dim = D;
  c.page_size = P;
  c.max_pages = 2048;
  c.max_fp_pages = 16;
  return c;
}

struct result {
  double vs_gather;  // fused vs dequantize + dense reference
  double vs_exact;   // fused vs attention on the original K/V
};

template <class KQ, class VQ>
result run(int hq, int H, int D, int P, int n, std::uint32_t seed, kvc::quant_cache_config c = {}, KQ kq = {}, VQ vq = {},
           float q_sd = 0.5f) {
  if (c.num_kv_heads != H || c.head_dim != D) {
    auto pre = c;
    c = cfg(H, D, P);
    c.pre_rope = pre.pre_rope;
  }
  kvc::quant_cache<KQ, VQ> cache(c, kq, vq);
  auto s = cache.add_sequence();
  auto k = qtest::keylike(n, H, D, seed), v = qtest::randn(std::size_t(n) * H * D, seed + 1);
  cache.append(s, 0, k.data(), v.data(), n);
  std::vector<std::vector<float>> K(H), V(H), K0(H), V0(H);
  kvc::rope rp(kvc::rope_config{D});
  for (int h = 0; h < H; ++h) {
    K[h].resize(std::size_t(n) * D);
    V[h].resize(K[h].size());
    cache.gather(s, 0, h, K[h].data(), V[h].data());
    for (int t = 0; t < n; ++t) {
      K0[h].insert(K0[h].end(), k.begin() + (std::size_t(t) * H + h) * D, k.begin() + (std::size_t(t) * H + h + 1) * D);
      V0[h].insert(V0[h].end(), v.begin() + (std::size_t(t) * H + h) * D, v.begin() + (std::size_t(t) * H + h + 1) * D);
      if (c.pre_rope) rp.apply(K0[h].data() + std::size_t(t) * D, t);
    }
  }
  auto q = qtest::randn(std::size_t(hq) * D, seed + 2, q_sd);
  std::vector<float> ref(q.size()), exact(q.size()), out(q.size());
  qtest::reference_attention(K, V, D, q.data(), hq, ref.data());
  qtest::reference_attention(K0, V0, D, q.data(), hq, exact.data());
  kvc::decode_options o;
  kvc::cpu::decode_attention(cache, s, 0, q.data(), hq, out.data(), o);
  double num = 0, den = 0;  // relative L2 error against the unquantized attention
  for (std::size_t i = 0; i < out.size(); ++i) {
    num += (double(out[i]) - exact[i]) * (double(out[i]) - exact[i]);
    den += double(exact[i]) * exact[i];
  }
  return {qtest::rel_err(out.data(), ref.data(), out.size()), std::sqrt(num / den)};
}

using kivi2r0 = kivi<2, 32, 0>;

}  // namespace

TEST_CASE("rotated, outliers and pre-RoPE caches: fused attention matches gather + reference", "[quant][features]") {
  for (int P : {32, 64}) {
    CHECK(run<rotated<int2>, rotated<int4>>(8, 2, 64, P, 300, 1).vs_gather < 1e-5);
    CHECK(run<rotated<kivi<2>>, rotated<kivi<2>>>(9, 3, 64, P, 300, 2).vs_gather < 1e-5);
    CHECK(run<rotated<int8, false>, int8>(4, 4, 128, P, 200, 3).vs_gather < 1e-5);
    CHECK(run<outliers<int2>, outliers<int4>>(8, 2, 64, P, 300, 4).vs_gather < 1e-5);
    CHECK(run<outliers<kivi<2>>, outliers<kivi<2>>>(8, 2, 64, P, 300, 5).vs_gather < 1e-5);
    CHECK(run<rotated<outliers<int2>>, int4>(8, 2, 64, P, 300, 6).vs_gather < 1e-5);
    kvc::quant_cache_config pre;
    pre.pre_rope = true;
    CHECK(run<kivi<2>, kivi<2>>(8, 2, 64, P, 300, 7, pre).vs_gather < 1e-5);
    CHECK(run<rotated<int4>, int4>(8, 2, 64, P, 300, 8, pre).vs_gather < 1e-5);
  }
}

TEST_CASE("pre-RoPE keys: attention equals RoPE-then-attend on the original keys", "[quant][features]") {
  kvc::quant_cache_config pre;
  pre.pre_rope = true;
  // int8 keys: small error against attention over keys rotated to their positions
  const auto r = run<int8, int8>(8, 2, 64, 32, 300, 9, pre);
  CHECK(r.vs_gather < 1e-5);
  CHECK(r.vs_exact < 5e-2);  // int8 keys alone cost ~2e-2 on these inputs
}

TEST_CASE("on key-like inputs the error is ordered int8 < int4 < int2; outliers lower int2, rotation lowers int4",
          "[quant][features][accuracy]") {
  double e8 = 0, e4 = 0, e2 = 0, e4rot = 0, e2rot = 0, e2out = 0, ek2 = 0, ek2rot = 0;
  for (std::uint32_t seed = 100; seed < 104; ++seed) {
    e8 += run<int8, int8>(8, 2, 128, 32, 512, seed, {}, {}, {}, 0.15f).vs_exact;
    e4 += run<int4, int4>(8, 2, 128, 32, 512, seed, {}, {}, {}, 0.15f).vs_exact;
    e2 += run<int2, int2>(8, 2, 128, 32, 512, seed, {}, {}, {}, 0.15f).vs_exact;
    e4rot += run<rotated<int4>, rotated<int4>>(8, 2, 128, 32, 512, seed, {}, {}, {}, 0.15f).vs_exact;
    e2rot += run<rotated<int2>, rotated<int2>>(8, 2, 128, 32, 512, seed, {}, {}, {}, 0.15f).vs_exact;
    // 4 of the 128 channels are outliers here: keep 4% of each token sparse (KVQuant default: 1%)
    e2out += run<outliers<int2>, outliers<int2>>(8, 2, 128, 32, 512, seed, {}, outliers<int2>(0.04f), outliers<int2>(0.04f), 0.15f).vs_exact;
    ek2 += run<kivi2r0, kivi2r0>(8, 2, 128, 32, 512, seed, {}, {}, {}, 0.15f).vs_exact;
    ek2rot += run<rotated<kivi2r0>, rotated<kivi2r0>>(8, 2, 128, 32, 512, seed, {}, {}, {}, 0.15f).vs_exact;
  }
  INFO("int8 " << e8 / 4 << " int4 " << e4 / 4 << " rotated int4 " << e4rot / 4 << " int2 " << e2 / 4
               << " rotated int2 " << e2rot / 4 << " outliers int2 " << e2out / 4 << " kivi2 " << ek2 / 4
               << " rotated kivi2 " << ek2rot / 4);
  CHECK(e8 < e4);
  CHECK(e4 < e2);
  // Outlier handling lowers the int2 error (measured 0.37 vs 0.54 relative L2), and so do
  // per-channel keys (KIVI's observation; 0.42).
  CHECK(e2out < e2);
  CHECK(ek2 < e2);
  // Rotation lowers the error where the codes can resolve the rotated row: int4, 0.13 vs 0.18
  // (keys alone, int8 values: 0.077 vs 0.148).
  CHECK(e4rot < e4);
  // ...but not at int2, for a reason worth pinning down: the generator's outliers are 4 channels
  // with a nearly constant 10-50x value. Unrotated, a per-token int2 step (range / 3, ~17) puts
  // the 124 ordinary channels on one code (error ~ their own N(0,1) value) and the error sits in
  // 4 channels; rotated, the outliers become a dense +-15 pattern over all 128 channels, the range
  // shrinks only ~1.7x, and every channel carries an error of ~step/sqrt(12) ~ 3: about 4x the
  // error energy. Measured 0.62 vs 0.54 (0.53 vs 0.45 with 32-channel groups, 0.97 vs 0.82
  // symmetric; rotated kivi2 0.42 = kivi2, as a per-channel offset rotates into another one).
  // Asserted so that a change in either codec that alters this shows up.
  CHECK(e2rot > e2);
  WARN("int8 " << e8 / 4 << " int4 " << e4 / 4 << " rotated int4 " << e4rot / 4 << " int2 " << e2 / 4
               << " rotated int2 " << e2rot / 4 << " outliers int2 " << e2out / 4 << " kivi2 " << ek2 / 4
               << " rotated kivi2 " << ek2rot / 4);
}

TEST_CASE("rotation needs a power-of-two head_dim", "[quant][features]") {
  REQUIRE_THROWS_WITH((kvc::quant_cache<rotated<int8>, int8>(cfg(2, 96, 32))),
                      Catch::Contains("head_dim = 96") && Catch::Contains("power of two"));
  REQUIRE_THROWS_WITH((kvc::quant_cache<outliers<int8>, int8>(cfg(2, 64, 32), outliers<int8>(0.9f))),
                      Catch::Contains("fraction = 0.9"));
}
