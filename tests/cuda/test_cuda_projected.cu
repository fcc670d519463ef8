// SPDX-License-Identifier: Apache-2.0
// kvc::cuda::decode_attention_projected (kvc/cuda/projected_attention.cuh) against a dense double
// reference written here: each stream's stored coefficient rows are unpacked from the documented
// layout (z = [inner K row | inner V row], c_k = z[0, r_k), c_v = z[r_k, r_k + r_v)), rebuilt as
// k̂ = U_k c_k + μ_k and v̂ = U_v c_v + μ_v in double (keys then rotated in double at their stored
// positions for pre-RoPE caches), and attended with a plain two-pass softmax in double. Shapes:
// head_dim 64 and 128, ranks D/8, D/4, D/2 (equal ranks, and r_k != r_v: the split row), G 1, 4
// and 12 (two query-head blocks), fp16 and fp32 coefficients, centered and not, pre-RoPE keys
// (rotate-half and interleaved, partial rotary_dim), ragged batches with empty and one-token
// streams, page sizes 1, 16, 64. Outputs are poisoned with NaN before the call.
//
// Before it looks for a device, the test checks on the host (so it runs even where the GPU part
// skips): the double reference against kvc::cpu::projected_decode_attention on the same caches
// (which validates the reference and its unpacking here, not the kernel), and the argument checks
// of the device entry points, which throw before any CUDA call.
//
// Tolerance: the kernel works in float on the stored coefficients the reference also reads, so
// the error is float rounding of r- and D-long dot products: |out - ref| <= 2e-4 * max(1, max|v̂|)
// and |lse - ref| <= 2e-4 * (1 + |ref|), the CPU low-rank tests' bounds (tests/lowrank).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include <kvc/cpu/projected_attention.hpp>
#include <kvc/cuda.cuh>
#include <kvc/cuda/projected_attention.cuh>
#include <kvc/store/projected_cache.hpp>

#include "cuda_test_util.cuh"

using namespace kvc_gpu_test;
using kvc::lowrank::basis;
using kvc::lowrank::projected_cache;
using kvc::lowrank::projected_config;

namespace {

constexpr double tol = 2e-4;
constexpr double theta = 500.0;  // fast-turning pairs: a wrong angle shows within a few hundred positions

/// r random orthonormal directions of R^D (Gram-Schmidt in double on normal rows), and a random
/// mean when centered: the kernel must not depend on how a basis was fitted.
basis random_basis(kvc_test::rng& g, std::int32_t D, std::int32_t r, bool center) {
  basis b;
  b.dim = D;
  b.rank = r;
  std::vector<double> u(static_cast<std::size_t>(r) * D);
  for (std::int32_t j = 0; j < r; ++j) {
    double* x = u.data() + static_cast<std::size_t>(j) * D;
    for (;;) {
      for (std::int32_t d = 0; d < D; ++d) x[d] = g.normal();
      for (std::int32_t i = 0; i < j; ++i) {
        const double* y = u.data() + static_cast<std::size_t>(i) * D;
        double dot = 0;
        for (std::int32_t d = 0; d < D; ++d) dot += x[d] * y[d];
        for (std::int32_t d = 0; d < D; ++d) x[d] -= dot * y[d];
      }
      double nn = 0;
      for (std::int32_t d = 0; d < D; ++d) nn += x[d] * x[d];
      if (nn > 1e-6) {
        for (std::int32_t d = 0; d < D; ++d) x[d] /= std::sqrt(nn);
        break;
      }
    }
  }
  b.u.assign(u.begin(), u.end());
  if (center) b.mean = g.normals(static_cast<std::size_t>(D), 0.5f);
  b.eigenvalues.assign(static_cast<std::size_t>(D), 1.0);
  b.energy = static_cast<double>(r) / D;
  return b;
}

struct shape {
  std::int32_t D, rk, rv, hkv, G, B, P, max_len;
  bool center, pre_rope, interleaved;
  std::int32_t rot;  // rotary_dim with pre_rope; 0 = D
};

/// A projected cache of two layers filled with random rows (layer 1 is the one attended, so the
/// layer index matters), ragged per-head lengths after a random keep, some empty sequences.
template <class T>
struct test_case {
  shape s;
  projected_cache<T> cache;
  std::vector<kvc::seq_id> seqs;
  std::vector<float> q;  // [B][hkv * G][D]
  static constexpr std::int32_t layer = 1;

  static projected_config config(const shape& s) {
    projected_config c;
    c.num_layers = 2;
    c.num_kv_heads = s.hkv;
    c.head_dim = s.D;
    c.rank = s.rk;
    c.value_rank = s.rv;
    c.page_size = s.P;
    c.max_pages = 1 << 15;
    c.pre_rope = s.pre_rope;
    c.rope.head_dim = s.D;
    c.rope.rotary_dim = s.rot;
    c.rope.theta = static_cast<float>(theta);
    c.rope.style = s.interleaved ? kvc::rope_style::interleaved : kvc::rope_style::rotate_half;
    return c;
  }
  test_case(kvc_test::rng& g, const shape& sh) : s(sh), cache(config(sh)) {
    const std::int32_t H = s.hkv, D = s.D;
    for (std::int32_t l = 0; l < 2; ++l)
      for (std::int32_t h = 0; h < H; ++h)
        cache.set_basis(l, h, random_basis(g, D, s.rk, s.center && g.coin(0.8)),
                        random_basis(g, D, s.rv, s.center && g.coin(0.8)));
    for (std::int32_t b = 0; b < s.B; ++b) {
      seqs.push_back(cache.add_sequence());
      const std::int32_t n = g.coin(0.15) ? g.integer(0, 1) : g.integer(2, s.max_len);
      const std::int32_t start = g.integer(0, 3000);
      std::vector<std::int32_t> pos(static_cast<std::size_t>(n));
      for (std::int32_t t = 0; t < n; ++t) pos[t] = start + (t < n / 2 ? t : t + 37);  // a gap in the middle
      for (std::int32_t l = 0; l < 2; ++l) {
        const auto k = g.normals(static_cast<std::size_t>(n) * H * D), v = g.normals(static_cast<std::size_t>(n) * H * D);
        cache.append(seqs.back(), l, k.data(), v.data(), n, pos.data());
      }
      if (n > 2 && g.coin(0.5)) {  // ragged heads (one may lose every token)
        std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(H));
        for (auto& kh : kept) {
          const double keep = g.coin(0.15) ? 0.0 : 0.6;
          for (std::int32_t t = 0; t < n; ++t)
            if (g.coin(keep)) kh.push_back(t);
        }
        cache.keep_layer(seqs.back(), layer, kept);
      }
    }
    q = g.normals(static_cast<std::size_t>(s.B) * H * s.G * D, 1.5f);
  }
  std::int32_t hq() const { return s.hkv * s.G; }
  std::string name() const {
    char buf[200];
    std::snprintf(buf, sizeof buf, "T=%s D=%d rk=%d rv=%d hkv=%d G=%d B=%d P=%d center=%d pre_rope=%d%s rot=%d",
                  sizeof(T) == 4 ? "fp32" : "fp16", s.D, s.rk, s.rv, s.hkv, s.G, s.B, s.P, int(s.center),
                  int(s.pre_rope), s.interleaved ? " interleaved" : "", s.rot ? s.rot : s.D);
    return buf;
  }
};

/// Dense double attention of the G query heads of kv head h of sequence b: out [G][D], lse [G],
/// and max|v̂| of the stream. An empty stream: zeros and -inf.
template <class T>
void reference_head(const test_case<T>& tc, std::int32_t b, std::int32_t h, std::vector<double>& out,
                    std::vector<double>& lse, double& vmax) {
  const auto& c = tc.cache;
  const std::int32_t D = tc.s.D, rk = tc.s.rk, rv = tc.s.rv, G = tc.s.G, hw = (rk + rv + 1) / 2;
  const std::int32_t L = test_case<T>::layer;
  const kvc::seq_id seq = tc.seqs[static_cast<std::size_t>(b)];
  const std::int32_t n = c.length(seq, L, h);
  out.assign(static_cast<std::size_t>(G) * D, 0.0);
  lse.assign(static_cast<std::size_t>(G), -INFINITY);
  vmax = 0;
  if (n == 0) return;
  std::vector<float> kr(static_cast<std::size_t>(n) * hw), vr(kr.size());
  c.coefficients().gather(seq, L, h, kr.data(), vr.data());
  const std::int32_t* pos = c.coefficients().positions(seq, L, h);
  const basis& bk = c.key_basis(L, h);
  const basis& bv = c.value_basis(L, h);
  std::vector<double> K(static_cast<std::size_t>(n) * D), V(K.size());
  const std::int32_t rot = tc.s.rot ? tc.s.rot : D;
  for (std::int32_t t = 0; t < n; ++t) {
    auto z = [&](std::int32_t i) -> double {
      return i < hw ? kr[static_cast<std::size_t>(t) * hw + i] : vr[static_cast<std::size_t>(t) * hw + i - hw];
    };
    double* kt = K.data() + static_cast<std::size_t>(t) * D;
    double* vt = V.data() + static_cast<std::size_t>(t) * D;
    for (std::int32_t d = 0; d < D; ++d) {
      kt[d] = bk.centered() ? bk.mean[d] : 0.0;
      vt[d] = bv.centered() ? bv.mean[d] : 0.0;
      for (std::int32_t j = 0; j < rk; ++j) kt[d] += z(j) * bk.u[static_cast<std::size_t>(j) * D + d];
      for (std::int32_t j = 0; j < rv; ++j) vt[d] += z(rk + j) * bv.u[static_cast<std::size_t>(j) * D + d];
      vmax = std::max(vmax, std::fabs(vt[d]));
    }
    if (tc.s.pre_rope)  // RoFormer's rotation from its definition: pair i turns by p · θ^(-2i/rot)
      for (std::int32_t i = 0; i < rot / 2; ++i) {
        const double a = pos[t] * std::pow(theta, -2.0 * i / rot);
        const std::int32_t i0 = tc.s.interleaved ? 2 * i : i, i1 = tc.s.interleaved ? 2 * i + 1 : i + rot / 2;
        const double x0 = kt[i0], x1 = kt[i1];
        kt[i0] = x0 * std::cos(a) - x1 * std::sin(a);
        kt[i1] = x0 * std::sin(a) + x1 * std::cos(a);
      }
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  for (std::int32_t g = 0; g < G; ++g) {
    const float* qg = tc.q.data() + (static_cast<std::size_t>(b) * tc.hq() + static_cast<std::size_t>(h) * G + g) * D;
    std::vector<double> s(static_cast<std::size_t>(n));
    double m = -INFINITY;
    for (std::int32_t t = 0; t < n; ++t) {
      double x = 0;
      for (std::int32_t d = 0; d < D; ++d) x += static_cast<double>(qg[d]) * K[static_cast<std::size_t>(t) * D + d];
      s[t] = scale * x;
      m = std::max(m, s[t]);
    }
    double l = 0;
    for (std::int32_t t = 0; t < n; ++t) l += std::exp(s[t] - m);
    for (std::int32_t t = 0; t < n; ++t) {
      const double p = std::exp(s[t] - m) / l;
      for (std::int32_t d = 0; d < D; ++d) out[static_cast<std::size_t>(g) * D + d] += p * V[static_cast<std::size_t>(t) * D + d];
    }
    lse[static_cast<std::size_t>(g)] = m + std::log(l);
  }
}

/// Compares out [B][hq][D] and lse [B][hq] (float, from a kernel) with the double reference.
template <class T>
void compare(const test_case<T>& tc, const std::vector<float>& out, const std::vector<float>& lse, const char* who,
             bool skip_empty_seqs) {
  const std::int32_t H = tc.s.hkv, G = tc.s.G, D = tc.s.D, hq = tc.hq();
  const std::string name = tc.name();
  std::vector<double> ro, rl;
  for (std::int32_t b = 0; b < tc.s.B; ++b) {
    bool any = false;
    for (std::int32_t h = 0; h < H; ++h) any = any || tc.cache.length(tc.seqs[b], test_case<T>::layer, h) > 0;
    if (!any && skip_empty_seqs) continue;  // the CPU entry point refuses a sequence with nothing to attend to
    for (std::int32_t h = 0; h < H; ++h) {
      double vmax = 0;
      reference_head(tc, b, h, ro, rl, vmax);
      const std::int32_t n = tc.cache.length(tc.seqs[b], test_case<T>::layer, h);
      for (std::int32_t g = 0; g < G; ++g) {
        const std::size_t row = static_cast<std::size_t>(b) * hq + static_cast<std::size_t>(h) * G + g;
        for (std::int32_t d = 0; d < D; ++d) {
          const double want = ro[static_cast<std::size_t>(g) * D + d];
          GPU_CHECK(close(out[row * D + d], want, tol * std::max(1.0, vmax)),
                    "%s %s: out seq %d head %d g %d d %d: got %g want %g (n = %d)", who, name.c_str(), b, h, g, d,
                    out[row * D + d], want, n);
        }
        const double want = rl[static_cast<std::size_t>(g)];
        GPU_CHECK(want == -INFINITY ? lse[row] == -INFINITY : close(lse[row], want, tol * (1 + std::fabs(want))),
                  "%s %s: lse seq %d head %d g %d: got %g want %g (n = %d)", who, name.c_str(), b, h, g, lse[row], want, n);
      }
    }
  }
}

/// Host: the reference against the CPU kernel on the same cache (validates the reference here).
template <class T>
void check_reference_on_host(kvc_test::rng& g, const shape& s) {
  const test_case<T> tc(g, s);
  const std::int32_t hq = tc.hq(), D = s.D;
  std::vector<float> out(static_cast<std::size_t>(s.B) * hq * D, 0.0f), lse(static_cast<std::size_t>(s.B) * hq, 0.0f);
  for (std::int32_t b = 0; b < s.B; ++b) {
    bool any = false;
    for (std::int32_t h = 0; h < s.hkv; ++h) any = any || tc.cache.length(tc.seqs[b], test_case<T>::layer, h) > 0;
    if (!any) continue;
    kvc::decode_options o;
    o.lse = lse.data() + static_cast<std::size_t>(b) * hq;
    kvc::cpu::projected_decode_attention(tc.cache, tc.seqs[b], test_case<T>::layer,
                                         tc.q.data() + static_cast<std::size_t>(b) * hq * D, hq,
                                         out.data() + static_cast<std::size_t>(b) * hq * D, o);
  }
  compare(tc, out, lse, "host: reference vs cpu::projected_decode_attention", true);
}

/// Device: the kernel against the reference.
template <class T>
void check_device(kvc_test::rng& g, const shape& s) {
  const test_case<T> tc(g, s);
  const std::int32_t hq = tc.hq(), D = s.D;
  kvc::cuda::device_projected_layer<T> dl(tc.cache, tc.seqs, test_case<T>::layer);
  auto dq = to_device(tc.q);
  const std::size_t rows = static_cast<std::size_t>(s.B) * hq;
  auto dout = poisoned(rows * D);
  auto dlse = poisoned(rows);
  kvc::cuda::device_decode_options o;
  o.lse = dlse.data();
  kvc::cuda::decode_attention_projected(dl.desc(), dq.data(), hq, dout.data(), o);
  KVC_CUDA_CHECK(cudaDeviceSynchronize());
  compare(tc, dout.download(rows * D), dlse.download(rows), "device", false);
}

/// The sweep: every (D, rank ratio, G, T, centering) once, page sizes, batches, lengths and the
/// key layout drawn per case.
template <class F>
void sweep(kvc_test::rng& g, bool full, F&& run) {
  for (std::int32_t D : {64, 128})
    for (std::int32_t div : {8, 4, 2})
      for (std::int32_t G : {1, 4, 12})
        for (bool center : {false, true}) {
          if (!full && (G == 12 || (div == 4 && D == 128))) continue;
          const std::int32_t r = D / div;
          shape s{};
          s.D = D;
          s.rk = r;
          // Two ranks in a third of the cases: r_v = 2 r_k (the values' larger rank) or r_k + 1
          // (an odd total: the padded row).
          const std::int32_t pick = g.integer(0, 5);
          s.rv = pick == 0 ? std::min(D, 2 * r) : pick == 1 ? r + 1 : r;
          s.hkv = g.integer(1, 3);
          s.G = G;
          s.B = g.integer(1, 4);
          const std::int32_t pp = g.integer(0, 2);
          s.P = pp == 0 ? 1 : pp == 1 ? 16 : 64;
          s.max_len = full ? (s.P == 1 ? 300 : 1500) : 200;
          s.center = center;
          s.pre_rope = g.coin(0.3);
          s.interleaved = s.pre_rope && g.coin();
          s.rot = s.pre_rope && g.coin(0.3) ? D / 2 : 0;
          run(s, g.coin());  // fp16 or fp32 coefficients
        }
}

/// Expects f() to throw kvc::error whose message contains `needle`.
template <class F>
void expect_error(F&& f, const char* needle, const char* what) {
  bool threw = false;
  std::string msg;
  try {
    f();
  } catch (const kvc::error& e) {
    threw = true;
    msg = e.what();
  }
  GPU_CHECK(threw && msg.find(needle) != std::string::npos, "%s: expected a kvc::error containing \"%s\", got %s", what,
            needle, threw ? msg.c_str() : "no exception");
}

/// The argument checks, on the host: each throws before any CUDA call.
void check_errors() {
  using kvc::half;
  projected_config cfg;
  cfg.num_layers = 2;
  cfg.num_kv_heads = 2;
  cfg.head_dim = 64;
  cfg.rank = 16;
  cfg.max_pages = 64;
  projected_cache<half> c(cfg);
  const auto seq = c.add_sequence();
  kvc_test::rng g(7101);
  c.set_basis(0, 0, random_basis(g, 64, 16, false), random_basis(g, 64, 16, false));
  // Layer 0 head 1 has no basis; layer 1 none at all.
  expect_error([&] { kvc::cuda::device_projected_layer<half> d(c, {seq}, 2); }, "layer = 2, expected 0..1",
               "device_projected_layer: layer out of range");
  expect_error([&] { kvc::cuda::device_projected_layer<half> d(c, {seq, seq + 7}, 0); },
               "is not a live sequence", "device_projected_layer: dead sequence");
  expect_error([&] { kvc::cuda::device_projected_layer<half> d(c, {seq}, 0); }, "head 1 has no basis",
               "device_projected_layer: missing basis");

  // decode_attention_projected with a hand-filled descriptor: pointers that are never dereferenced
  // (every case throws before the launch).
  static std::int32_t fake_i[4];
  static const std::int32_t* fake_t[4];
  static float fake_f[4];
  static half fake_h[4];
  kvc::cuda::projected_layer_desc<half> d;
  d.pool = fake_h;
  d.page_stride = 2 * 16 * 16;
  d.page_size = 16;
  d.head_dim = 64;
  d.key_rank = 16;
  d.value_rank = 16;
  d.num_kv_heads = 2;
  d.key_basis = fake_f;
  d.value_basis = fake_f;
  d.tables = fake_t;
  d.lengths = fake_i;
  d.host_lengths = {3, 0};
  float* q = fake_f;
  float* out = fake_f;
  auto call = [&](const kvc::cuda::projected_layer_desc<half>& dd, std::int32_t hq, const float* qq, float* oo,
                  const kvc::cuda::device_decode_options& o) {
    kvc::cuda::decode_attention_projected(dd, qq, hq, oo, o);
  };
  const kvc::cuda::device_decode_options none;
  expect_error([&] { call(d, 3, q, out, none); }, "num_q_heads = 3, expected a positive multiple of num_kv_heads = 2",
               "odd query heads");
  expect_error([&] { call(d, 0, q, out, none); }, "num_q_heads = 0", "no query heads");
  expect_error([&] { call(d, 4, nullptr, out, none); }, "q or out is null", "null q");
  expect_error([&] { call(d, 4, q, nullptr, none); }, "q or out is null", "null out");
  {
    kvc::cuda::device_decode_options o;
    o.probs = fake_f;
    o.probs_stride = 4;
    expect_error([&] { call(d, 4, q, out, o); }, "opt.probs or opt.group_probs is set", "probs");
    o.probs = nullptr;
    o.group_probs = fake_f;
    expect_error([&] { call(d, 4, q, out, o); }, "opt.probs or opt.group_probs is set", "group_probs");
  }
  auto with = [&](auto edit) {
    kvc::cuda::projected_layer_desc<half> e = d;
    edit(e);
    return e;
  };
  expect_error([&] { call(with([](auto& e) { e.key_rank = 0; }), 4, q, out, none); }, "key_rank = 0, expected 1..64",
               "key rank 0");
  expect_error([&] { call(with([](auto& e) { e.value_rank = 65; }), 4, q, out, none); },
               "value_rank = 65, expected 1..64", "value rank past head_dim");
  expect_error([&] { call(with([](auto& e) { e.num_kv_heads = 0; }), 4, q, out, none); }, "num_kv_heads = 0",
               "no kv heads");
  expect_error([&] { call(with([](auto& e) { e.head_dim = 0; }), 4, q, out, none); }, "head_dim = 0", "head_dim 0");
  expect_error([&] { call(with([](auto& e) { e.page_size = 12; }), 4, q, out, none); }, "page_size = 12",
               "page size not a power of two");
  expect_error([&] { call(with([](auto& e) { e.page_stride = 100; }), 4, q, out, none); }, "page_stride = 100",
               "page stride too small");
  expect_error([&] { call(with([](auto& e) { e.host_lengths = {1, 2, 3}; }), 4, q, out, none); },
               "host_lengths.size() = 3", "streams not a multiple of the kv heads");
  expect_error([&] { call(with([](auto& e) { e.host_lengths = {-1, 2}; }), 4, q, out, none); },
               "host_lengths[0] = -1", "negative length");
  expect_error([&] { call(with([](auto& e) { e.tables = nullptr; }), 4, q, out, none); }, ".tables is null",
               "null tables");
  expect_error([&] { call(with([](auto& e) { e.key_basis = nullptr; }), 4, q, out, none); }, ".value_basis is null",
               "null basis");
  expect_error([&] { call(with([](auto& e) { e.pool = nullptr; }), 4, q, out, none); }, "pool is null",
               "null pool with tokens");
  const kvc::rope rp([] {
    kvc::rope_config rc;
    rc.head_dim = 64;
    return rc;
  }());
  expect_error([&] { call(with([&](auto& e) { e.pre_rope = &rp; }), 4, q, out, none); },
               ".inv_freq or .positions is null with pre-RoPE keys", "pre-RoPE without positions");
  const kvc::rope rp32([] {
    kvc::rope_config rc;
    rc.head_dim = 32;
    return rc;
  }());
  expect_error([&] { call(with([&](auto& e) { e.pre_rope = &rp32; }), 4, q, out, none); },
               "pre_rope->config().head_dim = 32, expected head_dim = 64", "RoPE of another head_dim");
  // A row too wide for one block's shared memory even at one token per tile.
  expect_error(
      [&] {
        call(with([](auto& e) {
               e.head_dim = 2048;
               e.key_rank = 2048;
               e.value_rank = 2048;
               e.page_stride = 2LL * 16 * 2048;
             }),
             4, q, out, none);
      },
      "bytes of shared memory", "row too wide");
}

}  // namespace

int main() {
  std::printf("test_cuda_projected: host checks (the double reference against the CPU kernel, argument checks)\n");
  {
    kvc_test::rng g(7001);
    // fp32 coefficients only: the reference reads fp16 ones through kv_cache::gather, and the CPU
    // kernel's fp16 row loader (cpu/simd.hpp) draws nvcc's front-end warning 128 ("loop is not
    // reachable") when a .cu instantiates it.
    sweep(g, false, [&](const shape& s, bool) { check_reference_on_host<float>(g, s); });
    check_errors();
  }
  if (!require_device("test_cuda_projected")) {
    if (failures) return finish("test_cuda_projected");
    std::printf("test_cuda_projected: host checks passed (%d checks); the kernel itself did not run\n", checks);
    return skip_code;
  }
  kvc_test::rng g(7002);
  sweep(g, true, [&](const shape& s, bool fp16) {
    if (fp16) check_device<kvc::half>(g, s);
    else check_device<float>(g, s);
  });
  // Batch 1, one long stream per head, a page size of 16: many tiles through the online softmax.
  for (bool pre : {false, true}) {
    shape s{};
    s.D = 128, s.rk = 32, s.rv = 48, s.hkv = 2, s.G = 4, s.B = 1, s.P = 16, s.max_len = 20000;
    s.center = true, s.pre_rope = pre;
    check_device<kvc::half>(g, s);
  }
  return finish("test_cuda_projected");
}
