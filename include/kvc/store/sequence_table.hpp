// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// `detail::sequence_table`: the sequences of a paged store, with the checks every public call of
/// a store makes (a live sequence id, a layer, a kv-head) and errors that name the store, the call,
/// the value and what was expected. kv_cache, quant_cache and mixed_precision_cache keep their
/// sequences here, so that bookkeeping exists once (issue 11); each store's Sequence type holds
/// what it keeps per sequence (`streams`, [layer * num_kv_heads + head], for get/at).

#include <cstddef>
#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include <kvc/error.hpp>
#include <kvc/types.hpp>

KVC_BEGIN_NAMESPACE

namespace detail {

/// \tparam Sequence  what a store keeps per sequence; get/at need a `streams` vector indexed by
///                   layer * num_kv_heads + head
template <class Sequence>
class sequence_table {
 public:
  using map_type = std::map<seq_id, Sequence>;

  /// \param owner  the store's qualified name, which starts every message ("kvc::kv_cache")
  sequence_table(const char* owner, std::int32_t num_layers, std::int32_t num_kv_heads) noexcept
      : owner_(owner), num_layers_(num_layers), num_kv_heads_(num_kv_heads) {}

  /// Inserts s under the next id and returns the id. Strong guarantee: on a throw, no id is used.
  seq_id add(Sequence s) {
    const seq_id id = next_id_;
    add_as(id, std::move(s));
    return id;
  }
  /// Inserts s under `id` (a store whose ids come from an inner store's); the next id of add()
  /// moves past it. Strong guarantee.
  void add_as(seq_id id, Sequence s) {
    KVC_EXPECTS_IN(owner_, seqs_.count(id) == 0, "sequence id ", id, " is live, expected a new id");
    seqs_.emplace(id, std::move(s));  // may throw; nothing changed
    if (id >= next_id_) next_id_ = id + 1;
  }
  void erase(seq_id s) noexcept { seqs_.erase(s); }

  bool contains(seq_id s) const noexcept { return seqs_.count(s) != 0; }
  std::size_t size() const noexcept { return seqs_.size(); }
  typename map_type::const_iterator begin() const noexcept { return seqs_.begin(); }
  typename map_type::const_iterator end() const noexcept { return seqs_.end(); }

  /// The sequence s; unknown ids throw "<owner>::<fn>: unknown sequence id ..." with the live ids.
  Sequence& find(seq_id s, const char* fn) { return const_cast<Sequence&>(std::as_const(*this).find(s, fn)); }
  const Sequence& find(seq_id s, const char* fn) const {
    auto it = seqs_.find(s);
    if (it == seqs_.end())
      fail(concat(owner_, "::", fn, ": unknown sequence id ", s, " (argument seq), expected a live sequence id: ",
                  key_list(seqs_)));
    return it->second;
  }

  void check_layer(std::int32_t layer, const char* fn) const {
    if (layer < 0 || layer >= num_layers_)
      fail(concat(owner_, "::", fn, ": layer = ", layer, ", expected 0..", num_layers_ - 1));
  }
  /// The per-layer arguments of a keep_layer_rewrite (kv_cache's, quant_cache's): one kept list
  /// per kv head and, when given, rows[h] strictly increasing kept indices of head h, so every row
  /// a caller asks to rewrite names a kept token. The plan's checks; the kept lists themselves are
  /// the store's keep to check. Returns the heads as keep's (head, kept) pairs.
  std::vector<std::pair<std::int32_t, std::vector<std::int32_t>>> rewrite_heads(
      const char* who, const std::vector<std::vector<std::int32_t>>& kept,
      const std::vector<std::vector<std::int32_t>>* rows) const {
    KVC_EXPECTS_IN(who, static_cast<std::int32_t>(kept.size()) == num_kv_heads_, "kept.size() = ", kept.size(),
                   ", expected num_kv_heads = ", num_kv_heads_);
    KVC_EXPECTS_IN(who, !rows || rows->size() == kept.size(), "rows->size() = ", rows ? rows->size() : 0,
                   ", expected num_kv_heads = ", num_kv_heads_);
    for (std::size_t h = 0; rows && h < kept.size(); ++h) {
      const auto& r = (*rows)[h];
      for (std::size_t i = 0; i < r.size(); ++i) {
        KVC_EXPECTS_IN(who, r[i] >= 0 && static_cast<std::size_t>(r[i]) < kept[h].size(), "rows[", h, "][", i,
                       "] = ", r[i], ", expected a kept index 0..", static_cast<std::int64_t>(kept[h].size()) - 1);
        KVC_EXPECTS_IN(who, i == 0 || r[i] > r[i - 1], "rows[", h, "][", i, "] = ", r[i], " after ", r[i - 1],
                       ", expected strictly increasing kept indices");
      }
    }
    std::vector<std::pair<std::int32_t, std::vector<std::int32_t>>> all;
    all.reserve(kept.size());
    for (std::int32_t h = 0; h < num_kv_heads_; ++h) all.emplace_back(h, kept[static_cast<std::size_t>(h)]);
    return all;
  }
  void check_head(std::int32_t head, const char* fn) const {
    if (head < 0 || head >= num_kv_heads_)
      fail(concat(owner_, "::", fn, ": head = ", head, ", expected 0..", num_kv_heads_ - 1));
  }

  /// The sequence s for share_layer(s, layer, from), after its checks in order: layer, then from
  /// (in range, another layer), then s.
  Sequence& find_share(seq_id s, std::int32_t layer, std::int32_t from, const char* fn) {
    check_layer(layer, fn);
    if (from < 0 || from >= num_layers_)
      fail(concat(owner_, "::", fn, ": from = ", from, ", expected 0..", num_layers_ - 1));
    if (from == layer) fail(concat(owner_, "::", fn, ": from = ", from, " = layer, expected another layer"));
    return find(s, fn);
  }
  /// Copies of every kv head's entry of one layer in a per-stream vector ([layer * num_kv_heads +
  /// head]: a sequence's streams, or what a store keeps beside them): what share_layer gives
  /// another layer. May throw std::bad_alloc, changing nothing.
  template <class Stream>
  std::vector<Stream> copy_layer(const std::vector<Stream>& streams, std::int32_t layer) const {
    return std::vector<Stream>(streams.begin() + static_cast<std::ptrdiff_t>(index(layer, 0)),
                               streams.begin() + static_cast<std::ptrdiff_t>(index(layer + 1, 0)));
  }

  /// The sum of fn(stream) over every stream of every sequence (tokens held, bookkeeping bytes).
  template <class R, class Fn>
  R sum_streams(Fn&& fn) const {
    R r = 0;
    for (const auto& kv : seqs_)
      for (const auto& st : kv.second.streams) r += static_cast<R>(fn(st));
    return r;
  }

  /// Index of (layer, head) in a sequence's streams.
  std::size_t index(std::int32_t layer, std::int32_t head) const noexcept {
    return static_cast<std::size_t>(layer) * static_cast<std::size_t>(num_kv_heads_) + static_cast<std::size_t>(head);
  }
  /// Stream (layer, head) of a sequence found already (layer and head checked by the caller).
  auto& at(Sequence& sq, std::int32_t layer, std::int32_t head) const noexcept { return sq.streams[index(layer, head)]; }
  const auto& at(const Sequence& sq, std::int32_t layer, std::int32_t head) const noexcept {
    return sq.streams[index(layer, head)];
  }
  /// Stream (layer, head) of sequence s, each argument checked in that order.
  const auto& get(seq_id s, std::int32_t layer, std::int32_t head, const char* fn) const {
    const Sequence& sq = find(s, fn);
    check_layer(layer, fn);
    check_head(head, fn);
    return at(sq, layer, head);
  }

  /// What rewind keeps: every head of one layer with the indices of its tokens at positions < n
  /// (in stream order; a suffix is dropped when positions ascend, as append gives them).
  std::vector<std::pair<std::int32_t, std::vector<std::int32_t>>> tokens_before(const Sequence& sq, std::int32_t layer,
                                                                                std::int32_t n) const {
    std::vector<std::pair<std::int32_t, std::vector<std::int32_t>>> heads(static_cast<std::size_t>(num_kv_heads_));
    for (std::int32_t h = 0; h < num_kv_heads_; ++h) {
      auto& kept = heads[static_cast<std::size_t>(h)];
      kept.first = h;
      const auto& pos = at(sq, layer, h).positions;
      for (std::size_t t = 0; t < pos.size(); ++t)
        if (pos[t] < n) kept.second.push_back(static_cast<std::int32_t>(t));
    }
    return heads;
  }

 private:
  const char* owner_;
  std::int32_t num_layers_, num_kv_heads_;
  map_type seqs_;
  seq_id next_id_ = 0;
};

}  // namespace detail

KVC_END_NAMESPACE
