// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `stream_detail::attend_stream`: the tiled online-softmax decode kernel over one kv_cache
/// stream's pages ([K: P x r][V: P x r] of T; stream_layout says where keys and values sit in
/// them), for G <= 8 pre-scaled queries of one GQA group,
/// with an optional per-token additive bias on the logits:
///
///   s_t = kscale[t]·(q'·k_t) + bias[t]   (q' pre-scaled by the caller; null arrays: no term),
///   out = Σ_t p_t·vscale[t]·v_t / Σ_t p_t
///
/// Two users: the low-rank kernel (kvc/cpu/projected_attention.hpp, r = rank, or the split
/// layout of two ranks; no bias) and
/// the merged-token kernel (kvc/cpu/merged_attention.hpp, r = head_dim, bias = the tokens'
/// log-weights, so a merged token counts as the members it stands for). One kernel for both, so
/// the bias costs one load and add per score and nothing else differs. MiniCache's shared
/// directions (kvc/merge/minicache.hpp) pass per-token magnitudes as kscale and vscale: a
/// stored unit direction e_t stands for the row |x_t|·e_t of each layer that shares it.
/// Channel runs that are not a multiple of the SIMD width run their last len % W channels in
/// scalar code (the merged kernel's head dims, the split layout's segments).
/// Compiled per ISA (docs/isa.md).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include <kvc/cpu/simd.hpp>
#include <kvc/error.hpp>
#include <kvc/store/page_pool.hpp>

KVC_BEGIN_NAMESPACE
namespace cpu {
KVC_BEGIN_ISA_NAMESPACE  // compiled per ISA: docs/isa.md
namespace stream_detail {

/// Tokens per step of the r-space kernel's online softmax: a whole number of SIMD batches on
/// every arch (4, 8, 16 lanes) and the store's default page, so a tile is one contiguous run of
/// K rows and one of V rows. Smaller pages make smaller tiles (a tile never crosses a page).
inline constexpr std::int32_t tile = 16;

/// Where a token's key and value channels sit in its K row and V row (a page is [K: P x row][V: P
/// x row] of T). The plain layout (every caller but one) is key = the K row, value = the V row.
/// A projected cache with two ranks (kvc/store/projected_cache.hpp) stores the row
/// [c_k | c_v | pad] split across both: the key is the K row's first r_k channels and the value
/// the rest of the K row followed by the V row's first channels.
struct stream_layout {
  std::int32_t row = 0;     ///< values per K row and per V row
  std::int32_t key = 0;     ///< key channels: K row [0, key)
  std::int32_t vk_off = 0;  ///< value channels: K row [vk_off, vk_off + vk) ...
  std::int32_t vk = 0;
  std::int32_t vv = 0;      ///< ... then V row [0, vv)
  std::int32_t value() const noexcept { return vk + vv; }
  static stream_layout plain(std::int32_t r) noexcept { return {r, r, 0, 0, r}; }
  /// [c_k (rk) | c_v (rv) | pad to even] over two rows of (rk + rv + 1) / 2; needs rk <= the row.
  static stream_layout split(std::int32_t rk, std::int32_t rv) noexcept {
    const std::int32_t hw = (rk + rv + 1) / 2;
    return {hw, rk, rk, hw - rk, rv - (hw - rk)};
  }
};

/// Attention of G pre-scaled queries qp ([G][lay.key]) over the n rows of one stream laid out as
/// `lay`. Token t's logit is kscale[t]·(qp·k_t) + bias[t] and its value vscale[t]·v_t (each
/// array n floats, or null for no term).
/// Leaves the unnormalised Σ p v in acc ([G][lay.value()]), the running maximum in m and the sum
/// of exponentials in l (n = 0: acc 0, m = -inf, l = 0). When raw is not null it receives every
/// logit s_t: raw[g * raw_stride + t], t < n (probabilities are exp(s_t - m - log l) afterwards).
///
/// Why not kvc's decode kernel at head_dim r (the low-rank caller's fallback): that kernel is built for
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
void attend_stream(const page_pool& pool, const page_id* pages, std::int32_t n, std::int32_t P, const stream_layout& lay,
                   const float* qp, const float* bias, float* acc, float* m, float* l, const float* kscale = nullptr,
                   const float* vscale = nullptr, float* raw = nullptr, std::size_t raw_stride = 0) noexcept {
  using B = fbatch<Arch>;
  constexpr std::int32_t W = static_cast<std::int32_t>(B::size);
  static_assert(tile % W == 0, "a tile is whole SIMD batches");
  const std::int32_t r = lay.row, kd = lay.key, A = lay.value();
  const std::int32_t NV = kd / W;
  const std::int32_t RV = NV * W;  // key channels RV..kd-1: scalar (kd % W of them)
  const std::int32_t TT = std::min(tile, P);
  const std::size_t row_bytes = sizeof(T) * static_cast<std::size_t>(r);
  B part[G][tile];
  alignas(64) float s[G][tile];
  float tail[G][tile];  // the scalar channels' part of each score (only when RV < kd)
  for (std::int32_t g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
    for (std::int32_t j = 0; j < A; ++j) acc[g * A + j] = 0.0f;
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
        for (std::int32_t g = 0; g < G; ++g) a[g] = xsimd::fma(B::load_unaligned(qp + g * kd + v * W), kv, a[g]);
      }
      for (std::int32_t g = 0; g < G; ++g) part[g][t] = a[g];
      if (RV < kd)
        for (std::int32_t g = 0; g < G; ++g) {
          float x = 0.0f;
          for (std::int32_t d = RV; d < kd; ++d) x += qp[g * kd + d] * static_cast<float>(row[d]);
          tail[g][t] = x;
        }
    }
    const std::int32_t tw = std::min(tile, (tn + W - 1) / W * W);  // whole batches of scores (min: for GCC's bounds check)
    for (std::int32_t g = 0; g < G; ++g) {
      for (std::int32_t t = tn; t < tw; ++t) part[g][t] = B(0.0f);
      for (std::int32_t j = 0; j < tw; j += W) haddp<Arch>(&part[g][j]).store_aligned(&s[g][j]);
      if (RV < kd)
        for (std::int32_t t = 0; t < tn; ++t) s[g][t] += tail[g][t];
      if (kscale)
        for (std::int32_t t = 0; t < tn; ++t) s[g][t] *= kscale[t0 + t];
      if (bias)
        for (std::int32_t t = 0; t < tn; ++t) s[g][t] += bias[t0 + t];
      if (raw)  // the logits, for probabilities once the softmax's total is known
        for (std::int32_t t = 0; t < tn; ++t) raw[static_cast<std::size_t>(g) * raw_stride + t0 + t] = s[g][t];
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
        for (std::int32_t j = 0; j < A; ++j) acc[g * A + j] *= corr;
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
      if (vscale)  // the softmax sums p; the values are weighted by p·vscale
        for (std::int32_t t = 0; t < tn; ++t) s[g][t] *= vscale[t0 + t];
    }
    // acc_g[o + j] += Σ_t p_g[t] rows[t][off + j] for j < len: the G accumulators of one batch
    // of channels in registers over the tile's rows, then the len % W channels in scalar code.
    auto accumulate = [&](const T* rows, std::int32_t off, std::int32_t len, std::int32_t o) {
      const std::int32_t nb = len / W;
      for (std::int32_t v = 0; v < nb; ++v) {
        B a[G];
        for (std::int32_t g = 0; g < G; ++g) a[g] = B::load_unaligned(acc + g * A + o + v * W);
        for (std::int32_t t = 0; t < tn; ++t) {
          const B vv = load_as_float<Arch>(rows + static_cast<std::size_t>(t) * r + off + v * W);
          for (std::int32_t g = 0; g < G; ++g) a[g] = xsimd::fma(B(s[g][t]), vv, a[g]);
        }
        for (std::int32_t g = 0; g < G; ++g) a[g].store_unaligned(acc + g * A + o + v * W);
      }
      for (std::int32_t d = nb * W; d < len; ++d)
        for (std::int32_t g = 0; g < G; ++g) {
          float x = acc[g * A + o + d];
          for (std::int32_t t = 0; t < tn; ++t) x += s[g][t] * static_cast<float>(rows[static_cast<std::size_t>(t) * r + off + d]);
          acc[g * A + o + d] = x;
        }
    };
    if (lay.vk > 0) accumulate(K, lay.vk_off, lay.vk, 0);
    accumulate(V, 0, lay.vv, lay.vk);
  }
}

/// attend_stream for a run-time G in 1..8 (the caller splits larger groups).
template <class Arch, class T>
void attend_stream_dispatch(std::int32_t G, const page_pool& pool, const page_id* pages, std::int32_t n,
                            std::int32_t P, const stream_layout& lay, const float* qp, const float* bias, float* acc,
                            float* m, float* l, const float* kscale = nullptr, const float* vscale = nullptr,
                            float* raw = nullptr, std::size_t raw_stride = 0) noexcept {
  switch (G) {
#define KVC_CASE(N) \
  case N: return attend_stream<Arch, N, T>(pool, pages, n, P, lay, qp, bias, acc, m, l, kscale, vscale, raw, raw_stride);
    KVC_CASE(1) KVC_CASE(2) KVC_CASE(3) KVC_CASE(4) KVC_CASE(5) KVC_CASE(6) KVC_CASE(7) KVC_CASE(8)
#undef KVC_CASE
    default: KVC_ASSERT(false);
  }
}
/// The plain layout: keys and values of r channels (stream_layout::plain).
template <class Arch, class T>
void attend_stream_dispatch(std::int32_t G, const page_pool& pool, const page_id* pages, std::int32_t n,
                            std::int32_t P, std::int32_t r, const float* qp, const float* bias, float* acc, float* m,
                            float* l, const float* kscale = nullptr, const float* vscale = nullptr, float* raw = nullptr,
                            std::size_t raw_stride = 0) noexcept {
  attend_stream_dispatch<Arch, T>(G, pool, pages, n, P, stream_layout::plain(r), qp, bias, acc, m, l, kscale, vscale,
                                  raw, raw_stride);
}

/// The argument checks the stream-kernel entry points share (merged_attention.hpp,
/// minicache_attention.hpp), for a cache with config(), contains(), num_sequences() and
/// length(seq, layer, head) (seq: the cache's seq_id, an int32): live sequence, layer in range, num_queries >= 1, GQA groups, q and
/// out set, finite queries, a token to attend to; probability outputs only where the entry point
/// gives them (allow_probs: one query, probs_stride >= the longest stream) and refused elsewhere.
template <class Cache, class Opt>
void check_query_args(const char* who, const Cache& cache, std::int32_t seq, std::int32_t layer, const float* q,
                      std::int32_t num_queries, std::int32_t num_q_heads, const float* out, const Opt& opt,
                      bool allow_probs = false) {
  const auto& c = cache.config();
  const std::int32_t hkv = c.num_kv_heads;
  KVC_EXPECTS_IN(who, cache.contains(seq), "seq = ", seq, " is not a live sequence of this cache, expected one of its ",
                 cache.num_sequences(), " live sequence ids");
  KVC_EXPECTS_IN(who, layer >= 0 && layer < c.num_layers, "layer = ", layer, ", expected 0..", c.num_layers - 1);
  KVC_EXPECTS_IN(who, num_queries > 0, "num_queries = ", num_queries, ", expected >= 1");
  KVC_EXPECTS_IN(who, num_q_heads > 0 && num_q_heads % hkv == 0, "num_q_heads = ", num_q_heads,
                 ", expected a positive multiple of num_kv_heads = ", hkv);
  KVC_EXPECTS_IN(who, q != nullptr && out != nullptr, q == nullptr ? "q" : "out", " is null");
  const bool want_probs = opt.probs != nullptr || opt.group_probs != nullptr;
  KVC_EXPECTS_IN(who, allow_probs || !want_probs,
                 "opt.probs or opt.group_probs is set, expected null (this entry point has no probability outputs)");
  const std::size_t qn = static_cast<std::size_t>(num_queries) * num_q_heads * c.head_dim;
  for (std::size_t i = 0; i < qn; ++i)
    KVC_EXPECTS_IN(who, std::isfinite(q[i]), "q[", i, "] = ", q[i], ", expected a finite query");
  std::int64_t held = 0;
  std::int32_t longest = 0;
  for (std::int32_t h = 0; h < hkv; ++h) {
    held += cache.length(seq, layer, h);
    longest = std::max(longest, cache.length(seq, layer, h));
  }
  KVC_EXPECTS_IN(who, !want_probs || opt.probs_stride >= longest, "probs_stride = ", opt.probs_stride,
                 ", expected >= the longest stream (", longest, " tokens)");
  KVC_EXPECTS_IN(who, held > 0, "seq = ", seq, ", layer = ", layer,
                 " holds 0 tokens in all its kv heads, expected at least one token to attend to (append the "
                 "step's K/V to the layer before attending)");
}

}  // namespace stream_detail
KVC_END_ISA_NAMESPACE
}  // namespace cpu
KVC_END_NAMESPACE
