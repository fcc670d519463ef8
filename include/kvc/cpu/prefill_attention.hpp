// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// CPU prefill attention: a chunk of queries at known positions against one layer of one sequence
/// of a cache, causal by position (a query attends to the tokens whose original position is <= its
/// own), GQA. The work is tiled queries x tokens: the query rows of a kv head (every query of the
/// chunk times every query head of the group) run in blocks of `row_block` rows that share each
/// K/V row load (the register-blocked score and accumulate micro-kernels of decode_attention.hpp),
/// and a task walks the head's tokens once, tile by tile, for many row blocks, so a tile is read
/// from memory once and reused from L1 by every block of the task. Online softmax across tiles
/// as in flash-attention; tiles wholly after a block's last query are skipped, tiles straddling
/// its positions are masked element-wise.
///
/// Rows are read in place from the pages for kv_cache layers whose layout keeps a head's dim axis
/// contiguous (fp32, fp16, bf16); every other cache (the quantized caches, any_cache) is decoded
/// once per call into float rows through its gather(), which costs O(tokens x head_dim) against
/// the O(queries x tokens x head_dim) of the attention.
/// Threads: read-only on the cache; tasks (kv head, block of query rows) run on opt.pool.
/// Compiled per ISA (docs/isa.md).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <kvc/attention/options.hpp>
#include <kvc/cpu/decode_attention.hpp>
#include <kvc/cpu/simd.hpp>
#include <kvc/error.hpp>
#include <kvc/parallel/thread_pool.hpp>
#include <kvc/view/accessor.hpp>

KVC_BEGIN_NAMESPACE
namespace cpu {
KVC_BEGIN_ISA_NAMESPACE  // compiled per ISA: docs/isa.md
namespace prefill_detail {

/// The public call the preconditions name.
inline constexpr const char* api_name = "kvc::cpu::prefill_attention";

/// Query rows that share each K/V row load: decode's register blocks at G = 8 (8 accumulators,
/// one K or V row load per 8 FMAs). Blocks are always full (padding rows are computed and
/// dropped), so one micro-kernel instantiation serves every group size.
inline constexpr std::int32_t row_block = 8;
static_assert(row_block <= detail::max_group, "a row block is one of decode's register blocks");
/// Row blocks per task: the K/V tile a task reads is reused from L1 by this many blocks, and
/// their accumulators (blocks x 8 x head_dim floats, 32 KiB at head_dim 64) stay in L2; smaller
/// tasks balance the causal triangle across threads better. Chosen from that budget, not timed
/// against other values: with it, attention is ~18% of kvc-llama's 1,024-token prefill (perf,
/// SmolLM2-135M, -march=native, 2026-12) and the weight GEMMs most of the rest.
inline constexpr std::int32_t task_blocks = 16;

/// Rows of tokens [t0, t0 + tn) of a contiguous float buffer [n][D] (a gathered stream).
struct float_rows {
  const float* base;
  std::int32_t D;
  using row_type = const float;
  void operator()(std::int32_t t0, std::int32_t tn, const float** rows) const noexcept {
    for (std::int32_t i = 0; i < tn; ++i) rows[i] = base + static_cast<std::size_t>(t0 + i) * D;
  }
};

/// Rows read in place from a view whose rows are plain (decode's tile_rows).
template <class View>
struct view_rows {
  const View* v;
  std::int32_t hi;
  using row_type = detail::row_t<View>;
  void operator()(std::int32_t t0, std::int32_t tn, row_type** rows) const {
    detail::tile_rows(*v, hi, t0, tn, rows, static_cast<float*>(nullptr));
  }
};

/// One kv head's inputs to the tasks.
struct head_job {
  std::int32_t n = 0;              ///< tokens of the head
  const std::int32_t* kpos = nullptr;
  bool sorted = true;              ///< positions ascending: block ranges by binary search
  const float* bias = nullptr;     ///< [n] added to each token's logit (a merged token's log-weight), or none
};

/// Online-softmax state of one block of row_block rows.
struct block_state {
  float m[row_block];
  float l[row_block];
};

/// Attention of the row blocks [b0, b1) of one kv head over its tokens. qs: the head's scaled
/// query rows [rows][D] (rows padded to whole blocks), rpos[r] the position of row r; acc receives
/// the un-normalised outputs [rows][D] of the task's blocks, lsum/lmax their softmax sums and maxima.
template <class Arch, class KRows, class VRows>
void attend_blocks(const KRows& krows_of, const VRows& vrows_of, const head_job& hj, const float* qs,
                   const std::int32_t* rpos, std::int32_t b0, std::int32_t b1, std::int32_t D, float* acc,
                   float* lsum, float* lmax) {
  constexpr std::int32_t RB = row_block, TT = detail::tile_tokens;
  const std::int32_t nb = b1 - b0;
  std::vector<block_state> st(static_cast<std::size_t>(nb));
  std::vector<std::int32_t> lo(static_cast<std::size_t>(nb)), hi(static_cast<std::size_t>(nb));
  std::vector<std::int32_t> end(static_cast<std::size_t>(nb));  // tokens past it are after every row's position
  std::int32_t last = 0;
  for (std::int32_t b = 0; b < nb; ++b) {
    const std::int32_t* p = rpos + static_cast<std::size_t>(b0 + b) * RB;
    lo[static_cast<std::size_t>(b)] = *std::min_element(p, p + RB);
    hi[static_cast<std::size_t>(b)] = *std::max_element(p, p + RB);
    end[static_cast<std::size_t>(b)] =
        hj.sorted ? static_cast<std::int32_t>(std::upper_bound(hj.kpos, hj.kpos + hj.n, hi[static_cast<std::size_t>(b)]) - hj.kpos)
                  : hj.n;
    last = std::max(last, end[static_cast<std::size_t>(b)]);
    for (std::int32_t g = 0; g < RB; ++g) {
      st[static_cast<std::size_t>(b)].m[g] = -INFINITY;
      st[static_cast<std::size_t>(b)].l[g] = 0.0f;
    }
  }
  std::fill(acc + static_cast<std::size_t>(b0) * RB * D, acc + static_cast<std::size_t>(b1) * RB * D, 0.0f);
  alignas(64) float s[RB * TT];
  typename KRows::row_type* krows[TT];
  typename VRows::row_type* vrows[TT];
  for (std::int32_t ts = 0; ts < last; ts += TT) {
    const std::int32_t tn = std::min(TT, last - ts);
    std::int32_t tmin = hj.kpos[ts], tmax = hj.kpos[ts];
    for (std::int32_t i = 1; i < tn; ++i) {
      tmin = std::min(tmin, hj.kpos[ts + i]);
      tmax = std::max(tmax, hj.kpos[ts + i]);
    }
    krows_of(ts, tn, krows);
    vrows_of(ts, tn, vrows);
    for (std::int32_t b = 0; b < nb; ++b) {
      const std::size_t bi = static_cast<std::size_t>(b);
      if (ts >= end[bi] || tmin > hi[bi]) continue;  // after every row of the block
      const std::size_t r0 = static_cast<std::size_t>(b0 + b) * RB;
      float* a = acc + r0 * D;
      detail::score_tile<Arch, RB>(qs + r0 * D, krows, tn, D, s, krows, vrows, 0);
      const bool masked = tmax > lo[bi];
      block_state& bs = st[bi];
      for (std::int32_t g = 0; g < RB; ++g) {
        float* sg = s + g * TT;
        if (hj.bias)
          for (std::int32_t i = 0; i < tn; ++i) sg[i] += hj.bias[ts + i];
        if (masked) {
          const std::int32_t qp = rpos[r0 + static_cast<std::size_t>(g)];
          for (std::int32_t i = 0; i < tn; ++i)
            if (hj.kpos[ts + i] > qp) sg[i] = -INFINITY;
        }
        float mt = sg[0];
        for (std::int32_t i = 1; i < tn; ++i) mt = std::max(mt, sg[i]);
        const float m_new = std::max(bs.m[g], mt);
        if (m_new == -INFINITY) {  // nothing visible to this row yet
          std::fill(sg, sg + tn, 0.0f);
          continue;
        }
        if (m_new > bs.m[g]) {
          const float corr = std::exp(bs.m[g] - m_new);  // 0 on the first visible tile
          bs.l[g] *= corr;
          float* ag = a + static_cast<std::size_t>(g) * D;
          for (std::int32_t d = 0; d < D; ++d) ag[d] *= corr;
          bs.m[g] = m_new;
        }
        for (std::int32_t i = 0; i < tn; ++i) sg[i] -= m_new;
        exp_inplace<Arch>(sg, tn);  // masked: e^-inf = 0
        float l = 0.0f;
        for (std::int32_t i = 0; i < tn; ++i) l += sg[i];
        bs.l[g] += l;
      }
      detail::accumulate_tile<Arch, RB>(s, vrows, tn, D, a);
    }
  }
  for (std::int32_t b = 0; b < nb; ++b)
    for (std::int32_t g = 0; g < RB; ++g) {
      const std::size_t r = static_cast<std::size_t>(b0 + b) * RB + static_cast<std::size_t>(g);
      lsum[r] = st[static_cast<std::size_t>(b)].l[g];
      lmax[r] = st[static_cast<std::size_t>(b)].m[g];
    }
}

template <class C, class S, class = void>
struct has_layer_views : std::false_type {};
template <class C, class S>
struct has_layer_views<C, S,
                       std::void_t<decltype(std::declval<const C&>().layer(
                           std::declval<S>(), 0, std::declval<std::vector<typename C::view_type>&>()))>>
    : std::true_type {};

/// Whether a cache's layer views are read in place (plain rows): kv_cache<float|half|bfloat16>.
template <class Cache, class Seq, class = void>
struct reads_in_place : std::false_type {};
template <class Cache, class Seq>
struct reads_in_place<Cache, Seq, std::enable_if_t<has_layer_views<Cache, Seq>::value>>
    : std::bool_constant<detail::rows_are_plain_v<typename Cache::view_type>> {};

/// Whether a cache carries per-token log-weights over an inner store (merge::basic_merged_cache):
/// prefill then attends the inner store's rows with the log-weights as each token's bias.
template <class C, class S, class = void>
struct is_weighted : std::false_type {};
template <class C, class S>
struct is_weighted<C, S,
                   std::void_t<decltype(std::declval<const C&>().cache()),
                               decltype(std::declval<const C&>().log_weights(std::declval<S>(), 0, 0).data())>>
    : std::true_type {};

/// prefill_attention's body over a store's rows; bias[h] (or bias null) the per-token logit bias
/// of kv head h.
template <class Arch, class Cache, class Seq>
void run(const Cache& cache, Seq seq, std::int32_t layer, const float* q, std::int32_t num_queries,
         const std::int32_t* q_positions, std::int32_t num_q_heads, float* out, const decode_options& opt,
         const float* const* bias) {
  namespace pd = prefill_detail;
  const char* who = pd::api_name;
  detail::check_seq_layer(cache, seq, layer, who);
  const std::int32_t hkv = cache.config().num_kv_heads, D = cache.config().head_dim;
  KVC_EXPECTS_IN(who, num_queries > 0, "num_queries = ", num_queries, ", expected >= 1");
  KVC_EXPECTS_IN(who, num_q_heads > 0 && num_q_heads % hkv == 0, "num_q_heads = ", num_q_heads,
                 ", expected a positive multiple of num_kv_heads = ", hkv);
  KVC_EXPECTS_IN(who, q != nullptr && out != nullptr && q_positions != nullptr,
                 q == nullptr ? "q" : out == nullptr ? "out" : "q_positions", " is null, expected [",
                 q_positions == nullptr && q && out ? "num_queries" : "num_queries x num_q_heads x head_dim",
                 "] values");
  KVC_EXPECTS_IN(who, opt.probs == nullptr && opt.group_probs == nullptr,
                 opt.probs ? "opt.probs" : "opt.group_probs",
                 " is set, expected null (prefill attention returns no probabilities; decode_attention per "
                 "token does)");
  const std::size_t qn = static_cast<std::size_t>(num_queries) * num_q_heads * D;
  for (std::size_t i = 0; i < qn; ++i)
    KVC_EXPECTS_IN(who, std::isfinite(q[i]), "q[", i, "] = ", q[i], ", expected a finite query");
  std::int64_t held = 0;
  for (std::int32_t h = 0; h < hkv; ++h) held += cache.length(seq, layer, h);
  KVC_EXPECTS_IN(who, held > 0, "seq = ", seq, ", layer = ", layer,
                 " holds 0 tokens in all its kv heads, expected at least one token to attend to (append the "
                 "chunk's K/V to the layer before attending)");

  const std::int32_t G = num_q_heads / hkv;
  const std::int32_t rows = num_queries * G;
  const std::int32_t blocks = (rows + pd::row_block - 1) / pd::row_block;
  const std::size_t padded = static_cast<std::size_t>(blocks) * pd::row_block;
  const float scale = opt.scale != 0.0f ? opt.scale : 1.0f / std::sqrt(static_cast<float>(D));

  // Per kv head: scaled query rows (query-major: row r is query r / G, head h * G + r % G, so a
  // block spans few positions and its causal boundary is narrow), their positions, and the results.
  std::vector<float> qs(static_cast<std::size_t>(hkv) * padded * D, 0.0f);
  std::vector<std::int32_t> rpos(static_cast<std::size_t>(hkv) * padded);
  std::vector<float> acc(qs.size()), lsum(rpos.size()), lmax(rpos.size());
  std::vector<pd::head_job> hj(static_cast<std::size_t>(hkv));
  for (std::int32_t h = 0; h < hkv; ++h) {
    float* qh = qs.data() + static_cast<std::size_t>(h) * padded * D;
    std::int32_t* ph = rpos.data() + static_cast<std::size_t>(h) * padded;
    for (std::int32_t r = 0; r < rows; ++r) {
      const float* src = q + (static_cast<std::size_t>(r / G) * num_q_heads + static_cast<std::size_t>(h) * G + r % G) * D;
      for (std::int32_t d = 0; d < D; ++d) qh[static_cast<std::size_t>(r) * D + d] = src[d] * scale;
      ph[r] = q_positions[r / G];
    }
    for (std::size_t r = static_cast<std::size_t>(rows); r < padded; ++r) ph[r] = ph[rows - 1];  // padding rows
    pd::head_job& j = hj[static_cast<std::size_t>(h)];
    j.n = cache.length(seq, layer, h);
    j.kpos = cache.positions(seq, layer, h);
    j.sorted = std::is_sorted(j.kpos, j.kpos + j.n);
    j.bias = bias ? bias[h] : nullptr;
  }

  struct task {
    std::int32_t h, b0, b1;
  };
  std::vector<task> tasks;
  for (std::int32_t h = 0; h < hkv; ++h)
    if (hj[static_cast<std::size_t>(h)].n > 0)
      for (std::int32_t b = 0; b < blocks; b += pd::task_blocks) tasks.push_back({h, b, std::min(blocks, b + pd::task_blocks)});
  const std::int32_t nt = static_cast<std::int32_t>(tasks.size());
  auto run_all = [&](auto&& run) {
    if (opt.pool && nt > 1) opt.pool->parallel_for(nt, run);
    else
      for (std::int32_t i = 0; i < nt; ++i) run(i);
  };
  auto args = [&](const task& tk) {
    const std::size_t h = static_cast<std::size_t>(tk.h);
    return std::make_tuple(qs.data() + h * padded * D, rpos.data() + h * padded, acc.data() + h * padded * D,
                           lsum.data() + h * padded, lmax.data() + h * padded);
  };

  if constexpr (pd::reads_in_place<Cache, Seq>::value) {
    std::vector<typename Cache::view_type> buf;
    const auto heads = cache.layer(seq, layer, buf);
    using KView = std::decay_t<decltype(heads.keys(0))>;
    using VView = std::decay_t<decltype(heads.values(0))>;
    std::vector<KView> kv;
    std::vector<VView> vv;
    for (std::int32_t h = 0; h < hkv; ++h) {
      kv.push_back(heads.keys(h));
      vv.push_back(heads.values(h));
    }
    run_all([&](std::int32_t i) {
      const task& tk = tasks[static_cast<std::size_t>(i)];
      const std::size_t h = static_cast<std::size_t>(tk.h);
      const auto [qh, ph, ah, ls, lm] = args(tk);
      pd::attend_blocks<Arch>(pd::view_rows<KView>{&kv[h], heads.index(tk.h)}, pd::view_rows<VView>{&vv[h], heads.index(tk.h)},
                              hj[h], qh, ph, tk.b0, tk.b1, D, ah, ls, lm);
    });
  } else {
    // Decoded once per call, every head in parallel.
    std::vector<std::vector<float>> kf(static_cast<std::size_t>(hkv)), vf(static_cast<std::size_t>(hkv));
    auto gather = [&](std::int32_t h) {
      const std::size_t n = static_cast<std::size_t>(hj[static_cast<std::size_t>(h)].n) * D;
      kf[static_cast<std::size_t>(h)].resize(n);
      vf[static_cast<std::size_t>(h)].resize(n);
      if (n) cache.gather(seq, layer, h, kf[static_cast<std::size_t>(h)].data(), vf[static_cast<std::size_t>(h)].data());
    };
    if (opt.pool && hkv > 1) opt.pool->parallel_for(hkv, gather);
    else
      for (std::int32_t h = 0; h < hkv; ++h) gather(h);
    run_all([&](std::int32_t i) {
      const task& tk = tasks[static_cast<std::size_t>(i)];
      const std::size_t h = static_cast<std::size_t>(tk.h);
      const auto [qh, ph, ah, ls, lm] = args(tk);
      pd::attend_blocks<Arch>(pd::float_rows{kf[h].data(), D}, pd::float_rows{vf[h].data(), D}, hj[h], qh, ph, tk.b0,
                              tk.b1, D, ah, ls, lm);
    });
  }

  for (std::int32_t h = 0; h < hkv; ++h) {
    const std::size_t base = static_cast<std::size_t>(h) * padded;
    const bool empty = hj[static_cast<std::size_t>(h)].n == 0;
    for (std::int32_t r = 0; r < rows; ++r) {
      const std::size_t qh = static_cast<std::size_t>(r / G) * num_q_heads + static_cast<std::size_t>(h) * G + r % G;
      const float l = empty ? 0.0f : lsum[base + r];
      const float* a = acc.data() + (base + r) * D;
      float* o = out + qh * D;
      if (l > 0.0f) {
        const float inv = 1.0f / l;
        for (std::int32_t d = 0; d < D; ++d) o[d] = a[d] * inv;
      } else {
        std::fill(o, o + D, 0.0f);
      }
      if (opt.lse) opt.lse[qh] = l > 0.0f ? lmax[base + r] + std::log(l) : -INFINITY;
    }
  }
}

}  // namespace prefill_detail

/// Causal prefill attention for one sequence and one layer.
/// \tparam Cache  a kvc cache: config(), length/positions/gather(seq, layer, head) (kv_cache,
///                quant_cache, mixed_precision_cache, runtime::any_cache); kv_cache's plain layers
///                are read in place. A merged cache (merge::basic_merged_cache over any of them)
///                attends its store's rows with each token's log-weight added to its logit, so a
///                merged token carries its members' mass in prefill as in decode
/// \param q            [num_queries][num_q_heads][head_dim] queries (RoPE applied when keys are
///                     stored rotated), already scaled by nothing: opt.scale (0: 1/sqrt(head_dim))
///                     applies
/// \param q_positions  [num_queries] each query's position: it attends to the tokens of its kv
///                     head whose original position is <= it (append the chunk's K/V first)
/// \param out          [num_queries][num_q_heads][head_dim]; a row with no visible token is zeros
/// \param opt          scale, pool, lse ([num_queries][num_q_heads], natural log, -inf for a row
///                     with no visible token); probs and group_probs must be null (decode_attention
///                     per token gives them); split_tokens is not used
/// \pre num_q_heads is a multiple of num_kv_heads; q finite; the layer holds a token (kvc::error)
template <class Arch = default_arch, class Cache, class Seq>
void prefill_attention(const Cache& cache, Seq seq, std::int32_t layer, const float* q, std::int32_t num_queries,
                       const std::int32_t* q_positions, std::int32_t num_q_heads, float* out,
                       const decode_options& opt = {}) {
  if constexpr (prefill_detail::is_weighted<Cache, Seq>::value) {
    detail::check_seq_layer(cache, seq, layer, prefill_detail::api_name);
    std::vector<const float*> bias(static_cast<std::size_t>(cache.config().num_kv_heads));
    for (std::int32_t h = 0; h < cache.config().num_kv_heads; ++h)
      bias[static_cast<std::size_t>(h)] = cache.log_weights(seq, layer, h).data();
    prefill_detail::run<Arch>(cache.cache(), seq, layer, q, num_queries, q_positions, num_q_heads, out, opt, bias.data());
  } else {
    prefill_detail::run<Arch>(cache, seq, layer, q, num_queries, q_positions, num_q_heads, out, opt, nullptr);
  }
}

KVC_END_ISA_NAMESPACE
}  // namespace cpu
KVC_END_NAMESPACE
