// SPDX-License-Identifier: Apache-2.0
// kvc::cpu::decode_attention against the dense double reference of support/dense_reference.hpp on
// random data: head_dim {64, 128, 256}, page_size {1, 16, 64}, GQA groups {1, 4, 8, 12}, ragged
// per-head lengths including 0 and 1, fp32/fp16/bf16 pages, serial and threaded (small and
// automatic split-K), every output (out, lse, probs, group_probs, each probability output alone
// and both together); through kv_cache, through
// same_heads over dense NHD/HND views, a paged HDN view (element path) and a sink-window view.
//
// Tolerance: the kernel works in float (fp16/bf16 inputs are exactly representable floats, so the
// reference sees the very values the kernel reads). Scores are ~unit size with head_dim <= 256,
// so float dot products err by ~1e-6 relative; the online softmax and split-K merge add a few
// float roundings per tile. We require |out - ref| <= 2e-5 * max|V| of the head (outputs are
// convex combinations of V rows), |lse - ref| <= 2e-5 * max(1, |ref|), and probabilities within
// 2e-5 * p + 1e-7: about 100x float epsilon, and 100x below what a wrong token, a wrong scale or
// a lost split would cost.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <kvc/attention/reference.hpp>
#include <kvc/cpu/decode_attention.hpp>
#include <kvc/parallel/thread_pool.hpp>
#include <kvc/store/kv_cache.hpp>
#include <kvc/view/heads.hpp>
#include <kvc/view/layout_dense.hpp>
#include <kvc/view/layout_paged.hpp>
#include <kvc/view/layout_sink_window.hpp>

#include "cache_builders.hpp"
#include "dense_reference.hpp"
#include "fast_require.hpp"
#include "isa_check.hpp"
#include "kvc_catch.hpp"
#include "random.hpp"

namespace {

constexpr double tol = 2e-5;

struct outputs {
  std::vector<float> out, lse, probs, group_probs;
  std::int32_t stride;
  outputs(std::int32_t hq, std::int32_t hkv, std::int32_t D, std::int32_t stride_)
      : out(static_cast<std::size_t>(hq) * D, std::numeric_limits<float>::quiet_NaN()),
        lse(static_cast<std::size_t>(hq), std::numeric_limits<float>::quiet_NaN()),
        probs(static_cast<std::size_t>(hq) * std::max(stride_, 1), -1.0f),
        group_probs(static_cast<std::size_t>(hkv) * std::max(stride_, 1), -1.0f),
        stride(stride_) {}
  /// probs_too: both probability outputs; which = 1: probs alone, 2: group_probs alone (the
  /// kernel then keeps its scores in its own buffers, a different path from the caller's probs).
  kvc::decode_options options(kvc::thread_pool* pool, std::int32_t split, bool probs_too, int which = 3) {
    kvc::decode_options o;
    o.pool = pool;
    o.split_tokens = split;
    o.lse = lse.data();
    if (probs_too) {
      if (which & 1) o.probs = probs.data();
      if (which & 2) o.group_probs = group_probs.data();
      o.probs_stride = stride;
    }
    return o;
  }
};

/// Compares every output with the dense reference over `heads`.
kvc_test::dense_attention_result reference(const std::vector<kvc_test::dense_head>& heads, std::int32_t D,
                                           const std::vector<float>& q, std::int32_t hq) {
  return kvc_test::dense_decode_attention(heads, D, q.data(), hq, 1.0 / std::sqrt(static_cast<double>(D)));
}

void require_close(const std::vector<kvc_test::dense_head>& heads, const kvc_test::dense_attention_result& ref,
                   std::int32_t D, std::int32_t hq, const outputs& got, bool probs_too, int which = 3) {
  const std::int32_t G = hq / static_cast<std::int32_t>(heads.size());
  for (std::int32_t qh = 0; qh < hq; ++qh) {
    const auto& H = heads[static_cast<std::size_t>(qh / G)];
    double vmax = 0;
    for (double x : H.v) vmax = std::max(vmax, std::fabs(x));
    for (std::int32_t d = 0; d < D; ++d) {
      const std::size_t i = static_cast<std::size_t>(qh) * D + d;
      KVC_REQUIRE(std::fabs(got.out[i] - ref.out[i]) <= tol * vmax,
                  "out qh=" << qh << " d=" << d << " got " << got.out[i] << " want " << ref.out[i] << " n=" << H.n);
    }
    const double rl = ref.lse[static_cast<std::size_t>(qh)];
    const float gl = got.lse[static_cast<std::size_t>(qh)];
    if (H.n == 0) {
      KVC_REQUIRE((std::isinf(gl) && gl < 0), "lse of an empty head qh=" << qh << " got " << gl);
    } else {
      KVC_REQUIRE(std::fabs(gl - rl) <= tol * std::max(1.0, std::fabs(rl)), "lse qh=" << qh << " got " << gl << " want " << rl);
    }
    if (!probs_too || !(which & 1)) continue;
    for (std::int32_t t = 0; t < H.n; ++t) {
      const double rp = ref.probs[static_cast<std::size_t>(qh) * ref.stride + t];
      const float gp = got.probs[static_cast<std::size_t>(qh) * got.stride + t];
      KVC_REQUIRE(std::fabs(gp - rp) <= tol * rp + 1e-7, "probs qh=" << qh << " t=" << t << " got " << gp << " want " << rp);
    }
  }
  if (!probs_too || !(which & 2)) return;
  for (std::size_t h = 0; h < heads.size(); ++h)
    for (std::int32_t t = 0; t < heads[h].n; ++t) {
      const double rp = ref.group_probs[h * static_cast<std::size_t>(ref.stride) + static_cast<std::size_t>(t)];
      const float gp = got.group_probs[h * static_cast<std::size_t>(got.stride) + static_cast<std::size_t>(t)];
      KVC_REQUIRE(std::fabs(gp - rp) <= tol * rp + G * 1e-7, "group_probs h=" << h << " t=" << t << " got " << gp << " want " << rp);
    }
}

/// A cache of one layer whose heads hold `lens` tokens (appended in random chunks, then kept as
/// random subsets), and the model of what it holds.
template <class T>
struct cache_case {
  kvc::kv_cache<T> cache;
  kvc_test::dense_cache_model model;
  kvc::seq_id s;
  cache_case(std::int32_t D, std::int32_t P, const std::vector<std::int32_t>& lens, kvc_test::rng& r)
      : cache(config(D, P, static_cast<std::int32_t>(lens.size()), lens)) {
    const std::int32_t hkv = static_cast<std::int32_t>(lens.size());
    model.layers = 1;
    model.heads = hkv;
    model.dim = D;
    s = cache.add_sequence();
    model.add_sequence(s);
    const std::int32_t total = *std::max_element(lens.begin(), lens.end()) + r.integer(0, 40);
    kvc_test::append_random_chunks<T>(cache, model, s, 0, total, 200, 0.3, r);
    for (std::int32_t h = 0; h < hkv; ++h) {
      const auto kept = r.subset(total, lens[static_cast<std::size_t>(h)]);
      cache.keep(s, 0, h, kept.data(), static_cast<std::int32_t>(kept.size()));
      model.keep(s, 0, h, kept);
    }
  }
  static kvc::cache_config config(std::int32_t D, std::int32_t P, std::int32_t hkv, const std::vector<std::int32_t>&) {
    kvc::cache_config c;
    c.num_kv_heads = hkv;
    c.head_dim = D;
    c.page_size = P;
    c.max_pages = 1 << 14;
    return c;
  }
  std::vector<kvc_test::dense_head> heads() const {
    std::vector<kvc_test::dense_head> hs;
    for (std::int32_t h = 0; h < model.heads; ++h) hs.push_back(model.head(s, 0, h));
    return hs;
  }
};

template <class T>
void run_cache_case(std::int32_t D, std::int32_t P, std::int32_t G, std::uint64_t seed, kvc::thread_pool& pool) {
  kvc_test::rng r(seed);
  const std::int32_t max_len = D == 256 ? 300 : D == 128 ? 500 : 700;
  // Ragged lengths: an empty head, a single token, and random ones.
  std::vector<std::int32_t> lens = {0, 1, r.integer(2, max_len), r.integer(P, max_len)};
  std::shuffle(lens.begin(), lens.end(), r.engine());
  if (G >= 8) lens.resize(2 + static_cast<std::size_t>(r.integer(0, 1)));  // fewer heads for big groups
  const std::int32_t hkv = static_cast<std::int32_t>(lens.size()), hq = hkv * G;
  cache_case<T> cc(D, P, lens, r);
  const auto heads = cc.heads();
  const auto q = r.normals(static_cast<std::size_t>(hq) * D, 1.5f);
  const std::int32_t longest = *std::max_element(lens.begin(), lens.end());
  struct variant {
    kvc::thread_pool* pool;
    std::int32_t split;
    bool probs;
    int which;  // 1 probs, 2 group_probs, 3 both
  };
  const auto ref = reference(heads, D, q, hq);
  // Probabilities are finished either by the task that covers a whole (head, group block) (serial,
  // unsplit) or after the merge (split tasks, groups above 8): every output combination on both.
  for (const variant& vt :
       {variant{nullptr, 0, true, 3}, variant{nullptr, 0, true, 1}, variant{nullptr, 0, true, 2},
        variant{nullptr, 37, false, 3}, variant{nullptr, 37, true, 2}, variant{&pool, 0, true, 3},
        variant{&pool, 0, true, 2}, variant{&pool, 7, false, 3}, variant{&pool, 64, true, 3},
        variant{&pool, 64, true, 2}, variant{&pool, 64, true, 1}}) {
    INFO(kvc::type_name<T>() << " D=" << D << " P=" << P << " G=" << G << " hkv=" << hkv << " threads="
                             << (vt.pool ? vt.pool->size() : 1) << " split=" << vt.split << " which=" << vt.which);
    outputs o(hq, hkv, D, longest + (vt.probs ? r.integer(0, 3) : 0));
    kvc::cpu::decode_attention(cc.cache, cc.s, 0, q.data(), hq, o.out.data(),
                               o.options(vt.pool, vt.split, vt.probs, vt.which));
    require_close(heads, ref, D, hq, o, vt.probs, vt.which);
  }
}

/// Dense data for the same_heads views: n tokens of H heads.
struct dense_kv {
  std::int32_t n, H, D;
  std::vector<float> k, v;  // [n][H][D]
  dense_kv(std::int32_t n_, std::int32_t H_, std::int32_t D_, kvc_test::rng& r)
      : n(n_), H(H_), D(D_), k(r.normals(static_cast<std::size_t>(n_) * H_ * D_)), v(r.normals(k.size())) {}
  float at(const std::vector<float>& x, std::int32_t t, std::int32_t h, std::int32_t d) const {
    return x[(static_cast<std::size_t>(t) * H + h) * D + d];
  }
  std::vector<kvc_test::dense_head> heads(const std::vector<std::int32_t>& tokens) const {
    std::vector<kvc_test::dense_head> hs(static_cast<std::size_t>(H));
    for (std::int32_t h = 0; h < H; ++h) {
      auto& dh = hs[static_cast<std::size_t>(h)];
      dh.n = static_cast<std::int32_t>(tokens.size());
      for (std::int32_t t : tokens)
        for (std::int32_t d = 0; d < D; ++d) dh.k.push_back(at(k, t, h, d)), dh.v.push_back(at(v, t, h, d));
    }
    return hs;
  }
  std::vector<std::int32_t> all() const {
    std::vector<std::int32_t> t(static_cast<std::size_t>(n));
    for (std::int32_t i = 0; i < n; ++i) t[static_cast<std::size_t>(i)] = i;
    return t;
  }
};

template <class Heads>
void check_heads(const Heads& hv, const std::vector<kvc_test::dense_head>& ref, std::int32_t D, std::int32_t G,
                 kvc::thread_pool& pool, kvc_test::rng& r) {
  const std::int32_t hkv = static_cast<std::int32_t>(ref.size()), hq = hkv * G;
  const auto q = r.normals(static_cast<std::size_t>(hq) * D, 1.5f);
  const auto rf = reference(ref, D, q, hq);
  for (kvc::thread_pool* p : {static_cast<kvc::thread_pool*>(nullptr), &pool})
    for (int which : {3, 2}) {
      INFO("threads=" << (p ? p->size() : 1) << " which=" << which);
      outputs o(hq, hkv, D, ref[0].n);
      kvc::cpu::decode_attention(hv, q.data(), hq, o.out.data(), o.options(p, p ? 16 : 0, true, which));
      require_close(ref, rf, D, hq, o, true, which);
    }
}

}  // namespace

TEST_CASE("decode attention through kv_cache equals the dense reference", "[attention]") {
  kvc::thread_pool pool(3);
  const std::int32_t Gs[] = {1, 4, 8, 12};
  int i = 0;
  for (std::int32_t D : {64, 128, 256}) {
    for (std::int32_t P : {1, 16, 64}) {
      const std::int32_t G = Gs[i % 4];
      run_cache_case<float>(D, P, G, 1000 + static_cast<std::uint64_t>(i), pool);
      run_cache_case<kvc::half>(D, P, Gs[(i + 1) % 4], 2000 + static_cast<std::uint64_t>(i), pool);
      run_cache_case<kvc::bfloat16>(D, P, Gs[(i + 2) % 4], 3000 + static_cast<std::uint64_t>(i), pool);
      ++i;
    }
  }
}

TEST_CASE("decode attention over same_heads of dense NHD and HND views", "[attention]") {
  kvc::thread_pool pool(2);
  kvc_test::rng r(50);
  for (std::int32_t n : {1, 100, 300}) {
    const std::int32_t H = 2, D = 64, G = 4;
    const dense_kv x(n, H, D, r);
    INFO("n=" << n);
    using VN = kvc::kv_view<const float, kvc::kv_dextents<>, kvc::layout_nhd>;
    const VN kn(x.k.data(), VN::mapping_type(kvc::kv_dextents<>(n, H, D)));
    const VN vn(x.v.data(), VN::mapping_type(kvc::kv_dextents<>(n, H, D)));
    check_heads(kvc::make_same_heads(kn, vn), x.heads(x.all()), D, G, pool, r);
    // HND with spare capacity, static heads and head_dim.
    const std::int32_t cap = n + 5;
    std::vector<float> kh(static_cast<std::size_t>(H) * cap * D, std::numeric_limits<float>::quiet_NaN()), vh(kh);
    for (std::int32_t t = 0; t < n; ++t)
      for (std::int32_t h = 0; h < H; ++h)
        for (std::int32_t d = 0; d < D; ++d) {
          kh[(static_cast<std::size_t>(h) * cap + t) * D + d] = x.at(x.k, t, h, d);
          vh[(static_cast<std::size_t>(h) * cap + t) * D + d] = x.at(x.v, t, h, d);
        }
    using VH = kvc::kv_view<const float, kvc::kv_extents<2, 64>, kvc::layout_hnd>;
    const VH khv(kh.data(), VH::mapping_type(kvc::kv_extents<2, 64>(n), cap));
    const VH vhv(vh.data(), VH::mapping_type(kvc::kv_extents<2, 64>(n), cap));
    check_heads(kvc::make_same_heads(khv, vhv), x.heads(x.all()), D, G, pool, r);
  }
}

TEST_CASE("decode attention over a paged HDN view (element path) and a sink-window view", "[attention]") {
  kvc::thread_pool pool(2);
  kvc_test::rng r(51);
  const std::int32_t H = 2, D = 64, G = 3;
  for (std::int32_t P : {1, 16}) {
    const std::int32_t n = 150;
    const dense_kv x(n, H, D, r);
    const std::int32_t pages = (n + P - 1) / P;
    auto table = r.permutation(pages + 2);
    table.resize(static_cast<std::size_t>(pages));
    const std::size_t page = static_cast<std::size_t>(P) * H * D;
    std::vector<float> kp((static_cast<std::size_t>(pages) + 2) * page, std::numeric_limits<float>::quiet_NaN()), vp(kp);
    for (std::int32_t t = 0; t < n; ++t)
      for (std::int32_t h = 0; h < H; ++h)
        for (std::int32_t d = 0; d < D; ++d) {  // [head][dim][slot] inside a page
          const std::size_t o = static_cast<std::size_t>(table[static_cast<std::size_t>(t / P)]) * page +
                                (static_cast<std::size_t>(h) * D + d) * P + static_cast<std::size_t>(t % P);
          kp[o] = x.at(x.k, t, h, d);
          vp[o] = x.at(x.v, t, h, d);
        }
    using V = kvc::kv_view<const float, kvc::kv_dextents<>, kvc::layout_paged<kvc::page_order::hdn>>;
    const V kv(kp.data(), V::mapping_type(kvc::kv_dextents<>(n, H, D), table.data(), P));
    const V vv(vp.data(), V::mapping_type(kvc::kv_dextents<>(n, H, D), table.data(), P));
    INFO("hdn P=" << P);
    check_heads(kvc::make_same_heads(kv, vv), x.heads(x.all()), D, G, pool, r);
  }
  // Sink window: 4 sinks, a ring of 64, 150 tokens seen (the ring has wrapped twice).
  const std::int32_t sink = 4, window = 64, seen = 150;
  const dense_kv x(seen, H, D, r);
  std::vector<float> kr(static_cast<std::size_t>(sink + window) * H * D), vr(kr.size());
  for (std::int32_t g = 0; g < seen; ++g) {
    const std::int32_t slot = g < sink ? g : sink + (g - sink) % window;
    for (std::int32_t h = 0; h < H; ++h)
      for (std::int32_t d = 0; d < D; ++d) {
        kr[(static_cast<std::size_t>(slot) * H + h) * D + d] = x.at(x.k, g, h, d);
        vr[(static_cast<std::size_t>(slot) * H + h) * D + d] = x.at(x.v, g, h, d);
      }
  }
  std::vector<std::int32_t> visible;
  for (std::int32_t g = 0; g < sink; ++g) visible.push_back(g);
  for (std::int32_t g = seen - window; g < seen; ++g) visible.push_back(g);
  using W = kvc::kv_view<const float, kvc::kv_dextents<>, kvc::layout_sink_window>;
  const kvc::kv_dextents<> e(sink + window, H, D);
  const W kw(kr.data(), W::mapping_type(e, sink, window, seen));
  const W vw(vr.data(), W::mapping_type(e, sink, window, seen));
  INFO("sink window");
  check_heads(kvc::make_same_heads(kw, vw), x.heads(visible), D, G, pool, r);
}

TEST_CASE("kvc::reference::decode_attention agrees with the independent dense reference", "[attention]") {
  kvc_test::rng r(52);
  kvc::thread_pool pool(1);
  cache_case<float> cc(64, 16, {0, 1, 77}, r);
  const auto q = r.normals(3 * 2 * 64);
  outputs o(6, 3, 64, 77);
  std::vector<kvc::kv_cache<float>::view_type> buf;
  kvc::reference::decode_attention(cc.cache.layer(cc.s, 0, buf), q.data(), 6, o.out.data(), o.options(nullptr, 0, true));
  require_close(cc.heads(), reference(cc.heads(), 64, q, 6), 64, 6, o, true);
}

TEST_CASE("the SIMD path under test", "[attention][isa]") {
  // The _avx2 build's static_asserts (isa_check.hpp) already fail to compile on the wrong path;
  // this names the path in the log and checks the run-time name xsimd gives the arch.
  const std::string path = kvc_test::simd_path();
  WARN("decode attention kernels: " << path);
  CHECK(!path.empty());
  if (kvc_test::expect_avx2()) REQUIRE(path.find("avx2") != std::string::npos);
  if (kvc_test::expect_avx512()) REQUIRE(path.find("avx512") != std::string::npos);
}

TEST_CASE("the kernels' binary16 and bfloat16 loads give kvc::half's and kvc::bfloat16's floats, bit for bit",
          "[attention][isa]") {
  // Every one of the 65,536 bit patterns, W lanes at a time, through this build's load_as_float:
  // F16C (AVX2), AVX-512, SSE2's integer conversion (portable x86-64 build) or the scalar loop.
  using A = kvc::cpu::default_arch;
  constexpr std::size_t W = kvc::cpu::fbatch<A>::size;
  std::vector<std::uint16_t> bits(65536 + W);
  for (std::size_t i = 0; i < bits.size(); ++i) bits[i] = static_cast<std::uint16_t>(i);
  int bad_h = 0, bad_b = 0;
  for (std::size_t i = 0; i < 65536; i += W) {
    std::vector<kvc::half> h(W);
    std::vector<kvc::bfloat16> b(W);
    std::memcpy(h.data(), bits.data() + i, W * 2);
    std::memcpy(b.data(), bits.data() + i, W * 2);
    alignas(64) float fh[W], fb[W];
    kvc::cpu::load_as_float<A>(h.data()).store_aligned(fh);
    kvc::cpu::load_as_float<A>(b.data()).store_aligned(fb);
    for (std::size_t j = 0; j < W; ++j) {
      const float rh = static_cast<float>(h[j]), rb = static_cast<float>(b[j]);
      std::uint32_t gh, wh, gb, wb;
      std::memcpy(&gh, &fh[j], 4), std::memcpy(&wh, &rh, 4), std::memcpy(&gb, &fb[j], 4), std::memcpy(&wb, &rb, 4);
      if (gh != wh && bad_h++ < 3) FAIL_CHECK("binary16 0x" << std::hex << bits[i + j] << ": 0x" << gh << ", want 0x" << wh);
      if (gb != wb && bad_b++ < 3) FAIL_CHECK("bfloat16 0x" << std::hex << bits[i + j] << ": 0x" << gb << ", want 0x" << wb);
    }
  }
  REQUIRE(bad_h == 0);
  REQUIRE(bad_b == 0);
}

TEST_CASE("kvc::cpu::haddp puts the sum of row i in lane i", "[attention][isa]") {
  /// score_block reduces T x G dot products with one transposed horizontal add per W of them; a
  /// lane order that is off (xsimd 8.1's avx512 haddp returns 0 1 4 5 2 3 6 7 ...) scores every
  /// token with another token's key. Every row here has a different sum (a distinct large lane
  /// at a different position per row, small integers elsewhere: exact in float), so any
  /// permutation of the result fails.
  using arch = kvc::cpu::default_arch;
  using B = kvc::cpu::fbatch<arch>;
  constexpr std::size_t W = B::size;
  B rows[W];
  double want[W];
  for (std::size_t i = 0; i < W; ++i) {
    alignas(64) float buf[W];
    want[i] = 0.0;
    for (std::size_t j = 0; j < W; ++j) {
      buf[j] = static_cast<float>((i + 1) * (j + 3) % 37) + (j == (i * 5) % W ? 1000.0f * static_cast<float>(i + 1) : 0.0f);
      want[i] += buf[j];
    }
    rows[i] = B::load_aligned(buf);
  }
  alignas(64) float got[W];
  kvc::cpu::haddp<arch>(rows).store_aligned(got);
  for (std::size_t i = 0; i < W; ++i) {
    INFO("lane " << i << " of " << W << " (" << arch::name() << ")");
    CHECK(static_cast<double>(got[i]) == want[i]);
  }
}

namespace {

/// What a failed call must leave as it was: the caller's buffers (filled with a sentinel) and the
/// cache (its sequences, every stream's length and the pool's bytes).
struct untouched {
  std::vector<float> out, lse, probs;
  kvc::decode_options opt;
  untouched(std::int32_t hq, std::int32_t D, std::int32_t stride)
      : out(static_cast<std::size_t>(hq) * D, 123.0f), lse(static_cast<std::size_t>(hq), 123.0f),
        probs(static_cast<std::size_t>(hq) * std::max(stride, 1), 123.0f) {
    opt.lse = lse.data();
    opt.probs = probs.data();
    opt.probs_stride = stride;
  }
  bool same() const {
    auto all = [](const std::vector<float>& x) {
      return std::all_of(x.begin(), x.end(), [](float y) { return y == 123.0f; });
    };
    return all(out) && all(lse) && all(probs);
  }
};

template <class Cache>
std::vector<std::int64_t> cache_state(const Cache& c, const std::vector<kvc::seq_id>& seqs) {
  std::vector<std::int64_t> st{static_cast<std::int64_t>(c.num_sequences()), static_cast<std::int64_t>(c.bytes_in_use())};
  for (kvc::seq_id s : seqs)
    for (std::int32_t l = 0; l < c.config().num_layers; ++l)
      for (std::int32_t h = 0; h < c.config().num_kv_heads; ++h) st.push_back(c.length(s, l, h));
  return st;
}

}  // namespace

TEST_CASE("decode attention errors name the call, the argument, the value and the expectation", "[attention][errors]") {
  kvc_test::rng r(54);
  cache_case<float> cc(8, 4, {3, 5}, r);  // one layer, 2 kv heads, D = 8
  const kvc::seq_id empty = cc.cache.add_sequence();
  const std::vector<kvc::seq_id> live{cc.s, empty};
  const auto before = cache_state(cc.cache, live);
  std::vector<float> q(4 * 8, 0.5f);
  untouched u(4, 8, 5);
  using Catch::Contains;
  // An unknown sequence: named as decode_attention's argument, not as kv_cache::layer's.
  REQUIRE_THROWS_WITH(kvc::cpu::decode_attention(cc.cache, 77, 0, q.data(), 4, u.out.data(), u.opt),
                      Contains("kvc::cpu::decode_attention: seq = 77 is not a live sequence") &&
                          Contains("expected one of its 2 live sequence ids"));
  // A layer out of range.
  REQUIRE_THROWS_WITH(kvc::cpu::decode_attention(cc.cache, cc.s, 1, q.data(), 4, u.out.data(), u.opt),
                      Contains("kvc::cpu::decode_attention: layer = 1, expected 0..0"));
  REQUIRE_THROWS_WITH(kvc::cpu::decode_attention(cc.cache, cc.s, -1, q.data(), 4, u.out.data(), u.opt),
                      Contains("kvc::cpu::decode_attention: layer = -1, expected 0..0"));
  // A sequence with no token: an error, not zeros.
  REQUIRE_THROWS_WITH(kvc::cpu::decode_attention(cc.cache, empty, 0, q.data(), 4, u.out.data(), u.opt),
                      Contains("kvc::cpu::decode_attention: seq = " + std::to_string(empty) +
                               ", layer = 0 holds 0 tokens in all its kv heads, expected at least one token"));
  // Arguments of the attention itself.
  REQUIRE_THROWS_WITH(kvc::cpu::decode_attention(cc.cache, cc.s, 0, q.data(), 3, u.out.data(), u.opt),
                      Contains("kvc::cpu::decode_attention: num_q_heads = 3, expected a positive multiple of "
                               "num_kv_heads = 2"));
  q[5] = std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_WITH(kvc::cpu::decode_attention(cc.cache, cc.s, 0, q.data(), 4, u.out.data(), u.opt),
                      Contains("kvc::cpu::decode_attention: q[5] = inf, expected a finite query"));
  q[5] = 0.5f;
  u.opt.probs_stride = 4;
  REQUIRE_THROWS_WITH(kvc::cpu::decode_attention(cc.cache, cc.s, 0, q.data(), 4, u.out.data(), u.opt),
                      Contains("kvc::cpu::decode_attention: probs_stride = 4, expected >= the longest stream (5 tokens)"));
  u.opt.probs_stride = 5;
  CHECK(u.same());
  CHECK(cache_state(cc.cache, live) == before);
  // Every head evicted to nothing is the empty case too; one empty head among others is not
  // (its output is zeros and its lse -inf, checked against the reference above).
  for (std::int32_t h = 0; h < 2; ++h) cc.cache.keep(cc.s, 0, h, nullptr, 0);
  REQUIRE_THROWS_WITH(kvc::cpu::decode_attention(cc.cache, cc.s, 0, q.data(), 4, u.out.data(), u.opt),
                      Contains("holds 0 tokens in all its kv heads"));
  CHECK(u.same());
  // The same_heads overload over views of 0 tokens.
  using VN = kvc::kv_view<const float, kvc::kv_dextents<>, kvc::layout_nhd>;
  const float dummy = 0.0f;
  const VN k0(&dummy, VN::mapping_type(kvc::kv_dextents<>(0, 2, 8)));
  REQUIRE_THROWS_WITH(kvc::cpu::decode_attention(kvc::make_same_heads(k0, k0), q.data(), 4, u.out.data(), u.opt),
                      Contains("kvc::cpu::decode_attention: every one of the 2 kv heads holds 0 tokens"));
  CHECK(u.same());
}

TEST_CASE("kv_cache errors name the public call and list what was expected", "[attention][errors]") {
  kvc_test::rng r(55);
  cache_case<float> cc(8, 4, {3, 5}, r);
  std::vector<kvc::kv_cache<float>::view_type> buf;
  using Catch::Contains;
  REQUIRE_THROWS_WITH(cc.cache.layer(77, 0, buf), Contains("kvc::kv_cache::layer: unknown sequence id 77 (argument seq), "
                                                           "expected a live sequence id: {" + std::to_string(cc.s) + "}"));
  cc.cache.remove_sequence(cc.s);
  REQUIRE_THROWS_WITH(cc.cache.length(cc.s, 0, 0), Contains("kvc::kv_cache::length: unknown sequence id " +
                                                            std::to_string(cc.s) + " (argument seq), expected a live "
                                                                                   "sequence id: none"));
  kvc::cache_config c;
  c.num_layers = 0;
  REQUIRE_THROWS_WITH(kvc::kv_cache<float>(c), Contains("kvc::kv_cache::kv_cache: cache_config.num_layers = 0, expected > 0"));
  c.num_layers = 1;
  c.page_size = 12;
  REQUIRE_THROWS_WITH(kvc::kv_cache<float>(c), Contains("kvc::kv_cache::kv_cache: cache_config.page_size = 12"));
  kvc::kv_cache<float> ok(cache_case<float>::config(8, 4, 1, {}));
  const auto s = ok.add_sequence();
  std::vector<float> k(8 * 2, 1.0f);
  REQUIRE_THROWS_WITH(ok.append(s, 0, k.data(), k.data(), -1), Contains("kvc::kv_cache::append: n = -1, expected >= 0"));
  REQUIRE_THROWS_WITH(ok.keep(s, 0, 3, nullptr, 0), Contains("kvc::kv_cache::keep: head = 3, expected 0..0"));
  CHECK(ok.length(s, 0, 0) == 0);
}

TEST_CASE("decode attention rejects bad arguments", "[attention][errors]") {
  kvc_test::rng r(53);
  cache_case<float> cc(8, 4, {3, 5}, r);
  std::vector<float> q(4 * 8, 0.5f), out(4 * 8);
  REQUIRE_THROWS_WITH(kvc::cpu::decode_attention(cc.cache, cc.s, 0, q.data(), 3, out.data()),
                      Catch::Contains("num_q_heads = 3"));
  REQUIRE_THROWS_WITH(kvc::cpu::decode_attention(cc.cache, cc.s, 0, q.data(), 0, out.data()),
                      Catch::Contains("num_q_heads = 0"));
  q[5] = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_WITH(kvc::cpu::decode_attention(cc.cache, cc.s, 0, q.data(), 4, out.data()), Catch::Contains("q[5]"));
  q[5] = 0.5f;
  std::vector<float> probs(4 * 5);
  kvc::decode_options o;
  o.probs = probs.data();
  o.probs_stride = 4;
  REQUIRE_THROWS_WITH(kvc::cpu::decode_attention(cc.cache, cc.s, 0, q.data(), 4, out.data(), o),
                      Catch::Contains("probs_stride = 4"));
  REQUIRE_THROWS_WITH(kvc::cpu::decode_attention(cc.cache, cc.s, 0, static_cast<const float*>(nullptr), 4, out.data()),
                      Catch::Contains("null"));
  REQUIRE_THROWS_WITH(kvc::cpu::decode_attention(cc.cache, cc.s, 1, q.data(), 4, out.data()), Catch::Contains("layer = 1"));
}

namespace {

/// A batch of sequences of one kv_cache layer with ragged streams (an empty head, a one-token
/// head, random lengths; one sequence may be short, another long), and their dense model.
template <class T>
struct batch_case {
  kvc::kv_cache<T> cache;
  kvc_test::dense_cache_model model;
  std::vector<kvc::seq_id> seqs;
  batch_case(std::int32_t D, std::int32_t P, std::int32_t hkv, std::int32_t n, std::int32_t max_len, kvc_test::rng& r)
      : cache(cache_case<T>::config(D, P, hkv, {})) {
    model.layers = 1;
    model.heads = hkv;
    model.dim = D;
    for (std::int32_t b = 0; b < n; ++b) {
      const kvc::seq_id s = cache.add_sequence();
      model.add_sequence(s);
      const std::int32_t total = r.integer(1, max_len);
      kvc_test::append_random_chunks<T>(cache, model, s, 0, total, 200, 0.3, r);
      for (std::int32_t h = 0; h < hkv; ++h) {
        // Most heads keep everything; some keep a random subset, one token, or nothing (never all
        // heads of a sequence: that is an error, checked below).
        const int pick = r.integer(0, 5);
        const std::int32_t len = h == 0 ? std::max(1, total - r.integer(0, total - 1))
                                 : pick == 0 ? 0
                                 : pick == 1 ? 1
                                 : pick == 2 ? r.integer(1, total)
                                             : total;
        const auto kept = r.subset(total, len);
        cache.keep(s, 0, h, kept.data(), static_cast<std::int32_t>(kept.size()));
        model.keep(s, 0, h, kept);
      }
      seqs.push_back(s);
    }
  }
  std::vector<kvc_test::dense_head> heads(kvc::seq_id s) const {
    std::vector<kvc_test::dense_head> hs;
    for (std::int32_t h = 0; h < model.heads; ++h) hs.push_back(model.head(s, 0, h));
    return hs;
  }
};

template <class T>
void run_batch_case(std::int32_t D, std::int32_t P, std::int32_t G, std::uint64_t seed, kvc::thread_pool& pool) {
  kvc_test::rng r(seed);
  const std::int32_t hkv = G >= 8 ? 2 : r.integer(1, 4), hq = hkv * G, n = r.integer(1, 7);
  batch_case<T> bc(D, P, hkv, n, D == 256 ? 400 : 1300, r);
  std::vector<kvc::seq_id> seqs = bc.seqs;
  seqs.push_back(seqs[static_cast<std::size_t>(r.integer(0, n - 1))]);  // a sequence twice
  std::shuffle(seqs.begin(), seqs.end(), r.engine());
  const std::int32_t nb = static_cast<std::int32_t>(seqs.size());
  const std::size_t qs = static_cast<std::size_t>(hq) * D;
  const auto q = r.normals(qs * nb, 1.5f);
  std::vector<kvc_test::dense_attention_result> refs;
  for (std::int32_t b = 0; b < nb; ++b)
    refs.push_back(kvc_test::dense_decode_attention(bc.heads(seqs[static_cast<std::size_t>(b)]), D, q.data() + b * qs,
                                                    hq, 1.0 / std::sqrt(static_cast<double>(D))));
  for (kvc::thread_pool* p : {static_cast<kvc::thread_pool*>(nullptr), &pool})
    for (std::int32_t split : {0, 37, 512}) {
      INFO(kvc::type_name<T>() << " D=" << D << " P=" << P << " G=" << G << " hkv=" << hkv << " batch=" << nb
                               << " threads=" << (p ? p->size() : 1) << " split=" << split);
      std::vector<float> out(qs * nb, std::numeric_limits<float>::quiet_NaN()),
          lse(static_cast<std::size_t>(hq) * nb, std::numeric_limits<float>::quiet_NaN());
      kvc::decode_options opt;
      opt.pool = p;
      opt.split_tokens = split;
      opt.lse = lse.data();
      kvc::cpu::decode_attention_batch(bc.cache, seqs.data(), nb, 0, q.data(), hq, out.data(), opt);
      for (std::int32_t b = 0; b < nb; ++b) {
        INFO("batch[" << b << "] = seq " << seqs[static_cast<std::size_t>(b)]);
        outputs o(hq, hkv, D, 1);
        std::copy(out.begin() + b * qs, out.begin() + (b + 1) * qs, o.out.begin());
        std::copy(lse.begin() + b * hq, lse.begin() + (b + 1) * hq, o.lse.begin());
        require_close(bc.heads(seqs[static_cast<std::size_t>(b)]), refs[static_cast<std::size_t>(b)], D, hq, o, false);
      }
    }
}

}  // namespace

TEST_CASE("batched decode attention equals the dense reference for every sequence", "[attention][batch]") {
  kvc::thread_pool pool(3);
  int i = 0;
  for (std::int32_t D : {64, 128, 256})
    for (std::int32_t G : {1, 4, 8, 12}) {
      const std::int32_t P = (i % 3 == 0) ? 16 : (i % 3 == 1) ? 8 : 32;
      run_batch_case<kvc::half>(D, P, G, 900 + static_cast<std::uint64_t>(i), pool);
      if (i % 2 == 0) run_batch_case<float>(D, P, G, 1900 + static_cast<std::uint64_t>(i), pool);
      if (i % 3 == 0) run_batch_case<kvc::bfloat16>(D, P, G, 2900 + static_cast<std::uint64_t>(i), pool);
      ++i;
    }
}

TEST_CASE("batched decode attention refuses bad input by name and writes nothing", "[attention][batch][errors]") {
  kvc_test::rng r(77);
  kvc::thread_pool pool(2);
  batch_case<kvc::half> bc(64, 16, 2, 3, 100, r);
  const kvc::seq_id empty = bc.cache.add_sequence();  // holds no token in any head
  const std::int32_t hq = 4, D = 64;
  std::vector<float> q(static_cast<std::size_t>(hq) * D * 4, 0.5f), out(q.size(), 7.0f), lse(16, 7.0f);
  const auto untouched = [&] {
    for (float x : out) REQUIRE(x == 7.0f);
    for (float x : lse) REQUIRE(x == 7.0f);
  };
  kvc::decode_options opt;
  opt.pool = &pool;
  opt.lse = lse.data();
  auto call = [&](std::vector<kvc::seq_id> s, const kvc::decode_options& o, std::int32_t heads) {
    kvc::cpu::decode_attention_batch(bc.cache, s.data(), static_cast<std::int32_t>(s.size()), 0, q.data(), heads,
                                     out.data(), o);
  };
  REQUIRE_THROWS_WITH(call({}, opt, hq), Catch::Contains("kvc::cpu::decode_attention_batch: n = 0"));
  REQUIRE_THROWS_WITH(call({bc.seqs[0], 999}, opt, hq), Catch::Contains("seq = 999 is not a live sequence"));
  REQUIRE_THROWS_WITH(call({bc.seqs[0], bc.seqs[1], empty}, opt, hq),
                      Catch::Contains("batch[2]: every one of the 2 kv heads holds 0 tokens"));
  REQUIRE_THROWS_WITH(call({bc.seqs[0]}, opt, 3), Catch::Contains("batch[0]: num_q_heads = 3, expected a positive multiple"));
  q[static_cast<std::size_t>(hq) * D + 5] = std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_WITH(call({bc.seqs[0], bc.seqs[2]}, opt, hq), Catch::Contains("batch[1]: q[5] = inf, expected a finite query"));
  q[static_cast<std::size_t>(hq) * D + 5] = 0.5f;
  std::vector<float> probs(1000);
  kvc::decode_options with_probs = opt;
  with_probs.group_probs = probs.data();
  with_probs.probs_stride = 200;
  REQUIRE_THROWS_WITH(call({bc.seqs[0]}, with_probs, hq), Catch::Contains("opt.probs or opt.group_probs is set, expected neither"));
  untouched();
}
