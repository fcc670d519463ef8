// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// Shared plumbing of the scorers that read an attention_observer.

#include <kvc/evict/core.hpp>
#include <kvc/evict/observer.hpp>

KVC_BEGIN_NAMESPACE
namespace evict {
namespace detail {

inline attention_observer& need_observer(const observations& o, const char* scorer) {
  if (!o.attention) missing_observation(scorer, observation_name<attention_observer>::value);
  return *o.attention;
}

/// Copies a per-token statistic of stream h into out (tokens never observed score `fill`).
template <class Field>
void observed_field(const attention_observer& ob, const layer_input& in, std::int32_t h, Field field,
                    const char* scorer, const char* what, std::vector<float>& out, float fill = 0.0f) {
  const std::int32_t n = in.heads[static_cast<std::size_t>(h)].n;
  out.assign(static_cast<std::size_t>(n), fill);
  const stream_stats* st = ob.find(in.seq, in.layer, h);
  if (!st) return;
  const auto& v = field(*st);
  KVC_EXPECTS(v.size() <= static_cast<std::size_t>(n) && (v.size() > 0 || st->steps == 0), scorer,
              ": the observer holds ", v.size(), " ", what, " values for (layer ", in.layer, ", head ", h,
              ") but the stream has ", n, " tokens; expected an observer tracking ", what,
              " and compacted with the cache");
  for (std::size_t t = 0; t < v.size(); ++t) out[t] = static_cast<float>(v[t]);
}

}  // namespace detail
}  // namespace evict
KVC_END_NAMESPACE
