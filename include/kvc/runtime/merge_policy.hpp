// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// What a merging stage of a spec asks for (runtime/merge_registry.hpp parses it), and its
/// application to one layer of any merged store: the one place that maps a policy to the merge
/// method's call, shared by the merger and by the merged caches' any_cache::apply_merge (which
/// knows its store's type where the merger does not).

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include <kvc/error.hpp>
#include <kvc/merge/cam.hpp>
#include <kvc/merge/d2o.hpp>
#include <kvc/merge/kvmerger.hpp>
#include <kvc/store/merged_cache.hpp>

KVC_BEGIN_NAMESPACE
namespace runtime {

/// What a merging stage of a spec asks for.
struct merge_policy {
  enum class method { cam, d2o, kvmerger };
  method which = method::cam;
  merge::cam_options cam;
  merge::d2o_options d2o;
  merge::kvmerger_options kvmerger;
  std::string text;  ///< the stage as written
};

/// Keeps kept[h] in every kv head of `layer` and merges the evicted tokens by policy p.
/// \param tau  D2O's threshold for this (sequence, layer); used, and required, only by d2o
template <class Store>
void apply_merge_policy(merge::basic_merged_cache<Store>& c, const merge_policy& p, merge::d2o_threshold* tau, seq_id s,
                        std::int32_t layer, const std::vector<std::vector<float>>& scores,
                        const std::vector<std::vector<std::int32_t>>& kept) {
  switch (p.which) {
    case merge_policy::method::cam: {
      // CaM spreads mass by attention: a scorer whose scores are not attention-like (negative,
      // NaN) is named here rather than deep in cam_plan.
      for (std::size_t h = 0; h < scores.size(); ++h)
        for (std::size_t t = 0; t < scores[h].size(); ++t)
          KVC_EXPECTS_IN("kvc::runtime::merger::apply", std::isfinite(scores[h][t]) && scores[h][t] >= 0.0f, "'",
                         p.text, "': scores[", h, "][", t, "] = ", scores[h][t],
                         ", expected finite attention scores >= 0 (CaM weighs evicted values by attention; pair "
                         "it with an attention-based scorer such as snapkv)");
      merge::cam_merge_layer(c, s, layer, scores, kept, p.cam);
      return;
    }
    case merge_policy::method::d2o:
      KVC_EXPECTS_IN("kvc::runtime::apply_merge_policy", tau != nullptr, "'", p.text,
                     "': tau is null, expected the layer's D2O threshold");
      merge::d2o_merge_layer(c, s, layer, kept, *tau, p.d2o);
      return;
    case merge_policy::method::kvmerger: merge::kvmerger_evict_layer(c, s, layer, scores, kept, p.kvmerger); return;
  }
}

}  // namespace runtime
KVC_END_NAMESPACE
