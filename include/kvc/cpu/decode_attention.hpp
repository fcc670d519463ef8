// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// CPU decode attention: one query token per query head against a paged (or any) KV cache.
/// Online softmax over tiles of tokens, GQA (the G query heads of a group read each K/V row once),
/// split-K over token ranges with an exact merge of the partial softmax states, threads from a
/// caller-supplied pool. Reads plain rows with xsimd when the layout keeps a head's dim axis
/// contiguous; any other layout or accessor goes through element access.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include <kvc/attention/options.hpp>
#include <kvc/cpu/simd.hpp>
#include <kvc/error.hpp>
#include <kvc/parallel/thread_pool.hpp>
#include <kvc/view/accessor.hpp>

KVC_BEGIN_NAMESPACE
namespace cpu {
namespace detail {

/// Tokens scored per online-softmax step. 64 tokens x 8 heads of scores stay in L1 and amortise
/// the rescale of the accumulators; 32 and 128 measured within noise of it (bench_decode, fp16
/// 32/8/128 at 32k, 2026-11).
inline constexpr std::int32_t tile_tokens = 64;
/// Query heads processed together; larger groups run in blocks of this size.
inline constexpr std::int32_t max_group = 8;

/// Partial softmax state of G query heads over a token range.
struct partial {
  float m[max_group];
  float l[max_group];
  float* acc;  // [G][D]
};

template <class View>
inline constexpr bool rows_are_plain_v = is_plain_accessor_v<typename View::accessor_type> &&
                                         View::mapping_type::dim_contiguous;

/// Calls fn(i, row) for tokens t0..t1 of head hi, row being a pointer to head_dim elements:
/// the stored ones for plain row layouts, a float copy otherwise.
template <class View, class Fn>
KVC_FORCEINLINE void for_each_row(const View& v, std::int32_t hi, std::int32_t t0, std::int32_t t1,
                                  float* scratch, Fn&& fn) {
  if constexpr (rows_are_plain_v<View>) {
    const auto* base = v.data_handle();
    std::int32_t t = t0;
    while (t < t1) {
      const auto r = v.run(t, hi);
      const std::int32_t len = std::min<std::int32_t>(static_cast<std::int32_t>(r.length), t1 - t);
      const auto* row = base + r.offset;
      for (std::int32_t i = 0; i < len; ++i, row += r.token_stride) fn(t - t0 + i, row);
      t += len;
    }
  } else {
    const std::int32_t D = static_cast<std::int32_t>(v.extent(2));
    for (std::int32_t t = t0; t < t1; ++t) {
      for (std::int32_t d = 0; d < D; ++d) scratch[d] = static_cast<float>(v(t, hi, d));
      fn(t - t0, static_cast<const float*>(scratch));
    }
  }
}

/// s[g * stride] = q_g . row for the G heads of a group.
template <class Arch, std::int32_t G, class T>
KVC_FORCEINLINE void dot_group(const float* q, const T* row, std::int32_t D, float* s, std::int32_t stride) noexcept {
  constexpr std::int32_t W = static_cast<std::int32_t>(fbatch<Arch>::size);
  fbatch<Arch> acc[G];
  for (std::int32_t g = 0; g < G; ++g) acc[g] = fbatch<Arch>(0.0f);
  std::int32_t d = 0;
  for (; d + W <= D; d += W) {
    const auto k = load_as_float<Arch>(row + d);
    for (std::int32_t g = 0; g < G; ++g) acc[g] = xsimd::fma(fbatch<Arch>::load_unaligned(q + g * D + d), k, acc[g]);
  }
  for (std::int32_t g = 0; g < G; ++g) {
    float r = cpu::reduce_add<Arch>(acc[g]);
    for (std::int32_t e = d; e < D; ++e) r += q[g * D + e] * static_cast<float>(row[e]);
    s[g * stride] = r;
  }
}

/// acc_g += p[g * stride] * row for the G heads of a group.
template <class Arch, std::int32_t G, class T>
KVC_FORCEINLINE void axpy_group(const float* p, std::int32_t stride, const T* row, std::int32_t D, float* acc) noexcept {
  constexpr std::int32_t W = static_cast<std::int32_t>(fbatch<Arch>::size);
  fbatch<Arch> pb[G];
  for (std::int32_t g = 0; g < G; ++g) pb[g] = fbatch<Arch>(p[g * stride]);
  std::int32_t d = 0;
  for (; d + W <= D; d += W) {
    const auto v = load_as_float<Arch>(row + d);
    for (std::int32_t g = 0; g < G; ++g) {
      float* a = acc + g * D + d;
      xsimd::fma(pb[g], v, fbatch<Arch>::load_unaligned(a)).store_unaligned(a);
    }
  }
  for (; d < D; ++d)
    for (std::int32_t g = 0; g < G; ++g) acc[g * D + d] += p[g * stride] * static_cast<float>(row[d]);
}

/// Attention of G pre-scaled query heads over tokens [t0, t1) of head hi. Updates st; when raw
/// is non-null, writes the scaled scores to raw[g * raw_stride + t].
template <class Arch, std::int32_t G, class KView, class VView>
void attend_range(const KView& K, const VView& V, std::int32_t hi, std::int32_t t0, std::int32_t t1,
                  const float* q, std::int32_t D, partial& st, float* raw, std::int32_t raw_stride,
                  float* scratch) {
  alignas(64) float s[G * tile_tokens];
  for (std::int32_t ts = t0; ts < t1; ts += tile_tokens) {
    const std::int32_t tn = std::min(tile_tokens, t1 - ts);
    for_each_row(K, hi, ts, ts + tn, scratch,
                 [&](std::int32_t i, const auto* row) { dot_group<Arch, G>(q, row, D, s + i, tile_tokens); });
    for (std::int32_t g = 0; g < G; ++g) {
      float* sg = s + g * tile_tokens;
      if (raw) std::copy(sg, sg + tn, raw + static_cast<std::size_t>(g) * raw_stride + ts);
      float mt = sg[0];
      for (std::int32_t i = 1; i < tn; ++i) mt = std::max(mt, sg[i]);
      const float m_new = std::max(st.m[g], mt);
      if (m_new > st.m[g]) {
        const float corr = std::exp(st.m[g] - m_new);  // 0 on the first tile
        st.l[g] *= corr;
        float* a = st.acc + g * D;
        for (std::int32_t d = 0; d < D; ++d) a[d] *= corr;
        st.m[g] = m_new;
      }
      for (std::int32_t i = 0; i < tn; ++i) sg[i] -= m_new;
      exp_inplace<Arch>(sg, tn);
      float l = 0.0f;
      for (std::int32_t i = 0; i < tn; ++i) l += sg[i];
      st.l[g] += l;
    }
    for_each_row(V, hi, ts, ts + tn, scratch,
                 [&](std::int32_t i, const auto* row) { axpy_group<Arch, G>(s + i, tile_tokens, row, D, st.acc); });
  }
}

template <class Arch, class KView, class VView>
void attend_range_dispatch(std::int32_t G, const KView& K, const VView& V, std::int32_t hi, std::int32_t t0,
                           std::int32_t t1, const float* q, std::int32_t D, partial& st, float* raw,
                           std::int32_t raw_stride, float* scratch) {
  switch (G) {
#define KVC_CASE(N) \
  case N: return attend_range<Arch, N>(K, V, hi, t0, t1, q, D, st, raw, raw_stride, scratch);
    KVC_CASE(1) KVC_CASE(2) KVC_CASE(3) KVC_CASE(4) KVC_CASE(5) KVC_CASE(6) KVC_CASE(7) KVC_CASE(8)
#undef KVC_CASE
    default: KVC_ASSERT(false);
  }
}

}  // namespace detail

/// Decode attention for one sequence and one layer.
/// \tparam Heads  num_kv_heads(), head_dim(), keys(h), values(h), index(h): a kv_cache layer
///                (kv_cache::layer) or kvc::same_heads over one multi-head engine view
/// \param q    [num_q_heads][head_dim] queries (RoPE already applied when keys are stored rotated)
/// \param out  [num_q_heads][head_dim]
/// \pre num_q_heads is a multiple of num_kv_heads; q is finite (checked: kvc::error)
template <class Arch = default_arch, class Heads>
void decode_attention(const Heads& heads, const float* q, std::int32_t num_q_heads, float* out,
                      const decode_options& opt = {}) {
  using KView = std::decay_t<decltype(heads.keys(0))>;
  using VView = std::decay_t<decltype(heads.values(0))>;
  static_assert(std::is_same<typename KView::memory_space, host_memory>::value &&
                    std::is_same<typename VView::memory_space, host_memory>::value,
                "kvc::cpu::decode_attention: these views live in device memory; include <kvc/cuda.cuh> "
                "in a .cu file, link kvc::cuda and call kvc::cuda::decode_attention");
  const std::int32_t hkv = heads.num_kv_heads(), D = heads.head_dim();
  KVC_EXPECTS(hkv > 0, "num_kv_heads = ", hkv, ", expected > 0");
  KVC_EXPECTS(num_q_heads > 0 && num_q_heads % hkv == 0, "num_q_heads = ", num_q_heads,
              ", expected a positive multiple of num_kv_heads = ", hkv);
  KVC_EXPECTS(q != nullptr && out != nullptr, "q or out is null");
  for (std::int32_t i = 0; i < num_q_heads * D; ++i)
    KVC_EXPECTS(std::isfinite(q[i]), "q[", i, "] = ", q[i], ", expected a finite query");
  const std::int32_t G = num_q_heads / hkv;
  std::int32_t longest = 0;
  for (std::int32_t h = 0; h < hkv; ++h) {
    KVC_EXPECTS(heads.keys(h).extent(0) == heads.values(h).extent(0), "head ", h, ": ", heads.keys(h).extent(0),
                " keys but ", heads.values(h).extent(0), " values");
    KVC_EXPECTS(heads.keys(h).extent(2) == D && heads.values(h).extent(2) == D, "head ", h,
                ": view head_dim differs from head_dim = ", D);
    longest = std::max<std::int32_t>(longest, static_cast<std::int32_t>(heads.keys(h).extent(0)));
  }
  const bool want_probs = opt.probs || opt.group_probs;
  KVC_EXPECTS(!want_probs || opt.probs_stride >= longest, "probs_stride = ", opt.probs_stride,
              ", expected >= the longest stream (", longest, " tokens)");
  const float scale = opt.scale != 0.0f ? opt.scale : 1.0f / std::sqrt(static_cast<float>(D));

  // Scaled queries, so scores come out of the dot product ready for the softmax.
  std::vector<float> qs(static_cast<std::size_t>(num_q_heads) * D);
  for (std::size_t i = 0; i < qs.size(); ++i) qs[i] = q[i] * scale;
  // Raw scores for the optional probability outputs: [num_q_heads][longest].
  std::vector<float> raw;
  float* raw_base = nullptr;
  std::int32_t raw_stride = 0;
  if (want_probs) {
    if (opt.probs) {
      raw_base = opt.probs;
      raw_stride = opt.probs_stride;
    } else {
      raw.resize(static_cast<std::size_t>(num_q_heads) * longest);
      raw_base = raw.data();
      raw_stride = longest;
    }
  }

  // Split-K plan: tasks are (kv head, group block, token range).
  const std::int32_t threads = opt.pool ? opt.pool->size() : 1;
  std::int64_t total = 0;
  for (std::int32_t h = 0; h < hkv; ++h) total += heads.keys(h).extent(0);
  std::int32_t chunk = opt.split_tokens;
  if (chunk <= 0) {
    // Serial: no split. Threaded: about 4 tasks per thread, never below 512 tokens a task, so the
    // merge and task overhead stay under 1% of the work.
    chunk = threads == 1 ? std::numeric_limits<std::int32_t>::max()
                         : static_cast<std::int32_t>(std::max<std::int64_t>(512, (total + 4 * threads - 1) / (4 * threads)));
  }
  struct task {
    std::int32_t h, g0, gn, t0, t1;
  };
  std::vector<task> tasks;
  for (std::int32_t h = 0; h < hkv; ++h) {
    const std::int32_t n = static_cast<std::int32_t>(heads.keys(h).extent(0));
    for (std::int32_t g0 = 0; g0 < G; g0 += detail::max_group) {
      const std::int32_t gn = std::min(detail::max_group, G - g0);
      if (n == 0) tasks.push_back({h, g0, gn, 0, 0});
      for (std::int32_t t0 = 0; t0 < n; t0 += chunk) tasks.push_back({h, g0, gn, t0, static_cast<std::int32_t>(std::min<std::int64_t>(n, std::int64_t{t0} + chunk))});
    }
  }
  const std::size_t nt = tasks.size();
  std::vector<float> accs(nt * detail::max_group * static_cast<std::size_t>(D), 0.0f);
  std::vector<detail::partial> parts(nt);
  auto run = [&](std::int32_t i) {
    const task& tk = tasks[static_cast<std::size_t>(i)];
    detail::partial& st = parts[static_cast<std::size_t>(i)];
    st.acc = accs.data() + static_cast<std::size_t>(i) * detail::max_group * D;
    for (std::int32_t g = 0; g < detail::max_group; ++g) {
      st.m[g] = -INFINITY;
      st.l[g] = 0.0f;
    }
    if (tk.t1 <= tk.t0) return;
    std::vector<float> scratch(detail::rows_are_plain_v<KView> && detail::rows_are_plain_v<VView> ? 0 : D);
    const std::int32_t qh0 = tk.h * G + tk.g0;
    detail::attend_range_dispatch<Arch>(tk.gn, heads.keys(tk.h), heads.values(tk.h), heads.index(tk.h), tk.t0,
                                        tk.t1, qs.data() + static_cast<std::size_t>(qh0) * D, D, st,
                                        raw_base ? raw_base + static_cast<std::size_t>(qh0) * raw_stride : nullptr,
                                        raw_stride, scratch.data());
  };
  if (opt.pool && nt > 1) opt.pool->parallel_for(static_cast<std::int32_t>(nt), run);
  else
    for (std::size_t i = 0; i < nt; ++i) run(static_cast<std::int32_t>(i));

  // Exact merge of the partial states of each (head, group block), in token order.
  std::vector<float> lse(static_cast<std::size_t>(num_q_heads), -INFINITY);
  for (std::size_t i = 0; i < nt;) {
    std::size_t j = i;
    while (j < nt && tasks[j].h == tasks[i].h && tasks[j].g0 == tasks[i].g0) ++j;
    const task& tk = tasks[i];
    for (std::int32_t g = 0; g < tk.gn; ++g) {
      const std::int32_t qh = tk.h * G + tk.g0 + g;
      float M = -INFINITY;
      for (std::size_t k = i; k < j; ++k) M = std::max(M, parts[k].m[g]);
      float* o = out + static_cast<std::size_t>(qh) * D;
      std::fill(o, o + D, 0.0f);
      if (M == -INFINITY) continue;  // empty stream: output 0, lse -inf
      float L = 0.0f;
      for (std::size_t k = i; k < j; ++k) {
        if (parts[k].m[g] == -INFINITY) continue;
        const float w = std::exp(parts[k].m[g] - M);
        L += parts[k].l[g] * w;
        const float* a = parts[k].acc + g * D;
        for (std::int32_t d = 0; d < D; ++d) o[d] += w * a[d];
      }
      const float inv = 1.0f / L;
      for (std::int32_t d = 0; d < D; ++d) o[d] *= inv;
      lse[static_cast<std::size_t>(qh)] = M + std::log(L);
    }
    i = j;
  }
  if (opt.lse) std::copy(lse.begin(), lse.end(), opt.lse);
  if (want_probs) {
    for (std::int32_t h = 0; h < hkv; ++h) {
      const std::int32_t n = static_cast<std::int32_t>(heads.keys(h).extent(0));
      float* gp = opt.group_probs ? opt.group_probs + static_cast<std::size_t>(h) * opt.probs_stride : nullptr;
      if (gp) std::fill(gp, gp + n, 0.0f);
      for (std::int32_t g = 0; g < G; ++g) {
        const std::int32_t qh = h * G + g;
        float* r = raw_base + static_cast<std::size_t>(qh) * raw_stride;
        const float l = lse[static_cast<std::size_t>(qh)];
        for (std::int32_t t = 0; t < n; ++t) r[t] -= l;
        exp_inplace<Arch>(r, n);
        if (gp)
          for (std::int32_t t = 0; t < n; ++t) gp[t] += r[t];
      }
    }
  }
}

/// Decode attention over one layer of one sequence of a kvc cache (any cache with
/// `layer(seq, layer, buffer)`).
template <class Arch = default_arch, class Cache, class Seq,
          class = decltype(std::declval<const Cache&>().layer(Seq{}, 0, std::declval<std::vector<typename Cache::view_type>&>()))>
void decode_attention(const Cache& cache, Seq seq, std::int32_t layer, const float* q, std::int32_t num_q_heads,
                      float* out, const decode_options& opt = {}) {
  std::vector<typename Cache::view_type> buf;
  decode_attention<Arch>(cache.layer(seq, layer, buf), q, num_q_heads, out, opt);
}

}  // namespace cpu
KVC_END_NAMESPACE
