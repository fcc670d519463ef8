// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Host/device shared math of split-K (flash-decoding) decode attention, in a plain header so the
/// host compiler builds it and the ordinary CPU test suite checks it; the CUDA kernels
/// (`<kvc/cuda/...>`) call the very same functions on the device:
///  - the partial softmax state (m, l, o) of a token range, its online update and its exact merge;
///  - the split-K plan: which (stream, query-head block, token range) each thread block attends
///    and which partial states are merged into which output rows;
///  - the index math of paged rows shared by kvc's per-stream pages and the vLLM/FlashInfer
///    layouts (one page-table lookup per row; no division).
///
/// A *stream* is one (sequence, kv head): stream s = seq * num_kv_heads + kv_head. Its G query
/// heads are the query rows s * G + g, which is the row-major [batch][num_q_heads] order of the
/// queries (query head h * G + g belongs to kv head h, the Llama GQA convention).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include <kvc/config.hpp>
#include <kvc/error.hpp>

KVC_BEGIN_NAMESPACE
namespace splitk {

// ---- partial softmax states ---------------------------------------------------------------

/// e^x with e^-inf = 0. On the device __expf (ex2.approx of x log2 e: two instructions against
/// expf's ~10, paid per token and query head): x <= 0 here, and its error, (2 + 1.16 |x|) ulp, is
/// ~4e-6 relative at |x| = 30: under the CUDA tests' tolerance (2e-5 of max |V|) and far under
/// fp16 storage's 5e-4.
KVC_HOST_DEVICE float exp_or_zero(float x) noexcept {
#if defined(__CUDA_ARCH__)
  return x == -INFINITY ? 0.0f : __expf(x);
#else
  return x == -INFINITY ? 0.0f : std::exp(x);
#endif
}

/// Running max m and running sum l = sum_t e^(s_t - m) of one query head over a token range; the
/// matching accumulator o = sum_t e^(s_t - m) v_t is kept by the caller (it is D wide). An empty
/// range is (m = -inf, l = 0, o = 0).
struct softmax_state {
  float m = -INFINITY;
  float l = 0.0f;
};

/// Factors of one online step: o <- o * corr + p * v_t, l <- l * corr + p.
struct online_step {
  float corr;
  float p;
};

/// Adds score s to the state; returns the factors the caller applies to its accumulator.
/// \pre s is finite (scores of finite queries and keys are)
KVC_HOST_DEVICE online_step push_score(softmax_state& st, float s) noexcept {
  const float m_new = s > st.m ? s : st.m;
  const float corr = exp_or_zero(st.m - m_new);  // 0 for the first score (m = -inf)
  const float p = exp_or_zero(s - m_new);
  st.l = st.l * corr + p;
  st.m = m_new;
  return {corr, p};
}

/// Adds n scores at once (one tile): one correction for the tile instead of one per score.
/// Scores of -inf (masked tokens) get p = 0. Writes p[i] and returns the factor for the
/// accumulator (1 when the state stays empty).
KVC_HOST_DEVICE float push_scores(softmax_state& st, const float* s, int n, float* p) noexcept {
  float m_new = st.m;
  for (int i = 0; i < n; ++i) m_new = s[i] > m_new ? s[i] : m_new;
  if (m_new == -INFINITY) {
    for (int i = 0; i < n; ++i) p[i] = 0.0f;
    return 1.0f;
  }
  const float corr = exp_or_zero(st.m - m_new);
  float l = st.l * corr;
  for (int i = 0; i < n; ++i) {
    p[i] = exp_or_zero(s[i] - m_new);
    l += p[i];
  }
  st.l = l;
  st.m = m_new;
  return corr;
}

/// Weights of an exact merge of states a and b: o = wa * o_a + wb * o_b, with the merged state
/// written to `out` (which may alias a). Two empty states merge to an empty state (weights 0).
struct merge_weights {
  float wa;
  float wb;
};
KVC_HOST_DEVICE merge_weights merge_states(const softmax_state& a, const softmax_state& b,
                                           softmax_state& out) noexcept {
  const float m = a.m > b.m ? a.m : b.m;
  if (m == -INFINITY) {
    out = softmax_state{};
    return {0.0f, 0.0f};
  }
  const float wa = exp_or_zero(a.m - m), wb = exp_or_zero(b.m - m);
  out.l = a.l * wa + b.l * wb;
  out.m = m;
  return {wa, wb};
}

/// log-sum-exp of the scores the state has seen (natural log); -inf when empty.
KVC_HOST_DEVICE float state_lse(const softmax_state& st) noexcept {
  if (st.l <= 0.0f) return -INFINITY;
#if defined(__CUDA_ARCH__)
  return st.m + logf(st.l);
#else
  return st.m + std::log(st.l);
#endif
}

// ---- split-K plan --------------------------------------------------------------------------

/// Query heads attended together by one work item: a group's heads share one read of K and V;
/// larger groups run in blocks of this size (each block re-reads the rows, as on the CPU).
inline constexpr std::int32_t max_group_block = 8;

/// One thread block's work: query heads [g0, g0 + gn) of stream `stream` over tokens [t0, t1) of
/// segment `seg`. `part` >= 0 names the partial state it writes (merged later by a merge job);
/// part == -1 means the item covers the whole stream and writes the output rows directly.
struct work_item {
  std::int32_t stream;
  std::int32_t g0, gn;
  std::int32_t t0, t1;
  std::int32_t part;
  std::int32_t seg;
};

/// Output rows s * G + g0 .. + gn of stream s come from partial states [first, first + count).
struct merge_job {
  std::int32_t stream;
  std::int32_t g0, gn;
  std::int32_t first, count;
};

/// What the planner knows about the device. The defaults describe an H100 (132 SMs) running the
/// decode kernel at 4 blocks per SM; the CUDA launcher fills them from cudaGetDeviceProperties and
/// cudaOccupancyMaxActiveBlocksPerMultiprocessor.
struct split_params {
  std::int32_t num_sms = 132;
  std::int32_t blocks_per_sm = 4;
  /// Waves of blocks to aim for: 1 fills the machine once; more evens out ragged lengths at the
  /// cost of more partial states.
  std::int32_t waves = 1;
  /// No chunk is shorter than this: below ~256 tokens the partial write and the merge cost more
  /// than the parallelism returns (flash-decoding and FlashInfer use 256-512).
  std::int32_t min_chunk = 256;
  /// Chunks are rounded up to a multiple of this (the kernel's tokens per block step).
  std::int32_t align = 64;
  /// > 0: use exactly this chunk (tests use it to force many splits).
  std::int32_t chunk_override = 0;
};

struct split_plan {
  std::vector<work_item> items;
  std::vector<merge_job> merges;
  std::int32_t num_partials = 0;  ///< partial states to allocate, each gn <= max_group_block heads
  std::int32_t chunk = 0;         ///< tokens per split (INT32_MAX: no split)
};

/// Chunk length for `total` tokens over `units` (stream, head-block) pairs, `longest` the longest
/// stream: no split while the units alone fill the target block count; otherwise the total work
/// spread over target blocks, never below min_chunk, rounded up to align.
inline std::int32_t choose_chunk(std::int64_t total, std::int64_t units, std::int32_t longest, const split_params& p) {
  if (p.chunk_override > 0) return p.chunk_override;
  const std::int64_t target = std::int64_t{p.num_sms} * p.blocks_per_sm * std::max(1, p.waves);
  if (units >= target || longest <= p.min_chunk) return std::numeric_limits<std::int32_t>::max();
  std::int64_t chunk = (total + target - 1) / target;
  chunk = std::max<std::int64_t>(chunk, p.min_chunk);
  chunk = (chunk + p.align - 1) / p.align * p.align;
  return chunk >= longest ? std::numeric_limits<std::int32_t>::max() : static_cast<std::int32_t>(chunk);
}

/// Plans the work items of one decode step.
/// \param lengths      [num_streams] tokens of each stream (>= 0)
/// \param G            query heads per kv head (>= 1)
/// \param seg_lengths  null, or [num_streams][num_segs] lengths of consecutive segments of each
///                     stream summing to lengths[s] (a quantized stream's sinks, quantized pages
///                     and residual window); no item crosses a segment boundary
/// \throws kvc::error on a negative length, G < 1 or segments that do not sum to the length
inline split_plan plan_splits(const std::int32_t* lengths, std::int32_t num_streams, std::int32_t G,
                              const split_params& p = {}, const std::int32_t* seg_lengths = nullptr,
                              std::int32_t num_segs = 1) {
  KVC_EXPECTS(num_streams >= 0, "num_streams = ", num_streams, ", expected >= 0");
  KVC_EXPECTS(G >= 1, "G = ", G, ", expected >= 1 query heads per kv head");
  KVC_EXPECTS(num_streams == 0 || lengths != nullptr, "lengths is null for ", num_streams, " streams");
  KVC_EXPECTS(num_segs >= 1, "num_segs = ", num_segs, ", expected >= 1");
  KVC_EXPECTS(p.min_chunk >= 1 && p.align >= 1 && p.num_sms >= 1 && p.blocks_per_sm >= 1,
              "split_params: min_chunk = ", p.min_chunk, ", align = ", p.align, ", num_sms = ", p.num_sms,
              ", blocks_per_sm = ", p.blocks_per_sm, ", expected all >= 1");
  std::int64_t total = 0;
  std::int32_t longest = 0;
  for (std::int32_t s = 0; s < num_streams; ++s) {
    KVC_EXPECTS(lengths[s] >= 0, "lengths[", s, "] = ", lengths[s], ", expected >= 0");
    if (seg_lengths) {
      std::int64_t sum = 0;
      for (std::int32_t k = 0; k < num_segs; ++k) {
        const std::int32_t n = seg_lengths[static_cast<std::size_t>(s) * num_segs + k];
        KVC_EXPECTS(n >= 0, "seg_lengths[", s, "][", k, "] = ", n, ", expected >= 0");
        sum += n;
      }
      KVC_EXPECTS(sum == lengths[s], "stream ", s, ": segments sum to ", sum, ", expected lengths[", s,
                  "] = ", lengths[s]);
    }
    total += lengths[s];
    longest = std::max(longest, lengths[s]);
  }
  const std::int32_t blocks = (G + max_group_block - 1) / max_group_block;
  split_plan plan;
  plan.chunk = choose_chunk(total, std::int64_t{num_streams} * blocks, longest, p);
  for (std::int32_t s = 0; s < num_streams; ++s) {
    for (std::int32_t g0 = 0; g0 < G; g0 += max_group_block) {
      const std::int32_t gn = std::min(max_group_block, G - g0);
      const std::size_t first_item = plan.items.size();
      std::int32_t seg_start = 0;
      for (std::int32_t k = 0; k < num_segs; ++k) {
        const std::int32_t n = seg_lengths ? seg_lengths[static_cast<std::size_t>(s) * num_segs + k] : lengths[s];
        for (std::int32_t t0 = 0; t0 < n;) {
          const std::int32_t t1 = static_cast<std::int32_t>(std::min<std::int64_t>(n, std::int64_t{t0} + plan.chunk));
          plan.items.push_back({s, g0, gn, seg_start + t0, seg_start + t1, 0, k});
          t0 = t1;
        }
        seg_start += n;
      }
      const std::size_t count = plan.items.size() - first_item;
      if (count == 0) {
        plan.items.push_back({s, g0, gn, 0, 0, -1, 0});  // empty stream: out = 0, lse = -inf
      } else if (count == 1) {
        plan.items[first_item].part = -1;
      } else {
        plan.merges.push_back({s, g0, gn, plan.num_partials, static_cast<std::int32_t>(count)});
        for (std::size_t i = first_item; i < plan.items.size(); ++i) plan.items[i].part = plan.num_partials++;
      }
    }
  }
  return plan;
}

// ---- paged rows ----------------------------------------------------------------------------

/// Where row (token t, head h) of one tensor (K or V) lives, for every paged layout kvc reads:
/// element offset = table[t >> shift] * page_stride + (t & (page_size - 1)) * token_stride
///                  + h * head_stride  (+ the tensor's own base offset, kept by the caller).
///  - kvc's store (one stream per table, K page then V page): page_stride = 2 P D (in elements
///    of T), token_stride = D, head_stride = 0, V at base + P D;
///  - vLLM NHD blocks [blocks][P][H][D]: page_stride = P H D, token_stride = H D, head_stride = D;
///  - HND blocks [blocks][H][P][D]: token_stride = D, head_stride = P D;
///  - FlashInfer's combined [pages][2][P][H][D]: page_stride = 2 P H D, V at base + P H D.
struct paged_rows {
  std::int64_t page_stride = 0;
  std::int64_t token_stride = 0;
  std::int64_t head_stride = 0;
  std::int32_t shift = 0;  ///< log2(page_size)

  KVC_HOST_DEVICE std::int32_t page_size() const noexcept { return std::int32_t{1} << shift; }
  KVC_HOST_DEVICE std::int64_t offset(const std::int32_t* table, std::int32_t t, std::int32_t h) const noexcept {
    return static_cast<std::int64_t>(table[t >> shift]) * page_stride +
           static_cast<std::int64_t>(t & ((std::int32_t{1} << shift) - 1)) * token_stride +
           static_cast<std::int64_t>(h) * head_stride;
  }
};

/// log2 of a power of two, with a clear error otherwise.
inline std::int32_t page_shift(std::int32_t page_size, const char* who) {
  KVC_EXPECTS(page_size > 0 && (page_size & (page_size - 1)) == 0, who, ": page_size = ", page_size,
              ", expected a power of two");
  std::int32_t s = 0;
  while ((std::int32_t{1} << s) < page_size) ++s;
  return s;
}

/// Rows of kvc's store: one table per stream, page = [K: P x D][V: P x D]; page_stride in
/// elements (the pool's page bytes / sizeof(T), which may exceed 2 P D for alignment).
inline paged_rows store_rows(std::int32_t page_size, std::int32_t head_dim, std::int64_t page_stride) {
  KVC_EXPECTS(head_dim > 0, "head_dim = ", head_dim, ", expected > 0");
  KVC_EXPECTS(page_stride >= 2 * std::int64_t{page_size} * head_dim, "page_stride = ", page_stride,
              ", expected >= 2 * page_size * head_dim = ", 2 * std::int64_t{page_size} * head_dim);
  return {page_stride, head_dim, 0, page_shift(page_size, "kvc::splitk::store_rows")};
}

/// Rows of an engine's multi-head pages in NHD ([P][H][D]) or HND ([H][P][D]) order.
inline paged_rows engine_rows(bool hnd, std::int32_t page_size, std::int32_t heads, std::int32_t head_dim,
                              std::int64_t page_stride) {
  KVC_EXPECTS(heads > 0 && head_dim > 0, "heads = ", heads, ", head_dim = ", head_dim, ", expected both > 0");
  const std::int64_t dense = std::int64_t{page_size} * heads * head_dim;
  KVC_EXPECTS(page_stride >= dense, "page_stride = ", page_stride, ", expected >= page_size * heads * head_dim = ",
              dense);
  const std::int32_t sh = page_shift(page_size, "kvc::splitk::engine_rows");
  if (hnd) return {page_stride, head_dim, std::int64_t{page_size} * head_dim, sh};
  return {page_stride, std::int64_t{heads} * head_dim, head_dim, sh};
}

}  // namespace splitk
KVC_END_NAMESPACE
