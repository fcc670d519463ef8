// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Decode attention over a projected cache (kvc/store/projected_cache.hpp), in the r-dimensional
/// space of the bases (Loki, Singhania et al. 2024; Eigen Attention, Saxena et al. 2024):
///
///   q'_g = U_kᵀ q_g                          once per step and query head   (r x D FMAs)
///   s_t  = scale · q'_g · c_k[t]              per token                      (r FMAs)
///   p    = softmax(s);  a_g = Σ_t p_t c_v[t]   per token                      (r FMAs)
///   out_g = U_v a_g (+ μ_v)                    once per step and query head   (D x r FMAs)
///
/// No full-dimension key or value is ever formed. The per-token part is its own kernel
/// (stream_detail::attend_stream in kvc/cpu/stream_attention.hpp, shared with the merged-token
/// kernel): one stream per kv head, tiles of 16 tokens read in place from the coefficient pages, online softmax, GQA (a group's G ≤ 8 query heads read each coefficient
/// row once), kv heads spread over the caller's thread pool. Where it does not apply (r not a
/// multiple of the SIMD width, G > 8, probs / group_probs asked for, or split_tokens set) kvc's
/// decode kernel runs on the coefficient pages instead (a kv_cache with head_dim = r, scale of the
/// original D), with split-K and the probability outputs; both are tested against the same double
/// reference. The projections around it are the xsimd routines below. Per token and kv head the
/// arithmetic is 2·G·r FMAs against fp16 decode's 2·G·D: r = D/4 is a 4x ceiling, less what does
/// not shrink with r (softmax, reductions, row addressing): bench/results/lowrank.md.
///
/// The equality this rests on: with k̂_t = μ_k + U_k c_t, q·k̂_t = q·μ_k + (U_kᵀq)·c_t, and the
/// constant q·μ_k cancels in the softmax (it moves only the log-sum-exp, which is corrected);
/// with v̂_t = μ_v + U_v c_v[t], Σ p_t v̂_t = μ_v + U_v Σ p_t c_v[t] because Σ p_t = 1.
///
/// That r-space path needs keys stored post-RoPE. With two ranks it reads the split row layout
/// (stream_detail::stream_layout::split: c_k is the K row's first r_k values, c_v the rest of the
/// K row and then the V row), which ThinK's caches use. A cache with pre-RoPE keys, or two ranks
/// where the tiles do not apply (probability outputs, split_tokens, G > 8, r_k above half the
/// row), runs the general path instead: with pre-RoPE keys, per
/// token and kv head it rebuilds the key k̂_t = R(p_t)(U_k c_k[t] + μ_k) (r_k·D FMAs, shared by
/// the group's G query heads, then a rotation at the token's stored position) and scores it
/// against the unprojected queries; with post-RoPE keys it scores in r_k dimensions as above.
/// Either way an exact two-pass softmax, then Σ p_t c_v[t] in r_v dimensions, back-projected once.
/// RoPE does not commute with U_k, so no r-space shortcut exists for pre-RoPE keys (q·R(p)U c needs
/// R(p)ᵀq projected per token: the same D·r_k FMAs); the saving there is bytes, not arithmetic.
/// Threads: read-only on the cache (as cpu::decode_attention). Compiled per ISA (docs/isa.md).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <kvc/attention/options.hpp>
#include <kvc/attention/rope.hpp>
#include <kvc/cpu/decode_attention.hpp>
#include <kvc/cpu/simd.hpp>
#include <kvc/cpu/stream_attention.hpp>
#include <kvc/error.hpp>
#include <kvc/store/page_pool.hpp>
#include <kvc/store/projected_cache.hpp>
#include <kvc/view/heads.hpp>

KVC_BEGIN_NAMESPACE
namespace cpu {
KVC_BEGIN_ISA_NAMESPACE  // compiled per ISA: docs/isa.md
namespace lowrank_detail {

inline constexpr const char* api_name = "kvc::cpu::projected_decode_attention";

/// The argument checks a low-rank decode entry point starts with; messages start with `who`.
inline void check_decode_args(const char* who, std::int32_t layer, std::int32_t num_layers, std::int32_t num_q_heads,
                              std::int32_t num_kv_heads, std::int32_t D, const float* q, const float* out) {
  KVC_EXPECTS_IN(who, layer >= 0 && layer < num_layers, "layer = ", layer, ", expected 0..", num_layers - 1);
  KVC_EXPECTS_IN(who, num_q_heads > 0 && num_q_heads % num_kv_heads == 0, "num_q_heads = ", num_q_heads,
                 ", expected a positive multiple of num_kv_heads = ", num_kv_heads);
  KVC_EXPECTS_IN(who, q != nullptr && out != nullptr, "q or out is null");
  for (std::int32_t i = 0; i < num_q_heads * D; ++i)
    KVC_EXPECTS_IN(who, std::isfinite(q[i]), "q[", i, "] = ", q[i], ", expected a finite query");
}

/// qp[j] = u_j · q for the r rows u_j of u ([r][D]): W directions at a time, each one FMA chain,
/// reduced together with one transposed horizontal add.
template <class Arch>
void project_query(const float* u, std::int32_t r, std::int32_t D, const float* q, float* qp) noexcept {
  using B = fbatch<Arch>;
  constexpr std::int32_t W = static_cast<std::int32_t>(B::size);
  const std::int32_t Dv = D / W * W;
  std::int32_t j = 0;
  for (; j + W <= r; j += W) {
    B acc[W];
    for (std::int32_t i = 0; i < W; ++i) acc[i] = B(0.0f);
    for (std::int32_t d = 0; d < Dv; d += W) {
      const B qd = B::load_unaligned(q + d);
      for (std::int32_t i = 0; i < W; ++i)
        acc[i] = xsimd::fma(B::load_unaligned(u + static_cast<std::size_t>(j + i) * D + d), qd, acc[i]);
    }
    alignas(64) float s[W];
    haddp<Arch>(acc).store_aligned(s);
    for (std::int32_t i = 0; i < W; ++i) {
      float t = s[i];
      for (std::int32_t d = Dv; d < D; ++d) t += u[static_cast<std::size_t>(j + i) * D + d] * q[d];
      qp[j + i] = t;
    }
  }
  for (; j < r; ++j) {
    const float* uj = u + static_cast<std::size_t>(j) * D;
    float t = 0;
    for (std::int32_t d = 0; d < D; ++d) t += uj[d] * q[d];
    qp[j] = t;
  }
}

/// out = Σ_j a[j] u_j (+ mu when not null), u [r][D]: D in chunks of 4 batches kept in registers
/// across all r directions.
template <class Arch>
void back_project(const float* u, std::int32_t r, std::int32_t D, const float* a, const float* mu, float* out) noexcept {
  using B = fbatch<Arch>;
  constexpr std::int32_t W = static_cast<std::int32_t>(B::size);
  constexpr std::int32_t C = 4;  // 4 independent chains per direction; D = 64/128 are whole chunks on AVX2
  std::int32_t d = 0;
  for (; d + C * W <= D; d += C * W) {
    B o[C];
    for (std::int32_t c = 0; c < C; ++c) o[c] = mu ? B::load_unaligned(mu + d + c * W) : B(0.0f);
    for (std::int32_t j = 0; j < r; ++j) {
      const B aj(a[j]);
      const float* uj = u + static_cast<std::size_t>(j) * D + d;
      for (std::int32_t c = 0; c < C; ++c) o[c] = xsimd::fma(aj, B::load_unaligned(uj + c * W), o[c]);
    }
    for (std::int32_t c = 0; c < C; ++c) o[c].store_unaligned(out + d + c * W);
  }
  for (; d < D; ++d) {
    float t = mu ? mu[d] : 0.0f;
    for (std::int32_t j = 0; j < r; ++j) t += a[j] * u[static_cast<std::size_t>(j) * D + d];
    out[d] = t;
  }
}

/// q'[h] = U_k(h / G)ᵀ q[h] for every query head: the step's projection into the key bases.
template <class Arch, class T>
void project_queries(const lowrank::projected_cache<T>& cache, std::int32_t layer, const float* q,
                     std::int32_t num_q_heads, float* qp) {
  const auto& c = cache.config();
  const std::int32_t G = num_q_heads / c.num_kv_heads;
  for (std::int32_t h = 0; h < num_q_heads; ++h) {
    const lowrank::basis& b = cache.key_basis(layer, h / G);
    project_query<Arch>(b.u.data(), c.rank, c.head_dim, q + static_cast<std::size_t>(h) * c.head_dim,
                        qp + static_cast<std::size_t>(h) * c.rank);
  }
}

/// out[h] = U_v(h / G) a[h] (+ μ_v) for every query head (a [num_q_heads][r_v]): the step's way back to D channels.
template <class Arch, class T>
void back_project_all(const lowrank::projected_cache<T>& cache, std::int32_t layer, const float* a,
                      std::int32_t num_q_heads, float* out) {
  const auto& c = cache.config();
  const std::int32_t G = num_q_heads / c.num_kv_heads;
  const std::int32_t rv = cache.value_rank();
  for (std::int32_t h = 0; h < num_q_heads; ++h) {
    const lowrank::basis& b = cache.value_basis(layer, h / G);
    back_project<Arch>(b.u.data(), rv, c.head_dim, a + static_cast<std::size_t>(h) * rv,
                       b.centered() ? b.mean.data() : nullptr, out + static_cast<std::size_t>(h) * c.head_dim);
  }
}

/// cos and sin of every rotary pair at each of n positions, [n][rotary_dim / 2] each
/// (rope::for_each_angle: consecutive positions step by each pair's rotation).
inline void rope_table(const rope& rp, const std::int32_t* pos, std::int32_t n, std::vector<float>& cs,
                       std::vector<float>& sn) {
  const std::size_t half = static_cast<std::size_t>(rp.config().rotary_dim / 2);
  cs.resize(static_cast<std::size_t>(n) * half);
  sn.resize(cs.size());
  rp.for_each_angle(pos, n, [&](std::int32_t t, std::int32_t i, double c, double s) {
    cs[static_cast<std::size_t>(t) * half + static_cast<std::size_t>(i)] = static_cast<float>(c);
    sn[static_cast<std::size_t>(t) * half + static_cast<std::size_t>(i)] = static_cast<float>(s);
  });
}

/// Rotates x[D] by one row of rope_table (the pairing of rp's style; channels past rotary_dim stay).
inline void rotate(const rope& rp, const float* cs, const float* sn, float* x) noexcept {
  const std::int32_t half = rp.config().rotary_dim / 2;
  const bool rh = rp.config().style == rope_style::rotate_half;
  for (std::int32_t i = 0; i < half; ++i) {
    const std::int32_t i0 = rh ? i : 2 * i, i1 = rh ? i + half : 2 * i + 1;
    const float x0 = x[i0], x1 = x[i1];
    x[i0] = x0 * cs[i] - x1 * sn[i];
    x[i1] = x0 * sn[i] + x1 * cs[i];
  }
}

/// Σ_d a[d]·b[d] in float: batches of W with one FMA chain, then the tail.
template <class Arch>
float dot(const float* a, const float* b, std::int32_t n) noexcept {
  using B = fbatch<Arch>;
  constexpr std::int32_t W = static_cast<std::int32_t>(B::size);
  std::int32_t d = 0;
  float s = 0;
  if (n >= W) {
    B acc(0.0f);
    for (; d + W <= n; d += W) acc = xsimd::fma(B::load_unaligned(a + d), B::load_unaligned(b + d), acc);
    s = reduce_add<Arch>(acc);
  }
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

/// y += a·x over n floats.
template <class Arch>
void axpy(float a, const float* x, float* y, std::int32_t n) noexcept {
  using B = fbatch<Arch>;
  constexpr std::int32_t W = static_cast<std::int32_t>(B::size);
  std::int32_t d = 0;
  const B av(a);
  for (; d + W <= n; d += W) xsimd::fma(av, B::load_unaligned(x + d), B::load_unaligned(y + d)).store_unaligned(y + d);
  for (; d < n; ++d) y[d] += a * x[d];
}

/// The general path (see the file comment) over one stream of n coefficient rows for kv head h:
/// scores against keys rebuilt with bk (and, with rp, rotated to pos), an exact softmax over the
/// whole stream, Σ p c_v, back-projection with bv. `row(t, z)` writes token t's row
/// [c_k | c_v | pad] (2·hw floats) to z. Fills out, lse, probs and group_probs of the head's G
/// query heads; no tokens gives zeros and lse = -inf. Two passes over the rows: scores, then
/// Σ p c_v. Shared by projected caches (rows read in place from one stream's pages per
/// (layer, head)) and xKV's (one latent stream per group of layers, read by every head with its
/// own bases: runtime/xkv_storage.hpp).
template <class Arch, class Row>
void attend_rows_general(Row&& row_at, std::int32_t hw, std::int32_t n, const std::int32_t* pos,
                         const lowrank::basis& bk, const lowrank::basis& bv, const rope* rp, std::int32_t h,
                         std::int32_t G, const float* q, float scale, float* out, const decode_options& opt) {
  const std::int32_t D = bk.dim, rk = bk.rank, rv = bv.rank;
  const std::size_t q0 = static_cast<std::size_t>(h) * G;
  if (opt.group_probs) std::fill_n(opt.group_probs + static_cast<std::size_t>(h) * opt.probs_stride, opt.probs_stride, 0.0f);
  if (n == 0) {
    std::fill_n(out + q0 * D, static_cast<std::size_t>(G) * D, 0.0f);
    for (std::int32_t g = 0; g < G; ++g) {
      if (opt.lse) opt.lse[q0 + g] = -INFINITY;
      if (opt.probs) std::fill_n(opt.probs + (q0 + g) * opt.probs_stride, opt.probs_stride, 0.0f);
    }
    return;
  }
  std::vector<float> z(static_cast<std::size_t>(2) * hw);
  auto row = [&](std::int32_t t) { row_at(t, z.data()); };
  std::vector<float> cs, sn;
  if (rp) rope_table(*rp, pos, n, cs, sn);
  const std::int32_t half = rp ? rp->config().rotary_dim / 2 : 0;
  std::vector<float> s(static_cast<std::size_t>(G) * n), key(static_cast<std::size_t>(D));
  if (rp) {  // rebuild, rotate, score: R(p) does not commute with U_k
    for (std::int32_t t = 0; t < n; ++t) {
      row(t);
      back_project<Arch>(bk.u.data(), rk, D, z.data(), bk.centered() ? bk.mean.data() : nullptr, key.data());
      rotate(*rp, cs.data() + static_cast<std::size_t>(t) * half, sn.data() + static_cast<std::size_t>(t) * half, key.data());
      for (std::int32_t g = 0; g < G; ++g)
        s[static_cast<std::size_t>(g) * n + t] = scale * dot<Arch>(q + (q0 + g) * D, key.data(), D);
    }
  } else {  // post-RoPE keys, two ranks: score in r_k dimensions, q·k̂ = (U_kᵀq)·c_k + q·μ_k
    std::vector<float> qp(static_cast<std::size_t>(G) * rk), qm(static_cast<std::size_t>(G), 0.0f);
    for (std::int32_t g = 0; g < G; ++g) {
      const float* qg = q + (q0 + g) * D;
      project_query<Arch>(bk.u.data(), rk, D, qg, qp.data() + static_cast<std::size_t>(g) * rk);
      if (bk.centered()) {
        double m = 0;
        for (std::int32_t d = 0; d < D; ++d) m += static_cast<double>(qg[d]) * bk.mean[static_cast<std::size_t>(d)];
        qm[static_cast<std::size_t>(g)] = static_cast<float>(m);
      }
    }
    for (std::int32_t t = 0; t < n; ++t) {
      row(t);
      for (std::int32_t g = 0; g < G; ++g)
        s[static_cast<std::size_t>(g) * n + t] =
            scale * (dot<Arch>(qp.data() + static_cast<std::size_t>(g) * rk, z.data(), rk) + qm[static_cast<std::size_t>(g)]);
    }
  }
  std::vector<float> inv(static_cast<std::size_t>(G)), acc(static_cast<std::size_t>(G) * rv, 0.0f);
  for (std::int32_t g = 0; g < G; ++g) {  // softmax of each query head, exactly (two passes)
    float* sg = s.data() + static_cast<std::size_t>(g) * n;
    float m = -INFINITY;
    for (std::int32_t t = 0; t < n; ++t) m = std::max(m, sg[t]);
    double l = 0;
    for (std::int32_t t = 0; t < n; ++t) {
      sg[t] = std::exp(sg[t] - m);
      l += sg[t];
    }
    inv[static_cast<std::size_t>(g)] = static_cast<float>(1.0 / l);
    if (opt.lse) opt.lse[q0 + g] = m + static_cast<float>(std::log(l));
  }
  for (std::int32_t t = 0; t < n; ++t) {  // Σ p_t c_v[t], every query head from one read of the row
    row(t);
    for (std::int32_t g = 0; g < G; ++g) {
      const float p = s[static_cast<std::size_t>(g) * n + t] * inv[static_cast<std::size_t>(g)];
      axpy<Arch>(p, z.data() + rk, acc.data() + static_cast<std::size_t>(g) * rv, rv);
      if (opt.probs) opt.probs[(q0 + g) * opt.probs_stride + t] = p;
      if (opt.group_probs) opt.group_probs[static_cast<std::size_t>(h) * opt.probs_stride + t] += p;
    }
  }
  for (std::int32_t g = 0; g < G; ++g) {
    if (opt.probs) std::fill(opt.probs + (q0 + g) * opt.probs_stride + n, opt.probs + (q0 + g + 1) * opt.probs_stride, 0.0f);
    back_project<Arch>(bv.u.data(), rv, D, acc.data() + static_cast<std::size_t>(g) * rv, bv.centered() ? bv.mean.data() : nullptr,
                       out + (q0 + g) * D);
  }
}

/// attend_rows_general over kv head h's stream of a projected cache, its rows read in place.
template <class Arch, class T>
void attend_head_general(const lowrank::projected_cache<T>& cache, seq_id seq, std::int32_t layer, std::int32_t h,
                         std::int32_t G, const float* q, float scale, float* out, const decode_options& opt) {
  const auto& coef = cache.coefficients();
  const page_pool& pool = coef.pool();
  const page_id* pages = coef.pages(seq, layer, h).data();
  const std::int32_t P = coef.config().page_size, hw = cache.row_width() / 2;
  // Token t's row from its K half and V half of the page.
  auto row = [&](std::int32_t t, float* z) {
    const T* page = reinterpret_cast<const T*>(pool.data(pages[static_cast<std::size_t>(t / P)]));
    const T* kr = page + static_cast<std::size_t>(t % P) * hw;
    const T* vr = page + static_cast<std::size_t>(P + t % P) * hw;
    constexpr std::int32_t W = static_cast<std::int32_t>(fbatch<Arch>::size);
    std::int32_t j = 0;
    for (; j + W <= hw; j += W) {  // F16C where the build has it (load_as_float)
      load_as_float<Arch>(kr + j).store_unaligned(z + j);
      load_as_float<Arch>(vr + j).store_unaligned(z + hw + j);
    }
    for (; j < hw; ++j) {
      z[j] = static_cast<float>(kr[j]);
      z[hw + j] = static_cast<float>(vr[j]);
    }
  };
  attend_rows_general<Arch>(row, hw, coef.length(seq, layer, h), coef.positions(seq, layer, h), cache.key_basis(layer, h),
                            cache.value_basis(layer, h), cache.key_rope(), h, G, q, scale, out, opt);
}

}  // namespace lowrank_detail

/// The keys and values n rows [c_k | c_v | pad] stand for, rebuilt in D channels as the decode
/// kernels read them: x̂ = U c (+ μ) with bases bk and bv, keys then rotated to `pos` when rp is
/// set (the kernel's cos/sin table). kr and vr are the rows' two halves ([n][hw] each, wherever
/// they were stored: a projected cache's pages, a coefficient store, xKV's latents); k_out and
/// v_out are [n][head_dim] (either may be null).
template <class Arch = default_arch>
void rebuild_rows(const lowrank::basis& bk, const lowrank::basis& bv, const rope* rp, std::int32_t hw, const float* kr,
                  const float* vr, std::int32_t n, const std::int32_t* pos, float* k_out, float* v_out) {
  const std::int32_t D = bk.dim, rk = bk.rank;
  std::vector<float> z(static_cast<std::size_t>(2) * hw);
  for (std::int32_t t = 0; t < n; ++t) {  // z = [c_k | c_v | pad], from the row's two halves
    std::copy_n(kr + static_cast<std::size_t>(t) * hw, hw, z.data());
    std::copy_n(vr + static_cast<std::size_t>(t) * hw, hw, z.data() + hw);
    if (k_out)
      lowrank_detail::back_project<Arch>(bk.u.data(), rk, D, z.data(), bk.centered() ? bk.mean.data() : nullptr,
                                         k_out + static_cast<std::size_t>(t) * D);
    if (v_out)
      lowrank_detail::back_project<Arch>(bv.u.data(), bv.rank, D, z.data() + rk, bv.centered() ? bv.mean.data() : nullptr,
                                         v_out + static_cast<std::size_t>(t) * D);
  }
  if (k_out && rp && n > 0) {
    std::vector<float> cs, sn;
    lowrank_detail::rope_table(*rp, pos, n, cs, sn);
    const std::size_t half = static_cast<std::size_t>(rp->config().rotary_dim / 2);
    for (std::int32_t t = 0; t < n; ++t)
      lowrank_detail::rotate(*rp, cs.data() + t * half, sn.data() + t * half, k_out + static_cast<std::size_t>(t) * D);
  }
}

/// rebuild_rows with one (layer, head) of a projected cache's bases and RoPE.
template <class Arch = default_arch, class T>
void projected_rebuild(const lowrank::projected_cache<T>& cache, std::int32_t layer, std::int32_t head, const float* kr,
                       const float* vr, std::int32_t n, const std::int32_t* pos, float* k_out, float* v_out) {
  rebuild_rows<Arch>(cache.key_basis(layer, head), cache.value_basis(layer, head), cache.key_rope(), cache.row_width() / 2,
                     kr, vr, n, pos, k_out, v_out);
}

/// The keys and values one stream of a projected cache stands for (projected_rebuild on its
/// stored rows). O(length · D · r): for scorers, prefill attention and tests, not decode.
template <class Arch = default_arch, class T>
void projected_gather(const lowrank::projected_cache<T>& cache, seq_id seq, std::int32_t layer, std::int32_t head,
                      float* k_out, float* v_out) {
  const std::int32_t n = cache.length(seq, layer, head);
  if (n == 0) return;
  const std::int32_t hw = cache.row_width() / 2;
  std::vector<float> kr(static_cast<std::size_t>(n) * hw), vr(kr.size());
  cache.coefficients().gather(seq, layer, head, kr.data(), vr.data());
  projected_rebuild<Arch>(cache, layer, head, kr.data(), vr.data(), n, cache.coefficients().positions(seq, layer, head),
                          k_out, v_out);
}

/// Decode attention of one query token per query head over one layer of one sequence of a
/// projected cache. Same contract as cpu::decode_attention on a kv_cache: GQA when num_q_heads is
/// a multiple of num_kv_heads, opt.scale 0 means 1/sqrt(head_dim) of the *original* head_dim,
/// opt.pool runs the kv heads in parallel (the fallback kernel, with split_tokens, also splits
/// over tokens; the general path ignores split_tokens), opt.lse / probs / group_probs are those of the softmax over the
/// reconstructed keys k̂ = μ_k + U_k c (exactly: the lse includes scale · q·μ_k).
/// \param q    [num_q_heads][head_dim] queries, post-RoPE (pre-RoPE keys are rotated to meet them)
/// \param out  [num_q_heads][head_dim]
/// \pre every kv head of the layer has a basis; q finite (checked: kvc::error)
template <class Arch = default_arch, class T>
void projected_decode_attention(const lowrank::projected_cache<T>& cache, seq_id seq, std::int32_t layer,
                                const float* q, std::int32_t num_q_heads, float* out, const decode_options& opt = {}) {
  using lowrank_detail::api_name;
  const auto& c = cache.config();
  const std::int32_t hkv = c.num_kv_heads, D = c.head_dim;
  KVC_EXPECTS_IN(api_name, cache.contains(seq), "seq = ", seq, " is not a live sequence of this cache, expected one of its ",
                 cache.num_sequences(), " live sequence ids");
  lowrank_detail::check_decode_args(api_name, layer, c.num_layers, num_q_heads, hkv, D, q, out);
  for (std::int32_t h = 0; h < hkv; ++h)
    KVC_EXPECTS_IN(api_name, cache.has_basis(layer, h), "layer ", layer, " head ", h,
                   " has no basis, expected projected_cache::set_basis before attending");
  const float scale = opt.scale != 0.0f ? opt.scale : 1.0f / std::sqrt(static_cast<float>(D));
  const std::int32_t G = num_q_heads / hkv;
  const auto& coef = cache.coefficients();
  std::int64_t held = 0, longest = 0;
  for (std::int32_t h = 0; h < hkv; ++h) {
    held += coef.length(seq, layer, h);
    longest = std::max<std::int64_t>(longest, coef.length(seq, layer, h));
  }
  KVC_EXPECTS_IN(api_name, held > 0, "seq = ", seq, ", layer = ", layer,
                 " holds 0 tokens in all its kv heads, expected at least one token to attend to (append this "
                 "step's K/V to the layer before attending)");
  constexpr std::int32_t W = static_cast<std::int32_t>(fbatch<Arch>::size);
  const std::int32_t r = c.rank, rv = cache.value_rank();
  // The tiled r-space kernel (stream_detail::attend_stream, kvc/cpu/stream_attention.hpp) covers
  // post-RoPE keys at one rank or two (the split layout, r_k <= the row's half); the general path
  // covers pre-RoPE keys, probability outputs with two ranks, and the rest; kvc's decode kernel on
  // the coefficient pages (head_dim = r), which has split-K and the probability outputs, the
  // in-place layout otherwise.
  const bool plain_ok = cache.in_place() && r % W == 0;
  const bool split_ok = !cache.in_place() && !c.pre_rope && r <= cache.row_width() / 2;
  const bool own = (plain_ok || split_ok) && G <= 8 && opt.probs == nullptr && opt.group_probs == nullptr &&
                   opt.split_tokens == 0;
  if (!cache.in_place() && !own) {  // pre-RoPE keys, or two ranks with what the tiles lack: the general path
    KVC_EXPECTS_IN(api_name, (opt.probs == nullptr && opt.group_probs == nullptr) || opt.probs_stride >= longest,
                   "opt.probs_stride = ", opt.probs_stride, ", expected >= the longest stream of the layer, ", longest,
                   " tokens, with probs or group_probs");
    auto run = [&](std::int32_t h) {
      lowrank_detail::attend_head_general<Arch>(cache, seq, layer, h, G, q, scale, out, opt);
    };
    if (opt.pool && hkv > 1) opt.pool->parallel_for(hkv, run);
    else
      for (std::int32_t h = 0; h < hkv; ++h) run(h);
    return;
  }
  std::vector<float> qp(static_cast<std::size_t>(num_q_heads) * r), acc(static_cast<std::size_t>(num_q_heads) * rv);
  lowrank_detail::project_queries<Arch>(cache, layer, q, num_q_heads, qp.data());
  if (own) {
    for (float& x : qp) x *= scale;
    std::vector<float> m(static_cast<std::size_t>(num_q_heads)), l(m.size());
    const stream_detail::stream_layout lay =
        cache.in_place() ? stream_detail::stream_layout::plain(r) : stream_detail::stream_layout::split(r, rv);
    auto run = [&](std::int32_t h) {
      const std::size_t o = static_cast<std::size_t>(h) * G;
      const auto& pages = coef.pages(seq, layer, h);
      stream_detail::attend_stream_dispatch<Arch, T>(G, coef.pool(), pages.data(), coef.length(seq, layer, h),
                                                     coef.config().page_size, lay, qp.data() + o * r, nullptr,
                                                     acc.data() + o * rv, m.data() + o, l.data() + o);
    };
    if (opt.pool && hkv > 1) opt.pool->parallel_for(hkv, run);
    else
      for (std::int32_t h = 0; h < hkv; ++h) run(h);
    for (std::int32_t h = 0; h < num_q_heads; ++h) {
      const float inv = l[h] > 0 ? 1.0f / l[h] : 0.0f;  // an empty head: zeros, lse = -inf
      for (std::int32_t j = 0; j < rv; ++j) acc[static_cast<std::size_t>(h) * rv + j] *= inv;
      if (opt.lse) opt.lse[h] = l[h] > 0 ? m[h] + std::log(l[h]) : -INFINITY;
    }
  } else {
    decode_options inner = opt;
    inner.scale = scale;
    decode_attention<Arch>(coef, seq, layer, qp.data(), num_q_heads, acc.data(), inner);
  }
  lowrank_detail::back_project_all<Arch>(cache, layer, acc.data(), num_q_heads, out);
  // A kv head whose tokens were all evicted attends to nothing: zeros, as cpu::decode_attention
  // gives, not the value mean a centered basis would add.
  for (std::int32_t h = 0; h < hkv; ++h)
    if (coef.length(seq, layer, h) == 0)
      std::fill(out + static_cast<std::size_t>(h) * G * D, out + static_cast<std::size_t>(h + 1) * G * D, 0.0f);
  if (opt.lse) {
    for (std::int32_t h = 0; h < num_q_heads; ++h) {
      const lowrank::basis& b = cache.key_basis(layer, h / G);
      if (!b.centered() || !std::isfinite(opt.lse[h])) continue;
      double qm = 0;
      for (std::int32_t d = 0; d < D; ++d) qm += static_cast<double>(q[static_cast<std::size_t>(h) * D + d]) * b.mean[d];
      opt.lse[h] += static_cast<float>(scale * qm);
    }
  }
}

/// Decode attention over a projected_cache layer read through its views (projected_cache::layer):
/// projected_decode_attention on the store the views name, in coefficient space.
template <class Arch = default_arch, class T, class Heads>
void decode_attention(const store_layer<lowrank::projected_cache<T>, Heads>& heads, const float* q,
                      std::int32_t num_q_heads, float* out, const decode_options& opt = {}) {
  projected_decode_attention<Arch>(*heads.store, heads.seq, heads.layer, q, num_q_heads, out, opt);
}

KVC_END_ISA_NAMESPACE
}  // namespace cpu

KVC_BEGIN_ISA_NAMESPACE
/// kvc::decode_attention (kvc/attention.hpp) on a projected_cache layer: the projected kernel
/// above, in coefficient space.
template <class T, class Heads>
void decode_attention(const store_layer<lowrank::projected_cache<T>, Heads>& heads, const float* q,
                      std::int32_t num_q_heads, float* out, const decode_options& opt = {}) {
  cpu::decode_attention(heads, q, num_q_heads, out, opt);
}
KVC_END_ISA_NAMESPACE
KVC_END_NAMESPACE
