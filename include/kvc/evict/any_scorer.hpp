// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `any_scorer`: one runtime type for every scorer, so a spec parser can build any of them
/// (`snapkv(window=32,kernel=7)` → any_scorer(snapkv{{32, 7}})) and an engine can hold them in one
/// `compressor<any_scorer>`. It forwards score(), protect(), the scorer's own select() (ChunkKV,
/// SimLayerKV) and preferred allocator (PyramidKV), and says at run time what it observes.

#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include <kvc/budget/allocator.hpp>
#include <kvc/evict/compressor.hpp>
#include <kvc/evict/core.hpp>
#include <kvc/evict/select.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {

/// What a scorer observes, at run time.
enum class observes { nothing, query_window, attention, query_stats };

inline const char* to_string(observes o) noexcept {
  switch (o) {
    case observes::nothing: return "nothing";
    case observes::query_window: return "query_window";
    case observes::attention: return "attention";
    case observes::query_stats: return "query_stats";
  }
  return "?";
}

template <class O>
constexpr observes observes_of() noexcept {
  if constexpr (std::is_same<O, query_window>::value) return observes::query_window;
  else if constexpr (std::is_same<O, attention_observer>::value) return observes::attention;
  else if constexpr (std::is_same<O, query_stats>::value) return observes::query_stats;
  else return observes::nothing;
}

struct any_params {};

class any_scorer {
 public:
  using params_type = any_params;
  using observation_type = observations;  // decided at run time: see what()
  static constexpr unsigned reads = reads_keys | reads_values;  // upper bound; runtime_reads() is exact
  static constexpr const char* name = "any";

  any_scorer() = default;
  template <class S, class = std::enable_if_t<is_scorer_v<S> && !std::is_same<std::decay_t<S>, any_scorer>::value>>
  any_scorer(S s) : impl_(std::make_shared<model<S>>(std::move(s))) {}  // NOLINT: implicit on purpose

  explicit operator bool() const noexcept { return static_cast<bool>(impl_); }
  const char* scorer_name() const { return get().name(); }
  observes what() const { return get().what(); }
  unsigned runtime_reads() const { return get().reads(); }
  protection protect() const { return get().protect(); }
  allocator preferred_allocator() const { return get().preferred(); }
  void score(const layer_input& in, const observations& obs, layer_scores& out) const { get().score(in, obs, out); }
  void select(const layer_input& in, const observations& obs, const layer_scores& s, const budget& b,
              const allocator& a, protection p, layer_selection& out) const {
    get().select(in, obs, s, b, a, p, out);
  }

 private:
  struct base {
    virtual ~base() = default;
    virtual const char* name() const = 0;
    virtual observes what() const = 0;
    virtual unsigned reads() const = 0;
    virtual protection protect() const = 0;
    virtual allocator preferred() const = 0;
    virtual void score(const layer_input&, const observations&, layer_scores&) const = 0;
    virtual void select(const layer_input&, const observations&, const layer_scores&, const budget&, const allocator&,
                        protection, layer_selection&) const = 0;
  };
  template <class S>
  struct model final : base {
    S s;
    explicit model(S x) : s(std::move(x)) {}
    const char* name() const override { return S::name; }
    observes what() const override { return observes_of<typename S::observation_type>(); }
    unsigned reads() const override { return S::reads; }
    protection protect() const override { return s.protect(); }
    allocator preferred() const override {
      if constexpr (detail::has_preferred_allocator<S>::value) return s.preferred_allocator();
      else return allocator::uniform();
    }
    void score(const layer_input& in, const observations& o, layer_scores& out) const override { s.score(in, o, out); }
    void select(const layer_input& in, const observations& o, const layer_scores& sc, const budget& b,
                const allocator& a, protection p, layer_selection& out) const override {
      if constexpr (detail::has_select<S>::value) s.select(in, o, sc, b, a, p, out);
      else select_layer(in, sc, b, a, p, out);
    }
  };
  const base& get() const {
    if (!impl_) ::kvc::detail::fail("kvc::evict::any_scorer: empty (default-constructed), expected a scorer");
    return *impl_;
  }
  std::shared_ptr<const base> impl_;
};

}  // namespace evict
KVC_END_NAMESPACE
