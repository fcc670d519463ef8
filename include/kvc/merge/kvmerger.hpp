// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// KVMerger (Wang, Jin, Yu, Zhang, "Model Tells You Where to Merge: Adaptive KV Cache Merging for
/// LLMs on Long-Context Tasks", arXiv 2407.08454, 2024). Its observation: within one sequence,
/// the keys of neighbouring tokens are often almost parallel (the paper ties it to RoPE), so a run
/// of such tokens can be stored as one token with little change to attention, where eviction
/// would have to drop all but one. The method has two parts, both here per (layer, kv head):
///
///  1. Merging-set identification (the paper's Algorithm 1, a greedy backward scan it calls a
///     variant of agglomerative clustering): walking from the last token to the first, token
///     t − 1 joins the set of token t while cos(k_{t−1}, k_t) > ε; otherwise a new set starts.
///     A merging set is therefore a maximal run of consecutive tokens whose adjacent keys all
///     pass the threshold (the scan's direction does not change the runs). Tokens the caller
///     protects never join a set and break runs: the paper keeps a small share of recent tokens
///     and of the tokens with the largest attention scores out of merging (H2O-style); here any
///     selection is passed as `protect` (a recent window, a kvc::evict top-k, or both).
///  2. Gaussian-kernel weighted merging: the pivot p of a set S is its token with the largest
///     accumulated attention score (the caller's `scores`; the first such token on ties), every
///     member gets g_i = exp(−‖k_i − k_p‖² / (2σ²)) (g_p = 1), and the set becomes one token at
///     the pivot's slot and position with key and value Σ w_i x_i, w_i = g_i / Σ_{j∈S} g_j.
///
/// Where kvc differs from the paper, and why:
///  - mass: the merged token carries the set's attention mass through merged_cache's log-weight,
///    lw = log Σ_{i∈S} exp(lw_i) (= log |S| on a first merge), so attention counts it |S| times
///    (kvc/store/merged_cache.hpp). The paper has no multiplicity; its value merge instead scales
///    the value weights by |S| (as third-party summaries of the paper describe it), which a
///    log-weight makes unnecessary: here keys and values share the normalised weights;
///  - a member that already stands for m tokens (an earlier merge) counts m times in the mean,
///    w_i·exp(lw_i) normalised (merged_cache's mean_weights::mass); with every lw = 0 (a first
///    merge) this is the paper's mean;
///  - σ: the paper gives an adaptive σ = Σ_i g_pi / (√2·|S|), which depends on the g_pi that σ
///    itself defines (a fixed point the text does not resolve, as its reviewers noted); its
///    ablation found a fixed σ ≈ 5 best, and reports its adaptive σ averaging about 5. Here σ is
///    a fixed option, default 5 (see kvmerger_options::sigma);
///  - the threshold test is strict (cos > ε: "exceeds"), a zero key has cosine 0 with anything
///    (the paper leaves it undefined), and the decisions are those of cosines in double
///    (kvmerger_plan takes float SIMD cosines and recomputes in double those within float's
///    error of ε; kvmerger_evict_plan computes them in double);
///  - adjacent pairs: the secondary sources reachable from here describe Algorithm 1 as linking
///    adjacent tokens; a reading that compares each token with the set's first (rightmost) token
///    would give tighter sets and is not implemented.
/// Sources: the paper's full text was not reachable from here (only its abstract); the rule
/// above, ε = 0.75 and σ ≈ 5 come from public reviews of its ICLR 2025 submission and from
/// summaries of the paper, not from its equations. Not here: the paper's layer policy (it leaves
/// the first two layers and the last one unmerged and sets per-layer compression ratios from the
/// similarity statistics; callers choose the layers), its proportions of protected tokens, the
/// scorer itself, and decode-time merging (the paper merges after prefill).
///
/// Cost per kv head: O(n·D) for the adjacent similarities plus O(Σ|S|·D) for the weights (in
/// double), then one merged_cache::merge_layer commit. Also here: kvmerger_evict_plan, the
/// merging sets at an eviction's budget (the evictor's kept set, its evicted tokens merged into
/// their set's best-scored kept token), which compares only the pairs of the runs that hold an
/// evicted token: O(Σ run·D), a few runs per decode-time step.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include <kvc/error.hpp>
#include <kvc/merge/key_similarity.hpp>
#include <kvc/store/merged_cache.hpp>

KVC_BEGIN_NAMESPACE
namespace merge {

struct kvmerger_options {
  /// ε: adjacent tokens whose keys have cosine similarity > ε are merged into one set; finite
  /// (ε >= 1 merges nothing). 0.75: the paper's experiments at both its 50% and 35% budgets (as
  /// reported by reviews of the paper; its text was not reachable here).
  float threshold = 0.75f;
  /// σ of the Gaussian kernel g_i = exp(−‖k_i − k_p‖² / (2σ²)), on the keys' own scale; finite,
  /// > 0. 5: the best fixed σ in the paper's σ ablation, which its adaptive σ averaged about (as
  /// reported by reviews of the paper; the adaptive formula is circular, see the file comment).
  float sigma = 5.0f;
  /// true (kvc's default): a merged set carries its members' attention mass (log-weight
  /// log Σ exp(lw_i)); false: the merged token weighs as its pivot alone (log-weight unchanged),
  /// same key and value: no multiplicity, as in the paper (which instead scales the value
  /// weights by |S|, not done here). docs/results.md compares the two.
  bool carry_mass = true;
};

/// One kv head's merging sets.
struct kvmerger_head_plan {
  /// One group per merging set of two or more tokens, ascending by first member: members the
  /// set's tokens ascending, target its pivot, weights the normalised Gaussian weights
  /// g_i / Σ g_j (they sum to 1).
  std::vector<merge_group> groups;
};

struct kvmerger_layer_plan {
  std::vector<kvmerger_head_plan> heads;  ///< one per kv head
  std::int64_t sets = 0;                  ///< merging sets of >= 2 tokens, all heads
  std::int64_t removed = 0;               ///< tokens the merges remove: Σ (|S| − 1), all heads
};

/// The Gaussian kernel g = exp(−‖k_t − k_p‖² / two_s2) in double (two_s2 = 2σ²): 1 for the pivot.
inline double kvmerger_kernel(const float* kt, const float* kp, std::size_t D, double two_s2) {
  double d2 = 0;
  for (std::size_t d = 0; d < D; ++d) {
    const double x = static_cast<double>(kt[d]) - static_cast<double>(kp[d]);
    d2 += x * x;
  }
  return std::exp(-d2 / two_s2);
}

namespace kvmerger_detail {
/// The checks of kvmerger_check_args but the keys': options, one score vector and one token list
/// per kv head (H of them).
inline void kvmerger_check_sizes(const char* who, std::size_t H, const std::vector<std::vector<float>>& scores,
                                 const std::vector<std::vector<std::int32_t>>& list, const char* name, const char* what,
                                 const kvmerger_options& o) {
  KVC_EXPECTS_IN(who, std::isfinite(o.threshold), "kvmerger_options.threshold = ", o.threshold,
                 ", expected a finite cosine-similarity threshold");
  KVC_EXPECTS_IN(who, std::isfinite(o.sigma) && o.sigma > 0.0f, "kvmerger_options.sigma = ", o.sigma,
                 ", expected a finite kernel width > 0");
  KVC_EXPECTS_IN(who, scores.size() == H, "scores.size() = ", scores.size(), ", expected keys.size() = ", H,
                 " (one score vector per kv head)");
  KVC_EXPECTS_IN(who, list.size() == H, name, ".size() = ", list.size(), ", expected keys.size() = ", H, " (", what,
                 ")");
}
/// One finite score per token and strictly increasing indices in range, kv head h holding n tokens.
inline void kvmerger_check_head(const char* who, std::size_t h, std::int64_t n, const std::vector<float>& scores,
                                const std::vector<std::int32_t>& list, const char* name) {
  KVC_EXPECTS_IN(who, static_cast<std::int64_t>(scores.size()) == n, "scores[", h, "].size() = ", scores.size(),
                 ", expected ", n, " (kv head ", h, " holds ", n, " tokens)");
  for (std::size_t i = 0; i < scores.size(); ++i)
    KVC_EXPECTS_IN(who, std::isfinite(scores[i]), "scores[", h, "][", i, "] = ", scores[i], ", expected a finite score");
  similarity::check_token_list(who, name, h, list, n);
}
}  // namespace kvmerger_detail

/// The checks kvmerger_plan and kvmerger_evict_plan share, in their order: options, one score
/// vector and one token list (`list`, named `name`, meaning `what`) per kv head, finite keys,
/// one finite score per token, strictly increasing indices in range.
inline void kvmerger_check_args(const char* who, const std::vector<std::vector<float>>& keys, std::int32_t head_dim,
                                const std::vector<std::vector<float>>& scores,
                                const std::vector<std::vector<std::int32_t>>& list, const char* name, const char* what,
                                const kvmerger_options& o) {
  kvmerger_detail::kvmerger_check_sizes(who, keys.size(), scores, list, name, what, o);
  similarity::check_layer_keys(who, keys, head_dim);
  const std::size_t D = static_cast<std::size_t>(head_dim);
  for (std::size_t h = 0; h < keys.size(); ++h)
    kvmerger_detail::kvmerger_check_head(who, h, static_cast<std::int64_t>(keys[h].size() / D), scores[h], list[h], name);
}

/// KVMerger's merging sets and weights for one layer, a pure function of its arguments.
/// \param keys     [num_kv_heads][n_h · head_dim] keys of each kv head as stored, finite
/// \param scores   [num_kv_heads][n_h] per-token scores choosing the pivot (e.g. accumulated
///                 attention, summed over the group's query heads), finite
/// \param protect  [num_kv_heads] strictly increasing indices into 0..n_h-1: tokens never merged
inline kvmerger_layer_plan kvmerger_plan(const std::vector<std::vector<float>>& keys, std::int32_t head_dim,
                                         const std::vector<std::vector<float>>& scores,
                                         const std::vector<std::vector<std::int32_t>>& protect,
                                         const kvmerger_options& o = {}) {
  constexpr const char* who = "kvc::merge::kvmerger_plan";
  kvmerger_check_args(who, keys, head_dim, scores, protect, "protect", "one list of protected tokens per kv head", o);
  const std::size_t D = static_cast<std::size_t>(head_dim);
  const std::size_t H = keys.size();

  kvmerger_layer_plan plan;
  plan.heads.resize(H);
  const double eps = static_cast<double>(o.threshold);
  const double two_s2 = 2.0 * static_cast<double>(o.sigma) * static_cast<double>(o.sigma);
  const std::size_t Dp = similarity::padded_dim(D);
  const double slack = similarity::float_cosine_slack(D);
  std::vector<float> pair(2 * Dp);  // two normalised rows, t − 1's and t's
  float* prev = pair.data();
  float* cur = pair.data() + Dp;
  for (std::size_t h = 0; h < H; ++h) {
    const float* k = keys[h].data();
    const float* sc = scores[h].data();
    const std::int32_t n = static_cast<std::int32_t>(keys[h].size() / D);
    std::vector<char> prot(static_cast<std::size_t>(n), 0);
    for (std::int32_t t : protect[h]) prot[static_cast<std::size_t>(t)] = 1;
    // lk[t]: token t − 1 joins token t's set. Only pairs with neither token protected are
    // compared (a step that protects its kept set normalises only the rest), as a float dot of
    // rows normalised once; within the float bound of ε the double cosine decides, so every link
    // is the double rule's (a zero key: cosine 0).
    std::vector<char> lk(static_cast<std::size_t>(n), 0);
    std::int32_t have = -1;  // the token whose normalised row is in prev
    for (std::int32_t t = 1; t < n; ++t) {
      if (prot[static_cast<std::size_t>(t)] || prot[static_cast<std::size_t>(t - 1)]) continue;
      const float* k0 = k + static_cast<std::size_t>(t - 1) * D;
      const float* k1 = k + static_cast<std::size_t>(t) * D;
      if (have != t - 1) similarity::normalize_row(k0, D, prev);
      similarity::normalize_row(k1, D, cur);
      float f;
      similarity::dot_tile(prev, 1, cur, 1, Dp, &f, 1);
      lk[static_cast<std::size_t>(t)] =
          std::fabs(static_cast<double>(f) - eps) <= slack ? similarity::cosine_exact(k0, k1, D) > eps : f > eps;
      std::swap(prev, cur);
      have = t;
    }
    auto link = [&](std::int32_t t) { return lk[static_cast<std::size_t>(t)] != 0; };
    // The backward scan: [lo, hi] is the current set; sets are found last first.
    std::vector<std::pair<std::int32_t, std::int32_t>> runs;
    for (std::int32_t hi = n - 1; hi >= 0;) {
      std::int32_t lo = hi;
      while (lo > 0 && link(lo)) --lo;
      if (lo < hi) runs.emplace_back(lo, hi);
      hi = lo - 1;
    }
    auto& groups = plan.heads[h].groups;
    groups.reserve(runs.size());
    for (auto it = runs.rbegin(); it != runs.rend(); ++it) {
      const std::int32_t lo = it->first, hi = it->second;
      std::int32_t p = lo;  // the pivot: the largest score, the first such token on ties
      for (std::int32_t t = lo + 1; t <= hi; ++t)
        if (sc[t] > sc[p]) p = t;
      merge_group g;
      g.target = p;
      std::vector<double> gw;
      double z = 0;
      const float* kp = k + static_cast<std::size_t>(p) * D;
      for (std::int32_t t = lo; t <= hi; ++t) {
        const float* kt = k + static_cast<std::size_t>(t) * D;
        g.members.push_back(t);
        gw.push_back(kvmerger_kernel(kt, kp, D, two_s2));  // 1 for the pivot, so z >= 1
        z += gw.back();
      }
      for (double x : gw) g.weights.push_back(static_cast<float>(x / z));
      ++plan.sets;
      plan.removed += hi - lo;
      groups.push_back(std::move(g));
    }
  }
  return plan;
}

/// KVMerger on one layer of one sequence: for every kv head h, the merging sets of its keys
/// (kvmerger_plan with scores[h] and protect[h]) each become one token at its pivot, carrying the
/// set's mass in its log-weight. The commit is one merged_cache::merge_layer call, so all heads
/// change or none does; every argument is checked before anything changes. Returns the plan.
/// \param scores   [num_kv_heads][length of the head] pivot scores (accumulated attention), finite
/// \param protect  [num_kv_heads] strictly increasing indices of tokens never merged
template <class Store>
kvmerger_layer_plan kvmerger_merge_layer(basic_merged_cache<Store>& cache, seq_id s, std::int32_t layer,
                                         const std::vector<std::vector<float>>& scores,
                                         const std::vector<std::vector<std::int32_t>>& protect,
                                         const kvmerger_options& o = {}) {
  constexpr const char* who = "kvc::merge::kvmerger_merge_layer";
  const std::int32_t H = cache.config().num_kv_heads, D = cache.config().head_dim;
  KVC_EXPECTS_IN(who, static_cast<std::int32_t>(scores.size()) == H, "scores.size() = ", scores.size(),
                 ", expected num_kv_heads = ", H);
  KVC_EXPECTS_IN(who, static_cast<std::int32_t>(protect.size()) == H, "protect.size() = ", protect.size(),
                 ", expected num_kv_heads = ", H);
  const std::vector<std::vector<float>> keys = layer_keys(cache, s, layer);
  kvmerger_layer_plan plan = kvmerger_plan(keys, D, scores, protect, o);
  // The mean weighted by ω_i·exp(lw_i) (ω the Gaussian weights), the merged token carrying the
  // set's total mass.
  std::vector<std::vector<merge_group>> groups(static_cast<std::size_t>(H));
  for (std::int32_t h = 0; h < H; ++h) {
    groups[static_cast<std::size_t>(h)] = plan.heads[static_cast<std::size_t>(h)].groups;
    keep_total_mass(groups[static_cast<std::size_t>(h)], cache.log_weights(s, layer, h), o.carry_mass);
  }
  cache.merge_layer(s, layer, groups, mean_weights::mass);
  return plan;
}

/// One kv head's part of a KVMerger step at an eviction budget (kvmerger_evict_plan).
struct kvmerger_evict_head_plan {
  /// One group per kept token that absorbs evicted tokens, ascending by target: members the
  /// pivot and its run's evicted tokens, ascending; weights the normalised Gaussian weights.
  std::vector<merge_group> groups;
  std::vector<std::int32_t> dropped;  ///< evicted tokens in no run with a kept token, ascending
};

struct kvmerger_evict_layer_plan {
  std::vector<kvmerger_evict_head_plan> heads;  ///< one per kv head
  std::int64_t merged = 0, dropped = 0;         ///< evicted tokens merged / dropped, all heads
};

namespace kvmerger_detail {
/// kvmerger_evict_plan's runs on checked arguments, kv head h's key t read through row(h, t) (a
/// pointer to head_dim floats, valid until the next head).
template <class Row>
kvmerger_evict_layer_plan kvmerger_evict_runs(Row&& row, const std::vector<std::int32_t>& lengths, std::size_t D,
                                              const std::vector<std::vector<float>>& scores,
                                              const std::vector<std::vector<std::int32_t>>& kept,
                                              const kvmerger_options& o) {
  const std::size_t H = lengths.size();
  kvmerger_evict_layer_plan plan;
  plan.heads.resize(H);
  const double eps = static_cast<double>(o.threshold);
  const double two_s2 = 2.0 * static_cast<double>(o.sigma) * static_cast<double>(o.sigma);
  std::vector<char> is_kept;
  std::vector<double> norm;
  for (std::size_t h = 0; h < H; ++h) {
    const float* sc = scores[h].data();
    const std::int32_t n = lengths[h];
    is_kept.assign(static_cast<std::size_t>(n), 0);
    for (std::int32_t t : kept[h]) is_kept[static_cast<std::size_t>(t)] = 1;
    // Only the runs that hold an evicted token change anything, so only they are found: from
    // each evicted token not yet in a run, outwards while adjacent keys link. A decode step that
    // evicts a few tokens then compares a few runs' pairs, not all n − 1 (bench_merge
    // BM_merge_schedule). Norms are computed when a pair first needs them (-1: not yet), with
    // row_norms' sums, so every cosine is the one the whole-stream scan computed.
    norm.assign(static_cast<std::size_t>(n), -1.0);
    auto norm_of = [&](std::int32_t t) {
      double& q = norm[static_cast<std::size_t>(t)];
      if (q < 0) {
        const float* r = row(h, t);
        double sq = 0;  // row_norms' sum, in its order
        for (std::size_t d = 0; d < D; ++d) sq += static_cast<double>(r[d]) * r[d];
        q = std::sqrt(sq);
      }
      return q;
    };
    auto link = [&](std::int32_t a) {  // tokens a and a + 1 are in one merging set
      // similarity::cosine's arithmetic, on rows read through row()
      const double den = norm_of(a) * norm_of(a + 1);
      if (!(den > 0)) return 0.0 > eps;
      const float* x = row(h, a);
      const float* y = row(h, a + 1);
      double dot = 0;
      for (std::size_t d = 0; d < D; ++d) dot += static_cast<double>(x[d]) * y[d];
      return dot / den > eps;
    };
    auto& ph = plan.heads[h];
    std::int32_t covered = -1;  // the last token of the last run found
    for (std::int32_t e = 0; e < n; ++e) {
      if (is_kept[static_cast<std::size_t>(e)] || e <= covered) continue;
      std::int32_t lo = e, hi = e;  // the run [lo, hi] around evicted token e
      while (lo > covered + 1 && link(lo - 1)) --lo;
      while (hi + 1 < n && link(hi)) ++hi;
      covered = hi;
      std::int32_t p = -1;  // the pivot: the kept member with the largest score
      for (std::int32_t t = lo; t <= hi; ++t)
        if (is_kept[static_cast<std::size_t>(t)] && (p < 0 || sc[t] > sc[p])) p = t;
      merge_group g;
      std::vector<double> gw;
      double z = 0;
      const float* kp = p >= 0 ? row(h, p) : nullptr;
      for (std::int32_t t = lo; t <= hi; ++t) {
        if (is_kept[static_cast<std::size_t>(t)] && t != p) continue;
        if (p < 0) {
          ph.dropped.push_back(t);
          continue;
        }
        const float* kt = row(h, t);
        g.members.push_back(t);
        gw.push_back(kvmerger_kernel(kt, kp, D, two_s2));  // 1 for the pivot, so z >= 1
        z += gw.back();
      }
      if (g.members.size() > 1) {
        g.target = p;
        for (double x : gw) g.weights.push_back(static_cast<float>(x / z));
        plan.merged += static_cast<std::int64_t>(g.members.size()) - 1;
        ph.groups.push_back(std::move(g));
      }
    }
    plan.dropped += static_cast<std::int64_t>(ph.dropped.size());
  }
  return plan;
}
}  // namespace kvmerger_detail

/// KVMerger at an eviction budget: a scorer keeps kept[h] (the budget); an evicted token is
/// merged rather than dropped when KVMerger's set identification puts it in one merging set with
/// a kept token, so the layer keeps exactly the kept tokens (the eviction's bytes) and no
/// evicted token that KVMerger would have merged is lost. Per kv head:
///  - merging sets as in kvmerger_plan: maximal runs of consecutive tokens whose adjacent keys
///    have cos > ε (every token may link: the kept set plays the part of the paper's protected
///    tokens);
///  - a set with kept and evicted members: its pivot is the kept member with the largest score
///    (the first on ties), its evicted members merge into the pivot with the Gaussian weights
///    g_i = exp(−‖k_i − k_p‖² / (2σ²)) normalised over the pivot and them; its other kept members
///    stay as they are;
///  - evicted tokens in a set with no kept token, or alone, are dropped.
/// kvc's form, not the paper's: the paper merges after protecting a share of the tokens and
/// lets ε set the compression; here the budget sets it, so KVMerger can be compared with its
/// eviction base at equal bytes (docs/results.md).
/// \param keys    [num_kv_heads][n_h · head_dim] keys as stored, finite
/// \param scores  [num_kv_heads][n_h] the scorer's scores, finite (higher: more important)
/// \param kept    [num_kv_heads] strictly increasing indices into 0..n_h-1
inline kvmerger_evict_layer_plan kvmerger_evict_plan(const std::vector<std::vector<float>>& keys, std::int32_t head_dim,
                                                     const std::vector<std::vector<float>>& scores,
                                                     const std::vector<std::vector<std::int32_t>>& kept,
                                                     const kvmerger_options& o = {}) {
  constexpr const char* who = "kvc::merge::kvmerger_evict_plan";
  kvmerger_check_args(who, keys, head_dim, scores, kept, "kept", "one kept set per kv head", o);
  const std::size_t D = static_cast<std::size_t>(head_dim);
  std::vector<std::int32_t> lengths;
  for (const auto& kh : keys) lengths.push_back(static_cast<std::int32_t>(kh.size() / D));
  return kvmerger_detail::kvmerger_evict_runs(
      [&](std::size_t h, std::int32_t t) { return keys[h].data() + static_cast<std::size_t>(t) * D; }, lengths, D,
      scores, kept, o);
}

/// KVMerger at an eviction budget on one layer of one sequence (kvmerger_evict_plan): for every
/// kv head h the layer keeps exactly kept[h], each kept pivot absorbing the evicted tokens of its
/// merging set (their mass in its log-weight), the other evicted tokens dropped. One
/// merged_cache::merge_layer commit: all heads change or none does. Returns the plan.
/// \param scores  [num_kv_heads][length of the head] the scorer's scores, finite
/// \param kept    [num_kv_heads] strictly increasing kept indices (e.g. an evict::layer_selection)
template <class Store>
kvmerger_evict_layer_plan kvmerger_evict_layer(basic_merged_cache<Store>& cache, seq_id s, std::int32_t layer,
                                               const std::vector<std::vector<float>>& scores,
                                               const std::vector<std::vector<std::int32_t>>& kept,
                                               const kvmerger_options& o = {}) {
  constexpr const char* who = "kvc::merge::kvmerger_evict_layer";
  const std::int32_t H = cache.config().num_kv_heads, D = cache.config().head_dim;
  KVC_EXPECTS_IN(who, static_cast<std::int32_t>(scores.size()) == H, "scores.size() = ", scores.size(),
                 ", expected num_kv_heads = ", H);
  KVC_EXPECTS_IN(who, static_cast<std::int32_t>(kept.size()) == H, "kept.size() = ", kept.size(),
                 ", expected num_kv_heads = ", H);
  kvmerger_detail::kvmerger_check_sizes(who, static_cast<std::size_t>(H), scores, kept, "kept", "one kept set per kv head", o);
  const auto& kv = cache.cache();
  std::vector<std::int32_t> lengths;
  for (std::int32_t h = 0; h < H; ++h) {
    lengths.push_back(kv.length(s, layer, h));
    kvmerger_detail::kvmerger_check_head(who, static_cast<std::size_t>(h), lengths.back(), scores[static_cast<std::size_t>(h)],
                                kept[static_cast<std::size_t>(h)], "kept");
  }
  // The runs read only the keys around evicted tokens, so only those rows are converted to
  // float, when first read, into this thread's buffer (one head at a time, reused across calls).
  // Gathering the layer's keys instead cost ~2 decode steps per compression (bench_merge
  // BM_merge_schedule, 4k tokens): at interval 32, 11-12% of a decode step against 2-4% now.
  // The keys need no finiteness check here: the cache holds finite values only.
  thread_local std::vector<float> buf;
  thread_local std::vector<char> have;
  std::size_t cur = static_cast<std::size_t>(-1);
  const std::size_t Dz = static_cast<std::size_t>(D);
  auto row = [&](std::size_t h, std::int32_t t) -> const float* {
    if (h != cur) {
      cur = h;
      buf.resize(static_cast<std::size_t>(lengths[h]) * Dz);
      have.assign(static_cast<std::size_t>(lengths[h]), 0);
    }
    float* r = buf.data() + static_cast<std::size_t>(t) * Dz;
    if (!have[static_cast<std::size_t>(t)]) {
      const auto keys = kv.keys(s, layer, static_cast<std::int32_t>(h));
      for (std::int32_t d = 0; d < D; ++d) r[d] = static_cast<float>(keys(t, 0, d));
      have[static_cast<std::size_t>(t)] = 1;
    }
    return r;
  };
  kvmerger_evict_layer_plan plan = kvmerger_detail::kvmerger_evict_runs(row, lengths, Dz, scores, kept, o);
  std::vector<std::vector<merge_group>> groups(static_cast<std::size_t>(H));
  std::vector<std::vector<std::int32_t>> drop(static_cast<std::size_t>(H));
  for (std::int32_t h = 0; h < H; ++h) {
    groups[static_cast<std::size_t>(h)] = plan.heads[static_cast<std::size_t>(h)].groups;
    keep_total_mass(groups[static_cast<std::size_t>(h)], cache.log_weights(s, layer, h), o.carry_mass);
    drop[static_cast<std::size_t>(h)] = plan.heads[static_cast<std::size_t>(h)].dropped;
  }
  cache.merge_layer(s, layer, groups, mean_weights::mass, &drop);
  return plan;
}

}  // namespace merge
KVC_END_NAMESPACE
