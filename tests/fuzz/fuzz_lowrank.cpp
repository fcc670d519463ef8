// SPDX-License-Identifier: Apache-2.0
/// \file
/// Differential fuzzer of the low-rank storages (issue 12): `pca`, `palu`, `think` and `xkv`
/// (runtime/lowrank_storages.hpp, runtime/xkv_storage.hpp), built by spec as an engine builds them.
///
/// The input's first bytes choose the storage, its arguments (ranks, centring, sinks, pre-RoPE
/// keys, the coefficient storage: fp16, fp32 or int8 pages) and a small cache shape with a pool of
/// a few pages; the rest is a sequence of operations on one `runtime::any_cache`: add / remove /
/// fork a sequence, append (with NaN now and then), the end-of-prompt call (`observe_window`,
/// where ThinK prunes channels and xKV moves a group to its latents), keep and keep_layer (valid
/// and invalid index lists), rewind, decode attention (with probabilities now and then), and calls
/// with a bad layer, head or sequence.
///
/// What is checked after every call, with the reference kept here (not read from the cache):
///   - the outcome: an append of finite rows to a live sequence may fail only with out_of_memory
///     (or, for pca's first append of a layer, with an error when it has fewer rows than the
///     rank); a non-finite append, an invalid keep list, a bad layer / head / sequence and a
///     rewind must be refused with kvc::error; nothing else may be thrown;
///   - a refused call leaves the cache bit for bit as it was (positions, seen, every gathered row,
///     bytes_in_use in total and per layer): the strong guarantee;
///   - positions, lengths and seen() follow the reference (appends add consecutive positions,
///     keep selects, fork copies; observe_window changes representation, never positions);
///   - rows a call does not re-encode stay bit for bit: every call but observe_window leaves the
///     rows the stream already had unchanged (mapped through keep), since these storages never
///     re-encode a stored token (coefficients per token; int8 rows per token);
///   - at full rank (pca rank = vrank = head_dim, xkv rank = vrank = the group's width, think
///     ratio = vratio = 0, post-RoPE keys), gather() gives back the appended rows within the
///     coefficients' rounding (relative 4e-3 for fp16 and fp32 coefficients, 3e-2 for int8);
///   - decode attention equals a double softmax over gather()'s rows (what the storage says it
///     holds), and its probabilities that softmax's;
///   - the per-layer bytes add up to the total, and once every sequence is removed the pool holds
///     nothing.

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
#include <string>
#include <vector>

#include <kvc/attention/rope.hpp>
#include <kvc/error.hpp>
#include <kvc/runtime/any_cache.hpp>
#include <kvc/runtime/lowrank_storages.hpp>  // pca, palu, think
#include <kvc/runtime/make_cache.hpp>
#include <kvc/runtime/xkv_storage.hpp>  // xkv

#include "fuzz_support.hpp"

// Storage headers register nothing by being included (runtime/make_cache.hpp): the storages this
// file builds by spec are registered here, in its own ISA configuration, before any test runs.
[[maybe_unused]] static const bool storages_registered =
    (kvc::runtime::register_lowrank_storages(), kvc::runtime::register_xkv_storage(), true);

namespace lowrankfuzz {

using kvc::seq_id;
using kvc::runtime::any_cache;
using kvc_fuzz::cat;
using kvc_fuzz::count;
using kvc_fuzz::ctx;
using kvc_fuzz::fail_check;
using kvc_fuzz::input;
using kvc_fuzz::name;
using kvc_fuzz::outcome;
using kvc_fuzz::rng;
using kvc_fuzz::throw_on_failure;

enum class family { pca, palu, think, xkv };
inline const char* family_name(family f) {
  switch (f) {
    case family::pca: return "pca";
    case family::palu: return "palu";
    case family::think: return "think";
    default: return "xkv";
  }
}

/// The storage and the shape an input asks for, and what the reference needs to know of them.
struct choice {
  family fam = family::pca;
  std::string spec;
  kvc::cache_config c;
  int num_q_heads = 1;
  bool full_rank = false;     ///< gather() gives back the appended rows (within coef_tol)
  float coef_tol = 4e-3f;     ///< relative error of a full-rank row (coefficient rounding)
  int min_first_append = 0;   ///< pca: rows the first append of a layer needs to fit its bases
  int weights_in = 0;         ///< palu: columns of the synthetic W_k / W_v
};

inline choice choose(input& in) {
  choice ch;
  ch.fam = static_cast<family>(in.u8() % 4);
  kvc::cache_config& c = ch.c;
  static const int dims[] = {8, 16, 32};
  static const int pages[] = {4, 8, 16};
  c.num_layers = 1 + in.below(3);
  c.num_kv_heads = 1 + in.below(2);
  c.head_dim = in.pick(dims);
  c.page_size = in.pick(pages);
  c.max_pages = 4 + in.below(60);
  ch.num_q_heads = c.num_kv_heads * (1 + in.below(3));
  const int D = c.head_dim;
  static const char* const coefs[] = {"fp16", "fp32", "int8"};
  const auto tol_of = [](const std::string& coef) { return coef == "int8" ? 3e-2f : 4e-3f; };
  switch (ch.fam) {
    case family::pca: {
      const int ranks[] = {1, D / 4, D / 2, D, D};
      const int rank = in.pick(ranks);
      const int vrank = in.below(3) == 0 ? rank : in.pick(ranks);
      const int center = in.below(3) == 0 ? 1 : 0;
      const int pre_rope = in.below(3) == 0 ? 1 : 0;
      const int sinks = in.below(std::min(std::min(rank, vrank), 2) + 1);
      const std::string coef = in.pick(coefs);
      ch.spec = cat("pca(rank=", rank, ",vrank=", vrank, ",center=", center, ",pre_rope=", pre_rope, ",sinks=", sinks,
                    ",coef=", coef, ")");
      ch.full_rank = rank == D && vrank == D && pre_rope == 0;
      ch.coef_tol = tol_of(coef);
      ch.min_first_append = std::max(rank, vrank);
      break;
    }
    case family::palu: {
      const int ranks[] = {D / 4, D / 2, D};
      const int rank = in.pick(ranks);
      const int vrank = in.below(2) == 0 ? rank : in.pick(ranks);
      const std::string coef = in.pick(coefs);
      ch.spec = cat("palu(rank=", rank, ",vrank=", vrank, ",coef=", coef, ")");
      ch.weights_in = D + in.below(D + 1);  // at least D columns: a basis of full rank exists
      ch.coef_tol = tol_of(coef);
      break;
    }
    case family::think: {
      static const char* const ratios[] = {"0", "0.125", "0.25", "0.5", "0.75"};
      static const char* const vratios[] = {"0", "0", "0.25", "0.5"};
      static const int windows[] = {1, 2, 8, 32};
      const std::string r = in.pick(ratios), vr = in.pick(vratios);
      const std::string coef = in.below(2) == 0 ? "fp16" : "fp32";
      ch.spec = cat("think(ratio=", r, ",vratio=", vr, ",window=", in.pick(windows), ",coef=", coef, ")");
      ch.full_rank = r == "0" && vr == "0";
      break;
    }
    case family::xkv: {
      const int group = 1 + in.below(c.num_layers);
      const int last = c.num_layers % group == 0 ? group : c.num_layers % group;
      const int width = group * c.num_kv_heads * D, min_width = last * c.num_kv_heads * D;
      const int ranks[] = {1, std::max(1, min_width / 4), std::max(1, min_width / 2), min_width, min_width};
      const int rank = in.pick(ranks);
      const int vrank = in.below(3) == 0 ? rank : in.pick(ranks);
      const int pre_rope = in.below(3) == 0 ? 1 : 0;
      const int sinks = in.below(std::min(std::min(rank, vrank), 2) + 1);
      const std::string latent = in.pick(coefs);
      ch.spec = cat("xkv(group=", group, ",rank=", rank, ",vrank=", vrank, ",pre_rope=", pre_rope, ",sinks=", sinks,
                    ",latent=", latent, ")");
      ch.full_rank = rank == width && vrank == width && pre_rope == 0;
      ch.coef_tol = tol_of(latent);
      break;
    }
  }
  return ch;
}

/// One (layer, kv head) stream: positions and the rows gather() gave at the last check, which of
/// them must still be bit for bit the same, and the rows as appended (the full-rank check).
struct stream {
  std::vector<std::int32_t> pos;
  std::vector<float> k, v;        ///< gathered, [len][D]
  std::vector<char> known;        ///< [len]: k/v must equal what the cache gathers now
  std::vector<float> xk, xv;      ///< appended, [len][D]
};
struct seq_state {
  std::vector<std::int32_t> seen;  ///< [layer]
  std::vector<stream> s;           ///< [layer * H + head]
};
struct pool_state {
  std::size_t total = 0;
  std::vector<std::size_t> layer;
  bool operator==(const pool_state& o) const { return total == o.total && layer == o.layer; }
};

class runner {
 public:
  runner(const choice& ch, std::unique_ptr<any_cache> c, std::vector<std::vector<float>> weights)
      : ch_(ch), c_(std::move(c)), weights_(std::move(weights)) {
    pool_ = read_pool();
  }

  void run(input& in) {
    for (int i = 0; i < 96 && !in.empty(); ++i) {
      ctx().op_index = i;
      step(in);
    }
    ctx().op = "remove every sequence";
    std::vector<seq_id> ids;
    for (const auto& kv : st_) ids.push_back(kv.first);
    for (seq_id s : ids) expect_ok([&] { c_->remove_sequence(s); });
    st_.clear();
    SF_CHECK(c_->bytes_in_use() == 0, "bytes_in_use() = ", c_->bytes_in_use(), " with no sequence, expected 0");
    for (int l = 0; l < L(); ++l)
      SF_CHECK(c_->bytes_in_use(l) == 0, "bytes_in_use(", l, ") = ", c_->bytes_in_use(l), " with no sequence, expected 0");
  }

 private:

  int L() const { return ch_.c.num_layers; }
  int H() const { return ch_.c.num_kv_heads; }
  int D() const { return ch_.c.head_dim; }
  std::size_t row() const { return static_cast<std::size_t>(D()); }

  pool_state read_pool() const {
    pool_state p;
    p.total = c_->bytes_in_use();
    std::size_t sum = 0;
    for (int l = 0; l < L(); ++l) {
      p.layer.push_back(c_->bytes_in_use(l));
      sum += p.layer.back();
    }
    SF_CHECK(sum == p.total, "bytes_in_use(layer) sum to ", sum, ", bytes_in_use() = ", p.total);
    return p;
  }

  /// What the cache says it holds now, for every sequence the reference knows.
  std::map<seq_id, seq_state> read() const {
    std::map<seq_id, seq_state> out;
    for (const auto& [id, ref] : st_) {
      SF_CHECK(c_->contains(id), "sequence ", id, " vanished");
      seq_state& o = out[id];
      for (int l = 0; l < L(); ++l) o.seen.push_back(c_->seen(id, l));
      o.s.resize(static_cast<std::size_t>(L() * H()));
      for (int l = 0; l < L(); ++l)
        for (int h = 0; h < H(); ++h) {
          stream& t = o.s[static_cast<std::size_t>(l * H() + h)];
          const int n = c_->length(id, l, h);
          SF_CHECK(n >= 0, "length(", id, ", ", l, ", ", h, ") = ", n);
          const std::int32_t* p = c_->positions(id, l, h);
          SF_CHECK(n == 0 || p != nullptr, "positions() is null with length ", n);
          t.pos.assign(p, p + n);
          t.k.assign(static_cast<std::size_t>(n) * row(), 0.0f);
          t.v.assign(static_cast<std::size_t>(n) * row(), 0.0f);
          if (n > 0) c_->gather(id, l, h, t.k.data(), t.v.data());
        }
    }
    return out;
  }

  /// The reference against the cache: positions, seen, lengths exactly; rows marked known bit
  /// for bit; at full rank every row within the coefficients' rounding of the appended one.
  /// Then the gathered rows become the reference's.
  void check(bool rows_must_match) {
    std::map<seq_id, seq_state> now = read();
    for (auto& [id, ref] : st_) {
      seq_state& got = now.at(id);
      SF_CHECK(got.seen == ref.seen, "seen() of sequence ", id, " differs from the reference");
      for (int l = 0; l < L(); ++l)
        for (int h = 0; h < H(); ++h) {
          stream& r = ref.s[static_cast<std::size_t>(l * H() + h)];
          stream& g = got.s[static_cast<std::size_t>(l * H() + h)];
          SF_CHECK(g.pos == r.pos, "positions of (seq ", id, ", layer ", l, ", head ", h, "): length ", g.pos.size(),
                   ", expected ", r.pos.size(), " (or the same length, other positions)");
          for (std::size_t t = 0; t < r.pos.size(); ++t) {
            for (int d = 0; d < D(); ++d) {
              const std::size_t i = t * row() + static_cast<std::size_t>(d);
              SF_CHECK(!std::isnan(g.k[i]) && !std::isnan(g.v[i]), "gather() gave NaN at token ", t, " channel ", d);
              if (rows_must_match && r.known[t])
                SF_CHECK(std::memcmp(&g.k[i], &r.k[i], sizeof(float)) == 0 && std::memcmp(&g.v[i], &r.v[i], sizeof(float)) == 0,
                         "row ", t, " of (seq ", id, ", layer ", l, ", head ", h, ") changed at channel ", d, ": k ", r.k[i],
                         " -> ", g.k[i], ", v ", r.v[i], " -> ", g.v[i], " (a call that does not re-encode it)");
            }
            if (ch_.full_rank) full_rank_row(r, g, t);
          }
          r.k = std::move(g.k);
          r.v = std::move(g.v);
          r.known.assign(r.pos.size(), 1);
        }
    }
    pool_ = read_pool();
  }
  void full_rank_row(const stream& r, const stream& g, std::size_t t) const {
    for (int role = 0; role < 2; ++role) {
      const float* want = (role == 0 ? r.xk : r.xv).data() + t * row();
      const float* have = (role == 0 ? g.k : g.v).data() + t * row();
      double norm = 0;
      for (int d = 0; d < D(); ++d) norm += static_cast<double>(want[d]) * want[d];
      norm = std::sqrt(norm);
      for (int d = 0; d < D(); ++d)
        SF_CHECK(std::fabs(static_cast<double>(have[d]) - want[d]) <= ch_.coef_tol * norm + 1e-6, "full rank: token ", t,
                 (role == 0 ? " key" : " value"), " channel ", d, " gathered ", have[d], ", appended ", want[d],
                 " (row norm ", norm, ")");
    }
  }

  /// Runs a call and classifies it. A refused call must leave the cache as it was.
  template <class Call>
  outcome run_call(Call&& call, std::string* what_out = nullptr) {
    std::string what;
    const outcome got =
        kvc_fuzz::classify(call, cat(family_name(ch_.fam), " ", ctx().op.substr(0, ctx().op.find(' '))), what);
    if (got != outcome::ok) {
      SF_CHECK(what.rfind("kvc::", 0) == 0, "an error message that does not name the call: ", what);
      check(true);  // bit for bit as before
      SF_CHECK(read_pool() == pool_, "a refused call (", what, ") changed bytes_in_use");
    }
    if (what_out) *what_out = what;
    return got;
  }
  template <class Call>
  void expect_ok(Call&& call) {
    std::string what;
    const outcome o = run_call(call, &what);
    SF_CHECK(o == outcome::ok, "expected success, got ", name(o), ": ", what);
  }
  template <class Call>
  void expect_error(Call&& call) {
    std::string what;
    const outcome o = run_call(call, &what);
    SF_CHECK(o == outcome::error, "expected kvc::error, got ", name(o), what.empty() ? "" : ": ", what);
  }

  seq_id pick_seq(input& in) {
    // Now and then an id that does not exist (never added, or removed); the rare choices are the
    // largest values, so an exhausted input makes ordinary calls.
    if (st_.empty() || in.below(16) == 15) return in.below(2) == 0 ? next_id_ + in.below(3) : -1 - in.below(2);
    auto it = st_.begin();
    std::advance(it, in.below(static_cast<int>(st_.size())));
    return it->first;
  }
  bool known(seq_id s) const { return st_.count(s) != 0; }

  void step(input& in) {
    // Most calls need a live sequence: without one, add one first (now and then, not).
    if (st_.empty() && in.below(8) != 7) op_add();
    switch (in.below(16)) {
      case 0: op_add(); break;
      case 1:
      case 2:
      case 3:
      case 4: op_append(in); break;
      case 5:
      case 6: op_observe(in); break;
      case 7: op_keep(in); break;
      case 8: op_keep_layer(in); break;
      case 9: op_fork(in); break;
      case 10: op_remove(in); break;
      case 11:
      case 12: op_attention(in); break;
      case 13: op_rewind(in); break;
      case 14: op_bad_args(in); break;
      default: op_add(); break;
    }
  }

  void op_add() {
    ctx().op = "add_sequence";
    seq_id id = -1;
    expect_ok([&] { id = c_->add_sequence(); });
    SF_CHECK(!known(id), "add_sequence returned a live id ", id);
    seq_state& s = st_[id];
    s.seen.assign(static_cast<std::size_t>(L()), 0);
    s.s.resize(static_cast<std::size_t>(L() * H()));
    next_id_ = std::max(next_id_, id + 1);
    check(true);
  }

  void op_remove(input& in) {
    const seq_id s = pick_seq(in);
    ctx().op = cat("remove_sequence ", s);
    if (!known(s)) return expect_error([&] { c_->remove_sequence(s); });
    expect_ok([&] { c_->remove_sequence(s); });
    st_.erase(s);
    SF_CHECK(!c_->contains(s), "sequence ", s, " still live after remove_sequence");
    check(true);
  }

  void op_fork(input& in) {
    const seq_id s = pick_seq(in);
    ctx().op = cat("fork ", s);
    seq_id id = -1;
    if (!known(s)) return expect_error([&] { id = c_->fork(s); });
    if (run_call([&] { id = c_->fork(s); }) != outcome::ok) return;
    SF_CHECK(!known(id), "fork returned a live id ", id);
    st_[id] = st_.at(s);  // the same tokens, positions and rows
    next_id_ = std::max(next_id_, id + 1);
    check(true);
  }

  void op_append(input& in) {
    const seq_id s = pick_seq(in);
    const int layer = in.below(L());
    const int n = 1 + in.below(2 * ch_.c.page_size + 4);
    const bool nan = in.below(16) == 15;
    rng g{in.u16() * 0x9E3779B97F4A7C15ull + 1};
    const float amp = in.below(4) == 3 ? 8.0f : 1.0f;
    std::vector<float> k(static_cast<std::size_t>(n) * H() * row()), v(k.size());
    for (auto& x : k) x = amp * g.uniform();
    for (auto& x : v) x = amp * g.uniform();
    if (nan) (in.below(2) == 0 ? k : v)[static_cast<std::size_t>(in.below(static_cast<int>(k.size())))] = std::nanf("");
    ctx().op = cat("append ", n, " to (seq ", s, ", layer ", layer, ")", nan ? " with a NaN" : "");
    if (!known(s) || nan) return expect_error([&] { c_->append(s, layer, k.data(), v.data(), n); });
    seq_state& st = st_.at(s);
    const bool unfitted = ch_.fam == family::pca && !fitted_layer(layer);
    if (unfitted && n < ch_.min_first_append) return expect_error([&] { c_->append(s, layer, k.data(), v.data(), n); });
    std::string what;
    const outcome o = run_call([&] { c_->append(s, layer, k.data(), v.data(), n); }, &what);
    SF_CHECK(o != outcome::error, "a finite append was refused as invalid: ", what);
    if (o != outcome::ok) return;
    if (unfitted) fitted_.push_back(layer);
    const std::int32_t p0 = st.seen[static_cast<std::size_t>(layer)];
    for (int h = 0; h < H(); ++h) {
      stream& t = st.s[static_cast<std::size_t>(layer * H() + h)];
      for (int i = 0; i < n; ++i) {
        t.pos.push_back(p0 + i);
        t.known.push_back(0);
        const std::size_t off = (static_cast<std::size_t>(i) * H() + h) * row();
        t.xk.insert(t.xk.end(), k.begin() + static_cast<std::ptrdiff_t>(off), k.begin() + static_cast<std::ptrdiff_t>(off + row()));
        t.xv.insert(t.xv.end(), v.begin() + static_cast<std::ptrdiff_t>(off), v.begin() + static_cast<std::ptrdiff_t>(off + row()));
        t.k.insert(t.k.end(), row(), 0.0f);
        t.v.insert(t.v.end(), row(), 0.0f);
      }
    }
    st.seen[static_cast<std::size_t>(layer)] += n;
    check(true);
  }
  /// pca fits a layer's bases on its first append that stores rows, for every sequence after.
  bool fitted_layer(int layer) const { return std::find(fitted_.begin(), fitted_.end(), layer) != fitted_.end(); }

  void op_observe(input& in) {
    const seq_id s = pick_seq(in);
    const int layer = in.below(L());
    const int qw = c_->query_window();
    int n = qw > 0 ? 1 + in.below(std::min(qw, 8)) : 1 + in.below(2);
    int nq = ch_.num_q_heads;
    const int bad = in.below(16);
    if (bad == 14) n = 0;
    if (bad == 15) nq = H() > 1 ? H() + 1 : 0;  // not a positive multiple of num_kv_heads
    rng g{in.u16() + 7ull};
    std::vector<float> q(static_cast<std::size_t>(std::max(n, 1)) * nq * row());
    for (auto& x : q) x = g.uniform();
    ctx().op = cat("observe_window ", n, " queries of (seq ", s, ", layer ", layer, ")");
    // Storages with no query window ignore the call, whatever its arguments (any_cache::observe_window).
    if (!known(s) && qw > 0) return expect_error([&] { c_->observe_window(s, layer, q.data(), n, nq); });
    // A valid window may still be refused (xkv: a group whose streams hold different tokens, or
    // fewer prompt tokens than the ranks for the first fit); refused or not, positions stay.
    if (run_call([&] { c_->observe_window(s, layer, q.data(), n, nq); }) != outcome::ok) return;
    check(false);  // a representation change: rows may move to their low-rank form, never positions
  }

  /// A kept-index list for a stream of n: valid (sorted, distinct, in range) or, rarely, not.
  std::vector<std::int32_t> kept_list(input& in, int n, bool& valid) {
    std::vector<std::int32_t> kept;
    const int mode = in.below(8);
    for (int i = 0; i < n; ++i)
      if (mode == 0 || (mode < 6 && in.below(3) != 0) || (mode == 6 && i < n / 2)) kept.push_back(i);
    valid = true;
    if (in.below(16) == 15) {
      valid = false;
      switch (in.below(3)) {
        case 0: kept.push_back(n + in.below(3)); break;  // out of range
        case 1: kept.insert(kept.begin(), -1); break;
        default:
          if (kept.size() >= 2) std::swap(kept[0], kept[1]);  // unsorted
          else kept.assign({0, 0});                           // duplicated
      }
    }
    return kept;
  }
  void apply_keep(stream& t, const std::vector<std::int32_t>& kept) {
    stream o;
    for (std::int32_t i : kept) {
      const std::size_t a = static_cast<std::size_t>(i) * row();
      o.pos.push_back(t.pos[static_cast<std::size_t>(i)]);
      o.known.push_back(t.known[static_cast<std::size_t>(i)]);
      for (auto [dst, src] : {std::pair{&o.k, &t.k}, {&o.v, &t.v}, {&o.xk, &t.xk}, {&o.xv, &t.xv}})
        dst->insert(dst->end(), src->begin() + static_cast<std::ptrdiff_t>(a), src->begin() + static_cast<std::ptrdiff_t>(a + row()));
    }
    t = std::move(o);
  }

  void op_keep(input& in) {
    const seq_id s = pick_seq(in);
    const int layer = in.below(L()), head = in.below(H());
    const int n = known(s) ? static_cast<int>(st_.at(s).s[static_cast<std::size_t>(layer * H() + head)].pos.size()) : 4;
    bool valid = true;
    const std::vector<std::int32_t> kept = kept_list(in, n, valid);
    ctx().op = cat("keep ", kept.size(), " of ", n, " in (seq ", s, ", layer ", layer, ", head ", head, ")", valid ? "" : ", invalid");
    const auto call = [&] { c_->keep(s, layer, head, kept.data(), static_cast<std::int32_t>(kept.size())); };
    if (!known(s) || !valid) return expect_error(call);
    // xkv refuses a keep that drops a latent token; fork-shared pages may need a copy.
    if (run_call(call) != outcome::ok) return;
    apply_keep(st_.at(s).s[static_cast<std::size_t>(layer * H() + head)], kept);
    check(true);
  }

  void op_keep_layer(input& in) {
    const seq_id s = pick_seq(in);
    const int layer = in.below(L());
    std::vector<std::vector<std::int32_t>> kept(static_cast<std::size_t>(H()));
    bool all_valid = true;
    for (int h = 0; h < H(); ++h) {
      const int n = known(s) ? static_cast<int>(st_.at(s).s[static_cast<std::size_t>(layer * H() + h)].pos.size()) : 4;
      bool valid = true;
      kept[static_cast<std::size_t>(h)] = kept_list(in, n, valid);
      all_valid = all_valid && valid;
    }
    ctx().op = cat("keep_layer (seq ", s, ", layer ", layer, ")", all_valid ? "" : ", invalid");
    const auto call = [&] { c_->keep_layer(s, layer, kept); };
    if (!known(s) || !all_valid) return expect_error(call);
    if (run_call(call) != outcome::ok) return;
    for (int h = 0; h < H(); ++h) apply_keep(st_.at(s).s[static_cast<std::size_t>(layer * H() + h)], kept[static_cast<std::size_t>(h)]);
    check(true);
  }

  void op_rewind(input& in) {
    const seq_id s = pick_seq(in);
    const int layer = in.below(L());
    const int n = in.below(8);
    ctx().op = cat("rewind (seq ", s, ", layer ", layer, ") to ", n);
    // No low-rank storage can rewind (a basis fitted on the dropped tokens would stay).
    SF_CHECK(!c_->can_rewind(), "can_rewind() is true for a low-rank storage");
    expect_error([&] { c_->rewind(s, layer, n); });
  }

  void op_attention(input& in) {
    const seq_id s = pick_seq(in);
    const int layer = in.below(L());
    const int nq = ch_.num_q_heads, G = nq / H();
    const bool want_probs = in.below(4) == 0;
    rng g{in.u16() + 11ull};
    std::vector<float> q(static_cast<std::size_t>(nq) * row());
    for (auto& x : q) x = 2.0f * g.uniform();
    std::vector<float> out(q.size(), -7.0f), lse(static_cast<std::size_t>(nq), -7.0f);
    ctx().op = cat("attention (seq ", s, ", layer ", layer, ")", want_probs ? " with probs" : "");
    if (!known(s)) return expect_error([&] { c_->attention(s, layer, q.data(), nq, out.data(), {}); });
    const seq_state& st = st_.at(s);
    int longest = 0;
    for (int h = 0; h < H(); ++h) longest = std::max(longest, static_cast<int>(st.s[static_cast<std::size_t>(layer * H() + h)].pos.size()));
    std::vector<float> probs(static_cast<std::size_t>(nq) * std::max(longest, 1), -7.0f);
    kvc::decode_options opt;
    opt.lse = lse.data();
    if (want_probs) {
      opt.probs = probs.data();
      opt.probs_stride = std::max(longest, 1);
    }
    std::string what;
    const outcome o = run_call([&] { c_->attention(s, layer, q.data(), nq, out.data(), opt); }, &what);
    // Refusals the storages document: xkv gives no probabilities; an empty layer has nothing to attend.
    const bool may_refuse = longest == 0 || (want_probs && ch_.fam == family::xkv);
    SF_CHECK(o == outcome::ok || (o == outcome::error && may_refuse), "attention: ", name(o), ": ", what);
    if (o != outcome::ok) return;
    const double scale = 1.0 / std::sqrt(static_cast<double>(D()));
    for (int qh = 0; qh < nq; ++qh) {
      const stream& t = st.s[static_cast<std::size_t>(layer * H() + qh / G)];
      const int n = static_cast<int>(t.pos.size());
      const float* o_row = out.data() + static_cast<std::size_t>(qh) * row();
      if (n == 0) {
        for (int d = 0; d < D(); ++d) SF_CHECK(o_row[d] == 0.0f, "attention out[", qh, "][", d, "] = ", o_row[d], " over an empty head");
        continue;
      }
      const kvc_fuzz::attention_ref ref =
          kvc_fuzz::attend(q.data() + static_cast<std::size_t>(qh) * row(), t.k.data(), t.v.data(), n, D(), scale);
      for (int d = 0; d < D(); ++d)
        SF_CHECK(std::fabs(o_row[d] - ref.out[static_cast<std::size_t>(d)]) <= 2e-3 * ref.vmax + 1e-6, "attention out[", qh,
                 "][", d, "] = ", o_row[d], ", expected ", ref.out[static_cast<std::size_t>(d)], " from gather()'s ", n, " rows");
      SF_CHECK(std::fabs(lse[static_cast<std::size_t>(qh)] - ref.lse) <= 2e-3 * (1 + std::fabs(ref.lse)), "lse[", qh, "] = ",
               lse[static_cast<std::size_t>(qh)], ", expected ", ref.lse);
      if (want_probs)
        for (int i = 0; i < n; ++i) {
          const double p = ref.p[static_cast<std::size_t>(i)];
          const float gp = probs[static_cast<std::size_t>(qh) * opt.probs_stride + i];
          SF_CHECK(std::fabs(gp - p) <= 2e-3 * p + 1e-5, "probs[", qh, "][", i, "] = ", gp, ", expected ", p);
        }
    }
    check(true);  // reading changes nothing
  }

  /// Bad layer, head or sequence on every entry point: kvc::error, cache unchanged.
  void op_bad_args(input& in) {
    const seq_id s = pick_seq(in);
    const int bad_layer = in.below(2) == 0 ? -1 : L();
    const int bad_head = in.below(2) == 0 ? -1 : H();
    std::vector<float> kv(static_cast<std::size_t>(H()) * row() * 32, 0.5f);
    const int which = in.below(6);
    ctx().op = cat("bad arguments #", which, " on sequence ", s);
    const std::int32_t k0 = 0;
    switch (which) {
      case 0: expect_error([&] { c_->append(s, bad_layer, kv.data(), kv.data(), 1); }); break;
      case 1:
        if (known(s)) expect_error([&] { c_->append(s, 0, kv.data(), kv.data(), -1); });
        break;
      case 2: expect_error([&] { c_->keep(s, bad_layer, 0, &k0, 0); }); break;
      case 3: expect_error([&] { c_->keep(s, 0, bad_head, &k0, 0); }); break;
      case 4:  // storages with no query window ignore the call (any_cache::observe_window)
        if (c_->query_window() > 0) expect_error([&] { c_->observe_window(s, bad_layer, kv.data(), 1, H()); });
        break;
      default: expect_error([&] { (void)c_->length(s, bad_layer, 0); }); break;
    }
  }

  choice ch_;
  std::unique_ptr<any_cache> c_;
  std::vector<std::vector<float>> weights_;  ///< palu's W_k, W_v per layer: alive as long as the cache
  std::map<seq_id, seq_state> st_;
  pool_state pool_;
  std::vector<int> fitted_;
  seq_id next_id_ = 0;
};

inline int run_one(const std::uint8_t* data, std::size_t size) {
  input in(data, size);
  const choice ch = choose(in);
  ctx() = kvc_fuzz::context{};
  ctx().tool = "lowrankfuzz";
  ctx().spec = ch.spec;
  kvc::rope_config rope;
  rope.head_dim = ch.c.head_dim;
  // palu's synthetic weights: [num_layers] matrices of (H * D) rows and `in` columns.
  std::vector<std::vector<float>> w;
  kvc::runtime::projection_weights pw;
  if (ch.fam == family::palu) {
    rng g{in.u16() + 3ull};
    pw.in = ch.weights_in;
    for (int m = 0; m < 2 * ch.c.num_layers; ++m) {
      w.emplace_back(static_cast<std::size_t>(ch.c.num_kv_heads) * ch.c.head_dim * ch.weights_in);
      for (auto& x : w.back()) x = g.uniform();
    }
    for (int l = 0; l < ch.c.num_layers; ++l) {
      pw.wk.push_back(w[static_cast<std::size_t>(2 * l)].data());
      pw.wv.push_back(w[static_cast<std::size_t>(2 * l + 1)].data());
    }
  }
  kvc::runtime::storage_options so;
  so.rope = &rope;
  so.weights = ch.fam == family::palu ? &pw : nullptr;
  std::unique_ptr<any_cache> c;
  try {
    c = kvc::runtime::make_cache(ch.spec, ch.c, so);
  } catch (const kvc::error& e) {
    fail_check(cat("make_cache refused a valid spec: ", e.what()));
  }
  runner r(ch, std::move(c), std::move(w));
  r.run(in);
  return 0;
}

}  // namespace lowrankfuzz

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  return lowrankfuzz::run_one(data, size);
}
