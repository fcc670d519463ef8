// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Registers the projected (PCA, low-rank) storage with the runtime builder, so specs can name it:
///
///   pca(rank=N, vrank=N, pre_rope=0|1, sinks=N, center=0|1, coef=fp16|fp32)
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
///     coef      element type of the stored coefficients; default fp16
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
#include <vector>

#include <kvc/attention/rope.hpp>
#include <kvc/error.hpp>
#include <kvc/cpu/prefill_attention.hpp>
#include <kvc/lowrank/pca.hpp>
#include <kvc/lowrank/projected_attention.hpp>
#include <kvc/lowrank/projected_cache.hpp>
#include <kvc/runtime/any_cache.hpp>
#include <kvc/runtime/make_cache.hpp>
#include <kvc/runtime/spec.hpp>
#include <kvc/store/kv_cache.hpp>
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

/// Parses `pca(rank=, vrank=, pre_rope=, sinks=, center=, coef=)` for a cache of head_dim D. Ranks are read
/// as numbers so a fraction and a count share one argument.
inline pca_spec parse_pca(const spec_stage& st, std::int32_t D, const storage_options& o) {
  spec_args a(st, "kvc::runtime::make_cache");
  const double rank = a.number("rank");
  const double vrank = a.number("vrank", rank);
  const int pre_rope = a.integer("pre_rope", 0);
  const int sinks = a.integer("sinks", 0);
  const int center = a.integer("center", 0);
  const std::string coef = a.word("coef", "fp16");
  a.finish("rank, vrank, pre_rope, sinks, center, coef");
  pca_spec p;
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
  if (coef != "fp16" && coef != "fp32") bad_pca_arg(st, "coef = " + coef, "fp16 or fp32");
  p.center = center == 1;
  p.fp32 = coef == "fp32";
  return p;
}

}  // namespace detail

// ---- per ISA (docs/isa.md): the cache runs this TU's projected kernel ----
KVC_BEGIN_ISA_NAMESPACE

/// any_cache over lowrank::projected_cache<T>, fitting its bases on each layer's first append
/// (see the file comment). config() is the caller's shape (head_dim D), since gather() and
/// attention() speak D channels; the coefficient pages are head_dim r.
/// Threads: as kv_cache (docs/threading.md); an append that fits a layer's bases writes them, so
/// it is exclusive like add_sequence.
template <class T>
class pca_cache final : public any_cache {
 public:
  pca_cache(std::string name, const cache_config& cfg, const pca_spec& p)
      : name_(std::move(name)), cfg_(cfg), center_(p.center), sinks_(p.sinks), c_(projected(cfg, p)),
        fitted_(static_cast<std::size_t>(cfg.num_layers), false) {}

  lowrank::projected_cache<T>& get() noexcept { return c_; }
  const lowrank::projected_cache<T>& get() const noexcept { return c_; }

  const cache_config& config() const override { return cfg_; }
  std::string name() const override { return name_; }
  seq_id add_sequence() override { return c_.add_sequence(); }
  void remove_sequence(seq_id s) override { c_.remove_sequence(s); }
  bool contains(seq_id s) const override { return c_.contains(s); }
  seq_id fork(seq_id s) override { return c_.fork(s); }

  void append(seq_id s, std::int32_t layer, const float* k, const float* v, std::int32_t n,
              const std::int32_t* positions) override {
    constexpr const char* who = "kvc::runtime::pca_cache::append";
    KVC_EXPECTS_IN(who, layer >= 0 && layer < cfg_.num_layers, "layer = ", layer, ", expected 0..", cfg_.num_layers - 1);
    if (n > 0 && !fitted_[static_cast<std::size_t>(layer)]) {
      const std::int32_t rk = c_.key_rank(), rv = c_.value_rank(), r = std::max(rk, rv);
      KVC_EXPECTS_IN(who, c_.contains(s), "seq = ", s, " is not a live sequence of this cache (the cache is unchanged)");
      KVC_EXPECTS_IN(who, n >= r, "n = ", n, " tokens in the first append of layer ", layer, ", expected at least max(rank, vrank) = ",
                     r, " to fit its bases (append the prompt in one call; the cache is unchanged)");
      KVC_EXPECTS_IN(who, k != nullptr && v != nullptr, "k or v is null with n = ", n);
      // Fit every head before setting any: fit_basis refuses non-finite rows, and a refusal then
      // leaves no basis behind.
      const std::int32_t H = cfg_.num_kv_heads, D = cfg_.head_dim;
      const std::int64_t stride = static_cast<std::int64_t>(H) * D;
      std::vector<std::pair<lowrank::basis, lowrank::basis>> b;
      b.reserve(static_cast<std::size_t>(H));
      for (std::int32_t h = 0; h < H; ++h) {
        const std::size_t off = static_cast<std::size_t>(h) * D;
        b.emplace_back(lowrank::fit_basis(k + off, n, D, stride, lowrank::rank_spec::of_count(rk), center_, sinks_),
                       lowrank::fit_basis(v + off, n, D, stride, lowrank::rank_spec::of_count(rv), center_, sinks_));
      }
      // The layer holds no coefficients yet, so set_basis accepts these (again, after a refused append).
      for (std::int32_t h = 0; h < H; ++h)
        c_.set_basis(layer, h, std::move(b[static_cast<std::size_t>(h)].first), std::move(b[static_cast<std::size_t>(h)].second));
      try {
        c_.append(s, layer, k, v, n, positions);
      } catch (...) {  // pool exhausted, or a coefficient past fp16: the layer is as before set_basis
        for (std::int32_t h = 0; h < H; ++h) c_.clear_basis(layer, h);
        throw;
      }
      fitted_[static_cast<std::size_t>(layer)] = true;  // only once tokens are stored on these bases
      return;
    }
    c_.append(s, layer, k, v, n, positions);
  }
  void keep(seq_id s, std::int32_t layer, std::int32_t head, const std::int32_t* kept, std::int32_t n) override {
    c_.keep(s, layer, head, kept, n);
  }
  void keep_layer(seq_id s, std::int32_t layer, const std::vector<std::vector<std::int32_t>>& kept) override {
    c_.keep_layer(s, layer, kept);
  }

  std::int32_t length(seq_id s, std::int32_t layer, std::int32_t head) const override { return c_.length(s, layer, head); }
  const std::int32_t* positions(seq_id s, std::int32_t layer, std::int32_t head) const override {
    return c_.coefficients().positions(s, layer, head);
  }
  std::int32_t seen(seq_id s, std::int32_t layer) const override { return c_.coefficients().seen(s, layer); }
  /// The keys and values the cache stands for, rebuilt in D channels (x̂ = U c + μ; keys then
  /// rotated to their positions with pre_rope=1), so scorers and evictors that read keys see what
  /// attention attends to.
  void gather(seq_id s, std::int32_t layer, std::int32_t head, float* k_out, float* v_out) const override {
    const std::int32_t n = c_.length(s, layer, head);
    if (n == 0) return;
    const std::int32_t hw = c_.row_width() / 2, rk = c_.key_rank(), rv = c_.value_rank();
    std::vector<float> kr(static_cast<std::size_t>(n) * hw), vr(kr.size());
    c_.coefficients().gather(s, layer, head, kr.data(), vr.data());
    std::vector<float> ck(k_out ? static_cast<std::size_t>(n) * rk : 0), cv(v_out ? static_cast<std::size_t>(n) * rv : 0);
    c_.split_row(kr.data(), vr.data(), n, k_out ? ck.data() : nullptr, v_out ? cv.data() : nullptr);
    if (k_out) {
      reconstruct(c_.key_basis(layer, head), ck.data(), n, k_out);
      if (const rope* rp = c_.key_rope()) {  // the decode kernel's rotation (its cos/sin table)
        std::vector<float> cs, sn;
        kvc::cpu::lowrank_detail::rope_table(*rp, c_.coefficients().positions(s, layer, head), n, cs, sn);
        const std::size_t half = static_cast<std::size_t>(rp->config().rotary_dim / 2);
        for (std::int32_t t = 0; t < n; ++t)
          kvc::cpu::lowrank_detail::rotate(*rp, cs.data() + t * half, sn.data() + t * half,
                                           k_out + static_cast<std::size_t>(t) * cfg_.head_dim);
      }
    }
    if (v_out) reconstruct(c_.value_basis(layer, head), cv.data(), n, v_out);
  }
  bool pre_rope_keys() const override { return c_.config().pre_rope; }
  void attention(seq_id s, std::int32_t layer, const float* q, std::int32_t num_q_heads, float* out,
                 const decode_options& opt) const override {
    kvc::cpu::projected_decode_attention(c_, s, layer, q, num_q_heads, out, opt);
  }
  bool has_prefill_attention() const override { return true; }
  /// cpu::prefill_attention over `rows_view`: its generic path reads rows through gather() (U c + μ).
  void prefill_attention(seq_id s, std::int32_t layer, const float* q, std::int32_t num_queries,
                         const std::int32_t* q_positions, std::int32_t num_q_heads, float* out,
                         const decode_options& opt) const override {
    KVC_EXPECTS_IN("kvc::runtime::pca_cache::prefill_attention", c_.contains(s), "seq = ", s,
                   " is not a live sequence of this cache, expected one of its ", c_.num_sequences(), " live sequence ids");
    kvc::cpu::prefill_attention(rows_view{this}, s, layer, q, num_queries, q_positions, num_q_heads, out, opt);
  }
  /// Any chunk: a stored token's coefficients never change (no re-encoding window).
  std::int32_t chunk_tokens(seq_id s, std::int32_t layer, std::int32_t limit) const override {
    return c_.coefficients().chunk_tokens(s, layer, limit);
  }

  std::size_t bytes_in_use() const override { return c_.bytes_in_use(); }
  std::size_t bytes_in_use(std::int32_t layer) const override { return c_.bytes_in_use(layer); }
  memory_traffic traffic() const override { return c_.coefficients().traffic(); }
  /// The bases (U_k, U_v, means) and the coefficient cache's bookkeeping.
  std::size_t metadata_bytes() const override { return c_.metadata_bytes(); }
  std::int64_t tokens_held() const override { return c_.coefficients().tokens_held(); }

 private:
  /// What cpu::prefill_attention reads of a cache, and no more. Not the any_cache itself: the
  /// kernel's sequence check asks a cache with contains() for num_sequences(), which any_cache
  /// lacks (checked here before the call instead).
  struct rows_view {
    const pca_cache* c;
    const cache_config& config() const { return c->config(); }
    std::int32_t length(seq_id s, std::int32_t layer, std::int32_t head) const { return c->length(s, layer, head); }
    const std::int32_t* positions(seq_id s, std::int32_t layer, std::int32_t head) const {
      return c->positions(s, layer, head);
    }
    void gather(seq_id s, std::int32_t layer, std::int32_t head, float* k_out, float* v_out = nullptr) const {
      c->gather(s, layer, head, k_out, v_out);
    }
  };

  static lowrank::projected_config projected(const cache_config& c, const pca_spec& s) {
    lowrank::projected_config p;
    p.num_layers = c.num_layers;
    p.num_kv_heads = c.num_kv_heads;
    p.head_dim = c.head_dim;
    p.rank = s.rank;
    p.value_rank = s.vrank;
    p.pre_rope = s.pre_rope;
    p.rope = s.rope;
    p.page_size = c.page_size;
    p.max_pages = c.max_pages;
    return p;
  }
  /// out[t] = Σ_j c[t][j] u_j (+ μ), [n][D]: the decode kernel's back-projection, row by row.
  static void reconstruct(const lowrank::basis& b, const float* c, std::int32_t n, float* out) {
    for (std::int32_t t = 0; t < n; ++t)
      kvc::cpu::lowrank_detail::back_project<kvc::cpu::default_arch>(
          b.u.data(), b.rank, b.dim, c + static_cast<std::size_t>(t) * b.rank, b.centered() ? b.mean.data() : nullptr,
          out + static_cast<std::size_t>(t) * b.dim);
  }

  std::string name_;
  cache_config cfg_;
  bool center_;
  std::int32_t sinks_;
  lowrank::projected_cache<T> c_;
  std::vector<bool> fitted_;  // [layer]: bases set and tokens stored on them
};

KVC_END_ISA_NAMESPACE

namespace detail {
KVC_BEGIN_ISA_NAMESPACE  // the builder makes this ISA's pca_cache
inline bool register_lowrank_storages() {
  storage_registry()["pca"] = [](const spec_stage& st, const cache_config& c,
                                 const storage_options& o) -> std::unique_ptr<any_cache> {
    const pca_spec p = parse_pca(st, c.head_dim, o);
    if (p.fp32) return std::make_unique<pca_cache<float>>(st.text, c, p);
    return std::make_unique<pca_cache<half>>(st.text, c, p);
  };
  return true;
}
KVC_END_ISA_NAMESPACE
}  // namespace detail

KVC_BEGIN_ISA_NAMESPACE
/// Including this header registers `pca` (once per program and ISA configuration).
inline const bool lowrank_storages_registered = detail::register_lowrank_storages();

KVC_END_ISA_NAMESPACE
}  // namespace runtime
KVC_END_NAMESPACE
