// SPDX-License-Identifier: Apache-2.0
/// `fast=1` on the runtime's integer storages: the spec's attention runs
/// cpu::quant_attention_options::fast() and stays within that path's error bound of a dense double
/// reference over the stored (dequantized) K/V; specs where fast() would not apply are refused with
/// the argument, its value and what is expected.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <kvc/parallel/thread_pool.hpp>
#include <kvc/quant/codec.hpp>  // KVC_QUANT_AVX2: whether this TU's storages have the integer path
#include <kvc/runtime/make_cache.hpp>

#include "kvc_catch.hpp"

namespace {

struct shape {
  int hq, hkv, D;
};

kvc::cache_config config(const shape& sh) {
  kvc::cache_config c;
  c.num_layers = 2;
  c.num_kv_heads = sh.hkv;
  c.head_dim = sh.D;
  c.page_size = 16;
  c.max_pages = 4096;
  return c;
}

/// Keys with a few large channels of one sign (as real keys have), normal values, queries.
struct inputs {
  std::vector<float> k, v, q;
  inputs(const shape& sh, int n, std::uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd;
    k.resize(static_cast<std::size_t>(n) * sh.hkv * sh.D);
    v.resize(k.size());
    q.resize(static_cast<std::size_t>(sh.hq) * sh.D);
    for (auto& x : k) x = nd(rng);
    for (auto& x : v) x = nd(rng);
    for (auto& x : q) x = 2.0f * nd(rng);
    for (int h = 0; h < sh.hkv; ++h)
      for (int j = 0; j < 3; ++j) {
        const int d = static_cast<int>(rng() % static_cast<unsigned>(sh.D));
        const float mag = 10.0f + static_cast<float>(rng() % 30);
        for (int t = 0; t < n; ++t) {
          float& x = k[(static_cast<std::size_t>(t) * sh.hkv + h) * sh.D + d];
          x = mag * (1.0f + 0.1f * x);
        }
      }
  }
};

/// Dense double-precision attention of query head qh over one kv head's K/V ([n][D]).
std::vector<double> reference(const std::vector<float>& K, const std::vector<float>& V, int n, int D, const float* q) {
  const double sc = 1.0 / std::sqrt(double(D));
  std::vector<double> s(static_cast<std::size_t>(n)), out(static_cast<std::size_t>(D), 0.0);
  double mx = -INFINITY, sum = 0;
  for (int t = 0; t < n; ++t) {
    double a = 0;
    for (int d = 0; d < D; ++d) a += double(q[d]) * K[std::size_t(t) * D + d];
    s[std::size_t(t)] = a * sc;
    mx = std::max(mx, a * sc);
  }
  for (int t = 0; t < n; ++t) {
    const double p = std::exp(s[std::size_t(t)] - mx);
    sum += p;
    for (int d = 0; d < D; ++d) out[std::size_t(d)] += p * V[std::size_t(t) * D + d];
  }
  for (auto& o : out) o /= sum;
  return out;
}

/// The fast path's bound (as derived in tests/quant/test_quant_attention.cpp, check_int8_probs with
/// int8_query): the query rounded to int8 (int16 for 8-bit keys) moves each score by at most
/// delta = (qs / 2) sum_d |s c_d|, which moves the output by at most max|v| (e^(2 delta) - 1); the
/// value weights p_t s_t rounded per 64-token tile to multiples of max w / L move the output by at
/// most max_t(p_t s_t) n cmax / (2 L sum p), times e^(4 delta). Quantized tokens only: sinks are
/// exact and the bound covers them trivially.
double fast_bound(int bits, bool asym, const std::vector<float>& K, const std::vector<float>& V, int n, int D,
                  const float* q, double ref_max) {
  const double L = bits == 8 ? 127.0 : 255.0;
  const double cmax = bits == 2 ? 3.0 : bits == 4 ? 8.0 : 128.0;  // max |code - centre|
  const double sc = 1.0 / std::sqrt(double(D));
  double qmax = 0, vmax = 0, sum_sc = 0, mx = -INFINITY;
  for (int d = 0; d < D; ++d) qmax = std::max(qmax, std::fabs(q[d] * sc));
  std::vector<double> vs(static_cast<std::size_t>(n)), s(static_cast<std::size_t>(n));
  for (int t = 0; t < n; ++t) {
    double lo = 1e30, hi = -1e30, am = 0, klo = 1e30, khi = -1e30, kmx = 0, a = 0;
    for (int d = 0; d < D; ++d) {
      const double x = V[std::size_t(t) * D + d], y = K[std::size_t(t) * D + d];
      lo = std::min(lo, x), hi = std::max(hi, x), am = std::max(am, std::fabs(x));
      klo = std::min(klo, y), khi = std::max(khi, y), kmx = std::max(kmx, std::fabs(y));
      a += double(q[d]) * y;
    }
    // the value scale, bounded from the dequantized row (|x - x^| <= scale / 2 inverted)
    vs[std::size_t(t)] = 1.002 * (asym ? (hi - lo) / ((1 << bits) - 2) : am / ((1 << (bits - 1)) - 1.5));
    vmax = std::max(vmax, am);
    sum_sc = std::max(sum_sc, D * (2.05 * kmx + 2 * (khi - klo)));
    s[std::size_t(t)] = a * sc;
    mx = std::max(mx, a * sc);
  }
  double psum = 0, wmax = 0;
  for (int t = 0; t < n; ++t) {
    const double p = std::exp(s[std::size_t(t)] - mx);
    psum += p;
    wmax = std::max(wmax, p * vs[std::size_t(t)]);
  }
  const double delta = qmax / (bits == 8 ? 32767.0 : 127.0) / 2 * sum_sc;
  return wmax * n * cmax / (2 * L * psum) * std::exp(4 * delta) + vmax * std::expm1(2 * delta) + 1e-5 * ref_max;
}

/// Builds `base + (fast=1)` and `base` with the same tokens in both layers; checks the fast one
/// against the double reference within fast_bound, the exact one within float rounding, and that
/// the fast one really took a different (integer) path.
void check_fast_spec(const std::string& base, const std::string& args, int bits, bool asym, const shape& sh, int n,
                     std::uint32_t seed, kvc::thread_pool* pool) {
  const std::string sep = args.empty() ? "" : ",";
  const std::string fast_spec = base + "(" + args + sep + "fast=1)";
  const std::string exact_spec = base + (args.empty() ? "" : "(" + args + ")");
  INFO(fast_spec << " " << sh.hq << "x" << sh.hkv << "x" << sh.D << " n = " << n);
  auto fast = kvc::runtime::make_cache(fast_spec, config(sh));
  auto exact = kvc::runtime::make_cache(exact_spec, config(sh));
  REQUIRE(fast->name() == fast_spec);
  const inputs in(sh, n, seed);
  const auto sf = fast->add_sequence(), se = exact->add_sequence();
  for (int layer = 0; layer < 2; ++layer) {
    fast->append(sf, layer, in.k.data(), in.v.data(), n);
    exact->append(se, layer, in.k.data(), in.v.data(), n);
  }
  const int G = sh.hq / sh.hkv;
  kvc::decode_options o;
  o.pool = pool;
  std::vector<float> out_f(in.q.size()), out_e(in.q.size());
  fast->attention(sf, 1, in.q.data(), sh.hq, out_f.data(), o);
  exact->attention(se, 1, in.q.data(), sh.hq, out_e.data(), o);
  double moved = 0;
  for (int h = 0; h < sh.hkv; ++h) {
    const int len = fast->length(sf, 1, h);
    REQUIRE(len == n);
    std::vector<float> K(static_cast<std::size_t>(len) * sh.D), V(K.size()), K2(K.size()), V2(K.size());
    fast->gather(sf, 1, h, K.data(), V.data());
    exact->gather(se, 1, h, K2.data(), V2.data());
    REQUIRE(K == K2);  // same codec, same tokens: the storages differ only in their attention
    REQUIRE(V == V2);
    for (int g = 0; g < G; ++g) {
      const int qh = h * G + g;
      const float* qp = in.q.data() + static_cast<std::size_t>(qh) * sh.D;
      const auto ref = reference(K, V, len, sh.D, qp);
      double ref_max = 0, err_f = 0, err_e = 0;
      for (double r : ref) ref_max = std::max(ref_max, std::fabs(r));
      for (int d = 0; d < sh.D; ++d) {
        const std::size_t i = static_cast<std::size_t>(qh) * sh.D + d;
        err_f = std::max(err_f, std::fabs(out_f[i] - ref[std::size_t(d)]));
        err_e = std::max(err_e, std::fabs(out_e[i] - ref[std::size_t(d)]));
        moved = std::max(moved, std::fabs(double(out_f[i]) - out_e[i]));
      }
      const double bound = fast_bound(bits, asym, K, V, len, sh.D, qp, ref_max);
      INFO("head " << qh << " fast err " << err_f << " bound " << bound << " exact err " << err_e);
      REQUIRE(err_e <= 1e-4 * ref_max);
      REQUIRE(err_f <= bound);
    }
  }
#ifndef KVC_QUANT_AVX2
#error "KVC_QUANT_AVX2 is defined by <kvc/quant/codec.hpp>; without it the check below would be skipped"
#elif KVC_QUANT_AVX2
  // the integer path ran (it rounds the query and the weights, so the output moves)
  if (G <= 4) CHECK(moved > 0);
#else
  WARN("built without AVX2+F16C: fast() runs the exact path");
  (void)moved;
#endif
}

}  // namespace

TEST_CASE("fast=1 storages attend through quant_attention_options::fast() within its bound", "[runtime][quant]") {
  kvc::thread_pool pool(2);
  for (int n : {70, 300}) {
    check_fast_spec("int2", "", 2, true, {8, 2, 128}, n, 1 + n, nullptr);
    check_fast_spec("int2", "sinks=4", 2, true, {4, 1, 256}, n, 2 + n, &pool);
    check_fast_spec("int4", "", 4, true, {9, 3, 64}, n, 3 + n, nullptr);
    check_fast_spec("int4", "", 4, true, {8, 2, 128}, n, 4 + n, &pool);
    check_fast_spec("int8", "", 8, false, {8, 2, 128}, n, 5 + n, nullptr);
    check_fast_spec("int8", "scheme=asym", 8, true, {4, 4, 64}, n, 6 + n, &pool);
  }
}

TEST_CASE("fast=0 is the default exact attention", "[runtime][quant]") {
  const shape sh{8, 2, 128};
  const inputs in(sh, 100, 9);
  auto a = kvc::runtime::make_cache("int4(fast=0)", config(sh));
  auto b = kvc::runtime::make_cache("int4", config(sh));
  const auto sa = a->add_sequence(), sb = b->add_sequence();
  a->append(sa, 0, in.k.data(), in.v.data(), 100);
  b->append(sb, 0, in.k.data(), in.v.data(), 100);
  std::vector<float> oa(in.q.size()), ob(in.q.size());
  a->attention(sa, 0, in.q.data(), sh.hq, oa.data());
  b->attention(sb, 0, in.q.data(), sh.hq, ob.data());
  REQUIRE(oa == ob);
  // the other storages take fast=0 too
  for (const char* s : {"kivi(bits=2,fast=0)", "fp8(fast=0)", "rotated(bits=4,fast=0)", "gear(fast=0)"})
    REQUIRE(kvc::runtime::make_cache(s, config(sh)) != nullptr);
}

TEST_CASE("fast= is refused where fast() would not apply, naming the value and the expectation", "[runtime][quant]") {
  struct bad {
    const char* spec;
    int head_dim;
    std::vector<const char*> want;
  };
  const std::vector<bad> cases = {
      {"int4(fast=2)", 128, {"'int4(fast=2)'", "fast = 2", "expected 0 (exact attention) or 1"}},
      {"int8(scheme=asym,fast=-1)", 128, {"fast = -1", "expected 0 (exact attention) or 1"}},
      {"kivi(bits=2,fast=1)", 128, {"'kivi(bits=2,fast=1)'", "fast = 1", "expected 0", "int8, int4 and int2"}},
      {"kivi(fast=2)", 128, {"fast = 2", "expected 0"}},
      {"fp8(fast=1)", 128, {"fast = 1", "expected 0", "int8, int4 and int2"}},
      {"rotated(bits=2,fast=1)", 128, {"fast = 1", "expected 0"}},
      {"outliers(fast=1)", 128, {"fast = 1", "expected 0"}},
      {"gear(fast=1)", 128, {"fast = 1", "expected 0"}},
      {"int2(fast=1)", 64, {"fast = 1 with head_dim = 64", "expected head_dim a multiple of 128 for 2-bit codes"}},
      {"int4(fast=1)", 32, {"fast = 1 with head_dim = 32", "expected head_dim a multiple of 64 for 4-bit codes"}},
      {"int8(fast=1)", 16, {"head_dim = 16", "multiple of 32"}},
      {"int4(fast=0.5)", 128, {"fast = 0.5", "expected an integer"}},
      {"int4(fast=yes)", 128, {"fast = yes", "expected a number"}},
      {"int4(fast=1,pre_rope=1)", 128, {"fast = 1 with pre_rope = 1", "expected fast = 0"}},
  };
  kvc::rope_config rc;
  rc.head_dim = 128;
  kvc::runtime::storage_options opt;
  opt.rope = &rc;
  for (const auto& c : cases) {
    INFO(c.spec);
    kvc::cache_config cfg = config({8, 2, c.head_dim});
    std::string msg;
    try {
      kvc::runtime::make_cache(c.spec, cfg, opt);
    } catch (const kvc::error& e) {
      msg = e.what();
    }
    INFO("message: " << msg);
    REQUIRE(!msg.empty());
    for (const char* w : c.want) CHECK(msg.find(w) != std::string::npos);
  }
  // pre_rope=1 without fast stays accepted (the refusal above is about fast)
  REQUIRE(kvc::runtime::make_cache("int4(pre_rope=1)", config({8, 2, 128}), opt) != nullptr);
}
