// SPDX-License-Identifier: Apache-2.0
// A compose::stack that merges over projected pages: projected_cache carries no log-weights, so
// the stack refuses the pair at compile time and says to drop one of the two stages.
#include <kvc/compose/projecting.hpp>
#include <kvc/compose/stack.hpp>
#include <kvc/evict/snapkv.hpp>

namespace cs = kvc::compose;
#ifdef KVC_SHOULD_FAIL
using S = cs::stack<cs::evicting<kvc::evict::snapkv>, cs::merging<cs::d2o>, cs::projecting<cs::pca>, cs::full_precision<float>>;
#else
using S = cs::stack<cs::evicting<kvc::evict::snapkv>, cs::projecting<cs::pca>, cs::full_precision<float>>;
#endif
std::size_t bytes(const S& s) { return s.bytes_in_use(); }
