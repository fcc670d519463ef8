// SPDX-License-Identifier: Apache-2.0
// xKV (kvc/lowrank/xkv.hpp) and the run-time storage xkv(group=, rank=, vrank=, pre_rope=, sinks=,
// coef=) (kvc/runtime/xkv_storage.hpp). The reference is written here in double: the group's
// rows side by side, their truncated SVD by Eigen's JacobiSVD (not the eigensolver of XᵀX the
// cache uses), RoPE from its formula, and a dense softmax over the rebuilt prompt plus the whole
// tokens appended after it. Pool bytes against pages counted here.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <Eigen/Dense>

#include <kvc/lowrank/xkv.hpp>
#include <kvc/runtime/make_cache.hpp>
#include <kvc/runtime/xkv_storage.hpp>

#include "cache_builders.hpp"
#include "kvc_catch.hpp"

// Storage headers register nothing by being included (runtime/make_cache.hpp): the storages this
// file builds by spec are registered here, in its own ISA configuration, before any test runs.
[[maybe_unused]] static const bool storages_registered = (kvc::runtime::register_xkv_storage(), true);

namespace {

using Catch::Contains;
using kvc::seq_id;
using kvc::runtime::any_cache;
using kvc::runtime::make_cache;
using mat = Eigen::MatrixXd;

constexpr float kTheta = 10000.0f;

/// n rows of width w with singular values decaying by 0.8 per direction (a clear gap at every
/// rank), plus a constant offset per column so the rows are not centered.
mat low_rank_rows(std::int32_t n, std::int32_t w, std::uint32_t seed) {
  std::mt19937 g(seed);
  std::normal_distribution<double> nd;
  mat Z(n, w), Q(w, w);
  for (std::int32_t i = 0; i < n; ++i)
    for (std::int32_t j = 0; j < w; ++j) Z(i, j) = nd(g) * 2.0 * std::pow(0.8, j);
  for (std::int32_t i = 0; i < w; ++i)
    for (std::int32_t j = 0; j < w; ++j) Q(i, j) = nd(g);
  Eigen::HouseholderQR<mat> qr(Q);
  const mat O = qr.householderQ();
  return Z * O.transpose();
}

/// X's best rank-r approximation, U_r S_r V_rᵀ (JacobiSVD).
mat truncated(const mat& X, std::int32_t r) {
  Eigen::JacobiSVD<mat> svd(X, Eigen::ComputeThinU | Eigen::ComputeThinV);
  const mat U = svd.matrixU().leftCols(r), V = svd.matrixV().leftCols(r);
  return U * svd.singularValues().head(r).asDiagonal() * V.transpose();
}
/// X projected on the top-r right singular vectors of F (the basis fitted on F).
mat projected_on(const mat& X, const mat& F, std::int32_t r) {
  Eigen::JacobiSVD<mat> svd(F, Eigen::ComputeThinV);
  const mat V = svd.matrixV().leftCols(r);
  return X * V * V.transpose();
}

/// x (D values) rotated by RoPE at position p, rotate-half pairing, in double.
void rope_ref(double* x, std::int32_t D, double p) {
  const std::int32_t half = D / 2;
  for (std::int32_t i = 0; i < half; ++i) {
    const double a = p * std::pow(static_cast<double>(kTheta), -2.0 * i / D);
    const double x0 = x[i], x1 = x[i + half];
    x[i] = x0 * std::cos(a) - x1 * std::sin(a);
    x[i + half] = x0 * std::sin(a) + x1 * std::cos(a);
  }
}

struct shape {
  std::int32_t L, H, D, group;
};

/// One sequence's data: per group, the prompt rows side by side [n][GL·H·D] for keys (pre-RoPE)
/// and values; then `extra` whole tokens per layer, [extra][H][D].
struct prompt {
  std::vector<mat> xk, xv;                  // [group]
  std::vector<std::vector<float>> tk, tv;   // [layer]
};

kvc::cache_config shape_cfg(const shape& s, std::int32_t max_pages = 4096) {
  return kvc_test::cache_shape(s.L, s.H, s.D, 16, max_pages);
}

std::int32_t group_len(const shape& s, std::int32_t g) { return std::min(s.group, s.L - g * s.group); }

prompt make_prompt(const shape& s, std::int32_t n, std::int32_t extra, std::uint32_t seed) {
  prompt p;
  const std::int32_t ng = (s.L + s.group - 1) / s.group;
  for (std::int32_t g = 0; g < ng; ++g) {
    const std::int32_t w = group_len(s, g) * s.H * s.D;
    p.xk.push_back(low_rank_rows(n, w, seed + 17 * g));
    p.xv.push_back(low_rank_rows(n, w, seed + 17 * g + 5));
  }
  std::mt19937 gen(seed + 99);
  std::normal_distribution<float> nd;
  for (std::int32_t l = 0; l < s.L; ++l) {
    p.tk.emplace_back(static_cast<std::size_t>(extra) * s.H * s.D);
    p.tv.emplace_back(p.tk.back().size());
    for (float& x : p.tk.back()) x = nd(gen);
    for (float& x : p.tv.back()) x = nd(gen);
  }
  return p;
}

/// Layer l's prompt block [n][H][D] from the group rows (keys pre-RoPE as given).
std::vector<float> layer_block(const shape& s, const mat& X, std::int32_t l) {
  const std::int32_t i = l % s.group, n = static_cast<std::int32_t>(X.rows());
  std::vector<float> b(static_cast<std::size_t>(n) * s.H * s.D);
  for (std::int32_t t = 0; t < n; ++t)
    for (std::int32_t h = 0; h < s.H; ++h)
      for (std::int32_t d = 0; d < s.D; ++d)
        b[(static_cast<std::size_t>(t) * s.H + h) * s.D + d] = static_cast<float>(X(t, (i * s.H + h) * s.D + d));
  return b;
}

void append_prompt(any_cache& c, seq_id q, const shape& s, const prompt& p, std::int32_t pos0 = 0) {
  const std::int32_t n = static_cast<std::int32_t>(p.xk[0].rows());
  std::vector<std::int32_t> pos(static_cast<std::size_t>(n));
  for (std::int32_t t = 0; t < n; ++t) pos[static_cast<std::size_t>(t)] = pos0 + t;
  for (std::int32_t l = 0; l < s.L; ++l) {
    const auto k = layer_block(s, p.xk[static_cast<std::size_t>(l / s.group)], l);
    const auto v = layer_block(s, p.xv[static_cast<std::size_t>(l / s.group)], l);
    c.append(q, l, k.data(), v.data(), n, pos.data());
  }
}
void observe_all(any_cache& c, seq_id q, const shape& s) {
  std::vector<float> one(static_cast<std::size_t>(s.H) * s.D, 0.5f);
  for (std::int32_t l = 0; l < s.L; ++l) c.observe_window(q, l, one.data(), 1, s.H);
}

/// The keys and values stream (l, h) stands for: the rebuilt prompt rows R (per group, [n][w]:
/// keys rotated to pos0 + t when rope), then the whole extra tokens (rotated at their positions).
void reference_rows(const shape& s, const std::vector<mat>& RK, const std::vector<mat>& RV, const prompt& p,
                    std::int32_t extra, std::int32_t l, std::int32_t h, bool rope, std::int32_t pos0,
                    std::vector<double>& k, std::vector<double>& v) {
  const mat& K = RK[static_cast<std::size_t>(l / s.group)];
  const mat& V = RV[static_cast<std::size_t>(l / s.group)];
  const std::int32_t n = static_cast<std::int32_t>(K.rows()), i = l % s.group, D = s.D;
  k.assign(static_cast<std::size_t>(n + extra) * D, 0.0);
  v.assign(k.size(), 0.0);
  for (std::int32_t t = 0; t < n; ++t) {
    for (std::int32_t d = 0; d < D; ++d) {
      k[static_cast<std::size_t>(t) * D + d] = K(t, (i * s.H + h) * D + d);
      v[static_cast<std::size_t>(t) * D + d] = V(t, (i * s.H + h) * D + d);
    }
    if (rope) rope_ref(k.data() + static_cast<std::size_t>(t) * D, D, pos0 + t);
  }
  for (std::int32_t t = 0; t < extra; ++t) {
    for (std::int32_t d = 0; d < D; ++d) {
      const std::size_t src = (static_cast<std::size_t>(t) * s.H + h) * D + d;
      k[static_cast<std::size_t>(n + t) * D + d] = p.tk[static_cast<std::size_t>(l)][src];
      v[static_cast<std::size_t>(n + t) * D + d] = p.tv[static_cast<std::size_t>(l)][src];
    }
    if (rope) rope_ref(k.data() + static_cast<std::size_t>(n + t) * D, D, pos0 + n + t);
  }
}

/// Dense softmax attention of one query over rows k, v ([m][D]) in double; returns the lse.
double attend_ref(const double* q, const std::vector<double>& k, const std::vector<double>& v, std::int32_t D,
                  double* out) {
  const std::size_t m = k.size() / static_cast<std::size_t>(D);
  std::vector<double> sc(m);
  double mx = -INFINITY;
  for (std::size_t t = 0; t < m; ++t) {
    double x = 0;
    for (std::int32_t d = 0; d < D; ++d) x += q[d] * k[t * D + d];
    sc[t] = x / std::sqrt(static_cast<double>(D));
    mx = std::max(mx, sc[t]);
  }
  double l = 0;
  for (double& x : sc) l += (x = std::exp(x - mx));
  for (std::int32_t d = 0; d < D; ++d) {
    double o = 0;
    for (std::size_t t = 0; t < m; ++t) o += sc[t] * v[t * D + d];
    out[d] = o / l;
  }
  return mx + std::log(l);
}

kvc::rope_config rope_of(std::int32_t D) {
  kvc::rope_config r;
  r.head_dim = D;
  r.theta = kTheta;
  return r;
}

std::unique_ptr<any_cache> build(const std::string& spec, const shape& s, const kvc::rope_config* rc,
                                 std::int32_t max_pages = 4096) {
  kvc::runtime::storage_options o;
  o.rope = rc;
  return make_cache(spec, shape_cfg(s, max_pages), o);
}

/// Appends extra whole tokens per layer after the prompt (positions n..).
void append_extra(any_cache& c, seq_id q, const shape& s, const prompt& p, std::int32_t extra) {
  for (std::int32_t l = 0; l < s.L; ++l)
    c.append(q, l, p.tk[static_cast<std::size_t>(l)].data(), p.tv[static_cast<std::size_t>(l)].data(), extra, nullptr);
}

/// Every stream's gather and every layer's attention against the reference; `tol` relative to
/// the largest reference value.
void check_against(any_cache& c, seq_id q, const shape& s, const std::vector<mat>& RK, const std::vector<mat>& RV,
                   const prompt& p, std::int32_t extra, bool rope, double tol, std::uint32_t seed) {
  const std::int32_t n = static_cast<std::int32_t>(RK[0].rows()), D = s.D, Gq = 2, nq = s.H * Gq;
  std::mt19937 g(seed);
  std::normal_distribution<float> nd;
  for (std::int32_t l = 0; l < s.L; ++l) {
    std::vector<std::vector<double>> rk(static_cast<std::size_t>(s.H)), rv(rk.size());
    for (std::int32_t h = 0; h < s.H; ++h) {
      reference_rows(s, RK, RV, p, extra, l, h, rope, 0, rk[static_cast<std::size_t>(h)], rv[static_cast<std::size_t>(h)]);
      REQUIRE(c.length(q, l, h) == n + extra);
      const std::int32_t* pos = c.positions(q, l, h);
      for (std::int32_t t = 0; t < n + extra; ++t) REQUIRE(pos[t] == t);
      std::vector<float> gk(static_cast<std::size_t>(n + extra) * D), gv(gk.size());
      c.gather(q, l, h, gk.data(), gv.data());
      double big = 0, err = 0;
      for (std::size_t i = 0; i < gk.size(); ++i) {
        big = std::max({big, std::abs(rk[static_cast<std::size_t>(h)][i]), std::abs(rv[static_cast<std::size_t>(h)][i])});
        err = std::max({err, std::abs(gk[i] - rk[static_cast<std::size_t>(h)][i]), std::abs(gv[i] - rv[static_cast<std::size_t>(h)][i])});
      }
      INFO("layer " << l << " head " << h << ": gather error " << err << " of " << big);
      CHECK(err <= tol * big);
    }
    std::vector<float> qq(static_cast<std::size_t>(nq) * D), out(qq.size()), lse(static_cast<std::size_t>(nq));
    for (float& x : qq) x = nd(g) * 0.3f;
    kvc::decode_options opt;
    opt.lse = lse.data();
    c.attention(q, l, qq.data(), nq, out.data(), opt);
    for (std::int32_t qh = 0; qh < nq; ++qh) {
      std::vector<double> qd(qq.begin() + qh * D, qq.begin() + (qh + 1) * D), o(static_cast<std::size_t>(D));
      const std::size_t h = static_cast<std::size_t>(qh / Gq);
      const double ref_lse = attend_ref(qd.data(), rk[h], rv[h], D, o.data());
      double big = 0, err = 0;
      for (std::int32_t d = 0; d < D; ++d) {
        big = std::max(big, std::abs(o[static_cast<std::size_t>(d)]));
        err = std::max(err, std::abs(out[static_cast<std::size_t>(qh) * D + d] - o[static_cast<std::size_t>(d)]));
      }
      INFO("layer " << l << " query head " << qh << ": attention error " << err << " of " << big);
      CHECK(err <= tol * std::max(big, 1.0));
      CHECK(std::abs(lse[static_cast<std::size_t>(qh)] - ref_lse) <= tol * std::max(1.0, std::abs(ref_lse)));
    }
  }
}

}  // namespace

TEST_CASE("fit_group_basis spans the group's top right singular vectors, sliced per stream", "[lowrank][xkv]") {
  const std::int32_t n = 70, layers = 2, heads = 2, D = 8, w = layers * heads * D, r = 5;
  const mat X = low_rank_rows(n, w, 3);
  std::vector<float> x(static_cast<std::size_t>(n) * w);
  for (std::int32_t t = 0; t < n; ++t)
    for (std::int32_t c = 0; c < w; ++c) x[static_cast<std::size_t>(t) * w + c] = static_cast<float>(X(t, c));
  const auto gb = kvc::lowrank::fit_group_basis(x.data(), n, layers, heads, D, kvc::lowrank::rank_spec::of_count(r));
  REQUIRE(gb.rank() == r);
  REQUIRE(gb.slices.size() == 4u);
  std::vector<float> a(static_cast<std::size_t>(n) * r);
  kvc::lowrank::project_group(gb, x.data(), n, a.data());
  const mat R = truncated(X, r);
  double err = 0;
  for (std::int32_t t = 0; t < n; ++t)
    for (std::int32_t s = 0; s < layers * heads; ++s)
      for (std::int32_t d = 0; d < D; ++d) {  // the slice rebuilds its stream: Σ_j a_j B[j][d]
        double y = 0;
        for (std::int32_t j = 0; j < r; ++j)
          y += a[static_cast<std::size_t>(t) * r + j] * gb.slices[static_cast<std::size_t>(s)].u[static_cast<std::size_t>(j) * D + d];
        err = std::max(err, std::abs(y - R(t, s * D + d)));
      }
  CHECK(err <= 1e-4 * R.cwiseAbs().maxCoeff());
  CHECK_THROWS_WITH(kvc::lowrank::fit_group_basis(x.data(), n, 0, heads, D, kvc::lowrank::rank_spec::of_count(r)),
                    Contains("layers = 0"));
}

TEST_CASE("xkv attends to the group's truncated SVD of the prompt, then whole tokens", "[lowrank][xkv]") {
  struct variant {
    const char* spec;
    shape s;
    bool rope;
    double tol;
  };
  // fp32 latents: float round-off only; fp16: the latents' and the whole pages' rounding.
  const variant vs[] = {
      {"xkv(group=2, rank=6, vrank=9, coef=fp32)", {4, 2, 16, 2}, true, 2e-4},
      {"xkv(group=3, rank=7, vrank=7, coef=fp32)", {5, 2, 16, 3}, true, 2e-4},  // a last group of 2 layers
      {"xkv(group=2, rank=0.1, vrank=0.2, pre_rope=0, coef=fp32)", {4, 2, 16, 2}, false, 2e-4},
      {"xkv(group=1, rank=5, coef=fp32)", {2, 3, 8, 1}, true, 2e-4},
      {"xkv(group=2, rank=6, vrank=9)", {4, 2, 16, 2}, true, 2e-2},
      // Latents in int8 pages (per-token scales): the rounding of 8 bits on top of the SVD.
      {"xkv(group=2, rank=6, vrank=9, latent=int8)", {4, 2, 16, 2}, true, 5e-2},
  };
  for (const variant& vt : vs) {
    INFO(vt.spec);
    const shape& s = vt.s;
    const kvc::rope_config rc = rope_of(s.D);
    auto c = build(vt.spec, s, vt.rope ? &rc : nullptr);
    REQUIRE(c->pre_rope_keys() == vt.rope);
    REQUIRE(c->query_window() == 1);
    const std::int32_t n = 70, extra = 3;
    const prompt p = make_prompt(s, n, extra, 11);
    // Post-RoPE keys (pre_rope=0): the reference rows are the appended keys as they are.
    const seq_id q = c->add_sequence();
    append_prompt(*c, q, s, p);
    const std::size_t whole = c->bytes_in_use();
    observe_all(*c, q, s);
    // Ranks the spec asked for, as counts of the group's width w = group · H · D.
    const std::int32_t w = s.group * s.H * s.D;
    std::int32_t rk = 0, rv = 0;
    if (std::string(vt.spec).find("rank=0.1") != std::string::npos) {
      rk = static_cast<std::int32_t>(std::ceil(0.1 * w - 1e-9));
      rv = static_cast<std::int32_t>(std::ceil(0.2 * w - 1e-9));
    } else {
      const std::string sp = vt.spec;
      rk = std::stoi(sp.substr(sp.find("rank=") + 5));
      const auto vp = sp.find("vrank=");
      rv = vp == std::string::npos ? rk : std::stoi(sp.substr(vp + 6));
    }
    std::vector<mat> RK, RV;
    for (std::size_t g = 0; g < p.xk.size(); ++g) {
      RK.push_back(truncated(p.xk[g], rk));
      RV.push_back(truncated(p.xv[g], rv));
    }
    // Bytes: the whole pages are gone; each group holds ceil(n / 16) latent pages of rows
    // (rank + vrank) rounded up to even, K half and V half.
    const bool fp16 = std::string(vt.spec).find("fp32") == std::string::npos;
    const bool int8 = std::string(vt.spec).find("latent=int8") != std::string::npos;
    const std::size_t groups = p.xk.size(), hw = static_cast<std::size_t>((rk + rv + 1) / 2);
    const std::size_t fp16_bytes = groups * ((n + 15) / 16) * 16 * 2 * hw * 2;
    const std::size_t latent_bytes = int8 ? dynamic_cast<kvc::runtime::xkv_cache<kvc::half>&>(*c).latents().bytes_in_use()
                                          : fp16_bytes * (fp16 ? 1 : 2);
    CHECK(c->bytes_in_use() == latent_bytes);
    if (int8) CHECK(latent_bytes < fp16_bytes * 3 / 4);  // a byte per value and a few scales
    CHECK(c->bytes_in_use() < whole);
    std::size_t per_layer = 0;
    for (std::int32_t l = 0; l < s.L; ++l) per_layer += c->bytes_in_use(l);
    CHECK(per_layer == latent_bytes);
    CHECK(c->tokens_held() == static_cast<std::int64_t>(n) * s.L * s.H);
    append_extra(*c, q, s, p, extra);
    check_against(*c, q, s, RK, RV, p, extra, vt.rope, vt.tol, 5);
  }
}

TEST_CASE("xkv latent=rotated(bits=4): Palu's Hadamard before 4-bit codes lands nearer the SVD than int4",
          "[lowrank][xkv]") {
  // Latents are coefficients on singular directions, so each row's first values dwarf its last
  // (here 0.8^j: 4.8x across 8) and one scale per row spends int4's 16 levels on the leading
  // ones. Palu (arXiv:2407.21118) rotates the latent with a Walsh-Hadamard matrix first, which
  // spreads that energy over the row; `rotated(bits=4)` is that rotation in front of int4 codes
  // of the same bytes. Both are held to the double truncated SVD, and the rotated codes must
  // come measurably nearer it (squared error summed over every stream's prompt rows).
  const shape s{4, 2, 16, 2};
  const kvc::rope_config rc = rope_of(s.D);
  const std::int32_t n = 70, extra = 3, r = 8;  // (rank + vrank) / 2 = 8 values per half-row: a power of two
  double sq[2] = {0, 0};
  std::size_t bytes[2] = {0, 0};
  const char* specs[2] = {"xkv(group=2, rank=8, vrank=8, latent=int4)", "xkv(group=2, rank=8, vrank=8, latent=rotated(bits=4))"};
  for (int i = 0; i < 2; ++i) {
    INFO(specs[i]);
    auto c = build(specs[i], s, &rc);
    const prompt p = make_prompt(s, n, extra, 31);
    const seq_id q = c->add_sequence();
    append_prompt(*c, q, s, p);
    observe_all(*c, q, s);
    bytes[i] = c->bytes_in_use();
    std::vector<mat> RK, RV;
    for (std::size_t g = 0; g < p.xk.size(); ++g) {
      RK.push_back(truncated(p.xk[g], r));
      RV.push_back(truncated(p.xv[g], r));
    }
    for (std::int32_t l = 0; l < s.L; ++l)
      for (std::int32_t h = 0; h < s.H; ++h) {
        std::vector<double> rk, rv;
        reference_rows(s, RK, RV, p, 0, l, h, true, 0, rk, rv);
        std::vector<float> gk(rk.size()), gv(rv.size());
        c->gather(q, l, h, gk.data(), gv.data());
        for (std::size_t j = 0; j < rk.size(); ++j) sq[i] += (gk[j] - rk[j]) * (gk[j] - rk[j]) + (gv[j] - rv[j]) * (gv[j] - rv[j]);
      }
    append_extra(*c, q, s, p, extra);
    // 4 bits per latent value: the gather and attention errors stay within a few steps of the grid.
    check_against(*c, q, s, RK, RV, p, extra, true, 0.1, 13);
  }
  INFO("squared error: int4 " << sq[0] << ", rotated int4 " << sq[1]);
  CHECK(bytes[1] == bytes[0]);  // the rotation costs no byte
  CHECK(sq[1] > 0);
  CHECK(sq[1] < 0.7 * sq[0]);
}

TEST_CASE("xkv: a second sequence projects on the first one's bases; forks are independent", "[lowrank][xkv]") {
  const shape s{4, 2, 16, 2};
  const kvc::rope_config rc = rope_of(s.D);
  auto c = build("xkv(group=2, rank=6, vrank=8, coef=fp32)", s, &rc);
  const std::int32_t n = 60, extra = 2;
  const prompt a = make_prompt(s, n, extra, 21), b = make_prompt(s, n, extra, 22);
  const seq_id qa = c->add_sequence(), qb = c->add_sequence();
  append_prompt(*c, qa, s, a);
  append_prompt(*c, qb, s, b);
  observe_all(*c, qa, s);
  observe_all(*c, qb, s);
  std::vector<mat> RK, RV;
  for (std::size_t g = 0; g < b.xk.size(); ++g) {
    RK.push_back(projected_on(b.xk[g], a.xk[g], 6));
    RV.push_back(projected_on(b.xv[g], a.xv[g], 8));
  }
  // Fork b, give the fork its extra tokens, then drop b: the fork keeps the shared latents.
  const seq_id f = c->fork(qb);
  append_extra(*c, f, s, b, extra);
  CHECK(c->length(qb, 0, 0) == n);
  c->remove_sequence(qb);
  check_against(*c, f, s, RK, RV, b, extra, true, 2e-4, 9);
}

TEST_CASE("xkv refuses what would break a shared latent, and leaves the cache as it was", "[lowrank][xkv]") {
  const shape s{4, 2, 16, 2};
  const kvc::rope_config rc = rope_of(s.D);
  const std::int32_t n = 40;
  const prompt p = make_prompt(s, n, 2, 31);

  SECTION("eviction of the prompt before the move") {
    auto c = build("xkv(group=2, rank=6)", s, &rc);
    const seq_id q = c->add_sequence();
    append_prompt(*c, q, s, p);
    std::vector<std::int32_t> kept(static_cast<std::size_t>(n - 1));
    for (std::int32_t i = 0; i < n - 1; ++i) kept[static_cast<std::size_t>(i)] = i + 1;
    c->keep(q, 3, 1, kept.data(), n - 1);  // whole tokens: any stream may evict
    const std::size_t bytes = c->bytes_in_use();
    std::vector<float> one(static_cast<std::size_t>(s.H) * s.D, 0.5f);
    c->observe_window(q, 0, one.data(), 1, s.H);
    c->observe_window(q, 1, one.data(), 1, s.H);  // group 0 moves
    c->observe_window(q, 2, one.data(), 1, s.H);
    CHECK_THROWS_WITH(c->observe_window(q, 3, one.data(), 1, s.H),
                      Contains("layer 3 head 1 holds 39 tokens") && Contains("same tokens") &&
                          Contains("the cache is unchanged"));
    CHECK(c->length(q, 3, 1) == n - 1);
    CHECK(c->length(q, 2, 0) == n);
    CHECK(c->bytes_in_use() < bytes);  // group 0 did move
    auto* x = dynamic_cast<kvc::runtime::xkv_cache<kvc::half>*>(c.get());
    REQUIRE(x != nullptr);
    CHECK(x->moved(q, 0));
    CHECK_FALSE(x->moved(q, 1));
    std::vector<float> qq(static_cast<std::size_t>(s.H) * s.D, 0.1f), out(qq.size());
    c->attention(q, 3, qq.data(), s.H, out.data(), {});  // still whole, still attends
  }
  SECTION("a keep on a moved layer must keep every latent token; the tail may be evicted") {
    auto c = build("xkv(group=2, rank=6)", s, &rc);
    const seq_id q = c->add_sequence();
    append_prompt(*c, q, s, p);
    observe_all(*c, q, s);
    append_extra(*c, q, s, p, 2);
    const std::size_t bytes = c->bytes_in_use();
    std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(s.H));
    for (auto& k : kept)
      for (std::int32_t i = 1; i < n + 2; ++i) k.push_back(i);
    CHECK_THROWS_WITH(c->keep_layer(q, 1, kept), Contains("drops latent token 0 of 40") && Contains("unchanged"));
    CHECK(c->length(q, 1, 0) == n + 2);
    CHECK(c->bytes_in_use() == bytes);
    for (auto& k : kept) {
      k.assign(static_cast<std::size_t>(n), 0);
      for (std::int32_t i = 0; i < n; ++i) k[static_cast<std::size_t>(i)] = i;
      k.push_back(n + 1);  // drop the first tail token
    }
    c->keep_layer(q, 1, kept);
    CHECK(c->length(q, 1, 0) == n + 1);
    CHECK(c->positions(q, 1, 0)[n] == n + 1);
    CHECK(c->length(q, 0, 0) == n + 2);
    std::vector<float> qq(static_cast<std::size_t>(s.H) * s.D, 0.1f), out(qq.size()), probs(64);
    kvc::decode_options opt;
    opt.probs = probs.data();
    opt.probs_stride = 64;
    CHECK_THROWS_WITH(c->attention(q, 1, qq.data(), s.H, out.data(), opt), Contains("opt.probs"));
  }
  SECTION("too few prompt tokens to fit") {
    auto c = build("xkv(group=2, rank=6, vrank=12)", s, &rc);
    const seq_id q = c->add_sequence();
    const prompt small = make_prompt(s, 10, 0, 5);
    append_prompt(*c, q, s, small);
    const std::size_t bytes = c->bytes_in_use();
    std::vector<float> one(static_cast<std::size_t>(s.H) * s.D, 0.5f);
    c->observe_window(q, 0, one.data(), 1, s.H);
    CHECK_THROWS_WITH(c->observe_window(q, 1, one.data(), 1, s.H),
                      Contains("holds 10 prompt tokens") && Contains("max(rank, vrank) = 12"));
    CHECK(c->bytes_in_use() == bytes);
    CHECK(c->length(q, 1, 1) == 10);
  }
  SECTION("the latent pool exhausted: the sequence stays whole; the same call succeeds once there is room") {
    // One layer per group and one kv head: a latent page per whole page, so two prompts of 32
    // tokens need 8 latent pages against a pool of 6.
    const shape t{2, 1, 16, 1};
    const prompt pa = make_prompt(t, 32, 0, 41), pb = make_prompt(t, 32, 0, 42);
    auto c = build("xkv(group=1, rank=8, vrank=8)", t, &rc, 6);
    const seq_id a = c->add_sequence(), b = c->add_sequence();
    append_prompt(*c, a, t, pa);
    observe_all(*c, a, t);
    append_prompt(*c, b, t, pb);
    const std::size_t bytes = c->bytes_in_use();
    std::vector<float> one(static_cast<std::size_t>(t.D), 0.5f);
    c->observe_window(b, 0, one.data(), 1, 1);  // 2 more latent pages: 6 of 6
    CHECK_THROWS_WITH(c->observe_window(b, 1, one.data(), 1, 1), Contains("pool"));
    CHECK(c->length(b, 1, 0) == 32);
    auto* x = dynamic_cast<kvc::runtime::xkv_cache<kvc::half>*>(c.get());
    REQUIRE(x != nullptr);
    CHECK_FALSE(x->moved(b, 1));
    CHECK(c->bytes_in_use() < bytes);  // layer 0 moved (one page per layer: 2 whole -> 2 latent)
    c->remove_sequence(a);
    c->observe_window(b, 1, one.data(), 1, 1);
    CHECK(x->moved(b, 1));
  }
}

TEST_CASE("xkv spec errors name the argument, the value and what was expected", "[lowrank][xkv]") {
  const shape s{5, 2, 16, 2};
  const kvc::rope_config rc = rope_of(s.D);
  CHECK_THROWS_WITH(build("xkv(group=2, rank=40)", s, &rc), Contains("rank = 40") && Contains("shortest group's width, 32"));
  CHECK_THROWS_WITH(build("xkv(group=0, rank=4)", s, &rc), Contains("group = 0") && Contains("1..num_layers = 5"));
  CHECK_THROWS_WITH(build("xkv(group=2, rank=4)", s, nullptr), Contains("pre_rope = 1") && Contains("storage_options::rope"));
  CHECK_THROWS_WITH(build("xkv(group=2, rank=1.5)", s, &rc), Contains("rank = 1.5"));
  CHECK_THROWS_WITH(build("xkv(group=2, rank=4, sinks=5)", s, &rc), Contains("sinks = 5"));
  CHECK_THROWS_WITH(build("xkv(group=2, rnak=4)", s, &rc), Contains("rnak"));
  CHECK_THROWS_WITH(build("xkv(group=2, rank=4, coef=int8)", s, &rc), Contains("coef = int8"));
  CHECK_THROWS_WITH(build("xkv(group=2, rank=4, coef=fp16, latent=int8)", s, &rc), Contains("coef = fp16 with latent = int8"));
  CHECK_THROWS_WITH(build("xkv(group=2, rank=4, latent=layers(fp16))", s, &rc), Contains("not layers"));
  CHECK_THROWS_WITH(build("xkv(group=2, rank=4, latent=nosuch)", s, &rc), Contains("nosuch"));
  CHECK_THROWS_WITH(build("xkv(group=2, rank=4, latent=kivi(bits=4))", s, &rc),
                    Contains("kivi(bits=4) would hold rows of 4 values") && Contains("group size 32"));
  CHECK_NOTHROW(build("xkv(group=2, rank=32, latent=kivi(bits=4))", s, &rc));
  CHECK_NOTHROW(build("xkv(group=2, rank=4, pre_rope=0)", s, nullptr));
}
