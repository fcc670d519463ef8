// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Mixed storage by layer: `layers(BASE, lA=STORAGE, lA_B=STORAGE, ...)` stores the layers named by
/// each `l` key with that storage and every other layer with BASE, e.g.
///
///     layers(kivi(bits=2), l17_18=kivi(bits=4), l20=kivi(bits=4), l23=kivi(bits=4))
///
/// keeps KIVI's 2-bit codes everywhere except layers 17, 18, 20 and 23, which get 4 bits.
///
/// Why: bit widths chosen per layer are what KVQuant (Hooper et al. 2024) and KIVI's follow-ups
/// use where one layer breaks at a width the others tolerate, and on SmolLM2-135M 2-bit keys break
/// on a few layers (docs/results.md, "2-bit: where KIVI breaks on this model": the output error
/// of layer 18 is 0.82-0.93 at 2 bits where most layers stay near 0.3). Paying 4 bits on those
/// layers alone costs a few percent of the bytes of paying them everywhere.
///
/// Keys: `lA` is layer A, `lA_B` the layers A..B (both included). Every layer may be named once;
/// the positional stage is the storage of the layers no key names. Any registered storage can
/// be a part (fp32, fp16, bf16, the quantized ones once registered, mikv, pca),
/// so long as the parts agree on pre_rope_keys() (the caller appends one kind of key).
///
/// `layered_cache` is one any_cache over one part cache per distinct storage (the layers that
/// share a storage share one cache and its page pool). Every part keeps its own page pool, sized
/// ceil(n / L) of the config's max_pages for a part of n of the L layers, so bytes_in_use() and
/// traffic() are the sums of the parts' pool figures, still real pool bytes.
/// Sequences: each outer id maps to one id per part, added, forked and removed together; a part
/// that refuses (pool exhausted on fork) undoes the parts before it, so the cache is unchanged.
/// Threads: as its parts (docs/threading.md); add/remove/fork are exclusive.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <kvc/error.hpp>
#include <kvc/runtime/any_cache.hpp>
#include <kvc/runtime/make_cache.hpp>
#include <kvc/runtime/spec.hpp>
#include <kvc/store/kv_cache.hpp>

KVC_BEGIN_NAMESPACE
namespace runtime {

/// The storage of every layer a `layers(...)` stage describes: parts[i] is a storage stage,
/// layer_part[l] the part of layer l.
struct layer_plan {
  std::vector<spec_stage> parts;
  std::vector<std::int32_t> layer_part;
};

namespace detail {

[[noreturn]] inline void bad_layers_arg(const spec_stage& st, const std::string& what, const std::string& expected) {
  kvc::detail::fail(kvc::detail::concat("kvc::runtime::make_cache: '", st.text, "': ", what, ", expected ", expected));
}

/// Reads "17" or "17_20" after the key's 'l'; false when it is not that form.
inline bool parse_layer_key(const std::string& key, std::int32_t& lo, std::int32_t& hi) {
  if (key.size() < 2 || key[0] != 'l') return false;
  auto read = [](const std::string& s, std::size_t& i, std::int32_t& out) {
    const std::size_t b = i;
    std::int64_t v = 0;
    while (i < s.size() && s[i] >= '0' && s[i] <= '9' && i - b < 9) v = v * 10 + (s[i++] - '0');
    out = static_cast<std::int32_t>(v);
    return i > b && (i == s.size() || s[i] == '_');
  };
  std::size_t i = 1;
  if (!read(key, i, lo)) return false;
  hi = lo;
  if (i == key.size()) return true;
  ++i;  // '_'
  return read(key, i, hi) && i == key.size();
}

}  // namespace detail

/// Parses a `layers(...)` stage for a model of `num_layers` layers. Throws kvc::error naming the
/// key and what was expected: no positional base, a key that is not lA or lA_B, a layer out of
/// range, a range backwards, a layer named twice, a value that is not a storage stage.
inline layer_plan parse_layers(const spec_stage& st, std::int32_t num_layers) {
  KVC_EXPECTS_IN("kvc::runtime::make_cache", num_layers >= 1, "num_layers = ", num_layers, ", expected >= 1");
  const std::string form = "layers(BASE, lA=STORAGE, lA_B=STORAGE, ...), e.g. layers(kivi(bits=2), l17_18=kivi(bits=4))";
  layer_plan p;
  std::map<std::string, std::int32_t> part_of;  // a storage's text -> its part
  auto part = [&](const spec_stage& s) {
    auto it = part_of.find(s.text);
    if (it != part_of.end()) return it->second;
    p.parts.push_back(s);
    return part_of[s.text] = static_cast<std::int32_t>(p.parts.size() - 1);
  };
  const spec_stage* base = nullptr;
  for (const spec_arg& a : st.args)
    if (a.key.empty()) {
      if (base) detail::bad_layers_arg(st, "a second positional storage '" + a.value.stage->text + "'", form);
      base = a.value.stage.get();
    }
  if (!base) detail::bad_layers_arg(st, "no positional storage for the layers no key names", form);
  if (base->name == "layers") detail::bad_layers_arg(st, "a nested layers(...) as the base", "a storage such as kivi(bits=2)");
  p.layer_part.assign(static_cast<std::size_t>(num_layers), -1);
  std::vector<std::string> named_by(static_cast<std::size_t>(num_layers));
  bool any = false;
  for (const spec_arg& a : st.args) {
    if (a.key.empty()) continue;
    std::int32_t lo = 0, hi = 0;
    if (!detail::parse_layer_key(a.key, lo, hi))
      detail::bad_layers_arg(st, "key '" + a.key + "'", "lA (one layer) or lA_B (layers A..B), e.g. l17 or l17_20");
    if (!a.value.stage && a.value.is_number)
      detail::bad_layers_arg(st, kvc::detail::concat(a.key, " = ", a.value.text), "a storage stage, e.g. kivi(bits=4)");
    spec_stage value;  // a bare word (l1=fp32) is a stage without arguments
    if (a.value.stage) {
      value = *a.value.stage;
    } else {
      value.name = a.value.text;
      value.text = a.value.text;
    }
    if (value.name == "layers")
      detail::bad_layers_arg(st, a.key + " = a nested layers(...)", "a storage such as kivi(bits=4)");
    if (hi < lo) detail::bad_layers_arg(st, "key '" + a.key + "' (a range backwards)", "lA_B with A <= B");
    if (hi >= num_layers)
      detail::bad_layers_arg(st, kvc::detail::concat("key '", a.key, "' names layer ", hi),
                             kvc::detail::concat("layers 0..", num_layers - 1, " (the model has ", num_layers, ")"));
    const std::int32_t pi = part(value);
    for (std::int32_t l = lo; l <= hi; ++l) {
      std::string& by = named_by[static_cast<std::size_t>(l)];
      if (!by.empty())
        detail::bad_layers_arg(st, kvc::detail::concat("layer ", l, " named by both '", by, "' and '", a.key, "'"),
                               "each layer named at most once");
      by = a.key;
      p.layer_part[static_cast<std::size_t>(l)] = pi;
    }
    any = true;
  }
  if (!any) detail::bad_layers_arg(st, "no lA=STORAGE key", "at least one (else write the base storage alone)");
  if (std::find(p.layer_part.begin(), p.layer_part.end(), -1) != p.layer_part.end()) {  // the base stores some layer
    const std::int32_t bi = part(*base);
    for (std::int32_t& x : p.layer_part)
      if (x < 0) x = bi;
  }
  return p;
}

/// any_cache over one part cache per distinct storage (see the file comment). Not ISA-specific
/// itself: it only forwards to its parts, which the registry of the caller's ISA built.
class layered_cache final : public any_cache {
 public:
  /// `parts[i]` holds the layers whose layer_part is i, in increasing layer order; `cfg` is the
  /// caller's shape (all layers).
  layered_cache(std::string name, const cache_config& cfg, std::vector<std::unique_ptr<any_cache>> parts,
                std::vector<std::int32_t> layer_part)
      : name_(std::move(name)), cfg_(cfg), parts_(std::move(parts)), part_(std::move(layer_part)),
        local_(part_.size()) {
    constexpr const char* who = "kvc::runtime::layered_cache";
    KVC_EXPECTS_IN(who, static_cast<std::int32_t>(part_.size()) == cfg_.num_layers, "layer_part has ", part_.size(),
                   " entries, expected num_layers = ", cfg_.num_layers);
    std::vector<std::int32_t> count(parts_.size(), 0);
    for (std::size_t l = 0; l < part_.size(); ++l) {
      KVC_EXPECTS_IN(who, part_[l] >= 0 && static_cast<std::size_t>(part_[l]) < parts_.size(), "layer_part[", l,
                     "] = ", part_[l], ", expected 0..", parts_.size() - 1);
      local_[l] = count[static_cast<std::size_t>(part_[l])]++;
    }
    for (std::size_t i = 0; i < parts_.size(); ++i) {
      KVC_EXPECTS_IN(who, parts_[i] != nullptr, "part ", i, " is null");
      const cache_config& c = parts_[i]->config();
      KVC_EXPECTS_IN(who, c.num_layers == count[i] && c.num_kv_heads == cfg_.num_kv_heads && c.head_dim == cfg_.head_dim,
                     "part ", i, " ('", parts_[i]->name(), "') has ", c.num_layers, " layers x ", c.num_kv_heads,
                     " kv heads x head_dim ", c.head_dim, ", expected ", count[i], " x ", cfg_.num_kv_heads, " x ",
                     cfg_.head_dim);
      KVC_EXPECTS_IN(who, parts_[i]->pre_rope_keys() == parts_[0]->pre_rope_keys(), "part '", parts_[i]->name(),
                     "' takes ", parts_[i]->pre_rope_keys() ? "pre" : "post", "-RoPE keys and part '", parts_[0]->name(),
                     "' ", parts_[0]->pre_rope_keys() ? "pre" : "post",
                     "-RoPE keys; expected every part to take the same (the caller appends one kind)");
    }
  }

  /// The part cache of `layer` and the layer's index in it.
  const any_cache& part(std::int32_t layer) const { return *parts_[static_cast<std::size_t>(part_index(layer))]; }
  std::int32_t local_layer(std::int32_t layer) const { return local_[static_cast<std::size_t>(checked(layer, "local_layer"))]; }
  std::size_t num_parts() const noexcept { return parts_.size(); }

  const cache_config& config() const override { return cfg_; }
  std::string name() const override { return name_; }
  const char* isa() const override { return parts_[0]->isa(); }  // the parts were built together

  seq_id add_sequence() override {
    std::vector<seq_id> ids;
    ids.reserve(parts_.size());
    try {
      for (auto& p : parts_) ids.push_back(p->add_sequence());
    } catch (...) {
      for (std::size_t i = 0; i < ids.size(); ++i) parts_[i]->remove_sequence(ids[i]);
      throw;
    }
    return commit(std::move(ids));
  }
  void remove_sequence(seq_id s) override {
    const std::vector<seq_id> ids = ids_of(s, "remove_sequence");
    seqs_.erase(s);
    for (std::size_t i = 0; i < parts_.size(); ++i) parts_[i]->remove_sequence(ids[i]);
  }
  bool contains(seq_id s) const override { return seqs_.count(s) != 0; }
  seq_id fork(seq_id s) override {
    const std::vector<seq_id>& src = ids_of(s, "fork");
    std::vector<seq_id> ids;
    ids.reserve(parts_.size());
    try {
      for (std::size_t i = 0; i < parts_.size(); ++i) ids.push_back(parts_[i]->fork(src[i]));
    } catch (...) {
      for (std::size_t i = 0; i < ids.size(); ++i) parts_[i]->remove_sequence(ids[i]);
      throw;
    }
    return commit(std::move(ids));
  }

  void append(seq_id s, std::int32_t layer, const float* k, const float* v, std::int32_t n,
              const std::int32_t* positions) override {
    auto [p, ps, l] = route(s, layer, "append");
    p->append(ps, l, k, v, n, positions);
  }
  void keep(seq_id s, std::int32_t layer, std::int32_t head, const std::int32_t* kept, std::int32_t n) override {
    auto [p, ps, l] = route(s, layer, "keep");
    p->keep(ps, l, head, kept, n);
  }
  void keep_layer(seq_id s, std::int32_t layer, const std::vector<std::vector<std::int32_t>>& kept) override {
    auto [p, ps, l] = route(s, layer, "keep_layer");
    p->keep_layer(ps, l, kept);
  }

  void rewind(seq_id s, std::int32_t layer, std::int32_t n) override {
    auto [p, ps, l] = route(s, layer, "rewind");
    p->rewind(ps, l, n);
  }
  /// True when every part has it.
  bool can_rewind() const override {
    return std::all_of(parts_.begin(), parts_.end(), [](const auto& p) { return p->can_rewind(); });
  }
  /// Between two layers of one part (its pages are one pool): the part's share_layer.
  void share_layer(seq_id s, std::int32_t layer, std::int32_t from) override {
    const routed to = route(s, layer, "share_layer"), src = route(s, from, "share_layer");
    if (to.p != src.p)
      kvc::detail::fail(kvc::detail::concat("kvc::runtime::layered_cache::share_layer: layer ", layer, " ('",
                                            to.p->name(), "') and from = ", from, " ('", src.p->name(),
                                            "') live in different parts, expected two layers of one storage"));
    to.p->share_layer(to.s, to.layer, src.layer);
  }
  /// True when some part has it (share_layer then works between that part's layers).
  bool can_share_layers() const override {
    return std::any_of(parts_.begin(), parts_.end(), [](const auto& p) { return p->can_share_layers(); });
  }

  std::int32_t length(seq_id s, std::int32_t layer, std::int32_t head) const override {
    auto [p, ps, l] = route(s, layer, "length");
    return p->length(ps, l, head);
  }
  const std::int32_t* positions(seq_id s, std::int32_t layer, std::int32_t head) const override {
    auto [p, ps, l] = route(s, layer, "positions");
    return p->positions(ps, l, head);
  }
  std::int32_t seen(seq_id s, std::int32_t layer) const override {
    auto [p, ps, l] = route(s, layer, "seen");
    return p->seen(ps, l);
  }
  void gather(seq_id s, std::int32_t layer, std::int32_t head, float* k_out, float* v_out = nullptr) const override {
    auto [p, ps, l] = route(s, layer, "gather");
    p->gather(ps, l, head, k_out, v_out);
  }
  void attention(seq_id s, std::int32_t layer, const float* q, std::int32_t num_q_heads, float* out,
                 const decode_options& opt = {}) const override {
    auto [p, ps, l] = route(s, layer, "attention");
    p->attention(ps, l, q, num_q_heads, out, opt);
  }
  /// True when every part has it: an engine asks once, not per layer.
  bool has_prefill_attention() const override {
    return std::all_of(parts_.begin(), parts_.end(), [](const auto& p) { return p->has_prefill_attention(); });
  }
  void prefill_attention(seq_id s, std::int32_t layer, const float* q, std::int32_t num_queries,
                         const std::int32_t* q_positions, std::int32_t num_q_heads, float* out,
                         const decode_options& opt = {}) const override {
    auto [p, ps, l] = route(s, layer, "prefill_attention");
    p->prefill_attention(ps, l, q, num_queries, q_positions, num_q_heads, out, opt);
  }
  std::int32_t chunk_tokens(seq_id s, std::int32_t layer, std::int32_t limit) const override {
    auto [p, ps, l] = route(s, layer, "chunk_tokens");
    return p->chunk_tokens(ps, l, limit);
  }

  std::size_t bytes_in_use() const override {
    std::size_t b = 0;
    for (const auto& p : parts_) b += p->bytes_in_use();
    return b;
  }
  std::size_t bytes_in_use(std::int32_t layer) const override {
    return part(layer).bytes_in_use(local_[static_cast<std::size_t>(layer)]);
  }
  memory_traffic traffic() const override {
    memory_traffic t;
    for (const auto& p : parts_) t += p->traffic();
    return t;
  }
  /// The parts' bookkeeping plus this cache's id map.
  std::size_t metadata_bytes() const override {
    std::size_t b = seqs_.size() * (sizeof(seq_id) * (1 + parts_.size()));
    for (const auto& p : parts_) b += p->metadata_bytes();
    return b;
  }
  std::int64_t tokens_held() const override {
    std::int64_t n = 0;
    for (const auto& p : parts_) n += p->tokens_held();
    return n;
  }
  bool pre_rope_keys() const override { return parts_[0]->pre_rope_keys(); }
  std::int32_t query_window() const override {
    std::int32_t w = 0;
    for (const auto& p : parts_) w = std::max(w, p->query_window());
    return w;
  }
  /// The layer's part sees the last min(n, its query_window()) queries.
  void observe_window(seq_id s, std::int32_t layer, const float* q, std::int32_t n, std::int32_t num_q_heads) override {
    auto [p, ps, l] = route(s, layer, "observe_window");
    const std::int32_t w = std::min(n, p->query_window());
    if (w <= 0) return;
    p->observe_window(ps, l, q + static_cast<std::size_t>(n - w) * num_q_heads * cfg_.head_dim, w, num_q_heads);
  }

 private:
  struct routed {
    any_cache* p;
    seq_id s;
    std::int32_t layer;
  };

  std::int32_t checked(std::int32_t layer, const char* fn) const {
    KVC_EXPECTS_IN(kvc::detail::concat("kvc::runtime::layered_cache::", fn).c_str(),
                   layer >= 0 && layer < cfg_.num_layers, "layer = ", layer, ", expected 0..", cfg_.num_layers - 1);
    return layer;
  }
  std::int32_t part_index(std::int32_t layer) const { return part_[static_cast<std::size_t>(checked(layer, "part"))]; }
  const std::vector<seq_id>& ids_of(seq_id s, const char* fn) const {
    auto it = seqs_.find(s);
    if (it == seqs_.end())
      kvc::detail::fail(kvc::detail::concat("kvc::runtime::layered_cache::", fn, ": seq = ", s,
                                            " is not a live sequence of this cache, expected one of its ", seqs_.size(),
                                            " live sequence ids"));
    return it->second;
  }
  routed route(seq_id s, std::int32_t layer, const char* fn) const {
    const std::vector<seq_id>& ids = ids_of(s, fn);
    const std::size_t l = static_cast<std::size_t>(checked(layer, fn));
    const std::size_t pi = static_cast<std::size_t>(part_[l]);
    return {parts_[pi].get(), ids[pi], local_[l]};
  }
  seq_id commit(std::vector<seq_id> ids) {
    const seq_id id = next_++;
    seqs_.emplace(id, std::move(ids));
    return id;
  }

  std::string name_;
  cache_config cfg_;
  std::vector<std::unique_ptr<any_cache>> parts_;
  std::vector<std::int32_t> part_;   // [layer] -> part
  std::vector<std::int32_t> local_;  // [layer] -> the layer's index in its part
  std::map<seq_id, std::vector<seq_id>> seqs_;
  seq_id next_ = 0;
};

KVC_BEGIN_ISA_NAMESPACE
/// Registers `layers` (the storages it names per layer must be registered too) in the storage
/// registry of this TU's ISA configuration (runtime/make_cache.hpp), so make_cache builds it by
/// spec. Including this header registers nothing (no static initialisation): call this before the
/// first make_cache that names it, from a TU built with the -m flags of those calls (docs/isa.md);
/// calling it again sets the same builders. A template only so that a TU that includes the header
/// and does not call it instantiates no cache.
template <class Deferred = void>
void register_layered_storage() {
  using namespace detail;  // the builders
  registered_storages()["layers"] = [](const spec_stage& st, const cache_config& c,
                                    const storage_options& o) -> std::unique_ptr<any_cache> {
    const layer_plan plan = parse_layers(st, c.num_layers);
    std::vector<std::unique_ptr<any_cache>> parts;
    for (std::size_t i = 0; i < plan.parts.size(); ++i) {
      cache_config pc = c;
      pc.num_layers = static_cast<std::int32_t>(
          std::count(plan.layer_part.begin(), plan.layer_part.end(), static_cast<std::int32_t>(i)));
      // The pool's capacity, split by layers: a part of n layers gets ceil(n / L) of max_pages.
      pc.max_pages = static_cast<std::int32_t>(
          (static_cast<std::int64_t>(c.max_pages) * pc.num_layers + c.num_layers - 1) / c.num_layers);
      // The model's weights, when given, are per model layer: the part sees its own layers' (palu).
      storage_options po = o;
      projection_weights pw;
      if (o.weights && static_cast<std::int32_t>(o.weights->wk.size()) == c.num_layers &&
          static_cast<std::int32_t>(o.weights->wv.size()) == c.num_layers) {
        pw.in = o.weights->in;
        for (std::int32_t l = 0; l < c.num_layers; ++l)
          if (plan.layer_part[static_cast<std::size_t>(l)] == static_cast<std::int32_t>(i))
            pw.wk.push_back(o.weights->wk[static_cast<std::size_t>(l)]), pw.wv.push_back(o.weights->wv[static_cast<std::size_t>(l)]);
        po.weights = &pw;
      }
      parts.push_back(make_part(plan.parts[i], pc, po));
    }
    return std::make_unique<layered_cache>(st.text, c, std::move(parts), plan.layer_part);
  };
}
KVC_END_ISA_NAMESPACE

}  // namespace runtime
KVC_END_NAMESPACE
