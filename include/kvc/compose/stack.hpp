// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `compose::stack<Stages...>`: a policy stack as one type over one store. Each stage names a
/// family; the stack checks their order at compile time and instantiates the store they need:
///
///   using S = kvc::compose::stack<kvc::compose::evicting<kvc::evict::snapkv>,   // eviction
///                                 kvc::compose::merging<kvc::compose::d2o>,     // merging
///                                 kvc::compose::encoding<kvc::quant::kivi<4>>>; // quantization
///   // S::store_type is merge::basic_merged_cache<quant_cache<kivi<4>, kivi<4>>>: the merged
///   // tokens' log-weights over KIVI-4 pages; S::compress evicts by SnapKV and merges by D2O what
///   // it drops, in one all-or-nothing step per layer; S::decode_attention reads the codes and
///   // adds the log-weights (cpu/merged_quant_attention.hpp).
///
/// Stages, in this order, each at most once:
///  - `evicting<Scorer>`: any kvc/evict/ scorer, at `options.target` after the prompt (compress);
///  - `merging<Method>`: `d2o` or `cam` (kvc/merge/), folding what the eviction drops into kept
///    tokens, which carry their members' mass as log-weights; needs an eviction stage;
///  - `projecting<pca>` (its own header, kvc/compose/projecting.hpp): every token kept as r_k key
///    and r_v value coefficients in bases each (layer, kv head) fits from the layer's first
///    append, the prompt; the store is then lowrank::projected_cache, which the eviction stage
///    scores through its rebuilt rows and decode attends to in coefficient space;
///  - `encoding<KQ, VQ>` (kvc/quant/ codecs) or `full_precision<T>` (float or half, the default):
///    what the pages hold. It is the store, so it comes last.
/// Not yet at compile time (each static_assert says so): a projection under a merging stage
/// (projected pages carry no log-weights) and a projection over an encoding (coefficients in
/// quantized pages); the second composes at run time, `snapkv(...)+pca(...,coef=int8)`
/// (runtime/lowrank_storages.hpp).
/// The run-time spec strings build their own objects (runtime/make_cache.hpp), not these.
/// Threads: as the store (docs/threading.md); compress is exclusive per sequence.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <map>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <kvc/attention/options.hpp>
#include <kvc/cpu/decode_attention.hpp>
#include <kvc/cpu/merged_attention.hpp>
#include <kvc/cpu/merged_quant_attention.hpp>
#include <kvc/cpu/quant_attention.hpp>
#include <kvc/error.hpp>
#include <kvc/evict/compressor.hpp>
#include <kvc/isa.hpp>
#include <kvc/merge/cam.hpp>
#include <kvc/merge/d2o.hpp>
#include <kvc/numeric/half.hpp>
#include <kvc/store/kv_cache.hpp>
#include <kvc/store/merged_cache.hpp>
#include <kvc/store/quant_cache.hpp>

KVC_BEGIN_NAMESPACE
namespace compose {
// Per ISA (docs/isa.md, rule 4): the stack calls the CPU kernels, and the merging stages the
// merge methods, so every type here is compiled per ISA configuration.
KVC_BEGIN_ISA_NAMESPACE

// ---- stages ------------------------------------------------------------------------------------

/// Eviction by Scorer (kvc/evict/): its selection at options.target after the prompt.
template <class Scorer>
struct evicting {
  static_assert(evict::is_scorer_v<Scorer>,
                "kvc::compose::evicting<Scorer>: Scorer must be an eviction scorer (kvc/evict/, e.g. evict::snapkv)");
  using scorer_type = Scorer;
  Scorer scorer{};
  evict::compressor_options options{};
};

/// D2O (kvc/merge/d2o.hpp): each evicted token merges into its most similar kept token when the
/// similarity passes the layer's moving threshold, carried here per (sequence, layer).
struct d2o {
  merge::d2o_options options{};
  std::map<std::pair<seq_id, std::int32_t>, merge::d2o_threshold> thresholds{};
  template <class Store>
  void apply(merge::basic_merged_cache<Store>& c, seq_id s, std::int32_t layer, const evict::layer_scores&,
             const std::vector<std::vector<std::int32_t>>& kept) {
    merge::d2o_merge_layer(c, s, layer, kept, thresholds[{s, layer}], options);
  }
  /// Forgets the thresholds of a removed sequence.
  void remove_sequence(seq_id s) {
    for (auto it = thresholds.begin(); it != thresholds.end();) it = it->first.first == s ? thresholds.erase(it) : std::next(it);
  }
};

/// CaM (kvc/merge/cam.hpp): each evicted value spreads over kept values by attention, so the
/// eviction's scores must be attention-like (snapkv, h2o, tova).
struct cam {
  merge::cam_options options{};
  template <class Store>
  void apply(merge::basic_merged_cache<Store>& c, seq_id s, std::int32_t layer, const evict::layer_scores& scores,
             const std::vector<std::vector<std::int32_t>>& kept) {
    merge::cam_merge_layer(c, s, layer, scores, kept, options);
  }
  void remove_sequence(seq_id) noexcept {}  ///< CaM carries nothing between steps
};

/// Merging by Method (d2o, cam): what the eviction stage drops is folded into kept tokens.
template <class Method>
struct merging {
  Method method{};
};

/// Low-rank projection by Method (kvc/compose/projecting.hpp, which defines it: its store and
/// PCA's fit cost a TU that does not project nothing, Eigen's eigensolver ~11 s of CPU at -O2).
template <class Method>
struct projecting;

/// Pages of codes: KQ for keys, VQ for values (kvc/quant/ codecs).
template <class KQ, class VQ = KQ>
struct encoding {
  KQ keys{};
  VQ values{};
};

/// Pages of float or kvc::half.
template <class T = half>
struct full_precision {
  static_assert(std::is_same<T, float>::value || std::is_same<T, half>::value,
                "kvc::compose::full_precision<T>: T must be float or kvc::half");
};

namespace detail {

struct none {};
template <class S>
struct is_evicting : std::false_type {};
template <class Sc>
struct is_evicting<evicting<Sc>> : std::true_type {};
template <class S>
struct is_merging : std::false_type {};
template <class M>
struct is_merging<merging<M>> : std::true_type {};
template <class S>
struct is_projecting : std::false_type {};
template <class M>
struct is_projecting<projecting<M>> : std::true_type {};
template <class S>
struct is_encoding : std::false_type {};
template <class KQ, class VQ>
struct is_encoding<encoding<KQ, VQ>> : std::true_type {};
template <class T>
struct is_encoding<full_precision<T>> : std::true_type {};

/// Index of the first stage satisfying P, or sizeof...(S) when none does.
template <template <class> class P, class... S>
constexpr std::size_t index_of() {
  constexpr bool hit[] = {P<S>::value..., false};
  for (std::size_t i = 0; i < sizeof...(S); ++i)
    if (hit[i]) return i;
  return sizeof...(S);
}
template <template <class> class P, class... S>
constexpr std::size_t count_of() {
  return (std::size_t{0} + ... + (P<S>::value ? 1 : 0));
}

/// The stage at index I, or Default when I is past the end.
template <std::size_t I, class Default, class... S>
struct stage_at {
  using type = Default;
};
template <std::size_t I, class Default, class First, class... Rest>
struct stage_at<I, Default, First, Rest...> {
  using type = std::conditional_t<I == 0, First, typename stage_at<(I == 0 ? 0 : I - 1), Default, Rest...>::type>;
};

/// The store of an encoding stage; P: the projecting stage, or none.
template <class E, class P>
struct store_of;
template <class T, class P>
struct store_of<full_precision<T>, P> {  // a projection's coefficients in pages of T
  using type = typename P::template store_type<T>;
};
template <class KQ, class VQ, class P>
struct store_of<encoding<KQ, VQ>, P> {  // under a projection: refused by stack's static_assert
  using type = quant_cache<KQ, VQ>;
};
template <class T>
struct store_of<full_precision<T>, none> {
  using type = kv_cache<T>;
};

template <class S>
struct scorer_of {
  using type = void;
};
template <class Sc>
struct scorer_of<evicting<Sc>> {
  using type = Sc;
};

}  // namespace detail

// ---- the stack ---------------------------------------------------------------------------------

/// A policy stack over one store: see the file comment.
template <class... Stages>
class stack {
  static constexpr std::size_t N = sizeof...(Stages);
  static constexpr std::size_t ie = detail::index_of<detail::is_evicting, Stages...>();
  static constexpr std::size_t im = detail::index_of<detail::is_merging, Stages...>();
  static constexpr std::size_t ip = detail::index_of<detail::is_projecting, Stages...>();
  static constexpr std::size_t ic = detail::index_of<detail::is_encoding, Stages...>();
  static_assert(((detail::is_evicting<Stages>::value || detail::is_merging<Stages>::value ||
                  detail::is_projecting<Stages>::value || detail::is_encoding<Stages>::value) && ...),
                "kvc::compose::stack<Stages...>: every stage must be evicting<Scorer>, merging<Method>, "
                "projecting<Method>, encoding<KQ, VQ> or full_precision<T>");
  static_assert(detail::count_of<detail::is_evicting, Stages...>() <= 1 &&
                    detail::count_of<detail::is_merging, Stages...>() <= 1 &&
                    detail::count_of<detail::is_projecting, Stages...>() <= 1 &&
                    detail::count_of<detail::is_encoding, Stages...>() <= 1,
                "kvc::compose::stack<Stages...>: at most one stage of each family (one evicting, one merging, one "
                "projecting, one encoding or full_precision)");
  static_assert(ip == N || ie == N || ie < ip,
                "kvc::compose::stack<Stages...>: put evicting<Scorer> before projecting<Method> (eviction -> merging "
                "-> low-rank -> quantization; the eviction scores the rows the projection rebuilds)");
  static_assert(ip == N || im == N,
                "kvc::compose::stack<Stages...>: merging<Method> over projecting<Method> is not implemented (projected "
                "pages carry no log-weights); drop one of the two stages");
  static_assert(im == N || ie < im,
                "kvc::compose::stack<Stages...>: merging<Method> folds in the tokens an eviction drops; put an "
                "evicting<Scorer> stage before it");
  static_assert(ic == N || ic == N - 1,
                "kvc::compose::stack<Stages...>: the encoding (encoding<KQ, VQ> or full_precision<T>) is the store; "
                "make it the last stage");

 public:
  using evict_stage = typename detail::stage_at<ie, detail::none, Stages...>::type;
  using merge_stage = typename detail::stage_at<im, detail::none, Stages...>::type;
  using encoding_stage = typename detail::stage_at<ic, full_precision<half>, Stages...>::type;
  static constexpr bool evicts = ie < N;
  static constexpr bool merges = im < N;
  static constexpr bool projects = ip < N;
  using project_stage = typename detail::stage_at<ip, detail::none, Stages...>::type;
  static_assert(!projects || std::is_same<encoding_stage, full_precision<float>>::value ||
                    std::is_same<encoding_stage, full_precision<half>>::value,
                "kvc::compose::stack<Stages...>: projecting<Method> stores its coefficients in full_precision<T> "
                "pages only at compile time; for quantized coefficients use the run-time spec "
                "`pca(rank=...,coef=int8)` (kvc/runtime/lowrank_storages.hpp), or drop the encoding stage");
  /// The store the stages need: the encoding's pages (of coefficients under a projection), under
  /// log-weights when a stage merges.
  using inner_store = typename detail::store_of<encoding_stage, project_stage>::type;
  using store_type = std::conditional_t<merges, merge::basic_merged_cache<inner_store>, inner_store>;

  /// cfg: the cache's shape (a quant_cache_config: its sink and fp-page fields serve an encoding
  /// stage and are ignored by full-precision pages); stages: the stack's stage objects, in order.
  explicit stack(const quant_cache_config& cfg, Stages... stages)
      : stages_(std::move(stages)...), store_(make_store(cfg)), comp_(make_compressor()) {}
  /// Every stage default-constructed (the policies' published defaults).
  template <std::size_t M = N, class = std::enable_if_t<(M > 0)>>
  explicit stack(const quant_cache_config& cfg) : stack(cfg, Stages{}...) {}

  store_type& store() noexcept { return store_; }
  const store_type& store() const noexcept { return store_; }
  /// The stage objects (a merging method's carried state among them).
  const std::tuple<Stages...>& stages() const noexcept { return stages_; }

  seq_id add_sequence() { return store_.add_sequence(); }
  void remove_sequence(seq_id s) {
    store_.remove_sequence(s);
    if constexpr (evicts) comp_.remove_sequence(s);
    if constexpr (merges) std::get<im>(stages_).method.remove_sequence(s);
  }
  /// Appends n tokens ([n][num_kv_heads][head_dim] keys and values) to one layer. Under a
  /// projecting stage the layer's first append fits its bases (all heads, at least
  /// max(rank, value_rank) tokens); if the append then fails the bases go too, so a refused
  /// append leaves the stack unchanged.
  void append(seq_id s, std::int32_t layer, const float* k, const float* v, std::int32_t n,
              const std::int32_t* positions = nullptr) {
    if constexpr (projects) {
      constexpr const char* who = "kvc::compose::stack::append";
      KVC_EXPECTS_IN(who, store_.contains(s), "seq = ", s, " is not a live sequence of this stack (the stack is unchanged)");
      if (n > 0 && !store_.has_basis(layer, 0)) {
        std::get<ip>(stages_).fit(store_, layer, k, v, n, who, [&] { store_.append(s, layer, k, v, n, positions); });
        return;
      }
    }
    store_.append(s, layer, k, v, n, positions);
  }

  /// After the prompt of `layer`: the eviction stage's selection at its target, and the merge of
  /// what it drops when a merging stage follows. All or nothing for the layer. A stack without an
  /// eviction stage has nothing to do.
  evict::compress_report compress(seq_id s, std::int32_t layer, const evict::observations& obs = {}) {
    if constexpr (!evicts) {
      (void)s, (void)layer, (void)obs;
      return {};
    } else if constexpr (!merges) {
      return comp_.after_prefill(store_, s, layer, obs);
    } else {
      const auto& comp = comp_;
      evict::layer_scores scores;
      const evict::layer_selection kept = comp.plan(store_.cache(), s, layer, obs, comp.options().target, &scores);
      evict::compress_report r;
      for (std::int32_t h = 0; h < store_.config().num_kv_heads; ++h) {
        r.tokens_before += store_.length(s, layer, h);
        r.tokens_after += static_cast<std::int64_t>(kept[static_cast<std::size_t>(h)].size());
      }
      if (r.tokens_after == r.tokens_before) return r;
      const memory_traffic before = store_.cache().traffic();
      std::get<im>(stages_).method.apply(store_, s, layer, scores, kept);
      const memory_traffic after = store_.cache().traffic();
      r.bytes_allocated = static_cast<std::size_t>(after.bytes_allocated - before.bytes_allocated);
      r.bytes_released = static_cast<std::size_t>(after.bytes_released - before.bytes_released);
      r.compressed = true;
      return r;
    }
  }

  /// Decode attention of one query token per query head over one layer: the store's own kernel
  /// (codes read directly; log-weights added when a stage merges).
  void decode_attention(seq_id s, std::int32_t layer, const float* q, std::int32_t num_q_heads, float* out,
                        const decode_options& opt = {}) const {
    if constexpr (merges) cpu::merged_decode_attention(store_, s, layer, q, num_q_heads, out, opt);
    else if constexpr (projects) std::get<ip>(stages_).decode_attention(store_, s, layer, q, num_q_heads, out, opt);
    else cpu::decode_attention(store_, s, layer, q, num_q_heads, out, opt);
  }

  /// Bytes of live pages in the store's pools: what the stack holds.
  std::size_t bytes_in_use() const noexcept { return store_.bytes_in_use(); }

 private:
  using compressor_type =
      std::conditional_t<evicts, evict::compressor<typename detail::scorer_of<evict_stage>::type>, detail::none>;

  store_type make_store(const quant_cache_config& cfg) const {
    if constexpr (projects) {
      return std::get<ip>(stages_).template make_store<store_type>(cfg);
    } else if constexpr (std::is_same<inner_store, kv_cache<float>>::value || std::is_same<inner_store, kv_cache<half>>::value) {
      return store_type(static_cast<const cache_config&>(cfg));
    } else {  // an encoding<KQ, VQ> stage: the codecs it holds
      const auto& e = std::get<ic>(stages_);
      return store_type(cfg, e.keys, e.values);
    }
  }
  compressor_type make_compressor() const {
    if constexpr (evicts) {
      const auto& e = std::get<ie>(stages_);
      return compressor_type(e.scorer, e.options);
    } else {
      return {};
    }
  }

  std::tuple<Stages...> stages_;
  store_type store_;
  /// The eviction stage's compressor (its scorer, options and decode-step counters), when it evicts.
  compressor_type comp_;
};

KVC_END_ISA_NAMESPACE
}  // namespace compose
KVC_END_NAMESPACE
