// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// MiniCache (Liu et al., "MiniCache: KV Cache Compression in Depth Dimension for Large Language
/// Models", NeurIPS 2024): the K/V states of adjacent layers from the middle of the stack down
/// are close in direction, so a pair of layers can store one direction per token and each
/// layer its own magnitude.
///
/// The rule, per pair of adjacent layers (a, a + 1) from `start_layer` on, per kv head, per token
/// and separately for keys and values, with x_a, x_b the two layers' rows:
///  - magnitudes |x_a|, |x_b| and unit directions u_a, u_b; Ω = arccos(u_a·u_b), the angular
///    distance d = Ω/π;
///  - the shared direction is their SLERP, e = sin((1 − t)Ω)/sin Ω · u_a + sin(tΩ)/sin Ω · u_b
///    (a unit vector; the normalised linear blend when Ω ≈ 0), t = 0.6;
///  - token retention: a token whose key or value distance exceeds d_min + γ·(d_max − d_min)
///    (over the stream's tokens), γ = 0.05, keeps its own rows in both layers, unmerged;
///  - layer a's row is restored as |x_a|·e, layer b's as |x_b|·e.
/// t = 0.6, γ = 0.05 and the start at the middle layer are the paper's defaults as the team read
/// them; the seeds here give only the abstract, so they are not checked against the paper's code.
///
/// Bytes: the shared directions live once in the page pool, in a stream of an extra layer of the
/// inner kv_cache (layer num_layers + p for pair p) that both layers' attention reads; each layer
/// keeps its retained and later-appended tokens in its own stream, and 4 floats per merged token
/// (the two layers' key and value magnitudes) on the host (metadata_bytes). A merged pair holds
/// one row pair per merged token instead of two: bytes_in_use (the pool) shows it. Pages are the
/// unit of that saving, so a kv head whose merge would hold more pages than before (a few merged
/// tokens open a shared page while the layers' retained tokens free none) merges none of its
/// tokens (kvc's rule, not the paper's): merge_pairs never raises the pool's bytes.
///
/// Attention of a merged layer is one softmax over both streams: its own (plain rows) and the
/// shared one with the layer's magnitudes as per-token key and value scales
/// (kvc/cpu/minicache_attention.hpp). Merging is a one-shot step after the prompt
/// (merge_pairs), as in the paper's prefill use; tokens appended later stay in the layers' own
/// streams. Not here: composition with eviction (both layers of a pair must hold the same
/// tokens, which per-layer eviction breaks), forks, quantized pages, decode-time merging.

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <utility>
#include <vector>

#include <kvc/error.hpp>
#include <kvc/numeric/half.hpp>
#include <kvc/store/kv_cache.hpp>
#include <kvc/store/sequence_table.hpp>
#include <kvc/types.hpp>

KVC_BEGIN_NAMESPACE
namespace merge {

struct minicache_options {
  /// First layer of the merged range; pairs (start, start + 1), (start + 2, start + 3), ... up to
  /// the last layer. -1: num_layers / 2 (the paper merges the middle-to-deep half).
  std::int32_t start_layer = -1;
  /// SLERP parameter: the weight of the pair's second layer, in [0, 1]. 0.6 as published.
  float t = 0.6f;
  /// Retention γ in [0, 1]: tokens beyond d_min + γ·(d_max − d_min) stay unmerged. 0.05 as
  /// published; 1 merges every token, 0 keeps every token with a distance above the smallest.
  float gamma = 0.05f;
};

/// What merge_pairs did.
struct minicache_report {
  std::int64_t merged = 0;    ///< tokens merged, summed over pairs and kv heads
  std::int64_t retained = 0;  ///< tokens kept unmerged in merged pairs, summed likewise
  /// Medians of the angular distance d = Ω/π between the pairs' keys and between their values,
  /// over every token with a direction (NaN when none): how far apart adjacent layers are, the
  /// premise MiniCache rests on (0 = same direction, 0.5 = orthogonal).
  double key_distance_median = std::numeric_limits<double>::quiet_NaN();
  double value_distance_median = std::numeric_limits<double>::quiet_NaN();
};

/// \tparam T  element type of the pages: float or kvc::half
template <class T = half>
class minicache_cache {
  static_assert(std::is_same<T, float>::value || std::is_same<T, half>::value,
                "kvc::merge::minicache_cache<T>: T must be float or kvc::half");

 public:
  using value_type = T;
  using inner_cache = kv_cache<T>;

  minicache_cache(const cache_config& c, const minicache_options& o = {})
      : cfg_(c), o_(checked(c, o)), kv_(inner_config(c, o_)) {}

  const cache_config& config() const noexcept { return cfg_; }
  const minicache_options& options() const noexcept { return o_; }
  /// The store: layers 0..num_layers-1 are the layers' own streams, num_layers + p the shared
  /// directions of pair p.
  const inner_cache& cache() const noexcept { return kv_; }
  std::int32_t num_pairs() const noexcept { return pairs_; }
  /// The pair `layer` belongs to, or -1 outside the merged range.
  std::int32_t pair_of(std::int32_t layer) const noexcept {
    if (layer < o_.start_layer || layer >= o_.start_layer + 2 * pairs_) return -1;
    return (layer - o_.start_layer) / 2;
  }

  seq_id add_sequence() {
    seq_state st;  // before the inner add: a throw changes nothing
    st.merged.assign(static_cast<std::size_t>(pairs_), 0);
    st.mag.resize(static_cast<std::size_t>(pairs_) * cfg_.num_kv_heads * 4);
    const seq_id s = kv_.add_sequence();
    try {
      seqs_.add_as(s, std::move(st));
    } catch (...) {
      kv_.remove_sequence(s);
      throw;
    }
    return s;
  }
  void remove_sequence(seq_id s) {
    kv_.remove_sequence(s);
    seqs_.erase(s);
  }
  bool contains(seq_id s) const noexcept { return kv_.contains(s); }
  std::size_t num_sequences() const noexcept { return kv_.num_sequences(); }

  /// Appends n tokens to every kv head of one layer's own stream (kv_cache::append).
  template <class In>
  void append(seq_id s, std::int32_t layer, const In* k, const In* v, std::int32_t n,
              const std::int32_t* positions = nullptr) {
    seqs_.check_layer(layer, "append");
    kv_.append(s, layer, k, v, n, positions);
  }

  /// Whether pair p of sequence s holds shared directions.
  bool merged(seq_id s, std::int32_t pair) const { return seqs_.find(s, "merged").merged.at(static_cast<std::size_t>(pair)) != 0; }

  /// Tokens of one layer's stream of head h: its own plus, in a merged pair, the shared ones.
  std::int32_t length(seq_id s, std::int32_t layer, std::int32_t head) const {
    seqs_.check_layer(layer, "length");
    std::int32_t n = kv_.length(s, layer, head);
    const std::int32_t p = pair_of(layer);
    if (p >= 0 && merged(s, p)) n += kv_.length(s, cfg_.num_layers + p, head);
    return n;
  }
  std::int32_t seen(seq_id s, std::int32_t layer) const {
    seqs_.check_layer(layer, "seen");
    return kv_.seen(s, layer);
  }

  /// The magnitudes of the shared tokens of a merged layer's kv head h, in the shared stream's
  /// order: |k| and |v| of this layer's rows (the kernels' kscale and vscale).
  const std::vector<float>& key_scale(seq_id s, std::int32_t layer, std::int32_t head) const {
    return scales(s, layer, head, 0);
  }
  const std::vector<float>& value_scale(seq_id s, std::int32_t layer, std::int32_t head) const {
    return scales(s, layer, head, 1);
  }

  /// One layer's token positions of head h in gather's order (own and shared streams merged by
  /// position), without reading any row. out: [length] positions.
  void positions(seq_id s, std::int32_t layer, std::int32_t head, std::int32_t* out) const {
    seqs_.check_layer(layer, "positions");
    const std::int32_t no = kv_.length(s, layer, head);
    const std::int32_t p = pair_of(layer);
    const std::int32_t ns = p >= 0 && merged(s, p) ? kv_.length(s, cfg_.num_layers + p, head) : 0;
    const std::int32_t* po = kv_.positions(s, layer, head);
    const std::int32_t* ps = ns ? kv_.positions(s, cfg_.num_layers + p, head) : nullptr;
    std::int32_t i = 0, j = 0;
    while (i < no || j < ns) *out++ = j >= ns || (i < no && po[i] <= ps[j]) ? po[i++] : ps[j++];
  }

  /// One layer's tokens of head h as the model would see them, in position order: own rows as
  /// stored, shared tokens restored as |x|·e. k_out, v_out: [length][head_dim] (v_out may be
  /// null); positions() gives their positions.
  void gather(seq_id s, std::int32_t layer, std::int32_t head, float* k_out, float* v_out = nullptr) const {
    seqs_.check_layer(layer, "gather");
    const std::int32_t D = cfg_.head_dim;
    const std::int32_t no = kv_.length(s, layer, head);
    const std::int32_t p = pair_of(layer);
    const std::int32_t ns = p >= 0 && merged(s, p) ? kv_.length(s, cfg_.num_layers + p, head) : 0;
    std::vector<float> ko(static_cast<std::size_t>(no) * D), vo(ko.size()), ks(static_cast<std::size_t>(ns) * D),
        vs(ks.size());
    if (no) kv_.gather(s, layer, head, ko.data(), vo.data());
    if (ns) kv_.gather(s, cfg_.num_layers + p, head, ks.data(), vs.data());
    const std::int32_t* po = kv_.positions(s, layer, head);
    const std::int32_t* ps = ns ? kv_.positions(s, cfg_.num_layers + p, head) : nullptr;
    const std::vector<float>* mk = ns ? &key_scale(s, layer, head) : nullptr;
    const std::vector<float>* mv = ns ? &value_scale(s, layer, head) : nullptr;
    std::int32_t i = 0, j = 0, out = 0;
    while (i < no || j < ns) {  // merge by position (both streams ascend)
      const bool own = j >= ns || (i < no && po[i] <= ps[j]);
      for (std::int32_t d = 0; d < D; ++d) {
        const std::size_t o = static_cast<std::size_t>(out) * D + static_cast<std::size_t>(d);
        if (own) {
          k_out[o] = ko[static_cast<std::size_t>(i) * D + static_cast<std::size_t>(d)];
          if (v_out) v_out[o] = vo[static_cast<std::size_t>(i) * D + static_cast<std::size_t>(d)];
        } else {
          k_out[o] = (*mk)[static_cast<std::size_t>(j)] * ks[static_cast<std::size_t>(j) * D + static_cast<std::size_t>(d)];
          if (v_out) v_out[o] = (*mv)[static_cast<std::size_t>(j)] * vs[static_cast<std::size_t>(j) * D + static_cast<std::size_t>(d)];
        }
      }
      own ? ++i : ++j;
      ++out;
    }
  }

  /// The one-shot merge of every pair of sequence s (the rule in the file comment). Each pair's
  /// two layers must hold the same tokens in every kv head (same count and positions, as a
  /// prefill leaves them) and not be merged yet. Plan, then commit: everything is computed and
  /// every argument checked first (a refusal leaves the cache exactly as it was); the commit
  /// goes pair by pair within the pool's headroom (see the comment in the body).
  minicache_report merge_pairs(seq_id s) {
    constexpr const char* who = "kvc::merge::minicache_cache::merge_pairs";
    seq_state& st = seqs_.find(s, "merge_pairs");
    const std::int32_t H = cfg_.num_kv_heads, D = cfg_.head_dim, P = cfg_.page_size;
    struct pair_plan {
      std::vector<float> ke, ve;                            // [n][H][D] shared directions (all tokens)
      std::vector<std::int32_t> pos;                        // [n]
      std::vector<std::vector<std::int32_t>> keep, shared;  // per head: retained / merged indices
      std::vector<std::vector<float>> mag;                  // [head * 4 + 2 * (layer - a) + (0 keys, 1 values)]
    };
    std::vector<pair_plan> plans(static_cast<std::size_t>(pairs_));
    minicache_report rep;
    std::vector<double> all_dk, all_dv;  // for the report's medians
    for (std::int32_t p = 0; p < pairs_; ++p) {
      const std::int32_t a = o_.start_layer + 2 * p, b = a + 1;
      KVC_EXPECTS_IN(who, !st.merged[static_cast<std::size_t>(p)], "layers ", a, " and ", b, " of seq ", s,
                     " are merged already, expected one merge per sequence (after its prompt)");
      const std::int32_t n = kv_.length(s, a, 0);
      const std::int32_t* pa0 = kv_.positions(s, a, 0);
      for (std::int32_t l : {a, b})
        for (std::int32_t h = 0; h < H; ++h) {
          const std::int32_t nh = kv_.length(s, l, h);
          KVC_EXPECTS_IN(who, nh == n, "layer ", l, " kv head ", h, " holds ", nh, " tokens, expected ", n,
                         " like layer ", a, " kv head 0 (both layers of a pair must hold the same tokens: no "
                         "eviction before MiniCache)");
          const std::int32_t* ph = kv_.positions(s, l, h);
          for (std::int32_t t = 0; t < n; ++t)
            KVC_EXPECTS_IN(who, ph[t] == pa0[t] && (t == 0 || ph[t] > ph[t - 1]), "layer ", l, " kv head ", h,
                           " holds position ", ph[t], " at index ", t,
                           ", expected the positions of layer ", a, " kv head 0, ascending");
        }
      pair_plan& pl = plans[static_cast<std::size_t>(p)];
      pl.pos.assign(pa0, pa0 + n);
      pl.ke.assign(static_cast<std::size_t>(n) * H * D, 0.0f);
      pl.ve.assign(pl.ke.size(), 0.0f);
      pl.keep.resize(static_cast<std::size_t>(H));
      pl.shared.resize(static_cast<std::size_t>(H));
      pl.mag.resize(static_cast<std::size_t>(H) * 4);
      std::vector<float> xa(static_cast<std::size_t>(n) * D), va(xa.size()), xb(xa.size()), vb(xa.size());
      for (std::int32_t h = 0; h < H; ++h) {
        kv_.gather(s, a, h, xa.data(), va.data());
        kv_.gather(s, b, h, xb.data(), vb.data());
        std::vector<double> dk(static_cast<std::size_t>(n)), dv(dk.size()), nk(2 * dk.size()), nv(nk.size());
        for (std::int32_t t = 0; t < n; ++t) {
          const std::size_t r = static_cast<std::size_t>(t) * D;
          const std::size_t e = (static_cast<std::size_t>(t) * H + static_cast<std::size_t>(h)) * D;
          dk[static_cast<std::size_t>(t)] = slerp(&xa[r], &xb[r], D, &pl.ke[e], &nk[2 * static_cast<std::size_t>(t)]);
          dv[static_cast<std::size_t>(t)] = slerp(&va[r], &vb[r], D, &pl.ve[e], &nv[2 * static_cast<std::size_t>(t)]);
        }
        const double tk = cut(dk), tv = cut(dv);
        for (std::size_t u = 0; u < dk.size(); ++u) {
          if (dk[u] <= 1.0) all_dk.push_back(dk[u]);
          if (dv[u] <= 1.0) all_dv.push_back(dv[u]);
        }
        std::vector<float>* mg = &pl.mag[static_cast<std::size_t>(h) * 4];
        std::vector<float>& mka = mg[0];
        std::vector<float>& mva = mg[1];
        std::vector<float>& mkb = mg[2];
        std::vector<float>& mvb = mg[3];
        for (std::int32_t t = 0; t < n; ++t) {
          const std::size_t u = static_cast<std::size_t>(t);
          // A zero row has no direction (distance 2 > any cut): it stays unmerged.
          if (dk[u] > tk || dv[u] > tv) {
            pl.keep[static_cast<std::size_t>(h)].push_back(t);
            continue;
          }
          pl.shared[static_cast<std::size_t>(h)].push_back(t);
          mka.push_back(static_cast<float>(nk[2 * u]));
          mkb.push_back(static_cast<float>(nk[2 * u + 1]));
          mva.push_back(static_cast<float>(nv[2 * u]));
          mvb.push_back(static_cast<float>(nv[2 * u + 1]));
        }
        // Pages per kv head: the two layers' retained rows and the shared rows, against the two
        // layers' n rows now. A merge that would not free a page is not made.
        const auto pages = [&](std::size_t m) { return (m + static_cast<std::size_t>(P) - 1) / static_cast<std::size_t>(P); };
        auto& kp = pl.keep[static_cast<std::size_t>(h)];
        auto& sh = pl.shared[static_cast<std::size_t>(h)];
        if (!sh.empty() && 2 * pages(kp.size()) + pages(sh.size()) > 2 * pages(static_cast<std::size_t>(n))) {
          kp.resize(static_cast<std::size_t>(n));
          for (std::int32_t t = 0; t < n; ++t) kp[static_cast<std::size_t>(t)] = t;
          sh.clear();
          for (int m = 0; m < 4; ++m) mg[m].clear();
        }
        rep.merged += static_cast<std::int64_t>(pl.shared[static_cast<std::size_t>(h)].size());
        rep.retained += static_cast<std::int64_t>(pl.keep[static_cast<std::size_t>(h)].size());
      }
    }
    auto median = [](std::vector<double>& v) {
      if (v.empty()) return std::numeric_limits<double>::quiet_NaN();
      std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
      return v[v.size() / 2];
    };
    rep.key_distance_median = median(all_dk);
    rep.value_distance_median = median(all_dv);
    // Commit pair by pair: the shared directions of every token are appended to the pair's
    // extra layer and only the merged ones kept, then both layers keep their retained tokens
    // (frees pages; no allocation on an unforked stream) and the magnitudes move in. Pair by
    // pair, so the transient is one layer's rows, which the pool's headroom (inner_config)
    // always holds: a merge that passed the checks above cannot run out of pages. Should an
    // append still throw (host memory), that pair's extra layer is emptied again and the pairs
    // before it stay merged: every pair is merged or untouched, never half.
    for (std::int32_t p = 0; p < pairs_; ++p) {
      const std::int32_t a = o_.start_layer + 2 * p, sl = cfg_.num_layers + p;
      pair_plan& pl = plans[static_cast<std::size_t>(p)];
      const std::int32_t n = static_cast<std::int32_t>(pl.pos.size());
      try {
        kv_.append(s, sl, pl.ke.data(), pl.ve.data(), n, n ? pl.pos.data() : nullptr);
        kv_.keep_layer(s, sl, pl.shared);
      } catch (...) {
        kv_.keep_layer(s, sl, std::vector<std::vector<std::int32_t>>(static_cast<std::size_t>(H)));
        throw;
      }
      kv_.keep_layer(s, a, pl.keep);
      kv_.keep_layer(s, a + 1, pl.keep);
      for (std::size_t i = 0; i < pl.mag.size(); ++i) st.mag[static_cast<std::size_t>(p) * H * 4 + i].swap(pl.mag[i]);
      st.merged[static_cast<std::size_t>(p)] = 1;
    }
    return rep;
  }

  /// Pool bytes: the layers' own pages and the shared directions, each page once.
  std::size_t bytes_in_use() const noexcept { return kv_.bytes_in_use(); }
  /// Pool bytes of one layer's own stream; a pair's shared pages are bytes_in_use(num_layers + p)
  /// of cache(), counted in neither layer.
  std::size_t bytes_in_use(std::int32_t layer) const { return kv_.bytes_in_use(layer); }
  memory_traffic traffic() const noexcept { return kv_.traffic(); }
  /// Host bytes: the store's bookkeeping plus 4 floats of magnitude per merged token.
  std::size_t metadata_bytes() const noexcept {
    std::size_t b = kv_.metadata_bytes();
    for (const auto& kv : seqs_)
      for (const auto& m : kv.second.mag) b += sizeof(float) * m.size();
    return b;
  }
  std::int64_t tokens_held() const noexcept { return kv_.tokens_held(); }

 private:
  struct seq_state {
    std::vector<char> merged;             // [pair]
    std::vector<std::vector<float>> mag;  // [(pair * H + head) * 4 + 2 * (layer - a) + (0 keys, 1 values)], [merged]
  };

  static minicache_options checked(const cache_config& c, minicache_options o) {
    constexpr const char* who = "kvc::merge::minicache_cache";
    KVC_EXPECTS_IN(who, c.num_layers >= 1, "num_layers = ", c.num_layers, ", expected >= 1");
    if (o.start_layer < 0) o.start_layer = c.num_layers / 2;
    KVC_EXPECTS_IN(who, o.start_layer <= c.num_layers, "minicache_options.start_layer = ", o.start_layer,
                   ", expected 0..", c.num_layers, " (or -1: num_layers / 2)");
    KVC_EXPECTS_IN(who, o.t >= 0.0f && o.t <= 1.0f, "minicache_options.t = ", o.t, ", expected a SLERP weight in [0, 1]");
    KVC_EXPECTS_IN(who, o.gamma >= 0.0f && o.gamma <= 1.0f, "minicache_options.gamma = ", o.gamma,
                   ", expected a retention fraction in [0, 1]");
    return o;
  }
  /// One extra layer per pair, and pool headroom for a merge's transient: one layer's share of
  /// the pages (a pair's shared rows are written before its layers shrink) plus a page per
  /// stream of rounding. The pool reserves address space and commits pages on use, so the
  /// headroom costs nothing until a merge touches it.
  static cache_config inner_config(cache_config c, const minicache_options& o) {
    const std::int32_t pairs = (c.num_layers - o.start_layer) / 2;
    const std::int64_t extra = (static_cast<std::int64_t>(c.max_pages) + c.num_layers - 1) / c.num_layers +
                               static_cast<std::int64_t>(pairs) * c.num_kv_heads;
    c.max_pages = static_cast<std::int32_t>(std::min<std::int64_t>(INT32_MAX, c.max_pages + extra));
    c.num_layers += pairs;
    return c;
  }

  /// SLERP of the directions of x and y (n channels) into e; returns the angular distance
  /// Ω/π in [0, 1], or 2 when either row is zero (no direction: never merged). norms[0..1] get
  /// |x| and |y|.
  double slerp(const float* x, const float* y, std::int32_t n, float* e, double* norms) const {
    double nx = 0, ny = 0, dot = 0;
    for (std::int32_t d = 0; d < n; ++d) {
      nx += static_cast<double>(x[d]) * x[d];
      ny += static_cast<double>(y[d]) * y[d];
      dot += static_cast<double>(x[d]) * y[d];
    }
    nx = std::sqrt(nx), ny = std::sqrt(ny);
    norms[0] = nx, norms[1] = ny;
    if (!(nx > 0) || !(ny > 0)) return 2.0;
    const double c = std::max(-1.0, std::min(1.0, dot / (nx * ny)));
    const double om = std::acos(c), t = static_cast<double>(o_.t);
    double wa, wb;
    if (std::sin(om) < 1e-6) {  // (anti)parallel: the linear blend, normalised below
      wa = 1.0 - t, wb = t;
    } else {
      wa = std::sin((1.0 - t) * om) / std::sin(om), wb = std::sin(t * om) / std::sin(om);
    }
    std::vector<double> v(static_cast<std::size_t>(n));
    double ne = 0;
    for (std::int32_t d = 0; d < n; ++d) {
      v[static_cast<std::size_t>(d)] = wa * x[d] / nx + wb * y[d] / ny;
      ne += v[static_cast<std::size_t>(d)] * v[static_cast<std::size_t>(d)];
    }
    ne = std::sqrt(ne);
    for (std::int32_t d = 0; d < n; ++d) e[d] = ne > 0 ? static_cast<float>(v[static_cast<std::size_t>(d)] / ne) : 0.0f;
    if (!(ne > 0)) return 2.0;  // opposite directions blended to nothing
    return om / 3.14159265358979323846;
  }

  /// The retention cut d_min + γ·(d_max − d_min) over the tokens with a direction.
  double cut(const std::vector<double>& d) const {
    double lo = 2, hi = -1;
    for (double x : d)
      if (x <= 1.0) lo = std::min(lo, x), hi = std::max(hi, x);
    if (hi < lo) return -1.0;  // no token has a direction: nothing merges
    return lo + static_cast<double>(o_.gamma) * (hi - lo);
  }

  const std::vector<float>& scales(seq_id s, std::int32_t layer, std::int32_t head, int which) const {
    seqs_.check_layer(layer, which ? "value_scale" : "key_scale");
    const std::int32_t p = pair_of(layer);
    KVC_EXPECTS_IN("kvc::merge::minicache_cache::scales", p >= 0 && merged(s, p), "layer = ", layer,
                   " of seq ", s, " holds no shared tokens, expected a layer of a merged pair");
    KVC_EXPECTS_IN("kvc::merge::minicache_cache::scales", head >= 0 && head < cfg_.num_kv_heads, "head = ", head,
                   ", expected 0..", cfg_.num_kv_heads - 1);
    return seqs_.find(s, "scales").mag[(static_cast<std::size_t>(p) * cfg_.num_kv_heads + static_cast<std::size_t>(head)) * 4 +
                                  static_cast<std::size_t>(layer - (o_.start_layer + 2 * p)) * 2 + static_cast<std::size_t>(which)];
  }

  cache_config cfg_;
  minicache_options o_;
  std::int32_t pairs_ = (cfg_.num_layers - o_.start_layer) / 2;
  inner_cache kv_;
  detail::sequence_table<seq_state> seqs_{"kvc::merge::minicache_cache", cfg_.num_layers, cfg_.num_kv_heads};
};

}  // namespace merge
KVC_END_NAMESPACE
