// SPDX-License-Identifier: Apache-2.0
// Projected (PCA) low-rank KV: kvc/lowrank/pca.hpp, kvc/store/projected_cache.hpp, kvc/cpu/projected_attention.hpp.
// The attention is checked against a dense double-precision reference written here: the keys and
// values the cache stands for are rebuilt in double from the stored coefficients and the bases
// (k̂ = μ_k + Σ_j c_j u_j), then attended with a plain two-pass softmax. Nothing of the kernel
// (projections, online softmax, tiles) is reused, so a wrong basis row, a missing mean, a wrong
// scale or a wrong token shows as a mismatch. Full rank is also checked against the original K/V.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <kvc/attention.hpp>
#include <kvc/attention/reference.hpp>
#include <kvc/cpu/projected_attention.hpp>
#include <kvc/lowrank/pca.hpp>
#include <kvc/parallel/thread_pool.hpp>
#include <kvc/store/projected_cache.hpp>

#include "isa_check.hpp"
#include "kvc_catch.hpp"

namespace {

using kvc::lowrank::basis;
using kvc::lowrank::fit_basis;
using kvc::lowrank::projected_cache;
using kvc::lowrank::projected_config;
using kvc::lowrank::rank_spec;

/// [n][H][D] rows whose channel d has scale 1 / (1 + d / 8): a decaying spectrum, so a rank-r
/// basis captures most but not all of each row (coefficients are then far from trivial).
std::vector<float> rows(std::int32_t n, std::int32_t H, std::int32_t D, std::uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<float> nd;
  std::vector<float> x(static_cast<std::size_t>(n) * H * D);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = nd(g) / (1.0f + static_cast<float>(i % D) / 8.0f) + 0.3f;
  return x;
}

/// Dense double attention of one query over rows K, V ([n][D] doubles).
void dense_attention(const float* q, const std::vector<double>& K, const std::vector<double>& V, std::int32_t n,
                     std::int32_t D, double scale, double* out, double* lse) {
  std::vector<double> s(static_cast<std::size_t>(n));
  double m = -std::numeric_limits<double>::infinity();
  for (std::int32_t t = 0; t < n; ++t) {
    double a = 0;
    for (std::int32_t d = 0; d < D; ++d) a += double(q[d]) * K[static_cast<std::size_t>(t) * D + d];
    s[t] = a * scale;
    m = std::max(m, s[t]);
  }
  double l = 0;
  for (std::int32_t t = 0; t < n; ++t) l += std::exp(s[t] - m);
  for (std::int32_t d = 0; d < D; ++d) out[d] = 0;
  for (std::int32_t t = 0; t < n; ++t) {
    const double p = std::exp(s[t] - m) / l;
    for (std::int32_t d = 0; d < D; ++d) out[d] += p * V[static_cast<std::size_t>(t) * D + d];
  }
  *lse = m + std::log(l);
}

/// The [n][D] rows a stream stands for, rebuilt in double: μ + Σ_j c[t][j] u_j.
std::vector<double> reconstruct(const basis& b, const std::vector<float>& c, std::int32_t n) {
  const std::int32_t D = b.dim, r = b.rank;
  std::vector<double> x(static_cast<std::size_t>(n) * D);
  for (std::int32_t t = 0; t < n; ++t)
    for (std::int32_t d = 0; d < D; ++d) {
      double a = b.centered() ? double(b.mean[d]) : 0.0;
      for (std::int32_t j = 0; j < r; ++j) a += double(c[static_cast<std::size_t>(t) * r + j]) * double(b.u[static_cast<std::size_t>(j) * D + d]);
      x[static_cast<std::size_t>(t) * D + d] = a;
    }
  return x;
}

struct case_params {
  std::int32_t D, r, n, G;
  bool center;
  bool ragged;  // evict tokens from head 1 so the heads differ in length
  kvc::thread_pool* pool;
  bool split = true;  // with a pool: split_tokens = 64 (the fallback kernel), else heads over the pool
  bool empty_head = false;  // evict every token of head 1
  std::int32_t page = 16;   // tokens per page (the kernel's tiles never cross one)
};

/// Builds a projected cache (bases fitted on a separate 256-token calibration block), appends n
/// tokens, attends and compares with the dense double reference over the reconstructed rows.
template <class T>
void check_against_reference(const case_params& p) {
  const std::int32_t H = 2, D = p.D, r = p.r, n = p.n, G = p.G, Hq = H * G;
  INFO("T = " << (std::is_same<T, float>::value ? "float" : "half") << ", D = " << D << ", r = " << r << ", n = " << n
              << ", G = " << G << ", center = " << p.center << ", ragged = " << p.ragged << ", pool = " << (p.pool != nullptr) << ", page = " << p.page
              << ", simd " << kvc_test::simd_path());
  const std::uint32_t seed = static_cast<std::uint32_t>(D * 7919 + r * 104729 + n * 31 + G);
  const auto calib_k = rows(256, H, D, seed), calib_v = rows(256, H, D, seed + 1);
  projected_config cfg;
  cfg.num_layers = 2;
  cfg.num_kv_heads = H;
  cfg.head_dim = D;
  cfg.rank = r;
  cfg.max_pages = 4096;
  cfg.page_size = p.page;
  projected_cache<T> cache(cfg);
  const std::int32_t layer = 1;
  for (std::int32_t h = 0; h < H; ++h)
    cache.set_basis(layer, h, fit_basis(calib_k.data() + h * D, 256, D, H * D, rank_spec::of_count(r), p.center),
                    fit_basis(calib_v.data() + h * D, 256, D, H * D, rank_spec::of_count(r), p.center));
  const auto seq = cache.add_sequence();
  const auto k = rows(n, H, D, seed + 2), v = rows(n, H, D, seed + 3);
  cache.append(seq, layer, k.data(), v.data(), n);
  if (p.ragged && n > 1) {
    std::vector<std::int32_t> kept;
    for (std::int32_t t = 0; t < n; t += 3) kept.push_back(t);
    cache.keep(seq, layer, 1, kept.data(), static_cast<std::int32_t>(kept.size()));
  }
  if (p.empty_head) cache.keep(seq, layer, 1, nullptr, 0);
  std::mt19937 g(seed + 4);
  std::normal_distribution<float> nd;
  std::vector<float> q(static_cast<std::size_t>(Hq) * D), out(q.size()), lse(static_cast<std::size_t>(Hq));
  for (float& x : q) x = nd(g) * 2.0f;
  kvc::decode_options opt;
  opt.lse = lse.data();
  opt.pool = p.pool;
  if (p.pool && p.split) opt.split_tokens = 64;
  kvc::cpu::projected_decode_attention(cache, seq, layer, q.data(), Hq, out.data(), opt);

  const double scale = 1.0 / std::sqrt(double(D));
  for (std::int32_t h = 0; h < H; ++h) {
    const std::int32_t len = cache.length(seq, layer, h);
    std::vector<float> ck(static_cast<std::size_t>(len) * r), cv(ck.size());
    cache.coefficients().gather(seq, layer, h, ck.data(), cv.data());
    const basis& bk = cache.key_basis(layer, h);
    const basis& bv = cache.value_basis(layer, h);
    // The stored coefficients are the projections of the appended rows (within T's rounding).
    if (!p.ragged) {
      const double tol_c = std::is_same<T, float>::value ? 1e-4 : 2e-3;
      for (std::int32_t t = 0; t < len; ++t)
        for (std::int32_t j = 0; j < r; ++j) {
          double a = 0;
          for (std::int32_t d = 0; d < D; ++d)
            a += double(bk.u[static_cast<std::size_t>(j) * D + d]) *
                 (double(k[(static_cast<std::size_t>(t) * H + h) * D + d]) - (bk.centered() ? double(bk.mean[d]) : 0.0));
          const double got = ck[static_cast<std::size_t>(t) * r + j];
          if (std::abs(got - a) > tol_c * (1 + std::abs(a))) FAIL("key coefficient t=" << t << " j=" << j << ": " << got << " vs " << a);
        }
    }
    const auto K = reconstruct(bk, ck, len), V = reconstruct(bv, cv, len);
    for (std::int32_t gq = 0; gq < G; ++gq) {
      const std::int32_t qh = h * G + gq;
      std::vector<double> ref(static_cast<std::size_t>(D));
      double ref_lse = 0;
      if (len == 0) {  // a head whose tokens were all evicted: the softmax over nothing
        for (std::int32_t d = 0; d < D; ++d) CHECK(out[static_cast<std::size_t>(qh) * D + d] == 0.0f);
        CHECK(std::isinf(lse[qh]));
        CHECK(lse[qh] < 0);
        continue;
      }
      dense_attention(q.data() + static_cast<std::size_t>(qh) * D, K, V, len, D, scale, ref.data(), &ref_lse);
      double err = 0;
      for (std::int32_t d = 0; d < D; ++d) err = std::max(err, std::abs(double(out[static_cast<std::size_t>(qh) * D + d]) - ref[d]));
      INFO("query head " << qh << ", length " << len);
      CHECK(err < 2e-4);
      CHECK(std::abs(double(lse[qh]) - ref_lse) < 2e-4 * (1 + std::abs(ref_lse)));
    }
  }
}

/// Query heads h·G .. h·G + G − 1 of `out` against dense double attention over K, V ([n][D]).
void check_group(const std::vector<float>& q, const std::vector<float>& out, const std::vector<double>& K,
                 const std::vector<double>& V, std::int32_t n, std::int32_t D, std::int32_t G, std::int32_t h, double tol) {
  for (std::int32_t gq = 0; gq < G; ++gq) {
    std::vector<double> ref(static_cast<std::size_t>(D));
    double lse = 0;
    dense_attention(q.data() + static_cast<std::size_t>(h * G + gq) * D, K, V, n, D, 1 / std::sqrt(double(D)), ref.data(), &lse);
    double err = 0;
    for (std::int32_t d = 0; d < D; ++d) err = std::max(err, std::abs(double(out[static_cast<std::size_t>(h * G + gq) * D + d]) - ref[d]));
    CHECK(err < tol);
  }
}

/// RoPE in double, written here from its definition (RoFormer): pair i turns by pos · θ^(-2i/rot);
/// rotate-half pairs (i, i + rot/2), interleaved pairs (2i, 2i + 1); channels past rot stay.
void rope_double(double* x, std::int32_t rot, double theta, bool interleaved, double pos) {
  for (std::int32_t i = 0; i < rot / 2; ++i) {
    const double a = pos * std::pow(theta, -2.0 * i / rot);
    const std::int32_t i0 = interleaved ? 2 * i : i, i1 = interleaved ? 2 * i + 1 : i + rot / 2;
    const double x0 = x[i0], x1 = x[i1];
    x[i0] = x0 * std::cos(a) - x1 * std::sin(a);
    x[i1] = x0 * std::sin(a) + x1 * std::cos(a);
  }
}

struct general_params {
  std::int32_t D, rk, rv, n, G;
  bool pre_rope, center, ragged;
  kvc::thread_pool* pool = nullptr;
  bool interleaved = false;
  std::int32_t rot = 0;  // rotary_dim; 0 = D
};

/// The general path (pre-RoPE keys and/or two ranks): the stored rows unpacked here from the
/// documented layout (z = [inner K row | inner V row], c_k = z[0, r_k), c_v = z[r_k, r_k + r_v)),
/// rebuilt in double, keys rotated here in double at the positions appended (with a gap of 37 in
/// the middle), then dense attention; out, lse, probs and group_probs are compared.
template <class T>
void check_general(const general_params& p) {
  const std::int32_t H = 2, D = p.D, rk = p.rk, rv = p.rv, n = p.n, G = p.G, Hq = H * G;
  const std::int32_t rot = p.rot ? p.rot : D;
  INFO("T = " << (std::is_same<T, float>::value ? "float" : "half") << ", D = " << D << ", rk = " << rk << ", rv = " << rv
              << ", n = " << n << ", G = " << G << ", pre_rope = " << p.pre_rope << ", center = " << p.center
              << ", ragged = " << p.ragged << ", pool = " << (p.pool != nullptr) << ", interleaved = " << p.interleaved
              << ", rot = " << rot << ", simd " << kvc_test::simd_path());
  const std::uint32_t seed = static_cast<std::uint32_t>(D * 31 + rk * 7 + rv * 3 + n + G);
  const auto calib_k = rows(256, H, D, seed), calib_v = rows(256, H, D, seed + 1);
  projected_config cfg;
  cfg.num_kv_heads = H;
  cfg.head_dim = D;
  cfg.rank = rk;
  cfg.value_rank = rv;
  cfg.pre_rope = p.pre_rope;
  cfg.rope.head_dim = D;
  cfg.rope.rotary_dim = p.rot;
  cfg.rope.theta = 500.0f;  // fast-turning pairs: a wrong angle shows within a few hundred positions
  cfg.rope.style = p.interleaved ? kvc::rope_style::interleaved : kvc::rope_style::rotate_half;
  cfg.max_pages = 4096;
  projected_cache<T> cache(cfg);
  REQUIRE(cache.in_place() == (rk == rv && !p.pre_rope));
  for (std::int32_t h = 0; h < H; ++h)
    cache.set_basis(0, h, fit_basis(calib_k.data() + h * D, 256, D, H * D, rank_spec::of_count(rk), p.center),
                    fit_basis(calib_v.data() + h * D, 256, D, H * D, rank_spec::of_count(rv), p.center));
  const auto seq = cache.add_sequence();
  const auto k = rows(n, H, D, seed + 2), v = rows(n, H, D, seed + 3);
  std::vector<std::int32_t> pos(static_cast<std::size_t>(n));
  for (std::int32_t t = 0; t < n; ++t) pos[t] = t < n / 2 ? t : t + 37;
  cache.append(seq, 0, k.data(), v.data(), n, pos.data());
  std::vector<std::int32_t> kept1;  // head 1's tokens, as indices of the appended ones
  for (std::int32_t t = 0; t < n; t += p.ragged ? 3 : 1) kept1.push_back(t);
  if (p.ragged) cache.keep(seq, 0, 1, kept1.data(), static_cast<std::int32_t>(kept1.size()));
  std::mt19937 g(seed + 4);
  std::normal_distribution<float> nd;
  std::vector<float> q(static_cast<std::size_t>(Hq) * D), out(q.size()), lse(static_cast<std::size_t>(Hq));
  for (float& x : q) x = nd(g) * 2.0f;
  std::vector<float> probs(static_cast<std::size_t>(Hq) * (n + 3), -1.0f), gprobs(static_cast<std::size_t>(H) * (n + 3), -1.0f);
  kvc::decode_options opt;
  opt.lse = lse.data();
  opt.pool = p.pool;
  opt.probs = probs.data();
  opt.group_probs = gprobs.data();
  opt.probs_stride = n + 3;
  kvc::cpu::projected_decode_attention(cache, seq, 0, q.data(), Hq, out.data(), opt);
  // Without the probability outputs, post-RoPE keys take the tiled kernel (the split layout with
  // two ranks, r_k <= the row's half); pre-RoPE keys the general path again. Same reference.
  std::vector<float> out2(q.size()), lse2(lse.size());
  kvc::decode_options opt2;
  opt2.lse = lse2.data();
  opt2.pool = p.pool;
  kvc::cpu::projected_decode_attention(cache, seq, 0, q.data(), Hq, out2.data(), opt2);

  const std::int32_t hw = (rk + rv + 1) / 2;
  typename projected_cache<T>::layer_buffer buf;
  const auto views = cache.layer(seq, 0, buf);  // the projection as an accessor
  for (std::int32_t h = 0; h < H; ++h) {
    const std::int32_t len = cache.length(seq, 0, h);
    REQUIRE(len == (h == 1 ? static_cast<std::int32_t>(kept1.size()) : n));
    std::vector<float> kr(static_cast<std::size_t>(len) * hw), vr(kr.size()), ck(static_cast<std::size_t>(len) * rk),
        cv(static_cast<std::size_t>(len) * rv);
    cache.coefficients().gather(seq, 0, h, kr.data(), vr.data());
    for (std::int32_t t = 0; t < len; ++t) {
      for (std::int32_t j = 0; j < rk + rv; ++j) {
        const float z = j < hw ? kr[static_cast<std::size_t>(t) * hw + j] : vr[static_cast<std::size_t>(t) * hw + j - hw];
        if (j < rk) ck[static_cast<std::size_t>(t) * rk + j] = z;
        else cv[static_cast<std::size_t>(t) * rv + j - rk] = z;
      }
    }
    auto K = reconstruct(cache.key_basis(0, h), ck, len);
    const auto V = reconstruct(cache.value_basis(0, h), cv, len);
    for (std::int32_t t = 0; t < len; ++t) {
      const std::int32_t at = pos[static_cast<std::size_t>(h == 1 ? kept1[static_cast<std::size_t>(t)] : t)];
      if (p.pre_rope) rope_double(K.data() + static_cast<std::size_t>(t) * D, rot, 500.0, p.interleaved, at);
    }
    // The decoded views' rows are those rebuilt (and rotated) here, to float rounding.
    REQUIRE(views.keys(h).tokens() == len);
    REQUIRE(views.values(h).tokens() == len);
    std::vector<float> row(static_cast<std::size_t>(D));
    double worst = 0;
    for (std::int32_t t = 0; t < len; ++t)
      for (int which = 0; which < 2; ++which) {
        const std::size_t at = static_cast<std::size_t>(t) * D;
        if (which == 0) views.keys(h).accessor().decode_row(views.keys(h).data_handle(), at, row.data());
        else views.values(h).accessor().decode_row(views.values(h).data_handle(), at, row.data());
        const auto& X = which == 0 ? K : V;
        for (std::int32_t d = 0; d < D; ++d) worst = std::max(worst, std::abs(row[d] - X[at + d]) / (1 + std::abs(X[at + d])));
      }
    CHECK(worst < 1e-4);
    // The stored value coefficients are the projections of the appended values (within T's rounding).
    const double tol_c = std::is_same<T, float>::value ? 1e-4 : 2e-3;
    const basis& bv = cache.value_basis(0, h);
    for (std::int32_t t = 0; t < len; t += 5)
      for (std::int32_t j = 0; j < rv; ++j) {
        const std::size_t src = static_cast<std::size_t>(h == 1 ? kept1[static_cast<std::size_t>(t)] : t);
        double a = 0;
        for (std::int32_t d = 0; d < D; ++d)
          a += double(bv.u[static_cast<std::size_t>(j) * D + d]) *
               (double(v[(src * H + h) * D + d]) - (bv.centered() ? double(bv.mean[d]) : 0.0));
        const double got = cv[static_cast<std::size_t>(t) * rv + j];
        if (std::abs(got - a) > tol_c * (1 + std::abs(a))) FAIL("value coefficient t=" << t << " j=" << j << ": " << got << " vs " << a);
      }
    std::vector<double> gsum(static_cast<std::size_t>(len), 0.0);
    for (std::int32_t gq = 0; gq < G; ++gq) {
      const std::int32_t qh = h * G + gq;
      const float* qq = q.data() + static_cast<std::size_t>(qh) * D;
      std::vector<double> ref(static_cast<std::size_t>(D));
      double ref_lse = 0;
      dense_attention(qq, K, V, len, D, 1.0 / std::sqrt(double(D)), ref.data(), &ref_lse);
      double err = 0;
      for (std::int32_t d = 0; d < D; ++d) err = std::max(err, std::abs(double(out[static_cast<std::size_t>(qh) * D + d]) - ref[d]));
      INFO("query head " << qh << ", length " << len);
      CHECK(err < 2e-4);
      CHECK(std::abs(double(lse[qh]) - ref_lse) < 2e-4 * (1 + std::abs(ref_lse)));
      double err2 = 0;
      for (std::int32_t d = 0; d < D; ++d) err2 = std::max(err2, std::abs(double(out2[static_cast<std::size_t>(qh) * D + d]) - ref[d]));
      CHECK(err2 < 2e-4);
      CHECK(std::abs(double(lse2[qh]) - ref_lse) < 2e-4 * (1 + std::abs(ref_lse)));
      double perr = 0;
      for (std::int32_t t = 0; t < len; ++t) {
        double a = 0;
        for (std::int32_t d = 0; d < D; ++d) a += double(qq[d]) * K[static_cast<std::size_t>(t) * D + d];
        const double pr = std::exp(a / std::sqrt(double(D)) - ref_lse);
        gsum[static_cast<std::size_t>(t)] += pr;
        perr = std::max(perr, std::abs(double(probs[static_cast<std::size_t>(qh) * (n + 3) + t]) - pr));
      }
      CHECK(perr < 1e-5);
      for (std::int32_t t = len; t < n + 3; ++t) CHECK(probs[static_cast<std::size_t>(qh) * (n + 3) + t] == 0.0f);
    }
    double gerr = 0;
    for (std::int32_t t = 0; t < len; ++t)
      gerr = std::max(gerr, std::abs(double(gprobs[static_cast<std::size_t>(h) * (n + 3) + t]) - gsum[static_cast<std::size_t>(t)]));
    CHECK(gerr < 1e-5 * G);
  }
}

}  // namespace

TEST_CASE("lowrank: this binary runs the SIMD path it was built for", "[lowrank]") {
  if (kvc_test::expect_avx2()) REQUIRE(kvc::cpu::fbatch<kvc::cpu::default_arch>::size == 8);
  SUCCEED(kvc_test::simd_path());
}

TEST_CASE("lowrank: fit_basis returns orthonormal directions, eigenvalues descending", "[lowrank]") {
  for (std::int32_t D : {64, 128})
    for (bool center : {false, true}) {
      const auto x = rows(300, 1, D, static_cast<std::uint32_t>(D + center));
      const basis b = fit_basis(x.data(), 300, D, D, rank_spec::of_count(D / 2), center);
      REQUIRE(b.rank == D / 2);
      REQUIRE(b.dim == D);
      REQUIRE(b.centered() == center);
      for (std::int32_t i = 0; i < b.rank; ++i)
        for (std::int32_t j = 0; j < b.rank; ++j) {
          double dot = 0;
          for (std::int32_t d = 0; d < D; ++d) dot += double(b.direction(i)[d]) * b.direction(j)[d];
          if (std::abs(dot - (i == j ? 1.0 : 0.0)) > 1e-5) FAIL("u_" << i << " . u_" << j << " = " << dot);
        }
      for (std::int32_t i = 1; i < D; ++i) REQUIRE(b.eigenvalues[i] <= b.eigenvalues[i - 1]);
      REQUIRE(b.energy > 0.5);
      REQUIRE(b.energy < 1.0);
      // The first direction maximises the second moment: no other unit vector tried beats it.
      auto moment = [&](const std::vector<double>& u) {
        double s = 0;
        for (std::int32_t t = 0; t < 300; ++t) {
          double a = 0;
          for (std::int32_t d = 0; d < D; ++d) a += u[d] * (x[static_cast<std::size_t>(t) * D + d] - (center ? b.mean[d] : 0.0));
          s += a * a;
        }
        return s / 300;
      };
      std::vector<double> u0(b.direction(0), b.direction(0) + D);
      REQUIRE(std::abs(moment(u0) - b.eigenvalues[0]) < 1e-4 * b.eigenvalues[0]);
      std::mt19937 g(5);
      std::normal_distribution<double> nd;
      for (int trial = 0; trial < 20; ++trial) {
        std::vector<double> w(static_cast<std::size_t>(D));
        double nn = 0;
        for (double& e : w) {
          e = nd(g);
          nn += e * e;
        }
        for (double& e : w) e /= std::sqrt(nn);
        REQUIRE(moment(w) <= b.eigenvalues[0] * (1 + 1e-9));
      }
    }
}

TEST_CASE("lowrank: rank by count, fraction and energy select the documented counts", "[lowrank]") {
  // A synthetic spectrum: m_i pairs of rows ±e_i (m = {4, 3, 2, 1}, n = 20), so the uncentered
  // second moment is exactly diag(2 m_i / n) = diag(0.4, 0.3, 0.2, 0.1): every input is 0 or ±1.
  const std::int32_t D = 4, n = 20;
  const double lam[] = {0.4, 0.3, 0.2, 0.1};
  std::vector<float> x(static_cast<std::size_t>(n) * D, 0.0f);
  std::int32_t row = 0;
  for (std::int32_t i = 0; i < D; ++i)
    for (std::int32_t p = 0; p < 4 - i; ++p) {
      x[static_cast<std::size_t>(row++) * D + i] = 1.0f;
      x[static_cast<std::size_t>(row++) * D + i] = -1.0f;
    }
  REQUIRE(row == n);
  struct want {
    double e;
    std::int32_t r;
  };
  for (const want w : {want{0.4, 1}, want{0.41, 2}, want{0.7, 2}, want{0.71, 3}, want{0.9, 3}, want{0.95, 4}, want{1.0, 4}}) {
    const basis b = fit_basis(x.data(), n, D, D, rank_spec::of_energy(w.e));
    INFO("energy " << w.e);
    REQUIRE(b.rank == w.r);
    for (std::int32_t i = 0; i < D; ++i) REQUIRE(std::abs(b.eigenvalues[i] - lam[i]) < 1e-12);
    // Direction j is ±e_j (the spectrum has distinct eigenvalues).
    for (std::int32_t j = 0; j < b.rank; ++j) REQUIRE(std::abs(std::abs(b.direction(j)[j]) - 1.0f) < 1e-7f);
  }
  REQUIRE(fit_basis(x.data(), n, D, D, rank_spec::of_count(3)).rank == 3);
  const double spec100[] = {1};
  REQUIRE(kvc::lowrank::select_rank(rank_spec::of_fraction(0.25), spec100, 128) == 32);
  REQUIRE(kvc::lowrank::select_rank(rank_spec::of_fraction(0.25), spec100, 100) == 25);
  REQUIRE(kvc::lowrank::select_rank(rank_spec::of_fraction(0.25), spec100, 10) == 3);
  REQUIRE(kvc::lowrank::select_rank(rank_spec::of_fraction(1.0), spec100, 64) == 64);
  REQUIRE(kvc::lowrank::select_rank(rank_spec::of_fraction(0.001), spec100, 64) == 1);
  // Zero energy keeps one direction.
  std::vector<float> zeros(16, 0.0f);
  REQUIRE(fit_basis(zeros.data(), 4, 4, 4, rank_spec::of_energy(0.9)).rank == 1);
}

TEST_CASE("lowrank: projected decode attention equals dense double attention over the reconstructed K/V", "[lowrank]") {
  kvc::thread_pool pool(2);
  for (std::int32_t D : {64, 128})
    for (std::int32_t r : {D / 8, D / 4, D / 2})
      for (std::int32_t n : {1, 7, 33, 1000})
        for (std::int32_t G : {1, 4}) {
          check_against_reference<kvc::half>({D, r, n, G, false, false, nullptr});
          check_against_reference<float>({D, r, n, G, true, n == 1000, nullptr});
        }
  // Centered fp16 with ragged heads and split-K over a pool; a tail rank that is not whole SIMD batches.
  check_against_reference<kvc::half>({128, 32, 1000, 4, true, true, &pool});
  check_against_reference<kvc::half>({64, 13, 33, 4, true, false, &pool});
  check_against_reference<float>({64, 13, 1000, 1, false, true, nullptr});
  // The r-space kernel with kv heads spread over the pool; G > 8 (the fallback); an emptied head.
  check_against_reference<kvc::half>({128, 32, 1000, 4, true, true, &pool, false});
  check_against_reference<kvc::half>({64, 16, 33, 12, false, false, nullptr});
  check_against_reference<kvc::half>({128, 32, 100, 4, true, false, nullptr, true, true});
  check_against_reference<kvc::half>({128, 32, 100, 4, false, false, &pool, true, true});
  // Pages smaller and larger than the 16-token tile.
  check_against_reference<kvc::half>({64, 16, 1000, 4, true, true, nullptr, true, false, 4});
  check_against_reference<float>({128, 32, 1000, 1, false, false, nullptr, true, false, 64});
}

TEST_CASE("lowrank: the double reference reads the projected store through its views", "[lowrank]") {
  // kvc::reference over the decoded views (every element rebuilt from its coefficients) against
  // the projected kernel, which attends in the coefficients' space: two readers, one answer.
  for (bool pre_rope : {false, true}) {
    const std::int32_t H = 2, D = 64, n = 40, G = 2;
    const auto calib_k = rows(256, H, D, 5), calib_v = rows(256, H, D, 6);
    projected_config cfg;
    cfg.num_kv_heads = H;
    cfg.head_dim = D;
    cfg.rank = 16;
    cfg.value_rank = 24;
    cfg.pre_rope = pre_rope;
    cfg.rope.head_dim = D;
    projected_cache<float> cache(cfg);
    for (std::int32_t h = 0; h < H; ++h)
      cache.set_basis(0, h, fit_basis(calib_k.data() + h * D, 256, D, H * D, rank_spec::of_count(16), true),
                      fit_basis(calib_v.data() + h * D, 256, D, H * D, rank_spec::of_count(24), true));
    const auto seq = cache.add_sequence();
    const auto k = rows(n, H, D, 7), v = rows(n, H, D, 8), q = rows(1, H * G, D, 9);
    cache.append(seq, 0, k.data(), v.data(), n);
    const std::int32_t kept[] = {0, 3, 4, 9, 20, 39};
    cache.keep(seq, 0, 1, kept, 6);
    projected_cache<float>::layer_buffer buf;
    std::vector<float> ref(q.size()), out(q.size());
    kvc::reference::decode_attention(cache.layer(seq, 0, buf), q.data(), H * G, ref.data());
    kvc::cpu::projected_decode_attention(cache, seq, 0, q.data(), H * G, out.data());
    std::vector<float> via_layer(q.size());  // the views name their store: the same kernel runs
    kvc::cpu::decode_attention(cache.layer(seq, 0, buf), q.data(), H * G, via_layer.data());
    CHECK(via_layer == out);
    std::vector<float> front(q.size());  // and through the front door
    kvc::decode_attention(cache.layer(seq, 0, buf), q.data(), H * G, front.data());
    CHECK(front == out);
    double worst = 0;
    for (std::size_t i = 0; i < out.size(); ++i) worst = std::max(worst, double(std::abs(out[i] - ref[i])));
    INFO("pre_rope " << pre_rope);
    CHECK(worst < 1e-4);
  }
  projected_config cfg;
  cfg.head_dim = 8;
  cfg.rank = 2;
  projected_cache<float> cache(cfg);
  projected_cache<float>::layer_buffer buf;
  REQUIRE_THROWS_WITH(cache.layer(cache.add_sequence(), 0, buf),
                      Catch::Contains("kvc::lowrank::projected_cache::layer: layer 0 head 0 has no basis"));
}

TEST_CASE("lowrank: full rank reproduces exact attention on the original K/V", "[lowrank]") {
  for (std::int32_t D : {64, 128})
    for (bool center : {false, true})
      for (std::int32_t G : {1, 4}) {
        const std::int32_t H = 2, n = 200, Hq = H * G;
        INFO("D = " << D << ", center = " << center << ", G = " << G);
        const auto k = rows(n, H, D, 11), v = rows(n, H, D, 12);
        projected_config cfg;
        cfg.num_kv_heads = H;
        cfg.head_dim = D;
        cfg.rank = D;
        projected_cache<float> cache(cfg);
        for (std::int32_t h = 0; h < H; ++h)
          cache.set_basis(0, h, fit_basis(k.data() + h * D, n, D, H * D, rank_spec::of_fraction(1.0), center),
                          fit_basis(v.data() + h * D, n, D, H * D, rank_spec::of_energy(1.0), center));
        const auto seq = cache.add_sequence();
        cache.append(seq, 0, k.data(), v.data(), n);
        std::vector<float> q(static_cast<std::size_t>(Hq) * D), out(q.size());
        std::mt19937 g(13);
        std::normal_distribution<float> nd;
        for (float& x : q) x = nd(g);
        kvc::cpu::projected_decode_attention(cache, seq, 0, q.data(), Hq, out.data());
        for (std::int32_t h = 0; h < H; ++h) {
          std::vector<double> K(static_cast<std::size_t>(n) * D), V(K.size());
          for (std::int32_t t = 0; t < n; ++t)
            for (std::int32_t d = 0; d < D; ++d) {
              K[static_cast<std::size_t>(t) * D + d] = k[(static_cast<std::size_t>(t) * H + h) * D + d];
              V[static_cast<std::size_t>(t) * D + d] = v[(static_cast<std::size_t>(t) * H + h) * D + d];
            }
          check_group(q, out, K, V, n, D, G, h, 1e-4);
        }
      }
}

TEST_CASE("lowrank: keys and values of rank r are reproduced exactly at the rank the energy rule picks", "[lowrank]") {
  // Rows x_t = Σ_i a_ti b_i with r random directions b_i in D dimensions: rank exactly r, so
  // energy(1 - 1e-6) must keep r directions and attention must match the original K/V.
  const std::int32_t D = 64, n = 300, H = 1, G = 4;
  for (std::int32_t r : {8, 16}) {
    std::mt19937 g(static_cast<std::uint32_t>(r));
    std::normal_distribution<float> nd;
    auto low_rank = [&] {
      std::vector<float> b(static_cast<std::size_t>(r) * D), x(static_cast<std::size_t>(n) * D, 0.0f);
      for (float& e : b) e = nd(g);
      for (std::int32_t t = 0; t < n; ++t)
        for (std::int32_t i = 0; i < r; ++i) {
          const float a = nd(g);
          for (std::int32_t d = 0; d < D; ++d) x[static_cast<std::size_t>(t) * D + d] += a * b[static_cast<std::size_t>(i) * D + d];
        }
      return x;
    };
    const auto k = low_rank(), v = low_rank();
    const basis bk = fit_basis(k.data(), n, D, D, rank_spec::of_energy(1 - 1e-6));
    const basis bv = fit_basis(v.data(), n, D, D, rank_spec::of_energy(1 - 1e-6));
    INFO("r = " << r);
    REQUIRE(bk.rank == r);
    REQUIRE(bv.rank == r);
    projected_config cfg;
    cfg.head_dim = D;
    cfg.rank = r;
    projected_cache<float> cache(cfg);
    cache.set_basis(0, 0, bk, bv);
    const auto seq = cache.add_sequence();
    cache.append(seq, 0, k.data(), v.data(), n);
    std::vector<float> q(static_cast<std::size_t>(G) * D), out(q.size());
    for (float& e : q) e = nd(g) * 0.2f;
    kvc::cpu::projected_decode_attention(cache, seq, 0, q.data(), H * G, out.data());
    std::vector<double> K(k.begin(), k.end()), V(v.begin(), v.end());
    for (std::int32_t gq = 0; gq < G; ++gq) {
      std::vector<double> ref(static_cast<std::size_t>(D));
      double lse = 0;
      dense_attention(q.data() + static_cast<std::size_t>(gq) * D, K, V, n, D, 1 / std::sqrt(double(D)), ref.data(), &lse);
      double err = 0, mag = 0;
      for (std::int32_t d = 0; d < D; ++d) {
        err = std::max(err, std::abs(double(out[static_cast<std::size_t>(gq) * D + d]) - ref[d]));
        mag = std::max(mag, std::abs(ref[d]));
      }
      CHECK(err < 1e-4 * (1 + mag));
    }
  }
}

TEST_CASE("lowrank: bytes are pool bytes, 2 r sizeof(T) per token and kv head", "[lowrank]") {
  projected_config cfg;
  cfg.num_kv_heads = 8;
  cfg.head_dim = 128;
  cfg.rank = 32;
  projected_cache<kvc::half> cache(cfg);
  const auto x = rows(64, 8, 128, 3);
  for (std::int32_t h = 0; h < 8; ++h)
    cache.set_basis(0, h, fit_basis(x.data() + h * 128, 64, 128, 8 * 128, rank_spec::of_count(32)),
                    fit_basis(x.data() + h * 128, 64, 128, 8 * 128, rank_spec::of_count(32)));
  const auto seq = cache.add_sequence();
  cache.append(seq, 0, x.data(), x.data(), 64);
  REQUIRE(cache.bytes_in_use() == 64u * 8u * 2u * 32u * 2u);  // 64 tokens = 4 whole pages per head
  REQUIRE(cache.bytes_in_use() == cache.coefficients().pool().bytes_in_use());
  std::vector<std::int32_t> kept = {0, 1, 2, 3};
  cache.keep(seq, 0, 0, kept.data(), 4);  // head 0 frees 3 of its 4 pages
  REQUIRE(cache.bytes_in_use() == (64u * 8u - 48u) * 2u * 32u * 2u);
}

TEST_CASE("lowrank: bad inputs throw and name the argument", "[lowrank]") {
  const std::int32_t D = 64;
  auto x = rows(16, 1, D, 1);
  using Catch::Contains;
  REQUIRE_THROWS_WITH(fit_basis(x.data(), 16, D, D, rank_spec::of_count(0)), Contains("rank = 0") && Contains("1..64"));
  REQUIRE_THROWS_WITH(fit_basis(x.data(), 16, D, D, rank_spec::of_count(65)), Contains("rank = 65") && Contains("1..64"));
  REQUIRE_THROWS_WITH(fit_basis(x.data(), 16, D, D, rank_spec::of_fraction(0)), Contains("rank fraction = 0"));
  REQUIRE_THROWS_WITH(fit_basis(x.data(), 16, D, D, rank_spec::of_fraction(1.5)), Contains("rank fraction = 1.5"));
  REQUIRE_THROWS_WITH(fit_basis(x.data(), 16, D, D, rank_spec::of_energy(0)), Contains("energy = 0"));
  REQUIRE_THROWS_WITH(fit_basis(x.data(), 0, D, D, rank_spec::of_count(8)), Contains("n = 0"));
  REQUIRE_THROWS_WITH(fit_basis(x.data(), 16, D, D - 1, rank_spec::of_count(8)), Contains("stride = 63"));
  REQUIRE_THROWS_WITH(fit_basis(nullptr, 16, D, D, rank_spec::of_count(8)), Contains("x is null"));
  x[3 * D + 5] = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_WITH(fit_basis(x.data(), 16, D, D, rank_spec::of_count(8)),
                      Contains("kvc::lowrank::fit_basis") && Contains("x[row 3][5] = nan"));
  x[3 * D + 5] = 0.0f;

  projected_config cfg;
  cfg.head_dim = D;
  cfg.rank = 65;
  REQUIRE_THROWS_WITH(projected_cache<kvc::half>(cfg), Contains("projected_config.rank = 65"));
  cfg.rank = 0;
  REQUIRE_THROWS_WITH(projected_cache<kvc::half>(cfg), Contains("projected_config.rank = 0"));
  cfg.rank = 8;
  cfg.num_kv_heads = 2;
  projected_cache<kvc::half> cache(cfg);
  const basis b8 = fit_basis(x.data(), 16, D, D, rank_spec::of_count(8));
  const basis b16 = fit_basis(x.data(), 16, D, D, rank_spec::of_count(16));
  const basis d32 = fit_basis(x.data(), 16, 32, D, rank_spec::of_count(8));
  REQUIRE_THROWS_WITH(cache.set_basis(0, 0, b16, b8), Contains("key basis rank = 16") && Contains("rank = 8"));
  REQUIRE_THROWS_WITH(cache.set_basis(0, 0, b8, d32), Contains("value basis dim = 32") && Contains("head_dim = 64"));
  REQUIRE_THROWS_WITH(cache.set_basis(0, 2, b8, b8), Contains("head = 2"));
  REQUIRE_THROWS_WITH(cache.key_basis(0, 0), Contains("kvc::lowrank::projected_cache::key_basis") && Contains("has no basis"));
  REQUIRE_THROWS_WITH(cache.value_basis(3, 0), Contains("kvc::lowrank::projected_cache::value_basis: layer = 3"));
  REQUIRE_FALSE(cache.has_basis(-1, 0));
  const auto seq = cache.add_sequence();
  std::vector<float> kv(static_cast<std::size_t>(2) * D, 0.5f);
  cache.set_basis(0, 0, b8, b8);
  REQUIRE_THROWS_WITH(cache.append(seq, 0, kv.data(), kv.data(), 1), Contains("head 1 has no basis"));
  cache.set_basis(0, 1, b8, b8);
  kv[D + 3] = std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_WITH(cache.append(seq, 0, kv.data(), kv.data(), 1), Contains("k[67] = inf"));
  REQUIRE(cache.length(seq, 0, 0) == 0);
  kv[D + 3] = 0.5f;
  cache.append(seq, 0, kv.data(), kv.data(), 1);
  REQUIRE_THROWS_WITH(cache.set_basis(0, 0, b8, b8), Contains("expected set_basis before the layer's first append"));
  std::vector<float> q(static_cast<std::size_t>(3) * D, 0.1f), out(q.size());
  REQUIRE_THROWS_WITH(kvc::cpu::projected_decode_attention(cache, seq, 0, q.data(), 3, out.data()),
                      Contains("kvc::cpu::projected_decode_attention") && Contains("num_q_heads = 3"));
  q[1] = std::numeric_limits<float>::quiet_NaN();
  REQUIRE_THROWS_WITH(kvc::cpu::projected_decode_attention(cache, seq, 0, q.data(), 2, out.data()), Contains("q[1] = nan"));
  q[1] = 0.1f;
  REQUIRE_THROWS_WITH(kvc::cpu::projected_decode_attention(cache, seq, 1, q.data(), 2, out.data()), Contains("layer = 1"));
  REQUIRE_THROWS_WITH(kvc::cpu::projected_decode_attention(cache, seq + 5, 0, q.data(), 2, out.data()), Contains("seq = "));
  kvc::cpu::projected_decode_attention(cache, seq, 0, q.data(), 2, out.data());
}

TEST_CASE("lowrank: pre-RoPE keys and two ranks, against dense double attention with RoPE applied here", "[lowrank]") {
  kvc::thread_pool pool(2);
  for (std::int32_t D : {64, 128})
    for (std::int32_t n : {1, 7, 300, 1000})
      for (std::int32_t G : {1, 4}) {
        // Half-rank keys and full-rank values (the cache a model wants), pre-RoPE.
        check_general<kvc::half>({D, D / 2, D, n, G, true, false, false});
        check_general<float>({D, D / 4, D / 2, n, G, true, true, n > 1});
        // Two ranks without RoPE, and pre-RoPE with one rank: both leave the r-space path.
        check_general<float>({D, D / 8, 3 * D / 4, n, G, false, true, false});
        check_general<kvc::half>({D, D / 4, D / 4, n, G, true, false, n > 1, &pool});
      }
  // Odd r_k + r_v (one padding value per row), interleaved pairs, partial rotary_dim, heads over a pool.
  check_general<float>({64, 13, 46, 300, 4, true, true, true, &pool, true});
  check_general<kvc::half>({128, 32, 97, 1000, 2, true, false, true, nullptr, false, 64});
  // Post-RoPE keys at half rank, full-rank values, uncentered: the r_k-space scores of the general
  // path, and the tiled kernel's split layout (ThinK's shape). Then split layouts whose segments are
  // not whole SIMD batches (r_k = 20, 12 value channels in the K row, an odd row), G up to 8,
  // a row whose key fills more than half (r_k > r_v: the general path), and one G past 8.
  check_general<kvc::half>({64, 32, 64, 300, 4, false, false, true, &pool});
  check_general<kvc::half>({128, 96, 128, 333, 8, false, false, true, &pool});
  check_general<float>({64, 20, 44, 77, 3, false, true, true});
  check_general<float>({64, 21, 64, 50, 5, false, false, false});
  check_general<kvc::half>({64, 48, 16, 60, 2, false, true, true});
  check_general<kvc::half>({64, 16, 64, 40, 12, false, false, true});
}

TEST_CASE("lowrank: pre-RoPE at full rank reproduces exact attention on the original keys, rotated here", "[lowrank]") {
  const std::int32_t H = 2, D = 64, n = 500, G = 2, Hq = H * G;
  const auto k = rows(n, H, D, 21), v = rows(n, H, D, 22);
  projected_config cfg;
  cfg.num_kv_heads = H;
  cfg.head_dim = D;
  cfg.rank = D;
  cfg.pre_rope = true;
  cfg.rope.head_dim = D;
  projected_cache<float> cache(cfg);
  for (std::int32_t h = 0; h < H; ++h)
    cache.set_basis(0, h, fit_basis(k.data() + h * D, n, D, H * D, rank_spec::of_count(D), false),
                    fit_basis(v.data() + h * D, n, D, H * D, rank_spec::of_count(D), true));
  const auto seq = cache.add_sequence();
  cache.append(seq, 0, k.data(), v.data(), 200);  // positions 0..199, then 1000..1299
  std::vector<std::int32_t> pos(300);
  for (std::int32_t t = 0; t < 300; ++t) pos[t] = 1000 + t;
  cache.append(seq, 0, k.data() + 200 * H * D, v.data() + 200 * H * D, 300, pos.data());
  std::vector<float> q(static_cast<std::size_t>(Hq) * D), out(q.size());
  std::mt19937 g(23);
  std::normal_distribution<float> nd;
  for (float& x : q) x = nd(g);
  kvc::cpu::projected_decode_attention(cache, seq, 0, q.data(), Hq, out.data());
  for (std::int32_t h = 0; h < H; ++h) {
    std::vector<double> K(static_cast<std::size_t>(n) * D), V(K.size());
    for (std::int32_t t = 0; t < n; ++t) {
      for (std::int32_t d = 0; d < D; ++d) {
        K[static_cast<std::size_t>(t) * D + d] = k[(static_cast<std::size_t>(t) * H + h) * D + d];
        V[static_cast<std::size_t>(t) * D + d] = v[(static_cast<std::size_t>(t) * H + h) * D + d];
      }
      rope_double(K.data() + static_cast<std::size_t>(t) * D, D, 10000.0, false, t < 200 ? t : 800 + t);
    }
    check_group(q, out, K, V, n, D, G, h, 1e-4);
  }
}

TEST_CASE("lowrank: two ranks cost (r_k + r_v) sizeof(T) per token and kv head, rounded up to even", "[lowrank]") {
  for (auto [rk, rv] : {std::pair<int, int>{16, 64}, {13, 46}, {32, 32}}) {
    projected_config cfg;
    cfg.num_kv_heads = 4;
    cfg.head_dim = 64;
    cfg.rank = rk;
    cfg.value_rank = rv;
    projected_cache<kvc::half> cache(cfg);
    const auto x = rows(64, 4, 64, 5);
    for (std::int32_t h = 0; h < 4; ++h)
      cache.set_basis(0, h, fit_basis(x.data() + h * 64, 64, 64, 4 * 64, rank_spec::of_count(rk)),
                      fit_basis(x.data() + h * 64, 64, 64, 4 * 64, rank_spec::of_count(rv)));
    const auto seq = cache.add_sequence();
    cache.append(seq, 0, x.data(), x.data(), 48);  // 3 whole pages per head
    const std::size_t w = static_cast<std::size_t>(rk + rv + 1) / 2 * 2;
    INFO("r_k = " << rk << ", r_v = " << rv);
    REQUIRE(cache.bytes_in_use() == 48u * 4u * w * 2u);
    REQUIRE(cache.bytes_in_use() == cache.coefficients().pool().bytes_in_use());
  }
}

namespace {

/// max over rows t < n of |x_t − (μ + Σ_j (u_j·(x_t − μ)) u_j)|, in double: how far the basis is
/// from reproducing each row (written here, not the cache's projection).
double worst_reconstruction(const basis& b, const std::vector<float>& x, std::int32_t n, std::int32_t stride) {
  const std::int32_t D = b.dim;
  double worst = 0;
  for (std::int32_t t = 0; t < n; ++t) {
    std::vector<double> e(static_cast<std::size_t>(D)), r(static_cast<std::size_t>(D), 0.0);
    for (std::int32_t d = 0; d < D; ++d) e[d] = double(x[static_cast<std::size_t>(t) * stride + d]) - (b.centered() ? double(b.mean[d]) : 0.0);
    for (std::int32_t j = 0; j < b.rank; ++j) {
      double c = 0;
      for (std::int32_t d = 0; d < D; ++d) c += double(b.u[static_cast<std::size_t>(j) * D + d]) * e[d];
      for (std::int32_t d = 0; d < D; ++d) r[d] += c * double(b.u[static_cast<std::size_t>(j) * D + d]);
    }
    for (std::int32_t d = 0; d < D; ++d) worst = std::max(worst, std::abs(r[d] - e[d]));
  }
  return worst;
}

}  // namespace

TEST_CASE("lowrank: exact_rows puts the first rows' directions in the basis, then the deflated PCA", "[lowrank]") {
  for (std::int32_t D : {16, 64})
    for (bool center : {false, true})
      for (std::int32_t m : {1, 4}) {
        const std::int32_t n = 300, r = D / 4;
        INFO("D = " << D << ", center = " << center << ", m = " << m);
        // r + m orthonormal directions (Gram-Schmidt here): the bulk has variance along the first
        // r (σ = 10 for the first r − m, 5 for the next m: a gap, so the leading r − m span is
        // well defined), so a plain rank-r PCA keeps only those; the m first rows lie along the
        // other m, with little energy in all (3² · m / n), like attention sinks.
        std::mt19937 g(static_cast<std::uint32_t>(D + 10 * m + center));
        std::normal_distribution<double> nd;
        std::vector<std::vector<double>> w;
        while (static_cast<std::int32_t>(w.size()) < r + m) {
          std::vector<double> v(static_cast<std::size_t>(D));
          for (double& a : v) a = nd(g);
          for (const auto& u : w) {
            double dot = 0;
            for (std::int32_t d = 0; d < D; ++d) dot += u[d] * v[d];
            for (std::int32_t d = 0; d < D; ++d) v[d] -= dot * u[d];
          }
          double nv = 0;
          for (double a : v) nv += a * a;
          for (double& a : v) a /= std::sqrt(nv);
          w.push_back(v);
        }
        std::vector<float> x(static_cast<std::size_t>(n) * D);
        for (std::int32_t t = 0; t < n; ++t) {
          std::vector<double> row(static_cast<std::size_t>(D), 0.0);
          if (t < m)
            for (std::int32_t d = 0; d < D; ++d) row[d] = 3.0 * w[static_cast<std::size_t>(r + t)][d];
          else
            for (std::int32_t j = 0; j < r; ++j) {
              const double a = nd(g) * (j < r - m ? 10.0 : 5.0);
              for (std::int32_t d = 0; d < D; ++d) row[d] += a * w[static_cast<std::size_t>(j)][d];
            }
          for (std::int32_t d = 0; d < D; ++d) x[static_cast<std::size_t>(t) * D + d] = static_cast<float>(row[d]);
        }
        const basis plain = fit_basis(x.data(), n, D, D, rank_spec::of_count(r), center);
        const basis ex = fit_basis(x.data(), n, D, D, rank_spec::of_count(r), center, m);
        REQUIRE(ex.rank == r);
        for (std::int32_t i = 0; i < r; ++i)  // orthonormal
          for (std::int32_t j = 0; j < r; ++j) {
            double dot = 0;
            for (std::int32_t d = 0; d < D; ++d) dot += double(ex.u[static_cast<std::size_t>(i) * D + d]) * ex.u[static_cast<std::size_t>(j) * D + d];
            CHECK(std::abs(dot - (i == j ? 1.0 : 0.0)) < 1e-5);
          }
        // The first rows come back; a plain PCA of the same rows loses them (the test can fail).
        CHECK(worst_reconstruction(ex, x, m, D) < 1e-4);
        CHECK(worst_reconstruction(plain, x, m, D) > 0.1);
        // Uncentered, the other r − m directions are the bulk's leading ones: each lies in the span.
        if (!center)
          for (std::int32_t j = 0; j < r - m; ++j) {
            double in = 0;
            for (std::int32_t i = 0; i < r; ++i) {
              double dot = 0;
              for (std::int32_t d = 0; d < D; ++d) dot += double(ex.u[static_cast<std::size_t>(i) * D + d]) * w[static_cast<std::size_t>(j)][d];
              in += dot * dot;
            }
            CHECK(in > 0.98);
          }
        CHECK(ex.energy > 0);
        CHECK(ex.energy <= 1);
        CHECK(ex.energy < plain.energy);  // the plain fit keeps the most energy a rank-r basis can
      }
  // exact_rows = 0 is the plain fit; a count below exact_rows is refused, naming both.
  const auto x = rows(100, 1, 32, 9);
  const basis a = fit_basis(x.data(), 100, 32, 32, rank_spec::of_count(8), true);
  const basis b = fit_basis(x.data(), 100, 32, 32, rank_spec::of_count(8), true, 0);
  CHECK(a.u == b.u);
  REQUIRE_THROWS_WITH(fit_basis(x.data(), 100, 32, 32, rank_spec::of_count(3), false, 4),
                      Catch::Contains("exact_rows = 4") && Catch::Contains("expected <= rank = 3"));
  REQUIRE_THROWS_WITH(fit_basis(x.data(), 100, 32, 32, rank_spec::of_count(8), false, 101),
                      Catch::Contains("exact_rows = 101") && Catch::Contains("0..n = 100"));
  // A fraction rank is raised to the exact rows' count.
  CHECK(fit_basis(x.data(), 100, 32, 32, rank_spec::of_fraction(0.05), false, 5).rank == 5);
}
