// SPDX-License-Identifier: Apache-2.0
// Palu (kvc/lowrank/palu.hpp) and the run-time storage palu(rank=, vrank=, coef=)
// (kvc/runtime/lowrank_storages.hpp). The weights are built here with a known SVD,
// W_h = A diag(s) Bᵀ, so the basis must span A's first r columns, and the cache must attend to
// R(p)·A_r A_rᵀ k (keys rebuilt from the latent, then rotated) and A_r A_rᵀ v: a dense double
// reference with projections and RoPE written here.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <kvc/lowrank/palu.hpp>
#include <kvc/runtime/layered_storage.hpp>
#include <kvc/runtime/lowrank_storages.hpp>
#include <kvc/runtime/make_cache.hpp>

#include "cache_builders.hpp"
#include "kvc_catch.hpp"

// Storage headers register nothing by being included (runtime/make_cache.hpp): the storages this
// file builds by spec are registered here, in its own ISA configuration, before any test runs.
[[maybe_unused]] static const bool storages_registered =
    (kvc::runtime::register_lowrank_storages(), kvc::runtime::register_layered_storage(), true);

namespace {

using Catch::Contains;
using kvc::cache_config;
using kvc::seq_id;
using kvc::runtime::make_cache;

/// n orthonormal columns of length m ([m][n], column-major in a flat vector: col j at j·m),
/// Gram-Schmidt in double on Gaussian vectors.
std::vector<double> orthonormal(std::int32_t m, std::int32_t n, std::mt19937& g) {
  std::normal_distribution<double> nd;
  std::vector<double> q(static_cast<std::size_t>(m) * n);
  for (std::int32_t j = 0; j < n; ++j) {
    double* c = q.data() + static_cast<std::size_t>(j) * m;
    for (std::int32_t i = 0; i < m; ++i) c[i] = nd(g);
    for (int pass = 0; pass < 2; ++pass)
      for (std::int32_t k = 0; k < j; ++k) {
        const double* p = q.data() + static_cast<std::size_t>(k) * m;
        double dot = 0;
        for (std::int32_t i = 0; i < m; ++i) dot += p[i] * c[i];
        for (std::int32_t i = 0; i < m; ++i) c[i] -= dot * p[i];
      }
    double nn = 0;
    for (std::int32_t i = 0; i < m; ++i) nn += c[i] * c[i];
    for (std::int32_t i = 0; i < m; ++i) c[i] /= std::sqrt(nn);
  }
  return q;
}

/// One head's weight W = A diag(s) Bᵀ (D x in), with A (D x D) and s = 2^{-d/8}, descending.
struct head_weight {
  std::vector<double> A;  // [D][D] column-major: column d at d·D
  std::vector<float> w;   // [D][in] row-major
};
head_weight make_weight(std::int32_t D, std::int32_t in, std::uint32_t seed) {
  std::mt19937 g(seed);
  head_weight h;
  h.A = orthonormal(D, D, g);
  const auto B = orthonormal(in, D, g);
  h.w.assign(static_cast<std::size_t>(D) * in, 0.0f);
  for (std::int32_t r = 0; r < D; ++r)
    for (std::int32_t j = 0; j < in; ++j) {
      double x = 0;
      for (std::int32_t d = 0; d < D; ++d)
        x += h.A[static_cast<std::size_t>(d) * D + r] * std::pow(2.0, -d / 8.0) * B[static_cast<std::size_t>(d) * in + j];
      h.w[static_cast<std::size_t>(r) * in + j] = static_cast<float>(x);
    }
  return h;
}

/// P x with P = A_r A_rᵀ (x of length D).
std::vector<double> project(const std::vector<double>& A, std::int32_t D, std::int32_t r, const float* x) {
  std::vector<double> y(static_cast<std::size_t>(D), 0.0);
  for (std::int32_t j = 0; j < r; ++j) {
    const double* a = A.data() + static_cast<std::size_t>(j) * D;
    double c = 0;
    for (std::int32_t d = 0; d < D; ++d) c += a[d] * x[d];
    for (std::int32_t d = 0; d < D; ++d) y[static_cast<std::size_t>(d)] += c * a[d];
  }
  return y;
}

TEST_CASE("palu: the weight basis spans the top singular directions of W", "[lowrank][palu]") {
  for (std::int32_t D : {16, 64}) {
    const std::int32_t in = 3 * D + 5;
    const head_weight hw = make_weight(D, in, 7u + D);
    for (std::int32_t r : {1, D / 4, D / 2, D}) {
      CAPTURE(D, r);
      const kvc::lowrank::basis b = kvc::lowrank::weight_basis(hw.w.data(), D, in, in, kvc::lowrank::rank_spec::of_count(r));
      REQUIRE(b.rank == r);
      for (std::int32_t j = 0; j < r; ++j) {
        const float* u = b.direction(j);
        const auto pu = project(hw.A, D, r, u);
        double off = 0, nn = 0;
        for (std::int32_t d = 0; d < D; ++d) off += std::pow(pu[static_cast<std::size_t>(d)] - u[d], 2), nn += double(u[d]) * u[d];
        CHECK(std::sqrt(off) < 1e-4);  // u_j lies in span(A_r)
        CHECK(nn == Approx(1.0).epsilon(1e-5));
      }
      // Its eigenvalues are s_d^2 / in.
      for (std::int32_t d = 0; d < D; ++d) CHECK(b.eigenvalues[static_cast<std::size_t>(d)] == Approx(std::pow(2.0, -d / 4.0) / in).epsilon(1e-4));
    }
  }
  const head_weight hw = make_weight(8, 20, 3u);
  CHECK_THROWS_WITH(kvc::lowrank::weight_basis(hw.w.data(), 8, 20, 19, kvc::lowrank::rank_spec::of_count(2)),
                    Contains("row_stride = 19") && Contains("in = 20"));
  auto bad = hw.w;
  bad[3 * 20 + 7] = std::numeric_limits<float>::infinity();
  CHECK_THROWS_WITH(kvc::lowrank::weight_basis(bad.data(), 8, 20, 20, kvc::lowrank::rank_spec::of_count(2)),
                    Contains("w[3][7] = inf"));
}

// ---- the storage --------------------------------------------------------------------------

constexpr std::int32_t L = 2, H = 2, D = 32, G = 2, P = 16, IN = 80;
constexpr double THETA = 1000.0;

/// The model this test stands for: per layer W_k and W_v of [H·D][IN], each head's slice built
/// with a known SVD.
struct model {
  std::vector<std::vector<head_weight>> k, v;  // [layer][head]
  std::vector<std::vector<float>> wk, wv;      // [layer] the [H·D][IN] matrices
  std::vector<const float*> pk, pv;
  kvc::runtime::projection_weights pw;
  kvc::rope_config rc;
  model() : k(L), v(L), wk(L), wv(L) {
    for (std::int32_t l = 0; l < L; ++l)
      for (std::int32_t h = 0; h < H; ++h) {
        k[l].push_back(make_weight(D, IN, 100u + 10 * l + h));
        v[l].push_back(make_weight(D, IN, 200u + 10 * l + h));
        wk[l].insert(wk[l].end(), k[l][h].w.begin(), k[l][h].w.end());
        wv[l].insert(wv[l].end(), v[l][h].w.begin(), v[l][h].w.end());
      }
    for (std::int32_t l = 0; l < L; ++l) pk.push_back(wk[l].data()), pv.push_back(wv[l].data());
    pw.in = IN;
    pw.wk = pk;
    pw.wv = pv;
    rc.head_dim = D;
    rc.rotary_dim = D;
    rc.theta = static_cast<float>(THETA);
    rc.style = kvc::rope_style::interleaved;
  }
  kvc::runtime::storage_options options() const {
    kvc::runtime::storage_options o;
    o.rope = &rc;
    o.weights = &pw;
    return o;
  }
  /// k = W_k x (pre-RoPE) and v = W_v x for n random inputs x: [n][H][D] each.
  void project_inputs(std::int32_t l, std::int32_t n, std::uint32_t seed, std::vector<float>& kk, std::vector<float>& vv) const {
    std::mt19937 g(seed);
    std::normal_distribution<float> nd;
    kk.assign(static_cast<std::size_t>(n) * H * D, 0.0f);
    vv.assign(kk.size(), 0.0f);
    std::vector<float> x(IN);
    for (std::int32_t t = 0; t < n; ++t) {
      for (float& e : x) e = nd(g);
      for (std::int32_t o = 0; o < H * D; ++o) {
        double a = 0, b = 0;
        for (std::int32_t j = 0; j < IN; ++j)
          a += double(wk[l][static_cast<std::size_t>(o) * IN + j]) * x[j], b += double(wv[l][static_cast<std::size_t>(o) * IN + j]) * x[j];
        kk[static_cast<std::size_t>(t) * H * D + o] = static_cast<float>(a);
        vv[static_cast<std::size_t>(t) * H * D + o] = static_cast<float>(b);
      }
    }
  }
};

/// Interleaved-pair RoPE of x (length D) at position p, in double.
void rope_ref(std::vector<double>& x, std::int32_t p) {
  for (std::int32_t i = 0; i < D / 2; ++i) {
    const double a = p * std::pow(THETA, -2.0 * i / D);
    const double x0 = x[2 * i], x1 = x[2 * i + 1];
    x[2 * i] = x0 * std::cos(a) - x1 * std::sin(a);
    x[2 * i + 1] = x0 * std::sin(a) + x1 * std::cos(a);
  }
}

cache_config shape() { return kvc_test::cache_shape(L, H, D, P, 1 << 12); }

/// Decode attention of `layer` of cache c against the dense double reference over the keys
/// R(p)·A_r A_rᵀ k and values A_rv A_rvᵀ v of that layer's weights (rk, rv: the ranks).
void check_layer(const kvc::runtime::any_cache& c, seq_id s, const model& m, std::int32_t layer, std::int32_t rk,
                 std::int32_t rv, const std::vector<float>& k, const std::vector<float>& v, std::int32_t n, double tol) {
  std::mt19937 g(9);
  std::normal_distribution<float> nd;
  std::vector<float> q(static_cast<std::size_t>(H) * G * D), out(q.size());
  for (float& x : q) x = nd(g);
  c.attention(s, layer, q.data(), H * G, out.data());
  for (std::int32_t qh = 0; qh < H * G; ++qh) {
    const std::int32_t h = qh / G;
    std::vector<std::vector<double>> K(n), V(n);
    for (std::int32_t t = 0; t < n; ++t) {
      K[t] = project(m.k[layer][h].A, D, rk, k.data() + (static_cast<std::size_t>(t) * H + h) * D);
      rope_ref(K[t], t);
      V[t] = project(m.v[layer][h].A, D, rv, v.data() + (static_cast<std::size_t>(t) * H + h) * D);
    }
    std::vector<double> sc(n);
    double mx = -1e300, l = 0;
    for (std::int32_t t = 0; t < n; ++t) {
      double a = 0;
      for (std::int32_t d = 0; d < D; ++d) a += double(q[static_cast<std::size_t>(qh) * D + d]) * K[t][d];
      sc[t] = a / std::sqrt(double(D));
      mx = std::max(mx, sc[t]);
    }
    for (double& x : sc) l += (x = std::exp(x - mx));
    for (std::int32_t d = 0; d < D; ++d) {
      double o = 0;
      for (std::int32_t t = 0; t < n; ++t) o += sc[t] / l * V[t][d];
      CHECK(out[static_cast<std::size_t>(qh) * D + d] == Approx(o).margin(tol));
    }
  }
}

TEST_CASE("palu storage: attention over keys rebuilt from the latent, then rotated, against dense double", "[lowrank][palu]") {
  const model m;
  for (const char* spec : {"palu(rank=8)", "palu(rank=16,vrank=32)", "palu(rank=0.25,vrank=0.5,coef=fp32)", "palu(rank=32)"}) {
    CAPTURE(spec);
    auto c = make_cache(spec, shape(), m.options());
    CHECK(c->pre_rope_keys());
    const std::string sp = spec;
    const std::int32_t rk = sp.find("rank=8") != std::string::npos ? 8 : sp.find("rank=16") != std::string::npos ? 16
                            : sp.find("0.25") != std::string::npos ? 8 : 32;
    const std::int32_t rv = sp.find("vrank=32") != std::string::npos ? 32 : sp.find("vrank=0.5") != std::string::npos ? 16 : rk;
    const bool f32 = sp.find("fp32") != std::string::npos;
    const seq_id s = c->add_sequence();
    const std::int32_t n = 45;
    std::vector<float> k, v;
    for (std::int32_t l = 0; l < L; ++l) {
      m.project_inputs(l, n, 300u + l, k, v);
      c->append(s, l, k.data(), v.data(), n, nullptr);  // no fitting append needed: bases come from the weights
    }
    CHECK(c->bytes_in_use() == static_cast<std::size_t>(L) * H * ((n + P - 1) / P) * P * ((rk + rv + 1) / 2 * 2) * (f32 ? 4 : 2));
    m.project_inputs(1, n, 301u, k, v);
    check_layer(*c, s, m, 1, rk, rv, k, v, n, f32 ? 2e-4 : 2e-3);
  }
}

TEST_CASE("palu storage in layers(...): each part factors its own layers' weights", "[lowrank][palu]") {
  const model m;
  auto c = make_cache("layers(palu(rank=32), l1=palu(rank=8,vrank=16))", shape(), m.options());
  const seq_id s = c->add_sequence();
  const std::int32_t n = 30;
  std::vector<std::vector<float>> k(L), v(L);
  for (std::int32_t l = 0; l < L; ++l) {
    m.project_inputs(l, n, 400u + l, k[l], v[l]);
    c->append(s, l, k[l].data(), v[l].data(), n, nullptr);
  }
  check_layer(*c, s, m, 0, 32, 32, k[0], v[0], n, 2e-3);
  check_layer(*c, s, m, 1, 8, 16, k[1], v[1], n, 2e-3);
}

TEST_CASE("palu storage: refusals name the argument", "[lowrank][palu]") {
  const model m;
  kvc::runtime::storage_options none;
  none.rope = &m.rc;
  CHECK_THROWS_WITH(make_cache("palu(rank=8)", shape(), none), Contains("storage_options::weights"));
  CHECK_THROWS_WITH(make_cache("palu(rank=8)", shape()), Contains("storage_options::rope"));
  CHECK_THROWS_WITH(make_cache("palu(rank=40)", shape(), m.options()), Contains("rank = 40"));
  CHECK_THROWS_WITH(make_cache("palu(rank=8,sinks=2)", shape(), m.options()), Contains("sinks"));
  kvc::runtime::projection_weights short_w = m.pw;
  short_w.wk.pop_back();
  auto o = m.options();
  o.weights = &short_w;
  CHECK_THROWS_WITH(make_cache("palu(rank=8)", shape(), o), Contains("wk") && Contains("num_layers = 2"));
  kvc::runtime::projection_weights null_w = m.pw;
  null_w.wv[1] = nullptr;
  o.weights = &null_w;
  CHECK_THROWS_WITH(make_cache("palu(rank=8)", shape(), o), Contains("wv[1] is null"));
}

}  // namespace
