// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// The projected (low-rank) storages of the runtime builder; register_lowrank_storages() (end of
/// this header) registers them, so specs can name them:
///
///   palu(rank=N, vrank=N, coef=fp16|fp32|STORAGE)
///     Palu's per-head latent (kvc/lowrank/palu.hpp): key and value bases are the top left
///     singular vectors of each head's rows of W_k and W_v, from storage_options::weights (the
///     model's projections), set when the cache is built; keys are appended before RoPE and
///     rotated after reconstruction (storage_options::rope). A pca_cache whose bases are preset.
///
///   think(ratio=R, vratio=R, window=N, coef=fp16|fp32)
///     ratio     ThinK's λ: floor(ratio · head_dim) key channels pruned per (layer, kv head),
///               0 <= ratio < 1 (kvc/lowrank/think.hpp)
///     vratio    the same for value channels (the paper's value-side variant); default 0
///     window    the queries the channels are scored with (query_window()); default 32, as kvpress
///     coef      element type of the stored channels; default fp16
///   The cache (`think_cache<T>`, below) stores each layer whole until the caller hands it the
///   prompt's last queries (any_cache::observe_window), then prunes it (see the class comment).
///
///   pca(rank=N, vrank=N, pre_rope=0|1, sinks=N, center=0|1, coef=fp16|fp32|STORAGE)
///     rank      key rank: a count 1..head_dim, or a fraction in (0, 1) of head_dim (r = ceil(f · D))
///     vrank     value rank, read as rank is; default rank. Values are far less low-rank than
///               keys (docs/lowrank-spectrum.png), so a cache that halves keys may keep values whole
///     pre_rope  1: keys are appended before RoPE, projected there, and rotated after
///               reconstruction with storage_options::rope (projected_cache.hpp); default 0
///     sinks     the first N tokens of the fitting append are reconstructed exactly: their
///               directions are part of both bases (pca.hpp, exact_rows); N <= min(rank, vrank);
///               default 0. The first token's pre-RoPE key depends on that token only, so every
///               sequence opening with the same token (BOS) gets its sink key back exactly
///     center    1: subtract the fitted mean before projecting (pca.hpp); default 0, as Loki and
///               Eigen Attention
///     coef      element type of the stored coefficients; default fp16. Any other registered
///               storage of rows (int8, int4, bf16, kivi(bits=4), ...) holds the coefficient rows
///               instead: quantized coefficients, attended through the general path.
///               rotated(bits=4) is Palu's low-rank-aware quantization (a Hadamard rotation
///               before int4 codes; xkv_storage.hpp's `latent`)
///
/// The cache (`pca_cache<T>`, below) wraps lowrank::projected_cache<T>. Its bases are fitted, per
/// (layer, kv head), from the keys and values of the first append of each layer, whichever
/// sequence makes it: the prompt's first chunk. That append must hold at least r tokens (refused
/// otherwise, the cache unchanged): fewer rows span fewer than r directions, and the remaining
/// ones would be arbitrary eigenvectors of zero eigenvalues, a basis fitted on nothing. Bases are
/// the cache's, shared by every sequence and never refitted (projected_cache: a new basis would
/// not re-project stored tokens). Keys are post-RoPE unless pre_rope=1 (pre_rope_keys()).
///
/// Prefill attention is kvc::cpu::prefill_attention over the cache as an any_cache: it reads the
/// reconstructed keys and values through gather() (O(tokens · D · r) per call, against the
/// O(queries · tokens · D) of the attention), the same K/V decode attention attends to in r
/// dimensions. chunk_tokens() allows any chunk (a stored token never changes form), so a caller
/// prefills in chunks and the first chunk fits the bases; a prompt shorter than r is refused.
///
/// The builders and the registration are per ISA (docs/isa.md), as runtime/quant_storages.hpp.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <map>
#include <vector>

#include <kvc/attention/rope.hpp>
#include <kvc/cpu/prefill_attention.hpp>
#include <kvc/cpu/projected_attention.hpp>
#include <kvc/error.hpp>
#include <kvc/lowrank/palu.hpp>
#include <kvc/lowrank/pca.hpp>
#include <kvc/lowrank/think.hpp>
#include <kvc/runtime/any_cache.hpp>
#include <kvc/runtime/make_cache.hpp>
#include <kvc/runtime/spec.hpp>
#include <kvc/store/kv_cache.hpp>
#include <kvc/store/projected_cache.hpp>
#include <kvc/types.hpp>

KVC_BEGIN_NAMESPACE
namespace runtime {

/// What a `pca(...)` spec asks for, parsed and checked against the cache's head_dim.
struct pca_spec {
  std::int32_t rank = 0;   ///< r_k, 1..head_dim
  std::int32_t vrank = 0;  ///< r_v, 1..head_dim
  bool pre_rope = false;
  rope_config rope{};      ///< with pre_rope: the model's
  std::int32_t sinks = 0;  ///< rows of the fitting append the bases reproduce exactly
  bool center = false;
  bool fp32 = false;       ///< coef=fp32 (else fp16)
  std::string store;       ///< coef=SPEC other than fp16/fp32: the storage the coefficient rows live in
};

namespace detail {

[[noreturn]] inline void bad_pca_arg(const spec_stage& st, const std::string& what, const std::string& expected) {
  kvc::detail::fail(kvc::detail::concat("kvc::runtime::make_cache: '", st.text, "': ", what, ", expected ", expected));
}

/// A rank argument: a whole count 1..D or a fraction in (0, 1) of D (pca.hpp's select_rank rounding).
inline std::int32_t pca_rank(const spec_stage& st, const char* key, double rank, std::int32_t D) {
  if (rank > 0 && rank < 1) return lowrank::select_rank(lowrank::rank_spec::of_fraction(rank), nullptr, D);
  if (!(rank >= 1 && rank <= D && rank == std::floor(rank)))
    bad_pca_arg(st, kvc::detail::concat(key, " = ", rank),
                kvc::detail::concat("a whole count 1..", D, " (head_dim) or a fraction in (0, 1) of head_dim"));
  return static_cast<std::int32_t>(rank);
}

/// Reads `coef=`: fp16 or fp32 (the projected cache's own pages), or any other registered storage
/// of rows (int8, int4, bf16, kivi(bits=4), ...) that then holds the coefficient rows.
inline void read_coef(const spec_stage& st, spec_args& a, pca_spec& p) {
  const spec_stage* nested = a.nested("coef");
  const std::string coef = nested ? nested->text : a.word("coef", "fp16");
  p.fp32 = coef == "fp32";
  if (coef == "fp16" || coef == "fp32") return;
  const std::string name = parse_spec(coef).at(0).name;
  if (name == "pca" || name == "palu" || name == "think" || name == "xkv" || name == "layers")
    bad_pca_arg(st, "coef = " + coef, "fp16, fp32 or a storage of rows (int8, int4, bf16, kivi(...), ...), not " + name);
  p.store = coef;
}

/// Parses `pca(rank=, vrank=, pre_rope=, sinks=, center=, coef=)` for a cache of head_dim D. Ranks are read
/// as numbers so a fraction and a count share one argument.
inline pca_spec parse_pca(const spec_stage& st, std::int32_t D, const storage_options& o) {
  spec_args a(st, "kvc::runtime::make_cache");
  const double rank = a.number("rank");
  const double vrank = a.number("vrank", rank);
  const int pre_rope = a.integer("pre_rope", 0);
  const int sinks = a.integer("sinks", 0);
  const int center = a.integer("center", 0);
  pca_spec p;
  read_coef(st, a, p);
  a.finish("rank, vrank, pre_rope, sinks, center, coef");
  p.rank = pca_rank(st, "rank", rank, D);
  p.vrank = pca_rank(st, "vrank", vrank, D);
  if (pre_rope != 0 && pre_rope != 1) bad_pca_arg(st, kvc::detail::concat("pre_rope = ", pre_rope), "0 or 1");
  if (pre_rope == 1 && o.rope == nullptr) bad_pca_arg(st, "pre_rope = 1", "the model's RoPE in storage_options::rope");
  if (pre_rope == 1 && o.rope->head_dim != D)
    bad_pca_arg(st, kvc::detail::concat("pre_rope = 1 with storage_options::rope->head_dim = ", o.rope->head_dim),
                kvc::detail::concat("the cache's head_dim = ", D));
  p.pre_rope = pre_rope == 1;
  if (p.pre_rope) p.rope = *o.rope;
  if (sinks < 0 || sinks > std::min(p.rank, p.vrank))
    bad_pca_arg(st, kvc::detail::concat("sinks = ", sinks),
                kvc::detail::concat("0..min(rank, vrank) = ", std::min(p.rank, p.vrank), " (each sink may take a direction)"));
  p.sinks = sinks;
  if (center != 0 && center != 1) bad_pca_arg(st, kvc::detail::concat("center = ", center), "0 or 1");
  p.center = center == 1;
  return p;
}

/// What cpu::prefill_attention reads of an any_cache C, and no more: its generic path reads rows
/// through C::gather() (the rebuilt keys and values). Not the any_cache itself: the kernel's
/// sequence check asks a cache with contains() for num_sequences(), which any_cache lacks (the
/// callers check the sequence before the call instead).
template <class C>
struct rows_view {
  const C* c;
  const cache_config& config() const { return c->config(); }
  std::int32_t length(seq_id s, std::int32_t layer, std::int32_t head) const { return c->length(s, layer, head); }
  const std::int32_t* positions(seq_id s, std::int32_t layer, std::int32_t head) const { return c->positions(s, layer, head); }
  void gather(seq_id s, std::int32_t layer, std::int32_t head, float* k_out, float* v_out = nullptr) const {
    c->gather(s, layer, head, k_out, v_out);
  }
};

/// Parses `palu(rank=, vrank=, coef=)`: a pca_spec with pre-RoPE keys (Palu's latent is taken
/// before RoPE) and no sinks or centering (the bases come from the weights, not from rows).
inline pca_spec parse_palu(const spec_stage& st, std::int32_t D, const storage_options& o) {
  spec_args a(st, "kvc::runtime::make_cache");
  const double rank = a.number("rank");
  const double vrank = a.number("vrank", rank);
  pca_spec p;
  read_coef(st, a, p);
  a.finish("rank, vrank, coef");
  p.rank = pca_rank(st, "rank", rank, D);
  p.vrank = pca_rank(st, "vrank", vrank, D);
  if (o.rope == nullptr) bad_pca_arg(st, "no RoPE", "the model's RoPE in storage_options::rope (Palu's keys are rebuilt, then rotated)");
  if (o.rope->head_dim != D)
    bad_pca_arg(st, kvc::detail::concat("storage_options::rope->head_dim = ", o.rope->head_dim),
                kvc::detail::concat("the cache's head_dim = ", D));
  p.pre_rope = true;
  p.rope = *o.rope;
  return p;
}

/// The weights a `palu` cache takes its bases from, checked against the cache's shape.
inline void check_weights(const spec_stage& st, const cache_config& c, const storage_options& o) {
  const projection_weights* w = o.weights;
  if (w == nullptr)
    bad_pca_arg(st, "no weights", "the model's W_k and W_v in storage_options::weights (Palu factors them)");
  if (w->in < 1) bad_pca_arg(st, kvc::detail::concat("storage_options::weights->in = ", w->in), "at least 1 input column");
  for (const auto* m : {&w->wk, &w->wv}) {
    const char* name = m == &w->wk ? "wk" : "wv";
    if (static_cast<std::int32_t>(m->size()) != c.num_layers)
      bad_pca_arg(st, kvc::detail::concat("storage_options::weights->", name, ".size() = ", m->size()),
                  kvc::detail::concat("num_layers = ", c.num_layers, " matrices"));
    for (std::size_t l = 0; l < m->size(); ++l)
      if ((*m)[l] == nullptr) bad_pca_arg(st, kvc::detail::concat("storage_options::weights->", name, "[", l, "] is null"), "a matrix per layer");
  }
}

/// The entry of live sequence s in a storage's own sequence table (think, xkv); the message names
/// the public call cls + fn.
template <class Map>
const typename Map::mapped_type& live_entry(const Map& m, seq_id s, const char* cls, const char* fn) {
  auto it = m.find(s);
  if (it == m.end())
    kvc::detail::fail(kvc::detail::concat(cls, fn, ": seq = ", s, " is not a live sequence of this cache, expected one of its ",
                                          m.size(), " live sequence ids"));
  return it->second;
}
/// layer, checked against 0..num_layers - 1; the message names cls + fn.
inline std::int32_t checked_layer(std::int32_t layer, std::int32_t num_layers, const char* cls, const char* fn) {
  if (!(layer >= 0 && layer < num_layers))
    kvc::detail::fail(kvc::detail::concat(cls, fn, ": layer = ", layer, ", expected 0..", num_layers - 1));
  return layer;
}

/// What a `think(...)` spec asks for.
struct think_spec {
  double ratio = 0;        ///< key channels pruned: floor(ratio · D)
  double vratio = 0;       ///< value channels pruned (the paper's value-side variant); 0: values whole
  std::int32_t window = 32;
  std::int32_t key_kept = 0, value_kept = 0;
  bool fp32 = false;
};

/// Parses `think(ratio=, vratio=, window=, coef=)` for a cache of head_dim D.
inline think_spec parse_think(const spec_stage& st, std::int32_t D) {
  spec_args a(st, "kvc::runtime::make_cache");
  think_spec p;
  p.ratio = a.number("ratio");
  p.vratio = a.number("vratio", 0.0);
  const int window = a.integer("window", 32);
  const std::string coef = a.word("coef", "fp16");
  a.finish("ratio, vratio, window, coef");
  for (const auto& [key, r] : {std::pair<const char*, double>{"ratio", p.ratio}, {"vratio", p.vratio}})
    if (!(r >= 0 && r < 1))
      bad_pca_arg(st, kvc::detail::concat(key, " = ", r), "0 <= ratio < 1, the fraction of channels pruned");
  if (window < 1) bad_pca_arg(st, kvc::detail::concat("window = ", window), "at least 1 query (ThinK's observation window)");
  if (coef != "fp16" && coef != "fp32") bad_pca_arg(st, "coef = " + coef, "fp16 or fp32");
  p.window = window;
  p.key_kept = lowrank::think_kept(p.ratio, D);
  p.value_kept = lowrank::think_kept(p.vratio, D);
  p.fp32 = coef == "fp32";
  return p;
}

}  // namespace detail

// ---- per ISA (docs/isa.md): the cache runs this TU's projected kernel ----
KVC_BEGIN_ISA_NAMESPACE

/// A registered storage that holds a projected cache's coefficient rows (layers and kv heads of
/// the cache, head_dim = the row's half, hw): `coef=int8` of pca, `latent=int8` of xkv. Its
/// errors name what the low-rank spec asked of it.
inline std::unique_ptr<any_cache> row_store(const std::string& owner, const std::string& spec, const cache_config& c,
                                            std::int32_t rk, std::int32_t rv) {
  try {
    return detail::make_part(spec, c);
  } catch (const kvc::error& e) {
    kvc::detail::fail(kvc::detail::concat("kvc::runtime::make_cache: '", owner, "': ", spec, " would hold rows of ",
                                          c.head_dim, " values ((rank + vrank + 1) / 2 = (", rk, " + ", rv,
                                          " + 1) / 2) and refused them: ", e.what()));
  }
}

/// any_cache over lowrank::projected_cache<T>, fitting its bases on each layer's first append
/// (see the file comment). config() is the caller's shape (head_dim D), since gather() and
/// attention() speak D channels; the coefficient pages are head_dim r.
/// With `coef=SPEC` (not fp16/fp32) the coefficient rows live in that storage instead (the
/// projected cache keeps the bases and encodes the rows; it holds no tokens): e.g. int8 pages
/// with per-token scales. Attention then reads each head's rows decoded once per call through
/// the general path (lowrank_detail::attend_rows_general), O(n · hw) of decoding next to its
/// O(n · G · r) of scores; keep, fork and bytes are the store's.
/// Threads: as kv_cache (docs/threading.md); an append that fits a layer's bases writes them, so
/// it is exclusive like add_sequence.
template <class T>
class pca_cache final : public any_cache {
 public:
  pca_cache(std::string name, const cache_config& cfg, const pca_spec& p)
      : name_(std::move(name)), cfg_(cfg), center_(p.center), sinks_(p.sinks), c_(projected(cfg, p)),
        store_(p.store.empty() ? nullptr : row_store(name_, p.store, store_config(cfg, c_), c_.key_rank(), c_.value_rank())),
        fitted_(static_cast<std::size_t>(cfg.num_layers), false) {}
  /// Palu: every basis from the model's weights (lowrank::weight_basis of each head's rows of W_k
  /// and W_v) at construction, so no append fits anything.
  pca_cache(std::string name, const cache_config& cfg, const pca_spec& p, const projection_weights& w)
      : pca_cache(std::move(name), cfg, p) {
    const std::int32_t H = cfg.num_kv_heads, D = cfg.head_dim;
    for (std::int32_t l = 0; l < cfg.num_layers; ++l) {
      for (std::int32_t h = 0; h < H; ++h) {
        const std::size_t off = static_cast<std::size_t>(h) * D * w.in;
        c_.set_basis(l, h, lowrank::weight_basis(w.wk[static_cast<std::size_t>(l)] + off, D, w.in, w.in, lowrank::rank_spec::of_count(p.rank)),
                     lowrank::weight_basis(w.wv[static_cast<std::size_t>(l)] + off, D, w.in, w.in, lowrank::rank_spec::of_count(p.vrank)));
      }
      fitted_[static_cast<std::size_t>(l)] = true;
    }
  }

  lowrank::projected_cache<T>& get() noexcept { return c_; }
  const lowrank::projected_cache<T>& get() const noexcept { return c_; }
  /// The storage of the coefficient rows with coef=SPEC; null with fp16/fp32 (the projected cache's own pages).
  const any_cache* coefficient_store() const noexcept { return store_.get(); }

  const cache_config& config() const override { return cfg_; }
  std::string name() const override { return name_; }
  const char* isa() const override { return KVC_ISA_STR(KVC_ISA_NAMESPACE); }
  seq_id add_sequence() override { return store_ ? store_->add_sequence() : c_.add_sequence(); }
  void remove_sequence(seq_id s) override { store_ ? store_->remove_sequence(s) : c_.remove_sequence(s); }
  bool contains(seq_id s) const override { return store_ ? store_->contains(s) : c_.contains(s); }
  seq_id fork(seq_id s) override { return store_ ? store_->fork(s) : c_.fork(s); }

  void append(seq_id s, std::int32_t layer, const float* k, const float* v, std::int32_t n,
              const std::int32_t* positions) override {
    constexpr const char* who = "kvc::runtime::pca_cache::append";
    KVC_EXPECTS_IN(who, layer >= 0 && layer < cfg_.num_layers, "layer = ", layer, ", expected 0..", cfg_.num_layers - 1);
    if (n > 0 && !fitted_[static_cast<std::size_t>(layer)]) {
      KVC_EXPECTS_IN(who, contains(s), "seq = ", s, " is not a live sequence of this cache (the cache is unchanged)");
      // All or nothing (fit_layer_then): a refused fit or append leaves no basis behind, and the
      // layer, holding no coefficients yet, accepts a later fit.
      c_.fit_layer_then(layer, k, v, n, center_, sinks_, who, [&] { put(s, layer, k, v, n, positions); });
      fitted_[static_cast<std::size_t>(layer)] = true;  // only once tokens are stored on these bases
      return;
    }
    put(s, layer, k, v, n, positions);
  }
  void keep(seq_id s, std::int32_t layer, std::int32_t head, const std::int32_t* kept, std::int32_t n) override {
    store_ ? store_->keep(s, layer, head, kept, n) : c_.keep(s, layer, head, kept, n);
  }
  void keep_layer(seq_id s, std::int32_t layer, const std::vector<std::vector<std::int32_t>>& kept) override {
    store_ ? store_->keep_layer(s, layer, kept) : c_.keep_layer(s, layer, kept);
  }

  std::int32_t length(seq_id s, std::int32_t layer, std::int32_t head) const override {
    return store_ ? store_->length(s, layer, head) : c_.length(s, layer, head);
  }
  const std::int32_t* positions(seq_id s, std::int32_t layer, std::int32_t head) const override {
    return store_ ? store_->positions(s, layer, head) : c_.coefficients().positions(s, layer, head);
  }
  std::int32_t seen(seq_id s, std::int32_t layer) const override {
    return store_ ? store_->seen(s, layer) : c_.coefficients().seen(s, layer);
  }
  /// The keys and values the cache stands for, rebuilt in D channels (x̂ = U c + μ; keys then
  /// rotated to their positions with pre_rope=1), so scorers and evictors that read keys see what
  /// attention attends to.
  void gather(seq_id s, std::int32_t layer, std::int32_t head, float* k_out, float* v_out) const override {
    if (!store_) return kvc::cpu::projected_gather(c_, s, layer, head, k_out, v_out);
    const std::vector<float> r = rows(s, layer, head);
    const std::int32_t n = store_->length(s, layer, head);
    const std::size_t half = r.size() / 2;
    kvc::cpu::projected_rebuild(c_, layer, head, r.data(), r.data() + half, n, store_->positions(s, layer, head), k_out, v_out);
  }
  bool pre_rope_keys() const override { return c_.config().pre_rope; }
  void attention(seq_id s, std::int32_t layer, const float* q, std::int32_t num_q_heads, float* out,
                 const decode_options& opt) const override {
    if (!store_) return kvc::cpu::projected_decode_attention(c_, s, layer, q, num_q_heads, out, opt);
    store_attention(s, layer, q, num_q_heads, out, opt);
  }
  bool has_prefill_attention() const override { return true; }
  /// cpu::prefill_attention over `rows_view`: its generic path reads rows through gather() (U c + μ).
  void prefill_attention(seq_id s, std::int32_t layer, const float* q, std::int32_t num_queries,
                         const std::int32_t* q_positions, std::int32_t num_q_heads, float* out,
                         const decode_options& opt) const override {
    KVC_EXPECTS_IN("kvc::runtime::pca_cache::prefill_attention", contains(s), "seq = ", s,
                   " is not a live sequence of this cache, expected a live sequence id");
    kvc::cpu::prefill_attention(detail::rows_view<pca_cache>{this}, s, layer, q, num_queries, q_positions, num_q_heads, out, opt);
  }
  /// Any chunk with the projected cache's pages: a stored token's coefficients never change (no
  /// re-encoding window); a coefficient store says its own.
  std::int32_t chunk_tokens(seq_id s, std::int32_t layer, std::int32_t limit) const override {
    return store_ ? store_->chunk_tokens(s, layer, limit) : c_.coefficients().chunk_tokens(s, layer, limit);
  }

  std::size_t bytes_in_use() const override { return store_ ? store_->bytes_in_use() : c_.bytes_in_use(); }
  std::size_t bytes_in_use(std::int32_t layer) const override {
    return store_ ? store_->bytes_in_use(layer) : c_.bytes_in_use(layer);
  }
  memory_traffic traffic() const override { return store_ ? store_->traffic() : c_.coefficients().traffic(); }
  /// The bases (U_k, U_v, means) and the coefficient store's bookkeeping.
  std::size_t metadata_bytes() const override { return c_.metadata_bytes() + (store_ ? store_->metadata_bytes() : 0); }
  std::int64_t tokens_held() const override { return store_ ? store_->tokens_held() : c_.coefficients().tokens_held(); }

 private:
  static lowrank::projected_config projected(const cache_config& c, const pca_spec& s) {
    return lowrank::projected_shape(c, s.rank, s.vrank, s.pre_rope ? &s.rope : nullptr);
  }
  static cache_config store_config(const cache_config& c, const lowrank::projected_cache<T>& pc) {
    cache_config r = c;
    r.head_dim = pc.row_width() / 2;
    r.check_finite = false;  // encode() checked the inputs
    return r;
  }
  /// Encodes n tokens and stores them (in the projected cache's pages or the coefficient store).
  void put(seq_id s, std::int32_t layer, const float* k, const float* v, std::int32_t n, const std::int32_t* positions) {
    if (!store_) return c_.append(s, layer, k, v, n, positions);
    if (n == 0) return;
    std::vector<float> kr, vr;
    c_.encode(layer, k, v, n, kr, vr, false, "kvc::runtime::pca_cache::append");
    store_->append(s, layer, kr.data(), vr.data(), n, positions);
  }
  /// One stream's rows from the coefficient store: its K halves, then its V halves ([n][hw] each).
  std::vector<float> rows(seq_id s, std::int32_t layer, std::int32_t head) const {
    const std::int32_t n = store_->length(s, layer, head), hw = c_.row_width() / 2;
    std::vector<float> r(static_cast<std::size_t>(2) * n * hw);
    if (n > 0) store_->gather(s, layer, head, r.data(), r.data() + static_cast<std::size_t>(n) * hw);
    return r;
  }
  /// Decode attention over the coefficient store (the contract of projected_decode_attention).
  void store_attention(seq_id s, std::int32_t layer, const float* q, std::int32_t num_q_heads, float* out,
                       const decode_options& opt) const {
    constexpr const char* who = "kvc::runtime::pca_cache::attention";
    const std::int32_t H = cfg_.num_kv_heads, D = cfg_.head_dim;
    KVC_EXPECTS_IN(who, contains(s), "seq = ", s, " is not a live sequence of this cache, expected a live sequence id");
    kvc::cpu::lowrank_detail::check_decode_args(who, layer, cfg_.num_layers, num_q_heads, H, D, q, out);
    std::int64_t held = 0, longest = 0;
    for (std::int32_t h = 0; h < H; ++h) {
      KVC_EXPECTS_IN(who, c_.has_basis(layer, h), "layer ", layer, " head ", h, " has no basis, expected an append first");
      held += store_->length(s, layer, h);
      longest = std::max<std::int64_t>(longest, store_->length(s, layer, h));
    }
    KVC_EXPECTS_IN(who, held > 0, "seq = ", s, ", layer = ", layer,
                   " holds 0 tokens in all its kv heads, expected at least one token to attend to");
    KVC_EXPECTS_IN(who, (opt.probs == nullptr && opt.group_probs == nullptr) || opt.probs_stride >= longest,
                   "opt.probs_stride = ", opt.probs_stride, ", expected >= the longest stream of the layer, ", longest,
                   " tokens, with probs or group_probs");
    const float scale = opt.scale != 0.0f ? opt.scale : 1.0f / std::sqrt(static_cast<float>(D));
    const std::int32_t G = num_q_heads / H, hw = c_.row_width() / 2;
    auto run = [&](std::int32_t h) {
      const std::vector<float> r = rows(s, layer, h);
      const std::int32_t n = store_->length(s, layer, h);
      const float* kr = r.data();
      const float* vr = r.data() + static_cast<std::size_t>(n) * hw;
      auto row = [&](std::int32_t t, float* z) {
        std::copy_n(kr + static_cast<std::size_t>(t) * hw, hw, z);
        std::copy_n(vr + static_cast<std::size_t>(t) * hw, hw, z + hw);
      };
      kvc::cpu::lowrank_detail::attend_rows_general<kvc::cpu::default_arch>(
          row, hw, n, store_->positions(s, layer, h), c_.key_basis(layer, h), c_.value_basis(layer, h), c_.key_rope(), h,
          G, q, scale, out, opt);
    };
    if (opt.pool && H > 1) opt.pool->parallel_for(H, run);
    else
      for (std::int32_t h = 0; h < H; ++h) run(h);
  }

  std::string name_;
  cache_config cfg_;
  bool center_;
  std::int32_t sinks_;
  lowrank::projected_cache<T> c_;
  std::unique_ptr<any_cache> store_;  // coef=SPEC: the rows' storage; null: c_'s own pages
  std::vector<bool> fitted_;  // [layer]: bases set and tokens stored on them
};


/// any_cache for ThinK (kvc/lowrank/think.hpp): each layer is stored whole (T, D channels) until
/// observe_window() brings the prompt's last queries; then, per kv head, the kept key channels
/// (and, with vratio, value channels) are chosen from that window and every stored key, the
/// layer's tokens of every sequence move into a projected cache whose bases select those
/// channels, and later tokens are stored pruned on append. The channels belong to the cache (the
/// first sequence observed fits them), as pca's bases do.
///
/// Why tokens appended after the fit are pruned too: the paper keeps decoded tokens whole (and
/// kvpress prunes nothing after the prompt); kvc keeps one form per layer so decode runs one
/// kernel and the saving holds as the cache grows. Forked sequences stop sharing the layer's pages
/// when it moves (each is copied into the pruned store).
/// Threads: as kv_cache (docs/threading.md); observe_window is exclusive like add_sequence.
template <class T>
class think_cache final : public any_cache {
 public:
  think_cache(std::string name, const cache_config& cfg, const detail::think_spec& p)
      : name_(std::move(name)), cfg_(cfg), spec_(p), full_(full_config(cfg)), proj_(projected(cfg, p)),
        fitted_(static_cast<std::size_t>(cfg.num_layers), false) {}

  /// The whole-channel stage and the pruned store.
  const kv_cache<T>& staged() const noexcept { return full_; }
  const lowrank::projected_cache<T>& pruned() const noexcept { return proj_; }
  bool fitted(std::int32_t layer) const { return fitted_.at(static_cast<std::size_t>(layer)); }

  const cache_config& config() const override { return cfg_; }
  std::string name() const override { return name_; }
  const char* isa() const override { return KVC_ISA_STR(KVC_ISA_NAMESPACE); }
  seq_id add_sequence() override {
    return commit(full_.add_sequence(), [&] { return proj_.add_sequence(); },
                  std::vector<std::int32_t>(static_cast<std::size_t>(cfg_.num_layers), 0));
  }
  void remove_sequence(seq_id s) override {
    const entry e = at(s, "remove_sequence");
    seqs_.erase(s);
    full_.remove_sequence(e.full);
    proj_.remove_sequence(e.proj);
  }
  bool contains(seq_id s) const override { return seqs_.count(s) != 0; }
  seq_id fork(seq_id s) override {
    const entry& e = at(s, "fork");
    return commit(full_.fork(e.full), [&] { return proj_.fork(e.proj); }, e.seen_base);
  }

  void append(seq_id s, std::int32_t layer, const float* k, const float* v, std::int32_t n,
              const std::int32_t* positions) override {
    const entry& e = at(s, "append");
    if (!fitted(checked(layer, "append"))) return full_.append(e.full, layer, k, v, n, positions);
    std::vector<std::int32_t> next;
    if (!positions && n > 0) {  // the layer's next positions, counted across both stores
      next.resize(static_cast<std::size_t>(n));
      const std::int32_t first = seen(s, layer);
      for (std::int32_t i = 0; i < n; ++i) next[static_cast<std::size_t>(i)] = first + i;
      positions = next.data();
    }
    proj_.append(e.proj, layer, k, v, n, positions);
  }
  void keep(seq_id s, std::int32_t layer, std::int32_t head, const std::int32_t* kept, std::int32_t n) override {
    const entry& e = at(s, "keep");
    if (fitted(checked(layer, "keep"))) proj_.keep(e.proj, layer, head, kept, n);
    else full_.keep(e.full, layer, head, kept, n);
  }
  void keep_layer(seq_id s, std::int32_t layer, const std::vector<std::vector<std::int32_t>>& kept) override {
    const entry& e = at(s, "keep_layer");
    if (fitted(checked(layer, "keep_layer"))) proj_.keep_layer(e.proj, layer, kept);
    else full_.keep_layer(e.full, layer, kept);
  }

  std::int32_t length(seq_id s, std::int32_t layer, std::int32_t head) const override {
    const entry& e = at(s, "length");
    return fitted(checked(layer, "length")) ? proj_.length(e.proj, layer, head) : full_.length(e.full, layer, head);
  }
  const std::int32_t* positions(seq_id s, std::int32_t layer, std::int32_t head) const override {
    const entry& e = at(s, "positions");
    return fitted(checked(layer, "positions")) ? proj_.coefficients().positions(e.proj, layer, head)
                                               : full_.positions(e.full, layer, head);
  }
  std::int32_t seen(seq_id s, std::int32_t layer) const override {
    const entry& e = at(s, "seen");
    if (!fitted(checked(layer, "seen"))) return full_.seen(e.full, layer);
    return proj_.coefficients().seen(e.proj, layer) + e.seen_base[static_cast<std::size_t>(layer)];
  }
  /// Pruned layers: the kept channels back in place, the pruned ones 0 (what attention reads).
  void gather(seq_id s, std::int32_t layer, std::int32_t head, float* k_out, float* v_out) const override {
    const entry& e = at(s, "gather");
    if (fitted(checked(layer, "gather"))) kvc::cpu::projected_gather(proj_, e.proj, layer, head, k_out, v_out);
    else full_.gather(e.full, layer, head, k_out, v_out);
  }
  void attention(seq_id s, std::int32_t layer, const float* q, std::int32_t num_q_heads, float* out,
                 const decode_options& opt) const override {
    const entry& e = at(s, "attention");
    if (fitted(checked(layer, "attention"))) kvc::cpu::projected_decode_attention(proj_, e.proj, layer, q, num_q_heads, out, opt);
    else kvc::cpu::decode_attention(full_, e.full, layer, q, num_q_heads, out, opt);
  }
  bool has_prefill_attention() const override { return true; }
  void prefill_attention(seq_id s, std::int32_t layer, const float* q, std::int32_t num_queries,
                         const std::int32_t* q_positions, std::int32_t num_q_heads, float* out,
                         const decode_options& opt) const override {
    const entry& e = at(s, "prefill_attention");
    if (fitted(checked(layer, "prefill_attention")))
      kvc::cpu::prefill_attention(detail::rows_view<think_cache>{this}, s, layer, q, num_queries, q_positions, num_q_heads, out, opt);
    else
      kvc::cpu::prefill_attention(full_, e.full, layer, q, num_queries, q_positions, num_q_heads, out, opt);
  }
  std::int32_t chunk_tokens(seq_id s, std::int32_t layer, std::int32_t limit) const override {
    const entry& e = at(s, "chunk_tokens");
    return fitted(checked(layer, "chunk_tokens")) ? proj_.coefficients().chunk_tokens(e.proj, layer, limit)
                                                  : full_.chunk_tokens(e.full, layer, limit);
  }

  std::size_t bytes_in_use() const override { return full_.bytes_in_use() + proj_.bytes_in_use(); }
  std::size_t bytes_in_use(std::int32_t layer) const override { return full_.bytes_in_use(layer) + proj_.bytes_in_use(layer); }
  memory_traffic traffic() const override {
    memory_traffic t = full_.traffic();
    t += proj_.coefficients().traffic();
    return t;
  }
  /// The selections (as bases), both stores' bookkeeping and the sequence table.
  std::size_t metadata_bytes() const override {
    return full_.metadata_bytes() + proj_.metadata_bytes() + seqs_.size() * (sizeof(entry) + 4 * cfg_.num_layers);
  }
  std::int64_t tokens_held() const override { return full_.tokens_held() + proj_.coefficients().tokens_held(); }

  std::int32_t query_window() const override { return spec_.window; }
  /// Fits the layer's channels on sequence s's stored keys (and values) and the window q
  /// ([n][num_q_heads][head_dim], the layer's last n positions), then moves the layer of every
  /// sequence into the pruned store. A layer already pruned: nothing. All or nothing: a refused
  /// window or a failed allocation leaves every sequence's layer where it was.
  void observe_window(seq_id s, std::int32_t layer, const float* q, std::int32_t n, std::int32_t num_q_heads) override {
    constexpr const char* who = "kvc::runtime::think_cache::observe_window";
    const entry& fit_seq = at(s, "observe_window");
    if (fitted(checked(layer, "observe_window"))) return;
    const std::int32_t H = cfg_.num_kv_heads, D = cfg_.head_dim;
    KVC_EXPECTS_IN(who, num_q_heads > 0 && num_q_heads % H == 0, "num_q_heads = ", num_q_heads,
                   ", expected a positive multiple of num_kv_heads = ", H);
    KVC_EXPECTS_IN(who, n >= 1, "n = ", n, ", expected at least 1 query to score channels with (the cache is unchanged)");
    KVC_EXPECTS_IN(who, q != nullptr, "q is null with n = ", n);
    for (std::size_t i = 0; i < static_cast<std::size_t>(n) * num_q_heads * D; ++i)
      KVC_EXPECTS_IN(who, std::isfinite(q[i]), "q[", i, "] = ", q[i], ", expected finite queries (the cache is unchanged)");
    const std::int32_t G = num_q_heads / H, seen0 = full_.seen(fit_seq.full, layer);
    std::vector<std::int32_t> qpos(static_cast<std::size_t>(n));
    for (std::int32_t i = 0; i < n; ++i) qpos[static_cast<std::size_t>(i)] = seen0 - n + i;
    // The staged rows of the fitting sequence, gathered once: scored here, moved below.
    const staged_rows fit_rows = gather_layer(fit_seq, layer);
    std::vector<std::pair<lowrank::basis, lowrank::basis>> b;
    for (std::int32_t h = 0; h < H; ++h) {
      const std::int32_t L = fit_rows.len[static_cast<std::size_t>(h)];
      const float* k = fit_rows.k[static_cast<std::size_t>(h)].data();
      lowrank::window_queries w{q + static_cast<std::size_t>(h) * G * D, n, G, static_cast<std::int64_t>(num_q_heads) * D,
                                qpos.data()};
      const std::vector<double> ks = lowrank::key_channel_scores(w, k, L, D, D);
      lowrank::basis bk = lowrank::selection_basis(lowrank::top_channels(ks, spec_.key_kept), D, &ks);
      std::vector<double> vs(static_cast<std::size_t>(D), 1.0);  // values whole: every channel kept
      if (spec_.value_kept < D)
        vs = lowrank::value_channel_scores(w, k, fit_rows.v[static_cast<std::size_t>(h)].data(),
                                           fit_rows.pos[static_cast<std::size_t>(h)], L, D, D,
                                           1.0 / std::sqrt(static_cast<double>(D)));
      b.emplace_back(std::move(bk), lowrank::selection_basis(lowrank::top_channels(vs, spec_.value_kept), D, &vs));
    }
    std::vector<const entry*> moved;
    moved.reserve(seqs_.size());
    for (std::int32_t h = 0; h < H; ++h)  // the pruned store holds nothing of this layer yet
      proj_.set_basis(layer, h, std::move(b[static_cast<std::size_t>(h)].first), std::move(b[static_cast<std::size_t>(h)].second));
    try {
      for (const auto& [id, e] : seqs_) {
        const staged_rows other = &e == &fit_seq ? staged_rows{} : gather_layer(e, layer);
        const staged_rows& r = &e == &fit_seq ? fit_rows : other;
        std::vector<const float*> kp, vp;
        for (std::int32_t h = 0; h < H; ++h)
          kp.push_back(r.k[static_cast<std::size_t>(h)].data()), vp.push_back(r.v[static_cast<std::size_t>(h)].data());
        proj_.append_streams(e.proj, layer, kp, vp, r.len, r.pos);
        moved.push_back(&e);
      }
    } catch (...) {
      const std::vector<std::vector<std::int32_t>> none(static_cast<std::size_t>(H));
      for (const entry* e : moved) proj_.keep_layer(e->proj, layer, none);
      for (std::int32_t h = 0; h < H; ++h) proj_.clear_basis(layer, h);
      throw;
    }
    // Commit (nothing here throws): reads go to the pruned store from here on.
    for (auto& [id, e] : seqs_)
      e.seen_base[static_cast<std::size_t>(layer)] = full_.seen(e.full, layer) - proj_.coefficients().seen(e.proj, layer);
    fitted_[static_cast<std::size_t>(layer)] = true;
    // Then the staged pages are freed. A failed host allocation in keep_layer would leave some
    // of them held (counted in bytes_in_use, never read again), not a wrong cache.
    const std::vector<std::vector<std::int32_t>> none(static_cast<std::size_t>(H));
    for (auto& [id, e] : seqs_) full_.keep_layer(e.full, layer, none);
  }

 private:
  struct entry {
    seq_id full, proj;
    std::vector<std::int32_t> seen_base;  // [layer] seen() - the pruned store's seen, once pruned
  };
  /// One sequence's staged layer, per kv head: rows [len][D] as float and positions (the store's).
  struct staged_rows {
    std::vector<std::vector<float>> k, v;
    std::vector<std::int32_t> len;
    std::vector<const std::int32_t*> pos;
  };
  staged_rows gather_layer(const entry& e, std::int32_t layer) const {
    const std::int32_t H = cfg_.num_kv_heads, D = cfg_.head_dim;
    staged_rows r;
    r.k.resize(static_cast<std::size_t>(H));
    r.v.resize(r.k.size());
    for (std::int32_t h = 0; h < H; ++h) {
      const std::int32_t L = full_.length(e.full, layer, h);
      r.k[static_cast<std::size_t>(h)].resize(static_cast<std::size_t>(L) * D);
      r.v[static_cast<std::size_t>(h)].resize(static_cast<std::size_t>(L) * D);
      full_.gather(e.full, layer, h, r.k[static_cast<std::size_t>(h)].data(), r.v[static_cast<std::size_t>(h)].data());
      r.len.push_back(L);
      r.pos.push_back(full_.positions(e.full, layer, h));
    }
    return r;
  }
  /// Records a sequence whose staging id is `a` once `make_b` made its pruned-store id; anything
  /// that throws on the way removes what was made.
  template <class MakeB>
  seq_id commit(seq_id a, MakeB&& make_b, std::vector<std::int32_t> base) {
    bool have_b = false;
    seq_id b = 0;
    try {
      b = make_b();
      have_b = true;
      seqs_.emplace(next_, entry{a, b, std::move(base)});
    } catch (...) {
      if (have_b) proj_.remove_sequence(b);
      full_.remove_sequence(a);
      throw;
    }
    return next_++;
  }
  const entry& at(seq_id s, const char* fn) const { return detail::live_entry(seqs_, s, "kvc::runtime::think_cache::", fn); }
  std::int32_t checked(std::int32_t layer, const char* fn) const {
    return detail::checked_layer(layer, cfg_.num_layers, "kvc::runtime::think_cache::", fn);
  }
  static cache_config full_config(cache_config c) {
    c.check_finite = true;
    return c;
  }
  static lowrank::projected_config projected(const cache_config& c, const detail::think_spec& s) {
    return lowrank::projected_shape(c, s.key_kept, s.value_kept, nullptr);
  }

  std::string name_;
  cache_config cfg_;
  detail::think_spec spec_;
  kv_cache<T> full_;
  lowrank::projected_cache<T> proj_;
  std::vector<bool> fitted_;  // [layer]: channels chosen, tokens in the pruned store
  std::map<seq_id, entry> seqs_;
  seq_id next_ = 0;
};
KVC_END_ISA_NAMESPACE

KVC_BEGIN_ISA_NAMESPACE
/// Registers `pca`, `palu` and `think` in the storage registry of this TU's ISA configuration
/// (runtime/make_cache.hpp), so make_cache builds them by spec. Including this header registers
/// nothing (no static initialisation): call this before the first make_cache that names one, from a
/// TU built with the -m flags of those calls (docs/isa.md); calling it again sets the same
/// builders. A template only so that a TU that includes the header and does not call it
/// instantiates no cache.
template <class Deferred = void>
void register_lowrank_storages() {
  using namespace detail;  // the builders
  registered_storages()["pca"] = [](const spec_stage& st, const cache_config& c,
                                 const storage_options& o) -> std::unique_ptr<any_cache> {
    const pca_spec p = parse_pca(st, c.head_dim, o);
    if (p.fp32) return std::make_unique<pca_cache<float>>(st.text, c, p);
    return std::make_unique<pca_cache<half>>(st.text, c, p);
  };
  registered_storages()["palu"] = [](const spec_stage& st, const cache_config& c,
                                  const storage_options& o) -> std::unique_ptr<any_cache> {
    const pca_spec p = parse_palu(st, c.head_dim, o);
    check_weights(st, c, o);
    if (p.fp32) return std::make_unique<pca_cache<float>>(st.text, c, p, *o.weights);
    return std::make_unique<pca_cache<half>>(st.text, c, p, *o.weights);
  };
  registered_storages()["think"] = [](const spec_stage& st, const cache_config& c,
                                   const storage_options&) -> std::unique_ptr<any_cache> {
    const think_spec p = parse_think(st, c.head_dim);
    if (p.fp32) return std::make_unique<think_cache<float>>(st.text, c, p);
    return std::make_unique<think_cache<half>>(st.text, c, p);
  };
}
KVC_END_ISA_NAMESPACE
}  // namespace runtime
KVC_END_NAMESPACE
