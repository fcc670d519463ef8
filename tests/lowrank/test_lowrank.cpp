// SPDX-License-Identifier: Apache-2.0
// Projected (PCA) low-rank KV: kvc/lowrank/pca.hpp, projected_cache.hpp, projected_attention.hpp.
// The attention is checked against a dense double-precision reference written here: the keys and
// values the cache stands for are rebuilt in double from the stored coefficients and the bases
// (k̂ = μ_k + Σ_j c_j u_j), then attended with a plain two-pass softmax. Nothing of the kernel
// (projections, online softmax, tiles) is reused, so a wrong basis row, a missing mean, a wrong
// scale or a wrong token shows as a mismatch. Full rank is also checked against the original K/V.
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <kvc/lowrank/pca.hpp>
#include <kvc/lowrank/projected_attention.hpp>
#include <kvc/lowrank/projected_cache.hpp>
#include <kvc/parallel/thread_pool.hpp>

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
          for (std::int32_t gq = 0; gq < G; ++gq) {
            std::vector<double> ref(static_cast<std::size_t>(D));
            double lse = 0;
            dense_attention(q.data() + static_cast<std::size_t>(h * G + gq) * D, K, V, n, D, 1 / std::sqrt(double(D)), ref.data(), &lse);
            double err = 0;
            for (std::int32_t d = 0; d < D; ++d) err = std::max(err, std::abs(double(out[static_cast<std::size_t>(h * G + gq) * D + d]) - ref[d]));
            CHECK(err < 1e-4);
          }
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
