// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// xKV (kvc/lowrank/xkv.hpp) as a run-time storage: register_xkv_storage() registers
///
///   xkv(group=N, rank=R, vrank=R, pre_rope=0|1, sinks=N, coef=fp16|fp32, latent=STORAGE)
///     group     adjacent layers sharing one latent per token: layers [0, N), [N, 2N), ...; the
///               last group may be shorter; default 4, the paper's xKV-4
///     rank      key latent size: a count, or a fraction in (0, 1) of the group's width
///               w = group · num_kv_heads · head_dim (r = ceil(f · w)); at most the shortest
///               group's width. The paper's settings are 0.094 of w for keys, 0.141 for values
///     vrank     value latent size, read as rank is; default rank
///     pre_rope  1 (default, the paper's): keys are appended before RoPE (storage_options::rope),
///               fitted and projected there, rotated after reconstruction; 0: post-RoPE keys
///     sinks     the first N prompt tokens are rebuilt exactly (fit_basis's exact_rows); default 0
///     coef      element type of the whole tokens (and of the latents unless `latent` says
///               otherwise); default fp16
///     latent    the storage that holds the latents, any registered storage spec: fp16, fp32,
///               bf16, int8, int4, kivi(bits=4), ... (the paper quantizes its latents); default
///               the coef type. Its pages are the latents' bytes. rotated(bits=4) is Palu's
///               low-rank-aware quantization: a Hadamard rotation of each half-row before int4
///               codes, so the leading directions' large latents do not set one scale for all
///               (docs/design.md; (rank + vrank + 1) / 2 must be a power of two)
///
/// with make_cache. How the cache (`xkv_cache<T>`, below) lives:
///  - Each layer of a sequence is stored whole (T pages, D channels, keys rotated to their
///    positions on append so whole tokens attend as any kv_cache's) until the caller signals the
///    end of the prompt through any_cache::observe_window (query_window() is 1; the query itself
///    is not used). When every layer of a group has been observed, the group's prompt moves: its
///    keys are rotated back, every (layer, kv head) side by side is one row per token, the group's
///    basis is fitted on them (the first sequence moved fits it; later sequences project on it),
///    and the latents go to one page stream per group. The whole pages are freed.
///  - Tokens appended after the move stay whole (a per-layer tail), as in the paper, which
///    compresses the prefill: attention is the lse merge of the latent part and the tail.
///  - A latent row stands for every layer and kv head of its group, so a stream cannot drop it
///    alone: keep/keep_layer on a moved layer accept only lists that keep every latent token
///    (the tail may be evicted), and the move refuses a group whose streams hold different tokens
///    (eviction before xkv). xkv composes with nothing that evicts the prompt.
///  - Decode attention does not produce probs / group_probs (refused: nothing can use them).
///  - The three stores (whole, tail, latents) are three page pools of cache_config::max_pages each.
///    The latent store is an any_cache of num_groups layers, one kv head, head_dim
///    (rank + vrank + 1) / 2: a latent row [a_k | a_v | pad] is its K row and V row.
/// bytes_in_use(layer) gives each layer of a group an equal share of the group's latent pages.
/// Threads: as kv_cache (docs/threading.md); observe_window is exclusive like add_sequence.
/// The builder and the registration are per ISA (docs/isa.md).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <kvc/attention/rope.hpp>
#include <kvc/cpu/decode_attention.hpp>
#include <kvc/cpu/prefill_attention.hpp>
#include <kvc/cpu/projected_attention.hpp>
#include <kvc/error.hpp>
#include <kvc/lowrank/xkv.hpp>
#include <kvc/runtime/any_cache.hpp>
#include <kvc/runtime/lowrank_storages.hpp>
#include <kvc/runtime/make_cache.hpp>
#include <kvc/runtime/spec.hpp>
#include <kvc/store/kv_cache.hpp>

KVC_BEGIN_NAMESPACE
namespace runtime {
namespace detail {

/// What an `xkv(...)` spec asks for, checked against the cache's shape.
struct xkv_spec {
  std::int32_t group = 4;
  std::int32_t rank = 0, vrank = 0;  ///< latent sizes (counts)
  std::int32_t sinks = 0;
  bool pre_rope = true;
  rope_config rope{};
  bool fp32 = false;
  std::string latent;  ///< the latents' storage spec
};

/// A latent size: a whole count 1..min_width or a fraction in (0, 1) of width.
inline std::int32_t xkv_rank(const spec_stage& st, const char* key, double r, std::int32_t width, std::int32_t min_width) {
  std::int32_t n = 0;
  if (r > 0 && r < 1) {
    n = lowrank::select_rank(lowrank::rank_spec::of_fraction(r), nullptr, width);
  } else if (r >= 1 && r == std::floor(r) && r <= 1e9) {
    n = static_cast<std::int32_t>(r);
  } else {
    bad_pca_arg(st, kvc::detail::concat(key, " = ", r),
                kvc::detail::concat("a whole count or a fraction in (0, 1) of the group's width ", width));
  }
  if (n > min_width)
    bad_pca_arg(st, kvc::detail::concat(key, " = ", r, " (", n, " values)"),
                kvc::detail::concat("at most the shortest group's width, ", min_width, " (layers x num_kv_heads x head_dim)"));
  return n;
}

inline xkv_spec parse_xkv(const spec_stage& st, const cache_config& c, const storage_options& o) {
  spec_args a(st, "kvc::runtime::make_cache");
  const int group = a.integer("group", 4);
  const double rank = a.number("rank");
  const double vrank = a.number("vrank", rank);
  const int pre_rope = a.integer("pre_rope", 1);
  const int sinks = a.integer("sinks", 0);
  const bool has_coef = a.has("coef");
  const std::string coef = a.word("coef", "fp16");
  const spec_stage* ls = a.nested("latent");
  const std::string lw = ls ? std::string() : a.word("latent", "");
  a.finish("group, rank, vrank, pre_rope, sinks, coef, latent");
  if (group < 1 || group > c.num_layers)
    bad_pca_arg(st, kvc::detail::concat("group = ", group), kvc::detail::concat("1..num_layers = ", c.num_layers, " layers"));
  xkv_spec p;
  p.group = group;
  const std::int32_t last = c.num_layers % group == 0 ? group : c.num_layers % group;
  const std::int32_t width = group * c.num_kv_heads * c.head_dim, min_width = last * c.num_kv_heads * c.head_dim;
  p.rank = xkv_rank(st, "rank", rank, width, min_width);
  p.vrank = xkv_rank(st, "vrank", vrank, width, min_width);
  if (pre_rope != 0 && pre_rope != 1) bad_pca_arg(st, kvc::detail::concat("pre_rope = ", pre_rope), "0 or 1");
  p.pre_rope = pre_rope == 1;
  if (p.pre_rope && o.rope == nullptr)
    bad_pca_arg(st, "pre_rope = 1", "the model's RoPE in storage_options::rope (or pre_rope=0 for post-RoPE keys)");
  if (p.pre_rope && o.rope->head_dim != c.head_dim)
    bad_pca_arg(st, kvc::detail::concat("storage_options::rope->head_dim = ", o.rope->head_dim),
                kvc::detail::concat("the cache's head_dim = ", c.head_dim));
  if (p.pre_rope) p.rope = *o.rope;
  if (sinks < 0 || sinks > std::min(p.rank, p.vrank))
    bad_pca_arg(st, kvc::detail::concat("sinks = ", sinks),
                kvc::detail::concat("0..min(rank, vrank) = ", std::min(p.rank, p.vrank), " (each sink may take a direction)"));
  p.sinks = sinks;
  if (coef != "fp16" && coef != "fp32") bad_pca_arg(st, "coef = " + coef, "fp16 or fp32");
  p.fp32 = coef == "fp32";
  p.latent = ls ? ls->text : (lw.empty() ? coef : lw);
  if (has_coef && (ls || !lw.empty()) && p.latent != coef)
    bad_pca_arg(st, kvc::detail::concat("coef = ", coef, " with latent = ", p.latent),
                "one of them for the latents (coef sets the whole tokens' type and, without latent, the latents')");
  const std::string lname = parse_spec(p.latent).at(0).name;
  if (lname == "xkv" || lname == "layers")
    bad_pca_arg(st, "latent = " + p.latent, "a storage of rows (fp16, fp32, bf16, int8, kivi(...), ...), not " + lname);
  return p;
}

}  // namespace detail

// ---- per ISA (docs/isa.md): the cache runs this TU's kernels ----
KVC_BEGIN_ISA_NAMESPACE

/// any_cache for xKV (see the file comment). config() is the caller's shape.
template <class T>
class xkv_cache final : public any_cache {
 public:
  xkv_cache(std::string name, const cache_config& cfg, const detail::xkv_spec& p)
      : name_(std::move(name)), cfg_(cfg), spec_(p), full_(whole_config(cfg)), tail_(whole_config(cfg)),
        lat_(row_store(name_, p.latent, latent_config(cfg, p), p.rank, p.vrank)),
        groups_(static_cast<std::size_t>((cfg.num_layers + p.group - 1) / p.group)) {
    if (p.pre_rope) rope_.emplace(p.rope);
  }

  std::int32_t num_groups() const noexcept { return static_cast<std::int32_t>(groups_.size()); }
  /// The group of a layer, and its layers [first, first + size).
  std::int32_t group_of(std::int32_t layer) const noexcept { return layer / spec_.group; }
  std::int32_t group_first(std::int32_t g) const noexcept { return g * spec_.group; }
  std::int32_t group_size(std::int32_t g) const noexcept { return std::min(spec_.group, cfg_.num_layers - g * spec_.group); }
  std::int32_t key_rank() const noexcept { return spec_.rank; }
  std::int32_t value_rank() const noexcept { return spec_.vrank; }
  /// Whether group g has its bases (the first move fitted them); its key and value bases.
  bool fitted(std::int32_t g) const { return groups_.at(static_cast<std::size_t>(g)).fitted; }
  const lowrank::group_basis& key_basis(std::int32_t g) const { return fitted_group(g, "key_basis").k; }
  const lowrank::group_basis& value_basis(std::int32_t g) const { return fitted_group(g, "value_basis").v; }
  /// Whether sequence s's group g holds its prompt as latents.
  bool moved(seq_id s, std::int32_t g) const { return at(s, "moved").moved.at(static_cast<std::size_t>(g)) != 0; }
  /// The three stores: whole tokens before the move, whole tokens after it, and the latents
  /// (layer g = group g, one kv head, head_dim = (rank + vrank + 1) / 2: a row is [a_k | a_v | pad]).
  const kv_cache<T>& staged() const noexcept { return full_; }
  const kv_cache<T>& tail() const noexcept { return tail_; }
  const any_cache& latents() const noexcept { return *lat_; }

  const cache_config& config() const override { return cfg_; }
  std::string name() const override { return name_; }
  const char* isa() const override { return KVC_ISA_STR(KVC_ISA_NAMESPACE); }
  seq_id add_sequence() override {
    entry e;
    e.observed.assign(static_cast<std::size_t>(cfg_.num_layers), 0);
    e.moved.assign(groups_.size(), 0);
    return make_entry(std::move(e), [&] { return full_.add_sequence(); }, [&] { return tail_.add_sequence(); },
                      [&] { return lat_->add_sequence(); });
  }
  void remove_sequence(seq_id s) override {
    const entry e = at(s, "remove_sequence");
    seqs_.erase(s);
    full_.remove_sequence(e.full);
    tail_.remove_sequence(e.tail);
    lat_->remove_sequence(e.lat);
    pos_.erase(pos_.lower_bound({s, 0, 0}), pos_.upper_bound({s, cfg_.num_layers, 0}));
  }
  bool contains(seq_id s) const override { return seqs_.count(s) != 0; }
  seq_id fork(seq_id s) override {
    const entry& e = at(s, "fork");
    return make_entry(e, [&] { return full_.fork(e.full); }, [&] { return tail_.fork(e.tail); },
                      [&] { return lat_->fork(e.lat); });
  }

  /// Keys before RoPE (with pre_rope=1); stored whole, rotated to their positions.
  void append(seq_id s, std::int32_t layer, const float* k, const float* v, std::int32_t n,
              const std::int32_t* positions) override {
    constexpr const char* who = "kvc::runtime::xkv_cache::append";
    const entry& e = at(s, "append");
    checked(layer, "append");
    KVC_EXPECTS_IN(who, n >= 0, "n = ", n, ", expected >= 0 tokens");
    if (n == 0) return;
    KVC_EXPECTS_IN(who, k != nullptr && v != nullptr, "k or v is null with n = ", n);
    const std::int32_t H = cfg_.num_kv_heads, D = cfg_.head_dim;
    std::vector<std::int32_t> pos(static_cast<std::size_t>(n));
    const std::int32_t first = seen(s, layer);
    for (std::int32_t i = 0; i < n; ++i) pos[static_cast<std::size_t>(i)] = positions ? positions[i] : first + i;
    std::vector<float> rk;
    if (rope_) {  // whole tokens are kept rotated, so they attend as a kv_cache's
      rk.assign(k, k + static_cast<std::size_t>(n) * H * D);
      rotate_rows(rk.data(), n, H, pos.data(), false);
      k = rk.data();
    }
    if (layer_moved(e, layer)) tail_.append(e.tail, layer, k, v, n, pos.data());
    else full_.append(e.full, layer, k, v, n, pos.data());
  }
  void keep(seq_id s, std::int32_t layer, std::int32_t head, const std::int32_t* kept, std::int32_t n) override {
    const entry& e = at(s, "keep");
    if (!layer_moved(e, checked(layer, "keep"))) return full_.keep(e.full, layer, head, kept, n);
    KVC_EXPECTS_IN("kvc::runtime::xkv_cache::keep", head >= 0 && head < cfg_.num_kv_heads, "head = ", head,
                   ", expected 0..", cfg_.num_kv_heads - 1);
    KVC_EXPECTS_IN("kvc::runtime::xkv_cache::keep", n >= 0 && (n == 0 || kept), "n = ", n, " with kept ",
                   kept ? "set" : "null", ", expected n >= 0 kept indices");
    const std::vector<std::int32_t> t = tail_part(std::vector<std::int32_t>(kept, kept + n), e, layer, head, "keep");
    tail_.keep(e.tail, layer, head, t.data(), static_cast<std::int32_t>(t.size()));
  }
  void keep_layer(seq_id s, std::int32_t layer, const std::vector<std::vector<std::int32_t>>& kept) override {
    const entry& e = at(s, "keep_layer");
    if (!layer_moved(e, checked(layer, "keep_layer"))) return full_.keep_layer(e.full, layer, kept);
    KVC_EXPECTS_IN("kvc::runtime::xkv_cache::keep_layer", static_cast<std::int32_t>(kept.size()) == cfg_.num_kv_heads,
                   "kept.size() = ", kept.size(), ", expected num_kv_heads = ", cfg_.num_kv_heads);
    std::vector<std::vector<std::int32_t>> t;
    for (std::int32_t h = 0; h < cfg_.num_kv_heads; ++h)
      t.push_back(tail_part(kept[static_cast<std::size_t>(h)], e, layer, h, "keep_layer"));
    tail_.keep_layer(e.tail, layer, t);
  }

  std::int32_t length(seq_id s, std::int32_t layer, std::int32_t head) const override {
    const entry& e = at(s, "length");
    if (!layer_moved(e, checked(layer, "length"))) return full_.length(e.full, layer, head);
    return latent_length(e, layer) + tail_.length(e.tail, layer, head);
  }
  /// Moved layers: the latent tokens' positions, then the tail's, in a buffer this cache owns
  /// (valid until the next positions() call for the same stream, or a write to the sequence).
  const std::int32_t* positions(seq_id s, std::int32_t layer, std::int32_t head) const override {
    const entry& e = at(s, "positions");
    if (!layer_moved(e, checked(layer, "positions"))) return full_.positions(e.full, layer, head);
    const std::int32_t nl = latent_length(e, layer), nt = tail_.length(e.tail, layer, head);
    std::vector<std::int32_t>& b = pos_[{s, layer, head}];
    b.resize(static_cast<std::size_t>(nl + nt));
    std::copy_n(lat_->positions(e.lat, group_of(layer), 0), nl, b.data());
    std::copy_n(tail_.positions(e.tail, layer, head), nt, b.data() + nl);
    return b.data();
  }
  std::int32_t seen(seq_id s, std::int32_t layer) const override {
    const entry& e = at(s, "seen");
    return full_.seen(e.full, checked(layer, "seen")) + tail_.seen(e.tail, layer);
  }
  /// Moved layers: the latent tokens rebuilt (B_{l,h}ᵀ a, keys then rotated to their positions),
  /// then the tail's whole tokens.
  void gather(seq_id s, std::int32_t layer, std::int32_t head, float* k_out, float* v_out) const override {
    const entry& e = at(s, "gather");
    if (!layer_moved(e, checked(layer, "gather"))) return full_.gather(e.full, layer, head, k_out, v_out);
    KVC_EXPECTS_IN("kvc::runtime::xkv_cache::gather", head >= 0 && head < cfg_.num_kv_heads, "head = ", head,
                   ", expected 0..", cfg_.num_kv_heads - 1);
    const std::int32_t g = group_of(layer), i = layer - group_first(g), D = cfg_.head_dim, nl = latent_length(e, layer);
    const std::int32_t hw = row_half();
    if (nl > 0) {
      std::vector<float> kr(static_cast<std::size_t>(nl) * hw), vr(kr.size());
      lat_->gather(e.lat, g, 0, kr.data(), vr.data());
      const group_state& gs = groups_[static_cast<std::size_t>(g)];
      kvc::cpu::rebuild_rows(gs.k.slice(i, head), gs.v.slice(i, head), rope_ ? &*rope_ : nullptr, hw, kr.data(), vr.data(),
                             nl, lat_->positions(e.lat, g, 0), k_out, v_out);
    }
    const std::size_t off = static_cast<std::size_t>(nl) * D;
    if (tail_.length(e.tail, layer, head) > 0)
      tail_.gather(e.tail, layer, head, k_out ? k_out + off : nullptr, v_out ? v_out + off : nullptr);
  }
  bool pre_rope_keys() const override { return spec_.pre_rope; }

  /// Moved layers: per kv head, the latent stream through the projected kernel's general path
  /// (B_{l,h} as the bases; keys rebuilt and rotated per token) and the tail through
  /// cpu::decode_attention, merged by their log-sum-exps.
  void attention(seq_id s, std::int32_t layer, const float* q, std::int32_t num_q_heads, float* out,
                 const decode_options& opt) const override {
    constexpr const char* who = "kvc::runtime::xkv_cache::attention";
    const entry& e = at(s, "attention");
    if (!layer_moved(e, checked(layer, "attention"))) return kvc::cpu::decode_attention(full_, e.full, layer, q, num_q_heads, out, opt);
    const std::int32_t H = cfg_.num_kv_heads, D = cfg_.head_dim;
    kvc::cpu::lowrank_detail::check_decode_args(who, layer, cfg_.num_layers, num_q_heads, H, D, q, out);
    KVC_EXPECTS_IN(who, opt.probs == nullptr && opt.group_probs == nullptr,
                   "opt.probs or opt.group_probs is set, expected neither: a latent token is shared by the "
                   "group's layers and heads and cannot be evicted, so xkv gives no scores to evict by");
    const std::int32_t g = group_of(layer), li = layer - group_first(g), G = num_q_heads / H, nl = latent_length(e, layer);
    std::int64_t tail_held = 0;
    for (std::int32_t h = 0; h < H; ++h) tail_held += tail_.length(e.tail, layer, h);
    KVC_EXPECTS_IN(who, nl > 0 || tail_held > 0, "seq = ", s, ", layer = ", layer,
                   " holds 0 tokens in all its kv heads, expected at least one token to attend to");
    const float scale = opt.scale != 0.0f ? opt.scale : 1.0f / std::sqrt(static_cast<float>(D));
    const std::size_t nq = static_cast<std::size_t>(num_q_heads);
    std::vector<float> lse1(nq, -INFINITY), o2, lse2;
    decode_options lo;
    lo.lse = lse1.data();
    const group_state& gs = groups_[static_cast<std::size_t>(g)];
    // The group's latent rows, decoded once per call (O(n · hw), against the O(n · r_k · D) per
    // kv head of rebuilding the keys), so any latent storage attends through one kernel.
    const std::int32_t hw = row_half();
    std::vector<float> kr(static_cast<std::size_t>(nl) * hw), vr(kr.size());
    if (nl > 0) lat_->gather(e.lat, g, 0, kr.data(), vr.data());
    const std::int32_t* lpos = nl > 0 ? lat_->positions(e.lat, g, 0) : nullptr;
    const rope* rp = rope_ ? &*rope_ : nullptr;
    auto row = [&](std::int32_t t, float* z) {
      std::copy_n(kr.data() + static_cast<std::size_t>(t) * hw, hw, z);
      std::copy_n(vr.data() + static_cast<std::size_t>(t) * hw, hw, z + hw);
    };
    auto run = [&](std::int32_t h) {
      kvc::cpu::lowrank_detail::attend_rows_general<kvc::cpu::default_arch>(row, hw, nl, lpos, gs.k.slice(li, h),
                                                                            gs.v.slice(li, h), rp, h, G, q, scale, out, lo);
    };
    // No latent token (a sequence moved while empty: its tokens are all in the tail): the group
    // may have no basis yet, and the latent part adds nothing (lse1 stays -inf).
    if (nl > 0 && opt.pool && H > 1) opt.pool->parallel_for(H, run);
    else if (nl > 0)
      for (std::int32_t h = 0; h < H; ++h) run(h);
    if (tail_held > 0) {
      o2.resize(nq * D);
      lse2.assign(nq, -INFINITY);
      decode_options to = opt;
      to.scale = scale;
      to.lse = lse2.data();
      kvc::cpu::decode_attention(tail_, e.tail, layer, q, num_q_heads, o2.data(), to);
    }
    for (std::size_t h = 0; h < nq; ++h) {
      const float a = lse1[h], b = tail_held > 0 ? lse2[h] : -INFINITY;
      const float m = std::max(a, b);
      if (!std::isfinite(m)) {  // this head attends to nothing: zeros, as cpu::decode_attention
        std::fill_n(out + h * D, D, 0.0f);
        if (opt.lse) opt.lse[h] = -INFINITY;
        continue;
      }
      const float wa = std::isfinite(a) ? std::exp(a - m) : 0.0f, wb = std::isfinite(b) ? std::exp(b - m) : 0.0f;
      const float inv = 1.0f / (wa + wb);
      for (std::int32_t d = 0; d < D; ++d) {
        float& o = out[h * D + static_cast<std::size_t>(d)];
        o = (wa * o + (wb > 0 ? wb * o2[h * D + static_cast<std::size_t>(d)] : 0.0f)) * inv;
      }
      if (opt.lse) opt.lse[h] = m + std::log(wa + wb);
    }
  }
  bool has_prefill_attention() const override { return true; }
  /// Before the move: kvc's prefill kernel on the whole pages; after it (a later prompt of the
  /// same sequence): its generic path over gather().
  void prefill_attention(seq_id s, std::int32_t layer, const float* q, std::int32_t num_queries,
                         const std::int32_t* q_positions, std::int32_t num_q_heads, float* out,
                         const decode_options& opt) const override {
    const entry& e = at(s, "prefill_attention");
    if (!layer_moved(e, checked(layer, "prefill_attention")))
      return kvc::cpu::prefill_attention(full_, e.full, layer, q, num_queries, q_positions, num_q_heads, out, opt);
    kvc::cpu::prefill_attention(detail::rows_view<xkv_cache>{this}, s, layer, q, num_queries, q_positions, num_q_heads, out, opt);
  }
  std::int32_t chunk_tokens(seq_id s, std::int32_t layer, std::int32_t limit) const override {
    const entry& e = at(s, "chunk_tokens");
    return layer_moved(e, checked(layer, "chunk_tokens")) ? tail_.chunk_tokens(e.tail, layer, limit)
                                                    : full_.chunk_tokens(e.full, layer, limit);
  }

  std::size_t bytes_in_use() const override { return full_.bytes_in_use() + tail_.bytes_in_use() + lat_->bytes_in_use(); }
  std::size_t bytes_in_use(std::int32_t layer) const override {
    const std::int32_t g = group_of(checked(layer, "bytes_in_use")), n = group_size(g);
    const std::size_t b = lat_->bytes_in_use(g);
    const std::size_t share = b / static_cast<std::size_t>(n) + (layer == group_first(g) + n - 1 ? b % static_cast<std::size_t>(n) : 0);
    return full_.bytes_in_use(layer) + tail_.bytes_in_use(layer) + share;
  }
  memory_traffic traffic() const override {
    memory_traffic t = full_.traffic();
    t += tail_.traffic();
    t += lat_->traffic();
    return t;
  }
  /// The bases (whole and sliced, float), the stores' bookkeeping and the sequence table.
  std::size_t metadata_bytes() const override {
    std::size_t b = full_.metadata_bytes() + tail_.metadata_bytes() + lat_->metadata_bytes();
    for (const group_state& gs : groups_)
      for (const lowrank::group_basis* x : {&gs.k, &gs.v}) {
        b += 4 * x->whole.u.size();
        for (const lowrank::basis& sl : x->slices) b += 4 * sl.u.size();
      }
    return b + seqs_.size() * (sizeof(entry) + static_cast<std::size_t>(cfg_.num_layers) + groups_.size());
  }
  /// A latent token counts once for every (layer, kv head) stream of its group.
  std::int64_t tokens_held() const override {
    std::int64_t n = full_.tokens_held() + tail_.tokens_held();
    for (const auto& kv : seqs_)
      for (std::int32_t g = 0; g < num_groups(); ++g)
        n += static_cast<std::int64_t>(lat_->length(kv.second.lat, g, 0)) * group_size(g) * cfg_.num_kv_heads;
    return n;
  }

  /// 1: the engine's end-of-prompt call (observe_window) is what moves a group; its query is not read.
  std::int32_t query_window() const override { return 1; }
  /// Marks the layer's prompt complete for sequence s; once every layer of its group is, moves
  /// the group (see the file comment): all or nothing, so a refused move (streams holding
  /// different tokens, fewer prompt tokens than the ranks for the first fit, the pool exhausted, a
  /// latent past fp16) leaves the sequence as it was, and the call may be repeated.
  void observe_window(seq_id s, std::int32_t layer, const float*, std::int32_t, std::int32_t) override {
    auto it = seqs_.find(s);
    if (it == seqs_.end()) at(s, "observe_window");  // throws, naming the call
    entry& e = it->second;
    const std::int32_t g = group_of(checked(layer, "observe_window"));
    if (e.moved[static_cast<std::size_t>(g)]) return;
    bool all = true;
    for (std::int32_t l = group_first(g); l < group_first(g) + group_size(g); ++l)
      all = all && (l == layer || e.observed[static_cast<std::size_t>(l)]);
    if (all) move(e, g);
    e.observed[static_cast<std::size_t>(layer)] = 1;
  }

 private:
  struct entry {
    seq_id full = 0, tail = 0, lat = 0;
    std::vector<unsigned char> observed;  // [layer]: the caller said its prompt is in
    std::vector<unsigned char> moved;     // [group]: the prompt is latents, later tokens go to the tail
  };
  struct group_state {
    bool fitted = false;
    lowrank::group_basis k, v;
  };

  static cache_config whole_config(cache_config c) {
    c.check_finite = true;
    return c;
  }
  static cache_config latent_config(const cache_config& c, const detail::xkv_spec& p) {
    cache_config l;
    l.num_layers = (c.num_layers + p.group - 1) / p.group;
    l.num_kv_heads = 1;
    l.head_dim = (p.rank + p.vrank + 1) / 2;
    l.page_size = c.page_size;
    l.max_pages = c.max_pages;
    l.check_finite = false;  // the move checks the rows (and, for fp16 latents, their range)
    return l;
  }
  std::int32_t row_half() const noexcept { return (spec_.rank + spec_.vrank + 1) / 2; }
  bool layer_moved(const entry& e, std::int32_t layer) const { return e.moved[static_cast<std::size_t>(group_of(layer))] != 0; }
  std::int32_t latent_length(const entry& e, std::int32_t layer) const { return lat_->length(e.lat, group_of(layer), 0); }
  const group_state& fitted_group(std::int32_t g, const char* fn) const {
    if (!(g >= 0 && g < num_groups()) || !groups_[static_cast<std::size_t>(g)].fitted)
      kvc::detail::fail(kvc::detail::concat("kvc::runtime::xkv_cache::", fn, ": group = ", g,
                                            ", expected a fitted group of 0..", num_groups() - 1));
    return groups_[static_cast<std::size_t>(g)];
  }

  /// Rotates n rows of `heads` heads x D (row t at pos[t]) by R(pos) or, with back, R(-pos).
  void rotate_rows(float* x, std::int32_t n, std::int32_t heads, const std::int32_t* pos, bool back) const {
    std::vector<std::int32_t> p(pos, pos + n);
    if (back)
      for (std::int32_t& v : p) v = -v;
    std::vector<float> cs, sn;
    kvc::cpu::lowrank_detail::rope_table(*rope_, p.data(), n, cs, sn);
    const std::size_t half = static_cast<std::size_t>(rope_->config().rotary_dim / 2), D = static_cast<std::size_t>(cfg_.head_dim);
    for (std::int32_t t = 0; t < n; ++t)
      for (std::int32_t h = 0; h < heads; ++h)
        kvc::cpu::lowrank_detail::rotate(*rope_, cs.data() + t * half, sn.data() + t * half,
                                         x + (static_cast<std::size_t>(t) * heads + h) * D);
  }

  /// The tail indices of a keep list on a moved layer, after checking it keeps every latent token.
  std::vector<std::int32_t> tail_part(const std::vector<std::int32_t>& kept, const entry& e, std::int32_t layer,
                                      std::int32_t head, const char* fn) const {
    const std::int32_t nl = latent_length(e, layer);
    for (std::int32_t i = 0; i < nl; ++i)
      if (static_cast<std::int32_t>(kept.size()) <= i || kept[static_cast<std::size_t>(i)] != i)
        kvc::detail::fail(kvc::detail::concat(
            "kvc::runtime::xkv_cache::", fn, ": layer ", layer, " head ", head, " drops latent token ", i, " of ", nl,
            ", expected every latent token kept (one latent row serves every layer and kv head of group ",
            group_of(layer), "; only tokens appended after the prompt may be evicted; the cache is unchanged)"));
    std::vector<std::int32_t> t;
    for (std::size_t i = static_cast<std::size_t>(nl); i < kept.size(); ++i) t.push_back(kept[i] - nl);
    return t;
  }

  /// Moves sequence e's group g from the whole pages to latents (fitting the group first if it
  /// has no basis). All or nothing up to the commit; then the whole pages are freed (a failed host
  /// allocation there leaves some held, counted in bytes_in_use and never read again).
  void move(entry& e, std::int32_t g) {
    constexpr const char* who = "kvc::runtime::xkv_cache::observe_window";
    const std::int32_t first = group_first(g), GL = group_size(g), H = cfg_.num_kv_heads, D = cfg_.head_dim;
    const std::int32_t n = full_.length(e.full, first, 0);
    const std::int32_t* p0 = full_.positions(e.full, first, 0);
    for (std::int32_t i = 0; i < GL; ++i)
      for (std::int32_t h = 0; h < H; ++h) {
        const std::int32_t ln = full_.length(e.full, first + i, h);
        const std::int32_t* p = full_.positions(e.full, first + i, h);
        KVC_EXPECTS_IN(who, ln == n && std::equal(p, p + n, p0), "layer ", first + i, " head ", h, " holds ", ln,
                       " tokens, layer ", first, " head 0 holds ", n,
                       (ln == n ? " at other positions" : ""),
                       ", expected every layer and kv head of group ", g,
                       " to hold the same tokens (xkv shares one latent per token across them, so it does not "
                       "compose with eviction of the prompt; the cache is unchanged)");
      }
    std::vector<std::vector<std::int32_t>> none(static_cast<std::size_t>(H));
    if (n == 0) {
      e.moved[static_cast<std::size_t>(g)] = 1;
      return;
    }
    const group_state& have = groups_[static_cast<std::size_t>(g)];
    const std::int32_t rk = spec_.rank, rv = spec_.vrank;
    if (!have.fitted)
      KVC_EXPECTS_IN(who, n >= std::max(rk, rv), "group ", g, " holds ", n,
                     " prompt tokens, expected at least max(rank, vrank) = ", std::max(rk, rv),
                     " to fit its bases (the cache is unchanged)");
    // The group's rows side by side: x[t][(i·H + h)·D + d], keys rotated back to before RoPE.
    const std::int32_t w = GL * H * D;
    std::vector<float> xk(static_cast<std::size_t>(n) * w), xv(xk.size()), bk(static_cast<std::size_t>(n) * D), bv(bk.size());
    for (std::int32_t i = 0; i < GL; ++i)
      for (std::int32_t h = 0; h < H; ++h) {
        full_.gather(e.full, first + i, h, bk.data(), bv.data());
        if (rope_) rotate_rows(bk.data(), n, 1, p0, true);
        for (std::int32_t t = 0; t < n; ++t) {
          const std::size_t o = static_cast<std::size_t>(t) * w + static_cast<std::size_t>(i * H + h) * D;
          std::copy_n(bk.data() + static_cast<std::size_t>(t) * D, D, xk.data() + o);
          std::copy_n(bv.data() + static_cast<std::size_t>(t) * D, D, xv.data() + o);
        }
      }
    group_state fit;
    const group_state* gs = &have;
    if (!have.fitted) {
      fit.k = lowrank::fit_group_basis(xk.data(), n, GL, H, D, lowrank::rank_spec::of_count(rk), spec_.sinks);
      fit.v = lowrank::fit_group_basis(xv.data(), n, GL, H, D, lowrank::rank_spec::of_count(rv), spec_.sinks);
      fit.fitted = true;
      gs = &fit;
    }
    std::vector<float> ak(static_cast<std::size_t>(n) * rk), av(static_cast<std::size_t>(n) * rv);
    lowrank::project_group(gs->k, xk.data(), n, ak.data());
    lowrank::project_group(gs->v, xv.data(), n, av.data());
    // Rows [a_k | a_v | pad], split into the latent store's K half and V half.
    const std::int32_t hw = row_half();
    std::vector<float> kr(static_cast<std::size_t>(n) * hw, 0.0f), vr(kr.size(), 0.0f);
    for (std::int32_t t = 0; t < n; ++t)
      for (std::int32_t j = 0; j < 2 * hw; ++j) {
        const float x = j < rk ? ak[static_cast<std::size_t>(t) * rk + j]
                               : (j < rk + rv ? av[static_cast<std::size_t>(t) * rv + (j - rk)] : 0.0f);
        if (spec_.latent == "fp16")
          KVC_EXPECTS_IN(who, std::abs(x) <= 65504.0f, j < rk ? "key" : "value", " latent ", j < rk ? j : j - rk,
                         " of token ", t, " of group ", g, " = ", x,
                         ", expected |a| <= 65504 to store it as fp16 (use latent=fp32; the cache is unchanged)");
        (j < hw ? kr[static_cast<std::size_t>(t) * hw + j] : vr[static_cast<std::size_t>(t) * hw + (j - hw)]) = x;
      }
    lat_->append(e.lat, g, kr.data(), vr.data(), n, p0);  // all or nothing
    // Commit (nothing here throws): reads of the group go to the latents and the tail.
    if (!have.fitted) groups_[static_cast<std::size_t>(g)] = std::move(fit);
    e.moved[static_cast<std::size_t>(g)] = 1;
    for (std::int32_t i = 0; i < GL; ++i) full_.keep_layer(e.full, first + i, none);
  }

  /// Records a sequence once its three store ids are made; anything that throws on the way
  /// removes what was made.
  template <class A, class B, class C>
  seq_id make_entry(entry e, A&& a, B&& b, C&& c) {
    bool ha = false, hb = false, hc = false;
    seq_id fa = 0, fb = 0, fc = 0;
    try {
      fa = a();
      ha = true;
      fb = b();
      hb = true;
      fc = c();
      hc = true;
      e.full = fa;
      e.tail = fb;
      e.lat = fc;
      seqs_.emplace(next_, std::move(e));
    } catch (...) {
      if (hc) lat_->remove_sequence(fc);
      if (hb) tail_.remove_sequence(fb);
      if (ha) full_.remove_sequence(fa);
      throw;
    }
    return next_++;
  }
  const entry& at(seq_id s, const char* fn) const { return detail::live_entry(seqs_, s, "kvc::runtime::xkv_cache::", fn); }
  std::int32_t checked(std::int32_t layer, const char* fn) const {
    return detail::checked_layer(layer, cfg_.num_layers, "kvc::runtime::xkv_cache::", fn);
  }

  std::string name_;
  cache_config cfg_;
  detail::xkv_spec spec_;
  std::optional<rope> rope_;  // with pre_rope
  kv_cache<T> full_, tail_;
  std::unique_ptr<any_cache> lat_;  // the latents: any registered storage of rows
  std::vector<group_state> groups_;
  std::map<seq_id, entry> seqs_;
  seq_id next_ = 0;
  mutable std::map<std::tuple<seq_id, std::int32_t, std::int32_t>, std::vector<std::int32_t>> pos_;
};
KVC_END_ISA_NAMESPACE

KVC_BEGIN_ISA_NAMESPACE
/// Registers `xkv` (its `latent=` storage, when not fp16 or fp32, must be registered too) in the
/// storage registry of this TU's ISA configuration (runtime/make_cache.hpp), so make_cache builds
/// it by spec. Including this header registers nothing (no static initialisation): call this before
/// the first make_cache that names it, from a TU built with the -m flags of those calls
/// (docs/isa.md); calling it again sets the same builders. A template only so that a TU that
/// includes the header and does not call it instantiates no cache.
template <class Deferred = void>
void register_xkv_storage() {
  using namespace detail;  // the builders
  registered_storages()["xkv"] = [](const spec_stage& st, const cache_config& c,
                                 const storage_options& o) -> std::unique_ptr<any_cache> {
    const xkv_spec p = parse_xkv(st, c, o);
    if (p.fp32) return std::make_unique<xkv_cache<float>>(st.text, c, p);
    return std::make_unique<xkv_cache<half>>(st.text, c, p);
  };
}
KVC_END_ISA_NAMESPACE
}  // namespace runtime
KVC_END_NAMESPACE
