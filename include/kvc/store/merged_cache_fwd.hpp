// SPDX-License-Identifier: Apache-2.0
#pragma once

/// \file
/// The names of the merged store without its definition (kvc/store/merged_cache.hpp), for headers
/// that only pass it around (runtime/any_cache.hpp): one place declares the alias.

#include <kvc/config.hpp>

KVC_BEGIN_NAMESPACE
template <class T>
class kv_cache;
template <class KQ, class VQ, class Fp>
class quant_cache;

namespace merge {
/// A store whose tokens carry log-weights, over the K/V store `Store` (kvc/store/merged_cache.hpp).
template <class Store>
class basic_merged_cache;
/// Merged tokens in full-precision pages (T = float or kvc::half).
template <class T>
using merged_cache = basic_merged_cache<kv_cache<T>>;
}  // namespace merge
KVC_END_NAMESPACE
