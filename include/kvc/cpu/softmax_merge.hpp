// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// The softmax steps of the CPU decode-attention backends: the online update of one head's state
/// by a tile of scores, the exact merge of the partial softmax states of split-K tasks, and
/// turning the raw scores kept for the scorers into probabilities once the final log-sum-exp is
/// known. Shared by the full-precision and the quantized kernels.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#include <kvc/attention/options.hpp>
#include <kvc/cpu/simd.hpp>

KVC_BEGIN_NAMESPACE
namespace cpu {
KVC_BEGIN_ISA_NAMESPACE  // compiled per ISA: docs/isa.md
namespace detail {

/// One online-softmax step of one head over the tn scores at s: raises the running maximum m to
/// cover them (rescaling l and acc[0, D) by e^(m_old - m_new)), leaves e^(s - m) in s and adds
/// their sum to l. Whole batches in registers, the tail scalar: per-score scalar loops were two
/// dependency chains of tn operations per head and tile (bench_decode fp16 32x8x128 one thread,
/// Intel AVX-512 VM 2026-12: 1.16x at 32k, 1.39x at 512 tokens; BM_quant_paired int8 0.60 ->
/// 0.68 of fp16). Pass a compile-time tn where it is one, so the batch loop unrolls.
template <class Arch>
KVC_FORCEINLINE void softmax_tile(float* s, std::int32_t tn, float& m, float& l, float* acc, std::int32_t D) noexcept {
  using B = fbatch<Arch>;
  constexpr std::int32_t W = static_cast<std::int32_t>(B::size);
  const std::int32_t whole = tn / W * W;
  float mt = s[0];
  if (whole > 0) {
    B mx = B::load_unaligned(s);
    for (std::int32_t i = W; i < whole; i += W) mx = xsimd::max(mx, B::load_unaligned(s + i));
    mt = reduce_max<Arch>(mx);
  }
  for (std::int32_t i = whole; i < tn; ++i) mt = std::max(mt, s[i]);
  const float m_new = std::max(m, mt);
  if (m_new > m) {
    const float corr = std::exp(m - m_new);  // 0 on the first tile
    l *= corr;
    for (std::int32_t d = 0; d < D; ++d) acc[d] *= corr;
    m = m_new;
  }
  const B mb(m_new);
  B ls(0.0f);
  for (std::int32_t i = 0; i < whole; i += W) {
    const B e = xsimd::exp(B::load_unaligned(s + i) - mb);
    ls += e;
    e.store_unaligned(s + i);
  }
  float sum = reduce_add<Arch>(ls);
  for (std::int32_t i = whole; i < tn; ++i) sum += (s[i] = std::exp(s[i] - m_new));
  l += sum;
}

/// Merges, for each run of tasks with the same (h, g0), the partial states parts[k] (members m[g],
/// l[g], acc [g][D]) into out[qh] = sum_k e^(m_k - M) acc_k / sum_k e^(m_k - M) l_k and
/// lse[qh] = M + log L. Empty streams give out = 0 and lse = -inf. post(o) runs on each finished
/// output row (a rotated value codec rotates it back there).
template <class Task, class Part, class Post>
void merge_partials(const Task* tasks, const Part* parts, std::size_t nt, std::int32_t G, std::int32_t D, float* out,
                    std::vector<float>& lse, Post&& post) {
  for (std::size_t i = 0; i < nt;) {
    std::size_t j = i;
    while (j < nt && tasks[j].h == tasks[i].h && tasks[j].g0 == tasks[i].g0) ++j;
    const Task& tk = tasks[i];
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
      post(o);
      lse[static_cast<std::size_t>(qh)] = M + std::log(L);
    }
    i = j;
  }
}

template <class Task, class Part, class Post>
void merge_partials(const std::vector<Task>& tasks, const std::vector<Part>& parts, std::int32_t G, std::int32_t D,
                    float* out, std::vector<float>& lse, Post&& post) {
  merge_partials(tasks.data(), parts.data(), tasks.size(), G, D, out, lse, std::forward<Post>(post));
}

/// raw[qh][t] (scaled scores) -> softmax probabilities in place, and their sum over each group
/// into opt.group_probs when asked. length(h) is kv head h's token count.
template <class Arch, class Length>
void finalize_probs(std::int32_t hkv, std::int32_t G, Length&& length, float* raw_base, std::int32_t raw_stride,
                    const std::vector<float>& lse, const decode_options& opt) {
  for (std::int32_t h = 0; h < hkv; ++h) {
    const std::int32_t n = length(h);
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

}  // namespace detail
KVC_END_ISA_NAMESPACE
}  // namespace cpu
KVC_END_NAMESPACE
