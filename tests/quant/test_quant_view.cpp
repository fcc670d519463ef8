// SPDX-License-Identifier: Apache-2.0
// Encodings as accessors: quant_cache::keys/values/layer give kv_views whose accessor decodes the
// pages (kvc/view/decoding_accessor.hpp). Every element read through them equals the pages read
// by the independent dequantizer of page_reader.hpp; the double reference (kvc::reference) reading
// those views equals dense double attention over the independently read pages; the CPU kernel
// given those views specialises on the accessor and reads the codes (bit for bit the (cache, seq,
// layer) call). The CPU kernel's generic path for other encodings (rows decoded through the
// accessor) runs on a toy int8 encoding written here.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <kvc/attention.hpp>
#include <kvc/attention/reference.hpp>
#include <kvc/cpu/decode_attention.hpp>
#include <kvc/cpu/quant_attention.hpp>
#include <kvc/quant/gear.hpp>
#include <kvc/quant/rotated.hpp>

#include "dense_reference.hpp"
#include "kvc_catch.hpp"
#include "page_reader.hpp"
#include "quant_test_util.hpp"

namespace {

using namespace kvc::quant;

using qpages::shape;

template <class KQ, class VQ, class Fp>
struct filled {
  kvc::quant_cache<KQ, VQ, Fp> cache;
  kvc::seq_id s;
  std::vector<float> q;
  filled(const shape& sh, int page_size, int n, int sinks, std::uint32_t seed)
      : cache(qpages::cache_config(sh, page_size, 2, sinks)) {
    s = cache.add_sequence();
    const auto k = qtest::keylike(static_cast<std::size_t>(n), sh.hkv, sh.D, seed);
    const auto v = qtest::randn(static_cast<std::size_t>(n) * sh.hkv * sh.D, seed + 1);
    const int first = n * 3 / 4, row = sh.hkv * sh.D;  // a prefill chunk, then decode steps
    cache.append(s, 1, k.data(), v.data(), first);
    for (int t = first; t < n; ++t)
      cache.append(s, 1, k.data() + static_cast<std::size_t>(t) * row, v.data() + static_cast<std::size_t>(t) * row, 1);
    q = qtest::randn(static_cast<std::size_t>(sh.hq) * sh.D, seed + 2, 2.0f);
  }
};

double max_abs(const std::vector<double>& x) {
  double m = 0;
  for (double v : x) m = std::max(m, std::fabs(v));
  return m;
}
template <class A, class B>
double rel_diff(const A& a, const B& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::fabs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
    den = std::max(den, std::fabs(static_cast<double>(b[i])));
  }
  return den > 0 ? num / den : num;
}

/// The readers of the views against the pages, for one cache. Kernels: also run both CPU kernels
/// (each instantiation costs ~3 s of compile time per cache type, so three types run them).
template <class KQ, class VQ, class Fp = kvc::half, bool Kernels = false>
void check_views(const shape& sh, int page_size, int n, int sinks, std::uint32_t seed) {
  INFO("shape " << sh.hq << "/" << sh.hkv << "/" << sh.D << " page " << page_size << " n " << n << " sinks " << sinks);
  filled<KQ, VQ, Fp> f(sh, page_size, n, sinks, seed);
  const auto& cache = f.cache;
  const auto heads = qpages::read_pages(cache, f.s, 1);
  const int D = sh.D;
  // 1. Every element, through keys() and values(), against the independent reading (float
  //    rounding of scale * c + zero: 1e-6 of the head's largest value).
  for (int h = 0; h < sh.hkv; ++h) {
    const auto& dh = heads[static_cast<std::size_t>(h)];
    const auto K = cache.keys(f.s, 1, h);
    const auto V = cache.values(f.s, 1, h);
    REQUIRE(K.tokens() == dh.n);
    REQUIRE(V.tokens() == dh.n);
    REQUIRE(K.heads() == 1);
    REQUIRE(K.head_dim() == D);
    const double tol = 1e-6 * std::max(max_abs(dh.k), max_abs(dh.v));
    int bad = 0;
    for (int t = 0; t < dh.n; ++t)
      for (int d = 0; d < D; ++d) {
        const std::size_t i = static_cast<std::size_t>(t) * D + d;
        bad += std::fabs(K(t, 0, d) - dh.k[i]) > tol;
        bad += std::fabs(V(t, 0, d) - dh.v[i]) > tol;
      }
    INFO("head " << h << ": elements read through the views that differ from the pages");
    CHECK(bad == 0);
  }
  // 2. The double reference over the views, and 3. the CPU kernel over the views, against dense
  //    double attention over the pages; the kernel over views against the kernel over codes.
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const auto dense = kvc_test::dense_decode_attention(heads, D, f.q.data(), sh.hq, scale);
  typename kvc::quant_cache<KQ, VQ, Fp>::layer_buffer buf;
  const auto layer = cache.layer(f.s, 1, buf);
  std::vector<float> ref(f.q.size());
  kvc::reference::decode_attention(layer, f.q.data(), sh.hq, ref.data());
  CHECK(rel_diff(ref, dense.out) < 1e-5);
  if constexpr (Kernels) {
    kvc::decode_options o;
    o.split_tokens = 64;  // several token chunks per head: the kernel's merge runs too
    std::vector<float> view_out(f.q.size()), codes_out(f.q.size());
    kvc::cpu::decode_attention(layer, f.q.data(), sh.hq, view_out.data(), o);
    CHECK(rel_diff(view_out, dense.out) < 1e-5);
    kvc::cpu::decode_attention(cache, f.s, 1, f.q.data(), sh.hq, codes_out.data(), o);
    CHECK(view_out == codes_out);  // the same kernel, not rows decoded through the accessor
    std::vector<float> front(f.q.size());  // the front door takes the store's overload too
    kvc::decode_attention(layer, f.q.data(), sh.hq, front.data(), o);
    CHECK(front == codes_out);
  }
}
template <class KQ, class VQ>
void check_views_and_kernels(const shape& sh, int page_size, int n, int sinks, std::uint32_t seed) {
  check_views<KQ, VQ, kvc::half, true>(sh, page_size, n, sinks, seed);
}

/// A toy encoding for the generic path: int8 codes with one float scale per row.
struct int8_rows {
  const std::int8_t* codes = nullptr;
  const float* scales = nullptr;
  std::int32_t dim = 0;
  void decode_row(std::int64_t r, float* out) const {
    for (std::int32_t d = 0; d < dim; ++d) out[d] = scales[r] * codes[r * dim + d];
  }
};
using int8_view = kvc::decoded_view<int8_rows>;

/// Codecs the independent reader does not model (Hadamard rotation, GEAR's low-rank and sparse
/// parts): the views against gather() (the codec's own decode, tested elsewhere against the
/// formulas), and the reference over the views against the kernel over the codes.
template <class KQ, class VQ>
void check_views_against_gather(const shape& sh, int page_size, int n, std::uint32_t seed) {
  INFO("shape " << sh.hq << "/" << sh.hkv << "/" << sh.D << " page " << page_size << " n " << n);
  filled<KQ, VQ, kvc::half> f(sh, page_size, n, 0, seed);
  const auto& cache = f.cache;
  const int D = sh.D;
  for (int h = 0; h < sh.hkv; ++h) {
    const int L = cache.length(f.s, 1, h);
    std::vector<float> k(static_cast<std::size_t>(L) * D), v(k.size());
    cache.gather(f.s, 1, h, k.data(), v.data());
    const auto K = cache.keys(f.s, 1, h);
    const auto V = cache.values(f.s, 1, h);
    int bad = 0;
    for (int t = 0; t < L; ++t)
      for (int d = 0; d < D; ++d) {
        const std::size_t i = static_cast<std::size_t>(t) * D + d;
        bad += K(t, 0, d) != k[i];
        bad += V(t, 0, d) != v[i];
      }
    CHECK(bad == 0);
  }
  typename kvc::quant_cache<KQ, VQ>::layer_buffer buf;
  std::vector<float> ref(f.q.size()), codes_out(f.q.size());
  kvc::reference::decode_attention(cache.layer(f.s, 1, buf), f.q.data(), sh.hq, ref.data());
  kvc::cpu::decode_attention(cache, f.s, 1, f.q.data(), sh.hq, codes_out.data());
  CHECK(rel_diff(codes_out, ref) < 1e-5);
}

}  // namespace

TEST_CASE("decoded views: the encoding is the accessor, the layout is plain", "[quant][view]") {
  using C = kvc::quant_cache<kivi<2>, kivi<2>>;
  using KA = C::key_view_type::accessor_type;
  static_assert(!kvc::is_plain_accessor_v<KA>, "a decoded view's elements are values, not page elements");
  static_assert(kvc::accessor_decodes_rows_v<KA>, "kernels read a decoded view a row at a time");
  static_assert(!kvc::accessor_decodes_rows_v<kvc::default_accessor<const float>>, "plain pages are not decoded");
  static_assert(std::is_same<C::key_view_type::reference, float>::value, "an element read is a decoded float");
  filled<kivi<2>, kivi<2>, kvc::half> f({4, 2, 64}, 32, 40, 0, 3);
  // Errors name the call and the argument, as the cache's other readers do.
  REQUIRE_THROWS_WITH(f.cache.keys(f.s, 1, 2), Catch::Contains("kvc::quant_cache::keys: head = 2, expected 0..1"));
  REQUIRE_THROWS_WITH(f.cache.values(9, 1, 0), Catch::Contains("kvc::quant_cache::values: unknown sequence id 9"));
  C::layer_buffer buf;
  REQUIRE_THROWS_WITH(f.cache.layer(f.s, 2, buf), Catch::Contains("kvc::quant_cache::layer: layer = 2, expected 0..1"));
  // An empty layer: views of no tokens.
  const auto l0 = f.cache.layer(f.s, 0, buf);
  REQUIRE(l0.num_kv_heads() == 2);
  REQUIRE(l0.keys(1).tokens() == 0);
}

TEST_CASE("decoded views read the pages: per-token integer codecs", "[quant][view]") {
  std::uint32_t seed = 100;
  for (int n : {1, 37, 150}) {
    check_views<int8, int8>({4, 2, 64}, 16, n, 0, seed++);
    check_views_and_kernels<int4, int4>({8, 2, 64}, 32, n, 0, seed++);
    check_views<int2, int2>({3, 3, 64}, 16, n, 0, seed++);
    check_views<int8_asym, int4>({4, 1, 96}, 16, n, 0, seed++);
  }
  check_views<int4, int4, float>({4, 2, 64}, 16, 150, 5, seed++);
  check_views<int4, int4, kvc::bfloat16>({4, 2, 64}, 16, 150, 0, seed++);
}

TEST_CASE("decoded views read the pages: KIVI groups, residual windows and sinks", "[quant][view]") {
  std::uint32_t seed = 200;
  for (int n : {1, 37, 150, 300}) {
    check_views_and_kernels<kivi<2>, kivi<2>>({4, 2, 64}, 32, n, 0, seed++);
    check_views<kivi<4>, kivi<2>>({8, 2, 64}, 64, n, 0, seed++);
    check_views<kivi<2, 16, 32>, int8>({4, 4, 64}, 16, n, 0, seed++);
  }
  check_views_and_kernels<kivi<2>, kivi<2>>({8, 2, 64}, 32, 300, 5, seed++);
  check_views<kivi<2, 32, 0>, kivi<2, 32, 0>>({4, 2, 96}, 32, 150, 0, seed++);
}

TEST_CASE("decoded views read the pages: FP8", "[quant][view]") {
  check_views_and_kernels<fp8<kvc::fp8_e4m3>, fp8<kvc::fp8_e4m3>>({4, 2, 64}, 16, 150, 0, 300);
  check_views<fp8<kvc::fp8_e5m2>, int4>({4, 2, 64}, 16, 37, 3, 301);
}

TEST_CASE("decoded views of rotated and GEAR codecs equal their gather", "[quant][view]") {
  check_views_against_gather<rotated<int4>, rotated<int2>>({4, 2, 64}, 16, 150, 400);
  check_views_against_gather<gear<4>, gear<2>>({4, 2, 64}, 32, 150, 401);
}

TEST_CASE("the CPU kernel reads any decoding accessor a row at a time", "[quant][view]") {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> code(-127, 127);
  std::uniform_real_distribution<float> sc(0.001f, 0.05f);
  const shape shapes[] = {{4, 2, 64}, {6, 3, 40}, {8, 1, 300}};  // 300: rows past the accessor's stack buffer
  for (const auto& sh : shapes)
    for (int n : {1, 70, 333}) {
      INFO("shape " << sh.hq << "/" << sh.hkv << "/" << sh.D << " n " << n);
      const int D = sh.D;
      std::vector<std::vector<std::int8_t>> kc(sh.hkv), vc(sh.hkv);
      std::vector<std::vector<float>> ks(sh.hkv), vs(sh.hkv);
      std::vector<kvc_test::dense_head> heads(static_cast<std::size_t>(sh.hkv));
      std::vector<int8_view> kv, vv;
      for (int h = 0; h < sh.hkv; ++h) {
        const int len = h == 1 ? n / 2 : n;  // heads of different lengths
        auto& dh = heads[static_cast<std::size_t>(h)];
        dh.n = len;
        for (int t = 0; t < len; ++t) {
          ks[h].push_back(sc(rng));
          vs[h].push_back(sc(rng));
          for (int d = 0; d < D; ++d) {
            kc[h].push_back(static_cast<std::int8_t>(code(rng)));
            vc[h].push_back(static_cast<std::int8_t>(code(rng)));
            dh.k.push_back(double(ks[h].back()) * kc[h].back());
            dh.v.push_back(double(vs[h].back()) * vc[h].back());
          }
        }
      }
      for (int h = 0; h < sh.hkv; ++h) {
        const std::int32_t len = heads[static_cast<std::size_t>(h)].n;
        kv.push_back(kvc::make_decoded_view(int8_rows{kc[h].data(), ks[h].data(), D}, len, D));
        vv.push_back(kvc::make_decoded_view(int8_rows{vc[h].data(), vs[h].data(), D}, len, D));
      }
      const kvc::stream_heads<int8_view> layer{kv.data(), vv.data(), sh.hkv, D};
      const auto q = qtest::randn(static_cast<std::size_t>(sh.hq) * D, 40 + n, 3.0f);
      const auto dense = kvc_test::dense_decode_attention(heads, D, q.data(), sh.hq, 1.0 / std::sqrt(double(D)));
      std::vector<float> out(q.size()), ref(q.size());
      kvc::decode_options o;
      o.split_tokens = 64;
      kvc::cpu::decode_attention(layer, q.data(), sh.hq, out.data(), o);
      CHECK(rel_diff(out, dense.out) < 1e-5);
      if (D <= 64) {  // O(head_dim) per element: the reference only on the small shapes
        kvc::reference::decode_attention(layer, q.data(), sh.hq, ref.data());
        CHECK(rel_diff(ref, dense.out) < 1e-5);
      }
    }
}
