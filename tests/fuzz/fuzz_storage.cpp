// SPDX-License-Identifier: Apache-2.0
/// \file
/// Differential fuzzer of every storage the run-time registry offers (issue 16, "Hardening").
///
/// The input's first bytes choose a storage spec and a small cache shape (a few layers, heads and
/// channels, small pages, a pool of a few pages so exhaustion happens); the rest is a sequence of
/// operations on one `runtime::any_cache`: add / remove / fork a sequence, append (with NaN/Inf
/// now and then), keep and keep_layer (valid index sets and invalid ones: out of range, unsorted,
/// duplicated), rewind (valid and out-of-range n), share_layer (valid and bad layer pairs), calls
/// with a bad layer / head / sequence, and decode attention.
///
/// Every operation is mirrored on a dense reference written from the documentation only (the
/// storage's page layout in kv_cache.hpp / quant_cache.hpp, the codecs' record formats and error
/// bounds in codec.hpp and the codec headers), never by calling kvc's codecs:
///   - each (sequence, layer, head) keeps the original float K/V rows and original positions of
///     its tokens, and per element a bound on how far the stored value may be from the original;
///   - the region layout of quantized streams (sinks, quantized units, residual window) is
///     replayed, because it decides which tokens are encoded together and hence their bounds;
///   - pages are modelled as reference-counted objects with copy-on-write, so the pool a call
///     needs, whether it must fail with out_of_memory, and bytes_in_use() (total and per layer)
///     are predicted exactly.
/// After every call: the outcome (success or which exception) must be the predicted one; on
/// success positions, seen(), lengths and tokens_held() match exactly and gather() is within the
/// bounds; on failure the cache must be bit-for-bit as before (strong guarantee). A keep on
/// unshared pages must never grow bytes_in_use() (quant_cache.hpp: keep never needs a page the
/// stream did not have).

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <numeric>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <kvc/error.hpp>
#include <kvc/runtime/any_cache.hpp>
#include <kvc/runtime/make_cache.hpp>

#include "fuzz_support.hpp"

namespace storagefuzz {

using kvc::seq_id;
using kvc::runtime::any_cache;

// Reporting (cat, ctx, fail_check, SF_CHECK, count), the input reader and the value generator
// are shared with the other storage fuzzers: fuzz_support.hpp.
using kvc_fuzz::cat;
using kvc_fuzz::check_failed;
using kvc_fuzz::count;
using kvc_fuzz::ctx;
using kvc_fuzz::fail_check;
using kvc_fuzz::input;
using kvc_fuzz::rng;
using kvc_fuzz::throw_on_failure;

// ---- what the reference expects of a storage -----------------------------------------------

/// How one role (K or V) of a storage stores a token, and so how far a decoded value may be
/// from the original. All quantized storages first round their input through binary16.
enum class codec_kind {
  exact,     ///< fp32 pages: bit-exact
  fp16,      ///< binary16 pages: round to nearest, |x - x^| <= |x| 2^-11 + 2^-25
  bf16,      ///< bfloat16 pages: |x - x^| <= |x| 2^-8
  tok_sym,   ///< per token, symmetric: scale = max|x| / (2^(b-1) - 1), |x - x^| <= scale / 2
  tok_asym,  ///< per token (per `channel_group` channels), min/max: scale = range / (2^b - 1)
  fp8,       ///< per token scale max|x| / max_finite, then FP8 rounding
  chan_asym, ///< KIVI keys: per channel over a record of `tokens` tokens, min/max
  rot_l2,    ///< Hadamard-rotated per-token asym: an L2 bound (the rotation is orthonormal)
  gear_l2,   ///< GEAR: per-token asym dense part + rank-r SVD of its residual: an L2 bound per token
  mikv,      ///< MiKV: high codec, possibly re-encoded by the low codec (which one is not modelled)
};

struct role_codec {
  codec_kind kind = codec_kind::exact;
  int bits = 0;
  int channel_group = 0;  ///< tok_asym: channels per scale (0: the whole row)
  int tokens = 1;         ///< tokens per record
  int fp8_mant = 0, fp8_bias = 0;
  float fp8_max = 0;
  int low_bits = 0;       ///< mikv: the low codec's bits (asymmetric)
  bool high_sym = false;  ///< mikv: the high codec is symmetric int8
  std::size_t record_bytes = 0;
};

struct storage_desc {
  std::string spec;
  bool plain = false;       ///< kv_cache<T>
  bool mikv = false;        ///< mixed precision: layout not modelled (bounds and consistency only)
  bool forkable = true;
  role_codec k, v;
  int unit = 1, residual = 0, sinks = 0;
  int page_size = 0;        ///< after the runtime's rounding to whole units
  int q_max_pages = 0, fp_max_pages = 0;
  std::size_t page_bytes[3] = {0, 0, 0};  ///< main (plain or quantized), residual, sink
  int capacity[3] = {0, 0, 0};
};

inline std::size_t round64(std::size_t b) { return (b + 63) / 64 * 64; }

// ---- reference model -------------------------------------------------------------------------

enum pool_index { main_pool = 0, res_pool = 1, sink_pool = 2 };

/// Live pages per pool and layer; a page object decrements its count when its last holder drops it.
struct page_counts {
  std::vector<int> live[3];
  int total(int pool) const { return std::accumulate(live[pool].begin(), live[pool].end(), 0); }
};

struct page_obj {
  page_counts* c;
  int pool, layer;
  page_obj(page_counts* pc, int p, int l) : c(pc), pool(p), layer(l) { ++c->live[pool][static_cast<std::size_t>(layer)]; }
  ~page_obj() { --c->live[pool][static_cast<std::size_t>(layer)]; }
  page_obj(const page_obj&) = delete;
  page_obj& operator=(const page_obj&) = delete;
};
using page_ref = std::shared_ptr<page_obj>;
inline bool shared(const page_ref& p) { return p && p.use_count() > 1; }

struct ref_token {
  std::int32_t pos = 0;
  std::vector<float> x[2];  ///< original K (0) and V (1)
  std::vector<float> e[2];  ///< elementwise bound on |stored - original|
  float l2[2] = {0, 0};     ///< extra bound on the L2 norm of the error (rot_l2, gear_l2)
};

struct ref_stream {
  std::vector<ref_token> t;
  int n_sink = 0, n_quant = 0, n_res = 0;  ///< quantized storages: the documented regions
  std::vector<page_ref> pages;             ///< main pool pages (plain or quantized)
  page_ref res, sink;
  int length() const { return static_cast<int>(t.size()); }
};

struct ref_seq {
  std::vector<ref_stream> st;  ///< [layer * H + head]
  std::vector<std::int32_t> seen;
};

/// binary16 rounding bound of a value of magnitude a (normal: half an ulp, 2^-11 relative;
/// subnormal: half of 2^-24).
inline float half_err(float a) { return a * 0x1p-11f + 0x1p-25f; }

class model {
 public:
  model(const storage_desc& d, const kvc::cache_config& c) : d_(d), c_(c) {
    for (auto& l : counts_.live) l.assign(static_cast<std::size_t>(c.num_layers), 0);
  }

  const storage_desc& desc() const { return d_; }
  std::map<seq_id, ref_seq>& seqs() { return seqs_; }
  const page_counts& counts() const { return counts_; }
  int H() const { return c_.num_kv_heads; }
  int D() const { return c_.head_dim; }
  int P() const { return d_.page_size; }
  int pages_for(int n) const { return (n + P() - 1) / P(); }
  int free_pages(int pool) const { return d_.capacity[pool] - counts_.total(pool); }
  ref_stream& at(ref_seq& s, int layer, int h) { return s.st[static_cast<std::size_t>(layer * H() + h)]; }

  std::size_t bytes() const {
    std::size_t b = 0;
    for (int p = 0; p < 3; ++p) b += static_cast<std::size_t>(counts_.total(p)) * d_.page_bytes[p];
    return b;
  }
  std::size_t bytes(int layer) const {
    std::size_t b = 0;
    for (int p = 0; p < 3; ++p) b += static_cast<std::size_t>(counts_.live[p][static_cast<std::size_t>(layer)]) * d_.page_bytes[p];
    return b;
  }

  void add(seq_id id) {
    ref_seq s;
    s.st.resize(static_cast<std::size_t>(c_.num_layers * H()));
    s.seen.assign(static_cast<std::size_t>(c_.num_layers), 0);
    seqs_.emplace(id, std::move(s));
  }
  void fork(seq_id from, seq_id to) { seqs_.emplace(to, seqs_.at(from)); }  // shares page_refs
  /// share_layer as documented: the layer's streams become from's (page_refs shared, so a page
  /// keeps the layer it was allocated for and the first write to it copies it); seen follows.
  void share(ref_seq& s, int layer, int from) {
    for (int h = 0; h < H(); ++h) at(s, layer, h) = ref_stream(at(s, from, h));
    s.seen[static_cast<std::size_t>(layer)] = s.seen[static_cast<std::size_t>(from)];
  }
  void remove(seq_id id) { seqs_.erase(id); }

  // -- append ----------------------------------------------------------------------------------

  /// Pages per pool the append needs (copies of shared pages written included), as documented:
  /// "the first write to a shared page copies it".
  void append_need(ref_seq& s, int layer, int n, int need[3]) {
    need[0] = need[1] = need[2] = 0;
    for (int h = 0; h < H(); ++h) {
      ref_stream& st = at(s, layer, h);
      if (d_.plain) {
        const int L = st.length();
        need[0] += pages_for(L + n) - static_cast<int>(st.pages.size());
        if (L % P() != 0 && shared(st.pages.back())) ++need[0];
        continue;
      }
      const quant_plan p = plan_append(st, n);
      if (p.m_sink > 0 && (!st.sink || shared(st.sink))) ++need[2];
      if (p.n2 > 0 && p.newres > 0 && (!st.res || shared(st.res))) ++need[1];
      // The page holding the partial unit is rewritten when it is completed (P is whole units).
      if (p.E > 0 && st.n_quant % P() != 0 && shared(st.pages.back())) ++need[0];
      if (p.E > 0) need[0] += pages_for(st.n_quant - p.m + p.E) - static_cast<int>(st.pages.size());
    }
  }

  /// k, v: [n][H][D]; pos: the positions the tokens get.
  void append_commit(ref_seq& s, int layer, const float* k, const float* v, int n, const std::vector<std::int32_t>& pos) {
    for (int h = 0; h < H(); ++h) {
      ref_stream& st = at(s, layer, h);
      std::vector<ref_token> fresh(static_cast<std::size_t>(n));
      for (int i = 0; i < n; ++i) {
        ref_token& t = fresh[static_cast<std::size_t>(i)];
        t.pos = pos[static_cast<std::size_t>(i)];
        for (int r = 0; r < 2; ++r) {
          const float* src = (r == 0 ? k : v) + (static_cast<std::size_t>(i) * H() + h) * D();
          t.x[r].assign(src, src + D());
          t.e[r].assign(static_cast<std::size_t>(D()), 0.0f);
          const codec_kind kind = (r == 0 ? d_.k : d_.v).kind;
          for (int d = 0; d < D(); ++d) {
            const float a = std::fabs(src[d]);
            // Plain pages round once; every quantized storage rounds its input through binary16.
            t.e[r][static_cast<std::size_t>(d)] = kind == codec_kind::exact ? 0.0f : kind == codec_kind::bf16 ? a * 0x1p-8f : half_err(a);
          }
        }
      }
      if (d_.plain) {
        int L = st.length();
        if (L % P() != 0 && shared(st.pages.back())) st.pages.back() = std::make_shared<page_obj>(&counts_, main_pool, layer);
        for (int i = 0; i < n; ++i, ++L)
          if (L % P() == 0) st.pages.push_back(std::make_shared<page_obj>(&counts_, main_pool, layer));
        for (auto& t : fresh) st.t.push_back(std::move(t));
        continue;
      }
      const quant_plan p = plan_append(st, n);
      if (p.m_sink > 0 && (!st.sink || shared(st.sink))) st.sink = std::make_shared<page_obj>(&counts_, sink_pool, layer);
      if (p.n2 > 0 && p.newres > 0 && (!st.res || shared(st.res))) st.res = std::make_shared<page_obj>(&counts_, res_pool, layer);
      if (p.E > 0 && st.n_quant % P() != 0 && shared(st.pages.back()))
        st.pages.back() = std::make_shared<page_obj>(&counts_, main_pool, layer);
      while (p.E > 0 && static_cast<int>(st.pages.size()) < pages_for(st.n_quant - p.m + p.E))
        st.pages.push_back(std::make_shared<page_obj>(&counts_, main_pool, layer));
      // Sinks fill only while the stream holds nothing else, so appending keeps token order.
      for (auto& t : fresh) st.t.push_back(std::move(t));
      st.n_sink += p.m_sink;
      // Encoding starts at the partial unit (left quantized by a keep): its m tokens are decoded
      // and encoded again with the oldest residual tokens, then the new non-sink tokens. Their
      // bounds so far widen the interval the new encoding sees, so the second rounding adds up.
      const int base = st.n_sink + st.n_quant - p.m;
      if (p.E > 0 && p.m > 0) count(d_.spec.substr(0, d_.spec.find('(')) + " append: partial unit completed");
      for (int u0 = 0; u0 < p.E; u0 += d_.unit) encode_unit(st, base + u0, u0 == 0 ? p.m : 0);
      if (p.E > 0) st.n_quant += p.E - p.m;
      st.n_res = p.newres;
    }
    s.seen[static_cast<std::size_t>(layer)] += n;
  }

  // -- keep ------------------------------------------------------------------------------------

  /// Pages per pool keep_heads needs; kept lists are valid.
  void keep_need(ref_seq& s, int layer, const std::vector<std::pair<int, std::vector<std::int32_t>>>& heads, int need[3]) {
    need[0] = need[1] = need[2] = 0;
    for (const auto& hk : heads) {
      ref_stream& st = at(s, layer, hk.first);
      const keep_plan p = plan_keep(st, hk.second);
      for (int pg = 0; pg < static_cast<int>(p.page_changed.size()); ++pg)
        if (p.page_changed[static_cast<std::size_t>(pg)] && shared(st.pages[static_cast<std::size_t>(pg)])) ++need[0];
      if (!d_.plain) {
        if (p.sink_changed && shared(st.sink)) ++need[2];
        if (p.res_changed && shared(st.res)) ++need[1];
      }
    }
  }

  void keep_commit(ref_seq& s, int layer, const std::vector<std::pair<int, std::vector<std::int32_t>>>& heads) {
    for (const auto& hk : heads) {
      ref_stream& st = at(s, layer, hk.first);
      const auto& kept = hk.second;
      const keep_plan p = plan_keep(st, kept);
      for (int pg = 0; pg < static_cast<int>(p.page_changed.size()); ++pg)
        if (p.page_changed[static_cast<std::size_t>(pg)] && shared(st.pages[static_cast<std::size_t>(pg)]))
          st.pages[static_cast<std::size_t>(pg)] = std::make_shared<page_obj>(&counts_, main_pool, layer);
      st.pages.resize(p.page_changed.size());
      std::vector<ref_token> old;
      old.swap(st.t);
      if (d_.plain) {
        for (std::int32_t i : kept) st.t.push_back(old[static_cast<std::size_t>(i)]);
        continue;
      }
      if (p.sink_changed && shared(st.sink)) st.sink = std::make_shared<page_obj>(&counts_, sink_pool, layer);
      // A window whose kept tokens move is rewritten in place (a copy first when shared); one that
      // keeps a prefix of its tokens, or none, is left as it is.
      if (p.res_changed && shared(st.res)) st.res = std::make_shared<page_obj>(&counts_, res_pool, layer);
      // New order: kept sinks, every kept quantized token (a trailing partial unit stays
      // quantized), then the kept residual tokens (keep never encodes the window).
      for (std::int32_t i : p.ks) st.t.push_back(old[static_cast<std::size_t>(i)]);
      for (int i = 0; i < p.qmain; ++i) st.t.push_back(old[static_cast<std::size_t>(st.n_sink + p.kq[static_cast<std::size_t>(i)])]);
      const int nsink = static_cast<int>(p.ks.size());
      // Quantized records whose kept members changed are decoded and re-encoded, a trailing
      // partial one padded with copies of its last token (records of one token are moved as
      // bytes: no new error; a partial record whose tokens did not move keeps its codes).
      for (int r = 0; r < 2; ++r) {
        const int u = (r == 0 ? d_.k : d_.v).tokens;
        if (u == 1) continue;
        for (int r0 = 0; r0 < p.qmain; r0 += u) {
          const int rn = std::min(u, p.qmain - r0);
          bool same = true;
          for (int i = r0; i < r0 + rn; ++i) same = same && p.kq[static_cast<std::size_t>(i)] == i;
          if (!same) {
            encode_record(st, nsink + r0, r, rn, true);
            if (rn < u) count(d_.spec.substr(0, d_.spec.find('(')) + " keep: partial record re-encoded padded");
          }
        }
      }
      for (std::int32_t i : p.kr) st.t.push_back(old[static_cast<std::size_t>(st.n_sink + st.n_quant + i)]);
      if (p.qmain % d_.unit != 0) count(d_.spec.substr(0, d_.spec.find('(')) + " keep: partial unit left quantized");
      st.n_sink = nsink;
      st.n_quant = p.qmain;
      st.n_res = p.final_res;
    }
  }

  /// Whether any page of these streams is shared (then keep may legitimately grow bytes).
  bool any_shared(ref_seq& s, int layer, const std::vector<std::pair<int, std::vector<std::int32_t>>>& heads) {
    for (const auto& hk : heads) {
      ref_stream& st = at(s, layer, hk.first);
      for (const auto& pg : st.pages)
        if (shared(pg)) return true;
      if (shared(st.res) || shared(st.sink)) return true;
    }
    return false;
  }

  /// Largest bound a decoded element may need, for messages.
  static float bound(const ref_token& t, int r, int d) { return t.e[r][static_cast<std::size_t>(d)] + t.l2[r]; }

 private:
  struct quant_plan {
    int m_sink, n2, T, m, E, shift, newres;
  };
  /// quant_cache.hpp: sinks fill while the stream holds nothing else; appended tokens enter the
  /// residual window; whenever it holds R + U tokens or more, its oldest whole units are encoded.
  quant_plan plan_append(const ref_stream& st, int n) const {
    quant_plan p;
    // mikv: its high store refills sinks whenever it holds no other *high* token, which the model
    // cannot see (demotions depend on attention); every mikv token gets the lossy bound, which
    // also covers a token kept in binary16.
    const int sinks = d_.mikv ? 0 : d_.sinks;
    p.m_sink = (st.n_quant == 0 && st.n_res == 0 && st.n_sink < sinks) ? std::min(sinks - st.n_sink, n) : 0;
    p.n2 = n - p.m_sink;
    p.T = st.n_res + p.n2;
    // quant_cache.hpp: whenever the trailing partial unit (m tokens, quantized) plus the window
    // number R + U or more, whole units are encoded counting from the partial unit's start.
    p.m = st.n_quant % d_.unit;
    const int avail = p.m + p.T;
    p.E = avail >= d_.residual + d_.unit ? (avail - d_.residual) / d_.unit * d_.unit : 0;
    p.shift = p.E > 0 ? p.E - p.m : 0;  // window / new tokens that the encoded units take
    p.newres = p.T - p.shift;
    return p;
  }

  struct keep_plan {
    std::vector<std::int32_t> ks, kq, kr;
    int qmain = 0, final_res = 0;
    std::vector<char> page_changed;  ///< main pages kept, and whether each is written
    bool sink_changed = false;
    bool res_changed = false;  ///< a kept window token moves
  };
  /// quant_cache.hpp: every kept quantized token stays quantized, "the trailing partial unit
  /// stays quantized"; the window keeps only its own kept tokens ("keep never moves tokens into
  /// the full-precision window"), so no page is needed that is not shared.
  keep_plan plan_keep(const ref_stream& st, const std::vector<std::int32_t>& kept) const {
    keep_plan p;
    if (d_.plain) {
      const int n = static_cast<int>(kept.size());
      p.page_changed.assign(static_cast<std::size_t>(pages_for(n)), 0);
      for (int i = 0; i < n; ++i)
        if (kept[static_cast<std::size_t>(i)] != i) p.page_changed[static_cast<std::size_t>(i / P())] = 1;
      return p;
    }
    for (std::int32_t t : kept) {
      if (t < st.n_sink) p.ks.push_back(t);
      else if (t < st.n_sink + st.n_quant) p.kq.push_back(t - st.n_sink);
      else p.kr.push_back(t - st.n_sink - st.n_quant);
    }
    p.qmain = static_cast<int>(p.kq.size());
    p.final_res = static_cast<int>(p.kr.size());
    p.page_changed.assign(static_cast<std::size_t>(pages_for(p.qmain)), 0);
    for (int i = 0; i < p.qmain; ++i)
      if (p.kq[static_cast<std::size_t>(i)] != i) p.page_changed[static_cast<std::size_t>(i / P())] = 1;
    for (std::size_t i = 0; i < p.ks.size(); ++i)
      if (p.ks[i] != static_cast<std::int32_t>(i)) p.sink_changed = true;
    for (std::size_t i = 0; i < p.kr.size(); ++i)
      if (p.kr[i] != static_cast<std::int32_t>(i)) p.res_changed = true;
    return p;
  }

  /// `decoded`: the unit's first tokens are a partial unit's, decoded from their records: their
  /// one-token records stay as they are, and a record mixing them with new tokens is repacked.
  void encode_unit(ref_stream& st, int first, int decoded = 0) {
    for (int r = 0; r < 2; ++r) {
      const int u = (r == 0 ? d_.k : d_.v).tokens;
      for (int j = 0; j < d_.unit; j += u) {
        if (j >= decoded) encode_record(st, first + j, r);
        else if (u > 1) encode_record(st, first + j, r, 0, true);
      }
    }
  }

  /// Adds to tokens [first, first + real) of role r the error of one more encoding, from the
  /// interval each input element may lie in (original +- the bound so far). A record of fewer
  /// real tokens than the codec's (keep's trailing partial record) is padded with copies of its
  /// last real token: they are read as that token, and get no bound of their own. `repack`: the
  /// tokens were decoded from records, and a codec with a repack (KIVI keys) puts them on a dyadic
  /// grid instead of a min/max one.
  void encode_record(ref_stream& st, int first, int r, int real = 0, bool repack = false) {
    const role_codec& c = r == 0 ? d_.k : d_.v;
    const int D = this->D(), u = c.tokens;
    const int rn = real > 0 ? std::min(real, u) : u;
    auto src = [&](int j) -> ref_token& { return st.t[static_cast<std::size_t>(first + std::min(j, rn - 1))]; };
    auto lo_of = [&](int j, int d) {
      const ref_token& t = src(j);
      return t.x[r][static_cast<std::size_t>(d)] - t.e[r][static_cast<std::size_t>(d)] - t.l2[r];
    };
    auto hi_of = [&](int j, int d) {
      const ref_token& t = src(j);
      return t.x[r][static_cast<std::size_t>(d)] + t.e[r][static_cast<std::size_t>(d)] + t.l2[r];
    };
    auto tok = [&](int j) -> ref_token& { return src(j); };
    switch (c.kind) {
      case codec_kind::exact:
      case codec_kind::fp16:
      case codec_kind::bf16:
        return;
      case codec_kind::tok_sym:
      case codec_kind::tok_asym:
      case codec_kind::fp8:
      case codec_kind::mikv:
        for (int j = 0; j < rn; ++j) {
          std::vector<float> add(static_cast<std::size_t>(D));
          per_token_add(c, [&](int d) { return lo_of(j, d); }, [&](int d) { return hi_of(j, d); }, add.data());
          for (int d = 0; d < D; ++d) tok(j).e[r][static_cast<std::size_t>(d)] += add[static_cast<std::size_t>(d)];
        }
        return;
      case codec_kind::chan_asym: {
        const float qmax = static_cast<float>((1 << c.bits) - 1);
        for (int d = 0; d < D; ++d) {
          float lo = lo_of(0, d), hi = hi_of(0, d);
          for (int j = 1; j < u; ++j) lo = std::min(lo, lo_of(j, d)), hi = std::max(hi, hi_of(j, d));
          const float a = repack ? std::max(dyadic_add(lo, hi, qmax), asym_add(lo, hi, qmax))
                                              : asym_add(lo, hi, qmax);
          for (int j = 0; j < rn; ++j) tok(j).e[r][static_cast<std::size_t>(d)] += a;
        }
        return;
      }
      case codec_kind::rot_l2: {
        // |y_i| <= ||x||_1 / sqrt(D) for every rotated coordinate whatever the signs, so the
        // rotated row's range is at most 2 ||x||_1 / sqrt(D); the per-element error (scale / 2)
        // over D elements has L2 norm <= ||x||_1 / qmax, and the rotation back keeps L2 norms.
        const float qmax = static_cast<float>((1 << c.bits) - 1);
        for (int j = 0; j < rn; ++j) {
          double l1 = 0;
          for (int d = 0; d < D; ++d) l1 += std::max(std::fabs(lo_of(j, d)), std::fabs(hi_of(j, d)));
          const float lim = static_cast<float>(l1 / std::sqrt(static_cast<double>(D)));
          const float step_l2 = std::sqrt(static_cast<float>(D)) * asym_add(-lim, lim, qmax);
          tok(j).l2[r] += step_l2 * (1.0f + 0x1p-7f) + static_cast<float>(l1) * 0x1p-14f;
        }
        return;
      }
      case codec_kind::gear_l2: {
        // Dense part: per-token asym over the row (outliers clamped into the others' range can
        // only shrink it), |R_td| <= scale_t / 2. The low-rank term is the truncated SVD of R,
        // R V V^T, whose row t leaves ||R_t (I - V V^T)|| <= ||R_t||. Factors are binary16 and the
        // eigenvectors approximate: a slack of 2^-5 ||R||_F of the record. Outlier entries keep
        // a binary16 correction: half_err of the largest magnitude in the row.
        const float qmax = static_cast<float>((1 << c.bits) - 1);
        std::vector<float> rt(static_cast<std::size_t>(u)), big(static_cast<std::size_t>(u));
        double rf2 = 0;
        for (int j = 0; j < u; ++j) {
          float lo = lo_of(j, 0), hi = hi_of(j, 0);
          for (int d = 1; d < D; ++d) lo = std::min(lo, lo_of(j, d)), hi = std::max(hi, hi_of(j, d));
          rt[static_cast<std::size_t>(j)] = std::sqrt(static_cast<float>(D)) * asym_add(lo, hi, qmax);
          big[static_cast<std::size_t>(j)] = std::max(std::fabs(lo), std::fabs(hi));
          rf2 += static_cast<double>(rt[static_cast<std::size_t>(j)]) * rt[static_cast<std::size_t>(j)];
        }
        const float rf = static_cast<float>(std::sqrt(rf2));
        for (int j = 0; j < rn; ++j)
          tok(j).l2[r] += rt[static_cast<std::size_t>(j)] + rf * 0x1p-5f +
                          std::sqrt(static_cast<float>(D)) * (4.0f * big[static_cast<std::size_t>(j)] * 0x1p-11f + 0x1p-20f);
        return;
      }
    }
  }

  /// Error of one asymmetric min/max encoding of values in [lo, hi]: zero = binary16 rounded
  /// down, scale = (hi - zero) / qmax rounded up (codec.hpp: "rounded outwards so that every
  /// element keeps |x - x^| <= scale / 2"), plus float rounding of the code and of s * c + z.
  static float asym_add(float lo, float hi, float qmax) {
    const float zero_slack = std::fabs(lo) * 0x1p-10f + 0x1p-24f;
    const float step = ((hi - lo) + zero_slack) / qmax * (1.0f + 0x1p-9f) + 0x1p-24f;
    return step * 0.5f * (1.0f + 0x1p-8f) + (std::fabs(hi) + std::fabs(lo)) * 0x1p-20f + 0x1p-30f;
  }
  /// Half the step of channel_affine::repack's grid: a power of two no larger than the first one
  /// >= (hi - lo) / (qmax - 1) (lo..hi round to at most qmax + 1 codes on any grid of that step)
  /// and >= max(|lo|, |hi|) / 1024 (then the zero's integer m is below 2^11, exact in binary16).
  static float dyadic_add(float lo, float hi, float qmax) {
    const double need = std::max(static_cast<double>(hi - lo) / (qmax - 1.0),
                                 std::max(std::fabs(static_cast<double>(lo)), std::fabs(static_cast<double>(hi))) / 1024.0);
    const double step = need > 0 ? std::ldexp(1.0, static_cast<int>(std::ceil(std::log2(need)))) : 0x1p-24;
    return static_cast<float>(step * 0.5 * (1.0 + 0x1p-8)) + (std::fabs(hi) + std::fabs(lo)) * 0x1p-20f + 0x1p-30f;
  }
  static float sym_add(float amax, float half_range) {
    const float step = amax / half_range * (1.0f + 0x1p-9f) + 0x1p-24f;
    return step * 0.5f * (1.0f + 0x1p-8f) + amax * 0x1p-19f + 0x1p-30f;
  }

  template <class Lo, class Hi>
  void per_token_add(const role_codec& c, Lo lo_of, Hi hi_of, float* add) const {
    const int D = this->D();
    auto amax_of = [&](int d0, int d1) {
      float a = 0;
      for (int d = d0; d < d1; ++d) a = std::max(a, std::max(std::fabs(lo_of(d)), std::fabs(hi_of(d))));
      return a;
    };
    auto asym_groups = [&](int bits, int group, const float* widen, float* out) {
      const int g = group == 0 ? D : group;
      const float qmax = static_cast<float>((1 << bits) - 1);
      for (int d0 = 0; d0 < D; d0 += g) {
        float lo = lo_of(d0) - widen[d0], hi = hi_of(d0) + widen[d0];
        for (int d = d0 + 1; d < d0 + g; ++d) lo = std::min(lo, lo_of(d) - widen[d]), hi = std::max(hi, hi_of(d) + widen[d]);
        const float a = asym_add(lo, hi, qmax);
        for (int d = d0; d < d0 + g; ++d) out[d] = a;
      }
    };
    std::vector<float> zero(static_cast<std::size_t>(D), 0.0f);
    switch (c.kind) {
      case codec_kind::tok_sym: {
        const float a = sym_add(amax_of(0, D), static_cast<float>((1 << (c.bits - 1)) - 1));
        for (int d = 0; d < D; ++d) add[d] = a;
        return;
      }
      case codec_kind::tok_asym:
        asym_groups(c.bits, c.channel_group, zero.data(), add);
        return;
      case codec_kind::fp8: {
        // scale s = max|x| / max_finite (float); a normal FP8 value is within 2^-(M+1) relative,
        // a subnormal one within half the subnormal spacing, 2^(-bias-M) * s.
        const float amax = amax_of(0, D);
        const float s = amax / c.fp8_max;
        const float rel = std::ldexp(1.0f, -(c.fp8_mant + 1)) * (1.0f + 0x1p-9f);
        const float sub = std::ldexp(s, -(c.fp8_bias + c.fp8_mant)) * (1.0f + 0x1p-9f);
        for (int d = 0; d < D; ++d)
          add[d] = std::max(std::fabs(lo_of(d)), std::fabs(hi_of(d))) * rel + sub + amax * 0x1p-19f + 0x1p-30f;
        return;
      }
      case codec_kind::mikv: {
        // High codec on the input; a demoted token is re-encoded by the low codec from its
        // decoded high value (mixed_precision_cache.hpp: err_HQ(x) + err_LQ on the decoded row).
        std::vector<float> hi_add(static_cast<std::size_t>(D));
        if (c.high_sym) {
          const float a = sym_add(amax_of(0, D), 127.0f);
          for (int d = 0; d < D; ++d) hi_add[static_cast<std::size_t>(d)] = a;
        } else {
          asym_groups(c.bits, 0, zero.data(), hi_add.data());
        }
        asym_groups(c.low_bits, 0, hi_add.data(), add);
        for (int d = 0; d < D; ++d) add[d] += hi_add[static_cast<std::size_t>(d)];
        return;
      }
      default:
        for (int d = 0; d < D; ++d) add[d] = 0;
        return;
    }
  }

  storage_desc d_;
  kvc::cache_config c_;
  page_counts counts_;
  std::map<seq_id, ref_seq> seqs_;
};

// ---- choosing a storage ----------------------------------------------------------------------

/// Record bytes of per-token affine codes (codec.hpp: [codes D*b/8][scale half x ng][zero half x ng]).
inline std::size_t token_affine_bytes(int D, int bits, bool zero, int group) {
  const int ng = group == 0 ? 1 : D / group;
  return static_cast<std::size_t>(D) * bits / 8 + static_cast<std::size_t>(ng) * 2 * (zero ? 2 : 1);
}
/// outliers<Q> and gear: ceil(fraction * entries) sparse entries of 4 bytes, with the fraction as
/// the spec parser hands it to the codec (a float).
inline int sparse_capacity(double fraction, int entries) {
  return static_cast<int>(std::ceil(static_cast<double>(static_cast<float>(fraction)) * entries - 1e-9));
}

struct choice {
  storage_desc d;
  kvc::cache_config c;
};

/// Reads the storage and shape from the input. The spec is built as text, as harnesses do.
inline choice choose(input& in) {
  choice ch;
  kvc::cache_config& c = ch.c;
  storage_desc& d = ch.d;
  c.num_layers = 1 + in.below(3);
  c.num_kv_heads = 1 + in.below(3);
  static const int pages[] = {1, 2, 4, 8, 16, 32, 64};
  c.page_size = in.pick(pages);
  c.max_pages = 1 + in.below(48);
  const int family = in.below(14);
  auto quant_common = [&](std::string& s, bool allow_sinks = true) {
    if (allow_sinks) {
      d.sinks = in.below(4) == 3 ? 1 + in.below(4) : 0;
      if (d.sinks > 0) s += (s.back() == '(' ? "" : ",") + cat("sinks=", d.sinks);
    }
    s += ")";
  };
  auto int_codec = [](int bits, bool sym) {
    role_codec r;
    r.kind = sym ? codec_kind::tok_sym : codec_kind::tok_asym;
    r.bits = bits;
    return r;
  };
  static const int small_dims[] = {8, 16, 24, 32};
  static const int pow2_dims[] = {8, 16, 32};
  std::string s;
  switch (family) {
    case 0:
    case 1:
    case 2: {
      static const char* names[] = {"fp32", "fp16", "bf16"};
      static const codec_kind kinds[] = {codec_kind::exact, codec_kind::fp16, codec_kind::bf16};
      static const int elem[] = {4, 2, 2};
      s = names[family];
      d.plain = true;
      d.k.kind = d.v.kind = kinds[family];
      static const int dims[] = {1, 3, 8, 16, 32};
      c.head_dim = in.pick(dims);
      d.page_bytes[main_pool] = round64(2u * static_cast<std::size_t>(elem[family]) * c.page_size * c.head_dim);
      break;
    }
    case 3:
    case 4:
    case 5: {
      const int bits = family == 3 ? 8 : family == 4 ? 4 : 2;
      const bool sym = bits == 8 && in.below(2) == 0;
      s = bits == 8 ? (sym ? "int8(" : "int8(scheme=asym") : cat("int", bits, "(");
      d.k = d.v = int_codec(bits, sym);
      c.head_dim = in.pick(small_dims);
      d.k.record_bytes = d.v.record_bytes = token_affine_bytes(c.head_dim, bits, !sym, 0);
      quant_common(s);
      break;
    }
    case 6: {
      const bool e4 = in.below(2) == 0;
      s = e4 ? "fp8(format=e4m3" : "fp8(format=e5m2";
      d.k.kind = codec_kind::fp8;
      d.k.fp8_mant = e4 ? 3 : 2;
      d.k.fp8_bias = e4 ? 7 : 15;
      d.k.fp8_max = e4 ? 448.0f : 57344.0f;
      c.head_dim = in.pick(small_dims);
      d.k.record_bytes = static_cast<std::size_t>(c.head_dim) + 4;
      d.v = d.k;
      quant_common(s);
      break;
    }
    case 7:
    case 8: {
      static const int pairs[][2] = {{2, 2}, {3, 3}, {4, 4}, {8, 8}, {4, 2}, {2, 4}};
      const auto& pr = in.pick(pairs);
      static const int residuals[] = {0, 32, 64, 128};
      d.residual = in.pick(residuals);
      s = cat("kivi(kbits=", pr[0], ",vbits=", pr[1], ",residual=", d.residual);
      c.head_dim = 32 * (1 + in.below(2));
      d.k.kind = codec_kind::chan_asym;
      d.k.bits = pr[0];
      d.k.tokens = 32;
      d.k.record_bytes = static_cast<std::size_t>(c.head_dim) * pr[0] / 8 * 32 + static_cast<std::size_t>(c.head_dim) * 4;
      d.v = int_codec(pr[1], false);
      d.v.channel_group = 32;
      d.v.record_bytes = token_affine_bytes(c.head_dim, pr[1], true, 32);
      quant_common(s);
      break;
    }
    case 9: {
      const int bits = in.below(2) == 0 ? 2 : 4;
      s = cat("rotated(bits=", bits);
      c.head_dim = in.pick(pow2_dims);
      d.k.kind = codec_kind::rot_l2;
      d.k.bits = bits;
      d.k.record_bytes = token_affine_bytes(c.head_dim, bits, true, 0);
      d.v = d.k;
      quant_common(s);
      break;
    }
    case 10: {
      const int bits = in.below(2) == 0 ? 2 : 4;
      static const double fr[] = {0.0, 0.01, 0.05, 0.25};
      const double f = in.pick(fr);
      s = cat("outliers(bits=", bits, ",fraction=", f);
      c.head_dim = in.pick(small_dims);
      d.k = int_codec(bits, false);  // dense part over the row; the sparse entries are binary16 of the input
      d.k.record_bytes = token_affine_bytes(c.head_dim, bits, true, 0) + 4u * static_cast<std::size_t>(sparse_capacity(f, c.head_dim));
      d.v = d.k;
      quant_common(s);
      break;
    }
    case 11: {
      const int bits = in.below(2) == 0 ? 2 : 4;
      const int rank = in.below(5);
      static const double fr[] = {0.0, 0.02, 0.1};
      const double f = in.pick(fr);
      s = cat("gear(bits=", bits, ",rank=", rank, ",outliers=", f);
      c.head_dim = in.pick(pow2_dims);
      d.k.kind = codec_kind::gear_l2;
      d.k.bits = bits;
      d.k.tokens = 32;
      // gear.hpp: Group * (D*Bits/8 + 4) + 2r(Group + D) + 4 * ceil(outliers * Group * D)
      d.k.record_bytes = 32u * token_affine_bytes(c.head_dim, bits, true, 0) + 2u * rank * (32u + c.head_dim) +
                         4u * static_cast<std::size_t>(sparse_capacity(f, 32 * c.head_dim));
      d.v = d.k;
      quant_common(s);
      break;
    }
    case 12:
    case 13: {
      static const int hl[][2] = {{8, 2}, {8, 4}, {4, 2}};
      const auto& p = in.pick(hl);
      static const double hr[] = {0.0, 0.2, 0.5, 1.0};
      static const double rr[] = {0.0, 0.5, 1.0};
      const double high = in.pick(hr), recent = in.pick(rr);  // in this order: arguments are unsequenced
      s = cat("mikv(hbits=", p[0], ",lbits=", p[1], ",high_ratio=", high, ",recent_ratio=", recent);
      d.mikv = true;
      d.forkable = false;
      d.k.kind = codec_kind::mikv;
      d.k.bits = p[0];
      d.k.high_sym = p[0] == 8;
      d.k.low_bits = p[1];
      d.v = d.k;
      c.head_dim = in.pick(small_dims);
      quant_common(s);
      break;
    }
  }
  d.spec = s;
  // The runtime rounds the page size up to whole units and scales the pool to the same bytes
  // (quant_storages.hpp); mikv and plain storages keep the harness's numbers.
  d.unit = std::lcm(d.k.tokens, d.v.tokens);
  d.page_size = c.page_size;
  d.q_max_pages = c.max_pages;
  if (!d.plain && !d.mikv) {
    while (d.page_size % d.unit != 0) d.page_size *= 2;
    d.q_max_pages = static_cast<int>(static_cast<std::int64_t>(c.max_pages) * c.page_size / d.page_size + 1);
    d.page_bytes[main_pool] =
        round64(d.k.record_bytes * static_cast<std::size_t>(d.page_size / d.k.tokens) +
                d.v.record_bytes * static_cast<std::size_t>(d.page_size / d.v.tokens));
    const int res_cap = d.residual + d.unit - 1;
    d.page_bytes[res_pool] = res_cap > 0 ? round64(2u * 2u * static_cast<std::size_t>(res_cap) * c.head_dim) : 0;
    d.page_bytes[sink_pool] = d.sinks > 0 ? round64(2u * 2u * static_cast<std::size_t>(d.sinks) * c.head_dim) : 0;
  }
  d.fp_max_pages = c.max_pages;
  d.capacity[main_pool] = d.q_max_pages;
  d.capacity[res_pool] = d.capacity[sink_pool] = d.fp_max_pages;
  return ch;
}

// ---- the cache as observed -------------------------------------------------------------------

/// Everything observable about the cache, for the strong-guarantee check (bit for bit).
struct snapshot {
  struct stream_obs {
    std::vector<std::int32_t> pos;
    std::vector<float> k, v;
  };
  std::map<seq_id, std::vector<stream_obs>> seqs;
  std::map<seq_id, std::vector<std::int32_t>> seen;
  std::size_t bytes = 0, meta = 0;
  std::vector<std::size_t> layer_bytes;
  std::int64_t tokens = 0;

  bool operator==(const snapshot& o) const {
    if (seqs.size() != o.seqs.size() || seen != o.seen || bytes != o.bytes || meta != o.meta ||
        layer_bytes != o.layer_bytes || tokens != o.tokens)
      return false;
    for (const auto& kv : seqs) {
      auto it = o.seqs.find(kv.first);
      if (it == o.seqs.end() || it->second.size() != kv.second.size()) return false;
      for (std::size_t i = 0; i < kv.second.size(); ++i) {
        const auto& a = kv.second[i];
        const auto& b = it->second[i];
        // bit for bit: a NaN that stayed NaN is unchanged
        if (a.pos != b.pos || a.k.size() != b.k.size() || a.v.size() != b.v.size() ||
            (!a.k.empty() && std::memcmp(a.k.data(), b.k.data(), a.k.size() * sizeof(float)) != 0) ||
            (!a.v.empty() && std::memcmp(a.v.data(), b.v.data(), a.v.size() * sizeof(float)) != 0))
          return false;
      }
    }
    return true;
  }
};

inline snapshot observe(const any_cache& c, const std::vector<seq_id>& ids) {
  snapshot s;
  const auto& cfg = c.config();
  const int H = cfg.num_kv_heads, D = cfg.head_dim;
  for (seq_id id : ids) {
    if (!c.contains(id)) continue;
    auto& v = s.seqs[id];
    auto& seen = s.seen[id];
    for (int l = 0; l < cfg.num_layers; ++l) {
      seen.push_back(c.seen(id, l));
      for (int h = 0; h < H; ++h) {
        snapshot::stream_obs o;
        const int L = c.length(id, l, h);
        SF_CHECK(L >= 0, "length(", id, ", ", l, ", ", h, ") = ", L);
        const std::int32_t* p = c.positions(id, l, h);
        if (L > 0) {
          SF_CHECK(p != nullptr, "positions() is null with length ", L);
          o.pos.assign(p, p + L);
        }
        o.k.resize(static_cast<std::size_t>(L) * D);
        o.v.resize(static_cast<std::size_t>(L) * D);
        c.gather(id, l, h, o.k.data(), o.v.data());
        v.push_back(std::move(o));
      }
    }
  }
  s.bytes = c.bytes_in_use();
  s.meta = c.metadata_bytes();
  for (int l = 0; l < cfg.num_layers; ++l) s.layer_bytes.push_back(c.bytes_in_use(l));
  s.tokens = c.tokens_held();
  return s;
}

// ---- the run ---------------------------------------------------------------------------------

using kvc_fuzz::name;
using kvc_fuzz::outcome;

class runner {
 public:
  runner(const choice& ch, std::unique_ptr<any_cache> c) : m_(ch.d, ch.c), cfg_(ch.c), c_(std::move(c)) {}

  void run(input& in) {
    check_config();
    snap_ = verify();
    const int max_ops = 40;
    for (int op = 0; op < max_ops && !in.empty(); ++op) {
      ctx().op_index = op;
      step(in);
    }
  }

 private:
  int L() const { return cfg_.num_layers; }
  int H() const { return cfg_.num_kv_heads; }
  int D() const { return cfg_.head_dim; }
  const storage_desc& d() const { return m_.desc(); }

  std::string family() const { return d().spec.substr(0, d().spec.find('(')); }

  std::vector<seq_id> ids() const {
    std::vector<seq_id> v;
    for (const auto& kv : const_cast<model&>(m_).seqs()) v.push_back(kv.first);
    return v;
  }

  void check_config() {
    const auto& got = c_->config();
    SF_CHECK(got.num_layers == cfg_.num_layers && got.num_kv_heads == cfg_.num_kv_heads && got.head_dim == cfg_.head_dim,
             "config() shape differs from the one asked for");
    SF_CHECK(got.page_size == d().page_size, "config().page_size = ", got.page_size, ", expected ", d().page_size);
    if (!d().mikv)
      SF_CHECK(got.max_pages == d().q_max_pages, "config().max_pages = ", got.max_pages, ", expected ", d().q_max_pages);
    SF_CHECK(c_->bytes_in_use() == 0 && c_->tokens_held() == 0, "a new cache holds bytes or tokens");
  }

  /// Compares the cache with the reference; returns the observation for the next failure check.
  snapshot verify() {
    const std::vector<seq_id> all = ids();
    snapshot s = observe(*c_, all);
    SF_CHECK(s.seqs.size() == all.size(), "the cache holds ", s.seqs.size(), " of the model's ", all.size(), " sequences");
    std::int64_t tokens = 0;
    for (seq_id id : all) {
      ref_seq& rs = m_.seqs().at(id);
      SF_CHECK(s.seen.at(id) == rs.seen, "seen() of sequence ", id, " differs from the appended counts");
      for (int l = 0; l < L(); ++l)
        for (int h = 0; h < H(); ++h) check_stream(id, l, h, m_.at(rs, l, h), s.seqs.at(id)[static_cast<std::size_t>(l * H() + h)]);
      for (const auto& st : rs.st) {
        tokens += st.length();
        if (st.n_quant > 0) count(family() + " verify: stream with quantized tokens");
        if (st.n_res > 0) count(family() + " verify: stream with residual tokens");
        if (st.n_sink > 0) count(family() + " verify: stream with sink tokens");
        for (const auto& t : st.t)
          if (t.e[0].size() && (t.e[0][0] > 0 || t.l2[0] > 0)) {
            count(family() + " verify: lossy tokens checked");
            break;
          }
      }
    }
    SF_CHECK(s.tokens == tokens, "tokens_held() = ", s.tokens, ", expected ", tokens);
    std::size_t sum = 0;
    for (std::size_t b : s.layer_bytes) sum += b;
    SF_CHECK(sum == s.bytes, "bytes_in_use() = ", s.bytes, " but the layers sum to ", sum);
    if (!d().mikv) {
      SF_CHECK(s.bytes == m_.bytes(), "bytes_in_use() = ", s.bytes, ", expected ", m_.bytes(), " (pages: main ",
               m_.counts().total(0), ", residual ", m_.counts().total(1), ", sink ", m_.counts().total(2), ")");
      for (int l = 0; l < L(); ++l)
        SF_CHECK(s.layer_bytes[static_cast<std::size_t>(l)] == m_.bytes(l), "bytes_in_use(", l, ") = ",
                 s.layer_bytes[static_cast<std::size_t>(l)], ", expected ", m_.bytes(l));
    }
    if (all.empty()) SF_CHECK(s.bytes == 0, "no sequence left but bytes_in_use() = ", s.bytes);
    return s;
  }

  void check_stream(seq_id id, int l, int h, const ref_stream& r, const snapshot::stream_obs& o) {
    const int n = r.length();
    SF_CHECK(static_cast<int>(o.pos.size()) == n, "length(", id, ", ", l, ", ", h, ") = ", o.pos.size(), ", expected ", n);
    for (int i = 0; i < n; ++i)
      SF_CHECK(o.pos[static_cast<std::size_t>(i)] == r.t[static_cast<std::size_t>(i)].pos, "positions(", id, ", ", l, ", ", h,
               ")[", i, "] = ", o.pos[static_cast<std::size_t>(i)], ", expected ", r.t[static_cast<std::size_t>(i)].pos);
    const bool l2 = d().k.kind == codec_kind::rot_l2 || d().k.kind == codec_kind::gear_l2;
    for (int i = 0; i < n; ++i) {
      const ref_token& t = r.t[static_cast<std::size_t>(i)];
      for (int role = 0; role < 2; ++role) {
        const float* got = (role == 0 ? o.k : o.v).data() + static_cast<std::size_t>(i) * D();
        const char* rn = role == 0 ? "K" : "V";
        if (d().k.kind == codec_kind::exact) {
          for (int dd = 0; dd < D(); ++dd)
            SF_CHECK(got[dd] == t.x[role][static_cast<std::size_t>(dd)], rn, "(", id, ", ", l, ", ", h, ")[", i, "][", dd,
                     "] = ", got[dd], ", expected exactly ", t.x[role][static_cast<std::size_t>(dd)]);
          continue;
        }
        if (l2) {
          // Elementwise part (binary16 rounding) in L2 plus the codec's L2 bound.
          double err2 = 0, e2 = 0;
          for (int dd = 0; dd < D(); ++dd) {
            const double df = static_cast<double>(got[dd]) - t.x[role][static_cast<std::size_t>(dd)];
            err2 += df * df;
            e2 += static_cast<double>(t.e[role][static_cast<std::size_t>(dd)]) * t.e[role][static_cast<std::size_t>(dd)];
            SF_CHECK(std::isfinite(got[dd]), rn, "(", id, ", ", l, ", ", h, ")[", i, "][", dd, "] = ", got[dd]);
          }
          const double lim = std::sqrt(e2) + t.l2[role];
          SF_CHECK(std::sqrt(err2) <= lim, rn, "(", id, ", ", l, ", ", h, ")[", i, "] is ", std::sqrt(err2),
                   " from the original in L2, bound ", lim, " (position ", t.pos, ")");
          continue;
        }
        for (int dd = 0; dd < D(); ++dd) {
          const float want = t.x[role][static_cast<std::size_t>(dd)];
          const float lim = model::bound(t, role, dd);
          SF_CHECK(std::fabs(got[dd] - want) <= lim, rn, "(", id, ", ", l, ", ", h, ")[", i, "][", dd, "] = ", got[dd],
                   ", expected ", want, " +- ", lim, " (position ", t.pos, ")");
        }
      }
    }
  }

  /// Runs `call` against the predicted outcome; on failure checks the cache is unchanged.
  template <class Call>
  outcome expect(outcome want, bool may_oom, Call&& call) {
    // Where the model cannot predict exhaustion (mikv), success and out_of_memory are both fine.
    std::string what;
    const outcome got = kvc_fuzz::classify(call, cat(family(), " ", ctx().op.substr(0, ctx().op.find('('))), what);
    // An invalid call must say so, not report exhaustion (mikv once planned its demotions before
    // checking the input: tests/runtime/test_storage_model.cpp has the reproducer).
    const bool fine = got == want || (may_oom && want == outcome::ok && got == outcome::oom);
    SF_CHECK(fine, "expected ", name(want), ", got ", name(got), what.empty() ? "" : ": ", what);
    if (got != outcome::ok) {
      const snapshot after = observe(*c_, ids());
      SF_CHECK(after == snap_, "a call that threw (", what, ") changed the cache");
    }
    return got;
  }

  seq_id pick_seq(input& in) {
    const std::vector<seq_id> v = ids();
    // Now and then an id that does not exist (never added, or removed).
    // (rare choices are the largest values: an exhausted input reads zeros and gets ordinary calls)
    if (v.empty() || in.below(16) == 15) return in.below(2) == 0 ? next_id_ + in.below(3) : -1 - in.below(2);
    return v[static_cast<std::size_t>(in.below(static_cast<int>(v.size())))];
  }
  bool known(seq_id s) { return m_.seqs().count(s) != 0; }

  void step(input& in) {
    const int op = in.below(16);
    switch (op) {
      case 0:
      case 1: op_add(); break;
      case 2: op_remove(in); break;
      case 3: op_fork(in); break;
      case 4:
      case 5:
      case 6:
      case 7: op_append(in); break;
      case 8:
      case 9:
      case 10: op_keep(in); break;
      case 11: op_keep_layer(in); break;
      case 12: op_attention(in); break;
      case 13: op_bad_args(in); break;
      case 14: op_rewind(in); break;
      default: op_share(in); break;
    }
  }

  void op_add() {
    ctx().op = "add_sequence";
    if (m_.seqs().size() >= 4) return;
    seq_id id = -1;
    expect(outcome::ok, false, [&] { id = c_->add_sequence(); });
    SF_CHECK(!known(id), "add_sequence returned ", id, ", which is live");
    next_id_ = std::max(next_id_, id + 1);
    m_.add(id);
    snap_ = verify();
  }

  void op_remove(input& in) {
    const seq_id s = pick_seq(in);
    ctx().op = cat("remove_sequence(", s, ")");
    if (expect(known(s) ? outcome::ok : outcome::error, false, [&] { c_->remove_sequence(s); }) == outcome::ok) m_.remove(s);
    snap_ = verify();
  }

  void op_fork(input& in) {
    const seq_id s = pick_seq(in);
    ctx().op = cat("fork(", s, ")");
    if (m_.seqs().size() >= 4) return;
    seq_id id = -1;
    const outcome want = known(s) && d().forkable ? outcome::ok : outcome::error;
    if (expect(want, false, [&] { id = c_->fork(s); }) == outcome::ok) {
      SF_CHECK(!known(id), "fork returned ", id, ", which is live");
      next_id_ = std::max(next_id_, id + 1);
      m_.fork(s, id);
    }
    snap_ = verify();
  }

  /// share_layer, now and then with a bad layer pair; storages that cannot fork cannot share.
  void op_share(input& in) {
    const seq_id s = pick_seq(in);
    const int layer = in.below(L());
    int from = in.below(L());
    if (in.below(16) == 15) from = in.below(2) == 0 ? L() + in.below(2) : -1 - in.below(2);
    ctx().op = cat("share_layer(", s, ", layer ", layer, ", from ", from, ")");
    const bool valid = known(s) && from >= 0 && from < L() && from != layer;
    const auto allocated = c_->traffic().bytes_allocated;
    if (expect(valid && d().forkable ? outcome::ok : outcome::error, false,
               [&] { c_->share_layer(s, layer, from); }) == outcome::ok) {
      count(family() + " share_layer");
      m_.share(m_.seqs().at(s), layer, from);
      SF_CHECK(c_->traffic().bytes_allocated == allocated, "share_layer allocated ",
               c_->traffic().bytes_allocated - allocated, " bytes, expected none");
    }
    snap_ = verify();
  }

  /// K/V values of one append: a few shapes of data (centred or offset, tiny to large scales,
  /// constant rows whose range is 0) and, now and then, one NaN or infinity.
  void make_values(input& in, int n, std::vector<float>& k, std::vector<float>& v, bool& bad) {
    const std::size_t m = static_cast<std::size_t>(n) * H() * D();
    k.resize(m);
    v.resize(m);
    rng g{(static_cast<std::uint64_t>(in.u16()) << 16) | 0x5bd1u};
    static const float scales[] = {1.0f, 0.01f, 3.0f, 100.0f, 1e-6f, 2000.0f};
    const float scale = in.pick(scales);
    const int shape = in.below(6);
    const float offset = shape == 1 ? scale * 4.0f : shape == 2 ? -scale * 7.0f : 0.0f;
    for (std::size_t i = 0; i < m; ++i) {
      if (shape == 3) {
        k[i] = v[i] = offset + scale * 0.5f;  // constant: scale 0 in every codec
      } else if (shape == 4) {
        // occasional outliers, 100x the rest
        // (x100 only up to scale 100: values stay inside binary16's range, 65504)
        const float big = scale <= 100.0f ? 100.0f : 1.0f;
        k[i] = offset + scale * g.uniform() * ((g.next() & 31) == 0 ? big : 1.0f);
        v[i] = offset + scale * g.uniform() * ((g.next() & 31) == 0 ? big : 1.0f);
      } else {
        k[i] = offset + scale * g.uniform();
        v[i] = offset + scale * g.uniform();
      }
    }
    bad = in.below(12) == 11;
    if (bad) {
      const float vals[] = {std::nanf(""), INFINITY, -INFINITY};
      auto& dst = in.below(2) == 0 ? k : v;
      dst[static_cast<std::size_t>(in.below(static_cast<int>(m)))] = vals[in.below(3)];
    }
  }

  void op_append(input& in) {
    const seq_id s = pick_seq(in);
    const int layer = in.below(L());
    static const int counts[] = {1, 1, 1, 2, 3, 5, 8, 16, 31, 32, 33, 40, 64};
    int n = in.pick(counts);
    std::vector<float> k, v;
    bool bad = false;
    make_values(in, n, k, v, bad);
    // positions: null (the next ones), or given (arbitrary, even repeated or negative: the cache
    // stores what it is told)
    const bool given = in.below(4) == 3;
    std::vector<std::int32_t> pos(static_cast<std::size_t>(n));
    if (given)
      for (auto& p : pos) p = static_cast<std::int32_t>(in.u16()) - 100;
    ctx().op = cat("append(", s, ", layer ", layer, ", n ", n, given ? ", positions" : "", bad ? ", non-finite" : "", ")");
    outcome want = outcome::ok;
    int need[3] = {0, 0, 0};
    if (!known(s) || bad) {
      want = outcome::error;
    } else {
      ref_seq& rs = m_.seqs().at(s);
      // Streams stay short so a run stays fast.
      for (int h = 0; h < H(); ++h)
        if (m_.at(rs, layer, h).length() + n > 256) return;
      if (!given)
        for (int i = 0; i < n; ++i) pos[static_cast<std::size_t>(i)] = rs.seen[static_cast<std::size_t>(layer)] + i;
      if (!d().mikv) {
        m_.append_need(rs, layer, n, need);
        for (int p = 0; p < 3; ++p)
          if (need[p] > m_.free_pages(p)) want = outcome::oom;
      }
    }
    const std::size_t before = c_->bytes_in_use();
    const outcome got =
        expect(want, d().mikv, [&] { c_->append(s, layer, k.data(), v.data(), n, given ? pos.data() : nullptr); });
    if (got == outcome::ok) {
      m_.append_commit(m_.seqs().at(s), layer, k.data(), v.data(), n, pos);
      if (d().mikv && !shrunk_.count({s, layer})) {
        // mikv_storage.hpp: after every append the stream's high-precision budget holds; bytes
        // come from two pools, so only the direction is known: an append never frees memory.
        // Unless a keep shortened the layer since its last append: keep does not demote, so the
        // next append demotes the high tokens the shorter stream's budget no longer has room for,
        // which can free more high-precision pages than the new tokens and low ones take.
        SF_CHECK(c_->bytes_in_use() >= before, "mikv append shrank bytes_in_use() from ", before, " to ", c_->bytes_in_use());
      }
      shrunk_.erase({s, layer});
    }
    snap_ = verify();
  }

  /// A kept set for a stream of length Ln: valid (strictly increasing, in range) unless `bad`.
  std::vector<std::int32_t> make_kept(input& in, int Ln, bool& bad) {
    std::vector<std::int32_t> k;
    const int mode = in.below(10);
    switch (mode) {
      case 0: break;                                                 // keep nothing
      case 1: for (int i = 0; i < Ln; ++i) k.push_back(i); break;    // keep all
      case 2: for (int i = 0; i < Ln - 1; ++i) k.push_back(i); break;  // drop the newest
      case 3: for (int i = 1; i < Ln; ++i) k.push_back(i); break;    // drop the oldest
      case 4: for (int i = 0; i < Ln; i += 2) k.push_back(i); break;
      default: {
        const int keep_pct = in.below(101);
        rng g{in.u16() * 0x9E37ull + 7};
        for (int i = 0; i < Ln; ++i)
          if (static_cast<int>(g.next() % 100) < keep_pct) k.push_back(i);
      }
    }
    bad = in.below(10) == 9;
    if (bad) {
      switch (in.below(5)) {
        case 0: k.push_back(Ln + in.below(3)); break;  // out of range
        case 1: k.insert(k.begin(), -1 - in.below(3)); break;
        case 2:
          if (k.size() < 2) k = {0, 0};  // duplicate
          else std::swap(k[0], k[1]);    // unsorted
          break;
        case 3:
          if (k.empty()) k = {0, 0};
          else k.push_back(k.back());    // duplicate at the end
          break;
        default:
          if (Ln == 0) k = {0};          // out of range on an empty stream
          else {
            k.push_back(Ln - 1);
            std::sort(k.begin(), k.end());
            k.push_back(Ln - 1);         // duplicate of the last
          }
      }
    }
    return k;
  }

  void do_keep(seq_id s, int layer, const std::vector<std::pair<int, std::vector<std::int32_t>>>& heads, bool bad,
               bool as_layer, const std::vector<std::vector<std::int32_t>>& raw) {
    outcome want = outcome::ok;
    bool was_shared = true;
    if (!known(s) || bad) {
      want = outcome::error;
    } else if (!d().mikv) {
      int need[3];
      m_.keep_need(m_.seqs().at(s), layer, heads, need);
      for (int p = 0; p < 3; ++p)
        if (need[p] > m_.free_pages(p)) want = outcome::oom;
    }
    if (want == outcome::ok) was_shared = m_.any_shared(m_.seqs().at(s), layer, heads);
    const std::size_t before = c_->bytes_in_use();
    const outcome got = expect(want, d().mikv, [&] {
      if (as_layer) c_->keep_layer(s, layer, raw);
      else c_->keep(s, layer, heads[0].first, raw[0].data(), static_cast<std::int32_t>(raw[0].size()));
    });
    if (got == outcome::ok) {
      m_.keep_commit(m_.seqs().at(s), layer, heads);
      shrunk_.insert({s, layer});
      // quant_cache.hpp: keep "never needs a page that the stream did not have" unless it is
      // shared (issue 16: keeping 63 of 64 KIVI-2 tokens once tripled the stream's bytes).
      if (!was_shared) {
        count(family() + " keep: unshared, bytes must not grow");
        SF_CHECK(c_->bytes_in_use() <= before, "keep on unshared pages grew bytes_in_use() from ", before, " to ",
                 c_->bytes_in_use());
      }
    }
    snap_ = verify();
  }

  void op_keep(input& in) {
    const seq_id s = pick_seq(in);
    const int layer = in.below(L());
    const int head = in.below(H());
    const int Ln = known(s) ? m_.at(m_.seqs().at(s), layer, head).length() : 4;
    bool bad = false;
    std::vector<std::int32_t> k = make_kept(in, Ln, bad);
    ctx().op = cat("keep(", s, ", layer ", layer, ", head ", head, ", ", k.size(), " of ", Ln, bad ? ", invalid" : "", ")");
    do_keep(s, layer, {{head, k}}, bad, false, {k});
  }

  void op_keep_layer(input& in) {
    const seq_id s = pick_seq(in);
    const int layer = in.below(L());
    std::vector<std::vector<std::int32_t>> raw;
    std::vector<std::pair<int, std::vector<std::int32_t>>> heads;
    bool any_bad = false;
    for (int h = 0; h < H(); ++h) {
      const int Ln = known(s) ? m_.at(m_.seqs().at(s), layer, h).length() : 4;
      bool bad = false;
      raw.push_back(make_kept(in, Ln, bad));
      any_bad = any_bad || bad;
      heads.emplace_back(h, raw.back());
    }
    if (in.below(16) == 15) {  // wrong number of heads
      if (raw.size() > 1 && in.below(2) == 0) raw.pop_back();
      else raw.emplace_back();
      any_bad = true;
    }
    ctx().op = cat("keep_layer(", s, ", layer ", layer, any_bad ? ", invalid" : "", ")");
    do_keep(s, layer, heads, any_bad, true, raw);
  }

  /// rewind (kv_cache.hpp, quant_cache.hpp): each head keeps its tokens at positions < n, seen
  /// becomes n. With positions in append order the kept tokens are a prefix, which the
  /// documentation says moves nothing and needs no page; positions given out of order (this
  /// harness appends some) make it an ordinary keep. mikv cannot rewind (any_cache.hpp).
  void op_rewind(input& in) {
    const seq_id s = pick_seq(in);
    const int layer = in.below(L());
    const int seen = known(s) ? m_.seqs().at(s).seen[static_cast<std::size_t>(layer)] : 4;
    int n = in.below(seen + 1);
    if (in.below(16) == 15) n = in.below(2) == 0 ? seen + 1 + in.below(3) : -1 - in.below(3);
    ctx().op = cat("rewind(", s, ", layer ", layer, ", n ", n, " of ", seen, ")");
    std::vector<std::pair<int, std::vector<std::int32_t>>> heads;
    bool prefix = true;
    if (known(s))
      for (int h = 0; h < H(); ++h) {
        const ref_stream& st = m_.at(m_.seqs().at(s), layer, h);
        std::vector<std::int32_t> kept;
        for (int t = 0; t < st.length(); ++t)
          if (st.t[static_cast<std::size_t>(t)].pos < n) {
            prefix = prefix && t == static_cast<int>(kept.size());
            kept.push_back(t);
          }
        heads.emplace_back(h, std::move(kept));
      }
    outcome want = known(s) && !d().mikv && n >= 0 && n <= seen ? outcome::ok : outcome::error;
    if (want == outcome::ok) {
      int need[3];
      m_.keep_need(m_.seqs().at(s), layer, heads, need);
      for (int p = 0; p < 3; ++p) {
        SF_CHECK(!prefix || need[p] == 0, "the model's rewind of a prefix needs ", need[p], " pages of pool ", p,
                 ", expected none");
        if (need[p] > m_.free_pages(p)) want = outcome::oom;
      }
    }
    const auto allocated = c_->traffic().bytes_allocated;
    const outcome got = expect(want, false, [&] { c_->rewind(s, layer, n); });
    if (got == outcome::ok) {
      count(family() + (prefix ? " rewind" : " rewind: positions out of order"));
      m_.keep_commit(m_.seqs().at(s), layer, heads);
      m_.seqs().at(s).seen[static_cast<std::size_t>(layer)] = n;
      SF_CHECK(!prefix || c_->traffic().bytes_allocated == allocated, "rewind of a prefix allocated ",
               c_->traffic().bytes_allocated - allocated, " bytes, expected none");
    }
    snap_ = verify();
  }

  /// Decode attention against a softmax over the cache's own gather(): the kernels must read
  /// the same tokens the gather reads (the gather itself is checked against the reference).
  void op_attention(input& in) {
    const seq_id s = pick_seq(in);
    const int layer = in.below(L());
    const int group = 1 + in.below(2);
    const int nq = H() * group;
    ctx().op = cat("attention(", s, ", layer ", layer, ", ", nq, " query heads)");
    std::vector<float> q(static_cast<std::size_t>(nq) * D()), out(q.size(), 0.0f);
    rng g{in.u16() * 31ull + 1};
    for (auto& x : q) x = g.uniform();
    // decode_attention.hpp: a head with no token gives zeros (the softmax over nothing), but a
    // layer whose kv heads all hold 0 tokens is an error (this step's K/V were never appended).
    bool any_token = false;
    if (known(s))
      for (int h = 0; h < H(); ++h) any_token = any_token || m_.at(m_.seqs().at(s), layer, h).length() > 0;
    if (known(s) && !any_token) count(family() + " attention: empty layer");
    const outcome got = expect(known(s) && any_token ? outcome::ok : outcome::error, false,
                               [&] { c_->attention(s, layer, q.data(), nq, out.data(), {}); });
    if (got == outcome::ok) {
      const float scale = 1.0f / std::sqrt(static_cast<float>(D()));
      for (int qh = 0; qh < nq; ++qh) {
        const int h = qh / group;
        const auto& o = snap_.seqs.at(s)[static_cast<std::size_t>(layer * H() + h)];
        const int n = static_cast<int>(o.pos.size());
        if (n == 0) {
          count(family() + " attention: empty head");
          for (int dd = 0; dd < D(); ++dd)
            SF_CHECK(out[static_cast<std::size_t>(qh * D() + dd)] == 0.0f, "attention out[", qh, "][", dd, "] = ",
                     out[static_cast<std::size_t>(qh * D() + dd)], ", expected 0 (kv head ", h, " holds no token)");
          continue;
        }
        const kvc_fuzz::attention_ref ref =
            kvc_fuzz::attend(q.data() + static_cast<std::size_t>(qh * D()), o.k.data(), o.v.data(), n, D(), scale);
        for (int dd = 0; dd < D(); ++dd) {
          const double want = ref.out[static_cast<std::size_t>(dd)];
          const float gotv = out[static_cast<std::size_t>(qh * D() + dd)];
          SF_CHECK(std::fabs(gotv - want) <= 2e-3 * ref.vmax + 1e-6, "attention out[", qh, "][", dd, "] = ", gotv,
                   ", expected ", want, " from gather() (", n, " tokens)");
        }
      }
    }
    snap_ = verify();  // mikv accumulates scores here; nothing observable may change
  }

  /// Bad layer, head, count or sequence on every entry point: kvc::error, cache unchanged.
  void op_bad_args(input& in) {
    const seq_id s = known(pick_seq(in)) ? pick_seq(in) : -1;
    const int bad_layer = in.below(2) == 0 ? -1 : L();
    const int bad_head = in.below(2) == 0 ? -1 : H();
    std::vector<float> kv(static_cast<std::size_t>(H()) * D(), 1.0f);
    std::vector<float> buf(static_cast<std::size_t>(257) * D());
    const int which = in.below(6);
    ctx().op = cat("bad arguments #", which, " on sequence ", s);
    switch (which) {
      case 0: expect(outcome::error, false, [&] { c_->append(s, bad_layer, kv.data(), kv.data(), 1); }); break;
      case 1:
        if (known(s)) expect(outcome::error, false, [&] { c_->append(s, 0, kv.data(), kv.data(), -1); });
        break;
      case 2: {
        const std::int32_t k0 = 0;
        expect(outcome::error, false, [&] { c_->keep(s, bad_layer, 0, &k0, 0); });
        break;
      }
      case 3: {
        const std::int32_t k0 = 0;
        expect(outcome::error, false, [&] { c_->keep(s, 0, bad_head, &k0, 0); });
        break;
      }
      case 4: expect(outcome::error, false, [&] { c_->gather(s, 0, bad_head, buf.data(), buf.data()); }); break;
      default: expect(outcome::error, false, [&] { (void)c_->length(s, bad_layer, 0); }); break;
    }
    snap_ = verify();
  }

  model m_;
  kvc::cache_config cfg_;
  std::unique_ptr<any_cache> c_;
  snapshot snap_;
  seq_id next_id_ = 0;
  std::set<std::pair<seq_id, int>> shrunk_;  ///< (sequence, layer) kept since its last append
};

inline int run_one(const std::uint8_t* data, std::size_t size) {
  input in(data, size);
  const choice ch = choose(in);
  ctx() = kvc_fuzz::context{};
  ctx().tool = "storagefuzz";
  ctx().spec = ch.d.spec;
  std::unique_ptr<any_cache> c;
  try {
    c = kvc::runtime::make_cache(ch.d.spec, ch.c);
  } catch (const kvc::error& e) {
    fail_check(cat("make_cache refused a valid spec: ", e.what()));
  }
  runner r(ch, std::move(c));
  r.run(in);
  return 0;
}

}  // namespace storagefuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return storagefuzz::run_one(data, size);
}
