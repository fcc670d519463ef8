// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Eviction policies by name, for harnesses and engines that choose them from a spec string
/// (runtime/spec.hpp grammar). Every scorer of <kvc/evict/> is registered with its published
/// defaults; each argument below overrides one field of the scorer's params:
///
///   streaming_llm(sinks=4)
///   snapkv(window=64, kernel=5, pool=avg|max, agg=mean|max, sinks=4)
///   pyramidkv(window=64, kernel=5, beta=20, pool=avg|max, agg=mean|max, sinks=4)
///   cake(window=64, kernel=5, tau1=1, tau2=1, sinks=4)        SnapKV scores, CAKE layer budgets
///   finch(window=64, agg=mean|max, sinks=4)                    the last `window` queries are the span
///   noncausal_attention(chunk=256, pool_kernel=3, agg=mean|max, sinks=4, recent=0)   prefill only
///   simlayerkv(n_last=1, n_recent=1024, n_initial=4, lazy_threshold=1.0)     budget does not apply
///   h2o(recent=64, sinks=4, normalize=0)   tova(share_heads=1, sinks=4)   scissorhands(history=64, recent=64, sinks=4)
///   a2sf(recent=64, sinks=4, forgetting=0.9)
///   knorm(sinks=4, recent=0)   keydiff(sinks=4, recent=0)   random(seed=0, sinks=0, recent=0)
///   lagkv(lag=128, sinks=4, cross_scoring=0)   curdkv(window=16, sinks=4)
///   leverage(sketch_dimension=48, jitter=1e-6, seed=0, unrotate=1, sinks=4, recent=0)
///   expected_attention(n_future_positions=512, n_sink=4, use_covariance=1, use_vnorm=1, epsilon=0, agg=mean|max,
///                      sinks_in_softmax=1)
///   qfilters(calibration=0, sinks=4, recent=0)
///   chunkkv(INNER, chunk_length=20)   rkv(INNER, lambda=0.1)   vnorm(INNER, epsilon=0)
///       wrappers; INNER is any policy above (default snapkv for chunkkv and rkv), e.g.
///       "vnorm(tova)", "chunkkv(snapkv(window=32), chunk_length=10)"
///
/// A top-level evictor also takes its budget and how it is applied:
///   ratio=R (fraction evicted, [0, 1)) | tokens=N (per stream), alloc=uniform|ada|pyramid,
///   alpha_safeguard=0.2 (ada), interval=1, slack=0 (decode phase)
/// e.g. `snapkv(ratio=0.5,window=32)`, `vnorm(tova,ratio=0.75)`, `knorm(tokens=256,alloc=ada)`.
///
/// What a scorer observes decides what the caller must feed (evictor::what(), evictor::window):
/// a query window (the caller's last `window` rotated queries, or every query of the prompt when
/// window = -1), decode attention (an attention_observer built with evictor::observer), or
/// query statistics (a query_stats_accumulator of pre-RoPE queries and the model's RoPE).
/// Deviations from the papers' defaults, forced by a run-time cache:
///  - finch keeps the kept keys at their positions (no re-rotation: any_cache cannot rewrite keys);
///  - qfilters are fitted per layer from the query window (the prompt's queries, or its last
///    `calibration` ones) unless evictor_context::qfilters supplies offline-calibrated filters;
///  - a2sf's forgetting factor is not fixed by the paper (tuned per task); 0.9 is kvc's choice.
/// window_attention.hpp is a helper (window softmax), not a scorer.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <kvc/attention/rope.hpp>
#include <kvc/budget/allocator.hpp>
#include <kvc/budget/budget.hpp>
#include <kvc/error.hpp>
#include <kvc/evict/a2sf.hpp>
#include <kvc/evict/any_scorer.hpp>
#include <kvc/evict/cake.hpp>
#include <kvc/evict/chunkkv.hpp>
#include <kvc/evict/compressor.hpp>
#include <kvc/evict/core.hpp>
#include <kvc/evict/curdkv.hpp>
#include <kvc/evict/expected_attention.hpp>
#include <kvc/evict/finch.hpp>
#include <kvc/evict/h2o.hpp>
#include <kvc/evict/keydiff.hpp>
#include <kvc/evict/knorm.hpp>
#include <kvc/evict/lagkv.hpp>
#include <kvc/evict/leverage.hpp>
#include <kvc/evict/noncausal_attention.hpp>
#include <kvc/evict/observer.hpp>
#include <kvc/evict/pyramidkv.hpp>
#include <kvc/evict/qfilters.hpp>
#include <kvc/evict/random.hpp>
#include <kvc/evict/rkv.hpp>
#include <kvc/evict/scissorhands.hpp>
#include <kvc/evict/select.hpp>
#include <kvc/evict/simlayerkv.hpp>
#include <kvc/evict/snapkv.hpp>
#include <kvc/evict/streaming_llm.hpp>
#include <kvc/evict/tova.hpp>
#include <kvc/evict/vnorm.hpp>
#include <kvc/runtime/spec.hpp>

KVC_BEGIN_NAMESPACE
namespace runtime {

/// What builders read from the model rather than from the spec.
struct evictor_context {
  std::int32_t num_layers = 0;
  std::int32_t num_q_heads = 0;  ///< 0: the cache's num_kv_heads (no GQA)
  /// The model's RoPE (how stored keys were rotated): leverage un-rotates keys with it. Not owned;
  /// must outlive the evictor.
  const rope* rotary = nullptr;
  /// Offline-calibrated Q-filters [num_layers][num_kv_heads][head_dim] (fit_qfilters); not owned.
  /// Null: qfilters are fitted from the query window the caller feeds.
  const float* qfilters = nullptr;
};

/// An evictor built from a spec: the scorer, the compressor options, and what the caller feeds.
struct evictor {
  std::string spec;
  evict::any_scorer scorer;
  evict::compressor_options options;
  /// For scorers observing decode attention: how the attention_observer accumulates (a2sf).
  evict::observer_params observer;
  /// Queries the caller keeps for a query window: 0 none, -1 every query of the prompt.
  std::int32_t window = 0;
  /// Set for cake: before compressing, the caller computes evict::cake_preference of every layer
  /// and sets options.alloc = allocator::cake(preferences) (see cake_allocator()).
  std::optional<evict::cake_params> cake;

  evict::observes what() const { return scorer.what(); }
  evict::compressor<evict::any_scorer> compressor() const { return evict::compressor<evict::any_scorer>(scorer, options); }
};

namespace detail {

/// Gives a wrapper over any_scorer (chunkkv<any_scorer>, ...) the observation type of its inner
/// scorer, which any_scorer only knows at run time (it reports what() from observation_type).
template <class O, class S>
struct observing {
  using params_type = typename S::params_type;
  using observation_type = O;
  static constexpr unsigned reads = S::reads;
  static constexpr const char* name = S::name;
  S s;
  evict::protection protect() const { return s.protect(); }
  void score(const evict::layer_input& in, const evict::observations& obs, evict::layer_scores& out) const {
    s.score(in, obs, out);
  }
  /// The wrapper's own selection when it has one (ChunkKV), else the shared one: what any_scorer does.
  void select(const evict::layer_input& in, const evict::observations& obs, const evict::layer_scores& sc,
              const budget& b, const allocator& a, evict::protection p, evict::layer_selection& out) const {
    if constexpr (evict::detail::has_select<S>::value) s.select(in, obs, sc, b, a, p, out);
    else evict::select_layer(in, sc, b, a, p, out);
  }
};

template <class S>
evict::any_scorer observing_as(S s, evict::observes o) {
  switch (o) {
    case evict::observes::query_window: return evict::any_scorer(observing<evict::query_window, S>{std::move(s)});
    case evict::observes::attention: return evict::any_scorer(observing<evict::attention_observer, S>{std::move(s)});
    case evict::observes::query_stats: return evict::any_scorer(observing<evict::query_stats, S>{std::move(s)});
    case evict::observes::nothing: break;
  }
  return evict::any_scorer(observing<evict::no_observation, S>{std::move(s)});
}

/// Q-Filters fitted per layer from the query window (the calibration queries), then scored as
/// evict::qfilters: the principal direction of the layer's queries, per kv-head.
struct window_qfilters {
  using params_type = evict::qfilters_params;
  using observation_type = evict::query_window;
  static constexpr unsigned reads = evict::reads_keys;
  static constexpr const char* name = "qfilters";
  evict::protection prot{4, 0};
  std::int32_t calibration = 0;  ///< the last N window queries; 0: all of them
  evict::protection protect() const { return prot; }
  void score(const evict::layer_input& in, const evict::observations& obs, evict::layer_scores& out) const {
    const evict::query_window& w = evict::detail::need_window(obs, name);
    evict::check_window(w, in, name);
    const std::int32_t m = calibration > 0 ? std::min(calibration, w.n) : w.n;
    KVC_EXPECTS(m > 0, "kvc::runtime qfilters: the query window is empty, expected calibration queries");
    const float* q = w.q + static_cast<std::size_t>(w.n - m) * w.num_q_heads * w.head_dim;
    const std::vector<float> f = evict::fit_qfilters(q, m, w.num_q_heads, in.num_kv_heads, in.head_dim);
    std::vector<float> all(static_cast<std::size_t>(in.num_layers) * f.size(), 0.0f);
    std::copy(f.begin(), f.end(), all.begin() + static_cast<std::ptrdiff_t>(in.layer) * static_cast<std::ptrdiff_t>(f.size()));
    evict::qfilters_params p;
    p.filters = all.data();
    p.num_layers = in.num_layers;
    p.protect = prot;
    evict::qfilters(p).score(in, obs, out);
  }
};

[[noreturn]] inline void bad_arg(const spec_stage& st, const std::string& key, const std::string& value,
                                 const std::string& expected) {
  kvc::detail::fail(kvc::detail::concat("kvc::runtime::make_evictor: '", st.text, "': ", key, " = ", value, ", expected ", expected));
}

inline std::string num_text(double v) { return kvc::detail::concat(v); }

inline evict::group_agg agg_arg(spec_args& a, evict::group_agg def) {
  const std::string v = a.word("agg", def == evict::group_agg::mean ? "mean" : "max");
  if (v == "mean") return evict::group_agg::mean;
  if (v == "max") return evict::group_agg::max;
  bad_arg(a.stage(), "agg", v, "mean or max");
}

inline evict::pooling pool_arg(spec_args& a, evict::pooling def) {
  const std::string v = a.word("pool", def == evict::pooling::avg ? "avg" : "max");
  if (v == "avg") return evict::pooling::avg;
  if (v == "max") return evict::pooling::max;
  bad_arg(a.stage(), "pool", v, "avg or max");
}

inline bool flag_arg(spec_args& a, const std::string& key, bool def) {
  const int v = a.integer(key, def ? 1 : 0);
  if (v != 0 && v != 1) bad_arg(a.stage(), key, std::to_string(v), "0 or 1");
  return v == 1;
}

inline std::int32_t nonneg(spec_args& a, const std::string& key, std::int32_t def) {
  const int v = a.integer(key, def);
  if (v < 0) bad_arg(a.stage(), key, std::to_string(v), ">= 0");
  return v;
}

inline std::int32_t positive(spec_args& a, const std::string& key, std::int32_t def) {
  const int v = a.integer(key, def);
  if (v < 1) bad_arg(a.stage(), key, std::to_string(v), ">= 1");
  return v;
}

inline evict::protection protection_args(spec_args& a, evict::protection def) {
  evict::protection p;
  p.sinks = nonneg(a, "sinks", def.sinks);
  p.recent = nonneg(a, "recent", def.recent);
  return p;
}

inline void want_window(evictor& ev, std::int32_t w) {
  if (ev.window < 0) return;
  ev.window = w < 0 ? -1 : std::max(ev.window, w);
}

}  // namespace detail

/// Builds one scorer from its stage, reading the stage's own arguments (not finish()ed: the
/// caller may read budget arguments from the same stage). Records in `ev` what it needs fed.
using scorer_builder = std::function<evict::any_scorer(spec_args&, const evictor_context&, evictor&)>;

inline evict::any_scorer make_scorer(const spec_stage& st, const evictor_context& ctx, evictor& ev);

/// Scorers by name. Adding one: a line reading its params from spec_args.
/// Threads: lookups are concurrent; registering is a write, done before other threads use it (docs/threading.md).
inline std::map<std::string, scorer_builder>& evictor_registry() {
  namespace ev = kvc::evict;
  using detail::nonneg;
  using detail::positive;
  static std::map<std::string, scorer_builder> r = [] {
    std::map<std::string, scorer_builder> m;
    m["streaming_llm"] = [](spec_args& a, const evictor_context&, evictor&) {
      ev::streaming_llm_params p;
      p.sinks = nonneg(a, "sinks", p.sinks);
      return ev::any_scorer(ev::streaming_llm(p));
    };
    auto snap = [](spec_args& a, evictor& e) {
      ev::snapkv_params p;
      p.window = positive(a, "window", p.window);
      p.kernel = positive(a, "kernel", p.kernel);
      p.pool = detail::pool_arg(a, p.pool);
      p.agg = detail::agg_arg(a, p.agg);
      p.sinks = nonneg(a, "sinks", p.sinks);
      detail::want_window(e, p.window);
      return p;
    };
    m["snapkv"] = [snap](spec_args& a, const evictor_context&, evictor& e) { return ev::any_scorer(ev::snapkv(snap(a, e))); };
    m["pyramidkv"] = [](spec_args& a, const evictor_context&, evictor& e) {
      ev::pyramidkv_params p;
      p.window = positive(a, "window", p.window);
      p.kernel = positive(a, "kernel", p.kernel);
      p.beta = positive(a, "beta", p.beta);
      p.pool = detail::pool_arg(a, p.pool);
      p.agg = detail::agg_arg(a, p.agg);
      p.sinks = nonneg(a, "sinks", p.sinks);
      detail::want_window(e, p.window);
      return ev::any_scorer(ev::pyramidkv(p));
    };
    m["cake"] = [snap](spec_args& a, const evictor_context&, evictor& e) {
      ev::cake_params c;
      c.tau1 = a.number("tau1", c.tau1);
      c.tau2 = a.number("tau2", c.tau2);
      if (!(c.tau1 > 0)) detail::bad_arg(a.stage(), "tau1", detail::num_text(c.tau1), "> 0");
      if (!(c.tau2 > 0)) detail::bad_arg(a.stage(), "tau2", detail::num_text(c.tau2), "> 0");
      e.cake = c;
      return ev::any_scorer(ev::snapkv(snap(a, e)));
    };
    m["finch"] = [](spec_args& a, const evictor_context&, evictor& e) {
      ev::finch_params p;
      p.agg = detail::agg_arg(a, p.agg);
      p.sinks = nonneg(a, "sinks", p.sinks);
      p.rerotate_keys = false;  // any_cache cannot rewrite keys (see the file comment)
      detail::want_window(e, positive(a, "window", 64));
      return ev::any_scorer(ev::finch(p));
    };
    m["noncausal_attention"] = [](spec_args& a, const evictor_context&, evictor& e) {
      ev::noncausal_attention_params p;
      p.chunk = positive(a, "chunk", p.chunk);
      p.pool_kernel = positive(a, "pool_kernel", p.pool_kernel);
      p.agg = detail::agg_arg(a, p.agg);
      p.protect = detail::protection_args(a, p.protect);
      detail::want_window(e, -1);
      return ev::any_scorer(ev::noncausal_attention(p));
    };
    m["simlayerkv"] = [](spec_args& a, const evictor_context&, evictor& e) {
      ev::simlayerkv_params p;
      p.n_last = positive(a, "n_last", p.n_last);
      p.n_recent = nonneg(a, "n_recent", p.n_recent);
      p.n_initial = nonneg(a, "n_initial", p.n_initial);
      p.lazy_threshold = static_cast<float>(a.number("lazy_threshold", p.lazy_threshold));
      if (!(p.lazy_threshold >= 0 && p.lazy_threshold <= 1))
        detail::bad_arg(a.stage(), "lazy_threshold", detail::num_text(p.lazy_threshold), "a fraction in [0, 1]");
      detail::want_window(e, p.n_last);
      return ev::any_scorer(ev::simlayerkv(p));
    };
    m["h2o"] = [](spec_args& a, const evictor_context&, evictor& e) {
      ev::h2o_params p;
      p.recent = nonneg(a, "recent", p.recent);
      p.sinks = nonneg(a, "sinks", p.sinks);
      p.normalize = detail::flag_arg(a, "normalize", p.normalize);
      if (p.normalize) e.observer.track_count = true;  // the normalised sum divides by it
      return ev::any_scorer(ev::h2o(p));
    };
    m["tova"] = [](spec_args& a, const evictor_context&, evictor&) {
      ev::tova_params p;
      p.share_heads = detail::flag_arg(a, "share_heads", p.share_heads);
      p.sinks = nonneg(a, "sinks", p.sinks);
      return ev::any_scorer(ev::tova(p));
    };
    m["scissorhands"] = [](spec_args& a, const evictor_context&, evictor&) {
      ev::scissorhands_params p;
      p.history = a.integer("history", p.history);
      if (p.history < 1 || p.history > 64) detail::bad_arg(a.stage(), "history", std::to_string(p.history), "1..64 steps");
      p.recent = nonneg(a, "recent", p.recent);
      p.sinks = nonneg(a, "sinks", p.sinks);
      return ev::any_scorer(ev::scissorhands(p));
    };
    m["a2sf"] = [](spec_args& a, const evictor_context&, evictor& e) {
      ev::a2sf_params p;
      p.recent = nonneg(a, "recent", p.recent);
      p.sinks = nonneg(a, "sinks", p.sinks);
      const double f = a.number("forgetting", 0.9);
      if (!(f > 0 && f < 1)) detail::bad_arg(a.stage(), "forgetting", detail::num_text(f), "a factor in (0, 1)");
      e.observer.forgetting = static_cast<float>(f);
      return ev::any_scorer(ev::a2sf(p));
    };
    m["knorm"] = [](spec_args& a, const evictor_context&, evictor&) {
      ev::knorm_params p;
      p.protect = detail::protection_args(a, p.protect);
      return ev::any_scorer(ev::knorm(p));
    };
    m["keydiff"] = [](spec_args& a, const evictor_context&, evictor&) {
      ev::keydiff_params p;
      p.protect = detail::protection_args(a, p.protect);
      return ev::any_scorer(ev::keydiff(p));
    };
    m["random"] = [](spec_args& a, const evictor_context&, evictor&) {
      ev::random_params p;
      p.seed = static_cast<std::uint64_t>(nonneg(a, "seed", 0));
      p.protect = detail::protection_args(a, p.protect);
      return ev::any_scorer(ev::random(p));
    };
    m["lagkv"] = [](spec_args& a, const evictor_context&, evictor&) {
      ev::lagkv_params p;
      p.sinks = nonneg(a, "sinks", p.sinks);
      p.lag = a.integer("lag", p.lag);
      if (p.lag < 2) detail::bad_arg(a.stage(), "lag", std::to_string(p.lag), ">= 2 tokens");
      p.cross_scoring = detail::flag_arg(a, "cross_scoring", p.cross_scoring);
      return ev::any_scorer(ev::lagkv(p));
    };
    m["curdkv"] = [](spec_args& a, const evictor_context&, evictor&) {
      ev::curdkv_params p;
      p.window = positive(a, "window", p.window);
      p.sinks = nonneg(a, "sinks", p.sinks);
      return ev::any_scorer(ev::curdkv(p));
    };
    m["leverage"] = [](spec_args& a, const evictor_context& c, evictor&) {
      ev::leverage_params p;
      p.sketch_dimension = positive(a, "sketch_dimension", p.sketch_dimension);
      p.jitter = a.number("jitter", p.jitter);
      if (!(p.jitter >= 0)) detail::bad_arg(a.stage(), "jitter", detail::num_text(p.jitter), ">= 0");
      p.seed = static_cast<std::uint64_t>(nonneg(a, "seed", 0));
      const bool unrotate = detail::flag_arg(a, "unrotate", c.rotary != nullptr);
      if (unrotate && !c.rotary)
        detail::bad_arg(a.stage(), "unrotate", "1", "0: the caller gave no RoPE (evictor_context::rotary)");
      p.rotary = unrotate ? c.rotary : nullptr;  // Compactor scores pre-RoPE keys
      p.protect = detail::protection_args(a, p.protect);
      return ev::any_scorer(ev::leverage(p));
    };
    m["expected_attention"] = [](spec_args& a, const evictor_context&, evictor&) {
      ev::expected_attention_params p;
      p.n_future_positions = positive(a, "n_future_positions", p.n_future_positions);
      p.n_sink = nonneg(a, "n_sink", p.n_sink);
      p.use_covariance = detail::flag_arg(a, "use_covariance", p.use_covariance);
      p.use_vnorm = detail::flag_arg(a, "use_vnorm", p.use_vnorm);
      p.epsilon = static_cast<float>(a.number("epsilon", p.epsilon));
      if (!(p.epsilon >= 0)) detail::bad_arg(a.stage(), "epsilon", detail::num_text(p.epsilon), ">= 0");
      p.agg = detail::agg_arg(a, p.agg);
      p.sinks_in_softmax = detail::flag_arg(a, "sinks_in_softmax", p.sinks_in_softmax);
      return ev::any_scorer(ev::expected_attention(p));
    };
    m["qfilters"] = [](spec_args& a, const evictor_context& c, evictor& e) {
      const ev::protection prot = detail::protection_args(a, ev::protection{4, 0});
      const std::int32_t cal = nonneg(a, "calibration", 0);
      if (c.qfilters) {
        if (cal != 0)
          detail::bad_arg(a.stage(), "calibration", std::to_string(cal),
                          "0: offline filters were given (evictor_context::qfilters)");
        KVC_EXPECTS(c.num_layers > 0, "kvc::runtime qfilters: evictor_context::num_layers = ", c.num_layers,
                    ", expected the model's layer count with offline filters");
        ev::qfilters_params p;  // points at the caller's filters, which must outlive the evictor
        p.filters = c.qfilters;
        p.num_layers = c.num_layers;
        p.protect = prot;
        return ev::any_scorer(ev::qfilters(p));
      }
      detail::window_qfilters q;
      q.prot = prot;
      q.calibration = cal;
      detail::want_window(e, cal > 0 ? cal : -1);
      return ev::any_scorer(q);
    };
    // Wrappers: the inner policy is the positional nested stage.
    auto inner_of = [](spec_args& a, const evictor_context& c, evictor& e, const char* def) {
      const spec_stage* in = a.nested();
      if (!in && !def)
        kvc::detail::fail(kvc::detail::concat("kvc::runtime::make_evictor: '", a.stage().text,
                                              "' needs a nested policy, e.g. ", a.stage().name, "(tova)"));
      if (!in) {
        spec_stage d;
        d.name = d.text = def;
        return make_scorer(d, c, e);
      }
      return make_scorer(*in, c, e);
    };
    m["chunkkv"] = [inner_of](spec_args& a, const evictor_context& c, evictor& e) {
      ev::chunkkv_params p;
      p.chunk_length = positive(a, "chunk_length", p.chunk_length);
      ev::any_scorer in = inner_of(a, c, e, "snapkv");
      const ev::observes o = in.what();
      return detail::observing_as(ev::chunkkv<ev::any_scorer>(p, in), o);
    };
    m["rkv"] = [inner_of](spec_args& a, const evictor_context& c, evictor& e) {
      ev::rkv_params p;
      p.lambda = static_cast<float>(a.number("lambda", p.lambda));
      if (!(p.lambda >= 0 && p.lambda <= 1)) detail::bad_arg(a.stage(), "lambda", detail::num_text(p.lambda), "in [0, 1]");
      ev::any_scorer in = inner_of(a, c, e, "snapkv");
      const ev::observes o = in.what();
      return detail::observing_as(ev::rkv<ev::any_scorer>(p, in), o);
    };
    m["vnorm"] = [inner_of](spec_args& a, const evictor_context& c, evictor& e) {
      ev::vnorm_params p;
      p.epsilon = static_cast<float>(a.number("epsilon", p.epsilon));
      if (!(p.epsilon >= 0)) detail::bad_arg(a.stage(), "epsilon", detail::num_text(p.epsilon), ">= 0");
      ev::any_scorer in = inner_of(a, c, e, nullptr);
      const ev::observes o = in.what();
      return detail::observing_as(ev::vnorm<ev::any_scorer>(p, in), o);
    };
    return m;
  }();
  return r;
}

inline std::string known_evictors() {
  std::string s;
  for (const auto& kv : evictor_registry()) s += (s.empty() ? "" : ", ") + kv.first;
  return s;
}

namespace detail {
[[noreturn]] inline void unknown_evictor(const spec_stage& st) {
  std::vector<std::string> names;
  for (const auto& kv : evictor_registry()) names.push_back(kv.first);
  const std::string hint = closest(st.name, names);
  kvc::detail::fail(kvc::detail::concat("kvc::runtime::make_evictor: unknown eviction policy '", st.name, "' in '",
                                        st.text, "'", hint.empty() ? "" : "; did you mean '", hint,
                                        hint.empty() ? "" : "'?", "; expected one of: ", known_evictors()));
}
}  // namespace detail

/// Whether `name` is an eviction policy in a spec.
inline bool is_evictor(const std::string& name) { return evictor_registry().count(name) != 0; }

/// The scorer a (possibly nested) stage names, with all of its arguments read and checked.
inline evict::any_scorer make_scorer(const spec_stage& st, const evictor_context& ctx, evictor& ev) {
  auto it = evictor_registry().find(st.name);
  if (it == evictor_registry().end())
    detail::unknown_evictor(st);
  spec_args a(st, "kvc::runtime::make_evictor");
  evict::any_scorer s = it->second(a, ctx, ev);
  a.finish(a.asked().empty() ? std::string("(none)") : a.asked());
  return s;
}

/// A top-level evictor: its scorer plus the budget and application arguments (ratio=, tokens=,
/// alloc=, alpha_safeguard=, interval=, slack=). Throws kvc::error naming the argument, the value
/// and what was expected.
inline evictor make_evictor(const spec_stage& st, const evictor_context& ctx) {
  auto it = evictor_registry().find(st.name);
  if (it == evictor_registry().end())
    detail::unknown_evictor(st);
  evictor ev;
  ev.spec = st.text;
  spec_args a(st, "kvc::runtime::make_evictor");
  evict::compressor_options& o = ev.options;
  if (a.has("ratio") && a.has("tokens"))
    kvc::detail::fail(kvc::detail::concat("kvc::runtime::make_evictor: '", st.text,
                                          "': ratio and tokens both given, expected one budget"));
  // A missing budget is reported only after every other argument was read: "snapkv(rato=0.5)"
  // is a misspelt key, and saying so (with the valid keys) is what lets the user fix it.
  bool has_budget = true;
  if (a.has("tokens")) {
    const int n = a.integer("tokens");
    if (n < 0) detail::bad_arg(st, "tokens", std::to_string(n), "a per-stream token count >= 0");
    o.target = budget::tokens(n);
  } else if (a.has("ratio")) {
    const double r = a.number("ratio");
    if (!(r >= 0.0 && r < 1.0)) detail::bad_arg(st, "ratio", detail::num_text(r), "the fraction evicted, in [0, 1)");
    o.target = budget::ratio(r);
  } else {
    has_budget = false;
  }
  const std::string alloc = a.word("alloc", "");
  const double alpha = a.number("alpha_safeguard", 0.2);
  if (alloc == "ada") {
    if (!(alpha >= 0 && alpha <= 1)) detail::bad_arg(st, "alpha_safeguard", detail::num_text(alpha), "a fraction in [0, 1]");
    o.alloc = allocator::ada(alpha);
  } else if (alloc == "pyramid") {
    o.alloc = allocator::pyramid();
  } else if (alloc == "uniform") {
    o.alloc = allocator::uniform();
  } else if (!alloc.empty()) {
    detail::bad_arg(st, "alloc", alloc, "uniform, ada or pyramid");
  }
  if (alloc != "ada" && a.has("alpha_safeguard"))
    detail::bad_arg(st, "alpha_safeguard", detail::num_text(alpha), "no value unless alloc=ada");
  o.interval = detail::positive(a, "interval", 1);
  o.slack = detail::nonneg(a, "slack", 0);
  o.num_q_heads = ctx.num_q_heads;
  ev.scorer = it->second(a, ctx, ev);
  a.finish("ratio or tokens, " + a.asked());
  if (!has_budget)
    kvc::detail::fail(kvc::detail::concat("kvc::runtime::make_evictor: '", st.text,
                                          "' needs a budget: ratio=<fraction evicted in [0, 1)> or tokens=<per stream>"));
  if (ev.cake && alloc.size()) detail::bad_arg(st, "alloc", alloc, "none: cake allocates layer budgets itself");
  // Preferred allocator (pyramidkv) unless alloc= was given, as the compressor does.
  if (!o.alloc) o.alloc = ev.scorer.preferred_allocator();
  return ev;
}

inline evictor make_evictor(const std::string& spec, const evictor_context& ctx) {
  const auto stages = parse_spec(spec);
  KVC_EXPECTS(stages.size() == 1, "spec = \"", spec, "\", expected exactly one eviction stage");
  return make_evictor(stages[0], ctx);
}

/// CAKE: the layer preferences of every layer of `seq`, from each layer's query window, as the
/// allocator the evictor's compressor then uses. `window(layer)` returns that layer's query_window.
template <class Cache, class WindowFn>
allocator cake_allocator(const evictor& ev, const Cache& cache, std::int32_t seq, WindowFn&& window) {
  KVC_EXPECTS(ev.cake.has_value(), "kvc::runtime::cake_allocator: evictor '", ev.spec, "' is not cake");
  const std::int32_t L = cache.config().num_layers;
  const std::int32_t nq = ev.options.num_q_heads ? ev.options.num_q_heads : cache.config().num_kv_heads;
  std::vector<double> pref(static_cast<std::size_t>(L));
  std::int32_t window_tokens = 0;
  for (std::int32_t l = 0; l < L; ++l) {
    evict::gathered_layer g;
    evict::gather_layer(cache, seq, l, nq, evict::reads_keys, g);
    const evict::query_window w = window(l);
    pref[static_cast<std::size_t>(l)] = evict::cake_preference(g.in, w, *ev.cake);
    window_tokens = std::max(window_tokens, w.n);
  }
  // Every layer keeps what the scorer protects anyway (sinks, recent window) plus the
  // observation window, whose tokens SnapKV's scores rank first; see allocator::cake_keep.
  const evict::protection p = ev.options.protect ? *ev.options.protect : ev.scorer.protect();
  return allocator::cake(std::move(pref), p.sinks + p.recent + window_tokens);
}

}  // namespace runtime
KVC_END_NAMESPACE
