// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// D2O's token-level merge (Wan et al., "D2O: Dynamic Discriminative Operations for Efficient
/// Generative Inference of Large Language Models", arXiv 2406.13035, 2024; ICLR 2025 as "... for
/// Efficient Long-Context Inference ..."). Eviction drops tokens whose keys may still resemble
/// kept ones; D2O recalls each evicted token whose key is close enough to a kept key and merges
/// it into that token instead of dropping it, with a threshold that follows the recent
/// similarities rather than a constant that would need tuning per model and layer.
///
/// The rule, per (layer, kv head), after any scorer has chosen the kept set C (the evicted set E
/// is the rest):
///  - u_e = max_{c ∈ C} cos(k_e, k_c), c*(e) its argmax (the first kept token on ties; a zero
///    key has cosine 0 with everything: the paper leaves it undefined);
///  - the step's statistic m_t = mean of u_e over the evicted tokens of every kv head of the
///    layer (the authors' code: one threshold per layer, the mean over heads and tokens);
///  - τ_t = β·τ_{t-1} + (1 − β)·m_t, and τ_1 = m_1 on the first step (the authors' code starts
///    from no threshold and takes the first mean); the update comes before the comparison, as
///    there;
///  - e with u_e ≥ τ_t is merged into c*(e); the others are dropped. A kept token c that absorbs
///    the set E_c becomes the weighted mean of {c} ∪ E_c with the paper's weights
///        ω_c = e / (e + Σ_{e' ∈ E_c} exp(u_e')),   ω_e = exp(u_e) / (e + Σ_{e' ∈ E_c} exp(u_e')),
///    (exp of the similarity with c, c's own being cos(k_c, k_c) = 1: the e), for keys and values.
///    This form of the paper's weighted merge (exp of the similarity, normalised, the kept
///    token's own similarity 1) has not been checked against the paper's equation: the copies
///    of the paper reachable from here give only its abstract. The threshold's rule, β and τ_1
///    were read in the authors' code.
///
/// Where kvc differs, and why:
///  - the merged token carries its members' attention mass: its log-weight becomes
///    log(exp(lw_c) + Σ_{e ∈ E_c} exp(lw_e)) (kvc/store/merged_cache.hpp); the paper has no
///    multiplicity, so there a merged token weighs as one in attention;
///  - a member that already stands for m tokens (an earlier merge) counts m times in the mean,
///    its D2O weight times its multiplicity (ω_i·exp(lw_i), normalised): merged_cache's
///    mean_weights::mass. With every log-weight 0 (a first merge) that is the paper's mean;
///  - each kv head decides its own tokens: the authors' code compares, per evicted slot, the mean
///    over heads of u (its heads evict the same count, but not the same tokens), which has no
///    meaning once each kv head keeps its own set;
///  - the authors' released code merges by a scatter-mean of similarity-scaled rows,
///    (k_c + Σ u_e·k_e) / (1 + |E_c|); this follows the paper's normalised exp weights.
/// Not here: D2O's layer level (per-layer budgets from the attention density of shallow vs deep
/// layers), the scorer (the paper uses H2O's accumulated attention plus a recent window; any
/// kvc::evict selection gives the kept sets), and the paper's exemption of some layers.
///
/// Cost: O(|E|·|C|·D) per kv head for the similarities (float SIMD dot products of keys
/// normalised once, double only to settle near-ties and for the winners' u), plus the commit.

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

struct d2o_options {
  /// β: weight of the previous threshold, τ_t = β·τ_{t-1} + (1 − β)·m_t, in [0, 1). 0.5: the
  /// authors' code (github.com/AIoT-MLSys-Lab/D2O, LLM_merge_new/run_pred_long_bench_sample.py,
  /// `alpha = 0.5, belta = 0.5` in τ_t = alpha·τ_{t-1} + belta·m_t, which is this form).
  float beta = 0.5f;
  /// true (kvc's default): the merged token carries its members' attention mass (log-weight
  /// log Σ exp(lw_i)); false: the paper's form, the merged token weighs as the kept token alone
  /// (its log-weight unchanged), same key and value. docs/results.md compares the two.
  bool carry_mass = true;
};

/// The similarity threshold of one layer, carried from one D2O step to the next (one per layer
/// and sequence, as the authors keep one per layer).
struct d2o_threshold {
  /// false until a step has an evicted token with a kept token to compare with; that step sets
  /// τ to its statistic (the authors' initial threshold: none, then the first step's mean).
  bool primed = false;
  float tau = 0.0f;  ///< read only when primed
};

/// What D2O does with one evicted token of one kv head.
struct d2o_decision {
  std::int32_t token = 0;    ///< stream index of the evicted token
  std::int32_t target = -1;  ///< stream index of the kept token it merges into; -1: dropped
  /// u_e, its largest cosine similarity with a kept key; -inf when the head keeps nothing.
  float similarity = 0.0f;
};

/// One kv head's part of a step.
struct d2o_head_plan {
  std::vector<d2o_decision> evicted;  ///< every evicted token, ascending
  /// One group per kept token that absorbs something, ascending by target: members {c, e...}
  /// (c first, then its evicted tokens ascending), weights the paper's ω (they sum to 1).
  std::vector<merge_group> groups;
  std::vector<std::int32_t> dropped;  ///< the evicted tokens merged into nothing, ascending
};

struct d2o_layer_plan {
  std::vector<d2o_head_plan> heads;  ///< one per kv head
  d2o_threshold threshold;           ///< τ after this step (unchanged when no statistic)
  /// m_t; NaN when no evicted token had a kept token to compare with (then τ is not updated).
  double statistic = std::numeric_limits<double>::quiet_NaN();
  std::int64_t merged = 0, dropped = 0;
};

/// D2O's decisions for one layer, a pure function of the keys, the kept sets and τ.
/// \param keys       [num_kv_heads][n_h · head_dim] keys of each kv head as stored, finite
/// \param kept       [num_kv_heads] strictly increasing indices into 0..n_h-1 (any scorer's choice)
/// \param threshold  τ before the step (tau finite when primed)
inline d2o_layer_plan d2o_plan(const std::vector<std::vector<float>>& keys, std::int32_t head_dim,
                               const std::vector<std::vector<std::int32_t>>& kept, const d2o_threshold& threshold,
                               const d2o_options& o = {}) {
  constexpr const char* who = "kvc::merge::d2o_plan";
  KVC_EXPECTS_IN(who, o.beta >= 0.0f && o.beta < 1.0f, "d2o_options.beta = ", o.beta,
                 ", expected 0 <= beta < 1 (the weight of the previous threshold)");
  KVC_EXPECTS_IN(who, !threshold.primed || std::isfinite(threshold.tau), "threshold.tau = ", threshold.tau,
                 ", expected a finite threshold (or threshold.primed = false)");
  KVC_EXPECTS_IN(who, kept.size() == keys.size(), "kept.size() = ", kept.size(), ", expected keys.size() = ",
                 keys.size(), " (one kept set per kv head)");
  // The checks in their order (keys, then kept lists) where a shape or a list is wrong; else the
  // keys' finiteness comes with pass 1's normalisation (normalize_row), which reads every key
  // anyway: a separate scan was 0.6 ms of a 4k-token step (2026-12-04).
  const auto full_checks = [&] {
    similarity::check_layer_keys(who, keys, head_dim);
    for (std::size_t h = 0; h < keys.size(); ++h)
      similarity::check_token_list(who, "kept", h, kept[h],
                                   static_cast<std::int64_t>(keys[h].size() / static_cast<std::size_t>(head_dim)));
  };
  bool lists_ok = similarity::layer_shapes_ok(keys, head_dim);
  for (std::size_t h = 0; lists_ok && h < keys.size(); ++h)
    lists_ok = similarity::token_list_ok(kept[h], static_cast<std::int64_t>(keys[h].size() / static_cast<std::size_t>(head_dim)));
  if (!lists_ok) full_checks();  // throws the first error
  const std::size_t D = static_cast<std::size_t>(head_dim);
  const std::size_t H = keys.size();

  d2o_layer_plan plan;
  plan.heads.resize(H);
  plan.threshold = threshold;
  // Pass 1: every evicted token's nearest kept key, and the statistic over the layer. The
  // cosines are float dot products of rows normalised once (similarity::normalize_row), kept
  // rows a tile at a time against every evicted row, 4 × 2 per SIMD block; per evicted token the
  // best float cosine f1, its kept token and the runner-up f2. Where f2 is within twice the float
  // bound of f1 the nearest key is not certain in float and the double rule runs over every kept
  // key (ties: duplicate keys, or D = 1); otherwise the winner is the double rule's winner, and
  // its u is recomputed in double (cosine_exact), so u, m_t, τ and every decision are the double
  // rule's to the bit.
  std::vector<std::vector<double>> best(H);  // u_e per evicted token, in plan.heads[h].evicted order
  double sum = 0;
  std::int64_t count = 0;
  const std::size_t Dp = similarity::padded_dim(D);
  const float rival = static_cast<float>(2.0 * similarity::float_cosine_slack(D));
  const std::size_t TC = similarity::kept_tile;
  std::vector<float> en, ct, dots(4 * TC), f1, f2;  // scratch, reused over heads
  std::vector<std::int32_t> ev, a1;
  for (std::size_t h = 0; h < H; ++h) {
    const float* k = keys[h].data();
    const std::int32_t n = static_cast<std::int32_t>(keys[h].size() / D);
    const auto& ch = kept[h];
    std::vector<char> is_kept(static_cast<std::size_t>(n), 0);
    for (std::int32_t c : ch) is_kept[static_cast<std::size_t>(c)] = 1;
    ev.clear();
    for (std::int32_t e = 0; e < n; ++e)
      if (!is_kept[static_cast<std::size_t>(e)]) ev.push_back(e);
    const std::size_t E = ev.size(), C = ch.size();
    f1.assign(E, -std::numeric_limits<float>::infinity());
    f2.assign(E, -std::numeric_limits<float>::infinity());
    a1.assign(E, -1);
    bool finite = true;
    if (C == 0 || E == 0) finite = similarity::all_finite(k, keys[h].size());
    if (C > 0 && E > 0) {
      en.resize(E * Dp);
      for (std::size_t i = 0; i < E; ++i)
        finite &= similarity::normalize_row(k + static_cast<std::size_t>(ev[i]) * D, D, en.data() + i * Dp);
      // A few evicted rows (one block): each kept key is read once, raw (cosines_raw); more: the
      // kept tile is normalised once for every block of evicted rows.
      const bool few = E <= 4;
      ct.resize((few ? 1 : std::min(TC, C)) * Dp);
      for (std::size_t c0 = 0; c0 < C; c0 += TC) {
        const std::size_t nc = std::min(TC, C - c0);
        if (!few)
          for (std::size_t j = 0; j < nc; ++j)
            finite &= similarity::normalize_row(k + static_cast<std::size_t>(ch[c0 + j]) * D, D, ct.data() + j * Dp);
        if (!finite) break;
        for (std::size_t e0 = 0; e0 < E; e0 += 4) {
          const std::size_t r = std::min<std::size_t>(4, E - e0);
          if (few)
            finite &= similarity::cosines_raw(en.data(), r, k, ch.data() + c0, nc, D, dots.data(), TC, ct.data());
          else
            similarity::dot_tile(en.data() + e0 * Dp, r, ct.data(), nc, Dp, dots.data(), TC);
          if (!finite) break;
          for (std::size_t i = 0; i < r; ++i) {
            const float* row = dots.data() + i * TC;
            const std::size_t e = e0 + i;
            // Most tiles hold nothing near the best so far: one SIMD max says so.
            if (similarity::max_of(row, nc) < f1[e] - rival) continue;
            for (std::size_t j = 0; j < nc; ++j) {
              const float v = row[j];
              if (v > f1[e]) {
                f2[e] = f1[e], f1[e] = v, a1[e] = static_cast<std::int32_t>(c0 + j);
              } else if (v > f2[e]) {
                f2[e] = v;
              }
            }
          }
        }
      }
    }
    if (!finite) full_checks();  // throws check_layer_keys' message for the first inf or NaN
    auto& ph = plan.heads[h];
    ph.evicted.reserve(E);
    best[h].reserve(E);
    for (std::size_t i = 0; i < E; ++i) {
      const std::int32_t e = ev[i];
      const float* ke = k + static_cast<std::size_t>(e) * D;
      double u = -std::numeric_limits<double>::infinity();
      std::int32_t arg = -1;
      if (C > 0 && f2[i] >= f1[i] - rival) {
        for (std::int32_t c : ch) {
          const double cs = similarity::cosine_exact(ke, k + static_cast<std::size_t>(c) * D, D);
          if (cs > u) u = cs, arg = c;  // strict: the first kept token wins a tie
        }
      } else if (C > 0) {
        arg = ch[static_cast<std::size_t>(a1[i])];
        u = similarity::cosine_exact(ke, k + static_cast<std::size_t>(arg) * D, D);
      }
      d2o_decision x;
      x.token = e;
      x.target = arg;  // provisional: the nearest kept token, or -1 when nothing is kept
      x.similarity = static_cast<float>(u);
      ph.evicted.push_back(x);
      best[h].push_back(u);
      if (arg >= 0) sum += u, ++count;
    }
  }
  // The EMA (before the comparison, as the authors' code does).
  if (count > 0) {
    plan.statistic = sum / static_cast<double>(count);
    const double tau = threshold.primed ? static_cast<double>(o.beta) * threshold.tau +
                                              (1.0 - static_cast<double>(o.beta)) * plan.statistic
                                        : plan.statistic;
    plan.threshold.primed = true;
    plan.threshold.tau = static_cast<float>(tau);
  }
  // Pass 2: merge or drop, and the groups with the paper's weights, in target order.
  const double tau = static_cast<double>(plan.threshold.tau);
  for (std::size_t h = 0; h < H; ++h) {
    auto& ph = plan.heads[h];
    const auto& ch = kept[h];
    const std::int32_t n = static_cast<std::int32_t>(keys[h].size() / D);
    std::vector<std::int32_t> slot(static_cast<std::size_t>(n), -1);  // kept token -> index in ch
    for (std::size_t i = 0; i < ch.size(); ++i) slot[static_cast<std::size_t>(ch[i])] = static_cast<std::int32_t>(i);
    // into[i]: the evicted tokens merged into ch[i], ascending, with their similarities.
    std::vector<std::vector<std::pair<std::int32_t, double>>> into(ch.size());
    for (std::size_t i = 0; i < ph.evicted.size(); ++i) {
      d2o_decision& x = ph.evicted[i];
      if (x.target >= 0 && best[h][i] >= tau) {
        into[static_cast<std::size_t>(slot[static_cast<std::size_t>(x.target)])].emplace_back(x.token, best[h][i]);
        ++plan.merged;
      } else {
        x.target = -1;
        ph.dropped.push_back(x.token);
        ++plan.dropped;
      }
    }
    for (std::size_t i = 0; i < ch.size(); ++i) {
      if (into[i].empty()) continue;
      merge_group mg;
      mg.target = ch[i];
      mg.members.push_back(ch[i]);
      // exp of each member's similarity with the kept token: its own is cos(k_c, k_c) = 1.
      std::vector<double> ex(1, std::exp(1.0));
      double z = ex[0];
      for (const auto& eu : into[i]) {
        mg.members.push_back(eu.first);
        ex.push_back(std::exp(eu.second));
        z += ex.back();
      }
      for (double x : ex) mg.weights.push_back(static_cast<float>(x / z));
      ph.groups.push_back(std::move(mg));
    }
  }
  return plan;
}

/// One D2O step on one layer: for every kv head h, keep kept[h], merge each evicted token whose
/// nearest kept key passes the threshold into it (d2o_plan), drop the others, and advance τ.
/// The commit is merged_cache::merge_layer with the dropped tokens as its `drop` list, so all
/// heads change or none does; `threshold` changes only after the commit (a throw leaves the
/// cache and τ as they were). Returns the step's plan (decisions, groups with the paper's ω).
/// \param kept  [num_kv_heads] strictly increasing kept indices (e.g. an evict::layer_selection)
template <class Store>
d2o_layer_plan d2o_merge_layer(basic_merged_cache<Store>& cache, seq_id s, std::int32_t layer,
                               const std::vector<std::vector<std::int32_t>>& kept, d2o_threshold& threshold,
                               const d2o_options& o = {}) {
  constexpr const char* who = "kvc::merge::d2o_merge_layer";
  const std::int32_t H = cache.config().num_kv_heads, D = cache.config().head_dim;
  KVC_EXPECTS_IN(who, static_cast<std::int32_t>(kept.size()) == H, "kept.size() = ", kept.size(),
                 ", expected num_kv_heads = ", H);
  // Gathered into this thread's reused buffers: fresh ones cost 0.4-3 ms more a step in per-step
  // use (similarity::layer_keys_reused).
  d2o_layer_plan plan = d2o_plan(similarity::layer_keys_reused(cache, s, layer), D, kept, threshold, o);
  // The mean weighted by ω_i·exp(lw_i), the merged token carrying its members' total mass.
  std::vector<std::vector<merge_group>> groups(static_cast<std::size_t>(H));
  std::vector<std::vector<std::int32_t>> drop(static_cast<std::size_t>(H));
  for (std::int32_t h = 0; h < H; ++h) {
    const auto& ph = plan.heads[static_cast<std::size_t>(h)];
    groups[static_cast<std::size_t>(h)] = ph.groups;
    keep_total_mass(groups[static_cast<std::size_t>(h)], cache.log_weights(s, layer, h), o.carry_mass);
    drop[static_cast<std::size_t>(h)] = ph.dropped;
  }
  cache.merge_layer(s, layer, groups, mean_weights::mass, &drop);
  threshold = plan.threshold;  // committed: a plain copy, no throw
  return plan;
}

}  // namespace merge
KVC_END_NAMESPACE
