// SPDX-License-Identifier: Apache-2.0
// Fused quantized decode attention == dense double attention over the K/V the pages hold, read by
// the independent dequantizer of page_reader.hpp (from the documented record formats, nothing of
// the codecs' decode), so a decoding bug shared by gather and the fused kernels shows up.
#include <cstddef>
#include <algorithm>
#include <cstring>
#include <limits>
#include <string>

#include <kvc/cpu/quant_attention.hpp>
#include <kvc/quant/fp8.hpp>
#include <kvc/quant/int8.hpp>
#include <kvc/quant/kivi.hpp>
#include <kvc/quant/nuq.hpp>
#include <kvc/parallel/thread_pool.hpp>

#include "dense_reference.hpp"
#include "float_formats.hpp"
#include "isa_check.hpp"
#include "kvc_catch.hpp"
#include "page_reader.hpp"
#include "quant_test_util.hpp"

namespace {

using qpages::cache_config;
using qpages::read_pages;
using qpages::shape;

/// gather() (the codecs' own decode) against the independent reading, to float rounding: the
/// codecs compute scale * c + zero in float (one or two roundings of terms <= the head's largest
/// |value|), so 1e-6 of that.
template <class KQ, class VQ, class Fp>
void require_gather_matches(const kvc::quant_cache<KQ, VQ, Fp>& cache, kvc::seq_id s, int layer,
                            const std::vector<kvc_test::dense_head>& heads) {
  const int D = cache.config().head_dim;
  for (int h = 0; h < static_cast<int>(heads.size()); ++h) {
    const auto& dh = heads[static_cast<std::size_t>(h)];
    REQUIRE(cache.length(s, layer, h) == dh.n);
    std::vector<float> k(static_cast<std::size_t>(dh.n) * D), v(k.size());
    cache.gather(s, layer, h, k.data(), v.data());
    double big = 0;
    for (std::size_t i = 0; i < k.size(); ++i) big = std::max({big, std::fabs(dh.k[i]), std::fabs(dh.v[i])});
    std::size_t bad = 0, first = k.size();
    for (std::size_t i = 0; i < k.size(); ++i)
      if (std::fabs(k[i] - dh.k[i]) > 1e-6 * big || std::fabs(v[i] - dh.v[i]) > 1e-6 * big) {
        if (bad++ == 0) first = i;
      }
    // One CHECK per head (not per element), so a failure still lets the attention check run.
    INFO("head " << h << ": " << bad << " of " << k.size() << " gathered elements differ from the pages' values"
                 << (bad ? ", first at " + std::to_string(first) + ": gather k " + std::to_string(k[first]) + " v " +
                               std::to_string(v[first]) + ", pages k " + std::to_string(dh.k[first]) + " v " +
                               std::to_string(dh.v[first])
                         : std::string()));
    CHECK(bad == 0);
  }
}

/// Fused decode attention against dense double attention over the independently dequantized
/// pages. Returns max |out - ref| / max |ref|.
template <class KQ, class VQ>
double fused_vs_pages(const shape& sh, int page_size, int n_tokens, std::uint32_t seed, kvc::thread_pool* pool = nullptr,
                      int sinks = 0, KQ kq = {}, VQ vq = {}, bool check_probs = false) {
  kvc::quant_cache<KQ, VQ> cache(cache_config(sh, page_size, 2, sinks), kq, vq);
  auto s = cache.add_sequence();
  auto k = qtest::keylike(n_tokens, sh.hkv, sh.D, seed);
  auto v = qtest::randn(std::size_t(n_tokens) * sh.hkv * sh.D, seed + 1);
  // two appends: a prefill chunk and a few decode steps
  const int first = n_tokens * 3 / 4;
  cache.append(s, 1, k.data(), v.data(), first);
  for (int t = first; t < n_tokens; ++t)
    cache.append(s, 1, k.data() + std::size_t(t) * sh.hkv * sh.D, v.data() + std::size_t(t) * sh.hkv * sh.D, 1);
  const auto heads = read_pages(cache, s, 1);
  require_gather_matches(cache, s, 1, heads);
  auto q = qtest::randn(std::size_t(sh.hq) * sh.D, seed + 2, 2.0f);
  const auto ref = kvc_test::dense_decode_attention(heads, sh.D, q.data(), sh.hq, 1.0 / std::sqrt(double(sh.D)));
  std::vector<float> out(q.size()), lse(sh.hq);
  kvc::decode_options o;
  o.pool = pool;
  o.lse = lse.data();
  std::vector<float> probs, gprobs;
  if (check_probs) {
    probs.resize(std::size_t(sh.hq) * n_tokens);
    gprobs.resize(std::size_t(sh.hkv) * n_tokens);
    o.probs = probs.data();
    o.group_probs = gprobs.data();
    o.probs_stride = n_tokens;
  }
  kvc::cpu::decode_attention(cache, s, 1, q.data(), sh.hq, out.data(), o);
  for (int h = 0; h < sh.hq; ++h) REQUIRE(std::fabs(lse[h] - ref.lse[h]) < 1e-4 * (1 + std::fabs(ref.lse[h])));
  if (check_probs) {
    const int G = sh.hq / sh.hkv;
    for (int h = 0; h < sh.hkv; ++h) {
      double tot = 0;
      for (int t = 0; t < n_tokens; ++t) {
        double sum = 0;
        for (int g = 0; g < G; ++g) {
          const std::size_t i = std::size_t(h * G + g) * n_tokens + t;
          REQUIRE(std::fabs(probs[i] - ref.probs[std::size_t(h * G + g) * ref.stride + t]) <=
                  1e-4 * ref.probs[std::size_t(h * G + g) * ref.stride + t] + 1e-7);
          sum += probs[i];
        }
        REQUIRE(std::fabs(sum - gprobs[std::size_t(h) * n_tokens + t]) < 1e-5);
        tot += gprobs[std::size_t(h) * n_tokens + t];
      }
      REQUIRE(std::fabs(tot - G) < 1e-3);
    }
  }
  double num = 0, den = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    num = std::max(num, std::fabs(out[i] - ref.out[i]));
    den = std::max(den, std::fabs(ref.out[i]));
  }
  return den > 0 ? num / den : num;
}

template <class KQ, class VQ>
void sweep(int page_size) {
  const shape shapes[] = {{4, 4, 64}, {8, 2, 64}, {9, 3, 64}, {4, 1, 128}};
  kvc::thread_pool pool(3);
  std::uint32_t seed = 11;
  for (const auto& sh : shapes) {
    for (int n : {1, 37, 200, 333}) {
      INFO("shape " << sh.hq << "/" << sh.hkv << "/" << sh.D << " page " << page_size << " n " << n);
      CHECK(fused_vs_pages<KQ, VQ>(sh, page_size, n, seed++) < 1e-5);
      CHECK(fused_vs_pages<KQ, VQ>(sh, page_size, n, seed++, &pool, 0, {}, {}, true) < 1e-5);
    }
  }
}

}  // namespace

using namespace kvc::quant;

TEST_CASE("fused attention matches dense attention over the pages read independently: int8/int4/int2 per token", "[quant][attention]") {
  sweep<int8, int8>(16);
  sweep<int8_asym, int8_asym>(32);
  sweep<int4, int4>(16);
  sweep<int2, int2>(64);
  sweep<int8, int2>(16);
}

TEST_CASE("fused attention matches dense attention over the pages read independently: kivi", "[quant][attention]") {
  sweep<kivi<2>, kivi<2>>(32);
  sweep<kivi<4>, kivi<4>>(64);
  sweep<kivi<8>, kivi<8>>(32);
  sweep<kivi<4>, kivi<2>>(64);  // K4V2
  sweep<kivi<2, 32, 0>, kivi<2, 32, 0>>(32);
  sweep<kivi<2, 16, 32>, int8>(16);
  sweep<kivi<3>, kivi<3>>(32);  // 3-bit planes: the loader reads blocks of 16 codes
  sweep<kivi<3, 64, 64>, kivi<3, 64, 64>>(64);
  sweep<kivi<3, 16, 32>, kivi<2>>(16);
  sweep<kivi<3, 64, 64>, kivi<4, 32, 64>>(64);  // K3V4 (the registry's kbits=3,vbits=4,group=64)
  sweep<kivi<4, 32, 64>, kivi<3, 64, 64>>(64);  // K4V3
  sweep<kivi<4, 64, 64>, kivi<4, 64, 64>>(64);  // the registry's kivi(bits=4,group=64)
}

TEST_CASE("quantized attention matches dense attention over the pages read independently: nuq (KVQuant's fitted levels)",
          "[quant][attention]") {
  // keys through the decode path (a codebook per record), values through the fused KIVI kernels
  sweep<nuq<2>, nuq<2>>(32);
  sweep<nuq<3, 64, 64>, nuq<3, 64, 64>>(64);
  sweep<nuq<4, 16, 32>, nuq<4, 16, 32>>(16);
  sweep<nuq<3, 32, 0>, kivi<3>>(32);
}

TEST_CASE("fused attention over value records with an odd number of channel groups", "[quant][attention]") {
  // 96 channels in groups of 32: three scales (and zeros) per value record, gathered by pairs of
  // binary16 words with the last one paired backwards (qdetail::gather_record_halves)
  kvc::thread_pool pool(2);
  for (int n : {5, 64, 300}) {
    INFO("n " << n);
    CHECK(fused_vs_pages<int8, intn<4, scheme::asymmetric, 32>>({6, 2, 96}, 32, n, 90 + n) < 1e-5);
    CHECK(fused_vs_pages<int4, intn<2, scheme::symmetric, 32>>({6, 2, 96}, 16, n, 91 + n, &pool) < 1e-5);
    CHECK(fused_vs_pages<kivi<2>, kivi<2>>({8, 2, 96}, 32, n, 92 + n) < 1e-5);
    CHECK(fused_vs_pages<kivi<4>, kivi<4>>({3, 1, 96}, 64, n, 93 + n, &pool, 0, {}, {}, true) < 1e-5);
    CHECK(fused_vs_pages<kivi<3>, kivi<3>>({6, 2, 96}, 32, n, 94 + n, &pool) < 1e-5);
  }
}

TEST_CASE("fused attention matches dense attention over the pages read independently: fp8", "[quant][attention]") {
  sweep<fp8<kvc::fp8_e4m3>, fp8<kvc::fp8_e4m3>>(16);
  sweep<fp8<kvc::fp8_e5m2>, fp8<kvc::fp8_e5m2>>(32);
  using pt = fp8<kvc::fp8_e4m3, fp8_scaling::per_tensor>;
  CHECK(fused_vs_pages<pt, pt>({8, 2, 64}, 16, 300, 5, nullptr, 0, pt(0.25f, 0.01f), pt(0.25f, 0.01f)) < 1e-5);
}

TEST_CASE("fused attention with attention sinks in full precision, against the pages read independently", "[quant][attention]") {
  kvc::thread_pool pool(2);
  CHECK(fused_vs_pages<kivi<2>, kivi<2>>({8, 2, 64}, 32, 300, 3, &pool, 5) < 1e-5);
  CHECK(fused_vs_pages<int4, int4>({8, 2, 64}, 16, 300, 4, nullptr, 5) < 1e-5);
}

namespace {

/// The common setup of the fast-path checks: a one-layer cache holding n key-like tokens, the K/V
/// its pages hold (read by the independent dequantizer, as float for the bounds), a query, and
/// the dense double reference over the pages' values.
template <class KQ, class VQ>
struct fast_path_case {
  kvc::quant_cache<KQ, VQ> cache;
  decltype(cache.add_sequence()) s;
  std::vector<std::vector<float>> K, V;
  std::vector<float> q, ref;

  fast_path_case(const shape& sh, int page, int n, std::uint32_t seed)
      : cache(cache_config(sh, page, 1)), s(cache.add_sequence()), K(sh.hkv), V(sh.hkv) {
    auto k = qtest::keylike(n, sh.hkv, sh.D, seed);
    auto v = qtest::randn(std::size_t(n) * sh.hkv * sh.D, seed + 1);
    cache.append(s, 0, k.data(), v.data(), n);
    const auto heads = read_pages(cache, s, 0);
    for (int h = 0; h < sh.hkv; ++h) {
      K[h].assign(heads[h].k.begin(), heads[h].k.end());
      V[h].assign(heads[h].v.begin(), heads[h].v.end());
    }
    q = qtest::randn(std::size_t(sh.hq) * sh.D, seed + 2, 2.0f);
    const auto r = kvc_test::dense_decode_attention(heads, sh.D, q.data(), sh.hq, 1.0 / std::sqrt(double(sh.D)));
    ref.assign(r.out.begin(), r.out.end());
  }
};

/// int8_query against the dense double reference over the K/V of the pages, within the
/// analytic bound of the query's rounding: per score |dq . (s c)| <= (qs / 2) sum_d s c_d with
/// s c_d = k^_d - z <= 2.05 max|k^| + 2 (max k^ - min k^) (symmetric and asymmetric codes), and an
/// output moved by at most max|v| (exp(2 delta) - 1) by scores moved by at most delta.
template <class Q>
void check_int8_query(const shape& sh, int n, std::uint32_t seed, kvc::thread_pool* pool) {
  fast_path_case<Q, Q> fc(sh, 32, n, seed);
  auto& [cache, s, K, V, q, ref] = fc;
  std::vector<float> out(q.size()), exact(q.size());
  kvc::decode_options o;
  o.pool = pool;
  kvc::cpu::quant_attention_options qo;
  qo.int8_query = true;
  kvc::cpu::decode_attention(cache, s, 0, q.data(), sh.hq, out.data(), o, qo);
  kvc::cpu::decode_attention(cache, s, 0, q.data(), sh.hq, exact.data(), o);
  REQUIRE(qtest::rel_err(exact.data(), ref.data(), ref.size()) < 1e-5);  // the default path stays exact
  const int G = sh.hq / sh.hkv;
  const double sc = 1.0 / std::sqrt(double(sh.D));
  double ref_max = 0;
  for (float x : ref) ref_max = std::max(ref_max, std::fabs(double(x)));
  for (int h = 0; h < sh.hkv; ++h) {
    double sum_sc = 0, vmax = 0;
    for (int t = 0; t < n; ++t) {
      double mx = 0, lo = 1e30, hi = -1e30;
      for (int d = 0; d < sh.D; ++d) {
        const double x = K[h][std::size_t(t) * sh.D + d];
        mx = std::max(mx, std::fabs(x));
        lo = std::min(lo, x);
        hi = std::max(hi, x);
      }
      sum_sc = std::max(sum_sc, sh.D * (2.05 * mx + 2 * (hi - lo)));
    }
    for (float x : V[h]) vmax = std::max(vmax, std::fabs(double(x)));
    for (int g = 0; g < G; ++g) {
      const int qh = h * G + g;
      double qmax = 0;
      for (int d = 0; d < sh.D; ++d) qmax = std::max(qmax, std::fabs(q[std::size_t(qh) * sh.D + d] * sc));
      const double qs = qmax / (Q::bits == 8 ? 32767.0 : 127.0);
      const double delta = qs / 2 * sum_sc;
      const double bound = vmax * std::expm1(2 * delta) + 1e-5 * ref_max;
      double err = 0;
      for (int d = 0; d < sh.D; ++d)
        err = std::max(err, std::fabs(double(out[std::size_t(qh) * sh.D + d]) - ref[std::size_t(qh) * sh.D + d]));
      INFO("bits " << Q::bits << " head " << qh << " err " << err << " bound " << bound);
      REQUIRE(err <= bound);
    }
  }
}

}  // namespace

TEST_CASE("int8_query: integer q.k within the query-rounding bound of the dense reference", "[quant][attention]") {
  kvc::thread_pool pool(2);
  for (int n : {1, 37, 300}) {
    check_int8_query<int8>({8, 2, 128}, n, 40 + n, nullptr);
    check_int8_query<int8_asym>({4, 4, 64}, n, 41 + n, &pool);
    check_int8_query<int4>({8, 2, 128}, n, 42 + n, &pool);
    check_int8_query<int4>({9, 3, 64}, n, 43 + n, nullptr);
    check_int8_query<int2>({8, 2, 128}, n, 44 + n, nullptr);
    check_int8_query<int2>({4, 1, 256}, n, 45 + n, &pool);
    check_int8_query<intn<4, scheme::symmetric>>({8, 2, 128}, n, 46 + n, nullptr);
  }
}

namespace {

/// quant_attention_options::int8_probs (and fast(): int8_probs + int8_query) against the dense
/// double reference over the K/V of the pages, within the bound derived from the
/// rounding of the value weights: per tile, w_t = p_t s_t is rounded to a multiple of
/// f = max w / L (L = 255, 127 for 8-bit values), so the numerator moves by at most
/// (f / 2) sum_t |c_t - centre| <= (max_t p_t s_t / 2L) n cmax, and the output by that over sum p.
/// With int8_query the scores move by at most delta (as in check_int8_query), which scales the
/// probabilities by at most e^(2 delta) and moves the exact output by max|v| (e^(2 delta) - 1).
template <class Q, class KQ = Q>
void check_int8_probs(const shape& sh, int page, int n, std::uint32_t seed, kvc::thread_pool* pool, bool with_iq) {
  fast_path_case<KQ, Q> fc(sh, page, n, seed);
  auto& [cache, s, K, V, q, ref] = fc;
  std::vector<float> out(q.size()), exact(q.size());
  kvc::decode_options o;
  o.pool = pool;
  kvc::cpu::quant_attention_options qo;
  qo.int8_probs = true;
  qo.int8_query = with_iq;
  kvc::cpu::decode_attention(cache, s, 0, q.data(), sh.hq, out.data(), o, qo);
  kvc::cpu::decode_attention(cache, s, 0, q.data(), sh.hq, exact.data(), o);
  // the default path is untouched by the options (its 1e-5 contract is the sweeps' above; at
  // n = 777 with outlier keys an unoptimised build's float rounding reaches 1.2e-5)
  REQUIRE(qtest::rel_err(exact.data(), ref.data(), ref.size()) < 1e-4);
  constexpr int B = Q::bits;
  constexpr bool asym = Q::quant_scheme == scheme::asymmetric;
  const double L = B == 8 ? 127.0 : 255.0;
  const double cmax = B == 2 ? 3.0 : B == 4 ? 8.0 : 128.0;  // max |code - centre| (2-bit codes uncentred)
  const int G = sh.hq / sh.hkv;
  const double sc = 1.0 / std::sqrt(double(sh.D));
  double ref_max = 0;
  for (float x : ref) ref_max = std::max(ref_max, std::fabs(double(x)));
  double worst = 0;
  for (int h = 0; h < sh.hkv; ++h) {
    // value scale bound per token from the dequantized row (|x - x^| <= s/2 inverted)
    std::vector<double> vs(static_cast<std::size_t>(n));
    double vmax = 0, sum_sc = 0;
    for (int t = 0; t < n; ++t) {
      double lo = 1e30, hi = -1e30, am = 0, klo = 1e30, khi = -1e30, kmx = 0;
      for (int d = 0; d < sh.D; ++d) {
        const double x = V[h][std::size_t(t) * sh.D + d], y = K[h][std::size_t(t) * sh.D + d];
        lo = std::min(lo, x), hi = std::max(hi, x), am = std::max(am, std::fabs(x));
        klo = std::min(klo, y), khi = std::max(khi, y), kmx = std::max(kmx, std::fabs(y));
      }
      vs[std::size_t(t)] = 1.002 * (asym ? (hi - lo) / ((1 << B) - 2) : am / ((1 << (B - 1)) - 1.5));
      vmax = std::max(vmax, am);
      sum_sc = std::max(sum_sc, sh.D * (2.05 * kmx + 2 * (khi - klo)));
    }
    for (int g = 0; g < G; ++g) {
      const int qh = h * G + g;
      std::vector<double> sco(static_cast<std::size_t>(n));
      double mx = -1e300, qmax = 0;
      for (int d = 0; d < sh.D; ++d) qmax = std::max(qmax, std::fabs(q[std::size_t(qh) * sh.D + d] * sc));
      for (int t = 0; t < n; ++t) {
        double a = 0;
        for (int d = 0; d < sh.D; ++d) a += double(q[std::size_t(qh) * sh.D + d]) * K[h][std::size_t(t) * sh.D + d];
        sco[std::size_t(t)] = a * sc;
        mx = std::max(mx, a * sc);
      }
      double psum = 0, wmax = 0;
      for (int t = 0; t < n; ++t) {
        const double p = std::exp(sco[std::size_t(t)] - mx);
        psum += p;
        wmax = std::max(wmax, p * vs[std::size_t(t)]);
      }
      const double delta = with_iq ? qmax / (KQ::bits == 8 ? 32767.0 : 127.0) / 2 * sum_sc : 0.0;
      const double vbound = wmax * n * cmax / (2 * L * psum) * std::exp(4 * delta);
      const double bound = vbound + vmax * std::expm1(2 * delta) + 1e-5 * ref_max;
      double err = 0;
      for (int d = 0; d < sh.D; ++d)
        err = std::max(err, std::fabs(double(out[std::size_t(qh) * sh.D + d]) - ref[std::size_t(qh) * sh.D + d]));
      INFO("bits " << B << " D " << sh.D << " G " << G << " n " << n << " head " << qh << " err " << err << " bound "
                   << bound);
      REQUIRE(err <= bound);
      worst = std::max(worst, err / bound);
    }
  }
  // the approximate path ran: it moved the output (int2/int4 values, G <= 4). The integer paths
  // are AVX2 kernels; the portable build runs the exact path for every option.
  if (KVC_QUANT_AVX2 && n > 64 && B < 8 && G <= 4) CHECK(qtest::rel_err(out.data(), exact.data(), out.size()) > 0);
}

}  // namespace

TEST_CASE("int8_probs / fast(): integer value accumulation within the weight-rounding bound", "[quant][attention]") {
  kvc::thread_pool pool(2);
  for (int n : {1, 37, 300, 777}) {
    for (bool iq : {false, true}) {
      check_int8_probs<int2>({8, 2, 128}, 64, n, 60 + n, nullptr, iq);
      check_int8_probs<int2>({4, 1, 256}, 16, n, 61 + n, &pool, iq);
      check_int8_probs<int2>({6, 3, 128}, 32, n, 62 + n, nullptr, iq);   // G = 2
      check_int8_probs<int2>({16, 2, 128}, 64, n, 63 + n, nullptr, iq);  // G = 8: falls back to the exact path
      check_int8_probs<int4>({8, 2, 128}, 16, n, 64 + n, &pool, iq);
      check_int8_probs<int4>({9, 3, 64}, 64, n, 65 + n, nullptr, iq);    // G = 3, D = 64
      check_int8_probs<int4>({4, 4, 64}, 32, n, 66 + n, nullptr, iq);    // G = 1
      check_int8_probs<int8>({8, 2, 128}, 64, n, 67 + n, nullptr, iq);
      check_int8_probs<int8_asym>({4, 4, 64}, 16, n, 68 + n, &pool, iq);
      check_int8_probs<intn<4, scheme::symmetric>>({8, 2, 128}, 32, n, 69 + n, nullptr, iq);
      check_int8_probs<intn<2, scheme::symmetric>>({8, 2, 128}, 32, n, 70 + n, nullptr, iq);
    }
  }
}

TEST_CASE("int8_probs with KIVI keys: exact fused scores, integer values", "[quant][attention]") {
  kvc::thread_pool pool(2);
  for (int n : {37, 300, 777}) {
    check_int8_probs<int2, kivi<2>>({8, 2, 128}, 64, n, 80 + n, nullptr, false);
    check_int8_probs<int4, kivi<4>>({8, 2, 128}, 32, n, 81 + n, &pool, false);
    check_int8_probs<int8, fp8<>>({8, 2, 128}, 16, n, 82 + n, nullptr, false);
  }
}

TEST_CASE("the SIMD path under test", "[quant][attention][isa]") {
  WARN("quantized decode attention: " << kvc_test::simd_path()
                                      << (kvc::cpu::qdetail::fused_available ? ", fused code kernels" : ", decode-then-attend"));
  namespace qd = kvc::cpu::qdetail;
  using role = kvc::quant::role;
  using A = kvc::cpu::default_arch;
  if (kvc_test::expect_avx2() || kvc_test::expect_avx512()) {  // the fused and integer kernels run, at the build's float width
    REQUIRE(qd::fused_available);
    REQUIRE(qd::code_step<A> == 2 * static_cast<std::int32_t>(kvc::cpu::fbatch<A>::size));
    // the shapes the tests above use take the fused kernels, not decode-then-attend
    CHECK(qd::fused_ok<A, int8, role::key, 4>(64));
    CHECK(qd::fused_ok<A, int4, role::value, 2>(128));
    CHECK(qd::fused_ok<A, kivi<2>, role::key, 4>(64));
    CHECK(qd::fused_ok<A, kivi<2>, role::value, 4>(64));
    CHECK(qd::fused_ok<A, fp8<>, role::key, 4>(64));
    CHECK_FALSE(qd::fused_ok<A, int8, role::key, 8>(64));  // G > 4: decode-then-attend
    CHECK(qd::fused_ok<A, intn<4, scheme::asymmetric, 32>, role::value, 3>(96));  // odd group count
    CHECK(qd::fused_ok<A, kivi<2>, role::value, 4>(96));
    CHECK(qd::fused_ok<A, kivi<3>, role::key, 4>(64));
    CHECK(qd::fused_ok<A, kivi<3>, role::value, 4>(64));
    CHECK(qd::fused_ok<A, kivi<3, 64>, role::value, 2>(128));
    CHECK(qd::fused_ok<A, kivi<4, 64>, role::key, 4>(64));
    CHECK(qd::fused_ok<A, kivi<4, 64>, role::value, 4>(64));
  }
  if (kvc_test::expect_avx512()) {  // the fused float kernels 16 wide; the integer ones stay AVX2
    REQUIRE(qd::fused_available);
    REQUIRE(kvc_test::simd_path().find("avx512") != std::string::npos);
    REQUIRE(qd::code_step<A> == 32);
    CHECK_FALSE(qd::fused_ok<A, int8, role::key, 4>(48));  // 48 channels: not whole 32-channel steps
  }
}

TEST_CASE("quantized decode attention errors name the call, the argument, the value and the expectation",
          "[quant][attention][errors]") {
  using Catch::Contains;
  kvc::quant_cache<int4, int4> cache(cache_config({4, 2, 64}, 16, 2));
  const auto s = cache.add_sequence(), empty = cache.add_sequence();
  auto k = qtest::randn(std::size_t(20) * 2 * 64, 1), v = qtest::randn(k.size(), 2);
  cache.append(s, 0, k.data(), v.data(), 20);
  const std::size_t bytes = cache.bytes_in_use();
  std::vector<float> q(4 * 64, 0.25f), out(q.size(), 123.0f), lse(4, 123.0f);
  kvc::decode_options o;
  o.lse = lse.data();
  auto unchanged = [&] {
    return std::all_of(out.begin(), out.end(), [](float x) { return x == 123.0f; }) &&
           std::all_of(lse.begin(), lse.end(), [](float x) { return x == 123.0f; }) && cache.bytes_in_use() == bytes &&
           cache.num_sequences() == 2 && cache.length(s, 0, 0) == 20 && cache.length(s, 0, 1) == 20;
  };
  REQUIRE_THROWS_WITH(kvc::cpu::decode_attention(cache, 77, 0, q.data(), 4, out.data(), o),
                      Contains("kvc::cpu::decode_attention: seq = 77 is not a live sequence") &&
                          Contains("expected one of its 2 live sequence ids"));
  REQUIRE_THROWS_WITH(kvc::cpu::decode_attention(cache, s, 2, q.data(), 4, out.data(), o),
                      Contains("kvc::cpu::decode_attention: layer = 2, expected 0..1"));
  // Layer 1 of s and every layer of `empty` hold no token: an error, not zeros.
  REQUIRE_THROWS_WITH(kvc::cpu::decode_attention(cache, s, 1, q.data(), 4, out.data(), o),
                      Contains("kvc::cpu::decode_attention: seq = " + std::to_string(s) +
                               ", layer = 1 holds 0 tokens in all its kv heads, expected at least one token"));
  REQUIRE_THROWS_WITH(kvc::cpu::decode_attention(cache, empty, 0, q.data(), 4, out.data(), o),
                      Contains("seq = " + std::to_string(empty) + ", layer = 0 holds 0 tokens"));
  REQUIRE_THROWS_WITH(kvc::cpu::decode_attention(cache, s, 0, q.data(), 3, out.data(), o),
                      Contains("kvc::cpu::decode_attention: num_q_heads = 3, expected a positive multiple of num_kv_heads = 2"));
  q[7] = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_WITH(kvc::cpu::decode_attention(cache, s, 0, q.data(), 4, out.data(), o),
                      Contains("kvc::cpu::decode_attention: q[7] = nan, expected a finite query"));
  CHECK(unchanged());
  // The cache's own calls name themselves and list the live ids.
  std::vector<float> row(64);
  REQUIRE_THROWS_WITH(cache.gather(77, 0, 0, row.data()),
                      Contains("kvc::quant_cache::gather: unknown sequence id 77 (argument seq), expected a live sequence id: {" +
                               std::to_string(s) + ", " + std::to_string(empty) + "}"));
  REQUIRE_THROWS_WITH(cache.keep(s, 0, 0, nullptr, -1), Contains("kvc::quant_cache::keep: n = -1, expected >= 0 kept tokens"));
  REQUIRE_THROWS_WITH(cache.append(s, 0, k.data(), v.data(), -2), Contains("kvc::quant_cache::append: n = -2, expected >= 0"));
  CHECK(unchanged());
  auto bad = cache_config({4, 2, 64}, 16, 2);
  bad.sink_tokens = -1;
  REQUIRE_THROWS_WITH((kvc::quant_cache<int4, int4>(bad)),
                      Contains("kvc::quant_cache::quant_cache: quant_cache_config.sink_tokens = -1, expected >= 0"));
}
