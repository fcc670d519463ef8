// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Decode attention over a projected cache (kvc/lowrank/projected_cache.hpp), in the r-dimensional
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
/// Keys are used as stored (post-RoPE). Pre-RoPE storage with rotation in the kernel is missing.
/// Threads: read-only on the cache (as cpu::decode_attention). Compiled per ISA (docs/isa.md).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <kvc/attention/options.hpp>
#include <kvc/cpu/decode_attention.hpp>
#include <kvc/cpu/simd.hpp>
#include <kvc/cpu/stream_attention.hpp>
#include <kvc/error.hpp>
#include <kvc/lowrank/projected_cache.hpp>
#include <kvc/store/page_pool.hpp>

KVC_BEGIN_NAMESPACE
namespace cpu {
KVC_BEGIN_ISA_NAMESPACE  // compiled per ISA: docs/isa.md
namespace lowrank_detail {

inline constexpr const char* api_name = "kvc::cpu::projected_decode_attention";

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

/// out[h] = U_v(h / G) a[h] (+ μ_v) for every query head: the step's way back to D channels.
template <class Arch, class T>
void back_project_all(const lowrank::projected_cache<T>& cache, std::int32_t layer, const float* a,
                      std::int32_t num_q_heads, float* out) {
  const auto& c = cache.config();
  const std::int32_t G = num_q_heads / c.num_kv_heads;
  for (std::int32_t h = 0; h < num_q_heads; ++h) {
    const lowrank::basis& b = cache.value_basis(layer, h / G);
    back_project<Arch>(b.u.data(), c.rank, c.head_dim, a + static_cast<std::size_t>(h) * c.rank,
                       b.centered() ? b.mean.data() : nullptr, out + static_cast<std::size_t>(h) * c.head_dim);
  }
}


}  // namespace lowrank_detail

/// Decode attention of one query token per query head over one layer of one sequence of a
/// projected cache. Same contract as cpu::decode_attention on a kv_cache: GQA when num_q_heads is
/// a multiple of num_kv_heads, opt.scale 0 means 1/sqrt(head_dim) of the *original* head_dim,
/// opt.pool runs the kv heads in parallel (the fallback kernel, with split_tokens, also splits
/// over tokens), opt.lse / probs / group_probs are those of the softmax over the
/// reconstructed keys k̂ = μ_k + U_k c (exactly: the lse includes scale · q·μ_k).
/// \param q    [num_q_heads][head_dim] queries (post-RoPE, like the stored keys)
/// \param out  [num_q_heads][head_dim]
/// \pre every kv head of the layer has a basis; q finite (checked: kvc::error)
template <class Arch = default_arch, class T>
void projected_decode_attention(const lowrank::projected_cache<T>& cache, seq_id seq, std::int32_t layer,
                                const float* q, std::int32_t num_q_heads, float* out, const decode_options& opt = {}) {
  using lowrank_detail::api_name;
  const auto& c = cache.config();
  const std::int32_t hkv = c.num_kv_heads, D = c.head_dim, r = c.rank;
  KVC_EXPECTS_IN(api_name, cache.contains(seq), "seq = ", seq, " is not a live sequence of this cache, expected one of its ",
                 cache.num_sequences(), " live sequence ids");
  KVC_EXPECTS_IN(api_name, layer >= 0 && layer < c.num_layers, "layer = ", layer, ", expected 0..", c.num_layers - 1);
  KVC_EXPECTS_IN(api_name, num_q_heads > 0 && num_q_heads % hkv == 0, "num_q_heads = ", num_q_heads,
                 ", expected a positive multiple of num_kv_heads = ", hkv);
  KVC_EXPECTS_IN(api_name, q != nullptr && out != nullptr, "q or out is null");
  for (std::int32_t i = 0; i < num_q_heads * D; ++i)
    KVC_EXPECTS_IN(api_name, std::isfinite(q[i]), "q[", i, "] = ", q[i], ", expected a finite query");
  for (std::int32_t h = 0; h < hkv; ++h)
    KVC_EXPECTS_IN(api_name, cache.has_basis(layer, h), "layer ", layer, " head ", h,
                   " has no basis, expected projected_cache::set_basis before attending");
  const float scale = opt.scale != 0.0f ? opt.scale : 1.0f / std::sqrt(static_cast<float>(D));
  const std::int32_t G = num_q_heads / hkv;
  std::vector<float> qp(static_cast<std::size_t>(num_q_heads) * r), acc(qp.size());
  lowrank_detail::project_queries<Arch>(cache, layer, q, num_q_heads, qp.data());
  constexpr std::int32_t W = static_cast<std::int32_t>(fbatch<Arch>::size);
  const auto& coef = cache.coefficients();
  // The r-space kernel (stream_detail::attend_stream, kvc/cpu/stream_attention.hpp) covers the
  // common case; everything else runs kvc's decode kernel on the coefficient pages (head_dim = r), which has split-K and the
  // probability outputs.
  const bool own = r % W == 0 && G <= 8 && opt.probs == nullptr && opt.group_probs == nullptr && opt.split_tokens == 0;
  if (own) {
    std::int64_t held = 0;
    for (std::int32_t h = 0; h < hkv; ++h) held += coef.length(seq, layer, h);
    KVC_EXPECTS_IN(api_name, held > 0, "seq = ", seq, ", layer = ", layer,
                   " holds 0 tokens in all its kv heads, expected at least one token to attend to (append this "
                   "step's K/V to the layer before attending)");
    for (float& x : qp) x *= scale;
    std::vector<float> m(static_cast<std::size_t>(num_q_heads)), l(m.size());
    auto run = [&](std::int32_t h) {
      const std::size_t o = static_cast<std::size_t>(h) * G;
      const auto& pages = coef.pages(seq, layer, h);
      stream_detail::attend_stream_dispatch<Arch, T>(G, coef.pool(), pages.data(), coef.length(seq, layer, h),
                                                     coef.config().page_size, r, qp.data() + o * r, nullptr,
                                                     acc.data() + o * r, m.data() + o, l.data() + o);
    };
    if (opt.pool && hkv > 1) opt.pool->parallel_for(hkv, run);
    else
      for (std::int32_t h = 0; h < hkv; ++h) run(h);
    for (std::int32_t h = 0; h < num_q_heads; ++h) {
      const float inv = l[h] > 0 ? 1.0f / l[h] : 0.0f;  // an empty head: zeros, lse = -inf
      for (std::int32_t j = 0; j < r; ++j) acc[static_cast<std::size_t>(h) * r + j] *= inv;
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

KVC_END_ISA_NAMESPACE
}  // namespace cpu
KVC_END_NAMESPACE
