// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `merge::merged_cache<T>`: a kv_cache whose tokens may each stand for several. Every stored
/// token of every (sequence, layer, kv head) carries a log-weight lw_t (a float, 0 for an
/// appended token): the log of how many tokens' attention mass it carries. Attention adds it to
/// the token's logit (kvc/cpu/merged_attention.hpp): exp(s_t + lw_t) = m_t · exp(s_t), so a token
/// merged from m identical ones gets exactly the mass the m copies had ("proportional attention"
/// of Token Merging, Bolya et al., ICLR 2023, here applied to the KV cache).
///
/// The primitive is merge_layer: per kv head, groups {target, members, weights}; the target
/// becomes the weighted mean of its members' keys and values and carries their mass, the other
/// members are dropped. Merging policies (CaM: kvc/merge/cam.hpp) only choose groups.
///
/// The K/V store is a template parameter: `merged_cache<T>` keeps tokens in full-precision
/// pages (kv_cache<T>), `basic_merged_cache<quant_cache<KQ, VQ, Fp>>` in encoded pages, so a
/// policy stack eviction -> merging -> quantization is one type over one store (the example
/// examples/02_compose.cpp). Over encoded pages a merge reads its members decoded (keys before
/// RoPE in a pre-RoPE cache), forms the mean in double and writes it back through the store's
/// keep_layer_rewrite, which encodes it again with the tokens of its encoding unit: the merged
/// row carries one more rounding, the other rows of a re-encoded unit (a KIVI key group) at most
/// one more (tests/merge/test_merge_quant.cpp bounds both).
///
/// Memory: K/V in the page pools (the inner store), the log-weights on the host, 4 bytes per
/// stored token (metadata_bytes). Threads: as kv_cache (docs/threading.md).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <type_traits>
#include <utility>
#include <vector>

#include <kvc/error.hpp>
#include <kvc/numeric/half.hpp>  // detail::float_to_half_n, half_to_float_n
#include <kvc/store/kv_cache.hpp>
#include <kvc/store/merged_cache_fwd.hpp>
#include <kvc/store/sequence_table.hpp>

KVC_BEGIN_NAMESPACE
namespace merge {

/// One merge within one stream: `members` (stream indices, the target among them) become one
/// token at the target's slot and position.
struct merge_group {
  std::int32_t target = 0;
  std::vector<std::int32_t> members;  ///< includes target; each token in at most one group
  std::vector<float> weights;         ///< one per member, finite, >= 0, positive sum
};

/// One additive value update within one stream: v[recipient] += coef · v[source], both stream
/// indices before the call, the rows read as stored before it (CaM's merge of an evicted token's
/// value into kept ones, kvc/merge/cam.hpp). Keys and log-weights are not changed by it.
struct value_mix {
  std::int32_t recipient = 0;  ///< a kept token
  std::int32_t source = 0;     ///< any token of the stream (typically an evicted one)
  float coef = 0.0f;           ///< finite
};

/// How the mean's weights are formed from the caller's weights w_i and the members' log-weights.
enum class mean_weights {
  /// a_i = w_i · exp(lw_i) (default): a member that already stands for m tokens counts m times,
  /// so merging in steps gives the same rows as merging everything at once, and with w = 1 the
  /// merged key/value is the mean over all the original tokens.
  mass,
  /// a_i = w_i: the caller's weights as given (the log-weight is still log Σ w_i exp(lw_i)).
  given,
};

namespace store_detail {
/// What basic_merged_cache needs to know of its K/V store: the views its layer() gives and where
/// it puts them.
template <class Store>
struct merged_store_traits {
  static_assert(sizeof(Store) == 0,
                "kvc::merge::basic_merged_cache<Store>: Store must be kvc::kv_cache<float>, kvc::kv_cache<kvc::half> "
                "or a kvc::quant_cache<KQ, VQ, Fp> (include kvc/store/quant_cache.hpp)");
};
template <class T>
struct merged_store_traits<kv_cache<T>> {
  static_assert(std::is_same<T, float>::value || std::is_same<T, half>::value,
                "kvc::merge::merged_cache<T>: T must be float or kvc::half");
  using key_view = typename kv_cache<T>::view_type;
  using value_view = key_view;
  using buffer = std::vector<key_view>;
  static constexpr bool encoded = false;
};
template <class KQ, class VQ, class Fp>
struct merged_store_traits<quant_cache<KQ, VQ, Fp>> {
  using key_view = typename quant_cache<KQ, VQ, Fp>::key_view_type;
  using value_view = typename quant_cache<KQ, VQ, Fp>::value_view_type;
  using buffer = typename quant_cache<KQ, VQ, Fp>::layer_buffer;
  static constexpr bool encoded = true;
};
}  // namespace store_detail

/// \tparam Store  the K/V store: kv_cache<float>, kv_cache<half> (merged_cache<T>) or a quant_cache
template <class Store>
class basic_merged_cache {
  using traits = store_detail::merged_store_traits<Store>;

 public:
  using inner_cache = Store;
  /// True when the pages hold codes (a quant_cache): rows are read decoded and written re-encoded.
  static constexpr bool encoded = traits::encoded;
  /// One layer as its pages' views plus every token's log-weight (layer()), naming this cache, the
  /// sequence and the layer: cpu::decode_attention given it runs cpu::merged_decode_attention.
  using layer_view = store_layer<basic_merged_cache, weighted_stream_heads<typename traits::key_view, typename traits::value_view>>;
  /// Where layer() puts its views and weight pointers.
  struct layer_buffer {
    typename traits::buffer views;
    std::vector<const float*> weights;
  };

  /// Builds the store from the arguments its constructor takes: a cache_config for kv_cache, a
  /// quant_cache_config (and codecs) for quant_cache.
  template <class... Args, class = std::enable_if_t<std::is_constructible<Store, Args&&...>::value>>
  explicit basic_merged_cache(Args&&... args) : kv_(std::forward<Args>(args)...) {}

  const cache_config& config() const noexcept { return kv_.config(); }
  /// The K/V store (its views and pages are what the kernels read).
  const inner_cache& cache() const noexcept { return kv_; }

  seq_id add_sequence() {
    std::vector<std::vector<float>> lw(streams());  // before the inner add: a throw changes nothing
    const seq_id s = kv_.add_sequence();
    try {
      lw_.add_as(s, std::move(lw));
    } catch (...) {
      kv_.remove_sequence(s);
      throw;
    }
    return s;
  }
  void remove_sequence(seq_id s) {
    kv_.remove_sequence(s);
    lw_.erase(s);
  }
  seq_id fork(seq_id s) {
    std::vector<std::vector<float>> lw = lw_.find(s, "fork");  // copy first
    const seq_id id = kv_.fork(s);
    try {
      lw_.add_as(id, std::move(lw));
    } catch (...) {
      kv_.remove_sequence(id);
      throw;
    }
    return id;
  }
  bool contains(seq_id s) const noexcept { return kv_.contains(s); }
  std::size_t num_sequences() const noexcept { return kv_.num_sequences(); }

  /// kv_cache::share_layer, the layer taking from's log-weights with its tokens: a merged token
  /// keeps its members' mass in the layer that shares it. Strong guarantee.
  void share_layer(seq_id s, std::int32_t layer, std::int32_t from) {
    auto& lw = lw_.find_share(s, layer, from, "share_layer");
    std::vector<std::vector<float>> copies = lw_.copy_layer(lw, from);  // may throw; nothing changed
    kv_.share_layer(s, layer, from);  // strong
    for (std::int32_t h = 0; h < config().num_kv_heads; ++h) lw[lw_.index(layer, h)].swap(copies[static_cast<std::size_t>(h)]);
  }

  /// Appends n tokens to every kv head of one layer, each with log-weight 0 (kv_cache::append).
  template <class In>
  void append(seq_id s, std::int32_t layer, const In* k, const In* v, std::int32_t n,
              const std::int32_t* positions = nullptr) {
    auto& lw = lw_.find(s, "append");
    lw_.check_layer(layer, "append");
    const std::int32_t H = config().num_kv_heads;
    if (n > 0)
      for (std::int32_t h = 0; h < H; ++h) {
        auto& w = lw[lw_.index(layer, h)];
        w.reserve(w.size() + static_cast<std::size_t>(n));  // before the inner append: no throw after it
      }
    kv_.append(s, layer, k, v, n, positions);
    for (std::int32_t h = 0; h < H && n > 0; ++h) {
      auto& w = lw[lw_.index(layer, h)];
      w.resize(w.size() + static_cast<std::size_t>(n), 0.0f);
    }
  }

  /// Keeps, for every kv head h, the tokens kept[h] (strictly increasing): the log-weights follow
  /// the kept tokens. All heads change or none does.
  void keep_layer(seq_id s, std::int32_t layer, const std::vector<std::vector<std::int32_t>>& kept) {
    auto& lw = lw_.find(s, "keep_layer");
    lw_.check_layer(layer, "keep_layer");
    std::vector<std::vector<float>> next = kept_weights(lw, layer, kept, "keep_layer");
    kv_.keep_layer(s, layer, kept);  // validates kept; may throw: nothing changed
    for (std::int32_t h = 0; h < config().num_kv_heads; ++h) lw[lw_.index(layer, h)].swap(next[static_cast<std::size_t>(h)]);
  }

  /// Merges, for every kv head h, the groups groups[h] (groups.size() == num_kv_heads; an empty
  /// list leaves that head as it is). For a group with members i, weights w_i and log-weights
  /// lw_i, with a_i the mean weights (`mode`, default w_i · exp(lw_i)):
  ///   k_target ← Σ a_i k_i / Σ a_i,   v_target ← Σ a_i v_i / Σ a_i,
  ///   lw_target ← log Σ_i w_i · exp(lw_i),
  /// computed in double from the rows as stored before the call; the other members are dropped;
  /// the target keeps its position. Tokens in no group are unchanged, except those listed in
  /// `drop` (when not null, drop[h] for each kv head: tokens in no group, each once), which are
  /// removed as keep_layer would remove them: eviction and merging in one step (D2O drops the
  /// evicted tokens it does not merge, kvc/merge/d2o.hpp).
  /// Everything is validated before anything changes, and the K/V commit is kv_cache's
  /// keep_layer_rewrite (all or nothing); the log-weights change after it, without throwing.
  void merge_layer(seq_id s, std::int32_t layer, const std::vector<std::vector<merge_group>>& groups,
                   mean_weights mode = mean_weights::mass,
                   const std::vector<std::vector<std::int32_t>>* drop = nullptr) {
    constexpr const char* who = "kvc::merge::merged_cache::merge_layer";
    auto& lw = lw_.find(s, "merge_layer");
    lw_.check_layer(layer, "merge_layer");
    const std::int32_t H = config().num_kv_heads, D = config().head_dim;
    KVC_EXPECTS_IN(who, static_cast<std::int32_t>(groups.size()) == H, "groups.size() = ", groups.size(),
                   ", expected num_kv_heads = ", H, " (one list of groups per kv head)");
    KVC_EXPECTS_IN(who, !drop || static_cast<std::int32_t>(drop->size()) == H, "drop->size() = ",
                   drop ? drop->size() : 0, ", expected num_kv_heads = ", H, " (one list of tokens per kv head)");
    // Plan: per head, the kept indices, the merged rows of every target and the new log-weights.
    std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(H));
    std::vector<std::vector<float>> next(static_cast<std::size_t>(H));
    // merged[h]: per kept index, -1 or the row of rows[h] ([2][D] floats: K then V) it gets.
    std::vector<std::vector<std::int32_t>> merged(static_cast<std::size_t>(H));
    std::vector<std::vector<float>> rows(static_cast<std::size_t>(H));
    for (std::int32_t h = 0; h < H; ++h) {
      const auto& gs = groups[static_cast<std::size_t>(h)];
      const std::vector<float>& w0 = lw[lw_.index(layer, h)];
      const std::int32_t L = static_cast<std::int32_t>(w0.size());
      // role[t]: -1 untouched, -2 dropped member, -3 dropped by `drop`, g >= 0 the target of group g.
      std::vector<std::int32_t> role(static_cast<std::size_t>(L), -1);
      for (std::size_t g = 0; g < gs.size(); ++g) {
        const merge_group& gr = gs[g];
        KVC_EXPECTS_IN(who, gr.target >= 0 && gr.target < L, "groups[", h, "][", g, "].target = ", gr.target,
                       ", expected 0..", L - 1, " (kv head ", h, " holds ", L, " tokens)");
        KVC_EXPECTS_IN(who, gr.weights.size() == gr.members.size(), "groups[", h, "][", g, "].weights.size() = ",
                       gr.weights.size(), ", expected members.size() = ", gr.members.size());
        bool has_target = false;
        double wsum = 0;
        for (std::size_t i = 0; i < gr.members.size(); ++i) {
          const std::int32_t t = gr.members[i];
          const float w = gr.weights[i];
          KVC_EXPECTS_IN(who, t >= 0 && t < L, "groups[", h, "][", g, "].members[", i, "] = ", t, ", expected 0..",
                         L - 1, " (kv head ", h, " holds ", L, " tokens)");
          KVC_EXPECTS_IN(who, role[static_cast<std::size_t>(t)] == -1, "groups[", h, "][", g, "].members[", i,
                         "] = ", t, " is already a member of a group of kv head ", h,
                         ", expected each token in at most one group");
          KVC_EXPECTS_IN(who, std::isfinite(w) && w >= 0.0f, "groups[", h, "][", g, "].weights[", i, "] = ", w,
                         ", expected a finite weight >= 0");
          role[static_cast<std::size_t>(t)] = -2;
          has_target = has_target || t == gr.target;
          wsum += w;
        }
        KVC_EXPECTS_IN(who, has_target, "groups[", h, "][", g, "].target = ", gr.target,
                       " is not among its members, expected the target to be a member");
        KVC_EXPECTS_IN(who, wsum > 0, "groups[", h, "][", g, "].weights sum to ", wsum,
                       ", expected a positive sum (at least one member with weight > 0)");
        role[static_cast<std::size_t>(gr.target)] = static_cast<std::int32_t>(g);
      }
      // -3: dropped without being merged.
      for (std::size_t i = 0; drop && i < (*drop)[static_cast<std::size_t>(h)].size(); ++i) {
        const std::int32_t t = (*drop)[static_cast<std::size_t>(h)][i];
        KVC_EXPECTS_IN(who, t >= 0 && t < L, "drop[", h, "][", i, "] = ", t, ", expected 0..", L - 1, " (kv head ", h,
                       " holds ", L, " tokens)");
        KVC_EXPECTS_IN(who, role[static_cast<std::size_t>(t)] != -3, "drop[", h, "][", i, "] = ", t,
                       " is listed twice, expected each token once");
        KVC_EXPECTS_IN(who, role[static_cast<std::size_t>(t)] == -1, "drop[", h, "][", i, "] = ", t,
                       " is a member of a group of kv head ", h, ", expected a token in no group");
        role[static_cast<std::size_t>(t)] = -3;
      }
      auto& kh = kept[static_cast<std::size_t>(h)];
      auto& nh = next[static_cast<std::size_t>(h)];
      auto& mh = merged[static_cast<std::size_t>(h)];
      for (std::int32_t t = 0; t < L; ++t)
        if (role[static_cast<std::size_t>(t)] > -2) kh.push_back(t);
      nh.resize(kh.size());
      mh.assign(kh.size(), -1);
      rows[static_cast<std::size_t>(h)].resize(gs.size() * 2 * static_cast<std::size_t>(D));
      const auto read = row_reader(s, layer, h);
      std::vector<float> mk(static_cast<std::size_t>(D)), mv(mk.size());
      std::vector<double> acc(2 * static_cast<std::size_t>(D));
      for (std::size_t i = 0; i < kh.size(); ++i) {
        const std::int32_t t = kh[i];
        const std::int32_t g = role[static_cast<std::size_t>(t)];
        if (g < 0) {
          nh[i] = w0[static_cast<std::size_t>(t)];
          continue;
        }
        const merge_group& gr = gs[static_cast<std::size_t>(g)];
        // Shifted by the largest log-weight among members of positive weight: exp never overflows.
        double mx = -std::numeric_limits<double>::infinity();
        for (std::size_t j = 0; j < gr.members.size(); ++j)
          if (gr.weights[j] > 0) mx = std::max(mx, static_cast<double>(w0[static_cast<std::size_t>(gr.members[j])]));
        double mass = 0, asum = 0;
        std::fill(acc.begin(), acc.end(), 0.0);
        for (std::size_t j = 0; j < gr.members.size(); ++j) {
          const double wj = gr.weights[j];
          if (wj == 0) continue;
          const double e = std::exp(static_cast<double>(w0[static_cast<std::size_t>(gr.members[j])]) - mx);
          mass += wj * e;
          const double a = mode == mean_weights::mass ? wj * e : wj;
          asum += a;
          read(gr.members[j], mk.data(), mv.data());
          for (std::int32_t d = 0; d < D; ++d) {
            acc[static_cast<std::size_t>(d)] += a * static_cast<double>(mk[static_cast<std::size_t>(d)]);
            acc[static_cast<std::size_t>(D + d)] += a * static_cast<double>(mv[static_cast<std::size_t>(d)]);
          }
        }
        const double lwn = mx + std::log(mass);
        KVC_EXPECTS_IN(who, std::fabs(lwn) <= std::numeric_limits<float>::max(), "groups[", h, "][", g,
                       "] gives log-weight ", lwn, ", expected a value representable as a finite float");
        nh[i] = static_cast<float>(lwn);
        float* out = rows[static_cast<std::size_t>(h)].data() + static_cast<std::size_t>(g) * 2 * D;
        for (std::int32_t d = 0; d < 2 * D; ++d) {
          const double x = acc[static_cast<std::size_t>(d)] / asum;
          KVC_EXPECTS_IN(who, std::fabs(x) <= static_cast<double>(std::numeric_limits<float>::max()), "groups[", h,
                         "][", g, "] gives merged ", d < D ? "key" : "value", " channel ", d % D, " = ", x,
                         ", expected a finite float");
          out[d] = static_cast<float>(x);
        }
        mh[i] = g;
      }
    }
    // Only the targets are rewritten: the other kept rows are compacted, not copied twice.
    std::vector<std::vector<std::int32_t>> targets(static_cast<std::size_t>(H));
    for (std::int32_t h = 0; h < H; ++h)
      for (std::size_t i = 0; i < merged[static_cast<std::size_t>(h)].size(); ++i)
        if (merged[static_cast<std::size_t>(h)][i] >= 0) targets[static_cast<std::size_t>(h)].push_back(static_cast<std::int32_t>(i));
    kv_.keep_layer_rewrite(s, layer, kept, [&](std::int32_t h, std::int32_t i, auto* k, auto* v) {
      const std::int32_t g = merged[static_cast<std::size_t>(h)][static_cast<std::size_t>(i)];
      if (g < 0) return;
      const float* r = rows[static_cast<std::size_t>(h)].data() + static_cast<std::size_t>(g) * 2 * D;
      store_row(r, k, D);
      store_row(r + D, v, D);
    }, &targets);
    // Committed; swaps do not throw.
    for (std::int32_t h = 0; h < H; ++h) lw[lw_.index(layer, h)].swap(next[static_cast<std::size_t>(h)]);
  }

  /// Keeps, for every kv head h, the tokens kept[h] (strictly increasing) and adds to kept
  /// values the updates mixes[h] (value_mix: v[recipient] += coef · v[source], from the rows as
  /// stored before the call, in double). Keys, positions and log-weights follow the kept tokens
  /// unchanged. All or nothing (kv_cache::keep_layer_rewrite); every argument is checked first.
  void keep_layer_mix_values(seq_id s, std::int32_t layer, const std::vector<std::vector<std::int32_t>>& kept,
                             const std::vector<std::vector<value_mix>>& mixes) {
    constexpr const char* who = "kvc::merge::merged_cache::keep_layer_mix_values";
    auto& lw = lw_.find(s, "keep_layer_mix_values");
    lw_.check_layer(layer, "keep_layer_mix_values");
    const std::int32_t H = config().num_kv_heads, D = config().head_dim;
    KVC_EXPECTS_IN(who, static_cast<std::int32_t>(mixes.size()) == H, "mixes.size() = ", mixes.size(),
                   ", expected num_kv_heads = ", H);
    std::vector<std::vector<float>> next = kept_weights(lw, layer, kept, "keep_layer_mix_values");
    // added[h]: per kept index, -1 or the row of rows[h] ([D] floats: the new value) it gets.
    std::vector<std::vector<std::int32_t>> added(static_cast<std::size_t>(H));
    std::vector<std::vector<float>> rows(static_cast<std::size_t>(H));
    for (std::int32_t h = 0; h < H; ++h) {
      const auto& kh = kept[static_cast<std::size_t>(h)];
      const auto& mh = mixes[static_cast<std::size_t>(h)];
      const std::int32_t L = kv_.length(s, layer, h);
      const auto read = row_reader(s, layer, h);
      // Many mixes (a one-shot CaM compression: about M per evicted token) read each row many
      // times: then the head's values are converted to float once (kv_cache::gather, F16C for
      // half) instead of per read. A few mixes (one token per step) read their rows in place.
      std::vector<float> vf;
      if (mh.size() > static_cast<std::size_t>(L) / 4) {
        vf.resize(static_cast<std::size_t>(L) * D);
        kv_.gather(s, layer, h, nullptr, vf.data());
      }
      std::vector<float> one(static_cast<std::size_t>(D));
      auto value_row = [&](std::int32_t t) -> const float* {
        if (!vf.empty()) return vf.data() + static_cast<std::size_t>(t) * D;
        read(t, nullptr, one.data());
        return one.data();
      };
      std::vector<std::int32_t> slot(static_cast<std::size_t>(L), -1);  // stream index -> kept index
      for (std::size_t i = 0; i < kh.size(); ++i)
        if (kh[i] >= 0 && kh[i] < L) slot[static_cast<std::size_t>(kh[i])] = static_cast<std::int32_t>(i);
      auto& ah = added[static_cast<std::size_t>(h)];
      ah.assign(kh.size(), -1);
      std::vector<double> acc;  // [recipients][D]
      for (std::size_t j = 0; j < mh.size(); ++j) {
        const value_mix& x = mh[j];
        KVC_EXPECTS_IN(who, x.recipient >= 0 && x.recipient < L && slot[static_cast<std::size_t>(x.recipient)] >= 0,
                       "mixes[", h, "][", j, "].recipient = ", x.recipient, ", expected a kept token of kv head ", h,
                       " (one of kept[", h, "], the stream holds ", L, " tokens)");
        KVC_EXPECTS_IN(who, x.source >= 0 && x.source < L, "mixes[", h, "][", j, "].source = ", x.source,
                       ", expected 0..", L - 1, " (kv head ", h, " holds ", L, " tokens)");
        KVC_EXPECTS_IN(who, std::isfinite(x.coef), "mixes[", h, "][", j, "].coef = ", x.coef, ", expected a finite value");
        const std::int32_t i = slot[static_cast<std::size_t>(x.recipient)];
        std::int32_t& row = ah[static_cast<std::size_t>(i)];
        if (row < 0) {
          row = static_cast<std::int32_t>(acc.size() / static_cast<std::size_t>(D));
          const float* v = value_row(x.recipient);
          for (std::int32_t d = 0; d < D; ++d) acc.push_back(static_cast<double>(v[d]));
        }
        const float* v = value_row(x.source);
        double* a = acc.data() + static_cast<std::size_t>(row) * D;
        const double c = static_cast<double>(x.coef);
        for (std::int32_t d = 0; d < D; ++d) a[d] += c * static_cast<double>(v[d]);
      }
      auto& rh = rows[static_cast<std::size_t>(h)];
      rh.resize(acc.size());
      for (std::size_t e = 0; e < acc.size(); ++e) {
        KVC_EXPECTS_IN(who, std::fabs(acc[e]) <= static_cast<double>(std::numeric_limits<float>::max()), "mixes[", h,
                       "] give value channel ", e % static_cast<std::size_t>(D), " = ", acc[e],
                       ", expected a finite float");
        rh[e] = static_cast<float>(acc[e]);
      }
    }
    // Only the recipients are rewritten (kv_.keep_layer_rewrite's rows): kept indices, ascending.
    std::vector<std::vector<std::int32_t>> recipients(static_cast<std::size_t>(H));
    for (std::int32_t h = 0; h < H; ++h)
      for (std::size_t i = 0; i < added[static_cast<std::size_t>(h)].size(); ++i)
        if (added[static_cast<std::size_t>(h)][i] >= 0) recipients[static_cast<std::size_t>(h)].push_back(static_cast<std::int32_t>(i));
    kv_.keep_layer_rewrite(s, layer, kept, [&](std::int32_t h, std::int32_t i, auto*, auto* v) {
      const std::int32_t row = added[static_cast<std::size_t>(h)][static_cast<std::size_t>(i)];
      if (row < 0) return;
      store_row(rows[static_cast<std::size_t>(h)].data() + static_cast<std::size_t>(row) * D, v, D);
    }, &recipients);
    for (std::int32_t h = 0; h < H; ++h) lw[lw_.index(layer, h)].swap(next[static_cast<std::size_t>(h)]);
  }

  std::int32_t length(seq_id s, std::int32_t layer, std::int32_t head) const { return kv_.length(s, layer, head); }
  /// The log-weight of every stored token of one stream, in stream order (length() floats).
  const std::vector<float>& log_weights(seq_id s, std::int32_t layer, std::int32_t head) const {
    const auto& lw = lw_.find(s, "log_weights");
    lw_.check_layer(layer, "log_weights");
    lw_.check_head(head, "log_weights");
    return lw[lw_.index(layer, head)];
  }

  /// All heads of one layer: the pages' plain views with each token's log-weight beside them, what
  /// kvc::reference::decode_attention reads (s_t = scale q·k_t + lw_t); the plain CPU and CUDA
  /// kernels refuse these heads at compile time (cpu::merged_decode_attention is the kernel). The
  /// result points into `buf`, which must outlive it and the stream's next change.
  layer_view layer(seq_id s, std::int32_t layer, layer_buffer& buf) const {
    const auto& lw = lw_.find(s, "layer");
    lw_.check_layer(layer, "layer");
    const std::int32_t H = config().num_kv_heads;
    const auto heads = kv_.layer(s, layer, buf.views);
    buf.weights.resize(static_cast<std::size_t>(H));
    for (std::int32_t h = 0; h < H; ++h) buf.weights[static_cast<std::size_t>(h)] = lw[lw_.index(layer, h)].data();
    return {{heads, buf.weights.data()}, this, s, layer};
  }

  /// Pool bytes of the K/V pages.
  std::size_t bytes_in_use() const noexcept { return kv_.bytes_in_use(); }
  std::size_t bytes_in_use(std::int32_t layer) const { return kv_.bytes_in_use(layer); }
  /// Host bytes: the inner cache's bookkeeping plus 4 bytes of log-weight per stored token.
  std::size_t metadata_bytes() const noexcept {
    std::size_t b = kv_.metadata_bytes();
    for (const auto& kv : lw_)
      for (const auto& w : kv.second) b += sizeof(float) * w.size();
    return b;
  }

 private:
  /// A reader of one stream's rows as floats, in the domain keep_layer_rewrite writes:
  /// read(t, k, v) fills k and v (either may be null) with token t's key and value.
  auto row_reader(seq_id s, std::int32_t layer, std::int32_t h) const {
    if constexpr (encoded) {
      return [this, sv = kv_.view(s, layer, h)](std::int32_t t, float* k, float* v) { kv_.decode_unroped_rows(sv, t, k, v); };
    } else {
      using T = typename Store::value_type;
      const std::int32_t D = config().head_dim, P = config().page_size;
      return [this, &pages = kv_.pages(s, layer, h), D, P](std::int32_t t, float* k, float* v) {
        const T* page = reinterpret_cast<const T*>(kv_.pool().data(pages[static_cast<std::size_t>(t / P)]));
        if (k) load_row(page + static_cast<std::size_t>(t % P) * D, k, D);
        if (v) load_row(page + static_cast<std::size_t>(P + t % P) * D, v, D);
      };
    }
  }
  template <class E>
  static void load_row(const E* src, float* dst, std::int32_t D) noexcept {
    if constexpr (std::is_same<E, half>::value) detail::half_to_float_n(src, static_cast<std::size_t>(D), dst);  // F16C where the CPU has it
    else
      for (std::int32_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]);
  }
  /// A float row into the store's row type (float for an encoded store, which encodes it itself).
  /// F16C for half pages: CaM rewrites about M recipients per evicted token, and the scalar
  /// portable conversion of those rows was a third of its decode-time step (bench_merge
  /// BM_merge_schedule, cam, 4k, interval 32: perf, session 26).
  template <class E>
  static void store_row(const float* src, E* dst, std::int32_t D) noexcept {
    if constexpr (std::is_same<E, half>::value) detail::float_to_half_n(src, static_cast<std::size_t>(D), dst);
    else
      for (std::int32_t d = 0; d < D; ++d) dst[d] = E(src[d]);
  }

  std::size_t streams() const noexcept {
    return static_cast<std::size_t>(config().num_layers) * static_cast<std::size_t>(config().num_kv_heads);
  }
  /// The log-weights of the kept tokens; an index out of range is left to kv_cache's check (which
  /// names it), so here it only must not be read.
  std::vector<std::vector<float>> kept_weights(const std::vector<std::vector<float>>& lw, std::int32_t layer,
                                               const std::vector<std::vector<std::int32_t>>& kept, const char* fn) const {
    KVC_EXPECTS_IN(detail::concat("kvc::merge::merged_cache::", fn),
                   static_cast<std::int32_t>(kept.size()) == config().num_kv_heads, "kept.size() = ", kept.size(),
                   ", expected num_kv_heads = ", config().num_kv_heads);
    std::vector<std::vector<float>> next(kept.size());
    for (std::size_t h = 0; h < kept.size(); ++h) {
      const auto& w = lw[lw_.index(layer, static_cast<std::int32_t>(h))];
      next[h].reserve(kept[h].size());
      for (std::int32_t t : kept[h])
        next[h].push_back(t >= 0 && static_cast<std::size_t>(t) < w.size() ? w[static_cast<std::size_t>(t)] : 0.0f);
    }
    return next;
  }

  inner_cache kv_;
  /// Per sequence, the log-weights [layer * num_kv_heads + head][token].
  detail::sequence_table<std::vector<std::vector<float>>> lw_{"kvc::merge::merged_cache", config().num_layers,
                                                               config().num_kv_heads};
};

/// Every kv head's keys of one layer, as stored ([num_kv_heads][n_h · head_dim], float): what
/// the similarity-based methods (D2O, KVMerger) plan from.
template <class Store>
std::vector<std::vector<float>> layer_keys(const basic_merged_cache<Store>& cache, seq_id s, std::int32_t layer) {
  const std::int32_t H = cache.config().num_kv_heads, D = cache.config().head_dim;
  std::vector<std::vector<float>> keys(static_cast<std::size_t>(H));
  for (std::int32_t h = 0; h < H; ++h) {
    auto& kh = keys[static_cast<std::size_t>(h)];
    kh.resize(static_cast<std::size_t>(cache.length(s, layer, h)) * static_cast<std::size_t>(D));
    cache.cache().gather(s, layer, h, kh.data());
  }
  return keys;
}

/// Rescales each group's weights ω (a method's own, e.g. D2O's or KVMerger's) so that merge_layer
/// in mean_weights::mass takes the mean weighted by ω_i·exp(lw_i) and gives the merged token the
/// members' total mass, log Σ exp(lw_i): w_i = ω_i·M / Σ_j ω_j·exp(lw_j), M = Σ_j exp(lw_j) (mass
/// mode's log-weight is log Σ w_i·exp(lw_i) = log M). With every lw 0 (no earlier merge) the mean
/// is the method's own. When a member's mass underflows against another's (lw apart by > ~700)
/// the weights are not finite and merge_layer rejects them, changing nothing.
/// \param lw  the log-weights of the stream the groups index (merged_cache::log_weights)
/// \param total  false: the merged token keeps its target's mass instead, log-weight lw_target
///               unchanged (M = exp(lw_target)): the papers' form, where a merged token weighs as
///               one token in attention; the mean is the same
inline void keep_total_mass(std::vector<merge_group>& groups, const std::vector<float>& lw, bool total = true) {
  for (auto& mg : groups) {
    double mx = -std::numeric_limits<double>::infinity();
    for (std::int32_t t : mg.members) mx = std::max(mx, static_cast<double>(lw[static_cast<std::size_t>(t)]));
    double mass = 0, wmass = 0;
    for (std::size_t j = 0; j < mg.members.size(); ++j) {
      const double e = std::exp(static_cast<double>(lw[static_cast<std::size_t>(mg.members[j])]) - mx);
      mass += total || mg.members[j] == mg.target ? e : 0.0;
      wmass += static_cast<double>(mg.weights[j]) * e;
    }
    for (auto& w : mg.weights) w = static_cast<float>(static_cast<double>(w) * mass / wmass);
  }
}

}  // namespace merge
KVC_END_NAMESPACE
