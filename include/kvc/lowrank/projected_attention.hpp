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
/// (lowrank_detail::attend_stream): one stream per kv head, tiles of 16 tokens read in place from
/// the coefficient pages, online softmax, GQA (a group's G ≤ 8 query heads read each coefficient
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


/// Tokens per step of the r-space kernel's online softmax: a whole number of SIMD batches on
/// every arch (4, 8, 16 lanes) and the store's default page, so a tile is one contiguous run of
/// K rows and one of V rows. Smaller pages make smaller tiles (a tile never crosses a page).
inline constexpr std::int32_t tile = 16;

/// Attention of G pre-scaled projected queries qp ([G][r]) over the n coefficient rows of one
/// stream: pages of [K: P x r][V: P x r] of T. Leaves the unnormalised Σ p c_v in acc ([G][r]),
/// the running maximum in m and the sum of exponentials in l.
///
/// Why not kvc's decode kernel at head_dim r (the fallback below): that kernel is built for
/// D = 64..128, where a score's D / W FMAs amortise its horizontal reduction. At r = 16..32 (1..2
/// AVX-512 batches a row) its per-token work that does not shrink with r dominated: one 16-row
/// haddp per 2 tokens x 4 heads of which half the lanes are used, a scalar max / subtract / sum per
/// score, and row pointers built per token. bench_lowrank 32x8x128 ctx:32768 one thread
/// (2026-12-03, AVX-512 2-core VM, medians of 3 x 15 pairs): through decode_attention r = 16 ran
/// at 6.0 ms and r = 32 at 7.0 ms against fp16's 13.9 (2.26x and 2.15x): r barely mattered.
/// Here the accumulators of a tile's G x 16 scores are reduced 16 lanes at a time (one haddp per W
/// scores, all lanes used), the softmax is vectorised over the tile, and rows are addressed from
/// the page base.
template <class Arch, std::int32_t G, class T>
void attend_stream(const page_pool& pool, const page_id* pages, std::int32_t n, std::int32_t P, std::int32_t r,
                   const float* qp, float* acc, float* m, float* l) noexcept {
  using B = fbatch<Arch>;
  constexpr std::int32_t W = static_cast<std::int32_t>(B::size);
  static_assert(tile % W == 0, "a tile is whole SIMD batches");
  const std::int32_t NV = r / W;  // the caller guarantees r % W == 0
  const std::int32_t TT = std::min(tile, P);
  const std::size_t row_bytes = sizeof(T) * static_cast<std::size_t>(r);
  B part[G][tile];
  alignas(64) float s[G][tile];
  for (std::int32_t g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
    for (std::int32_t j = 0; j < r; ++j) acc[g * r + j] = 0.0f;
  }
  for (std::int32_t t0 = 0; t0 < n; t0 += TT) {
    const std::int32_t tn = std::max(1, std::min(TT, n - t0));  // >= 1 always; max: for GCC 12 -Warray-bounds
    const T* page = reinterpret_cast<const T*>(pool.data(pages[t0 / P]));
    const std::int32_t slot = t0 % P;
    const T* K = page + static_cast<std::size_t>(slot) * r;
    const T* V = page + static_cast<std::size_t>(P + slot) * r;
    // Rows of the tile two ahead, prefetched a row per scored token (decode_attention's
    // prefetch_tiles = 2, measured there: 1.1-1.2x at 32k; spread, not in one burst).
    const std::int32_t tf = t0 + 2 * TT;
    const char* pk = nullptr;
    const char* pv = nullptr;
    std::int32_t pn = 0;
    if (tf < n) {
      const T* fpage = reinterpret_cast<const T*>(pool.data(pages[tf / P]));
      pk = reinterpret_cast<const char*>(fpage + static_cast<std::size_t>(tf % P) * r);
      pv = reinterpret_cast<const char*>(fpage + static_cast<std::size_t>(P + tf % P) * r);
      pn = std::min(TT, n - tf);
    }
    for (std::int32_t t = 0; t < tn; ++t) {
      if (t < pn)
        for (std::size_t b = 0; b < row_bytes; b += 64) {
          prefetch_read(pk + t * row_bytes + b);
          prefetch_read(pv + t * row_bytes + b);
        }
      B a[G];
      for (std::int32_t g = 0; g < G; ++g) a[g] = B(0.0f);
      const T* row = K + static_cast<std::size_t>(t) * r;
      for (std::int32_t v = 0; v < NV; ++v) {
        const B kv = load_as_float<Arch>(row + v * W);
        for (std::int32_t g = 0; g < G; ++g) a[g] = xsimd::fma(B::load_unaligned(qp + g * r + v * W), kv, a[g]);
      }
      for (std::int32_t g = 0; g < G; ++g) part[g][t] = a[g];
    }
    const std::int32_t tw = std::min(tile, (tn + W - 1) / W * W);  // whole batches of scores (min: for GCC's bounds check)
    for (std::int32_t g = 0; g < G; ++g) {
      for (std::int32_t t = tn; t < tw; ++t) part[g][t] = B(0.0f);
      for (std::int32_t j = 0; j < tw; j += W) haddp<Arch>(&part[g][j]).store_aligned(&s[g][j]);
      for (std::int32_t t = tn; t < tw; ++t) s[g][t] = -INFINITY;  // padding: e^-inf = 0
      B mx = B::load_aligned(&s[g][0]);
      for (std::int32_t j = W; j < tw; j += W) mx = xsimd::max(mx, B::load_aligned(&s[g][j]));
      alignas(64) float lanes[W];
      mx.store_aligned(lanes);
      float mt = lanes[0];
      for (std::int32_t i = 1; i < W; ++i) mt = std::max(mt, lanes[i]);
      const float m_new = std::max(m[g], mt);
      if (m_new > m[g]) {
        const float corr = std::exp(m[g] - m_new);  // 0 on the first tile
        l[g] *= corr;
        for (std::int32_t j = 0; j < r; ++j) acc[g * r + j] *= corr;
        m[g] = m_new;
      }
      const B mb(m_new);
      B sum(0.0f);
      for (std::int32_t j = 0; j < tw; j += W) {
        const B p = xsimd::exp(B::load_aligned(&s[g][j]) - mb);
        p.store_aligned(&s[g][j]);
        sum += p;
      }
      l[g] += reduce_add<Arch>(sum);
    }
    // acc_g += Σ_t p_g[t] c_v[t]: the G accumulators of one batch of channels in registers over
    // the tile's rows.
    for (std::int32_t v = 0; v < NV; ++v) {
      B a[G];
      for (std::int32_t g = 0; g < G; ++g) a[g] = B::load_unaligned(acc + g * r + v * W);
      for (std::int32_t t = 0; t < tn; ++t) {
        const B vv = load_as_float<Arch>(V + static_cast<std::size_t>(t) * r + v * W);
        for (std::int32_t g = 0; g < G; ++g) a[g] = xsimd::fma(B(s[g][t]), vv, a[g]);
      }
      for (std::int32_t g = 0; g < G; ++g) a[g].store_unaligned(acc + g * r + v * W);
    }
  }
}

template <class Arch, class T>
void attend_stream_dispatch(std::int32_t G, const page_pool& pool, const page_id* pages, std::int32_t n,
                            std::int32_t P, std::int32_t r, const float* qp, float* acc, float* m, float* l) noexcept {
  switch (G) {
#define KVC_CASE(N) \
  case N: return attend_stream<Arch, N, T>(pool, pages, n, P, r, qp, acc, m, l);
    KVC_CASE(1) KVC_CASE(2) KVC_CASE(3) KVC_CASE(4) KVC_CASE(5) KVC_CASE(6) KVC_CASE(7) KVC_CASE(8)
#undef KVC_CASE
    default: KVC_ASSERT(false);
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
  // The r-space kernel (lowrank_detail::attend_stream) covers the common case; everything else
  // runs kvc's decode kernel on the coefficient pages (head_dim = r), which has split-K and the
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
      lowrank_detail::attend_stream_dispatch<Arch, T>(G, coef.pool(), pages.data(), coef.length(seq, layer, h),
                                                      coef.config().page_size, r, qp.data() + o * r,
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
